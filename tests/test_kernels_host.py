"""The CUDA kernel sources compiled as host C++ (one-thread emulation) agree bit for bit with the reference.

No GPU is needed: a small shim maps the CUDA intrinsics the kernels use (`__fmul_rn`, `__frcp_rn`,
`__float_as_uint`, ...) to IEEE float32 host arithmetic (g++ without fast-math, FMA contraction off),
and every kernel that is correct with one thread per block (all grid-stride kernels, the row and tile
reductions) is run block by block. This checks the numerics of the .cu files themselves: the bit-level
fp16/bf16/fp8 conversions (exhaustively where feasible), the even-index search and each kernel's
float32 operation order. Not covered here (GPU only, tests/test_cuda_backend.py): the fused
multi-thread blockwise kernel, warp shuffles, the tiled int8 GEMM and the launch plumbing.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fp8probe.backends import reference as ref
from fp8probe.formats import INV_127, INV_127_SQ, get_codebook
from fp8probe.kernels import kernel_source

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")

SHIM = r"""
#include <cmath>
#include <cstring>
#include <algorithm>
struct dim3_t { unsigned x, y, z; };
static dim3_t threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
static inline void __syncthreads() {}
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __int2float_rn(int i) { return (float)i; }
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int) { return v; }
static inline unsigned atomicMax(unsigned* a, unsigned v) { unsigned o = *a; if (v > o) *a = v; return o; }
static inline int atomicOr(int* a, int v) { int o = *a; *a = o | v; return o; }
using std::min;
using std::max;
template <class F> static void run_grid(unsigned gx, unsigned gy, F f) {
    blockDim = {1, 1, 1}; gridDim = {gx, gy, 1}; threadIdx = {0, 0, 0};
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) { blockIdx = {x, y, 0}; f(); }
}
"""

# extern "C" entry points: scalar helpers over arrays, and kernels run on a 1-thread-per-block grid
WRAPPERS = r"""
typedef unsigned short u16; typedef unsigned char u8; typedef long long ll;
extern "C" {
void h_half_to_float(const u16* in, float* out, ll n) { for (ll i = 0; i < n; ++i) out[i] = kc::half_bits_to_float(in[i]); }
void h_float_to_half(const float* in, u16* out, ll n) { for (ll i = 0; i < n; ++i) out[i] = kc::float_to_half_bits_rn(in[i]); }
void h_float_to_bf16(const float* in, u16* out, ll n) { for (ll i = 0; i < n; ++i) out[i] = kc::float_to_bf16_bits_rn(in[i]); }
void h_float_to_fp8(const float* in, u8* out, ll n, int fmt) {
    for (ll i = 0; i < n; ++i) out[i] = fmt == 0 ? ks::float_to_e4m3_satfinite(in[i]) : ks::float_to_e5m2_satfinite(in[i]); }
void h_fp8_to_float(const u8* in, float* out, ll n, int fmt) {
    for (ll i = 0; i < n; ++i) out[i] = fmt == 0 ? ks::e4m3_to_float(in[i]) : ks::e5m2_to_float(in[i]); }
void h_search_even(const float* code, const float* x, int* out, ll n) { for (ll i = 0; i < n; ++i) out[i] = kc::search_even(code, x[i]); }
void h_round_int8(const float* in, signed char* out, ll n) { for (ll i = 0; i < n; ++i) out[i] = ki::round_to_int8(in[i]); }
"""

TYPES = {"float": torch.float32, "half_t": torch.float16, "bf16_t": torch.bfloat16}
TYPED = r"""
void h_absmax_global_{t}(const void* A, float* absmax, ll n) {{
    run_grid(1, 1, [&] {{ kc::absmax_global<{tc}>((const {tc}*)A, absmax, n); }}); }}
void h_quantize_with_absmax_{t}(const void* A, const float* code, const float* absmax, u8* q, ll n, ll bs) {{
    run_grid(1, 1, [&] {{ kc::quantize_with_absmax<{tc}>((const {tc}*)A, code, absmax, q, n, bs); }}); }}
void h_dequantize_blockwise_{t}(const u8* q, const float* code, const float* absmax, void* out, ll n, ll bs) {{
    run_grid(1, 1, [&] {{ kc::dequantize_blockwise<{tc}>(q, code, absmax, ({tc}*)out, n, bs); }}); }}
void h_int8_vectorwise_quant_{t}(const void* A, signed char* q, float* rs, int* flags, ll rows, ll cols, float thr, int nanp) {{
    run_grid((unsigned)rows, 1, [&] {{ ki::int8_vectorwise_quant<{ti}>((const {ti}*)A, q, rs, flags, rows, cols, thr, nanp); }}); }}
void h_int8_col_stats_{t}(const void* A, float* cs, ll rows, ll cols, float thr, int nanp) {{
    run_grid((unsigned)cols, 1, [&] {{ ki::int8_col_stats<{ti}>((const {ti}*)A, cs, rows, cols, thr, nanp); }}); }}
void h_int8_col_quant_{t}(const void* A, const float* cs, signed char* q, ll rows, ll cols, float thr) {{
    run_grid(1, 1, [&] {{ ki::int8_col_quant<{ti}>((const {ti}*)A, cs, q, rows, cols, thr); }}); }}
void h_int8_mm_dequant_{t}(const int* C, const float* r, const float* c, const float* b, void* out, ll rows, ll cols, float k, int hb) {{
    run_grid(1, 1, [&] {{ ki::int8_mm_dequant<{ti}>(C, r, c, b, ({ti}*)out, rows, cols, k, hb); }}); }}
void h_amax_tiles_{t}(const void* x, float* amax, ll rows, ll cols, ll tr, ll tc, ll ntiles, int fo) {{
    run_grid((unsigned)ntiles, 1, [&] {{ ks::amax_tiles<{ts}>((const {ts}*)x, amax, rows, cols, tr, tc, fo); }}); }}
void h_cast_to_fp8_{t}(const void* x, const float* s, u8* d, ll rows, ll cols, ll tr, ll tc, int fmt) {{
    run_grid(1, 1, [&] {{ ks::cast_to_fp8<{ts}>((const {ts}*)x, s, d, rows, cols, tr, tc, fmt); }}); }}
void h_cast_from_fp8_{t}(const u8* d, const float* s, void* out, ll rows, ll cols, ll tr, ll tc, int fmt) {{
    run_grid(1, 1, [&] {{ ks::cast_from_fp8<{ts}>(d, s, ({ts}*)out, rows, cols, tr, tc, fmt); }}); }}
"""
UNTYPED = r"""
void h_int8_zero_columns(signed char* q, const int* flags, ll rows, ll cols) {
    run_grid(1, 1, [&] { ki::int8_zero_columns(q, flags, rows, cols); }); }
void h_int8_vectorwise_dequant(const signed char* q, const float* s, float* out, ll rows, ll cols, float inv) {
    run_grid(1, 1, [&] { ki::int8_vectorwise_dequant(q, s, out, rows, cols, inv); }); }
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    src = SHIM
    for ns, name in (("kc", "codebook_quant"), ("ki", "int8"), ("ks", "scaled_cast")):
        src += f"namespace {ns} {{\n{kernel_source(name)}\n}}\n"
    src += '#line 1 "host_wrappers.cpp"\n' + WRAPPERS
    for t in TYPES:
        q = {ns: t if t == "float" else f"{ns}::{t}" for ns in ("kc", "ki", "ks")}
        src += TYPED.format(t=t, tc=q["kc"], ti=q["ki"], ts=q["ks"])
    src += UNTYPED
    d = tmp_path_factory.mktemp("hostkernels")
    (d / "k.cpp").write_text(src)
    # -ffp-contract=off: no FMA contraction; no -ffast-math: IEEE float32 like the NVRTC defaults
    cmd = [CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-w", "-shared", "-fPIC",
           str(d / "k.cpp"), "-o", str(d / "k.so")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(d / "k.so"))


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _call(lib, name: str, *args) -> None:
    conv = []
    for a in args:
        if isinstance(a, torch.Tensor):
            conv.append(_p(a))
        elif isinstance(a, float):
            conv.append(ctypes.c_float(a))
        elif isinstance(a, np.int32):
            conv.append(ctypes.c_int(int(a)))
        else:
            conv.append(ctypes.c_longlong(a))
    getattr(lib, name)(*conv)


def _ctype(dtype: torch.dtype) -> str:
    return {v: k for k, v in TYPES.items()}[dtype]


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    from test_cuda_backend import assert_bitwise_equal as impl  # one definition of "bit-exact"
    impl(got, want)


def random_floats(n: int, seed: int) -> torch.Tensor:
    """Random float32 bit patterns (all exponents, NaN/Inf included) plus hand-picked edge values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-14, 2.0**-24, 2.0**-25,
                          2.0**-25 * 1.5, 448.0, 464.0, 480.0, 57344.0, 61440.0, 2.0**-9, 2.0**-10,
                          2.0**-16, 2.0**-17, 3 * 2.0**-18, 1e-45, 3.4e38, float("inf"), float("nan")])
    return torch.cat([x, edges, -edges])


def ties_for(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Float32 values exactly half-way between two neighbouring values of `dtype` (the RNE tie cases,
    subnormals included), their float32 neighbours on either side, and the negatives."""
    g = torch.Generator().manual_seed(seed)
    wide = dtype.itemsize == 2
    itype, nbits, sign = (torch.int16, 2**16, 0x8000) if wide else (torch.uint8, 256, 0x80)
    raw = torch.randint(0, nbits, (n,), generator=g, dtype=torch.int32)
    lo = raw.to(itype).view(dtype).float()
    nxt = (raw + 1).to(itype).view(dtype).float()     # next value away from zero
    ok = torch.isfinite(lo) & torch.isfinite(nxt) & (((raw ^ (raw + 1)) & sign) == 0) & (raw + 1 < nbits)
    mid = ((lo[ok].double() + nxt[ok].double()) / 2).float()   # exact: one bit more than `dtype`
    return torch.cat([mid, mid.nextafter(torch.full_like(mid, float("inf"))),
                      mid.nextafter(torch.full_like(mid, -float("inf"))), -mid])


# ----------------------------------------------------------------------------- conversions
def test_half_decode_exhaustive(lib) -> None:
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    out = torch.empty(65536, dtype=torch.float32)
    _call(lib, "h_half_to_float", bits, out, 65536)
    assert_bitwise_equal(out, bits.view(torch.float16).float())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_float_to_16bit_rne(lib, dtype) -> None:
    x = torch.cat([random_floats(50_000, 1), ties_for(dtype, 20_000, 2)])
    out = torch.empty(x.numel(), dtype=torch.int16)
    _call(lib, "h_float_to_half" if dtype == torch.float16 else "h_float_to_bf16", x, out, x.numel())
    assert_bitwise_equal(out.view(dtype), x.to(dtype))


@pytest.mark.parametrize("fp8,fmt", ((torch.float8_e4m3fn, 0), (torch.float8_e5m2, 1)))
def test_fp8_encode_decode(lib, fp8, fmt) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    dec = torch.empty(256, dtype=torch.float32)
    _call(lib, "h_fp8_to_float", codes, dec, 256, np.int32(fmt))
    assert_bitwise_equal(dec, codes.view(fp8).float())
    fmax = ref.SCALED_FORMATS["e4m3" if fmt == 0 else "e5m2"][1]
    x = torch.cat([random_floats(50_000, 3), ties_for(fp8, 5_000, 4), ties_for(fp8, 5_000, 5) * 0.9])
    out = torch.empty(x.numel(), dtype=torch.uint8)
    _call(lib, "h_float_to_fp8", x, out, x.numel(), np.int32(fmt))
    want = torch.where(torch.isfinite(x), x.clamp(-fmax, fmax), x).to(fp8)   # reference semantics
    assert_bitwise_equal(out.view(fp8), want)


def test_round_int8_matches_reference(lib) -> None:
    x = torch.cat([random_floats(10_000, 6), torch.arange(-300, 300, dtype=torch.float32) / 2,
                   torch.tensor([126.5, 127.49, 127.5, -127.5, -128.5])])
    out = torch.empty(x.numel(), dtype=torch.int8)
    _call(lib, "h_round_int8", x, out, x.numel())
    assert_bitwise_equal(out, ref._round_int8(x))


@pytest.mark.parametrize("name", ("dynamic", "bnb-e4m3", "bnb-e5m2", "linear", "dynamic-unsigned"))
def test_search_even_matches_reference(lib, name) -> None:
    code = get_codebook(name).contiguous()
    mid = ref.code_midpoints(code)
    g = torch.Generator().manual_seed(8)
    x = torch.cat([torch.rand(20_000, generator=g) * 2.2 - 1.1, code, mid,
                   mid.nextafter(torch.full_like(mid, 2.0)), mid.nextafter(torch.full_like(mid, -2.0)),
                   torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30])])
    out = torch.empty(x.numel(), dtype=torch.int32)
    _call(lib, "h_search_even", code, x, out, x.numel())
    assert_bitwise_equal(out.long(), ref.search_even(code, x).long())


# ----------------------------------------------------------------------------- kernels
def _data(shape, dtype, seed, specials=True) -> torch.Tensor:
    from test_cuda_backend import sample
    return sample(shape, dtype, seed, specials=specials, code=get_codebook("bnb-e4m3")).contiguous()


@pytest.mark.parametrize("dtype", list(TYPES.values()))
@pytest.mark.parametrize("shape", ((7,), (1000,), (33, 77)))
def test_global_quantize_and_dequantize_kernels(lib, dtype, shape) -> None:
    t = _ctype(dtype)
    code = get_codebook("bnb-e4m3").contiguous()
    A = _data(shape, dtype, seed=21)
    n = A.numel()
    absmax = torch.zeros(1)
    _call(lib, f"h_absmax_global_{t}", A.view(torch.int16) if dtype.itemsize == 2 else A, absmax, n)
    q = torch.empty(shape, dtype=torch.uint8)
    _call(lib, f"h_quantize_with_absmax_{t}", A.view(torch.int16) if dtype.itemsize == 2 else A,
          code, absmax, q, n, n)
    want_q, want_absmax, si, sv = ref.quantize_global(A, code, "")
    assert_bitwise_equal(absmax, want_absmax)
    assert_bitwise_equal(q, want_q)
    for out_dtype in TYPES.values():
        out = torch.empty(shape, dtype=out_dtype)
        _call(lib, f"h_dequantize_blockwise_{_ctype(out_dtype)}", q, code, absmax, out, n, n)
        want = ref.dequantize_blockwise(q, absmax, code, n, out_dtype, si[:0], sv[:0], "")
        assert_bitwise_equal(out, want)


@pytest.mark.parametrize("dtype", list(TYPES.values()))
@pytest.mark.parametrize("blocksize", (32, 256))
def test_blockwise_search_with_reference_absmax(lib, dtype, blocksize) -> None:
    # the fused kernel needs real threads; its per-element math is quantize_with_absmax's
    code = get_codebook("dynamic").contiguous()
    A = _data((3000,), dtype, seed=blocksize)
    want_q, absmax, _, _ = ref.quantize_blockwise(A, code, blocksize, "")
    q = torch.empty(A.shape, dtype=torch.uint8)
    _call(lib, f"h_quantize_with_absmax_{_ctype(dtype)}", A.view(torch.int16) if dtype.itemsize == 2 else A,
          code, absmax, q, A.numel(), blocksize)
    assert_bitwise_equal(q, want_q)


def _int8_input(shape, dtype, seed) -> torch.Tensor:
    from test_cuda_backend import int8_sample
    return int8_sample(shape, dtype, seed).contiguous()


@pytest.mark.parametrize("dtype", list(TYPES.values()))
@pytest.mark.parametrize("shape", ((7, 130), (1, 1000), (3, 5, 64)))
@pytest.mark.parametrize("threshold", (0.0, 2.5))
@pytest.mark.parametrize("compat", ("", "bnb"))
def test_int8_row_and_column_kernels(lib, dtype, shape, threshold, compat) -> None:
    t = _ctype(dtype)
    A = _int8_input(shape, dtype, seed=len(shape))
    Ab = A.view(torch.int16) if dtype.itemsize == 2 else A
    rows, cols = A.numel() // shape[-1], shape[-1]
    q = torch.empty(shape, dtype=torch.int8)
    rs = torch.empty(rows)
    flags = torch.zeros(cols, dtype=torch.int32)
    _call(lib, f"h_int8_vectorwise_quant_{t}", Ab, q, rs, flags, rows, cols, threshold, np.int32(compat == "bnb"))
    if threshold > 0:
        _call(lib, "h_int8_zero_columns", q, flags, rows, cols)
    want_q, want_rs, want_cols = ref.int8_vectorwise_quant(A, threshold, compat)
    assert_bitwise_equal(rs, want_rs)
    assert_bitwise_equal(q, want_q)
    assert_bitwise_equal(flags.nonzero().reshape(-1) if threshold > 0 else want_cols[:0], want_cols)
    deq = torch.empty(shape)
    _call(lib, "h_int8_vectorwise_dequant", q, rs, deq, rows, cols, INV_127)
    assert_bitwise_equal(deq, ref.int8_vectorwise_dequant(q, rs))
    if compat == "":
        cs = torch.zeros(cols)
        _call(lib, f"h_int8_col_stats_{t}", Ab, cs, rows, cols, threshold, np.int32(0))
        qc = torch.empty(shape, dtype=torch.int8)
        _call(lib, f"h_int8_col_quant_{t}", Ab, cs, qc, rows, cols, threshold)
        _, want_qc, _, want_cs, _ = ref.int8_double_quant(A, threshold, "")
        assert_bitwise_equal(cs, want_cs)
        assert_bitwise_equal(qc, want_qc)


@pytest.mark.parametrize("dtype", list(TYPES.values()))
@pytest.mark.parametrize("bias_dtype", (None, torch.float16, torch.float32))
def test_int8_mm_dequant_kernel(lib, dtype, bias_dtype) -> None:
    g = torch.Generator().manual_seed(13)
    C = torch.randint(-(2**31), 2**31 - 1, (2, 7, 64), generator=g, dtype=torch.int32)
    row = torch.rand(14, generator=g) * 10
    col = torch.rand(64, generator=g) * 10
    row[0] = 0.0
    bias = None if bias_dtype is None else torch.randn(64, generator=g).to(bias_dtype)
    out = torch.empty(C.shape, dtype=dtype)
    b32 = torch.zeros(1) if bias is None else bias.float().contiguous()
    _call(lib, f"h_int8_mm_dequant_{_ctype(dtype)}", C, row, col, b32,
          out.view(torch.int16) if dtype.itemsize == 2 else out, 14, 64, INV_127_SQ, np.int32(bias is not None))
    assert_bitwise_equal(out, ref.int8_mm_dequant(C, row, col, bias, dtype, ""))


@pytest.mark.parametrize("dtype", list(TYPES.values()))
@pytest.mark.parametrize("fmt", ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2"))
@pytest.mark.parametrize("tile", ((130, 300), (1, 300), (1, 128), (128, 128), (1, 32)), ids=str)
def test_scaled_cast_kernels(lib, dtype, fmt, tile) -> None:
    from fp8probe.backends.cuda import _scale_from_amax

    if fmt.startswith("mxfp8") != (tile == (1, 32)):
        pytest.skip("MX formats use 1x32 tiles only")
    t = _ctype(dtype)
    x = _data((130, 300), dtype, seed=17)
    x.view(-1)[:40] = 0.0
    xb = x.view(torch.int16) if dtype.itemsize == 2 else x
    br, bc = tile
    nbr, nbc = -(-130 // br), -(-300 // bc)
    amax = torch.zeros(nbr, nbc)
    _call(lib, f"h_amax_tiles_{t}", xb, amax, 130, 300, br, bc, nbr * nbc, np.int32(1))
    scale = _scale_from_amax(amax, fmt).contiguous()
    fp8 = ref.SCALED_FORMATS[fmt][0]
    data = torch.empty(x.shape, dtype=torch.uint8)
    _call(lib, f"h_cast_to_fp8_{t}", xb, scale, data, 130, 300, br, bc, np.int32(0 if fp8 == torch.float8_e4m3fn else 1))
    want_data, want_scale = ref.quantize_scaled(x, fmt, br, bc)
    assert_bitwise_equal(scale, want_scale)
    assert_bitwise_equal(data.view(fp8), want_data)
    for out_dtype in TYPES.values():
        out = torch.empty(x.shape, dtype=out_dtype)
        _call(lib, f"h_cast_from_fp8_{_ctype(out_dtype)}", data, scale,
              out.view(torch.int16) if out_dtype.itemsize == 2 else out, 130, 300, br, bc,
              np.int32(0 if fp8 == torch.float8_e4m3fn else 1))
        assert_bitwise_equal(out, ref.dequantize_scaled(want_data, want_scale, br, bc, out_dtype))
