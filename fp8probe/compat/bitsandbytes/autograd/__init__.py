"""``bitsandbytes.autograd`` of bitsandbytes 0.49.2: the LLM.int8() autograd function and its state."""
from __future__ import annotations

from . import _functions
from ._functions import GlobalOutlierPooler, MatMul8bitLt, MatmulLtState, matmul

__all__ = ["_functions", "MatMul8bitLt", "MatmulLtState", "GlobalOutlierPooler", "matmul"]
