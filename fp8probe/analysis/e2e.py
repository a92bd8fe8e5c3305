"""End-to-end effect of each recipe on the running model: loss/output/gradient drift, per-layer sensitivity, a validated keep-in-16-bit set, training simulation."""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fp8probe import functional as F
from fp8probe.report.schema import NOTE_NEAREST_PLAN, NOTE_NOT_SEARCHED
from fp8probe.report.verdict import KEEP_16BIT_DB, low_output_sqnr, signed_pct

from . import distributed
from .capture import (_to_device, choose_loss, graph_inputs, is_exported_graph, params_require_grad,
                      trained_parameters)
from .gemms import KINDS, Coverage, GemmHandler, GemmSite, intercept, run_graph
from .loading import Batch, LoadError, resolve_callable
from .metrics import ErrorAccumulator, fused_error_sums
from .strategies import (STRATEGIES, RecipeOptions, Strategy, batched_linear, mixed_with_blocksize, quantisable,
                         site_kwargs, with_options)

# Default budget: the loss may rise by at most 1 % relative to the high-precision run.
DEFAULT_BUDGET = 0.01
BUDGET_KINDS = ("loss", "kl")
# Measured sensitivity costs 2 forward passes over all batches per layer and strategy. "auto" measures when those
# extra passes cost at most COST_BOUND x the isolated analysis' work, both counted in GEMM FLOPs of the run (never
# timed: `compare` gates on the tables in CI, so the same inputs must give the same choice under any machine load):
#   measured = 2 · layers · strategies · F_run
#   isolated = GEMMS_PER_SITE · F_run + GEMMS_PER_SITE · (1 + strategies) · F_captured
# F_run: forward FLOPs of every GEMM the model ran over all batches, F_captured: of the captured ones (--layers,
# --gemms). Isolated: the capturing forward + backward runs fprop, dgrad and wgrad of every GEMM, then each captured
# GEMM's three are replayed once in float64 and once per recipe. A replayed FLOP counts as much as a forward one:
# measured on the 2-core box (one thread, CPU time, warm process) the isolated analysis cost 6.3 / 5.4 forward passes
# per batch with one recipe on the demo encoder / a 16-block 64-wide MLP (this count: 9) and 11, 13.5, 18, 18 with
# three on those and on 4x1024 / 8x512 MLPs (count: 15): within 0.6-1.2x. With every GEMM captured the rule reads
# layers · strategies <= 6 + 3 · strategies: 9 layers with one recipe, 6 with two, 5 with three, 3 with all 15.
# (The timed rule it replaces predicted from wall-clock seconds that included one-off warm-up and machine load, and
# flipped between measured and estimated from run to run near its boundary.)
COST_BOUND = 2.0
GEMMS_PER_SITE = 3  # fprop, dgrad, wgrad
# Without an isolated analysis (end_to_end given no estimate: nothing to compare with or estimate from), "auto"
# measures when 2·layers·strategies <= MEASURE_CAP forward passes per batch.
MEASURE_CAP = 64
# A parameter whose high-precision gradient RMS is below this × the median parameter's is taken as zero in
# exact arithmetic (float32 rounding noise is ~2^-24 relative) and left out of the gradient SQNR (Runner._grad_sqnr).
ZERO_GRAD_RATIO = 2.0 ** -20
# Validation runs per strategy for the keep-set search: the prefix search (doubling, then bisection: about
# 2·log2(layers) runs, so 12 cover 64 layers) may use all but REFINE_RUNS of them, the refinement (_refine_keep:
# drops, pair drops and swaps) every run it leaves: 4 to 11 on 6 layers, where fitting is not monotone in the kept
# set (F1, 6-layer MLP at 0.2 %: the pair drop that doubles the low-precision FLOPs was run 14 of 16, the 6th
# pair drop or swap tried after the single drops). 12 → 16: the prefix search kept its 12, and a long one (a
# 200-layer model) cannot leave the refinement nothing; at least 4 tries = the 4 kept layers with the most FLOPs,
# where a layer kept in vain costs most.
MAX_VALIDATION_RUNS = 16
REFINE_RUNS = 4
SENSITIVITY_MODES = ("auto", "measured", "estimated")
METHOD_MEASURED = "measured: forward runs over every batch with only this layer in low precision / only it in 16-bit"
METHOD_ESTIMATED = ("estimated: first-order <G, dY> + second-order 1/2 N sum_t (G_t . dY_t)^2 (empirical Fisher) from "
                    "the layer's isolated fprop error dY and captured output gradient G; only-16-bit = full e2e "
                    "change minus this layer's estimate")
OUTPUT_FALLBACK_NOTE = "output = the last GEMM's output (the model returns only a loss)"
FSDP_GRAD_NOTE = "no per-parameter gradient SQNR: FSDP2 shards the parameters"
#: Runner.stage: (stage label, passes done, passes in the stage or None when not known ahead).
StageFn = Callable[[str, int, "int | None"], None]


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """What the recommendation must stay within: ``kind`` "loss" (relative loss change either way, 0.01 = 1 %)
    or "kl" (mean KL divergence of the output distribution, nats per row).

    The loss budget bounds |change|: a recipe that lowers the loss by more than the budget changed the output as
    much as one that raises it (a flattened or shrunken output lowers a cross-entropy on confident wrong
    predictions, or the mean-of-squares surrogate), and on a few batches the sign is noise. Signed, any drop
    passed: a recipe at 0.13 dB output SQNR was "within budget" at -97 % loss."""

    kind: str = "loss"
    value: float = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {', '.join(BUDGET_KINDS)}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value) \
                or self.value < 0:
            raise ValueError(f"expected a finite number >= 0 for the budget, got {self.value!r}")

    def metric(self, loss_rel_change: float, kl_div: float | None) -> float:
        """The number compared with ``value`` (NaN when a KL budget meets an output that is no distribution)."""
        if self.kind == "loss":
            return abs(loss_rel_change)
        return math.nan if kl_div is None else kl_div

    def holds(self, loss_rel_change: float, kl_div: float | None) -> bool:
        m = self.metric(loss_rel_change, kl_div)
        return math.isfinite(m) and m <= self.value


def parse_budget(spec: Budget | float | int | str | None) -> Budget:
    """``0.01`` / ``"0.01"`` / ``"1%"`` / ``"loss:0.01"`` → relative loss budget; ``"kl:0.01"`` → KL budget."""
    if spec is None:
        return Budget()
    if isinstance(spec, Budget):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Budget("loss", _loss_fraction(float(spec), repr(spec)))
    if not isinstance(spec, str):
        raise TypeError(f"expected a number, 'loss:X', 'kl:X' or a Budget for the budget, got {type(spec).__name__}")
    kind, _, text = spec.strip().rpartition(":")
    kind = kind.strip().lower() or "loss"
    text = text.strip()
    scale = 1.0
    if text.endswith("%"):
        text, scale = text[:-1], 0.01
    try:
        value = float(text) * scale
    except ValueError:
        raise ValueError(f"expected a budget like 0.01, 1%, loss:0.01 or kl:0.05, got {spec!r}") from None
    if kind == "loss" and scale == 1.0:
        value = _loss_fraction(value, text)
    return Budget(kind, value)


def _loss_fraction(value: float, text: str) -> float:
    """A loss budget written as a bare number is a fraction of the loss: 1 or more (--budget 2, 200 %) is almost
    surely a percentage without its sign, and a budget that wide accepts any recipe, so it is refused (written
    with % it stands)."""
    if math.isfinite(value) and value >= 1:
        raise ValueError(f"expected a loss budget as a fraction below 1 (0.01 = 1 %) or with a % sign, got {text} "
                         f"({100 * value:g} % of the loss): write {text}% for {text} percent, or {100 * value:g}% "
                         "if you mean it")
    return value


# --------------------------------------------------------------------------------------------
# Which GEMM runs how: one plan per model run, one function computing a linear GEMM under it
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Low precision with ``strategy`` for every captured GEMM, except those in ``keep`` (16-bit); with
    ``only`` given, for those GEMMs alone. ``strategy`` None = everything in high precision."""

    strategy: Strategy | None = None
    keep: frozenset[str] = frozenset()
    only: frozenset[str] | None = None
    threshold: float = 6.0

    def strategy_for(self, name: str) -> Strategy | None:
        if self.strategy is None or name in self.keep or (self.only is not None and name not in self.only):
            return None
        return self.strategy


def new_state(strategy: Strategy | None) -> Any:
    """A fresh state for one pass over the batches: a stateful recipe (delayed scaling) starts every
    end-to-end run, sensitivity run and training simulation from an empty amax history."""
    return None if strategy is None or strategy.new_state is None else strategy.new_state()


class Gemms(GemmHandler):
    """The gemms.py handler of one model run under a plan: every captured GEMM (``--layers`` and the
    selected kinds, named as capture names them) is computed by the plan's recipe or left to the model;
    counts forward order and FLOPs (all captured, per captured name, low precision) and keeps the last GEMM's
    output."""

    def __init__(self, plan: Plan, pattern: re.Pattern | None, kinds: tuple[str, ...] = KINDS,
                 state: Any = None) -> None:
        self.plan = plan
        self.state = state  # a stateful recipe's state (Strategy.new_state) for the whole pass over the batches
        self.pattern = pattern
        self.coverage = Coverage(kinds)
        self.order: list[str] = []
        self.flops_all = 0.0
        self.flops_lp = 0.0
        self.flops_by_name: dict[str, float] = {}
        self.last_output: torch.Tensor | None = None

    def skip(self, site: GemmSite) -> str | None:
        if self.pattern is not None and not self.pattern.search(site.name):
            return "not matched by --layers"
        return None

    def replace(self, site: GemmSite) -> torch.Tensor | None:
        """Y = a·bᵀ in the site's normal form from the plan's recipe, or None (the model's own op)."""
        self.order.append(site.name)
        self.flops_all += site.flops
        self.flops_by_name[site.name] = self.flops_by_name.get(site.name, 0.0) + site.flops
        strat = self.plan.strategy_for(site.name)
        if strat is None:
            return None
        a, b = site.operands()
        self.flops_lp += site.flops * (1.0 - _outlier_share(strat, a, self.plan.threshold))
        return lp_gemm(strat, a, b, self.plan.threshold, site.b_is_weight, state=self.state, site=site.name)

    def output(self, site: GemmSite, y: torch.Tensor) -> torch.Tensor:
        self.last_output = y
        return y


def _outlier_share(strategy: Strategy, a: torch.Tensor, threshold: float) -> float:
    """The share of an LLM.int8 GEMM's FLOPs run in 16-bit: its outlier input columns (any |a| at or above the
    threshold, per slice of a batched GEMM) go through the float product. 0 for every other recipe."""
    if strategy.name != "int8" or threshold <= 0 or a.numel() == 0:
        return 0.0
    with torch.no_grad():
        hit = a.detach().abs().float() >= F._op_threshold(float(threshold), "")
        cols = hit.any(-2) if a.dim() >= 3 else hit.reshape(-1, a.shape[-1]).any(0)
        return float(cols.float().mean())


def lp_gemm(strategy: Strategy, a: torch.Tensor, b: torch.Tensor, threshold: float,
            b_is_weight: bool = True, *, state: Any = None, site: str = "") -> torch.Tensor:
    """Compute one GEMM ``a · bᵀ`` (a [M, K], b [N, K], or batched [Bt, M, K] / [Bt, N, K]) with ``strategy``,
    differentiably (its fprop forward, its dgrad/wgrad backward). The one place the end-to-end mode
    substitutes a GEMM. Batched GEMMs run one 2-D GEMM per slice with its own scales (strategies.BATCHED_RULE).
    ``state``/``site``: a stateful recipe's state for this pass and the GEMM's name (strategies.run_strategy)."""
    if a.dtype == torch.float64 or b.dtype == torch.float64:  # (a float64 model: the recipe on float32 copies)
        return lp_gemm(strategy, quantisable(a), quantisable(b), threshold, b_is_weight, state=state,
                       site=site).to(a.dtype)
    if a.dim() == 2:
        return strategy.linear(a, b, None, threshold, b_is_weight, **site_kwargs(strategy, state, site, None))
    y = batched_linear(strategy, a, b, threshold, b_is_weight)  # an OCP/MX recipe: all slices in one call, same bits
    if y is not None:
        return y
    return torch.stack([strategy.linear(a[i], b[i], None, threshold, b_is_weight,
                                        **site_kwargs(strategy, state, site, i)) for i in range(a.shape[0])])


def lp_linear(strategy: Strategy, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None,
              threshold: float, *, state: Any = None, site: str = "") -> torch.Tensor:
    """``x [..., in] · Wᵀ [out, in] + bias`` with ``strategy`` (Strategy.linear), differentiably. A float64
    model's operands go in as float32 (strategies.quantisable) and the result comes back as float64."""
    if x.dtype == torch.float64 or W.dtype == torch.float64:
        return lp_linear(strategy, quantisable(x), quantisable(W), quantisable(bias), threshold, state=state,
                         site=site).to(x.dtype)
    return strategy.linear(x, W, bias, threshold, **site_kwargs(strategy, state, site, None))


def model_forward(model: Any, batch: Batch, gemms: Gemms) -> Any:
    """``model(*batch)`` with every captured GEMM computed by ``gemms`` (eager modules or exported graphs)."""
    if is_exported_graph(model):
        gm = model  # as capture._run_graph: flatten and check the inputs, run the graph, unflatten the outputs
        return gm.graph._codegen.process_outputs(run_graph(gm, graph_inputs(gm, batch), gemms, gemms.coverage))
    if not isinstance(model, nn.Module):
        raise LoadError(f"cannot run a {type(model).__name__} end to end: expected an nn.Module or an exported program")
    with intercept(model, gemms, gemms.coverage):
        return model(*batch.args, **batch.kwargs)


def frozen_note(model: Any) -> str:
    """What the gradient comparison and the training simulation leave out or unfreeze ("" for neither)."""
    if not isinstance(model, nn.Module):
        return ""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in floats if not p.requires_grad]
    if not frozen:
        return ""
    if len(frozen) == len(floats):
        return (f"no parameter of the model requires grad: all {len(floats)} float parameter tensors are compared "
                "and trained as if trainable")
    return (f"{len(frozen)} of {len(floats)} float parameter tensors are frozen (requires_grad False): they stay "
            "frozen and out of the gradient comparison")


def _output_tensor(output: Any, gemms: Gemms) -> tuple[torch.Tensor | None, str]:
    """The tensor compared between runs: the logits / first non-scalar float output, else the last linear output."""
    for cand in (getattr(output, "logits", None), output.get("logits") if isinstance(output, dict) else None):
        if isinstance(cand, torch.Tensor):
            return cand, ""
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.dim() > 0:
            return leaf, ""
    if gemms.last_output is not None:
        return gemms.last_output, OUTPUT_FALLBACK_NOTE
    return None, "no floating-point output to compare"


# --------------------------------------------------------------------------------------------
# Running plans over the batches and comparing with the high-precision run
# --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One plan run over every batch, compared with the high-precision run on the same batches."""

    loss_hp: float
    loss_lp: float
    output_sqnr_db: float
    kl_div: float | None
    top1_agreement: float | None
    lp_flop_share: float  # of the captured GEMMs' forward FLOPs (Gemms.flops_lp / flops_all): no dgrad / wgrad
    note: str = ""
    grad_sqnr: dict[str, float] = field(default_factory=dict)

    @property
    def loss_rel_change(self) -> float:
        return (self.loss_lp - self.loss_hp) / abs(self.loss_hp) if self.loss_hp else math.nan


def _loss_note(loss_hp: float) -> str:
    """The note of an outcome whose relative loss change is undefined (its null loss numbers say why)."""
    if not math.isfinite(loss_hp):
        return "high-precision loss not finite (NaN/Inf in the model or its inputs, or an empty batch)"
    if loss_hp == 0:
        return "high-precision loss 0: relative loss change undefined"
    return ""


def _row_sums(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)`` of a 2-D CPU or CUDA tensor with the same bits at any intra-op thread count: torch sums each row in
    one thread's loop when there are at least as many rows as threads, and splits a row across threads otherwise
    (then: one thread)."""
    threads = torch.get_num_threads()
    if t.device.type != "cpu" or threads == 1 or t.shape[0] >= threads:
        return t.sum(-1)
    torch.set_num_threads(1)
    try:
        return t.sum(-1)
    finally:
        torch.set_num_threads(threads)


class _OutputCompare:
    """Mergeable output SQNR, KL(p_hp ‖ p_lp) over the last dim as logits, top-1 agreement."""

    def __init__(self, distribution: bool) -> None:
        self.distribution = distribution
        self.err = ErrorAccumulator()
        self.kl_sum = 0.0
        self.agree = 0
        self.rows = 0

    def update(self, hp: torch.Tensor, lp: torch.Tensor) -> None:
        self.err.update(hp, lp)
        if self.distribution:
            p, q = (t.double().reshape(-1, t.shape[-1]).log_softmax(-1) for t in (hp, lp))
            # per row, then the rows exactly (fsum): a whole-tensor sum() splits over the intra-op threads, so its last
            # bits depended on --threads (QA: 67 KL cells differed between --threads 1 and 2); a row sum does not
            # while there are at least as many rows as threads (each row is one thread's vector loop)
            self.kl_sum += math.fsum(_row_sums((p.exp() * (p - q))).tolist())
            self.agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            self.rows += p.shape[0]

    def merge(self, other: _OutputCompare) -> None:
        """Add another batch's comparison (batches folded in order: analysis/distributed.py)."""
        self.err = self.err.merge(other.err)
        self.kl_sum += other.kl_sum
        self.agree += other.agree
        self.rows += other.rows

    def result(self, distribution: bool | None = None) -> tuple[float, float | None, float | None]:
        """(output SQNR dB, mean KL, top-1 agreement); ``distribution`` overrides the flag given at
        construction (the reference learns it from batch 0)."""
        sqnr = self.err.result()["sqnr_db"]
        distribution = self.distribution if distribution is None else distribution
        if not distribution or not self.rows:
            return sqnr, None, None
        return sqnr, self.kl_sum / self.rows, self.agree / self.rows


def _reduced_grads(loss: torch.Tensor, params: list[torch.Tensor], against: list[torch.Tensor | None]
                   ) -> list[tuple[float, float] | None]:
    """``[_grad_sums(against[k], dloss/dparams[k])]`` (None where either gradient is None), each taken in a hook
    as soon as autograd has the parameter's whole gradient (a tied parameter's uses summed first), the hook
    returning a stride-0 zero so that autograd.grad holds nothing parameter-sized."""
    sums: list[tuple[float, float] | None] = [None] * len(params)

    def reducer(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(g: torch.Tensor) -> torch.Tensor:
            sums[k] = _grad_sums(against[k], g)
            return torch.zeros((), dtype=g.dtype, device=g.device).expand_as(g)
        return hook

    handles = [p.register_hook(reducer(k)) for k, p in enumerate(params) if against[k] is not None]
    try:
        torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return sums


def _grad_sums(gh: torch.Tensor, gl: torch.Tensor) -> tuple[float, float]:
    """(Σgh², Σ(gl − gh)²) of a parameter's high-precision and low-precision gradients, in float64: one pass
    (metrics.fused_error_sums, in C or on the GPU: exact float64 widening, its documented summation order) where
    every pair is finite; else (NaN/±Inf in either, no C extension or CUDA kernels, FSDP2's sharded DTensor
    parameters) the float64 copies in torch, whose NaN/Inf then reach the SQNR as before. The C pass replaced three float64 copies and
    three passes per parameter and recipe (1.3 of ~7.8 s of the end-to-end part on BERT 6-layer, 8 recipes)."""
    # (plain tensors only: a DTensor's data pointer is its local shard)
    sums = fused_error_sums(gh, gl) if type(gh) is torch.Tensor and type(gl) is torch.Tensor else None
    if sums is not None and sums[6] == 0 and sums[7] == 0:
        return sums[0], sums[1]
    gh64 = gh.double()
    return float(gh64.pow(2).sum()), float((gl.double() - gh64).pow(2).sum())


def _sqnr(sig: float, err: float) -> float:
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf


class Runner:
    """Holds the high-precision reference of every batch (loss, output on CPU) and runs plans against it."""

    def __init__(self, module: Any, batches: Sequence[Batch], *, device: torch.device, layers: str | None,
                 loss_fn: Any, loss_name: str | None, threshold: float, seed: int,
                 kinds: tuple[str, ...] = KINDS, options: RecipeOptions | None = None) -> None:
        self.module = module
        # The int8 recipe the threshold validation runs, with the run's row scale (RecipeOptions).
        self.int8 = with_options([STRATEGIES["int8"]], options)[0]
        self.kinds = tuple(kinds)
        self.batches = [Batch(_to_device(tuple(b.args), device), _to_device(dict(b.kwargs), device)) for b in batches]
        self.pattern = re.compile(layers) if layers else None
        self.loss_fn, self.loss_name = loss_fn, loss_name
        self.threshold = threshold
        self.seed = seed
        self.params = trained_parameters(module)
        self.loss_hp: list[float] = []
        self.out_hp: list[torch.Tensor | None] = []
        self.order: list[str] = []
        # Forward GEMM FLOPs of the high-precision reference over all batches: every GEMM the model ran, the
        # captured ones, and per captured name (the cost model of "auto" sensitivity, the keep-set refinement).
        self.flops_run = 0.0
        self.flops_captured = 0.0
        self.layer_flops: dict[str, float] = {}
        self.info = None
        self.distribution = False
        self.output_note = ""
        self.forwards = 0
        # FSDP2 keeps each rank's shard in the parameters (DTensors); autograd.grad cannot give their
        # full gradients, so the per-parameter gradient comparison is left out and said so.
        self.grad_note = FSDP_GRAD_NOTE if distributed.lockstep(module) else ""
        self.frozen_note = frozen_note(module)
        #: Called as stage(label, passes done, passes in the stage or None) at each begin() and after each model
        #: pass (forward, or forward and backward) this rank runs: the command line's progress line.
        self.stage: StageFn | None = None
        self._stage: list = [None, 0, None]

    def begin(self, label: str, total: int | None = None) -> None:
        """Start a progress stage of ``total`` passes (None: not known ahead) and report it (self.stage)."""
        self._stage = [label, 0, total]
        if self.stage is not None:
            self.stage(label, 0, total)

    def tick(self) -> None:
        """One model pass of the current stage done (reported to self.stage)."""
        label, done, total = self._stage
        self._stage[1] = done = done + 1
        if self.stage is not None and label is not None:
            self.stage(label, done if total is None else min(done, total), total)

    def local_batches(self) -> int:
        """How many of the batches this rank runs (map_batches: batch i on rank i % size)."""
        world = distributed.current()
        return len(range(world.rank, len(self.batches), world.size))

    def _run(self, plan: Plan, i: int, grads: bool, state: Any = None, against: list | None = None
             ) -> tuple[torch.Tensor, Any, Gemms, list | None]:
        """One forward (and with ``grads`` backward) pass of batch i under ``plan``: (loss, output, gemms, g), g the
        parameters' gradients in self.params order (None where a parameter gets none). ``against``: high-precision
        gradients in that order; each gradient is then reduced to _grad_sums(against[k], g[k]) as it is computed
        (a hook on the parameter, which hands autograd a stride-0 zero instead), so g holds those pairs and no
        parameter-sized gradient is kept: the pass needs no second copy of the model's gradients."""
        gemms = Gemms(plan, self.pattern, self.kinds, state)
        batch = self.batches[i]
        torch.manual_seed(self.seed + i)  # the same dropout masks (if any) in every run of batch i
        params = [p for _, p in self.params]
        with torch.enable_grad(), params_require_grad(params):
            output = model_forward(self.module, batch, gemms)
            loss, info = choose_loss(output, batch, self.loss_fn, self.loss_name, self.module)
            g = None
            if grads and self.params and loss.requires_grad:
                if against is None:
                    g = list(torch.autograd.grad(loss, params, allow_unused=True))
                else:
                    g = _reduced_grads(loss, params, against)
        self.info = info
        self.tick()
        return loss.detach(), output, gemms, g

    def _reference_batch(self, i: int, strategies: Sequence[Strategy], states: dict[str, Any]) -> dict:
        """Batch i of ``reference``: its high-precision loss (output kept on CPU on this rank) and, per
        strategy, its loss, FLOPs, output comparison and per-parameter gradient error sums. ``states``:
        each stateful recipe's state for this pass (new_state), carried from batch to batch."""
        loss, output, gemms, g_hp = self._run(Plan(None, threshold=self.threshold), i, grads=bool(strategies))
        out, note = _output_tensor(output, gemms)
        distribution = out is not None and self.info.kind != "surrogate" and out.dim() >= 2 and out.shape[-1] >= 2
        rec = {"loss_hp": float(loss), "order": list(dict.fromkeys(gemms.order)), "note": note,
               "distribution": distribution, "runs": 1 + len(strategies), "strategies": {},
               "flops": (sum(c.flops for c in gemms.coverage.ops.values()), gemms.flops_all, gemms.flops_by_name)}
        out_hp = None if out is None else out.detach().to("cpu", copy=True)
        self.out_hp[i] = out_hp
        del output, out
        # each recipe's gradients reduced to their error sums as autograd makes them (not with FSDP2's sharded
        # DTensor parameters: those take the gradients whole, as they come)
        against = None if self.grad_note else g_hp
        for s in strategies:
            loss_s, output_s, gemms_s, g_lp = self._run(Plan(s, threshold=self.threshold), i, grads=True,
                                                        state=states[s.name], against=against)
            out_s, _ = _output_tensor(output_s, gemms_s)
            c = _OutputCompare(distribution)
            if out_hp is not None and out_s is not None:
                c.update(out_hp, out_s.detach().to("cpu"))
            grads = []
            if g_hp is not None and g_lp is not None:
                if against is None:
                    g_lp = [None if gh is None or gl is None else _grad_sums(gh, gl) for gh, gl in zip(g_hp, g_lp)]
                grads = [(pname, *sums) for (pname, _), sums in zip(self.params, g_lp) if sums is not None]
            rec["strategies"][s.name] = (float(loss_s), gemms_s.flops_lp, gemms_s.flops_all, c, grads)
            del output_s, out_s, g_lp
        return rec

    def reference(self, strategies: Sequence[Strategy]) -> dict[str, Outcome]:
        """Run high precision and every strategy (all captured GEMMs in low precision), forward and backward,
        batch by batch (one batch's high-precision gradients held at a time); returns strategy → Outcome.
        With no strategies: the high-precision forward reference alone (what ``evaluate`` compares with).

        Under torchrun batch i runs on rank i % world size (its output stays there, for ``evaluate``);
        the per-batch sums are folded in batch order on every rank (analysis/distributed.py), the same
        float additions as one process."""
        n = len(self.batches)
        self.loss_hp, self.out_hp = [], [None] * n  # a second call replaces the reference, never appends to it
        self.flops_run, self.flops_captured, self.layer_flops = 0.0, 0.0, {}
        cmp: dict[str, _OutputCompare] = {}
        grad_acc: dict[str, dict[str, list[float]]] = {s.name: {} for s in strategies}
        loss_lp = {s.name: 0.0 for s in strategies}
        flops = {s.name: [0, 0] for s in strategies}
        states = {s.name: new_state(s) for s in strategies}  # one pass over the batches per strategy
        self.begin(f"end to end: high precision + {len(strategies)} recipe{'s' if len(strategies) != 1 else ''}",
                   self.local_batches() * (1 + len(strategies)))
        for i, rec in distributed.map_batches(n, lambda i: self._reference_batch(i, strategies, states),
                                              pad=distributed.lockstep(self.module)):
            if i == 0:
                self.order = rec["order"]
                self.distribution = rec["distribution"]
                self.output_note = rec["note"]
            self.loss_hp.append(rec["loss_hp"])
            self.forwards += rec["runs"]
            f_run, f_captured, by_name = rec["flops"]
            self.flops_run += f_run
            self.flops_captured += f_captured
            for name, f in by_name.items():
                self.layer_flops[name] = self.layer_flops.get(name, 0.0) + f
            for name, (loss_s, f_lp, f_all, c, grads) in rec["strategies"].items():
                loss_lp[name] += loss_s
                flops[name][0] += f_lp
                flops[name][1] += f_all
                if name in cmp:
                    cmp[name].merge(c)
                else:
                    cmp[name] = c
                for pname, sig, err in grads:
                    acc = grad_acc[name].setdefault(pname, [0.0, 0.0])
                    acc[0] += sig
                    acc[1] += err
        hp = sum(self.loss_hp) / n
        outcomes = {}
        for s in strategies:
            sqnr, kl, top1 = cmp[s.name].result(self.distribution)
            gsq, zero = self._grad_sqnr(grad_acc[s.name])
            f_lp, f_all = flops[s.name]
            note = "; ".join(x for x in (self.output_note, self.grad_note, self.frozen_note, zero, _loss_note(hp),
                                         self.kl_note()) if x)
            outcomes[s.name] = Outcome(hp, loss_lp[s.name] / n, sqnr, kl, top1, f_lp / f_all if f_all else 0.0,
                                       note, gsq)
        return outcomes

    def kl_note(self) -> str:
        """Why KL and top-1 agreement are null ("" when they are computed)."""
        if self.distribution:
            return ""
        if self.info is not None and self.info.kind == "surrogate":
            return ("KL and top-1 not computed: with the surrogate loss the output is not read as class logits "
                    "(pass --loss)")
        return "KL and top-1 not computed: the output is not class logits [..., classes]"

    def _grad_sqnr(self, acc: dict[str, list[float]]) -> tuple[dict[str, float], str]:
        """Per-parameter gradient SQNR from (signal, error) energies, and a note naming the parameters left
        out: a gradient that is zero in exact arithmetic (an attention key bias: softmax ignores a shift
        shared by all keys) is float32 rounding noise in high precision, and its "SQNR" (-100 dB) says
        nothing about the recipe. Left out: RMS below ZERO_GRAD_RATIO × the median parameter's RMS."""
        numel = {name: p.numel() for name, p in self.params}
        rms = {p: math.sqrt(a[0] / max(numel.get(p, 1), 1)) for p, a in acc.items() if a[0] > 0}
        if not rms:
            return {}, ""
        floor = ZERO_GRAD_RATIO * float(pd.Series(list(rms.values())).median())
        zero = sorted(p for p, r in rms.items() if r < floor)
        gsq = {p: _sqnr(a[0], a[1]) for p, a in acc.items() if p in rms and p not in zero}
        if not zero:
            return gsq, ""
        shown = ", ".join(zero[:3]) + (", ..." if len(zero) > 3 else "")
        return gsq, (f"{len(zero)} parameter(s) with a numerically zero gradient (RMS < 2^-20 × the median, e.g. "
                     f"attention key biases) left out of the gradient SQNR: {shown}")

    def _evaluate_batch(self, plan: Plan, i: int, state: Any = None) -> tuple[float, float, float, _OutputCompare]:
        loss, output, gemms, _ = self._run(plan, i, grads=False, state=state)
        c = _OutputCompare(self.distribution)
        out, _ = _output_tensor(output, gemms)
        if out is not None and self.out_hp[i] is not None:
            c.update(self.out_hp[i], out.detach().to("cpu"))
        return float(loss), gemms.flops_lp, gemms.flops_all, c

    def evaluate(self, plan: Plan) -> Outcome:
        """Forward only: ``plan`` over every batch, compared with the high-precision reference (sharded
        and folded in batch order like ``reference``)."""
        c = _OutputCompare(self.distribution)
        loss_sum, f_lp, f_all = 0.0, 0, 0
        state = new_state(plan.strategy)  # a stateful recipe's history runs over this pass's batches
        for _, (loss, b_lp, b_all, bc) in distributed.map_batches(len(self.batches),
                                                                   lambda i: self._evaluate_batch(plan, i, state),
                                                                   pad=distributed.lockstep(self.module)):
            loss_sum += loss
            f_lp += b_lp
            f_all += b_all
            c.merge(bc)
            self.forwards += 1
        sqnr, kl, top1 = c.result()
        n = len(self.batches)
        hp = sum(self.loss_hp) / n
        return Outcome(hp, loss_sum / n, sqnr, kl, top1, f_lp / f_all if f_all else 0.0,
                       "; ".join(x for x in (self.output_note, _loss_note(hp)) if x))


# --------------------------------------------------------------------------------------------
# Sensitivity estimate from the isolated analysis (filled by pipeline's capture sink)
# --------------------------------------------------------------------------------------------
class SensitivityEstimate:
    """Per (strategy, layer): Σ over batches of ⟨G, ΔY⟩ and ½·N·Σ_t (G_t·ΔY_t)², ΔY = the recipe's fprop
    minus the float64 reference, G = dL/dY of the high-precision run, N = tokens of the batch.

    Why these terms: L(Y+ΔY) − L(Y) ≈ ⟨G, ΔY⟩ + ½ ΔYᵀHΔY, and for a loss that is a mean over N tokens
    the empirical Fisher approximates H by N·Σ_t G_t G_tᵀ (G_t = dL/dY_t is 1/N of token t's gradient).
    """

    def __init__(self) -> None:
        self.sums: dict[tuple[str, str], list[float]] = {}

    def update(self, strategy: str, layer: str, G: torch.Tensor | None, dY: torch.Tensor) -> None:
        if G is None or G.numel() == 0:
            return
        # Batched sites (attention, bmm) count each of their rows as a token.
        G, dY = G.reshape(-1, G.shape[-1]), dY.reshape(-1, dY.shape[-1])
        prod = G.double() * dY.double()
        per_token = prod.sum(1)
        acc = self.sums.setdefault((strategy, layer), [0.0, 0.0])
        acc[0] += float(per_token.sum())
        acc[1] += 0.5 * G.shape[0] * float(per_token.pow(2).sum())

    def merge(self, sums: dict[tuple[str, str], list[float]]) -> None:
        """Add another batch's ``sums`` (pipeline folds batches in order: analysis/distributed.py)."""
        for key, (first, second) in sums.items():
            acc = self.sums.setdefault(key, [0.0, 0.0])
            acc[0] += first
            acc[1] += second

    def loss_change(self, strategy: str, layer: str, n_batches: int) -> float | None:
        """Estimated mean loss change (absolute) with only this layer in low precision; None when no gradient."""
        acc = self.sums.get((strategy, layer))
        if acc is None:
            return None
        return (acc[0] + acc[1]) / max(n_batches, 1)


# --------------------------------------------------------------------------------------------
# Sensitivity, keep-set search, recommendation
# --------------------------------------------------------------------------------------------
def _row_metric(budget: Budget, loss_rel: float | None, kl: float | None) -> float:
    value = (None if loss_rel is None else abs(loss_rel)) if budget.kind == "loss" else kl
    return -math.inf if value is None or not math.isfinite(value) else value


def _sensitivity(runner: Runner, strat: Strategy, full: Outcome, layers: list[str], measured: bool,
                 estimate: SensitivityEstimate | None, isolated: dict[tuple[str, str], float],
                 budget: Budget) -> list[dict]:
    rows = []
    for idx, layer in enumerate(layers):
        row = {"strategy": strat.name, "layer": layer, "index": idx, "only_lp_loss_rel_change": None,
               "only_lp_kl": None, "only_hp_loss_rel_change": None, "only_hp_kl": None,
               "isolated_fprop_sqnr_db": isolated.get((strat.name, layer), math.nan)}
        if measured:
            lp = runner.evaluate(Plan(strat, only=frozenset([layer]), threshold=runner.threshold))
            hp = runner.evaluate(Plan(strat, keep=frozenset([layer]), threshold=runner.threshold))
            row.update(only_lp_loss_rel_change=lp.loss_rel_change, only_lp_kl=lp.kl_div,
                       only_hp_loss_rel_change=hp.loss_rel_change, only_hp_kl=hp.kl_div, method=METHOD_MEASURED)
            # What keeping this layer in 16-bit buys in the full low-precision run, in the budget's units.
            row["_benefit"] = _row_metric(budget, full.loss_rel_change, full.kl_div) - \
                _row_metric(budget, hp.loss_rel_change, hp.kl_div)
        else:
            est = None if estimate is None else estimate.loss_change(strat.name, layer, len(runner.batches))
            hp_loss = sum(runner.loss_hp) / len(runner.loss_hp)
            rel = None if est is None or not hp_loss else est / abs(hp_loss)
            row.update(only_lp_loss_rel_change=rel, method=METHOD_ESTIMATED,
                       only_hp_loss_rel_change=None if rel is None else full.loss_rel_change - rel)
            # The estimate is a loss change: it predicts nothing in KL units (the search then just doubles).
            row["_benefit"] = (rel if rel is not None else -math.inf) if budget.kind == "loss" else math.nan
        rows.append(row)
    # Most sensitive first: the only-low-precision change under the budget's metric (the loss change
    # when estimated: the estimate has no KL), by its size (a layer whose low-precision run alone lowers the
    # loss moves it as much as one raising it by as much), then what keeping the layer buys.
    key_kl = budget.kind == "kl" and measured

    def finite_or(x: float | None, default: float) -> float:
        return x if x is not None and math.isfinite(x) else default

    def key(r: dict) -> tuple[float, float]:
        m = r["only_lp_kl"] if key_kl else r["only_lp_loss_rel_change"]
        return (-finite_or(None if m is None else abs(m), -math.inf), -finite_or(r["_benefit"], -math.inf))

    for rank, r in enumerate(sorted(rows, key=key), start=1):
        r["rank"] = rank
    return rows


def _fit_key(rank: dict[str, int], budget: Budget, keep: frozenset[str], out: Outcome) -> tuple:
    """How fitting keep-sets compare, smallest best: the most forward GEMM FLOPs in low precision (what the
    recommendation maximises), then the budget metric's smaller value, then fewer layers kept, then rank order
    (deterministic)."""
    return (-out.lp_flop_share, budget.metric(out.loss_rel_change, out.kl_div), len(keep),
            sorted(rank[n] for n in keep))


def _best_fitting(names: list[str], tried: dict[frozenset[str], Outcome], budget: Budget
                  ) -> tuple[frozenset[str], Outcome] | None:
    """The best (_fit_key) of the sets run that kept the budget, or None when none did."""
    rank = {n: i for i, n in enumerate(names)}
    fits = [(keep, o) for keep, o in tried.items() if budget.holds(o.loss_rel_change, o.kl_div)]
    return min(fits, key=lambda x: _fit_key(rank, budget, *x)) if fits else None


def _search_keep(runner: Runner, strat: Strategy, full: Outcome, ranked: list[dict], budget: Budget,
                 max_runs: int = MAX_VALIDATION_RUNS, closest: list | None = None
                 ) -> tuple[list[str], Outcome, int, list[str], list[str]]:
    """A small set of layers kept in 16-bit that keeps the budget, by real runs: the smallest prefix of ``ranked``
    (most sensitive first) that fits, then refined by _refine_keep. Returns (keep in rank order, its outcome, runs
    made, layers of that prefix the refinement dropped, layers outside it the refinement kept instead).

    The first try is the prefix the sensitivities predict (full change minus the benefits) to fit;
    then doubling until a run fits, then bisection between the last failing and the first fitting prefix,
    within ``max_runs`` - REFINE_RUNS runs; the refinement gets every run left of ``max_runs``. The set returned is
    the best (_fit_key: most low-precision FLOPs) of every set run, prefix or refinement, that kept the budget.
    ``closest``: a list that receives, when only keeping every layer fits, the tried prefix with some GEMMs in low
    precision nearest the budget, as (metric, keep, outcome).
    """
    names = [r["layer"] for r in ranked]
    if budget.holds(full.loss_rel_change, full.kl_div) or not names:
        return [], full, 0, [], []
    m0 = budget.metric(full.loss_rel_change, full.kl_div)
    k = 1  # without a prediction: the most sensitive layer first, then doubling
    if math.isfinite(m0) and all(not math.isnan(r["_benefit"]) for r in ranked):
        k, acc = len(names), m0
        for i, r in enumerate(ranked, start=1):
            benefit = r["_benefit"]
            acc -= benefit if math.isfinite(benefit) else 0.0
            if acc <= budget.value:
                k = i
                break
    prefixes: dict[int, Outcome] = {0: full}
    lo, hi = 0, None  # largest failing prefix, smallest fitting prefix
    runs = 0
    while runs < max(1, max_runs - REFINE_RUNS):
        out = runner.evaluate(Plan(strat, keep=frozenset(names[:k]), threshold=runner.threshold))
        prefixes[k] = out
        runs += 1
        if budget.holds(out.loss_rel_change, out.kl_div) or k == len(names):
            hi = k
        else:
            lo = k
        if hi is None:
            k = min(len(names), max(k + 1, 2 * k))
        elif hi - lo > 1:
            k = (lo + hi) // 2
        else:
            break
    if hi is None:  # out of runs before anything fit: report the largest prefix tried
        hi = max(prefixes)
    keep, out = names[:hi], prefixes[hi]
    if budget.holds(out.loss_rel_change, out.kl_div):
        tried = {frozenset(names[:j]): o for j, o in prefixes.items()}
        runs += _refine_keep(runner, strat, names, frozenset(keep), budget, tried, max_runs - runs)
        best, out = _best_fitting(names, tried, budget)
        keep = [n for n in names if n in best]
    dropped = [n for n in names[:hi] if n not in keep]
    added = [n for n in keep if n not in names[:hi]]
    if closest is not None and len(keep) == len(names):
        near = [(budget.metric(o.loss_rel_change, o.kl_div), k, o) for k, o in prefixes.items()
                if k < len(names) and o.lp_flop_share > 0]
        near = [x for x in near if math.isfinite(x[0])]
        if near:
            m, k, o = min(near, key=lambda x: (x[0], x[1]))
            closest.append((m, names[:k], o))
    return keep, out, runs, dropped, added


def _refine_keep(runner: Runner, strat: Strategy, names: list[str], keep: frozenset[str], budget: Budget,
                 tried: dict[frozenset[str], Outcome], max_runs: int) -> int:
    """Local search from ``keep`` (a set that fits) for a better fitting set (_fit_key), each try one validated run
    recorded in ``tried`` (the outcomes of every set run; a set already there is not run again), at most
    ``max_runs`` runs. Returns the runs made; the caller picks the best fitting set of ``tried``.

    Why: the loss budget bounds |signed change| and errors partly cancel, so whether a set fits is not monotone in
    it: a prefix of one ranking keeps a layer ranked high only alone, and a set can fit where every set one layer
    smaller fails (6-layer MLP, ocp-tensorwise: keeping {fcs.0, fcs.2, fcs.3} moves the loss +0.06 %, the prefix
    {fcs.0, fcs.2, fcs.3, fcs.4, fcs.5} -0.12 %, every single drop of that prefix over 0.2 %).
    Moves, a move taken as soon as its run fits and beats the current set:
    1. drop one kept layer, passes over the kept layers repeated until none succeeds: the fewest layers changed,
       so the likeliest to fit; most FLOPs first, equal FLOPs least sensitive first (the runs are capped, and a
       large layer kept in vain costs the most);
    2. then drop two kept layers at once, or swap a kept layer for a not-kept one of fewer FLOPs, most FLOPs
       gained first (equal: the pair drop, then the least sensitive layers out): the first of these that fits is
       the largest gain any of them can give. After one is taken, back to 1.
    Stops when no move improves or the runs are spent (a set already run still counts: it costs none)."""
    rank = {n: i for i, n in enumerate(names)}
    flops = {n: runner.layer_flops.get(n, 0.0) for n in names}
    current = keep
    runs = 0

    def better(cand: frozenset[str]) -> bool | None:
        """Whether ``cand`` fits and beats ``current``, running it unless known; None: not known, no run left."""
        nonlocal runs
        if cand not in tried:
            if runs >= max_runs:
                return None
            tried[cand] = runner.evaluate(Plan(strat, keep=cand, threshold=runner.threshold))
            runs += 1
        o = tried[cand]
        return budget.holds(o.loss_rel_change, o.kl_div) and \
            _fit_key(rank, budget, cand, o) < _fit_key(rank, budget, current, tried[current])

    while True:
        improved = True
        while improved:  # 1. drop passes
            improved = False
            for name in sorted(current, key=lambda n: (-flops[n], -rank[n])):
                if name in current and better(current - {name}):
                    current, improved = current - {name}, True
        kept = sorted(current, key=lambda n: rank[n])
        moves = [(flops[a] + flops[b], -2, (-rank[b], -rank[a]), (), (a, b))
                 for i, a in enumerate(kept) for b in kept[i + 1:]]
        moves += [(flops[a] - flops[n], 0, (-rank[a],), (rank[n],), (a, n))
                  for a in kept for n in names if n not in current and flops[n] < flops[a]]
        moves.sort(key=lambda m: (-m[0], m[1], m[2], m[3]))
        for gain, kind, _, _, (a, b) in moves:  # 2. pair drops and swaps
            cand = current - {a, b} if kind == -2 else (current - {a}) | {b}
            if better(cand):
                current = cand
                break
        else:
            return runs


def _rec_row(kind: str, strategy: str, value: Any, keep: list[str], out: Outcome, budget: Budget, note: str) -> dict:
    # (a plan with nothing in low precision is not "within budget": it answers nothing, and the verdict says that
    # no strategy fits)
    return {"kind": kind, "strategy": strategy, "value": value, "keep_16bit": list(keep), "n_keep": len(keep),
            "loss_rel_change": out.loss_rel_change, "kl_div": out.kl_div, "output_sqnr_db": out.output_sqnr_db,
            "within_budget": budget.holds(out.loss_rel_change, out.kl_div) and out.lp_flop_share > 0,
            "lp_flop_share": out.lp_flop_share,
            "budget": budget.value, "budget_kind": budget.kind, "recommended": False, "note": note}


#: How a recipe's note gives its tried plan nearest an unreachable budget; the nearest of every recipe's says
#: schema.NOTE_NEAREST_PLAN instead, which the verdict quotes.
_NEAREST_OWN = "only every layer in 16-bit fits: "


def _round_up(x: float, digits: int = 2) -> float:
    """``x`` rounded up to ``digits`` significant digits (a budget printed from it still accepts ``x``; the loss
    beside it, rounded to nearest with at least as many, never reads above it)."""
    if x <= 0 or not math.isfinite(x):
        return x
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / step * (1 - 1e-12)) * step:.{digits}g}")


def _closest_text(strategy: str, metric: float, keep: list[str], out: Outcome, budget: Budget) -> str:
    """The tried plan nearest the budget, and the budget that would accept it."""
    shown = ", ".join(keep[:4]) + (", ..." if len(keep) > 4 else "")
    # (the verdict's format, with two significant digits under 0.1 %: "+.2f" printed "+0.01 %" beside the
    # "--budget 0.007%" that accepts it, QA F6)
    what = f"loss {signed_pct(out.loss_rel_change)}" if budget.kind == "loss" else f"KL {metric:.3g}"
    loosen = f"{_round_up(100 * metric):g}%" if budget.kind == "loss" else f"kl:{_round_up(metric):g}"
    return (f"{strategy} keeping {len(keep)} layer(s) in 16-bit ({shown or 'none'}) reaches {what} with "
            f"{100 * out.lp_flop_share:.1f} % of forward GEMM FLOPs in low precision (--budget {loosen} would accept "
            "it)")


def mark_recommended(rows: list[dict]) -> None:
    """Exactly one row per kind recommended when any is within budget and computes something in low
    precision (within a loss budget, plans whose model output SQNR is under KEEP_16BIT_DB only when no other plan
    reaches it): the most forward GEMM FLOPs in low precision (Outcome.lp_flop_share: the end-to-end runs compare
    forward outputs, so the share is of each captured GEMM's forward FLOPs, never its dgrad / wgrad); ties by
    accuracy: the smaller output KL when every candidate has one, else the higher output SQNR when every candidate
    has one, else the smaller |loss change|. (Without KL, the output SQNR before the loss: a surrogate loss, the output's mean square, moves by
    hundredths of a percent either way, and chose a recipe 14 dB worse at the output.)"""
    for kind in dict.fromkeys(r["kind"] for r in rows):
        cands = [r for r in rows if r["kind"] == kind and r["within_budget"] and r["lp_flop_share"] > 0]
        if not cands:
            continue
        # A loss averages its errors: on a surrogate loss a plan moving the output to 8.5 dB SQNR met a 1 % budget
        # and won on FLOP share over int8 at 38.6 dB (QA). Plans within a loss budget but under KEEP_16BIT_DB at the
        # output (the report's default --keep-16bit-db, where it marks them "yes*") compete only when no candidate
        # reaches it.
        clean = [r for r in cands if not low_output_sqnr(True, r.get("budget_kind"), r.get("output_sqnr_db"))]
        cands = clean or cands
        use_kl = all(r["kl_div"] is not None and math.isfinite(r["kl_div"]) for r in cands)
        use_sqnr = not use_kl and all(isinstance(r.get("output_sqnr_db"), (int, float))
                                      and not math.isnan(r["output_sqnr_db"]) for r in cands)

        def error(r: dict) -> float:
            m = r["kl_div"] if use_kl else -r["output_sqnr_db"] if use_sqnr else abs(r["loss_rel_change"])
            return m if not math.isnan(m) and m != math.inf else math.inf

        # Shares are ratios of integer FLOP counts: equal keep-sets give bit-equal shares, no tolerance needed.
        best = max(cands, key=lambda r: (r["lp_flop_share"], -error(r)))
        best["recommended"] = True


E2E_COLUMNS = ["strategy", "batches", "loss_hp", "loss_lp", "loss_rel_change", "output_sqnr_db", "kl_div",
               "top1_agreement", "grad_sqnr_db_min", "grad_sqnr_db_median", "lp_flop_share", "note"]
SENSITIVITY_COLUMNS = ["strategy", "layer", "index", "only_lp_loss_rel_change", "only_lp_kl", "only_hp_loss_rel_change",
                       "only_hp_kl", "isolated_fprop_sqnr_db", "rank", "method"]
RECOMMENDATION_COLUMNS = ["kind", "strategy", "value", "keep_16bit", "n_keep", "loss_rel_change", "kl_div",
                          "output_sqnr_db", "within_budget", "lp_flop_share", "budget", "budget_kind", "recommended", "note"]


def _e2e_row(name: str, n: int, out: Outcome) -> dict:
    g = sorted(out.grad_sqnr.values())
    return {"strategy": name, "batches": n, "loss_hp": out.loss_hp, "loss_lp": out.loss_lp,
            "loss_rel_change": out.loss_rel_change, "output_sqnr_db": out.output_sqnr_db, "kl_div": out.kl_div,
            "top1_agreement": out.top1_agreement, "grad_sqnr_db_min": g[0] if g else None,
            "grad_sqnr_db_median": float(pd.Series(g).median()) if g else None,
            "lp_flop_share": out.lp_flop_share, "note": out.note}


def _measure_cost(n_layers: int, n_strategies: int, flops_run: float, flops_captured: float) -> float:
    """Measured sensitivity's extra forward passes over the isolated analysis' work, both in GEMM FLOPs (the
    counts at COST_BOUND); 0 when nothing ran."""
    measured = 2 * n_layers * n_strategies * flops_run
    isolated = GEMMS_PER_SITE * flops_run + GEMMS_PER_SITE * (1 + n_strategies) * flops_captured
    return measured / isolated if isolated > 0 else 0.0


def end_to_end(runner: Runner, strategies: Sequence[Strategy], budget: Budget, *, sensitivity: str = "auto",
               estimate: SensitivityEstimate | None = None,
               isolated_sqnr: dict[tuple[str, str], float] | None = None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Tables ``e2e``, ``sensitivity`` and ``recommendation`` (docs/architecture.md) and a metadata dict.

    ``sensitivity``: "measured" (2 forward runs per layer and strategy), "estimated" (from ``estimate``, the
    isolated analysis' SensitivityEstimate, no extra runs), "auto": with ``estimate``, measured when those runs
    cost at most COST_BOUND x the isolated analysis' work, both counted in GEMM FLOPs (_measure_cost: the same
    inputs give the same choice on any machine); without, measured when 2·layers·strategies <= MEASURE_CAP.
    Every keep-set is validated by real forward runs over every batch.
    """
    if sensitivity not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY_MODES)}, got {sensitivity!r}")
    start = time.perf_counter()
    outcomes = runner.reference(strategies)
    layers = runner.order
    cost = _measure_cost(len(layers), len(strategies), runner.flops_run, runner.flops_captured)
    if sensitivity == "auto":
        measured = cost <= COST_BOUND if estimate is not None else 2 * len(layers) * len(strategies) <= MEASURE_CAP
    else:
        measured = sensitivity == "measured"
    # The counts are folded from every batch on every rank, so ranks agree already; rank 0's choice is still
    # broadcast, since a rank taking the other branch would leave the others waiting in a collective pass.
    measured = distributed.agree(measured)
    if not measured and estimate is None:
        raise ValueError("estimated sensitivity needs the isolated analysis' estimate, got none")
    e2e_rows, sens_rows, rec_rows = [], [], []
    closest: list[tuple[float, float, int]] = []  # (budget metric, -low-precision share, row) of plans over budget
    validation_runs = 0
    kl_undefined = budget.kind == "kl" and not runner.distribution  # (no keep-set can be judged: no search)
    for k, s in enumerate(strategies):
        full = outcomes[s.name]
        e2e_rows.append(_e2e_row(s.name, len(runner.batches), full))
        runner.begin(f"end to end: {s.name} ({k + 1}/{len(strategies)}) {'sensitivity + ' if measured else ''}keep-set")
        if kl_undefined:
            row = _rec_row("strategy", s.name, None, [], full, budget,
                           f"{NOTE_NOT_SEARCHED}the KL budget is undefined here ({runner.kl_note()}); use a loss budget")
            # (no keep-set was searched, so none was judged: null, not false / 0, which the report and a reader of
            # results.json took for a plan that kept no layer and failed the budget)
            row.update(within_budget=None, n_keep=None)
            rec_rows.append(row)
            continue
        rows = _sensitivity(runner, s, full, layers, measured, estimate, isolated_sqnr or {}, budget)
        ranked = sorted(rows, key=lambda r: r["rank"])
        near: list = []
        keep, out, runs, dropped, added = _search_keep(runner, s, full, ranked, budget, closest=near)
        validation_runs += runs
        note = (f"validated by {runs} run(s) over {len(runner.batches)} batch(es)" if runs
                else "every captured GEMM in low precision already within budget" if keep == [] and
                budget.holds(full.loss_rel_change, full.kl_div) else "")
        if dropped:
            note += (f"; {', '.join(dropped)} dropped from the kept prefix of the ranking"
                     + (f" and {', '.join(added)} kept instead" if added else "")
                     + f": the budget held without {'it' if len(dropped) == 1 else 'them'}")
        if near:
            m, kept, o = near[0]
            note = "; ".join(x for x in (note, _NEAREST_OWN + _closest_text(
                s.name, m, kept, o, budget)) if x)
            closest.append((m, -o.lp_flop_share, len(rec_rows)))
        rec_rows.append(_rec_row("strategy", s.name, None, keep, out, budget, note))
        for r in rows:
            r.pop("_benefit")
        sens_rows += rows
    mark_recommended(rec_rows)
    if closest and not any(r["recommended"] for r in rec_rows):  # the nearest plan of all recipes, for the verdict
        i = min(closest)[2]
        rec_rows[i]["note"] = rec_rows[i]["note"].replace(_NEAREST_OWN, NOTE_NEAREST_PLAN, 1)
    tables = {"e2e": pd.DataFrame(e2e_rows, columns=E2E_COLUMNS),
              "sensitivity": pd.DataFrame(sens_rows, columns=SENSITIVITY_COLUMNS),
              "recommendation": pd.DataFrame(rec_rows, columns=RECOMMENDATION_COLUMNS)}
    meta = {"budget": budget.value, "budget_kind": budget.kind,
            "sensitivity": "measured" if measured else "estimated", "measure_cost": cost,
            "forward_runs": runner.forwards,
            "validation_runs": validation_runs, "seconds": time.perf_counter() - start,
            "output": runner.output_note or "model output", "distribution": runner.distribution}
    return tables, meta


# --------------------------------------------------------------------------------------------
# One block size / one threshold for the whole model, from the sweeps, validated end to end
# --------------------------------------------------------------------------------------------
def _cheapest_within(options: list, start: int, run: Callable[[Any], Outcome], budget: Budget
                     ) -> tuple[Any, Outcome, int]:
    """``options`` ordered from most accurate to cheapest; from ``start`` walk to cheaper options while
    the budget holds, or (when ``start`` does not fit) to more accurate ones until it does, and then, when none
    of those fits, to the cheaper ones after ``start`` (accuracy is not always monotone in the option: a layer's
    SQNR over block sizes can be U-shaped). Returns the cheapest option that fitted (else the one tried nearest
    the budget), its outcome and the runs made."""
    def holds(out: Outcome) -> bool:
        return budget.holds(out.loss_rel_change, out.kl_div)

    tried = {start: run(options[start])}
    if holds(tried[start]):
        i = start
        while i + 1 < len(options):
            out = run(options[i + 1])
            tried[i + 1] = out
            if not holds(out):
                break
            i += 1
        return options[i], tried[i], len(tried)
    for i in range(start - 1, -1, -1):
        tried[i] = run(options[i])
        if holds(tried[i]):
            return options[i], tried[i], len(tried)
    for i in range(start + 1, len(options)):
        tried[i] = run(options[i])
    fits = [i for i in tried if holds(tried[i])]
    if fits:
        return options[max(fits)], tried[max(fits)], len(tried)

    def distance(i: int) -> float:
        m = budget.metric(tried[i].loss_rel_change, tried[i].kl_div)
        return m if math.isfinite(m) else math.inf

    best = min(tried, key=lambda i: (distance(i), i))
    return options[best], tried[best], len(tried)


def validate_blocksize(runner: Runner, sweep: pd.DataFrame, budget: Budget) -> dict:
    """``recommendation`` row of kind "blocksize": one block size for every layer of the "mixed" recipe.

    Start: the smallest of the per-layer recommended fprop block sizes (every layer gets at least the
    accuracy it asked for); then the largest swept size (least scale storage) whose end-to-end run
    keeps the budget, found by walking the swept sizes from there.
    """
    sizes = sorted(int(b) for b in sweep["blocksize"].unique())
    rec = sweep[(sweep["target"] == "fprop") & sweep["recommended"].astype(bool)]
    start = sizes.index(int(rec["blocksize"].min())) if len(rec) else len(sizes) - 1
    value, out, runs = _cheapest_within(sizes, start, lambda bs: runner.evaluate(
        Plan(mixed_with_blocksize(bs), threshold=runner.threshold)), budget)
    note = (f"mixed recipe with this block size in every layer; started from the smallest per-layer recommendation "
            f"({sizes[start]}), {runs} validation run(s)")
    return _rec_row("blocksize", "mixed", value, [], out, budget, note)


def validate_threshold(runner: Runner, sweep: pd.DataFrame, budget: Budget) -> dict:
    """``recommendation`` row of kind "threshold": one LLM.int8 outlier threshold for every layer.

    Thresholds are ordered from most accurate (smallest positive: most columns in 16-bit) to cheapest
    (largest, then 0 = no decomposition); the start is the most accurate of the per-layer recommendations,
    the result the cheapest whose end-to-end int8 run keeps the budget.
    """
    ths = sorted({float(t) for t in sweep["threshold"]}, key=lambda t: (t == 0, t))
    rec = sweep[sweep["recommended"].astype(bool)]
    start = min((ths.index(float(t)) for t in rec["threshold"]), default=0)
    value, out, runs = _cheapest_within(ths, start, lambda t: runner.evaluate(
        Plan(runner.int8, threshold=t)), budget)
    note = (f"int8 (LLM.int8) with this outlier threshold in every layer; started from the most accurate per-layer "
            f"recommendation ({ths[start]:g}), {runs} validation run(s)")
    return _rec_row("threshold", "int8", value, [], out, budget, note)


def model_wide(runner: Runner, budget: Budget, blocksize_sweep: pd.DataFrame | None = None,
               threshold_sweep: pd.DataFrame | None = None) -> pd.DataFrame:
    """The ``recommendation`` rows of kind "blocksize" / "threshold" for the sweeps given (recommended = within
    budget), after one high-precision reference pass."""
    if not runner.loss_hp:
        runner.reference([])
    rows = []
    if blocksize_sweep is not None and not blocksize_sweep.empty:
        rows.append(validate_blocksize(runner, blocksize_sweep, budget))
    if threshold_sweep is not None and not threshold_sweep.empty:
        rows.append(validate_threshold(runner, threshold_sweep, budget))
    mark_recommended(rows)
    return pd.DataFrame(rows, columns=RECOMMENDATION_COLUMNS)


# --------------------------------------------------------------------------------------------
# Training simulation
# --------------------------------------------------------------------------------------------
OptimizerFactory = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]
DEFAULT_LR = 1e-3


def check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def resolve_optimizer(spec: OptimizerFactory | str | None) -> OptimizerFactory:
    """``None`` → AdamW; a callable(params, lr) → optimizer; or "module:function" naming one."""
    if spec is None:
        return lambda params, lr: torch.optim.AdamW(params, lr=lr)
    if isinstance(spec, str):
        return resolve_callable(spec)
    if callable(spec):
        return spec
    raise TypeError(f"optimizer must be a callable(params, lr), 'module:function' or None, got {type(spec).__name__}")


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1).cpu() for p in params]) if params else torch.zeros(0)


# A training run has diverged from the first step whose loss is not finite or above DIVERGED_LOSS_RATIO times the
# high-precision loss of the untrained weights on the same batch. 10x: losses of batches drawn from one data set
# differ by far less than that, and a recipe that merely learns slower stays near or below where it started, so a
# 10x rise is a blow-up (an lr or a recipe that makes the weights explode), not noise. Comparing with the same
# batch keeps a batch that is simply harder than the others from counting as a blow-up.
DIVERGED_LOSS_RATIO = 10.0
TRAINING_COLUMNS = ["strategy", "step", "loss", "final_loss", "final_window", "final_loss_ratio", "weight_drift",
                    "diverged_step", "note"]


def _initial_losses(runner: Runner) -> list[float]:
    """The high-precision loss of the untrained weights on each batch: the end-to-end reference's when it ran (the
    same forward, seeded per batch), else one forward per batch of a throwaway copy (a copy, so batch-norm running
    statistics and the like of the model and of every training run stay as they were)."""
    if len(runner.loss_hp) == len(runner.batches):
        return list(runner.loss_hp)
    model = copy.deepcopy(runner.module)
    params = [p for _, p in trained_parameters(model)]
    out = []
    for i, batch in enumerate(runner.batches):
        torch.manual_seed(runner.seed + i)  # as Runner._run: the same dropout masks as the reference
        # Autograd on, as in the training steps: a model without a loss of its own is trained on the surrogate of
        # its outputs that depend on the weights, and under torch.no_grad none does (--no-e2e --steps 2 failed with
        # "the model output holds no floating-point tensor that depends on the weights").
        with torch.enable_grad(), params_require_grad(params):
            output = model_forward(model, batch, Gemms(Plan(None, threshold=runner.threshold), runner.pattern,
                                                       runner.kinds))
            loss, _ = choose_loss(output, batch, runner.loss_fn, runner.loss_name, model)
        out.append(float(loss.detach()))
        del output, loss
    del model
    return out


def _divergence(losses: list[float], start: list[float]) -> tuple[int | None, str]:
    """(0-based step, note) of the first step that diverged (DIVERGED_LOSS_RATIO), or (None, "")."""
    for k, value in enumerate(losses):
        if not math.isfinite(value):
            return k, f"diverged: loss not finite from step {k + 1}"
        ref = start[k % len(start)]
        if math.isfinite(ref) and ref > 0 and value > DIVERGED_LOSS_RATIO * ref:  # (a loss <= 0: no ratio)
            return k, (f"diverged: loss {value:.3g} at step {k + 1}, over {DIVERGED_LOSS_RATIO:g}× the untrained "
                       f"loss {ref:.3g} on that batch")
    return None, ""


def simulate_training(runner: Runner, strategies: Sequence[Strategy], steps: int, lr: float = DEFAULT_LR,
                      optimizer: OptimizerFactory | str | None = None) -> pd.DataFrame:
    """Train a copy of the model for ``steps`` steps per recipe (and once in high precision), from the same
    initial weights on the same batches (cycled), one copy alive at a time.

    Returns the ``training`` table: strategy ("hp" first), step, loss; the last step's row of each
    strategy adds ``final_loss`` (the mean of the last ``final_window`` = max(1, steps // 10) losses),
    ``final_loss_ratio`` (that mean, low over high precision), ``weight_drift`` (‖θ_lp − θ_hp‖ / ‖θ_hp − θ_0‖:
    how far the recipe's weights end from the high-precision ones, relative to how far high-precision training
    moved them) and ``diverged_step`` (1-based, the first step whose loss is not finite or above
    DIVERGED_LOSS_RATIO × the untrained high-precision loss on that batch; None when the run did not diverge,
    and then its note says so).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_lr(lr)
    if not isinstance(runner.module, nn.Module):
        raise LoadError(f"cannot train a {type(runner.module).__name__}: expected an nn.Module")
    if distributed.lockstep(runner.module):
        raise ValueError("expected a model not sharded with FSDP2 for the training simulation (each recipe trains a "
                         "copy of the model), got one wrapped with fully_shard: drop --steps")
    factory = resolve_optimizer(optimizer)
    theta0 = _flat([p for _, p in runner.params])
    window = max(1, steps // 10)
    start = _initial_losses(runner)
    rows: list[dict] = []
    theta_hp, final_hp, hp_note = None, None, ""
    runner.begin("training steps", steps * (1 + len(strategies)))
    for strat in [None, *strategies]:
        state = new_state(strat)
        model = copy.deepcopy(runner.module)
        params = [p for _, p in trained_parameters(model)]
        for p in params:
            p.requires_grad_(True)
        opt = factory(params, float(lr))
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"the optimizer factory must return a torch.optim.Optimizer for (params, lr), got "
                             f"{type(opt).__name__}")
        losses = []
        for step in range(steps):
            i = step % len(runner.batches)
            batch = runner.batches[i]
            torch.manual_seed(runner.seed + step)
            gemms = Gemms(Plan(strat, threshold=runner.threshold), runner.pattern, runner.kinds, state)
            with torch.enable_grad():
                output = model_forward(model, batch, gemms)
                loss, _ = choose_loss(output, batch, runner.loss_fn, runner.loss_name, model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            del output, loss
            runner.tick()
        name = "hp" if strat is None else strat.name
        final = sum(losses[-window:]) / window
        theta = _flat(params)
        bad, note = _divergence(losses, start)
        if strat is None:
            theta_hp, final_hp, hp_note = theta, final, note
            note = "; ".join(x for x in (note, runner.frozen_note) if x)
            ratio, drift = (1.0, 0.0) if math.isfinite(final) else (math.nan, 0.0)
        else:
            moved = float((theta_hp - theta0).norm())
            ratio = final / final_hp if final_hp else math.nan
            drift = float((theta - theta_hp).norm()) / moved if moved else math.nan
            if hp_note:  # (a ratio to a run that blew up says nothing about the recipe)
                too = ("high precision diverged too" if math.isfinite(ratio) and math.isfinite(drift)
                       else "high precision diverged too: no ratio to it")
                note = "; ".join(x for x in (note, too) if x)
        for step, value in enumerate(losses):
            last = step == steps - 1
            rows.append({"strategy": name, "step": step + 1, "loss": value, "final_loss": final if last else None,
                         "final_window": window if last else None, "final_loss_ratio": ratio if last else None,
                         "weight_drift": drift if last else None,
                         "diverged_step": None if bad is None or not last else bad + 1, "note": note if last else ""})
        del model, opt, params, theta
    return pd.DataFrame(rows, columns=TRAINING_COLUMNS)
