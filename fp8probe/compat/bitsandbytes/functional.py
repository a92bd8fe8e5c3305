"""``bitsandbytes.functional`` of bitsandbytes 0.49.2: its argument names, order and return conventions over fp8probe.functional."""
from __future__ import annotations

import torch

from fp8probe import functional as _F
from fp8probe.functional import QuantState, create_dynamic_map, create_fp8_map, create_linear_map

from ._mode import get_compat

__all__ = [
    "QuantState", "create_fp8_map", "create_dynamic_map", "create_linear_map",
    "quantize", "dequantize", "quantize_blockwise", "dequantize_blockwise",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_double_quant", "int8_linear_matmul",
    "int8_mm_dequant",
]


class GlobalQuantState(tuple):
    """bitsandbytes' ``(absmax, code)`` pair returned by :func:`quantize` (absmax a 0-dim float32).

    It unpacks and indexes like bnb's tuple; ``quant_state`` keeps fp8probe's full state (the
    special values its default mode records), which :func:`dequantize` uses when given this pair.
    """

    quant_state: QuantState

    def __new__(cls, state: QuantState) -> "GlobalQuantState":
        absmax = state.absmax.reshape(()) if state.absmax.numel() == 1 else state.absmax
        pair = super().__new__(cls, (absmax, state.code))
        pair.quant_state = state
        return pair


def quantize(A: torch.Tensor, code: torch.Tensor | None = None, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, GlobalQuantState]:
    """Tensor-wise codebook quantisation: ``(q uint8 A.shape, (absmax, code))`` like bnb 0.49.2 (runs on CPU)."""
    q, state = _F.quantize(A, code, out, compat=get_compat())
    return q, GlobalQuantState(state)


def dequantize(A: torch.Tensor, state: tuple | None = None, absmax: torch.Tensor | None = None,
               code: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``code[A] * absmax`` as float32 (bnb's convention) from ``state=(absmax, code)`` or loose absmax/code."""
    if isinstance(state, GlobalQuantState):
        return _F.dequantize(A, state.quant_state, out=out, dtype=torch.float32)
    if state is not None:
        absmax, code = state
    if absmax is None:
        raise ValueError("dequantize needs state=(absmax, code) or absmax, got neither")
    return _F.dequantize(A, absmax=absmax.reshape(-1), code=code, out=out)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor | None = None, absmax: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, blocksize: int = 4096, nested: bool = False
                       ) -> tuple[torch.Tensor, QuantState]:
    """Blockwise codebook quantisation (bnb's signature); returns ``(q uint8 A.shape, QuantState)``."""
    return _F.quantize_blockwise(A, code, absmax, out, blocksize, nested, compat=get_compat())


def dequantize_blockwise(A: torch.Tensor, quant_state: QuantState | None = None, absmax: torch.Tensor | None = None,
                         code: torch.Tensor | None = None, out: torch.Tensor | None = None, blocksize: int = 4096,
                         nested: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`; `A` is the uint8 code tensor (bnb's argument name). A QuantState made
    by bitsandbytes itself is read too (its absmax, code, blocksize, dtype and nested fields)."""
    return _F.dequantize_blockwise(A, _own_state(quant_state), absmax, code, out, blocksize, nested)


_STATE_FIELDS = ("absmax", "code", "blocksize", "dtype")


def _own_state(state: object) -> object:
    """fp8probe's QuantState for bitsandbytes' own (the one-line import switch met states bnb had made: "expected a
    QuantState, got QuantState"); anything else is passed on as it is (and checked there)."""
    if state is None or isinstance(state, QuantState) or not all(hasattr(state, f) for f in _STATE_FIELDS):
        return state
    nested = bool(getattr(state, "nested", False))
    return QuantState(absmax=state.absmax, code=state.code, blocksize=state.blocksize, dtype=state.dtype,
                      shape=getattr(state, "shape", None), offset=getattr(state, "offset", None),
                      state2=_own_state(getattr(state, "state2", None)) if nested else None, nested=nested,
                      compat=get_compat())


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LLM.int8() row-wise quantisation: ``(int8 A.shape, row_stats float32, outlier_cols int64 | None)``."""
    return _F.int8_vectorwise_quant(A, threshold, compat=get_compat())


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``A * stats[row] / 127`` as float32; `A` is the int8 tensor (bnb's argument name)."""
    return _F.int8_vectorwise_dequant(A, stats)


def int8_double_quant(A: torch.Tensor, col_stats: torch.Tensor | None = None, row_stats: torch.Tensor | None = None,
                      out_col: torch.Tensor | None = None, out_row: torch.Tensor | None = None,
                      threshold: float = 0.0):
    """Row- and column-wise int8 quantisation ``(q_row, q_col, row_stats, col_stats, outlier_cols)``.

    bnb's positional order; like bnb 0.49.2, pre-allocated outputs are refused (it has no CPU
    kernel at all: fp8probe runs this on CPU).
    """
    for name, value in (("col_stats", col_stats), ("row_stats", row_stats), ("out_col", out_col),
                        ("out_row", out_row)):
        if value is not None:
            raise ValueError(f"{name} must be None (int8_double_quant allocates its outputs), "
                             f"got a {type(value).__name__}")
    return _F.int8_double_quant(A, threshold, compat=get_compat())


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Exact int32 ``A @ B.T`` of int8 operands (bnb's signature)."""
    return _F.int8_linear_matmul(A, B, out, dtype)


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``A * row_stats ⊗ col_stats / 127² + bias`` as float16 (bnb's output dtype)."""
    return _F.int8_mm_dequant(A, row_stats, col_stats, out, bias, dtype=torch.float16, compat=get_compat())
