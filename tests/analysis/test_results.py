"""Results JSON/CSV: schema round trip, strict JSON for non-finite values, atomic writes, validation errors."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from fp8probe.report import files

from fp8probe.analysis import results as R
from fp8probe.analysis.results import Results, ResultsError


def _results() -> Results:
    layers = pd.DataFrame([{"layer": "fc1", "in_features": 8, "out_features": 4, "has_bias": True, "tokens": 16,
                            "bsz": 64, "bsz2": 64}])
    gemm = pd.DataFrame([{"layer": "fc1", "strategy": "global", "gemm": "fprop", "sqnr_db": math.inf,
                          "rel_err": 0.0, "cosine": 1.0, "max_abs_err": 0.0},
                         {"layer": "fc1", "strategy": "global", "gemm": "dgrad", "sqnr_db": 31.5,
                          "rel_err": 0.027, "cosine": 0.9996, "max_abs_err": 0.01}])
    hist = pd.DataFrame([{"layer": "fc1", "tensor": "activation", "edges": [0, 1, 2], "counts": [3, 4]}])
    return Results({"name": "t", "threshold": 6.0, "kurt": math.nan}, {"layers": layers, "gemm": gemm, "histograms": hist})


def test_round_trip(tmp_path) -> None:
    res = _results()
    paths = res.save(tmp_path / "out")
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == "fp8probe.results" and doc["version"] == 2 and doc["kind"] == "analyze"
    assert doc["tables"]["gemm"][0]["sqnr_db"] is None  # +inf → null (strict JSON)
    assert doc["metadata"]["kurt"] is None
    back = Results.load(tmp_path / "out")
    assert back.tables["gemm"]["sqnr_db"].iloc[1] == 31.5
    assert back.tables["histograms"]["counts"].iloc[0] == [3, 4]
    csv = pd.read_csv(paths["histograms"])
    assert json.loads(csv["edges"].iloc[0]) == [0, 1, 2]
    assert pd.read_csv(paths["gemm"])["sqnr_db"].iloc[0] == math.inf


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    _results().save(out)
    before = (out / "results.json").read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    res = _results()
    res.metadata["name"] = "second"
    with pytest.raises(OSError, match="disk full"):
        res.save(out)
    assert (out / "results.json").read_text() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("doc, message", [
    ([], "expected a JSON object"),
    ({"schema": "other"}, "not an fp8probe results file"),
    ({"schema": "fp8probe.results", "version": 99}, "version 99 is not supported"),
    ({"schema": "fp8probe.results", "version": 1, "kind": "x"}, "kind must be"),
    ({"schema": "fp8probe.results", "version": 1, "kind": "analyze", "metadata": {}, "tables": {}},
     "required table 'layers'"),
    ({"schema": "fp8probe.results", "version": 1, "kind": "analyze", "metadata": {}, "tables": {"layers": 3}},
     "list of records"),
])
def test_validation_errors(tmp_path, doc, message) -> None:
    p = tmp_path / "r.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=message):
        Results.load(p)


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(ResultsError, match="no such results file"):
        Results.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultsError, match="cannot read results JSON"):
        Results.load(bad)


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        Results({}, {}, kind="nope")
    with pytest.raises(TypeError, match="DataFrame"):
        Results({}, {"layers": [1, 2]})


def test_version_1_files_still_load(tmp_path) -> None:
    """Schema version 2 (end-to-end tables) reads version-1 files unchanged; an unknown version is refused."""
    from fp8probe.report.schema import SCHEMA_VERSION, SUPPORTED_VERSIONS

    assert SCHEMA_VERSION == 2 and 1 in SUPPORTED_VERSIONS
    doc = {"schema": "fp8probe.results", "version": 1, "kind": "analyze", "metadata": {"name": "old"},
           "tables": {"layers": [{"layer": "fc"}]}}
    res = Results.from_json(doc)
    assert res.metadata["name"] == "old" and list(res.tables["layers"]["layer"]) == ["fc"]
    for bad in (3, True, "2"):
        with pytest.raises(ResultsError, match="not supported"):
            Results.from_json({**doc, "version": bad})


def test_save_over_an_earlier_set_leaves_no_file_of_it(tmp_path) -> None:
    """Results.save left an earlier run's e2e.csv / sensitivity.csv / index.html beside the new results.json: a CI step
    reading e2e.csv saw end-to-end numbers of a run that had none. A user's own files stay."""
    full = _results()
    full.tables["e2e"] = pd.DataFrame([{"strategy": "global", "loss_rel_change": 0.001}])
    out = tmp_path / "out"
    full.save(out)
    (out / "index.html").write_text("<html>old report</html>")
    (out / "notes.txt").write_text("mine")
    less = _results()
    less.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["gemm.csv", "histograms.csv", "layers.csv", "notes.txt",
                                                     "results.json"]
    assert set(Results.load(out).tables) == {"layers", "gemm", "histograms"}
    # a directory with no results.json is not an earlier set: a file that happens to share a table's name stays
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "e2e.csv").write_text("mine")
    less.save(fresh)
    assert (fresh / "e2e.csv").read_text() == "mine"


def test_save_refuses_what_load_would_refuse_before_writing(tmp_path) -> None:
    """Results({}, {}).save wrote a results.json that load() and to_html() refused; metadata JSON cannot hold failed
    with json's bare TypeError."""
    with pytest.raises(ResultsError, match="required table 'layers' is missing"):
        Results({}, {}).save(tmp_path / "a")
    res = _results()
    res.metadata["path"] = tmp_path
    with pytest.raises(TypeError, match="results hold a value JSON cannot store .*PosixPath"):
        res.save(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
