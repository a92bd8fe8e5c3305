"""The bnb recipes' direct replay (no autograd graph) against the autograd functions themselves, bit for bit:
global / mixed (MatMulFP8Global / MatMulFP8Mixed) and int8 (MatMul8bitLt) on 2-D and batched sites."""
from __future__ import annotations

import pytest
import torch

from fp8probe import autograd as AG
from fp8probe.analysis import strategies as S
from fp8probe.analysis.strategies import STRATEGIES, mixed_with_blocksize, run_strategy

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(_bits(a), _bits(b)), what


def _operands(seed: int, m: int, k: int, n: int, dtype: torch.dtype, outlier_cols=(3, 17), specials=False):
    """Activations with outlier columns (|a| up to ~40), zeros and a float32 subnormal; weights; gradients."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(m, k, generator=gen)
    for c in outlier_cols:
        if c < k:
            A[:, c] *= 12.0
    A.view(-1)[::13] = 0.0
    A.view(-1)[5] = 1e-40
    if specials:
        A.view(-1)[[i % (m * k) for i in (1, k + 2, 2 * k - 1)]] = torch.tensor([float("nan"), float("inf"),
                                                                                  float("-inf")])
    W = torch.randn(n, k, generator=gen) * 0.2
    G = torch.randn(m, n, generator=gen) * 1e-2
    return A.to(dtype), W.to(dtype), G.to(dtype)


def _old_int8(A, W, G, threshold, row_scale):
    """What _run_int8 computed before the direct replay: the autograd function and the operand helpers."""
    gemms = S._autograd_gemms(lambda a, w: AG.matmul(a, w, threshold=threshold, row_scale=row_scale), A, W, G)
    ops = {"activation": (A, S._int8_rows(A, threshold, row_scale), None), "weight": (W, *S._weight_int8(W))}
    if G is not None:
        ops["grad_output"] = (G, S._int8_cols(G), None)
    return S.StrategyOutput(gemms, ops)


def _old_fp8(A, W, G, blocks):
    """What _run_global (blocks None) / _run_mixed computed on 2-D operands before: the autograd functions."""
    if blocks is None:
        gemms = S._autograd_gemms(lambda a, w: AG.matmul_fp8_global(a, w.t()), A, W, G)
        ops = {"activation": (A, S._fq_code(A, "bnb-e4m3", None), None), "weight": (W, *S._weight_bnb_global(W))}
        if G is not None:
            ops["grad_output"] = (G, S._fq_code(G, "bnb-e5m2", None), None)
        return S.StrategyOutput(gemms, ops)
    bsz, bsz2 = blocks
    gemms = S._autograd_gemms(lambda a, w: AG.matmul_fp8_mixed(a, w.t(), bsz=bsz, bsz2=bsz2), A, W, G)
    ops = {"activation": (A, S._fq_code(A, "bnb-e4m3", bsz), None), "weight": (W, *S._weight_bnb_global(W))}
    if G is not None:
        ops["grad_output"] = (G, S._fq_code(G, "bnb-e5m2", bsz2), None)
    return S.StrategyOutput(gemms, ops)


def _compare(new: S.StrategyOutput, old: S.StrategyOutput, what) -> None:
    assert set(new.gemms) == set(old.gemms) and set(new.operands) == set(old.operands), what
    for key in old.gemms:
        _assert_same(new.gemms[key], old.gemms[key], (what, key))
    for key, (x, q, sat) in old.operands.items():
        x2, q2, sat2 = new.operands[key]
        assert x2 is x, (what, key)
        _assert_same(q2, q, (what, key, "operand"))
        # (int8 operands say "nothing clipped" explicitly; the codebook recipes leave the test to the accumulator)
        assert all(m is None or not m.any() for m in (sat, sat2)), (what, key)


# threshold 0 (no decomposition), 1.5 (outlier columns present), 1e4 (threshold > 0, none present)
@pytest.mark.parametrize("threshold", [0.0, 1.5, 1e4])
@pytest.mark.parametrize("row_scale", ["bnb", "paper"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_direct_replay_is_matmul8bitlt(threshold: float, row_scale: str, dtype: torch.dtype) -> None:
    for seed, (m, k, n) in enumerate([(24, 40, 16), (7, 33, 5), (1, 19, 3)]):
        for specials in (False, True):
            A, W, G = _operands(seed, m, k, n, dtype, specials=specials)
            for g in (G, None):
                new = S._run_int8(A, W, g, threshold, row_scale=row_scale)
                old = _old_int8(A, W, g, threshold, row_scale)
                _compare(new, old, (threshold, row_scale, dtype, m, k, n, specials, g is None))


def test_int8_direct_replay_with_a_gradient_of_another_dtype() -> None:
    A, W, _ = _operands(1, 16, 24, 8, torch.bfloat16)
    G = torch.randn(16, 8, generator=torch.Generator().manual_seed(9)) * 1e-2  # float32 output gradient
    _compare(S._run_int8(A, W, G, 1.5), _old_int8(A, W, G, 1.5, "bnb"), "mixed dtypes")


def test_int8_runs_without_autograd(monkeypatch) -> None:
    """The int8 replay of a 2-D site builds no autograd graph (what made it slow)."""
    def refuse(*a, **kw):
        raise AssertionError("_autograd_gemms was called")
    monkeypatch.setattr(S, "_autograd_gemms", refuse)
    A, W, G = _operands(0, 8, 16, 4, torch.float32)
    run_strategy(STRATEGIES["int8"], A, W, G, 1.5)
    run_strategy(STRATEGIES["global"], A, W, G)
    run_strategy(STRATEGIES["mixed"], A, W, G)
    run_strategy(STRATEGIES["switchback"], A, W, G)


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_int8_batched_site_is_matmul8bitlt_per_slice(threshold: float) -> None:
    """A batched site (QKᵀ-like, [Bt, M, K] x [Bt, N, K]) replays MatMul8bitLt slice by slice."""
    gen = torch.Generator().manual_seed(4)
    A = torch.randn(3, 10, 24, generator=gen)
    A[:, :, 5] *= 20.0
    W = torch.randn(3, 12, 24, generator=gen)
    G = torch.randn(3, 10, 12, generator=gen) * 1e-2
    out = run_strategy(STRATEGIES["int8"], A, W, G, threshold, b_is_weight=False)
    for i in range(3):
        old = _old_int8(A[i], W[i], G[i], threshold, "bnb")
        for key in old.gemms:
            _assert_same(out.gemms[key][i], old.gemms[key], (i, key))
        for key, (_, q, _) in old.operands.items():
            _assert_same(out.operands[key][1][i], q, (i, key))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["global", "mixed", "mixed bs=64", "mixed bs=7"])
def test_fp8_direct_replay_is_the_autograd_function(which: str, dtype: torch.dtype) -> None:
    """2-D global / mixed sites replay MatMulFP8Global / MatMulFP8Mixed bit for bit (blocks that do and do
    not divide the tensor, NaN/±Inf operands, 16-bit dtypes)."""
    strat = {"global": STRATEGIES["global"], "mixed": STRATEGIES["mixed"], "mixed bs=64": mixed_with_blocksize(64),
             "mixed bs=7": mixed_with_blocksize(7)}[which]
    for seed, (m, k, n) in enumerate([(24, 40, 16), (7, 33, 5), (32, 64, 64)]):
        for specials in (False, True):
            A, W, G = _operands(seed, m, k, n, dtype, specials=specials)
            if which == "global":
                blocks = None
            elif which == "mixed":
                blocks = AG.get_block_sizes(A, W)
            else:
                blocks = (int(which.split("=")[1]),) * 2
            for g in (G, None):
                new = strat.run(A, W, g, 6.0, True)
                _compare(new, _old_fp8(A, W, g, blocks), (which, dtype, m, k, n, specials, g is None))


def test_fp8_gradient_of_another_dtype() -> None:
    A, W, _ = _operands(2, 16, 24, 8, torch.bfloat16)
    G = torch.randn(16, 8, generator=torch.Generator().manual_seed(3)) * 1e-2
    for strat, blocks in ((STRATEGIES["global"], None), (STRATEGIES["mixed"], AG.get_block_sizes(A, W))):
        _compare(strat.run(A, W, G, 6.0, True), _old_fp8(A, W, G, blocks), strat.name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_switchback_direct_replay_is_the_autograd_function(dtype: torch.dtype) -> None:
    """2-D switchback sites replay SwitchBackBnb (threshold 0) bit for bit."""
    for seed, (m, k, n) in enumerate([(24, 40, 16), (7, 33, 5)]):
        for specials in (False, True):
            A, W, G = _operands(seed, m, k, n, dtype, specials=specials)
            for g in (G, None):
                gemms = S._autograd_gemms(lambda a, w: AG.switchback_bnb(a, w), A, W, g)
                old = S.StrategyOutput(gemms, {"activation": (A, S._int8_rows(A, 0.0), None),
                                               "weight": (W, *S._weight_int8(W))})
                _compare(STRATEGIES["switchback"].run(A, W, g, 6.0, True), old, (dtype, m, k, n, specials))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["global", "mixed"])
def test_fp8_replay_in_its_own_layouts_is_the_autograd_function(which: str, dtype: torch.dtype) -> None:
    """Once a float32 GEMM key was seen to give the same bits in the replay's layouts (qW row-major, wgrad as
    Gᵀ·A) as in the autograd function's (contiguous fq(w.t()), (Aᵀ·G)ᵀ), later sites of that key use them:
    the second round of every shape (2-D, batched, and ones MKL sums differently when transposed) is still
    the autograd function bit for bit; float32 takes the fast layouts for some key, 16-bit never."""
    strat = STRATEGIES[which]
    S._RELAID_EXACT.clear()
    for rnd in range(2):
        for seed, (m, k, n) in enumerate([(24, 40, 16), (7, 33, 65), (1, 576, 64), (32, 64, 64)]):
            A, W, G = _operands(10 * rnd + seed, m, k, n, dtype)
            blocks = None if which == "global" else AG.get_block_sizes(A, W)
            _compare(strat.run(A, W, G, 6.0, True), _old_fp8(A, W, G, blocks), (which, rnd, m, k, n))
        gen = torch.Generator().manual_seed(20 + rnd)
        A3, W3, G3 = (torch.randn(shape, generator=gen).to(dtype) for shape in ((2, 8, 64), (2, 12, 64), (2, 8, 12)))
        out = run_strategy(strat, A3, W3, G3, b_is_weight=False)
        for i in range(2):
            blocks = None if which == "global" else AG.get_block_sizes(A3[i], W3[i])
            old = _old_fp8(A3[i], W3[i], G3[i], blocks)
            for key in old.gemms:
                _assert_same(out.gemms[key][i], old.gemms[key], (which, rnd, i, key))
    if dtype == torch.float32:
        assert any(S._RELAID_EXACT.values())
    else:
        assert not S._RELAID_EXACT


def test_relaid_keeps_the_autograd_layout_where_the_bits_differ() -> None:
    """_relaid decides a key once, on probe operands: a key whose fast product differed takes the autograd
    layout every time after; one that agreed takes the fast one; 16-bit operands always the autograd one."""
    S._RELAID_EXACT.clear()
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    calls = []

    def fast(x, y):
        calls.append("fast")
        return x @ y + 1.0

    def slow(x, y):
        calls.append("slow")
        return x @ y
    for _ in range(2):
        S._relaid("t", a, b, fast, slow)
    assert calls == ["fast", "slow", "slow", "slow"]  # probe both, then the autograd layout
    calls.clear()
    def same(x, y):
        calls.append("fast")
        return x @ y
    for _ in range(2):
        S._relaid("u", a, b, same, slow)
    probes = calls[:-2]  # probe pairs (both agreed), then the fast one alone for both calls
    assert len(probes) >= 4 and probes == ["fast", "slow"] * (len(probes) // 2) and calls[-2:] == ["fast", "fast"]
    calls.clear()
    S._relaid("v", a.half(), b.half(), fast, slow)
    assert calls == ["slow"] and ("v", (2, 3), (3, 1), (3, 2), (2, 1), "cpu", torch.get_num_threads()) \
        not in S._RELAID_EXACT


@pytest.mark.parametrize("recipe", ["int8", "switchback"])
def test_int8_operands_report_no_saturation(recipe: str) -> None:
    """Absmax int8 scaling cannot clip, yet the element setting a row's scale was counted as clipped whenever its
    dequantised value landed 1 ulp below it (the generic |x| > max|q| test): the demo's qkv weight read 8e-5 (QA)."""
    from fp8probe.analysis.metrics import OperandAccumulator

    run = S._run_int8 if recipe == "int8" else S._run_switchback
    seen_by_old_rule = 0
    for seed in (14, 17):  # two seeds where fl(fl(x·127/s)·s/127) < x for the weight's largest element
        g = torch.Generator().manual_seed(seed)
        A, W, G = torch.randn(16, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(16, 48, generator=g)
        out = run(A, W, G, 0.0)
        for name, (x, q, sat) in out.operands.items():
            assert sat is not None and not sat.any(), (seed, name)
            acc = OperandAccumulator()
            acc.update(x, q, sat)
            assert acc.result()["saturation_frac"] == 0.0, (seed, name)
            old = OperandAccumulator()
            old.update(x, q, None)
            seen_by_old_rule += old.result()["saturation_frac"] > 0
    assert seen_by_old_rule  # (the seeds still show the false positive the explicit mask removes)
