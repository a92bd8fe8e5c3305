"""Capture every GEMM's real operands (both operands, bias, output gradient) from forward + backward passes, with coverage counts."""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import inspect
import os
import re
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .gemms import Coverage, GemmHandler, GemmSite, intercept, is_gemm_target, run_graph
from .loading import Batch, LoadError, one_line

LossFn = Callable[[Any, Batch], torch.Tensor]


@dataclass
class GemmCall:
    """One GEMM of one batch in the normal form of gemms.py: Y = A·Bᵀ, named as gemms.py names sites.

    ``activation`` A [*, M, K], ``weight`` B [*, N, K] (the model weight [out, in] when
    ``b_is_weight``, else the second activation: K of QKᵀ, Vᵀ of PV, the right operand of a
    matmul), ``bias`` [N] or None, ``grad_output`` G [*, M, N] (dL/dY from the real backward pass;
    None when the output does not reach the loss). ``*`` is empty for weight GEMMs (A = every
    token's row) and one batch dim for batched ones (heads, bmm, conv groups). All detached, in
    the model's dtype, on the capture device. ``index``: the call's position in the batch's
    forward order (calls arrive last layer first, as their gradients do; sinks sort by it).
    ``kind``/``op``: as in the coverage table (linear | matmul | attention | conv; linear, addmm, ...).
    """

    name: str
    activation: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None
    index: int = 0
    kind: str = "linear"
    op: str = "linear"
    b_is_weight: bool = True
    #: whether training computes the gradient of ``activation`` (the dgrad GEMM) and of ``weight`` (wgrad): an
    #: operand that requires no gradient in the model's forward gets none. A has none when it is the model's input
    #: data or was computed from it by frozen layers only (the first layer of an MLP on features, a trained head
    #: on a frozen backbone); B when it is a frozen weight or a buffer/constant operand of a matmul.
    grads: tuple[bool, bool] = (True, True)

    @property
    def frozen(self) -> bool:
        """The weight is a frozen parameter (requires_grad False while others train): training runs no wgrad GEMM
        for it. (capture_batch lets exactly the trained parameters require grad.)"""
        return self.b_is_weight and not self.grads[1]

    def runs(self, gemm: str) -> bool:
        """Whether training runs ``gemm`` ("fprop", "dgrad", "wgrad") of this call: fprop always, dgrad/wgrad when
        an output gradient reached the call and their operand requires a gradient (``grads``)."""
        if gemm == "fprop":
            return True
        return self.grad_output is not None and self.grads[0 if gemm == "dgrad" else 1]


LinearCall = GemmCall  # the name sinks used before capture covered every GEMM


@dataclass
class GradsRun:
    """Which backward GEMMs training runs for one layer over its calls (GemmCall.runs). A layer's dgrad (wgrad)
    is "not run" when an output gradient reached some call and no call ran it; a layer no gradient reached is
    neither (it has no backward at all, for another reason)."""

    reached: bool = False
    dgrad: bool = False
    wgrad: bool = False

    def add(self, call: GemmCall) -> None:
        if call.grad_output is not None:
            self.reached = True
            self.dgrad = self.dgrad or call.runs("dgrad")
            self.wgrad = self.wgrad or call.runs("wgrad")

    def merge(self, other: GradsRun) -> None:
        self.reached = self.reached or other.reached
        self.dgrad = self.dgrad or other.dgrad
        self.wgrad = self.wgrad or other.wgrad

    def columns(self) -> dict[str, bool]:
        """The layers table's ``no_dgrad`` / ``no_wgrad`` (what backward_meta reads)."""
        return {"no_dgrad": self.reached and not self.dgrad, "no_wgrad": self.reached and not self.wgrad}


def backward_meta(rows: list[dict]) -> dict[str, list[str]]:
    """Results metadata naming the layers whose backward GEMMs training does not run, from the layers table's
    records (their ``frozen``/``no_dgrad``/``no_wgrad``): ``frozen_layers`` (frozen weights: no wgrad), ``no_dgrad_layers``
    (an input that needs no gradient) and ``no_wgrad_layers`` (a second operand that needs none, frozen weights
    left to frozen_layers)."""
    return {"frozen_layers": [r["layer"] for r in rows if r.get("frozen")],
            "no_dgrad_layers": [r["layer"] for r in rows if r.get("no_dgrad")],
            "no_wgrad_layers": [r["layer"] for r in rows if r.get("no_wgrad") and not r.get("frozen")]}


@dataclass(frozen=True)
class LossInfo:
    """How the gradient was produced: kind "model" (the model's own loss), "custom" (--loss), "next-token"
    (a causal LM given no labels: the loss it computes from labels=input_ids) or "surrogate"."""

    kind: str
    detail: str
    #: Why no output gradient was computed (the loss does not depend on the weights), else "".
    no_gradient: str = ""


SURROGATE = LossInfo("surrogate", "mean of squares of the model output (no loss returned by the model, no --loss)")
FORWARD_ONLY = LossInfo("none", "forward only (--no-grad): no loss is computed, no backward pass runs",
                        no_gradient="forward-only run (--no-grad): only fprop GEMMs were captured, so dgrad and "
                                    "wgrad are not analysed; run without --no-grad for them")


@functools.lru_cache(maxsize=None)
def libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` on Linux (malloc_trim, mallopt: glibc only; madvise), None where
    the library lacks it or elsewhere. Cached: a caller may set its ``argtypes`` once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: one layer's replay allocates and frees tens of MB (float64 copies, quantised operands,
    reference GEMMs). glibc raises its mmap threshold after such frees, so later replays come
    from the heap, and small long-lived blocks left between them keep the freed pages resident:
    measured on a 1024-wide MLP (64 tokens, "global"), peak RSS grew 5.6 MiB per extra layer
    (4 → 32 layers: +62 → +219 MiB) although nothing was held across layers; trimming after each
    layer cut that to 2.4-3.3 MiB (+62…77 → +145…155 MiB over three runs), for ~15-20 ms per layer.
    """
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)


#: glibc thresholds for keep_freed_blocks: blocks below MMAP_THRESHOLD come from the heap (not a fresh mmap
#: each), and free() gives memory back only past TRIM_THRESHOLD at the heap's top (release_free_memory
#: still trims every TRIM_ELEMENTS).
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30


def keep_freed_blocks() -> bool:
    """Have glibc reuse freed large blocks instead of mapping fresh memory for every large temporary.

    Why: a replay makes hundreds of W-sized temporaries (quantised operands, float64 references, GEMM
    outputs); by default each one above glibc's mmap threshold is a fresh mapping whose every page faults
    on first touch, and free() unmaps it again. A fresh 113 MB tensor filled once took 40.9 ms so and
    4.2 ms from a freed heap block; Llama-135M (bench_analyze, 8 recipes) 31.7-32.9 → 30.6-31.0 s, peak RSS
    +15-100 MiB. Process-wide (mallopt), so the command line calls it for the commands that capture and
    replay a model (analyze, the sweeps, demo), not the library; the weights-only analysis, whose bound
    is on RSS, keeps glibc's defaults. Returns whether it applied (glibc on Linux only).
    """
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def freeze_loaded_objects() -> None:
    """Move every object the garbage collector tracks so far (the imported modules' functions, classes and
    constants: ~400k with torch, pandas and fp8probe loaded) out of its generations (``gc.freeze``), so
    that a full collection during the analysis walks only what the analysis made.

    Why: a replay allocates enough containers to trigger full collections, and each walked all ~400k
    objects for nothing (they live as long as the process): 0.22-0.28 s per collection, one per BERT
    6-layer ``analyze --strategy all`` (6.4-7.1 s), two per Llama-135M run. Process-wide, so the command
    line calls it for the commands that capture and replay a model (cli._replay_process), not the library.
    """
    gc.freeze()


#: Trim the heap (release_free_memory) once the replayed calls' operands add up to this many elements:
#: their replays allocate ~20x that in temporaries. A trim is not just its own ~3 ms: every page it gives
#: back faults again when the next site reuses it. Llama-135M (bench_analyze, 8 recipes, keep_freed_blocks):
#: every 2M elements 30.6 s / 2095 MiB peak, every 16M 29.5-29.9 s / 2189-2225 MiB, every 64M 29.1 s /
#: 2171 MiB, never 28.1 s / 2407 MiB. A 32-layer 1024-wide MLP (64 tokens, "global"): peak RSS over the
#: start 108 MiB every 2M, 105 MiB every 16M (glibc defaults: 111 and 125).
TRIM_ELEMENTS = 1 << 24


class _GradTap(torch.autograd.Function):
    """Identity on a linear output Y whose backward hands dL/dY to a callback as soon as autograd computes it.

    The clone is needed because a custom Function may not return its input as-is when a later op
    modifies it in place (``nn.ReLU(inplace=True)`` after a Linear); it costs one transient copy of Y.
    ``token`` is a 0-element leaf every tap hangs from: differentiating the loss w.r.t. it makes
    autograd visit every tap without computing (or storing) any parameter gradient.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, token: torch.Tensor, deliver: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.deliver = deliver
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.deliver(grad)
        ctx.deliver = None  # drop the closure (it holds the recorder) once used
        return grad, None, None


class _Recorder(GemmHandler):
    """Holds each captured GEMM's operands from its forward until its output gradient arrives, then hands it over.

    Streaming: a call is handed to ``on_call`` inside the backward pass, the moment autograd has
    dL/dY for it (last layer first), and its operands are dropped right after. So besides the
    model's own autograd memory (the saved activations every training step holds anyway) at most
    one GEMM's operands, gradient and replay are alive at a time. Calls whose output never reaches
    the loss are handed over, in forward order, once backward is done.
    """

    def __init__(self, pattern: re.Pattern | None, on_call: Callable[[GemmCall], None], token: torch.Tensor,
                 immediate: bool = False) -> None:
        self.pattern = pattern
        self.grads: dict[int, tuple[bool, bool]] = {}  # per pending call: do A and B require a gradient (GemmCall.grads)
        self.on_call = on_call
        self.token = token
        # Forward only (no gradient will come): hand each call over inside the forward, while its
        # operands (and a streamed block's weights) are alive, instead of holding every call to the end.
        self.immediate = immediate
        self.pending: dict[int, GemmSite] = {}
        self.count = 0
        self.tapped = 0
        self.unmatched: list[str] = []  # names --layers left out (listed when it matched nothing)
        self.no_grad: list[str] = []  # GEMMs run with autograd off inside a forward that has it on
        self.untrimmed = 0  # operand elements replayed since the heap was last trimmed

    def skip(self, site: GemmSite) -> str | None:
        if self.pattern is not None and not self.pattern.search(site.name):
            self.unmatched.append(site.name)
            return "not matched by --layers"
        return None

    def output(self, site: GemmSite, y: torch.Tensor) -> torch.Tensor:
        """Register one GEMM; returns the output the model should continue with (tapped when it has a gradient)."""
        self.count += 1
        self.pending[site.index] = site
        if self.immediate:
            self.deliver(site.index, None)
            return y
        if torch.is_grad_enabled():
            # Read now: the operands' autograd state as the model's forward made it (the conv site's raw input
            # counts). capture_batch lets exactly the trained parameters require grad, so a weight operand that
            # requires none, the parameter or a view of it (weight.t() in addmm), is a frozen one. (With autograd
            # off inside the forward even a trained weight's view requires none: nothing is read there.)
            self.grads[site.index] = (site.a.requires_grad, site.b.requires_grad)
        if not (isinstance(y, torch.Tensor) and y.requires_grad):
            if not torch.is_grad_enabled():
                self.no_grad.append(site.name)
            return y
        self.tapped += 1
        return _GradTap.apply(y, self.token, functools.partial(self.deliver, site.index))

    def deliver(self, index: int, grad: torch.Tensor | None) -> None:
        """Hand call ``index`` to on_call with its output gradient (None: the output does not reach the loss)."""
        site = self.pending.pop(index)
        a, b = site.operands()
        g = None if grad is None else site.grad_to_gemm(grad.detach()).detach()
        bias = site.bias if isinstance(site.bias, torch.Tensor) and site.bias.dim() == 1 else None
        call = GemmCall(site.name, a.detach(), b.detach(), None if bias is None else bias.detach(), g, site.index,
                        site.kind, site.op, site.b_is_weight,
                        grads=self.grads.pop(index, (True, True)))
        del site, a, b, g
        self.untrimmed += sum(t.numel() for t in (call.activation, call.weight, call.grad_output) if t is not None)
        self.on_call(call)
        del call
        if self.untrimmed >= TRIM_ELEMENTS:
            self.untrimmed = 0
            release_free_memory()

    def flush(self) -> None:
        """Hand over, in forward order, every call no gradient reached."""
        for index in sorted(self.pending):
            self.deliver(index, None)


class InputsError(LoadError):
    """A batch the model (or exported program) cannot run: the caller names the batch and where it came from."""


def is_exported_graph(model: Any) -> bool:
    """True for a GraphModule with GEMM nodes (what ep.module() gives), captured through its graph."""
    return isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and is_gemm_target(n.target) for n in model.graph.nodes)


# Ops of an exported graph that carry the mode it was traced in: (overload name, position of its train flag).
_MODE_OPS = {"aten.dropout.default": 2, "aten.native_dropout.default": 2, "aten.feature_dropout.default": 2,
             "aten.alpha_dropout.default": 2, "aten.batch_norm.default": 5,
             "aten._native_batch_norm_legit_functional.default": 5, "aten._native_batch_norm_legit.default": 5}


def exported_in_train_mode(gm: torch.fx.GraphModule) -> bool:
    """Whether a torch.export graph was traced from a module in train(): a dropout or batch-norm node with its
    train flag set (the GraphModule's own ``training`` attribute says nothing about the program)."""
    for n in gm.graph.nodes:
        pos = _MODE_OPS.get(str(n.target)) if n.op == "call_function" else None
        if pos is not None and len(n.args) > pos and n.args[pos] is True:
            return True
    return False


def graph_inputs(gm: torch.fx.GraphModule, batch: Batch) -> list:
    """The flat graph inputs of ``batch`` for an exported program's module, checked as calling it would check
    them. ep.module()'s generated forward flattens (args, kwargs) with its pytree spec before the graph (and
    unflattens the outputs after it); the interpreter runs the graph itself, so that is done here, and so are
    the input checks of its forward pre-hook: an untrusted program (check_guards=False) has no guard function,
    and torch checks the shapes, dtypes and dimension ranges it was exported for there instead. Unchecked, a
    batch the program was not exported for ran the graph of another branch (x.shape[0] >= 8 traced at 8, run
    on 4 rows)."""
    try:
        bound = inspect.signature(gm.forward).bind(*batch.args, **batch.kwargs)
    except TypeError as exc:
        raise InputsError(f"inputs do not match the exported program's signature: {exc}") from None
    for hook in list(gm._forward_pre_hooks.values()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            try:
                hook(gm, *_as_exported(gm, bound))
            except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                raise InputsError(f"inputs do not match the exported program: {one_line(exc)}") from None
    return gm.graph._codegen.process_inputs(*bound.args, **bound.kwargs)


def _as_exported(gm: torch.fx.GraphModule, bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """The bound inputs laid out as the program was called when exported: (args, kwargs) of its input spec (the
    first n parameters positional, the spec's keys by keyword), whichever way the batch passed them."""
    try:
        spec = gm._in_spec
        n_args = spec.child(0).num_children
    except (AttributeError, IndexError, TypeError):
        return tuple(bound.args), dict(bound.kwargs)
    names = list(bound.signature.parameters)
    args = tuple(bound.arguments[n] for n in names[:n_args] if n in bound.arguments)
    # the rest by keyword: the spec's keys (or extras, which the check then names)
    kwargs = {k: v for k, v in bound.arguments.items() if k not in names[:n_args]}
    return args, kwargs


def _run_graph(gm: torch.fx.GraphModule, batch: Batch, rec: _Recorder, coverage: Coverage) -> Any:
    out = run_graph(gm, graph_inputs(gm, batch), rec, coverage)
    return gm.graph._codegen.process_outputs(out)


def _to_device(obj: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


#: LossInfo details of a loss the model returned: as its output or a ``loss`` field, or first in a tuple (Hugging
#: Face's return_dict=False: (loss, logits, ...))
MODEL_LOSS_DETAIL = "scalar loss returned by the model"
TUPLE_LOSS_DETAIL = f"{MODEL_LOSS_DETAIL} (the first element of its output tuple)"


def _model_loss(output: Any) -> tuple[torch.Tensor, str] | None:
    """(loss, detail) when the model returned its loss: a scalar output, a ``loss`` key or attribute, or a float
    scalar leading an output tuple/list (``return_dict=False`` models return ``(loss, logits, ...)``)."""
    def scalar(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point()

    if isinstance(output, torch.Tensor):
        return (output, MODEL_LOSS_DETAIL) if scalar(output) else None
    if isinstance(output, (tuple, list)) and len(output) > 1 and scalar(output[0]):
        return output[0], TUPLE_LOSS_DETAIL
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return (loss, MODEL_LOSS_DETAIL) if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def _surrogate(output: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not leaves:
        raise LoadError("the model output holds no floating-point tensor that depends on the weights; "
                        "pass --loss module:function (loss= in the Python API)")
    return sum(t.float().pow(2).mean() for t in leaves)


#: Class-name endings of Hugging Face causal language models (LlamaForCausalLM, GPT2LMHeadModel, ...).
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
NEXT_TOKEN_DETAIL = ("cross-entropy of logits[:, :-1] against input_ids[:, 1:], padding ignored: the causal LM was given "
                     "no labels; pass labels or --loss for another loss")


def is_causal_lm(model: Any) -> bool:
    """A Hugging Face causal LM, by its class or its config's architecture (``model`` may be DDP-wrapped)."""
    if type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    return any(isinstance(n, str) and n.endswith(CAUSAL_LM_SUFFIXES) for n in names)


def _next_token_loss(output: Any, batch: Batch) -> torch.Tensor | None:
    """Hugging Face's causal LM loss, computed as the model computes it from ``labels=input_ids``: the logits at
    positions 0..T-2 against the tokens at 1..T-1, padding (``attention_mask`` 0) ignored. None when the output
    has no [B, T, V] ``logits`` or the batch no [B, T] integer ``input_ids`` to match them."""
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3
            and isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex()
            and ids.shape == logits.shape[:2] and ids.shape[1] >= 2):
        return None
    target = ids[:, 1:].to(device=logits.device, dtype=torch.long)
    mask = batch.kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
        target = target.masked_fill(mask[:, 1:].to(target.device) == 0, -100)
    if not bool((target != -100).any()):
        return None
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             target.reshape(-1), ignore_index=-100)


def choose_loss(output: Any, batch: Batch, loss_fn: LossFn | None, loss_name: str | None,
                model: Any = None) -> tuple[torch.Tensor, LossInfo]:
    """The scalar to differentiate: ``loss_fn(output, batch)``, else the model's own loss, else (``model`` a causal
    LM given no labels) the next-token loss it would compute from ``labels=input_ids``, else the surrogate."""
    if loss_fn is not None:
        try:
            loss = loss_fn(output, batch)
        except Exception as exc:  # noqa: BLE001 - the user's loss failing is an input error (exit 2), not a bug
            raise LoadError(f"--loss {loss_name} failed: {one_line(exc)}") from exc
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise LoadError(f"--loss {loss_name} must return a scalar tensor, got "
                            f"{type(loss).__name__}{list(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return loss.reshape(()), LossInfo("custom", f"{loss_name}(output, batch)")
    own = _model_loss(output)
    if own is not None:
        return own[0], LossInfo("model", own[1])
    if model is not None and is_causal_lm(model):
        loss = _next_token_loss(output, batch)
        if loss is not None:
            return loss, LossInfo("next-token", NEXT_TOKEN_DETAIL)
    return _surrogate(output), SURROGATE


@contextmanager
def params_require_grad(params: list[torch.Tensor]) -> Iterator[None]:
    """Make ``params`` require grad for the block, restoring each one's flag after (also on error)."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def trained_parameters(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The parameters training would update: the float ones that require grad (a frozen embedding or backbone,
    a LoRA base stays out), or every float one when none does (a model saved with requires_grad_(False)
    throughout: nothing would train otherwise). The one rule of the capture, the end-to-end gradient comparison
    and --steps."""
    if not isinstance(model, nn.Module):
        return []
    floats = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    return [(n, p) for n, p in floats if p.requires_grad] or floats


# GEMM names listed when --layers matches none of them.
LIST_LAYERS = 12


def _nothing_captured(pattern: re.Pattern | None, seen: list[str], coverage: Coverage) -> str:
    """Why nothing was captured, naming the model's GEMMs when --layers filtered all of them out, and the GEMMs it
    ran but could not capture (the coverage's skips: an LSTM, a complex linear)."""
    selected = f" (GEMM kinds selected: {', '.join(coverage.kinds)})"
    if pattern is None:
        skipped = coverage.summary()["skipped"]
        if skipped:
            ran = "; ".join(f"{n} × {why}" for why, n in list(skipped.items())[:LIST_LAYERS])
            return f"no GEMM was captured: the GEMMs the model ran cannot be analysed: {ran}" + selected
        return "no GEMM was captured: the model ran no GEMM of the selected kinds on these inputs" + selected
    if not seen:
        return (f"no GEMM was captured matching --layers {pattern.pattern!r}: the model ran no GEMM of the selected "
                "kinds at all" + selected)
    names = list(dict.fromkeys(seen))
    more = f", … ({len(names)} in all)" if len(names) > LIST_LAYERS else ""
    return (f"no GEMM was captured matching --layers {pattern.pattern!r}; the model's GEMMs are: "
            + ", ".join(names[:LIST_LAYERS]) + more)


def _no_grad_gemms(names: list[str]) -> str:
    """Why some GEMMs have fprop rows only while the loss reached the others."""
    names = list(dict.fromkeys(names))
    shown = ", ".join(names[:LIST_LAYERS]) + (f", … ({len(names)} in all)" if len(names) > LIST_LAYERS else "")
    return (f"{len(names)} GEMM(s) ran with autograd off inside the model's forward (a custom autograd.Function, or "
            f"torch.no_grad in the model), so they have fprop only and their backward is the model's own code: {shown}")


def _forward(model: Callable, batch: Batch, rec: _Recorder, coverage: Coverage) -> Any:
    """The model's forward on ``batch`` with every GEMM through ``rec``; a failure is the inputs' LoadError."""
    if not (is_exported_graph(model) or isinstance(model, nn.Module)):
        raise LoadError(f"cannot capture a {type(model).__name__}: expected an nn.Module or an exported program")
    try:
        if is_exported_graph(model):
            return _run_graph(model, batch, rec, coverage)
        with intercept(model, rec, coverage):
            return model(*batch.args, **batch.kwargs)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failing on these inputs is an input error
        hint = first_layer_hint(model, batch) if isinstance(exc, _INPUT_ERRORS) and not _raised_by_user_code(exc) \
            else raised_in(exc)
        raise InputsError(f"the model failed on the inputs: {one_line(exc)}{hint}") from exc


#: What torch raises for inputs of the wrong shape, dtype or range (and Python for a wrong argument list); any
#: other exception (AttributeError, KeyError, ZeroDivisionError, ...) is the model's code failing: its place is
#: named instead of the inputs' shapes.
_INPUT_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__name__.split(".")[0]]))


def _raised_by_user_code(exc: BaseException) -> bool:
    """The innermost frame of ``exc``'s traceback is the model's own code (a ``raise`` or an operation on its own
    line, not inside torch): its place says more than the inputs' shapes (a model that raised RuntimeError("...")
    itself was told to check its inputs' shape and dtype)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _user_code(tb.tb_frame.f_code)


def _user_code(code: Any) -> bool:
    """A code object of the user's files: outside torch and fp8probe."""
    return not os.path.abspath(code.co_filename).startswith(_LIBRARY_DIRS)


def raised_in(exc: BaseException) -> str:
    """``"; raised in forward at /path/model.py:12"``: the innermost frame of ``exc``'s traceback outside torch and
    fp8probe (the user's code), "" when every frame is library code."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _user_code(code):
            where = f"; raised in {code.co_name} at {code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def _tensors_text(batch: Batch) -> str:
    """``arg0 8 x 12 float32, mask 8 x 5 bool``: the batch's top-level tensors (positional ones as arg<i>)."""
    return ", ".join(f"{name} {' x '.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
                     for name, t in batch.tensors())


def first_layer_hint(model: Any, batch: Batch) -> str:
    """What to check when an eager model failed on ``batch``: the batch's tensors beside the model's first layer
    with weights (``"; the batch holds arg0 8 x 12 float32 and the model's first layer fc1 is Linear(in_features=16,
    ...): check the inputs' shape and dtype against it"``). Torch's own text ("mat1 and mat2 shapes cannot be
    multiplied (8x12 and 16x32)") names neither the layer nor which operand is the input. "" for an exported
    program (its check names the dimension itself) or a model without a layer with weights."""
    if not isinstance(model, nn.Module) or is_exported_graph(model):
        return ""
    first = next(((name, m) for name, m in model.named_modules()
                  if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))), None)
    held = _tensors_text(batch)
    if first is None or not held:
        return ""
    # (a Hugging Face model's position embedding fails past its positions with "index out of range", which the
    # first layer, the token embedding, does not explain: the ids are valid, the sequences too long)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    long = [t.shape[-1] for _, t in batch.tensors() if t.dim() >= 1 and not t.is_floating_point()
            and not t.is_complex() and t.dtype != torch.bool]
    if isinstance(limit, int) and long and max(long) > limit:
        return (f"; the batch holds {held}: sequences of {max(long)} tokens, longer than the {limit} positions the "
                f"model's config allows (max_position_embeddings): cut them to {limit} or fewer")
    name, layer = first
    return (f"; the batch holds {held} and the model's first layer {name or type(model).__name__} is "
            f"{' '.join(repr(layer).split())}: check the inputs' shape and dtype against it")


def capture_batch(model: Callable, batch: Batch, on_call: Callable[[GemmCall], None], *,
                  layers: str | re.Pattern | None = None, loss_fn: LossFn | None = None,
                  loss_name: str | None = None, device: str | torch.device = "cpu",
                  coverage: Coverage | None = None, grad: bool = True) -> LossInfo:
    """Run one forward + backward of ``model`` on ``batch`` and hand every GEMM to ``on_call``.

    ``grad`` False: forward only, under ``torch.no_grad()`` (no loss, no backward, nothing saved
    for autograd); each call is handed over as soon as it ran, with ``grad_output`` None, and the
    returned info is FORWARD_ONLY. Memory is then one layer's activations and replay.

    ``layers``: a regex; only GEMM names it matches (re.search) are captured. ``coverage``: counts
    every GEMM executed, captured and skipped (its ``kinds`` select which kinds are captured;
    default a fresh one selecting all). Calls are handed over during the backward pass as each
    output gradient arrives (last layer first; ``index`` gives forward order), then the calls no
    gradient reached. Memory: the model's own autograd activations plus one call's operands and
    whatever ``on_call`` allocates for it; a call's tensors are released when ``on_call`` returns,
    never held across layers.
    """
    pattern = re.compile(layers) if isinstance(layers, str) else layers
    coverage = Coverage() if coverage is None else coverage
    dev = torch.device(device)
    token = torch.zeros(0, device=dev, requires_grad=True)
    # The backward reaches what training's reaches (trained_parameters): no gradient into a frozen layer with
    # nothing trained before it, so no dgrad for it either. Parameter .grad is never written: gradients are
    # taken only w.r.t. the GEMM outputs.
    trained = [p for _, p in trained_parameters(model)]
    rec = _Recorder(pattern, on_call, token, immediate=not grad)
    batch = Batch(_to_device(tuple(batch.args), dev), _to_device(dict(batch.kwargs), dev))
    if not grad:
        with torch.no_grad():
            _forward(model, batch, rec, coverage)
        if not rec.count:
            raise LoadError(_nothing_captured(pattern, rec.unmatched, coverage))
        return FORWARD_ONLY
    with torch.enable_grad(), params_require_grad(trained):
        output = _forward(model, batch, rec, coverage)
        if not rec.count:
            raise LoadError(_nothing_captured(pattern, rec.unmatched, coverage))
        loss, info = choose_loss(output, batch, loss_fn, loss_name, model)
        del output
        if rec.tapped and not loss.requires_grad:
            # A detached or integer loss: backward cannot reach any layer, so only fprop can be analysed.
            # Say so (once per run in the results) instead of silently returning fprop-only tables.
            info = dataclasses.replace(info, no_gradient=(
                f"the {info.kind} loss ({info.detail}) does not depend on the weights (detached, or not a float "
                "tensor): no output gradient reached any layer, so dgrad and wgrad are not analysed; return a "
                "loss computed from the output or pass --loss module:function (loss= in the Python API)"))
            warnings.warn(info.no_gradient, RuntimeWarning, stacklevel=2)
        if rec.tapped and loss.requires_grad:
            # Only the token is differentiated: parameter .grad is never written and no wgrad is computed.
            torch.autograd.grad(loss, [token], allow_unused=True)
            if rec.no_grad:
                info = dataclasses.replace(info, no_gradient=_no_grad_gemms(rec.no_grad))
                warnings.warn(info.no_gradient, RuntimeWarning, stacklevel=2)
        del loss
    rec.flush()
    return info
