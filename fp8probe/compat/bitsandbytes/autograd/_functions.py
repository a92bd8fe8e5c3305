"""``bitsandbytes.autograd._functions`` of bitsandbytes 0.49.2: ``MatMul8bitLt.apply(A, B, out, bias, state)`` with
bnb's arguments, in the drop-in's numerics mode (``set_compat``), ``MatmulLtState``, ``GlobalOutlierPooler``, ``matmul``."""
from __future__ import annotations

from typing import Any

import torch

from fp8probe import autograd as _AG
from fp8probe.autograd import GlobalOutlierPooler, MatmulLtState

from .._mode import get_compat

__all__ = ["MatMul8bitLt", "MatmulLtState", "GlobalOutlierPooler", "matmul"]


class MatMul8bitLt(_AG.MatMul8bitLt):
    """fp8probe's MatMul8bitLt with bnb's five inputs; the numerics mode is the drop-in's (get_compat())."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, state: MatmulLtState | None = None) -> torch.Tensor:
        return _AG.MatMul8bitLt.forward(ctx, A, B, out, bias, state, get_compat())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        return _AG.MatMul8bitLt.backward(ctx, grad_output)[:5]


def matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, state: MatmulLtState | None = None,
           threshold: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``bitsandbytes.matmul`` (the same function as the drop-in's top-level ``matmul``)."""
    return _AG.matmul(A, B, out, state, threshold, bias, compat=get_compat())
