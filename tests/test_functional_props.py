"""Property tests for fp8probe.functional: invariants over random shapes, dtypes, devices and special values."""
from __future__ import annotations

import math

import pytest
import torch
from support import DEVICES
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fp8probe.functional as F
from fp8probe.backends import reference as ref
from fp8probe.formats import get_codebook

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
# unit roundoff of each output dtype (half an ulp relative) and its smallest positive subnormal
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
TINY = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}

shapes = st.lists(st.integers(0, 29), min_size=0, max_size=3).map(tuple)
nonempty_shapes = st.lists(st.integers(1, 29), min_size=1, max_size=3).map(tuple)


def _randn(shape, dtype, seed, device, scale=1.0, noncontig=False) -> torch.Tensor:
    """Seeded N(0, scale²) data; `noncontig` returns a strided view with the same logical values."""
    g = torch.Generator().manual_seed(seed)
    if noncontig and len(shape) >= 1:
        big = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g) * scale
        return big.to(dtype).to(device)[..., ::2]
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values with NaN == NaN (input-mutation checks)."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


# ------------------------------------------------------------------ blockwise codebook quantisation
@SETTINGS
@given(shape=shapes, dtype=st.sampled_from(FLOATS), book=st.sampled_from(["bnb-e4m3", "bnb-e5m2", "dynamic", "linear"]),
       blocksize=st.sampled_from([1, 7, 32, 64, 100, 256, 4096]), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 1e4]), specials=st.booleans(), zero_block=st.booleans(),
       noncontig=st.booleans(), device=st.sampled_from(DEVICES))
def test_blockwise_invariants(shape, dtype, book, blocksize, seed, scale, specials, zero_block, noncontig, device):
    assume(device == "cpu" or blocksize in (32, 64, 256, 4096))  # CUDA kernels: powers of two 32..4096
    x = _randn(shape, dtype, seed, device, scale, noncontig)
    n = x.numel()
    if n and specials:
        flat = x.reshape(-1).clone()
        g = torch.Generator().manual_seed(seed + 1)
        pos = torch.randint(0, n, (3,), generator=g)
        flat[pos] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype).to(device)
        x = flat.reshape(shape)
    if n and zero_block:
        flat = x.reshape(-1).clone()
        flat[: min(blocksize, n)] = 0.0
        x = flat.reshape(shape)
    x_before = x.clone()
    code = get_codebook(book, device)

    q, state = F.quantize_blockwise(x, code, blocksize=blocksize)
    y = F.dequantize_blockwise(q, state)
    assert _same(x, x_before)  # never mutates the caller's tensor
    assert q.shape == x.shape and q.dtype == torch.uint8 and q.device == x.device
    assert y.shape == x.shape and y.dtype == x.dtype
    nb = -(-n // blocksize)
    assert state.absmax.shape == (nb,) and state.absmax.dtype == torch.float32
    if n == 0:
        return

    # absmax: max |x| over the finite values of each block (0 for an all-special block)
    xf = x.reshape(-1).float().cpu()
    finite = torch.isfinite(xf)
    padded = torch.nn.functional.pad(torch.where(finite, xf.abs(), 0.0), (0, nb * blocksize - n))
    absmax = padded.view(nb, blocksize).amax(1)
    assert torch.equal(state.absmax.cpu(), absmax)

    # specials are recorded and restored exactly (NaN stays NaN, ±Inf keeps its sign)
    yf = y.reshape(-1).float().cpu()
    assert state.special_index.cpu().tolist() == (~finite).nonzero().reshape(-1).tolist()
    assert _same(yf[~finite], xf[~finite])

    # codes: the even-index nearest-code rule (SPEC §2.1) on fl32(x * fl32(1/absmax)), ±0 → code of 0
    blk = torch.arange(n) // blocksize
    xn = torch.where(xf == 0, xf, xf * torch.reciprocal(absmax)[blk])
    qc = q.reshape(-1).long().cpu()
    codec = code.cpu()
    assert torch.equal(qc[finite], ref.search_even(codec, xn[finite]).long())
    # ... which is the nearest code except within rounding of an exact midpoint
    xn64, code64 = xn[finite].double(), codec.double()
    dist = (code64[qc[finite]] - xn64).abs()
    best = (code64[None, :] - xn64[:, None]).abs().min(1).values
    # (the fl32 midpoint fl32(fl32(a + b) · 0.5) may sit up to half an ulp of a + b off the true one)
    assert bool((dist <= best + 2.4e-7 * xn64.abs()).all())
    # round trip error: nearest-code distance times absmax, plus the float32 product and the cast
    err = (yf[finite].double() - xf[finite].double()).abs()
    am = absmax[blk][finite].double()
    bound = (best + 2.4e-7 * xn64.abs()) * am * (1 + 1e-6) + UNIT[dtype] * yf[finite].double().abs() + TINY[dtype]
    assert bool((err <= bound).all())
    # an all-zero block gives the zero code and +0.0
    zero_blocks = (absmax == 0)[blk] & finite
    zero_idx = int(ref.search_even(codec, torch.zeros(1))[0])
    assert bool((qc[zero_blocks] == zero_idx).all())
    assert bool((yf[zero_blocks] == 0).all()) and not bool(torch.signbit(yf[zero_blocks]).any())


@settings(max_examples=12, deadline=None)  # the lower_bound/argmin tables bisect: ~1 s per codebook
@given(seed=st.integers(0, 2**31 - 1), dup=st.integers(0, 40), spread=st.sampled_from([1e-6, 1.0, 1e3]),
       rule=st.sampled_from(["even", "lower_bound", "argmin"]))
def test_table_search_equals_closed_form_on_random_codebooks(seed, dup, spread, rule):
    """The table-driven search (reference.search) equals the direct rule on any sorted codebook,
    including repeated entries, at every code, midpoint and their float32 neighbours."""
    g = torch.Generator().manual_seed(seed)
    code = torch.sort(torch.randn(256, generator=g) * spread).values
    if dup:
        idx = torch.randint(1, 256, (dup,), generator=g)
        code[idx] = code[idx - 1]  # duplicates, as ±0 in the fp8 maps
        code = torch.sort(code).values
    mid = ref.code_midpoints(code)
    pts = torch.cat([code, mid, torch.randn(6000, generator=g) * spread * 2])
    x = torch.cat([pts, torch.nextafter(pts, torch.tensor(math.inf)), torch.nextafter(pts, torch.tensor(-math.inf)),
                   torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0])])
    assert torch.equal(ref.search(code, x, rule).long(), ref._RULES[rule](code, x).long())


def test_subnormal_absmax_block_saturates(device: str) -> None:
    """Known limit of the reciprocal-then-multiply rule (SPEC §4.2): for absmax < 2**-128,
    fl32(1/absmax) overflows to Inf, so every non-zero element of that block saturates to code
    0 / 255 (±absmax after dequantisation) while zeros keep the zero code."""
    x = torch.tensor([1e-40, -5e-41, 0.0, 2e-41] + [1.0] * 4, device=device)
    q, st_ = F.quantize_blockwise(x, "bnb-e4m3", blocksize=4)
    assert q.cpu().tolist()[:4] == [255, 0, 127, 255]
    y = F.dequantize_blockwise(q, st_).cpu()
    assert y[:4].tolist() == [x[0].item(), -x[0].item(), 0.0, x[0].item()]


@SETTINGS
@given(shape=nonempty_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1),
       device=st.sampled_from(DEVICES))
def test_global_quantize_equals_one_block(shape, dtype, seed, device):
    x = _randn(shape, dtype, seed, device)
    q, state = F.quantize(x, "bnb-e4m3")
    qb, sb = F.quantize_blockwise(x, "bnb-e4m3", blocksize=x.numel())
    assert torch.equal(q, qb) and torch.equal(state.absmax, sb.absmax)
    y = F.dequantize(q, state)
    assert y.dtype == x.dtype and torch.equal(y, F.dequantize_blockwise(qb, sb))
    assert torch.equal(F.fake_quantize(x, "bnb-e4m3"), y)


@SETTINGS
@given(shape=nonempty_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1),
       compat=st.sampled_from([None, "bnb"]), device=st.sampled_from(DEVICES))
def test_blockwise_noncontiguous_equals_contiguous(shape, dtype, seed, compat, device):
    x = _randn(shape, dtype, seed, device, noncontig=True)
    q1, s1 = F.quantize_blockwise(x, "dynamic", blocksize=64, compat=compat)
    q2, s2 = F.quantize_blockwise(x.contiguous(), "dynamic", blocksize=64, compat=compat)
    assert torch.equal(q1, q2) and torch.equal(s1.absmax, s2.absmax)


def test_blockwise_4096x4096_is_fast() -> None:
    """Analysis quantises real weight matrices: 16M fp32 elements must not take many seconds."""
    import time

    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    F.quantize_blockwise(x[:64], "bnb-e4m3", blocksize=256)  # build the lookup tables once
    t0 = time.perf_counter()
    q, st_ = F.quantize_blockwise(x, "bnb-e4m3", blocksize=256)
    F.dequantize_blockwise(q, st_)
    # ~0.5 s on an idle 2-core CPU; a generous bound because CI machines are shared
    assert time.perf_counter() - t0 < 10.0


# ------------------------------------------------------------------ LLM.int8()
@SETTINGS
@given(shape=nonempty_shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31 - 1),
       threshold=st.sampled_from([0.0, 1.5, 3.0]), noncontig=st.booleans(), device=st.sampled_from(DEVICES))
def test_int8_vectorwise_invariants(shape, dtype, seed, threshold, noncontig, device):
    A = _randn(shape, dtype, seed, device, noncontig=noncontig)
    A_before = A.clone()
    q, rs, cols = F.int8_vectorwise_quant(A, threshold)
    assert torch.equal(A, A_before)
    rows, C = math.prod(shape[:-1]), shape[-1]
    assert q.shape == A.shape and q.dtype == torch.int8 and rs.shape == (rows,) and rs.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    a = A.reshape(rows, C).float().cpu()
    outlier = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    assert torch.equal(rs.cpu(), torch.where(outlier, 0.0, a.abs()).amax(1))  # exact, outliers excluded
    if threshold == 0:
        assert cols is None
        keep = torch.ones(C, dtype=torch.bool)
    else:
        assert cols.tolist() == outlier.any(0).nonzero().reshape(-1).tolist()
        keep = ~outlier.any(0)
        assert bool((q.reshape(rows, C).cpu()[:, ~keep] == 0).all())  # whole outlier columns zeroed
    deq = F.int8_vectorwise_dequant(q, rs).reshape(rows, C).cpu()
    err = (deq - a).abs()[:, keep]
    assert bool((err <= rs.cpu()[:, None] / 254 * (1 + 1e-5) + 1e-30).all())


@SETTINGS
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       threshold=st.sampled_from([0.0, 2.0]), compat=st.sampled_from([None, "bnb"]), device=st.sampled_from(DEVICES))
def test_int8_double_quant_columns(rows, cols, seed, threshold, compat, device):
    A = _randn((rows, cols), torch.float16, seed, device)
    q_row, q_col, rs, cs, oc = F.int8_double_quant(A, threshold, compat=compat)
    q2, rs2, oc2 = F.int8_vectorwise_quant(A, threshold, compat=compat)
    assert torch.equal(q_row, q2) and torch.equal(rs, rs2)
    a = A.float().cpu()
    outlier = a.abs() >= threshold if threshold > 0 else torch.zeros_like(a, dtype=torch.bool)
    assert torch.equal(cs.cpu(), torch.where(outlier, 0.0, a.abs()).amax(0))
    assert bool((q_col.cpu()[outlier] == 0).all())  # only outlier elements are zeroed in q_col
    deq = q_col.cpu().float() * cs.cpu()[None, :] / 127
    # fp16 product A·127 in compat mode adds up to 2**-11 relative before rounding (Q17)
    slack = 1e-5 if compat is None else 1.0 / 127
    assert bool(((deq - a).abs()[~outlier] <= (cs.cpu()[None, :] / 254 * (1 + 1e-5) + slack * cs.cpu()[None, :]).expand_as(a)[~outlier]).all())


@SETTINGS
@given(lead=st.lists(st.integers(0, 9), min_size=1, max_size=2).map(tuple), k=st.integers(0, 70),
       n=st.integers(0, 12), seed=st.integers(0, 2**31 - 1), transposed_b=st.booleans(),
       device=st.sampled_from(DEVICES))
def test_int8_linear_matmul_exact(lead, k, n, seed, transposed_b, device):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-127, 128, (*lead, k), generator=g, dtype=torch.int8)
    B = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if transposed_b:
        B = B.t().contiguous().t()  # same values, column-major storage
    C = F.int8_linear_matmul(A.to(device), B.to(device))
    assert C.dtype == torch.int32 and C.shape == (*lead, n)
    expected = (A.reshape(math.prod(lead), k).long() @ B.long().t()).reshape(*lead, n)
    assert torch.equal(C.cpu().long(), expected)


def test_int8_linear_matmul_exact_beyond_2_24(device: str) -> None:
    # SPEC Q15: fp32 accumulation gives 66048376 instead of 66048382 for K = 4096 of 127·127
    A = torch.full((17, 4096), 127, dtype=torch.int8)
    B = torch.full((3, 4096), 127, dtype=torch.int8)
    B[0, 0] = 121
    C = F.int8_linear_matmul(A.to(device), B.to(device)).cpu()
    assert C[0, 0].item() == 4095 * 127 * 127 + 121 * 127
    assert C[0, 1].item() == 4096 * 127 * 127


@SETTINGS
@given(lead=st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple), n=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(FLOATS), bias=st.booleans(),
       device=st.sampled_from(DEVICES))
def test_int8_mm_dequant_formula(lead, n, seed, dtype, bias, device):
    g = torch.Generator().manual_seed(seed)
    C = torch.randint(-(2**20), 2**20, (*lead, n), generator=g, dtype=torch.int32)
    rows = math.prod(lead)
    rs, cs = torch.rand(rows, generator=g) * 4, torch.rand(n, generator=g) * 4
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = F.int8_mm_dequant(C.to(device), rs.to(device), cs.to(device), bias=None if b is None else b.to(device),
                          dtype=dtype)
    assert y.shape == C.shape and y.dtype == dtype
    # the documented fp32 operation order, evaluated step by step here
    c = C.reshape(rows, n).float()
    want = ((c * rs[:, None]) * cs[None, :]) * ref.INV_127_SQ
    if b is not None:
        want = want + b.float()
    assert torch.equal(y.reshape(rows, n).cpu(), want.to(dtype))
    yb = F.int8_mm_dequant(C.to(device), rs.to(device), cs.to(device), compat="bnb")
    assert yb.shape == (rows, n) and yb.dtype == torch.float16  # bnb CPU flattens (Q9)


@SETTINGS
@given(rows=st.integers(1, 12), k=st.integers(1, 40), n=st.integers(1, 10), seed=st.integers(0, 2**31 - 1),
       device=st.sampled_from(DEVICES))
def test_int8_mixed_scaled_mm_matches_pieces(rows, k, n, seed, device):
    A = _randn((rows, k), torch.float16, seed, device, scale=2.0)
    W = _randn((n, k), torch.float16, seed + 1, device)
    CA, SCA, cols = F.int8_vectorwise_quant(A, threshold=3.0)
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    out, subA = F.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, cols)
    base = F.int8_scaled_mm(CA, CB, SCA, SCB, dtype=A.dtype)
    assert out.dtype == A.dtype and out.shape == (rows, n)
    if cols.numel() == 0:
        assert torch.equal(out, base) and subA.numel() == 0
    else:
        assert torch.equal(subA, A[:, cols])
        extra = A[:, cols].float() @ F.int8_vectorwise_dequant(CB[:, cols], SCB).t()
        assert torch.allclose(out.float(), base.float() + extra, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ OCP FP8 / MX scaled casts
GRANULARITIES = [("e4m3", "tensor", None), ("e4m3", "row", None), ("e4m3", "block", (1, 128)),
                 ("e4m3", "block", (128, 128)), ("e5m2", "tensor", None), ("e5m2", "block", (1, 128)),
                 ("mxfp8-e4m3", "block", None), ("mxfp8-e5m2", "block", None)]
FMT_INFO = {"e4m3": (448.0, 2.0**-4, 2.0**-10), "e5m2": (57344.0, 2.0**-3, 2.0**-17)}  # max, half ulp, half min subnormal


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from(FLOATS), cfg=st.sampled_from(GRANULARITIES), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-6, 1.0, 300.0]), device=st.sampled_from(DEVICES))
def test_scaled_cast_invariants(shape, dtype, cfg, seed, scale, device):
    fmt, gran, block = cfg
    x = _randn(shape, dtype, seed, device, scale)
    if x.numel() > 3:
        x = x.clone()
        x.view(-1)[: min(40, x.numel() // 2)] = 0.0  # a zero tile somewhere
    x_before = x.clone()
    s = F.quantize_scaled(x, fmt, gran, block)
    assert _same(x, x_before)
    elem = fmt.removeprefix("mxfp8-")
    assert s.data.shape == x.shape and s.data.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[elem]
    rows, cols = (math.prod(shape[:-1]), shape[-1]) if shape else (1, 1)
    br, bc = s.block
    assert s.scale.shape == (-(-rows // br), -(-cols // bc)) and s.scale.dtype == torch.float32
    y = F.dequantize_scaled(s)
    assert y.shape == x.shape and y.dtype == x.dtype
    if x.numel() == 0:
        return
    fmax, half_ulp, half_sub = FMT_INFO[elem]
    sc = s.scale.cpu()
    assert bool((sc > 0).all())
    if fmt.startswith("mxfp8"):
        mant, _ = torch.frexp(sc)
        assert bool((mant == 0.5).all())  # E8M0: powers of two
    data = s.data.float().cpu()
    assert float(data.abs().max()) <= fmax
    # x ≈ data * scale: relative half-ulp for normals, half a subnormal step, saturation for MX
    x2 = x.reshape(rows, cols).float().cpu()
    s_full = sc.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    y2 = y.reshape(rows, cols).float().cpu()
    over = ((x2 / s_full).abs() - fmax).clamp_min(0) * s_full
    bound = half_ulp * x2.abs() + half_sub * s_full + over + UNIT[dtype] * y2.abs() * 2 + TINY[dtype]
    assert bool(((y2 - x2).abs() <= bound * (1 + 1e-5)).all())


@pytest.mark.parametrize(("fmt", "gran", "block", "floor_db"), [
    ("e4m3", "tensor", None, 29.0), ("e4m3", "row", None, 29.0), ("e4m3", "block", (1, 128), 29.0),
    ("e4m3", "block", (128, 128), 29.0), ("e5m2", "tensor", None, 23.0), ("e5m2", "block", (1, 128), 23.0),
    ("mxfp8-e4m3", "block", None, 28.0), ("mxfp8-e5m2", "block", None, 23.0)])
def test_scaled_cast_sqnr_floor(fmt, gran, block, floor_db, device):
    """N(0,1) 256x384: measured 31.6 dB (E4M3), 25.6 dB (E5M2), 30.6 / 25.3 dB (MX) on CPU."""
    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(7)).to(device)
    y = F.quantize_scaled(x, fmt, gran, block).dequantize()
    sqnr = 10 * math.log10(float(x.pow(2).sum() / (x - y).pow(2).sum()))
    assert sqnr >= floor_db


@pytest.mark.parametrize(("book", "floor_db"), [("bnb-e4m3", 30.0), ("bnb-e5m2", 24.0), ("dynamic", 38.0)])
def test_blockwise_sqnr_floor(book, floor_db, device):
    """N(0,1) 256x512, blocksize 64: measured 32.1 dB (bnb-e4m3), 26.0 dB (bnb-e5m2), 40.5 dB (dynamic)."""
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(1)).to(device)
    y = F.fake_quantize(x, book, blocksize=64)
    assert 10 * math.log10(float(x.pow(2).sum() / (x - y).pow(2).sum())) >= floor_db


# ------------------------------------------------------------------ empty tensors and bad input
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
def test_empty_inputs_short_circuit(shape, device):
    x = torch.empty(shape, device=device)
    q, st_ = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
    assert q.shape == shape and st_.absmax.shape == (0,)
    assert F.dequantize_blockwise(q, st_).shape == shape
    q, st_ = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64, nested=True)
    assert F.dequantize_blockwise(q, st_).shape == shape
    q, st_ = F.quantize(x)
    assert F.dequantize(q, st_).shape == shape
    q, rs, _ = F.int8_vectorwise_quant(x, 1.0)
    assert q.shape == shape and rs.shape == (math.prod(shape[:-1]),)
    assert F.int8_double_quant(x)[1].shape == shape
    s = F.quantize_scaled(x, "e4m3", "block", (1, 128))
    assert s.data.shape == shape and F.dequantize_scaled(s).shape == shape
    C = F.int8_linear_matmul(torch.empty(shape, dtype=torch.int8, device=device),
                             torch.zeros((3, shape[-1]), dtype=torch.int8, device=device))
    assert C.shape == (*shape[:-1], 3) and bool((C == 0).all())
    rows = math.prod(shape[:-1])
    y = F.int8_mm_dequant(C, torch.ones(rows, device=device), torch.ones(3, device=device))
    assert y.shape == C.shape and y.dtype == torch.float16
    y0 = F.int8_mm_dequant(torch.zeros(shape, dtype=torch.int32, device=device), torch.ones(rows, device=device),
                           torch.ones(shape[-1], device=device), dtype=torch.float32)
    assert y0.shape == shape


@pytest.mark.parametrize(("call", "exc", "match"), [
    (lambda: F.quantize_blockwise(torch.ones(4, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: F.quantize_blockwise(torch.ones(4), blocksize=0), ValueError, "blocksize must be a positive int, got 0"),
    (lambda: F.quantize_blockwise(torch.ones(4), blocksize=64.0), ValueError, "blocksize"),
    (lambda: F.quantize_blockwise(torch.ones(4), code=torch.ones(10)), ValueError, "shape \\[256\\]"),
    (lambda: F.quantize_blockwise(torch.ones(4), compat="cuda"), ValueError, "compat"),
    (lambda: F.dequantize_blockwise(torch.zeros(4, dtype=torch.uint8)), ValueError, "quant_state or absmax"),
    (lambda: F.dequantize_blockwise(torch.zeros(4, dtype=torch.uint8), absmax=torch.ones(3), blocksize=2),
     ValueError, "entries"),
    (lambda: F.int8_vectorwise_quant(torch.ones(())), ValueError, "at least 1 dimension"),
    (lambda: F.int8_vectorwise_quant(torch.ones(3, 3), threshold=-1.0), ValueError, "threshold"),
    (lambda: F.int8_linear_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(4, 5, dtype=torch.int8)),
     ValueError, "inner dimensions"),
    (lambda: F.int8_linear_matmul(torch.ones(2, 3), torch.ones(4, 3)), TypeError, "int8"),
    (lambda: F.int8_mm_dequant(torch.ones(2, 3, dtype=torch.int32), torch.ones(3), torch.ones(3)),
     ValueError, "row_stats"),
    (lambda: F.quantize_scaled(torch.ones(4), "e3m4"), ValueError, "fmt"),
    (lambda: F.quantize_scaled(torch.ones(4), "e4m3", "block"), ValueError, "block="),
    (lambda: F.quantize_scaled(torch.ones(4), "mxfp8-e4m3", "row"), ValueError, "needs granularity=.block. with block in \\[\\(1, 32\\)\\]"),
])
def test_bad_input_raises_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_dequantize_blockwise_loose_arguments_give_float32() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(3)).half()
    q, st_ = F.quantize_blockwise(x, "dynamic", blocksize=64)
    y = F.dequantize_blockwise(q, absmax=st_.absmax, code="dynamic", blocksize=64)
    assert y.dtype == torch.float32 and torch.equal(y.half(), F.dequantize_blockwise(q, st_))


def test_int8_matmul_k_limit_is_exact_below_and_refused_above(device) -> None:
    """int32 accumulation of (-128)·(-128) products is exact up to K = 131071 and wrapped silently from
    K = 131072 on (and fp8probe.matmul of ones at K = 133150 returned -133138.5): refused now (issue 11 item 9)."""
    import fp8probe
    from fp8probe.functional import INT8_MATMUL_MAX_K

    assert INT8_MATMUL_MAX_K == 131071
    a = torch.full((1, INT8_MATMUL_MAX_K), -128, dtype=torch.int8, device=device)
    out = fp8probe.int8_linear_matmul(a, a)
    assert out.item() == INT8_MATMUL_MAX_K * 128 * 128  # 2147467264: exact, just below 2^31
    b = torch.full((1, INT8_MATMUL_MAX_K + 1), -128, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="K <= 131071.*got K = 131072"):
        fp8probe.int8_linear_matmul(b, b)
    ones = torch.ones(1, 133150, device=device)
    with pytest.raises(ValueError, match="K <= 131071"):
        fp8probe.matmul(ones, ones)
    small = torch.ones(2, 1000, device=device)
    assert torch.equal(fp8probe.matmul(small, small), torch.full((2, 2), 1000.0, device=device))


@pytest.mark.parametrize("edit, error, match", [
    ({"blocksize": 0}, ValueError, "blocksize must be a positive int, got 0"),
    ({"blocksize": 64.0}, ValueError, "blocksize must be a positive int, got 64.0"),
    ({"special_index": torch.tensor([1, 2, 3]), "special_value": torch.tensor([float("nan")])}, ValueError,
     "equal length, got shapes \\[3\\] and \\[1\\]"),
    ({"special_index": torch.tensor([1]), "special_value": None}, ValueError, "both be set"),
    ({"special_index": torch.tensor([1.0]), "special_value": torch.tensor([1.0])}, TypeError, "special_index must have dtype"),
])
def test_hand_built_quant_state_is_validated(edit, error, match) -> None:
    """A QuantState edited by hand raised ZeroDivisionError / a schema RuntimeError, or broadcast special
    values of the wrong length silently (issue 11 item 14)."""
    import dataclasses

    q, state = F.quantize_blockwise(torch.randn(100, generator=torch.Generator().manual_seed(5)), blocksize=64)
    with pytest.raises(error, match=match):
        F.dequantize_blockwise(q, dataclasses.replace(state, **edit))
    assert torch.isfinite(F.dequantize_blockwise(q, state)).all()


def _int8_operands(seed: int):
    g = torch.Generator().manual_seed(seed)
    A8 = torch.randint(-128, 128, (4, 16), generator=g, dtype=torch.int8)
    B8 = torch.randint(-128, 128, (8, 16), generator=g, dtype=torch.int8)
    return A8, B8, torch.rand(4, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5


@pytest.mark.parametrize(("op", "name", "call"), [
    ("int8_mm_dequant", "row_stats", lambda A8, B8, rs, cs: F.int8_mm_dequant(F.int8_linear_matmul(A8, B8), rs.to("meta"), cs)),
    ("int8_mm_dequant", "col_stats", lambda A8, B8, rs, cs: F.int8_mm_dequant(F.int8_linear_matmul(A8, B8), rs, cs.to("meta"))),
    ("int8_mm_dequant", "bias", lambda A8, B8, rs, cs: F.int8_mm_dequant(F.int8_linear_matmul(A8, B8), rs, cs,
                                                                         bias=cs.to("meta"))),
    ("int8_scaled_mm", "row_stats", lambda A8, B8, rs, cs: F.int8_scaled_mm(A8, B8, rs.to("meta"), cs)),
    ("int8_scaled_mm", "col_stats", lambda A8, B8, rs, cs: F.int8_scaled_mm(A8, B8, rs, cs.to("meta"), compat="bnb")),
    ("int8_vectorwise_dequant", "stats", lambda A8, B8, rs, cs: F.int8_vectorwise_dequant(A8, rs.to("meta"))),
    ("int8_mixed_scaled_mm", "SCB", lambda A8, B8, rs, cs: F.int8_mixed_scaled_mm(
        A8.float(), A8, B8, rs, cs.to("meta"), torch.tensor([1, 3]))),
    ("int8_mixed_scaled_mm", "outlier_cols", lambda A8, B8, rs, cs: F.int8_mixed_scaled_mm(
        A8.float(), A8, B8, rs, cs, torch.tensor([1, 3], device="meta"))),
])
def test_stats_on_another_device_are_refused(op, name, call) -> None:
    """A stats tensor on the meta device sent the call to the op's fake impl, which returned an unwritten CPU
    tensor: uninitialised memory as the result (QA finding 1)."""
    with pytest.raises(ValueError, match=f"{op}: {name} must be on .*device cpu, got meta"):
        call(*_int8_operands(41))


def test_scaled_and_quant_state_tensors_on_meta_are_refused() -> None:
    import dataclasses

    x = _randn((8, 64), torch.float32, 42, "cpu")
    st8 = F.quantize_scaled(x)
    with pytest.raises(ValueError, match="dequantize_scaled: scale must be on ScaledTensor.data's device cpu, got meta"):
        F.dequantize_scaled(dataclasses.replace(st8, scale=st8.scale.to("meta")))
    q, state = F.quantize_blockwise(x, blocksize=64)
    for field in ("absmax", "code"):
        with pytest.raises(ValueError, match="dequantize_blockwise: .* must hold data to be moved to cpu, got a tensor on meta"):
            F.dequantize_blockwise(q, dataclasses.replace(state, **{field: getattr(state, field).to("meta")}))
    bad = dataclasses.replace(state, special_index=torch.tensor([3], device="meta"),
                              special_value=torch.tensor([float("nan")], device="meta"))
    with pytest.raises(ValueError, match="QuantState.special_index must hold data"):
        F.dequantize_blockwise(q, bad)
    with pytest.raises(ValueError, match="code must be a codebook holding data"):
        F.quantize_blockwise(x, code=get_codebook("dynamic").to("meta"))


@pytest.mark.parametrize(("name", "call"), [
    ("out", lambda x, A8, B8: F.quantize_blockwise(x, blocksize=64, out=torch.empty(8, 64, dtype=torch.uint8, device="meta"))),
    ("absmax", lambda x, A8, B8: F.quantize_blockwise(x, blocksize=64, absmax=torch.empty(8, device="meta"))),
    ("out", lambda x, A8, B8: F.quantize(x, out=torch.empty(8, 64, dtype=torch.uint8, device="meta"))),
    ("out", lambda x, A8, B8: F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=64),
                                                     out=torch.empty(8, 64, device="meta"))),
    ("out", lambda x, A8, B8: F.dequantize_scaled(F.quantize_scaled(x), out=torch.empty(8, 64, device="meta"))),
    ("out", lambda x, A8, B8: F.int8_linear_matmul(A8, B8, out=torch.empty(4, 8, dtype=torch.int32, device="meta"))),
    ("out", lambda x, A8, B8: F.int8_mm_dequant(F.int8_linear_matmul(A8, B8), torch.rand(4), torch.rand(8),
                                                out=torch.empty(4, 8, dtype=torch.float16, device="meta"))),
])
def test_out_buffers_on_another_device_are_refused(name, call) -> None:
    """A meta `out=` was accepted: the copy into it did nothing and the caller got a tensor without values
    (QA finding 7); the autograd functions' out= refused it already."""
    A8, B8, _, _ = _int8_operands(43)
    with pytest.raises(ValueError, match=f"{name} must be on cpu \\(the result's device\\), got meta"):
        call(_randn((8, 64), torch.float32, 44, "cpu"), A8, B8)


def test_mixed_scaled_mm_outlier_cols_must_be_a_tensor() -> None:
    A8, B8, rs, cs = _int8_operands(45)
    with pytest.raises(TypeError, match="outlier_cols must be a torch.Tensor, got list"):
        F.int8_mixed_scaled_mm(A8.float(), A8, B8, rs, cs, [1, 2])


def _scaled(fmt: str):
    return F.quantize_scaled(_randn((8, 64), torch.float32, 46, "cpu"), fmt)


@pytest.mark.parametrize(("fmt", "edit", "error", "match"), [
    ("e4m3", lambda st_: {"fmt": "zz"}, ValueError, "ScaledTensor.fmt must be one of .*got 'zz'"),
    ("e4m3", lambda st_: {"data": st_.data.float()}, TypeError, "ScaledTensor.data must have dtype in \\['torch.float8_e4m3fn'\\], got torch.float32"),
    ("mxfp4-e2m1", lambda st_: {"data": st_.data.view(torch.int8)}, TypeError, "ScaledTensor.data must have dtype in \\['torch.uint8'\\]"),
    ("e4m3", lambda st_: {"scale": torch.ones(3, 3)}, ValueError, "ScaledTensor.scale must have shape \\[1, 1\\].*got \\[3, 3\\]"),
    ("e4m3", lambda st_: {"scale": None}, TypeError, "ScaledTensor.scale must be a torch.Tensor, got NoneType"),
    ("e4m3", lambda st_: {"block": (0, 0)}, ValueError, "ScaledTensor.block must be \\(rows, cols\\) of positive ints, got \\(0, 0\\)"),
    ("nvfp4", lambda st_: {"global_scale": None}, ValueError, "nvfp4 ScaledTensor needs global_scale.*got None"),
    ("nvfp4", lambda st_: {"global_scale": st_.global_scale.reshape(1)}, ValueError, "global_scale must be 0-d.*got shape \\[1\\]"),
    ("e5m2", lambda st_: {"global_scale": torch.tensor(2.0)}, ValueError, "global_scale belongs to nvfp4; expected None for fmt 'e5m2'"),
    ("mxfp4-e2m1", lambda st_: {"data": st_.data.clone().index_fill_(1, torch.tensor([3]), 200)}, ValueError,
     "mxfp4-e2m1 element codes must be in 0..15, got 200"),
])
def test_hand_built_scaled_tensor_is_validated(fmt, edit, error, match) -> None:
    """An unknown fmt was ignored, float data and an NVFP4 tensor without its global scale dequantised to silent
    wrong values, other bad fields gave reshape errors, ZeroDivisionError or IndexError (QA finding 8)."""
    import dataclasses

    st_ = _scaled(fmt)
    with pytest.raises(error, match=match):
        F.dequantize_scaled(dataclasses.replace(st_, **edit(st_)))
    assert torch.isfinite(F.dequantize_scaled(st_)).all()
