"""One report per model: merge_results, `fp8probe report a.json b.json …`, `analyze --sweeps`, Results.to_html."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fp8probe.cli import cli
from fp8probe.report.merge import merge_results
from fp8probe.report.schema import ResultsError

DATA = Path(__file__).parent / "data" / "results_demo_small.json"
TINY = Path(__file__).resolve().parents[1] / "analysis" / "tiny_factory.py"


def _split() -> tuple[dict, dict, dict]:
    """The demo fixture (analyze + both sweeps merged) split back into the three runs it came from."""
    doc = json.loads(DATA.read_text(encoding="utf-8"))
    analyze = copy.deepcopy(doc)
    for t in ("blocksize_sweep", "threshold_sweep"):
        analyze["tables"].pop(t)
    analyze["metadata"]["recommendations"] = {}
    sweeps = []
    for kind, table in (("sweep-blocksize", "blocksize_sweep"), ("sweep-threshold", "threshold_sweep")):
        meta = {**copy.deepcopy(doc["metadata"]), "recommendations": {table: doc["metadata"]["recommendations"][table]},
                "rules": {}, "strategies": []}
        sweeps.append({**{k: doc[k] for k in ("schema", "version")}, "kind": kind, "metadata": meta,
                       "tables": {"layers": doc["tables"]["layers"], table: doc["tables"][table]}})
    return analyze, sweeps[0], sweeps[1]


def test_merge_keeps_every_table_and_puts_analyze_first() -> None:
    analyze, bs, th = _split()
    merged = merge_results([th, analyze, bs], ["th.json", "an.json", "bs.json"])
    assert merged["kind"] == "analyze"
    assert merged["metadata"]["merged_kinds"] == ["analyze", "sweep-threshold", "sweep-blocksize"]
    assert merged["metadata"]["merged_from"] == ["an.json", "th.json", "bs.json"]
    assert set(merged["tables"]) == set(analyze["tables"]) | {"blocksize_sweep", "threshold_sweep"}
    assert merged["tables"]["layers"] == analyze["tables"]["layers"]
    assert set(merged["metadata"]["recommendations"]) == {"blocksize_sweep", "threshold_sweep"}
    # sweeps alone merge too (no analyze run): the first is the base
    only = merge_results([bs, th])
    assert only["kind"] == "sweep-blocksize" and {"blocksize_sweep", "threshold_sweep"} <= set(only["tables"])


def test_merge_refuses_other_models_and_duplicate_tables() -> None:
    analyze, bs, _ = _split()
    other = copy.deepcopy(bs)
    other["metadata"]["model"] = "another model"
    with pytest.raises(ResultsError, match="expected results of one model"):
        merge_results([analyze, other], ["a.json", "b.json"])
    with pytest.raises(ResultsError, match=r"a.json and b.json both carry the table 'gemm' \(two analyze runs\)"):
        merge_results([analyze, copy.deepcopy(analyze)], ["a.json", "b.json"])
    with pytest.raises(ResultsError, match="at least one"):
        merge_results([])
    # two models under one name (the same directory name: the same description), told apart by their weights
    wider = copy.deepcopy(bs)
    for r in wider["tables"]["layers"]:
        r["in_features"] *= 2
    with pytest.raises(ResultsError, match=r"got layer \S+ with weight \[\d+, \d+\] in a.json and \[\d+, \d+\] in "
                                           r"b.json \(\d+ layer\(s\) differ\)"):
        merge_results([analyze, wider], ["a.json", "b.json"])


def test_report_command_merges_files(tmp_path: Path) -> None:
    paths = []
    for name, doc in zip(("analyze", "bs", "th"), _split()):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "index.html"
    res = CliRunner().invoke(cli, ["report", *map(str, paths), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "3 results merged: analyze, sweep-blocksize, sweep-threshold" in res.output
    html = out.read_text(encoding="utf-8")
    for anchor in ('id="heatmap"', 'id="blocksize"', 'id="threshold"'):
        assert anchor in html
    assert "analyze + sweep-blocksize + sweep-threshold" in html  # the header's kind
    # the same file twice, and two analyze runs, are usage errors (one line, exit 2)
    for args in ([str(paths[0]), str(paths[0])], [str(paths[0]), str(tmp_path / "copy.json")]):
        (tmp_path / "copy.json").write_text(paths[0].read_text())
        res = CliRunner().invoke(cli, ["report", *args, "-o", str(out)])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_runs_on_other_inputs_merge_with_the_difference_said(tmp_path: Path) -> None:
    """An analyze run on one inputs file and a sweep on another merged into a report that named the first's inputs
    only: its numbers were read as one data set."""
    analyze, bs, _ = _split()
    assert "inputs_differ" not in merge_results([analyze, bs])["metadata"]
    bs["metadata"]["inputs"] = "other.pt"
    merged = merge_results([analyze, bs], ["an.json", "bs.json"])
    differ = merged["metadata"]["inputs_differ"]
    assert differ[1].startswith("bs.json: other.pt") and differ[0].startswith("an.json: ")
    paths = [tmp_path / "an.json", tmp_path / "bs.json"]
    for path, doc in zip(paths, (analyze, bs)):
        path.write_text(json.dumps(doc))
    res = CliRunner().invoke(cli, ["report", *map(str, paths), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert f"note: the merged runs measured other inputs ({paths[0]}: " in res.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "differ between the merged runs (their numbers are of other data)" in html and "bs.json: other.pt" in html


def test_analyze_sweeps_and_results_to_html(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["analyze", f"{TINY}:build", "--strategy", "int8", "--batches", "1", "--layers", "fc1",
                                   "--sweeps", "--out", str(out), "-q", "--threads", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["merged_kinds"] == ["analyze", "sweep-blocksize", "sweep-threshold"]
    assert {"gemm", "blocksize_sweep", "threshold_sweep"} <= set(doc["tables"])
    assert (out / "blocksize_sweep.csv").is_file() and (out / "threshold_sweep.csv").is_file()
    html = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="heatmap"' in html and 'id="blocksize"' in html and 'id="threshold"' in html

    from fp8probe.analysis.results import Results

    results = Results.load(out)
    path = results.to_html(tmp_path / "api.html")
    text = path.read_text(encoding="utf-8")
    assert text.count('id="threshold"') == text.count('id="threshold-table"') == 1  # section heading and table
    with pytest.raises(TypeError, match="expected Results to merge, got dict"):
        results.merged(doc)  # type: ignore[arg-type]


def test_weights_only_analyze_and_its_sweep_merge(tmp_path: Path) -> None:
    """Both list the checkpoint's skipped tensors: the merge refused them as 'two runs of the same kind' (they
    are not); the skipped lists are now united by key."""
    import torch

    gen = torch.Generator().manual_seed(6)
    torch.save({"a.weight": torch.randn(32, 64, generator=gen), "b.weight": torch.randn(16, 32, generator=gen),
                "a.bias": torch.randn(32, generator=gen), "embed_tokens.weight": torch.randn(10, 16, generator=gen)},
               tmp_path / "sd.pt")
    runner = CliRunner()
    assert runner.invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "--out", str(tmp_path / "a"), "-q"]).exit_code == 0
    assert runner.invoke(cli, ["sweep-blocksize", str(tmp_path / "sd.pt"), "--out", str(tmp_path / "s"), "-q",
                               "--layers", "^a$"]).exit_code == 0
    docs = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "s")]
    merged = merge_results(docs, ["a", "s"])
    assert {"blocksize_sweep", "operands"} <= set(merged["tables"])
    keys = [r["key"] for r in merged["tables"]["skipped"]]
    assert sorted(keys) == ["a.bias", "b.weight", "embed_tokens.weight"]  # (b.weight: not matched by the sweep's --layers)
    res = runner.invoke(cli, ["report", str(tmp_path / "a" / "results.json"), str(tmp_path / "s" / "results.json"),
                              "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and (tmp_path / "r.html").stat().st_size > 0, res.output
    with pytest.raises(ResultsError, match="two analyze runs"):
        merge_results([docs[0], docs[0]], ["a", "a2"])


def test_runs_of_two_models_with_one_name_are_not_merged() -> None:
    """Every model saved as nasty.pt2 is described alike: another model's sweep merged into an analyze run, its
    layers mixed in, and the header read "15 GEMM site(s) (11 GEMM call(s))" (QA)."""
    analyze, bs, _ = _split()
    analyze, bs = copy.deepcopy(analyze), copy.deepcopy(bs)
    analyze["metadata"]["parameters"], bs["metadata"]["parameters"] = 120_000, 98_304
    with pytest.raises(ResultsError, match=r"got 120,000 parameters \(a\) and 98,304 \(b\): merge runs of the same "
                                           "model only"):
        merge_results([analyze, bs], ["a", "b"])
    bs["metadata"]["parameters"] = 120_000
    assert merge_results([analyze, bs], ["a", "b"])["metadata"]["merged_kinds"] == ["analyze", "sweep-blocksize"]
    # without a parameter count: no layer in common is another model
    del analyze["metadata"]["parameters"]
    bs["tables"] = {**bs["tables"], "layers": [dict(r, layer="other." + r["layer"]) for r in bs["tables"]["layers"]],
                    "blocksize_sweep": [dict(r, layer="other." + r["layer"]) for r in bs["tables"]["blocksize_sweep"]]}
    with pytest.raises(ResultsError, match=r"got no layer in common between a and b"):
        merge_results([analyze, bs], ["a", "b"])


def test_a_sweep_only_report_fills_its_outlier_threshold_row() -> None:
    """The header's "outlier threshold" row was blank in sweep-blocksize and sweep-threshold reports (QA)."""
    from fp8probe.report.render import build_report_view

    _, bs, th = _split()
    for doc, want in ((th, "swept: 0, 1.5, 6"), (bs, "not used (no int8 recipe run)")):
        doc = copy.deepcopy(doc)
        doc["metadata"]["threshold"] = None
        doc["metadata"]["thresholds"] = [0.0, 1.5, 6.0] if doc is not bs and "threshold_sweep" in doc["tables"] else None
        info = {row["key"]: row["value"] for row in build_report_view(doc, draw=False)["info"]}
        assert info["outlier threshold"] == want
