"""The C metrics reductions (backends/cpu.py: error_sums, operand_sums, tensor_stats) against torch.

Sums: bit for bit equal to a Python implementation of the documented block order (_ordered_sum), and
within 1e-12 of torch's float64 sums; counts, extremes, histograms and block absmaxes exactly equal
to torch's. The accumulators of analysis/metrics.py give the same numbers on the C path and on the
torch path (FP8PROBE_BACKEND=reference), sums up to the float64 summation order. Every case runs
with the AVX2 loops and with the scalar loops.
"""
from __future__ import annotations

import math

import pytest
import torch

import fp8probe.analysis.metrics as M
from fp8probe.analysis.metrics import (BLOCK, LOG2_HI, LOG2_LO, RAW_LIMITS, ErrorAccumulator, OperandAccumulator,
                                       OutlierCensus, TensorStats)
from fp8probe.backends import cpu
from support import forbid_full_copies

F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16, F64)
# odd sizes around the lane (8), sum block (8192) and work unit (65536) sizes with every dtype pair;
# the threaded size (4 units, the last partial) with one pair per dtype, each dtype on both sides
SIZES = (1, 7, 9, 8191, 8193, 3 * 8192 + 5)
BIG = 200003
PAIRS = [(n, a, b) for n in SIZES for a in DTYPES for b in DTYPES] + [
    (BIG, a, b) for a, b in zip(DTYPES, DTYPES[1:] + DTYPES[:1])]
LIMITS = tuple(limit for _, limit in RAW_LIMITS)


def _ordered_sum(v: torch.Tensor) -> float:
    """Σv in the C reductions' order: blocks of SUM_BLOCK, 8 lanes (element i to lane i % 8, in order),
    lanes combined ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), block results added in block order to 0.0."""
    v = v.detach().to(F64).flatten()
    nb = -(-v.numel() // cpu.SUM_BLOCK)
    padded = torch.zeros(nb * cpu.SUM_BLOCK, dtype=F64)  # padding adds +0.0: changes no lane
    padded[: v.numel()] = v
    blocks = padded.view(nb, cpu.SUM_BLOCK // cpu.SUM_LANES, cpu.SUM_LANES)
    lanes = torch.zeros(nb, cpu.SUM_LANES, dtype=F64)
    for j in range(blocks.shape[1]):  # elementwise float64 adds: one IEEE addition per lane per step
        lanes += blocks[:, j, :]
    l = lanes.unbind(1)
    per_block = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
    total = 0.0
    for b in per_block.tolist():
        total += b
    return total


def _values(n: int, dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    """Seeded values over ~30 binades of each sign, with exact zeros (both signs), subnormals of the
    dtype and, when ``specials``, NaN and ±Inf at random places."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=F64) * torch.exp2(torch.randint(-18, 12, (n,), generator=gen).to(F64))
    tiny = torch.finfo(dtype).tiny
    k = max(1, n // 50)
    pick = lambda: torch.randint(0, n, (k,), generator=gen)  # noqa: E731
    x[pick()] = 0.0
    x[pick()] = -0.0
    x[pick()] = tiny * torch.rand(k, generator=gen, dtype=F64)  # subnormals of the dtype
    if specials:
        x[pick()] = math.nan
        x[pick()] = math.inf
        x[pick()] = -math.inf
    return x.to(dtype)


def _rel(got: float, want: float, scale: float, tol: float = 1e-12) -> bool:
    return abs(got - want) <= tol * scale


# --------------------------------------------------------------------------------------------
# error_sums
# --------------------------------------------------------------------------------------------
def _error_reference(ref: torch.Tensor, lp: torch.Tensor) -> tuple:
    r, q = ref.to(F64).flatten(), lp.to(F64).flatten()
    fin_r = torch.isfinite(r)
    ok = fin_r & torch.isfinite(q)
    r0, q0 = torch.where(ok, r, 0.0), torch.where(ok, q, 0.0)
    e = r0 - q0
    terms = (r0 * r0, e * e, q0 * q0, r0 * q0)
    return terms, float(e.abs().max()), int(ok.sum()), int((fin_r & ~ok).sum()), int((~fin_r).sum())


@pytest.mark.parametrize(("n", "ref_dtype", "lp_dtype"), PAIRS)
def test_error_sums_match_the_documented_order_and_torch(n: int, ref_dtype: torch.dtype, lp_dtype: torch.dtype,
                                                         isa: str) -> None:
    ref = _values(n, ref_dtype, seed=n + 1)
    lp = (ref.to(F64) * (1 + 1e-3 * _values(n, F64, seed=n + 2, specials=False).clamp(-1, 1))).to(lp_dtype)
    lp[_values(n, torch.float32, seed=n + 3).isnan()] = math.inf  # recipe overflows where ref is finite
    got = cpu.error_sums(ref, lp)
    terms, mx, count, nonfinite, excluded = _error_reference(ref, lp)
    assert got[4:] == (mx, count, nonfinite, excluded)
    for value, t in zip(got[:4], terms):
        assert value == _ordered_sum(t)  # bit for bit
        assert _rel(value, float(t.sum()), float(t.abs().sum()))


@pytest.mark.parametrize("case", ["all-nan", "all-zero", "ref-inf", "one"])
def test_error_sums_degenerate_tensors(case: str, isa: str) -> None:
    n = 9001
    if case == "all-nan":
        ref, lp = torch.full((n,), math.nan, dtype=F64), torch.full((n,), math.nan)
        want = (0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, n)
    elif case == "all-zero":
        ref, lp = torch.zeros(n, dtype=F64), -torch.zeros(n, dtype=torch.bfloat16)
        want = (0.0, 0.0, 0.0, 0.0, 0.0, n, 0, 0)
    elif case == "ref-inf":
        ref, lp = torch.full((n,), -math.inf, dtype=F64), torch.ones(n)
        want = (0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, n)
    else:
        ref, lp = torch.tensor([3.0], dtype=F64), torch.tensor([-1.5], dtype=torch.float16)
        want = (9.0, 20.25, 2.25, -4.5, 4.5, 1, 0, 0)
    assert cpu.error_sums(ref, lp) == want


def test_sums_do_not_depend_on_the_thread_count(isa: str) -> None:
    """Blocks are summed into per-block slots and combined in block order after the join."""
    ext = cpu._ext()
    n = 300_007
    ref, lp = _values(n, F64, seed=1), _values(n, torch.float32, seed=2)
    x2 = _values(n, torch.float32, seed=3).view(1, n)
    hist, seg = torch.empty(LOG2_HI - LOG2_LO, dtype=torch.int64), torch.zeros(-(-n // BLOCK), dtype=F64)
    results = set()
    for threads in (1, 2, 3, 8):
        es = ext.error_sums(ref.data_ptr(), 3, lp.data_ptr(), 0, n, threads)
        os_ = ext.operand_sums(x2.data_ptr(), 0, lp.data_ptr(), 0, 0, n, threads)
        seg.zero_()
        ts = ext.tensor_stats(x2.data_ptr(), 0, n, n, BLOCK, 2.0**-126, *LIMITS, LOG2_LO, LOG2_HI - LOG2_LO,
                              hist.data_ptr(), seg.data_ptr(), threads)
        results.add((es, os_, tuple(sorted(ts.items())), tuple(hist.tolist()), seg.numpy().tobytes()))
    assert len(results) == 1


# --------------------------------------------------------------------------------------------
# operand_sums
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", SIZES + (BIG,))
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize(("q_like_x", "mask"), [(False, False), (True, True), (False, True)])
def test_operand_sums_match_the_documented_order_and_torch(n: int, x_dtype: torch.dtype, q_like_x: bool, mask: bool,
                                                           isa: str) -> None:
    x = _values(n, x_dtype, seed=2 * n + 7)
    clip = 300.0
    q = ((x.to(F64) * 4).round() / 4).clamp(-clip, clip)        # a coarse grid: underflow and clipping
    q[_values(n, torch.float32, seed=n + 5).isinf()] = math.nan  # the cast made a NaN of a finite x
    q = q.to(x_dtype if q_like_x else torch.float32)
    _assert_operand_sums(x, q, (x.to(F64).abs() > clip) if mask else None)


def _assert_operand_sums(x: torch.Tensor, q: torch.Tensor, sat: torch.Tensor | None) -> None:
    """cpu.operand_sums(x, q, sat): counts equal to torch's, sums bit for bit in the documented order and
    within 1e-12 of torch's."""
    got = cpu.operand_sums(x, q, sat)
    r, d = x.to(F64), q.to(F64)
    fin = torch.isfinite(r)
    both = fin & torch.isfinite(d)
    r0, d0 = torch.where(both, r, 0.0), torch.where(both, d, 0.0)
    e = r0 - d0
    nz = fin & (r != 0)
    if sat is None:
        qmax = float(torch.where(both, d.abs(), 0.0).max())
        sat = r.abs() > qmax
    want_counts = (int(fin.sum()), int(nz.sum()), int((nz & (d == 0)).sum()), int((sat & fin).sum()),
                   int((~fin).sum()), int((fin & ~torch.isfinite(d)).sum()))
    assert got[2:] == want_counts
    for value, t in zip(got[:2], (r0 * r0, e * e)):
        assert value == _ordered_sum(t)
        assert not math.isfinite(value) or _rel(value, float(t.sum()), float(t.abs().sum()))  # (±Inf: overflowed)


def test_operand_sums_saturation_without_a_mask_compares_exactly(isa: str) -> None:
    """|x| > max|q| decided in real numbers: bf16 x next to a float32 max|q| that bf16 cannot hold."""
    qmax = 1.0 + 2.0**-20                       # float32, between bf16's 1 and 1 + 2**-7
    x = torch.tensor([1.0, 1.0 + 2.0**-7, -1.0 + 0.0, 0.5], dtype=torch.bfloat16)
    q = torch.tensor([qmax, 1.0, -1.0, 0.5], dtype=torch.float32)
    got = cpu.operand_sums(x, q, None)
    assert got[5] == 1  # only 1 + 2**-7 exceeds 1 + 2**-20


# --------------------------------------------------------------------------------------------
# the AVX2 step loops: a first pass without finite checks, redone with them where a sum is not finite
# --------------------------------------------------------------------------------------------
def _mixed_blocks(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Six sum blocks and a tail: blocks 0, 2 and the tail all finite (the AVX2 loops' unchecked pass holds),
    NaN/±Inf only in blocks 1 and 4, block 3 finite but with squares that overflow float64 (its finite
    sums are ±Inf: the checked pass gives the same bits), block 5 finite with exact zeros of both signs."""
    block = cpu.SUM_BLOCK
    x = _values(6 * block + 13, F64, seed, specials=False)
    specials = _values(block, F64, seed + 1)
    x[block:2 * block] = specials
    x[4 * block:5 * block] = specials.flip(0)
    if dtype == F64:
        x[3 * block + 5:3 * block + 700] = 1e160
    x[5 * block:5 * block + 40] = 0.0
    x[5 * block + 40:5 * block + 80] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize(("ref_dtype", "lp_dtype"), [(a, b) for a in DTYPES for b in DTYPES])
def test_error_sums_blocks_with_and_without_specials(ref_dtype: torch.dtype, lp_dtype: torch.dtype, isa: str) -> None:
    ref = _mixed_blocks(ref_dtype, seed=11)
    lp = (ref.to(F64) * (1 + 1e-3 * _values(ref.numel(), F64, seed=12, specials=False).clamp(-1, 1))).to(lp_dtype)
    lp[2 * cpu.SUM_BLOCK + 100] = math.inf  # one non-finite q where r is finite, in an otherwise finite block
    got = cpu.error_sums(ref, lp)
    terms, mx, count, nonfinite, excluded = _error_reference(ref, lp)
    assert got[4:] == (mx, count, nonfinite, excluded)
    for value, t in zip(got[:4], terms):
        assert value == _ordered_sum(t)


@pytest.mark.parametrize(("x_dtype", "q_dtype"), [(a, b) for a in DTYPES for b in DTYPES])
@pytest.mark.parametrize("mask", [False, True])
def test_operand_sums_blocks_with_and_without_specials(x_dtype: torch.dtype, q_dtype: torch.dtype, mask: bool,
                                                       isa: str) -> None:
    x = _mixed_blocks(x_dtype, seed=21)
    clip = 300.0
    q = ((x.to(F64) * 4).round() / 4).clamp(-clip, clip)
    q[2 * cpu.SUM_BLOCK + 100] = math.nan  # the cast made a NaN of a finite x in a finite block
    q = q.to(q_dtype)
    _assert_operand_sums(x, q, (x.to(F64).abs() > clip) if mask else None)


# --------------------------------------------------------------------------------------------
# transposed views (x.mT contiguous) read in place
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_full_copy(monkeypatch: pytest.MonkeyPatch) -> list:
    return forbid_full_copies(monkeypatch)


def _transposed(shape: tuple[int, ...], dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    """A view of logical `shape` whose .mT is contiguous (storage [.., cols, rows]), seeded values."""
    n = math.prod(shape)
    storage = _values(n, dtype, seed, specials).view(*shape[:-2], shape[-1], shape[-2])
    return storage.mT


# logical shapes around the 8-lane, 8192-block and 65536-unit sizes: partial first/last rows of a gathered
# range, ranges inside one row (cols > UNIT), ranges across batch matrices, a row or column of one
TRANSPOSED_SHAPES = [(1, 2), (3, 7), (37, 300), (8193, 3), (11, 8193), (2, 70001), (257, 577), (3, 129, 301),
                     (2, 40000, 3), (5, 1, 7)]


@pytest.mark.parametrize("shape", TRANSPOSED_SHAPES)
@pytest.mark.parametrize(("ref_dtype", "lp_dtype"), [(F64, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.float16, F64)])
@pytest.mark.parametrize("layout", ["lp-transposed", "ref-transposed", "both"])
def test_error_sums_read_transposed_views_without_a_copy(shape, ref_dtype, lp_dtype, layout, isa, no_full_copy) -> None:
    """wgrad's (Aᵀ Gᵀ)ᵀ result against a row-major float64 reference: the same bits as the contiguous
    copies, and no copy is made."""
    seed = sum(shape)
    ref_t, lp_t = _transposed(shape, ref_dtype, seed), _transposed(shape, lp_dtype, seed + 1)
    ref = ref_t if layout != "lp-transposed" else ref_t.contiguous()
    lp = lp_t if layout != "ref-transposed" else lp_t.contiguous()
    want = cpu.error_sums(ref_t.contiguous(), lp_t.contiguous())
    assert cpu.error_sums(ref, lp) == want
    terms = _error_reference(ref, lp)[0]
    assert want[0] == _ordered_sum(terms[0])
    assert no_full_copy == []


@pytest.mark.parametrize("shape", TRANSPOSED_SHAPES)
@pytest.mark.parametrize(("x_dtype", "q_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, F64)])
@pytest.mark.parametrize("layout", ["x", "q", "mask", "all", "all-no-mask"])
def test_operand_sums_read_transposed_views_without_a_copy(shape, x_dtype, q_dtype, layout, isa, no_full_copy) -> None:
    seed = 3 * sum(shape)
    x_t = _transposed(shape, x_dtype, seed)
    q_t = ((x_t.to(F64) * 4).round() / 4).clamp(-300, 300).to(q_dtype)  # same layout as x_t
    sat_t = x_t.to(F64).abs() > 300
    x = x_t if layout in ("x", "all", "all-no-mask") else x_t.contiguous()
    q = q_t if layout in ("q", "all", "all-no-mask") else q_t.contiguous()
    sat = None if layout == "all-no-mask" else sat_t if layout in ("mask", "all") else sat_t.contiguous()
    want = cpu.operand_sums(x_t.contiguous(), q_t.contiguous(), None if sat is None else sat_t.contiguous())
    assert cpu.operand_sums(x, q, sat) == want
    assert no_full_copy == []


@pytest.mark.parametrize("shape", [s for s in TRANSPOSED_SHAPES if len(s) == 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_stats_read_a_transposed_view_without_a_copy(shape, dtype, isa, no_full_copy) -> None:
    x_t = _transposed(shape, dtype, seed=5 * sum(shape))
    want = _c_stats(x_t.contiguous())
    got = _c_stats(x_t)
    assert no_full_copy == []
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key  # hist, segmax: exact
        else:
            assert got[key] == value or (value != value and got[key] != got[key]), key


def test_transposed_layouts_that_do_not_tile_the_tensor_raise() -> None:
    ext = cpu._ext()
    x = torch.randn(6, 5)
    with pytest.raises(ValueError, match="expected .*got rows=4, cols=5"):
        ext.error_sums(x.data_ptr(), 0, x.data_ptr(), 0, x.numel(), 1, 0, 0, 4, 5)
    with pytest.raises(ValueError, match="expected .*got rows=-1, cols=30"):
        ext.operand_sums(x.data_ptr(), 0, x.data_ptr(), 0, 0, x.numel(), 1, -1, 30)


# --------------------------------------------------------------------------------------------
# tensor_stats
# --------------------------------------------------------------------------------------------
def _c_stats(x2: torch.Tensor) -> dict:
    tiny = torch.finfo(x2.dtype).tiny
    return cpu.tensor_stats(x2, tiny, LIMITS, BLOCK, LOG2_LO, LOG2_HI - LOG2_LO)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (37, 300), (11, 8193), (1, 200003), (1563, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_stats_match_the_documented_order_and_torch(shape: tuple[int, int], dtype: torch.dtype,
                                                           isa: str) -> None:
    rows, cols = shape
    x = _values(rows * cols, dtype, seed=rows * 31 + cols).view(rows, cols)
    if x.numel() >= 3:
        x.view(-1)[:3] = torch.tensor([448.0, 449.0, 60000.0]).to(dtype)  # at / beyond the raw limits
    else:
        x.fill_(-2.5)
    got = _c_stats(x)
    v = x.to(F64)
    fin = torch.isfinite(v)
    a = torch.where(fin, v.abs(), 0.0)
    n = int(fin.sum())
    assert got["n"] == n and got["nan"] == int(v.isnan().sum())
    assert (got["pos_inf"], got["neg_inf"]) == (int((v == math.inf).sum()), int((v == -math.inf).sum()))
    assert got["zeros"] == int((fin & (v == 0)).sum())
    assert got["subnormal"] == int(((a > 0) & (a < torch.finfo(dtype).tiny)).sum())
    assert got["over"] == tuple(int((a > limit).sum()) for limit in LIMITS)
    assert got["amax"] == float(a.max())
    nonzero = a[a > 0]
    assert got["min_nonzero"] == (float(nonzero.min()) if nonzero.numel() else math.inf)
    _, e = torch.frexp(nonzero)
    hist = torch.bincount((e.long() - 1).clamp(LOG2_LO, LOG2_HI - 1) - LOG2_LO, minlength=LOG2_HI - LOG2_LO)
    assert torch.equal(got["hist"], hist)
    assert torch.equal(got["segmax"], M._block_absmax(a))
    # the sums: bit for bit in the documented order, and near torch's
    f = torch.where(fin, v, 0.0).flatten()
    assert got["sum"] == _ordered_sum(f) and got["mean"] == got["sum"] / n
    d = torch.where(fin.flatten(), f - got["mean"], 0.0)
    d2 = d * d
    for key, t in (("m2", d2), ("m3", d2 * d), ("m4", d2 * d2)):
        assert got[key] == _ordered_sum(t), key
        assert _rel(got[key], float(t.sum()), float(t.abs().sum())), key
    assert _rel(got["mean"], float(v[fin].mean()), float(v[fin].abs().mean()))


@pytest.mark.parametrize("case", ["all-nan", "all-zero", "all-inf"])
def test_tensor_stats_degenerate_tensors(case: str, isa: str) -> None:
    x = {"all-nan": torch.full((4, 33), math.nan), "all-zero": -torch.zeros(4, 33, dtype=torch.float16),
         "all-inf": torch.full((4, 33), -math.inf, dtype=torch.bfloat16)}[case]
    got = _c_stats(x)
    n_fin = 132 if case == "all-zero" else 0
    assert (got["n"], got["zeros"], got["amax"], got["min_nonzero"]) == (n_fin, n_fin, 0.0, math.inf)
    assert (got["m2"], got["m3"], got["m4"], int(got["hist"].sum())) == (0.0, 0.0, 0.0, 0)
    assert not got["segmax"].any()
    assert (got["nan"], got["neg_inf"]) == ((132, 0) if case == "all-nan" else (0, 132) if case == "all-inf" else (0, 0))


# --------------------------------------------------------------------------------------------
# outlier_census
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (257, 300), (1500, 100), (5, 70001)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.1, 1e-30, 1e30, math.inf])
def test_outlier_census_matches_torch(shape: tuple[int, int], dtype: torch.dtype, threshold: float, isa: str) -> None:
    rows, cols = shape
    x = _values(rows * cols, dtype, seed=rows + cols).view(rows, cols)
    if x.numel() > 4:  # the dtype neighbours of 6.1 on both sides
        below = torch.tensor(6.1, dtype=F64).to(dtype)
        below = below if float(below) < 6.1 else torch.nextafter(below, torch.tensor(0.0, dtype=dtype))
        x.view(-1)[:2] = torch.stack([below, torch.nextafter(below, torch.tensor(math.inf, dtype=dtype))])
    amax, hits, touched = cpu.outlier_census(x, threshold)
    a = x.to(F64).abs().nan_to_num(nan=0.0, posinf=math.inf)
    hit = a >= threshold  # float64 holds every value and the threshold exactly: the real-number comparison
    assert torch.equal(amax, a.amax(dim=0)) and amax.dtype == F64
    assert torch.equal(hits, hit.sum(dim=0)) and touched == int(hit.any(dim=1).sum())


# --------------------------------------------------------------------------------------------
# the accumulators: C path vs torch path
# --------------------------------------------------------------------------------------------
class _NoExtensionCalls:
    """Stands in for the extension: available, but any function of it fails the test."""

    def __getattr__(self, name: str):
        pytest.fail(f"the C path ran ({name})")


def _both_paths(fn, monkeypatch: pytest.MonkeyPatch):
    """fn() on the C path (the torch-only helpers made to fail) and on the torch path."""
    if not cpu.enabled():
        pytest.skip("fp8probe._fastpath not built")
    with monkeypatch.context() as m:
        boom = lambda *a, **k: pytest.fail("the torch path ran")  # noqa: E731
        m.setattr(M, "_dots", boom)
        m.setattr(M, "_as_f64", boom)
        m.setattr(M, "_log2_counts", boom)
        m.setattr(M, "_at_least", boom)
        c_result = fn()
    with monkeypatch.context() as m:
        m.setenv("FP8PROBE_BACKEND", "reference")
        m.setattr(cpu, "_ext", lambda: _NoExtensionCalls())
        torch_result = fn()
    return c_result, torch_result


def _same(c: dict, t: dict, sums: tuple[str, ...]) -> None:
    assert c.keys() == t.keys()
    for key, value in t.items():
        if key in sums:
            assert c[key] == pytest.approx(value, rel=1e-12, abs=1e-300), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(c[key], value), key
        else:
            assert c[key] == value or (value != value and c[key] != c[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("specials", [False, True])
def test_accumulators_agree_on_both_paths(dtype: torch.dtype, specials: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _values(33 * 301, dtype, seed=17, specials=specials).view(33, 301)
    q = ((x.float() * 8).round() / 8).clamp(-100, 100)
    w = _values(301 * 19, torch.float32, seed=18, specials=False).view(301, 19).clamp(-4, 4)
    ref = torch.where(torch.isfinite(x.double()), x.double(), 0.0) @ w.double()
    if specials:
        ref[0, :3] = torch.tensor([math.nan, math.inf, 1.0])
    lp = (q @ w).to(dtype)

    def run():
        e, o, om, s = ErrorAccumulator(), OperandAccumulator(), OperandAccumulator(), TensorStats()
        census = OutlierCensus(6.1)
        for _ in range(2):  # two batches: merged like batches and ranks are
            e.update(ref, lp)
            o.update(x, q)
            om.update(x, q, x.float().abs() > 100)
            s.update(x)
            census.update(x)
        return vars(e), vars(o), vars(om), vars(s), vars(census)

    c_result, torch_result = _both_paths(run, monkeypatch)
    for c, t in zip(c_result, torch_result):
        _same(c, t, ("sum_ref2", "sum_err2", "sum_lp2", "sum_dot", "mean", "m2", "m3", "m4"))
    assert c_result[3]["log2_block_sum"] == torch_result[3]["log2_block_sum"]  # same torch sum on both paths


def test_torch_path_stays_for_reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP8PROBE_BACKEND=reference (checked at every call) turns the C reductions off."""
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    x = torch.randn(10, 10)
    assert cpu.error_sums(x, x) is None and cpu.operand_sums(x, x, None) is None
    assert cpu.tensor_stats(x, 1e-38, LIMITS, BLOCK, LOG2_LO, 64) is None and cpu.outlier_census(x, 6.0) is None


@pytest.mark.parametrize("bad", ["numel", "dim"])
def test_bad_arguments_raise(bad: str) -> None:
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="expected .*, got"):
        if bad == "numel":
            cpu.error_sums(x, x[:3])
        else:
            cpu.tensor_stats(x.flatten(), 1e-38, LIMITS, BLOCK, LOG2_LO, 64)
    with pytest.raises(ValueError, match="expected .*, got"):
        cpu.operand_sums(x, x, torch.ones(3, dtype=torch.bool))
