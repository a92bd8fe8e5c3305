"""Capture every linear GEMM's real operands (activation, weight, bias, output gradient) from forward + backward passes."""
from __future__ import annotations

import ctypes
import functools
import inspect
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .loading import Batch, LoadError, one_line

LossFn = Callable[[Any, Batch], torch.Tensor]


@dataclass
class LinearCall:
    """One linear GEMM of one batch, named by module path (``name#k`` for the k-th reuse in a forward).

    ``activation`` A [tokens, in], ``weight`` W [out, in], ``bias`` [out] or None, ``grad_output``
    G [tokens, out] (dL/dY from the real backward pass; None when the output does not reach the loss).
    All detached, in the model's dtype, on the capture device. ``index``: the call's position in the
    batch's forward order (calls arrive last layer first, as their gradients do; sinks that list
    layers sort by it).
    """

    name: str
    activation: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None
    index: int = 0


@dataclass(frozen=True)
class LossInfo:
    """How the gradient was produced: kind "model" (the model's own loss), "custom" (--loss) or "surrogate"."""

    kind: str
    detail: str


SURROGATE = LossInfo("surrogate", "mean of squares of the model output (no loss returned by the model, no --loss)")


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    # Hugging Face GPT-2 style Conv1D: y = x @ W + b with W [in, out]. A model holding one has
    # necessarily imported it already, so look it up instead of importing transformers (~10 s cold).
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D"):
        types.append(hf.Conv1D)
    return tuple(types)


def _module_weight(mod: nn.Module) -> torch.Tensor:
    """Weight in [out, in] layout (Conv1D stores [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    return mod.weight.t()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only; musl and others lack it
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
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


class _Recorder:
    """Holds each captured call's operands from its forward until its output gradient arrives, then hands it over.

    Streaming: a call is handed to ``on_call`` inside the backward pass, the moment autograd has
    dL/dY for it (last layer first), and its activation is dropped right after. So besides the
    model's own autograd memory (the saved activations every training step holds anyway) at most
    one layer's operands, gradient and replay are alive at a time. Calls whose output never reaches
    the loss are handed over, in forward order, once backward is done.
    """

    def __init__(self, pattern: re.Pattern | None, on_call: Callable[[LinearCall], None], token: torch.Tensor) -> None:
        self.pattern = pattern
        self.on_call = on_call
        self.token = token
        self.pending: dict[int, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.seen: dict[str, int] = {}
        self.count = 0
        self.tapped = 0

    def record(self, name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
               y: torch.Tensor) -> torch.Tensor:
        """Register one linear call; returns the output the model should continue with (tapped when it has a gradient)."""
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        full = name if k == 0 else f"{name}#{k}"
        if self.pattern is not None and not self.pattern.search(full):
            return y
        index = self.count
        self.count += 1
        self.pending[index] = (full, x, w, b)
        if not (isinstance(y, torch.Tensor) and y.requires_grad):
            return y
        self.tapped += 1
        return _GradTap.apply(y, self.token, functools.partial(self.deliver, index))

    def deliver(self, index: int, grad: torch.Tensor | None) -> None:
        """Hand call ``index`` to on_call with its output gradient (None: the output does not reach the loss)."""
        name, x, w, b = self.pending.pop(index)
        a2 = x.detach().reshape(-1, x.shape[-1])
        g2 = None if grad is None else grad.detach().reshape(-1, grad.shape[-1])
        del x
        self.on_call(LinearCall(name, a2, w.detach(), None if b is None else b.detach(), g2, index))
        release_free_memory()

    def flush(self) -> None:
        """Hand over, in forward order, every call no gradient reached."""
        for index in sorted(self.pending):
            self.deliver(index, None)


@contextmanager
def _eager_hooks(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    types = _linear_types()
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, types):
            def hook(m: nn.Module, inputs: tuple, kwargs: dict, output: torch.Tensor, name: str = name) -> torch.Tensor:
                x = inputs[0] if inputs else next(iter(kwargs.values()))  # Linear(input=x) passes it by name
                return rec.record(name, x, _module_weight(m), getattr(m, "bias", None), output)
            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_LINEAR_TARGETS = (torch.ops.aten.linear.default,)


def _node_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return node.name


class _LinearInterpreter(torch.fx.Interpreter):
    """Runs an exported GraphModule node by node and records every aten.linear call."""

    def __init__(self, gm: torch.fx.GraphModule, rec: _Recorder) -> None:
        super().__init__(gm)
        self.rec = rec

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in _LINEAR_TARGETS:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.rec.record(_node_name(n), args[0], args[1], bias, out)
        return out


def is_exported_graph(model: Any) -> bool:
    """True for a GraphModule with aten.linear nodes (what ep.module() gives), captured through its graph."""
    return isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and n.target in _LINEAR_TARGETS for n in model.graph.nodes)


def _run_graph(gm: torch.fx.GraphModule, batch: Batch, rec: _Recorder) -> Any:
    # ep.module()'s generated forward flattens (args, kwargs) with its pytree spec before the graph
    # and unflattens the outputs after it; the interpreter runs the graph itself, so do the same here.
    try:
        bound = inspect.signature(gm.forward).bind(*batch.args, **batch.kwargs)
    except TypeError as exc:
        raise LoadError(f"inputs do not match the exported program's signature: {exc}") from None
    codegen = gm.graph._codegen
    flat = codegen.process_inputs(*bound.args, **bound.kwargs)
    out = _LinearInterpreter(gm, rec).run(*flat)
    return codegen.process_outputs(out)


def _to_device(obj: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def _model_loss(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 and output.is_floating_point() else None
    if isinstance(output, dict):
        loss = output.get("loss")
    else:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def _surrogate(output: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not leaves:
        raise LoadError("the model output holds no floating-point tensor that depends on the weights; "
                        "pass --loss module:function")
    return sum(t.float().pow(2).mean() for t in leaves)


def choose_loss(output: Any, batch: Batch, loss_fn: LossFn | None, loss_name: str | None) -> tuple[torch.Tensor, LossInfo]:
    """The scalar to differentiate: ``loss_fn(output, batch)``, else the model's own loss, else the surrogate."""
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
        return own, LossInfo("model", "scalar loss returned by the model")
    return _surrogate(output), SURROGATE


@contextmanager
def _grad_enabled_params(model: Any) -> Iterator[None]:
    """Make every float parameter require grad (so linear outputs join the graph), restoring the flags after.

    Parameter .grad is never written: gradients are taken only w.r.t. the linear outputs.
    """
    params = [p for p in model.parameters() if p.is_floating_point()] if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


# Layer names listed when --layers matches none of them.
LIST_LAYERS = 12


def _nothing_captured(pattern: re.Pattern | None, seen: list[str]) -> str:
    """Why nothing was captured, naming the model's linear layers when --layers filtered all of them out."""
    if pattern is None:
        return "no linear layer was captured: the model ran no linear GEMM on these inputs"
    if not seen:
        return f"no linear layer was captured matching --layers {pattern.pattern!r}: the model ran no linear GEMM at all"
    more = f", … ({len(seen)} in all)" if len(seen) > LIST_LAYERS else ""
    return (f"no linear layer was captured matching --layers {pattern.pattern!r}; the model's linear layers are: "
            + ", ".join(seen[:LIST_LAYERS]) + more)


def capture_batch(model: Callable, batch: Batch, on_call: Callable[[LinearCall], None], *,
                  layers: str | re.Pattern | None = None, loss_fn: LossFn | None = None,
                  loss_name: str | None = None, device: str | torch.device = "cpu") -> LossInfo:
    """Run one forward + backward of ``model`` on ``batch`` and hand every linear GEMM to ``on_call``.

    ``layers``: a regex; only module paths it matches (re.search) are captured. Calls are handed
    over during the backward pass as each output gradient arrives (last layer first; ``index``
    gives forward order), then the calls no gradient reached. Memory: the model's own autograd
    activations plus one call's operands and whatever ``on_call`` allocates for it; a call's
    tensors are released when ``on_call`` returns, never held across layers.
    """
    pattern = re.compile(layers) if isinstance(layers, str) else layers
    dev = torch.device(device)
    token = torch.zeros(0, device=dev, requires_grad=True)
    rec = _Recorder(pattern, on_call, token)
    batch = Batch(_to_device(tuple(batch.args), dev), _to_device(dict(batch.kwargs), dev))
    with torch.enable_grad(), _grad_enabled_params(model):
        if not (is_exported_graph(model) or isinstance(model, nn.Module)):
            raise LoadError(f"cannot capture a {type(model).__name__}: expected an nn.Module or an exported program")
        try:
            if is_exported_graph(model):
                output = _run_graph(model, batch, rec)
            else:
                with _eager_hooks(model, rec):
                    output = model(*batch.args, **batch.kwargs)
        except LoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's model failing on these inputs is an input error
            raise LoadError(f"the model failed on the inputs: {one_line(exc)}") from exc
        if not rec.count:
            raise LoadError(_nothing_captured(pattern, list(rec.seen)))
        loss, info = choose_loss(output, batch, loss_fn, loss_name)
        del output
        if rec.tapped and loss.requires_grad:
            # Only the token is differentiated: parameter .grad is never written and no wgrad is computed.
            torch.autograd.grad(loss, [token], allow_unused=True)
        del loss
    rec.flush()
    return info
