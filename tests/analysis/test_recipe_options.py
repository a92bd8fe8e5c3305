"""RecipeOptions through analyze, the threshold sweep, the CLI and the report: int8 row scale, accumulation, delayed-scaling settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fp8probe import autograd as AG
from fp8probe.analysis.accumulation import Accumulation
from fp8probe.analysis.strategies import STRATEGIES, RecipeOptions, run_strategy, with_options
from fp8probe.analysis.sweeps import sweep_threshold
from fp8probe.cli import cli

HERE = Path(__file__).resolve().parent
FACTORY = f"{HERE / 'tiny_factory.py'}:build"


def test_int8_strategy_row_scale_in_replay_and_rules() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 16, generator=g)
    A[:4, 5] = 9.0  # outlier column 5; rows 4.. hold sub-threshold values 4.0 there
    A[4:, 5] = 4.0
    W, G = torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g)
    bnb, = with_options([STRATEGIES["int8"]], None)
    paper, = with_options([STRATEGIES["int8"]], RecipeOptions(int8_row_scale="paper"))
    assert "int8 row scale 'bnb'" in bnb.rules and "int8 row scale 'paper'" in paper.rules
    out_p, out_b = run_strategy(paper, A, W, G, 6.0), run_strategy(bnb, A, W, G, 6.0)
    assert torch.equal(out_p.gemms["fprop"], AG.matmul(A, W, threshold=6.0, row_scale="paper"))
    assert torch.equal(out_b.gemms["fprop"], AG.matmul(A, W, threshold=6.0))
    assert not torch.equal(out_p.gemms["fprop"], out_b.gemms["fprop"])
    assert not torch.equal(out_p.operands["activation"][1], out_b.operands["activation"][1])


def test_options_validate() -> None:
    with pytest.raises(ValueError, match="row_scale must be one of"):
        RecipeOptions(int8_row_scale="exact")
    with pytest.raises(TypeError, match="expected an Accumulation or None"):
        RecipeOptions(accumulation=14)
    with pytest.raises(TypeError, match="expected a DelayedScaling"):
        RecipeOptions(delayed={"history": 4})
    assert RecipeOptions().metadata()["accumulation"] is None


def test_threshold_sweep_paper_rule() -> None:
    """Columns 3 and 7 are outlier columns at thresholds 4 and 6 alike, and hold sub-threshold values 5.0 / -4.5 in
    other rows: with bnb's rule those set the row absmax at 6 but not at 4, so the SQNR depends on the threshold
    with the same columns kept; with the paper rule it does not."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 10, generator=g).clamp(-2, 2)
    A[1, 3], A[4, 7], A[0, 3], A[2, 7], A[5, 3] = 9.0, -12.0, 5.0, -4.5, 5.0
    model = torch.nn.Linear(10, 5)
    with torch.no_grad():  # seeded weights: the test must not depend on the global RNG state
        model.weight.copy_(torch.randn(5, 10, generator=g))
    res = {rs: sweep_threshold(model, [A], [4.0, 6.0], e2e=False, row_scale=rs) for rs in ("bnb", "paper")}
    assert res["paper"].metadata["recipe_options"]["int8_row_scale"] == "paper"
    assert "int8 row scale 'paper'" in res["paper"].metadata["rules"]["threshold sweep"]
    for rs, r in res.items():
        t = r.tables["threshold_sweep"]
        assert t["frac_cols_16bit"].tolist() == pytest.approx([0.2, 0.2], rel=1e-12), rs  # 2 of 10 columns
    paper, bnb = (res[k].tables["threshold_sweep"]["fprop_sqnr_db"].tolist() for k in ("paper", "bnb"))
    assert paper[0] == paper[1]
    assert bnb[1] < bnb[0] - 1.0
    with pytest.raises(ValueError, match="row_scale must be one of"):
        sweep_threshold(model, [A], [6.0], e2e=False, row_scale="x")


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_flags_reach_results_and_report(tmp_path) -> None:
    out = tmp_path / "o"
    res = _cli("analyze", FACTORY, "--strategy", "delayed,int8,ocp-tensorwise", "--batches", "2", "--layers", "fc",
               "--int8-row-scale", "paper", "--accum-bits", "12", "--promote-every", "32", "--amax-history", "4",
               "--amax-compute", "most_recent", "--margin", "1", "--no-e2e", "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["recipe_options"] == {
        "int8_row_scale": "paper", "accumulation": {"mantissa_bits": 12, "promote_every": 32, "rounding": "truncate"},
        "delayed_scaling": {"amax_history": 4, "amax_compute": "most_recent", "margin": 1, "first_batch": "current amax"}}
    rules = doc["metadata"]["rules"]
    assert "12 mantissa bits" in rules["ocp-tensorwise"] and "12 mantissa bits" in rules["delayed"]
    assert "mantissa bits" not in rules["int8"] and "'paper'" in rules["int8"]
    rows = doc["tables"]["delayed_scaling"]
    assert rows and {r["batches"] for r in rows} == {2} and (out / "delayed_scaling.csv").is_file()
    html = (out / "index.html").read_text()
    assert 'id="delayed"' in html and "Recipe settings of this run" in html
    assert "12 mantissa bits, truncated, promoted to float32 every 32 elements" in html


@pytest.mark.parametrize("args,message", [
    (["--accum-bits", "0"], "--accum-bits"),
    (["--accum-bits", "24"], "--accum-bits"),
    (["--promote-every", "64"], "needs --accum-bits"),
    (["--accum-bits", "12", "--promote-every", "0"], "--promote-every"),
    (["--amax-history", "0"], "--amax-history"),
    (["--amax-compute", "mean"], "--amax-compute"),
    (["--margin", "-1"], "--margin"),
    (["--int8-row-scale", "exact"], "--int8-row-scale"),
])
def test_bad_option_values_exit_2_with_one_line(tmp_path, args, message) -> None:
    res = CliRunner().invoke(cli, ["analyze", FACTORY, *args, "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_sweep_threshold_cli_row_scale(tmp_path) -> None:
    out = tmp_path / "s"
    res = _cli("sweep-threshold", FACTORY, "--thresholds", "6", "--batches", "1", "--layers", "fc1",
               "--int8-row-scale", "paper", "--no-e2e", "--out", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["recipe_options"]["int8_row_scale"] == "paper"
