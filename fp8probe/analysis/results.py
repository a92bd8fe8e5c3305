"""Analysis results: run metadata + pandas tables, saved atomically as versioned JSON (the report's only input) and CSV."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fp8probe.report.files import run_outputs, as_utf8_text, atomic_write_text, remove_outputs
from fp8probe.report.schema import KINDS, SCHEMA, ResultsError, parse_results_json, validate_results
from fp8probe.report.schema import SCHEMA_VERSION as VERSION

JSON_NAME = "results.json"


def _clean(value: Any) -> Any:
    """JSON-safe value: NaN/±Inf → None (strict JSON has neither), numpy scalars → Python, lists recursed, text
    as real characters (files.as_utf8_text: a run name or path decoded from the command line under an ASCII
    locale holds surrogates, which json.dumps would write as escapes no UTF-8 reader can encode again)."""
    kind = type(value)  # the leaves first: a Llama-sized results document has ~0.5M of them
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is str:
        return value if value.isascii() else as_utf8_text(value)
    if kind is int or kind is bool or value is None:
        return value
    if isinstance(value, dict):
        return {as_utf8_text(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar / array
        return _clean(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Results:
    """Run metadata (see docs/architecture.md, "Analysis results JSON") and named tables.

    Non-finite floats (an SQNR of +inf for an exact GEMM, NaN kurtosis of a constant tensor) are
    written as JSON ``null``; CSV cells keep ``inf``/``nan``. List-valued cells (histogram edges,
    top_dims, col_amax) are JSON-encoded strings in the CSV files.
    """

    metadata: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    kind: str = "analyze"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        for name, table in self.tables.items():
            if not isinstance(table, pd.DataFrame):
                raise TypeError(f"table {name!r} must be a pandas DataFrame, got {type(table).__name__}")

    def to_json(self) -> dict:
        """The versioned results document as a JSON-safe dict."""
        return {"schema": SCHEMA, "version": VERSION, "kind": self.kind, "metadata": _clean(self.metadata),
                "tables": {name: _clean(t.to_dict("records")) for name, t in self.tables.items()}}

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write results.json and one <table>.csv per table into ``out_dir`` (created); returns {"json"|table: path}.

        Over an earlier results set the files this one does not replace (its other tables' CSVs, index.html) are
        deleted, so the directory never mixes two runs. Results that load() would refuse are refused here
        (ResultsError), before anything is written."""
        out = Path(out_dir)
        doc = self.to_json()
        validate_results(doc, "results")  # (a set load() refuses was written: no layers table)
        try:
            text = json.dumps(doc, indent=1, allow_nan=False)
        except TypeError as exc:  # (json's bare "Object of type PosixPath is not JSON serializable")
            raise TypeError(f"results hold a value JSON cannot store ({exc}): metadata and table cells must be "
                            "str, int, float, bool, None, lists or dicts of them") from exc
        out.mkdir(parents=True, exist_ok=True)
        # An earlier results set in the directory: its files this set does not replace would sit beside the new
        # results.json (an e2e.csv of a run that had no end-to-end part), so they go before it is written.
        stale = [p for p in run_outputs(out) if p.name != JSON_NAME and p.stem not in self.tables] \
            if (out / JSON_NAME).is_file() else []
        paths: dict[str, Path] = {}
        for name, table in self.tables.items():
            csv_table = table.copy()
            for col in csv_table.columns:
                if csv_table[col].map(lambda v: isinstance(v, (list, tuple, dict))).any():
                    csv_table[col] = csv_table[col].map(lambda v: json.dumps(_clean(v)))
            path = out / f"{name}.csv"
            atomic_write_text(path, csv_table.to_csv(index=False))
            paths[name] = path
        remove_outputs(stale)
        # results.json last: its presence means the whole set was written.
        atomic_write_text(out / JSON_NAME, text)
        paths["json"] = out / JSON_NAME
        return paths

    def to_html(self, path: str | Path, *others: Results, keep_16bit_db: float = 20.0) -> Path:
        """Render these results (merged with ``others``: sweep runs of the same model) into one
        self-contained HTML report at ``path``; returns the path written (atomically)."""
        from fp8probe.report.render import render_report

        doc = self.to_json()
        if others:
            doc = self.merged(*others).to_json()
        return render_report(doc, path, keep_16bit_db)

    def merged(self, *others: Results) -> Results:
        """One Results for one model: this run's tables plus those of ``others`` (e.g. an analyze run and
        its sweeps; fp8probe.report.merge.merge_results rules). ValueError for different models or a
        table carried twice."""
        from fp8probe.report.merge import merge_results

        for o in others:
            if not isinstance(o, Results):
                raise TypeError(f"expected Results to merge, got {type(o).__name__}")
        doc = merge_results([self.to_json(), *(o.to_json() for o in others)],
                            [f"{r.kind} results" for r in (self, *others)])
        return Results.from_json(doc)

    @classmethod
    def from_json(cls, doc: Any, source: str = "results") -> Results:
        """Validate a parsed results document and build Results (ResultsError on any mismatch)."""
        validate_results(doc, source)
        meta, tables = doc["metadata"], doc["tables"]
        frames = {}
        for name, records in tables.items():
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ResultsError(f"{source}: table {name!r} must be a list of records")
            frames[name] = pd.DataFrame.from_records(records)
        return cls(metadata=meta, tables=frames, kind=doc["kind"])

    @classmethod
    def load(cls, path: str | Path) -> Results:
        """Read results.json (or a directory holding it) and validate schema and version."""
        p = Path(path)
        if p.is_dir():
            p = p / JSON_NAME
        try:
            doc = parse_results_json(p.read_text(encoding="utf-8"), str(p))
        except FileNotFoundError:
            raise ResultsError(f"{p}: no such results file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: a hostile file of 100k nested brackets exhausts json's recursion limit
            raise ResultsError(f"{p}: cannot read results JSON ({exc})") from None
        return cls.from_json(doc, str(p))
