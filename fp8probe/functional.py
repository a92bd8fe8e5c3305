"""Public functional API: bitsandbytes names and signatures (+ ``compat=``) over the fp8probe torch ops.

Every numeric operation goes through ``torch.ops.fp8probe.*`` (declared in ``ops.py``); this module
validates arguments, builds :class:`QuantState` / :class:`ScaledTensor` and composes ops. It does
not track gradients (``autograd.py`` does). ``compat=None`` selects fp8probe's rules, ``"bnb"``
bitsandbytes 0.49.2 behaviour (docs/architecture.md, "Decisions").
"""
from __future__ import annotations

import functools
import math
import operator
import struct
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

import fp8probe.ops  # noqa: F401  (registers torch.ops.fp8probe.*)
from fp8probe.backends import cpu as _cpu
from fp8probe.backends import reference as _ref
from fp8probe.formats import (
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    get_codebook,
    validate_codebook,
)

__all__ = [
    "create_fp8_map", "create_dynamic_map", "create_linear_map", "get_codebook",
    "QuantState", "quantize", "dequantize", "quantize_blockwise", "dequantize_blockwise", "fake_quantize",
    "blockwise_absmax",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_double_quant", "int8_linear_matmul",
    "int8_mm_dequant", "int8_scaled_mm", "int8_mixed_scaled_mm",
    "ScaledTensor", "quantize_scaled", "dequantize_scaled", "hadamard_transform",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# int8_linear_matmul accumulates exactly in int32: K products of at most (-128)·(-128) = 2^14 stay
# below 2^31 for K ≤ 131071; from K = 131072 on the sum can wrap. Longer rows are refused, not wrapped.
INT8_MATMUL_MAX_K = (2**31 - 1) // (128 * 128)
_OPS = torch.ops.fp8probe


# --------------------------------------------------------------------------------------------
# op calls: torch.ops.fp8probe.*, or straight to the CPU kernel in plain eager calls
# --------------------------------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_cpu(args: tuple) -> bool:
    """Whether a call with `args` would reach the op's CPU kernel with nothing of torch's machinery in
    between: plain strided CPU tensors, none tracked by autograd, no torch.compile/export, jit tracing,
    functorch transform, torch-function mode (gemms.py's capture mode) or dispatch mode (FakeTensorMode,
    FunctionalTensorMode, opcheck's checks) active. Then the kernel's result is what the op returns."""
    if torch.compiler.is_compiling():  # first: dynamo folds it to True and traces nothing below
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or a.device.type != "cpu"
                                            or a.layout != torch.strided or (grad and a.requires_grad)):
            return False
    return not (torch._C._len_torch_function_stack() or _get_current_dispatch_mode() is not None
                or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None)


def _run(name: str, *args):
    """``torch.ops.fp8probe.<name>(*args)``. A plain eager CPU call (_eager_cpu) goes to the kernel the
    dispatcher would pick (backends/cpu.kernel) directly: the custom-op path (autograd wrapper,
    redispatch, dynamo's eval-frame check) costs ~60 us a call, ~1 s of a 6-layer Llama analysis."""
    if _eager_cpu(args):
        return _cpu.kernel(name)(*args)
    return getattr(_OPS, name)(*args)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _compat(compat: str | None) -> str:
    if compat is None:
        return ""
    if compat != "bnb":
        raise ValueError(f"compat must be None or 'bnb', got {compat!r}")
    return compat


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def _positive_int(value: object) -> int | None:
    """``value`` as a Python int when it is a positive integer (numpy integers too, as range() takes them; never a
    bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        v = operator.index(value)
    except TypeError:
        return None
    return v if v > 0 else None


def _check_blocksize(blocksize: object) -> int:
    """A positive block size as a Python int (_positive_int)."""
    bs = _positive_int(blocksize)
    if bs is None:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return bs


def _code(code: torch.Tensor | str | None, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``(codebook, sorted)``: a validated float32 [256] codebook on `device` (a name, a tensor, or None =
    "dynamic") and whether it is sorted ascending. A name gives a fresh copy of one of the library's own
    codebooks, valid and of known order without reading it (no host wait on a GPU, nothing to cache)."""
    if code is None:
        code = "dynamic"
    if isinstance(code, str):
        return get_codebook(code, device), _named_code_sorted(code)
    if isinstance(code, torch.Tensor) and code.device.type == "meta" and device.type != "meta":
        raise ValueError(f"code must be a codebook holding data (it is moved to {device}), got a tensor on meta")
    ordered = _checked_code(code)
    return code.to(device), ordered


# Codebook tensors already validated, with their sortedness: id -> (weak reference, copy of the values checked,
# sorted). Checking a codebook on a GPU makes the host wait for it (``bool()`` of a device tensor) and takes
# ~20 us on a CPU; the modules pass the same codebook tensors to every call. A hit needs the tensor's values to
# equal the copy (torch.equal: ~1 us for 256 floats on a CPU, one host wait on a GPU where a check took two):
# its version counter would miss writes through ``.data`` or ``.numpy()`` (they do not bump it: an unsorted
# codebook was searched as a sorted one), and inference tensors have none. (A WeakKeyDictionary cannot hold
# tensors: it compares keys with ``==``.) An entry leaves with its tensor. Named codebooks skip it (_code).
_CODE_FACTS: dict[int, tuple[weakref.ref, torch.Tensor, bool]] = {}


def _remember_code(code: torch.Tensor, ordered: bool) -> None:
    key = id(code)
    _CODE_FACTS[key] = (weakref.ref(code, lambda _, key=key: _CODE_FACTS.pop(key, None)), code.detach().clone(),
                        ordered)


@functools.lru_cache(maxsize=None)
def _named_code_sorted(name: str) -> bool:
    return _ref.is_sorted(get_codebook(name))


def _checked_code(code: torch.Tensor) -> bool:
    """validate_codebook(code) unless it passed before with the values it holds now; returns whether it is sorted.

    Under torch.compile the check of the values is an assertion inside the graph (``bool()`` of a tensor would
    break the graph at every call), and the codebook is taken as unsorted: it is searched through its stable
    sort, which is the codebook itself when it is sorted, so the result is the same either way."""
    if torch.compiler.is_compiling():
        validate_codebook(code, values=False)
        torch._assert_async(torch.isfinite(code).all(), "codebook must contain only finite values, got NaN or Inf")
        return False
    facts = _CODE_FACTS.get(id(code))
    if facts is not None and facts[0]() is code:
        seen = facts[1]
        if (code.device == seen.device and code.dtype == seen.dtype and code.shape == seen.shape
                and torch.equal(code.detach(), seen)):
            return facts[2]
    validate_codebook(code)
    ordered = _ref.is_sorted(code)
    _remember_code(code, ordered)
    return ordered


def _check_device(op: str, main: str, device: torch.device, **tensors: object) -> None:
    """Every tensor argument of `op` on `device`, the device of its input `main`. A call mixing devices reached
    the op's implementation for one of them: with a stats tensor on the meta device, the fake impl, which
    returned an unwritten (uninitialised) CPU tensor as the result."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{op}: {name} must be on {main}'s device {device}, got {t.device}")


def _moved(op: str, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` (state tensors follow the codes); a meta tensor has no values to move."""
    if t.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{op}: {name} must hold data to be moved to {device}, got a tensor on meta")
    return t.to(device)


def _write_out(out: torch.Tensor | None, result: torch.Tensor, name: str = "out") -> torch.Tensor:
    """Copy `result` into a caller-provided `out` (same shape and dtype required) and return it."""
    if out is None:
        return result
    _check_buffer(out, result.shape, result.dtype, result.device, name)
    return out.copy_(result)


def _check_buffer(out: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str) -> None:
    """A caller's `out`-style buffer of the result's shape, dtype and device. (A buffer on the meta device was
    accepted: the copy into it is a no-op and the caller got back a tensor without values.)"""
    if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got {got}")
    if out.device != device:
        raise ValueError(f"{name} must be on {device} (the result's device), got {out.device}")


# --------------------------------------------------------------------------------------------
# codebook quantisation
# --------------------------------------------------------------------------------------------
@dataclass
class QuantState:
    """What is needed to dequantise a codebook-quantised tensor.

    absmax: float32 [n_blocks] (uint8 codes when ``nested``); code: float32 [256], the codebook
    actually used (for ``compat="bnb"`` on fp32 input it has ``code[0] = -1``, SPEC Q2);
    blocksize: elements per block of the flattened tensor (numel for global quantisation);
    dtype: the input dtype; shape: the input shape. Nested: ``offset`` (0-dim float32 mean of the
    absmax) and ``state2`` (the absmax's own state). ``special_index`` (int64 flat indices) and
    ``special_value`` (float32) hold NaN/±Inf inputs in default mode so dequantisation restores them.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    shape: torch.Size | None = None
    offset: torch.Tensor | None = None
    state2: QuantState | None = None
    nested: bool = False
    special_index: torch.Tensor | None = None
    special_value: torch.Tensor | None = None
    compat: str | None = None


def _check_state(state: QuantState) -> None:
    """A QuantState built or edited by hand: blocksize 0 divided by zero, 64.0 failed in the op's schema,
    and special_index / special_value of different lengths were broadcast silently."""
    if not isinstance(state, QuantState):  # (qualified: bnb's own QuantState read "expected a QuantState, got QuantState")
        raise TypeError(f"expected fp8probe.functional.QuantState, got {type(state).__module__}.{type(state).__qualname__}")
    if isinstance(state.blocksize, bool) or not isinstance(state.blocksize, int) or state.blocksize <= 0:
        raise ValueError(f"QuantState.blocksize must be a positive int, got {state.blocksize!r}")
    if not isinstance(state.code, torch.Tensor):  # (None gave "'NoneType' object has no attribute 'device'")
        raise TypeError(f"QuantState.code must be the float32 [256] codebook tensor, got {type(state.code).__name__}")
    sidx, sval = state.special_index, state.special_value
    if (sidx is None) != (sval is None):
        raise ValueError("QuantState.special_index and special_value must both be set or both be None, got "
                         f"{'special_index' if sval is None else 'special_value'} alone")
    if sidx is not None:
        _check_tensor("QuantState.special_index", sidx, (torch.int64,))
        _check_tensor("QuantState.special_value", sval, (torch.float32,))
        if sidx.dim() != 1 or sval.dim() != 1 or sidx.numel() != sval.numel():
            raise ValueError(f"QuantState.special_index and special_value must be 1-D of equal length, got shapes "
                             f"{list(sidx.shape)} and {list(sval.shape)}")


def _specials(state: QuantState, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if state.special_index is None or state.special_value is None:
        return (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device))
    return state.special_index, state.special_value


def _effective_code(code: torch.Tensor, ordered: bool, A: torch.Tensor, c: str) -> torch.Tensor:
    """The codebook a quantisation really used: bnb's fp32 CPU kernel writes code[0] = -1 (Q2), when it runs
    (not for an empty A)."""
    out = code.clone()
    if c == "bnb" and A.dtype == torch.float32 and A.numel():
        out[0] = -1.0
    else:  # the same values as the checked `code`: the QuantState's copy needs no second check
        _remember_code(out, ordered)
    return out


def _search_order(code: torch.Tensor, ordered: bool, c: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codebook the ops search, permutation back to `code`'s indices or None)``.

    The ops and kernels search sorted codebooks. An unsorted one (bnb's few-bit linear maps put
    the zero padding before linspace's -3e-8 middle point) is searched through its stable sort by
    default, and the indices mapped back, so ``code[q]`` is the nearest entry whatever the order.
    ``compat="bnb"`` passes it as it is: the reference then searches it the way bnb does. `ordered`: whether
    `code` is sorted (_code).
    """
    if c == "bnb" or ordered:
        return code, None
    sorted_code, perm = torch.sort(code, stable=True)
    return sorted_code, perm.to(torch.uint8)


def _quantize_into(A: torch.Tensor, code: torch.Tensor, ordered: bool, blocksize: int, c: str,
                   out: torch.Tensor | None, absmax: torch.Tensor | None, run_op) -> tuple[torch.Tensor, ...]:
    """``(q, absmax, special_index, special_value)`` with caller buffers honoured.

    With `out`/`absmax` given, the CPU fast path writes them in place (no temporary result to copy);
    otherwise, or where it declines, ``run_op()`` computes the result and it is copied into them.
    `code` is what the ops search; for an unsorted codebook (default mode) the indices found in
    its sorted order are mapped back through the permutation.
    """
    nb = -(-A.numel() // blocksize)
    if out is not None:
        _check_buffer(out, A.shape, torch.uint8, A.device, "out")
    if absmax is not None:
        _check_buffer(absmax, (nb,), torch.float32, A.device, "absmax")
    search_code, perm = _search_order(code, ordered, c)
    if perm is not None:
        q, am, sidx, sval = _quantize_into(A, search_code, True, blocksize, c, None, absmax, run_op)
        return _write_out(out, perm.to(q.device)[q.long()]), am, sidx, sval
    if out is not None or absmax is not None:
        q_buf = out if out is not None else torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        am_buf = absmax if absmax is not None else torch.empty(nb, dtype=torch.float32, device=A.device)
        done = _cpu.quantize_blockwise_into(A, code, blocksize, c, q_buf, am_buf)
        if done is not None:
            return (q_buf, am_buf, *done)
    q, am, sidx, sval = run_op(code)
    am = _write_out(absmax, am, "absmax")
    return _write_out(out, q), am, sidx, sval


def quantize(A: torch.Tensor, code: torch.Tensor | str | None = None, out: torch.Tensor | None = None, *,
             compat: str | None = None) -> tuple[torch.Tensor, QuantState]:
    """Tensor-wise (one absmax) codebook quantisation (SPEC §3).

    A: fp32/fp16/bf16, any shape; code: float32 [256] (any order), a codebook name, or None for the
    signed dynamic map. Returns ``(q uint8 A.shape, QuantState)`` with ``absmax`` float32 [1]
    ([0] for empty A). ``compat="bnb"``: bnb's CUDA ``quantize`` (true division, NaN-propagating
    absmax, no special-value recording).
    """
    _check_tensor("A", A, _FLOATS)
    c = _compat(compat)
    code, ordered = _code(code, A.device)
    # default mode: global = one block over the whole tensor, so the blockwise fast path serves it
    q, absmax, sidx, sval = _quantize_into(A, code, ordered, max(A.numel(), 1), c, out, None,
                                           lambda cb: _run("quantize_global", A, cb, c))
    state = QuantState(absmax=absmax, code=code.clone(), blocksize=max(A.numel(), 1), dtype=A.dtype,
                       shape=A.shape, special_index=sidx, special_value=sval, compat=compat)
    return q, state


def dequantize(q: torch.Tensor, state: QuantState | None = None, absmax: torch.Tensor | None = None,
               code: torch.Tensor | str | None = None, out: torch.Tensor | None = None, *,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``code[q] * absmax`` (float32 math) in `dtype`.

    `dtype` defaults to ``state.dtype`` (the input dtype), or float32 when built from loose
    ``absmax``/``code`` arguments (bnb's ``dequantize`` always returns float32).
    """
    _check_tensor("q", q, (torch.uint8,))
    if state is None:
        if absmax is None:
            raise ValueError("dequantize needs either state or absmax, got neither")
        return dequantize_blockwise(q, absmax=absmax, code=code, blocksize=max(q.numel(), 1), out=out, dtype=dtype)
    return dequantize_blockwise(q, state, out=out, dtype=dtype)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor | str | None = None, absmax: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, blocksize: int = 4096, nested: bool = False, *,
                       compat: str | None = None) -> tuple[torch.Tensor, QuantState]:
    """Blockwise codebook quantisation over the C-order flattened tensor (SPEC §4).

    A: fp32/fp16/bf16, any shape (non-contiguous inputs are read in logical order); code: float32
    [256] in any order (an unsorted one is searched in sorted order), a codebook name, or None for
    the signed dynamic map; blocksize: any int > 0 on the reference backend (the CUDA kernels take
    powers of two in 32..4096); absmax/out: optional preallocated float32 [ceil(n/blocksize)] /
    uint8 A.shape outputs. Returns
    ``(q uint8 A.shape, QuantState)``. ``nested=True`` quantises the mean-centred absmax vector
    with the dynamic map and the same blocksize (SPEC §4.5).
    """
    _check_tensor("A", A, _FLOATS)
    blocksize = _check_blocksize(blocksize)
    c = _compat(compat)
    default_code = code is None
    code, ordered = _code(code, A.device)
    q, am, sidx, sval = _quantize_into(A, code, ordered, blocksize, c, out, absmax,
                                       lambda cb: _run("quantize_blockwise", A, cb, blocksize, c))
    state = QuantState(absmax=am, code=_effective_code(code, ordered, A, c), blocksize=blocksize, dtype=A.dtype,
                       shape=A.shape, special_index=sidx, special_value=sval, compat=compat)
    if nested:
        if not am.numel():  # (bnb: the mean of no absmax, NaN)
            offset = torch.full((), math.nan if c == "bnb" else 0.0, dtype=torch.float32, device=A.device)
        elif c == "bnb":
            # bnb: a float32 mean (Inf once the absmax sum passes FLT_MAX), in the CPU's summation order on
            # every device: the vectors are bnb's CPU results, and a GPU's reduction order differs in the
            # last bit (seen on an H200), which would make the result depend on where it ran
            offset = am.cpu().mean().to(am.device)
        else:
            # float64 accumulation: the float32 sum of two absmax near 3e38 overflowed, offset = Inf
            # made every dequantised value NaN; the mean of finite float32 values is a finite float32
            offset = am.double().mean().float()
        qabs, state2 = quantize_blockwise(am - offset, code="dynamic", blocksize=blocksize, compat=compat)
        state.absmax, state.offset, state.state2, state.nested = qabs, offset, state2, True
        if c == "bnb" and default_code and A.dtype != torch.float32:
            # Q2 inside one call: bnb's nested absmax quantisation is a float32 CPU call on its cached default map,
            # which sets that map's code[0] = -1 after the float16/bfloat16 data were quantised with -0.99296875;
            # the state holds that same map, so bnb dequantises with -1
            state.code = state.code.clone()
            state.code[0] = -1.0
    return q, state


def dequantize_blockwise(q: torch.Tensor, quant_state: QuantState | None = None, absmax: torch.Tensor | None = None,
                         code: torch.Tensor | str | None = None, out: torch.Tensor | None = None,
                         blocksize: int = 4096, nested: bool = False, *, dtype: torch.dtype | None = None
                         ) -> torch.Tensor:
    """``y = cast(fl32(code[q] * absmax[block]))`` with NaN/±Inf restored from the state (SPEC §4.2).

    q: uint8, any shape. With `quant_state` the loose absmax/code/blocksize are ignored and the
    output dtype is ``quant_state.dtype``; without it they are used and the output is float32.
    `dtype` overrides either. Returns a new tensor of q.shape (or `out`).
    """
    _check_tensor("q", q, (torch.uint8,))
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax, got neither")
        if nested:
            raise ValueError("nested=True needs a quant_state (offset and state2), got only absmax")
        quant_state = QuantState(absmax=absmax, code=_code(code, q.device)[0], blocksize=_check_blocksize(blocksize),
                                 dtype=torch.float32)
        return _dequantize_state(q, quant_state, out, dtype, code_checked=True)
    return _dequantize_state(q, quant_state, out, dtype, code_checked=False)


def _dequantize_state(q: torch.Tensor, st: QuantState, out: torch.Tensor | None, dtype: torch.dtype | None,
                      code_checked: bool) -> torch.Tensor:
    """dequantize_blockwise with a QuantState; ``code_checked``: st.code is known valid (made or checked by the
    caller just now: no second check, no host wait on a GPU)."""
    _check_state(st)
    am = st.absmax
    if st.nested:
        if st.state2 is None or st.offset is None:
            raise ValueError("nested QuantState needs state2 and offset, got None")
        am = dequantize_blockwise(st.absmax, st.state2) + st.offset
        if st.compat != "bnb":
            # An absmax is in [0, FLT_MAX]; the nested rounding (up to 0.9/128 of the centred block
            # max) could push it below 0 (flipping the block's signs) or past FLT_MAX (Inf/NaN)
            am = am.clamp(0.0, torch.finfo(torch.float32).max)
    _check_tensor("absmax", am, (torch.float32,))
    if st.shape is not None and q.numel() != math.prod(st.shape):
        # (the block count alone let 11 codes through a state of 10 elements)
        raise ValueError(f"q must hold the {math.prod(st.shape)} codes of quant_state's tensor {list(st.shape)}, "
                         f"got {q.numel()}")
    nb = -(-q.numel() // st.blocksize)
    if am.numel() != nb:
        raise ValueError(f"absmax must have ceil({q.numel()}/{st.blocksize}) = {nb} entries, got {am.numel()}")
    op, dev = "dequantize_blockwise", q.device
    am, code = _moved(op, "absmax", am, dev), _moved(op, "QuantState.code", st.code, dev)
    if not code_checked:
        _checked_code(code)
    out_dtype = dtype or st.dtype
    if out_dtype not in _FLOATS:
        raise TypeError(f"dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    sidx, sval = (_moved(op, f"QuantState.{name}", t, dev) for name, t in zip(("special_index", "special_value"),
                                                                             _specials(st, dev)))
    if out is not None:
        _check_buffer(out, q.shape, out_dtype, dev, "out")
        if _cpu.dequantize_blockwise_into(q, am, code, st.blocksize, out_dtype, sidx, sval, _compat(st.compat), out):
            return out  # CPU fast path wrote `out` in place
    y = _run("dequantize_blockwise", q, am, code, st.blocksize, out_dtype, sidx, sval, _compat(st.compat))
    return _write_out(out, y)


def fake_quantize(A: torch.Tensor, code: torch.Tensor | str | None, blocksize: int | None = None, *,
                  compat: str | None = None, return_absmax: bool = False
                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``dequantize(quantize(A))`` in A.dtype: blockwise with `blocksize`, tensor-wise when None.

    ``return_absmax``: also return the scales, float32 [ceil(n/blocksize)] (global: [1]; [0] for empty A),
    as QuantState.absmax holds them. Plain eager CPU calls in the default mode run one fused C pass
    (backends/cpu.fake_quantize_blockwise: no uint8 codes in memory, no second pass), bit-identical to
    the two steps; NaN/±Inf inputs, ``compat="bnb"`` and everything else run the two steps.
    """
    _check_tensor("A", A, _FLOATS)
    bs = max(A.numel(), 1) if blocksize is None else _check_blocksize(blocksize)
    if torch.compiler.is_compiling():  # one op of static output shapes (_fake_quantize_op): no graph break
        book = code if isinstance(code, torch.Tensor) else get_codebook("dynamic" if code is None else code, A.device)
        _checked_code(book)
        y, absmax = _fake_quantize_op(A, book, 0 if blocksize is None else bs, _compat(compat))
        return (y, absmax) if return_absmax else y
    if _compat(compat) == "" and _eager_cpu((A,)):
        fused = _cpu.fake_quantize_blockwise(A, _code(code, A.device)[0], bs)
        if fused is not None:
            return fused if return_absmax else fused[0]
    if blocksize is None:
        q, st = quantize(A, code, compat=compat)
    else:
        q, st = quantize_blockwise(A, code, blocksize=blocksize, compat=compat)
    y = _dequantize_state(q, st, None, None, code_checked=True)  # (st.code: the quantiser's own copy)
    return (y, st.absmax) if return_absmax else y


@torch.library.custom_op("fp8probe::fake_quantize", mutates_args=())
def _fake_quantize_op(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """fake_quantize as one op for torch.compile (``blocksize`` 0: tensor-wise): quantize's NaN/Inf list
    has a data-dependent length, which breaks a compiled graph at every quantisation; this op's outputs
    (A.shape in A.dtype, the scales) do not. Its implementation is the eager fake_quantize, so a compiled
    model quantises to the same bits as an eager one (what inductor fuses around it, a float16 bias add, may
    round once less)."""
    y, absmax = fake_quantize(A, code, blocksize or None, compat=compat or None, return_absmax=True)
    return y, absmax


@_fake_quantize_op.register_fake
def _(A, code, blocksize, compat):
    nb = (1 if A.numel() else 0) if blocksize == 0 else -(-A.numel() // blocksize)
    return A.new_empty(A.shape), A.new_empty((nb,), dtype=torch.float32)


def blockwise_absmax(A: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The scales :func:`quantize_blockwise` stores for A, without quantising: float32 [ceil(n/blocksize)],
    the largest finite |a| of each block of the C-order flattened A (any codebook gives the same).
    Plain eager CPU calls on finite data read A once in C; otherwise the quantiser runs."""
    _check_tensor("A", A, _FLOATS)
    blocksize = _check_blocksize(blocksize)
    if A.numel() and _eager_cpu((A,)):
        fused = _cpu.fake_quantize_blockwise(A, get_codebook("dynamic", A.device), blocksize, with_values=False)
        if fused is not None:
            return fused[1]
    return quantize_blockwise(A, "dynamic", blocksize=blocksize)[1].absmax


# --------------------------------------------------------------------------------------------
# LLM.int8()
# --------------------------------------------------------------------------------------------
def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, (str, bytes, bool)):  # float("6") would pass a string through
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__} {threshold!r}")
    t = float(threshold)
    if not t >= 0.0 or t == float("inf"):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return t


def _op_threshold(t: float, c: str) -> float:
    """The threshold the ops compare float32 |A| with: the smallest float32 >= t by default.

    The ops compare in float32, where t itself would be rounded to nearest: for t = 3.3 that is
    3.2999999523, which made |a| = 3.2999999523 < 3.3 an outlier. Rounding t up instead makes
    ``|a| >= t`` exact for every float32/fp16/bf16 a. bnb rounds to nearest (kept for compat).
    """
    if c == "bnb" or t == 0.0:
        return t
    return _float32_up(t)


def _float32_up(t: float) -> float:
    """The smallest float32 >= t (t > 0 finite), in Python floats: no tensor to read back, so that a
    torch.compile'd int8 layer does not break its graph here (dynamo runs this once, as a constant)."""
    try:
        t32 = struct.unpack("<f", struct.pack("<f", t))[0]  # rounded to nearest
    except OverflowError:  # rounds to inf
        return math.inf
    if t32 < t:  # one float32 ulp up (t32 > 0: the next bit pattern; FLT_MAX goes to inf)
        t32 = struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", t32))[0] + 1))[0]
    return t32


def _check_rank(name: str, A: torch.Tensor) -> None:
    if A.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d tensor")


INT8_ROW_SCALES = ("bnb", "paper")


def check_row_scale(row_scale: object) -> str:
    """``row_scale`` if it names an LLM.int8 row-absmax rule (INT8_ROW_SCALES), else ValueError."""
    if row_scale not in INT8_ROW_SCALES:
        raise ValueError(f"row_scale must be one of {', '.join(INT8_ROW_SCALES)}, got {row_scale!r}")
    return row_scale  # type: ignore[return-value]


def _without_outlier_cols(A: torch.Tensor, t_op: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(copy of A with every outlier column zeroed, the sorted int64 outlier columns): the paper's row
    scale. Outlier = float32 |a| >= t_op, the ops' own test, so the columns are the ones the bnb rule
    finds; with those columns at 0 the ops' threshold-0 path yields the paper's row absmax (max over
    the remaining columns) and zero codes in the outlier columns, on every backend."""
    C = A.shape[-1]
    a2 = A.reshape(-1, C)
    cols = (a2.float().abs() >= t_op).any(dim=0).nonzero().reshape(-1)
    masked = a2.clone()
    masked[:, cols] = 0
    return masked.reshape(A.shape), cols


def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0, *, compat: str | None = None,
                          row_scale: str = "bnb") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LLM.int8() row-wise absmax quantisation (SPEC §5.1); rows = all leading dims flattened.

    Returns ``q`` (int8, A.shape), ``row_stats`` (float32 [rows]) and ``outlier_cols`` (sorted
    int64 column indices with |A| >= threshold, or None when threshold == 0). Never writes to A.
    ``row_scale``: "bnb" (SPEC §5.1: sub-threshold values of outlier columns still count in the row
    absmax) or "paper" (LLM.int8 paper: outlier columns are left out of the row absmax entirely).
    """
    _check_tensor("A", A, _FLOATS)
    _check_rank("A", A)
    t = _check_threshold(threshold)
    c = _compat(compat)
    if check_row_scale(row_scale) == "paper" and t > 0 and A.numel():  # (empty: no columns to leave out)
        A_in, cols = _without_outlier_cols(A, _op_threshold(t, c))
        q, row_stats, _ = _run("int8_vectorwise_quant", A_in, 0.0, c)
        return q, row_stats, cols
    q, row_stats, cols = _run("int8_vectorwise_quant", A, _op_threshold(t, c), c)
    return q, row_stats, (cols if t > 0 else None)


def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``q * stats[row] * fl32(1/127)`` as float32, q.shape (SPEC §5.2)."""
    _check_tensor("q", q, (torch.int8,))
    _check_rank("q", q)
    _check_tensor("stats", stats, _FLOATS)
    _check_device("int8_vectorwise_dequant", "q", q.device, stats=stats)
    rows = math.prod(q.shape[:-1])
    if stats.numel() != rows:
        raise ValueError(f"stats must have one entry per row ({rows}), got {stats.numel()}")
    return _run("int8_vectorwise_dequant", q, stats.to(torch.float32))


def int8_double_quant(A: torch.Tensor, threshold: float = 0.0, *, compat: str | None = None,
                      row_scale: str = "bnb"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row- and column-wise int8 quantisation (SPEC §5.3).

    Returns ``(q_row, q_col, row_stats, col_stats, outlier_cols)``: int8 A.shape twice, float32
    [rows], float32 [cols], int64 or None (threshold == 0). ``row_scale`` as in
    :func:`int8_vectorwise_quant`; with "paper" the outlier columns are all zero in both codes and
    their col_stats are 0 (they belong to the 16-bit path).
    """
    _check_tensor("A", A, _FLOATS)
    _check_rank("A", A)
    t = _check_threshold(threshold)
    c = _compat(compat)
    if check_row_scale(row_scale) == "paper" and t > 0 and A.numel():  # (empty: no columns to leave out)
        A_in, cols = _without_outlier_cols(A, _op_threshold(t, c))
        q_row, q_col, rs, cs, _ = _run("int8_double_quant", A_in, 0.0, c)
        return q_row, q_col, rs, cs, cols
    q_row, q_col, rs, cs, cols = _run("int8_double_quant", A, _op_threshold(t, c), c)
    return q_row, q_col, rs, cs, (cols if t > 0 else None)


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Exact ``A @ B.T`` with int32 accumulation: A int8 [..., K], B int8 [N, K] → int32 [..., N].

    bitsandbytes' signature: `out` (int32 [..., N]) receives the result and is returned; `dtype`
    must be int32, the only exact accumulator type (bnb accepts the argument and ignores it).
    """
    if dtype != torch.int32:
        raise TypeError(f"dtype must be torch.int32, got {dtype}")
    _check_int8_matmul(A, B)
    return _write_out(out, _run("int8_linear_matmul", A, B))


def _check_int8_matmul(A: torch.Tensor, B: torch.Tensor) -> None:
    _check_tensor("A", A, (torch.int8,))
    _check_tensor("B", B, (torch.int8,))
    _check_rank("A", A)
    if B.dim() != 2:
        raise ValueError(f"B must be 2-D [N, K], got shape {tuple(B.shape)}")
    if A.shape[-1] != B.shape[1]:
        raise ValueError(f"inner dimensions differ: A [..., {A.shape[-1]}] vs B [N, {B.shape[1]}]")
    if A.shape[-1] > INT8_MATMUL_MAX_K:
        raise ValueError(f"expected an inner dimension K <= {INT8_MATMUL_MAX_K} (int32 accumulation of int8 products "
                         f"is exact only up to there), got K = {A.shape[-1]}: split the reduction into chunks")
    if A.device != B.device:
        raise ValueError(f"A and B must be on the same device, got {A.device} and {B.device}")


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    out: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                    dtype: torch.dtype = torch.float16, compat: str | None = None) -> torch.Tensor:
    """``C * row_stats[i] * col_stats[j] / 127² + bias[j]`` in float32, cast to `dtype` (SPEC §5.5).

    A: int32 [..., N]; row_stats: float32 [rows]; col_stats: float32 [N]; bias: [N] or None.
    Default keeps A's shape and multiplies by fl32(1/127²); ``compat="bnb"`` uses bnb's CPU
    constant 6.200124e-05 and returns [rows, N].
    """
    _check_tensor("A", A, (torch.int32,))
    _check_rank("A", A)
    _check_mm_dequant(A.shape, row_stats, col_stats, bias, dtype)
    _check_device("int8_mm_dequant", "A", A.device, row_stats=row_stats, col_stats=col_stats, bias=bias)
    rs, cs, mode = row_stats.to(torch.float32), col_stats.to(torch.float32), _compat(compat)
    if out is not None and mode == "" and _eager_cpu((A, rs, cs, bias, out)) and _cpu.kernel("int8_mm_dequant") \
            is _cpu.int8_mm_dequant:  # (the C kernel is the op's CPU kernel: it writes out itself)
        _check_buffer(out, A.shape, dtype, A.device, "out")
        if _cpu.int8_mm_dequant_into(A, rs, cs, bias, dtype, mode, out):
            return out
    y = _run("int8_mm_dequant", A, rs, cs, bias, dtype, mode)
    return _write_out(out, y)


def _check_mm_dequant(shape: torch.Size, row_stats: torch.Tensor, col_stats: torch.Tensor,
                      bias: torch.Tensor | None, dtype: torch.dtype) -> None:
    """int8_mm_dequant's checks of its arguments besides the int32 product (of shape ``shape``)."""
    if dtype not in _FLOATS:
        raise TypeError(f"dtype must be one of float32/float16/bfloat16, got {dtype}")
    _check_tensor("row_stats", row_stats, _FLOATS)
    _check_tensor("col_stats", col_stats, _FLOATS)
    n = shape[-1]
    rows = math.prod(shape[:-1])
    if row_stats.numel() != rows:
        raise ValueError(f"row_stats must have {rows} entries (one per row of A), got {row_stats.numel()}")
    if col_stats.numel() != n:
        raise ValueError(f"col_stats must have {n} entries (A.shape[-1]), got {col_stats.numel()}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor of {n} entries or None, got {type(bias).__name__}")
    if bias is not None:  # (an int or bool bias was added as if it were a float one; matmul refused it)
        _check_tensor("bias", bias, _FLOATS)
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} entries, got {bias.numel()}")


def int8_scaled_mm(A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None, *,
                   compat: str | None = None) -> torch.Tensor:
    """``int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias)`` in `dtype` (default fp16).

    Plain eager CPU calls in the default mode whose int8 GEMM runs in float32 (backends/int8_gemm.py) skip
    the int32 product: backends/cpu.int8_scaled_mm dequantises the exact float32 one, bit-identical."""
    dtype = dtype or torch.float16
    if isinstance(A, torch.Tensor):
        _check_device("int8_scaled_mm", "A", A.device, B=B, row_stats=row_stats, col_stats=col_stats, bias=bias)
    if _compat(compat) == "" and _eager_cpu((A, B, row_stats, col_stats, bias)):
        _check_int8_matmul(A, B)
        _check_mm_dequant((*A.shape[:-1], B.shape[0]), row_stats, col_stats, bias, dtype)
        y = _cpu.int8_scaled_mm(A, B, row_stats.to(torch.float32), col_stats.to(torch.float32), bias, dtype)
        if y is not None:
            return y
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias=bias, dtype=dtype, compat=compat)


def int8_mixed_scaled_mm(A: torch.Tensor, CA: torch.Tensor, CB: torch.Tensor, SCA: torch.Tensor, SCB: torch.Tensor,
                         outlier_cols: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                         compat: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() mixed-precision product (SPEC §5.7): int8 part + outlier columns in A.dtype.

    A: [..., K] original activations; CA: int8 A.shape with outlier columns zeroed; CB: int8
    [N, K]; SCA: [rows]; SCB: [N]. The outlier part uses the *dequantised* int8 weight columns.
    Returns ``(out [..., N] in A.dtype, subA [rows, n_outliers])``.
    """
    _check_tensor("A", A, _FLOATS)
    _check_tensor("CA", CA, (torch.int8,))
    if A.shape != CA.shape:
        raise ValueError(f"A and CA must have the same shape, got {tuple(A.shape)} and {tuple(CA.shape)}")
    # (in this function's own argument names: int8_scaled_mm's checks below name A/B and row_stats/col_stats)
    _check_tensor("CB", CB, (torch.int8,))
    if A.dim() < 1 or CB.dim() != 2 or CB.shape[1] != A.shape[-1]:
        raise ValueError(f"CB must be int8 [N, K] with K = A.shape[-1] = {A.shape[-1] if A.dim() else '?'}, got "
                         f"{list(CB.shape)}")
    for name, stats, n, what in (("SCA", SCA, A.numel() // max(A.shape[-1], 1), "one per row of A"),
                                 ("SCB", SCB, CB.shape[0], "one per row of CB, CB.shape[0]")):
        _check_tensor(name, stats, _FLOATS)
        if stats.numel() != n:
            raise ValueError(f"{name} must have {n} entries ({what}), got {list(stats.shape)}")
    if outlier_cols is not None:
        _check_tensor("outlier_cols", outlier_cols, (torch.int64, torch.int32))
    _check_device("int8_mixed_scaled_mm", "A", A.device, CA=CA, CB=CB, SCA=SCA, SCB=SCB, outlier_cols=outlier_cols,
                  bias=bias)
    out = int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype, compat=compat)
    # Under torch.compile the column count and values are data-dependent (no branch, no check):
    # an empty set adds an empty product.
    compiling = torch.compiler.is_compiling()
    if outlier_cols is None or (not compiling and outlier_cols.numel() == 0):
        return out, torch.empty(0, dtype=A.dtype, device=A.device)
    K = A.shape[-1]
    if outlier_cols.dim() != 1 or (not compiling and (int(outlier_cols.min()) < 0 or int(outlier_cols.max()) >= K)):
        raise ValueError(f"outlier_cols must be 1-D column indices in [0, {K}), got {outlier_cols.tolist()}")
    if not compiling and torch.unique(outlier_cols).numel() != outlier_cols.numel():  # (a repeat counted twice)
        raise ValueError(f"outlier_cols must not repeat a column, got {outlier_cols.tolist()}")
    a2 = A.reshape(-1, K)
    subA = a2[:, outlier_cols].contiguous()
    subB = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype).t()
    out2 = out.reshape(-1, out.shape[-1]).addmm(subA, subB)
    return out2.reshape(out.shape), subA


# --------------------------------------------------------------------------------------------
# OCP FP8 / MX scaled casts
# --------------------------------------------------------------------------------------------
_SCALED_FMTS = tuple(_ref.SCALED_FORMATS)
#: the tiles each block-scaled format can have (first = the default): MX blocks of 32 and NVFP4 blocks
#: of 16 along the last (contraction) dim; NVFP4 also 16×16 2-D blocks (NVIDIA's weight recipe)
_FIXED_BLOCKS = {**{f: ((1, 32),) for f in _ref.MX_FORMATS}, "nvfp4": ((1, 16), (16, 16))}


@dataclass(frozen=True)
class ScaledTensor:
    """A low-precision tensor with float32 scales. Convention: **x_hp ≈ value(data) * scale[tile]**
    (``* global_scale`` too for NVFP4).

    data: torch float8 (e4m3fn / e5m2), or uint8 element codes (one per byte, unpacked) for the
    4/6-bit formats, the original shape; scale: float32 [ceil(rows/block[0]), ceil(cols/block[1])]
    over the [rows, cols] view (rows = prod of the leading dims); fmt, granularity, block and
    scale_rule say how it was made; global_scale: NVFP4's 0-D float32 per-tensor scale, else None;
    dtype: the original dtype.
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: str
    granularity: str
    block: tuple[int, int]
    dtype: torch.dtype
    scale_rule: str = "floor"
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Shorthand for :func:`dequantize_scaled`."""
        return dequantize_scaled(self, dtype)

    def element_values(self) -> torch.Tensor:
        """float32 value of every stored element before scaling (fp8 cast, or 4/6-bit code decoded)."""
        return _ref.element_values(self.data, self.fmt)


def quantize_scaled(x: torch.Tensor, fmt: str = "e4m3", granularity: str | None = None,
                    block: tuple[int, int] | None = None, scale_rule: str = "floor", *, rounding: str = "nearest",
                    seed: int = 0) -> ScaledTensor:
    """Scaled cast to OCP FP8, OCP MX or NVFP4 (OCP 8-bit FP, OCP MX v1.0); see the convention on ScaledTensor.

    fmt: "e4m3" | "e5m2" (scale = amax/fmt_max, amax over finite values, 1 for a zero tile);
    "mxfp8-e4m3" | "mxfp8-e5m2" | "mxfp6-e2m3" | "mxfp6-e3m2" | "mxfp4-e2m1" (blocks of 32 along the
    last dim, power-of-two E8M0 scales chosen by `scale_rule`); "nvfp4" (E2M1 elements, E4M3 block
    scales over blocks of 16 along the last dim, or 16×16, and a float32 per-tensor scale). The exact
    rules are in ``backends/reference.quantize_scaled`` and ``mx_scale``.
    granularity: "tensor" (default for e4m3/e5m2), "row" (one scale per row of the [rows, cols] view) or
    "block" with ``block=(1, 128)`` (activation tiles), ``(128, 128)`` (weight blocks) or any positive
    pair (``block=`` alone implies "block"; with "tensor" or "row" it is refused); partial tiles at the ends are
    allowed. The block-scaled formats accept only "block" (their
    default) with their own tiles (None = the first): MX (1, 32), NVFP4 (1, 16) or (16, 16).
    scale_rule: "floor" (OCP MX), "rceil" (NVIDIA) or "even" (microxcaling); MX formats only.
    rounding: "nearest" (even), or "stochastic" for the 4/6-bit formats (MXFP4/MXFP6/NVFP4): unbiased,
    each element rounds up with probability equal to its distance from the grid value below, the
    random numbers a pure function of ``seed`` and the element's index (reference.stochastic_uniform:
    the same bits on every device); plain eager CPU calls run the C kernel (backends/cpu.py), others the
    torch reference on x's device.
    Finite values saturate to ±fmt_max.
    """
    _check_tensor("x", x, _FLOATS)
    granularity, tile = scaled_tile(x.shape, fmt, granularity, block, scale_rule)
    _ref.check_rounding(rounding, fmt)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"expected an int seed, got {type(seed).__name__}")
    global_scale = _cpu.nvfp4_global_scale(x) if fmt == "nvfp4" else None  # the reference's value; one C pass on CPU
    if rounding == "stochastic":
        # Not an op argument, so no dispatcher: the CPU kernel (C) wherever a nearest cast's op call would reach it
        # (plain eager CPU tensors; autograd-tracked too: the op has no gradient), else the reference
        cast = _cpu.kernel("quantize_scaled") if _eager_cpu((x.detach() if x.requires_grad else x,
                                                             global_scale)) else _ref.quantize_scaled
        data, scale = cast(x, fmt, tile[0], tile[1], scale_rule, global_scale, rounding, seed)
    else:
        data, scale = _run("quantize_scaled", x, fmt, tile[0], tile[1], scale_rule, global_scale)
    return ScaledTensor(data=data, scale=scale, fmt=fmt, granularity=granularity, block=tile, dtype=x.dtype,
                        scale_rule=scale_rule, global_scale=global_scale)


def hadamard_transform(x: torch.Tensor, seed: int | None = 0) -> torch.Tensor:
    """The random Hadamard transform of NVIDIA's NVFP4 recipe along the last dim: every run of 16
    elements (x zero-padded to whole runs) times the orthogonal diag(s)·H16/4, H16 the Sylvester Hadamard
    matrix and s = ±1 signs drawn from ``seed`` (None: no signs); float32 [..., ceil(C/16)·16], by the
    butterfly (the same bits on every device).
    Applied alike to both operands of a GEMM along its contraction dim it leaves the exact product
    unchanged while spreading each run's outliers over the run (backends/reference.hadamard_transform)."""
    _check_tensor("x", x, _FLOATS)
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dim, got a 0-d tensor")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"expected an int seed or None, got {type(seed).__name__}")
    if _eager_cpu((x,)):  # the C pass (cpu.hadamard_transform: the same bits); else the torch ops (autograd, CUDA)
        return _cpu.hadamard_transform(x, seed)
    return _ref.hadamard_transform(x, seed)


def scaled_tile(shape: torch.Size | tuple[int, ...], fmt: str, granularity: str | None = None,
                block: tuple[int, int] | None = None, scale_rule: str = "floor") -> tuple[str, tuple[int, int]]:
    """(granularity, (tile rows, tile cols)) that quantize_scaled uses for a tensor of ``shape`` with these
    arguments (its [rows, cols] view: rows = prod(shape[:-1])); ValueError for arguments it rejects."""
    if fmt not in _SCALED_FMTS:
        raise ValueError(f"fmt must be one of {', '.join(_SCALED_FMTS)}, got {fmt!r}")
    if scale_rule not in _ref.SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {', '.join(_ref.SCALE_RULES)}, got {scale_rule!r}")
    if scale_rule != "floor" and fmt not in _ref.MX_FORMATS:
        raise ValueError(f"scale_rule applies to the MX formats ({', '.join(_ref.MX_FORMATS)}) only; "
                         f"expected 'floor' for fmt={fmt!r}, got {scale_rule!r}")
    rows = math.prod(shape[:-1]) if len(shape) else 1
    cols = shape[-1] if len(shape) else 1
    if fmt in _FIXED_BLOCKS:
        allowed = _FIXED_BLOCKS[fmt]
        if granularity not in (None, "block") or (block is not None and (not isinstance(block, (tuple, list))
                                                                       or tuple(block) not in allowed)):
            raise ValueError(f"{fmt} needs granularity='block' with block in {list(allowed)}; got "
                             f"granularity={granularity!r}, block={block!r}")
        granularity, tile = "block", tuple(block) if block is not None else allowed[0]
    elif granularity not in (None, "tensor", "row", "block"):
        raise ValueError(f"granularity must be 'tensor', 'row' or 'block', got {granularity!r}")
    elif block is not None and granularity in ("tensor", "row"):  # (a tile given and dropped: silently per tensor)
        raise ValueError(f"block={block!r} goes with granularity='block' (or none), got granularity={granularity!r}")
    elif granularity == "block" or block is not None:  # (block= alone means block tiles)
        tile = _positive_pair(block) if block is not None else None
        if tile is None:
            raise ValueError(f"granularity='block' needs block=(rows, cols) of positive ints, got {block!r}")
        granularity = "block"
    elif granularity == "row":
        tile = (1, max(cols, 1))
    else:
        granularity, tile = "tensor", (max(rows, 1), max(cols, 1))
    return granularity, tile


def _positive_pair(block: object) -> tuple[int, int] | None:
    """(rows, cols) from a pair of positive integers (numpy integers too; not bools), else None."""
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        return None
    rows, cols = (_positive_int(b) for b in block)
    return None if rows is None or cols is None else (rows, cols)


def _check_scaled_tensor(st: ScaledTensor) -> None:
    """A ScaledTensor built or edited by hand: an unknown fmt was ignored, float data and an NVFP4 tensor without
    its global scale dequantised to silent wrong values, a scale of the wrong shape or a zero block gave torch
    reshape errors or ZeroDivisionError."""
    if not isinstance(st, ScaledTensor):
        raise TypeError(f"st must be a ScaledTensor, got {type(st).__name__}")
    if st.fmt not in _SCALED_FMTS:
        raise ValueError(f"ScaledTensor.fmt must be one of {', '.join(_SCALED_FMTS)}, got {st.fmt!r}")
    _check_tensor("ScaledTensor.data", st.data, (_ref.SCALED_FORMATS[st.fmt][0],))
    block = st.block
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"ScaledTensor.block must be (rows, cols) of positive ints, got {block!r}")
    rows, cols = _ref._rows_cols(st.data.shape)
    tiles = (-(-rows // block[0]), -(-cols // block[1]))
    _check_tensor("ScaledTensor.scale", st.scale, (torch.float32,))
    if tuple(st.scale.shape) != tiles:
        raise ValueError(f"ScaledTensor.scale must have shape {list(tiles)} (one per {block[0]}x{block[1]} tile of "
                         f"the [{rows}, {cols}] data), got {list(st.scale.shape)}")
    g = st.global_scale
    if st.fmt == "nvfp4":
        if g is None:
            raise ValueError("an nvfp4 ScaledTensor needs global_scale, a 0-d float32 tensor, got None")
        _check_tensor("ScaledTensor.global_scale", g, (torch.float32,))
        # 0-d, or one per row with 1-row tiles (quantize_scaled's per-row NVFP4 scales)
        if g.dim() != 0 and not (block[0] == 1 and tuple(g.shape) == (tiles[0], 1)):
            raise ValueError(f"ScaledTensor.global_scale must be 0-d (or [{tiles[0]}, 1] with 1-row tiles), "
                             f"got shape {list(g.shape)}")
    elif g is not None:
        raise ValueError(f"ScaledTensor.global_scale belongs to nvfp4; expected None for fmt {st.fmt!r}, "
                         f"got a tensor")
    _check_device("dequantize_scaled", "ScaledTensor.data", st.data.device, scale=st.scale, global_scale=g)


def dequantize_scaled(st: ScaledTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``value(data) * scale[tile]`` (float32 math; NVFP4 then ``* global_scale``) cast to `dtype`
    (default: the original dtype). `out`: a tensor of that dtype and st.data's shape to write into
    (a reused buffer saves a fresh output's page faults: on CPU the kernel writes it in place)."""
    _check_scaled_tensor(st)
    out_dtype = dtype or st.dtype
    if out_dtype not in _FLOATS:
        raise TypeError(f"dtype must be one of float32/float16/bfloat16, got {out_dtype}")
    if out is not None:
        _check_buffer(out, st.data.shape, out_dtype, st.data.device, "out")
    if out is not None and _cpu.dequantize_scaled_into(st.data, st.scale, st.block[0], st.block[1], out_dtype,
                                                       st.fmt, st.global_scale, out):
        return out  # CPU fast path wrote `out` in place
    if st.data.dtype == torch.uint8 or st.global_scale is not None:
        y = _run("dequantize_scaled", st.data, st.scale, st.block[0], st.block[1], out_dtype, st.fmt,
                 st.global_scale)
    else:
        y = _run("dequantize_scaled", st.data, st.scale, st.block[0], st.block[1], out_dtype)
    return _write_out(out, y)
