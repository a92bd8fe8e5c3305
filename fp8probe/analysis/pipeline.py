"""analyze(): stream batches through the model, replay every recipe on each captured GEMM, and fill the result tables."""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import functools
import os
import threading
import platform
import re
import sys
import time
import warnings
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from torch import nn

from fp8probe import __version__
from fp8probe.autograd import get_block_sizes
from fp8probe.backends import cpu as _cpu
from fp8probe.formats import FORMATS
from fp8probe.functional import _check_threshold

from . import distributed, streaming
from .capture import (GemmCall, GradsRun, InputsError, LossFn, LossInfo, backward_meta, capture_batch,
                      exported_in_train_mode, is_exported_graph)
from .e2e import (DEFAULT_BUDGET, DEFAULT_LR, SENSITIVITY_MODES, Budget, OptimizerFactory, Runner,
                  SensitivityEstimate, StageFn, check_lr, end_to_end, parse_budget, resolve_optimizer, simulate_training)
from .gemms import Coverage, parse_kinds
from .loading import Batch, LoadedModel, LoadError, from_exported_program, one_line, resolve_callable, to_batches
from .block_scales import BlockScaleStats, update_block_stats
from .metrics import ErrorAccumulator, OperandAccumulator, OutlierCensus, TensorStats
from .results import Results
from .delayed import delayed_table
from .strategies import (STRATEGIES, RecipeOptions, Strategy, reference_gemms, replay_groups, resolve, run_strategy,
                         shared_site, site_memo, with_options)

ProgressFn = Callable[[int, int], None]
E2E_OFF_NO_GRAD = ("end-to-end mode off: --no-grad runs forward only, and the end-to-end comparison needs backward "
                   "passes (loss and gradient drift)")


def forward_order(layers: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, accumulator) pairs in the model's forward order: capture hands calls over last layer
    first, so every per-layer accumulator records its call's ``index`` and tables sort by it."""
    return sorted(layers.items(), key=lambda kv: kv[1].index)


@dataclass
class _LayerAcc:
    """Everything accumulated for one GEMM site across batches (in = K, out = N of Y = A·Bᵀ)."""

    in_features: int
    out_features: int
    has_bias: bool
    threshold: float
    kind: str = "linear"
    op: str = "linear"
    b_is_weight: bool = True
    batch: int = 1  # GEMMs per call (heads, bmm batch, conv groups)
    index: int = 0  # forward position: calls arrive last layer first, tables keep forward order
    tokens: int = 0
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    census: OutlierCensus | None = None
    gemm: dict[tuple[str, str], ErrorAccumulator] = field(default_factory=dict)
    operands: dict[tuple[str, str], OperandAccumulator] = field(default_factory=dict)
    blocks: dict[tuple[str, str], BlockScaleStats] = field(default_factory=dict)
    block_labels: dict[tuple[str, str], dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    weight_seen: bool = False
    frozen: bool = False  # its weight does not train (GemmCall.frozen): no wgrad row
    ran: GradsRun = field(default_factory=GradsRun)  # which backward GEMMs training runs (GemmCall.runs)

    def __post_init__(self) -> None:
        self.census = OutlierCensus(self.threshold)


#: Largest GEMM site (elements of A, W and G together) whose recipes replay in parallel: beyond it
#: each recipe's W-sized temporaries would be alive ``workers`` times at once (an LM head's 28M-element
#: weight: ~0.5 GB a recipe), so a large site runs its recipes one after the other, each multi-threaded.
#: At most metrics.CHUNK: a pooled site's tensors then fit one chunk of the torch metrics, whose updates then
#: fold exactly (replay_workers; tests/analysis/test_parallel_replay.py checks it).
PARALLEL_MAX_ELEMENTS = 1 << 22
_TICK_LOCK = threading.Lock()
_POOL: futures.ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def replay_workers(A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None, recipes: int,
                   threads: int | None = None) -> int:
    """How many tasks of one GEMM site (its float64 reference, its statistics, each recipe group) run at
    once: 1 (one after the other, torch's intra-op threads inside each op) or up to
    ``torch.get_num_threads()`` (a pool of that many workers, one task per worker and one intra-op thread
    each). One recipe goes to the pool too: its replay runs beside the site's float64 reference and
    statistics and the model's backward (Llama-135M, ``--strategy global``, 2 cores: 20.3/16.3 → 15.0/15.5 s
    isolated, BERT 2.4/2.8 → 1.6/1.7 s; benchmarks/RESULTS.md).

    Why: a site of a 135M LLM is small (256 x 576 x 1536): a recipe's replay is dozens of ops of
    ~0.1-1 ms, and the Python between them runs on one core while the other waits; two recipes at
    once keep both busy (Llama-135M on 2 cores: see benchmarks/RESULTS.md). The tables are the serial
    replay's to the bit: each recipe measures into fresh accumulators (one C reduction each, so
    ``0 + s`` is ``s``) that are folded in strategy order, and a worker's op gives what it gives with
    one intra-op thread (the C kernels' float64 sums have a fixed order whatever the threads; a BLAS
    GEMM of these sizes runs on one thread either way on the CPUs measured; tests/analysis/
    test_parallel_replay.py compares the tables with FP8PROBE_REPLAY_WORKERS=1).
    The torch metrics (no C extension, or FP8PROBE_BACKEND=reference) take the pool too: a pooled site has
    no tensor above metrics.CHUNK (PARALLEL_MAX_ELEMENTS <= CHUNK), so each accumulator update is one sum,
    folded exactly as well. Their float64 reductions split by intra-op thread, so with them the tables are
    the serial replay's at one thread (``--threads 1``) to the bit; serially at two threads they differed from
    that in the last bits anyway. The many small torch ops of a site ran 2.6x slower serially (BERT, 8
    recipes: 30.9 s at two threads, 21.5 s at one, 11.9 s in the pool), each intra-op parallel region
    waking a passive OpenMP thread.
    Serial: CUDA tensors, no recipe, one thread, sites above PARALLEL_MAX_ELEMENTS, or
    ``FP8PROBE_REPLAY_WORKERS=1`` (a number caps the workers). ``threads``: the caller's intra-op thread
    count when it is not torch's current one.
    """
    threads = torch.get_num_threads() if threads is None else threads
    cap = os.environ.get("FP8PROBE_REPLAY_WORKERS", "").strip()
    if cap:
        if not cap.isdigit() or int(cap) < 1:
            raise ValueError(f"FP8PROBE_REPLAY_WORKERS must be a positive integer, got {cap!r}")
        threads = min(threads, int(cap))
    size = A.numel() + W.numel() + (0 if G is None else G.numel())
    if recipes < 1 or threads < 2 or A.device.type != "cpu" or size > PARALLEL_MAX_ELEMENTS:
        return 1
    return min(threads, recipes + 1)


def _worker_init() -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)  # grad mode is per thread: the replay never builds a graph


def _pool(workers: int) -> futures.ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        # One intra-op thread in each worker: OpenMP's thread count is per calling thread (the main
        # thread's torch.set_num_threads does not reach a worker's), so each worker sets its own.
        _POOL = futures.ThreadPoolExecutor(workers, thread_name_prefix="fp8probe-replay", initializer=_worker_init)
        _POOL_SIZE = workers
    return _POOL


#: Parallel sites in the pool at once (their operands, float64 references and recipes' outputs alive).
MAX_PENDING = 2


@dataclass
class _Site:
    """One GEMM call whose recipes run in the pool (_Analysis._replay), until drain() folds it."""

    name: str
    kind: str
    acc: _LayerAcc
    todo: list[Strategy]
    ref: futures.Future
    stats: futures.Future
    parts: list[futures.Future]   # one per replay group (replay_groups): its recipes' _Parts, in order
    spent: dict[str, float]


@dataclass
class _Part:
    """One recipe's replay of one call as a pool worker measured it: its failure, or fresh accumulators."""

    error: str | None = None
    gemm: dict[tuple[str, str], ErrorAccumulator] = field(default_factory=dict)
    operands: dict[tuple[str, str], OperandAccumulator] = field(default_factory=dict)
    blocks: dict[tuple[str, str], BlockScaleStats] = field(default_factory=dict)
    block_labels: dict[tuple[str, str], dict] = field(default_factory=dict)
    estimate: SensitivityEstimate | None = None


def _merge_into(into: dict, key: Any, value: Any) -> None:
    """``into[key]`` = its merge with ``value`` (an accumulator with ``merge``), or ``value`` for a new key."""
    into[key] = into[key].merge(value) if key in into else value


class _Analysis:
    """Per-layer accumulators fed by capture, one GemmCall at a time.

    Batches go through ``fresh()`` → capture → ``state()`` → ``absorb()`` on the totals, in batch
    order (Run.stream, analysis/distributed.py): that order of float additions is what makes a
    torchrun run bit-identical to one process.
    """

    def __init__(self, strategies: list[Strategy], threshold: float, estimate: SensitivityEstimate | None = None) -> None:
        self.strategies = strategies
        self.threshold = threshold
        self.layers: dict[str, _LayerAcc] = {}
        self.estimate = estimate  # the end-to-end mode's per-layer sensitivity estimate, fed from the same replay
        # State across batches of stateful recipes (delayed scaling): one per strategy for the whole replay.
        self.states = {s.name: s.new_state() for s in strategies if s.new_state is not None}
        self._quantized = {s.name: s.quantized_gemms for s in strategies}
        self.known_weights: set[str] = set()  # weights an earlier batch already measured (fresh())
        self.failed: dict[str, set[str]] = {}  # layer → recipes that failed on it in an earlier batch
        # Seconds spent in each part of the replay (perf_counter, summed over calls): what
        # Results.metadata["timings"] reports, so a benchmark can split a run without its own prints.
        self.seconds = dict.fromkeys(("stats", "reference", "recipes", "metrics"), 0.0)
        self.seconds_by_kind: dict[str, float] = {}  # whole replay time per GEMM kind (linear, attention, ...)
        self._cost: dict[str, float] = {}  # each recipe's replay seconds on the last site (parallel scheduling)
        # each recipe's replay and metrics seconds over the run: [serial sites' wall, pooled sites' worker seconds]
        self._by_strategy: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in strategies}
        # Parallel sites (replay_workers): in the pool, not yet folded; their worker seconds per part and
        # per kind; the caller's intra-op thread count while they run (None: not changed).
        self._pending: collections.deque[_Site] = collections.deque()
        self._pool_seconds: dict[str, float] = {}
        self._pool_kinds: dict[str, float] = {}
        self._clock = [0.0]  # the caller's seconds inside the replay (all parts share the list)
        self._threads: int | None = None

    def fresh(self) -> _Analysis:
        """An empty accumulator for one more batch, skipping what the totals make redundant (weights
        already measured, recipes already failed on a layer)."""
        part = _Analysis(self.strategies, self.threshold, None if self.estimate is None else SensitivityEstimate())
        part.known_weights = {n for n, a in self.layers.items() if a.weight_seen and a.b_is_weight}
        part.failed = {n: set(a.errors) for n, a in self.layers.items() if a.errors}
        # A stateful recipe's history (delayed scaling) runs across batches: every batch's part writes
        # into the totals' one state, so batches must run in order in this process (analyze refuses
        # stateful strategies under torchrun).
        part.states = self.states
        # Timings are this process's wall seconds (rank 0's batches under torchrun): one clock for all parts.
        part.seconds, part.seconds_by_kind, part._cost = self.seconds, self.seconds_by_kind, self._cost
        part._by_strategy = self._by_strategy
        part._pool_seconds, part._pool_kinds, part._clock = self._pool_seconds, self._pool_kinds, self._clock
        return part

    def state(self) -> tuple[dict[str, _LayerAcc], dict | None]:
        """What a batch adds (picklable: it travels between ranks)."""
        self.drain()
        return self.layers, None if self.estimate is None else self.estimate.sums

    def absorb(self, state: tuple[dict[str, _LayerAcc], dict | None]) -> None:
        """Fold one batch's ``state()`` into the totals (batches must come in order)."""
        layers, sums = state
        for name, part in layers.items():
            acc = self.layers.get(name)
            if acc is None:
                self.layers[name] = part
                continue
            if part.b_is_weight and (part.in_features, part.out_features) != (acc.in_features, acc.out_features):
                raise LoadError(f"layer {name} changed shape between batches: "
                                f"[{acc.out_features}, {acc.in_features}] then [{part.out_features}, {part.in_features}]")
            acc.tokens += part.tokens
            # A weight is the same tensor every batch: the first batch that measured it counts.
            keep_weight = not (acc.weight_seen and part.b_is_weight)
            for tname, ts in part.tensors.items():
                if tname != "weight" or keep_weight:
                    _merge_into(acc.tensors, tname, ts)
            acc.census = acc.census.merge(part.census)
            for key, e in part.gemm.items():
                if key[0] not in acc.errors:
                    _merge_into(acc.gemm, key, e)
            for key, o in part.operands.items():
                if key[0] not in acc.errors and (key[1] != "weight" or keep_weight):
                    _merge_into(acc.operands, key, o)
            # weight blocks only from the first batch that measured the weight: under torchrun another rank's
            # first batch measured it again (its fresh() part did not know this rank's batches)
            for key, b in part.blocks.items():
                if key[0] not in acc.errors and (key[1] != "weight" or keep_weight):
                    _merge_into(acc.blocks, key, b)
                    acc.block_labels.setdefault(key, part.block_labels[key])
            for strat, msg in part.errors.items():
                acc.errors.setdefault(strat, msg)
            acc.weight_seen = acc.weight_seen or part.weight_seen
            acc.frozen = acc.frozen or part.frozen
            acc.ran.merge(part.ran)
        if sums is not None and self.estimate is not None:
            self.estimate.merge(sums)

    def __call__(self, call: GemmCall) -> None:
        started = time.perf_counter()
        try:
            self._replay(call)
        finally:
            spent = time.perf_counter() - started
            with _TICK_LOCK:
                self._clock[0] += spent

    def _tick(self, part: str, since: float, spent: dict[str, float] | None = None) -> float:
        """Add the seconds since ``since`` to ``part`` of self.seconds (or of ``spent``: a parallel
        replay's per-call worker seconds, see _replay)."""
        now = time.perf_counter()
        with _TICK_LOCK:  # pool workers add to the same totals
            into = self.seconds if spent is None else spent
            into[part] = into.get(part, 0.0) + now - since
        return now

    def _replay(self, call: GemmCall) -> None:
        A, W, G = call.activation, call.weight, call.grad_output
        # A layer called again in the batch (a shared module) sees its earlier calls folded first.
        if any(site.name == call.name for site in self._pending):
            self.drain()
        clock = time.perf_counter()
        acc = self.layers.get(call.name)
        batch = A.shape[0] if A.dim() == 3 else 1
        if acc is None:
            acc = self.layers[call.name] = _LayerAcc(W.shape[-1], W.shape[-2], call.bias is not None, self.threshold,
                                                     call.kind, call.op, call.b_is_weight, batch, call.index)
        elif call.b_is_weight and (W.shape[-1], W.shape[-2]) != (acc.in_features, acc.out_features):
            # (a second activation, e.g. K of QKᵀ, may change length from batch to batch)
            raise LoadError(f"layer {call.name} changed shape between batches: "
                            f"[{acc.out_features}, {acc.in_features}] then {list(W.shape)}")
        acc.tokens += A.numel() // max(A.shape[-1], 1)
        acc.frozen = call.frozen
        acc.ran.add(call)
        # A weight is the same tensor every batch: count it once so its statistics are not repeated.
        first_weight = not ((acc.weight_seen or call.name in self.known_weights) and call.b_is_weight)
        acc.weight_seen = True
        todo = [s for s in self.strategies
                if s.name not in acc.errors and s.name not in self.failed.get(call.name, ())]
        # (while sites are in the pool the caller runs with one thread: the count to use is the saved one)
        workers = replay_workers(A, W, G, len(todo), self._threads)
        if workers < 2:
            clock += self.drain()  # (the sites still in the pool count as the parallel replay's)
            started = clock
            self._stats(acc, A, W, G, first_weight)
            clock = self._tick("stats", clock)
            ref = reference_gemms(A, W, G, call.grads)
            clock = self._tick("reference", clock)
            for group in replay_groups(todo):
                with shared_site():
                    for i in group:
                        part = self._strategy(todo[i], call, ref, first_weight, acc)
                        self._fold(acc, call.name, todo[i], part, merge=False)
            self._tick(call.kind, started, self.seconds_by_kind)
            return
        # Several recipes at once, each on one worker thread (replay_workers): the stats, the float64
        # reference and every recipe of the site are tasks of one pool, and the site's call returns
        # at once, so the model's backward and the next sites go on while it runs (at most
        # MAX_PENDING sites in flight). Each recipe measures into its own accumulators, folded in
        # strategy order and the sites in call order (drain), so the tables are the serial replay's.
        if self._threads is None:  # the caller's thread count, back at drain(); its own ops get one
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)
        spent: dict[str, float] = {}
        pool = _pool(workers)
        ref = pool.submit(self._timed, "reference", spent, reference_gemms, A, W, G, call.grads)
        # Longest first (each recipe's time on the previous site), so that the site does not end
        # with one long recipe running alone while the other workers wait.
        # Recipes that share sub-results (strategies.SHARING) run one after the other in one task.
        groups = replay_groups(todo)
        order = sorted(range(len(groups)), key=lambda g: -sum(self._cost.get(todo[i].name, 0.0) for i in groups[g]))
        submitted = {g: pool.submit(self._group, [todo[i] for i in groups[g]], call, ref, first_weight, spent)
                     for g in order}
        stats = pool.submit(self._timed, "stats", spent, self._stats, acc, A, W, G, first_weight)
        self._pending.append(_Site(call.name, call.kind, acc, todo, ref, stats,
                                   [submitted[g] for g in range(len(groups))], spent))
        while len(self._pending) > MAX_PENDING:
            self._fold_site(self._pending.popleft())

    def drain(self) -> float:
        """Fold every site still in the pool, in call order, and give the caller back its intra-op
        threads; returns the seconds it waited. Every batch's state() (and tables()) drains first."""
        started = time.perf_counter()
        try:
            while self._pending:
                self._fold_site(self._pending.popleft())
        finally:
            self.close()
        return time.perf_counter() - started

    def close(self) -> None:
        """Wait for the sites still in the pool without folding them (a failed site or capture: their
        results are dropped) and give the caller back its intra-op threads."""
        if self._pending:
            futures.wait([f for site in self._pending for f in (site.ref, site.stats, *site.parts)])
            self._pending.clear()
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None

    def _fold_site(self, site: _Site) -> None:
        futures.wait([site.ref, site.stats, *site.parts])  # every task has finished before anything is raised
        with _TICK_LOCK:
            for name, seconds in site.spent.items():
                self._pool_seconds[name] = self._pool_seconds.get(name, 0.0) + seconds
            self._pool_kinds[site.kind] = self._pool_kinds.get(site.kind, 0.0) + sum(site.spent.values())
        site.stats.result()
        parts = [part for group in site.parts for part in group.result()]
        for strat, part in zip(site.todo, parts):
            self._fold(site.acc, site.name, strat, part, merge=True)

    def timings(self) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """(seconds per part of the replay, replay seconds per GEMM kind, replay and metrics seconds per
        recipe), all wall time of the caller's thread: a serial site's as measured, the parallel sites' worker
        seconds scaled to the time the caller spent in the replay beyond the serial sites (they overlap each
        other and the model)."""
        serial = sum(self.seconds_by_kind.values())
        pooled = sum(self._pool_seconds.values())
        scale = max(self._clock[0] - serial, 0.0) / pooled if pooled > 0 else 0.0
        parts = {k: v + self._pool_seconds.get(k, 0.0) * scale for k, v in self.seconds.items()}
        kinds = dict(self.seconds_by_kind)
        for kind, v in self._pool_kinds.items():
            kinds[kind] = kinds.get(kind, 0.0) + v * scale
        by_strategy = {name: alone + in_pool * scale for name, (alone, in_pool) in self._by_strategy.items()}
        return parts, kinds, by_strategy

    def _timed(self, part: str, spent: dict[str, float], fn: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._tick(part, started, spent)

    def _stats(self, acc: _LayerAcc, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
               first_weight: bool) -> None:
        for tensor_name, t in (("activation", A), ("weight", W if first_weight else None), ("grad_output", G)):
            if t is not None:
                acc.tensors.setdefault(tensor_name, TensorStats()).update(t)
        acc.census.update(A.reshape(-1, A.shape[-1]))

    def _group(self, strategies: list[Strategy], call: GemmCall, ref: Any, first_weight: bool,
               spent: dict[str, float]) -> list[_Part]:
        """A pool task: one replay group's recipes (replay_groups), in order, sharing sub-results."""
        with shared_site():
            return [self._strategy(strat, call, ref, first_weight, None, spent) for strat in strategies]

    def _strategy(self, strat: Strategy, call: GemmCall, ref: Any, first_weight: bool,
                  into: _LayerAcc | None, spent: dict[str, float] | None = None) -> _Part:
        """Replay one recipe on ``call`` and measure it against ``ref`` (reference_gemms' dict, or a
        future of it). ``into``: the layer's accumulators to update; None: fresh ones, returned in the
        _Part for _fold (a pool worker must not insert into the shared dicts: their order is the
        tables' row order)."""
        A, W, G = call.activation, call.weight, call.grad_output
        clock = started = time.perf_counter()
        try:
            out = run_strategy(strat, A, W, G, self.threshold, b_is_weight=call.b_is_weight,
                               state=self.states.get(strat.name), site=call.name)
        except (RuntimeError, ValueError, TypeError) as exc:
            self._tick_strategy(strat.name, started, self._tick("recipes", clock, spent), spent)
            return _Part(error=one_line(exc))
        clock = self._tick("recipes", clock, spent)
        self._cost[strat.name] = clock - started
        if not isinstance(ref, dict):
            ref = ref.result()
        part = _Part(estimate=None if self.estimate is None or into is not None else SensitivityEstimate())
        sink = into if into is not None else part
        memo = site_memo()  # (a recipe's result shared with another of its group: their sums once)
        for gemm, lp in out.gemms.items():
            if not call.runs(gemm):  # (training computes no gradient for a frozen weight or the input data)
                continue
            sink.gemm.setdefault((strat.name, gemm), ErrorAccumulator()).update(ref[gemm], lp, memo)
        estimate = self.estimate if into is not None else part.estimate
        if estimate is not None:
            estimate.update(strat.name, call.name, G, out.gemms["fprop"].double() - ref["fprop"])
        for operand, (x, q, sat) in out.operands.items():
            if operand == "weight" and not first_weight:
                continue
            sink.operands.setdefault((strat.name, operand), OperandAccumulator()).update(x, q, sat, memo)
        update_block_stats(sink.blocks, sink.block_labels, strat, A, W, G, out.operands, call.b_is_weight,
                           first_weight, out.blocks)
        del out
        self._tick_strategy(strat.name, started, self._tick("metrics", clock, spent), spent)
        return part

    def _tick_strategy(self, name: str, started: float, now: float, spent: dict[str, float] | None) -> None:
        """Add one recipe's seconds on one site (its replay and metrics) to its total: a serial site's, or a
        pooled one's (``spent`` given: worker seconds, scaled in timings() like the parts)."""
        with _TICK_LOCK:
            self._by_strategy.setdefault(name, [0.0, 0.0])[spent is not None] += now - started

    def _fold(self, acc: _LayerAcc, name: str, strat: Strategy, part: _Part, merge: bool) -> None:
        """Record a recipe's failure, or (``merge``) fold its fresh accumulators into the layer's."""
        if part.error is not None:
            # One failing recipe must not sink the whole analysis: record it for the report.
            acc.errors[strat.name] = part.error
            warnings.warn(f"strategy {strat.name} failed on layer {name}: {part.error}",
                          RuntimeWarning, stacklevel=4)  # the caller of capture's sink
            return
        if not merge:
            return
        for key, e in part.gemm.items():
            _merge_into(acc.gemm, key, e)
        for key, o in part.operands.items():
            _merge_into(acc.operands, key, o)
        for key, b in part.blocks.items():
            _merge_into(acc.blocks, key, b)
            acc.block_labels.setdefault(key, part.block_labels[key])
        if part.estimate is not None:
            self.estimate.merge(part.estimate.sums)

    def tables(self) -> dict[str, pd.DataFrame]:
        self.drain()
        layers, gemm, operands, tensors, hists, outliers, errors, blocks = [], [], [], [], [], [], [], []
        for name, acc in forward_order(self.layers):
            bsz, bsz2 = get_block_sizes(acc.in_features, acc.out_features)
            layers.append({"layer": name, "in_features": acc.in_features, "out_features": acc.out_features,
                           "has_bias": acc.has_bias, "tokens": acc.tokens, "bsz": bsz, "bsz2": bsz2,
                           "kind": acc.kind, "op": acc.op, "b_is_weight": acc.b_is_weight, "batch": acc.batch,
                           "frozen": acc.frozen, **acc.ran.columns()})
            for (strat, g), e in acc.gemm.items():
                gemm.append({"layer": name, "strategy": strat, "gemm": g,
                             "quantized": g in self._quantized[strat], **e.result()})
            for (strat, op), o in acc.operands.items():
                operands.append({"layer": name, "strategy": strat, "operand": op, **o.result()})
            for (strat, op), b in acc.blocks.items():
                blocks.append({"layer": name, "strategy": strat, "operand": op, **acc.block_labels[(strat, op)],
                               **b.result()})
            for tname, ts in acc.tensors.items():
                tensors.append({"layer": name, "tensor": tname, **ts.result()})
                hists.append({"layer": name, "tensor": tname, **ts.histogram()})
            outliers.append({"layer": name, **acc.census.result()})
            for strat, msg in acc.errors.items():
                errors.append({"layer": name, "strategy": strat, "error": msg})
        out = {"layers": pd.DataFrame(layers), "gemm": pd.DataFrame(gemm), "operands": pd.DataFrame(operands),
               "tensors": pd.DataFrame(tensors), "histograms": pd.DataFrame(hists),
               "outliers": pd.DataFrame(outliers)}
        if errors:
            out["errors"] = pd.DataFrame(errors)
        if self.states:
            order = {name: i for i, (name, _) in enumerate(forward_order(self.layers))}
            rows = [r for name, st in self.states.items() for r in st.rows(name)]
            out["delayed_scaling"] = delayed_table(sorted(rows, key=lambda r: (order.get(r["layer"], 0),
                                                                                r["strategy"])))
        if blocks:
            out["block_scales"] = pd.DataFrame(blocks)
        return out


def _as_model(model: Any) -> tuple[Callable, list[Batch] | None, str]:
    if isinstance(model, LoadedModel):
        return model.module, model.batches, model.description
    if isinstance(model, torch.export.ExportedProgram):
        loaded = from_exported_program(model)
        return loaded.module, loaded.batches, loaded.description
    if isinstance(model, nn.Module):
        model = _eager(model)
        return model, None, type(model).__name__
    raise TypeError(f"model must be an nn.Module, a torch.export.ExportedProgram or a LoadedModel, "
                    f"got {type(model).__name__}")


def _eager(module: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper (OptimizedModule) holds: its GEMMs are the eager module's, and its layer
    names are then the eager ones (every name began with "_orig_mod.", so --layers patterns and a compare against the
    eager run matched nothing), as an exported program's wrapper is dropped."""
    while type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        module = module._orig_mod
    return module


def _loss_fn(loss: LossFn | str | None) -> tuple[LossFn | None, str | None]:
    if loss is None:
        return None, None
    if isinstance(loss, str):
        return resolve_callable(loss), loss
    if callable(loss):
        return loss, getattr(loss, "__qualname__", repr(loss))
    raise TypeError(f"loss must be a callable, 'module:function' or None, got {type(loss).__name__}")


@dataclass
class Run:
    """A model resolved for streaming: the callable module, its batches and the loss to differentiate."""

    module: Any
    batches: list[Batch]
    description: str
    example_inputs: bool
    device: torch.device
    layers: str | None
    loss_fn: LossFn | None
    loss_name: str | None
    coverage: Coverage = field(default_factory=Coverage)
    grad: bool = True  # False: forward only (capture_batch(grad=False)), fprop GEMMs alone
    seed: int = 0

    @property
    def train_mode(self) -> bool:
        """The model runs in training mode (dropout on, BatchNorm on batch statistics): an eager module left in
        train() (the Python API, or --train-mode), or a program exported from one (its dropout / batch-norm nodes).
        Any submodule in training mode counts (a Dropout left in train() inside an eval() model drops; the report said
        "eval")."""
        if is_exported_graph(self.module):
            return exported_in_train_mode(self.module)
        return isinstance(self.module, nn.Module) and in_training(self.module)

    def stream(self, sink: Any, report: ProgressFn | None = None) -> LossInfo | None:
        """Capture every batch into `sink`, counting coverage; returns the last batch's loss info.

        ``sink``: a GemmCall consumer with ``fresh()`` (an empty one for one batch), ``state()`` and
        ``absorb(state)``. Each batch is captured into a fresh sink whose state is folded into
        ``sink`` in batch order; under torchrun batch i is captured on rank i % world size
        (analysis/distributed.py) and every rank folds every batch, so the totals are the same
        float operations as in one process.
        """
        info = None

        def one(i: int) -> tuple[Any, Coverage, LossInfo]:
            part, cov = sink.fresh(), Coverage(self.coverage.kinds)
            if self.train_mode:  # batch i's dropout masks: the same on any rank and in every capture pass
                torch.manual_seed(self.seed + i)
            try:
                got = capture_batch(self.module, self.batches[i], part, layers=self.layers, loss_fn=self.loss_fn,
                                    loss_name=self.loss_name, device=self.device, coverage=cov, grad=self.grad)
            except BaseException as exc:
                if hasattr(part, "close"):  # replays still running in a pool (_Analysis)
                    part.close()
                if isinstance(exc, InputsError):  # (which of the batches: a list of them may hold one odd one)
                    raise InputsError(f"inputs batch {i} (counting from 0) of {len(self.batches)}: {exc}") from exc
                raise
            return part.state(), cov, got

        for i, (state, cov, got) in distributed.map_batches(len(self.batches), one,
                                                            pad=distributed.lockstep(self.module)):
            sink.absorb(state)
            self.coverage.merge(cov)
            info = got
            if report is not None:
                report(i + 1, len(self.batches))
        return info


def in_training(module: nn.Module) -> bool:
    """Any of ``module``'s submodules is in training mode (dropout drops, BatchNorm moves its statistics)."""
    return any(m.training for m in module.modules())


def check_device(device: Any) -> torch.device:
    """The analysis device: "cpu" or "cuda" (with an index or not); ValueError for anything else (torch's own error
    listed every device type it knows, and "meta" got through to fail inside the replay)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    return dev


@contextlib.contextmanager
def caller_state_kept(model: Any, device: Any) -> Iterator[None]:
    """What an analysis changes outside its results, put back when it ends (also on error): torch's global random
    state (the run seeds it: a notebook's later draws repeated whatever the user had seeded before), the buffers of a
    model in training mode (BatchNorm's running statistics and batch count move at every pass) and the device of a
    model moved to ``device`` for the run (it stayed there). Parameters keep their identity (Module.to moves their
    data); buffers get their own tensor objects back, with their values."""
    module = model.module if isinstance(model, LoadedModel) else model
    module = module if isinstance(module, nn.Module) and not streaming.is_streamed(module) else None
    dev = check_device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] \
        if dev.type == "cuda" and torch.cuda.is_available() else []
    buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    home = None
    if module is not None:
        if in_training(module):  # (eval-mode buffers do not move; nothing to copy)
            buffers = [(owner, name, buf, buf.detach().clone()) for owner in module.modules()
                       for name, buf in owner._buffers.items() if buf is not None]
        places = {t.device for t in (*module.parameters(), *module.buffers())}
        home = next(iter(places)) if len(places) == 1 else None
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            if home is not None and any(t.device != home for t in (*module.parameters(), *module.buffers())):
                module.to(home)
            for owner, name, buf, saved in buffers:
                with torch.no_grad():
                    buf.copy_(saved)
                owner._buffers[name] = buf


def keeps_caller_state(fn: Callable) -> Callable:
    """analyze() and the sweeps run inside caller_state_kept(model, device)."""
    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with caller_state_kept(model, kwargs.get("device", "cpu")):
            return fn(model, *args, **kwargs)
    return wrapper


def prepare_run(model: Any, inputs: Any, *, layers: str | None, batches: int | None, device: str, seed: int,
                loss: LossFn | str | None, gemms: str | list[str] | None = None, grad: bool = True) -> Run:
    """Resolve model, batches, device and loss the same way for analyze() and the sweeps; seeds torch.

    ``gemms``: the GEMM kinds to capture (gemms.parse_kinds: "all", "linear,attention", ...; None = all).
    ``grad`` False: forward-only capture. A model streamed from its checkpoint (analysis/streaming.py)
    keeps its parameters on the meta device; its blocks load onto ``device`` as they run.
    """
    kinds = parse_kinds(gemms)
    module, own_batches, description = _as_model(model)
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as exc:
            raise ValueError(f"--layers must be a valid regular expression, got {layers!r} ({exc})") from None
    if inputs is not None:
        batch_list = to_batches(inputs)
    elif own_batches:
        batch_list = own_batches
    else:
        raise LoadError("no inputs: pass --inputs file.pt (inputs= in the Python API: a tensor, tuple, dict or list of "
                        "batches), or a model that carries example inputs (.pt2) or a factory returning (model, "
                        "batches)")
    if batches is not None:
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"batches must be an int >= 1 or None, got {batches!r}")
        batch_list = batch_list[:batches]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    dev = check_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    if isinstance(module, nn.Module):
        module = streaming.to_device(module, dev)
    loss_fn, loss_name = _loss_fn(loss)
    torch.manual_seed(seed)
    return Run(module, batch_list, description, inputs is None, dev, layers, loss_fn, loss_name, Coverage(kinds),
               grad, seed)


def _param_dtype(module: Any) -> str | None:
    """The model's parameter dtype(s) for the report header ("bfloat16", "float32+float16"), None without parameters."""
    params = getattr(module, "parameters", None)
    if not callable(params):
        return None
    dtypes = list(dict.fromkeys(str(p.dtype).removeprefix("torch.") for p in params()))
    return "+".join(dtypes) if dtypes else None


def _input_shapes(batches: list[Batch]) -> dict | None:
    """What the batches hold, for the report header and the terminal (report.verdict.inputs_shape_text): the first
    batch's top-level tensors (name: keyword, or ``arg0``.. for positional ones; shape; dtype), whether every batch has
    those shapes, and the token count when the batch has token ids (its first integer tensor of 2+ dims, as
    ``input_ids`` of batch x sequence; the sum over batches). None without tensors. ("inputs: x.pt" said nothing of
    the shape or tokens where the demo's "4 seeded batch(es) of 8 x 32 tokens" did, QA C3.)"""
    first = batches[0].tensors() if batches else []
    if not first:
        return None
    token = next((k for k, v in first if not v.dtype.is_floating_point and not v.dtype.is_complex
                  and v.dtype != torch.bool and v.dim() >= 2), None)
    shapes = [[(k, tuple(v.shape)) for k, v in b.tensors()] for b in batches]
    tokens = sum(v.numel() for b in batches for k, v in b.tensors() if k == token) if token else None
    return {"batches": len(batches),
            "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in first],
            "same_shapes": all(x == shapes[0] for x in shapes), "token_ids": token, "tokens": tokens}


def _param_count(module: Any) -> int | None:
    """The model's parameter count (shared parameters once), None without parameters() (QA C3: the header gave none
    for a Hugging Face model; the demo's description carries its own)."""
    params = getattr(module, "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else None


def run_metadata(run: Run, *, name: str, model_desc: str | None, inputs_desc: str | None, seed: int,
                 info: LossInfo | None, formats: list[str]) -> dict:
    """The metadata block every results JSON shares (docs/architecture.md); callers add their own keys."""
    return {
        "name": name,
        "model": model_desc or run.description,
        "inputs": inputs_desc or (f"{len(run.batches)} batch(es)" + (" (example inputs)" if run.example_inputs else "")),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(run.device),
        "dtype": _param_dtype(run.module),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "versions": {"fp8probe": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "strategies": [],
        "loss": ({"kind": info.kind, "detail": info.detail, **({"no_gradient": info.no_gradient} if info.no_gradient else {})}
                 if info else None),
        "formats": {f: {"max": FORMATS[f].max, "min_normal": FORMATS[f].min_normal,
                        "min_subnormal": FORMATS[f].min_subnormal, "description": FORMATS[f].description}
                    for f in formats},
        "rules": {},
        "batches": len(run.batches),
        "input_shapes": _input_shapes(run.batches),
        "parameters": _param_count(run.module),
        "layers_regex": run.layers,
        "coverage": run.coverage.summary(),
        **({"ranks": distributed.current().size} if distributed.current().size > 1 else {}),
        **({"train_mode": True} if run.train_mode else {}),
        **({"untrained_batchnorm": bn} if (bn := untrained_batchnorm(run.module)) else {}),
    }


def _initial_statistics(mean: Any, var: Any) -> bool:
    """A BatchNorm's running statistics are still their initial mean 0 / variance 1 (plain, loaded tensors only: a
    streamed model's buffers not yet loaded are on the meta device)."""
    return all(type(t) is torch.Tensor and not t.is_meta for t in (mean, var)) \
        and bool((mean == 0).all()) and bool((var == 1).all())


def untrained_batchnorm(model: Any) -> list[str]:
    """Names of the BatchNorm modules whose running statistics are still their initial mean 0 / variance 1. The
    model runs in eval mode (loading.py, as for inference and as every export is traced): such a layer then
    normalises nothing, and the GEMMs after it see activations no training step or deployment would (a
    freshly initialised model or a factory that never ran a batch). A trained layer never has exactly these."""
    if not isinstance(model, nn.Module):
        return []
    names = []
    if is_exported_graph(model):  # (no BatchNorm modules: batch-norm nodes reading buffers of the program)
        for n in model.graph.nodes:
            if n.op != "call_function" or str(n.target) != "aten.batch_norm.default" or len(n.args) < 6 \
                    or n.args[5] is not False or not all(getattr(a, "op", None) == "get_attr" for a in n.args[3:5]):
                continue
            try:
                mean, var = (model.get_buffer(a.target) for a in n.args[3:5])
            except (AttributeError, RuntimeError):
                continue
            if _initial_statistics(mean, var):
                names.append(n.args[3].target.rpartition(".")[0] or str(n.name))
        return names
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats \
                and _initial_statistics(m.running_mean, m.running_var):
            names.append(name or type(m).__name__)
    return names


def _stage_lines() -> StageFn:
    """analyze(progress=True)'s stage reports: a line when a stage starts and when its known total is reached."""
    def report(label: str, done: int, total: int | None) -> None:
        if done == 0 or done == total:
            print(f"{label}: {done}/{total} passes" if total is not None else f"{label}: started", file=sys.stderr,
                  flush=True)
    return report


@keeps_caller_state
def analyze(model: Any, inputs: Any = None, strategy: str | list[str] = "global", *, threshold: float = 6.0,
            layers: str | None = None, batches: int | None = None, device: str = "cpu", seed: int = 0,
            loss: LossFn | str | None = None, progress: bool | ProgressFn = False, name: str | None = None,
            model_desc: str | None = None, inputs_desc: str | None = None,
            gemms: str | list[str] | None = None, e2e: bool = True,
            budget: Budget | float | str = DEFAULT_BUDGET, sensitivity: str = "auto", steps: int = 0,
            lr: float = DEFAULT_LR, optimizer: OptimizerFactory | str | None = None,
            options: RecipeOptions | None = None, grad: bool = True,
            stages: StageFn | None = None) -> Results:
    """Capture every GEMM of ``model`` on ``inputs`` and measure each recipe's error.

    model: nn.Module, torch.export.ExportedProgram or LoadedModel. inputs: one batch (tensor /
    tuple of args / dict of kwargs) or a list of batches; None uses the program's example inputs or
    the factory's batches. strategy: "all", a name, "a,b" or a list (strategies.STRATEGIES).
    threshold: LLM.int8 outlier threshold (|x| ≥ threshold). layers: regex on GEMM names (gemms.py:
    module path or parameter name plus ``#op``). gemms: kinds to capture ("all" | "linear,matmul,
    attention,conv" subsets; None = all); every GEMM executed is counted in the ``coverage`` table
    and ``metadata["coverage"]`` whether captured or skipped.
    batches: use at most this many. device: "cpu" | "cuda". loss: callable(output, batch) or
    "module:function"; default the model's own loss, else for a Hugging Face causal LM given no labels
    its next-token loss on the batch's input_ids, else the surrogate mean(output²).
    progress: True prints "batch i/n" lines to stderr; a callable(done, total) is called after each
    batch instead (the CLI draws a click progress bar with it). stages: called as (label, passes done, passes in the
    stage or None) as the end-to-end part and --steps run their model passes (the CLI's progress line after the
    bar); with progress True and no stages, each stage's start and end print a line. options: strategies.RecipeOptions
    (LLM.int8 row scale, simulated accumulation, delayed-scaling history; recorded in
    ``metadata["recipe_options"]`` and in each rule text).
    Returns Results with tables layers, gemm, operands, tensors, histograms, outliers, coverage
    (and errors when a recipe failed on a layer; delayed_scaling with the "delayed" strategy: per
    layer and operand the batches whose amax overflowed the delayed scale). For a GEMM of two activations (``b_is_weight``
    False in ``layers``: QKᵀ, PV, matmul/bmm) "weight" is the second operand B and "wgrad" its
    gradient Gᵀ·A.

    End to end (``e2e``, on by default; analysis/e2e.py): the model is run again with every captured
    GEMM computed by each recipe, forward and backward, against the high-precision run on the same
    batches → table ``e2e`` (loss change, output SQNR / KL / top-1, per-parameter gradient SQNR, low-
    precision share of the forward GEMM FLOPs), ``sensitivity`` (per layer: the change with only it in low precision and
    with only it in 16-bit; "measured" or "estimated" per ``sensitivity``: "auto" measures when its forward
    runs cost at most e2e.COST_BOUND x this isolated analysis' work, both counted in GEMM FLOPs, never timed) and
    ``recommendation`` (per recipe a small set of layers to keep in 16-bit so the change stays within ``budget``:
    the shortest fitting run of the sensitivity ranking, less the layers a run shows are not needed, validated by
    real runs; the recommended recipe keeps the most forward GEMM FLOPs in low precision). ``budget``: 0.01 = 1 % relative
    loss change either way (|change|: a recipe that lowers the loss 2 % is outside 1 %), "kl:0.01" = mean output KL. ``steps`` > 0 adds the ``training`` table: that many
    optimizer steps (``optimizer``: callable(params, lr) or "module:function", default AdamW, ``lr``)
    per recipe from the same initial weights on the same batches. The model is never modified.
    Memory of the end-to-end part: one training step's (one batch's activations, the high-precision
    parameter gradients and one recipe's at a time, each batch's high-precision output kept on CPU);
    ``steps`` adds one model copy and its optimizer state at a time.

    Special values: NaN/±Inf, zeros, subnormals and values beyond fp16/e4m3/e5m2 max are counted per
    layer and tensor (``tensors`` table). Error metrics are computed over finite elements only; the
    gemm/operands rows count what was left out (``excluded``: NaN/Inf inputs, ``nonfinite``: NaN/Inf
    produced by the recipe) and a ``note`` explains a metric that is not a finite number (exact
    result → SQNR +inf, all-zero reference with error → −inf, nothing finite to compare → NaN;
    report/schema.py NOTE_*). The JSON writes all three as null; the note tells them apart.

    Memory: batches are processed one at a time, and within a batch each linear call is analysed
    inside the backward pass as soon as its output gradient exists (capture.py), then released.
    Peak memory is the model's own training-step memory for one batch (parameters + the activations
    autograd saves) plus ONE layer's replay (float64 copies and quantised operands of A, W, G and
    the reference GEMMs: roughly 5-10 × out·in·8 bytes for a wide layer, about 40 MiB at 1024×1024)
    — it does not grow with the number of layers' replays. Measured on a 1024-wide MLP (64 tokens,
    "global", 2-core box, three runs): peak RSS over the loaded model +62…77 MiB for 4 layers and
    +145…155 MiB for 32 (≈ 3 MiB per extra layer: autograd's saved activations plus allocator
    slack), where keeping each layer's replay would cost ≥ 40 MiB per layer.
    Reduce ``batches`` / batch size when one batch's activations do not fit.

    Forward only (``grad`` False, the CLI's --no-grad): no loss and no backward; only fprop GEMMs
    are captured (gemm rows "fprop", no grad_output tensors), each analysed as soon as it ran, so
    memory is the model plus one layer's activations and replay; ``metadata.loss`` says so (kind
    "none", ``no_gradient``), and the end-to-end mode is off (it runs backward passes), said in
    ``metadata.e2e_off``. A model streamed from its checkpoint (analysis/streaming.py) is forward-only
    by construction: only one block's weights exist at a time.

    Under torchrun (WORLD_SIZE > 1, process group initialised): batch i runs on rank i % world size
    and every rank folds the per-batch states in batch order (analysis/distributed.py), so the
    tables are bit-identical to one process over the same batches; every rank returns them.
    ``metadata["timings"]`` splits the run (wall seconds): ``capture_s`` (the model's forward and
    backward, hooks included), the per-GEMM replay as ``stats_s`` (tensor statistics, outlier census),
    ``reference_s`` (float64 GEMMs), ``recipes_s``, ``metrics_s`` (error accumulators), then
    ``tables_s``, ``e2e_s`` and ``total_s``; ``recipe_s_by_strategy``: each recipe's part of ``recipes_s`` +
    ``metrics_s``, in strategy order; ``replay_s_by_kind``: the replay per GEMM kind (linear,
    attention, matmul, conv: the cost of covering more than the linear layers); under torchrun they are
    each rank's own (rank 0's are written). Where a site's recipes replay in parallel (replay_workers),
    its stats/reference/recipes/metrics seconds are the workers' seconds scaled to the site's wall time.
    """
    if options is not None and not isinstance(options, RecipeOptions):
        raise TypeError(f"expected RecipeOptions or None for options, got {type(options).__name__}")
    options = options or RecipeOptions()
    strategies = with_options(resolve(strategy), options)
    stateful = [s.name for s in strategies if s.new_state is not None]
    if stateful and distributed.current().size > 1:
        raise ValueError(f"{', '.join(stateful)} carries scaling state from batch to batch, so its batches must run in "
                         f"order in one process: expected a single-process run for it, got "
                         f"{distributed.current().size} ranks (run it without torchrun, or leave it out of --strategy)")
    threshold = _check_threshold(threshold)  # (NaN and Inf passed `< 0` and failed late, Inf after the whole replay)
    budget = parse_budget(budget)
    if sensitivity not in SENSITIVITY_MODES:
        raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITY_MODES)}, got {sensitivity!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if steps:
        check_lr(lr)
        resolve_optimizer(optimizer)
    e2e_off = None
    if streaming.is_streamed(model):
        grad = False
        e2e_off = streaming.E2E_OFF
    elif not grad:
        e2e_off = E2E_OFF_NO_GRAD
    if e2e_off is not None:
        if steps:
            raise ValueError(f"expected steps 0 with a forward-only run ({e2e_off}), got steps {steps}")
        e2e = False
    started = time.perf_counter()
    run = prepare_run(model, inputs, layers=layers, batches=batches, device=device, seed=seed, loss=loss,
                      gemms=gemms, grad=grad)
    distributed.check_same_model(run.module)
    analysis = _Analysis(strategies, threshold, SensitivityEstimate() if e2e else None)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be True, False or a callable(done, total), got {progress!r}")
    if callable(progress):
        report: ProgressFn | None = progress
    elif progress:
        def report(done: int, total: int) -> None:
            print(f"analyze: batch {done}/{total}", file=sys.stderr, flush=True)
    else:
        report = None
    stream_started = time.perf_counter()
    info = run.stream(analysis, report)
    stream_s = time.perf_counter() - stream_started
    if streaming.is_streamed(run.module):
        info = streaming.FORWARD_ONLY  # (capture_batch's FORWARD_ONLY speaks of --no-grad)
    used_formats = sorted({f for s in strategies for f in s.formats})
    metadata = run_metadata(run, name=name or "analysis", model_desc=model_desc, inputs_desc=inputs_desc,
                            seed=seed, info=info, formats=used_formats)
    metadata.update({"strategies": [s.name for s in strategies], "threshold": threshold,
                     "rules": {s.name: s.rules for s in strategies}, "recipe_options": options.metadata()})
    if e2e_off is not None:
        metadata["e2e_off"] = e2e_off
    if streaming.is_streamed(run.module):
        metadata["streaming"] = streaming.summary(run.module)
    tables_started = time.perf_counter()
    tables = {**analysis.tables(), "coverage": run.coverage.table()}
    metadata.update(backward_meta(tables["layers"].to_dict("records")))
    replay_parts, replay_kinds, replay_strategies = analysis.timings()
    timings = {"capture_s": stream_s - sum(replay_kinds.values()),
               **{f"{part}_s": sec for part, sec in replay_parts.items()},
               "tables_s": time.perf_counter() - tables_started,
               "replay_s_by_kind": dict(sorted(replay_kinds.items())),
               "recipe_s_by_strategy": replay_strategies}
    metadata["timings"] = timings
    e2e_started = time.perf_counter()
    if e2e or steps:
        runner = Runner(run.module, run.batches, device=run.device, layers=run.layers, loss_fn=run.loss_fn,
                        loss_name=run.loss_name, threshold=threshold, seed=seed, kinds=run.coverage.kinds,
                        options=options)
        runner.stage = stages if stages is not None else _stage_lines() if progress is True else None
        if e2e:
            fprop = tables["gemm"][tables["gemm"]["gemm"] == "fprop"] if not tables["gemm"].empty else tables["gemm"]
            isolated = {(r["strategy"], r["layer"]): r["sqnr_db"] for r in fprop.to_dict("records")}
            isolated_s = time.perf_counter() - started
            e2e_tables, metadata["e2e"] = end_to_end(runner, strategies, budget, sensitivity=sensitivity,
                                                     estimate=analysis.estimate, isolated_sqnr=isolated)
            metadata["e2e"]["isolated_seconds"] = isolated_s
            tables.update(e2e_tables)
        if steps:
            tables["training"] = simulate_training(runner, strategies, steps, lr, optimizer)
            metadata["training"] = {"steps": steps, "lr": lr, "optimizer": "AdamW" if optimizer is None else
                                    getattr(optimizer, "__qualname__", str(optimizer))}
    timings["e2e_s"] = time.perf_counter() - e2e_started  # end to end and --steps; 0 without them
    timings["total_s"] = time.perf_counter() - started
    return Results(metadata, tables, kind="analyze")
