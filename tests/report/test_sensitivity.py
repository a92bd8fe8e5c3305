"""The report's "Per-layer sensitivity" section: the method said once, empty columns left out, only the tables a
reader acts on open (the recommended recipe's first), small changes in plain decimal (QA A5, C2, D1)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from fp8probe.report.render import build_report_view, load_results, render_report
from report_tables import with_agreed_tables

DATA = Path(__file__).parent / "data"
ESTIMATED = ("estimated: first-order <G, dY> + second-order 1/2 N sum_t (G_t . dY_t)^2 (empirical Fisher) from the "
             "layer's isolated fprop error dY and captured output gradient G; only-16-bit = full e2e change minus this "
             "layer's estimate")
MEASURED = "measured: forward runs over every batch with only this layer in low precision / only it in 16-bit"
# the results' strategy order; report_tables' recommendation: mxfp8 recommended keeping the given layer, global
# over budget even with a keep-set
RUN_ORDER = ("global", "mixed", "int8", "mxfp8")


def _rows(strategy: str, layers: list[str], method: str) -> list[dict]:
    measured = method.startswith("measured")
    return [{"strategy": strategy, "layer": layer, "index": i, "only_lp_loss_rel_change": 8.9e-7 * (i + 1),
             "only_lp_kl": 1e-5 * (i + 1) if measured else None,
             "only_hp_loss_rel_change": 1.3e-5 - 8.9e-7 * (i + 1),
             "only_hp_kl": 2e-5 if measured else None, "isolated_fprop_sqnr_db": 30.0 - i,
             "rank": len(layers) - i, "method": method} for i, layer in enumerate(layers)]


def _results(methods: dict[str, str], recommendation: bool = True) -> dict:
    data = with_agreed_tables(load_results(DATA / "results_demo_small.json"), keep=["blocks.1.mlp.fc2"])
    layers = list(dict.fromkeys(r["layer"] for r in data["tables"]["layers"]))
    data["tables"]["sensitivity"] = [row for s in RUN_ORDER for row in _rows(s, layers, methods[s])]
    if not recommendation:
        del data["tables"]["recommendation"]
    return data


@pytest.fixture(scope="module")
def estimated() -> dict:
    return _results(dict.fromkeys(RUN_ORDER, ESTIMATED))


def _section(html: str) -> str:
    return html.split('<h2 id="sensitivity">')[1].split("<h2 ")[0]


def test_the_estimator_formula_is_said_once_for_the_section(estimated: dict, tmp_path: Path) -> None:
    """QA C2: the formula stood verbatim in all 15 recipes' summary lines."""
    sens = _section(render_report(estimated, tmp_path / "r.html", draw=False).read_text(encoding="utf-8"))
    assert sens.count("first-order &lt;G, dY&gt;") == 1
    assert "Method: <strong>estimated</strong>: first-order" in sens
    for summary in re.findall(r"<summary>(.*?)</summary>", sens, re.S):
        assert "estimated" not in summary and "first-order" not in summary


def test_a_measured_recipe_beside_estimated_ones_says_which_is_which(tmp_path: Path) -> None:
    data = _results({**dict.fromkeys(RUN_ORDER, ESTIMATED), "int8": MEASURED})
    sens = _section(render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8"))
    assert sens.count("first-order &lt;G, dY&gt;") == 1 and sens.count("forward runs over every batch") == 1
    summaries = dict(re.findall(r"<summary><strong>([\w-]+)</strong>(.*?)</summary>", sens, re.S))
    assert ", measured;" in summaries["int8"]
    assert all(", estimated;" in summaries[s] for s in ("global", "mixed", "mxfp8"))


def test_columns_empty_in_every_row_are_left_out(tmp_path: Path) -> None:
    """QA A5: both KL columns read "–" on every row in the estimated mode; a measured table keeps them."""
    data = _results({**dict.fromkeys(RUN_ORDER, ESTIMATED), "int8": MEASURED})
    tables = {t["strategy"]: t["table"] for t in build_report_view(data, draw=False)["sensitivity"]["tables"]}
    # (mxfp8 has a keep-set: its "plan" column marks the kept layers, test_keep_marks)
    assert tables["mxfp8"]["columns"] == ["rank", "layer", "plan", "forward index", "loss change (only this LP)",
                                          "loss change (only this 16-bit: end to end − estimate)",
                                          "isolated fprop SQNR dB"]
    assert all(len(row) == 7 for row in tables["mxfp8"]["rows"])
    assert tables["int8"]["columns"] == ["rank", "layer", "forward index", "loss change (only this LP)",
                                         "KL (only this LP)", "loss change (only this 16-bit)", "KL (only this 16-bit)",
                                         "isolated fprop SQNR dB"]


def test_only_the_recommended_table_is_open_first_then_the_keep_set_ones(estimated: dict, tmp_path: Path) -> None:
    """15 tables of 13 rows stood open: now the recommended recipe's (first), then those that needed a keep-set; the
    others collapsed under a line that names the recipe and its most sensitive layer. The keep-set ones are collapsed
    too: with a kl: budget every recipe has a keep-set and all 15 opened again (555 rows, QA)."""
    sens = _section(render_report(estimated, tmp_path / "r.html", draw=False).read_text(encoding="utf-8"))
    details = re.findall(r"<details( open)?><summary><strong>([\w-]+)</strong>(.*?)</summary>", sens, re.S)
    assert [(s, bool(o)) for o, s, _ in details] == [("mxfp8", True), ("global", False), ("mixed", False),
                                                     ("int8", False)]
    lines = {s: line for _, s, line in details}
    assert lines["mxfp8"].startswith(" (recommended, keep-set of 1 layer): 9 layers")
    assert lines["global"].startswith(" (keep-set of 2 layers): 9 layers")
    top = next(r for r in estimated["tables"]["sensitivity"] if r["strategy"] == "mixed" and r["rank"] == 1)
    assert f"most sensitive <code>{top['layer']}</code> (loss +0.0008" in lines["mixed"]
    assert "Open: the recommended recipe&#39;s table; the others are collapsed" in sens


def test_without_a_recommendation_the_first_table_is_open(tmp_path: Path) -> None:
    data = _results(dict.fromkeys(RUN_ORDER, ESTIMATED), recommendation=False)
    tables = build_report_view(data, draw=False)["sensitivity"]["tables"]
    assert [(t["strategy"], t["open"]) for t in tables] == [("global", True), ("mixed", False), ("int8", False),
                                                          ("mxfp8", False)]


def test_small_changes_read_as_plain_decimals_with_two_significant_digits(estimated: dict) -> None:
    """QA D1: "+8.9e-05 %" beside "+0.0012 %"."""
    table = next(t for t in build_report_view(estimated, draw=False)["sensitivity"]["tables"]
                 if t["strategy"] == "mxfp8")["table"]
    at = table["columns"].index("loss change (only this LP)")
    only_lp = [row[at]["text"] for row in table["rows"]]
    assert "+0.000089 %" in only_lp and "+0.00080 %" in only_lp
    assert not any("e" in text for row in table["rows"] for text in (row[at]["text"], row[at + 1]["text"]))


def test_results_without_a_method_or_a_kl_still_render(tmp_path: Path) -> None:
    """Older results: no method column at all; nothing to say once, and the table still renders."""
    data = _results(dict.fromkeys(RUN_ORDER, ESTIMATED))
    for row in data["tables"]["sensitivity"]:
        del row["method"]
    view = build_report_view(copy.deepcopy(data), draw=False)["sensitivity"]
    assert view["methods"] == [] and len(view["tables"]) == 4
    assert "Method:" not in _section(render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8"))


def test_with_a_kl_budget_a_measured_recipe_line_names_its_top_layer_by_its_kl() -> None:
    """Rank 1 is chosen by the budget's metric: with a kl: budget the line shows the KL it was ranked by."""
    data = _results({**dict.fromkeys(RUN_ORDER, ESTIMATED), "int8": MEASURED})
    for r in data["tables"]["recommendation"]:
        r["budget_kind"] = "kl"
    lines = {t["strategy"]: t["top_value"] for t in build_report_view(data, draw=False)["sensitivity"]["tables"]}
    assert lines["int8"] == "KL 9e-05"  # measured: the KL of rank 1 (the last layer, 9 × 1e-5)
    assert lines["mixed"] == "loss +0.00080 %"  # estimated: no KL, the loss change it was ranked by
