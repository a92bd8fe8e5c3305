"""Autograd layer of the matmul suite: bitsandbytes' FP8 research matmuls, SwitchBack and LLM.int8() (SPEC §6, §7)."""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from . import functional as F

__all__ = [
    "MatmulLtState",
    "GlobalOutlierPooler",
    "get_block_sizes",
    "MatMulFP8Mixed",
    "MatMulFP8Global",
    "SwitchBackBnb",
    "MatMul8bitLt",
    "matmul_fp8_mixed",
    "matmul_fp8_global",
    "switchback_bnb",
    "matmul",
]

_COMPAT_MODES = (None, "bnb")
# Candidate block sizes of get_block_sizes (SPEC §7.1): the smallest power of two in 64..4096
# that is >= the feature count, capped at 4096.
_MIN_BLOCK = 64
_MAX_BLOCK = 4096
# int8_double_quant's (SPEC §5.3) column codes are what the correct grad_B needs; with
# threshold 0 it never reports outlier columns.
_NO_THRESHOLD = 0.0


def _check_compat(compat: str | None) -> None:
    if compat not in _COMPAT_MODES:
        raise ValueError(f"compat must be None or 'bnb', got {compat!r}")


def _check_float(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16 or float32), got {t.dtype}")


def _check_no_float64(fn: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """The matmuls whose quantisers read float16/bfloat16/float32 only refuse float64 by their own name (the
    refusal came from a functional op naming its argument "A"; matmul_fp8_global reads float64 as float32)."""
    for name, t in (("A", A), ("B", B)):
        if t.dtype == torch.float64:
            raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32 (its quantiser reads no float64; "
                            "matmul_fp8_global casts float64 operands to float32 to quantise), got float64: "
                            f"convert with .float()")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must have shape {list(shape)}, dtype {dtype} and device {device}, "
            f"got shape {list(out.shape)}, dtype {out.dtype}, device {out.device}")


# torch's node that raises when a second backward reaches it (what @once_differentiable uses). It is private: a torch
# without it gets the plain first-order backward, whose second backward fails with torch's generic message.
_DELAYED_ERROR = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)


def _first_order_only(backward):
    """A Function's backward that quantises (or reads int8 codes) has no derivative of its own: run it without
    building a graph and, under ``create_graph=True``, give its gradients a node that refuses a second backward
    by name (torch's @once_differentiable does so only where the incoming gradient requires grad; otherwise the
    second backward failed with the generic "element 0 of tensors does not require grad")."""
    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: torch.Tensor):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _DELAYED_ERROR is None:
            return outputs
        name = backward.__qualname__.split(".")[0]
        # The node's inputs are the detached gradients and the Function's own inputs that are still alive: a second
        # backward towards A or B (torch.autograd.grad(grad_A.sum(), B)) reaches the node and raises, where it found
        # no path, said B "appears to not have been used in the graph" and, with allow_unused=True, returned None.
        anchors = [t for t in (ref() for ref in getattr(ctx, "anchors", ())) if t is not None]
        err = _DELAYED_ERROR(
            f"double backward through {name} is not supported: its backward is not differentiable "
            "(quantised operands); compute the gradient with create_graph=False".encode(), len(outputs) + len(anchors))
        fake = [None if g is None else g.detach().requires_grad_() for g in outputs]
        return tuple(err(*fake, *anchors))[:len(outputs)]
    return wrapper


def _keep_anchors(ctx: Any, *inputs: Any) -> None:
    """Weak references to the Function's inputs that require grad, for _first_order_only's refusing node (weak: no
    input is kept alive for it; one the caller differentiates towards is alive, the caller holds it)."""
    ctx.anchors = [weakref.ref(t) for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _finish(ctx: Any, output: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Honour `out=` (bitsandbytes ignores it, Q22): copy the result into `out` and return `out`."""
    if out is None:
        return output
    out.copy_(output)
    ctx.mark_dirty(out)
    return out


# ------------------------------------------------------------------------------------------------
# State objects (SPEC §6.1)
# ------------------------------------------------------------------------------------------------
@dataclass
class MatmulLtState:
    """Per-layer state of LLM.int8() / SwitchBack: the int8 weight cache and the outlier settings.

    ``CB`` is the int8 weight ``[out, in]`` and ``SCB`` its float32 row absmax ``[out]`` (one scale
    per output channel). ``CxB``, ``SB``, ``CxBt``, ``SBt``, ``CBt``, ``formatB`` and
    ``_tile_indices`` are bitsandbytes' legacy layout fields, kept so code written for
    ``bnb.MatmulLtState`` runs unchanged. ``idx`` holds the outlier columns of the last forward.
    ``weight_key`` is fp8probe's cache key (storage pointer, ``_version``, shape, dtype, device of
    the weight the cached ``CB`` was computed from, SPEC Q11) and ``weight_ref`` a weak reference to
    that weight: the cache serves only the same tensor, alive and unchanged (a freed weight's address
    comes back with the next tensor of its size, at version 0).
    """

    _tile_indices: torch.Tensor | None = None
    force_no_igemmlt: bool = False
    CB: torch.Tensor | None = None
    CxB: torch.Tensor | None = None
    SB: Any = None
    SCB: torch.Tensor | None = None
    CxBt: torch.Tensor | None = None
    SBt: Any = None
    CBt: torch.Tensor | None = None
    subB: torch.Tensor | None = None
    outlier_pool: "GlobalOutlierPooler | None" = None
    has_accumulated_gradients: bool = False
    threshold: float = 0.0
    idx: torch.Tensor | None = None
    is_training: bool = True
    has_fp16_weights: bool = True
    use_pool: bool = False
    formatB: str = "row"
    weight_key: tuple | None = None
    weight_ref: Any = field(default=None, repr=False, compare=False)
    #: (rows, columns) of the cached weight holding a NaN, or None (nan_lines); fp8probe's addition.
    weight_nan: Any = field(default=None, repr=False, compare=False)
    #: LLM.int8 row absmax of A: "bnb" (SPEC §5.1, outlier columns' sub-threshold values count) or
    #: "paper" (outlier columns left out; functional.int8_vectorwise_quant). fp8probe's addition.
    row_scale: str = "bnb"
    #: False: MatMul8bitLt / SwitchBackBnb keep the weight itself (autograd holds it anyway) for the backward and
    #: quantise it again there, instead of keeping its int8 rows CB (one byte per weight element) from the forward
    #: to the backward: the same call on the same weight, the same bits. Only where the forward's CB is that
    #: quantisation of the weight as it is (default compat, a float weight, the cache keyed to this version);
    #: otherwise CB is kept. The state's own cache (CB, SCB) is unaffected. fp8probe's addition.
    save_weight_codes: bool = True

    def reset_grads(self) -> None:
        """Forget the cached int8 weight (CB, SCB and the legacy layouts) so the next forward re-quantises."""
        self.CB = None
        self.CxB = None
        self.SB = None
        self.SCB = None
        self.CxBt = None
        self.SBt = None
        self.CBt = None
        self.weight_key = None
        self.weight_ref = None
        self.weight_nan = None

    def __getstate__(self) -> dict[str, Any]:
        # (a weak reference cannot be pickled; an unpickled state's cache then serves no tensor)
        return {**self.__dict__, "weight_ref": None}

    @property
    def tile_indices(self) -> torch.Tensor:
        raise NotImplementedError(
            "tile_indices belonged to the pre-0.45 bitsandbytes tiled int8 layout; fp8probe (like "
            "bitsandbytes >= 0.45) only uses row-major int8 weights")


class GlobalOutlierPooler:
    """Process-wide set of outlier feature columns seen by layers of one model width (SPEC §6.1).

    The first ``feature_dim`` passed to :meth:`add_outliers` fixes the model width; calls with any
    other width are ignored (bitsandbytes' rule, so only the residual-stream layers are pooled).
    fp8probe uses it when ``MatmulLtState.use_pool`` is set: outlier columns found by any layer stay
    in 16-bit in every later forward (bitsandbytes 0.49.2 attaches the pool but never reads it).
    """

    _instance: "GlobalOutlierPooler | None" = None

    def __init__(self) -> None:
        raise RuntimeError("GlobalOutlierPooler is a singleton: call GlobalOutlierPooler.get_instance()")

    def initialize(self) -> None:
        """Empty the pool and forget the model width."""
        self.outliers: set[int] = set()
        self.model_dim: int | None = None

    @classmethod
    def get_instance(cls) -> "GlobalOutlierPooler":
        """The process-wide pooler (created empty on first use)."""
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def add_outliers(self, outlier_idx: torch.Tensor, feature_dim: int) -> None:
        """Add column indices (int tensor) seen in a layer whose input width is ``feature_dim``."""
        if self.model_dim is None:
            self.model_dim = int(feature_dim)
        if int(feature_dim) != self.model_dim:
            return
        self.outliers.update(int(i) for i in outlier_idx.reshape(-1).tolist())

    def get_current_outlier_idx(self) -> torch.Tensor:
        """The pooled column indices as a sorted int64 CPU tensor (sorted, unlike bnb's set order)."""
        return torch.tensor(sorted(self.outliers), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# Block sizes (SPEC §7.1)
# ------------------------------------------------------------------------------------------------
def _block_size_for(features: int, what: str, compat: str | None) -> int:
    if features < 1:
        if compat == "bnb":
            # bitsandbytes walks off the end of its size list [4096, ..., 64, 0] (Q20).
            raise IndexError("list index out of range")
        raise ValueError(f"{what} must be >= 1 to choose a block size, got {features}")
    size = _MIN_BLOCK
    while size < features and size < _MAX_BLOCK:
        size *= 2
    return size


def get_block_sizes(input_matrix: torch.Tensor | int, weight_matrix: torch.Tensor | int,
                    *, compat: str | None = None) -> tuple[int, int]:
    """Block sizes ``(bsz, bsz2)`` for the activation and the output gradient (SPEC §7.1).

    ``input_matrix``: the activation ``[..., in]`` or ``in_features`` as an int. ``weight_matrix``:
    the weight (``[out, in]`` or ``[in, out]``; the dimension that is not ``in`` is taken, checking
    ``shape[1]`` first like bitsandbytes) or ``out_features`` as an int. Each size is
    ``min(4096, max(64, next_pow2(features)))``: 1→64, 65→128, 1000→1024, 20000→4096.
    A feature count of 0 raises ValueError (``compat="bnb"``: IndexError, like bitsandbytes).
    """
    _check_compat(compat)
    if isinstance(input_matrix, torch.Tensor):
        if input_matrix.dim() == 0:
            raise ValueError("input_matrix must have at least one dimension, got a 0-d tensor")
        in_features = int(input_matrix.shape[-1])
    elif isinstance(input_matrix, int):
        in_features = input_matrix
    else:
        raise TypeError(f"input_matrix must be a tensor or an int, got {type(input_matrix).__name__}")
    if isinstance(weight_matrix, torch.Tensor):
        if weight_matrix.dim() != 2:
            raise ValueError(f"weight_matrix must be 2-D, got shape {list(weight_matrix.shape)}")
        out_features = int(weight_matrix.shape[0] if weight_matrix.shape[1] == in_features else weight_matrix.shape[1])
    elif isinstance(weight_matrix, int):
        out_features = weight_matrix
    else:
        raise TypeError(f"weight_matrix must be a tensor or an int, got {type(weight_matrix).__name__}")
    return (_block_size_for(in_features, "in_features", compat),
            _block_size_for(out_features, "out_features", compat))


# ------------------------------------------------------------------------------------------------
# FP8 research matmuls (SPEC §7.2). B is [in, out] (e.g. weight.t()); A is [..., in].
# "Fake quantisation" = dequantise(quantise(X)) in X's dtype; every matmul is an ordinary torch
# matmul in the input dtype, exactly as bitsandbytes does it.
# ------------------------------------------------------------------------------------------------
# Both take the operand detached: they run inside an autograd Function's forward/backward (no graph is
# built there), and the fused C pass of fake_quantize declines tensors that require grad, so a weight or
# an activation with requires_grad went through the two-step quantise + dequantise (the same bits, slower).
def _fq_global(x: torch.Tensor, code: torch.Tensor | str, compat: str | None) -> torch.Tensor:
    # The global quantiser reads float32 only (SPEC §3, Q21): bnb passes X.float() and casts back.
    return F.fake_quantize(x.detach().float(), code, None, compat=compat).to(x.dtype)


def _fq_blockwise(x: torch.Tensor, code: torch.Tensor | str, blocksize: int, compat: str | None) -> torch.Tensor:
    # Blocks run over the flattened tensor (SPEC §4.1, Q18): they straddle rows unless in_f | bsz.
    return F.fake_quantize(x.detach(), code, blocksize, compat=compat)


def _check_operands(A: torch.Tensor, B: torch.Tensor, in_axis: int, b_layout: str, in_note: str,
                    int8_B: bool = False) -> None:
    """Shape/device checks shared by every matmul here; B's contraction axis is `in_axis`.

    ``int8_B``: B may also be an int8 tensor (an already quantised LLM.int8() weight).
    """
    _check_float("A", A)
    if not (int8_B and isinstance(B, torch.Tensor) and B.dtype == torch.int8):
        _check_float("B", B)
    if A.dim() < 1:
        raise ValueError("A must have at least one dimension [..., in], got a 0-d tensor")
    if B.dim() != 2:
        raise ValueError(f"B must be {b_layout}, got shape {list(B.shape)}")
    if A.shape[-1] != B.shape[in_axis]:
        raise ValueError(f"A's last dimension ({A.shape[-1]}) must equal B.shape[{in_axis}] ({in_note}); "
                         f"got A {list(A.shape)}, B {list(B.shape)}")


def _check_fp8_operands(A: torch.Tensor, B: torch.Tensor) -> None:
    _check_operands(A, B, 0, "2-D [in, out]", f"in = {B.shape[0] if B.dim() else '?'}")
    if A.dtype != B.dtype:
        raise TypeError(f"A and B must have the same dtype, got {A.dtype} and {B.dtype}")
    if A.device != B.device:
        raise ValueError(f"A and B must be on the same device, got {A.device} and {B.device}")


def _codes(A: torch.Tensor, fw_code: torch.Tensor | None, bw_code: torch.Tensor | None
           ) -> tuple[torch.Tensor | str, torch.Tensor | str]:
    # The defaults by name: fake_quantize resolves a name to a codebook it knows to be valid and sorted
    # (functional._code), where a fresh get_codebook copy per call was validated and order-checked again.
    for name, code in (("fw_code", fw_code), ("bw_code", bw_code)):
        if not (code is None or isinstance(code, (str, torch.Tensor))):
            raise TypeError(f"{name} must be a codebook tensor, a codebook name or None, got {type(code).__name__}")
    fw = "bnb-e4m3" if fw_code is None else fw_code if isinstance(fw_code, str) else fw_code.to(A.device)
    bw = "bnb-e5m2" if bw_code is None else bw_code if isinstance(bw_code, str) else bw_code.to(A.device)
    return fw, bw


def _resolve_blocks(A: torch.Tensor, B: torch.Tensor, bsz: int, bsz2: int, compat: str | None) -> tuple[int, int]:
    for name, value in (("bsz", bsz), ("bsz2", bsz2)):
        if isinstance(value, bool) or not isinstance(value, int):  # (int() truncated 1.7 to 1 and read "64")
            raise TypeError(f"{name} must be an integer block size (-1: get_block_sizes), got {value!r}")
        if value == 0 or value < -1:  # (named here: the quantiser's own check says "blocksize", naming neither)
            raise ValueError(f"{name} must be a positive block size or -1 (get_block_sizes), got {value}")
    if bsz == -1 or bsz2 == -1:
        auto, auto2 = get_block_sizes(A, B, compat=compat)
        bsz = auto if bsz == -1 else bsz
        bsz2 = auto2 if bsz2 == -1 else bsz2
    return bsz, bsz2


def _fp8_prologue(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None,
                  fw_code: torch.Tensor | None, bw_code: torch.Tensor | None, compat: str | None
                  ) -> tuple[torch.Tensor | str, torch.Tensor | str, torch.Tensor | None]:
    """Checks shared by the FP8 functions; returns (fw_code, bw_code, output-if-empty-else-None)."""
    _check_compat(compat)
    _check_fp8_operands(A, B)
    _keep_anchors(ctx, A, B)
    out_shape = (*A.shape[:-1], B.shape[1])
    _check_out(out, out_shape, A.dtype, A.device)
    fw, bw = _codes(A, fw_code, bw_code)
    ctx.is_empty = A.numel() == 0 or B.numel() == 0
    if not ctx.is_empty:
        return fw, bw, None
    ctx.shapes = (A.shape, B.shape, A.dtype, B.dtype)
    # A zero-size contraction is an exact matmul of zeros; never return uninitialised memory.
    return fw, bw, _finish(ctx, torch.zeros(out_shape, dtype=A.dtype, device=A.device), out)


def _fp8_empty_grads(ctx: Any, grad_output: torch.Tensor) -> tuple:
    """Zero gradients of the right shapes for an empty FP8 matmul (SPEC §7.2)."""
    a_shape, b_shape, a_dtype, b_dtype = ctx.shapes
    dev = grad_output.device
    return (torch.zeros(a_shape, dtype=a_dtype, device=dev), torch.zeros(b_shape, dtype=b_dtype, device=dev),
            None, None, None, None, None, None)


class MatMulFP8Mixed(torch.autograd.Function):
    """``A @ B`` with blockwise-E4M3 A, global-E4M3 B; grad_A from blockwise-E5M2 grad (SPEC §7.2).

    grad_B = Aᵀ·grad is computed **unquantised** (that is the algorithm, Q19). ``bsz`` is the block
    size of A (over flattened A), ``bsz2`` of the output gradient; -1 means get_block_sizes(A, B).
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                fw_code: torch.Tensor | None = None, bw_code: torch.Tensor | None = None,
                bsz: int = 1024, bsz2: int = 1024, compat: str | None = None) -> torch.Tensor:
        fw, bw, empty_out = _fp8_prologue(ctx, A, B, out, fw_code, bw_code, compat)
        _check_no_float64("MatMulFP8Mixed", A, B)
        if empty_out is not None:
            return empty_out
        bsz, bsz2 = _resolve_blocks(A, B, bsz, bsz2, compat)
        fp8A = _fq_blockwise(A, fw, bsz, compat)
        fp8B = _fq_global(B, fw, compat)
        output = torch.matmul(fp8A, fp8B)
        ctx.save_for_backward(A, fp8B)
        ctx.bw_code, ctx.bsz2, ctx.compat = bw, bsz2, compat
        return _finish(ctx, output, out)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor):
        if ctx.is_empty:
            return _fp8_empty_grads(ctx, grad_output)
        A, fp8B = ctx.saved_tensors
        grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            fp8G = _fq_blockwise(grad_output.contiguous(), ctx.bw_code, ctx.bsz2, ctx.compat)
            grad_A = torch.matmul(fp8G.to(fp8B.dtype), fp8B.t()).to(A.dtype)
        if ctx.needs_input_grad[1]:
            A2 = A.reshape(-1, A.shape[-1])
            G2 = grad_output.reshape(-1, grad_output.shape[-1]).to(A.dtype)
            grad_B = torch.matmul(A2.t(), G2).to(fp8B.dtype)
        return grad_A, grad_B, None, None, None, None, None, None


class MatMulFP8Global(torch.autograd.Function):
    """``A @ B`` with global E4M3 A and B; both backward matmuls use global E5M2 grad (SPEC §7.2).

    grad_A = fq_e5m2(grad)·fq_e4m3(B)ᵀ, grad_B = fq_e4m3(A)ᵀ·fq_e5m2(grad). ``bsz``/``bsz2`` are
    accepted for signature parity and ignored (one absmax per tensor).
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                fw_code: torch.Tensor | None = None, bw_code: torch.Tensor | None = None,
                bsz: int = 1024, bsz2: int = 1024, compat: str | None = None) -> torch.Tensor:
        fw, bw, empty_out = _fp8_prologue(ctx, A, B, out, fw_code, bw_code, compat)
        if empty_out is not None:
            return empty_out
        fp8A = _fq_global(A, fw, compat)
        fp8B = _fq_global(B, fw, compat)
        output = torch.matmul(fp8A, fp8B)
        # fq(Aᵀ) = fq(A)ᵀ elementwise (one absmax), so the forward's fp8A serves grad_B too.
        ctx.save_for_backward(fp8A, fp8B)
        ctx.bw_code, ctx.compat = bw, compat
        return _finish(ctx, output, out)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor):
        if ctx.is_empty:
            return _fp8_empty_grads(ctx, grad_output)
        fp8A, fp8B = ctx.saved_tensors
        fp8G = _fq_global(grad_output, ctx.bw_code, ctx.compat).to(fp8A.dtype)
        grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_A = torch.matmul(fp8G, fp8B.t()).to(fp8A.dtype)
        if ctx.needs_input_grad[1]:
            grad_B = torch.matmul(fp8A.reshape(-1, fp8A.shape[-1]).t(),
                                  fp8G.reshape(-1, fp8G.shape[-1])).to(fp8B.dtype)
        return grad_A, grad_B, None, None, None, None, None, None


def matmul_fp8_mixed(A: torch.Tensor, B: torch.Tensor, fw_code: torch.Tensor | None = None,
                     bw_code: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     bsz: int = -1, bsz2: int = -1, *, compat: str | None = None) -> torch.Tensor:
    """FP8 "mixed" matmul ``A [..., in] @ B [in, out] -> [..., out]`` (SPEC §7.2, :class:`MatMulFP8Mixed`).

    ``fw_code``/``bw_code`` default to the bnb-e4m3 / bnb-e5m2 codebooks; ``bsz``/``bsz2`` = -1
    picks :func:`get_block_sizes`. ``out``, when given, receives the result and is returned.
    """
    return MatMulFP8Mixed.apply(A, B, out, fw_code, bw_code, bsz, bsz2, compat)


def matmul_fp8_global(A: torch.Tensor, B: torch.Tensor, fw_code: torch.Tensor | None = None,
                      bw_code: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      bsz: int = -1, bsz2: int = -1, *, compat: str | None = None) -> torch.Tensor:
    """FP8 "global" matmul ``A [..., in] @ B [in, out]`` (SPEC §7.2, :class:`MatMulFP8Global`); bsz/bsz2 ignored."""
    return MatMulFP8Global.apply(A, B, out, fw_code, bw_code, bsz, bsz2, compat)


# ------------------------------------------------------------------------------------------------
# LLM.int8() and SwitchBack (SPEC §6.2, §6.3, §7.2). B is the weight [out, in].
# ------------------------------------------------------------------------------------------------
def _check_int8_weight(B: Any, state: MatmulLtState) -> None:
    """An int8 B is the quantised weight itself (bnb passes ``state.CB``): its scales are ``state.SCB``."""
    if not isinstance(B, torch.Tensor) or B.dtype != torch.int8 or B.dim() != 2:
        return  # anything else is reported by _check_int8_operands
    if state.has_fp16_weights:
        raise TypeError("B is int8 (an already quantised weight), which needs a MatmulLtState with "
                        "has_fp16_weights=False and SCB set; got has_fp16_weights=True")
    n_out = B.shape[0]
    if not isinstance(state.SCB, torch.Tensor) or tuple(state.SCB.shape) != (n_out,):
        got = list(state.SCB.shape) if isinstance(state.SCB, torch.Tensor) else type(state.SCB).__name__
        raise ValueError(f"an int8 B needs state.SCB, its float32 row scales of shape [{n_out}], got {got}")


def _check_int8_operands(A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
    _check_operands(A, B, 1, "the 2-D weight [out, in]", "the weight is [out, in]", int8_B=True)
    if A.device != B.device:
        raise ValueError(f"A and B must be on the same device, got {A.device} and {B.device}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (B.shape[0],):
            raise ValueError(f"bias must have shape [{B.shape[0]}], got {list(bias.shape)}")


def _weight_key(B: torch.Tensor) -> tuple:
    # Views share the version counter, so an in-place optimizer step on the Parameter bumps it.
    # Writes through `weight.data` do not (new version counter): hence no reuse in training (_quantize_weight).
    # An inference tensor (made under torch.inference_mode) has no version counter and can still be written in
    # place there: its key holds a new object, equal to no other key, so its codes are never reused.
    version = object() if B.is_inference() else B._version
    return (B.data_ptr(), version, tuple(B.shape), B.dtype, B.device)


def _codes_of(state: MatmulLtState, B: torch.Tensor) -> bool:
    """Whether state's CB/SCB were computed from B as it is now: the same tensor object, still alive (a new
    tensor at a freed weight's address has version 0 again), with the same storage, version, shape and dtype."""
    ref = state.weight_ref
    return ref is not None and ref() is B and state.weight_key == _weight_key(B)


def _weight_codes(w: torch.Tensor, compat: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) of a float weight [out, in]: its int8 rows at threshold 0 (SPEC §6.2 step 4). The one call
    _quantize_weight makes, and a backward without saved codes makes again (MatmulLtState.save_weight_codes)."""
    CB, SCB, _ = F.int8_vectorwise_quant(w.contiguous(), _NO_THRESHOLD, compat=compat)
    return CB, SCB


def _codes_again(B: torch.Tensor, state: MatmulLtState, compat: str | None) -> bool:
    """Whether the backward quantises the weight again instead of keeping CB (MatmulLtState.save_weight_codes):
    only where CB is exactly _quantize_weight's fresh quantisation of B as it is now."""
    return (not state.save_weight_codes and compat is None and B.dtype != torch.int8
            and not torch.compiler.is_compiling() and _codes_of(state, B))


def _quantize_weight(B: torch.Tensor, state: MatmulLtState, compat: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB, SCB)``: the int8 rows of the weight and their scales (SPEC §6.2 step 4), cached in the state.

    Default (Q11): in training (``state.is_training``) quantise on every call, so that no write is missed,
    not even one through ``weight.data`` (its own version counter); otherwise reuse the codes while the
    weight is the same tensor, alive, at the same storage and ``_version`` (_codes_of). ``compat="bnb"``:
    bitsandbytes' rule — re-quantise only while ``B.grad is None`` in training (stale CB afterwards).
    An int8 B is the quantised weight itself: it becomes CB, with the scales already in state.SCB.
    Under ``torch.compile`` the cache is bypassed: storage pointers and version counters cannot be
    traced, and quantising inside the graph is one pass over the weight (int8 weights need none).
    """
    compiling = torch.compiler.is_compiling()
    if B.dtype == torch.int8:
        if not compiling:
            state.CB, state.weight_key = B, None
        return B, state.SCB
    if not state.has_fp16_weights and state.CB is not None and state.SCB is not None:
        if compiling or compat == "bnb" or state.weight_key is None or _codes_of(state, B):
            return state.CB, state.SCB
    # The CUDA kernel reads fp16 only; bnb therefore rounds the weight to fp16 first (SPEC §6.2).
    w = B.to(torch.float16) if compat == "bnb" else B
    if compiling:
        return _weight_codes(w, compat)
    if compat == "bnb":
        stale = (state.is_training and B.grad is None) or state.CB is None or state.SCB is None
    else:
        stale = state.CB is None or state.SCB is None or state.is_training or not _codes_of(state, B)
    if stale:
        key = _weight_key(B)
        state.reset_grads()
        state.CB, state.SCB = _weight_codes(w, compat)
        state.weight_key, state.weight_ref = key, weakref.ref(B)
        state.weight_nan = None if compat is not None else nan_lines(B)
    return state.CB, state.SCB


def _dequant_weight(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``CB · SCB / 127`` computed in float32 (SPEC §5.2), then cast to `dtype`."""
    return F.int8_vectorwise_dequant(CB, SCB).to(dtype)


def nan_lines(t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, columns) of a float tensor [..., R, C] that hold a NaN (bool [..., R] and [..., C]), or None where
    none does. On the CPU one max decides that first (it propagates NaN: 9 ms for 28M float32 elements on one
    core, where a float64 sum took 214 ms); on a GPU and while compiling the masks are always made (no host
    wait, no data-dependent branch)."""
    if t is None or not t.is_floating_point() or t.numel() == 0 or t.dim() < 2:
        return None
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and not math.isnan(float(t.amax())):
        return None
    nan = torch.isnan(t)
    return nan.any(-1), nan.any(-2)


def with_nans(y: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """y [..., M, N] with NaN in the given rows and columns (bool masks [..., M] / [..., N], None: none): where
    the float product has one. The int8 codes cannot hold a NaN (the default row absmax skips it and its code
    is 0), so without this a NaN operand gave a finite result: a NaN activation vanished in the layer."""
    if rows is None and cols is None:
        return y
    if cols is None:
        mask = rows[..., :, None]
    elif rows is None:
        mask = cols[..., None, :]
    else:
        mask = rows[..., :, None] | cols[..., None, :]
    return y.masked_fill(mask, float("nan"))


def _weight_nan(B: torch.Tensor, state: MatmulLtState, compat: str | None) -> tuple | None:
    """nan_lines of the weight B (default compat, a float B): the state's, computed with its codes."""
    if compat is not None or B.dtype == torch.int8 or (not state.has_fp16_weights and state.weight_key is None):
        return None  # (bnb's rule; int8 codes; codes given in the state: B is not read)
    if torch.compiler.is_compiling() or not _codes_of(state, B):
        return nan_lines(B)
    return state.weight_nan


def _propagate_nans(ctx: Any, y2: torch.Tensor, A2: torch.Tensor, B: torch.Tensor, state: MatmulLtState,
                    compat: str | None) -> torch.Tensor:
    """The int8 forward's y2 [M, N] with NaN where the float product A2·Bᵀ has one (default compat: rows of A2,
    rows of B holding a NaN); keeps the NaN columns of A2 and B for the backward (ctx.a_nan_cols, w_nan_cols)."""
    a_nan = w_nan = None
    if compat is None:
        a_nan, w_nan = nan_lines(A2), _weight_nan(B, state, compat)
    ctx.a_nan_cols = a_nan[1] if a_nan else None
    ctx.w_nan_cols = w_nan[1] if w_nan else None
    return with_nans(y2, a_nan[0] if a_nan else None, w_nan[0] if w_nan else None)


def _int8_dgrad(ctx: Any, grad2: torch.Tensor, CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """grad_A = grad · deq(CB) in A's dtype and shape (MatMul8bitLt and SwitchBackBnb alike), NaN on the columns of
    the weight that held one (its codes there are 0: _propagate_nans)."""
    if getattr(ctx, "compat", None) == "bnb":  # bnb's own order: CB · fl32(SCB · fl32(1/127)), in A's dtype (a float32
        # grad_A differed by 1 ulp on 15-50 % of its elements from (CB · SCB) · fl32(1/127))
        W = CB.to(ctx.dtype_A, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
    else:
        W = F.int8_vectorwise_dequant(CB, SCB).to(ctx.dtype_A)
    grad_A = torch.matmul(grad2.to(ctx.dtype_A), W)
    return with_nans(grad_A, None, ctx.w_nan_cols).reshape(ctx.grad_shape)


def _any_outlier(outlier_cols: torch.Tensor) -> bool:
    """Whether the outlier path runs. Eagerly: only when there are outlier columns (bitsandbytes'
    rule, which keeps a -0.0 output bit-exact). Compiled: always — the count is data-dependent and
    the path with zero columns adds an empty product, so one graph serves every input."""
    return torch.compiler.is_compiling() or outlier_cols.numel() > 0


def _empty_int8_result(ctx: Any, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                       out: torch.Tensor | None) -> torch.Tensor:
    ctx.is_empty = True
    ctx.shapes = (A.shape, B.shape, A.dtype, B.dtype, None if bias is None else bias.dtype)
    result = torch.zeros((*A.shape[:-1], B.shape[0]), dtype=A.dtype, device=A.device)
    if bias is not None and result.numel() > 0:
        result = result + bias.to(A.dtype)
    return _finish(ctx, result, out)


def _empty_int8_grads(ctx: Any, grad_output: torch.Tensor, n_extra: int):
    a_shape, b_shape, a_dtype, b_dtype, bias_dtype = ctx.shapes
    dev = grad_output.device
    grad_bias = None
    if bias_dtype is not None and ctx.needs_input_grad[3]:
        # explicit row count: reshape(-1, 0) is ambiguous for a layer with 0 output features
        rows = grad_output.numel() // b_shape[0] if b_shape[0] else math.prod(grad_output.shape[:-1])
        grad_bias = grad_output.reshape(rows, b_shape[0]).sum(0, dtype=torch.float32).to(bias_dtype)
    grad_B = torch.zeros(b_shape, dtype=b_dtype, device=dev) if ctx.needs_input_grad[1] else None
    return (torch.zeros(a_shape, dtype=a_dtype, device=dev), grad_B, None, grad_bias, *([None] * n_extra))


def _bias_grad(grad2: torch.Tensor, bias_dtype: torch.dtype) -> torch.Tensor:
    # Sum over every token row (2-D and 3-D alike) in float32, then round once to the bias dtype.
    return grad2.sum(0, dtype=torch.float32).to(bias_dtype)


def _int8_prologue(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None,
                   bias: torch.Tensor | None, state: MatmulLtState | None, compat: str | None, fn: str
                   ) -> tuple[MatmulLtState, torch.Tensor | None]:
    """Checks shared by the int8 functions; returns (state, output-if-empty-else-None)."""
    _check_compat(compat)
    _keep_anchors(ctx, A, B, bias)
    state = MatmulLtState() if state is None else state
    _check_int8_weight(B, state)
    _check_int8_operands(A, B, bias)
    _check_no_float64(fn, A, B)
    _check_out(out, (*A.shape[:-1], B.shape[0]), A.dtype, A.device)
    ctx.is_empty = False
    if A.numel() == 0 or B.numel() == 0:
        return state, _empty_int8_result(ctx, A, B, bias, out)
    return state, None


class MatMul8bitLt(torch.autograd.Function):
    """LLM.int8() matmul ``A [..., in] · Bᵀ`` with B the weight ``[out, in]`` (SPEC §6.2, §6.3).

    Forward: int8 row-quantised A (outlier columns with |a| >= threshold kept in A's precision
    and multiplied with the dequantised int8 weight columns) times the int8 row-quantised weight.
    Backward: grad_A = grad · deq(CB) (gradient not quantised); grad_B by default is the correct
    column-wise product ``(Qcol(grad)ᵀ·Qcol(A)) ⊙ (colmax_grad ⊗ colmax_A)/127²`` plus the outlier
    columns in A's precision; ``compat="bnb"`` reproduces bitsandbytes' row-quantised gradient with
    column scales (Q10), its fp16 activation/weight cast and its ``B.grad is None`` caching (Q11),
    and passes ``compat`` to the int8 ops (bnb's CPU dequant constant, Q9), so that with
    ``is_training=False`` the forward equals bnb 0.49.2's CPU ``bnb.matmul`` bit for bit.
    The CUDA algorithm is used on every device (bitsandbytes' CPU MatMul8bitFp is not, Q12).
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, state: MatmulLtState | None = None,
                compat: str | None = None) -> torch.Tensor:
        state, empty_out = _int8_prologue(ctx, A, B, out, bias, state, compat, "MatMul8bitLt")
        if empty_out is not None:
            return empty_out
        in_features = A.shape[-1]
        A2 = A.reshape(-1, in_features)
        # bnb rounds activations to fp16 for the CUDA kernel (overflow above 65504); the default
        # quantises in A's own dtype.
        A_q = A2.to(torch.float16) if compat == "bnb" else A2
        want_grad_B = ctx.needs_input_grad[1]
        threshold = F._check_threshold(state.threshold)  # (float("5") let a string through)
        if want_grad_B:
            CA, CAt, SCA, SCAt, outlier_cols = F.int8_double_quant(A_q, threshold, compat=compat,
                                                                   row_scale=state.row_scale)
        else:
            CA, SCA, outlier_cols = F.int8_vectorwise_quant(A_q, threshold, compat=compat, row_scale=state.row_scale)
            CAt = SCAt = None
        if threshold > 0.0 and state.use_pool and outlier_cols is not None:
            pool = GlobalOutlierPooler.get_instance()
            state.outlier_pool = pool
            pool.add_outliers(outlier_cols, in_features)
            pooled = pool.get_current_outlier_idx().to(A.device)
            if pool.model_dim == in_features and pooled.numel() > 0:
                outlier_cols = pooled
                CA = CA.clone()
                CA[:, outlier_cols] = 0
        CB, SCB = _quantize_weight(B, state, compat)
        has_outliers = threshold > 0.0 and outlier_cols is not None and _any_outlier(outlier_cols)
        # bnb passes the bias as it is to int8_scaled_mm / int8_mixed_scaled_mm, whose dequant adds it in float32
        # (a float32 bias with an fp16/bf16 A: rounded once). The default takes it in A's dtype, as nn.Linear and
        # Linear8bitLt do (docs/architecture.md, Decisions).
        bias_c = None if bias is None else bias if compat == "bnb" else bias.to(A.dtype)
        if threshold > 0.0:
            state.idx = outlier_cols
        if has_outliers:
            output, subA = F.int8_mixed_scaled_mm(A2, CA, CB, SCA, SCB, outlier_cols, bias_c, compat=compat)
        else:
            output = F.int8_scaled_mm(CA, CB, SCA, SCB, bias_c, dtype=A.dtype, compat=compat)
            subA = None
        ctx.state, ctx.compat = state, compat
        ctx.grad_shape, ctx.dtype_A, ctx.dtype_B = A.shape, A.dtype, B.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        ctx.outlier_cols = outlier_cols if has_outliers else None
        ctx.SCAt = SCAt
        # CB/SCB are saved (not read from the state in backward) so a later forward that refreshes
        # the cache cannot change this step's gradient.
        # subA only serves grad_B. Under torch.compile a saved tensor must not alias another
        # graph value (dynamo refuses it; here the outlier-column gather of A), hence the clone.
        if subA is not None and (not want_grad_B or torch.compiler.is_compiling()):
            subA = subA.clone() if want_grad_B else None
        ctx.codes_again = _codes_again(B, state, compat)
        output = _propagate_nans(ctx, output, A2, B, state, compat)
        ctx.save_for_backward(CAt, subA, *((B, None) if ctx.codes_again else (CB, SCB)))
        return _finish(ctx, output.reshape(*A.shape[:-1], B.shape[0]), out)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor):
        if ctx.is_empty:
            return _empty_int8_grads(ctx, grad_output, 2)
        CAt, subA, CB, SCB = ctx.saved_tensors
        if ctx.codes_again:  # (CB is the weight: save_weight_codes)
            CB, SCB = _weight_codes(CB)
        compat = ctx.compat
        n_out = CB.shape[0]
        grad2 = grad_output.reshape(-1, n_out)
        grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[3] and ctx.dtype_bias is not None:
            grad_bias = _bias_grad(grad2, ctx.dtype_bias)
        if ctx.needs_input_grad[1]:
            idx = ctx.outlier_cols
            if compat == "bnb":
                # Q10: the ROW-quantised gradient Cg is rescaled with the COLUMN statistics.
                Cg, _, _, Sg_col, _ = F.int8_double_quant(grad2.to(torch.float16), _NO_THRESHOLD, compat=compat)
                grad_B = F.int8_scaled_mm(Cg.t().contiguous(), CAt.t().contiguous(), Sg_col, ctx.SCAt,
                                          dtype=torch.float16, compat=compat)
                if idx is not None:
                    grad_B[:, idx] += torch.matmul(grad2.to(subA.dtype).t(), subA).to(torch.float16)
            else:
                _, Cg_col, _, Sg_col, _ = F.int8_double_quant(grad2, _NO_THRESHOLD, compat=compat)
                QA_col = CAt
                if idx is not None:
                    # Outlier columns go through the 16-bit product below; drop them from the int8
                    # one entirely (int8_double_quant only zeroes the outlier *elements*).
                    QA_col = CAt.clone()
                    QA_col[:, idx] = 0
                # grad_B[n, k] = Σ_m Qg[m, n]·QA[m, k] · colmax_g[n]·colmax_A[k] / 127²
                grad_B = F.int8_scaled_mm(Cg_col.t().contiguous(), QA_col.t().contiguous(), Sg_col, ctx.SCAt,
                                          dtype=torch.float32)
                if idx is not None:
                    grad_B[:, idx] += torch.matmul(grad2.to(subA.dtype).t(), subA).float()
            grad_B = grad_B.to(ctx.dtype_B)
            if compat != "bnb":  # (the int8 columns of G drop its NaN as those of A do theirs)
                g_nan = nan_lines(grad2)
                grad_B = with_nans(grad_B, g_nan and g_nan[1], ctx.a_nan_cols)
        if ctx.needs_input_grad[0]:
            grad_A = _int8_dgrad(ctx, grad2, CB, SCB)
        return grad_A, grad_B, None, grad_bias, None, None


class SwitchBackBnb(torch.autograd.Function):
    """SwitchBack: LLM.int8()-style int8 forward, unquantised backward (SPEC §7.2).

    Forward = int8 row-quantised A times int8 row-quantised weight, outlier columns of A in
    A's precision times the **original** weight columns (has_fp16_weights=True) or the dequantised
    int8 columns (False). Backward: grad_A = grad · deq(CB), grad_B = gradᵀ · A, both unquantised.
    """

    @staticmethod
    def forward(ctx: Any, A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, state: MatmulLtState | None = None,
                compat: str | None = None) -> torch.Tensor:
        state, empty_out = _int8_prologue(ctx, A, B, out, bias, state, compat, "SwitchBackBnb")
        if empty_out is not None:
            return empty_out
        A2 = A.reshape(-1, A.shape[-1])
        A_q = A2.to(torch.float16) if compat == "bnb" else A2
        threshold = F._check_threshold(state.threshold)  # (float("5") let a string through)
        # Only the row codes are used: the column half of bnb's int8_double_quant is discarded.
        CA, SCA, outlier_cols = F.int8_vectorwise_quant(A_q, threshold, compat=compat)
        CB, SCB = _quantize_weight(B, state, compat)
        state.SB = (tuple(CB.shape), "row")  # bnb's "weights ready" flag
        has_outliers = threshold > 0.0 and outlier_cols is not None and _any_outlier(outlier_cols)
        C32 = F.int8_linear_matmul(CA, CB)
        output = F.int8_mm_dequant(C32, SCA, SCB, bias=None if bias is None else bias.to(A.dtype),
                                   dtype=A.dtype, compat=compat)
        if threshold > 0.0:
            state.idx = outlier_cols
        if has_outliers:
            subA = A2[:, outlier_cols]
            if state.has_fp16_weights:
                subB = B[:, outlier_cols].t().to(A.dtype)
            else:
                subB = _dequant_weight(CB, SCB, A.dtype)[:, outlier_cols].t()
            if not torch.compiler.is_compiling():
                state.subB = subB  # bnb's record; a compiled graph cannot hand out this view
            output = output + torch.matmul(subA, subB)
        ctx.compat = compat
        ctx.grad_shape, ctx.dtype_A, ctx.dtype_B = A.shape, A.dtype, B.dtype
        ctx.dtype_bias = None if bias is None else bias.dtype
        # the input itself, not its 2-D view: torch.compile cannot save a view of a graph input
        ctx.codes_again = _codes_again(B, state, compat)
        output = _propagate_nans(ctx, output, A2, B, state, compat)
        ctx.save_for_backward(A, *((B, None) if ctx.codes_again else (CB, SCB)))
        return _finish(ctx, output.reshape(*A.shape[:-1], B.shape[0]), out)

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_output: torch.Tensor):
        if ctx.is_empty:
            return _empty_int8_grads(ctx, grad_output, 2)
        A, CB, SCB = ctx.saved_tensors
        if ctx.codes_again:  # (CB is the weight: save_weight_codes)
            CB, SCB = _weight_codes(CB)
        A2 = A.reshape(-1, A.shape[-1])
        grad2 = grad_output.reshape(-1, CB.shape[0])
        grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[3] and ctx.dtype_bias is not None:
            grad_bias = _bias_grad(grad2, ctx.dtype_bias)
        if ctx.needs_input_grad[1]:
            grad_B = torch.matmul(grad2.to(A2.dtype).t(), A2).to(ctx.dtype_B)
        if ctx.needs_input_grad[0]:
            grad_A = _int8_dgrad(ctx, grad2, CB, SCB)
        return grad_A, grad_B, None, grad_bias, None, None


def _prepare_state(state: MatmulLtState | None, threshold: float) -> MatmulLtState:
    if state is None:
        state = MatmulLtState()
    elif not isinstance(state, MatmulLtState):
        raise TypeError(f"state must be a MatmulLtState or None, got {type(state).__name__}")
    threshold = F._check_threshold(threshold)  # (NaN and inf refused, as by MatmulLtState's ops)
    if threshold > 0.0:
        state.threshold = threshold
    return state


def matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, state: MatmulLtState | None = None,
           threshold: float = 0.0, bias: torch.Tensor | None = None, *, compat: str | None = None,
           row_scale: str | None = None) -> torch.Tensor:
    """LLM.int8() ``A [..., in] · Bᵀ (+ bias)`` with B the weight ``[out, in]`` (``bnb.matmul``, SPEC §6.5).

    A new :class:`MatmulLtState` is made when none is given; ``threshold`` is written to the state
    only when > 0, ``row_scale`` ("bnb" | "paper", MatmulLtState.row_scale) only when given.
    Returns ``[..., out]`` in A's dtype (or ``out``, filled, when given).
    """
    state = _prepare_state(state, threshold)
    if row_scale is not None:
        F.check_row_scale(row_scale)
        state.row_scale = row_scale
    return MatMul8bitLt.apply(A, B, out, bias, state, compat)


def switchback_bnb(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                   state: MatmulLtState | None = None, threshold: float = 0.0,
                   bias: torch.Tensor | None = None, *, compat: str | None = None) -> torch.Tensor:
    """SwitchBack ``A [..., in] · Bᵀ (+ bias)``: int8 forward, 16-bit backward (SPEC §7.2).

    State rules as :func:`matmul`; returns ``[..., out]`` in A's dtype (or ``out``, filled).
    """
    return SwitchBackBnb.apply(A, B, out, bias, _prepare_state(state, threshold), compat)
