"""``bitsandbytes.research.autograd._functions`` of bitsandbytes 0.49.2: ``MatMulFP8Mixed`` / ``MatMulFP8Global`` /
``SwitchBackBnb`` with bnb's ``apply`` arguments, in the drop-in's numerics mode (``set_compat``), and
``get_block_sizes``."""
from __future__ import annotations

from typing import Any

import torch

from fp8probe import autograd as _AG
from fp8probe.autograd import MatmulLtState

from ..._mode import get_compat
from .. import matmul_fp8_global, matmul_fp8_mixed, switchback_bnb

__all__ = ["MatMulFP8Mixed", "MatMulFP8Global", "SwitchBackBnb", "get_block_sizes", "matmul_fp8_mixed",
           "matmul_fp8_global", "switchback_bnb", "MatmulLtState"]


def get_block_sizes(input_matrix: torch.Tensor | int, weight_matrix: torch.Tensor | int) -> tuple[int, int]:
    """bnb's ``get_block_sizes(input_matrix, weight_matrix)``: (bsz, bsz2) in the drop-in's numerics mode."""
    return _AG.get_block_sizes(input_matrix, weight_matrix, compat=get_compat())


class MatMulFP8Mixed(_AG.MatMulFP8Mixed):
    """fp8probe's MatMulFP8Mixed with bnb's seven inputs (A, B, out, fw_code, bw_code, bsz, bsz2)."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                fw_code: torch.Tensor | None = None, bw_code: torch.Tensor | None = None, bsz: int = 1024,
                bsz2: int = 1024) -> torch.Tensor:
        return _AG.MatMulFP8Mixed.forward(ctx, A, B, out, fw_code, bw_code, bsz, bsz2, get_compat())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        return _AG.MatMulFP8Mixed.backward(ctx, grad_output)[:7]


class MatMulFP8Global(_AG.MatMulFP8Global):
    """fp8probe's MatMulFP8Global with bnb's seven inputs (bsz / bsz2 ignored, as in bnb)."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                fw_code: torch.Tensor | None = None, bw_code: torch.Tensor | None = None, bsz: int = 1024,
                bsz2: int = 1024) -> torch.Tensor:
        return _AG.MatMulFP8Global.forward(ctx, A, B, out, fw_code, bw_code, bsz, bsz2, get_compat())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        return _AG.MatMulFP8Global.backward(ctx, grad_output)[:7]


class SwitchBackBnb(_AG.SwitchBackBnb):
    """fp8probe's SwitchBackBnb with bnb's five inputs (A, B, out, bias, state)."""

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, state: MatmulLtState | None = None) -> torch.Tensor:
        return _AG.SwitchBackBnb.forward(ctx, A, B, out, bias, state, get_compat())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        return _AG.SwitchBackBnb.backward(ctx, grad_output)[:5]
