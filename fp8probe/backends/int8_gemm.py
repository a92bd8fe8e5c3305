"""Exact int8 × int8 → int32 GEMM on CPU by the fastest exact method this CPU has, chosen at run time.

Three methods give bit-identical int32 results (every one is exact, so the choice is speed alone):

* ``int_mm``: ``torch._int_mm``. Fast where oneDNN has int8 instructions (AVX-512 VNNI, AMX-INT8);
  on an AVX2-only AMD EPYC it measured 10-40x slower than a float32 GEMM of the same values
  (1024³: 340 ms vs 12 ms).
* ``f32``: float32 GEMMs over contraction chunks of at most ``F32_EXACT_K`` = 1024, each chunk's
  result converted to int32 and summed in int32. Exact: an int8 product is at most 128·128 = 2**14
  in magnitude, so any partial sum of ≤ 1024 of them is an integer of magnitude ≤ 2**24, which
  float32 represents exactly whatever order (or FMA) the BLAS uses.
* ``f64``: one float64 GEMM. Exact while K·2**14 < 2**53 (K < 5.4e11).

The int32 sum wraps like ``_int_mm`` would once |C| reaches 2**31 (K ≥ 131072 with -128·-128
everywhere); callers that must not wrap check K first (functional.int8_linear_matmul).

The method is chosen once per process by timing all three on one small problem (128×512 · 512×256) — CPU features alone do not say how fast oneDNN's int8 path is on a given CPU.
``FP8PROBE_INT8_GEMM=int_mm|f32|f64`` forces one (benchmarks and tests use it).
"""
from __future__ import annotations

import functools
import os
import time

import torch

#: Longest contraction chunk whose float32 partial sums of int8 products stay exact (1024·2**14 = 2**24).
F32_EXACT_K = 1024
METHODS = ("int_mm", "f32", "f64")
_ENV = "FP8PROBE_INT8_GEMM"


def int_mm_or_none(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """torch._int_mm(a, bᵀ), or None where the build/shape refuses it (and for K == 1, where torch
    2.13's CPU _int_mm returned garbage with N > 1 in our tests)."""
    if a.shape[1] < 2:
        return None
    try:
        # b.t() of a row-major b is the column-major [K, N] operand _int_mm takes without a copy.
        return torch._int_mm(a.contiguous(), b.contiguous().t())
    except (RuntimeError, NotImplementedError):
        return None


def _f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    K = a.shape[1]
    af, bf = a.to(torch.float32), b.to(torch.float32)
    if K <= F32_EXACT_K:
        return (af @ bf.t()).to(torch.int32)
    out = None
    for k0 in range(0, K, F32_EXACT_K):
        part = (af[:, k0:k0 + F32_EXACT_K] @ bf[:, k0:k0 + F32_EXACT_K].t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def _f64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 → int64 → int32: the int32 cast of an int64 wraps like int32 accumulation would.
    return (a.to(torch.float64) @ b.to(torch.float64).t()).to(torch.int64).to(torch.int32)


_IMPL = {"f32": _f32, "f64": _f64}


@functools.lru_cache(maxsize=1)
def calibrated_method() -> str:
    """The fastest of METHODS on this CPU, timed on one 128×512 · 512×256 product.

    Rounds interleave the methods and each keeps its best time, so a burst of load from other
    processes slows one sample, not one method's verdict; a method 20× slower than the best after a
    round is not timed again (an AVX2-only CPU's _int_mm ran ~1 GOP/s against ~80 for float32:
    ~30 ms a call). Measured: ~0.2 s once per process on an AVX2-only EPYC (most of it _int_mm).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (128, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (256, 512), dtype=torch.int8, generator=gen)
    runs = {"int_mm": lambda: int_mm_or_none(a, b), "f32": lambda: _f32(a, b), "f64": lambda: _f64(a, b)}
    if runs["int_mm"]() is None:  # _int_mm unavailable in this build; the call also warms each method up
        del runs["int_mm"]
    # One thread: a multi-threaded GEMM on a loaded machine waits for its slowest thread's time
    # slice (samples of 16-64 ms for a 0.5 ms product were seen under load); the ranking of the
    # methods is a property of the instructions, which one thread shows.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in runs.values():
            fn()
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(5):
            for name in list(runs):
                t0 = time.perf_counter()
                runs[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
            fastest = min(best.values())
            for name in list(runs):
                if best[name] > 20 * fastest:
                    del runs[name]
    finally:
        torch.set_num_threads(threads)
    return min(best, key=best.get)


def method() -> str:
    """The method CPU calls use now: ``FP8PROBE_INT8_GEMM`` when set, else the calibrated one."""
    forced = os.environ.get(_ENV, "").strip()
    if forced:
        if forced not in METHODS:
            raise ValueError(f"{_ENV} must be one of {', '.join(METHODS)}, got {forced!r}")
        return forced
    return calibrated_method()


#: Longest contraction int8_gemm_float takes: two exact chunks, whose one float32 addition rounds their
#: exact integer sum (|sum| <= 2**25, no int32 wrap) once, as the int32 → float32 conversion would.
F32_FLOAT_MAX_K = 2 * F32_EXACT_K


def int8_gemm_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``float32(int8_gemm(a, b))`` without the int32 tensor: the RNE float32 of each exact int32 entry of
    ``a @ bᵀ``, what an int32 → float32 dequantisation reads first (int8_mm_dequant).

    a int8 [M, K], b int8 [N, K] (CPU, non-empty, any strides: the float32 copies keep them and the GEMM
    takes transposed operands, so ``Cᵀ`` operands need no int8 transpose copy) → float32 [M, N]. None
    unless the f32 method is the one in use (elsewhere another method is faster) and K <=
    F32_FLOAT_MAX_K. Exact: a chunk of <= 1024 products is an exact float32 integer (module docstring),
    so K <= 1024 gives the integer itself (|C| <= 2**24, which float32 holds); two chunks are added once
    in float32, which rounds their exact sum to nearest even, the conversion of the int32 sum.
    """
    K = a.shape[1]
    if K > F32_FLOAT_MAX_K or method() != "f32":
        return None
    af, bf = a.to(torch.float32), b.to(torch.float32)
    if K <= F32_EXACT_K:
        return af @ bf.t()
    return (af[:, :F32_EXACT_K] @ bf[:, :F32_EXACT_K].t()).add_(af[:, F32_EXACT_K:] @ bf[:, F32_EXACT_K:].t())


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ bᵀ`` as int32: a int8 [M, K], b int8 [N, K] (CPU, non-empty) → int32 [M, N]."""
    name = method()
    if name == "int_mm":
        c = int_mm_or_none(a, b)
        if c is not None:
            return c
        name = "f64"
    return _IMPL[name](a, b)
