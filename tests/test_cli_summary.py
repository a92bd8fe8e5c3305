"""The terminal summary: verdict lines, worst layers per strategy (not all from one), full names with a middle
ellipsis; -q, --threads and --format json accepted by every command that runs a model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fp8probe.cli import _middle_ellipsis, cli

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'analysis' / 'tiny_factory.py'}:build"

BERTISH = '''
import torch
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.query(x) + self.key(x) * 0.5 + self.value(x).relu()


class Model(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList([nn.Module() for _ in range(2)])
        for blk in self.bert.encoder.layer:
            blk.attention = nn.Module()
            blk.attention.self = SelfAttention(d)
        self.classifier = nn.Linear(d, 2)  # as BertForSequenceClassification: no prefix shared by every layer

    def forward(self, x):
        for blk in self.bert.encoder.layer:
            x = blk.attention.self(x)
        return self.classifier(x)


def build():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    x[..., 3] = 40.0
    return Model(), [x]
'''


def _invoke(args: list[str], env: dict | None = None):  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    try:
        return CliRunner(env=env).invoke(cli, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)  # CliRunner runs the command in this process


def test_middle_ellipsis_keeps_both_ends() -> None:
    names = [f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    short = [_middle_ellipsis(n, 30) for n in names]
    assert len(set(short)) == 3 and all(len(s) == 30 for s in short)
    assert short[0] == "bert.encoder.l…tion.self.query"
    assert _middle_ellipsis("fc1", 30) == "fc1"
    assert _middle_ellipsis("a\x1b[2Jb", 30) == "a\\x1b[2Jb"  # control characters escaped, never sent raw


def test_summary_worst_rows_per_strategy_full_names_and_verdict(tmp_path: Path) -> None:
    factory = tmp_path / "bertish.py"
    factory.write_text(BERTISH)
    res = _invoke(["analyze", f"{factory}:build", "--strategy", "global,int8,mxfp8", "--out", str(tmp_path / "o"),
                   "--no-html", "-q", "--threads", "1", "--no-e2e"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    # verdict lines come first: the headline, then the isolated numbers per strategy (no e2e table here)
    assert lines[1].startswith("verdict (isolated GEMMs, not validated end to end): ")
    assert lines[2].startswith("isolated global: ") and lines[3].startswith("isolated int8: ")
    table = lines[lines.index("worst layers per strategy (isolated fprop SQNR):") + 2:-1]
    strategies = [row.split()[1] for row in table]
    assert strategies == ["global"] * 3 + ["int8"] * 3 + ["mxfp8"] * 3  # three each, not ten of one recipe
    names = {row.split()[0] for row in table}
    assert {"bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"} & names
    assert all(len(n) > 32 for n in names - {"classifier"})  # not cut at 32 characters any more
    # a narrow terminal: names shortened in the middle, still distinct per projection
    res = _invoke(["analyze", f"{factory}:build", "--strategy", "global", "--out", str(tmp_path / "n"),
                   "--no-html", "-q", "--threads", "1", "--no-e2e"], env={"COLUMNS": "70"})
    rows = res.stdout.splitlines()
    table = rows[rows.index("worst layers per strategy (isolated fprop SQNR):") + 2:-1]
    assert all(r.split()[0] == "classifier" or ("…" in r.split()[0] and len(r.split()[0]) == 26) for r in table)
    assert len({r.split()[0] for r in table}) == len(table)


def test_analyze_json_carries_the_verdict(tmp_path: Path) -> None:
    res = _invoke(["analyze", TINY, "--strategy", "int8", "--batches", "1", "--layers", "fc1", "--format", "json",
                   "--out", str(tmp_path / "j"), "--no-html", "--threads", "1", "--no-e2e"])
    doc = json.loads(res.stdout)
    assert doc["verdict"][0].startswith("verdict (isolated GEMMs") and doc["verdict"][1].startswith("isolated int8: ")
    assert doc["model_mode"] == "eval"  # (as the report's info says; "train" with --train-mode, None weights only)
    assert any(line.startswith("note: no end-to-end run") for line in doc["verdict"])
    # by default the end-to-end run validates the verdict and the JSON carries the recommendation rows
    res = _invoke(["analyze", TINY, "--strategy", "int8", "--batches", "1", "--layers", "fc1", "--format", "json",
                   "--out", str(tmp_path / "k"), "--no-html", "--threads", "1"])
    doc = json.loads(res.stdout)
    assert doc["verdict"][0].startswith("verdict: int8, ")
    assert [r["strategy"] for r in doc["recommendation"] if r["kind"] == "strategy"] == ["int8"]
    # the share is of the forward GEMM FLOPs: the end-to-end runs compare forward outputs (QA A3: "100.0 % of GEMM
    # FLOPs" for switchback, whose dgrad and wgrad run unquantised)
    assert "% of the analysed forward GEMM FLOPs (" in doc["verdict"][0], doc["verdict"][0]
    e2e = next(x for x in doc["verdict"] if x.startswith("end-to-end int8:"))
    assert "analysed forward FLOPs" in e2e and "low precision" in e2e, e2e


def test_an_underflow_warning_relates_the_recipe_it_names_to_the_verdict_above_it(tmp_path: Path) -> None:
    """The terminal printed "… under nvfp4 70.7 %" under a verdict picking nvfp4 with nothing relating them (QA A4):
    validated end to end it passed with the underflow; picked from isolated GEMMs it was never checked."""
    args = ["analyze", TINY, "--strategy", "nvfp4", "--no-html", "-q", "--threads", "1"]
    res = _invoke([*args, "--out", str(tmp_path / "e"), "--budget", "0.5"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].startswith("verdict: nvfp4, ") and "% of forward GEMM FLOPs in low precision" in lines[1]
    warned = [x for x in lines if x.startswith("warning: activation underflow")]
    assert len(warned) == 1 and ("under nvfp4 70.7 % (nvfp4 is the recommended recipe: its end-to-end check passed "
                                 "with this underflow)") in warned[0], warned
    res = _invoke([*args, "--out", str(tmp_path / "n"), "--no-e2e"])
    lines = res.stdout.splitlines()
    assert lines[1].startswith("verdict (isolated GEMMs, not validated end to end): nvfp4 ")
    warned = [x for x in lines if x.startswith("warning: activation underflow")]
    assert len(warned) == 1 and ("under nvfp4 70.7 % (nvfp4, the isolated pick, was not validated end to end: run "
                                 "without --no-e2e)") in warned[0], warned


@pytest.mark.parametrize("command, extra", [("sweep-blocksize", ["--blocksizes", "64,256"]),
                                            ("sweep-threshold", ["--thresholds", "0,6"])])
def test_sweeps_accept_quiet_threads_and_json(command: str, extra: list[str], tmp_path: Path) -> None:
    res = _invoke([command, TINY, *extra, "--batches", "1", "--layers", "fc1", "--out", str(tmp_path / "s"),
                   "-q", "--threads", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # stdout is JSON only
    assert Path(doc["results"]).is_file() and Path(doc["html"]).is_file()
    assert {r["layer"] for r in doc["recommended"]} == {"blocks.0.fc1", "blocks.1.fc1"}
    assert doc["rule"] and doc["model_mode"] == "eval"


@pytest.mark.parametrize("command, extra", [("sweep-blocksize", ["--blocksizes", "64,256"]),
                                            ("sweep-threshold", ["--thresholds", "0,6"])])
def test_sweeps_accept_no_html_as_analyze_does(command: str, extra: list[str], tmp_path: Path) -> None:
    """The README promised `--no-html` (JSON and CSVs only) to every command; the sweeps refused it with exit 2
    (QA F9). It is analyze's option, help text and all, and no index.html is written."""
    help_of = {name: next(p.help for p in cli.commands[name].params if p.name == "no_html")
               for name in ("analyze", command)}
    assert help_of[command] == help_of["analyze"]
    out = tmp_path / "s"
    res = _invoke([command, TINY, *extra, "--batches", "1", "--layers", "fc1", "--out", str(out), "-q",
                   "--threads", "1", "--no-e2e", "--no-html", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["html"] is None and Path(doc["results"]).is_file() and not (out / "index.html").exists()
    res = _invoke([command, TINY, *extra, "--batches", "1", "--layers", "fc1", "--out", str(out), "-q",
                   "--threads", "1", "--no-e2e", "--no-html", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"results: {out / 'results.json'}; no HTML report written"
    assert not (out / "index.html").exists()


def test_demo_accepts_quiet_threads_and_json(tmp_path: Path) -> None:
    res = _invoke(["demo", "--small", "--out", str(tmp_path / "d"), "-q", "--threads", "1", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert Path(doc["html"]).is_file() and doc["verdict"]
    results = json.loads(Path(doc["results"]).read_text())
    assert results["metadata"]["threads"] == 1
    # the keys the README promises for demo as for analyze (QA: demo had only results, html and verdict)
    assert doc["model_mode"] == "eval" and doc["recommendation"] == results["tables"]["recommendation"]
    assert any(r.get("recommended") for r in doc["recommendation"])
    res = _invoke(["demo", "--small", "--out", str(tmp_path / "q"), "-q"])
    assert "demo: analysing" not in res.stdout and "demo: report written to" in res.stdout


def test_first_line_names_sites_calls_and_inputs_and_the_warnings_are_the_reports(tmp_path: Path) -> None:
    """The terminal said "37 GEMM site(s), 2 batch(es)" where the report's coverage said "74 GEMMs", and neither said
    what the batches held (QA C3); the warnings it prints are the report's, word for word (QA B6: one set of texts)."""
    out = tmp_path / "o"
    res = _invoke(["analyze", TINY, "--strategy", "global,nvfp4", "--out", str(out), "-q", "--threads", "1",
                   "--no-e2e"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    meta = json.loads((out / "results.json").read_text())["metadata"]
    calls = meta["coverage"]["gemms_captured"]
    assert meta["input_shapes"]["tokens"] == 2 * 4 * 16  # tiny_factory: two batches of 4 x 16 token ids
    assert lines[0] == (f"13 GEMM site(s) ({calls} GEMM call(s) in 2 batch(es)), inputs: 2 batch(es) of 4 x 16 tokens "
                        "(128 tokens in all), loss: model (scalar loss returned by the model)")
    assert f"captured {calls} of {calls} GEMMs" in res.stdout
    warned = [x for x in lines if x.startswith("warning:")]
    assert any("underflow" in x and "under nvfp4" in x for x in warned)  # (the planted outliers: FP4 flushes)
    html = (out / "index.html").read_text(encoding="utf-8")
    verdict = html[html.index('id="verdict"'):html.index("</section>")]
    from html import unescape

    from fp8probe.report.render import sentence  # (the report's lists start with a capital)
    assert [unescape(x) for x in re.findall(r'<li class="warnline">(.*?)</li>', verdict)] == [sentence(x) for x in warned]


def test_a_loss_budget_plan_with_a_low_output_sqnr_is_flagged_in_the_terminal(tmp_path: Path) -> None:
    """nvfp4 met a 50 % loss budget with the model output at 17.2 dB SQNR and the verdict line read as a plain pass;
    the report's "yes*" has its footnote here as a warning (QA)."""
    res = _invoke(["analyze", TINY, "--strategy", "nvfp4", "--no-html", "-q", "--threads", "1", "--budget", "0.5",
                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1].startswith("verdict: nvfp4, ") and lines[1].endswith(
        "in low precision; output SQNR 17.2 dB (under 20 dB: see the warning)"), lines[1]
    assert ("warning: within the loss budget, but the model output's SQNR is under 20 dB: nvfp4 17.2 dB: the loss "
            "averages out errors the output shows") in res.stdout
