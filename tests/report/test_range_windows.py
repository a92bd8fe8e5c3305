"""The dynamic-range section: whose format windows are shaded and why, which layers are drawn and how they are
labelled; the names of a GEMM's second activation (attention K / V) across the report."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from report_tables import deep_results, recommendation_rows

from fp8probe.formats import FORMATS
from fp8probe.report import figures, render
from fp8probe.report.render import MAX_HIST_LAYERS, RECIPE_WINDOWS, build_report_view, load_results, render_report

DATA = Path(__file__).parent / "data" / "results_small.json"
# The report's main column at a 1400 px window (main: max-width 1320 px, 28 px padding each side): a figure up to
# this wide is shown 1:1, so its text is as tall on screen as at PNG_DPI.
PAGE_COLUMN_PX = 1320 - 2 * 28
MIN_LABEL_PX = 11


def _formats(*names: str) -> dict:
    """metadata.formats as the pipeline writes it for these formats."""
    return {n: {"max": FORMATS[n].max, "min_normal": FORMATS[n].min_normal, "min_subnormal": FORMATS[n].min_subnormal,
                "description": FORMATS[n].description} for n in names}


def _doc(strategies: tuple[str, ...], n_layers: int = 4) -> dict:
    doc = deep_results(n_layers=n_layers, strategies=strategies, width=16, sweeps=False)
    doc["metadata"]["formats"] = _formats(*sorted({f for s in strategies for f in RECIPE_WINDOWS[s][0].values() if f}))
    return doc


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The arguments of every range_histograms call (the panels with their windows, the column titles)."""
    calls: list[dict] = []
    original = figures.range_histograms

    def spy(panels, tensors, titles=None):
        calls.append({"panels": list(panels), "tensors": list(tensors), "titles": dict(titles or {})})
        return original(panels, tensors, titles)

    monkeypatch.setattr(figures, "range_histograms", spy)
    return calls


def test_recipe_windows_name_the_formats_of_every_strategy() -> None:
    """The report's table of each recipe's operand formats agrees with the recipes themselves (results carry only
    the union of the run's formats)."""
    from fp8probe.analysis.strategies import STRATEGIES
    assert set(RECIPE_WINDOWS) == set(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        fmts, scope = RECIPE_WINDOWS[name]
        assert set(fmts) == set(render.TENSORS) and scope
        assert {f for f in fmts.values() if f} == set(strategy.formats), name


def test_windows_are_the_recommended_recipes_formats(drawn: list[dict]) -> None:
    """The bands were always bnb-e4m3 / bnb-e5m2 (the first formats of the run), whatever the recommended recipe
    (QA B4): here mxfp8 is recommended next to global, whose bnb formats are in the run too."""
    doc = _doc(("global", "int8", "mxfp8"))
    doc["tables"]["recommendation"] = recommendation_rows([])  # mxfp8 recommended
    view = build_report_view(doc)
    (call,) = drawn
    want = {"activation": "mxfp8-e4m3", "weight": "mxfp8-e4m3", "grad_output": "mxfp8-e5m2"}
    for p in call["panels"]:
        ((label, lo, hi),) = p["windows"]
        f = FORMATS[want[p["tensor"]]]
        assert label.startswith(want[p["tensor"]] + " ")
        assert hi == pytest.approx(math.log2(20.0))  # the format max at the tensor's amax (20 in deep_results)
        assert hi - lo == pytest.approx(math.log2(f.max / f.min_subnormal))
    caption = view["range"]["caption"]
    assert "the formats of mxfp8, the recommended recipe" in caption
    assert "mxfp8-e4m3 on activation and weight; mxfp8-e5m2 on grad_output" in caption
    assert "block of 32" in caption and "worst case" in caption  # what a band means under per-block scales


def test_without_a_recommendation_the_verdicts_isolated_pick_is_shaded(drawn: list[dict]) -> None:
    """switchback picked: int8 on A and W, and no band on the output gradient it leaves unquantised. QA: with --no-e2e
    the figure shaded the run's first strategy (global) while the Verdict and the heat map named the isolated pick."""
    doc = _doc(("global", "switchback"))
    for r in doc["tables"]["gemm"]:  # switchback the only recipe with no layer below 20 dB: the isolated pick
        if r["strategy"] == "global":
            r["sqnr_db"] = 10.0
    view = build_report_view(doc)
    assert view["verdict"]["isolated_pick"] == "switchback"
    (call,) = drawn
    for p in call["panels"]:
        assert [w[0].split()[0] for w in p["windows"]] == ([] if p["tensor"] == "grad_output" else ["int8"])
    caption = view["range"]["caption"]
    assert "the formats of switchback, the Verdict's isolated pick (not validated end to end)" in caption
    assert "grad_output not quantised (no band)" in caption


def test_without_any_pick_the_first_strategy_is_shaded() -> None:
    from fp8probe.report.render import _window_recipe
    assert _window_recipe({"recommended": None, "isolated_pick": None}, ["switchback", "global"]) == \
        ("switchback", "the run's first strategy (no recipe is recommended)")


def test_a_per_tensor_recipe_band_is_the_window_it_used(drawn: list[dict]) -> None:
    view = build_report_view(_doc(("ocp-tensorwise",)))
    assert {p["windows"][0][0].split()[0] for p in drawn[0]["panels"]} == {"e4m3", "e5m2"}
    assert "so the band is the window it used" in view["range"]["caption"]
    assert "worst case" not in view["range"]["caption"]


def test_an_unknown_recipe_falls_back_to_the_runs_formats_and_says_so(drawn: list[dict]) -> None:
    results = load_results(DATA)  # older results: strategies fp8-mixed, fp8-global, llm-int8
    view = build_report_view(results)
    pick = view["verdict"]["isolated_pick"]
    assert pick in results["metadata"]["strategies"]
    assert f"{pick} (the Verdict's isolated pick (not validated end to end)) is not a recipe this report knows" \
        in view["range"]["caption"]
    assert any(p["windows"] for p in drawn[0]["panels"])


def test_the_drawn_layers_note_says_how_the_lowest_sqnr_is_taken(drawn: list[dict]) -> None:
    """"Showing the 24 layers with the lowest forward SQNR" did not say under which strategy (QA B4)."""
    doc = _doc(("global", "int8", "mxfp8"), n_layers=30)
    view = build_report_view(doc)
    assert (f"Showing the {MAX_HIST_LAYERS} of 30 layers with the lowest fprop SQNR under any strategy (each layer's "
            "lowest over the run's 3 strategies)") in view["range"]["note"]
    lowest = {r["layer"]: math.inf for r in doc["tables"]["layers"]}
    for r in doc["tables"]["gemm"]:
        if r["gemm"] == "fprop":
            lowest[r["layer"]] = min(lowest[r["layer"]], r["sqnr_db"])
    want = sorted(lowest, key=lowest.get)[:MAX_HIST_LAYERS]
    assert list(dict.fromkeys(p["layer"] for p in drawn[0]["panels"])) == want


def test_layer_labels_are_readable_at_the_width_the_report_shows_the_figure() -> None:
    """The per-layer labels were ~7 px tall at a 1400 px page (QA B4): 24 long names, each label at least 11 px
    on screen, inside the figure, and the figure no taller than the 24 rows need."""
    layers = [f"model.language_model.layers.{i}.self_attn.o_proj_long" for i in range(MAX_HIST_LAYERS)]
    edges = [float(e) for e in range(-40, 26)]
    counts = [0] * 30 + [5, 9, 4] + [0] * (len(edges) - 34)
    panels = [{"layer": x, "tensor": t, "edges": edges, "counts": counts, "windows": [("e4m3 window", -20.0, 2.0)]}
              for x in layers for t in render.TENSORS]
    fig = figures.range_histograms(panels, list(render.TENSORS))
    width_px, height_px = fig.get_size_inches() * figures.PNG_DPI
    assert width_px <= PAGE_COLUMN_PX  # shown 1:1: not scaled down by the page
    assert height_px <= 1.35 * width_px  # 24 rows: a figure of about one screen, not a scroll
    fig.canvas.draw()
    labels = fig.axes[0].get_yticklabels()
    assert len(labels) == MAX_HIST_LAYERS
    for text in labels:
        assert text.get_fontsize() * figures.PNG_DPI / 72 >= MIN_LABEL_PX
        assert text.get_window_extent().x0 >= 0  # not cut at the figure's left edge
    for ax in fig.axes:
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) * figures.PNG_DPI / 72 >= MIN_LABEL_PX


# --- a GEMM's second activation (QA C6) ------------------------------------------------------------------------
ATTENTION = {"model.layers.0.self_attn#qk": "K (2nd activation)", "model.layers.0.self_attn#pv": "V (2nd activation)",
             "model.layers.0.mlp#matmul#1": "2nd activation", "model.layers.0.self_attn.q_proj": "weight"}


def _attention_doc(b_is_weight: bool = True) -> dict:
    """A run with a batched attention site (sdpa: #qk, #pv over 32 head slices), a matmul and a linear layer,
    each with every table that names operands (tensors, histograms, delayed scaling, block scales)."""
    doc = _doc(("delayed", "mxfp8"), n_layers=len(ATTENTION))
    names = list(ATTENTION)
    rename = dict(zip(dict.fromkeys(r["layer"] for r in doc["tables"]["layers"]), names))
    for rows in doc["tables"].values():
        for r in rows:
            r["layer"] = rename[r["layer"]]
    for r in doc["tables"]["layers"]:
        linear = "#" not in r["layer"]
        kind, op = ("linear", "linear") if linear else ("attention", "sdpa") if "self_attn#" in r["layer"] else \
            ("matmul", "matmul")
        r.update({"kind": kind, "op": op, "batch": 1 if linear else 32})
        if b_is_weight:
            r["b_is_weight"] = linear
    doc["tables"]["delayed_scaling"] = [
        {"layer": x, "strategy": "delayed", "operand": t, "batches": 64, "warmup_batches": 32, "overflow_batches": 3,
         "saturated": 4, "elements": 4096, "max_amax_ratio": 1.2} for x in names for t in render.TENSORS]
    doc["tables"]["block_scales"] = [
        {"layer": x, "strategy": "mxfp8", "operand": t, "format": "mxfp8-e4m3", "block": "1x32", "scale_rule": "floor",
         "n_blocks": 64, "zero_blocks": 0, "nonfinite_blocks": 0, "zero_scale_blocks": 0, "scale_min": 0.25,
         "scale_max": 2.0, "scale_log2_mean": 0.0, "scale_log2_std": 1.0, "clipped_block_frac": 0.0,
         "underflow_block_frac": 0.0, "underflow_frac": 0.0, "max_block_underflow_frac": 0.0, "exp_lo": -2,
         "exp_counts": [16, 16, 16, 16]} for x in names for t in ("activation", "weight")]
    return doc


def _labels(table: dict, name_col: int) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in table["rows"]:
        out.setdefault(row[0]["text"], set()).add(row[name_col]["text"])
    return out


@pytest.mark.parametrize("b_is_weight", [True, False], ids=["b_is_weight", "older results: by name"])
def test_the_second_activation_of_an_attention_gemm_is_not_called_weight(b_is_weight: bool, drawn: list[dict]) -> None:
    """K of QKᵀ and V of PV were labelled "weight" in Dynamic range, Tensor statistics, Delayed scaling and Block
    scales (QA C6); the results keep the tensor name "weight"."""
    doc = _attention_doc(b_is_weight)
    before = copy.deepcopy(doc)
    view = build_report_view(doc)
    assert doc == before  # the data is not renamed, only its presentation
    for table, name in ((view["range"]["table"], None), (view["delayed"]["table"], "operand"),
                        (view["block_scales"]["table"], None)):
        # (the delayed table drops its strategy column when one strategy has rows)
        labels = _labels(table, table["columns"].index(name) if name else (1 if table is view["range"]["table"] else 2))
        for layer, second in ATTENTION.items():
            assert second in labels[layer], (table["id"], layer)
            assert ("weight" in labels[layer]) == (second == "weight"), (table["id"], layer)
    pooled = {(r[0]["text"], r[1]["text"]): r[5]["text"] for r in view["block_scales"]["summary"]["rows"]}
    assert pooled[("mxfp8", "weight")] == "64" and pooled[("mxfp8", "2nd activation")] == "192"
    assert drawn[0]["titles"] == {"weight": "weight / 2nd activation"}
    assert "second activation (K, V" in view["range"]["caption"]


def test_a_run_of_linear_layers_keeps_the_weight_label(drawn: list[dict]) -> None:
    view = build_report_view(_doc(("global",)))
    assert {r[1]["text"] for r in view["range"]["table"]["rows"]} == set(render.TENSORS)
    assert drawn[0]["titles"] == {} and "second activation" not in view["range"]["caption"]


def test_layers_the_plan_keeps_in_16_bit_have_no_band(drawn: list[dict]) -> None:
    """QA 2: the figure shaded int8's windows on layers the recommended int8 plan keeps in 16-bit."""
    doc = _doc(("global", "int8", "mxfp8"))
    layers = list(dict.fromkeys(r["layer"] for r in doc["tables"]["layers"]))
    doc["tables"]["recommendation"] = recommendation_rows([layers[1]])  # mxfp8 recommended, keeping one layer
    view = build_report_view(doc)
    (call,) = drawn
    for p in call["panels"]:
        assert (p["windows"] == []) == (p["layer"] == f"{layers[1]} (16-bit)"), p["layer"]
    assert any(p["layer"] == f"{layers[1]} (16-bit)" for p in call["panels"])
    assert 'marked "(16-bit)" and have no band' in view["range"]["caption"]
