"""Find every GEMM a model runs (eager or exported), name it, count it, and let a handler observe or replace it.

One interception, two users: capture (observe operands and, through ``output``, the output
gradient) and the end-to-end mode (``replace`` returns a recipe's result for the same site).

Sites
-----
Each GEMM call becomes a :class:`GemmSite` in one normal form, whatever op produced it::

    Y = a @ b.mT      a [*batch, M, K], b [*batch, N, K]  (contraction dim last on both), Y [*batch, M, N]

``*batch`` is empty (2-D a, b) for a GEMM with a model weight: ``b`` is the weight [out, in] and
``a`` every token's input row [tokens, in]. Batched sites (bmm, attention, grouped convolutions)
have one leading dim ``Bt`` on both (broadcast and flattened). ``b_is_weight`` tells a recipe
whether ``b`` is a model parameter or a second activation.

====================  =========  ===============================================================
kind                  op         normal form
====================  =========  ===============================================================
linear                linear     ``F.linear(x, W, bias)`` anywhere (nn.Linear, MultiheadAttention)
linear                addmm/mm   a weight operand (HF ``Conv1D``: ``addmm(b, x, W[in,out])``)
linear                matmul     ``x @ W.t()`` with a parameter (or a transposed view of one)
matmul                mm, bmm,   two activations; ``baddbmm``/``addmm`` alpha/beta kept;
                      matmul,    ``einsum`` with two operands is permuted into one bmm
                      baddbmm,
                      einsum
attention             sdpa       ``scaled_dot_product_attention`` run as two GEMMs: ``#qk``
                                 (a = q, b = k, Y = q·kᵀ before scaling) and ``#pv`` (a = softmax
                                 probabilities, b = vᵀ); scale, mask, softmax in float32
conv                  conv1d/2d/ implicit GEMM (im2col): a = unfolded patches [N·L, C·k], b = the
                      conv3d     kernel reshaped [out, C·k]; groups become the batch dim
other                 (named)    no GEMM normal form (einsum with more than two operands, mv,
                                 conv_transpose, _scaled_mm, fused attention kernels in a
                                 decomposed graph, LSTM/GRU/RNN layers and cells, complex
                                 operands, ...): always skipped, with its reason and FLOPs
====================  =========  ===============================================================

Names: a GEMM with a weight is named after that parameter (``layers.0.linear1.weight`` →
``layers.0.linear1``, ``self_attn.in_proj_weight`` → ``self_attn.in_proj``); other GEMMs after the
module running them plus the op (``layers.0.self_attn#qk``, ``blocks.1#matmul``); ``#k`` is
appended to the k-th reuse within one forward. Names are the paths of ``model.named_modules()`` as they
are: a prefix every parameter shares is kept (a backbone under a parameter-free head is ``backbone.0``, as
``--layers`` and a weights-only run of its state dict name it). One exception: an exported program whose root
is a thin wrapper (one child, nothing of its own: ``torch.export`` of ``Wrapper(model)`` returning
``model(**x).logits``) is named as the wrapped model, so the ``.pt2`` and the eager model share names.

Handler API
-----------
Subclass :class:`GemmHandler` (all three methods optional)::

    skip(site)      -> str | None   reason to leave this site alone (counted as skipped), None = handle it
    replace(site)   -> Tensor|None  the GEMM result Y [*batch, M, N] to use instead of a @ b.mT (bias,
                                    alpha/beta, reshaping back to the op's layout are added by the site),
                                    None = run the op as the model does
    output(site, y) -> Tensor       sees the op's output y (the op's layout, bias included) and returns
                                    what the model continues with (capture returns a gradient tap)

Always read the operands with ``site.operands()``: a convolution site keeps the raw input and
kernel in ``a``/``b`` and unfolds the patches only when asked (``site.shapes()`` gives the GEMM
shapes without unfolding). ``site.grad_to_gemm(dy)`` maps a gradient of the op's output to dL/dY [*batch, M, N].
Run a model with ``intercept(model, handler, coverage)`` (eager ``nn.Module``: a
``TorchFunctionMode`` plus module hooks for the module path) or ``run_graph(gm, args, handler,
coverage)`` (a ``torch.export`` GraphModule, node by node with the same op table). ``coverage``
(:class:`Coverage`) counts every GEMM executed, captured or skipped, and its forward FLOPs.
"""
from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

try:
    from torch.overrides import redispatch_function
except ImportError:  # torch < 2.12 (the GPU machine's 2.11): the same one-hop skip under its private name
    def redispatch_function(func: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
        return torch._C._skip_one_hop_torch_function(func, types, args, kwargs)

from .loading import LoadError

KINDS = ("linear", "matmul", "attention", "conv")
OTHER = "other"
# Python-level torch functions that call GEMMs inside: the mode must stay active in their body
# (TorchFunctionMode pops itself while its handler runs), see _Mode.__torch_function__.
_REENTER = (F.multi_head_attention_forward,)
aten = torch.ops.aten


@dataclass
class GemmSite:
    """One GEMM call in normal form (module docstring). ``flops`` = 2·Bt·M·N·K (forward only)."""

    name: str
    kind: str
    op: str
    a: torch.Tensor
    b: torch.Tensor
    b_is_weight: bool
    bias: torch.Tensor | None = None
    index: int = 0
    grad_to_gemm: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda g: g, repr=False)
    finish: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda y: y, repr=False)
    _lazy: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def flops(self) -> float:
        a, b = self.shapes()
        batch = math.prod(a[:-2])
        return 2.0 * batch * a[-2] * a[-1] * b[-2]

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(self.a.shape), tuple(self.b.shape)

    def operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) in normal form; convolutions unfold their patches here, only when asked (k× the input)."""
        if self._lazy is not None:
            return self._lazy()
        return self.a, self.b


class _LazyConv(GemmSite):
    """A conv site: ``a``/``b`` stay the raw input and kernel until ``operands()``; shapes are computed."""

    def __init__(self, *args: Any, gemm_shapes: tuple[tuple[int, ...], tuple[int, ...]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shapes = gemm_shapes

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self._shapes


class GemmHandler:
    """Observe or replace GEMMs (module docstring). The base class captures nothing and replaces nothing."""

    def skip(self, site: GemmSite) -> str | None:
        return None

    def replace(self, site: GemmSite) -> torch.Tensor | None:
        return None

    def output(self, site: GemmSite, y: torch.Tensor) -> torch.Tensor:
        return y


# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------
@dataclass
class _OpCount:
    executed: int = 0
    captured: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    flops: float = 0.0
    flops_captured: float = 0.0


class Coverage:
    """Counts of GEMM ops executed / captured / skipped (with reasons) and their forward FLOPs, over batches."""

    def __init__(self, kinds: tuple[str, ...] = KINDS) -> None:
        self.kinds = tuple(kinds)
        self.ops: dict[tuple[str, str], _OpCount] = {}

    def add(self, kind: str, op: str, flops: float, reason: str | None) -> None:
        c = self.ops.setdefault((kind, op), _OpCount())
        c.executed += 1
        c.flops += flops
        if reason is None:
            c.captured += 1
            c.flops_captured += flops
        else:
            c.skipped += 1
            c.reasons[reason] += 1

    def merge(self, other: Coverage) -> None:
        """Add ``other``'s counts (another batch's, another rank's) to these."""
        for key, o in other.ops.items():
            c = self.ops.setdefault(key, _OpCount())
            c.executed += o.executed
            c.captured += o.captured
            c.skipped += o.skipped
            c.reasons.update(o.reasons)
            c.flops += o.flops
            c.flops_captured += o.flops_captured

    def table(self) -> pd.DataFrame:
        """The ``coverage`` table: kind, op, executed, captured, skipped, reason, gflops, gflops_captured."""
        rows = [{"kind": kind, "op": op, "executed": c.executed, "captured": c.captured, "skipped": c.skipped,
                 "reason": "; ".join(f"{r} ({n})" for r, n in sorted(c.reasons.items())),
                 "gflops": c.flops / 1e9, "gflops_captured": c.flops_captured / 1e9}
                for (kind, op), c in sorted(self.ops.items(), key=lambda kv: (_kind_order(kv[0][0]), kv[0][1]))]
        cols = ["kind", "op", "executed", "captured", "skipped", "reason", "gflops", "gflops_captured"]
        return pd.DataFrame(rows, columns=cols)

    def summary(self) -> dict:
        """``Results.metadata["coverage"]``: gemms_executed, gemms_captured, flop_share, skipped {reason: n}, kinds."""
        flops = sum(c.flops for c in self.ops.values())
        captured = sum(c.flops_captured for c in self.ops.values())
        skipped: Counter = Counter()
        for (_, op), c in self.ops.items():
            for reason, n in c.reasons.items():
                skipped[f"{op}: {reason}"] += n
        return {"gemms_executed": sum(c.executed for c in self.ops.values()),
                "gemms_captured": sum(c.captured for c in self.ops.values()),
                "flop_share": captured / flops if flops else 1.0,
                "skipped": dict(sorted(skipped.items())), "kinds": list(self.kinds)}


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def coverage_line(summary: dict) -> str:
    """The CLI's coverage line for ``metadata["coverage"]`` (Coverage.summary()): report.verdict.coverage_line."""
    from fp8probe.report.verdict import coverage_line as line, coverage_summary

    return line(coverage_summary([], summary))


def parse_kinds(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"linear,attention"`` / a sequence / ``"all"`` / None → the selected kinds (ValueError on an unknown one)."""
    if spec is None:
        return KINDS
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"expected at least one GEMM kind of all, {', '.join(KINDS)}, got {spec!r}")
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [k for k in KINDS if k not in out]
        elif n in KINDS:
            out += [n] if n not in out else []
        else:
            raise ValueError(f"expected GEMM kinds from all, {', '.join(KINDS)}, got {n!r}")
    return tuple(k for k in KINDS if k in out)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def _param_name(owner: str, attr: str) -> str:
    if attr == "weight":  # (the root module's own weight, a bare nn.Linear's: "weight", its state_dict key)
        return owner or attr
    stem = attr[: -len("_weight")] if attr.endswith("_weight") else attr
    return f"{owner}.{stem}" if owner else stem


class _Namer:
    """Module path + op names, parameter-derived names for weights, reuse counted."""

    def __init__(self, model: nn.Module, strip_wrapper: bool = False) -> None:
        # An exported program of a thin wrapper (a root with one child and nothing of its own, such as a module
        # returning model(**x).logits for torch.export) is named as the wrapped model: its prefix is dropped.
        children = [(n, c) for n, c in model.named_children() if not n.startswith("_")]  # (not _guards_fn)
        self.prefix = children[0][0] if strip_wrapper and len(children) == 1 and not any(
            True for _ in model.named_parameters(recurse=False)) else ""
        self.params: dict[int, list[tuple[str, str]]] = {}
        # Modules whose weight is computed from parameters on each access (weight_norm, spectral_norm, any
        # torch.nn.utils.parametrize): the tensor their op gets is their weight, although no parameter.
        self.parametrized: set[str] = set()
        for path, mod in model.named_modules(remove_duplicate=False):
            for attr, p in mod._parameters.items():
                if p is not None:
                    self.params.setdefault(id(p), []).append((path, attr))
            if parametrize.is_parametrized(mod, "weight"):
                self.parametrized.add(path)
        self.seen: Counter = Counter()

    def enter(self, path: str, module: nn.Module) -> list[int]:
        """Name the parameters ``module`` holds now, for the duration of its forward: FSDP2 swaps the
        sharded parameters for all-gathered ones in its pre-forward hook, and a streamed model
        (analysis/streaming.py) swaps meta parameters for loaded ones, so ids taken at construction
        no longer match. Returns the ids added, for ``leave`` (an id is reused once its tensor is freed)."""
        added = []
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in self.params:
                self.params[id(p)] = [(path, attr)]
                added.append(id(p))
        return added

    def leave(self, added: list[int]) -> None:
        for key in added:
            self.params.pop(key, None)

    def strip(self, path: str) -> str:
        if self.prefix and (path == self.prefix or path.startswith(self.prefix + ".")):
            return path[len(self.prefix) + 1:]
        return path

    def weight(self, t: torch.Tensor) -> tuple[str, str] | None:
        """(owner path, attr) of a model parameter ``t`` (or of the parameter a transposed view of it comes from)."""
        hit = self.params.get(id(t))
        if hit is None and t._base is not None and t.dim() == 2 and t._base.dim() == 2:
            hit = self.params.get(id(t._base))
        return hit[0] if hit else None

    def name(self, module_path: str, op_suffix: str, weight: torch.Tensor | None = None) -> str:
        base = None
        if weight is not None and module_path in self.parametrized and self.weight(weight) is None:
            base = _param_name(self.strip(module_path), "weight")
        elif weight is not None:
            owners = self.params.get(id(weight)) or self.params.get(id(weight._base)) or []
            # A tied weight (GPT-2's lm_head / wte) is named after the module running the GEMM.
            own = [o for o in owners if o[0] == module_path] or owners
            if own:
                base = _param_name(self.strip(own[0][0]), own[0][1])
        if base is None:
            path = self.strip(module_path)
            base = f"{path}#{op_suffix}" if path else f"#{op_suffix}"
        k = self.seen[base]
        self.seen[base] = k + 1
        return base if k == 0 else f"{base}#{k}"


# --------------------------------------------------------------------------------------------
# Normal forms
# --------------------------------------------------------------------------------------------
def _is_float(*ts: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in ts)


def _not_float(*ts: Any) -> str:
    """The skip reason of a GEMM whose operands are not all real floating point."""
    if any(isinstance(t, torch.Tensor) and t.is_complex() for t in ts):
        return "complex operands (no FP8/INT8 form)"
    return "non-floating-point operands"


class _Interceptor:
    """The op table shared by the eager mode and the graph interpreter: one method per GEMM op."""

    def __init__(self, model: nn.Module, handler: GemmHandler, coverage: Coverage, graph: bool = False) -> None:
        self.namer = _Namer(model, strip_wrapper=graph)
        self.handler = handler
        self.coverage = coverage
        self.path = ""  # the module running now (eager: hooks; graph: node meta)
        self.index = 0

    # -- one site ----------------------------------------------------------------------------
    def _site(self, kind: str, op: str, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None,
              **extra: Any) -> GemmSite:
        name = self.namer.name(self.path, op if kind != "attention" else extra.pop("suffix"), weight)
        cls = _LazyConv if "gemm_shapes" in extra else GemmSite
        site = cls(name, kind, op, a, b, weight is not None, index=self.index, **extra)
        self.index += 1
        return site

    def _reason(self, site: GemmSite) -> str | None:
        if site.kind not in self.coverage.kinds:
            return "not selected (--gemms)"
        return self.handler.skip(site)

    def _run(self, site: GemmSite, original: Callable[[], torch.Tensor], reason: str | None = None,
             counted: bool = False) -> torch.Tensor:
        if not counted:
            reason = reason or self._reason(site)
            self.coverage.add(site.kind, site.op, site.flops, reason)
        if reason is not None:
            return original()
        y_gemm = self.handler.replace(site)
        y = site.finish(y_gemm) if y_gemm is not None else original()
        return self.handler.output(site, y)

    def other(self, op: str, flops: float, reason: str, original: Callable[[], Any]) -> Any:
        self.coverage.add(OTHER, op, flops, reason)
        return original()

    # -- linear / mm family ------------------------------------------------------------------
    def linear(self, original: Callable, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        if not _is_float(x, w):
            return self.other("linear", 0.0, _not_float(x, w), original)
        lead, n, k = x.shape[:-1], w.shape[0], w.shape[-1]
        if x.dim() == 0 or x.shape[-1] != k:
            # Operands that do not fit: torch's own error ("mat1 and mat2 shapes cannot be multiplied (3x13 and
            # 8x16)"), not that of the flattening below ("shape '[-1, 8]' is invalid for input of size 39").
            return original()
        weight = w if self.namer.weight(w) or self.path in self.namer.parametrized else None
        if weight is not None and 0 in w.shape:
            # Linear(0, n) / Linear(n, 0): a GEMM without elements has no error to measure (and its
            # operands cannot even be flattened to [tokens, features]); fine when --layers leaves it out.
            site = self._site("linear", "linear", x, w, weight, bias=bias)
            reason = self._reason(site)
            if reason is None:
                raise LoadError(f"layer {site.name} has a weight of shape {list(w.shape)}: a linear layer with no "
                                "input or output features cannot be analysed; exclude it with --layers")
            return self._run(site, original, reason)
        kind = "linear" if weight is not None else "matmul"
        site = self._site(kind, "linear", x.reshape(-1, k), w, weight, bias=bias,
                          grad_to_gemm=lambda g: g.reshape(-1, n),
                          finish=lambda y: _add(y.reshape(*lead, n), bias))
        return self._run(site, original)

    def matmul(self, original: Callable, op: str, x: torch.Tensor, y: torch.Tensor, *, addend: Any = None,
               beta: float = 1.0, alpha: float = 1.0) -> Any:
        """mm / matmul / bmm / addmm / baddbmm: Y = beta·addend + alpha·(x @ y)."""
        if not _is_float(x, y):
            return self.other(op, 0.0, _not_float(x, y), original)
        if x.dim() == 0 or y.dim() == 0:
            return original()
        x_vec, y_vec = x.dim() == 1, y.dim() == 1
        x2 = x.unsqueeze(0) if x_vec else x
        y2 = y.unsqueeze(-1) if y_vec else y
        if x2.shape[-1] != y2.shape[-2]:
            return original()  # (torch's own error for operands that do not fit, as in linear)
        m, k, n = x2.shape[-2], x2.shape[-1], y2.shape[-1]
        out_shape = torch.broadcast_shapes(x2.shape[:-2], y2.shape[:-2]) + (m, n)

        def squeeze(t: torch.Tensor) -> torch.Tensor:
            t = t.squeeze(-1) if y_vec else t
            return t.squeeze(-2) if x_vec else t

        def unsqueeze(t: torch.Tensor) -> torch.Tensor:
            t = t.unsqueeze(-2) if x_vec else t
            return t.unsqueeze(-1) if y_vec else t

        def finish(gemm: torch.Tensor) -> torch.Tensor:
            out = squeeze(gemm.reshape(out_shape))
            out = out * alpha if alpha != 1 else out
            return out if addend is None else out + (beta * addend if beta != 1 else addend)

        def to_gemm(g: torch.Tensor, lead: int) -> torch.Tensor:
            g = unsqueeze(g) * alpha if alpha != 1 else unsqueeze(g)
            return g.reshape(-1, m, n) if lead else g.reshape(-1, n)

        w_right = self.namer.weight(y) if y.dim() == 2 and not y_vec else None
        w_left = self.namer.weight(x) if x.dim() == 2 and not x_vec and not w_right else None
        if w_right or (y2.dim() == 2 and not w_left):
            # y is 2-D: fold every leading dim of x into the rows -> one 2-D GEMM against yᵀ [n, k]
            weight = y if w_right else None
            site = self._site("linear" if weight is not None else "matmul", op, x2.reshape(-1, k), y2.mT, weight,
                              bias=addend if weight is not None else None,
                              grad_to_gemm=lambda g: to_gemm(g, 0), finish=finish)
            return self._run(site, original)
        if w_left and y2.dim() == 2:
            # W [m, k] @ x [k, n]: the transposed GEMM xᵀ [n, k] · Wᵀ has the weight on the right
            site = self._site("linear", op, y2.mT, x, x, grad_to_gemm=lambda g: to_gemm(g, 0).mT,
                              finish=lambda t: finish(t.mT))
            return self._run(site, original)
        lead = out_shape[:-2]
        a = x2.expand(*lead, m, k).reshape(-1, m, k)
        b = y2.expand(*lead, k, n).reshape(-1, k, n).mT
        site = self._site("matmul", op, a, b, None, grad_to_gemm=lambda g: to_gemm(g, 1), finish=finish)
        return self._run(site, original)

    def einsum(self, original: Callable, equation: str, operands: list) -> Any:
        parsed = _parse_einsum(equation, operands)
        if isinstance(parsed, str):
            flops, gemms = _einsum_contractions(equation, operands)
            if len(operands) > 2 and gemms and _is_float(*operands):
                parsed = (f"einsum of {len(operands)} operands: torch runs it as {gemms} pairwise GEMM"
                          f"{'s' if gemms != 1 else ''} (written as einsums of two operands, each is captured)")
            return self.other("einsum", flops, parsed, original)
        x, y = operands
        (perm_a, perm_b, m, n, k, bt, out_dims, out_perm) = parsed
        a = x.permute(perm_a).reshape(bt, m, k)
        b = y.permute(perm_b).reshape(bt, n, k)
        inv = [out_perm.index(i) for i in range(len(out_perm))]

        def to_gemm(g: torch.Tensor) -> torch.Tensor:
            return g.permute(out_perm).reshape(bt, m, n)

        def finish(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(out_dims).permute(inv)

        # A parameter contracted without a batch index ("bi,io->bo", "bhd,hdo->bo") is a weight, as in x @ W:
        # the weight's quantiser, its name, kind linear. On the left ("oi,bi->bo") the GEMM is transposed so
        # that the weight is b.
        w_right = bt == 1 and self.namer.weight(y) is not None
        if w_right or (bt == 1 and self.namer.weight(x) is not None):
            if w_right:
                site = self._site("linear", "einsum", a[0], b[0], y, grad_to_gemm=lambda g: to_gemm(g)[0],
                                  finish=finish)
            else:
                site = self._site("linear", "einsum", b[0], a[0], x, grad_to_gemm=lambda g: to_gemm(g)[0].mT,
                                  finish=lambda t: finish(t.mT))
            return self._run(site, original)
        site = self._site("matmul", "einsum", a, b, None, grad_to_gemm=to_gemm, finish=finish)
        return self._run(site, original)

    # -- attention ---------------------------------------------------------------------------
    def sdpa(self, original: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False) -> Any:
        if not _is_float(q, k, v):
            return self.other("sdpa", 0.0, _not_float(q, k, v), original)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        qb = q.expand(*lead, L, E).reshape(-1, L, E)
        kb = k.expand(*lead, S, E).reshape(-1, S, E)
        vt = v.expand(*lead, S, Ev).reshape(-1, S, Ev).mT
        qk = self._site("attention", "sdpa", qb, kb, None, suffix="qk",
                        grad_to_gemm=lambda g: g.reshape(-1, L, S), finish=lambda t: t.reshape(*lead, L, S))
        # The probabilities exist only after the first GEMM: a meta placeholder gives the site its shape.
        pv = self._site("attention", "sdpa", torch.empty((qb.shape[0], L, S), device="meta"), vt, None, suffix="pv",
                        grad_to_gemm=lambda g: g.reshape(-1, L, Ev), finish=lambda t: t.reshape(*lead, L, Ev))
        r_qk, r_pv = self._reason(qk), self._reason(pv)
        self.coverage.add("attention", "sdpa", qk.flops, r_qk)
        self.coverage.add("attention", "sdpa", pv.flops, r_pv)
        if r_qk is not None and r_pv is not None:
            return original()
        # The math path of scaled_dot_product_attention (its documented reference), GEMMs as sites.
        scores = self._run(qk, lambda: q @ k.mT, r_qk, counted=True)
        s32 = scores.float() * (1.0 / math.sqrt(E) if scale is None else scale)
        if is_causal:
            # top-left aligned, as torch documents is_causal (query i sees keys 0..i whatever S - L is)
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=0)
            s32 = s32.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            s32 = s32.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s32 + attn_mask.float()
        probs = torch.softmax(s32, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        probs = probs.to(v.dtype)
        pv.a = probs.expand(*lead, L, S).reshape(-1, L, S)
        return self._run(pv, lambda: probs @ v, r_pv, counted=True)

    # -- convolution -------------------------------------------------------------------------
    def conv(self, original: Callable, op: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Any:
        nd = w.dim() - 2
        if not _is_float(x, w):
            return self.other(op, 0.0, _not_float(x, w), original)
        unbatched = x.dim() == nd + 1
        xb = x.unsqueeze(0) if unbatched else x
        ksz = tuple(w.shape[2:])
        stride, dilation = _tup(stride, nd), _tup(dilation, nd)
        pads = _conv_padding(padding, ksz, dilation, nd)
        spatial = [xb.shape[2 + i] + pads[2 * i] + pads[2 * i + 1] for i in range(nd)]
        out_sp = [(spatial[i] - dilation[i] * (ksz[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
        nb, cin, cout, g = xb.shape[0], xb.shape[1], w.shape[0], groups
        rows, kdim, ng = nb * math.prod(out_sp), (cin // g) * math.prod(ksz), cout // g
        shapes = ((rows, kdim), (cout, kdim)) if g == 1 else ((g, rows, kdim), (g, ng, kdim))
        weight = w if self.namer.weight(w) or self.path in self.namer.parametrized else None

        def operands() -> tuple[torch.Tensor, torch.Tensor]:
            cols = im2col(xb, ksz, stride, pads, dilation)          # [N·L, C·k]
            wmat = w.reshape(cout, -1)
            if g == 1:
                return cols, wmat
            cols = cols.reshape(rows, g, kdim).transpose(0, 1)
            return cols, wmat.reshape(g, ng, kdim)

        def to_gemm(dy: torch.Tensor) -> torch.Tensor:
            dy = dy.unsqueeze(0) if unbatched else dy
            flat = dy.reshape(nb, cout, -1).transpose(1, 2).reshape(rows, cout)
            return flat if g == 1 else flat.reshape(rows, g, ng).transpose(0, 1)

        def finish(t: torch.Tensor) -> torch.Tensor:
            t = t if g == 1 else t.transpose(0, 1).reshape(rows, cout)
            y = t.reshape(nb, *out_sp, cout).movedim(-1, 1)
            y = _add(y, None if bias is None else bias.reshape(cout, *([1] * nd)))
            return y.squeeze(0) if unbatched else y

        site = self._site("conv", op, x, w, weight, bias=bias, grad_to_gemm=to_gemm, finish=finish,
                          gemm_shapes=shapes, _lazy=operands)
        return self._run(site, original)


def _add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _tup(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(v) * (nd if len(tuple(v)) == 1 else 1) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _conv_padding(padding: Any, ksz: tuple[int, ...], dilation: tuple[int, ...], nd: int) -> list[int]:
    """[before_0, after_0, before_1, after_1, …] per spatial dim ('same' puts the odd element after, as torch does)."""
    if padding == "valid":
        return [0] * (2 * nd)
    if padding == "same":
        out = []
        for k, d in zip(ksz, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    return [p for p in _tup(padding, nd) for _ in range(2)]


def im2col(x: torch.Tensor, ksz: tuple[int, ...], stride: tuple[int, ...], pads: list[int],
           dilation: tuple[int, ...]) -> torch.Tensor:
    """Convolution patches of x [N, C, *spatial] as rows [N·L, C·prod(ksz)], columns ordered (C, k…) like
    ``F.unfold`` and like ``weight.reshape(out, -1)``; any number of spatial dims, padding as [before, after]·nd."""
    nd = len(ksz)
    flat_pad = []
    for i in reversed(range(nd)):  # F.pad lists the last dim first
        flat_pad += [pads[2 * i], pads[2 * i + 1]]
    xp = F.pad(x, flat_pad) if any(flat_pad) else x
    for i in range(nd):
        span = dilation[i] * (ksz[i] - 1) + 1
        xp = xp.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            xp = xp[..., :: dilation[i]]
    # xp [N, C, o_1..o_nd, k_1..k_nd] -> [N, o…, C, k…] -> [N·L, C·k]
    n, c = xp.shape[:2]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return xp.permute(perm).reshape(n * math.prod(xp.shape[2:2 + nd]), c * math.prod(ksz))


# --------------------------------------------------------------------------------------------
# einsum with two operands -> one bmm
# --------------------------------------------------------------------------------------------
def _einsum_terms(equation: str, operands: list) -> tuple[list[str], str] | str:
    """Input terms and output term with '...' spelled out as fresh letters (right-aligned, as einsum broadcasts)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(operands) or not all(isinstance(t, torch.Tensor) for t in operands):
        return "einsum terms do not match its operands"
    used = set(eq)
    fresh = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    n_ell = max((t.dim() - len(term.replace("...", "")) for term, t in zip(ins, operands) if "..." in term),
                default=0)
    if n_ell > len(fresh):
        return "einsum with too many '...' dims"
    ell = "".join(fresh[:n_ell])
    ins = [term.replace("...", ell[n_ell - (t.dim() - len(term.replace("...", ""))):]) for term, t in zip(ins, operands)]
    if "." in "".join(ins):
        return "einsum terms do not match its operands"
    if arrow:
        out = out.replace("...", ell)
    else:
        counts = Counter("".join(ins))
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return ins, out


def _parse_einsum(equation: str, operands: list) -> tuple | str:
    """(perm_a, perm_b, M, N, K, Bt, out_dims, out_perm) for a two-operand contraction, else the reason it is not one."""
    if len(operands) != 2 or not _is_float(*operands):
        return "einsum that is not a contraction of two floating-point operands"
    terms = _einsum_terms(equation, operands)
    if isinstance(terms, str):
        return terms
    (ta, tb), out = terms
    x, y = operands
    if len(set(ta)) != len(ta) or len(set(tb)) != len(tb) or len(set(out)) != len(out) \
            or len(ta) != x.dim() or len(tb) != y.dim():
        return "einsum with a repeated index (no GEMM decomposition)"
    size = {c: x.shape[i] for i, c in enumerate(ta)}
    for i, c in enumerate(tb):
        if size.setdefault(c, y.shape[i]) != y.shape[i]:
            return "einsum with broadcast sizes (no GEMM decomposition)"
    batch = [c for c in out if c in ta and c in tb]
    left = [c for c in out if c in ta and c not in tb]
    right = [c for c in out if c in tb and c not in ta]
    contract = [c for c in ta if c in tb and c not in out]
    if len(batch) + len(left) + len(right) != len(out) or set(ta) != set(batch + left + contract) \
            or set(tb) != set(batch + right + contract):
        return "einsum that sums an index of one operand only (no GEMM decomposition)"
    if not contract:
        return "einsum without a contracted index (an outer or elementwise product, not a GEMM)"
    perm_a = [ta.index(c) for c in batch + left + contract]
    perm_b = [tb.index(c) for c in batch + right + contract]
    prod = lambda cs: math.prod(size[c] for c in cs)  # noqa: E731
    gemm_order = batch + left + right
    out_perm = [out.index(c) for c in gemm_order]
    return (perm_a, perm_b, prod(left), prod(right), prod(contract), prod(batch),
            [size[c] for c in gemm_order], out_perm)


def _einsum_path(n: int, shapes: list[tuple[int, ...]], equation: str) -> list[tuple[int, int]]:
    """The pairs torch.einsum contracts, as positions in its shrinking operand list (each result appended at the
    end, opt_einsum's convention): opt_einsum's path when torch uses it (installed and
    torch.backends.opt_einsum.enabled), else left to right (torch's own order: operand 0 with 1, the result
    with 2, ...: after the first pair the next operand is at 0 and the result last)."""
    opt = torch.backends.opt_einsum
    if n > 2 and opt.is_available() and opt.enabled:
        try:
            path, _ = opt.get_opt_einsum().contract_path(equation, *shapes, shapes=True, optimize=opt.strategy)
            if all(len(pair) == 2 for pair in path):
                return [tuple(pair) for pair in path]
        except Exception:  # noqa: BLE001 - an equation opt_einsum does not take: torch's own order below
            pass
    return [(0, 1)] + [(0, m - 1) for m in range(n - 1, 1, -1)]


def _einsum_contractions(equation: str, operands: list) -> tuple[float, int]:
    """(FLOPs, GEMMs) of an einsum torch does not run as one GEMM here: the pairwise contractions torch makes
    (_einsum_path): one that sums an index is a bmm of 2 · the product of the sizes of every index of its two
    operands (M·N·K·batch); one that sums none is an elementwise or outer product (torch multiplies, no GEMM,
    no FLOPs), as torch's FLOP counter counts them. The product of all index sizes at once, counted before,
    overstated a three-operand chain by the size of the index its two contractions do not share (32x on
    [32, 64] · [64, 64] · [64, 64])."""
    terms = _einsum_terms(equation, operands)
    if isinstance(terms, str) or len(operands) < 2:
        return 0.0, 0
    ins, out = terms
    size: dict[str, int] = {}
    for term, t in zip(ins, operands):
        if t.dim() == len(term):
            size.update({c: t.shape[i] for i, c in enumerate(term) if t.shape[i] != 1 or c not in size})
    # an index of one operand only (and not of the output) is summed out of that operand first: no GEMM
    live = [{c for c in term if c in out or any(c in other for k, other in enumerate(ins) if k != i)}
            for i, term in enumerate(ins)]
    flops, gemms = 0.0, 0
    for i, j in _einsum_path(len(live), [tuple(t.shape) for t in operands], equation):
        if max(i, j) >= len(live):
            break
        a, b = live[i], live[j]
        live = [t for k, t in enumerate(live) if k not in (i, j)]
        union = a | b
        keep = {c for c in union if c in out or any(c in t for t in live)}
        if union - keep:  # an index summed here: a bmm
            flops += 2.0 * math.prod(size.get(c, 1) for c in union)
            gemms += 1
        live.append(keep)
    return flops, gemms


# --------------------------------------------------------------------------------------------
# The op table: torch-level functions (eager) and aten overloads (exported graphs)
# --------------------------------------------------------------------------------------------
def _bind(*names: str, defaults: tuple = ()) -> Callable[[tuple, dict], list]:
    """Positional + keyword args -> the values of ``names`` (missing trailing ones from ``defaults``)."""
    def get(args: tuple, kwargs: dict) -> list:
        vals = list(args[: len(names)])
        for i in range(len(vals), len(names)):
            j = i - (len(names) - len(defaults))
            vals.append(kwargs.get(names[i], defaults[j] if j >= 0 else None))
        return vals
    return get


def _dispatch(icp: _Interceptor, func: Any, args: tuple, kwargs: dict, original: Callable[[], Any]) -> Any:
    """Route one call to its normal form; returns NotImplemented for functions that are not GEMMs."""
    kw = kwargs or {}
    if func in _LINEAR:
        x, w, b = _bind("input", "weight", "bias", defaults=(None,))(args, kw)
        return icp.linear(original, x, w, b)
    if func in _MM:
        x = args[0] if args else kw.get("input", kw.get("self"))
        y = args[1] if len(args) > 1 else kw.get("other", kw.get("mat2"))
        if func is torch.Tensor.__rmatmul__:
            x, y = y, x
        return icp.matmul(original, _MM[func], x, y)
    if func in _ADDMM:
        op = _ADDMM[func]
        inp = args[0] if args else kw.get("input")
        m1 = args[1] if len(args) > 1 else kw.get("mat1", kw.get("batch1"))
        m2 = args[2] if len(args) > 2 else kw.get("mat2", kw.get("batch2"))
        beta, alpha = kw.get("beta", 1), kw.get("alpha", 1)
        return icp.matmul(original, op, m1, m2, addend=inp, beta=beta, alpha=alpha)
    if func in _SDPA:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        vals = _bind(*names, defaults=(None, 0.0, False, None, False))(args, kw)
        return icp.sdpa(original, *vals)
    if func in _CONV:
        op = _CONV[func]
        vals = _bind("input", "weight", "bias", "stride", "padding", "dilation", "groups",
                     defaults=(None, 1, 0, 1, 1))(args, kw)
        return icp.conv(original, op, *vals)
    if func is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = args[:9]
        if transposed:
            op = f"conv_transpose{w.dim() - 2}d"
            return icp.other(op, _other_flops(op, (x, w)), "transposed convolution (no im2col)", original)
        return icp.conv(original, f"conv{w.dim() - 2}d", x, w, b, stride, padding, dilation, groups)
    if func in _EINSUM:
        if func is aten.einsum.default:
            eq, ops = args[0], list(args[1])
        else:
            eq, ops = args[0], list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        return icp.einsum(original, eq, ops)
    if func in _INNER:
        x, y = _bind("input", "other")(args, kw)
        if _is_float(x, y) and x.dim() >= 1 and y.dim() == 2:  # inner(x, W) = x @ Wᵀ
            return icp.matmul(original, "inner", x, y.mT)
    if func in _ADDBMM:
        inp, b1, b2 = _bind("input", "batch1", "batch2")(args, kw)
        if _is_float(b1, b2) and b1.dim() == 3 and b2.dim() == 3 and b1.shape[0] == b2.shape[0]:
            # Σ_b batch1[b] @ batch2[b] is one GEMM contracting (b, k): [n, B·k] @ [B·k, p]
            nb, n, k = b1.shape
            return icp.matmul(original, "addbmm", b1.permute(1, 0, 2).reshape(n, nb * k),
                              b2.reshape(nb * k, b2.shape[2]), addend=inp, beta=kw.get("beta", 1),
                              alpha=kw.get("alpha", 1))
    if func in _TENSORDOT:
        a, b, dims = _bind("a", "b", "dims", defaults=(2,))(args, kw)
        form = _tensordot_form(a, b, dims) if _is_float(a, b) else None
        if form is not None:
            a2, b2, out_shape = form
            m, n = a2.shape[0], b2.shape[1]
            return icp.matmul(lambda: original().reshape(m, n), "tensordot", a2, b2).reshape(out_shape)
    if func in _OTHER:
        op = _OTHER[func]
        reason = ("transposed convolution (no im2col)" if op.startswith("conv_transpose")
                  else "already a low-precision GEMM" if op in ("_scaled_mm", "_int_mm")
                  else "fused attention kernel (export without decompositions to capture it)"
                  if op.startswith("scaled_dot_product")
                  else f"{op}: a chain of GEMMs in one call (written as matmuls, each is captured)"
                  if op in ("multi_dot", "chain_matmul")
                  else "recurrent layer: its GEMMs run inside one fused op (not captured)"
                  if op in _RECURRENT or op in _RECURRENT_CELLS else f"{op} has no GEMM normal form")
        return icp.other(op, _other_flops(op, args), reason, original)
    return NotImplemented


def _other_flops(op: str, args: tuple) -> float:
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    try:
        if op in ("mv", "addmv") and len(ts) >= 2:
            return 2.0 * ts[-2].shape[0] * ts[-2].shape[1]
        if op in ("dot", "vdot", "inner") and len(ts) >= 2:
            return 2.0 * ts[0].numel() * (ts[1].numel() // max(ts[0].shape[-1], 1) if ts[0].dim() else 1)
        if op in ("_scaled_mm", "_int_mm") and len(ts) >= 2:
            return 2.0 * ts[0].shape[0] * ts[0].shape[1] * ts[1].shape[1]
        if op == "addbmm" and len(ts) >= 3:
            b1, b2 = ts[1], ts[2]
            return 2.0 * b1.shape[0] * b1.shape[1] * b1.shape[2] * b2.shape[2]
        if op.startswith("conv_transpose") and len(ts) >= 2:
            x, w = ts[0], ts[1]
            return 2.0 * x.numel() * w.shape[1] * math.prod(w.shape[2:])
        if op == "bilinear" and len(ts) >= 3:  # y[n, o] = Σ_ij x1[n, i] W[o, i, j] x2[n, j]
            x1, w = ts[0], ts[2]
            return 2.0 * (x1.numel() // max(x1.shape[-1], 1)) * w.numel()
        if op in ("multi_dot", "chain_matmul"):
            mats = [t for t in (args[0] if args and isinstance(args[0], (list, tuple)) else ts)
                    if isinstance(t, torch.Tensor)]
            return _chain_flops(mats)
        if op in _RECURRENT_CELLS and len(ts) >= 3:  # (input, hx, w_ih, w_hh, b_ih, b_hh); an LSTM's hx is a tuple
            x = args[0]
            rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
            return 2.0 * rows * sum(w.numel() for w in args[2:4] if isinstance(w, torch.Tensor))
        if op in _RECURRENT and len(args) >= 4:
            # (input, hx, params, ...) or, packed, (data, batch_sizes, hx, params, ...): every 2-D parameter
            # (w_ih, w_hh, an LSTM's w_hr; each layer and direction) multiplies every token once
            packed = isinstance(args[1], torch.Tensor) and not args[1].is_floating_point()
            x, params = args[0], args[3 if packed else 2]
            rows = x.shape[0] if packed else x.numel() // max(x.shape[-1], 1)
            return 2.0 * rows * sum(w.numel() for w in params if isinstance(w, torch.Tensor) and w.dim() == 2)
        if op == "tensordot" and len(ts) >= 2:  # (one whose dims did not resolve: 2 · every index once)
            return 2.0 * math.sqrt(float(ts[0].numel()) * ts[1].numel())
    except (IndexError, RuntimeError, TypeError):
        pass
    return 0.0


def _chain_flops(mats: list[torch.Tensor]) -> float:
    """FLOPs of multi_dot / chain_matmul in the cheapest bracketing (the one torch picks; a 1-D first or last
    operand is a row or a column vector)."""
    if len(mats) < 2:
        return 0.0
    dims = [mats[0].shape[0] if mats[0].dim() == 2 else 1] + [t.shape[-1] if t.dim() == 2 else 1 for t in mats]
    n = len(mats)
    cost = [[0.0] * n for _ in range(n)]
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            cost[i][j] = min(cost[i][s] + cost[s + 1][j] + dims[i] * dims[s + 1] * dims[j + 1] for s in range(i, j))
    return 2.0 * cost[0][n - 1]


def _tensordot_form(a: torch.Tensor, b: torch.Tensor, dims: Any) -> tuple | None:
    """tensordot(a, b, dims) as one GEMM: (a [M, K] with its free dims first, b [K, N], the output shape),
    or None when ``dims`` does not name a contraction."""
    try:
        if isinstance(dims, torch.Tensor):
            dims = dims.tolist()
        if isinstance(dims, int):
            da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
        else:
            da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
        da, db = [d % a.dim() for d in da], [d % b.dim() for d in db]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not da or len(da) != len(db) or any(a.shape[i] != b.shape[j] for i, j in zip(da, db)):
        return None
    fa, fb = [d for d in range(a.dim()) if d not in da], [d for d in range(b.dim()) if d not in db]
    k = math.prod(a.shape[d] for d in da)
    out_shape = [a.shape[d] for d in fa] + [b.shape[d] for d in fb]
    a2 = a.permute(fa + da).reshape(math.prod(a.shape[d] for d in fa), k)
    b2 = b.permute(db + fb).reshape(k, math.prod(b.shape[d] for d in fb))
    return a2, b2, out_shape


T = torch.Tensor
_LINEAR = {F.linear, aten.linear.default}
_MM = {torch.mm: "mm", T.mm: "mm", aten.mm.default: "mm", torch.bmm: "bmm", T.bmm: "bmm", aten.bmm.default: "bmm",
       torch.matmul: "matmul", T.matmul: "matmul", T.__matmul__: "matmul", T.__rmatmul__: "matmul",
       aten.matmul.default: "matmul"}
_ADDMM = {torch.addmm: "addmm", T.addmm: "addmm", aten.addmm.default: "addmm",
          torch.baddbmm: "baddbmm", T.baddbmm: "baddbmm", aten.baddbmm.default: "baddbmm"}
_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_CONV = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", aten.conv1d.default: "conv1d",
         aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d", aten.conv1d.padding: "conv1d",
         aten.conv2d.padding: "conv2d", aten.conv3d.padding: "conv3d"}
_EINSUM = {torch.einsum, aten.einsum.default}
# Captured when their operands have a GEMM form (else counted below as other): inner(x, W [n, k]) = x @ Wᵀ,
# addbmm = one GEMM contracting the batch with k, tensordot = one GEMM of the permuted operands.
_INNER = {torch.inner, T.inner}
_ADDBMM = {torch.addbmm, T.addbmm, aten.addbmm.default}
_TENSORDOT = {torch.tensordot}
_OTHER = {torch.mv: "mv", T.mv: "mv", aten.mv.default: "mv", torch.dot: "dot", T.dot: "dot", aten.dot.default: "dot",
          torch.vdot: "vdot", torch.inner: "inner", T.inner: "inner", torch.outer: "outer", torch.tensordot: "tensordot",
          F.bilinear: "bilinear", torch.addmv: "addmv", torch.addbmm: "addbmm", T.addbmm: "addbmm",
          aten.addbmm.default: "addbmm", torch.chain_matmul: "chain_matmul", torch.linalg.multi_dot: "multi_dot",
          F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
          F.conv_transpose3d: "conv_transpose3d", aten.conv_transpose1d.default: "conv_transpose1d",
          aten.conv_transpose2d.input: "conv_transpose2d", aten.conv_transpose3d.input: "conv_transpose3d",
          # GEMMs that already run in low precision (an FP8/INT8 model): nothing to simulate
          torch._scaled_mm: "_scaled_mm", aten._scaled_mm.default: "_scaled_mm", torch._int_mm: "_int_mm",
          aten._int_mm.default: "_int_mm"}
# Recurrent layers (nn.LSTM / GRU / RNN and their cells): every GEMM of the layer runs inside one fused op, so
# none can be replayed on its own; counted with their FLOPs, never silently left out of the coverage.
_RECURRENT = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_RECURRENT_CELLS = tuple(f"{n}_cell" for n in _RECURRENT)
for _n in _RECURRENT + _RECURRENT_CELLS:
    _OTHER[getattr(torch._VF, _n)] = _n
    for _overload in getattr(aten, _n).overloads():
        _OTHER[getattr(getattr(aten, _n), _overload)] = _n
# Fused attention kernels left in a graph exported with decompositions: counted, not decomposed.
_OTHER.update({getattr(aten, n).default: n.lstrip("_") for n in ("_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, n)})


# --------------------------------------------------------------------------------------------
# Eager: a TorchFunctionMode plus module hooks for the module path
# --------------------------------------------------------------------------------------------
class _Mode(TorchFunctionMode):
    def __init__(self, icp: _Interceptor) -> None:
        super().__init__()
        self.icp = icp

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _REENTER:
            # A Python composite (MultiheadAttention's forward): run its body with the mode active,
            # skipping one dispatch hop so it does not land here again (torch.overrides docs).
            with self:
                return redispatch_function(func, types, args, kwargs)
        out = _dispatch(self.icp, func, args, kwargs, lambda: func(*args, **kwargs))
        return func(*args, **kwargs) if out is NotImplemented else out


@contextmanager
def intercept(model: nn.Module, handler: GemmHandler, coverage: Coverage) -> Iterator[_Interceptor]:
    """Within the block, every GEMM ``model`` runs (eagerly, on this thread) goes through ``handler``."""
    scripted: list[str] = []  # the outermost TorchScript modules
    for path, mod in model.named_modules():
        if isinstance(mod, torch.jit.ScriptModule) and not any(
                s == "" or path.startswith(s + ".") for s in scripted):
            scripted.append(path)
    if scripted:
        scripted = [path or "the model" for path in scripted]
        # (its GEMMs run in the TorchScript interpreter, where no hook or function mode sees them)
        shown = ", ".join(scripted[:4]) + (", ..." if len(scripted) > 4 else "")
        raise LoadError(f"{shown} {'is a TorchScript module' if len(scripted) == 1 else 'are TorchScript modules'} "
                        "(torch.jit.script or torch.jit.trace), which fp8probe cannot instrument: pass the eager "
                        "module, or export it with torch.export.export(...) and torch.export.save(..., 'model.pt2')")
    icp = _Interceptor(model, handler, coverage)
    stack: list[tuple[str, list[int]]] = []
    handles = []
    for path, mod in model.named_modules():
        def pre(m: nn.Module, inputs: tuple, path: str = path) -> None:
            stack.append((icp.path, icp.namer.enter(path, m)))
            icp.path = path

        def post(m: nn.Module, inputs: tuple, output: Any) -> None:
            prev, added = stack.pop() if stack else ("", [])
            icp.namer.leave(added)
            icp.path = prev

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))
    try:
        with _Mode(icp), without_recomputation():
            yield icp
    finally:
        for h in handles:
            h.remove()


class _PlainCheckpoint:
    """torch.utils.checkpoint's reentrant Function, replaced: the region runs once, recorded by autograd."""

    @staticmethod
    def apply(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _plain_checkpoint_context(function: Callable, preserve_rng_state: bool, *args: Any, **kwargs: Any) -> Iterator[None]:
    """torch.utils.checkpoint's non-reentrant set-up and tear-down, replaced: none (checkpoint runs the region
    between the generator's one yield and its end)."""
    yield


@contextmanager
def without_recomputation() -> Iterator[None]:
    """Activation checkpointing (torch.utils.checkpoint, which Hugging Face's gradient checkpointing calls) runs
    each region once, as if the model did not checkpoint, for the block.

    Why: a checkpointed region recomputes its forward inside the backward pass, outside the interception. The
    reentrant kind runs the first forward with autograd off, so its GEMMs had no gradient (no dgrad or wgrad
    rows); the non-reentrant kind checks that the recomputation saved what the forward did, and a recipe's
    forward saves other tensors than the model's op (the end-to-end passes stopped with CheckpointError).
    Checkpointing trades memory for time and changes no number (the recomputation reruns the same ops with the
    same random state), so the analysis measures the same model. ``checkpoint`` looks both names up in its
    module on every call, so replacing them there reaches callers that imported ``checkpoint`` itself.
    Process-wide, like the checkpoint module: the analysis runs the model on one thread."""
    import torch.utils.checkpoint as ckpt

    saved = {name: getattr(ckpt, name, None) for name in ("CheckpointFunction", "_checkpoint_without_reentrant_generator")}
    if None in saved.values():  # (a torch whose checkpoint is built otherwise: left as it is)
        yield
        return
    ckpt.CheckpointFunction = _PlainCheckpoint
    ckpt._checkpoint_without_reentrant_generator = _plain_checkpoint_context
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ckpt, name, value)


# --------------------------------------------------------------------------------------------
# torch.export graphs: the same op table, node by node
# --------------------------------------------------------------------------------------------
def _node_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return ""


class _GraphRunner(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, icp: _Interceptor) -> None:
        super().__init__(gm)
        self.icp = icp

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.icp.path = _node_path(n)
        out = _dispatch(self.icp, n.target, args, kwargs, lambda: n.target(*args, **kwargs))
        return super().run_node(n) if out is NotImplemented else out


def is_gemm_target(target: Any) -> bool:
    """True for an aten overload this module recognises as a GEMM (or a GEMM-like op it counts as skipped)."""
    return any(target in table for table in (_LINEAR, _MM, _ADDMM, _SDPA, _CONV, _EINSUM, _INNER, _ADDBMM,
                                             _TENSORDOT, _OTHER)) \
        or target is aten.convolution.default


def run_graph(gm: torch.fx.GraphModule, flat_args: list, handler: GemmHandler, coverage: Coverage) -> Any:
    """Run an exported GraphModule's graph on its flattened inputs, every GEMM node through ``handler``."""
    return _GraphRunner(gm, _Interceptor(gm, handler, coverage, graph=True)).run(*flat_args)
