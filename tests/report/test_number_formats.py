"""One number format per kind of number in the HTML report (QA D1): percentages written "12.3 %" as the verdict and
the terminal write them, a statistics column at one precision, powers of two as such, ratios with "×"; and the
per-layer operand tables name the second activation of attention GEMMs."""
from __future__ import annotations

import copy
import html
import re
from pathlib import Path

import pytest

from fp8probe.report.render import (_coverage_section, _methods, _outlier_section, _range_section, _strategy_tables,
                                    build_report_view, load_results, render_report, table_rows)
from report_tables import with_agreed_tables

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def demo() -> dict:
    return load_results(DATA / "results_demo_small.json")


def _column(table: dict, name: str) -> list[str]:
    j = table["columns"].index(name)
    return [row[j]["text"] for row in table["rows"]]


def test_every_percentage_in_the_report_has_a_space_before_the_sign(demo: dict, tmp_path: Path) -> None:
    """"+0.0013 %" (verdict, sensitivity, terminal) stood beside "100.0%" (tables)."""
    data = with_agreed_tables(copy.deepcopy(demo), keep=["blocks.1.mlp.fc2"])
    page = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", "", page, flags=re.S)))
    assert re.findall(r"\d %", text), "no percentage at all: the check below would pass on nothing"
    assert re.findall(r"\d%", text) == []


def test_tensor_statistics_columns_keep_four_significant_digits(demo: dict) -> None:
    """"0.01" next to "0.01004", "71.9" next to "71.39": trailing zeros were trimmed."""
    tables = copy.deepcopy(demo["tables"])
    tables["tensors"][0].update(amax=71.9, std=0.01, zero_frac=0.0)
    tables["tensors"][1].update(amax=0.0388, std=2.27e-07, zero_frac=0.0312)
    tables["tensors"][2].update(amax=123456.0, std=0.0001355)
    table = _range_section([], tables, {}, {}, (None, ""), 1, draw=False)["table"]
    assert _column(table, "amax")[:3] == ["71.90", "0.03880", "1.235e+05"]
    assert _column(table, "std")[:3] == ["0.01000", "2.270e-07", "1.355e-04"]
    for text in _column(table, "amax") + _column(table, "std"):
        digits = re.sub(r"e[-+]\d+$", "", text).replace(".", "").lstrip("0")
        assert len(digits) == 4, text
    # the zeros column is a share in every row ("0" beside "3.12%" read as a count beside a share)
    zeros = _column(table, "zeros")
    assert zeros[:2] == ["0 %", "3.12 %"] and all(z.endswith(" %") for z in zeros)


def test_outlier_grid_amax_at_one_precision() -> None:
    rows = [{"layer": layer, "threshold": 6.0, "n_outlier_cols": 1, "frac_cols": 0.01, "frac_rows": 1.0,
             "top_dims": [[42, amax]], "top_dim_tokens": [1.0]} for layer, amax in (("a", 71.39), ("b", 71.9))]
    grid = _outlier_section(["a", "b"], {"outliers": rows})["grid"]
    assert [row[1]["text"] for row in grid["rows"]] == ["71.39 · 100 %", "71.90 · 100 %"]


def test_format_constants_show_powers_of_two_as_such() -> None:
    """"0.00195312" and "6.10352e-05" are 2^-9 and 2^-14, shown with a raised exponent: 2<sup>-9</sup>, not "2^-9"."""
    fmts = {"e4m3": {"max": 448.0, "min_normal": 2.0 ** -6, "min_subnormal": 2.0 ** -9},
            "e5m2": {"max": 57344.0, "min_normal": 2.0 ** -14, "min_subnormal": 2.0 ** -16},
            "mxfp6-e2m3": {"max": 7.5, "min_normal": 1.0, "min_subnormal": 0.125},
            "odd": {"max": 1e6 / 3, "min_normal": 0.3, "min_subnormal": 0.01}}
    table = _methods({"formats": fmts}, [])["formats"]
    assert [[c["text"] + (f"^{c['sup']}" if "sup" in c else "") for c in row[1:4]] for row in table["rows"]] == [
        ["448", "2^-6", "2^-9"], ["57344", "2^-14", "2^-16"], ["7.5", "1", "2^-3"], ["333333", "0.3", "0.01"]]
    html = str(table_rows(table["rows"], 6))
    assert '<td data-sort="0.015625">2<sup>-6</sup></td>' in html and ">2<sup>-16</sup></td>" in html
    assert "2^" not in html
    # sorted by value, not by text (the sort key has six significant digits)
    assert [row[2]["sort"] for row in table["rows"]][:2] == pytest.approx([2.0 ** -6, 2.0 ** -14], rel=1e-5)


def test_gflops_at_one_precision_and_ratios_with_a_times_sign(demo: dict) -> None:
    coverage = _coverage_section({"coverage": [
        {"kind": "linear", "op": "linear", "executed": 36, "captured": 36, "skipped": 0, "gflops": 0.151,
         "gflops_captured": 0.151},
        {"kind": "matmul", "op": "matmul", "executed": 16, "captured": 16, "skipped": 0, "gflops": 0.01678,
         "gflops_captured": 0.01678}]})["table"]
    assert _column(coverage, "GFLOPs") == ["0.1510", "0.01678"]
    assert _column(coverage, "captured share") == ["100.0 %", "100.0 %"]
    tables = copy.deepcopy(demo["tables"])
    tables["tensors"][0]["block_absmax_ratio"] = 3299.72
    tables["tensors"][1]["block_absmax_ratio"] = 1.0
    table = _range_section([], tables, {}, {}, (None, ""), 1, draw=False)["table"]
    assert _column(table, "global/block absmax")[:2] == ["3300×", "1.00×"]


def _with_attention(tables: dict, linear: bool) -> dict:
    """The demo's tables with an attention GEMM site (QKᵀ: its "weight" is K); ``linear``: the linear layers kept."""
    tables = copy.deepcopy(tables)
    site = "blocks.0.attn#qk"
    tables["layers"] = ([{**r, "b_is_weight": True} for r in tables["layers"]] if linear else []) + \
        [{**tables["layers"][0], "layer": site, "b_is_weight": False}]
    for name in ("gemm", "operands"):
        extra = [{**r, "layer": site} for r in tables[name] if r["layer"] == "blocks.0.attn.qkv"]
        tables[name] = (tables[name] if linear else []) + extra
    return tables


@pytest.mark.parametrize(("linear", "header"), [(True, "weight / 2nd activation"), (False, "K (2nd activation)")])
def test_per_layer_operand_header_names_the_second_activation(demo: dict, linear: bool, header: str) -> None:
    """The per-strategy operand tables said "weight" over attention GEMMs' K / V too."""
    tables = _with_attention(demo["tables"], linear)
    layers = list(dict.fromkeys(r["layer"] for r in tables["layers"]))
    strategies = list(dict.fromkeys(r["strategy"] for r in tables["operands"]))
    for t in _strategy_tables(layers, strategies, tables, {}, 20.0):
        assert [g["label"] for g in t["operands"]["groups"]] == ["", "activation", header, "grad_output"]


def test_per_layer_operand_header_stays_weight_without_attention_gemms(demo: dict) -> None:
    view = build_report_view(demo, draw=False)
    for t in view["strategy_tables"]:
        assert [g["label"] for g in t["operands"]["groups"]] == ["", "activation", "weight", "grad_output"]


def test_a_tiny_share_column_keeps_two_decimals_from_a_tenth_of_a_percent() -> None:
    """The delayed-scaling share column read "0.1%" beside "0.095%" and "0.0%" for none saturated."""
    from fp8probe.report.render import _small_share
    assert [_small_share(v)["text"] for v in (0.0, 0.000013, 0.00095, 0.001, 0.004, 0.5)] == [
        "0 %", "0.0013 %", "0.095 %", "0.10 %", "0.40 %", "50.0 %"]
