"""Shared pytest fixtures: a `device` fixture over every available device and an `isa` fixture over the C fast
path's AVX2 and scalar loops, `no_fallback` for the scaled-cast kernel tests, and (for every test) the C fast
path's threads from 64K elements on (helpers live in support.py)."""
from __future__ import annotations

import pytest

from support import DEVICES, TEST_SERIAL_CUTOFF, cpu_loops


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn ("cpu", and "cuda" with a GPU)."""
    return request.param


@pytest.fixture(params=["simd", "scalar"])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Run the test once with the C fast path's AVX2 loops (where the CPU has them) and once with its scalar
    loops (skipped where the extension is not built); yields "avx2" or "scalar"."""
    yield from cpu_loops(request.param == "simd", monkeypatch)


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any fallback of the C scaled casts to the PyTorch reference fail the test."""
    from fp8probe.backends import cpu

    def boom(*args, **kwargs):
        raise AssertionError("the C kernel fell back to the reference")
    monkeypatch.setattr(cpu._ref, "quantize_scaled", boom)
    monkeypatch.setattr(cpu._ref, "dequantize_scaled", boom)


@pytest.fixture(autouse=True)
def _threads_from_64k():
    """Every test runs the C calls of 64K elements and more on several threads (TEST_SERIAL_CUTOFF)."""
    from fp8probe.backends import cpu

    if not cpu.available():
        yield
        return
    before = cpu._ext().serial_cutoff(TEST_SERIAL_CUTOFF)
    try:
        yield
    finally:
        cpu._ext().serial_cutoff(before)
