"""``bitsandbytes.research.autograd`` of bitsandbytes 0.49.2: the FP8 research autograd functions and get_block_sizes."""
from __future__ import annotations

from . import _functions
from ._functions import (MatMulFP8Global, MatMulFP8Mixed, SwitchBackBnb, get_block_sizes, matmul_fp8_global,
                         matmul_fp8_mixed, switchback_bnb)

__all__ = ["_functions", "MatMulFP8Mixed", "MatMulFP8Global", "SwitchBackBnb", "get_block_sizes", "matmul_fp8_mixed",
           "matmul_fp8_global", "switchback_bnb"]
