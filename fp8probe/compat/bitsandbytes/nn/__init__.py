"""``bitsandbytes.nn`` of bitsandbytes 0.49.2: Linear8bitLt and SwitchBackLinearBnb with its constructor arguments."""
from __future__ import annotations

from typing import Any

from fp8probe import nn as _nn

from .._mode import get_compat

__all__ = ["Linear8bitLt", "SwitchBackLinearBnb"]


class Linear8bitLt(_nn.Linear8bitLt):
    """fp8probe's Linear8bitLt with bnb's arguments; ``has_fp16_weights=False`` stores int8 + SCB like Int8Params.

    Unlike bnb, the weight is quantised at construction / load (not on the first ``.to(device)``)
    and the bias is cast per call instead of being overwritten with the input's dtype.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 threshold: float = 0.0, index: Any = None, device: Any = None) -> None:
        super().__init__(input_features, output_features, bias=bias, has_fp16_weights=has_fp16_weights,
                         threshold=threshold, index=index, device=device, compat=get_compat())


class SwitchBackLinearBnb(_nn.SwitchBackLinear):
    """fp8probe's SwitchBackLinear with bnb's arguments (bnb 0.49.2's own forward calls a missing function).

    ``memory_efficient_backward`` is accepted and recorded on the state, as bnb does; SwitchBack's
    backward never keeps more than the activations.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 memory_efficient_backward: bool = False, threshold: float = 0.0, index: Any = None,
                 device: Any = None) -> None:
        super().__init__(input_features, output_features, bias=bias, has_fp16_weights=has_fp16_weights,
                         threshold=threshold, index=index, device=device, compat=get_compat())
        self.state.memory_efficient_backward = memory_efficient_backward
