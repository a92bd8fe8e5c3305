"""Compare two results dicts layer by layer and apply CI gates (pure functions: no I/O, no printing)."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fp8probe.report.render import _table, cell, validate_results
from fp8probe.report.schema import metric_value, weight_shapes
from fp8probe.report.verdict import model_mode, strategies_text

# Defaults of the CI gate. 1 dB of SQNR is a 26 % rise in noise power (10^(1/10) = 1.26): more than
# run-to-run noise of a seeded capture (which is 0 dB: the pipeline is deterministic on CPU) and
# less than the ~6 dB one lost mantissa bit costs.
DEFAULT_MAX_SQNR_DROP_DB = 1.0
# A new outlier column moves a whole feature to the 16-bit path in LLM.int8(): any is worth a look.
DEFAULT_MAX_NEW_OUTLIER_COLS = 0
# Underflow increase in percentage points of the operand's non-zero elements.
DEFAULT_MAX_UNDERFLOW_INCREASE_PCT = 1.0
# New NaN/±Inf low-precision outputs where the float64 reference is finite (a GEMM's ``nonfinite``, an operand's):
# the SQNR is taken over the finite elements only, so one +Inf weight that turns a quarter of a layer's outputs NaN
# moved it by 0.15 dB and passed the SQNR gate. Any new one is a defect of the recipe on this model.
DEFAULT_MAX_NEW_NONFINITE = 0
# A GEMM whose SQNR is at least this on both sides is at float32 rounding level, not quantisation
# error: float32 accumulation against the float64 reference gives ~144 − 10·log10(K) dB (≥ 84 dB up to
# K = 10⁶), while FP8/INT8 GEMMs stay below ~60 dB. mixed / switchback leave wgrad unquantised
# (~130 dB), and a BLAS change moving that 132.2 → 130.7 dB is not a regression.
FLOAT32_NOISE_FLOOR_DB = 80.0


@dataclass(frozen=True)
class Gates:
    """Gate limits: SQNR drop (dB, ≥ 0), new outlier columns (count, ≥ 0), underflow rise (percentage points, ≥ 0),
    new non-finite low-precision outputs (count, ≥ 0)."""

    max_sqnr_drop: float = DEFAULT_MAX_SQNR_DROP_DB
    max_new_outlier_cols: int = DEFAULT_MAX_NEW_OUTLIER_COLS
    max_underflow_increase: float = DEFAULT_MAX_UNDERFLOW_INCREASE_PCT
    #: A baseline row (layer × recipe × GEMM, outlier or underflow entry) absent from the current
    #: results fails the gate unless this is set (a layer deliberately removed, a recipe dropped).
    allow_missing: bool = False
    # End-to-end gate (off when None): the current run's relative loss change (e2e table, per strategy)
    # may exceed the baseline's by at most this much (0.005 = half a percentage point of the loss).
    max_loss_increase: float | None = None
    max_new_nonfinite: int = DEFAULT_MAX_NEW_NONFINITE

    def __post_init__(self) -> None:
        if not isinstance(self.allow_missing, bool):
            raise ValueError(f"allow_missing must be True or False, got {self.allow_missing!r}")
        for name in ("max_sqnr_drop", "max_new_outlier_cols", "max_underflow_increase", "max_loss_increase",
                     "max_new_nonfinite"):
            value = getattr(self, name)
            if name == "max_loss_increase" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def _checked(row: Mapping, key: str, table: str, source: str) -> Any:
    """``row[key]`` after checking it is there and a number or null: a missing key, ``true`` or ``"12"`` where a
    metric belongs would otherwise read as "no value" and pass every gate (a truncated or edited CI artifact)."""
    if key not in row:
        raise ValueError(f"{source}: a row of table {table!r} for layer {row.get('layer')!r} has no {key}; expected "
                         "a number or null (a truncated or edited results file?)")
    value = row.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{source}: table {table!r} has {key} = {value!r} for layer {row.get('layer')!r}; "
                         "expected a number or null")
    return value


def _sqnr_entries(results: Mapping, source: str) -> dict[tuple[str, str, str], tuple[float | None, bool | None]]:
    """(layer, recipe, what) → (SQNR dB, quantised?) for every SQNR the results carry, whatever their kind.
    ``quantised`` is the gemm row's ``quantized`` flag (None in files written before it existed);
    sweep points always quantise."""
    tables = results["tables"]
    out: dict[tuple[str, str, str], tuple[float | None, bool | None]] = {}
    # metric_value decodes JSON null by the row's note (+inf exact, −inf zero signal, NaN undefined), so
    # a current SQNR that became undefined fails the gate (_delta: NaN → −inf) instead of being skipped.
    def put(key: tuple, value: tuple, table: str) -> None:
        # (a second row for one key had silently replaced the first: a regressed row followed by a good one passed)
        if key in out:
            raise ValueError(f"{source}: table {table!r} has two rows for {' '.join(map(str, key))}; expected one "
                             "(an edited or badly merged results file?)")
        out[key] = value

    for r in tables.get("gemm", []):
        _checked(r, "sqnr_db", "gemm", source)
        quantized = r.get("quantized")
        put((r["layer"], str(r["strategy"]), str(r["gemm"])), (
            metric_value(r, "sqnr_db"), quantized if isinstance(quantized, bool) else None), "gemm")
    # The weight's own quantisation SQNR: what a weights-only result (analysis/weights_only.py) shares
    # with a full analysis of the same model, so the two line up layer by layer.
    # Only real weights: a GEMM of two activations (b_is_weight false: QKᵀ, PV) calls its B "weight" too.
    activation_b = {r["layer"] for r in tables.get("layers", []) if r.get("b_is_weight") is False}
    for r in tables.get("operands", []):
        if r.get("operand") == "weight" and r["layer"] not in activation_b:
            _checked(r, "sqnr_db", "operands", source)
            put((r["layer"], str(r["strategy"]), "weight"), (metric_value(r, "sqnr_db"), True), "operands")
    for r in tables.get("blocksize_sweep", []):
        _checked(r, "sqnr_db", "blocksize_sweep", source)
        put((r["layer"], f"blockwise bs={int(_checked(r, 'blocksize', 'blocksize_sweep', source))}", str(r["target"])),
            (metric_value(r, "sqnr_db"), True), "blocksize_sweep")
    for r in tables.get("threshold_sweep", []):
        _checked(r, "fprop_sqnr_db", "threshold_sweep", source)
        threshold = float(_checked(r, "threshold", "threshold_sweep", source))
        put((r["layer"], f"int8 threshold={threshold:g}", "fprop"), (metric_value(r, "fprop_sqnr_db"), True),
            "threshold_sweep")
    return out


def _gated(base: tuple[float | None, bool | None], cur: tuple[float | None, bool | None]) -> str:
    """Why an SQNR pair is gated: "quantised", or "unquantised" / "noise floor" when it is not."""
    flags = {f for f in (base[1], cur[1]) if f is not None}
    if flags == {False}:
        return "unquantised"
    b, c = base[0], cur[0]
    if b is not None and c is not None and b >= FLOAT32_NOISE_FLOOR_DB and c >= FLOAT32_NOISE_FLOOR_DB:
        return "noise floor"
    return "quantised"


def _not_run(results: Mapping) -> set[tuple[str, str]]:
    """(layer, gemm) of the backward GEMMs the results say training does not run (metadata.frozen_layers,
    no_dgrad_layers, no_wgrad_layers)."""
    meta = results.get("metadata") or {}
    return ({(layer, "wgrad") for name in ("frozen_layers", "no_wgrad_layers") for layer in meta.get(name) or ()}
            | {(layer, "dgrad") for layer in meta.get("no_dgrad_layers") or ()})


def _missing(kind: str, base_keys: list[tuple], cur_keys: set[tuple], describe) -> list[dict]:
    """One violation per layer listing the baseline entries of ``kind`` the current results lack."""
    by_layer: dict[str, list[str]] = {}
    for key in base_keys:
        if key not in cur_keys:
            by_layer.setdefault(key[0], []).append(describe(key))
    return [{"gate": "missing", "layer": layer,
             "detail": f"{len(items)} {kind} row(s) of the baseline missing from current: "
                       + ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")}
            for layer, items in by_layer.items()]


def _delta(base: float | None, cur: float | None) -> float | None:
    """cur − base with the infinities handled: exact→exact is 0, exact→finite is −inf."""
    if base is None or cur is None or math.isnan(base):
        return None
    if math.isnan(cur):
        return -math.inf  # a NaN SQNR where there was a number is as bad as it gets
    if math.isinf(base) and math.isinf(cur) and (base > 0) == (cur > 0):
        return 0.0
    return cur - base


def _layers(results: Mapping) -> list[str]:
    return list(dict.fromkeys(r["layer"] for r in results["tables"]["layers"]))


#: Names listed per side when two results are not comparable (what_differs), before "…".
DIFFER_SHOWN = 3


def _strategies(results: Mapping) -> list[str]:
    """The strategies the results hold rows of (gemm and operands tables), in first-seen order."""
    return list(dict.fromkeys(str(r["strategy"]) for t in ("gemm", "operands")
                              for r in results["tables"].get(t, []) if isinstance(r, Mapping) and "strategy" in r))


def percentage_points(value: float) -> str:
    """``1 percentage point``, ``0.5 percentage points``: a gate's limit in words ("1 percentage points" read wrong)."""
    return f"{value:g} percentage point{'' if value == 1 else 's'}"


def what_differs(baseline: Mapping, current: Mapping) -> str:
    """What tells two results apart, for the message refusing to compare them: ``model: a vs b; strategy: global vs
    int8; 11 layer(s) only in baseline (blocks.0.fc1, …), 2 only in current (fc1, fc2), 0 in common`` ("" when
    none of model, strategies, --layers and layers differ)."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:DIFFER_SHOWN]) + (", …" if len(items) > DIFFER_SHOWN else "")

    parts = []
    mb, mc = (str(r["metadata"].get("model", "")) for r in (baseline, current))
    if mb != mc:
        parts.append(f"model: {mb or '?'} vs {mc or '?'}")
    sb, sc = _strategies(baseline), _strategies(current)
    if set(sb) != set(sc):
        parts.append(f"strategy: {','.join(sb) or 'none'} vs {','.join(sc) or 'none'}")
    rb, rc = (r["metadata"].get("layers_regex") for r in (baseline, current))
    if rb != rc:
        parts.append(f"--layers: {rb or 'all'} vs {rc or 'all'}")
    lb, lc = _layers(baseline), _layers(current)
    only_b, only_c = [x for x in lb if x not in set(lc)], [x for x in lc if x not in set(lb)]
    if only_b or only_c:
        parts.append(f"{len(only_b)} layer(s) only in baseline" + (f" ({names(only_b)})" if only_b else "")
                     + f", {len(only_c)} only in current" + (f" ({names(only_c)})" if only_c else "")
                     + f", {len(set(lb) & set(lc))} in common")
    return "; ".join(parts)


def _shape_text(shape: tuple) -> str:
    return "[" + ", ".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in shape) + "]"


#: What a GEMM row's "what" is; any other (weight, activation, grad_output) is a tensor's own quantisation SQNR.
GEMM_NAMES = frozenset({"fprop", "dgrad", "wgrad"})


def _summary(results: Mapping) -> dict:
    meta = results["metadata"]
    return {"name": str(meta.get("name", "")), "model": str(meta.get("model", "")),
            "created": str(meta.get("created", "")), "kind": results["kind"],
            "versions": ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())}


# A per-layer SQNR change under this (dB) prints as +0.00 in the tables: the chart is left out when every one is.
UNCHANGED_DB = 0.005
E2E_GATE_LAYER = "(end to end)"  # what a max-loss-increase violation names instead of a layer
SETTINGS_GATE_LAYER = "(recipe settings)"  # what a recipe-settings violation names instead of a layer
STRATEGIES_GATE_LAYER = "(strategies)"  # what a violation for baseline strategies current did not run names
#: How the FAIL headlines name the gates over the whole run, which are not layers to count (QA F8: "FAIL — 3
#: layer(s)" for fcs.2, fcs.3 and the end-to-end loss).
WHOLE_RUN_GATES = {E2E_GATE_LAYER: "the end-to-end gate", SETTINGS_GATE_LAYER: "the recipe-settings gate",
                   STRATEGIES_GATE_LAYER: "missing strategies"}


def failed_text(comparison: Mapping, name: Callable[[str], str] | None = None) -> str:
    """What failed, for the FAIL headlines: "2 layer(s) + the end-to-end gate"; with ``name`` (how to print a layer
    name) the layers are listed too: "2 layer(s) (fcs.2, fcs.3) + the end-to-end gate"."""
    failed = comparison["failed_layers"]
    layers = [x for x in failed if x not in WHOLE_RUN_GATES]
    listed = f" ({', '.join(name(x) for x in layers)})" if name else ""
    return " + ".join([*([f"{len(layers)} layer(s){listed}"] if layers else []),
                       *(WHOLE_RUN_GATES[x] for x in failed if x in WHOLE_RUN_GATES)])


def _e2e_gate(baseline: Mapping, current: Mapping, gates: Gates, violations: list[dict]) -> list[dict]:
    """Rows (strategy, baseline, current, delta, failed) of the end-to-end relative loss change; with the
    gate on, a growth of |loss change| above ``max_loss_increase``, a strategy or number missing from current, or a baseline
    without end-to-end results is a violation."""
    base = {r.get("strategy"): _num(r.get("loss_rel_change")) for r in baseline["tables"].get("e2e", [])}
    cur = {r.get("strategy"): _num(r.get("loss_rel_change")) for r in current["tables"].get("e2e", [])}
    limit = gates.max_loss_increase
    if limit is not None and not base:
        violations.append({"gate": "max-loss-increase", "layer": E2E_GATE_LAYER,
                           "detail": "the baseline has no end-to-end results (run analyze without --no-e2e)"})
    rows = []
    for strat, b in base.items():
        c = cur.get(strat)
        d = None if b is None or c is None or math.isnan(b) or math.isnan(c) else c - b
        # The size of the change is gated, as the loss budget reads it: a loss that falls further moved the model's
        # output as much as one that rises (and a surrogate loss's sign says nothing): -5.8 % → -15.4 % had passed.
        grew = None if d is None else abs(c) - abs(b)
        failed = limit is not None and b is not None and (grew is None or grew > limit)
        rows.append({"strategy": strat, "baseline": b, "current": c, "delta": d, "failed": failed})
        if failed:
            what = (f"{strat}: no end-to-end loss change in current" if grew is None else
                    f"{strat} loss change {100 * b:+.3f} % → {100 * c:+.3f} % (its size grew {100 * grew:.3f} points "
                    f"> {100 * limit:g})")
            violations.append({"gate": "max-loss-increase", "layer": E2E_GATE_LAYER, "detail": what})
    return rows


#: Strategies whose numbers depend on --threshold (LLM.int8's outlier decomposition; "llm-int8": older files).
_THRESHOLD_RECIPES = frozenset({"int8", "llm-int8"})


def _settings_differ(baseline: Mapping, current: Mapping) -> list[str]:
    """The recipe settings (metadata.threshold, LLM.int8's outlier threshold; metadata.recipe_options: LLM.int8 row
    scale, simulated accumulation, delayed scaling) that differ between the runs: then the same strategy names measure different recipes.
    Results written before the settings were recorded have none and are taken as the defaults."""
    b = baseline.get("metadata", {}).get("recipe_options") or {}
    c = current.get("metadata", {}).get("recipe_options") or {}
    differ = []
    # LLM.int8's outlier threshold (--threshold): int8 at 0.5 and int8 at 6 are different recipes too
    tb, tc = (_num(r.get("metadata", {}).get("threshold")) for r in (baseline, current))
    int8 = all(set(r.get("metadata", {}).get("strategies") or ()) & _THRESHOLD_RECIPES for r in (baseline, current))
    if int8 and tb is not None and tc is not None and tb != tc:
        differ.append(f"threshold {tb:g} → {tc:g}")
    # the model's mode (--train-mode): dropout and BatchNorm's statistics change every activation after them
    mb, mc = (model_mode(r.get("metadata", {})) for r in (baseline, current))
    if mb is not None and mc is not None and mb != mc:
        differ.append(f"model mode {mb} → {mc}")
    if not b or not c:
        return differ
    return differ + [f"{k} {json.dumps(b.get(k), sort_keys=True)} → {json.dumps(c.get(k), sort_keys=True)}"
                     for k in sorted(set(b) | set(c)) if b.get(k) != c.get(k)]


def _how_to_run(gone: list) -> str:
    """The options that run the missing entries: recipes come from --strategy, sweep points from the sweeps."""
    names = [str(x) for x in gone]
    how = []
    if any(not x.startswith(("blockwise bs=", "int8 threshold=")) for x in names):
        how.append("--strategy")
    if any(x.startswith("blockwise bs=") for x in names):
        how.append("analyze --sweeps or sweep-blocksize --blocksizes")
    if any(x.startswith("int8 threshold=") for x in names):
        how.append("analyze --sweeps or sweep-threshold --thresholds")
    return "; ".join(dict.fromkeys(how))


def _a(kind: object) -> str:
    """``kind`` quoted after its article: "an 'analyze'", "a 'sweep-threshold'"."""
    text = repr(kind)
    return f"{'an' if str(kind)[:1].lower() in 'aeiou' and str(kind)[:1] else 'a'} {text}"


def compare_results(baseline: Mapping, current: Mapping, gates: Gates | None = None) -> dict:
    """Per-layer deltas of SQNR, outlier columns and underflow between two results dicts, and gate verdicts.

    Returns a dict: ``gates``; ``sqnr`` rows (layer, recipe, what, baseline, current, delta_db, failed);
    ``outliers`` rows (layer, threshold, baseline, current, new_cols, failed); ``underflow`` rows
    (layer, strategy, operand, baseline_pct, current_pct, delta_pct, failed); ``added_layers`` and
    ``removed_layers``; ``violations`` (gate, layer, detail); ``failed_layers``; ``passed``.
    Raises ValueError when either input is not a results dict or the kinds differ.
    """
    gates = gates or Gates()
    validate_results(baseline, "baseline")
    validate_results(current, "current")
    if baseline["kind"] != current["kind"]:
        raise ValueError(f"cannot compare {_a(baseline['kind'])} result with {_a(current['kind'])} result: compare "
                         "the results of one command (analyze with analyze, a sweep with the same sweep)")
    base_l, cur_l = _layers(baseline), _layers(current)
    if not base_l:
        raise ValueError("baseline: the layers table is empty, so there is nothing to compare against")
    common = set(base_l) & set(cur_l)
    if not common:
        raise ValueError(f"baseline and current have no layer in common ({what_differs(baseline, current)}): are "
                         "they results of the same model?")
    if 2 * len(common) < min(len(set(base_l)), len(set(cur_l))):
        # (two models that share a layer name or two: a Llama and a GPT-2 both have an lm_head, and 54 "missing"
        # rows failed the gate as if the model had regressed; a --layers subset of the other run is all in common)
        raise ValueError(f"baseline and current share only {len(common)} of their {len(set(base_l))} and "
                         f"{len(set(cur_l))} layers ({what_differs(baseline, current)}): are they results of the same "
                         "model? Refresh the baseline if the model changed")
    base_strategies, cur_strategies = _strategies(baseline), _strategies(current)
    if base_strategies and cur_strategies and not set(base_strategies) & set(cur_strategies):
        raise ValueError(f"baseline and current share no strategy, so no recipe's numbers can be compared "
                         f"({what_differs(baseline, current)}): run current with the baseline's --strategy "
                         f"{','.join(base_strategies)}")
    # A layer of the same name whose weight changed shape is another GEMM (a wider model, another model that
    # shares its layer names): its numbers are not compared, and it is a violation unless --allow-missing.
    shapes_b, shapes_c = (weight_shapes(r["tables"]["layers"]) for r in (baseline, current))
    reshaped = {layer: (shapes_b[layer], shapes_c[layer]) for layer in base_l
                if layer in shapes_b and layer in shapes_c and shapes_b[layer] != shapes_c[layer]}
    if reshaped and len(reshaped) == len(set(base_l) & set(cur_l)):
        first, (b, c) = next(iter(reshaped.items()))
        differs = what_differs(baseline, current)
        raise ValueError(f"every layer the runs share has another weight shape in current ({first}: "
                         f"{_shape_text(b)} → {_shape_text(c)}{'; ' + differs if differs else ''}): are they results "
                         "of the same model?")
    violations: list[dict] = []
    for layer, (b, c) in reshaped.items():
        if not gates.allow_missing:
            violations.append({"gate": "layer-shape", "layer": layer,
                               "detail": f"weight {_shape_text(b)} → {_shape_text(c)}: another GEMM, not compared; "
                                         "refresh the baseline if the model changed (or pass --allow-missing)"})
    settings = _settings_differ(baseline, current)
    if settings:  # a gate over two different recipes would pass or fail for the wrong reason
        violations.append({"gate": "recipe-settings", "layer": SETTINGS_GATE_LAYER,
                           "detail": "the runs used different recipe or model settings (" + "; ".join(settings)
                                     + "): the same strategy names measure different things; re-run with the "
                                     "baseline's settings or refresh the baseline"})

    base_s, cur_s = _sqnr_entries(baseline, "baseline"), _sqnr_entries(current, "current")
    # A baseline row of a GEMM current says training does not run (written before fp8probe knew: a frozen weight's
    # wgrad, the input data's dgrad) is not missing from current: there is nothing to measure.
    not_run = _not_run(current)
    base_s = {k: v for k, v in base_s.items() if k[0] not in reshaped and (k[0], k[2]) not in not_run}
    sqnr_rows = []
    gated_counts = {"quantised": 0, "unquantised": 0, "noise floor": 0}
    gated_tensors = 0
    for key in [k for k in base_s if k in cur_s]:
        (b, _), (c, _) = base_s[key], cur_s[key]
        d = _delta(b, c)
        why = _gated(base_s[key], cur_s[key])
        gated_counts[why] += 1
        gated_tensors += why == "quantised" and key[2] not in GEMM_NAMES
        failed = why == "quantised" and d is not None and d < -gates.max_sqnr_drop
        sqnr_rows.append({"layer": key[0], "recipe": key[1], "what": key[2], "baseline": b,
                          "current": c, "delta_db": d, "gated": why == "quantised", "failed": failed})
        if failed:
            now = (f"{c:.2f} dB (drop {-d:.2f} dB > {gates.max_sqnr_drop:g} dB)" if c is not None and math.isfinite(c)
                   else "undefined (no finite result: the recipe's output is NaN/Inf or empty)"
                   if c is None or math.isnan(c) else "−∞ dB (zero signal)")
            violations.append({"gate": "max-sqnr-drop", "layer": key[0],
                               "detail": f"{key[1]} {key[2]} SQNR {_f(b)} dB → {now}"})

    def outl(res: Mapping, source: str) -> dict:
        rows = res["tables"].get("outliers", [])
        for r in rows:
            n = _checked(r, "n_outlier_cols", "outliers", source)
            if n is not None and n < 0:
                raise ValueError(f"{source}: table 'outliers' has n_outlier_cols = {n!r} for layer {r.get('layer')!r}; "
                                 "expected a count >= 0")
        return {(r["layer"], _num(_checked(r, "threshold", "outliers", source))): r for r in rows}

    base_o, cur_o = outl(baseline, "baseline"), outl(current, "current")
    base_o = {k: v for k, v in base_o.items() if k[0] not in reshaped}
    outlier_rows = []
    for key in [k for k in base_o if k in cur_o]:
        b, c = _num(base_o[key].get("n_outlier_cols")), _num(cur_o[key].get("n_outlier_cols"))
        new = None if b is None or c is None else c - b
        failed = new is not None and new > gates.max_new_outlier_cols
        outlier_rows.append({"layer": key[0], "threshold": key[1], "baseline": b, "current": c,
                             "new_cols": new, "failed": failed})
        if failed:
            violations.append({"gate": "max-new-outlier-cols", "layer": key[0],
                               "detail": f"outlier columns at threshold {key[1]:g}: {b:.0f} → {c:.0f} "
                                         f"(+{new:.0f} > {gates.max_new_outlier_cols:g})"})

    def under(res: Mapping, source: str) -> dict:
        return {(r["layer"], r["strategy"], r["operand"]): _num(_checked(r, "underflow_frac", "operands", source))
                for r in res["tables"].get("operands", [])}

    base_u, cur_u = under(baseline, "baseline"), under(current, "current")
    base_u = {k: v for k, v in base_u.items() if k[0] not in reshaped}
    under_rows = []
    for key in [k for k in base_u if k in cur_u]:
        b, c = base_u[key], cur_u[key]
        d = None if b is None or c is None or math.isnan(b) or math.isnan(c) else 100.0 * (c - b)
        failed = d is not None and d > gates.max_underflow_increase
        under_rows.append({"layer": key[0], "strategy": key[1], "operand": key[2],
                           "baseline_pct": None if b is None else 100 * b,
                           "current_pct": None if c is None else 100 * c, "delta_pct": d, "failed": failed})
        if failed:
            violations.append({"gate": "max-underflow-increase", "layer": key[0],
                               "detail": f"{key[1]} {key[2]} underflow {100 * b:.2f} % → {100 * c:.2f} % "
                                         f"(+{d:.2f} points > {gates.max_underflow_increase:g})"})

    def nonfinite(res: Mapping, source: str) -> dict:
        """(layer, recipe, GEMM or operand) → (non-finite low-precision outputs where the reference is finite,
        elements compared); rows written before the count existed are left out."""
        out = {}
        for table, what in (("gemm", "gemm"), ("operands", "operand")):
            for r in res["tables"].get(table, []):
                if "nonfinite" in r:
                    n = _num(_checked(r, "nonfinite", table, source))
                    if n is not None:
                        out[(r["layer"], str(r["strategy"]), f"{r[what]}" if table == "gemm" else f"{r[what]} operand")] = (
                            n, _num(r.get("compared")))
        return out

    base_n, cur_n = nonfinite(baseline, "baseline"), nonfinite(current, "current")
    nonfinite_rows = []
    for key in [k for k in cur_n if k[0] not in reshaped and k in base_n]:
        (b, _), (c, compared) = base_n[key], cur_n[key]
        new = c - b
        failed = new > gates.max_new_nonfinite
        if b or c:
            nonfinite_rows.append({"layer": key[0], "recipe": key[1], "what": key[2], "baseline": b, "current": c,
                                   "new": new, "failed": failed})
        if failed:
            of = f" of {c + compared:.0f}" if compared is not None else ""
            what = ("quantised values NaN/Inf where the input is finite" if key[2].endswith(" operand")
                    else "low-precision outputs NaN/Inf where the float64 reference is finite")
            violations.append({"gate": "max-new-nonfinite", "layer": key[0],
                               "detail": f"{key[1]} {key[2]}: {c:.0f}{of} {what} (baseline {b:.0f}; +{new:.0f} > "
                                         f"{gates.max_new_nonfinite:g}); the SQNR counts only the finite ones"})

    # A strategy of the baseline that current did not run at all is one violation, not one per layer and table (QA: a
    # re-run of 3 of 15 strategies read "74 gate violation(s): 37 layer(s)", each listing the same rows)
    ran = {k[1] for k in [*cur_s, *cur_u]}
    gone = [s for s in dict.fromkeys(k[1] for k in [*base_s, *base_u]) if s not in ran]
    missing = (_missing("SQNR", [k for k in base_s if k[1] not in gone], set(cur_s), lambda k: f"{k[1]} {k[2]}")
               + _missing("outlier", list(base_o), set(cur_o), lambda k: f"threshold {k[1]:g}" if k[1] is not None else "outliers")
               + _missing("underflow", [k for k in base_u if k[1] not in gone], set(cur_u), lambda k: f"{k[1]} {k[2]}"))
    if gone:
        missing.insert(0, {"gate": "missing", "layer": STRATEGIES_GATE_LAYER,
                           "detail": f"{strategies_text(len(gone))} of the baseline not run in current: "
                                     f"{', '.join(map(str, gone))}: run them ({_how_to_run(gone)}) or pass "
                                     "--allow-missing"})
    if not gates.allow_missing:
        violations += missing
    e2e_rows = _e2e_gate(baseline, current, gates, violations)
    if not (sqnr_rows or outlier_rows or under_rows or e2e_rows or nonfinite_rows) and (gates.allow_missing or not missing):
        differs = what_differs(baseline, current)
        raise ValueError("baseline and current share no comparable entry (no SQNR, outlier or underflow row in "
                         f"both{': ' + differs if differs else ''}): nothing would be gated")
    failed_layers = list(dict.fromkeys(v["layer"] for v in violations))
    return {
        "baseline": _summary(baseline), "current": _summary(current), "gates": asdict(gates),
        "gated": {"quantised": gated_counts["quantised"], "quantised_tensors": gated_tensors,
                  "unquantised": gated_counts["unquantised"],
                  "noise_floor": gated_counts["noise floor"], "noise_floor_db": FLOAT32_NOISE_FLOOR_DB,
                  "missing": [m["detail"].split(":", 1)[0] + f" ({m['layer']})" for m in missing],
                  "missing_layers": list(dict.fromkeys(m["layer"] for m in missing
                                                       if m["layer"] != STRATEGIES_GATE_LAYER)),
                  "missing_strategies": gone,
                  "reshaped": {layer: f"{_shape_text(b)} → {_shape_text(c)}" for layer, (b, c) in reshaped.items()}},
        "sqnr": sqnr_rows, "outliers": outlier_rows, "underflow": under_rows, "e2e": e2e_rows,
        "nonfinite": nonfinite_rows,
        "added_layers": [x for x in cur_l if x not in set(base_l)],
        "removed_layers": [x for x in base_l if x not in set(cur_l)],
        "violations": violations, "failed_layers": failed_layers, "passed": not violations,
    }


def _md_code(text: object, in_table: bool = True) -> str:
    """User data (layer names, run names, recipes) as a Markdown code span: inside one, CommonMark
    treats ``<script>``, ``[x](javascript:..)``, ``*`` and bare URLs as literal text, so a name can
    neither inject HTML nor a link. A backtick would close the span, so it becomes ``'``; line breaks
    become spaces; in a table cell ``|`` is escaped (GFM reads ``\\|`` as a literal pipe even in code)."""
    body = " ".join(str(text).replace("`", "'").split())
    if in_table:
        body = body.replace("|", "\\|")
    return f"`{body}`" if body else "–"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "–"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return fmt.format(x)


def compare_markdown(comparison: Mapping, max_rows: int = 20) -> str:
    """A Markdown summary (for a CI job summary): verdict, gates, violations, the largest SQNR drops."""
    g = comparison["gates"]
    verdict = "✅ **PASS**" if comparison["passed"] else f"❌ **FAIL** — {failed_text(comparison)}"
    lines = [f"## fp8probe compare: {verdict}", "",
             f"Baseline {_md_code(comparison['baseline']['name'], False)} ({_md_code(comparison['baseline']['created'], False)}) → "
             f"current {_md_code(comparison['current']['name'], False)} ({_md_code(comparison['current']['created'], False)}).", "",
             f"Gates: SQNR drop ≤ {g['max_sqnr_drop']:g} dB, new outlier columns ≤ {g['max_new_outlier_cols']:g}, "
             f"underflow increase ≤ {percentage_points(g['max_underflow_increase'])}, "
             f"new NaN/Inf outputs ≤ {g.get('max_new_nonfinite', DEFAULT_MAX_NEW_NONFINITE):g}"
             + (f", end-to-end |loss change| increase ≤ {percentage_points(100 * g['max_loss_increase'])}."
                if g.get("max_loss_increase") is not None else "."), "",
             gated_text(comparison), ""]
    violations = comparison["violations"]
    if violations:
        shown = _each_gate(violations, max_rows)
        by_gate = {g: sum(v["gate"] == g for v in violations) for g in dict.fromkeys(v["gate"] for v in violations)}
        if len(shown) < len(violations):
            # (the first rows in layer order had been all one gate: 111 underflow violations went unseen)
            lines += ["Violations per gate: " + ", ".join(f"{g} {n}" for g, n in by_gate.items())
                      + f"; the first of each gate below ({len(shown)} of {len(violations)}).", ""]
        lines += ["| gate | layer | detail |", "|---|---|---|"]
        lines += [f"| {v['gate']} | {_md_code(v['layer'])} | {_md_code(v['detail'])} |" for v in shown]
        if len(violations) > len(shown):
            lines.append(f"| … | | {len(violations) - len(shown)} more |")
        lines.append("")
    drops = sorted((r for r in comparison["sqnr"] if r["delta_db"] is not None and r["delta_db"] < 0),
                   key=lambda r: r["delta_db"])
    if not drops:
        lines += ["No SQNR decreased.", ""]
    else:
        lines += ["Largest SQNR changes:", "", "| layer | recipe | GEMM / tensor | baseline dB | current dB | Δ dB |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {_md_code(r['layer'])} | {_md_code(r['recipe'])} | {_md_code(r['what'])} | "
                  f"{_f(r['baseline'])} | {_f(r['current'])} | {_f(r['delta_db'])} |" for r in drops[:min(max_rows, 10)]]
        lines.append("")
    for key, label in (("added_layers", "Layers only in current"), ("removed_layers", "Layers only in baseline")):
        if comparison[key]:
            lines.append(f"{label}: " + ", ".join(_md_code(x, False) for x in comparison[key]))
            lines.append("")
    return "\n".join(lines)


def _each_gate(violations: list[dict], max_rows: int) -> list[dict]:
    """At most ``max_rows`` violations (at least one of each gate), taken in turn from each gate's list and kept
    grouped by gate in their order of appearance."""
    groups: dict[str, list[dict]] = {}
    for v in violations:
        groups.setdefault(v["gate"], []).append(v)
    taken = {g: 0 for g in groups}
    left = max(max_rows, len(groups))
    while left > 0 and any(taken[g] < len(rows) for g, rows in groups.items()):
        for g, rows in groups.items():
            if left > 0 and taken[g] < len(rows):
                taken[g] += 1
                left -= 1
    return [v for g, rows in groups.items() for v in rows[:taken[g]]]


def gated_text(comparison: Mapping) -> str:
    """One sentence saying which GEMMs the SQNR gate applied to and which it left out, and why."""
    g = comparison.get("gated") or {}
    tensors = g.get("quantised_tensors", 0)  # (weight / operand SQNRs; absent from comparisons made before it)
    gemms = g.get("quantised", 0) - tensors
    applied = " and ".join(x for x in (f"{gemms} quantised GEMM(s)" if gemms or not tensors else "",
                                       f"{tensors} quantised tensor(s) (weight / operand SQNR)" if tensors else "") if x)
    text = (f"SQNR gate applied to {applied}; not gated: {g.get('unquantised', 0)} "
            f"the recipe leaves unquantised (e.g. mixed / switchback wgrad) and {g.get('noise_floor', 0)} at the float32 "
            f"noise floor (≥ {g.get('noise_floor_db', FLOAT32_NOISE_FLOOR_DB):g} dB in both).")
    reshaped = g.get("reshaped") or {}
    if reshaped:
        text += (f" Not compared: {len(reshaped)} layer(s) whose weight changed shape ("
                 + ", ".join(f"{k} {v}" for k, v in list(reshaped.items())[:4]) + (", ..." if len(reshaped) > 4 else "")
                 + ").")
    if comparison.get("gates", {}).get("allow_missing") and g.get("missing"):
        # (g["missing"] has one entry per layer and table; files written before missing_layers count those)
        layers = [str(x) for x in g.get("missing_layers", g["missing"])]
        gone = [str(x) for x in g.get("missing_strategies", [])]
        if gone:
            text += (f" Not run in current (allowed by --allow-missing): {strategies_text(len(gone))} of the "
                     f"baseline ({', '.join(gone)}).")
        if layers:
            text += (f" Missing from current (allowed by --allow-missing): baseline rows of {len(layers)} layer(s) ("
                     + ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "") + ").")
    return text


def build_compare_view(comparison: Mapping) -> dict:
    """View model for templates/compare.html.j2."""
    from fp8probe.report import figures

    g = comparison["gates"]
    drop = g["max_sqnr_drop"]
    sq = comparison["sqnr"]
    fig = None
    # The bar chart shows each layer's worst change over all recipes / GEMMs.
    worst: dict[str, float] = {}
    for r in sq:
        if r["delta_db"] is not None:
            worst[r["layer"]] = min(worst.get(r["layer"], math.inf), r["delta_db"])
    # a chart of bars that are all zero says nothing (QA: a full screen of 37 labels and no bars): a line instead
    unchanged = bool(worst) and all(abs(d) < UNCHANGED_DB for d in worst.values())
    if worst and not unchanged:
        fig = figures.figure_to_data_uri(figures.delta_bars(list(worst), list(worst.values()), drop))

    def flag(failed: bool) -> str:
        return "bad" if failed else ""

    return {
        "title": f"fp8probe compare: {comparison['baseline']['name']} → {comparison['current']['name']}",
        "passed": comparison["passed"], "baseline": comparison["baseline"], "current": comparison["current"],
        "gates": {k: "off" if v is None else f"{v:g}" for k, v in g.items()},
        "underflow_gate": percentage_points(g["max_underflow_increase"]),
        "violations": comparison["violations"], "failed_layers": comparison["failed_layers"],
        "failed": failed_text(comparison, str),
        "added_layers": comparison["added_layers"], "removed_layers": comparison["removed_layers"],
        "figure": fig, "unchanged": unchanged, "unchanged_db": f"{UNCHANGED_DB:g}", "n_worst": len(worst),
        "sqnr": _table("cmp-sqnr", ["layer", "recipe", "GEMM / tensor", "baseline dB", "current dB", "Δ dB"], [
            [cell(r["layer"]), cell(r["recipe"]), cell(r["what"]), cell(r["baseline"], "{:.2f}"),
             cell(r["current"], "{:.2f}"), cell(r["delta_db"], "{:+.2f}", flag(r["failed"]))] for r in sq]),
        "outliers": _table("cmp-outliers", ["layer", "threshold", "baseline cols", "current cols", "new"], [
            [cell(r["layer"]), cell(r["threshold"], "{:g}"), cell(r["baseline"], "{:.0f}"),
             cell(r["current"], "{:.0f}"), cell(r["new_cols"], "{:+.0f}", flag(r["failed"]))]
            for r in comparison["outliers"]]),
        "underflow": _table("cmp-underflow", ["layer", "strategy", "operand", "baseline %", "current %", "Δ points"], [
            [cell(r["layer"]), cell(r["strategy"]), cell(r["operand"]), cell(r["baseline_pct"], "{:.3f}"),
             cell(r["current_pct"], "{:.3f}"), cell(r["delta_pct"], "{:+.3f}", flag(r["failed"]))]
            for r in comparison["underflow"]]),
        "nonfinite": _table("cmp-nonfinite", ["layer", "recipe", "GEMM / operand", "baseline NaN/Inf", "current NaN/Inf",
                                              "new"], [
            [cell(r["layer"]), cell(r["recipe"]), cell(r["what"]), cell(r["baseline"], "{:.0f}"),
             cell(r["current"], "{:.0f}"), cell(r["new"], "{:+.0f}", flag(r["failed"]))]
            for r in comparison.get("nonfinite", [])]),
    }
