"""Keep-sets where a reader looks (QA A5, B2): the Recommendation table's keep-set as a count with the names (and
their sensitivity ranks) folded under it, the rows' notes under the tables, a "16-bit" plan mark in the sensitivity
tables and on the heat map's pinned column of the recommended plan."""
from __future__ import annotations

import re
from pathlib import Path

from fp8probe.report import render
from fp8probe.report.render import build_report_view, render_report, table_rows
from report_tables import deep_results, recommendation_rows, sensitivity_rows, with_agreed_tables

LAYERS = [f"blocks.{i}.fc1" for i in range(5)]


def _base() -> dict:
    return deep_results(n_layers=5, strategies=("global", "mxfp8"), width=64, sweeps=False)


DEEP = list(dict.fromkeys(r["layer"] for r in _base()["tables"]["layers"]))  # (sensitivity_rows: ranks 5 … 1)


def _data(keep: list[str]) -> dict:
    return with_agreed_tables(_base(), keep=keep)


def _section(html: str, sid: str) -> str:
    return html.split(f'<h2 id="{sid}">')[1].split("<h2")[0]


def test_the_keep_set_is_a_count_with_the_names_folded_under_it_in_rank_order() -> None:
    """QA B2: 13-34 full names a cell made the table 6 screens tall; QA A5: the header said "most sensitive first" of
    a keep-set that skips ranks. The names stay in the page (search), each with its rank, so a skipped rank shows."""
    tables = {"recommendation": recommendation_rows([LAYERS[4], LAYERS[1], LAYERS[2]]),
              "sensitivity": sensitivity_rows(LAYERS)}  # (ranks: blocks.4 #1 … blocks.0 #5)
    s = render._recommendation_section(tables)["strategies"]
    assert s["columns"][:2] == ["strategy", "kept in 16-bit (in sensitivity-rank order)"]
    assert "layers kept" not in s["columns"]
    mxfp8 = s["rows"][1][1]
    assert mxfp8["text"] == "3 layers" and mxfp8["sort"] == 3
    assert mxfp8["details"] == "blocks.4.fc1 (#1), blocks.2.fc1 (#3), blocks.1.fc1 (#4)"
    # a name the ranking lacks ("head") follows the ranked ones
    assert s["rows"][0][1]["details"].endswith("blocks.1.fc1 (#4), head")
    # rendered: closed, the summary the count, the names in the HTML
    cells = table_rows([[mxfp8]], 1)
    assert '<details><summary>3 layers</summary>blocks.4.fc1 (#1), blocks.2.fc1 (#3), blocks.1.fc1 (#4)</details>' in cells
    assert 'data-sort="3"' in cells and "<details open" not in cells


def test_a_folded_cell_escapes_its_names() -> None:
    html = table_rows([[{"text": "1 <b>", "sort": 1, "cls": "txt", "details": "<script>x</script>"}]], 1)
    assert "<script>" not in html and "<b>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html


def test_the_recommendation_tables_show_their_rows_notes(tmp_path: Path) -> None:
    """QA A5: why a keep-set skips a rank was only in results.json's note; the model-wide rows' notes were dropped
    too. The part every row repeats is said once."""
    data = _data(DEEP[3:])
    rows = data["tables"]["recommendation"]
    rows[0]["note"] = "validated by 16 run(s) over 2 batch(es); blocks.2.fc1 dropped from the kept prefix of the ranking"
    rows[1]["note"] = "validated by 16 run(s) over 2 batch(es)"
    rows[2]["note"] = "started from the smallest per-layer recommendation (32), 8 validation run(s)"
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    rec = _section(html, "recommendation")
    assert rec.count("validated by 16 run(s)") == 1 and "Every row: validated by 16 run(s) over 2 batch(es)." in rec
    assert "<strong>global</strong>: blocks.2.fc1 dropped from the kept prefix of the ranking" in rec
    assert "<strong>mxfp8</strong>:" not in rec  # (nothing of its own)
    model = rec.split('id="recommendation-model"')[1]
    assert "<strong>block size</strong>: started from the smallest per-layer recommendation (32)" in model
    assert "in sensitivity-rank order" in rec and "most sensitive first" not in rec


def test_the_sensitivity_tables_mark_the_recipes_keep_set() -> None:
    """QA A5: nothing in a sensitivity table said which layers the recipe's keep-set keeps (not always the top ranks)."""
    keep = [DEEP[4], DEEP[2]]  # ranks 1 and 3: rank 2 skipped
    sens = build_report_view(_data(keep), draw=False)["sensitivity"]
    tables = {t["strategy"]: t["table"] for t in sens["tables"]}
    assert sens["plan"]
    for s, kept in (("mxfp8", set(keep)), ("global", set(keep))):  # (global keeps "head" too, not a ranked layer)
        t = tables[s]
        assert t["columns"][:3] == ["rank", "layer", "plan"]
        marks = {row[1]["text"]: row[2]["text"] for row in t["rows"]}
        assert {layer for layer, m in marks.items() if m == "16-bit"} == kept
        assert set(marks.values()) == {"16-bit", ""}
    # without a keep-set no plan column
    sens = build_report_view(_data([]), draw=False)["sensitivity"]
    mxfp8 = next(t["table"] for t in sens["tables"] if t["strategy"] == "mxfp8")
    assert "plan" not in mxfp8["columns"]


def test_the_heat_maps_pinned_column_marks_the_layers_the_recommended_plan_keeps(tmp_path: Path) -> None:
    """QA A5: the pinned "int8 (recommended)" column read 40.0 dB for layers the plan keeps in 16-bit."""
    keep = [DEEP[4], DEEP[1]]
    data = _data(keep)
    fprop = {r["layer"]: r["sqnr_db"] for r in data["tables"]["gemm"] if r["gemm"] == "fprop" and r["strategy"] == "mxfp8"}
    hm = build_report_view(data, draw=False)["heatmap"]
    assert hm["table"]["columns"][1] == "mxfp8 (recommended)" and hm["kept"] == 2
    pinned = {row[0]["text"]: row[1] for row in hm["table"]["rows"]}
    for layer in keep:
        assert pinned[layer]["text"] == f"16-bit ({fprop[layer]:.1f})" and pinned[layer]["cls"] == "kept"
        assert pinned[layer]["sort"] == float(f"{fprop[layer]:.1f}")  # still sorts by its SQNR
    assert all(not c["text"].startswith("16-bit") and "kept" not in c["cls"]
               for layer, c in pinned.items() if layer not in keep)
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    legend = _section(html, "heatmap").split('<div class="legend">')[1].split("</div>")[0]
    assert re.search(r'<span class="kept">16-bit \(dB\) = one of the 2 layers the recommended plan keeps', legend)
    # the ★ columns in each GEMM keep the plain SQNR; an isolated pick has no keep-set to mark
    assert not any(c["text"].startswith("16-bit") for row in hm["table"]["rows"] for c in row[2:])
    hm = build_report_view(_base(), draw=False)["heatmap"]
    assert hm["pick"]["kind"] == "isolated pick" and hm["kept"] == 0


def _estimated(top: float, measured: float) -> dict:
    rows = [{"strategy": "mxfp4", "layer": layer, "index": i, "only_lp_loss_rel_change": top / (i + 1),
             "only_lp_kl": None, "only_hp_loss_rel_change": measured - top / (i + 1), "only_hp_kl": None,
             "isolated_fprop_sqnr_db": 15.0, "rank": i + 1,
             "method": "estimated: first-order <G, dY> + second-order term"} for i, layer in enumerate(LAYERS)]
    return {"sensitivity": rows, "e2e": [{"strategy": "mxfp4", "loss_rel_change": measured}]}


def test_estimates_over_twice_the_measured_all_layer_change_say_they_overstate() -> None:
    """QA: on a BERT under mxfp4 the estimate gave one layer alone +28.87 % while every layer in low precision measured
    +7.84 %; the table read as if that layer alone cost four times the whole model."""
    t = render._sensitivity_section(_estimated(0.2887, 0.0784), 30.0, None, {})["tables"][0]
    assert t["overstated"].startswith("The estimate for blocks.0.fc1 alone (+28.87 %) is over 2x the measured change "
                                      "with every layer in low precision (+7.84 %)")
    assert "--sensitivity measured" in t["overstated"]
    # within 2x, below 0.1 %, measured tables and a missing end-to-end row: no caveat
    assert render._sensitivity_section(_estimated(0.15, 0.0784), 30.0, None, {})["tables"][0]["overstated"] == ""
    assert render._sensitivity_section(_estimated(0.0009, 0.0001), 30.0, None, {})["tables"][0]["overstated"] == ""
    measured = _estimated(0.2887, 0.0784)
    for r in measured["sensitivity"]:
        r["method"] = "measured: forward runs"
    assert render._sensitivity_section(measured, 30.0, None, {})["tables"][0]["overstated"] == ""
    assert render._sensitivity_section({**_estimated(0.2887, 0.0784), "e2e": []}, 30.0, None, {})["tables"][0][
        "overstated"] == ""


def test_an_overstating_estimate_is_said_in_its_tables_line_and_above_the_table(tmp_path: Path) -> None:
    data = _data([])
    data["tables"].update(_estimated(0.2887, 0.0784))
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    sec = _section(html, "sensitivity")
    assert "(loss +28.87 %); the estimates overstate (see the note)</summary>" in sec
    assert '<div class="callout">The estimate for blocks.0.fc1 alone (+28.87 %)' in sec
