"""Recipes replayed on captured operands: agreement with the autograd functions, hand-made fake quantisation, blockwise vs global."""
from __future__ import annotations

import pytest
import torch

from fp8probe import autograd as AG
from fp8probe import functional as F
from fp8probe.analysis.accumulation import Accumulation
from fp8probe.analysis import strategies as S
from fp8probe.analysis.metrics import ErrorAccumulator
from fp8probe.analysis.strategies import (STRATEGIES, WEIGHT_QUANTIZERS, RecipeOptions, mixed_with_blocksize,
                                         reference_gemms, resolve, run_strategy, site_kwargs, with_options)


def _operands(seed: int, tokens: int = 48, n_in: int = 64, n_out: int = 40):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(tokens, n_in, generator=gen)
    W = torch.randn(n_out, n_in, generator=gen) * 0.05
    G = torch.randn(tokens, n_out, generator=gen) * 1e-3
    return A, W, G


def _sqnr(ref: torch.Tensor, lp: torch.Tensor) -> float:
    acc = ErrorAccumulator()
    acc.update(ref, lp)
    return acc.result()["sqnr_db"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_shapes_and_sqnr_floor(name: str) -> None:
    A, W, G = _operands(1)
    out = run_strategy(STRATEGIES[name], A, W, G)
    ref = reference_gemms(A, W, G)
    assert set(out.gemms) == {"fprop", "dgrad", "wgrad"}
    for gemm, lp in out.gemms.items():
        assert lp.shape == ref[gemm].shape
        # Every 8-bit recipe on unit-scale Gaussian data stays above 15 dB (fp8 E4M3 ≈ 30 dB,
        # MX E4M3 ≈ 25 dB, int8 ≈ 35 dB measured); far below means a wrong operand or transpose.
        assert _sqnr(ref[gemm], lp) > 15.0, (name, gemm)
    for op, (x, q, _) in out.operands.items():
        assert q.shape == x.shape, op
    # Inputs are never modified.
    A2, W2, G2 = _operands(1)
    assert torch.equal(A, A2) and torch.equal(W, W2) and torch.equal(G, G2)


def test_fprop_only_without_gradient() -> None:
    A, W, _ = _operands(2)
    for s in STRATEGIES.values():
        out = run_strategy(s, A, W, None)
        assert set(out.gemms) == {"fprop"} and "grad_output" not in out.operands


def test_global_matches_autograd_function() -> None:
    A, W, G = _operands(3)
    out = run_strategy(STRATEGIES["global"], A, W, G)
    a = A.clone().requires_grad_(True)
    w = W.clone().requires_grad_(True)
    y = AG.matmul_fp8_global(a, w.t())
    y.backward(G)
    assert torch.equal(out.gemms["fprop"], y.detach())
    assert torch.equal(out.gemms["dgrad"], a.grad)
    assert torch.equal(out.gemms["wgrad"], w.grad)


def test_ocp_tensorwise_by_hand() -> None:
    A, W, G = _operands(4)

    def fq(x: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
        scale = x.abs().max() / fmax
        return (x / scale).clamp(-fmax, fmax).to(dtype).float() * scale

    qA, qW = fq(A, torch.float8_e4m3fn, 448.0), fq(W, torch.float8_e4m3fn, 448.0)
    qG = fq(G, torch.float8_e5m2, 57344.0)
    out = run_strategy(STRATEGIES["ocp-tensorwise"], A, W, G)
    torch.testing.assert_close(out.gemms["fprop"], qA @ qW.t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.gemms["dgrad"], qG @ qW, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out.gemms["wgrad"], qG.t() @ qA, rtol=1e-6, atol=1e-9)


def test_int8_outlier_columns_are_exact_in_operand() -> None:
    A, W, G = _operands(5)
    A[:, 7] *= 40.0  # a planted outlier feature
    out = run_strategy(STRATEGIES["int8"], A, W, G, threshold=6.0)
    x, q, _ = out.operands["activation"]
    assert torch.equal(q[:, 7], A[:, 7])
    # Decomposing the outlier column beats treating it as int8 (threshold 0).
    ref = reference_gemms(A, W, G)["fprop"]
    plain = run_strategy(STRATEGIES["int8"], A, W, G, threshold=0.0).gemms["fprop"]
    assert _sqnr(ref, out.gemms["fprop"]) > _sqnr(ref, plain) + 3.0


@pytest.mark.parametrize("blockwise", ["mixed", "ocp-blockwise"])
def test_blockwise_beats_global_on_heterogeneous_rows(blockwise: str) -> None:
    # in = 128 so the mixed recipe's blocks (bsz = 128 over the flattened tensor) are whole rows.
    A, W, G = _operands(6, tokens=64, n_in=128, n_out=96)
    row_scale = torch.logspace(-4, 2, A.shape[0])[:, None]  # token magnitudes span 6 decades
    A = A * row_scale
    G = G * row_scale
    ref = reference_gemms(A, W, G)["fprop"]
    glob = run_strategy(STRATEGIES["global" if blockwise == "mixed" else "ocp-tensorwise"], A, W, G)
    blk = run_strategy(STRATEGIES[blockwise], A, W, G)
    # The Frobenius SQNR is dominated by the large tokens (both ≈ 28 dB here); the difference is in
    # the 16 smallest tokens (|a| ≈ 1e-4..1e-3): one scale per tensor flushes 30-70 % of them to
    # zero (measured 9-11 dB), per-block scales keep them all (measured ≈ 28 dB).
    small = slice(0, 16)
    assert (glob.operands["activation"][1][small] == 0).float().mean() > 0.25
    assert (blk.operands["activation"][1][small] == 0).sum() == 0
    assert _sqnr(ref[small], blk.gemms["fprop"][small]) > _sqnr(ref[small], glob.gemms["fprop"][small]) + 10.0


def test_resolve() -> None:
    assert [s.name for s in resolve("all")] == list(STRATEGIES)
    assert [s.name for s in resolve("int8, global,int8")] == ["int8", "global"]
    with pytest.raises(ValueError, match="strategy must be"):
        resolve("fp4")
    with pytest.raises(ValueError, match="at least one"):
        resolve("")


def test_shape_checks() -> None:
    A, W, G = _operands(7)
    with pytest.raises(ValueError, match="same contraction size"):
        run_strategy(STRATEGIES["global"], A, W.t(), G)
    with pytest.raises(ValueError, match="G"):
        run_strategy(STRATEGIES["global"], A, W, G.t())


@pytest.mark.parametrize("granularity, block", [("tensor", None), ("block", (128, 128))])
def test_transposed_weight_reuse_is_exact(granularity: str, block) -> None:
    # The scaled recipes reuse qW.t() for dgrad when the scaling is per tensor or square-tiled;
    # that is only valid if quantising Wᵀ gives exactly the transpose.
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(200, 300, generator=gen) * torch.logspace(-3, 1, 300)[None, :]
    q = F.dequantize_scaled(F.quantize_scaled(W, "e4m3", granularity, block), torch.float32)
    qt = F.dequantize_scaled(F.quantize_scaled(W.t().contiguous(), "e4m3", granularity, block), torch.float32)
    assert torch.equal(q.t(), qt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_weight_quantizer_is_the_runners_weight_operand(name: str, dtype: torch.dtype) -> None:
    """WEIGHT_QUANTIZERS (what weights-only analysis uses) reproduces each runner's weight operand bit for bit."""
    A, W, G = (t.to(dtype) for t in _operands(7, n_in=256, n_out=136))
    W[3, 5] = 0.9  # one large element: per-tensor and per-block scales differ from the rows'
    x, q_run, sat_run = run_strategy(STRATEGIES[name], A, W, G).operands["weight"]
    wq = WEIGHT_QUANTIZERS[name]
    assert wq.scaling in ("tensor", "row", "block") and (wq.block is not None) == (wq.scaling == "block")
    q, sat = wq.quantize(W)
    assert x is W and q.dtype == q_run.dtype and torch.equal(q, q_run)
    assert (sat is None) == (sat_run is None)
    if sat is not None:
        assert torch.equal(sat, sat_run)


def _slice_by_slice(strategy, A, W, G, threshold, b_is_weight):
    """The BATCHED_RULE run literally: strategy.run on each 2-D slice, results stacked."""
    outs = [strategy.run(A[i], W[i], None if G is None else G[i], threshold, b_is_weight,
                         **site_kwargs(strategy, None, "site", i)) for i in range(A.shape[0])]
    gemms = {k: torch.stack([o.gemms[k] for o in outs]) for k in outs[0].gemms}
    operands = {}
    for k in outs[0].operands:
        x, q, sat = zip(*(o.operands[k] for o in outs))
        operands[k] = (torch.stack(x), torch.stack(q), None if sat[0] is None else torch.stack(sat))
    return gemms, operands


# (Bt, M, K, N): M = 24 < 128 (a 128x128 weight block is the whole slice height), M = 200 (not a
# multiple of 128: the 128x128 blocks straddle slices, so that case must fall back to slice by slice),
# K = 150 (partial 1x128 tiles; 150 = 4·32 + 22: a partial MX block), K = 16 < 32.
@pytest.mark.parametrize("shape", [(5, 24, 150, 40), (3, 200, 64, 136), (4, 16, 16, 8)])
@pytest.mark.parametrize("b_is_weight", [False, True])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_batched_replay_is_the_slice_by_slice_run(name: str, b_is_weight: bool, shape) -> None:
    """run_strategy on [Bt, M, K] operands == each slice replayed alone, bit for bit, on every strategy
    (the OCP/MX recipes quantise all slices in one cast; the others loop)."""
    bt, m, k, n = shape
    gen = torch.Generator().manual_seed(sum(shape) + b_is_weight)
    # Slices of very different scales (so one shared scale would differ from per-slice ones), a zero
    # slice (scale 1), and an outlier column.
    scales = torch.logspace(-3, 3, bt)[:, None, None]
    A = torch.randn(bt, m, k, generator=gen) * scales
    A[1] = 0.0
    A[:, :, 3] *= 40.0
    W = torch.randn(bt, n, k, generator=gen) * scales.flip(0)
    G = torch.randn(bt, m, n, generator=gen) * 1e-3 * scales
    strat = STRATEGIES[name]
    for g in (G, None):
        out = run_strategy(strat, A, W, g, 6.0, b_is_weight=b_is_weight)
        gemms, operands = _slice_by_slice(strat, A, W, g, 6.0, b_is_weight)
        assert set(out.gemms) == set(gemms) and set(out.operands) == set(operands)
        for key, y in gemms.items():
            assert torch.equal(out.gemms[key], y), (name, key)
        for key, (x, q, sat) in operands.items():
            x2, q2, sat2 = out.operands[key]
            assert torch.equal(x2, x) and torch.equal(q2, q), (name, key)
            assert (sat is None) == (sat2 is None) and (sat is None or torch.equal(sat2, sat)), (name, key)


def test_scaled_recipes_take_batched_operands_in_one_call() -> None:
    """The OCP/MX recipes and the bnb global / mixed / switchback / int8 (and only strategies that say so) skip
    run_strategy's per-slice loop; with the simulated accumulator global / mixed loop again."""
    assert {n for n, s in STRATEGIES.items() if s.runs_batched} == {
        "ocp-tensorwise", "ocp-rowwise", "ocp-blockwise", "mxfp8", "mxfp8-rceil", "nvfp4", "nvfp4-train", "mxfp4",
        "mxfp6-e2m3", "mxfp6-e3m2", "global", "mixed", "switchback", "int8"}
    assert mixed_with_blocksize(64).runs_batched
    accum = with_options(resolve("global,mixed"), RecipeOptions(accumulation=Accumulation(mantissa_bits=13)))
    assert not any(s.runs_batched for s in accum)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which", ["global", "mixed", "mixed bs=64", "switchback", "int8"])
def test_batched_bnb_replay_in_16_bit_is_the_slice_by_slice_run(which: str, dtype) -> None:
    """The batched bnb runners keep the autograd functions' dtype casts (16-bit operands, matmuls in
    that dtype): bit for bit the slice-by-slice run, for slices whose blocks line up and for ones that do not."""
    strat = mixed_with_blocksize(64) if which == "mixed bs=64" else STRATEGIES[which]
    gen = torch.Generator().manual_seed(7)
    for bt, m, k, n in ((3, 16, 64, 32), (2, 10, 24, 7)):
        A = (torch.randn(bt, m, k, generator=gen) * torch.logspace(-2, 2, bt)[:, None, None]).to(dtype)
        W = torch.randn(bt, n, k, generator=gen).to(dtype)
        G = (torch.randn(bt, m, n, generator=gen) * 1e-2).to(dtype)
        out = run_strategy(strat, A, W, G, 6.0, b_is_weight=False)
        gemms, operands = _slice_by_slice(strat, A, W, G, 6.0, False)
        for key, y in gemms.items():
            assert out.gemms[key].dtype == y.dtype and torch.equal(out.gemms[key], y), (which, key)
        for key, (x, q, _) in operands.items():
            assert torch.equal(out.operands[key][1], q), (which, key)


def test_batched_bnb_replay_quantises_each_operand_once(monkeypatch) -> None:
    """Where the slices' blocks line up, global runs one quantiser call per operand role (not one per
    slice), switchback one int8 row quantisation for A and one for W."""
    calls = {"fq": 0, "int8": 0}
    fq, rows = F.fake_quantize, F.int8_vectorwise_quant

    def count_fq(*a, **kw):
        calls["fq"] += 1
        return fq(*a, **kw)

    def count_rows(*a, **kw):
        calls["int8"] += 1
        return rows(*a, **kw)

    monkeypatch.setattr(F, "fake_quantize", count_fq)
    monkeypatch.setattr(F, "int8_vectorwise_quant", count_rows)
    A, W, G = torch.randn(8, 16, 32), torch.randn(8, 24, 32), torch.randn(8, 16, 24)
    run_strategy(STRATEGIES["global"], A, W, G, b_is_weight=False)
    assert calls["fq"] == 3  # A, Wᵀ and G, each for the GEMMs and reused as the reported operand
    run_strategy(STRATEGIES["switchback"], A, W, G, b_is_weight=False)
    assert calls["int8"] == 2


def test_batched_matmul_uses_bmm_only_where_it_equals_the_slices(monkeypatch) -> None:
    """_mm checks torch.bmm against per-slice matmuls once per (shape, strides, dtype, threads) key: a bmm that
    sums in another order (simulated: off by one ulp) is never used, an exact one is used from then on."""
    from fp8probe.analysis import strategies as S

    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(3, 16, 8, generator=g), torch.randn(3, 8, 12, generator=g)
    slices = torch.stack([a[i] @ b[i] for i in range(3)])
    monkeypatch.setattr(S, "_BMM_EXACT", {})
    calls = []
    real_bmm = torch.bmm

    def off_by_one_ulp(x, y):
        calls.append(1)
        return torch.nextafter(real_bmm(x, y), torch.tensor(float("inf")))

    monkeypatch.setattr(torch, "bmm", off_by_one_ulp)
    assert torch.equal(S._mm(a, b), slices) and torch.equal(S._mm(a, b), slices)
    assert len(calls) == 1 and list(S._BMM_EXACT.values()) == [False]   # checked once, then never used
    monkeypatch.setattr(torch, "bmm", real_bmm)
    a2, b2 = torch.randn(2, 16, 8, generator=g), torch.randn(2, 8, 12, generator=g)  # a new key
    ref = torch.stack([a2[i] @ b2[i] for i in range(2)])
    assert torch.equal(S._mm(a2, b2), ref) and torch.equal(S._mm(a2, b2), ref)
    assert S._BMM_EXACT[(tuple(a2.shape), a2.stride(), tuple(b2.shape), b2.stride(), a2.dtype, "cpu",
                         torch.get_num_threads())] is True


def test_exactness_probes_see_a_changed_summation_order() -> None:
    """_agree's probes reveal two summation orders of the same products: one sum of K terms vs the same
    terms as two partial sums added (what a BLAS kernel that splits K does), also for a single output and a
    split two terms before the end. Probes whose values spread over ±24 binades missed most of these (each
    sum is then about its largest term); the same probes on the same order always agree."""
    from fp8probe.analysis import strategies as S

    def seq(x, y):
        return sum((x[:, k:k + 1] * y[k:k + 1, :] for k in range(x.shape[1])), torch.zeros(()))

    def split(h):
        return lambda x, y: seq(x[:, :h], y[:h]) + seq(x[:, h:], y[h:])

    for m, k, n in ((7, 33, 5), (1, 33, 1), (2, 8, 2)):
        a, b = torch.empty(m, k), torch.empty(k, n)
        for h in (k // 2, k - 2):
            assert not any(S._agree(("split", m, k, n, h, i), a, b, seq, split(h)) for i in range(5))
        assert S._agree(("same", m, k, n), a, b, seq, seq)


# (Bt, M, K, N): small slices; K > F32_EXACT_K (the int8 GEMMs per slice); M > F32_EXACT_K (wgrad's per slice)
@pytest.mark.parametrize("shape", [(4, 12, 40, 9), (2, 3, 1030, 5), (2, 1030, 8, 3)], ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.01, 2.0, 6.0, 1e9])
@pytest.mark.parametrize("row_scale", ["bnb", "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_stacks_are_the_slice_by_slice_run(shape, threshold: float, row_scale: str, dtype) -> None:
    """LLM.int8 on a stack (_run_int8_stacked: one quantisation per operand role, one bmm per int8 GEMM) gives
    each slice's _run_int8_direct bit for bit, GEMMs and reported operands; slices with outliers (6.0: the last
    one, 2.0: the last two) are replayed alone over their part of the results; where every slice has
    one (0.01), or a contraction is longer than F32_EXACT_K, the run goes slice by slice."""
    bt, m, k, n = shape
    gen = torch.Generator().manual_seed(bt * m + k)
    A = (torch.randn(bt, m, k, generator=gen) * torch.logspace(-1.5, 0.5, bt)[:, None, None]).clamp(-5.5, 5.5)
    A[0] = A[0].clamp(-1.9, 1.9)
    A[-1, 0, 1] = 7.5  # an outlier at threshold 6 in the last slice only
    A = A.to(dtype)
    W = torch.randn(bt, n, k, generator=gen).to(dtype).mT.contiguous().mT  # column-major slices
    G = (torch.randn(bt, n, m, generator=gen) * 1e-2).to(dtype).mT  # a transposed view
    strat = with_options([STRATEGIES["int8"]], RecipeOptions(int8_row_scale=row_scale))[0]
    stacked = S._run_int8_stacked(A, W, G, threshold, row_scale)
    assert (stacked is not None) == (threshold != 0.01 and k <= 1024 and m <= 1024)
    for g in (G, None):
        out = run_strategy(strat, A, W, g, threshold, b_is_weight=False)
        gemms, operands = _slice_by_slice(strat, A, W, g, threshold, False)
        assert set(out.gemms) == set(gemms)
        for key, y in gemms.items():
            assert out.gemms[key].dtype == y.dtype and torch.equal(out.gemms[key], y), key
        for key, (x, q, _) in operands.items():
            assert torch.equal(out.operands[key][1], q), key
