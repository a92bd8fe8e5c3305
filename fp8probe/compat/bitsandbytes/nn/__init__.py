"""``bitsandbytes.nn`` of bitsandbytes 0.49.2: Int8Params, Linear8bitLt and SwitchBackLinearBnb with its arguments."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from fp8probe import nn as _nn

from .._mode import get_compat

__all__ = ["Int8Params", "Linear8bitLt", "SwitchBackLinearBnb"]


class Int8Params(torch.nn.Parameter):
    """bitsandbytes' ``Int8Params``: a weight Parameter that becomes its int8 rows on the first move to a device.

    As in bitsandbytes 0.49.2: ``has_fp16_weights=False`` and float data are quantised row-wise by ``.to(device)``
    / ``.cpu()`` / ``.cuda()`` (any device but meta; the data become the int8 ``CB``, ``SCB`` the float32 row
    absmax values, weight ≈ CB · SCB / 127), in the drop-in's numerics mode (``set_compat``); int8 data move
    with their ``SCB``. ``has_fp16_weights=True`` is a plain float Parameter.
    """

    CB: torch.Tensor | None
    SCB: torch.Tensor | None
    has_fp16_weights: bool

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True, has_fp16_weights: bool = False,
                CB: torch.Tensor | None = None, SCB: torch.Tensor | None = None) -> "Int8Params":
        if data is None:
            data = torch.empty(0)
        obj = torch.Tensor._make_subclass(cls, data, requires_grad)
        obj.CB, obj.SCB, obj.has_fp16_weights = CB, SCB, has_fp16_weights
        return obj

    def _quantize(self, device: Any) -> "Int8Params":
        if self.has_fp16_weights:
            return super().to(device)
        CB, SCB = _nn.int8_weight_rows(self.data.to(device), get_compat())
        self.data = CB
        self.CB, self.SCB = CB, SCB
        return self

    def cpu(self) -> "Int8Params":  # type: ignore[override]
        return self.to(device="cpu")

    def cuda(self, device: Any = None, non_blocking: bool = False) -> "Int8Params":  # type: ignore[override]
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def __deepcopy__(self, memo: dict) -> "Int8Params":
        return type(self)(copy.deepcopy(self.data, memo), requires_grad=self.requires_grad,
                          has_fp16_weights=self.has_fp16_weights, CB=copy.deepcopy(self.CB, memo),
                          SCB=copy.deepcopy(self.SCB, memo))

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # (torch.nn.Parameter's own reduce rebuilds a plain Parameter: a pickled layer lost the type)
        return (_rebuild_int8params, (self.data, self.requires_grad, self.has_fp16_weights, self.CB, self.SCB))

    def to(self, *args: Any, **kwargs: Any) -> "Int8Params":  # type: ignore[override]
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        quantized = self.data.dtype == torch.int8
        if not quantized and device is not None and device.type != "meta" and self.data.device.type == "cpu":
            return self._quantize(device)
        moved = Int8Params(super().to(device=device, dtype=dtype, non_blocking=non_blocking),
                           requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights)
        if quantized:
            moved.CB = moved.data
            if device is not None and self.SCB is not None and self.SCB.device.type != "meta":
                moved.SCB = self.SCB.to(device)
        return moved


def _rebuild_int8params(data: torch.Tensor, requires_grad: bool, has_fp16_weights: bool, CB: torch.Tensor | None,
                        SCB: torch.Tensor | None) -> Int8Params:
    return Int8Params(data, requires_grad=requires_grad, has_fp16_weights=has_fp16_weights, CB=CB, SCB=SCB)


class _Int8ParamsWeight:
    """The int8 layers' ``weight`` as bitsandbytes has it: an :class:`Int8Params` whose ``SCB`` is the layer's
    ``SCB`` buffer (the state_dict key), so that code written for bitsandbytes (``isinstance(layer.weight,
    Int8Params)``, ``layer.weight = Int8Params(w, requires_grad=False).to(device)``, an int8 ``weight`` with
    ``weight.SCB`` set, as Hugging Face's loader does) runs unchanged.

    A weight assigned by the caller is taken on the next forward, state_dict() or move: float data (not yet
    moved) are quantised then, as bitsandbytes' first forward does; int8 data use their ``SCB``.
    """

    weight: torch.Tensor
    state: Any
    compat: str | None
    _buffers: dict
    register_buffer: Callable[..., None]

    def _store_int8(self, w: torch.Tensor) -> None:
        super()._store_int8(w)  # type: ignore[misc]
        CB, SCB = self.weight.data, self._buffers["SCB"]
        self.weight = Int8Params(CB, requires_grad=False, has_fp16_weights=False, CB=CB, SCB=SCB)

    def _wrap_float_weight(self) -> None:
        w = self.weight
        if self.state.has_fp16_weights and not isinstance(w, Int8Params):
            self.weight = Int8Params(w.data, requires_grad=w.requires_grad, has_fp16_weights=True)

    def _take_weight(self, strict: bool = True) -> None:
        """Make the layer's int8 weight and SCB buffer the ones its ``weight`` (an Int8Params) carries.
        ``strict`` False: an int8 weight without scales is left for later (a move before ``weight.SCB`` is set)."""
        w = self.weight
        if self.state.has_fp16_weights or not isinstance(w, Int8Params):
            return
        if w.dtype != torch.int8:
            # float data not moved yet: bitsandbytes' first forward quantises them and keeps the int8 rows
            CB, SCB = self._quantize_rows(w.detach())  # type: ignore[attr-defined]
            w.data = CB
            w.CB, w.SCB = CB, SCB
        elif w.SCB is None:
            if not strict:
                return
            raise ValueError(f"{type(self).__name__}: the int8 weight {list(w.shape)} has no scales: set "
                             "layer.weight.SCB (float32 [out_features], the rows' absmax) or assign a float "
                             "weight as Int8Params(w, requires_grad=False)")
        if w.SCB is not self._buffers.get("SCB"):
            scb = w.SCB.to(device=w.device, dtype=torch.float32)
            if scb.shape != (w.shape[0],):
                raise ValueError(f"{type(self).__name__}: weight.SCB must have shape [{w.shape[0]}] (one scale "
                                 f"per output row), got {list(w.SCB.shape)}")
            self.register_buffer("SCB", scb)
            w.SCB = scb
            self.state.reset_grads()
        w.CB = w.data

    def _weight_for_forward(self) -> torch.Tensor:
        self._take_weight()
        return super()._weight_for_forward()  # type: ignore[misc]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        if not isinstance(self.weight, Int8Params):
            return super()._apply(fn, recurse)  # type: ignore[misc]
        self._take_weight(strict=False)  # a float weight assigned by the caller is quantised, as its .to() does
        w = self.weight
        owned, has_fp16_weights = w.SCB is not None, w.has_fp16_weights

        def as_tensor(t: torch.Tensor) -> torch.Tensor:
            # Int8Params.to returns an Int8Params, which nn.Module._apply cannot make a new Parameter of (a move
            # to or from meta): bitsandbytes' own layer fails there. The layer moves the SCB buffer itself.
            out = fn(t)
            return out.as_subclass(torch.Tensor) if isinstance(out, Int8Params) else out

        module = super()._apply(as_tensor, recurse)  # type: ignore[misc]
        w = self.weight
        if not isinstance(w, Int8Params):  # _apply made a new Parameter: it is an Int8Params again
            new = Int8Params(w.data, requires_grad=w.requires_grad, has_fp16_weights=has_fp16_weights)
            new.grad = w.grad
            self._parameters["weight"] = w = new
        if w.dtype == torch.int8:
            w.CB = w.data
            if owned:  # the buffer moved: the weight's SCB follows it
                w.SCB = self._buffers["SCB"]
        return module

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._take_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
        w = self.weight
        if isinstance(w, Int8Params) and w.dtype == torch.int8 and "SCB" in self._buffers:
            w.SCB, w.CB = self._buffers["SCB"], w.data  # the loaded scales are the weight's


class Linear8bitLt(_Int8ParamsWeight, _nn.Linear8bitLt):
    """fp8probe's Linear8bitLt with bnb's arguments; ``weight`` is an :class:`Int8Params` as in bitsandbytes.

    ``has_fp16_weights=False`` stores int8 + SCB. Unlike bnb, the weight is quantised at construction / load (not
    on the first ``.to(device)``), the bias is cast per call instead of being overwritten with the input's dtype,
    and ``weight.CB`` / ``weight.SCB`` stay set after the first forward (bitsandbytes moves them to ``state``).
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 threshold: float = 0.0, index: Any = None, device: Any = None) -> None:
        super().__init__(input_features, output_features, bias=bias, has_fp16_weights=has_fp16_weights,
                         threshold=threshold, index=index, device=device, compat=get_compat())
        self._wrap_float_weight()


class SwitchBackLinearBnb(_Int8ParamsWeight, _nn.SwitchBackLinear):
    """fp8probe's SwitchBackLinear with bnb's arguments (bnb 0.49.2's own forward calls a missing function).

    ``weight`` is an :class:`Int8Params` as in bitsandbytes. ``memory_efficient_backward`` is accepted and
    recorded on the state, as bnb does; SwitchBack's backward never keeps more than the activations.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 memory_efficient_backward: bool = False, threshold: float = 0.0, index: Any = None,
                 device: Any = None) -> None:
        super().__init__(input_features, output_features, bias=bias, has_fp16_weights=has_fp16_weights,
                         threshold=threshold, index=index, device=device, compat=get_compat())
        self.state.memory_efficient_backward = memory_efficient_backward
        self._wrap_float_weight()
