"""backends/int8_gemm.py: every exact int8 GEMM method gives the same int32 bits as an int64 oracle."""
from __future__ import annotations

import pytest
import torch

import fp8probe.functional as F
from fp8probe.backends import int8_gemm as G


def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int64 product summed exactly (no float), then wrapped to int32 the way int32 accumulation wraps."""
    c = (a.to(torch.int64)[:, None, :] * b.to(torch.int64)[None, :, :]).sum(-1)
    return c.to(torch.int32)


def rand_int8(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


# K around the float32 chunk (1023/1024/1025), several chunks with a ragged tail (2049, 3000), K = 1.
SHAPES = [(1, 1, 1), (5, 1, 7), (3, 17, 2), (17, 1023, 9), (8, 1024, 16), (9, 1025, 5), (4, 2049, 3), (2, 3000, 6)]


@pytest.mark.parametrize("method", G.METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_method_is_exact(method: str, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    M, K, N = shape
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", method)
    a, b = rand_int8((M, K), 1 + K), rand_int8((N, K), 2 + K)
    assert torch.equal(G.int8_gemm(a, b), oracle(a, b))


@pytest.mark.parametrize("method", G.METHODS)
def test_extreme_products_at_the_float32_limit(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """-128·-128 summed 1024 times is exactly 2**24 per chunk (the largest exact float32 partial sum)
    and 4 chunks give 2**26: a chunk one longer would round in float32."""
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", method)
    a = torch.full((3, 4096), -128, dtype=torch.int8)
    b = torch.full((2, 4096), -128, dtype=torch.int8)
    b[1, ::2] = 127
    b[1, 1::2] = 1  # an odd total, so a rounding float path would show
    c = G.int8_gemm(a, b)
    assert torch.equal(c, oracle(a, b))
    assert c[0, 0].item() == 2 ** 26


def test_public_op_uses_the_chosen_method_bit_identically(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = rand_int8((2, 3, 1500), 5), rand_int8((40, 1500), 6)
    results = []
    for method in G.METHODS:
        monkeypatch.setenv("FP8PROBE_INT8_GEMM", method)
        results.append(F.int8_linear_matmul(a, b))
    want = oracle(a.reshape(6, 1500), b).reshape(2, 3, 40)
    for got in results:
        assert got.dtype == torch.int32 and torch.equal(got, want)


def test_calibration_picks_a_known_method_and_env_override_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FP8PROBE_INT8_GEMM", raising=False)
    assert G.calibrated_method() in G.METHODS
    assert G.method() == G.calibrated_method()
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "fast")
    with pytest.raises(ValueError, match="FP8PROBE_INT8_GEMM must be one of int_mm, f32, f64, got 'fast'"):
        G.method()


# K at and around the exact chunk (1024) and the two-chunk limit (2048) of int8_gemm_float
FLOAT_SHAPES = [(3, 1, 2), (17, 1023, 9), (8, 1024, 16), (9, 1025, 5), (4, 2047, 3), (2, 2048, 6)]


@pytest.mark.parametrize("shape", FLOAT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_float_is_the_int32_product_converted(shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """int8_gemm_float = float32(exact int32 product), also for transposed (non-contiguous) operands."""
    M, K, N = shape
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f32")
    a, b = rand_int8((M, K), 3 + K), rand_int8((N, K), 4 + K)
    want = oracle(a, b).to(torch.float32)
    got = G.int8_gemm_float(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    at, bt = a.t().contiguous().t(), b.t().contiguous().t()  # same values, column-major
    assert (K == 1 or not at.is_contiguous()) and torch.equal(G.int8_gemm_float(at, bt), want)


def test_gemm_float_rounds_a_two_chunk_sum_like_the_int32_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sums in [2**24, 2**25) are float32 values only when even: the two chunks' one float32 addition must
    round an odd sum exactly as float32(int32) does (a tie, to even: up for sums ≡ 3 mod 4, down for 1)."""
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f32")
    a = torch.full((2, 2048), -128, dtype=torch.int8)
    b = torch.full((3, 2048), -128, dtype=torch.int8)
    a[:, 2047] = 1
    b[:, 2047] = torch.tensor([-127, -125, -128], dtype=torch.int8)  # sums 2**25 - 2**14 - {127, 125, 128}
    exact = oracle(a, b)
    got = G.int8_gemm_float(a, b)
    assert torch.equal(got, exact.to(torch.float32))
    assert [int(v) % 4 for v in exact[0]] == [1, 3, 0]
    assert float(got[0, 0]) == int(exact[0, 0]) - 1 and float(got[0, 1]) == int(exact[0, 1]) + 1


def test_gemm_float_declines_other_methods_and_long_contractions(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = rand_int8((2, 2049), 7), rand_int8((3, 2049), 8)
    monkeypatch.setenv("FP8PROBE_INT8_GEMM", "f32")
    assert G.int8_gemm_float(a, b) is None
    for method in ("int_mm", "f64"):
        monkeypatch.setenv("FP8PROBE_INT8_GEMM", method)
        assert G.int8_gemm_float(a[:, :100], b[:, :100]) is None
