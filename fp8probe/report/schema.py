"""The results JSON contract (docs/architecture.md): schema name, version, kinds, and one validator for writer and reader."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fp8probe.report.files import as_utf8_text

SCHEMA = "fp8probe.results"
# Version 2 added the end-to-end tables (e2e, sensitivity, recommendation, training; all optional):
# version-1 files are still read as they are.
SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
KINDS = ("analyze", "sweep-blocksize", "sweep-threshold")
REQUIRED_TABLES = ("layers",)

# Why a gemm/operands row's error metrics are not plain finite numbers (its `note` column; strict
# JSON has no NaN/Inf, so ±inf and NaN are all written as null and the note tells them apart).
#: How a recommendation row's note begins when its plan is the nearest to an unreachable budget of every
#: recipe's (analysis/e2e.py writes it, report/verdict.py quotes it).
NOTE_NEAREST_PLAN = "nearest of all recipes: "
#: How a recommendation row's note begins when no keep-set was searched for its recipe (a KL budget on an output that
#: is no distribution): its within_budget and n_keep are null (older results wrote false and 0).
NOTE_NOT_SEARCHED = "not searched: "
NOTE_EXACT = "exact"                          # error exactly 0: SQNR +inf (also when the reference is all zero)
NOTE_ZERO_SIGNAL = "zero signal"              # reference all zero, result not: SQNR −inf
NOTE_NO_ELEMENTS = "no elements"              # empty batch (0 tokens): SQNR/rel_err/cosine undefined
NOTE_NO_FINITE_REFERENCE = "no finite reference"  # every reference element NaN/±Inf: undefined
NOTE_LP_NONFINITE = "low precision non-finite"    # every finite reference element came out NaN/±Inf: undefined
NOTES = (NOTE_EXACT, NOTE_ZERO_SIGNAL, NOTE_NO_ELEMENTS, NOTE_NO_FINITE_REFERENCE, NOTE_LP_NONFINITE)


def metric_value(row: Mapping, key: str = "sqnr_db") -> float | None:
    """A row's metric as a float with the JSON nulls decoded by its note: +inf for "exact", −inf for a
    zero-signal SQNR, NaN for an undefined one; None when the row has no such metric at all."""
    value = row.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if key not in row:
        return None
    note = row.get("note")
    is_sqnr = key.endswith("sqnr_db")  # gemm/operands sqnr_db, threshold_sweep fprop_sqnr_db
    if note == NOTE_EXACT and (is_sqnr or key == "rel_err"):
        return math.inf if is_sqnr else 0.0
    if note == NOTE_ZERO_SIGNAL and (is_sqnr or key == "rel_err"):
        return -math.inf if is_sqnr else math.inf
    return math.nan


class ResultsError(ValueError):
    """A document that is not fp8probe results of a supported version."""


# JSON integers are unbounded, floats are not: an integer beyond float64's range (~1.8e308) would raise
# OverflowError wherever a table value is used as a number, so it is refused when the file is read.
_MAX_INT_DIGITS = 308
# A JSON escape of a UTF-16 surrogate (\ud800..\udfff): only then can a parsed string hold a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


def weight_shapes(layer_rows: Sequence[Mapping]) -> dict[Any, tuple]:
    """layer → its weight's (out, in) from a ``layers`` table; GEMMs of two activations (b_is_weight false) are left
    out, their sizes follow the inputs (compare and merge tell two models apart by these)."""
    return {r.get("layer"): (r.get("out_features"), r.get("in_features")) for r in layer_rows
            if r.get("b_is_weight") is not False and r.get("out_features") is not None}


def parse_results_json(text: str, source: str = "results") -> Any:
    """``json.loads`` for results files: integers must fit a float64 (ResultsError naming ``source`` otherwise)."""
    import json

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > _MAX_INT_DIGITS:
            raise ResultsError(f"{source}: an integer of {len(digits.lstrip('-'))} digits is out of range (expected a "
                               "number that fits a float64)")
        return int(digits)

    def parse_constant(token: str) -> float:
        raise ResultsError(f"{source}: the JSON holds a {token} token; fp8probe writes strict JSON, where such a "
                           "metric is null with a note (an edited file, or not written by fp8probe?)")

    doc = json.loads(text, parse_int=parse_int, parse_constant=parse_constant)
    # Results written by earlier versions under an ASCII locale hold "\udcc3\udca9" for the "é" of a run name or
    # path: read as the text it was, so a report or compare of such a file can be written as UTF-8.
    return _repaired_text(doc) if _SURROGATE_ESCAPE.search(text) else doc


def _repaired_text(value: Any) -> Any:
    """``value`` (parsed JSON) with every string, keys included, passed through files.as_utf8_text."""
    if isinstance(value, str):
        return as_utf8_text(value)
    if isinstance(value, list):
        return [_repaired_text(v) for v in value]
    if isinstance(value, dict):
        return {as_utf8_text(k): _repaired_text(v) for k, v in value.items()}
    return value


def validate_results(results: Any, source: str = "results") -> None:
    """Check schema, version, kind, metadata and that every table is a list of records (ResultsError, one line)."""
    if not isinstance(results, Mapping):
        raise ResultsError(f"{source}: expected a JSON object with schema {SCHEMA!r}, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ResultsError(f"{source}: not an fp8probe results file (schema {results.get('schema')!r}, expected {SCHEMA!r})")
    version = results.get("version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ResultsError(f"{source}: results version {version!r} is not supported (expected one of "
                           f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    if results.get("kind") not in KINDS:
        raise ResultsError(f"{source}: kind must be one of {', '.join(KINDS)}, got {results.get('kind')!r}")
    if not isinstance(results.get("metadata"), Mapping):
        raise ResultsError(f"{source}: metadata must be an object, got {type(results.get('metadata')).__name__}")
    tables = results.get("tables")
    if not isinstance(tables, Mapping):
        raise ResultsError(f"{source}: tables must be an object, got {type(tables).__name__}")
    for name in REQUIRED_TABLES:
        if name not in tables:
            raise ResultsError(f"{source}: required table {name!r} is missing")
    for name, rows in tables.items():
        if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
            raise ResultsError(f"{source}: table {name!r} must be a list of records")
