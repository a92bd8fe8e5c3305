"""The CUDA kernel sources, compiled as host C++ under a small CUDA emulator, agree bit for bit with the reference.

No GPU is needed. A shim maps the CUDA features the kernels use to host C++: float intrinsics
(`__fmul_rn`, `__frcp_rn`, ...) to IEEE float32 arithmetic (g++ without fast-math, FMA contraction
off), every CUDA thread of a block to a cooperative fiber (ucontext), `__syncthreads` to a block
barrier, warp shuffles to a per-warp exchange between barriers. Blocks run one after another. The real launchers of
fp8probe/backends/cuda.py then run on CPU tensors with their `_launch` replaced by the emulator, which
also checks each argument against the kernel's C++ signature (pointer / integer / float and byte size)
the way cuLaunchKernel cannot. So this covers the kernels' numerics (bit-level fp16/bf16/fp8
conversions exhaustively where feasible, the even-index search, each float32 operation order), their
reductions and index arithmetic, and the launchers' grids and argument lists. Not covered (GPU only,
tests/test_cuda_backend.py): real warp scheduling/memory ordering, DLPack/stream plumbing, NVRTC
code generation, and torch._int_mm on CUDA.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fp8probe.backends import cuda as cuda_backend
from fp8probe.backends import reference as ref
from fp8probe.formats import get_codebook
from fp8probe.kernels import KERNELS, kernel_source
from support import scatter_specials

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler")

NAMESPACES = {"codebook_quant": "kc", "int8": "ki", "scaled_cast": "ks", "metrics": "km"}
TYPES = {"float": torch.float32, "half_t": torch.float16, "bf16_t": torch.bfloat16}

EMULATOR = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>
struct dim3_t { unsigned x, y, z; };
static dim3_t threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

// CUDA threads are cooperative fibers in one OS thread: a fiber runs until it waits at a barrier,
// then the scheduler resumes the next one (round robin). Deterministic and cheap.
struct Fiber { ucontext_t ctx; dim3_t idx; bool done; std::vector<char> stack; };
struct Barrier { unsigned expected = 0, count = 0, gen = 0; };
static ucontext_t g_sched;
static std::vector<Fiber> g_fibers;
static Fiber* g_current = nullptr;
static std::function<void()> g_body;
static Barrier g_block_barrier, g_warp_barrier[32];
static unsigned long long g_shfl[1024];
static void fiber_entry() { g_body(); g_current->done = true; swapcontext(&g_current->ctx, &g_sched); }
static void barrier_wait(Barrier& b) {
    const unsigned gen = b.gen;
    if (++b.count == b.expected) { b.count = 0; ++b.gen; return; }
    while (b.gen == gen) swapcontext(&g_current->ctx, &g_sched);
}
static inline void __syncthreads() { barrier_wait(g_block_barrier); }
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int off) {
    const unsigned t = threadIdx.x + blockDim.x * threadIdx.y, w = t >> 5, lane = t & 31u;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    g_shfl[t] = bits;
    barrier_wait(g_warp_barrier[w]);
    bits = g_shfl[(w << 5) | (lane ^ (unsigned)off)];
    barrier_wait(g_warp_barrier[w]);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
static inline unsigned atomicMax(unsigned* a, unsigned v) { unsigned o = *a; if (v > o) *a = v; return o; }
static inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
    unsigned long long o = *a; if (v > o) *a = v; return o; }
static inline int atomicOr(int* a, int v) { int o = *a; *a = o | v; return o; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
static inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __int2float_rn(int i) { return (float)i; }
using std::min;
using std::max;

// Run f once per CUDA thread of every block; blocks run one after another. Returns 0, or 1 when the
// threads of a block deadlock (some wait at a barrier the others never reach).
template <class F> static int emulate(unsigned gx, unsigned gy, unsigned bx, unsigned by, F f) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    const unsigned nt = bx * by;
    g_body = f;
    g_fibers.resize(nt);
    for (auto& fb : g_fibers) fb.stack.resize(1 << 16);
    for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, 0};
        g_block_barrier = Barrier{nt, 0, 0};
        for (unsigned w = 0; w * 32 < nt; ++w) g_warp_barrier[w] = Barrier{std::min(32u, nt - w * 32), 0, 0};
        for (unsigned t = 0; t < nt; ++t) {
            Fiber& fb = g_fibers[t];
            fb.idx = {t % bx, t / bx, 0};
            fb.done = false;
            getcontext(&fb.ctx);
            fb.ctx.uc_stack.ss_sp = fb.stack.data();
            fb.ctx.uc_stack.ss_size = fb.stack.size();
            fb.ctx.uc_link = nullptr;
            makecontext(&fb.ctx, fiber_entry, 0);
        }
        for (long rounds = 0;; ++rounds) {
            bool alive = false;
            for (auto& fb : g_fibers) {
                if (fb.done) continue;
                alive = true;
                g_current = &fb;
                threadIdx = fb.idx;
                swapcontext(&g_sched, &fb.ctx);
            }
            if (!alive) break;
            if (rounds > 10000000) return 1;
        }
    }
    return 0;
}

// cuLaunchKernel-style: args[i] points at the i-th argument's value.
template <class... P, std::size_t... I>
static void call_with(void (*k)(P...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
template <class... P>
static int launch(void (*k)(P...), unsigned gx, unsigned gy, unsigned bx, unsigned by, void** args) {
    return emulate(gx, gy, bx, by, [=] { call_with(k, args, std::index_sequence_for<P...>{}); });
}
template <class... P> static int signature(void (*)(P...), char* kinds, int* sizes) {
    int i = 0;
    ((kinds[i] = std::is_pointer_v<P> ? 'p' : (std::is_floating_point_v<P> ? 'f' : 'i'),
      sizes[i] = (int)sizeof(P), ++i), ...);
    return i;
}
"""

# extern "C" entry points for the scalar device helpers, applied over arrays (no threads needed)
HELPERS = r"""
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
}
"""


def _ident(file: str, expr: str) -> str:
    return f"{file}__" + re.sub(r"[^A-Za-z0-9]", "_", expr)


def _qualified(file: str, expr: str) -> str:
    ns = NAMESPACES[file]
    name, _, targ = expr.partition("<")
    if not targ:
        return f"{ns}::{name}"
    types = [t.strip() for t in targ.rstrip(">").split(",")]
    return f"{ns}::{name}<{', '.join(t if t in ('float', 'double') else f'{ns}::{t}' for t in types)}>"


def _launch_wrappers() -> str:
    out = ['#line 1 "emulated_launch.cpp"', 'extern "C" {']
    for file, exprs in KERNELS.items():
        for expr in exprs:
            ident, q = _ident(file, expr), _qualified(file, expr)
            out.append(f"int launch_{ident}(unsigned gx, unsigned gy, unsigned bx, unsigned by, void** a) "
                       f"{{ return launch(&{q}, gx, gy, bx, by, a); }}")
            out.append(f"int sig_{ident}(char* k, int* s) {{ return signature(&{q}, k, s); }}")
    out.append("}")
    return "\n".join(out) + "\n"


INDEX32_DEFINE = "#define INDEX32_MAX 0x7fffffffLL"


def _build(tmp_path_factory, *, index64: bool = False) -> ctypes.CDLL:
    """Compile every kernel file under the emulator. index64: the 32-bit index fast paths are disabled
    (INDEX32_MAX = -1), so the 64-bit instantiations that only tensors of 2**31+ elements reach on a GPU
    run on small ones."""
    src = EMULATOR
    for file, ns in NAMESPACES.items():
        text = kernel_source(file)
        if index64:
            assert INDEX32_DEFINE in text
            text = text.replace(INDEX32_DEFINE, "#define INDEX32_MAX (-1LL)")
        src += f"namespace {ns} {{\n{text}\n}}\n"
    src += '#line 1 "helpers.cpp"\n' + HELPERS + _launch_wrappers()
    d = tmp_path_factory.mktemp("hostkernels64" if index64 else "hostkernels")
    (d / "k.cpp").write_text(src)
    # -ffp-contract=off: no FMA contraction; no -ffast-math: IEEE float32 like the NVRTC defaults
    cmd = [CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-w", "-shared",
           "-fPIC", str(d / "k.cpp"), "-o", str(d / "k.so")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(d / "k.so"))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory)


@pytest.fixture(scope="module")
def lib64(tmp_path_factory):
    return _build(tmp_path_factory, index64=True)


@pytest.fixture
def emulated(lib, monkeypatch):
    """Route backends/cuda.py's kernel launches to the host emulator (CPU tensors in, CPU tensors out)."""
    return _route(lib, monkeypatch)


def _route(lib, monkeypatch):
    monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)

    def host_launch(file, kernel, grid, block, args, device, dtype=None):
        expr = f"{kernel}<{cuda_backend._CUDA_TYPE[dtype]}>" if dtype is not None else kernel
        assert expr in KERNELS[file], expr
        ident = _ident(file, expr)
        kinds, sizes = ctypes.create_string_buffer(32), (ctypes.c_int * 32)()
        nparam = getattr(lib, f"sig_{ident}")(kinds, sizes)
        assert len(args) == nparam, f"{expr}: {len(args)} arguments for {nparam} parameters"
        holders = []
        for i, a in enumerate(args):
            kind, size = kinds.raw[i:i + 1].decode(), sizes[i]
            if isinstance(a, torch.Tensor):
                assert kind == "p", f"{expr} arg {i}: tensor for a {kind!r} parameter"
                assert a.is_contiguous() and a.device.type == "cpu"
                holders.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, np.floating):
                assert kind == "f" and a.itemsize == size, f"{expr} arg {i}: {a.dtype} for f{size}"
                holders.append(ctypes.c_float(a))
            elif isinstance(a, np.integer):
                assert kind == "i" and a.itemsize == size, f"{expr} arg {i}: {a.dtype} for i{size}"
                holders.append(ctypes.c_int32(int(a)) if size == 4 else ctypes.c_int64(int(a)))
            else:
                raise AssertionError(f"{expr} arg {i}: untyped scalar {a!r} (CuPy would guess its C type)")
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        g = (*grid, 1, 1)[:2]
        b = (*block, 1, 1)[:2]
        assert 0 < g[0] < 2**31 and 0 < g[1] < 2**16, grid
        assert b[0] * b[1] <= 1024 and (b[0] * b[1]) % 32 == 0, block   # whole warps (shuffles)
        rc = getattr(lib, f"launch_{ident}")(ctypes.c_uint(g[0]), ctypes.c_uint(g[1]), ctypes.c_uint(b[0]),
                                             ctypes.c_uint(b[1]), argv)
        assert rc == 0, f"{expr}: threads deadlocked at a barrier"

    monkeypatch.setattr(cuda_backend, "_launch", host_launch)
    return cuda_backend


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _call(lib, name: str, *args) -> None:
    conv = []
    for a in args:
        if isinstance(a, torch.Tensor):
            conv.append(_p(a))
        elif isinstance(a, np.int32):
            conv.append(ctypes.c_int(int(a)))
        else:
            conv.append(ctypes.c_longlong(a))
    getattr(lib, name)(*conv)


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


# ----------------------------------------------------------------------------- kernels via the launchers
DTYPES = tuple(TYPES.values())


def _sample(shape, dtype, seed, *, specials=True, code=None) -> torch.Tensor:
    from test_cuda_backend import sample  # the GPU test's data generator: same cases on both
    return sample(shape, dtype, seed, specials=specials, code=code)


def _int8_sample(shape, dtype, seed) -> torch.Tensor:
    from test_cuda_backend import int8_sample
    return int8_sample(shape, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("shape", ((1000,), (33, 77)))
@pytest.mark.parametrize("code_name", ("dynamic", "bnb-e4m3"))
def test_blockwise_kernels(emulated, dtype, blocksize, shape, code_name) -> None:
    code = get_codebook(code_name)
    A = _sample(shape, dtype, seed=blocksize + len(shape), code=code)
    got = emulated.quantize_blockwise(A, code, blocksize, "")
    want = ref.quantize_blockwise(A, code, blocksize, "")
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)
    q, absmax, si, sv = got
    out_dtype = DTYPES[(blocksize // 32) % 3]            # every output dtype across the grid
    assert_bitwise_equal(emulated.dequantize_blockwise(q, absmax, code, blocksize, out_dtype, si, sv, ""),
                         ref.dequantize_blockwise(q, absmax, code, blocksize, out_dtype, si, sv, ""))


@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise_special_blocks(emulated, dtype) -> None:
    from test_cuda_backend import special_blocks  # the GPU test's cases, here on the emulator

    code = get_codebook("bnb-e4m3")
    A = special_blocks(dtype)
    for g, w in zip(emulated.quantize_blockwise(A, code, 64, ""), ref.quantize_blockwise(A, code, 64, "")):
        assert_bitwise_equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((7,), (33, 77)))
def test_global_kernels(emulated, dtype, shape) -> None:
    code = get_codebook("bnb-e4m3")
    A = _sample(shape, dtype, seed=21, code=code)
    got = emulated.quantize_global(A, code, "")
    for g, w in zip(got, ref.quantize_global(A, code, "")):
        assert_bitwise_equal(g, w)
    q, absmax, si, sv = got
    n = A.numel()
    assert_bitwise_equal(emulated.dequantize_blockwise(q, absmax, code, n, dtype, si, sv, ""),
                         ref.dequantize_blockwise(q, absmax, code, n, dtype, si, sv, ""))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((7, 130), (1, 1000), (3, 5, 64), (40,)))
@pytest.mark.parametrize("threshold", (0.0, 2.5))
@pytest.mark.parametrize("compat", ("", "bnb"))
def test_int8_quant_kernels(emulated, dtype, shape, threshold, compat) -> None:
    A = _int8_sample(shape, dtype, seed=len(shape))
    got = emulated.int8_vectorwise_quant(A, threshold, compat)
    for g, w in zip(got, ref.int8_vectorwise_quant(A, threshold, compat)):
        assert_bitwise_equal(g, w)
    q, stats, _ = got
    assert_bitwise_equal(emulated.int8_vectorwise_dequant(q, stats), ref.int8_vectorwise_dequant(q, stats))
    if compat == "":
        for g, w in zip(emulated.int8_double_quant(A, threshold, ""), ref.int8_double_quant(A, threshold, "")):
            assert_bitwise_equal(g, w)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("compat", ("", "bnb"))
def test_int8_quant_kernel_tiny_rows(emulated, dtype, compat) -> None:
    """Rows whose absmax is below 127/FLT_MAX have scale Inf: ±127 by default, 0 for bnb (its x86 int8 cast)."""
    A = _int8_sample((9, 70), torch.float32, seed=5)
    A[::2] = torch.randn(5, 70, generator=torch.Generator().manual_seed(6)) * 1e-39
    A = A.to(dtype)
    got = emulated.int8_vectorwise_quant(A, 0.0, compat)
    for g, w in zip(got, ref.int8_vectorwise_quant(A, 0.0, compat)):
        assert_bitwise_equal(g, w)
    assert got[0][::2].abs().max() == (0 if compat else 127)


@pytest.mark.parametrize("mkn", ((1, 1, 1), (5, 3, 7), (33, 100, 9), (20, 37, 40), ((2, 3, 5), 17, 6)))
def test_int8_matmul_kernel(emulated, mkn) -> None:
    m, k, n = mkn
    lead = m if isinstance(m, tuple) else (m,)
    g = torch.Generator().manual_seed(k * 31 + n)
    A = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    A.view(-1, k)[0] = -128                                 # extreme products
    B[0] = -128
    want = (A.reshape(-1, k).long() @ B.long().t()).reshape(*lead, n).to(torch.int32)
    assert_bitwise_equal(emulated.int8_linear_matmul(A, B), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_dtype", (None, torch.float16, torch.float32))
def test_int8_mm_dequant_kernel(emulated, dtype, bias_dtype) -> None:
    g = torch.Generator().manual_seed(13)
    C = torch.randint(-(2**31), 2**31 - 1, (2, 7, 64), generator=g, dtype=torch.int32)
    row = torch.rand(14, generator=g) * 10
    col = torch.rand(64, generator=g) * 10
    row[0] = 0.0
    bias = None if bias_dtype is None else torch.randn(64, generator=g).to(bias_dtype)
    assert_bitwise_equal(emulated.int8_mm_dequant(C, row, col, bias, dtype, ""),
                         ref.int8_mm_dequant(C, row, col, bias, dtype, ""))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,tile", (("e4m3", (130, 200)), ("e5m2", (130, 200)), ("e4m3", (1, 200)),
                                      ("e5m2", (1, 128)), ("e4m3", (128, 128)), ("mxfp8-e4m3", (1, 32)),
                                      ("mxfp8-e5m2", (1, 32))), ids=str)
def test_scaled_cast_kernels(emulated, dtype, fmt, tile) -> None:
    # every tile is a 256-thread block to emulate, so 1-row tiles get fewer rows; partial tiles at
    # the right and bottom edges in every case (200 % 128, 72 % 32, 130 % 128)
    shape = (33, 72) if fmt.startswith("mx") else (33, 200) if tile[0] == 1 else (130, 200)
    x = _sample(shape, dtype, seed=17)
    x.view(-1)[:40] = 0.0                                   # a zero tile (scale 1)
    br, bc = tile
    got = emulated.quantize_scaled(x, fmt, br, bc)
    want = ref.quantize_scaled(x, fmt, br, bc)
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)
    out_dtype = DTYPES[(DTYPES.index(dtype) + 1) % 3]
    assert_bitwise_equal(emulated.dequantize_scaled(*got, br, bc, out_dtype),
                         ref.dequantize_scaled(*want, br, bc, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,tile,rule", (("mxfp4-e2m1", (1, 32), "floor"), ("mxfp6-e2m3", (1, 32), "rceil"),
                                           ("mxfp6-e3m2", (1, 32), "even"), ("nvfp4", (1, 16), "floor"),
                                           ("nvfp4", (16, 16), "floor")), ids=str)
def test_lowbit_cast_kernels(emulated, dtype, fmt, tile, rule) -> None:
    # random bit patterns (NaN/Inf tiles get a NaN scale), RNE ties of the element grid, a zero tile
    shape = (20, 72)
    x = _sample(shape, dtype, seed=19)
    x.view(-1)[:40] = 0.0
    x[5, 3], x[9, 40] = float("nan"), float("inf")
    x[12, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -2.5, 7.0, 1e-30, -1e-30,
                               0.0625, 0.1875, 20.0]).to(dtype)
    br, bc = tile
    got = emulated.quantize_scaled(x, fmt, br, bc, rule)
    want = ref.quantize_scaled(x, fmt, br, bc, rule)
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)
    gs = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
    out_dtype = DTYPES[(DTYPES.index(dtype) + 1) % 3]
    assert_bitwise_equal(emulated.dequantize_scaled(*got, br, bc, out_dtype, fmt, gs),
                         ref.dequantize_scaled(*want, br, bc, out_dtype, fmt, gs))


def test_nvfp4_dequantize_with_a_tensor_scale_per_row(emulated) -> None:
    # nvfp4-train's per-slice tensor scales ([R, 1], 1x16 tiles) dequantise on the reference (the kernel takes one
    # scale, read on the device); a single one takes the kernel
    x = _sample((6, 64), torch.float32, seed=23, specials=False)
    gs = torch.stack([ref.nvfp4_global_scale(x[i]) for i in range(6)]).reshape(6, 1)
    data, scale = ref.quantize_scaled(x, "nvfp4", 1, 16, "floor", gs)
    assert_bitwise_equal(emulated.dequantize_scaled(data, scale, 1, 16, torch.float32, "nvfp4", gs),
                         ref.dequantize_scaled(data, scale, 1, 16, torch.float32, "nvfp4", gs))
    one = gs[2].reshape(())
    data, scale = ref.quantize_scaled(x, "nvfp4", 1, 16, "floor", one)
    assert_bitwise_equal(emulated.dequantize_scaled(data, scale, 1, 16, torch.float32, "nvfp4", one),
                         ref.dequantize_scaled(data, scale, 1, 16, torch.float32, "nvfp4", one))


def test_lowbit_codes_exhaustive_on_element_grid(emulated) -> None:
    # every float32 value on and between the grid points of each element format, at scale 1
    for fmt, elem in (("mxfp4-e2m1", "e2m1"), ("mxfp6-e2m3", "e2m3"), ("mxfp6-e3m2", "e3m2")):
        vals = ref.lowbit_values(torch.arange(2 ** (1 + sum(ref.LOWBIT_ELEMENTS[elem][:2])), dtype=torch.uint8), elem)
        grid = torch.unique(torch.cat([vals, (vals[:-1] + vals[1:]) / 2]))
        x = torch.cat([grid, grid.nextafter(torch.full_like(grid, 100.0))])
        x = torch.nn.functional.pad(x, (0, -x.numel() % 32)).reshape(-1, 32)
        x[:, 0] = float(ref.SCALED_FORMATS[fmt][1])       # pins every block's scale to 1 (FLOOR)
        got = emulated.quantize_scaled(x, fmt, 1, 32)
        want = ref.quantize_scaled(x, fmt, 1, 32)
        assert bool((want[1] == 1).all())
        assert_bitwise_equal(got[0], want[0])


# ----------------------------------------------------------------------------- kernel variants
# The kernels take different paths by tile size (one lane group per small tile, thread blocks with
# atomics per large one), by pointer alignment (vector or scalar accesses), by size (32- or 64-bit
# indices) and by grid (one grid-stride step or many). Every variant must give the same bits.
VARIANTS = ("index32", "index64", "one-block", "unaligned")
TILES = ((1, 16), (1, 32), (1, 128), (16, 16), (128, 128), (3, 5), (2, 48), (1, 1), (1, 8), (1, 64), "row", "tensor")
TILE_SHAPES = ((37, 131), (5, 7, 33), (2049,))        # rows * cols odd: a partial 4-element tail


@pytest.fixture(params=VARIANTS)
def variant(request, lib, lib64, monkeypatch):
    """(backend routed to the emulator, name): "index64" disables the 32-bit index paths, "one-block"
    launches a single thread block (or tile split) so every grid-stride loop takes many steps,
    "unaligned" hands the kernels views at an odd element offset (scalar loads and stores)."""
    backend = _route(lib64 if request.param == "index64" else lib, monkeypatch)
    if request.param == "one-block":
        for cap in ("_MAX_GRID", "_CODEBOOK_GRID", "_REDUCE_GRID"):
            monkeypatch.setattr(cuda_backend, cap, 1)
    return backend, request.param


def _placed(t: torch.Tensor, variant_name: str) -> torch.Tensor:
    """t itself, or (variant "unaligned") an equal contiguous view starting one element into a buffer."""
    if variant_name != "unaligned":
        return t
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % (4 * t.element_size()) != 0   # no Pack4 access
    return out


def _tile_sample(shape, dtype, seed: int) -> torch.Tensor:
    """Seeded values with ~2.5% NaN/±Inf, fp32/fp16 subnormals and -0 scattered, a zero head and an
    all-NaN run, so small tiles are all-finite, partly or wholly non-finite, or zero."""
    return scatter_specials(_sample(shape, dtype, seed), seed)


def _tile(tile, shape) -> tuple[int, int]:
    rows, cols = ref._rows_cols(torch.Size(shape))
    return (1, cols) if tile == "row" else (rows, cols) if tile == "tensor" else tile


def _bit_amax(x: torch.Tensor, br: int, bc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile max |x| over finite values, and the bit-pattern max of |x| over all values (NaN wins)."""
    rows, cols = ref._rows_cols(x.shape)
    xt, _, _ = ref._tiles(x.reshape(rows, cols).float(), min(br, rows), min(bc, cols))
    finite = torch.where(torch.isfinite(xt), xt.abs(), 0.0).amax(dim=(1, 3))
    bits = (xt.view(torch.int32) & 0x7FFFFFFF).amax(dim=(1, 3))
    return finite, bits.view(torch.float32)


def _ntiles(tile, shape) -> int:
    rows, cols = ref._rows_cols(torch.Size(shape))
    br, bc = _tile(tile, shape)
    return -(-rows // br) * -(-cols // bc)


# the large-tile kernel runs a 256-thread block per tile: emulated only where the tiles are few
AMAX_CASES = [(tile, shape, kernel) for tile in TILES for shape in TILE_SHAPES for kernel in ("small", "large")
              if kernel == "small" or _ntiles(tile, shape) <= 128]


@pytest.mark.parametrize("tile,shape,kernel", AMAX_CASES, ids=str)
def test_tile_amax_both_kernels(variant, tile, shape, kernel) -> None:
    # the same tiles through amax_tiles_small (lane groups of 1 (1,1), 2 (1,8), 4 (1,16), (3,5), 8 (1,32),
    # 16 (1,64) and 32 lanes) and amax_tiles (blocks + atomics), both maxima in one pass
    backend, name = variant
    dtype = DTYPES[(TILES.index(tile) + TILE_SHAPES.index(shape)) % 3]
    x = _placed(_tile_sample(shape, dtype, seed=TILES.index(tile)), name)
    rows, cols = ref._rows_cols(x.shape)
    br, bc = _tile(tile, shape)
    limit = 2**62 if kernel == "small" else 0
    launches = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda_backend, "_SMALL_TILE", limit)
        inner = cuda_backend._launch
        mp.setattr(cuda_backend, "_launch", lambda *a, **k: (launches.append(a[1]), inner(*a, **k)))
        amax, amax_all = backend._tile_amax(x, rows, cols, br, bc, with_all=True)
        amax_only, none = backend._tile_amax(x, rows, cols, br, bc, with_all=False)
    assert launches == ["amax_tiles_small" if kernel == "small" else "amax_tiles"] * 2
    want, want_all = _bit_amax(x, br, bc)
    assert_bitwise_equal(amax, want)
    assert_bitwise_equal(amax_all, want_all)
    assert_bitwise_equal(amax_only, want)
    assert none is None


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=str)
@pytest.mark.parametrize("tile", TILES, ids=str)
def test_scaled_casts_every_tile(variant, shape, tile) -> None:
    # quantize + dequantize through the launchers for an fp8, an MX 4-bit and the NVFP4 path
    backend, name = variant
    br, bc = _tile(tile, shape)
    for k, fmt in enumerate(("e4m3", "mxfp4-e2m1", "nvfp4", "e5m2")):
        dtype = DTYPES[(TILES.index(tile) + k) % 3]
        x = _tile_sample(shape, dtype, seed=31 + k)
        want = ref.quantize_scaled(x, fmt, br, bc)
        got = backend.quantize_scaled(_placed(x, name), fmt, br, bc)
        for g, w in zip(got, want):
            assert_bitwise_equal(g, w)
        gs = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
        out_dtype = DTYPES[(TILES.index(tile) + k + 1) % 3]
        data = _placed(got[0], name)
        assert_bitwise_equal(backend.dequantize_scaled(data, got[1], br, bc, out_dtype, fmt, gs),
                             ref.dequantize_scaled(*want, br, bc, out_dtype, fmt, gs))


@pytest.mark.parametrize("blocksize", (32, 128, 256, 512, 1024))
def test_codebook_kernels_variants(variant, blocksize) -> None:
    # quantize_blockwise_warp (<= 512) and quantize_blockwise (1024), then the global pair and both
    # dequantisations, on an odd-length 3-D input whose last block is partial
    backend, name = variant
    code = get_codebook("dynamic")
    for dtype in DTYPES:
        A = _tile_sample((3, 7, 61), dtype, seed=blocksize)
        got = backend.quantize_blockwise(_placed(A, name), code, blocksize, "")
        for g, w in zip(got, ref.quantize_blockwise(A, code, blocksize, "")):
            assert_bitwise_equal(g, w)
        q, absmax, si, sv = got
        assert_bitwise_equal(backend.dequantize_blockwise(_placed(q, name), absmax, code, blocksize, dtype, si, sv, ""),
                             ref.dequantize_blockwise(q, absmax, code, blocksize, dtype, si, sv, ""))
        got = backend.quantize_global(_placed(A, name), code, "")
        for g, w in zip(got, ref.quantize_global(A, code, "")):
            assert_bitwise_equal(g, w)
        q, absmax, si, sv = got
        n = A.numel()
        assert_bitwise_equal(backend.dequantize_blockwise(_placed(q, name), absmax, code, n, dtype, si, sv, ""),
                             ref.dequantize_blockwise(q, absmax, code, n, dtype, si, sv, ""))


@pytest.mark.parametrize("blocksize", (64, 1024, None), ids=("warp", "block", "global"))
@pytest.mark.parametrize("where", ("none", "first", "last"))
def test_codebook_nonfinite_flag(emulated, blocksize, where) -> None:
    # the kernels' nonfinite flag decides whether the launcher gathers specials: all-finite input
    # gives none; one NaN/-Inf at either end (the last one in a partial block) is found
    code = get_codebook("bnb-e4m3")
    A = torch.randn(2 * 1024 + 37, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    if where == "first":
        A[0] = float("nan")
    elif where == "last":
        A[-1] = -float("inf")
    if blocksize is None:
        got, want = emulated.quantize_global(A, code, ""), ref.quantize_global(A, code, "")
    else:
        got, want = emulated.quantize_blockwise(A, code, blocksize, ""), ref.quantize_blockwise(A, code, blocksize, "")
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)
    assert got[2].tolist() == {"none": [], "first": [0], "last": [A.numel() - 1]}[where]


# ----------------------------------------------------------------------------- metrics.cu
SUM_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# below one summation block, one block and a partial, several blocks with a partial last one (8192 per block)
SUM_SIZES = (5, 8192 + 13, 3 * 8192 + 1000)


@pytest.fixture
def sums(emulated, monkeypatch):
    """The metrics launchers under the emulator (registered as with CuPy installed) and the C path's functions."""
    monkeypatch.setattr(cuda_backend, "_registered", True)
    from fp8probe.backends import cpu
    if not cpu.enabled():
        pytest.skip("needs the C extension (the same summation order is the contract)")
    return emulated, cpu


def _sum_pair(n: int, da: torch.dtype, db: torch.dtype, seed: int, specials: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference and a result close to it (relative noise ~1e-2, some exact zeros and underflows), optionally
    with NaN/±Inf in both at different places."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(n, generator=g, dtype=torch.float64))
    b = a * (1 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))
    b[torch.rand(n, generator=g) < 0.05] = 0.0
    a, b = a.to(da), b.to(db)
    if specials:
        a, b = scatter_specials(a, seed), scatter_specials(b, seed + 7)
    return a, b


@pytest.mark.parametrize("n", SUM_SIZES)
@pytest.mark.parametrize("da", SUM_DTYPES)
@pytest.mark.parametrize("db", SUM_DTYPES)
def test_error_sums_kernel_gives_the_c_paths_bits(sums, n, da, db) -> None:
    gpu, cpu = sums
    for specials in (False, True):
        r, q = _sum_pair(n, da, db, seed=n + 3 * specials, specials=specials)
        want = cpu.error_sums(r, q)
        got = gpu.error_sums(r, q)
        assert want is not None and got == want, (specials, got, want)
        assert all(type(v) is int for v in got[5:])
        if specials and n > 1000:
            assert got[6] > 0 and got[7] > 0       # NaN/Inf results and references both met and counted


@pytest.mark.parametrize("n", SUM_SIZES)
@pytest.mark.parametrize("dx,dq", ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                   (torch.float16, torch.float16), (torch.float64, torch.bfloat16)))
@pytest.mark.parametrize("mask", (False, True))
def test_operand_sums_kernel_gives_the_c_paths_bits(sums, n, dx, dq, mask) -> None:
    gpu, cpu = sums
    for specials in (False, True):
        x, q = _sum_pair(n, dx, dq, seed=2 * n + specials, specials=specials)
        q = torch.where(x.double().abs() > 2.0, torch.sign(x.double()) * 2.0, q.double()).to(dq)  # clipped: saturation
        sat = (x.double().abs() > 2.0) if mask else None
        want = cpu.operand_sums(x, q, sat)
        got = gpu.operand_sums(x, q, sat)
        assert want is not None and got == want, (specials, got, want)
        if n > 1000:
            assert got[5] > 0 and got[4] > 0           # saturated and underflowed elements met
        if specials and n > 1000:
            assert got[6] > 0 and got[7] > 0


def test_sums_kernels_read_views_and_short_circuit(sums, monkeypatch) -> None:
    gpu, cpu = sums
    r, q = _sum_pair(300 * 70, torch.float32, torch.float32, seed=5, specials=True)
    rt, qt = r.view(300, 70).t(), q.view(70, 300)          # a transposed view is read in its logical order
    assert gpu.error_sums(rt, qt) == cpu.error_sums(rt, qt)
    assert gpu.operand_sums(rt, qt, None) == cpu.operand_sums(rt, qt, None)
    launches = []
    monkeypatch.setattr(cuda_backend, "_launch", lambda *a, **k: launches.append(a[1]))
    assert gpu.error_sums(r[:0], q[:0]) is None                                   # empty: torch's path
    assert gpu.error_sums(r.to(torch.int32), q) is None                           # not a float dtype
    assert gpu.operand_sums(r, q, torch.zeros(r.shape, dtype=torch.uint8)) is None  # a mask that is not bool
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert gpu.error_sums(r, q) is None and gpu.operand_sums(r, q, None) is None
    monkeypatch.delenv("FP8PROBE_BACKEND")
    monkeypatch.setattr(cuda_backend, "_registered", False)                       # no CuPy
    assert gpu.error_sums(r, q) is None
    assert launches == []
    with pytest.raises(ValueError, match="same number of elements"):
        gpu.error_sums(r, q[:-1])


# ----------------------------------------------------------------------------- launcher contract
def test_other_blocksizes_and_short_circuits(emulated, monkeypatch) -> None:
    code = get_codebook("dynamic")
    A = _sample((1000,), torch.float32, seed=2)
    launches, host_launch = [], cuda_backend._launch
    monkeypatch.setattr(cuda_backend, "_launch", lambda *a, **k: launches.append(a[1]))
    for bs in (4, 16, 100, 8192):  # not a kernel blocksize: the reference runs (on the GPU tensors), no launch
        for g, w in zip(emulated.quantize_blockwise(A, code, bs, ""), ref.quantize_blockwise(A, code, bs, "")):
            assert_bitwise_equal(g, w)
    assert launches == []
    emulated.quantize_blockwise(A, code, 64, "")
    emulated.quantize_blockwise(A, code, 512, "")
    emulated.quantize_blockwise(A, code, 1024, "")
    assert launches == ["quantize_blockwise_warp"] * 2 + ["quantize_blockwise"]   # a warp per block up to 512
    monkeypatch.setattr(cuda_backend, "_launch", host_launch)
    q, absmax, si, sv = emulated.quantize_blockwise(torch.empty(0, 3), code, 64, "")
    assert q.shape == (0, 3) and absmax.shape == (0,) and si.numel() == 0 and sv.numel() == 0
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")            # any blocksize on the reference
    for g, w in zip(emulated.quantize_blockwise(A, code, 100, ""), ref.quantize_blockwise(A, code, 100, "")):
        assert_bitwise_equal(g, w)


@pytest.mark.parametrize("env,registered", (("", True), ("reference", False)))
def test_registration_follows_the_environment(env, registered) -> None:
    import importlib.util
    import os
    import sys

    if registered and importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy not installed: nothing is registered")
    code = ("import sys, fp8probe.ops, fp8probe.backends.cuda as c; "
            "assert c._registered is %r, c._registered; assert 'cupy' not in sys.modules" % registered)
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FP8PROBE_BACKEND": env},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in `cupy` module (no GPU here; tests/test_cuda_backend.py runs the real one): Device contexts and
    ExternalStreams that record what they were made with, ExternalStream warning as CuPy 14's does. Yields
    (the module, the ExternalStreams made, the device indices entered); _cupy_stream's cache starts empty."""
    import sys
    import types
    import warnings

    made, entered = [], []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)

        def __exit__(self, *exc):
            return False

    class ExternalStream:
        def __init__(self, ptr, index):
            warnings.warn("ExternalStream is deprecated", DeprecationWarning)
            self.ptr, self.index = ptr, index
            made.append((ptr, index))

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cuda_backend._cupy_stream.cache_clear()
    try:
        yield fake, made, entered
    finally:
        cuda_backend._cupy_stream.cache_clear()


def test_cupy_stream_is_made_once_per_torch_stream_without_warnings(fake_cupy) -> None:
    """The launcher wraps torch's stream in a CuPy ExternalStream once per (handle, device), not at every launch,
    and CuPy 14's DeprecationWarning for ExternalStream does not reach the user."""
    import warnings

    _, made, _ = fake_cupy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = cuda_backend._cupy_stream(0x1234, 0)
        assert cuda_backend._cupy_stream(0x1234, 0) is first
        assert cuda_backend._cupy_stream(0x1234, 1) is not first
    assert made == [(0x1234, 0), (0x1234, 1)]


def test_launch_passes_device_addresses_and_torchs_stream(fake_cupy, monkeypatch) -> None:
    """_launch hands CuPy each tensor as its 8-byte device address (np.uint64: CuPy copies a NumPy scalar's bytes
    into the kernel's parameter) and scalars as given, on CuPy's view of torch's current stream, inside the
    tensor's device context."""
    import types

    import fp8probe.kernels as kernels

    _, _, entered = fake_cupy
    calls = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=0xBEEF))
    monkeypatch.setattr(kernels, "get_function",
                        lambda file, expr: lambda grid, block, args, stream=None: calls.append(
                            (file, expr, grid, block, args, stream)))
    x = torch.arange(6, dtype=torch.bfloat16)
    out = torch.empty(6, dtype=torch.uint8)
    cuda_backend._launch("scaled_cast", "cast_to_fp8", (3,), (256,), (x, out, np.int64(6), np.int32(0)),
                         torch.device("cuda", 1), torch.bfloat16)
    (file, expr, grid, block, args, stream), = calls
    assert (file, expr, grid, block, entered) == ("scaled_cast", "cast_to_fp8<bf16_t>", (3,), (256,), [1])
    assert [type(a) for a in args] == [np.uint64, np.uint64, np.int64, np.int32]
    assert [int(a) for a in args] == [x.data_ptr(), out.data_ptr(), 6, 0]
    assert (stream.ptr, stream.index) == (0xBEEF, 1)
