"""Block-size and outlier-threshold sweeps per GEMM site, on the operands captured by analysis/capture.py."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from fp8probe import functional as F
from fp8probe.autograd import MatMul8bitLt, MatmulLtState, get_block_sizes

from .capture import GemmCall, GradsRun, LossFn, LossInfo, backward_meta
from .e2e import DEFAULT_BUDGET, Budget, Runner, model_wide, parse_budget
from .metrics import ErrorAccumulator
from .pipeline import ProgressFn, Run, forward_order, keeps_caller_state, prepare_run, run_metadata
from .results import Results
from .strategies import ROW_SCALE_RULES, RecipeOptions, quantisable

DEFAULT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
# Block-size recommendation: the largest block (least scale storage) whose fprop SQNR is within
# 0.5 dB of the best swept block size. 0.5 dB is 12 % more noise power (10^0.05 = 1.12), below
# what one changes by moving one block size step on typical layers (~0.5-1.5 dB per halving).
BLOCKSIZE_TOLERANCE_DB = 0.5
# Threshold recommendation (the knee). LLM.int8()'s premise is that outlier features are few: a
# threshold that keeps more than 10 % of the input columns in 16-bit gives away most of the int8
# saving, so only thresholds at or under that budget compete (all of them if none is). Among those,
# the ones within 1 dB (26 % more noise power) of the best SQNR tie on accuracy and the one keeping
# the fewest 16-bit columns wins; ties go to the larger threshold (0 = no decomposition counts last).
THRESHOLD_TOLERANCE_DB = 1.0
MAX_FRAC_COLS_16BIT = 0.10
# One fp32 absmax is stored per block: 32 bits of scale per `blocksize` elements.
ABSMAX_BITS = 32
# Codebooks of the sweep: bitsandbytes' FP8 research recipe (SPEC §7.2) — E4M3-like for A and W,
# E5M2-like for gradients.
CODE_FWD = "bnb-e4m3"
CODE_BWD = "bnb-e5m2"

BLOCKSIZE_METHOD = (f"A and W blockwise {CODE_FWD}, G blockwise {CODE_BWD}, blocks over the flattened tensor, one "
                    f"fp32 absmax per block ({ABSMAX_BITS}/blocksize bits per element), nearest code with ties to the "
                    f"even index; GEMMs in float64 so the error is the quantisation's alone")
BLOCKSIZE_RULE = (f"recommended = the largest block size whose fprop SQNR is within {BLOCKSIZE_TOLERANCE_DB:g} dB of "
                  f"the best swept block size (least scale storage at near-best accuracy); 'auto' = the block size "
                  f"get_block_sizes picks (bsz for A/W/fprop, bsz2 for G/dgrad/wgrad)")
THRESHOLD_METHOD = ("LLM.int8() forward (MatMul8bitLt, default mode): int8 vector-wise A (row absmax/127, round half "
                    "to even) with outlier columns |a| >= threshold kept in A's precision and multiplied by the "
                    "dequantised weight columns; W int8 per output row")
THRESHOLD_RULE = (f"recommended = among thresholds keeping at most {100 * MAX_FRAC_COLS_16BIT:g} % of input columns in "
                  f"16-bit (all thresholds if none does), those whose LLM.int8 fprop SQNR is within "
                  f"{THRESHOLD_TOLERANCE_DB:g} dB of the best; of these the one keeping the fewest columns in "
                  f"16-bit, ties to the larger threshold. Threshold 0 = plain int8 vector-wise, no outlier columns")


def overhead_bits(blocksize: int) -> float:
    """Scale-storage overhead of blockwise quantisation with an fp32 absmax: bits per element."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return ABSMAX_BITS / blocksize


def recommend_blocksize(sqnr_by_blocksize: dict[int, float], tolerance_db: float = BLOCKSIZE_TOLERANCE_DB) -> int | None:
    """The largest block size whose SQNR (dB) is within ``tolerance_db`` of the best; None if none is finite."""
    finite = {bs: s for bs, s in sqnr_by_blocksize.items() if s is not None and not math.isnan(s)}
    if not finite:
        return None
    best = max(finite.values())
    if math.isinf(best):  # exact results: every +inf block size ties; pick the largest of those
        return max(bs for bs, s in finite.items() if s == best)
    return max(bs for bs, s in finite.items() if s >= best - tolerance_db)


def recommend_threshold(points: dict[float, tuple[float, float]], tolerance_db: float = THRESHOLD_TOLERANCE_DB,
                        max_frac_cols: float = MAX_FRAC_COLS_16BIT) -> float | None:
    """The knee of a threshold sweep (THRESHOLD_RULE): ``points[threshold] = (fprop_sqnr_db, frac_cols_16bit)``.

    Returns the recommended threshold, or None when no SQNR is a number.
    """
    finite = {t: p for t, p in points.items() if p[0] is not None and not math.isnan(p[0])}
    if not finite:
        return None
    budget = {t: p for t, p in finite.items() if p[1] <= max_frac_cols} or finite
    best = max(p[0] for p in budget.values())
    ok = [t for t, p in budget.items() if (p[0] == best if math.isinf(best) else p[0] >= best - tolerance_db)]
    # threshold 0 (no decomposition) sorts after every positive threshold on a tie in columns
    return min(ok, key=lambda t: (budget[t][1], -t if t > 0 else math.inf))


def _check_list(name: str, values: Any, what: str) -> None:
    """A sweep's values are a list (6 gave "'int' object is not iterable", a string ran letter by letter)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of {what}, got {values!r}")


def _check_blocksizes(blocksizes: Sequence[int]) -> list[int]:
    out = []
    _check_list("blocksizes", blocksizes, "block sizes")
    for bs in blocksizes:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"block sizes must be positive ints, got {bs!r}")
        out.append(bs)
    if not out:
        raise ValueError("at least one block size is needed, got none")
    return sorted(set(out))


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    out = []
    _check_list("thresholds", thresholds, "thresholds")
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"thresholds must be finite numbers >= 0, got {t!r}")
        out.append(float(t))
    if not out:
        raise ValueError("at least one threshold is needed, got none")
    return sorted(set(out))


# --------------------------------------------------------------------------------------------
# Per-layer accumulators (one GemmCall at a time, batches merged by the metric accumulators)
# --------------------------------------------------------------------------------------------
@dataclass
class _BlockLayer:
    in_features: int
    out_features: int
    index: int = 0  # forward position (calls arrive in backward order; tables list forward order)
    err: dict[tuple[int, str], ErrorAccumulator] = field(default_factory=dict)
    weight_done: bool = False
    b_is_weight: bool = True
    tokens: int = 0  # rows of A over batches (analyze's layers.tokens)
    frozen: bool = False  # its weight does not train (GemmCall.frozen): no wgrad rows
    ran: GradsRun = field(default_factory=GradsRun)  # which backward GEMMs training runs (GemmCall.runs)


def _merge_err(dst: dict, src: dict, skip: Any = lambda key: False) -> None:
    for key, e in src.items():
        if not skip(key):
            dst[key] = dst[key].merge(e) if key in dst else e


class _BlocksizeSweep:
    """Fake-quantises A, W (bnb-e4m3) and G (bnb-e5m2) blockwise at each block size and measures
    operand and GEMM error against float64 products of the unquantised operands.

    Batches: ``fresh()`` / ``state()`` / ``absorb()`` as pipeline._Analysis (folded in batch order).
    """

    def __init__(self, blocksizes: list[int]) -> None:
        self.blocksizes = blocksizes
        self.layers: dict[str, _BlockLayer] = {}
        self.known_weights: set[str] = set()

    def fresh(self) -> _BlocksizeSweep:
        part = _BlocksizeSweep(self.blocksizes)
        part.known_weights = {n for n, a in self.layers.items() if a.weight_done and a.b_is_weight}
        return part

    def state(self) -> dict[str, _BlockLayer]:
        return self.layers

    def absorb(self, layers: dict[str, _BlockLayer]) -> None:
        for name, part in layers.items():
            acc = self.layers.get(name)
            if acc is None:
                self.layers[name] = part
                continue
            keep_weight = not (acc.weight_done and part.b_is_weight)
            _merge_err(acc.err, part.err, lambda key: key[1] == "weight" and not keep_weight)
            acc.weight_done = acc.weight_done or part.weight_done
            acc.tokens += part.tokens
            acc.frozen = acc.frozen or part.frozen
            acc.ran.merge(part.ran)

    def __call__(self, call: GemmCall) -> None:
        A, W, G = call.activation, call.weight, call.grad_output
        acc = self.layers.setdefault(call.name, _BlockLayer(W.shape[-1], W.shape[-2], call.index,
                                                            b_is_weight=call.b_is_weight))
        acc.frozen = call.frozen
        acc.tokens += A.numel() // max(A.shape[-1], 1)
        acc.ran.add(call)
        if call.name in self.known_weights:
            acc.weight_done = True
        # Batched GEMMs (attention, bmm, conv groups: [Bt, M, K]) use .mT and batched products.
        a64, w64 = A.double(), W.double()
        g64 = None if G is None else G.double()
        ref = {"fprop": a64 @ w64.mT}
        if g64 is not None:  # (only the backward GEMMs training runs: a frozen weight's wgrad, the input data's dgrad not)
            if call.runs("dgrad"):
                ref["dgrad"] = g64 @ w64
            if call.runs("wgrad"):
                ref["wgrad"] = g64.mT @ a64
        for bs in self.blocksizes:
            aq = F.fake_quantize(quantisable(A), CODE_FWD, bs).double()
            wq = F.fake_quantize(quantisable(W), CODE_FWD, bs).double()
            acc.err.setdefault((bs, "activation"), ErrorAccumulator()).update(a64, aq)
            if not (acc.weight_done and call.b_is_weight):  # a weight is the same every batch: count it once
                acc.err.setdefault((bs, "weight"), ErrorAccumulator()).update(w64, wq)
            acc.err.setdefault((bs, "fprop"), ErrorAccumulator()).update(ref["fprop"], aq @ wq.mT)
            if g64 is not None:
                gq = F.fake_quantize(quantisable(G), CODE_BWD, bs).double()
                acc.err.setdefault((bs, "grad_output"), ErrorAccumulator()).update(g64, gq)
                if "dgrad" in ref:
                    acc.err.setdefault((bs, "dgrad"), ErrorAccumulator()).update(ref["dgrad"], gq @ wq)
                if "wgrad" in ref:
                    acc.err.setdefault((bs, "wgrad"), ErrorAccumulator()).update(ref["wgrad"], gq.mT @ aq)
        acc.weight_done = True

    def nonfinite(self) -> dict[str, int]:
        """NaN/±Inf values per layer in the operands the sweep quantised (activation, weight once, gradient): each
        operand's accumulator at one block size excludes them from its SQNR and counts them."""
        bs = self.blocksizes[0]
        return {name: sum(acc.err[(bs, t)].excluded for t in ("activation", "weight", "grad_output")
                          if (bs, t) in acc.err)
                for name, acc in forward_order(self.layers)}

    def table(self) -> pd.DataFrame:
        rows = []
        for name, acc in forward_order(self.layers):
            bsz, bsz2 = get_block_sizes(acc.in_features, acc.out_features)
            fprop = {bs: acc.err[(bs, "fprop")].result()["sqnr_db"] for bs in self.blocksizes}
            rec = recommend_blocksize(fprop)
            for bs in self.blocksizes:
                for target in ("activation", "weight", "grad_output", "fprop", "dgrad", "wgrad"):
                    e = acc.err.get((bs, target))
                    if e is None:
                        continue
                    auto = bs == (bsz if target in ("activation", "weight", "fprop") else bsz2)
                    res = e.result()
                    rows.append({"layer": name, "blocksize": bs, "target": target, "sqnr_db": res["sqnr_db"],
                                 "overhead_bits": overhead_bits(bs), "auto": auto, "recommended": bs == rec,
                                 "note": res["note"]})  # decodes a null SQNR (report/schema.py NOTE_*)
        return pd.DataFrame(rows, columns=["layer", "blocksize", "target", "sqnr_db", "overhead_bits", "auto",
                                           "recommended", "note"])


@dataclass
class _ThresholdLayer:
    in_features: int
    out_features: int
    index: int = 0
    err: dict[float, ErrorAccumulator] = field(default_factory=dict)
    cols: dict[float, float] = field(default_factory=dict)  # Σ over batches of tokens · frac_cols
    tokens: int = 0
    nonfinite_a: int = 0  # NaN/±Inf in the activations, over batches
    nonfinite_w: int = 0  # ... in the weight (the same tensor each batch: counted once)


class _ThresholdSweep:
    """LLM.int8() forward (MatMul8bitLt, default mode) at each outlier threshold vs the float64 A·Wᵀ."""

    def __init__(self, thresholds: list[float], row_scale: str = "bnb") -> None:
        self.thresholds = thresholds
        self.row_scale = F.check_row_scale(row_scale)
        self.layers: dict[str, _ThresholdLayer] = {}

    def fresh(self) -> _ThresholdSweep:
        return _ThresholdSweep(self.thresholds, self.row_scale)

    def state(self) -> dict[str, _ThresholdLayer]:
        return self.layers

    def absorb(self, layers: dict[str, _ThresholdLayer]) -> None:
        for name, part in layers.items():
            acc = self.layers.get(name)
            if acc is None:
                self.layers[name] = part
                continue
            _merge_err(acc.err, part.err)
            for th, cols in part.cols.items():
                acc.cols[th] = acc.cols.get(th, 0.0) + cols
            acc.tokens += part.tokens
            acc.nonfinite_a += part.nonfinite_a
            acc.nonfinite_w = max(acc.nonfinite_w, part.nonfinite_w)

    def __call__(self, call: GemmCall) -> None:
        A, W = call.activation, call.weight
        acc = self.layers.setdefault(call.name, _ThresholdLayer(W.shape[-1], W.shape[-2], call.index))
        acc.nonfinite_a += A.numel() - int(torch.isfinite(A).sum())
        if call.b_is_weight:
            acc.nonfinite_w = max(acc.nonfinite_w, W.numel() - int(torch.isfinite(W).sum()))
        else:  # (a second activation: new values each batch)
            acc.nonfinite_a += W.numel() - int(torch.isfinite(W).sum())
        # A batched GEMM [Bt, M, K] is Bt separate LLM.int8 matmuls (one per head / group).
        slices = [(A, W)] if A.dim() == 2 else [(A[i], W[i]) for i in range(A.shape[0])]
        with torch.no_grad():
            for a, w in slices:
                ref = a.double() @ w.double().T
                tokens = a.shape[0]
                acc.tokens += tokens
                qa, qw = quantisable(a), quantisable(w)  # (once per slice, not per threshold)
                for th in self.thresholds:
                    state = MatmulLtState()
                    state.threshold = th
                    state.is_training = False
                    state.row_scale = self.row_scale
                    out = MatMul8bitLt.apply(qa, qw, None, None, state)
                    acc.err.setdefault(th, ErrorAccumulator()).update(ref, out)
                    n_cols = 0 if state.idx is None else int(state.idx.numel())
                    # Token-weighted mean over batches of the per-batch fraction of 16-bit columns: each
                    # batch's decomposition is its own (outlier columns are chosen per forward).
                    acc.cols[th] = acc.cols.get(th, 0.0) + tokens * n_cols / acc.in_features

    def nonfinite(self) -> dict[str, int]:
        """NaN/±Inf values per layer in the operands (activations over batches, the weight once)."""
        return {name: acc.nonfinite_a + acc.nonfinite_w for name, acc in forward_order(self.layers)}

    def table(self) -> pd.DataFrame:
        rows = []
        for name, acc in forward_order(self.layers):
            pts = {th: (acc.err[th].result()["sqnr_db"], acc.cols[th] / acc.tokens if acc.tokens else 0.0)
                   for th in self.thresholds}
            rec = recommend_threshold(pts)
            for th in self.thresholds:
                rows.append({"layer": name, "threshold": th, "fprop_sqnr_db": pts[th][0],
                             "frac_cols_16bit": pts[th][1], "recommended": th == rec,
                             "note": acc.err[th].result()["note"]})
        return pd.DataFrame(rows, columns=["layer", "threshold", "fprop_sqnr_db", "frac_cols_16bit", "recommended",
                                           "note"])


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------
def _run(model: Any, inputs: Any, sweep: Any, *, layers: str | None, batches: int | None, device: str,
         seed: int, loss: LossFn | str | None, gemms: str | list[str] | None = None,
         progress: ProgressFn | None = None) -> tuple[Run, LossInfo | None]:
    """Resolve the model and batches exactly like analyze() and stream every batch into `sweep`
    (``progress(done, total)`` after each batch, as in analyze)."""
    run = prepare_run(model, inputs, layers=layers, batches=batches, device=device, seed=seed, loss=loss,
                      gemms=gemms)
    return run, run.stream(sweep, progress)


def _metadata(kind: str, run: Run, info: LossInfo | None, *, name: str | None, model_desc: str | None,
              inputs_desc: str | None, seed: int, formats: Sequence[str], rules: dict, recommendations: dict,
              extra: dict) -> dict:
    meta = run_metadata(run, name=name or kind, model_desc=model_desc, inputs_desc=inputs_desc, seed=seed,
                        info=info, formats=list(formats))
    meta.update({"rules": rules, "recommendations": recommendations, **extra})
    return meta


def nonfinite_meta(per_layer: dict[str, int]) -> dict:
    """metadata.nonfinite_operands: NaN/±Inf values in the operands a sweep quantised (excluded from every SQNR,
    never fatal) and the layers holding them, so the terminal and the report warn as analyze does."""
    bad = [name for name, n in per_layer.items() if n]
    return {"nonfinite_operands": {"values": int(sum(per_layer.values())), "layers": bad}}


def _blocksize_meta(sizes: list[int]) -> dict:
    return {"formats": (CODE_FWD, CODE_BWD), "rules": {"blockwise sweep": BLOCKSIZE_METHOD},
            "recommendations": {"blocksize_sweep": BLOCKSIZE_RULE}, "extra": {"blocksizes": sizes}}


def _threshold_meta(ths: list[float], row_scale: str = "bnb") -> dict:
    return {"formats": ("int8",), "rules": {"threshold sweep": THRESHOLD_METHOD + ". " + ROW_SCALE_RULES[row_scale]},
            "recommendations": {"threshold_sweep": THRESHOLD_RULE},
            "extra": {"thresholds": ths, "recipe_options": RecipeOptions(int8_row_scale=row_scale).metadata()}}


def _layers_table(sweep_layers: dict) -> pd.DataFrame:
    """Each swept GEMM's shape, the rows of A it saw over the batches and get_block_sizes' pick (analyze's
    layers columns of the same names)."""
    rows = []
    for name, acc in forward_order(sweep_layers):
        sized = acc.in_features and acc.out_features  # (get_block_sizes refuses 0 features)
        bsz, bsz2 = get_block_sizes(acc.in_features, acc.out_features) if sized else (None, None)
        rows.append({"layer": name, "in_features": acc.in_features, "out_features": acc.out_features,
                     "tokens": acc.tokens, "bsz": bsz, "bsz2": bsz2})
    return pd.DataFrame(rows)


class _Both:
    """Fan one capture out to several sweeps (the demo runs both sweeps on one capture)."""

    def __init__(self, *sweeps: Any) -> None:
        self.sweeps = sweeps

    def fresh(self) -> _Both:
        return _Both(*(s.fresh() for s in self.sweeps))

    def state(self) -> tuple:
        return tuple(s.state() for s in self.sweeps)

    def absorb(self, states: tuple) -> None:
        for s, st in zip(self.sweeps, states):
            s.absorb(st)

    def __call__(self, call: GemmCall) -> None:
        for s in self.sweeps:
            s(call)


def _validated(run: Run, seed: int, budget: Budget, blocksize: pd.DataFrame | None = None,
               threshold: pd.DataFrame | None = None, row_scale: str = "bnb") -> pd.DataFrame:
    """The model-wide block size / threshold rows of ``recommendation``, validated end to end (e2e.model_wide)."""
    runner = Runner(run.module, run.batches, device=run.device, layers=run.layers, loss_fn=run.loss_fn,
                    loss_name=run.loss_name, threshold=6.0, seed=seed, kinds=run.coverage.kinds,
                    options=RecipeOptions(int8_row_scale=row_scale))
    return model_wide(runner, budget, blocksize, threshold)


@keeps_caller_state
def sweep_blocksize(model: Any, inputs: Any = None, blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES, *,
                    layers: str | None = None, batches: int | None = None, device: str = "cpu", seed: int = 0,
                    loss: LossFn | str | None = None, name: str | None = None, model_desc: str | None = None,
                    inputs_desc: str | None = None, gemms: str | list[str] | None = None,
                    progress: ProgressFn | None = None, e2e: bool = True,
                    budget: Budget | float | str = DEFAULT_BUDGET) -> Results:
    """Blockwise FP8 error per layer × block size (kind "sweep-blocksize", table ``blocksize_sweep``).

    For each captured linear GEMM and block size: bnb-e4m3 blockwise fake quantisation of the
    activation A [tokens, in] and weight W [out, in], bnb-e5m2 of the output gradient G
    [tokens, out]; SQNR (dB) of each operand and of fprop A·Wᵀ, dgrad G·W and wgrad Gᵀ·A (products
    in float64, so the error is the quantisation's alone); overhead_bits = 32/blocksize; ``auto``
    marks get_block_sizes' pick; ``recommended`` follows BLOCKSIZE_RULE. Same model/inputs
    arguments as ``analyze``. With ``e2e`` a ``recommendation`` row (kind "blocksize") gives one block
    size for the whole model, validated by end-to-end runs of the "mixed" recipe within ``budget``.
    """
    sizes = _check_blocksizes(blocksizes)
    budget = parse_budget(budget)
    sweep = _BlocksizeSweep(sizes)
    run, info = _run(model, inputs, sweep, layers=layers, batches=batches, device=device, seed=seed, loss=loss,
                     gemms=gemms, progress=progress)
    meta = _metadata("sweep-blocksize", run, info, name=name, model_desc=model_desc, inputs_desc=inputs_desc,
                     seed=seed, **_blocksize_meta(sizes))
    meta.update(nonfinite_meta(sweep.nonfinite()))
    tables = {"layers": _layers_table(sweep.layers), "blocksize_sweep": sweep.table(),
              "coverage": run.coverage.table()}
    meta.update(backward_meta([{"layer": name, "frozen": acc.frozen, **acc.ran.columns()}
                               for name, acc in forward_order(sweep.layers)]))
    if e2e:
        tables["recommendation"] = _validated(run, seed, budget, blocksize=tables["blocksize_sweep"])
    return Results(meta, tables, kind="sweep-blocksize")


@keeps_caller_state
def sweep_threshold(model: Any, inputs: Any = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, *,
                    layers: str | None = None, batches: int | None = None, device: str = "cpu", seed: int = 0,
                    loss: LossFn | str | None = None, name: str | None = None, model_desc: str | None = None,
                    inputs_desc: str | None = None, gemms: str | list[str] | None = None,
                    progress: ProgressFn | None = None, e2e: bool = True,
                    budget: Budget | float | str = DEFAULT_BUDGET, row_scale: str = "bnb") -> Results:
    """LLM.int8() fprop error vs outlier threshold per layer (kind "sweep-threshold", table ``threshold_sweep``).

    For each captured linear GEMM and threshold: the MatMul8bitLt forward (int8 row-wise A and W,
    columns with any |a| ≥ threshold kept in A's precision) against float64 A·Wᵀ: fprop_sqnr_db,
    frac_cols_16bit (token-weighted mean over batches of the fraction of input columns kept in
    16-bit; non-increasing in the threshold for thresholds > 0, 0 at threshold 0) and
    ``recommended`` per THRESHOLD_RULE. Same model/inputs arguments as ``analyze``. With ``e2e`` a
    ``recommendation`` row (kind "threshold") gives one threshold for the whole model, validated by
    end-to-end int8 runs within ``budget``. ``row_scale``: the LLM.int8 row absmax rule, "bnb" or "paper"
    (strategies.ROW_SCALE_RULES).
    """
    ths = _check_thresholds(thresholds)
    budget = parse_budget(budget)
    sweep = _ThresholdSweep(ths, row_scale)
    run, info = _run(model, inputs, sweep, layers=layers, batches=batches, device=device, seed=seed, loss=loss,
                     gemms=gemms, progress=progress)
    meta = _metadata("sweep-threshold", run, info, name=name, model_desc=model_desc, inputs_desc=inputs_desc,
                     seed=seed, **_threshold_meta(ths, row_scale))
    meta.update(nonfinite_meta(sweep.nonfinite()))
    tables = {"layers": _layers_table(sweep.layers), "threshold_sweep": sweep.table(),
              "coverage": run.coverage.table()}
    if e2e:
        tables["recommendation"] = _validated(run, seed, budget, threshold=tables["threshold_sweep"],
                                              row_scale=row_scale)
    return Results(meta, tables, kind="sweep-threshold")


@keeps_caller_state
def sweep_both(model: Any, inputs: Any = None, blocksizes: Sequence[int] = DEFAULT_BLOCKSIZES,
               thresholds: Sequence[float] = DEFAULT_THRESHOLDS, **kwargs: Any) -> tuple[Results, Results]:
    """Both sweeps from ONE capture pass (half the forward/backward work): (blocksize, threshold) Results.
    ``row_scale`` (keyword) as in sweep_threshold."""
    sizes, ths = _check_blocksizes(blocksizes), _check_thresholds(thresholds)
    row_scale = kwargs.pop("row_scale", "bnb")
    bsw, tsw = _BlocksizeSweep(sizes), _ThresholdSweep(ths, row_scale)
    opts = {k: kwargs.pop(k, None) for k in ("layers", "batches", "loss", "gemms", "progress")}
    device, seed = kwargs.pop("device", "cpu"), kwargs.pop("seed", 0)
    name, model_desc, inputs_desc = (kwargs.pop(k, None) for k in ("name", "model_desc", "inputs_desc"))
    e2e, budget = kwargs.pop("e2e", True), parse_budget(kwargs.pop("budget", DEFAULT_BUDGET))
    if kwargs:
        raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
    run, info = _run(model, inputs, _Both(bsw, tsw), device=device, seed=seed, **opts)
    common = {"name": name, "model_desc": model_desc, "inputs_desc": inputs_desc, "seed": seed}
    b_meta = _metadata("sweep-blocksize", run, info, **common, **_blocksize_meta(sizes))
    t_meta = _metadata("sweep-threshold", run, info, **common, **_threshold_meta(ths, row_scale))
    b_meta.update(nonfinite_meta(bsw.nonfinite()))
    t_meta.update(nonfinite_meta(tsw.nonfinite()))
    cov = run.coverage.table()
    b_tables = {"layers": _layers_table(bsw.layers), "blocksize_sweep": bsw.table(), "coverage": cov}
    t_tables = {"layers": _layers_table(tsw.layers), "threshold_sweep": tsw.table(), "coverage": cov.copy()}
    if e2e:  # one high-precision reference serves both validations
        rec = _validated(run, seed, budget, b_tables["blocksize_sweep"], t_tables["threshold_sweep"], row_scale)
        b_tables["recommendation"] = rec[rec["kind"] == "blocksize"].reset_index(drop=True)
        t_tables["recommendation"] = rec[rec["kind"] == "threshold"].reset_index(drop=True)
    return (Results(b_meta, b_tables, kind="sweep-blocksize"), Results(t_meta, t_tables, kind="sweep-threshold"))
