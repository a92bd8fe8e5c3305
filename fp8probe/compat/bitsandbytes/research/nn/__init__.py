"""``bitsandbytes.research.nn`` of bitsandbytes 0.49.2: LinearFP8Mixed / LinearFP8Global with its constructor arguments."""
from __future__ import annotations

from fp8probe import nn as _nn

from ..._mode import get_compat

__all__ = ["LinearFP8Mixed", "LinearFP8Global"]


class LinearFP8Mixed(_nn.LinearFP8Mixed):
    """fp8probe's LinearFP8Mixed with bnb's ``(input_features, output_features, bias)``; mode read when built."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True) -> None:
        super().__init__(input_features, output_features, bias=bias, compat=get_compat())


class LinearFP8Global(_nn.LinearFP8Global):
    """fp8probe's LinearFP8Global (working, unlike bnb 0.49.2's) with bnb's constructor arguments."""

    def __init__(self, input_features: int, output_features: int, bias: bool = True) -> None:
        super().__init__(input_features, output_features, bias=bias, compat=get_compat())
