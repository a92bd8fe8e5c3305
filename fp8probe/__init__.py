"""fp8probe: FP8 / INT8 matmul numerics — a bitsandbytes-compatible quantisation suite on CPU and CUDA, plus analysis and reports."""
from __future__ import annotations

__version__ = "0.1.0"
