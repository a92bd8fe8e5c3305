"""Drop-in nn.Linear layers running the matmul suite (FP8 mixed/global, LLM.int8(), SwitchBack) and a model swapper."""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from .autograd import MatmulLtState, get_block_sizes, matmul, matmul_fp8_global, matmul_fp8_mixed, switchback_bnb
from .functional import _check_threshold, int8_vectorwise_quant
from .formats import get_codebook, validate_codebook

__all__ = [
    "LinearFP8Mixed",
    "LinearFP8Global",
    "Linear8bitLt",
    "SwitchBackLinear",
    "swap_linear_layers",
    "STRATEGIES",
]

# Codebook buffers are float32 bit patterns; a dtype change (model.half(), .to(float64)) must not
# round them (the E4M3 map's 1/480-scaled values are not fp16-representable), only move them.
_CODEBOOK_BUFFERS = ("fw_code", "bw_code")


class _FP8Linear(nn.Linear):
    """Shared body of LinearFP8Mixed / LinearFP8Global: block sizes, codebook buffers, forward."""

    _matmul: Callable[..., torch.Tensor]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None, *, fw_code: torch.Tensor | None = None,
                 bw_code: torch.Tensor | None = None, compat: str | None = None) -> None:
        # Validate before nn.Linear allocates anything (bnb: IndexError for 0 features, Q20).
        bsz, bsz2 = get_block_sizes(in_features, out_features, compat=compat)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bsz, self.bsz2, self.compat = bsz, bsz2, compat
        dev = self.weight.device
        # The codebooks' bits on the CPU (2 KiB): a layer built on the meta device gets real codebooks back where its
        # weight lands (to_empty, load_state_dict(assign=True)); a meta tensor holds no data to copy.
        self._code_bits: dict[str, torch.Tensor] = {}
        for name, given, default in (("fw_code", fw_code, "bnb-e4m3"), ("bw_code", bw_code, "bnb-e5m2")):
            if given is None:
                self._code_bits[name] = get_codebook(default)
            else:
                if given.is_meta:
                    raise ValueError(f"{name} must hold the codebook's values, got a meta tensor")
                validate_codebook(given)
                self._code_bits[name] = given.detach().to("cpu", copy=True)
            # Non-persistent: follows .to(device) but stays out of state_dict (drop-in checkpoints).
            self.register_buffer(name, self._code_bits[name].to(dev, copy=True), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "_FP8Linear":
        exact = {name: self._buffers[name] for name in _CODEBOOK_BUFFERS if self._buffers.get(name) is not None}
        module = super()._apply(fn, recurse)
        for name, code in exact.items():
            src = self._code_bits[name] if code.is_meta else code  # (to_empty from meta: the bits kept on the CPU)
            self._buffers[name] = src.to(self._buffers[name].device)
        return module

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fw_code, bw_code; codebooks still on the meta device when the weight is not (load_state_dict(assign=True)
        into a layer built on meta: non-persistent buffers are not loaded) are put where the weight is first."""
        for name in _CODEBOOK_BUFFERS:
            if self._buffers[name].is_meta and not self.weight.is_meta:
                self._buffers[name] = self._code_bits[name].to(self.weight.device, copy=True)
        return self.fw_code, self.bw_code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        if x.is_meta or self.weight.is_meta:  # shapes only (meta init, FLOP counting): nn.Linear's shape and dtype
            return nn.functional.linear(x, self.weight, self.bias)
        device_type = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device_type):
            # Under autocast, as nn.Linear: the output is in the autocast dtype, whatever the input's. The FP8 casts
            # read the input in the weight's dtype (an autocast-dtype activation is exact in it; the weight is cast
            # from its own values, as FP8 training casts its master weights) and the matmul runs with autocast off:
            # the float32 accumulation of an FP8 GEMM, not a bfloat16 one.
            with torch.autocast(device_type, enabled=False):
                out = self._forward(x.to(self.weight.dtype))
            return out.to(torch.get_autocast_dtype(device_type))
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.dtype != self.weight.dtype:
            # (as nn.Linear: the FP8 matmuls run in the input dtype, so the weight must be in it too; the int8
            # layers quantise both and cast their output to x's dtype instead)
            raise TypeError(f"{type(self).__name__}: input dtype {str(x.dtype).removeprefix('torch.')} differs from "
                            f"the layer's weight dtype {str(self.weight.dtype).removeprefix('torch.')}: convert the "
                            f"layer (.to({x.dtype})) or the input (.to({self.weight.dtype}))")
        fw_code, bw_code = self._codes()
        out = type(self)._matmul(x, self.weight.t(), fw_code, bw_code, None, self.bsz, self.bsz2, compat=self.compat)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)  # the bias is never quantised: its gradient is exact
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bsz={self.bsz}, bsz2={self.bsz2}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any):
        """A new layer sharing ``linear``'s weight and bias Parameters (optimizers keep working)."""
        return _from_linear(cls, linear, **kwargs)


class LinearFP8Mixed(_FP8Linear):
    """nn.Linear whose matmul is :func:`~fp8probe.autograd.matmul_fp8_mixed` (SPEC §7.3).

    Blockwise bnb-e4m3 activations (block ``bsz``), global bnb-e4m3 weight, blockwise bnb-e5m2
    output gradient (block ``bsz2``) for grad_input, unquantised weight gradient.
    """

    _matmul = staticmethod(matmul_fp8_mixed)


class LinearFP8Global(_FP8Linear):
    """nn.Linear whose matmul is :func:`~fp8probe.autograd.matmul_fp8_global` (SPEC §7.3; broken in bnb, Q20).

    One absmax per tensor: bnb-e4m3 activations and weight, bnb-e5m2 output gradient in both
    backward matmuls.
    """

    _matmul = staticmethod(matmul_fp8_global)


# bitsandbytes' Linear8bitLt checkpoints carry the int8 layout as `weight_format`; 0 = "row" (row-major
# [out, in]), the only layout bitsandbytes >= 0.45 and fp8probe use.
_WEIGHT_FORMAT_ROW = 0


def int8_weight_rows(w: torch.Tensor, compat: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of a float weight [out, in]: its int8 rows and their float32 absmax values (the int8 layers'
    storage). ``compat="bnb"`` reads the weight in fp16 first, as bitsandbytes' Int8Params does (its CUDA kernel
    reads fp16 only)."""
    src = w.to(torch.float16) if compat == "bnb" else w
    CB, SCB, _ = int8_vectorwise_quant(src.contiguous(), compat=compat)
    return CB, SCB


class _Int8Linear(nn.Linear):
    """Shared body of Linear8bitLt / SwitchBackLinear: the MatmulLtState, its settings and the weight storage.

    ``has_fp16_weights=True``: ``weight`` is the usual float Parameter, quantised to int8 in every
    forward (cached while it is unchanged). ``has_fp16_weights=False``: the layer stores only the
    int8 weight, like bitsandbytes' ``Int8Params`` — ``weight`` is an int8 ``[out, in]``
    Parameter (``requires_grad=False``) and ``SCB`` a float32 ``[out]`` buffer of row absmax
    values (weight ≈ weight.float() · SCB[:, None] / 127): 1 byte per parameter plus 4 per row.
    Its state_dict holds ``weight`` (int8), ``SCB`` (float32), ``bias`` and ``weight_format`` (uint8 0
    = row-major), the keys bitsandbytes 0.49.2 writes, so checkpoints load both ways. Loading a float
    ``weight`` without ``SCB`` (an nn.Linear checkpoint) quantises it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, has_fp16_weights: bool = True,
                 threshold: float = 0.0, index: Any = None, device: Any = None, dtype: torch.dtype | None = None,
                 *, compat: str | None = None) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features} and {out_features}")
        threshold = _check_threshold(threshold)  # (NaN passed `< 0` and failed only in the first forward)
        if compat not in (None, "bnb"):
            raise ValueError(f"compat must be None or 'bnb', got {compat!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.index = index
        self.compat = compat
        self.state = MatmulLtState(threshold=float(threshold), has_fp16_weights=has_fp16_weights)
        if not has_fp16_weights:
            self._store_int8(self.weight.detach())

    def _quantize_rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return int8_weight_rows(w, self.compat)

    def _store_int8(self, w: torch.Tensor) -> None:
        """Replace the weight by its int8 rows (a frozen Parameter) and their float32 scales (buffer SCB)."""
        CB, SCB = self._quantize_rows(w)
        self.weight = nn.Parameter(CB, requires_grad=False)
        self.register_buffer("SCB", SCB)
        self.state.reset_grads()

    def _weight_for_forward(self) -> torch.Tensor:
        if not self.state.has_fp16_weights:
            self.state.SCB = self.SCB  # an int8 B is taken as CB, with these scales
        return self.weight

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "_Int8Linear":
        scb = self._buffers.get("SCB")
        module = super()._apply(fn, recurse)
        if scb is not None and not scb.is_meta:  # (to_empty from meta: fn's new, empty SCB, as for every buffer)
            # the scales stay float32 through .half()/.to(dtype); only the device follows
            self._buffers["SCB"] = scb.to(self._buffers["SCB"].device)
        self.state.reset_grads()  # the cached int8 weight lives on the old device
        return module

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.state.has_fp16_weights:
            destination[prefix + "weight_format"] = torch.tensor(_WEIGHT_FORMAT_ROW, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        # `state_dict` is load_state_dict's private copy: rewriting this layer's entries is safe.
        fmt = state_dict.pop(prefix + "weight_format", None)
        if fmt is not None and int(fmt) != _WEIGHT_FORMAT_ROW:
            error_msgs.append(f"{prefix}weight_format: expected {_WEIGHT_FORMAT_ROW} (row-major int8), got {int(fmt)}")
        w = state_dict.get(prefix + "weight")
        if self.state.has_fp16_weights and prefix + "SCB" in state_dict:
            error_msgs.append(f"{prefix}SCB: an int8 checkpoint (int8 weight + SCB) needs has_fp16_weights=False, "
                              "got a layer with float weights")
        elif (not self.state.has_fp16_weights and isinstance(w, torch.Tensor) and w.is_floating_point()
              and prefix + "SCB" not in state_dict):
            CB, SCB = self._quantize_rows(w.to(self.weight.device))
            state_dict[prefix + "weight"], state_dict[prefix + "SCB"] = CB, SCB
        elif (not self.state.has_fp16_weights and isinstance(w, torch.Tensor) and w.dtype != torch.int8
              and prefix + "SCB" in state_dict):
            # (the copy into the int8 Parameter would truncate the values: a float weight became zeros)
            error_msgs.append(f"{prefix}weight: an int8 checkpoint (SCB given) needs an int8 weight, got {w.dtype} "
                              "(leave SCB out and a float weight is quantised on loading)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.state.reset_grads()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, threshold={self.state.threshold}, "
                f"has_fp16_weights={self.state.has_fp16_weights}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any):
        """A new layer sharing ``linear``'s weight and bias Parameters (optimizers keep working).

        With ``has_fp16_weights=False`` the new layer stores the int8 quantisation of
        ``linear.weight`` instead (only the bias is shared).
        """
        return _from_linear(cls, linear, **kwargs)


class Linear8bitLt(_Int8Linear):
    """nn.Linear computed with LLM.int8() (:func:`~fp8probe.autograd.matmul`, SPEC §6.5).

    ``threshold > 0`` keeps activation columns with |x| >= threshold in the input precision.
    In training mode the int8 weight is quantised on every forward (so no update is missed, not
    even a write through ``weight.data``); in eval mode it is cached in ``self.state`` and
    re-quantised whenever the weight's ``_version`` changes (an optimizer step, ``load_state_dict``,
    an in-place op; a write through ``weight.data`` is not seen: call ``self.state.reset_grads()``).
    ``compat="bnb"`` restores bitsandbytes' ``weight.grad is None`` rule (Q11). With ``has_fp16_weights=True`` the
    state_dict is a plain nn.Linear one; with False the layer stores the int8 weight and its
    scales (format on :class:`_Int8Linear`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        self.state.is_training = self.training
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return matmul(x, self._weight_for_forward(), bias=bias, state=self.state, compat=self.compat)


class SwitchBackLinear(_Int8Linear):
    """nn.Linear computed with SwitchBack (:func:`~fp8probe.autograd.switchback_bnb`): int8 forward, 16-bit backward.

    A working equivalent of bitsandbytes' ``SwitchBackLinearBnb`` (whose forward calls a
    non-existent ``bnb.matmul_mixed``, Q20).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        self.state.is_training = self.training
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return switchback_bnb(x, self._weight_for_forward(), bias=bias, state=self.state, compat=self.compat)


def _check_input(layer: nn.Module, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}: expected a torch.Tensor input, got {type(x).__name__}")


def _from_linear(cls: type, linear: nn.Linear, **kwargs: Any) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
              device=w.device, dtype=w.dtype, **kwargs)
    # Share (not copy) the Parameters so optimizers and tied weights keep pointing at them. Their
    # requires_grad flags are left alone (the caller's tensors). An int8-weight layer stores the
    # quantised weight instead (it has no float weight to share).
    if isinstance(new, _Int8Linear) and not new.state.has_fp16_weights:
        new._store_int8(w.detach())
    else:
        new.weight = w
    if linear.bias is not None:
        new.bias = linear.bias
    new.train(linear.training)
    return new


STRATEGIES: dict[str, type[nn.Linear]] = {
    "mixed": LinearFP8Mixed,
    "global": LinearFP8Global,
    "int8": Linear8bitLt,
    "switchback": SwitchBackLinear,
}


def _compile(pattern: str | None, what: str) -> re.Pattern | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regex string or None, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} is not a valid regular expression: {pattern!r} ({exc})") from None


def swap_linear_layers(model: nn.Module, strategy: str, include: str | None = None, exclude: str | None = None,
                       **options: Any) -> list[str]:
    """Replace the plain ``nn.Linear`` submodules of ``model`` in place; return the swapped names.

    ``strategy``: "mixed" (LinearFP8Mixed), "global" (LinearFP8Global), "int8" (Linear8bitLt) or
    "switchback" (SwitchBackLinear). ``include``/``exclude``: regular expressions searched
    (``re.search``) in the dotted module name, e.g. ``include=r"^layers\\.\\d+\\.mlp"``,
    ``exclude="lm_head"``. ``options`` go to the new layer's constructor (e.g. ``threshold=6.0``).
    Weights and biases are shared with the replaced layers. Subclasses of nn.Linear (including
    already swapped layers) are left alone. A layer used at several places (the same module under two names) is
    swapped at every place whose name passes ``include``/``exclude``, by one new layer shared as the old one was;
    every such name is returned.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear and cannot be swapped in place; "
                         f"use {STRATEGIES[strategy].__name__}.from_linear(model)")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    # remove_duplicate=False: every place a shared module is used (named_modules() yields it once)
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False)
               if type(m) is nn.Linear and name
               and (inc is None or inc.search(name)) and not (exc is not None and exc.search(name))]
    cls = STRATEGIES[strategy]
    new: dict[int, nn.Linear] = {}  # id(old layer) -> its one replacement
    for name, linear in targets:
        if id(linear) not in new:
            new[id(linear)] = cls.from_linear(linear, **options)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new[id(linear)])
    return [name for name, _ in targets]
