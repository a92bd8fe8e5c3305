"""The results JSON contract (docs/architecture.md): schema name, version, kinds, and one validator for writer and reader."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA = "fp8probe.results"
SCHEMA_VERSION = 1
KINDS = ("analyze", "sweep-blocksize", "sweep-threshold")
REQUIRED_TABLES = ("layers",)


class ResultsError(ValueError):
    """A document that is not fp8probe results of a supported version."""


def validate_results(results: Any, source: str = "results") -> None:
    """Check schema, version, kind, metadata and that every table is a list of records (ResultsError, one line)."""
    if not isinstance(results, Mapping):
        raise ResultsError(f"{source}: expected a JSON object with schema {SCHEMA!r}, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ResultsError(f"{source}: not an fp8probe results file (schema {results.get('schema')!r}, expected {SCHEMA!r})")
    if results.get("version") != SCHEMA_VERSION:
        raise ResultsError(f"{source}: results version {results.get('version')!r} is not supported (expected {SCHEMA_VERSION})")
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
