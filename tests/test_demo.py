"""`fp8probe demo` end to end (hidden --small: one 4-sequence batch) in a temporary working directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch import nn

from fp8probe.analysis.demo_model import build_model
from fp8probe.analysis.strategies import STRATEGIES
from fp8probe.cli import cli


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("demo")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, ["demo", "--small"])
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "reports/demo/index.html" in res.output
    # 9 linear layers + QKᵀ and PV (plain matmuls) of 2 blocks
    assert "captured 13 of 13 GEMMs = 100.0 % of GEMM FLOPs; skipped: none" in res.output
    return cwd / "reports" / "demo"


def test_demo_report_mentions_every_layer(demo_dir: Path) -> None:
    html = (demo_dir / "index.html").read_text(encoding="utf-8")
    layers = [n for n, m in build_model().named_modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 9
    for layer in layers:
        assert layer in html, layer
    for section in ('id="blocksize"', 'id="threshold"', 'id="outliers"', 'id="range"', 'id="methods"'):
        assert section in html
    assert "http" not in html


def test_demo_writes_results_that_rerender(demo_dir: Path, tmp_path: Path) -> None:
    merged = json.loads((demo_dir / "results.json").read_text())
    assert merged["kind"] == "analyze"
    assert {"gemm", "operands", "blocksize_sweep", "threshold_sweep", "coverage"} <= set(merged["tables"])
    assert merged["metadata"]["coverage"]["gemms_captured"] == sum(r["captured"] for r in merged["tables"]["coverage"])
    assert set(merged["metadata"]["recommendations"]) == {"blocksize_sweep", "threshold_sweep"}
    for sub in ("analyze", "sweep-blocksize", "sweep-threshold"):
        assert (demo_dir / sub / "results.json").exists()
    res = CliRunner().invoke(cli, ["report", str(demo_dir / "results.json"), "-o", str(tmp_path / "again.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.html").stat().st_size > 100_000
    # the demo's planted outlier dims are found by the census of the layers that read them
    planted = set(build_model().cfg.outlier_dims)
    for r in merged["tables"]["outliers"]:
        if r["layer"].endswith(("attn.qkv", "fc1")):
            assert planted <= {int(d) for d, _ in r["top_dims"]}, r["layer"]


def test_demo_carries_the_validated_recommendation(demo_dir: Path) -> None:
    """The demo runs the end-to-end part: e2e per strategy, sensitivity, and a recommendation with one row per
    strategy plus the model-wide block size and threshold from the sweeps, each validated by a run."""
    merged = json.loads((demo_dir / "results.json").read_text())
    tables = merged["tables"]
    assert merged["version"] == 2 and {"e2e", "sensitivity", "recommendation"} <= set(tables)
    kinds = [r["kind"] for r in tables["recommendation"]]
    assert kinds.count("strategy") == len(STRATEGIES) and kinds[-2:] == ["blocksize", "threshold"]
    assert sum(r["recommended"] for r in tables["recommendation"] if r["kind"] == "strategy") == 1
    for r in tables["recommendation"]:
        assert r["loss_rel_change"] is not None and r["lp_flop_share"] > 0
    assert len(tables["sensitivity"]) == len(STRATEGIES) * len(tables["layers"])  # one row per strategy and captured GEMM
