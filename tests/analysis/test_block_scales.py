"""Per-block scale statistics: hand-worked MX blocks, NVFP4 / bnb scales against the casts, exact merging, the analyze table and CLI runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fp8probe import functional as F
from fp8probe.analysis.block_scales import BlockScaleStats, block_operands, update_block_stats
from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.strategies import STRATEGIES, run_strategy
from fp8probe.cli import cli

HERE = Path(__file__).resolve().parent


def _stats(name: str, A, W, G=None, b_is_weight=True) -> dict:
    out = run_strategy(STRATEGIES[name], A, W, G)
    stats, labels = {}, {}
    update_block_stats(stats, labels, STRATEGIES[name], A, W, G, out.operands, b_is_weight)
    return {k: {**labels[k], **v.result()} for k, v in stats.items()}


def _hand_activation() -> torch.Tensor:
    """2 rows x 64: blocks (0,0) max 1.0; (0,1) max 480 (FLOOR clips it to 448); (1,0) all zero;
    (1,1) holds 1.0 and 2**-20, which flushes (E4M3 at scale 2**-8: smallest step 2**-17)."""
    A = torch.zeros(2, 64)
    A[0, 3], A[0, 40], A[1, 33], A[1, 50] = 1.0, 480.0, 1.0, 2.0**-20
    return A


@pytest.mark.parametrize(("name", "exps", "clipped"), [("mxfp8", {-8: 2, 0: 1}, 0.25),
                                                       ("mxfp8-rceil", {-8: 2, 1: 1}, 0.0)])
def test_mxfp8_block_statistics_by_hand(name, exps, clipped) -> None:
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    row = _stats(name, _hand_activation(), W)[(name, "activation")]
    assert row["format"] == "mxfp8-e4m3" and row["block"] == "1x32"
    assert row["scale_rule"] == ("floor" if name == "mxfp8" else "rceil")
    assert row["n_blocks"] == 4 and row["zero_blocks"] == 1
    assert dict(zip(range(row["exp_lo"], row["exp_lo"] + len(row["exp_counts"])), row["exp_counts"])) == \
        {e: exps.get(e, 0) for e in range(min(exps), max(exps) + 1)}
    assert row["scale_min"] == 2.0**-8 and row["scale_max"] == 2.0 ** max(exps)
    assert row["scale_log2_mean"] == sum(e * c for e, c in exps.items()) / 3
    assert row["clipped_block_frac"] == clipped
    # 4 nonzero elements, one flushed, in one of the 4 blocks (half of that block's nonzeros)
    assert row["underflow_frac"] == 0.25 and row["underflow_block_frac"] == 0.25
    assert row["max_block_underflow_frac"] == 0.5


def test_nvfp4_and_ocp_block_scales_are_the_casts_scales() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(32, 64, generator=g) * torch.logspace(-3, 2, 64)[None, :]
    W = torch.randn(48, 64, generator=g) * 0.05
    G = torch.randn(32, 48, generator=g) * 1e-4
    rows = _stats("nvfp4", A, W, G)
    assert set(rows) == {("nvfp4", "activation"), ("nvfp4", "weight"), ("nvfp4", "grad_output")}
    for op, x, block in (("activation", A, (1, 16)), ("weight", W, (16, 16)), ("grad_output", G, (1, 16))):
        st = F.quantize_scaled(x, "nvfp4", block=block)
        s = (st.scale * st.global_scale).double()
        s = s[s > 0]
        r = rows[("nvfp4", op)]
        assert r["block"] == f"{block[0]}x{block[1]}" and r["n_blocks"] == st.scale.numel()
        assert r["scale_min"] == float(s.min()) and r["scale_max"] == float(s.max())
        assert r["scale_log2_std"] == pytest.approx(float(torch.log2(s).std(unbiased=False)), rel=1e-9)
        assert sum(r["exp_counts"]) == s.numel()
    ocp = _stats("ocp-blockwise", A, W, G)
    st = F.quantize_scaled(W, "e4m3", "block", (128, 128))
    assert ocp[("ocp-blockwise", "weight")]["scale_max"] == float(st.scale.max())


def test_bnb_mixed_blocks_are_flattened_absmax() -> None:
    g = torch.Generator().manual_seed(2)
    A = torch.randn(24, 40, generator=g)
    W = torch.randn(16, 40, generator=g)
    G = torch.randn(24, 16, generator=g)
    rows = _stats("mixed", A, W, G)
    assert set(rows) == {("mixed", "activation"), ("mixed", "grad_output")}   # W: one absmax, not blocks
    r = rows[("mixed", "activation")]
    bsz = 64  # get_block_sizes: in_features 40 → 64
    flat = torch.nn.functional.pad(A.reshape(-1), (0, -A.numel() % bsz)).reshape(-1, bsz).abs().amax(1).double()
    assert r["block"] == "64 (flattened)" and r["n_blocks"] == flat.numel()
    assert r["scale_min"] == float(flat.min()) and r["scale_max"] == float(flat.max())
    assert r["clipped_block_frac"] == 0.0


@pytest.mark.parametrize("specials", [False, True])
def test_bnb_codebook_records_do_not_requantise(specials: bool, monkeypatch) -> None:
    """The mixed rows take the block absmax from one read of the operand (functional.blockwise_absmax), not
    from a second quantisation, and are the rows the quantiser's own absmax gives (NaN/±Inf included)."""
    import fp8probe.analysis.block_scales as BS

    g = torch.Generator().manual_seed(5)
    A = torch.randn(24, 40, generator=g)
    A[:, 7] *= 50.0
    A[3, :] = 0.0
    if specials:
        A[1, 2], A[5, 9], A[9, 1] = float("nan"), float("inf"), float("-inf")
    W = torch.randn(16, 40, generator=g)
    G = torch.randn(24, 16, generator=g) * 1e-3
    out = run_strategy(STRATEGIES["mixed"], A, W, G)
    old_rows = {}
    for op, (x, q, _) in out.operands.items():
        if op == "weight":
            continue
        bs = 64  # get_block_sizes(40, 16): 64 for both
        flat = x.reshape(1, -1).float().contiguous()
        absmax = F.quantize_blockwise(flat, "bnb-e4m3", blocksize=bs)[1].absmax  # the records' former source
        top = absmax.double().repeat_interleave(bs)[: flat.shape[1]].reshape(1, -1)
        qf = q.reshape(1, -1)
        sat = (qf.double().abs() >= top) & (flat.double().abs() > qf.double().abs())
        old_rows[op] = BlockScaleStats()
        old_rows[op].update(*BS.tile_records(flat, qf, sat, absmax, (1, bs)))

    def refuse(*a, **kw):
        raise AssertionError("quantize_blockwise was called")
    if not specials:  # finite operands: no quantiser call at all
        monkeypatch.setattr(F, "quantize_blockwise", refuse)
    rows = _stats("mixed", A, W, G)
    for op, acc in old_rows.items():
        r = rows[("mixed", op)]
        for k, v in acc.result().items():
            assert r[k] == v or (isinstance(v, float) and math.isnan(v) and math.isnan(r[k])), (op, k)


@pytest.mark.parametrize("name", ["global", "int8", "switchback", "ocp-tensorwise", "ocp-rowwise"])
def test_recipes_without_block_scales_have_no_rows(name) -> None:
    A, W = torch.randn(8, 64), torch.randn(4, 64)
    assert block_operands(STRATEGIES[name], A, W, None) == {}


def test_merge_equals_sequential_updates_exactly() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 96, generator=g)
    accs = []
    seq = BlockScaleStats()
    for k in range(3):
        A = torch.randn(20, 96, generator=g) * 10.0**k
        out = run_strategy(STRATEGIES["mxfp4"], A, W, None)
        stats = {}
        update_block_stats(stats, {}, STRATEGIES["mxfp4"], A, W, None, out.operands)
        accs.append(stats[("mxfp4", "activation")])
        update_block_stats({("mxfp4", "activation"): seq}, {}, STRATEGIES["mxfp4"], A, W, None, out.operands)
    before = accs[0].result()
    merged = accs[0].merge(accs[1]).merge(accs[2])
    assert accs[0].result() == before                      # merge returns a new accumulator
    assert merged.result() == seq.result()
    assert merged.n_blocks == 3 * 20 * 3


def test_empty_batch_adds_no_blocks() -> None:
    A, W, G = torch.empty(0, 64), torch.randn(8, 64), torch.empty(0, 8)
    rows = _stats("mxfp8", A, W, G)
    assert set(rows) == {("mxfp8", "weight")} and rows[("mxfp8", "weight")]["n_blocks"] == 16


def test_batched_gemm_blocks_per_slice() -> None:
    g = torch.Generator().manual_seed(4)
    A, K = torch.randn(3, 10, 64, generator=g), torch.randn(3, 12, 64, generator=g)
    rows = _stats("mxfp8", A, K, None, b_is_weight=False)
    assert rows[("mxfp8", "activation")]["n_blocks"] == 3 * 10 * 2
    assert rows[("mxfp8", "weight")]["n_blocks"] == 3 * 12 * 2


def test_analyze_block_scales_table(tiny_model, tiny_batches) -> None:
    res = analyze(tiny_model, tiny_batches, "ocp-tensorwise,mxfp8,nvfp4")
    t = res.tables["block_scales"]
    assert set(t["strategy"]) == {"mxfp8", "nvfp4"}
    assert set(t["operand"]) == {"activation", "weight", "grad_output"}
    lin = t[(t["strategy"] == "nvfp4") & (t["operand"] == "weight")].iloc[0]
    layer = res.tables["layers"].set_index("layer").loc[lin["layer"]]
    # the weight is counted once, not once per batch (2 batches)
    assert lin["n_blocks"] == math.ceil(layer["out_features"] / 16) * math.ceil(layer["in_features"] / 16)
    assert ((t["clipped_block_frac"] >= 0) & (t["clipped_block_frac"] <= 1)).all()


def test_cli_runs_the_new_strategies(tmp_path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["analyze", f"{HERE / 'tiny_factory.py'}:build", "--strategy",
                                   "mxfp8-rceil,nvfp4,mxfp4,mxfp6-e2m3,mxfp6-e3m2", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    strategies = {r["strategy"] for r in doc["tables"]["gemm"]}
    assert strategies == {"mxfp8-rceil", "nvfp4", "mxfp4", "mxfp6-e2m3", "mxfp6-e3m2"}
    assert {r["strategy"] for r in doc["tables"]["block_scales"]} == strategies
    assert "RCEIL" in doc["metadata"]["rules"]["mxfp8-rceil"]
    html = (out / "index.html").read_text()
    assert "Block scales" in html


@pytest.mark.parametrize("shape,tile", [((1, 10000), (1, 4096)), ((3, 130), (1, 32)), ((5, 64), (1, 64)),
                                        ((1, 7), (1, 128)), ((37, 50), (16, 16)), ((4, 300), (1, 128))])
def test_tile_sums_equal_a_padded_count(shape, tile) -> None:
    from fp8probe.analysis.strategies import _tile_sums

    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) > 0.4
    R, C = shape
    br, bc = tile
    nbr, nbc = -(-R // br), -(-C // bc)
    padded = torch.zeros(nbr * br, nbc * bc, dtype=torch.int64)
    padded[:R, :C] = mask
    expect = padded.reshape(nbr, br, nbc, bc).sum(dim=(1, 3)).reshape(-1)
    assert torch.equal(_tile_sums(mask, br, bc), expect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(24, 40), (3, 10, 40), (3, 16, 64)])
def test_mixed_carries_the_records_of_its_quantiser(dtype, shape, monkeypatch) -> None:
    """mixed's blockwise operands come with BlockRecords from the C fake-quantiser's pass (StrategyOutput.blocks),
    equal to the ones _codebook_records computes from (x, q), so the block_scales rows are the same with and
    without them and with FP8PROBE_BACKEND=reference (no records: recomputed). Batched shapes whose slices
    hold whole blocks (16·64) and whose blocks straddle slices (10·40 with 64)."""
    import fp8probe.analysis.block_scales as BS
    from fp8probe.backends import cpu

    if not cpu.enabled():
        pytest.skip("fast path off")
    g = torch.Generator().manual_seed(6)
    A = torch.randn(shape, generator=g)
    A[..., 7] *= 50.0
    A.view(-1)[::9] *= 1e-7  # underflow
    A.view(-1)[::13] = 0.0
    W = torch.randn(*shape[:-2], 12, shape[-1], generator=g)
    G = torch.randn(*shape[:-1], 12, generator=g) * 1e-3
    A, W, G = A.to(dtype), W.to(dtype), G.to(dtype)
    strat = STRATEGIES["mixed"]
    out = run_strategy(strat, A, W, G, b_is_weight=A.dim() == 2)
    assert set(out.blocks) == {"activation", "grad_output"}
    slices = 1 if A.dim() == 2 else A.shape[0]
    for op, x in (("activation", A), ("grad_output", G)):
        assert len(out.blocks[op]) == slices
        for i in range(slices):
            spec = block_operands(strat, *(t if A.dim() == 2 else t[i] for t in (A, W, G)))[op]
            q = out.operands[op][1] if A.dim() == 2 else out.operands[op][1][i]
            want = BS._codebook_records(spec["x"], q, spec["fmt"], spec["blocksize"])
            for got, ref in zip(out.blocks[op][i], want):
                assert got.dtype == ref.dtype and torch.equal(got.reshape(-1), ref.reshape(-1)), (op, i)

    def rows(blocks, output):
        stats, labels = {}, {}
        update_block_stats(stats, labels, strat, A, W, G, output.operands, A.dim() == 2, True, blocks)
        return {k: v.result() for k, v in stats.items()}
    carried = rows(out.blocks, out)
    assert carried == rows(None, out)
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    ref_out = run_strategy(strat, A, W, G, b_is_weight=A.dim() == 2)
    assert ref_out.blocks == {}
    monkeypatch.delenv("FP8PROBE_BACKEND")  # (the statistics in C again: their float64 sums are compared exactly)
    assert rows(ref_out.blocks, ref_out) == carried


def _random_records(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Block records with zero, NaN, ±Inf, subnormal and huge scales, zero blocks and underflow."""
    scale = torch.exp2(torch.randn(n, generator=g) * 8).float()
    scale[torch.rand(n, generator=g) < 0.05] = 0.0
    scale[torch.rand(n, generator=g) < 0.03] = float("nan")
    scale[torch.rand(n, generator=g) < 0.01] = float("inf")
    if n >= 3:
        scale[:3] = torch.tensor([2.0 ** -149, 2.0 ** -130, 3e38])
    nonzero = torch.randint(0, 5, (n,), generator=g)
    underflow = torch.minimum(torch.randint(0, 3, (n,), generator=g), nonzero)
    return scale, nonzero == 0, nonzero, underflow, torch.rand(n, generator=g) < 0.1


@pytest.mark.parametrize("sizes", [[1000], [7, 0, 1333], [0], [70000, 5]])
def test_block_stats_c_pass_equals_torch(sizes):
    """The C pass gives torch's counts, extremes and histogram exactly and its Σlog2 / Σlog2² up to the
    order of the additions, for records of several slices (concatenated) or one."""
    import fp8probe.analysis.block_scales as BS
    from fp8probe.backends import cpu

    if not cpu.enabled():
        pytest.skip("fast path off")
    g = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    records = [_random_records(n, g) for n in sizes]
    got = BS._batch_stats(records)
    want = BS._torch_batch_stats(*(torch.cat([r[k] for r in records]) for k in range(5)))
    for name in ("n_blocks", "n_zero_blocks", "n_nonfinite_blocks", "n_zero_scale_blocks", "n_clipped_blocks",
                 "n_underflow_blocks", "n_nonzero", "n_underflow", "max_block_underflow", "scale_min", "scale_max",
                 "n_scales", "exp_counts"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("sum_log2", "sum_log2_sq"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-12, nan_ok=True), name


def test_records_of_one_stacked_cast_are_joined_without_a_copy():
    """Slices' records that lie back to back in one tensor (a stacked cast split by slice) are read as one
    view; records elsewhere are concatenated. Both give the same statistics."""
    import fp8probe.analysis.block_scales as BS

    g = torch.Generator().manual_seed(11)
    whole = _random_records(9 * 40, g)
    sliced = list(zip(*(t.view(9, -1) for t in whole)))   # what _cast_slices hands over
    joined = BS._joined([r[2] for r in sliced])
    assert joined.data_ptr() == whole[2].data_ptr() and torch.equal(joined, whole[2])
    copies = [tuple(t.clone() for t in r) for r in reversed(sliced)]
    assert BS._joined([r[2] for r in copies]).data_ptr() != whole[2].data_ptr()
    assert torch.equal(BS._joined([r[2] for r in copies]), torch.cat([r[2] for r in copies]))
    assert BS._batch_stats(sliced) == BS._batch_stats([whole])
    skipped = sliced[::2]   # not adjacent: copied, in order
    assert torch.equal(BS._joined([r[3] for r in skipped]), torch.cat([r[3] for r in skipped]))
