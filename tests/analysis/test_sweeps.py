"""Block-size and threshold sweeps: recommendation rules, overhead, auto pick, monotone 16-bit columns."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fp8probe.analysis.sweeps import (BLOCKSIZE_TOLERANCE_DB, MAX_FRAC_COLS_16BIT, THRESHOLD_TOLERANCE_DB,
                                      overhead_bits, recommend_blocksize, recommend_threshold, sweep_blocksize,
                                      sweep_threshold)
from fp8probe.autograd import get_block_sizes

IN, HID, OUT = 64, 48, 24
PLANTED_COL = 7
PLANTED_MAG = 20.0


def _model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT)).eval()


def _inputs(seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        x = torch.randn(4, 16, IN, generator=gen)
        # one LLM.int8-style outlier feature: |x| in [15, 25] for every token, all others |x| < 6
        x[..., PLANTED_COL] = PLANTED_MAG + 5 * (2 * torch.rand(4, 16, generator=gen) - 1)
        batches.append(x)
    return batches


@pytest.fixture(scope="module")
def bs_table():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sweep_blocksize(model, _inputs(), blocksizes=(32, 64, 256, 1024))
    for k, v in model.state_dict().items():  # the sweep never touches the caller's model
        assert torch.equal(v, before[k])
    assert res.kind == "sweep-blocksize"
    return res.tables["blocksize_sweep"], res


@pytest.fixture(scope="module")
def th_table():
    res = sweep_threshold(_model(), _inputs(), thresholds=(0, 1, 2, 3, 4, 6, 8, 30))
    assert res.kind == "sweep-threshold"
    return res.tables["threshold_sweep"], res


def test_sweeps_layers_rows_are_analyze_s(bs_table, th_table) -> None:
    """The sweeps' layers table left out_features and bsz (threshold sweep) or tokens (block-size sweep) empty; each
    row now equals analyze's for the same model and batches, and sweep_both's equal the single sweeps'."""
    from fp8probe.analysis.pipeline import analyze
    from fp8probe.analysis.sweeps import sweep_both

    cols = ["layer", "in_features", "out_features", "tokens", "bsz", "bsz2"]
    want = analyze(_model(), _inputs(), "int8", e2e=False).tables["layers"][cols].to_dict("records")
    assert [r["tokens"] for r in want] == [2 * 4 * 16] * 2 and want[0]["out_features"] == HID
    both = sweep_both(_model(), _inputs(), blocksizes=(32, 64), thresholds=(0, 6), e2e=False)
    for res in (bs_table[1], th_table[1], *both):
        assert res.tables["layers"][cols].to_dict("records") == want, res.kind


def test_overhead_is_32_over_blocksize(bs_table) -> None:
    table, _ = bs_table
    for r in table.to_dict("records"):
        assert r["overhead_bits"] == 32 / r["blocksize"]
    assert overhead_bits(64) == 0.5
    with pytest.raises(ValueError, match="positive int"):
        overhead_bits(0)


def test_every_layer_target_and_blocksize_present(bs_table) -> None:
    table, res = bs_table
    assert set(table["layer"]) == {"0", "2"}
    assert set(table["target"]) == {"activation", "weight", "grad_output", "fprop", "dgrad", "wgrad"}
    # (layer 0's input is the data: training computes no dgrad for it, so it is not swept)
    assert len(table) == 2 * 4 * 6 - 4 and "dgrad" not in set(table.query("layer == '0'")["target"])
    assert res.metadata["no_dgrad_layers"] == ["0"]
    assert set(res.tables["layers"]["layer"]) == {"0", "2"}
    assert "blocksize_sweep" in res.metadata["recommendations"]


def test_recommended_blocksize_follows_the_rule(bs_table) -> None:
    table, _ = bs_table
    for layer, g in table[table["target"] == "fprop"].groupby("layer"):
        sq = dict(zip(g["blocksize"], g["sqnr_db"]))
        best = max(sq.values())
        expected = max(bs for bs, s in sq.items() if s >= best - BLOCKSIZE_TOLERANCE_DB)
        rec = set(table[(table["layer"] == layer) & table["recommended"]]["blocksize"])
        assert rec == {expected}, layer  # one block size, flagged on every target row of it


def test_recommend_blocksize_unit() -> None:
    assert recommend_blocksize({32: 30.0, 64: 29.8, 128: 29.4, 256: 28.0}) == 64
    assert recommend_blocksize({32: 30.0, 64: 29.8, 128: 29.4}, tolerance_db=1.0) == 128
    assert recommend_blocksize({32: math.nan, 64: 25.0}) == 64
    assert recommend_blocksize({32: math.inf, 64: math.inf, 128: 40.0}) == 64
    assert recommend_blocksize({32: math.nan}) is None


def test_auto_flag_is_get_block_sizes(bs_table) -> None:
    table, _ = bs_table
    shapes = {"0": (IN, HID), "2": (HID, OUT)}
    for layer, (fin, fout) in shapes.items():
        bsz, bsz2 = get_block_sizes(fin, fout)
        rows = table[(table["layer"] == layer) & table["auto"]]
        for r in rows.to_dict("records"):
            want = bsz if r["target"] in ("activation", "weight", "fprop") else bsz2
            assert r["blocksize"] == want
        # every target of a swept auto size is flagged (64 is swept; bsz2=64 for both layers; no dgrad on layer 0)
        assert len(rows) == (5 if layer == "0" else 6)


def test_blockwise_sqnr_floor_and_trend(bs_table) -> None:
    table, _ = bs_table
    fp = table[table["target"] == "fprop"]
    # bnb-e4m3 keeps 3 mantissa bits: ~30 dB per operand; the planted column costs layer 0 a few dB
    # at large blocks because it sets the absmax of every block it falls in.
    assert (fp["sqnr_db"] > 20.0).all()
    l0 = dict(zip(fp[fp["layer"] == "0"]["blocksize"], fp[fp["layer"] == "0"]["sqnr_db"]))
    assert l0[32] > l0[1024]


def test_threshold_frac_cols_monotone_and_planted_column_found(th_table) -> None:
    table, _ = th_table
    for layer, g in table.groupby("layer"):
        g = g.sort_values("threshold")
        pos = g[g["threshold"] > 0]["frac_cols_16bit"].tolist()
        assert all(a >= b for a, b in zip(pos, pos[1:])), (layer, pos)
        assert g[g["threshold"] == 0]["frac_cols_16bit"].item() == 0.0
    l0 = table[table["layer"] == "0"].set_index("threshold")
    # exactly the planted column is an outlier at thresholds 6 and 8 (randn never reaches 6 here)
    assert l0.loc[6.0, "frac_cols_16bit"] == pytest.approx(1 / IN)
    assert l0.loc[8.0, "frac_cols_16bit"] == pytest.approx(1 / IN)
    assert l0.loc[30.0, "frac_cols_16bit"] == 0.0
    # decomposing the planted column buys real accuracy over plain int8 (threshold 0)
    assert l0.loc[6.0, "fprop_sqnr_db"] > l0.loc[0.0, "fprop_sqnr_db"] + 3.0


def test_recommended_threshold_follows_the_rule(th_table) -> None:
    table, _ = th_table
    for layer, g in table.groupby("layer"):
        pts = {r["threshold"]: (r["fprop_sqnr_db"], r["frac_cols_16bit"]) for r in g.to_dict("records")}
        rec = g[g["recommended"]]["threshold"].tolist()
        assert rec == [recommend_threshold(pts)], layer
    l0 = table[(table["layer"] == "0") & table["recommended"]]
    assert l0["threshold"].item() == 8.0  # the largest threshold still catching the planted column


def test_recommend_threshold_unit() -> None:
    # within 1 dB: 4 and 6 tie on accuracy; 6 keeps fewer columns
    pts = {0.0: (30.0, 0.0), 1.0: (45.0, 0.5), 4.0: (44.5, 0.05), 6.0: (44.2, 0.02), 8.0: (35.0, 0.0)}
    assert recommend_threshold(pts) == 6.0
    # 1.0 is best but over the 10 % column budget, so it does not set the bar
    assert recommend_threshold({0.0: (40.0, 0.0), 1.0: (48.0, 0.5), 6.0: (40.2, 0.0)}) == 6.0
    # nothing gained by decomposing: larger positive threshold wins the tie, 0 only if alone
    assert recommend_threshold({0.0: (40.0, 0.0), 6.0: (40.0, 0.0), 8.0: (40.0, 0.0)}) == 8.0
    assert recommend_threshold({0.0: (40.0, 0.0)}) == 0.0
    assert recommend_threshold({0.0: (math.nan, 0.0)}) is None
    assert THRESHOLD_TOLERANCE_DB == 1.0 and MAX_FRAC_COLS_16BIT == 0.10


@pytest.mark.parametrize("kwargs, message", [
    ({"blocksizes": (0,)}, "positive ints"),
    ({"blocksizes": ()}, "at least one"),
])
def test_bad_blocksizes(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_blocksize(_model(), _inputs(), **kwargs)


@pytest.mark.parametrize("thresholds", [(-1.0,), (math.inf,)])
def test_bad_thresholds(thresholds) -> None:
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        sweep_threshold(_model(), _inputs(), thresholds=thresholds)


def test_sweep_commands(tmp_path) -> None:
    import json
    from pathlib import Path

    from click.testing import CliRunner

    from fp8probe.cli import cli

    factory = f"{Path(__file__).parent / 'tiny_factory.py'}:build"
    res = CliRunner().invoke(cli, ["sweep-threshold", factory, "--thresholds", "0,6,8", "--batches", "1",
                                   "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "rule: recommended" in res.output
    doc = json.loads((tmp_path / "t" / "results.json").read_text())
    # 9 linear layers + QKᵀ and PV of 2 blocks, 3 thresholds each; the coverage line and table come along
    assert doc["kind"] == "sweep-threshold" and len(doc["tables"]["threshold_sweep"]) == 13 * 3
    assert "captured 13 of 13 GEMMs = 100.0 % of GEMM FLOPs; skipped: none" in res.output
    assert doc["tables"]["coverage"] and doc["metadata"]["coverage"]["gemms_captured"] == 13
    assert "http" not in (tmp_path / "t" / "index.html").read_text()
    res = CliRunner().invoke(cli, ["sweep-blocksize", factory, "--blocksizes", "64,1024", "--batches", "1",
                                   "--layers", "fc1", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert {r["layer"] for r in doc["tables"]["blocksize_sweep"]} == {"blocks.0.fc1", "blocks.1.fc1"}
    for args in (["--blocksizes", "32,abc"], ["--blocksizes", "0"]):
        res = CliRunner().invoke(cli, ["sweep-blocksize", factory, *args, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_sweeps_count_and_warn_of_nan_and_inf(tmp_path) -> None:
    """The sweeps never counted NaN/Inf (the report said nothing, the terminal neither) and the model-wide pick
    read 'loss +nan %, OVER the budget'."""
    from click.testing import CliRunner

    from fp8probe.analysis.sweeps import sweep_blocksize, sweep_threshold
    from fp8probe.cli import cli

    (tmp_path / "nanmodel.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    torch.manual_seed(0)\n    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
        "    x = torch.randn(6, 8)\n    x[0, 0] = float('nan')\n    x[1, 1] = float('inf')\n    return m, [x]\n")
    for command in ("sweep-blocksize", "sweep-threshold"):
        res = CliRunner().invoke(cli, [command, f"{tmp_path / 'nanmodel.py'}:build", "--out", str(tmp_path / command)])
        assert res.exit_code == 0, res.output
        assert "NaN/Inf values in the swept operands of 2 layer(s): 0, 2" in res.output
        assert "the end-to-end loss change is undefined" in res.output and "+nan" not in res.output
        doc = json.loads((tmp_path / command / "results.json").read_text())
        assert doc["metadata"]["nonfinite_operands"]["layers"] == ["0", "2"]
        html = (tmp_path / command / "index.html").read_text()
        assert "NaN/Inf values in the swept operands" in html
    torch.manual_seed(1)
    clean = sweep_threshold(torch.nn.Sequential(torch.nn.Linear(8, 4)), [torch.randn(3, 8)], e2e=False)
    assert clean.metadata["nonfinite_operands"] == {"values": 0, "layers": []}
    clean_b = sweep_blocksize(torch.nn.Sequential(torch.nn.Linear(8, 4)), [torch.randn(3, 8)], e2e=False)
    assert clean_b.metadata["nonfinite_operands"]["values"] == 0
