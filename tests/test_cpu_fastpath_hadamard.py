"""The random Hadamard transform in C (fp8probe/_fastpath.c, "random Hadamard transform"; cpu.hadamard_transform,
functional.hadamard_transform on eager CPU tensors) against reference.hadamard_transform, bit for bit: shapes with
and without padding, batched [Bt, R, C], transposed views (x.mT contiguous, read in place), every dtype, NaN/±Inf,
zeros, subnormals and huge values (sums that overflow), seeds and no signs, the AVX2 and the scalar loops (the
``isa`` fixture), 1 and 2 threads."""
from __future__ import annotations

import pytest
import torch

from fp8probe import functional as F
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from support import raw, same_bits

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REF = ref.hadamard_transform


def values(shape: tuple[int, ...], seed: int, dtype: torch.dtype, specials: bool) -> torch.Tensor:
    """Fresh seeded values of many exponents; with ``specials`` NaN (several payloads, both signs), ±Inf, ±0,
    subnormals and values near the dtype's max (so a butterfly sum overflows) scattered in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())
    if specials:
        flat = x.view(-1)
        n = flat.numel()
        pos = torch.randperm(n, generator=g)
        big = torch.finfo(dtype).max
        sub = {torch.float32: 1e-42, torch.float16: 3e-7, torch.bfloat16: 1e-40}[dtype]
        vals = [float("inf"), -float("inf"), 0.0, -0.0, sub, -sub, big, big, -big]
        for i, v in enumerate(vals):
            flat[pos[i::len(vals) * 5][: max(1, n // 60)]] = v
        x = x.to(dtype)
        nans = pos[len(vals)::23][: max(2, n // 40)]
        bits = raw(x).view(-1)
        pay = {torch.float32: (0x7FC00001, -0x3FF00000, 0x7F800123, 0x7FFFFFFF),  # quiet, -quiet, signalling, all ones
               torch.float16: (0x7E01, -0x01FF, 0x7C07, 0x7FFF),
               torch.bfloat16: (0x7FC1, -0x003F, 0x7F81, 0x7FFF)}[dtype]
        for i, p in enumerate(nans.tolist()):
            bits[p] = pay[i % len(pay)]
        return x
    return x.to(dtype)


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Same bits; float16 NaNs compared as NaNs (torch's own float16 -> float32 conversion gives a NaN's payload
    one way in its vector body and another in its tail, so the reference's payload depends on the position)."""
    if dtype == torch.float16:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        got, want = torch.where(nan, 0.0, got), torch.where(nan, 0.0, want)
    assert same_bits(got, want)


SHAPES = ((8, 16), (24, 256), (13, 48), (9, 37), (3, 5), (1, 16), (7,), (2, 3, 40), (3, 17, 64))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("specials", (False, True), ids=("finite", "specials"))
def test_hadamard_is_the_reference(isa, shape, dtype: torch.dtype, specials: bool) -> None:
    x = values(shape, seed=sum(shape) + DTYPES.index(dtype), dtype=dtype, specials=specials)
    for seed in (0, 12345, None):
        check(cpu.hadamard_transform(x, seed), _REF(x, seed), dtype)
    if x.dim() >= 2 and x.shape[-2] > 1:  # a transposed view, read in place
        xt = x.mT.contiguous().mT
        assert not xt.is_contiguous()
        check(cpu.hadamard_transform(xt, 7), _REF(x, 7), dtype)


@pytest.mark.parametrize("n", (4, 64, 256))
def test_other_run_lengths(isa, n: int) -> None:
    x = values((11, 3 * n - 5), seed=n, dtype=torch.float32, specials=True)
    check(cpu.hadamard_transform(x, 3, n), _REF(x, 3, n), torch.float32)
    check(cpu.hadamard_transform(x.T.contiguous().T, 3, n), _REF(x, 3, n), torch.float32)


@pytest.mark.parametrize("threads", (1, 2))
def test_threads_and_large_inputs(isa, threads: int, monkeypatch) -> None:
    """Inputs split over units (rows of several units, a last short unit) on 1 and 2 threads; contiguous and
    transposed float32 and bfloat16."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for dtype in (torch.float32, torch.bfloat16):
        x = values((1030, 272), seed=threads, dtype=dtype, specials=True)
        check(cpu.hadamard_transform(x, 1), _REF(x, 1), dtype)
        check(cpu.hadamard_transform(x.T.contiguous().T, 1), _REF(x, 1), dtype)
        check(cpu.hadamard_transform(x.T.contiguous(), 1), _REF(x.T.contiguous(), 1), dtype)


def test_functional_routes_eager_cpu_calls_to_c(monkeypatch) -> None:
    """functional.hadamard_transform runs the C pass on eager CPU tensors (the wgrad operands Gᵀ, Aᵀ: transposed
    views), the torch ops with autograd tracking and with FP8PROBE_BACKEND=reference; the same bits every way."""
    x = values((64, 48), seed=5, dtype=torch.float32, specials=False)
    calls = []
    real = cpu._ext().hadamard
    monkeypatch.setattr(cpu, "_ext", lambda: type("E", (), {"hadamard": staticmethod(
        lambda *a: (calls.append(a), real(*a))[1])})())
    got = F.hadamard_transform(x.mT, 3)
    assert len(calls) == 1 and calls[0][9] is True and same_bits(got, _REF(x.mT, 3))
    xg = x.clone().requires_grad_()
    y = F.hadamard_transform(xg, 3)
    assert len(calls) == 1 and y.requires_grad and same_bits(y.detach(), _REF(x, 3))
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert same_bits(F.hadamard_transform(x, 3), _REF(x, 3)) and len(calls) == 1


def test_bad_sizes_keep_the_reference_errors() -> None:
    with pytest.raises(ValueError):
        cpu.hadamard_transform(torch.randn(4, 8), 0, 8)  # not a power of four
    with pytest.raises(ValueError):
        F.hadamard_transform(torch.tensor(1.0))
    assert same_bits(cpu.hadamard_transform(torch.empty(0, 16)), _REF(torch.empty(0, 16)))
