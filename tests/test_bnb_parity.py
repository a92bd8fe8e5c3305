"""bitsandbytes 0.49.2 calling conventions the core API accepts (issue 14): int8 weights as B, `out=` of
int8_linear_matmul, every codebook bnb builds, int8 weight storage of Linear8bitLt.

Comparisons with live bitsandbytes run only where it is importable (the `test` extra installs it).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fp8probe as P
import fp8probe.functional as F

warnings.filterwarnings("ignore", module="bitsandbytes")


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _int8_state(out_f: int, in_f: int, seed: int) -> P.MatmulLtState:
    g = torch.Generator().manual_seed(seed)
    s = P.MatmulLtState(has_fp16_weights=False)
    s.CB, s.SCB, _ = P.int8_vectorwise_quant(torch.randn(out_f, in_f, generator=g).half())
    return s


# ------------------------------------------------------------------ item 1: int8 B
@pytest.mark.parametrize("fn", [P.matmul, P.switchback_bnb], ids=["matmul", "switchback_bnb"])
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_int8_weight_as_B_equals_float_weight_path(fn, threshold: float) -> None:
    g = torch.Generator().manual_seed(3)
    s = _int8_state(48, 32, 1)
    s.threshold = threshold
    A = torch.randn(2, 4, 32, generator=g)
    y = fn(A, s.CB, state=s)
    # the same int8 weight reached from its float source: identical result
    s_ref = P.MatmulLtState(has_fp16_weights=False, threshold=threshold, CB=s.CB, SCB=s.SCB)
    w = P.int8_vectorwise_dequant(s.CB, s.SCB)
    y_ref = fn(A, w, state=s_ref)
    assert y.shape == (2, 4, 48)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("threshold", [0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_int8_weight_as_B_equals_live_bnb(threshold: float, dtype: torch.dtype) -> None:
    bnb = _bnb()
    s = _int8_state(48, 32, 2)
    s.threshold, s.is_training = threshold, False
    sb = bnb.MatmulLtState()
    sb.has_fp16_weights, sb.CB, sb.SCB, sb.threshold, sb.is_training = False, s.CB, s.SCB, threshold, False
    A = (torch.randn(6, 32, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    assert torch.equal(P.matmul(A, s.CB, state=s, compat="bnb"), bnb.matmul(A, sb.CB, state=sb))


def test_int8_weight_as_B_errors() -> None:
    CB = _int8_state(8, 16, 0).CB
    with pytest.raises(ValueError, match=r"state.SCB, its float32 row scales of shape \[8\], got NoneType"):
        P.matmul(torch.randn(2, 16), CB, state=P.MatmulLtState(has_fp16_weights=False))
    with pytest.raises(TypeError, match="has_fp16_weights=False and SCB set; got has_fp16_weights=True"):
        P.matmul(torch.randn(2, 16), CB)
    with pytest.raises(ValueError, match=r"must equal B.shape\[1\]"):
        P.matmul(torch.randn(2, 15), CB, state=_int8_state(8, 16, 0))


def test_int8_weight_as_B_gives_input_gradient() -> None:
    s = _int8_state(8, 16, 4)
    A = torch.randn(3, 16, requires_grad=True)
    P.matmul(A, s.CB, state=s).sum().backward()
    w = P.int8_vectorwise_dequant(s.CB, s.SCB)
    assert torch.equal(A.grad, torch.ones(3, 8) @ w)


# ------------------------------------------------------------------ item 5: int8_linear_matmul(out=, dtype=)
def test_int8_linear_matmul_out_and_dtype() -> None:
    g = torch.Generator().manual_seed(9)
    A = torch.randint(-127, 128, (5, 24), generator=g, dtype=torch.int8)
    B = torch.randint(-127, 128, (7, 24), generator=g, dtype=torch.int8)
    out = torch.full((5, 7), 123, dtype=torch.int32)
    got = F.int8_linear_matmul(A, B, out, dtype=torch.int32)
    assert got is out
    assert torch.equal(out, (A.long() @ B.long().T).int())
    with pytest.raises(TypeError, match="dtype must be torch.int32, got torch.float32"):
        F.int8_linear_matmul(A, B, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"out must be a torch.int32 tensor of shape \(5, 7\), got \(5, 6\)"):
        F.int8_linear_matmul(A, B, out=torch.empty(5, 6, dtype=torch.int32))
