"""Importable test helpers (not fixtures): the device list and the bnb reference-vector location.

Kept out of conftest.py because tests/analysis has a conftest of its own, and `from conftest import`
would resolve to whichever conftest module was imported first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

#: The C fast path's serial cutoff while a test runs (conftest): the tests' "threaded" inputs are sized just
#: above 64K elements (the shipped cutoff is 512K: _fastpath.c SERIAL_CUTOFF), so that every split of the work
#: over threads is checked against the reference without 16x larger tensors.
TEST_SERIAL_CUTOFF = 1 << 16

#: "cpu" always, plus "cuda" when a GPU is visible; parametrise device-dependent tests over it.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_REPO = Path(__file__).resolve().parents[1]
#: bitsandbytes 0.49.2 reference vectors (shared/vectors/README.md); FP8PROBE_VECTORS overrides.
VECTORS_DIR = (
    Path(os.environ["FP8PROBE_VECTORS"]) if os.environ.get("FP8PROBE_VECTORS") else _REPO / "tests" / "data" / "bnb_vectors"
)


def vectors_file(name: str) -> Path:
    """Path of a reference-vector file (committed under tests/data/bnb_vectors)."""
    path = VECTORS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"reference vectors not found at {path} (set FP8PROBE_VECTORS or restore tests/data/bnb_vectors)")
    return path


def cpu_loops(simd: bool, monkeypatch):
    """Generator body of a fixture running a test on the C fast path's AVX2 loops (``simd``, where the CPU has
    them) or its scalar loops; skips where the extension is not built and restores AVX2 afterwards. Yields the
    loops in use ("avx2" or "scalar")."""
    import pytest

    from fp8probe.backends import cpu

    if not cpu.available():
        pytest.skip("fp8probe._fastpath not built")
    monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)
    ext = cpu._ext()
    ext.set_simd(simd)
    yield ext.simd()
    ext.set_simd(True)


#: integer views of the float dtypes, for bit-for-bit comparisons
FLOAT_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of t (uint8 codes of FP8, int16/int32 of floats; other dtypes as they are)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return t.view(torch.uint8)
    return t.view(FLOAT_BITS[t.dtype]) if t.dtype in FLOAT_BITS else t


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same dtype, shape and bit patterns (NaN payloads and signed zeros included)."""
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(raw(got), raw(want))


def scatter_specials(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x (any float dtype) with ~2.5% NaN/±Inf, fp32/fp16 subnormals and -0 scattered at seeded positions, a zero
    head and an all-NaN run, so small tiles come out all-finite, partly or wholly non-finite, or zero."""
    dtype = x.dtype
    x = x.float()  # a copy: the caller's tensor is not changed
    flat = x.view(-1)
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.randperm(flat.numel(), generator=g)[: max(8, flat.numel() // 40)]
    sub = 3 * 2.0**-24 if dtype == torch.float16 else 1e-40
    for k, v in enumerate((float("nan"), float("inf"), -float("inf"), sub, -sub, -0.0)):
        flat[pos[k::6]] = v
    flat[:40] = 0.0
    flat[200:232] = float("nan")
    return x.to(dtype)


def forbid_full_copies(monkeypatch) -> list:
    """Make backends.cpu.contiguous fail the test when it is asked to copy a non-contiguous tensor (the full-size
    copy a transposed view used to get before a C pass); returns the list of the shapes it was asked to copy."""
    from fp8probe.backends import cpu

    copied: list = []
    real = cpu.contiguous

    def spy(x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            copied.append(tuple(x.shape))
            raise AssertionError(f"a full copy of a {list(x.shape)} view")
        return real(x)
    monkeypatch.setattr(cpu, "contiguous", spy)
    return copied
