"""Render a results JSON (docs/architecture.md schema) into one self-contained HTML report: view model → jinja2."""
from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from fp8probe.report import figures
from fp8probe.report.files import atomic_write_text
from fp8probe.report.schema import NOTE_EXACT, NOTE_NO_FINITE_REFERENCE, NOTE_ZERO_SIGNAL, metric_value, parse_results_json, validate_results
from fp8probe.report.verdict import (KEEP_16BIT_DB, KL_FAR_RATIO, LOW_GAIN_LP_SHARE, budget_text, build_verdict,
                                     coverage_line, frozen_text, gemm_sites_text, inputs_text, isolated_headline, keep_list,
                                     keep_set_searched, kl_far_ratio, little_gain, little_gain_text, low_output_sqnr,
                                     low_output_sqnr_text, lp_share_text, not_searched_why, pct, signed_pct, split_notes,
                                     model_mode, not_run_text, strategies_text, untrained_batchnorm_text,
                                     verdict_lines)

TENSORS = ("activation", "weight", "grad_output")
# What the report calls the tensor "weight" of a GEMM of two activations (attention QKᵀ / PV, matmuls: K, V, a
# matmul's right operand) where it pools them (block-scale summary, the range figure's column title).
SECOND_ACTIVATION = "2nd activation"
GEMMS = ("fprop", "dgrad", "wgrad")
# The heat map's GEMM selector labels (one GEMM's columns at a time).
GEMM_LABELS = {"fprop": "fprop (forward, Y = A·Wᵀ)", "dgrad": "dgrad (input gradient, dA = G·W)",
               "wgrad": "wgrad (weight gradient, dW = Gᵀ·A)"}
# Rows in the "worst layers" summary table.
WORST_LAYERS = 8
# Heat-map colour bins: 5 dB wide, four below the isolated SQNR threshold (--keep-16bit-db) and five from it upwards
# (CSS classes h0 … h8), so the line falls between h3 and h4 whatever --keep-16bit-db is.
HEAT_STEP_DB = 5.0
HEAT_BINS_BELOW = 4
HEAT_BINS = 9
# Isolated GEMMs of a recipe that quantises nothing sit at float32 rounding (~140 dB against the
# float64 reference); results written before the `quantized` column existed are told apart by this:
# no 8-bit recipe comes near 100 dB (int8 on well-behaved data: ~40 dB).
UNQUANTISED_DB = 100.0
# Outlier grid: at most this many feature dimensions (the ones flagged in the most layers) as columns.
MAX_OUTLIER_DIMS = 16
# Per-strategy detail tables longer than this start collapsed.
OPEN_DETAILS_ROWS = 20
# The end-to-end share's column (Verdict, Recommendation): of each GEMM's forward FLOPs, as the runs compare forward
# outputs; "low-precision FLOPs" read as every GEMM of a training step for switchback, whose dgrad / wgrad are n/q
# (QA A3).
LP_FLOPS_HEADER = "low-precision forward FLOPs"
# The range figure has one ridgeline row per layer (0.42 in each); beyond this many layers only the worst
# ones (lowest fprop SQNR) are drawn, and the report says so. (12 while each row was 3 separate Axes.)
MAX_HIST_LAYERS = 24
# Which format window is drawn on which tensor's histogram when the run's recipe is not in RECIPE_WINDOWS
# (older names): the first format present in metadata.formats wins. Activations/weights use E4M3-like
# formats, gradients E5M2-like (SPEC §7.2).
WINDOW_PREFERENCE = {
    "activation": ("bnb-e4m3", "e4m3", "mxfp8-e4m3", "int8", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4"),
    "weight": ("bnb-e4m3", "e4m3", "mxfp8-e4m3", "int8", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4"),
    "grad_output": ("bnb-e5m2", "e5m2", "mxfp8-e5m2", "mxfp6-e3m2", "mxfp6-e2m3", "mxfp4-e2m1", "nvfp4"),
}
# What one scale of a recipe covers, said after "<recipe> scales …" in the dynamic-range caption. The band
# is drawn where one scale from the tensor's own amax puts it; a finer scale gives every row / block its
# own window ending at its own (smaller or equal) amax, so there the band is the worst case.
_PER_TENSOR = "each tensor by its own amax"
_PER_ROW = "each row along the contraction dim by its own amax"
# The format of each operand (None: not quantised) and the scale scope of every built-in recipe: results
# carry only the union of the run's formats (metadata.formats), and report/ may not import analysis/
# (tests/report/test_range_windows.py checks this table against analysis.strategies.STRATEGIES).
_PER_MX32 = "each block of 32 by a power of two near its amax"
_PER_NV16 = "each block of 16 (weight: 16x16) by its own amax"


def _formats(forward: str, backward: str | None) -> dict[str, str | None]:
    """The operand formats of a recipe: ``forward`` on the activation and the weight, ``backward`` on the output
    gradient (None: not quantised)."""
    return {"activation": forward, "weight": forward, "grad_output": backward}


RECIPE_WINDOWS: dict[str, tuple[dict[str, str | None], str]] = {
    "global": (_formats("bnb-e4m3", "bnb-e5m2"), _PER_TENSOR),
    "mixed": (_formats("bnb-e4m3", "bnb-e5m2"), "the activation and the output gradient in blocks, each block by its "
              "own absmax (the weight: one absmax per tensor)"),
    "int8": (_formats("int8", "int8"), "each row (output gradient in wgrad: each column) by its own absmax, outlier "
             "columns of the activation kept in 16-bit"),
    "switchback": (_formats("int8", None), _PER_ROW),
    "ocp-tensorwise": (_formats("e4m3", "e5m2"), _PER_TENSOR),
    "ocp-rowwise": (_formats("e4m3", "e5m2"), _PER_ROW),
    "ocp-blockwise": (_formats("e4m3", "e5m2"), "each 1x128 tile (weight: 128x128 block) by its own amax"),
    "mxfp8": (_formats("mxfp8-e4m3", "mxfp8-e5m2"), _PER_MX32),
    "mxfp8-rceil": (_formats("mxfp8-e4m3", "mxfp8-e5m2"), _PER_MX32),
    "delayed": (_formats("e4m3", "e5m2"), "each tensor by the amax history of earlier batches, not by its own amax: a "
                "larger history amax moves the band left (more underflow), a smaller one right (saturation)"),
    "nvfp4": (_formats("nvfp4", "nvfp4"), _PER_NV16),
    "nvfp4-train": (_formats("nvfp4", "nvfp4"), _PER_NV16),
    "mxfp4": (_formats("mxfp4-e2m1", "mxfp4-e2m1"), _PER_MX32),
    "mxfp6-e2m3": (_formats("mxfp6-e2m3", "mxfp6-e2m3"), _PER_MX32),
    "mxfp6-e3m2": (_formats("mxfp6-e3m2", "mxfp6-e3m2"), _PER_MX32),
}


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------
def load_results(path: str | Path) -> dict:
    """Read and validate a results JSON file; raise ValueError (one line) when it is not one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    try:
        data = parse_results_json(text, str(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); expected an fp8probe results file") from None
    validate_results(data, source=str(path))
    return data


# ----------------------------------------------------------------------------------------------
# Cell / table helpers (the view model is plain dicts and lists; the template does all markup)
# ----------------------------------------------------------------------------------------------
def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def cell(value: Any, fmt: str | Callable[[float], str] = "{:.2f}", cls: str = "") -> dict:
    """A table cell: display text, numeric sort key (None for text) and a CSS class. ``fmt``: a format string or a
    function of the number (``_sig``, ``_ratio``)."""
    if value is None:
        return {"text": "–", "sort": None, "cls": cls}
    if isinstance(value, bool):
        return {"text": "yes" if value else "", "sort": int(value), "cls": cls}
    if _isnum(value):
        v = float(value)
        if math.isnan(v):
            return {"text": "NaN", "sort": None, "cls": cls or "warn"}
        if math.isinf(v):
            return {"text": "∞" if v > 0 else "−∞", "sort": 1e308 if v > 0 else -1e308, "cls": cls}
        text = fmt(v) if callable(fmt) else fmt.format(v)
        return {"text": text, "sort": _sort_key(text, v), "cls": cls}
    # (a text cell stays "txt" beside another class: "34 of 37" in red sat right of a plain "0 of 37", QA D2)
    return {"text": str(value), "sort": None, "cls": f"{cls} txt" if cls and "txt" not in cls.split() else cls or "txt"}


def _sort_key(text: str, v: float) -> float | None:
    """The data-sort value, or None when the sorter can read the shown number itself (JS Number(text)):
    a 211-layer report has ~40 000 cells, and a 17-digit key on each is a third of its size."""
    try:
        if math.isfinite(float(text)):
            return None
    except ValueError:
        pass
    return float(f"{v:.6g}")


def _sqnr_cell(value: Any, limit: float) -> dict:
    if _isnum(value) and math.isnan(value):  # (an isolated summary's worst layer with no finite reference)
        return {"text": "undefined", "sort": -1e308, "cls": "bad txt", "title": NOTE_NO_FINITE_REFERENCE}
    cls = "bad" if _isnum(value) and value < limit else ""
    return cell(value, "{:.1f}", cls)


#: Top-1 agreement below this is marked red in the end-to-end table: more than one row in ten predicts another class.
#: FP8 recipes keep 94-99 % on the demo, FP4 ones 76-80 %; a random-init LM's loss barely moves while its FP4 runs
#: agree on 30 % of tokens, and the row read green "within budget" with nothing red but the output SQNR (QA).
TOP1_WARN = 0.9


def _top1_cell(value: Any) -> dict:
    return {**_share(value), "cls": "bad" if value < TOP1_WARN else ""} if _isnum(value) else cell(value)


# How a metric the JSON holds as null is shown, by the row's note (report/schema.py NOTE_*).
_NOTE_TEXT = {NOTE_EXACT: "exact", NOTE_ZERO_SIGNAL: "−∞"}


def _metric_cell(row: Mapping | None, key: str, fmt: str, limit: float | None = None) -> dict:
    """A gemm/operands metric cell: numbers as usual; nulls decoded by the row's note ("exact", "−∞", "undefined")."""
    if not row or key not in row:
        return cell(None)
    value = metric_value(row, key)
    if row.get(key) is not None or value is None:
        return _sqnr_cell(value, limit) if limit is not None else cell(value, fmt)
    note = row.get("note")
    if math.isnan(value):
        return {"text": "undefined", "sort": None, "cls": "warn"}
    if key.endswith("sqnr_db"):  # (gemm / operands sqnr_db, the threshold sweep's fprop_sqnr_db)
        text = _NOTE_TEXT.get(note) or ("∞" if value > 0 else "−∞")
    elif math.isfinite(value):
        text = fmt.format(value)  # rel_err 0 of an exact result
    else:
        text = "∞" if value > 0 else "−∞"
    bad = limit is not None and value < limit
    return {"text": text, "sort": 1e308 if value > 0 else -1e308 if value < 0 else 0.0, "cls": "bad" if bad else ""}


def _fprop_sqnr(gemm: Mapping, layer: str, strategy: str) -> float | None:
    """fprop SQNR with JSON nulls decoded (+inf exact, −inf zero signal, NaN undefined); None if not measured."""
    row = gemm.get((layer, strategy, "fprop"))
    return None if row is None else metric_value(row)


# A fraction (underflow, saturation, zeros) is shaded from 0.1 % on: smaller shares are shown but are
# not worth the reader's attention.
PCT_WARN = 1e-3


def _pct_text(v: float) -> str:
    """A share (0..1) as the report writes percentages, the number and "%" apart as in the verdict and the terminal
    ("12.3 %"; QA D1: "+0.0013 %" stood beside "100.0%"): "0 %" exactly (never a rounded-down share), two
    significant digits under 0.1 % ("0.0076 %"), two decimals under 10 % ("3.12 %", "0.10 %"), one above."""
    p = 100 * v
    if p == 0:
        return "0 %"
    if abs(p) < 0.1:
        return f"{p:#.2g} %"
    return f"{p:.2f} %" if abs(p) < 10 else f"{p:.1f} %"


def _pct(value: Any) -> dict:
    """A share column (underflow, saturation, zeros): every cell a percentage, "0 %" included (QA D1: "0" beside
    "3.12%" read as a count); shares under 0.01 % are "<0.01 %", not worth their digits here."""
    if not _isnum(value):
        return cell(value)
    v = float(value)
    text = "<0.01 %" if 0 < v < 1e-4 else _pct_text(v)
    return {"text": text, "sort": v, "cls": "warn" if v >= PCT_WARN else ""}


def _table(tid: str, columns: Sequence[str], rows: list[list[dict]], groups: Sequence[tuple[str, int]] = ()) -> dict:
    """A table of the view model; ``tid`` its HTML id, unique in the page: a table under a section heading of its own
    name is "<name>-table" (the heading and the table shared "recommendation", "coverage", …: duplicate ids, and a
    link to the section could land on either). Each column is aligned one way, its header with it (QA D2: right-aligned
    headers sat above left-aligned names, and "–" right of left-aligned text): a column holding any text
    cell ("txt") is a text column, its other cells and its header ("text") are marked so (left-aligned)."""
    text = [any("txt" in c["cls"].split() for c in col) for col in zip(*rows)]
    text += [False] * (len(columns) - len(text))
    if any(text):
        rows = [[c if not t or "txt" in c["cls"].split() else {**c, "cls": f"{c['cls']} txt".lstrip()}
                 for c, t in zip(row, text)] for row in rows]
    return {"id": tid, "columns": list(columns), "rows": rows, "text": text,
            "groups": [{"label": g, "span": n} for g, n in groups]}


def _index(records: Sequence[Mapping], *keys: str) -> dict[tuple, Mapping]:
    return {tuple(r.get(k) for k in keys): r for r in records}


# Plain decimals from this magnitude up to FIXED_MAX (exclusive); scientific notation outside.
FIXED_MIN, FIXED_MAX = 1e-3, 1e5


def _sig(x: float, digits: int = 4) -> str:
    """``x`` to ``digits`` significant digits with its trailing zeros, so a column reads at one precision ("0.01000"
    beside "0.01004", not "0.01"; "71.90" beside "71.39", QA D1); plain decimals from FIXED_MIN to FIXED_MAX,
    scientific notation outside ("1.581e-06"); exactly 0 is "0"."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if FIXED_MIN <= abs(x) < FIXED_MAX:
        exponent = int(f"{x:.{digits - 1}e}".split("e")[1])  # after rounding: 99.996 → 100.0, not 99.996
        if exponent < math.log10(FIXED_MAX):
            return f"{x:.{max(digits - 1 - exponent, 0)}f}"
    return f"{x:.{digits - 1}e}"


def _ratio(x: float) -> str:
    """A ratio of magnitudes to three significant digits with "×" ("1.39×", "3300×"; QA D1: "3299.72")."""
    return f"{_sig(x, 3)}×"


def _pow2_cell(value: Any) -> dict:
    """A format constant: a fraction that is an exact power of two as one, its exponent raised (2<sup>-9</sup> in the
    table: the cell's "sup"; not "0.00195312", QA D1, nor "2^-9", a programmer's spelling), an integer as itself
    ("57344"), anything else in its shortest form ("7.5"). Sorted by value."""
    if not _isnum(value) or not math.isfinite(value):
        return cell(value)
    x = float(value)
    if 0 < x < 1 and math.frexp(x)[0] == 0.5:
        return {"text": "2", "sup": f"{math.frexp(x)[1] - 1}", "sort": float(f"{x:.6g}"), "cls": ""}
    return cell(x, "{:.0f}" if x.is_integer() and abs(x) < 2 ** 24 else "{:g}")


def _fmt_g(x: Any) -> str:
    return _sig(float(x)) if _isnum(x) else str(x)


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
def _layer_order(tables: Mapping) -> list[str]:
    names = [r["layer"] for r in tables["layers"]]
    return list(dict.fromkeys(names))


def _strategies(results: Mapping) -> list[str]:
    listed = list(results["metadata"].get("strategies") or [])
    seen = [r["strategy"] for r in results["tables"].get("gemm", [])]
    return list(dict.fromkeys(listed + seen)) if seen else [s for s in listed if s]


def _summary(layers: list[str], strategies: list[str], tables: Mapping, keep_db: float) -> dict:
    gemm = _index(tables.get("gemm", []), "layer", "strategy", "gemm")
    worst_rows = []
    for layer in layers:
        vals = [v for s in strategies if (v := _fprop_sqnr(gemm, layer, s)) is not None and not math.isnan(v)]
        if vals:
            # (how many strategies leave it under the line, of those measured: undefined counts as under, as in the
            # lists above)
            measured = [v for s in strategies if (v := _fprop_sqnr(gemm, layer, s)) is not None]
            under = sum(1 for v in measured if math.isnan(v) or v < keep_db)
            worst_rows.append((min(vals), layer, under, len(measured)))
    worst_rows.sort(key=lambda t: t[0])
    # the row's lowest SQNR and its count under the line first: with 15 recipes the lowest sat somewhere in a row of 15
    # numbers, and whether one recipe or all of them failed a layer had to be counted by eye (QA)
    worst = _table("worst", ["layer", "lowest dB", f"strategies under {keep_db:g} dB", *strategies],
                   groups=[("", 3), ("fprop SQNR (dB) per strategy", len(strategies))], rows=[
        [cell(layer), _sqnr_cell(low, keep_db),
         {"text": f"{under} of {n}", "sort": under, "cls": "bad" if under else "muted"},
         *[_metric_cell(gemm.get((layer, s, "fprop")), "sqnr_db", "{:.1f}", keep_db) for s in strategies]]
        for low, layer, under, n in worst_rows[:WORST_LAYERS]])
    keep = []
    for s in strategies:
        measured = [(layer, v) for layer in layers if (v := _fprop_sqnr(gemm, layer, s)) is not None]
        # −inf (reference zero, result not) sorts first; undefined (NaN: nothing finite to compare)
        # is listed too, with its reason, so it can never pass for a good layer.
        bad = sorted((v, layer) for layer, v in measured if v < keep_db)
        undefined = [layer for layer, v in measured if math.isnan(v)]
        keep.append({"strategy": s, "n_measured": len(measured),
                     "layers": [{"layer": layer, "sqnr": f"{v:.1f} dB" if math.isfinite(v) else "−∞ dB"}
                                for v, layer in bad] +
                               [{"layer": layer, "sqnr": "SQNR undefined: "
                                 + str(gemm[(layer, s, "fprop")].get("note") or "NaN")} for layer in undefined]})
    return {"worst": worst, "keep": keep, "has_gemm": bool(gemm)}


# Special-value columns of the tensors table (analysis/metrics.py TensorStats) and their headers.
SPECIAL_COLUMNS = (("nan_count", "NaN"), ("pos_inf_count", "+Inf"), ("neg_inf_count", "−Inf"),
                   ("zero_count", "zeros"), ("subnormal_count", "subnormal"), ("over_fp16_max", "> fp16 max"),
                   ("over_e4m3_max", "> e4m3 max"), ("over_e5m2_max", "> e5m2 max"))
# Columns that flag a tensor by themselves (zeros only flag an all-zero or empty tensor).
_FLAGGING = ("nan_count", "pos_inf_count", "neg_inf_count", "inf_count", "subnormal_count", "over_fp16_max",
             "over_e4m3_max", "over_e5m2_max")


def _count(r: Mapping, key: str) -> int:
    v = r.get(key)
    return int(v) if _isnum(v) and math.isfinite(v) else 0


def _nan_inf(tables: Mapping) -> dict:
    """NaN / Inf totals over the tensors table and the layers holding any (the summary warning; the
    per-tensor counts are in the Special values table)."""
    rows = tables.get("tensors", [])
    total_nan = sum(_count(r, "nan_count") for r in rows)
    total_inf = sum(_count(r, "inf_count") for r in rows)
    layers = list(dict.fromkeys(r["layer"] for r in rows if _count(r, "nan_count") or _count(r, "inf_count")))
    return {"measured": bool(rows), "nan": total_nan, "inf": total_inf, "layers": layers}


def _special_values(tables: Mapping) -> dict:
    """Per layer and tensor: NaN, ±Inf, zeros, subnormals, values beyond fp16/e4m3/e5m2 max; and every
    gemm/operand metric computed over a subset (specials excluded) or undefined, with the reason."""
    rows = tables.get("tensors", [])
    present = [(k, label) for k, label in SPECIAL_COLUMNS if any(k in r for r in rows)]
    second = _second_activation_sites(tables)
    flagged = []
    for r in rows:
        numel = _count(r, "numel")
        all_zero = numel == 0 or _count(r, "zero_count") == numel
        if not (all_zero or any(_count(r, k) for k in _FLAGGING)):
            continue
        what = "empty" if numel == 0 else "all zero" if all_zero else ""
        flagged.append([cell(r["layer"]), cell(_operand_label(r["layer"], r["tensor"], second)),
                        cell(r.get("numel"), "{:.0f}"), cell(what)] +
                       [cell(r.get(k), "{:.0f}", "bad" if k in _FLAGGING and _count(r, k) else "")
                        for k, _ in present])
    table = _table("special-table", ["layer", "tensor", "numel", "all zero / empty", *[label for _, label in present]], flagged)
    notes = []
    for tname, what_key in (("gemm", "gemm"), ("operands", "operand")):
        for r in tables.get(tname, []):
            note, excluded, nonfinite = r.get("note"), _count(r, "excluded"), _count(r, "nonfinite")
            if not (excluded or nonfinite or (note and note != NOTE_EXACT)):
                continue
            v = metric_value(r)
            shown = "undefined" if v is None or math.isnan(v) else "over finite elements" \
                if math.isfinite(v) else _NOTE_TEXT.get(note, "∞")
            notes.append([cell(r["layer"]), cell(r.get("strategy")), cell(r.get(what_key)),
                          cell(r.get("compared"), "{:.0f}"), cell(excluded, "{:.0f}", "warn" if excluded else ""),
                          cell(nonfinite, "{:.0f}", "bad" if nonfinite else ""), cell(shown), cell(note or "")])
    return {"measured": bool(rows), "n_tensors": len(rows), "table": table,
            "notes": _table("metricnotes", ["layer", "strategy", "GEMM / operand", "compared", "excluded (NaN/Inf input)",
                                            "non-finite output", "SQNR", "note"], notes)}


def _strategy_tables(layers: list[str], strategies: list[str], tables: Mapping, rules: Mapping,
                     keep_db: float) -> list[dict]:
    gemm = _index(tables.get("gemm", []), "layer", "strategy", "gemm")
    ops = _index(tables.get("operands", []), "layer", "strategy", "operand")
    second = _second_activation_sites(tables)
    out = []
    for s in strategies:
        g_rows = []
        for layer in layers:
            row = [cell(layer)]
            for g in GEMMS:
                r = gemm.get((layer, s, g), {})
                row += [_metric_cell(r, "sqnr_db", "{:.1f}", keep_db), _metric_cell(r, "rel_err", "{:.2e}"),
                        cell(r.get("cosine"), "{:.6f}"), cell(r.get("max_abs_err"), "{:.3g}")]
            if any((layer, s, g) in gemm for g in GEMMS):
                g_rows.append(row)
        o_rows = []
        for layer in layers:
            row = [cell(layer)]
            for op in TENSORS:
                r = ops.get((layer, s, op), {})
                row += [_metric_cell(r, "sqnr_db", "{:.1f}", keep_db), _pct(r.get("underflow_frac")),
                        _pct(r.get("saturation_frac"))]
            if any((layer, s, op) in ops for op in TENSORS):
                o_rows.append(row)
        # the middle column group holds each row's second operand: the weight of a linear layer, the second
        # activation (K, V, a matmul's right operand) of an attention GEMM; one header over both says so
        o_layers = [row[0]["text"] for row in o_rows]
        middle = _shared_label([_operand_label(x, "weight", second) for x in o_layers if (x, s, "weight") in ops])
        sid = "".join(ch if ch.isalnum() else "-" for ch in s)
        out.append({
            "strategy": s, "rule": _rule_text(rules.get(s, "")),
            "gemm": _table(f"gemm-{sid}", ["layer", *[m for _ in GEMMS for m in
                                                     ("SQNR dB", "rel err", "cosine", "max abs")]], g_rows,
                           groups=[("", 1), *[(g, 4) for g in GEMMS]]),
            "operands": _table(f"ops-{sid}", ["layer", *[m for _ in TENSORS for m in
                                                        ("SQNR dB", "underflow", "saturation")]], o_rows,
                               groups=[("", 1), *[(middle if t == "weight" else t, 3) for t in TENSORS]]),
        })
    return out


def _second_activation_sites(tables: Mapping) -> set[str]:
    """Layers whose GEMM multiplies two activations (b_is_weight false: attention QKᵀ / PV, matmuls): their
    second operand is stored under the tensor name "weight", as a real weight is, but is K, V or another
    activation. Older results without b_is_weight: the sites gemms.py names ``<module>#<op>`` (a weight GEMM
    is named after its parameter; ``#<k>`` alone counts reuses)."""
    out = set()
    for r in tables.get("layers", []):
        name = str(r["layer"])
        if r.get("b_is_weight") is False or ("b_is_weight" not in r
                                             and any(not part.isdigit() for part in name.split("#")[1:])):
            out.add(name)
    return out


def _operand_label(layer: str, tensor: Any, second_activation: set[str]) -> str:
    """How the report names a captured tensor: "weight" of a GEMM of two activations is its second activation
    (K of QKᵀ at ``#qk``, V of PV at ``#pv``); the results keep the tensor name "weight"."""
    if tensor != "weight" or layer not in second_activation:
        return str(tensor)
    op = next((part for part in reversed(layer.split("#")) if not part.isdigit()), "")
    return {"qk": "K (2nd activation)", "pv": "V (2nd activation)"}.get(op, SECOND_ACTIVATION)


def _shared_label(labels: Sequence[str]) -> str:
    """One column header over the rows' operand labels: "weight", a single second-activation label ("K (2nd
    activation)") when every row has it, "2nd activation" over several, "weight / 2nd activation" over both."""
    kinds = set(labels)
    if not kinds or kinds == {"weight"}:
        return "weight"
    if "weight" not in kinds:
        return kinds.pop() if len(kinds) == 1 else SECOND_ACTIVATION
    return f"weight / {SECOND_ACTIVATION}"


def _and(words: Sequence[str]) -> str:
    return " and ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " and " + words[-1]


def _window_format(f: Any) -> bool:
    return bool(f) and _isnum(f.get("max")) and _isnum(f.get("min_subnormal")) and f["min_subnormal"] > 0


def _windows(name: str | None, amax: Any, formats: Mapping) -> list[tuple[str, float, float]]:
    """Representable log2 window of format ``name`` (a metadata.formats key), anchored at the tensor's amax.

    Absmax scaling maps amax onto the format's max, so the smallest non-zero representable
    magnitude is amax · min_subnormal / max. Without an amax the raw format range is drawn.
    """
    f = formats.get(name) if name else None
    if not _window_format(f):
        return []
    hi = math.log2(f["max"])
    lo = math.log2(f["min_subnormal"])
    if _isnum(amax) and amax > 0 and math.isfinite(amax):
        shift = math.log2(amax) - hi
        return [(f"{name} window (scaled to amax)", lo + shift, hi + shift)]
    return [(f"{name} range (unscaled)", lo, hi)]


def _window_plan(strategy: str | None, why: str, formats: Mapping) -> tuple[dict[str, str | None], str]:
    """The format shaded on each tensor's histograms (None: no band) and the caption sentences saying which
    recipe's formats they are, ``why`` that recipe, and what the band means under its scaling."""
    known = RECIPE_WINDOWS.get(strategy or "")
    if known is None:
        chosen = {t: next((n for n in WINDOW_PREFERENCE[t] if _window_format(formats.get(n))), None) for t in TENSORS}
        whose = f"{strategy} ({why}) is not a recipe this report knows the formats of" if strategy else \
            "the results name no recipe"
        return chosen, (f"Shaded: the first of the run's formats in E4M3-, then E5M2-like order ({whose}), placed "
                        "where one absmax scale per tensor puts it, the format max at the tensor's amax: mass left "
                        "of the dashed line underflows to zero.")
    fmts, scope = known
    by_format: dict[str, list[str]] = {}
    for t in TENSORS:
        if fmts.get(t) and _window_format(formats.get(fmts[t])):
            by_format.setdefault(fmts[t], []).append(t)
    parts = [f"{name} on {_and(ts)}" for name, ts in by_format.items()]
    bare = [t for t in TENSORS if not fmts.get(t)]
    if bare:
        parts.append(f"{_and(bare)} not quantised (no band)")
    if scope == _PER_TENSOR:
        meaning = (f"{strategy} scales each tensor by its own amax (each slice of a batched GEMM, e.g. an attention "
                   "head, by its own), so the band is the window it used: mass left of the dashed line is below its "
                   "smallest step and underflows (to zero below half of it).")
    elif strategy == "delayed":
        meaning = f"{strategy} scales {scope}."
    else:
        meaning = (f"{strategy} scales {scope}: each row or block has its own window ending at its own amax, so the "
                   "band (that of the one holding the tensor's amax) is the worst case, and mass left of the dashed "
                   "line is the most that can underflow.")
    return ({t: fmts.get(t) for t in TENSORS},
            f"Shaded: the formats of {strategy}, {why}: {'; '.join(parts)}. A band runs from the format's smallest "
            "non-zero magnitude (dashed) to its max (solid), the max at the tensor's amax, as one absmax scale per "
            f"tensor places it. {meaning}")


def _window_recipe(verdict: Mapping, strategies: Sequence[str]) -> tuple[str | None, str]:
    """The recipe whose formats the dynamic-range figure shades, and why: the one the Verdict names (the recommended
    one, else its isolated pick, as the heat map's pinned column: QA saw the figure shade global beside an int8
    pick), else the run's first."""
    if verdict.get("recommended"):
        return verdict["recommended"]["strategy"], "the recommended recipe"
    if verdict.get("isolated_pick"):
        return verdict["isolated_pick"], "the Verdict's isolated pick (not validated end to end)"
    if strategies:
        return strategies[0], "the run's first strategy (no recipe is recommended)"
    return None, ""


def _range_section(layers: list[str], tables: Mapping, formats: Mapping, fprop_min: Mapping[str, float],
                   window_recipe: tuple[str | None, str], n_strategies: int, draw: bool = True,
                   kept: Collection[str] = ()) -> dict:
    """Tensor statistics and the log2-magnitude ridgelines with the windows of ``window_recipe`` = (strategy,
    why it was chosen: the recommended recipe, else the run's first); ``fprop_min``: each layer's lowest fprop
    SQNR over the run's ``n_strategies`` strategies (which layers are drawn beyond MAX_HIST_LAYERS). ``kept``: the
    layers the recommended plan keeps in 16-bit: no band, their label says "(16-bit)" (QA: the figure shaded int8's
    windows on layers the plan keeps out of int8)."""
    trows = tables.get("tensors", [])
    second = _second_activation_sites(tables)
    table = _table("tensors", ["layer", "tensor", "numel", "amax", "std", "kurtosis", "zeros", "NaN", "Inf",
                               "range (bits)", "global/block absmax"], [
        [cell(r["layer"]), cell(_operand_label(r["layer"], r["tensor"], second)), cell(r.get("numel"), "{:.0f}"),
         cell(r.get("amax"), _sig),
         cell(r.get("std"), _sig), cell(r.get("kurtosis"), "{:.1f}"), _pct(r.get("zero_frac")),
         cell(r.get("nan_count"), "{:.0f}", "bad" if r.get("nan_count") else ""),
         cell(r.get("inf_count"), "{:.0f}", "bad" if r.get("inf_count") else ""),
         cell(r.get("range_bits"), "{:.1f}"), cell(r.get("block_absmax_ratio"), _ratio)]
        for r in trows])
    hists = tables.get("histograms", [])
    figure, note, caption = None, "", ""
    if hists and draw:
        amax = {(r["layer"], r["tensor"]): r.get("amax") for r in trows}
        hist_layers = [x for x in layers if any(h["layer"] == x for h in hists)]
        if len(hist_layers) > MAX_HIST_LAYERS:
            hist_layers = sorted(hist_layers, key=lambda x: fprop_min.get(x, math.inf))[:MAX_HIST_LAYERS]
            note = (f"Showing the {MAX_HIST_LAYERS} of {len({h['layer'] for h in hists})} layers with the lowest "
                    f"fprop SQNR under any strategy (each layer's lowest over the run's {strategies_text(n_strategies)}"
                    "), the lowest at the top; every layer's "
                    "statistics are in the table below.")
        keep = set(hist_layers)
        order = {x: i for i, x in enumerate(hist_layers)}
        shaded, caption = _window_plan(*window_recipe, formats)
        panels = [{"layer": h["layer"] + (" (16-bit)" if h["layer"] in kept else ""), "tensor": h["tensor"],
                   "edges": h["edges"], "counts": h["counts"],
                   "windows": [] if h["layer"] in kept else
                   _windows(shaded.get(h["tensor"]), amax.get((h["layer"], h["tensor"])), formats)}
                  for h in sorted(hists, key=lambda h: order.get(h["layer"], 0)) if h["layer"] in keep]
        if kept and any(x in kept for x in hist_layers):
            caption += (" Layers the recommended plan keeps in 16-bit are marked \"(16-bit)\" and have no band: "
                        "that recipe does not quantise them.")
        tensors = [t for t in TENSORS if any(p["tensor"] == t for p in panels)]
        drawn_second = [x for x in hist_layers if x in second]
        titles = {}
        if drawn_second:
            titles["weight"] = SECOND_ACTIVATION if len(drawn_second) == len(hist_layers) else \
                f"weight / {SECOND_ACTIVATION}"
            caption += (" Rows of GEMMs of two activations (attention QKᵀ / PV, matmuls: names with #qk, #pv, "
                        "#matmul, …) show their second activation (K, V, a matmul's right operand) in the middle "
                        "column, not a weight.")
        fig = figures.range_histograms(panels, tensors, titles)
        figure = figures.figure_to_data_uri(fig)
    return {"table": table, "figure": figure, "note": note, "caption": caption, "present": bool(trows or hists)}


def _outlier_section(layers: list[str], tables: Mapping) -> dict | None:
    """The outlier dimensions that matter: per layer its top dims with magnitude and share of tokens, and
    a grid layers × the dims flagged in the most layers (a full-width column strip hides them at 1 px)."""
    rows = tables.get("outliers", [])
    if not rows:
        return None
    first: dict[str, Mapping] = {}
    for r in rows:
        first.setdefault(r["layer"], r)

    def tops(r: Mapping) -> list[tuple[int, Any, Any]]:
        dims = r.get("top_dims") or []
        tokens = r.get("top_dim_tokens") or []
        return [(int(d[0]), d[1], tokens[i] if i < len(tokens) else None) for i, d in enumerate(dims)]

    def describe(r: Mapping) -> str:
        return ", ".join(f"{d}: {_fmt_g(a)}" + (f" ({100 * t:.0f} % of tokens)" if _isnum(t) else "")
                         for d, a, t in tops(r)[:5])

    table = _table("outliers-table", ["layer", "threshold", "outlier cols", "frac cols", "frac tokens", "top dims (dim: amax)"], [
        [cell(r["layer"]), cell(r.get("threshold"), "{:g}"), cell(r.get("n_outlier_cols"), "{:.0f}"),
         _pct(r.get("frac_cols")), _pct(r.get("frac_rows")), cell(describe(r) or "–")] for r in rows])
    flagged = [x for x in layers if x in first and tops(first[x])]
    flagged += [x for x in first if x not in flagged and tops(first[x])]
    counts: dict[int, int] = {}
    for x in flagged:
        for d, _a, _t in tops(first[x]):
            counts[d] = counts.get(d, 0) + 1
    dims = sorted(sorted(counts, key=lambda d: (-counts[d], d))[:MAX_OUTLIER_DIMS])
    grid_rows = []
    for x in flagged:
        r = first[x]
        top = {d: (a, t) for d, a, t in tops(r)}
        col_amax = r.get("col_amax") or []
        thr = r.get("threshold") if _isnum(r.get("threshold")) else None
        row = [cell(x)]
        for d in dims:
            if d in top:
                a, t = top[d]
                text = _fmt_g(a) + (f" · {100 * t:.0f} %" if _isnum(t) else "")
                level = "o3" if thr and _isnum(a) and a >= 8 * thr else "o2" if thr and _isnum(a) and a >= 2 * thr else "o1"
                row.append({"text": text, "sort": float(a) if _isnum(a) else None, "cls": level})
            elif d < len(col_amax) and _isnum(col_amax[d]):
                row.append({"text": _fmt_g(col_amax[d]), "sort": float(col_amax[d]), "cls": "muted"})
            else:
                row.append(cell(None))
        grid_rows.append(row)
    grid = _table("outlier-dims", ["layer", *[str(d) for d in dims]], grid_rows,
                  groups=[("", 1), ("input feature dimension: column amax · share of tokens at or above the threshold",
                                    len(dims))]) if dims else None
    thresholds = {r["threshold"] for r in rows if _isnum(r.get("threshold"))}
    return {"table": table, "grid": grid, "n_flagged": len(flagged), "n_layers": len(first),
            "n_dims": len(counts), "shown_dims": len(dims),
            # (one value in a run; "" when layers differ, and the sentence then names none)
            "threshold": f"{next(iter(thresholds)):g}" if len(thresholds) == 1 else ""}


def _model_wide(kind: str, tables: Mapping, per_layer: Sequence[Any]) -> dict | None:
    """The one value for the whole model: the validated recommendation row of ``kind`` when the results
    carry one, else the value most layers' per-layer recommendation picks (labelled as such)."""
    row = next((r for r in tables.get("recommendation", []) if r.get("kind") == kind and _isnum(r.get("value"))), None)
    if row is not None:
        status = "over the budget: the nearest swept value" if row.get("within_budget") is False else \
            "validated end to end"
        return {"value": float(row["value"]), "label": f"model-wide: {row['value']:g} ({status})"}
    picks = [float(v) for v in per_layer if _isnum(v)]
    if not picks:
        return None
    best = max(dict.fromkeys(picks), key=picks.count)
    return {"value": best, "label": f"most layers' pick: {best:g} ({picks.count(best)} of {len(picks)})"}


def _group(rows: Sequence[Mapping], key: str = "layer") -> dict[Any, list[Mapping]]:
    out: dict[Any, list[Mapping]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def _drawn_layers(lay: list[str], worst: Mapping[str, float]) -> tuple[list[str], str]:
    """The layers a sweep chart draws: all of them up to figures.MAX_LEGEND, else the MAX_LEGEND with
    the lowest fprop SQNR (forward order kept) and a note; every layer stays in the table."""
    if len(lay) <= figures.MAX_LEGEND:
        return lay, ""
    chosen = set(sorted(lay, key=lambda x: worst.get(x, math.inf))[:figures.MAX_LEGEND])
    return ([x for x in lay if x in chosen],
            f"The charts draw the {figures.MAX_LEGEND} of {len(lay)} layers with the lowest fprop SQNR; every layer is "
            "in the table.")


def _blocksize_section(layers: list[str], rows: Sequence[Mapping], rule: str, draw: bool = True,
                       auto_sizes: Mapping[str, Any] | None = None, tables: Mapping | None = None) -> dict | None:
    if not rows:
        return None
    sizes = sorted({int(r["blocksize"]) for r in rows})
    targets = [t for t in ("fprop", "dgrad", "wgrad", "activation", "weight", "grad_output")
               if any(r["target"] == t for r in rows)]
    by_layer = _group(rows)
    lay = [x for x in layers if x in by_layer] or list(by_layer)
    table_rows, picks, worst = [], [], {}
    for layer in lay:
        mine = by_layer[layer]
        rec = next((int(r["blocksize"]) for r in mine if r.get("recommended")), None)
        picks.append(rec)
        # get_block_sizes' pick for A (bsz) from the layers table; it need not be one of the swept sizes
        auto = (auto_sizes or {}).get(layer)
        if auto is None:
            auto = next((int(r["blocksize"]) for r in mine if r.get("auto") and r["target"] == "fprop"), None)
        fprop = {int(r["blocksize"]): r for r in mine if r["target"] == "fprop"}
        worst[layer] = min((v for r in fprop.values() if (v := metric_value(r)) is not None and not math.isnan(v)),
                           default=math.inf)
        row = [cell(layer), cell(rec, "{:.0f}", "good"), cell(auto, "{:.0f}")]
        for bs in sizes:
            r = fprop.get(bs)
            # (an exact point, e.g. an all-zero weight, is null with its note in the JSON: "exact", not "–")
            c = _metric_cell(r, "sqnr_db", "{:.1f}")
            row.append({**c, "cls": " ".join(x for x in (c["cls"], "good" if bs == rec else "") if x)})
        table_rows.append(row)
    overhead = [f"{bs}: {32 / bs:.3g}" for bs in sizes]
    model = _model_wide("blocksize", tables or {}, picks)
    drawn, note = _drawn_layers(lay, worst)
    panels = []
    for t in targets:
        series = []
        for layer in drawn:
            pts = sorted((int(r["blocksize"]), r["sqnr_db"], bool(r.get("recommended")))
                         for r in by_layer[layer] if r["target"] == t)
            if pts:
                mark = next((p[0] for p in pts if p[2]), None)
                series.append({"label": layer, "x": [p[0] for p in pts], "y": [p[1] for p in pts], "mark_x": mark})
        panels.append({"title": t, "series": series, "xlabel": "block size (elements)", "ylabel": "SQNR (dB)",
                       "logx2": True, "vline": model})
    figure = figures.figure_to_data_uri(figures.sweep_panels(panels)) if draw else None
    return {"rule": rule, "figure": figure, "targets": ", ".join(targets), "overhead": ", ".join(overhead),
            "model": model["label"] if model else "", "note": note,
            "table": _table("blocksize-table", ["layer", "recommended", "auto (get_block_sizes)",
                                          *[f"{bs}" for bs in sizes]], table_rows,
                            groups=[("", 3), ("fprop SQNR (dB) per block size", len(sizes))])}


def _threshold_section(layers: list[str], rows: Sequence[Mapping], rule: str, draw: bool = True,
                       tables: Mapping | None = None, run_threshold: Any = None) -> dict | None:
    """The threshold sweep: table, charts and the model-wide value. ``run_threshold``: the --threshold the analysis
    (and its end-to-end int8 runs) used, marked "(run)" in its column's header: the header's threshold, the sweep's
    and its model-wide value met the reader with nothing saying which one the int8 numbers above were measured at."""
    if not rows:
        return None
    ths = sorted({float(r["threshold"]) for r in rows})
    run = float(run_threshold) if _isnum(run_threshold) and float(run_threshold) in ths else None
    by_layer = _group(rows)
    lay = [x for x in layers if x in by_layer] or list(by_layer)
    table_rows, series, picks, worst = [], {}, [], {}
    for layer in lay:
        mine = {float(r["threshold"]): r for r in by_layer[layer]}
        rec = next((th for th, r in mine.items() if r.get("recommended")), None)
        picks.append(rec)
        row = [cell(layer), cell(rec, "{:g}", "good")]
        for th in ths:
            r = mine.get(th)
            if r is None:
                row.append(cell(None))
                continue
            c = _metric_cell(r, "fprop_sqnr_db", "{:.1f}")
            c["cls"] = " ".join(x for x in (c["cls"], "good" if th == rec else "") if x)
            frac = r.get("frac_cols_16bit")
            c["text"] += f" / {100 * frac:.1f} %" if _isnum(frac) else ""
            c["sort"] = c["sort"] if c["sort"] is not None or not _isnum(r.get("fprop_sqnr_db")) else float(r["fprop_sqnr_db"])
            row.append(c)
        table_rows.append(row)
        worst[layer] = min((v for r in mine.values() if _isnum(v := r.get("fprop_sqnr_db"))), default=math.inf)
        series[layer] = (sorted((th, r.get("fprop_sqnr_db"), r.get("frac_cols_16bit")) for th, r in mine.items()), rec)
    model = _model_wide("threshold", tables or {}, picks)
    drawn, note = _drawn_layers(lay, worst)
    s_sqnr = [{"label": x, "x": [p[0] for p in series[x][0]], "y": [p[1] for p in series[x][0]], "mark_x": series[x][1]}
              for x in drawn]
    s_frac = [{"label": x, "x": [p[0] for p in series[x][0]],
               "y": [100 * p[2] if _isnum(p[2]) else None for p in series[x][0]], "mark_x": series[x][1]} for x in drawn]
    figure = None if not draw else figures.figure_to_data_uri(figures.sweep_panels([
        {"title": "fprop SQNR vs threshold", "series": s_sqnr, "xlabel": "outlier threshold",
         "ylabel": "fprop SQNR (dB)", "vline": model},
        {"title": "16-bit columns vs threshold", "series": s_frac, "xlabel": "outlier threshold",
         "ylabel": "% input columns kept in 16-bit", "vline": model}]))
    return {"rule": rule, "figure": figure, "model": model["label"] if model else "", "note": note,
            "table": _table("threshold-table", ["layer", "recommended", *[f"{th:g}" + (" (run)" if th == run else "")
                                                                    for th in ths]], table_rows,
                            groups=[("", 2), ("fprop SQNR (dB) / % columns in 16-bit, per threshold" +
                                              ("; (run): this analysis' --threshold" if run is not None else ""),
                                              len(ths))])}


def _weights_section(meta: Mapping, tables: Mapping) -> dict | None:
    """Weights-only results (analysis/weights_only.py): the banner, per-block scale statistics, outlier
    rows/columns of the weights and the tensors that were not analysed; None for a full analysis."""
    info = meta.get("weights_only")
    if not isinstance(info, Mapping):
        return None
    blocks = _table("weight-blocks", ["layer", "strategy", "block", "blocks", "zero blocks", "absmax min",
                                      "absmax median", "absmax max", "log2 amax/median", "clipped blocks"], [
        [cell(r.get("layer")), cell(r.get("strategy")), cell(r.get("block")), cell(r.get("n_blocks"), "{:.0f}"),
         cell(r.get("zero_blocks"), "{:.0f}"), cell(r.get("absmax_min"), "{:.3g}"), cell(r.get("absmax_median"), "{:.3g}"),
         cell(r.get("absmax_max"), "{:.3g}"), cell(r.get("tensor_to_median_log2"), "{:.2f}"),
         _pct(r.get("clipped_block_frac"))] for r in tables.get("weight_blocks", [])])
    outliers = _table("weight-outliers", ["layer", "outlier rows", "top rows [index, amax]", "outlier cols",
                                          "top cols [index, amax]"], [
        [cell(r.get("layer")), cell(r.get("n_outlier_rows"), "{:.0f}"),
         cell(", ".join(f"[{i}, {_fmt_g(m)}]" for i, m in (r.get("top_rows") or []))),
         cell(r.get("n_outlier_cols"), "{:.0f}"),
         cell(", ".join(f"[{i}, {_fmt_g(m)}]" for i, m in (r.get("top_cols") or [])))]
        for r in tables.get("weight_outliers", []) if r.get("n_outlier_rows") or r.get("n_outlier_cols")])
    skipped = _table("weight-skipped", ["tensor", "shape", "dtype", "parameters", "share", "reason"], [
        [cell(r.get("key")), cell("×".join(str(d) for d in r.get("shape") or []) or "scalar"), cell(r.get("dtype")),
         cell(r.get("numel"), "{:.0f}"), _pct(r.get("param_share")), cell(r.get("reason"))]
        for r in tables.get("skipped", [])])
    ratio = next((r.get("ratio") for r in tables.get("weight_outliers", [])), None)
    return {"note": str(info.get("note", "")), "analysed": info.get("analysed"), "skipped": info.get("skipped"),
            "share": f"{100 * float(info.get('param_share_analysed') or 0):.2f} %", "blocks": blocks,
            "outliers": outliers, "outlier_ratio": f"{ratio:g}" if _isnum(ratio) else "", "skipped_table": skipped}


# ----------------------------------------------------------------------------------------------
# Verdict, heat map and the end-to-end tables (agreed schemas: README "Reports")
# ----------------------------------------------------------------------------------------------
# The banner names every kept layer up to BANNER_KEEP_ALL; a longer list shows its first BANNER_KEEP_SHOWN and links to
# the Recommendation table (QA: 12 of 13 names, then "… all 13", hid one name behind a link).
BANNER_KEEP_ALL = 16
BANNER_KEEP_SHOWN = 10


def _banner_keep(keep: Sequence[str]) -> list[str]:
    """The kept layers the Verdict's banner names (the rest are behind a link to the Recommendation table)."""
    return list(keep) if len(keep) <= BANNER_KEEP_ALL else list(keep[:BANNER_KEEP_SHOWN])


def _verdict_section(tables: Mapping, meta: Mapping, keep_db: float) -> dict:
    """The first screen: the verdict lines (the terminal prints the same), the per-strategy end-to-end
    table, the isolated summary, coverage, warnings and one-line notes for what these results lack."""
    v = build_verdict(tables, meta, keep_db)
    # (the note column only when some row has a note: empty, it pushed "within budget" off an 800 px screen, QA B5)
    notes = any(r["note"] for r in v["e2e"])
    rec_kl = (v["recommended"] or {}).get("kl_div")
    e2e_rows = [[cell(r["strategy"], cls="txt strong" if r["recommended"] else ""),
                 _change_cell(r["loss_rel_change"]), _e2e_kl_cell(r, rec_kl), _top1_cell(r["top1_agreement"]),
                 _sqnr_cell(r["output_sqnr_db"], keep_db), cell(r["grad_sqnr_db_min"], "{:.1f}"),
                 cell(r["grad_sqnr_db_median"], "{:.1f}"), _share(r["lp_flop_share"]),
                 cell(r["n_keep"], "{:.0f}"), _keep_set_share_cell(r), _keep_set_budget_cell(r, rec_kl, keep_db),
                 *([cell(r["note"])] if notes else [])]
                for r in v["e2e"]]
    # ("n of m" is a count: right-aligned and sorted by n, not as text where "11 of 13" < "2 of 13")
    iso_rows = [[cell(r["strategy"]), {"text": f"{r['n_below']} of {r['n_layers']}", "sort": r["n_below"],
                                       "cls": "bad" if r["n_below"] else ""},
                 cell(r["worst_layer"]), _sqnr_cell(r["worst_db"], keep_db)] for r in v["isolated"]]
    rec = v["recommended"]
    return {
        # the lines the tables and the callout below do not already show
        "lines": [line for line in verdict_lines(tables, meta, keep_db)
                  if not line.startswith(("verdict", "isolated ", "end-to-end "))],
        "headline": (isolated_headline(v["best_isolated"], keep_db).split(": ", 1)[1]
                     if v["best_isolated"] else ""),
        # the high-precision loss the changes are relative to (QA C3: only relative changes appeared)
        "loss_hp": "" if v["loss_hp"] is None else f"{v['loss_hp']:.4g} in high precision (the loss changes' base)",
        # the headline carries what the terminal's verdict line does: the KL (a loss that moved little can hide a
        # broken output) and the budget it was judged against
        "recommended": None if rec is None else {**rec, "loss": signed_pct(rec["loss_rel_change"]),
                                                 "loss_hp": None if v["loss_hp"] is None else f"{v['loss_hp']:.4g}",
                                                 "kl": None if rec["kl_div"] is None else f"{rec['kl_div']:.3g}",
                                                 "budget": budget_text(rec["budget"], rec["budget_kind"]),
                                                 "share": lp_share_text(rec["lp_flop_share"], v["coverage"]),
                                                 "little_gain": little_gain_text(rec["lp_flop_share"]),
                                                 "low_sqnr": low_output_sqnr_text(rec["output_sqnr_db"], keep_db)
                                                 if rec["low_sqnr"] else "",
                                                 "keep_shown": _banner_keep(rec.get("keep_16bit") or [])},
        "no_recommendation": v["no_recommendation"],
        "needs_keep": {r["strategy"]: r["n_keep"] for r in v["e2e"] if r["n_keep"]},
        "isolated_pick": v["best_isolated"]["strategy"] if v["best_isolated"] else None,
        # (the first columns are the run with every captured GEMM in low precision; the last three the keep-set the
        # search found for the budget, with its own share of FLOPs in low precision: a "yes" there is the keep-set's,
        # not the all-low-precision loss's, and 100 % beside it was every layer's share, not the keep-set's, QA A3)
        "e2e": _table("e2e", ["strategy", "loss change", "KL", "top-1 agreement", "output SQNR dB",
                              "grad SQNR min dB", "grad SQNR median dB", LP_FLOPS_HEADER,
                              "layers kept in 16-bit", LP_FLOPS_HEADER, "within budget",
                              *(["note"] if notes else [])], e2e_rows,
                      groups=[("", 1), ("every captured GEMM in low precision", 7),
                              ("the budget's keep-set (Recommendation)", 3), *([("", 1)] if notes else [])]),
        "e2e_notes": v["e2e_notes"],
        "e2e_flags": _e2e_flags(v["e2e"], rec_kl, keep_db),
        # why the keep-set columns are empty and "within budget" is not judged (no keep-set was searched)
        "not_searched": "; ".join(dict.fromkeys(r["not_searched"] for r in v["e2e"] if r["searched"] is False)),
        "isolated": _table("isolated-summary", ["strategy", f"layers below {keep_db:g} dB fprop", "worst layer",
                                        "worst fprop SQNR dB"], iso_rows),
        "coverage": coverage_line(v["coverage"]) if v["coverage"] else "",
        "warnings": v["warnings"], "missing": v["missing"],
    }


def _kl_far_text(r: Mapping, rec_kl: Any) -> str:
    return (f"KL {r['keep_kl_div']:.3g}, {r['kl_far']:.0f}× the recommended plan's ({rec_kl:.3g}), within the loss "
            "budget: the output distribution moves far more than the loss shows")


def _e2e_kl_cell(r: Mapping, rec_kl: Any) -> dict:
    """The end-to-end KL; red, saying why on hover, when this run is the plan a loss budget accepted (no layer kept)
    and its KL is over KL_FAR_RATIO x the recommended plan's (verdict.kl_far_ratio). A plan that keeps layers has its
    KL in the Recommendation table: its "within budget" cell says so instead."""
    c = cell(r["kl_div"], "{:.3g}")
    if r["kl_far"] is None or r["n_keep"]:
        return c
    return {**c, "cls": "bad", "title": _kl_far_text(r, rec_kl)}


def _keep_set_share_cell(r: Mapping) -> dict:
    """The keep-set's share of forward GEMM FLOPs in low precision; amber, saying why on hover, under
    LOW_GAIN_LP_SHARE."""
    c = _share(r["keep_lp_flop_share"])
    return {**c, "cls": "warn", "title": little_gain_text(r["keep_lp_flop_share"])} if r["little_gain"] else c


def _keep_set_budget_cell(r: Mapping, rec_kl: Any, keep_db: float = KEEP_16BIT_DB) -> dict:
    """"within budget" of the budget's keep-set: a green "yes" only for a plan worth having. Amber "yes*" when it
    leaves under LOW_GAIN_LP_SHARE of the forward GEMM FLOPs in low precision (its share beside it amber too), when a loss
    budget accepted it with a KL over KL_FAR_RATIO x the recommended plan's (the KL cell red where no layer is kept)
    or with the model output's SQNR under ``keep_db`` (verdict.low_output_sqnr):
    verdict.py says why each; the cell's title gives the row's reasons and a note under the table the rules
    (_e2e_flags). "yes*", not "yes, little gain": the words pushed this column off an 800 px window (QA B5). Sorted
    between "no" (0) and "yes" (1)."""
    if r["searched"] is False:
        return _not_judged_cell(r["not_searched"])
    c = _budget_cell(r["within_budget"])
    why = []
    if r["little_gain"]:
        why.append(f"the keep-set leaves {pct(r['keep_lp_flop_share'])} of the forward GEMM FLOPs in low precision, "
                   f"{little_gain_text(r['keep_lp_flop_share'])}")
    if r["kl_far"] is not None:
        why.append(_kl_far_text(r, rec_kl))
    if r["low_sqnr"]:
        why.append(f"the keep-set's {low_output_sqnr_text(r['keep_output_sqnr_db'], keep_db)}")
    return _yes_star(why) if why else c


def _yes_star(why: Sequence[str]) -> dict:
    """An amber "yes*" (within the budget, with a reason to doubt it: ``why``, on hover)."""
    return {"text": "yes*", "sort": 0.5, "cls": "warn", "title": "; ".join(why)}


def _e2e_flags(rows: Sequence[Mapping], rec_kl: Any, keep_db: float = KEEP_16BIT_DB) -> list[str]:
    """The rules behind the end-to-end table's amber "yes, …" and red KL cells, said under it when some cell is so
    (the cells' titles say each row's numbers)."""
    flags = []
    if any(r["little_gain"] for r in rows):
        flags.append(f"yes* with an amber share: within the budget, but the keep-set leaves under "
                     f"{pct(LOW_GAIN_LP_SHARE, 0)} of the forward GEMM FLOPs in low precision: under "
                     f"{pct(LOW_GAIN_LP_SHARE / 2, 0)} less GEMM time than 16-bit even with GEMMs twice as fast in low "
                     "precision")
    if any(r["kl_far"] is not None for r in rows):
        flags.append(f"yes* beside a red KL: within the loss budget, but with a KL over {KL_FAR_RATIO:g}× the "
                     f"recommended plan's ({rec_kl:.3g}): the output distribution moves far more than the loss shows "
                     "(a plan that keeps layers: its keep-set's KL, in the Recommendation table)")
    if any(r["low_sqnr"] for r in rows):
        flags.append(_low_sqnr_flag(keep_db))
    return flags


def _low_sqnr_flag(keep_db: float) -> str:
    """The rule behind a "yes*" for a plan whose output SQNR is under ``keep_db`` (verdict.low_output_sqnr)."""
    return (f"yes* for a low output SQNR: within the loss budget, but the plan's model output SQNR is under {keep_db:g} "
            "dB (red in the Recommendation table): the loss averages out errors the output shows")


def _verdict_pick(verdict: Mapping) -> tuple[str, str] | None:
    """The recipe the Verdict names and how: ("…", "recommended") validated end to end, ("…", "isolated pick")
    from isolated GEMMs only; None when it names none (no recipe within the budget, or no GEMM table)."""
    if verdict["recommended"]:
        return verdict["recommended"]["strategy"], "recommended"
    return (verdict["isolated_pick"], "isolated pick") if verdict["isolated_pick"] else None


def _change_cell(value: Any) -> dict:
    c = cell(value)
    if _isnum(value) and math.isfinite(value):
        c = {"text": signed_pct(value), "sort": float(value), "cls": ""}
    return c


def _share(value: Any) -> dict:
    """A share (0..1) at one decimal, ">99.9 %" under 1 (verdict.pct: "100.0 %" read as every FLOP), sorted by it."""
    return {"text": pct(value), "sort": float(f"{100 * value:.6g}"), "cls": ""} \
        if _isnum(value) and math.isfinite(value) else cell(value)


def _small_share(value: float) -> dict:
    """A share that may be tiny but not zero (saturated elements): two significant digits under 0.1 % ("0.0012 %"),
    where "0.0%" stood beside 5 saturated elements (QA); above, as a share column does ("0.10 %" beside "0.095 %",
    not "0.1%", QA D1)."""
    return {"text": _pct_text(value), "sort": value, "cls": ""}


def _not_judged_cell(why: str) -> dict:
    """"within budget" of a recipe whose keep-set was not searched: grey "not judged", not a red "no" (nothing was
    run against the budget), the reason on hover. Sorted between "no" (0) and "yes" (1), as "yes*"."""
    return {"text": "not judged", "sort": 0.5, "cls": "muted", "title": f"no keep-set was searched: {why}" if why else
            "no keep-set was searched"}


def _budget_cell(value: Any) -> dict:
    if value is None:
        return cell(None)
    return {"text": "yes" if value else "no", "sort": int(bool(value)), "cls": "good" if value else "bad"}


def _heat_class(value: float, keep_db: float) -> str:
    k = math.floor((value - keep_db) / HEAT_STEP_DB) + HEAT_BINS_BELOW
    return f"h{min(max(k, 0), HEAT_BINS - 1)}"


# A frozen weight's wgrad cell (training computes no gradient for it: metadata.frozen_layers), and its dgrad cell
# when nothing trained comes before it (no gradient reaches it): there is no row.
FROZEN_CELL = {"text": "frozen", "sort": None, "cls": "nq"}
# A dgrad (wgrad) training does not run because the layer's input (second operand) needs no gradient:
# metadata.no_dgrad_layers / no_wgrad_layers.
NOT_RUN_CELL = {"text": "not run", "sort": None, "cls": "nq"}


def noise_share(db: float) -> str:
    """The noise power an SQNR of ``db`` means, as a share of the signal power: 10^(−dB/10) (20 dB: "1 %")."""
    share = 100.0 * 10.0 ** (-db / 10.0)
    return f"{share:.3g} %" if share < 1e4 else f"{share / 100:.3g}×"


NONFINITE_TITLE = "outputs NaN/Inf where the float64 reference is finite; the SQNR is over the finite ones"


def _heat_cell(row: Mapping | None, keep_db: float) -> dict:
    """One heat-map cell: SQNR in dB coloured by 5 dB bins around the keep line; unquantised GEMMs say
    so (instead of ~140 dB), exact and undefined results by name."""
    if row is None:
        return cell(None)
    value = metric_value(row)
    quantised = row.get("quantized")
    if quantised is False or (quantised is None and value is not None and math.isfinite(value)
                              and value >= UNQUANTISED_DB):
        return {"text": "n/q", "sort": None, "cls": "nq"}
    if value is None or math.isnan(value):
        return {"text": "undef", "sort": None, "cls": "warn"}
    if math.isinf(value):
        out = {"text": "exact" if value > 0 else "−∞", "sort": 1e308 if value > 0 else -1e308,
               "cls": _heat_class(value, keep_db) if value < 0 else "h8"}
    else:
        out = {"text": f"{value:.1f}", "sort": None, "cls": _heat_class(value, keep_db)}
    nonfinite, compared = (int(x) if _isnum(x) else 0 for x in (row.get("nonfinite"), row.get("compared")))
    if nonfinite > 0:  # the SQNR counts the finite outputs only: a NaN-producing recipe must not read as ordinary
        total = nonfinite + compared
        out.update(text=out["text"] + " ⚠", sort=value if math.isfinite(value) else out["sort"],
                   title=f"{nonfinite} of {total} {NONFINITE_TITLE}")
    return out


def _missing_cell(layer: str, gemm: str, frozen: Sequence[str], not_run: Mapping[str, Sequence[str]] | None) -> dict:
    """The cell of a GEMM with no row: "frozen" / "not run" when training does not run it, else empty."""
    if gemm != "fprop" and layer in frozen:
        return FROZEN_CELL
    if layer in (not_run or {}).get(gemm, ()):
        return NOT_RUN_CELL
    return cell(None)


def _heatmap(layers: list[str], strategies: list[str], gemm: Mapping[tuple, Mapping], keep_db: float,
             pick: tuple[str, str] | None = None, kept: Sequence[str] = (), frozen: Sequence[str] = (),
             not_run: Mapping[str, Sequence[str]] | None = None) -> dict | None:
    """Layer × strategy SQNR for fprop, dgrad and wgrad as one colour-coded, sortable table (rows stay
    readable at 200+ layers where a bar chart does not: one text line per layer) that shows one GEMM at a time:
    3 GEMMs x 15 recipes are 47 columns, and only fprop fitted a 1400 px page (QA B1). ``views`` are the
    template's selector: per GEMM, the column ranges (nth-child, 1-based) and group cells of the others, which
    it hides. One table rather than one per GEMM: the layer names are not repeated (they are a tenth of the
    bytes of a 271-layer heat map) and the rows keep one order when the reader switches GEMM.

    ``pick``: (strategy, kind) of the recipe the Verdict names, kind "recommended" (validated end to end) or
    "isolated pick" (no end-to-end run); its fprop column is repeated beside the layer names and its header is
    starred in each GEMM. (It replaced "worst fprop", the minimum over every recipe: always an FP4 recipe's,
    so sorting by it ranked layers by FP4 behaviour, QA C5.) ``kept``: the layers the recommended plan keeps in
    16-bit; their pinned cells read "16-bit (40.0)", grey, the isolated SQNR in brackets (it sorts by it): a bare
    "40.0" read as the plan's value for a layer the plan does not run in low precision (QA A5)."""
    gemms = [g for g in GEMMS if any((layer, s, g) in gemm for layer in layers for s in strategies)]
    if not gemms:
        return None
    pinned = pick[0] if pick is not None and pick[0] in strategies and "fprop" in gemms else None
    kept = set(kept) if pinned and pick[1] == "recommended" else set()
    rows = []
    for layer in layers:
        if not any((layer, s, g) in gemm for s in strategies for g in gemms):
            continue
        rows.append([cell(layer), *([_pinned_cell(gemm.get((layer, pinned, "fprop")), keep_db, layer in kept)]
                                    if pinned else []),
                     *[_missing_cell(layer, g, frozen, not_run) if (layer, s, g) not in gemm
                       else _heat_cell(gemm[(layer, s, g)], keep_db) for g in gemms for s in strategies]])
    edges = [keep_db + HEAT_STEP_DB * (k - HEAT_BINS_BELOW) for k in range(1, HEAT_BINS)]
    legend = [{"cls": f"h{k}", "label": (f"< {edges[0]:g}" if k == 0 else f"≥ {edges[-1]:g}" if k == HEAT_BINS - 1
                                         else f"{edges[k - 1]:g}–{edges[k]:g}"), "line": k == HEAT_BINS_BELOW}
              for k in range(HEAT_BINS)]
    spans = [len(strategies) + (1 if g == "fprop" and pinned else 0) for g in gemms]
    firsts = [2 + sum(spans[:k]) for k in range(len(gemms))]  # column 1 is the layer
    views = [{"gemm": g, "label": GEMM_LABELS[g],
              "hide": [{"first": firsts[k], "last": firsts[k] + spans[k] - 1, "group": 2 + k}
                       for k in range(len(gemms)) if gemms[k] != g]} for g in gemms]
    columns = ["layer", *([f"{pinned} ({pick[1]})"] if pinned else []),
               *[f"★ {s}" if pick is not None and s == pick[0] else s for _ in gemms for s in strategies]]
    return {"table": _table("sqnr-heat", columns, rows,
                            groups=[("", 1), *[(f"{g} SQNR (dB)", n) for g, n in zip(gemms, spans)]]),
            "legend": legend, "gemms": gemms, "views": views,
            "pick": None if pick is None else {"strategy": pick[0], "kind": pick[1], "pinned": pinned is not None},
            "kept": sum(1 for row in rows if "kept" in row[1]["cls"].split()) if pinned else 0,
            "nonfinite": any(NONFINITE_TITLE in c.get("title", "") for row in rows for c in row)}


def _pinned_cell(row: Mapping | None, keep_db: float, kept: bool) -> dict:
    """The pinned column's cell: the heat cell, or for a layer the plan keeps in 16-bit "16-bit (…)", class "kept"."""
    c = _heat_cell(row, keep_db)
    if not kept:
        return c
    # (a heat-binned cell without a key shows a plain number: "16-bit (40.0)" keeps sorting by it)
    sort = float(c["text"]) if c["sort"] is None and c["cls"].startswith("h") else c["sort"]
    return {"text": f"16-bit ({c['text']})", "sort": sort, "cls": "kept"}


# The recommendation table's model-wide rows (the sweeps' one value for the whole model), by kind.
_MODEL_WIDE = {"blocksize": "block size", "threshold": "outlier threshold"}


def _recommendation_section(tables: Mapping, keep_db: float = KEEP_16BIT_DB) -> dict | None:
    """The recommendation table split in two: one row per strategy (its keep-set for the budget; the one recommended
    recipe marked) and the model-wide block size and outlier threshold, which are settings, not recipes (QA: three
    rows said "recommended: yes"). Columns empty on every row and a budget shared by every row go; without any
    keep-set the strategy rows are the Verdict's end-to-end numbers, and the template says so and folds them.

    A keep-set is shown as its count with the names (each with its sensitivity rank) folded under it: 13-34 full
    names a cell made the table 6 screens tall and pushed its last column off an 800 px window (QA B2). The rows'
    notes go under each table, the part every row repeats said once: they say why a keep-set skips a rank (the search
    drops a layer when the budget holds without it), which the report did not show (QA A5)."""
    rows = tables.get("recommendation", [])
    if not rows:
        return None
    per_strategy = [r for r in rows if r.get("kind") not in _MODEL_WIDE]
    model_wide = [r for r in rows if r.get("kind") in _MODEL_WIDE]
    budgets = list(dict.fromkeys(budget_text(r.get("budget"), r.get("budget_kind")) if _isnum(r.get("budget")) else None
                                 for r in rows))
    budget = budgets[0] if len(budgets) == 1 and budgets[0] else ""
    ranks = _ranks(tables)
    keeps = [_keep(r) for r in per_strategy]
    keep_sets = any(keeps) or any(_isnum(r.get("n_keep")) and r["n_keep"] for r in per_strategy)

    # why no keep-set was searched (rows without a search: a KL budget on an output that is no distribution)
    unsearched = list(dict.fromkeys(not_searched_why(r) for r in per_strategy if not keep_set_searched(r)))

    chosen_row = next((r for r in per_strategy if r.get("recommended")), None)

    def within(r: Mapping) -> dict:
        """The row's "within budget", an amber "yes*" for the reasons the Verdict's end-to-end table gives one."""
        if r.get("kind") not in _MODEL_WIDE and not keep_set_searched(r):
            return _not_judged_cell(not_searched_why(r))
        if r.get("within_budget") is not True:
            return _budget_cell(r.get("within_budget"))
        why = []
        if little_gain(r.get("lp_flop_share")):
            why.append(f"{pct(r['lp_flop_share'])} of the forward GEMM FLOPs in low precision, "
                       f"{little_gain_text(r['lp_flop_share'])}")
        ratio = None if r is chosen_row else kl_far_ratio(r.get("kl_div"), chosen_row)
        if ratio is not None:
            why.append(f"KL {r['kl_div']:.3g}, {ratio:.0f}× the recommended plan's ({chosen_row['kl_div']:.3g})")
        if low_output_sqnr(True, r.get("budget_kind"), r.get("output_sqnr_db"), keep_db):
            why.append(low_output_sqnr_text(r["output_sqnr_db"], keep_db))
        return _yes_star(why) if why else _budget_cell(True)

    # (the plan's output SQNR: red under keep_db, where a loss budget's "yes" turns "yes*"; results written before the
    # column have none)
    sqnr = any(_isnum(r.get("output_sqnr_db")) for r in rows)

    def outcome(r: Mapping) -> list[dict]:
        return [_change_cell(r.get("loss_rel_change")), cell(r.get("kl_div"), "{:.3g}"),
                *([_sqnr_cell(r.get("output_sqnr_db"), keep_db)] if sqnr else []), _share(r.get("lp_flop_share")),
                within(r)] + \
            ([] if budget else [cell(budget_text(r.get("budget"), r.get("budget_kind")) if _isnum(r.get("budget"))
                                     else None)])

    tail = ["loss change", "KL", *(["output SQNR dB"] if sqnr else []), LP_FLOPS_HEADER, "within budget",
            *([] if budget else ["budget"])]
    strategies = _table("recommendation-table", ["strategy", *(["kept in 16-bit (in sensitivity-rank order)"]
                                                         if keep_sets else []), *tail, "recommended recipe"], [
        [cell(r.get("strategy"), cls="txt strong" if r.get("recommended") else ""),
         *([_keep_cell(keep, r.get("n_keep"), ranks.get(r.get("strategy"), {}))] if keep_sets else []),
         *outcome(r), _budget_cell(True) if r.get("recommended") else cell("")]
        for r, keep in zip(per_strategy, keeps)])
    settings = _table("recommendation-model", ["setting", "recipe", "value", *tail], [
        [cell(_MODEL_WIDE[r["kind"]]), cell(r.get("strategy")),
         cell("0 (plain int8, no outlier columns)" if r["kind"] == "threshold" and r.get("value") == 0
              else r.get("value"), "{:g}"),
         *outcome(r)] for r in model_wide])
    chosen = next((r.get("strategy") for r in per_strategy if r.get("recommended")), None)
    return {"strategies": strategies if per_strategy else None, "model_wide": settings if model_wide else None,
            "keep_sets": keep_sets, "budget": budget, "chosen": chosen,
            # (every strategy row unsearched: the template says so instead of "no strategy needs a layer kept")
            "not_searched": "; ".join(unsearched) if per_strategy and len(unsearched) and
            not any(keep_set_searched(r) for r in per_strategy) else "",
            "notes": _row_notes(per_strategy, [str(r.get("strategy")) for r in per_strategy]),
            "model_notes": _row_notes(model_wide, [_MODEL_WIDE[r["kind"]] for r in model_wide])}


def _keep(r: Mapping) -> list[str]:
    return keep_list(r.get("keep_16bit"))


def _keep_sets(tables: Mapping) -> dict[Any, set[str]]:
    """Each strategy's keep-set for the budget (the recommendation's per-strategy rows), as a set of layer names."""
    return {r.get("strategy"): set(_keep(r)) for r in tables.get("recommendation", [])
            if r.get("kind") not in _MODEL_WIDE and _keep(r)}


def _ranks(tables: Mapping) -> dict[Any, dict[str, int]]:
    """Each strategy's sensitivity rank by layer (1 = most sensitive)."""
    out: dict[Any, dict[str, int]] = {}
    for r in tables.get("sensitivity", []):
        if _isnum(r.get("rank")):
            out.setdefault(r.get("strategy"), {})[str(r.get("layer"))] = int(r["rank"])
    return out


def _keep_cell(keep: list[str], n_keep: Any, ranks: Mapping[str, int]) -> dict:
    """A keep-set: "13 layers", the names folded under it in rank order, each with its rank ("name (#11)"), so a
    skipped rank shows; names without a rank keep their stored order after the others."""
    n = len(keep) or (int(n_keep) if _isnum(n_keep) else 0)
    if not keep:
        return {"text": f"{n} layer{'s' if n != 1 else ''}" if n else "none", "sort": n, "cls": "txt"}
    order = sorted(range(len(keep)), key=lambda i: (ranks.get(keep[i], math.inf), i))
    names = ", ".join(f"{keep[i]} (#{ranks[keep[i]]})" if keep[i] in ranks else keep[i] for i in order)
    return {"text": f"{n} layer{'s' if n != 1 else ''}", "sort": n, "cls": "txt", "details": names}


def _row_notes(rows: Sequence[Mapping], labels: Sequence[str]) -> dict:
    """A table's row notes (split_notes): the parts every row of two or more repeats ("validated by 16 run(s) over 2
    batch(es)"), said once, and each row's own, by its label."""
    shared, own = split_notes([r.get("note") for r in rows]) if rows else ([], [])
    return {"shared": shared, "rows": [{"label": label, "text": text} for label, text in zip(labels, own) if text]}


def _method_parts(method: str) -> tuple[str, str]:
    """A stored sensitivity method ("estimated: first-order …") as its label and the rest ("estimated", "first-order
    …"); a text without a label is its own label."""
    label, sep, rest = method.partition(": ")
    return (label, rest) if sep else (method, "")


def _without_empty_columns(columns: list[str], rows: list[list[dict]], first: int) -> tuple[list[str], list[list[dict]]]:
    """Columns from index ``first`` on that are "–" in every row left out (the KL columns of an estimated table)."""
    keep = [j for j in range(len(columns)) if j < first or any(row[j]["text"] != "–" for row in rows)]
    return [columns[j] for j in keep], [[row[j] for j in keep] for row in rows]


#: An estimated single-layer loss change this many times the measured change with every layer in low precision (and
#: at least OVERSTATE_MIN) gets a caveat: the second-order term of the estimate grows with the square of the error and
#: can overstate a layer whose error is large (QA: BERT, mxfp4, one layer +28.87 % estimated, every layer +7.84 %
#: measured).
OVERSTATE_RATIO = 2.0
OVERSTATE_MIN = 0.001


def _overstated(rows: Sequence[Mapping], e2e: Sequence[Mapping], strategy: Any) -> str:
    """The caveat for a recipe's estimated sensitivity table whose largest single-layer estimate is over
    OVERSTATE_RATIO times the measured end-to-end change with every layer in low precision, else ""."""
    measured = next((r.get("loss_rel_change") for r in e2e if r.get("strategy") == strategy), None)
    if not _isnum(measured) or not math.isfinite(measured):
        return ""
    est = [r for r in rows if _isnum(r.get("only_lp_loss_rel_change")) and math.isfinite(r["only_lp_loss_rel_change"])]
    if not est:
        return ""
    top = max(est, key=lambda r: abs(r["only_lp_loss_rel_change"]))
    value = top["only_lp_loss_rel_change"]
    if abs(value) < OVERSTATE_MIN or abs(value) <= OVERSTATE_RATIO * abs(measured):
        return ""
    return (f"The estimate for {top.get('layer')} alone ({signed_pct(value)}) is over {OVERSTATE_RATIO:g}x the measured "
            f"change with every layer in low precision ({signed_pct(measured)}): the estimate's second-order term grows "
            "with the square of the error and overstates layers whose error is large. Read this table as a ranking; "
            "--sensitivity measured runs each layer.")


def _sensitivity_section(tables: Mapping, keep_db: float, recommended: str | None,
                         needs_keep: Mapping[str, int]) -> dict | None:
    """One table per recipe, the method said once for the section. Open: the recommended recipe's table (first), the
    one a reader acts on; then those of recipes that needed a keep-set; each collapsed table under a line naming its
    most sensitive layer (15 open tables of 13 rows, each line repeating the estimator's formula: QA C2, A5).
    Without a recommendation in these results, the first table is open."""
    rows = tables.get("sensitivity", [])
    if not rows:
        return None
    budget_kind = next((r.get("budget_kind") for r in tables.get("recommendation", []) if r.get("kind") == "strategy"),
                       None)
    methods = list(dict.fromkeys(str(r.get("method") or "") for r in rows if r.get("method")))
    kept = _keep_sets(tables)
    out = []
    for s in dict.fromkeys(r.get("strategy") for r in rows):
        mine = sorted((r for r in rows if r.get("strategy") == s),
                      key=lambda r: r["rank"] if _isnum(r.get("rank")) else math.inf)
        sid = "".join(ch if ch.isalnum() else "-" for ch in str(s))
        labels = list(dict.fromkeys(_method_parts(str(r.get("method")))[0] for r in mine if r.get("method")))
        # estimated: "only this 16-bit" is the end-to-end change minus this layer's estimate (analysis/e2e.py
        # METHOD_ESTIMATED, whose label this is), so it moves little down the column (QA A5); the header says so
        only_hp = ("loss change (only this 16-bit: end to end − estimate)" if labels == ["estimated"]
                   else "loss change (only this 16-bit)")
        # "plan": the layers this recipe's keep-set keeps in 16-bit, beside their names (QA A5: a keep-set skips
        # ranks, and nothing in the table said which layers it kept)
        keep = kept.get(s, set())
        plan = ["plan"] if keep else []
        columns, cells = _without_empty_columns(
            ["rank", "layer", *plan, "forward index", "loss change (only this LP)", "KL (only this LP)", only_hp,
             "KL (only this 16-bit)", "isolated fprop SQNR dB"],
            [[cell(r.get("rank"), "{:.0f}"), cell(r.get("layer")),
              *([cell("16-bit", cls="txt plan strong") if str(r.get("layer")) in keep else cell("", cls="txt plan")]
                if plan else []),
              cell(r.get("index"), "{:.0f}"),
              _change_cell(r.get("only_lp_loss_rel_change")), cell(r.get("only_lp_kl"), "{:.3g}"),
              _change_cell(r.get("only_hp_loss_rel_change")), cell(r.get("only_hp_kl"), "{:.3g}"),
              _sqnr_cell(r.get("isolated_fprop_sqnr_db"), keep_db)] for r in mine], first=3 + len(plan))
        top = mine[0]
        # the top layer's change in the metric it was ranked by (the KL with a kl: budget when measured)
        top_value = (f"KL {top['only_lp_kl']:.3g}" if budget_kind == "kl" and _isnum(top.get("only_lp_kl"))
                     else f"loss {signed_pct(top.get('only_lp_loss_rel_change'))}")
        overstated = _overstated(mine, tables.get("e2e", []), s) if labels == ["estimated"] else ""
        out.append({"strategy": s, "n_layers": len(mine), "top_layer": top.get("layer"), "top_value": top_value,
                    "overstated": overstated,
                    "recommended": s == recommended, "keep_set": needs_keep.get(s, 0),
                    # the method by name only where the section has more than one
                    "method": ", ".join(labels) if len(methods) > 1 else "",
                    "table": _table(f"sens-{sid}", columns, cells)})
    out.sort(key=lambda t: (not t["recommended"], not t["keep_set"]))  # stable: the rest keep the run's order
    # Only one open: with a kl: budget every recipe had a keep-set and all 15 tables opened (555 rows, QA). The
    # keep-set recipes come next, collapsed, their lines saying so.
    for t in out:
        t["open"] = t["recommended"]
    if not any(t["open"] for t in out):
        out[0]["open"] = True
    opened = (["the recommended recipe's table"] if any(t["recommended"] for t in out) else
              ["the first recipe's table" + (" (no end-to-end recommendation in these results)"
                                              if recommended is None else "")])
    return {"methods": [dict(zip(("label", "text"), _method_parts(m))) for m in methods], "tables": out,
            "plan": any(t["table"]["columns"][2:3] == ["plan"] for t in out),
            "open_note": (f"Open: {' and '.join(opened)}; the others are collapsed under their most sensitive layer "
                          "(click a line to open its table)." if not all(t["open"] for t in out) else "")}


def _training_section(tables: Mapping, draw: bool) -> dict | None:
    rows = tables.get("training", [])
    if not rows:
        return None
    series = []
    for s in dict.fromkeys(r.get("strategy") for r in rows):
        pts = sorted((r["step"], r.get("loss")) for r in rows if r.get("strategy") == s and _isnum(r.get("step")))
        series.append({"label": "high precision" if s == "hp" else str(s), "x": [p[0] for p in pts],
                       "y": [p[1] for p in pts], "mark_x": None})
    last: dict = {}  # each strategy's last step (its final numbers, or the note saying why they are missing)
    for r in rows:
        if _isnum(r.get("step")) and (r.get("strategy") not in last or r["step"] > last[r.get("strategy")]["step"]):
            last[r.get("strategy")] = r
    final = list(last.values())
    figure = None
    if draw and series:
        figure = figures.figure_to_data_uri(figures.sweep_panels([{"title": "training loss per step", "series": series,
                                                                   "xlabel": "step", "ylabel": "loss"}], ncols=1))
    # The ratio is of the mean of the last few losses (one step's loss is noisy): the mean is shown beside it, so
    # the two columns divide. Results written before the mean was stored show "–" there.
    windows = {r.get("final_window") for r in final}
    n = next(iter(windows)) if len(windows) == 1 and _isnum(next(iter(windows))) else None
    last_n = f"last {n:.0f} step{'s' if n != 1 else ''}" if n is not None else "last steps // 10 steps (at least 1)"
    caption = (f"Per run, at its last step: that step's loss; the mean loss over its {last_n} and that mean over the "
               "high-precision run's; weight drift ‖θ − θ_hp‖ / ‖θ_hp − θ_0‖ (how far the recipe's weights end from "
               "the high-precision ones, relative to how far high-precision training moved them); the step a run "
               "diverged from (loss not finite, or far above its untrained value: the note says which)")
    return {"figure": figure, "caption": caption, "table": _table("training-table", [
        "strategy", "steps", "last-step loss", f"mean loss, {last_n}", "mean / high precision's", "weight drift",
        "diverged from step", "note"], [
        [cell("high precision" if r.get("strategy") == "hp" else r.get("strategy")),
         cell(r.get("step"), "{:.0f}"),  # (steps are numbered from 1)
         cell(r.get("loss"), "{:.4g}"), cell(r.get("final_loss"), "{:.4g}"), cell(r.get("final_loss_ratio"), "{:.4f}"),
         cell(r.get("weight_drift"), "{:.3g}"),
         cell(r["diverged_step"], "{:.0f}", "bad") if _isnum(r.get("diverged_step")) and math.isfinite(r["diverged_step"])
         else cell(None),
         cell(r.get("note") or "", None, "bad" if str(r.get("note") or "").startswith("diverged") else "")]
        for r in final])}


#: Fewer delayed-scale casts per GEMM site than this and the Delayed scaling section warns that it measures little:
#: each site's first cast uses its own amax, so a run of B batches tests the amax history B − 1 times per site.
DELAYED_FEW_CASTS = 4


def _delayed_section(tables: Mapping) -> dict | None:
    """Delayed scaling per layer and operand: batches whose amax overflowed the scale from the history; a one-line
    summary (saturating rows, the worst), how many casts per site used a delayed scale, and the table (without a
    strategy column that says "delayed" on every row; folded beyond OPEN_DETAILS_ROWS rows like the other per-layer
    tables: 111 rows on a 4-layer Llama, QA C1)."""
    rows = tables.get("delayed_scaling", [])
    if not rows:
        return None

    def share(r: Mapping) -> float | None:
        return r["saturated"] / r["elements"] if _isnum(r.get("saturated")) and _isnum(r.get("elements")) \
            and r["elements"] > 0 else None

    second = _second_activation_sites(tables)
    by_strategy = len({r.get("strategy") for r in rows}) > 1
    # "casts", not "batches": the counts are casts of the operand, one per batch at a linear site but one per batch
    # and head slice at an attention GEMM (QA: "batches" read 128 for a run of 4 batches)
    table = _table("delayed-scaling", ["layer", *(["strategy"] if by_strategy else []), "operand", "casts",
                                       "first casts (own amax)", "overflow casts", "saturated elements",
                                       "saturated share", "max amax / amax of the scale"], [
        [cell(r.get("layer")), *([cell(r.get("strategy"))] if by_strategy else []),
         cell(_operand_label(r.get("layer"), r.get("operand"), second)),
         cell(r.get("batches"), "{:.0f}"), cell(r.get("warmup_batches"), "{:.0f}"),
         _muted_if_zero(cell(r.get("overflow_batches"), "{:.0f}", "bad" if _isnum(r.get("overflow_batches"))
                             and r["overflow_batches"] else ""), r.get("overflow_batches")),
         _muted_if_zero(cell(r.get("saturated"), "{:.0f}"), r.get("saturated")),
         _muted_if_zero(_small_share(v), v) if (v := share(r)) is not None else cell(None),
         # (at most 1: no cast's amax exceeded the one its scale was made for, as quiet as a zero)
         _muted_if_zero(cell(r.get("max_amax_ratio"), "{:.3f}"),
                        0 if _isnum(r.get("max_amax_ratio")) and r["max_amax_ratio"] <= 1 else None)] for r in rows])
    # Saturation under the delayed scale needs an overflow cast: results written before the count was of clipped
    # elements also counted an amax element at the format's max on an own-amax cast (QA A2: "no cast used a delayed
    # scale", then "38 of 813 layer operands saturated under the delayed scale").
    saturating = [r for r in rows if _isnum(r.get("saturated")) and r["saturated"] > 0
                  and not (_isnum(r.get("overflow_batches")) and r["overflow_batches"] == 0)]
    worst = max(saturating, key=lambda r: (share(r) or 0.0, r["saturated"]), default=None)
    # Per row (GEMM site): first casts = its own-amax casts, one per head slice at an attention GEMM; batches =
    # casts / first casts; delayed casts = casts − first casts (QA C1: "only 1 cast per site" beside 4 delayed
    # casts at every #qk/#pv site of a 2-batch run).
    counted = [r for r in rows if _isnum(r.get("batches")) and _isnum(r.get("warmup_batches"))
               and r["warmup_batches"] > 0]
    batches = sorted({round(r["batches"] / r["warmup_batches"]) for r in counted})
    delayed = sorted({round(r["batches"] - r["warmup_batches"]) for r in counted})
    sliced = sorted({round(r["batches"] - r["warmup_batches"]) for r in counted if r["warmup_batches"] > 1})
    plain = sorted({round(r["batches"] - r["warmup_batches"]) for r in counted if r["warmup_batches"] == 1})
    return {"table": table, "collapsed": len(rows) > OPEN_DETAILS_ROWS,
            "n_rows": len(rows), "n_saturating": len(saturating),
            "n_layers": len({r.get("layer") for r in rows}),
            "saturating_layers": len({r.get("layer") for r in saturating}),
            "worst": None if worst is None else {
                "layer": str(worst.get("layer")), "operand": _operand_label(worst.get("layer"), worst.get("operand"), second),
                "saturated": f"{worst['saturated']:.0f}",
                "share": _small_share(share(worst))["text"] if share(worst) is not None else "–"},
            "max_ratio": max((f"{r['max_amax_ratio']:.3g}" for r in rows if _isnum(r.get("max_amax_ratio"))),
                             key=float, default=""),
            "batches": _count_range(batches), "delayed_casts": delayed[-1] if delayed else None,
            "delayed_text": _delayed_casts_text(plain, sliced) if delayed and delayed[-1] else "",
            "few": bool(batches) and batches[0] - 1 < DELAYED_FEW_CASTS, "few_limit": DELAYED_FEW_CASTS}


def _muted_if_zero(c: dict, value: Any) -> dict:
    """A cell grey when ``value`` is 0: most rows of the delayed-scaling table are zeros (no overflow, nothing
    saturated), and in black they read as numbers to look at beside the few that matter (QA)."""
    return {**c, "cls": f"{c['cls']} muted".strip()} if _isnum(value) and value == 0 else c


def _count_range(values: list[int]) -> dict | None:
    """{"text": "2" or "2–4", "one": the count is 1} of sorted counts, None for none."""
    if not values:
        return None
    return {"text": f"{values[0]}" if values[0] == values[-1] else f"{values[0]}–{values[-1]}", "one": values == [1]}


def _delayed_casts_text(plain: list[int], sliced: list[int]) -> str:
    """How many casts per GEMM site used a delayed scale, from the delayed-cast counts of the sites with one slice
    (``plain``) and of those with head slices (``sliced``): "1 cast per site used a delayed scale (4 at an
    attention GEMM: …)"."""
    def casts(values: list[int]) -> str:
        r = _count_range(values)
        return f"{r['text']} cast{'' if r['one'] else 's'}"

    slices = "one per head slice and batch after the first"
    if not sliced:
        return f"{casts(plain)} per site used a delayed scale"
    if not plain:
        return f"{casts(sliced)} per site used a delayed scale ({slices})"
    return f"{casts(plain)} per site used a delayed scale ({_count_range(sliced)['text']} at an attention GEMM: {slices})"


def _recipe_options(meta: Mapping) -> list[str]:
    """The run-wide recipe settings (metadata "recipe_options"), one line each; [] for older results."""
    opts = meta.get("recipe_options") or {}
    lines = []
    if opts.get("int8_row_scale"):
        lines.append(f"LLM.int8 row scale: {opts['int8_row_scale']}")
    acc = opts.get("accumulation")
    lines.append("accumulation: float32 (exact)" if not acc else
                 f"accumulation: {acc.get('mantissa_bits')} mantissa bits, truncated, promoted to float32 every "
                 f"{acc.get('promote_every')} elements (FP8 recipes)")
    d = opts.get("delayed_scaling")
    if d:
        lines.append(f"delayed scaling: amax history {d.get('amax_history')}, {d.get('amax_compute')}, margin "
                     f"{d.get('margin')}, first batch: {d.get('first_batch')}")
    return lines if opts else []


def _coverage_section(tables: Mapping) -> dict | None:
    rows = tables.get("coverage", [])
    if not rows:
        return None
    return {"table": _table("coverage-table", ["kind", "op", "executed", "captured", "skipped", "reason", "GFLOPs",
                                         "GFLOPs captured", "captured share"], [
        [cell(r.get("kind")), cell(r.get("op")), cell(r.get("executed"), "{:.0f}"), cell(r.get("captured"), "{:.0f}"),
         cell(r.get("skipped"), "{:.0f}", "bad" if _isnum(r.get("skipped")) and r["skipped"] else ""),
         cell(r.get("reason") or ""), cell(r.get("gflops"), _sig), cell(r.get("gflops_captured"), _sig),
         _share(r["gflops_captured"] / r["gflops"]) if _isnum(r.get("gflops")) and r["gflops"] > 0
         and _isnum(r.get("gflops_captured")) else cell(None)] for r in rows])}


def _pooled_blocks(blocks: list[Any]) -> str:
    """The block cell of a pooled block-scales row: the one block all its layers share ("1x32"), or the layers'
    sizes smallest first with a shared suffix said once ("64, 256, 1024 (flattened), by layer": mixed picks a
    block size per layer; the first layer's alone read as if every layer used it)."""
    texts = [str(b) for b in blocks if b is not None]
    if len(texts) <= 1:
        return texts[0] if texts else ""
    suffix = " (flattened)" if all(t.endswith(" (flattened)") for t in texts) else ""
    heads = [t[:len(t) - len(suffix)] for t in texts]
    if all(h.isdigit() for h in heads):
        heads.sort(key=int)
    return f"{', '.join(heads)}{suffix}, by layer"


def _block_scales_section(tables: Mapping, draw: bool) -> dict | None:
    """Per-block scale statistics (analysis/block_scales.py): a model-wide row per strategy and operand
    (blocks of all layers pooled: counts add, min/max over layers), the per-layer table and the
    exponent histograms; None when no block-scaled recipe ran."""
    rows = tables.get("block_scales", [])
    if not rows:
        return None
    second = _second_activation_sites(tables)
    pooled: dict[tuple, dict] = {}
    for r in rows:
        # the second activations of attention GEMMs pooled apart from the weights they are stored as
        operand = SECOND_ACTIVATION if r.get("operand") == "weight" and r.get("layer") in second else r.get("operand")
        p = pooled.setdefault((r.get("strategy"), operand), {
            "format": r.get("format"), "block": {}, "rule": r.get("scale_rule"), "blocks": 0, "clipped": 0.0,
            "under_blocks": 0.0, "min": math.inf, "max": -math.inf, "exps": {}})
        p["block"][r.get("block")] = None  # (mixed: each layer's own block size)
        nb = r.get("n_blocks") or 0
        p["blocks"] += nb
        p["clipped"] += (r.get("clipped_block_frac") or 0) * nb
        p["under_blocks"] += (r.get("underflow_block_frac") or 0) * nb
        if _isnum(r.get("scale_min")):
            p["min"], p["max"] = min(p["min"], r["scale_min"]), max(p["max"], r["scale_max"])
        for k, c in enumerate(r.get("exp_counts") or []):
            e = int(r.get("exp_lo") or 0) + k
            p["exps"][e] = p["exps"].get(e, 0) + c
    # each strategy's operands in one order, the second activations right after the weights they are stored as
    ranks = {s: i for i, s in enumerate(dict.fromkeys(s for s, _ in pooled))}
    order = ("activation", "weight", SECOND_ACTIVATION, "grad_output")

    def operand_rank(op: Any) -> int:
        return order.index(op) if op in order else len(order)

    pooled = dict(sorted(pooled.items(), key=lambda kv: (ranks[kv[0][0]], operand_rank(kv[0][1]))))
    summary = _table("block-scales-summary", ["strategy", "operand", "format", "block", "scale rule", "blocks",
                                              "scale min", "scale max", "exponent span", "clipped blocks",
                                              "blocks with underflow"], [
        [cell(s), cell(op), cell(p["format"]), cell(_pooled_blocks(list(p["block"]))), cell(p["rule"]),
         cell(p["blocks"], "{:.0f}"),
         cell(p["min"] if p["exps"] else None, "{:.3g}"), cell(p["max"] if p["exps"] else None, "{:.3g}"),
         cell(f"{min(p['exps'])} … {max(p['exps'])}" if p["exps"] else None),
         _pct(p["clipped"] / p["blocks"] if p["blocks"] else None),
         _pct(p["under_blocks"] / p["blocks"] if p["blocks"] else None)] for (s, op), p in pooled.items()])
    per_layer = _table("block-scales-table", ["layer", "strategy", "operand", "blocks", "zero blocks", "scale min",
                                        "scale max", "log2 scale std", "clipped blocks", "underflow",
                                        "blocks with underflow", "worst block underflow"], [
        [cell(r.get("layer")), cell(r.get("strategy")), cell(_operand_label(r.get("layer"), r.get("operand"), second)),
         cell(r.get("n_blocks"), "{:.0f}"),
         cell(r.get("zero_blocks"), "{:.0f}"), cell(r.get("scale_min"), "{:.3g}"), cell(r.get("scale_max"), "{:.3g}"),
         cell(r.get("scale_log2_std"), "{:.2f}"), _pct(r.get("clipped_block_frac")), _pct(r.get("underflow_frac")),
         _pct(r.get("underflow_block_frac")), _pct(r.get("max_block_underflow_frac"))] for r in rows])
    figure = None
    if draw:
        operands = sorted(dict.fromkeys(op for _, op in pooled), key=operand_rank)
        panels = [{"title": op, "series": [{"label": s, "exps": sorted(p["exps"]),
                                            "counts": [p["exps"][e] for e in sorted(p["exps"])]}
                                           for (s, o), p in pooled.items() if o == op and p["exps"]]}
                  for op in operands]
        figure = figures.figure_to_data_uri(figures.scale_exponent_histograms(panels))
    return {"summary": summary, "table": per_layer, "figure": figure,
            "collapsed": len(per_layer["rows"]) > OPEN_DETAILS_ROWS}


# "SPEC §7.2" in the rule texts of older results: a section of fp8probe's design notes, not in the report; the
# bitsandbytes function each cites is named beside it.
_SPEC_REF = re.compile(r",\s*SPEC §[^),]*(?=\))|\s*\(SPEC §[^)]*\)")


def _rule_text(text: Any) -> str:
    """A recipe rule as the report shows it: references to the design notes (older results) left out."""
    return _SPEC_REF.sub("", str(text))


def _sentences(text: str) -> list[str]:
    return [t for t in re.split(r"(?<=\.)\s+(?=[A-Z(])", text.strip()) if t]


def _shared_sentences(texts: Sequence[str]) -> list[str]:
    """The sentences every one of two or more texts holds (the batched-GEMM rule every recipe ends with)."""
    if len(texts) < 2:
        return []
    others = [set(_sentences(t)) for t in texts[1:]]
    return [t for t in _sentences(texts[0]) if all(t in o for o in others)]


def _methods(meta: Mapping, strategies: list[str]) -> dict:
    rules = {k: _rule_text(v) for k, v in (meta.get("rules") or {}).items()}
    fmts = meta.get("formats") or {}
    # A sentence in every recipe's rule is said once above the list (QA: the batched-GEMM sentence 15 times); the
    # sweeps' rules (keys that are not strategies) neither count nor lose anything.
    shared = _shared_sentences([v for k, v in rules.items() if k in strategies])
    return {
        "shared": shared,
        "rules": [{"name": k, "text": " ".join(t for t in _sentences(v) if t not in shared) if k in strategies else v}
                  for k, v in rules.items()],
        "options": _recipe_options(meta),
        "formats": _table("formats", ["format", "max", "min normal", "min subnormal",
                                      "dynamic range (bits)", "description"], [
            [cell(name), _pow2_cell(f.get("max")), _pow2_cell(f.get("min_normal")), _pow2_cell(f.get("min_subnormal")),
             cell(math.log2(f["max"] / f["min_subnormal"]) if _isnum(f.get("max")) and _isnum(f.get("min_subnormal"))
                  and f["min_subnormal"] > 0 else None, "{:.1f}"),
             cell(f.get("description", ""))] for name, f in fmts.items()]),
        "strategies": strategies,
    }


def _model_text(meta: Mapping) -> str:
    """The model's description with its parameter count (metadata.parameters) when the description lacks one."""
    desc = str(meta.get("model", ""))
    n = meta.get("parameters")
    if not _isnum(n) or "parameters" in desc:
        return desc
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{desc} ({n / size:.3g} {unit} parameters)"
    return f"{desc} ({n:.0f} parameters)"


def build_report_view(results: Mapping, keep_16bit_db: float = KEEP_16BIT_DB, *, draw: bool = True) -> dict:
    """Turn a results dict into the template's view model (plain dicts, lists, strings and data URIs).

    ``draw=False`` skips the matplotlib figures (about 2-4 s of a render), for tables-only output.
    """
    validate_results(results)
    meta, tables = results["metadata"], results["tables"]
    layers = _layer_order(tables)
    strategies = _strategies(results)
    formats = meta.get("formats") or {}
    recs = meta.get("recommendations") or {}
    gemm = _index(tables.get("gemm", []), "layer", "strategy", "gemm")
    fprop_min = {}
    for (layer, _s, g), r in gemm.items():
        v = metric_value(r)
        if g == "fprop" and v is not None and not math.isnan(v):
            fprop_min[layer] = min(fprop_min.get(layer, math.inf), v)
    loss = meta.get("loss") or {}
    versions = meta.get("versions") or {}
    verdict = _verdict_section(tables, meta, keep_16bit_db)
    differ = meta.get("inputs_differ")
    inputs = (f"differ between the merged runs (their numbers are of other data): {'; '.join(map(str, differ))}"
              if differ else inputs_text(meta))
    info = [("model", _model_text(meta)), ("inputs", inputs),
            ("kind", " + ".join(meta.get("merged_kinds") or [results["kind"]])), ("created", meta.get("created", "")),
            ("device", meta.get("device", "")), ("model dtype", meta.get("dtype") or "not recorded"),
            ("model mode", {"train": "train (dropout on, BatchNorm on batch statistics)",
                            "eval": "eval (as for inference)"}.get(model_mode(meta),
                                                                   "none (weights only: no model run)")),
            ("CPU threads", meta.get("threads") or "not recorded"), ("batches", meta.get("batches", "")),
            ("seed", meta.get("seed", "")),
            # (a sweep-only report has no run threshold: the row was blank; a threshold sweep's swept values instead)
            ("outlier threshold", meta.get("threshold") if meta.get("threshold") is not None else
             ("swept: " + ", ".join(f"{float(t):g}" for t in meta["thresholds"]) if meta.get("thresholds") else
              "not used (no int8 recipe run)")),
            ("GEMMs", gemm_sites_text(len(tables["layers"]), tables, meta)),
            ("coverage", verdict["coverage"] or "not recorded"),
            ("loss", (f"{loss.get('kind', '')}: {loss.get('detail', '')}" if loss else "")
             + (f"; {verdict['loss_hp']}" if verdict["loss_hp"] else "")),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))]
    layer_rows = [[cell(r["layer"]), cell(r.get("in_features"), "{:.0f}"), cell(r.get("out_features"), "{:.0f}"),
                   cell(r.get("has_bias")), cell(r.get("tokens"), "{:.0f}"), cell(r.get("bsz"), "{:.0f}"),
                   cell(r.get("bsz2"), "{:.0f}")] for r in tables["layers"]]
    return {
        "title": f"fp8probe report: {meta.get('name') or meta.get('model') or 'results'}",
        "info": [{"key": k, "value": str(v)} for k, v in info],
        # the banner: what the surrogate is, and whether the end-to-end loss changes are of it (not only the gradients)
        "surrogate_loss": None if loss.get("kind") != "surrogate" else {
            "detail": str(loss.get("detail") or "mean of squares of the model output"),
            "e2e": bool(tables.get("e2e"))},
        "no_gradient": str(loss.get("no_gradient") or ""),
        "frozen": frozen_text(meta),
        "not_run": not_run_text(meta),
        "untrained_bn": untrained_batchnorm_text(meta),
        "n_layers": len(layers),
        # (GEMMs of two activations, attention QKᵀ / PV and matmuls, are GEMM sites but not linear layers)
        "n_activation_gemms": sum(1 for r in tables["layers"] if r.get("b_is_weight") is False),
        "strategies": strategies,
        "keep_db": f"{keep_16bit_db:g}",
        "keep_noise": noise_share(keep_16bit_db),
        "summary": _summary(layers, strategies, tables, keep_16bit_db),
        "nan_inf": _nan_inf(tables),
        "special": _special_values(tables),
        "verdict": verdict,
        "heatmap": _heatmap(layers, strategies, gemm, keep_16bit_db, _verdict_pick(verdict),
                            verdict["recommended"]["keep_16bit"] if verdict["recommended"] else (),
                            frozen=set(meta.get("frozen_layers") or ()),
                            not_run={"dgrad": set(meta.get("no_dgrad_layers") or ()),
                                     "wgrad": set(meta.get("no_wgrad_layers") or ())}),
        "recommendation": _recommendation_section(tables, keep_16bit_db),
        "sensitivity": _sensitivity_section(tables, keep_16bit_db,
                                            verdict["recommended"]["strategy"] if verdict["recommended"] else None,
                                            verdict["needs_keep"]),
        "training": _training_section(tables, draw),
        "delayed": _delayed_section(tables),
        "coverage": _coverage_section(tables),
        "strategy_tables": _strategy_tables(layers, strategies, tables, meta.get("rules") or {}, keep_16bit_db),
        "layers_table": _table("layers", ["layer", "in", "out", "bias", "tokens", "bsz", "bsz2"], layer_rows),
        "range": _range_section(layers, tables, formats, fprop_min, _window_recipe(verdict, strategies),
                                len(strategies), draw,
                                kept=set(verdict["recommended"].get("keep_16bit") or []) if verdict["recommended"] else ()),
        "outliers": _outlier_section(layers, tables),
        "blocksize": _blocksize_section(layers, tables.get("blocksize_sweep", []), recs.get("blocksize_sweep", ""), draw,
                                        {r["layer"]: r.get("bsz") for r in tables["layers"]}, tables),
        "threshold": _threshold_section(layers, tables.get("threshold_sweep", []), recs.get("threshold_sweep", ""), draw,
                                        tables, meta.get("threshold")),
        "methods": _methods(meta, strategies),
        "weights": _weights_section(meta, tables),
        "block_scales": _block_scales_section(tables, draw),
        # analysis records a recipe that raised on a layer instead of aborting the run
        "errors": _table("errors", ["layer", "strategy", "error"],
                         [[cell(r.get("layer")), cell(r.get("strategy")), cell(r.get("error"))]
                          for r in tables.get("errors", [])]),
    }


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------
def table_rows(rows: Sequence[Sequence[Mapping]], ncols: int) -> Markup:
    """The <tbody> rows of the table macro (templates/_macros.html.j2): one ``<tr>`` line per row, each cell
    ``<td class=".." data-sort="..">text</td>`` (class when truthy, data-sort when not None, title when the cell has
    one, every value escaped; a cell with "details" folds that text under its own in a closed ``<details>``), or one
    "no rows" row. Markup built here rather than by a loop in the template: a Llama-sized
    report has ~70k cells, and jinja's attribute lookups and escapes per cell took ~1.5 s of its ~3 s."""
    if not rows:
        return Markup(f'<tr><td colspan="{ncols}" class="empty">no rows</td></tr>\n')
    out: list[str] = []
    add = out.append
    for row in rows:
        add("<tr>")
        for c in row:
            cls, sort = c["cls"], c["sort"]
            add(f'<td class="{escape(cls)}"' if cls else "<td")
            if sort is not None:
                add(f' data-sort="{escape(sort)}"')
            if c.get("title"):  # (a flagged cell says why on hover: _verdict_section)
                add(f' title="{escape(c["title"])}"')
            if c.get("details"):  # (a long list folded under its count, closed: _keep_cell)
                add(f'><details><summary>{escape(c["text"])}</summary>{escape(c["details"])}</details></td>')
            elif c.get("sup") is not None:  # (a power: 2<sup>-9</sup>, _pow2_cell)
                add(f'>{escape(c["text"])}<sup>{escape(c["sup"])}</sup></td>')
            else:
                add(f'>{escape(c["text"])}</td>')
        add("</tr>\n")
    return Markup("".join(out))


def sentence(text: Any) -> str:
    """``text`` with its first letter upper-cased and the rest as it is (jinja's capitalize lower-cases the rest, and
    would turn "KL" into "kl"): the verdict's lines and notes are written for the terminal, lower-case after its
    "verdict:" / "warning:" labels, and stood in the report's banners and lists as sentences without a capital (QA)."""
    text = str(text)
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment: package templates, autoescape on, StrictUndefined (a typo is an error)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fp8probe", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals["table_rows"] = table_rows
    env.filters["sentence"] = sentence
    return env


def _write(html: str, out_html: str | Path) -> Path:
    out = Path(out_html)
    if out.parent.exists() and not out.parent.is_dir():  # (mkdir(exist_ok=True) says "File exists" about it)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html)
    return out


def render_report(results: Mapping, out_html: str | Path, keep_16bit_db: float = KEEP_16BIT_DB, *,
                  draw: bool = True) -> Path:
    """Render ``results`` (a results dict, see docs/architecture.md) to one self-contained HTML file.

    Returns the path written. Raises ValueError when ``results`` does not follow the schema and
    jinja2.UndefinedError when the view model misses a field the template needs.
    """
    view = build_report_view(results, keep_16bit_db, draw=draw)
    html = environment().get_template("report.html.j2").render(v=view)
    return _write(html, out_html)


def render_compare(comparison: Mapping, out_html: str | Path) -> Path:
    """Render a comparison (``fp8probe.report.compare.compare_results`` output) to one HTML file."""
    from fp8probe.report.compare import build_compare_view

    view = build_compare_view(comparison)
    html = environment().get_template("compare.html.j2").render(v=view)
    return _write(html, out_html)
