"""Capture every linear GEMM's real operands (activation, weight, bias, output gradient) from forward + backward passes."""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .loading import Batch, LoadError

LossFn = Callable[[Any, Batch], torch.Tensor]


@dataclass
class LinearCall:
    """One linear GEMM of one batch, named by module path (``name#k`` for the k-th reuse in a forward).

    ``activation`` A [tokens, in], ``weight`` W [out, in], ``bias`` [out] or None, ``grad_output``
    G [tokens, out] (dL/dY from the real backward pass; None when the output does not reach the loss).
    All detached, in the model's dtype, on the capture device.
    """

    name: str
    activation: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    grad_output: torch.Tensor | None


@dataclass(frozen=True)
class LossInfo:
    """How the gradient was produced: kind "model" (the model's own loss), "custom" (--loss) or "surrogate"."""

    kind: str
    detail: str


SURROGATE = LossInfo("surrogate", "mean of squares of the model output (no loss returned by the model, no --loss)")


def _linear_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear]
    try:  # Hugging Face GPT-2 style Conv1D: y = x @ W + b with W [in, out]
        from transformers.pytorch_utils import Conv1D
        types.append(Conv1D)
    except ImportError:
        pass
    return tuple(types)


def _module_weight(mod: nn.Module) -> torch.Tensor:
    """Weight in [out, in] layout (Conv1D stores [in, out])."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    return mod.weight.t()


class _Recorder:
    """Collects (name, A, W, bias, Y) per forward; names repeated calls name#1, name#2, …"""

    def __init__(self, pattern: re.Pattern | None) -> None:
        self.pattern = pattern
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self.seen: dict[str, int] = {}

    def record(self, name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor) -> None:
        k = self.seen.get(name, 0)
        self.seen[name] = k + 1
        full = name if k == 0 else f"{name}#{k}"
        if self.pattern is not None and not self.pattern.search(full):
            return
        self.calls.append((full, x, w, b, y))


@contextmanager
def _eager_hooks(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    types = _linear_types()
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, types):
            def hook(m: nn.Module, inputs: tuple, kwargs: dict, output: torch.Tensor, name: str = name) -> None:
                x = inputs[0] if inputs else next(iter(kwargs.values()))  # Linear(input=x) passes it by name
                rec.record(name, x, _module_weight(m), getattr(m, "bias", None), output)
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
            self.rec.record(_node_name(n), args[0], args[1], bias, out)
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
        loss = loss_fn(output, batch)
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


def capture_batch(model: Callable, batch: Batch, on_call: Callable[[LinearCall], None], *,
                  layers: str | re.Pattern | None = None, loss_fn: LossFn | None = None,
                  loss_name: str | None = None, device: str | torch.device = "cpu") -> LossInfo:
    """Run one forward + backward of ``model`` on ``batch`` and hand every linear GEMM to ``on_call``.

    ``layers``: a regex; only module paths it matches (re.search) are captured. Each call is handed
    over in forward order once the backward pass is done; its tensors are released when ``on_call``
    returns, so memory is one batch's activations and output gradients.
    """
    pattern = re.compile(layers) if isinstance(layers, str) else layers
    rec = _Recorder(pattern)
    dev = torch.device(device)
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
            text = str(exc).strip().splitlines()
            raise LoadError(f"the model failed on the inputs: {type(exc).__name__}: {text[0] if text else ''}") from exc
        if not rec.calls:
            raise LoadError("no linear layer was captured" + (f" matching --layers {pattern.pattern!r}" if pattern else ""))
        loss, info = choose_loss(output, batch, loss_fn, loss_name)
        outs = [y for (_, _, _, _, y) in rec.calls]
        needs = [i for i, y in enumerate(outs) if y.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(outs)
        if needs and loss.requires_grad:
            got = torch.autograd.grad(loss, [outs[i] for i in needs], allow_unused=True)
            for i, g in zip(needs, got):
                grads[i] = g
    del output, loss
    calls, rec.calls = rec.calls, []
    calls.reverse()
    grads.reverse()
    while calls:  # pop as we go so each layer's tensors are freed once handled
        name, x, w, b, _ = calls.pop()
        g = grads.pop()
        a2 = x.detach().reshape(-1, x.shape[-1])
        g2 = None if g is None else g.detach().reshape(-1, g.shape[-1])
        on_call(LinearCall(name, a2, w.detach(), None if b is None else b.detach(), g2))
    return info
