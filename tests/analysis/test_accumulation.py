"""Simulated limited-precision accumulation: bit-exact against a slow hand loop, error growth with K, use in the FP8 recipes."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from fp8probe.analysis.accumulation import Accumulation, matmul_limited, truncate_mantissa
from fp8probe.analysis.e2e import lp_gemm
from fp8probe.analysis.strategies import STRATEGIES, RecipeOptions, mixed_with_blocksize, run_strategy, with_options
from support import DEVICES


def _trunc(x: float, bits: int) -> float:
    """Python float truncated toward zero to ``bits`` fraction bits, through its IEEE bit pattern."""
    (u,) = struct.unpack("<Q", struct.pack("<d", x))
    u &= ~((1 << (52 - bits)) - 1) & 0xFFFFFFFFFFFFFFFF
    return struct.unpack("<d", struct.pack("<Q", u))[0]


def _hand(a: torch.Tensor, b: torch.Tensor, bits: int, nc: int) -> np.ndarray:
    """The rule of Accumulation, element by element in Python floats and numpy float32."""
    A, B = a.double().tolist(), b.double().tolist()
    out = np.zeros((len(A), len(B)), dtype=np.float32)
    K = len(A[0])
    for i, row in enumerate(A):
        for j, col in enumerate(B):
            acc = np.float32(0.0)
            for start in range(0, K, nc):
                partial = 0.0
                for k in range(start, min(start + nc, K)):
                    partial = _trunc(partial + row[k] * col[k], bits)
                acc = np.float32(acc + np.float32(partial))
            out[i, j] = acc
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,nc,K", [(7, 8, 37), (13, 16, 64), (23, 5, 11), (1, 3, 10)])
def test_bit_exact_with_hand_loop(device, bits, nc, K) -> None:
    g = torch.Generator().manual_seed(bits * 100 + K)
    a = torch.randn(3, K, generator=g) * torch.logspace(-3, 3, K)  # mixed magnitudes: truncation matters
    b = torch.randn(4, K, generator=g)
    got = matmul_limited(a.to(device), b.to(device), Accumulation(bits, nc)).cpu()
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    want = torch.from_numpy(_hand(a, b, bits, nc))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # and it is not plain float32 accumulation (the test would pass a wrong implementation otherwise)
    assert not torch.equal(got, a @ b.T)


def test_truncation_is_toward_zero_for_both_signs() -> None:
    x = torch.tensor([1 + 2 ** -3 + 2 ** -20, -(1 + 2 ** -3 + 2 ** -20), 0.0, -0.0], dtype=torch.float64)
    t = truncate_mantissa(x, 4)
    assert t.tolist() == [1.125, -1.125, 0.0, -0.0]
    assert torch.isnan(truncate_mantissa(torch.tensor([float("nan")], dtype=torch.float64), 1)).all()
    with pytest.raises(TypeError, match="expected a float64 tensor"):
        truncate_mantissa(torch.ones(2), 4)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


def test_error_grows_with_k_only_when_accumulation_is_limited() -> None:
    """Positive sums (the worst case for truncation): without promotion the relative error grows with K
    (the partial sum's ulp grows while the addends do not); float32 and promotion every 128 do not."""
    g = torch.Generator().manual_seed(0)
    errs = {}
    for K in (256, 4096):
        a, b = torch.rand(4, K, generator=g), torch.rand(4, K, generator=g)
        ref = a.double() @ b.double().T
        errs[K] = (_rel(a @ b.T, ref), _rel(matmul_limited(a, b, Accumulation(13, 1 << 30)), ref),
                   _rel(matmul_limited(a, b, Accumulation(13, 128)), ref))
    fp32, unpromoted, promoted = zip(errs[256], errs[4096])
    assert max(fp32) < 1e-6
    assert unpromoted[1] > 8 * unpromoted[0] and unpromoted[1] > 0.05
    assert promoted[1] < 1.5 * promoted[0] and promoted[1] < 0.01


@pytest.mark.parametrize("bits,nc,match", [(0, 128, "mantissa_bits"), (24, 128, "mantissa_bits"), (True, 128, "mantissa_bits"),
                                           (13, 0, "promote_every"), (13, 2.0, "promote_every")])
def test_bad_settings_raise(bits, nc, match) -> None:
    with pytest.raises(ValueError, match=f"expected {match}"):
        Accumulation(bits, nc)


def test_matmul_limited_checks_shapes() -> None:
    with pytest.raises(ValueError, match="expected a"):
        matmul_limited(torch.ones(2, 3), torch.ones(2, 4), Accumulation(10))
    with pytest.raises(TypeError, match="expected an Accumulation"):
        matmul_limited(torch.ones(2, 3), torch.ones(2, 3), None)


@pytest.mark.parametrize("name", ["ocp-tensorwise", "ocp-blockwise", "mxfp8", "delayed"])
def test_fp8_recipes_use_the_accumulator_in_every_gemm(name) -> None:
    g = torch.Generator().manual_seed(1)
    A, W, G = torch.randn(6, 40, generator=g), torch.randn(5, 40, generator=g), torch.randn(6, 5, generator=g)
    acc = Accumulation(9, 16)
    base, = with_options([STRATEGIES[name]], None)
    limited, = with_options([STRATEGIES[name]], RecipeOptions(accumulation=acc))
    assert "truncated toward zero to 9 mantissa bits" in limited.rules and "mantissa bits" not in base.rules
    exact = run_strategy(base, A, W, G)
    lim = run_strategy(limited, A, W, G)
    qA, qW, qG = (lim.operands[k][1] for k in ("activation", "weight", "grad_output"))
    # Same quantised operands; the GEMMs are the simulated accumulator's, bit for bit.
    for k in ("activation", "weight", "grad_output"):
        assert torch.equal(exact.operands[k][1], lim.operands[k][1])
    assert torch.equal(lim.gemms["fprop"], matmul_limited(qA, qW, acc))
    assert torch.equal(exact.gemms["fprop"], qA @ qW.T)
    if name in ("ocp-tensorwise", "delayed"):  # one scale per tensor: the transposed casts are the same values
        assert torch.equal(lim.gemms["dgrad"], matmul_limited(qG, qW.T, acc))
        assert torch.equal(lim.gemms["wgrad"], matmul_limited(qG.T, qA.T, acc))
    # In a model (end-to-end mode) the forward is the same simulated GEMM.
    y = lp_gemm(limited, A, W, 6.0, site="fc")
    assert torch.equal(y.detach(), lim.gemms["fprop"])


@pytest.mark.parametrize("name", ["global", "mixed", "mixed bs=64"])
def test_bnb_codebook_recipes_use_the_accumulator(name) -> None:
    g = torch.Generator().manual_seed(2)
    A, W, G = torch.randn(6, 40, generator=g), torch.randn(5, 40, generator=g), torch.randn(6, 5, generator=g)
    acc = Accumulation(9, 16)
    base_s = mixed_with_blocksize(64) if name == "mixed bs=64" else STRATEGIES[name]
    limited, = with_options([base_s], RecipeOptions(accumulation=acc))
    assert limited.name == base_s.name and "truncated toward zero to 9 mantissa bits" in limited.rules
    base, lim = run_strategy(base_s, A, W, G), run_strategy(limited, A, W, G)
    for k in ("activation", "weight", "grad_output"):  # the autograd functions' own fake-quantised operands
        assert torch.equal(base.operands[k][1], lim.operands[k][1]), k
    qA, qW, qG = (lim.operands[k][1] for k in ("activation", "weight", "grad_output"))
    assert torch.equal(lim.gemms["fprop"], matmul_limited(qA, qW, acc))
    # without the option: the autograd function's float32 matmul of the same operands
    assert torch.allclose(base.gemms["fprop"], qA @ qW.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.gemms["fprop"], lim.gemms["fprop"], rtol=1e-5, atol=1e-5)
    assert torch.equal(lim.gemms["dgrad"], matmul_limited(qG, qW.T, acc))
    if name == "global":
        assert torch.equal(lim.gemms["wgrad"], matmul_limited(qG.T, qA.T, acc))
    else:  # MatMulFP8Mixed computes wgrad unquantised: nothing FP8 to accumulate
        assert lim.gemms["wgrad"].shape == base.gemms["wgrad"].shape == W.shape
        assert torch.allclose(lim.gemms["wgrad"], base.gemms["wgrad"], rtol=1e-5, atol=1e-5)
    y = lp_gemm(limited, A, W, 6.0, site="fc")
    assert torch.equal(y.detach(), lim.gemms["fprop"])


def test_int8_recipes_are_unaffected() -> None:
    opts = RecipeOptions(accumulation=Accumulation(9, 16))
    g = torch.Generator().manual_seed(3)
    A, W = torch.randn(6, 40, generator=g), torch.randn(5, 40, generator=g)
    for name in ("int8", "switchback"):  # exact int32 accumulation: nothing to simulate
        s, = with_options([STRATEGIES[name]], opts)
        assert "mantissa bits" not in s.rules
        assert torch.equal(run_strategy(s, A, W, None).gemms["fprop"], run_strategy(STRATEGIES[name], A, W, None).gemms["fprop"])
