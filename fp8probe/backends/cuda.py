"""CUDA implementations of the fp8probe ops via CuPy kernels (placeholder until the kernels land)."""
from __future__ import annotations


def register() -> None:
    """Register CuPy kernels for CUDA tensors; imports nothing from CuPy at module import time."""
