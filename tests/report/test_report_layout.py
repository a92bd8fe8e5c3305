"""The report answers at a glance: verdict first, layer × strategy heat map, end-to-end tables from the agreed
schemas, outlier dimensions that matter, sweep charts with the model-wide value, a 211-layer report under 2 MB."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from fp8probe.report.render import _heatmap, _pct, _table, build_report_view, cell, load_results, render_report
from report_tables import deep_results, with_agreed_tables

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def small() -> dict:
    return load_results(DATA / "results_small.json")


@pytest.fixture(scope="module")
def demo_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = with_agreed_tables(load_results(DATA / "results_demo_small.json"), keep=["blocks.1.mlp.fc2"])
    data["metadata"].update(dtype="float32", threads=1)
    return render_report(data, tmp_path_factory.mktemp("r") / "r.html").read_text(encoding="utf-8")


def test_verdict_comes_first_and_names_recipe_layers_loss_and_flops(demo_html: str) -> None:
    body = demo_html.split("<body>")[1]
    order = [body.index(f'id="{a}"') for a in ("verdict", "heatmap", "recommendation", "sensitivity", "training",
                                                "summary", "strategies", "range", "outliers", "blocksize", "coverage")]
    assert order == sorted(order)
    verdict = body.split('<section id="verdict">')[1].split("</section>")[0]
    main = verdict.split('class="callout ok verdict-main">')[1].split("</div>")[0]
    assert "<strong>mxfp8</strong>" in main and "<code>blocks.1.mlp.fc2</code>" in main
    assert "+0.12 %" in main and "94.7 % of the analysed forward GEMM FLOPs (90.0 % of the model&#39;s)" in main
    # every strategy's end-to-end loss change and FLOP share, and the coverage and skipped-GEMM warning
    assert "+4.00 %" in verdict and "+0.30 %" in verdict
    assert "Captured 28 of 30 GEMMs = 95.0 % of GEMM FLOPs" in verdict
    assert 'class="warnline">Warning: 2 GEMM call(s) not analysed' in verdict


def test_header_has_dtype_device_threads_and_coverage(demo_html: str) -> None:
    info = demo_html.split('<dl class="info">')[1].split("</dl>")[0]
    for key, value in (("model dtype", "float32"), ("device", "cpu"), ("CPU threads", "1"),
                       ("coverage", "captured 28 of 30 GEMMs")):
        assert re.search(rf"<dt>{key}</dt><dd>{re.escape(value)}", info), key


def test_agreed_tables_rendered(demo_html: str) -> None:
    rec = demo_html.split('id="recommendation-table"')[1].split("</table>")[0]
    assert rec.count("<tr") == 1 + 2  # header row + strategy ×2; the block size and threshold have their own table
    settings = demo_html.split('id="recommendation-model"')[1].split("</table>")[0]
    assert settings.count("<tr") == 1 + 2
    sens = demo_html.split('id="sensitivity"')[1]
    assert 'id="sens-global"' in sens and 'id="sens-mxfp8"' in sens
    assert "mean / high precision&#39;s" in demo_html and "0.0042" in demo_html  # weight drift of mxfp8
    cov = demo_html.split('id="coverage-table"')[1].split("</table>")[0]
    assert "conv3d not supported" in cov and 'class="bad"' in cov


def test_absent_tables_say_what_is_missing_in_one_line(small: dict, tmp_path: Path) -> None:
    html = render_report(small, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    assert "no end-to-end run in these results: run analyze without --no-e2e" in verdict
    assert "no coverage table in these results" in verdict
    assert "callout ok verdict-main" not in verdict  # nothing is recommended without a validated run
    assert "Isolated GEMMs only (not validated end to end): llm-int8 keeps every layer" in verdict
    for anchor in ("recommendation", "sensitivity", "training", "coverage"):
        assert f'id="{anchor}"' not in html


def test_heatmap_one_row_per_layer_and_unquantised_gemms_say_so(tmp_path: Path) -> None:
    data = deep_results(n_layers=14, strategies=("mixed", "mxfp8"), width=64, sweeps=False)
    view = build_report_view(data, draw=False)
    hm = view["heatmap"]
    assert len(hm["table"]["rows"]) == 14
    # (no end-to-end run: mxfp8, the verdict's isolated pick, is starred and its fprop column pinned beside the layer)
    assert hm["table"]["columns"] == ["layer", "mxfp8 (isolated pick)", "mixed", "★ mxfp8", "mixed", "★ mxfp8", "mixed",
                                      "★ mxfp8"]
    wgrad_mixed = [row[2 + 2 * 2] for row in hm["table"]["rows"]]
    assert all(c["text"] == "n/q" and c["cls"] == "nq" for c in wgrad_mixed)
    # results written before the `quantised` column: ~140 dB is float32 rounding, not a recipe's error
    old = copy.deepcopy(data)
    for r in old["tables"]["gemm"]:
        r.pop("quantized")
    assert all(row[6]["text"] == "n/q" for row in build_report_view(old, draw=False)["heatmap"]["table"]["rows"])
    # colour bins around the 20 dB line: 12.3 dB is two bins below it, 21 dB the first bin above
    data["tables"]["gemm"][0]["sqnr_db"] = 12.3
    data["tables"]["gemm"][3]["sqnr_db"] = 21.0  # same layer, mxfp8 fprop
    row = build_report_view(data, draw=False)["heatmap"]["table"]["rows"][0]
    assert (row[2]["cls"], row[3]["cls"], row[1]["text"], row[1]["cls"]) == ("h2", "h4", "21.0", "h4")
    legend = build_report_view(data, 30.0, draw=False)["heatmap"]["legend"]
    assert [b["label"] for b in legend][3:5] == ["25–30", "30–35"] and legend[4]["line"]


def test_deep_model_report_under_2_mb_with_details_collapsed(tmp_path: Path) -> None:
    data = with_agreed_tables(deep_results(n_layers=211))
    html = render_report(data, tmp_path / "deep.html").read_text(encoding="utf-8")
    assert len(html.encode()) < 2_000_000
    assert html.count("<tr>") > 211 * 8  # everything is still there: heat map, per-strategy tables, sweeps
    strategies = html.split('id="strategies"')[1]
    assert strategies.count("<details><summary><h3>") == 8  # per-strategy tables start collapsed
    assert "The charts draw the 12 of 211 layers with the lowest fprop SQNR; every layer is in the table." in html
    assert "Dotted line in the charts: model-wide: 128 (validated end to end)." in html


def test_outliers_as_the_dimensions_that_matter(small: dict) -> None:
    data = deep_results(n_layers=9, strategies=("mxfp8",), width=1024, sweeps=False)
    for r in data["tables"]["outliers"]:
        r["top_dim_tokens"] = [0.25] * len(r["top_dims"])
    out = build_report_view(data, draw=False)["outliers"]
    assert out["grid"]["columns"] == ["layer", "7", "300", "911"]  # three planted dims, not 1024 columns
    assert out["n_flagged"] == 3 and len(out["grid"]["rows"]) == 3
    first = out["grid"]["rows"][0]
    assert first[1]["text"] == "30.70 · 25 %" and first[1]["cls"] == "o2"  # 30.7 ≥ 2 × threshold 6
    assert "911: 121.1 (25 % of tokens)" in out["table"]["rows"][0][5]["text"]


def test_sweep_mark_without_recommendation_is_most_layers_pick() -> None:
    data = deep_results(n_layers=8, strategies=("mxfp8",), width=64)
    view = build_report_view(data, draw=False)
    assert view["blocksize"]["model"] == "most layers' pick: 128 (6 of 8)"
    assert view["threshold"]["model"] == "most layers' pick: 6 (8 of 8)"


def test_percent_cells_do_not_shade_zero_or_negligible_shares() -> None:
    assert _pct(0.0) == {"text": "0 %", "sort": 0.0, "cls": ""}
    assert _pct(3e-5)["text"] == "<0.01 %" and _pct(3e-5)["cls"] == ""
    assert _pct(0.004)["text"] == "0.40 %" and _pct(0.004)["cls"] == "warn"


def test_a_long_keep_list_in_the_verdict_links_to_the_whole_list(tmp_path: Path) -> None:
    """The verdict banner cut the kept layers at 12 with "…" and no way to the rest (QA of the HTML report); then it
    named 12 of 13 and hid one behind the link (QA 2): up to 16 are all named, a longer list shows 10 and the link."""
    data = deep_results(n_layers=30, strategies=("mxfp8",), sweeps=False)
    layers = list(dict.fromkeys(r["layer"] for r in data["tables"]["layers"]))
    html = render_report(with_agreed_tables(data, keep=layers[:20]), tmp_path / "r.html").read_text(encoding="utf-8")
    assert html.count('<a href="#recommendation">all 20 in the Recommendation table</a>') == 2, html[:3000]
    banner = html[html.index("verdict-main"):]
    banner = banner[:banner.index("</div>")]
    assert [f"<code>{x}</code>" in banner for x in layers[:11]] == [True] * 10 + [False]
    assert 'id="recommendation"' in html
    html = render_report(with_agreed_tables(data, keep=layers[:16]), tmp_path / "r.html").read_text(encoding="utf-8")
    banner = html[html.index("verdict-main"):]
    banner = banner[:banner.index("</div>")]
    assert all(f"<code>{x}</code>" in banner for x in layers[:16]) and "in the Recommendation table" not in banner


def test_the_heat_maps_layer_column_stays_in_view_when_it_scrolls_sideways(tmp_path: Path) -> None:
    """The heat map is 3 GEMMs x 15 recipes wide: scrolled to dgrad or wgrad, its rows could no longer be told apart
    (QA of the HTML report). The layer column is sticky (checked by eye in headless Chromium, 2026-12-01)."""
    data = with_agreed_tables(load_results(DATA / "results_demo_small.json"))
    html = render_report(data, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="sqnr-heat"' in html
    assert "#sqnr-heat td:first-child { position: sticky; left: 0;" in html


def test_a_column_is_aligned_one_way_and_its_header_with_it(tmp_path: Path) -> None:
    """QA D2: "34 of 37" (td.bad) sat right of a left-aligned "0 of 37" (td.txt) in the same column, and the headers of
    text columns ("layer", "strategy", ...) were right-aligned above left-aligned values."""
    t = _table("t", ["layer", "note", "SQNR"], [[cell("a"), cell("fine"), cell(1.0)],
                                               [cell("b"), cell("diverged", cls="bad"), cell(None)],
                                               [cell("c"), cell(None), cell(2.0, cls="bad")]])
    assert t["text"] == [True, True, False]
    assert [row[1]["cls"] for row in t["rows"]] == ["txt", "bad txt", "txt"]  # "–" and the red text both left
    assert [row[2]["cls"] for row in t["rows"]] == ["", "", "bad"]  # a numeric column stays right-aligned
    data = load_results(DATA / "results_demo_small.json")
    next(r for r in data["tables"]["gemm"] if r["gemm"] == "fprop")["sqnr_db"] = 3.0  # one strategy has a layer below
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    assert "th.txt { text-align: left; }" in html
    iso = html.split('id="isolated-summary"')[1].split("</table>")[0]
    assert '<th scope="col" class="txt">strategy</th><th scope="col">layers below' in iso
    assert '<th scope="col" class="txt">worst layer</th>' in iso
    # "n of m" is a count: right-aligned (no txt) whether red or not, and sorted by n
    counts = re.findall(r'<td( class="[^"]*")? data-sort="(\d+)">(\d+) of \d+</td>', iso)
    assert counts and all(sort == n and "txt" not in cls for cls, sort, n in counts)
    assert any("bad" in cls for cls, _, _ in counts) and any(not cls for cls, _, _ in counts)


STRATEGIES_15 = ("global", "mixed", "int8", "switchback", "ocp-tensorwise", "ocp-rowwise", "ocp-blockwise", "mxfp8",
                 "delayed", "mxfp8-rceil", "nvfp4", "nvfp4-train", "mxfp4", "mxfp6-e2m3", "mxfp6-e3m2")


def _visible(hm: dict, gemm: str) -> list[str]:
    """The heat map's columns left showing when the selector's ``gemm`` is checked (the template hides the rest)."""
    (view,) = [v for v in hm["views"] if v["gemm"] == gemm]
    return [c for i, c in enumerate(hm["table"]["columns"], 1)
            if not any(h["first"] <= i <= h["last"] for h in view["hide"])]


def test_the_heat_map_shows_one_gemm_at_a_time_with_its_label(tmp_path: Path) -> None:
    """QA B1: layer, worst fprop and 3 GEMMs x 15 recipes were 47 columns; only fprop fitted a 1400 px page and the
    dgrad / wgrad group labels sat off-screen. A radio selector (works without JS) shows one GEMM's columns, its
    group label left-aligned over them; one table, so sorting and the sticky layer column work for every GEMM."""
    data = with_agreed_tables(deep_results(n_layers=9, strategies=STRATEGIES_15, width=64, sweeps=False))
    hm = build_report_view(data, draw=False)["heatmap"]
    starred = ["★ mxfp8" if s == "mxfp8" else s for s in STRATEGIES_15]  # mxfp8 is recommended (report_tables)
    assert [v["gemm"] for v in hm["views"]] == ["fprop", "dgrad", "wgrad"]
    assert _visible(hm, "fprop") == ["layer", "mxfp8 (recommended)", *starred]
    assert _visible(hm, "dgrad") == _visible(hm, "wgrad") == ["layer", *starred]  # 16 columns each, not 47
    groups = [g["label"] for g in hm["table"]["groups"]]
    assert groups == ["", "fprop SQNR (dB)", "dgrad SQNR (dB)", "wgrad SQNR (dB)"]
    for view in hm["views"]:  # each view hides the other GEMMs' group labels, never its own
        assert sorted(h["group"] for h in view["hide"]) == [k + 1 for k, g in enumerate(groups) if g and view["gemm"] not in g]
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    heat = html.split('<div class="heat">')[1].split("</table>")[0]
    assert '<input type="radio" name="heat-gemm" id="heat-fprop" checked><label for="heat-fprop">fprop' in heat
    assert '<input type="radio" name="heat-gemm" id="heat-wgrad"><label for="heat-wgrad">wgrad' in heat
    assert ("#heat-dgrad:checked ~ .tablewrap tr:not(.groups) > :nth-child(n+2):nth-child(-n+17),\n"
            "#heat-dgrad:checked ~ .tablewrap tr.groups > :nth-child(2) { display: none; }") in heat
    assert heat.count('class="sortable" id="sqnr-heat"') == 1  # the sort script's one table
    assert "#sqnr-heat tr.groups th { text-align: left; }" in html
    # a run without gradients has one GEMM: no selector
    for r in data["tables"]["gemm"]:
        r["gemm"] = "fprop" if r["gemm"] == "fprop" else "dropped"
    data["tables"]["gemm"] = [r for r in data["tables"]["gemm"] if r["gemm"] == "fprop"]
    html = render_report(data, tmp_path / "f.html", draw=False).read_text(encoding="utf-8")
    assert 'name="heat-gemm"' not in html and "one GEMM at" not in html and 'id="sqnr-heat"' in html


def test_the_heat_maps_pinned_column_is_the_verdicts_recipe_not_the_worst_over_fp4(tmp_path: Path) -> None:
    """QA C5: "worst fprop" took the minimum over all 15 recipes, always an FP4 one, so sorting by it ranked layers by
    FP4 behaviour. The column beside the layer is now the recipe the Verdict names, and the caption says which."""
    base = deep_results(n_layers=9, strategies=STRATEGIES_15, width=64, sweeps=False)
    fprop = {(r["layer"], r["strategy"]): r["sqnr_db"] for r in base["tables"]["gemm"] if r["gemm"] == "fprop"}
    recommended = with_agreed_tables(base)
    for data, pick, kind in ((recommended, "mxfp8", "recommended"), (base, None, "isolated pick")):
        view = build_report_view(data, draw=False)
        hm = view["heatmap"]
        pick = pick or view["verdict"]["isolated_pick"]
        assert hm["pick"] == {"strategy": pick, "kind": kind, "pinned": True}
        assert hm["table"]["columns"][1] == f"{pick} ({kind})"
        # (a layer the recommended plan keeps in 16-bit says so: test_keep_marks)
        kept = set(view["verdict"]["recommended"]["keep_16bit"]) if kind == "recommended" else set()
        assert [row[1]["text"] for row in hm["table"]["rows"]] == [
            f"16-bit ({fprop[row[0]['text'], pick]:.1f})" if row[0]["text"] in kept else f"{fprop[row[0]['text'], pick]:.1f}"
            for row in hm["table"]["rows"]]
        worst = [min(fprop[row[0]["text"], s] for s in STRATEGIES_15) for row in hm["table"]["rows"]]
        assert [row[1]["text"] for row in hm["table"]["rows"]] != [f"{w:.1f}" for w in worst]
        html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
        intro = html.split('<h2 id="heatmap">')[1].split("</p>")[0]
        assert f"★ marks <strong>{pick}</strong>" in intro and f"(<em>{pick} ({kind})</em>)" in intro
        assert ("the recommended recipe (Verdict" if kind == "recommended" else "the Verdict's isolated pick") in intro
    # nothing named (no recipe within the budget): no pinned column, no star, no claim in the caption
    hm = _heatmap(["l0"], ["a", "b"], {("l0", s, "fprop"): {"sqnr_db": 30.0} for s in ("a", "b")}, 20.0, None)
    assert hm["table"]["columns"] == ["layer", "a", "b"] and hm["pick"] is None and hm["views"][0]["hide"] == []


def test_the_end_to_end_table_drops_an_empty_note_column_and_fits_800_px(small: dict) -> None:
    """At 800 px the decisive "within budget with them" column was off-screen, behind an empty note column (QA B5;
    the narrower padding and strategy column (_style.css.j2 #e2e) do the rest, checked by screenshot)."""
    data = with_agreed_tables(copy.deepcopy(small), keep=[])
    e2e = build_report_view(data, draw=False)["verdict"]["e2e"]
    assert e2e["columns"][-3:] == ["layers kept in 16-bit", "low-precision forward FLOPs", "within budget"]
    assert all(len(row) == len(e2e["columns"]) for row in e2e["rows"])
    assert sum(g["span"] for g in e2e["groups"]) == len(e2e["columns"])
    # a row with a note of its own brings the column back, for every row
    data["tables"]["e2e"][0]["note"] = "2 layer(s) overflowed"
    e2e = build_report_view(data, draw=False)["verdict"]["e2e"]
    assert e2e["columns"][-1] == "note" and e2e["rows"][0][-1]["text"] == "2 layer(s) overflowed"
    assert all(len(row) == len(e2e["columns"]) for row in e2e["rows"])
    assert sum(g["span"] for g in e2e["groups"]) == len(e2e["columns"])


def test_header_says_the_inputs_shape_the_gemm_sites_and_calls_the_baseline_loss_and_parameters(small: dict) -> None:
    """The header said "inputs: x.pt" (no shape, no token count), "74 GEMMs" where the terminal said "37 GEMM site(s)",
    no parameter count for a Hugging Face model and the model's own loss nowhere (QA C3)."""
    data = with_agreed_tables(copy.deepcopy(small), keep=[])
    meta = data["metadata"]
    meta.update(inputs="x.pt", parameters=2_623_744, batches=2,
                coverage={"gemms_executed": 74, "gemms_captured": 74, "flop_share": 1.0, "skipped": {}},
                input_shapes={"batches": 2, "tensors": [{"name": "input_ids", "shape": [1, 64], "dtype": "int64"},
                                                        {"name": "labels", "shape": [1, 64], "dtype": "int64"}],
                              "same_shapes": True, "token_ids": "input_ids", "tokens": 128})
    info = {i["key"]: i["value"] for i in build_report_view(data, draw=False)["info"]}
    assert info["inputs"] == "x.pt: 2 batch(es) of 1 x 64 tokens (128 tokens in all)"
    # (the calls are the coverage line's: the coverage table's 28 captured of 30 where there is one)
    assert info["GEMMs"] == f"{len(data['tables']['layers'])} GEMM site(s) (28 GEMM call(s) in 2 batch(es))"
    assert info["coverage"].startswith("captured 28 of 30 GEMMs")
    assert info["model"].endswith(" (2.62 M parameters)")
    assert info["loss"].endswith("; 2.5 in high precision (the loss changes' base)")  # e2e_rows' loss_hp
    # inputs without token ids: the first batch's tensors; shapes that vary say so
    meta["input_shapes"] = {"batches": 3, "tensors": [{"name": "arg0", "shape": [8, 3, 32, 32], "dtype": "float32"}],
                            "same_shapes": False, "token_ids": None, "tokens": None}
    assert {i["key"]: i["value"] for i in build_report_view(data, draw=False)["info"]}["inputs"] == (
        "x.pt: 3 batch(es) of arg0 8 x 3 x 32 x 32; the first batch's shape, later ones differ")
    # a description that says the shape already (the demo's) is not repeated; older results render as before
    meta.update(inputs="4 seeded batch(es) of 8 x 32 tokens",
                input_shapes=dict(meta["input_shapes"], batches=4, token_ids="arg0", same_shapes=True, tokens=1024,
                                  tensors=[{"name": "arg0", "shape": [8, 32], "dtype": "int64"}]))
    assert {i["key"]: i["value"] for i in build_report_view(data, draw=False)["info"]}["inputs"] == meta["inputs"]
    for key in ("input_shapes", "parameters"):
        del meta[key]
    info = {i["key"]: i["value"] for i in build_report_view(data, draw=False)["info"]}
    assert info["inputs"] == meta["inputs"] and "parameters" not in info["model"]


def test_the_end_to_end_tables_keep_set_shows_its_share_and_a_yes_worth_little_is_not_plain_green(
        small: dict, tmp_path: Path) -> None:
    """The keep-set group had "layers kept" and a green "yes" only: nvfp4 kept 32 of 37 layers (5.2 % of the FLOPs in
    low precision) and read "yes", the share nowhere in the table (the 100 % beside it was every layer's); FP4 recipes
    met a loss budget with a KL 196x the recommended plan's and a green "yes" (QA A3)."""
    data = with_agreed_tables(copy.deepcopy(small), keep=["fc1", "fc2"])
    rec = data["tables"]["recommendation"]
    rec[0].update(within_budget=True, lp_flop_share=0.052)  # global: a keep-set worth little
    view = build_report_view(data, draw=False)["verdict"]
    e2e = view["e2e"]
    at = {c: e2e["columns"].index(c) for c in ("KL", "layers kept in 16-bit", "within budget")}
    by = {row[0]["text"]: row for row in e2e["rows"]}
    share = at["layers kept in 16-bit"] + 1  # (the keep-set's, beside "layers kept"; not the all-LP column's 100 %)
    assert [by[s][share]["text"] for s in ("global", "mxfp8")] == ["5.2 %", "94.7 %"]
    assert by["global"][share]["cls"] == "warn" and by["mxfp8"][share]["cls"] == ""
    little = by["global"][at["within budget"]]
    assert (little["text"], little["cls"]) == ("yes*", "warn")
    assert "5.2 %" in little["title"] and "under 50 %: little gain over 16-bit" in little["title"]
    assert (by["mxfp8"][at["within budget"]]["text"], by["mxfp8"][at["within budget"]]["cls"]) == ("yes", "good")
    assert [f.split(":")[0] for f in view["e2e_flags"]] == ["yes* with an amber share"]
    # a loss budget met with no layer kept and a KL over 100x the recommended plan's (0.0009): the KL cell is red
    rec[0].update(keep_16bit=[], n_keep=0, lp_flop_share=1.0, kl_div=0.18)
    data["tables"]["e2e"][0]["kl_div"] = 0.18
    view = build_report_view(data, draw=False)["verdict"]
    by = {row[0]["text"]: row for row in view["e2e"]["rows"]}
    assert by["global"][at["KL"]]["cls"] == "bad" and "200× the recommended plan's (0.0009)" in by["global"][at["KL"]]["title"]
    assert by["global"][at["within budget"]]["text"] == "yes*" and by["mxfp8"][at["KL"]]["cls"] == ""
    # (and the plan, every layer in low precision, leaves the output at 17.2 dB SQNR: under 20 dB)
    assert [f.split(":")[0] for f in view["e2e_flags"]] == ["yes* beside a red KL", "yes* for a low output SQNR"]
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    assert 'title="KL 0.18, 200× the recommended plan&#39;s (0.0009), within the loss budget' in html
    assert "yes* beside a red KL: within the loss budget" in html


def test_a_recommended_keep_set_with_little_in_low_precision_is_not_a_green_headline(small: dict, tmp_path: Path) -> None:
    """The headline's callout was green for int8 keeping 13 of 37 layers, 37.2 % of the FLOPs in low precision (QA A3)."""
    data = with_agreed_tables(copy.deepcopy(small), keep=["fc1"])
    html = render_report(data, tmp_path / "a.html", draw=False).read_text(encoding="utf-8")
    assert '<div class="callout ok verdict-main">' in html and "little gain" not in html
    data["tables"]["recommendation"][1]["lp_flop_share"] = 0.372
    html = render_report(data, tmp_path / "b.html", draw=False).read_text(encoding="utf-8")
    main = html[html.index('<div class="callout verdict-main">'):]
    assert "37.2 % of the analysed forward GEMM FLOPs" in main and "(under 50 %: little gain over 16-bit).</div>" in main


def test_the_verdict_says_its_share_is_of_the_forward_gemms_and_relates_a_warning_to_its_recipe(tmp_path: Path) -> None:
    """"100.0 % of GEMM FLOPs in low precision" for switchback, whose dgrad and wgrad are n/q in the heat map: the
    end-to-end runs compare forward outputs, so the share is of the forward GEMM FLOPs (QA A3). An underflow warning
    naming the recommended recipe sat under its banner with nothing relating the two (QA A4)."""
    data = with_agreed_tables(load_results(DATA / "results_demo_small.json"), keep=["blocks.1.mlp.fc2"])
    for r in data["tables"]["operands"]:
        if (r["layer"], r["strategy"], r["operand"]) == ("blocks.0.fc1", "mxfp8", "activation"):
            r["underflow_frac"] = 0.25
    html = render_report(data, tmp_path / "r.html").read_text(encoding="utf-8")
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    main = verdict.split('verdict-main">')[1].split("</div>")[0]
    assert "of the analysed forward GEMM FLOPs" in main
    caption = verdict.split('<div class="tcaption">End to end, per strategy')[1].split("</div>")[0]
    assert "share of forward GEMM FLOPs in low precision" in caption
    assert ("the backward GEMMs (dgrad, wgrad) count in neither; they show in the gradient SQNR and in the heat "
            "map&#39;s dgrad / wgrad views") in caption
    assert re.findall(r'<th scope="col">(low-precision[^<]*)</th>', verdict) == ["low-precision forward FLOPs"] * 2
    rec = html.split('<h2 id="recommendation">')[1].split("<h2 ")[0]
    assert "the one with the most forward GEMM FLOPs in low precision" in rec
    assert "a plan whose model output SQNR is under 20 dB, a yes*, only when no plan reaches 20 dB" in " ".join(rec.split())
    assert '<th scope="col">low-precision forward FLOPs</th>' in rec
    (warned,) = re.findall(r'<li class="warnline">(Warning: activation underflow[^<]*)</li>', verdict)
    assert "worst: blocks.0.fc1 under mxfp8 25.0 %" in warned
    assert warned.endswith("(mxfp8 is the recommended recipe: its end-to-end check passed with this underflow)")


NOT_SEARCHED_NOTE = ("not searched: the KL budget is undefined here (KL and top-1 not computed: with the surrogate loss "
                     "the output is not read as class logits (pass --loss)); use a loss budget")


@pytest.mark.parametrize("written", ["null", "older false / 0"])
def test_a_keep_set_that_was_not_searched_is_not_judged_not_failed(small: dict, tmp_path: Path, written: str) -> None:
    """A KL budget on an output that is no distribution searches no keep-set, yet every row read "layers kept 0" and a
    red "no" under "within budget", and the Recommendation said "No strategy needs a layer kept in 16-bit" (QA).
    Results say so by null within_budget / n_keep; older ones wrote false / 0 with the note alone."""
    data = with_agreed_tables(copy.deepcopy(small), keep=[])
    for r in data["tables"]["recommendation"]:
        if r["kind"] == "strategy":
            r.update(keep_16bit=[], recommended=False, note=NOT_SEARCHED_NOTE, budget=1e-5, budget_kind="kl",
                     **({"within_budget": None, "n_keep": None} if written == "null" else
                        {"within_budget": False, "n_keep": 0}))
    view = build_report_view(data, draw=False)
    e2e = view["verdict"]["e2e"]
    at = {c: e2e["columns"].index(c) for c in ("layers kept in 16-bit", "within budget")}
    for row in e2e["rows"]:
        judged = row[at["within budget"]]
        assert (judged["text"], judged["cls"]) == ("not judged", "muted")
        assert judged["title"].startswith("no keep-set was searched: the KL budget is undefined here")
        assert row[at["layers kept in 16-bit"]]["text"] == row[at["layers kept in 16-bit"] + 1]["text"] == "–"
    rec = view["recommendation"]
    assert rec["not_searched"].startswith("the KL budget is undefined here")
    within = rec["strategies"]["columns"].index("within budget")
    assert {row[within]["text"] for row in rec["strategies"]["rows"]} == {"not judged"}
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    assert '<div class="callout" id="e2e-not-searched"><strong>No keep-set was searched:</strong>' in verdict
    assert '<td class="bad">no</td>' not in verdict
    section = html.split('<h2 id="recommendation">')[1].split("<h2 ")[0]
    assert "No keep-set was searched:" in section and "No strategy needs a layer kept" not in section
    # a searched keep-set is judged as before
    searched = build_report_view(with_agreed_tables(copy.deepcopy(small), keep=[]), draw=False)
    assert not searched["verdict"]["not_searched"] and not searched["recommendation"]["not_searched"]
    assert {row[at["within budget"]]["text"] for row in searched["verdict"]["e2e"]["rows"]} == {"yes", "no"}


def test_a_surrogate_end_to_end_loss_has_a_banner_saying_so(small: dict, tmp_path: Path) -> None:
    """The surrogate's banner spoke of dgrad / wgrad only, while the end-to-end loss changes (and a loss budget) beside
    it were of the same surrogate, the mean square of the output, not the user's training loss (QA)."""
    data = with_agreed_tables(copy.deepcopy(small), keep=[])
    data["metadata"]["loss"] = {"kind": "surrogate", "detail": "mean of squares of the model output (no loss returned "
                                                               "by the model, no --loss)"}
    html = render_report(data, tmp_path / "e2e.html", draw=False).read_text(encoding="utf-8")
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    banner = verdict.split('<div class="callout" id="surrogate-loss">')[1].split("</div>")[0]
    assert banner.startswith("<strong>Surrogate loss end to end.</strong> The loss is a surrogate:\nthe mean of squares")
    assert "The end-to-end loss changes, and a loss budget, measure how far that moves, not your training loss" in banner
    assert verdict.index('id="surrogate-loss"') < verdict.index('<div class="tcaption">End to end, per strategy')
    assert ("Warning: the end-to-end loss changes and the gradients come from a surrogate loss (mean of squared "
            "outputs)") in verdict
    # without an end-to-end run only the gradients are the surrogate's; a model's own loss has no banner
    data["tables"].pop("e2e")
    banner = render_report(data, tmp_path / "grad.html", draw=False).read_text(encoding="utf-8").split(
        'id="surrogate-loss">')[1].split("</div>")[0]
    assert banner.startswith("<strong>Surrogate loss.</strong>") and "end-to-end" not in banner
    assert "The gradients (dgrad / wgrad numbers) are that surrogate's" in banner
    data["metadata"]["loss"] = {"kind": "model", "detail": "scalar loss returned by the model"}
    assert 'id="surrogate-loss"' not in render_report(data, tmp_path / "m.html", draw=False).read_text(encoding="utf-8")


def test_a_loss_budget_plan_with_a_low_output_sqnr_is_an_amber_yes_star(small: dict, tmp_path: Path) -> None:
    """mxfp8's plan met the loss budget with the model output at 12.3 dB SQNR and read a green "yes" in both tables and
    a green headline (QA); the Recommendation table had no output SQNR at all, and 99.96 % read "100.0 %"."""
    data = with_agreed_tables(copy.deepcopy(small), keep=["fc1"])
    rec = data["tables"]["recommendation"]
    rec[1].update(output_sqnr_db=12.34, lp_flop_share=0.9996)  # mxfp8's keep-set plan, recommended
    rec[2]["output_sqnr_db"] = 31.0  # the model-wide block size's plan: fine
    view = build_report_view(data, draw=False)
    e2e = view["verdict"]["e2e"]
    within = e2e["columns"].index("within budget")
    by = {row[0]["text"]: row for row in e2e["rows"]}
    star = by["mxfp8"][within]
    assert (star["text"], star["cls"]) == ("yes*", "warn") and "output SQNR 12.3 dB, under 20 dB" in star["title"]
    assert by["mxfp8"][within - 1]["text"] == ">99.9 %"
    assert any(f.startswith("yes* for a low output SQNR: within the loss budget") for f in view["verdict"]["e2e_flags"])
    table = view["recommendation"]["strategies"]
    at = {c: table["columns"].index(c) for c in ("output SQNR dB", "within budget", "low-precision forward FLOPs")}
    row = next(r for r in table["rows"] if r[0]["text"] == "mxfp8")
    assert (row[at["output SQNR dB"]]["text"], row[at["output SQNR dB"]]["cls"]) == ("12.3", "bad")
    assert (row[at["within budget"]]["text"], row[at["within budget"]]["cls"]) == ("yes*", "warn")
    assert row[at["low-precision forward FLOPs"]]["text"] == ">99.9 %"
    model = view["recommendation"]["model_wide"]
    block = model["rows"][0]
    assert block[model["columns"].index("output SQNR dB")]["text"] == "31.0"
    assert block[model["columns"].index("within budget")]["text"] == "yes"
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    main = html.split('<section id="verdict">')[1].split("</div>")[0]
    assert '<div class="callout verdict-main">' in main and "output SQNR 12.3 dB, under 20 dB" in main
    # results written before the recommendation's output SQNR: no empty column
    for r in rec:
        r.pop("output_sqnr_db", None)
    assert "output SQNR dB" not in build_report_view(data, draw=False)["recommendation"]["strategies"]["columns"]


def test_the_delayed_scaling_tables_zero_cells_are_muted(small: dict) -> None:
    """Most delayed-scaling rows are zeros (no overflow, nothing saturated): in black beside the few red overflow counts
    they read as numbers to look at (QA)."""
    data = copy.deepcopy(small)
    base = {"layer": "fc1", "strategy": "delayed", "batches": 4, "warmup_batches": 1, "elements": 1000}
    data["tables"]["delayed_scaling"] = [
        {**base, "operand": "activation", "overflow_batches": 2, "saturated": 5, "max_amax_ratio": 1.25},
        {**base, "operand": "weight", "overflow_batches": 0, "saturated": 0, "max_amax_ratio": 1.0}]
    table = build_report_view(data, draw=False)["delayed"]["table"]
    at = [table["columns"].index(c) for c in ("overflow casts", "saturated elements", "saturated share",
                                              "max amax / amax of the scale")]
    hot, quiet = table["rows"]
    assert [(quiet[j]["text"], quiet[j]["cls"]) for j in at] == [("0", "muted"), ("0", "muted"), ("0 %", "muted"),
                                                                  ("1.000", "muted")]
    assert [(hot[j]["text"], hot[j]["cls"]) for j in at] == [("2", "bad"), ("5", ""), ("0.50 %", ""), ("1.250", "")]
    assert quiet[table["columns"].index("casts")]["cls"] == ""  # (a count of casts is no zero to mute)


def test_the_threshold_sweep_marks_the_threshold_the_analysis_ran() -> None:
    """The header's "outlier threshold 6", the sweep's per-layer picks and its model-wide value met the reader with
    nothing saying at which threshold the int8 numbers above were measured (QA); the charts' note said "the 12 layers
    with the lowest fprop SQNR of 37"."""
    data = deep_results(n_layers=37, strategies=("int8",), width=64)
    data["metadata"]["threshold"] = 6.0
    view = build_report_view(data, draw=False)["threshold"]
    assert view["table"]["columns"][2:] == ["0", "1", "2", "3", "4", "5", "6 (run)", "8"]
    assert view["table"]["groups"][1]["label"].endswith("; (run): this analysis' --threshold")
    assert view["note"] == "The charts draw the 12 of 37 layers with the lowest fprop SQNR; every layer is in the table."
    # a threshold that was not swept, or a sweep-only run: no mark
    data["metadata"]["threshold"] = 7.0
    assert "(run)" not in " ".join(build_report_view(data, draw=False)["threshold"]["table"]["columns"])
    del data["metadata"]["threshold"]
    assert "(run)" not in " ".join(build_report_view(data, draw=False)["threshold"]["table"]["columns"])


def test_the_worst_layers_table_gives_each_rows_lowest_sqnr_and_count_under_the_line() -> None:
    """With one column per recipe the reader had to find a row's lowest SQNR and count the recipes under the line by
    eye (QA)."""
    data = deep_results(n_layers=7, strategies=("global", "mxfp8", "int8"), width=64, sweeps=False)
    for r in data["tables"]["gemm"]:
        if r["gemm"] == "fprop" and r["layer"] == "model.layers.0.mlp.up_proj":
            r["sqnr_db"] = {"global": 12.0, "mxfp8": 18.0, "int8": 35.0}[r["strategy"]]
    worst = build_report_view(data, draw=False)["summary"]["worst"]
    assert worst["columns"][:3] == ["layer", "lowest dB", "strategies under 20 dB"]
    assert worst["groups"][0]["span"] == 3 and worst["groups"][1]["span"] == 3
    first = worst["rows"][0]
    assert [c["text"] for c in first[:3]] == ["model.layers.0.mlp.up_proj", "12.0", "2 of 3"]
    assert first[1]["cls"] == first[2]["cls"] == "bad" and first[2]["sort"] == 2
    assert all(len(row) == len(worst["columns"]) for row in worst["rows"])
    fine = worst["rows"][-1]
    assert fine[2]["text"] == "0 of 3" and fine[2]["cls"] == "muted"


def test_banners_and_verdict_notes_start_with_a_capital(small: dict, tmp_path: Path) -> None:
    """The verdict's lines are the terminal's ("warning: …", "captured …", "the KL budget cannot be judged: …") and
    stood in the report's banners and list as sentences without a capital beside ones with (QA)."""
    from fp8probe.report.render import sentence

    assert sentence("the KL budget") == "The KL budget" and sentence("") == "" and sentence("KL") == "KL"
    data = with_agreed_tables(copy.deepcopy(small), keep=[])
    for r in data["tables"]["recommendation"]:
        if r["kind"] == "strategy":
            r.update(recommended=False, within_budget=False)
    for r in data["tables"]["e2e"]:
        r["kl_div"] = None
    for r in data["tables"]["recommendation"]:
        r["budget_kind"] = "kl"
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    verdict = html.split('<section id="verdict">')[1].split("</section>")[0]
    assert '<div class="callout bad verdict-main">The KL budget cannot be judged: ' in verdict
    items = re.findall(r"<li[^>]*>([^<]*)</li>", verdict)
    assert items and all(item[0].isupper() for item in items), items
    assert 'class="warnline">Warning: 2 GEMM call(s) not analysed' in verdict


def test_every_html_id_is_unique_and_every_link_lands(tmp_path: Path) -> None:
    """Section headings and their tables shared ids ("recommendation", "coverage", "threshold", …): a link to the
    section could land on either, and getElementById found the heading (QA)."""
    data = with_agreed_tables(load_results(DATA / "results_demo_small.json"), keep=["blocks.1.mlp.fc2"])
    data["tables"]["tensors"][0]["subnormal_count"] = 4  # (the special-values table, under its own heading)
    data["tables"]["delayed_scaling"] = [{"layer": "blocks.0.fc1", "strategy": "delayed", "operand": "activation",
                                          "batches": 4, "warmup_batches": 1, "overflow_batches": 1, "saturated": 2,
                                          "elements": 100, "max_amax_ratio": 1.1}]
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    ids = re.findall(r'\bid="([^"]+)"', html)
    for section in ("recommendation", "coverage", "special", "training", "outliers", "blocksize", "threshold",
                    "delayed", "sensitivity"):
        assert section in ids, section
    assert sorted(i for i in set(ids) if ids.count(i) > 1) == []
    assert set(re.findall(r'href="#([^"]+)"', html)) <= set(ids)
