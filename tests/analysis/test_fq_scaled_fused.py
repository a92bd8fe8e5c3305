"""The fused scaled fake-quantisation (backends.cpu.fused_scaled, strategies._cast / _fq_scaled) against the
unfused ops, bit for bit, and the block statistics it carries against block_scales' recomputation."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fp8probe.analysis import block_scales as BS
from fp8probe.analysis import strategies as S
from fp8probe.analysis.pipeline import analyze
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from fp8probe.formats import FORMATS
from support import forbid_full_copies

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_FMTS = ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2")
LOWBIT_FMTS = ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4")
RULES = {"mx": ("floor", "rceil", "even")}
# per-tensor, per-row, 1x128, 128x128, ragged 7x13: e4m3/e5m2 take any tile; MX 1x32; NVFP4 1x16, 16x16
TILES = {"float8": ((10**9, 10**9), (1, 10**9), (1, 128), (128, 128), (7, 13)), "mx": ((1, 32),),
         "nvfp4": ((1, 16), (16, 16))}
# (37, 200): odd sizes; (300, 577): a per-tensor / 128-row tile spans several row pieces of the C work split;
# (3, 70001): a row longer than one work unit (a tile in several column pieces)
SHAPES = ((37, 200), (300, 577), (3, 70001))

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")


def sample(shape: tuple[int, int], seed: int, dtype: torch.dtype, inf: bool) -> torch.Tensor:
    """Seeded data over 2**-40 .. 2**40 by column, with ±0, an all-zero row, subnormals and (inf) ±Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.linspace(-40, 40, shape[1]))[None, :]
    x[1, :] = 0.0
    x[0, 3], x[2, 4] = -0.0, 1e-42                       # float32 subnormal (0 in fp16/bf16)
    x[0, 5] = 3e-39 if dtype != torch.float16 else 3e-6  # a subnormal of the dtype itself
    if inf:
        x[2, 7], x[0, 9] = float("inf"), -float("inf")
    x = x.to(dtype)
    return x if inf else torch.where(x.abs() == float("inf"), 0.0, x).to(dtype)  # fp16 overflow: keep finite


def unfused(x: torch.Tensor, fmt: str, tile: tuple[int, int], rule: str):
    """What _fq_scaled computed before the fused kernel: the reference ops and the mask from their outputs."""
    x32 = x.float()
    g = ref.nvfp4_global_scale(x32) if fmt == "nvfp4" else None
    data, scale = ref.quantize_scaled(x32, fmt, *tile, rule, g)
    q = ref.dequantize_scaled(data, scale, *tile, torch.float32, fmt, g)
    sat = (ref.element_values(data, fmt).abs() == FORMATS[fmt].max) & (x32.abs() > q.abs())
    return q, sat, scale, g


def tile_counts(x: torch.Tensor, q: torch.Tensor, sat: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    br, bc = min(tile[0], x.shape[0]), min(tile[1], x.shape[1])
    nonzero = torch.isfinite(x) & (x != 0)
    return torch.stack([S._tile_sums(m, br, bc) for m in (nonzero, nonzero & (q == 0), sat)])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def cases(fmts: tuple[str, ...]):
    for fmt in fmts:
        kind = FORMATS[fmt].kind
        for tile in TILES[kind]:
            for rule in RULES.get(kind, ("floor",)):
                yield fmt, tile, rule


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmts", (FP8_FMTS, LOWBIT_FMTS), ids=("fp8", "lowbit"))
def test_fused_cast_matches_the_ops(isa, fmts, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    # ±Inf only for the FP8 elements: a 4/6-bit tile with an Inf gets a NaN scale (the fallback test)
    x = sample(shape, 7 + shape[0], dtype, inf=fmts is FP8_FMTS)
    for fmt, tile, rule in cases(fmts):
        got = cpu.fused_scaled(x, fmt, *tile, rule)
        assert got is not None, (fmt, tile, rule)
        q, sat, scale, g = unfused(x, fmt, tile, rule)
        assert torch.equal(bits(got.q), bits(q)), (fmt, tile, rule)
        assert torch.equal(got.saturated, sat), (fmt, tile, rule)
        assert torch.equal(bits(got.scale), bits(scale)), (fmt, tile, rule)
        assert (got.global_scale is None) == (g is None) and (g is None or torch.equal(got.global_scale, g))
        assert torch.equal(got.counts, tile_counts(x, q, sat, tile)), (fmt, tile, rule)
        finite = x.float()[torch.isfinite(x)]
        assert got.amax == (float(finite.abs().max()) if finite.numel() else 0.0), (fmt, tile, rule)


def code_values(fmt: str) -> torch.Tensor:
    """Every finite element value of fmt's element format (float32)."""
    storage = ref.SCALED_FORMATS[fmt][0]
    if storage == torch.uint8:
        return ref._lowbit_table(ref.ELEMENT_OF[fmt])
    v = torch.arange(256, dtype=torch.uint8).view(storage).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt", FP8_FMTS + LOWBIT_FMTS)
def test_every_code_its_midpoints_and_their_neighbours(isa, fmt: str) -> None:
    # the fused kernel decodes the element value arithmetically instead of reading dequantize's table:
    # every code value, every rounding midpoint and the floats next to it, in rows of 32 that start
    # with the format max (so the scale is 1, or NVFP4's 448·g)
    v = code_values(fmt).unique()
    mid = (v[1:] + v[:-1]) / 2
    cand = torch.cat([v, mid, torch.nextafter(mid, torch.tensor(float("inf"))),
                      torch.nextafter(mid, torch.tensor(-float("inf")))])
    width = 16 if fmt == "nvfp4" else 32
    cand = torch.cat([cand, cand.new_zeros(-len(cand) % (width - 1))]).view(-1, width - 1)
    x = torch.cat([torch.full((cand.shape[0], 1), FORMATS[fmt].max), cand], dim=1)
    tile = {"nvfp4": (1, 16), "e4m3": (1, 32), "e5m2": (1, 32)}.get(fmt, (1, 32))
    got = cpu.fused_scaled(x, fmt, *tile)
    q, sat, scale, _ = unfused(x, fmt, tile, "floor")
    assert torch.equal(bits(got.q), bits(q)) and torch.equal(got.saturated, sat)
    assert torch.equal(got.counts, tile_counts(x, q, sat, tile))


def test_fused_cast_sees_clipping_and_underflow(isa) -> None:
    # MX FLOOR clips block maxima in [448, 512)·2**k; tiny values next to a large one underflow
    x = torch.tensor([[500.0, 1.0, 1e-4, 0.0] * 8, [1.0] * 32])
    got = cpu.fused_scaled(x, "mxfp8-e4m3", 1, 32, "floor")
    assert got.counts.tolist() == [[24, 32], [8, 0], [8, 0]]
    assert got.saturated[0, ::4].all() and int(got.saturated.sum()) == 8


# a row longer than a work unit; a row wider than a transposed input's units (1024 columns) with row
# counts that leave partial bands (64 rows) and partial 128-row tiles; narrow rows (wgrad's tokens), whose
# bands hold about a unit of elements (100 columns: 655 rows), the last one partial
T_SHAPES = ((37, 200), (300, 577), (3, 70001), (130, 2100), (1500, 100))


@pytest.mark.parametrize("shape", T_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmts", (FP8_FMTS, LOWBIT_FMTS), ids=("fp8", "lowbit"))
@pytest.mark.parametrize("special", ("inf", "nan"))
def test_transposed_views_are_read_without_a_copy(isa, fmts, dtype, shape, special, monkeypatch) -> None:
    """fused_scaled and quantize_scaled of a transposed view (x.mT contiguous: the replay's Gᵀ, Aᵀ, Wᵀ) read it
    band by band: the bits of the contiguous x's results (None, the NaN fallback, alike), and no copy of x."""
    x = sample(shape, 11, dtype, inf=True)
    if special == "nan":
        x[2, shape[1] // 2] = float("nan")
    xt = x.mT.contiguous().mT
    assert not xt.is_contiguous() and torch.equal(xt, x) is (special == "inf")
    copied = forbid_full_copies(monkeypatch)
    for fmt, tile, rule in cases(fmts):
        got, want = cpu.fused_scaled(xt, fmt, *tile, rule), cpu.fused_scaled(x, fmt, *tile, rule)
        assert (got is None) == (want is None), (fmt, tile, rule)
        if want is not None:
            for a, b in zip(got, want):
                if isinstance(a, float):  # amax
                    assert a == b, (fmt, tile, rule)
                    continue
                assert (a is None and b is None) or torch.equal(bits(a), bits(b)), (fmt, tile, rule)
        g = torch.tensor(0.37) if fmt == "nvfp4" else None
        (d1, s1), (d2, s2) = cpu.quantize_scaled(xt, fmt, *tile, rule, g), cpu.quantize_scaled(x, fmt, *tile, rule, g)
        assert torch.equal(d1.view(torch.uint8), d2.view(torch.uint8)) and torch.equal(bits(s1), bits(s2))
    assert copied == []


@pytest.mark.parametrize("fmt, special", [("e4m3", float("nan")), ("mxfp8-e5m2", float("nan")),
                                          ("mxfp4-e2m1", float("inf")), ("nvfp4", float("nan"))])
def test_nan_results_fall_back_to_the_ops(isa, fmt: str, special: float) -> None:
    x = sample((20, 64), 3, torch.float32, inf=False)
    x[4, 6] = special
    tile = TILES[FORMATS[fmt].kind][0]
    assert cpu.fused_scaled(x, fmt, *tile) is None
    q, sat, rec = S._cast(x, fmt, "block", tile)
    want_q, want_sat, _, _ = unfused(x, fmt, tile, "floor")
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(sat, want_sat)
    # the records from the ops' own scales: block_scales' recomputation from x, q and the mask, bit for bit
    want = BS._scaled_records(x, q, sat, fmt, tile, "floor")
    assert all(torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)
               for a, b in zip(rec, want, strict=True))


def test_reference_backend_and_other_devices_keep_the_ops(monkeypatch) -> None:
    x = sample((40, 96), 5, torch.bfloat16, inf=False)
    fused = S._cast(x, "e4m3", "block", (1, 128))
    assert fused[2] is not None
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert cpu.fused_scaled(x, "e4m3", 1, 128) is None
    q, sat, rec = S._cast(x, "e4m3", "block", (1, 128))
    assert torch.equal(bits(q), bits(fused[0])) and torch.equal(sat, fused[1])
    # the ops path counts the records from its own cast's scales: the fused pass's, bit for bit
    assert rec is not None and all(torch.equal(a, b) for a, b in zip(rec, fused[2], strict=True))
    assert cpu.fused_scaled(x.to("meta"), "e4m3", 1, 128) is None


def test_fq_scaled_bad_arguments_raise_as_before() -> None:
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="got"):
        S._fq_scaled(x, "mxfp8-e4m3", "block", (1, 16))     # MX takes 1x32 only
    with pytest.raises(ValueError, match="got"):
        S._fq_scaled(x, "e4m3", "block", (1, 32), "rceil")  # scale rules are MX-only
    with pytest.raises(ValueError, match="got"):
        S._fq_scaled(x, "e4m3", "column", None)


@pytest.mark.parametrize("fmt, gran, block", [("e4m3", "tensor", None), ("e4m3", "row", None),
                                              ("e5m2", "block", (1, 128)), ("e4m3", "block", (128, 128)),
                                              ("e4m3", "block", (16, 16)), ("mxfp4-e2m1", "block", (1, 32)),
                                              ("nvfp4", "block", (16, 16))])
def test_batched_records_are_the_slices_records(fmt: str, gran: str, block) -> None:
    x = sample((3 * 48, 200), 11, torch.float32, inf=False).view(3, 48, 200)
    q, sat, recs = S._cast_slices(x, fmt, gran, block)
    assert len(recs) == 3
    for i in range(3):
        qi, si, ri = S._cast(x[i], fmt, gran, block)
        assert torch.equal(bits(q[i]), bits(qi)) and torch.equal(sat[i], si)
        assert all(torch.equal(a, b) for a, b in zip(recs[i], ri))


@pytest.mark.parametrize("fmt, block", [("e4m3", (1, 128)), ("e4m3", (128, 128)), ("mxfp8-e4m3", (1, 32)),
                                        ("mxfp6-e3m2", (1, 32)), ("nvfp4", (1, 16)), ("nvfp4", (16, 16))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_records_equal_block_scales_recomputation(fmt: str, block: tuple[int, int], dtype: torch.dtype) -> None:
    x = sample((70, 300), 13, dtype, inf=False)
    q, sat, rec = S._cast(x, fmt, "block", block)
    want = BS._scaled_records(x, q, sat, fmt, block, "floor")
    assert rec is not None and len(rec) == len(want)
    for got, exp in zip(rec, want):
        assert got.dtype == exp.dtype and torch.equal(got, exp)


def test_update_block_stats_uses_the_records(monkeypatch) -> None:
    strat = S.STRATEGIES["ocp-blockwise"]
    A, W, G = torch.randn(64, 256), torch.randn(96, 256), torch.randn(64, 96)
    out = strat.run(A, W, G, 6.0)
    assert set(out.blocks) == {"activation", "weight", "grad_output"}
    recomputed, labels = {}, {}
    BS.update_block_stats(recomputed, labels, strat, A, W, G, out.operands)
    monkeypatch.setattr(BS, "_scaled_records", lambda *a: pytest.fail("recomputed despite the records"))
    carried = {}
    BS.update_block_stats(carried, {}, strat, A, W, G, out.operands, blocks=out.blocks)
    assert carried.keys() == recomputed.keys()
    assert all(carried[k].result() == recomputed[k].result() for k in carried)


def _model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(160, 256), torch.nn.GELU(), torch.nn.Linear(256, 96))
    with torch.no_grad():
        model[0].weight[3, :] *= 300.0                       # an outlier row: clipping / underflow in blocks
    return model, [torch.randn(2, 40, 160), torch.randn(2, 40, 160)]


def test_block_scales_table_equals_the_recompute_path(monkeypatch) -> None:
    strategies = "ocp-blockwise,mxfp8,mxfp8-rceil,mxfp4,nvfp4"
    model, batches = _model_and_batches()
    fast = analyze(model, batches, strategies, e2e=False).tables["block_scales"]
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    model, batches = _model_and_batches()
    slow = analyze(model, batches, strategies, e2e=False).tables["block_scales"]
    assert len(fast) > 0 and fast["clipped_block_frac"].gt(0).any()
    # Σlog2 s and Σ(log2 s)²: the C pass adds in block order, torch in its own (block_scales._batch_stats);
    # the std (sqrt(E[l²] - mean²), in log2 units) of equal scales is 0 up to that order's cancellation
    sums = ["scale_log2_mean", "scale_log2_std"]
    pd.testing.assert_frame_equal(fast.drop(columns=sums), slow.drop(columns=sums), check_exact=True)
    pd.testing.assert_frame_equal(fast[sums], slow[sums], check_exact=False, rtol=1e-9, atol=1e-6)


def test_the_ops_path_carries_records_and_never_recomputes_the_scales(monkeypatch) -> None:
    """Off the fused C pass (CUDA, the reference backend) the casts' own scales make the block records: the
    records are the same (test_block_scales_table_equals_the_recompute_path: the C pass's table) and
    block_scales never re-derives a scale (on a GPU each of those was ~20 more kernel launches per slice
    and operand)."""
    from fp8probe.backends import reference as ref

    def refuse(*a, **kw):
        raise AssertionError("block_scales recomputed a tile scale")
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    monkeypatch.setattr(ref, "tile_scales", refuse)
    model, batches = _model_and_batches()
    table = analyze(model, batches, "ocp-blockwise,mxfp8,nvfp4,nvfp4-train", e2e=False).tables["block_scales"]
    assert set(table["strategy"]) == {"ocp-blockwise", "mxfp8", "nvfp4", "nvfp4-train"}


@pytest.mark.parametrize("backend", ["c", "reference"])
def test_a_models_pass_makes_no_block_records(backend, monkeypatch) -> None:
    """_cast(records=False) gives None on both paths, and a recipe's GEMMs inside a model (_ScaledLinear: fprop and
    dgrad without ``blocks``) make no records: in the end-to-end passes they were made and dropped for every cast.
    The replay (``blocks`` given) still gets them."""
    if backend == "reference":
        monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    assert S._cast(x, "mxfp8-e4m3", "block", (1, 32), records=False)[2] is None
    assert S._cast(x, "mxfp8-e4m3", "block", (1, 32))[2] is not None
    made = []
    for name in ("_fused_records", "tile_records"):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _r=real, **k: made.append(1) or _r(*a, **k))
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(6), requires_grad=True)
    xg = x.clone().requires_grad_(True)
    for strat in ("ocp-blockwise", "mxfp8", "nvfp4"):
        S.STRATEGIES[strat].linear(xg, W, None, 6.0).square().sum().backward()
    assert made == []
    S.run_strategy(S.STRATEGIES["mxfp8"], x, W.detach(), torch.randn(64, 48))
    assert made


def test_both_fused_outputs_are_fresh_tensors_with_huge_pages_advised(monkeypatch) -> None:
    """q (float32) and the saturation mask (bool) come from cpu._fresh, which advises huge pages for large
    outputs (a 16M-element mask with 4 KiB pages cost ~9 ms of page faults, ~1 ms advised)."""
    if not cpu.enabled():
        pytest.skip("C kernels not enabled")
    made = []
    fresh = cpu._fresh
    monkeypatch.setattr(cpu, "_fresh", lambda shape, dtype: made.append(dtype) or fresh(shape, dtype))
    got = cpu.fused_scaled(torch.randn(64, 96), "e4m3", 1, 32)
    assert got is not None and sorted(map(str, made)) == ["torch.bool", "torch.float32"]
