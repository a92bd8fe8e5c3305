"""Each thing said once (QA C2, C1, C4): the sentence every recipe rule holds, the recommendation rows that are the
Verdict's, the isolated counts the Verdict's table gives, "no NaN/Inf", and no reference to design notes the reader
does not have."""
from __future__ import annotations

from pathlib import Path

import pytest

from fp8probe.analysis.strategies import BATCHED_RULE, ROW_SCALE_RULES, STRATEGIES, RecipeOptions, with_options
from fp8probe.analysis.delayed import DelayedScaling
from fp8probe.report import render
from fp8probe.report.render import build_report_view, render_report
from report_tables import deep_results, recommendation_rows, with_agreed_tables

# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
SHARED = "Batched GEMMs run slice by slice."


def _meta() -> dict:
    return {"rules": {"a": f"Rule of a. {SHARED}", "b": f"Rule of b. {SHARED} Row scale of b.",
                      "threshold sweep": f"Sweep rule. {SHARED}"}}


def test_a_sentence_every_recipe_rule_holds_is_said_once() -> None:
    m = render._methods(_meta(), ["a", "b"])
    assert m["shared"] == [SHARED]
    assert [r["text"] for r in m["rules"]] == ["Rule of a.", "Rule of b. Row scale of b.", f"Sweep rule. {SHARED}"]


def test_nothing_is_factored_from_one_rule_or_from_rules_that_differ() -> None:
    assert render._methods(_meta(), ["a"])["shared"] == []
    meta = _meta()
    meta["rules"]["b"] = "Rule of b."
    m = render._methods(meta, ["a", "b"])
    assert m["shared"] == [] and m["rules"][0]["text"] == f"Rule of a. {SHARED}"


@pytest.mark.parametrize("options", [None, RecipeOptions(int8_row_scale="paper", delayed=DelayedScaling(history=16))])
def test_every_recipe_rule_holds_the_batched_rule_word_for_word(options: RecipeOptions | None) -> None:
    """(delayed's rule ended "…each with its own scales, and its own amax histories.", so no sentence was in all)"""
    strategies = with_options(list(STRATEGIES.values()), options)
    m = render._methods({"rules": {s.name: s.rules for s in strategies}}, [s.name for s in strategies])
    assert m["shared"] == [BATCHED_RULE]
    assert not any("Batched GEMMs" in r["text"] for r in m["rules"])
    assert "Each slice keeps its own amax histories." in next(r["text"] for r in m["rules"] if r["name"] == "delayed")


def test_rules_cite_no_design_notes() -> None:
    """"SPEC §7.2": a document the report's reader does not have (QA C4); the bitsandbytes function is named."""
    texts = [s.rules for s in STRATEGIES.values()] + list(ROW_SCALE_RULES.values())
    assert not [t for t in texts if "SPEC" in t]
    assert "(bitsandbytes.research MatMulFP8Global)" in STRATEGIES["global"].rules
    # older results files still carry them: the report leaves them out
    old = "float32 matmuls (MatMulFP8Global, SPEC §7.2). Row absmax still sets it (SPEC §5.1)."
    assert render._rule_text(old) == "float32 matmuls (MatMulFP8Global). Row absmax still sets it."
    assert render._rule_text("wgrad (MatMul8bitLt, SPEC §6.2-6.3) ok") == "wgrad (MatMul8bitLt) ok"


def test_the_report_states_the_shared_sentence_once_and_no_spec(tmp_path: Path) -> None:
    data = deep_results(n_layers=3, strategies=("global", "delayed"), sweeps=False)
    data["metadata"]["rules"] = {"global": STRATEGIES["global"].rules.replace(
        "(bitsandbytes.research MatMulFP8Global)", "(MatMulFP8Global, SPEC §7.2)"),
        "delayed": STRATEGIES["delayed"].rules}
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    methods = html.split('<h2 id="methods">')[1]
    assert methods.count("Batched GEMMs (attention heads") == 1 and 'id="rules-shared"' in methods
    assert "SPEC" not in html


# ----------------------------------------------------------------------------------------------
# Recommendation
# ----------------------------------------------------------------------------------------------
def _texts(table: dict) -> list[list[str]]:
    return [[c["text"] for c in row] for row in table["rows"]]


def test_recommendation_splits_recipes_from_model_wide_settings() -> None:
    rec = render._recommendation_section({"recommendation": recommendation_rows(["blocks.0.fc1"])})
    s, m = rec["strategies"], rec["model_wide"]
    assert "kind" not in s["columns"] and "value" not in s["columns"] and "budget" not in s["columns"]
    assert rec["budget"] == "|loss change| ≤ 1 %" and rec["keep_sets"] and rec["chosen"] == "mxfp8"
    assert [row[0] for row in _texts(s)] == ["global", "mxfp8"]
    # the one recommended recipe: "yes" on exactly one row, and none on the model-wide settings
    assert [row[-1] for row in _texts(s)] == ["", "yes"]
    assert s["columns"][1] == "kept in 16-bit (in sensitivity-rank order)"
    assert _texts(s)[1][1] == "1 layer" and s["rows"][1][1]["details"] == "blocks.0.fc1"
    assert m["columns"] == ["setting", "recipe", "value", "loss change", "KL", "low-precision forward FLOPs",
                            "within budget"]
    assert [row[:3] for row in _texts(m)] == [["block size", "mixed", "128"], ["outlier threshold", "int8", "6"]]


def test_recommendation_without_keep_sets_drops_empty_columns_and_keeps_differing_budgets() -> None:
    rows = recommendation_rows([])
    rows[0].update(keep_16bit=[], n_keep=0)
    rows[1]["budget"] = 0.02
    rec = render._recommendation_section({"recommendation": rows})
    assert not rec["keep_sets"] and rec["budget"] == ""
    assert rec["strategies"]["columns"] == ["strategy", "loss change", "KL", "low-precision forward FLOPs",
                                            "within budget", "budget", "recommended recipe"]
    assert [row[5] for row in _texts(rec["strategies"])] == ["|loss change| ≤ 1 %", "|loss change| ≤ 2 %"]


def test_recommendation_without_keep_sets_is_one_line_and_a_folded_table(tmp_path: Path) -> None:
    data = with_agreed_tables(deep_results(n_layers=3, strategies=("global", "mxfp8"), sweeps=False), keep=[])
    data["tables"]["recommendation"][0].update(keep_16bit=[], n_keep=0)
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    rec = html.split('<h2 id="recommendation">')[1].split("<h2")[0]
    line = rec.split('<p id="recommendation-same">')[1].split("</p>")[0]
    assert "No strategy needs a layer kept in 16-bit" in line and "<strong>mxfp8</strong>" in line
    assert rec.index("<details>") < rec.index('id="recommendation-table"') < rec.index("</details>")
    settings = rec.split('id="recommendation-model"')[1]
    assert "recommended" not in settings and "block size" in settings  # a setting is not a recipe to choose
    # with a keep-set the table stands open
    html = render_report(with_agreed_tables(data, keep=["x"]), tmp_path / "k.html", draw=False).read_text("utf-8")
    rec = html.split('<h2 id="recommendation">')[1].split("<h2")[0]
    assert '<details><summary>The ' not in rec and 'id="recommendation-same"' not in rec


# ----------------------------------------------------------------------------------------------
# Isolated summary, Special values
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = deep_results(n_layers=6, strategies=("global", "mxfp8"), sweeps=False)
    for r in data["tables"]["gemm"]:
        if r["strategy"] == "mxfp8" and r["gemm"] == "fprop" and r["layer"].endswith("q_proj"):
            r["sqnr_db"] = 12.0
    return render_report(data, tmp_path_factory.mktemp("r") / "r.html", draw=False).read_text(encoding="utf-8")


def test_isolated_summary_lists_only_strategies_with_layers_below_and_links_the_verdict(deep_html: str) -> None:
    keep = deep_html.split('<h3 id="below-threshold">')[1].split("<h3")[0]
    assert "<strong>mxfp8</strong>: 1 of 6" in keep
    assert "<strong>global</strong>" not in keep and "none of" not in keep
    line = keep.split('<p id="below-none">')[1].split("</p>")[0]
    assert "No layer is below 20 dB under global;" in line and 'href="#isolated-summary"' in line
    assert 'id="isolated-summary"' in deep_html.split('<section id="verdict">')[1].split("</section>")[0]


def test_isolated_summary_with_no_layer_below_says_so_once(tmp_path: Path) -> None:
    data = deep_results(n_layers=3, strategies=("global",), sweeps=False)
    for r in data["tables"]["gemm"]:
        r["sqnr_db"] = max(r["sqnr_db"], 30.0)
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    keep = html.split('<h3 id="below-threshold">')[1].split("<h3")[0]
    assert '<ul class="keep">' not in keep and "No layer is below 20 dB under any strategy" in keep


def test_special_values_says_no_nan_inf_once(deep_html: str, tmp_path: Path) -> None:
    special = deep_html.split('<h3 id="special">')[1].split("<h2")[0]
    assert special.count("NaN") == 1 and 'id="special-none"' in special
    # a tensor with subnormals: the no-NaN/Inf callout, then the table of what it does hold
    data = deep_results(n_layers=3, strategies=("global",), sweeps=False)
    data["tables"]["tensors"][0]["subnormal_count"] = 4
    html = render_report(data, tmp_path / "s.html", draw=False).read_text(encoding="utf-8")
    special = html.split('<h3 id="special">')[1].split("<h2")[0]
    assert "No NaN or Inf in any captured" in special and 'id="special-table"' in special
    assert 'id="special-none"' not in special


def test_the_end_to_end_table_drops_a_note_column_empty_on_every_row() -> None:
    from report_tables import e2e_rows

    data = with_agreed_tables(deep_results(n_layers=3, strategies=("global", "mxfp8"), sweeps=False))
    e2e = build_report_view(data, draw=False)["verdict"]["e2e"]
    assert "note" not in e2e["columns"] and all(len(row) == len(e2e["columns"]) for row in e2e["rows"])
    assert sum(g["span"] for g in e2e["groups"]) == len(e2e["columns"])
    rows = e2e_rows()
    rows[1]["note"] = "2 layer(s) overflowed"
    data["tables"]["e2e"] = rows
    e2e = build_report_view(data, draw=False)["verdict"]["e2e"]
    assert e2e["columns"][-1] == "note" and e2e["rows"][1][-1]["text"] == "2 layer(s) overflowed"


# ----------------------------------------------------------------------------------------------
# Delayed scaling
# ----------------------------------------------------------------------------------------------
def _delayed_rows(n_layers: int, batches: int, slices: int = 1) -> list[dict]:
    """delayed_scaling rows as DelayedState.rows writes them: one per layer and operand; ``slices`` per-head sites."""
    rows = []
    for i in range(n_layers):
        for op in ("activation", "weight", "grad_output"):
            sat = 0 if op == "weight" else i
            rows.append({"layer": f"layer{i}", "strategy": "delayed", "operand": op, "batches": batches * slices,
                         "warmup_batches": slices, "overflow_batches": 1 if sat else 0, "saturated": sat,
                         "elements": 1000 * batches * slices, "max_amax_ratio": 1.0 + sat / 100})
    return rows


def _delayed(rows: list[dict]) -> dict:
    return render._delayed_section({"delayed_scaling": rows})


def test_delayed_table_without_a_constant_strategy_column_and_folded_when_long() -> None:
    d = _delayed(_delayed_rows(4, batches=8))
    assert "strategy" not in d["table"]["columns"] and len(d["table"]["rows"][0]) == len(d["table"]["columns"])
    assert not d["collapsed"]
    long = _delayed(_delayed_rows(37, batches=8))  # 111 rows, as on a 4-layer Llama
    assert long["collapsed"] and len(long["table"]["rows"]) == 111
    two = _delayed_rows(2, batches=8) + [dict(r, strategy="delayed-2") for r in _delayed_rows(2, batches=8)]
    assert "strategy" in _delayed(two)["table"]["columns"]


def test_delayed_summary_names_the_saturating_operands_and_the_worst() -> None:
    d = _delayed(_delayed_rows(4, batches=8))
    # layers 1..3 saturate in activation and grad_output; layer3 has the largest share (3 of 8000)
    assert (d["n_saturating"], d["n_rows"], d["saturating_layers"], d["n_layers"]) == (6, 12, 3, 4)
    assert d["worst"]["layer"] == "layer3" and d["worst"]["saturated"] == "3" and d["max_ratio"] == "1.03"


@pytest.mark.parametrize(("batches", "slices", "text", "few"), [
    (2, 1, "1 cast per site used a delayed scale", True),
    (2, 32, "32 casts per site used a delayed scale (one per head slice and batch after the first)", True),
    (1, 1, "", True), (5, 1, "4 casts per site used a delayed scale", False)])
def test_delayed_says_how_many_casts_used_a_delayed_scale(batches: int, slices: int, text: str, few: bool) -> None:
    """--batches 2: one cast per site uses a delayed scale, and nothing warned that this measures almost nothing (QA
    C1); an attention GEMM's per-head sites count casts per batch and slice, not more batches."""
    d = _delayed(_delayed_rows(2, batches=batches, slices=slices))
    assert (d["batches"]["text"], d["delayed_text"], d["few"]) == (str(batches), text, few)


def test_delayed_casts_per_site_at_linear_and_attention_sites() -> None:
    """A 2-batch run: a linear site has 2 casts, 1 first (1 delayed), an attention site's 4 head slices 8 casts, 4
    first (4 delayed); the callout said "only 1 cast per site used a delayed scale" for both (QA C1 on kl)."""
    rows = _delayed_rows(2, batches=2) + [dict(r, layer=r["layer"] + "#qk") for r in _delayed_rows(2, batches=2,
                                                                                                      slices=4)]
    d = _delayed(rows)
    assert d["batches"]["text"] == "2" and d["few"]
    assert d["delayed_text"] == ("1 cast per site used a delayed scale (4 at an attention GEMM: one per head slice and "
                                 "batch after the first)")
    rows += [dict(r, layer=r["layer"] + "#pv", batches=16, warmup_batches=8) for r in _delayed_rows(1, batches=2)]
    assert "(4–8 at an attention GEMM:" in _delayed(rows)["delayed_text"]


def test_delayed_summary_counts_only_operands_that_overflowed() -> None:
    """Results written before "saturated" counted clipped elements only: an own-amax cast's amax element at the
    format's max counted as saturated, overflow_batches 0 (QA A2). Saturation under the delayed scale needs an
    overflow cast."""
    rows = _delayed_rows(3, batches=4)  # layers 1, 2 saturate with an overflow cast
    rows[0].update(saturated=1, overflow_batches=0, max_amax_ratio=1.0)  # layer0 activation: the old count
    d = _delayed(rows)
    assert (d["n_saturating"], d["saturating_layers"], d["worst"]["layer"]) == (4, 2, "layer2")


def test_one_batch_says_nothing_saturated_under_a_delayed_scale(tmp_path: Path) -> None:
    """One batch: every cast used its own amax. The report said "no cast used a delayed scale" and then "38 of 813
    layer operands saturated under the delayed scale ... the largest amax was 1x" (QA A2)."""
    data = deep_results(n_layers=3, strategies=("delayed",), sweeps=False)
    rows = _delayed_rows(3, batches=1)
    for r in rows:
        r.update(overflow_batches=0, max_amax_ratio=1.0)  # the old counts: saturated 1, 2 at own-amax casts
    data["tables"]["delayed_scaling"] = rows
    sec = render_report(data, tmp_path / "r.html", draw=False).read_text("utf-8").split('<h2 id="delayed">')[1]
    sec = " ".join(sec.split("<h2")[0].split())
    assert "no cast used a delayed scale" in sec and "measures nothing about delayed scaling" in sec
    assert "under the delayed scale" not in sec.split("<table")[0] and 'id="delayed-summary"' not in sec


def test_delayed_section_in_the_report(tmp_path: Path) -> None:
    data = deep_results(n_layers=3, strategies=("delayed",), sweeps=False)
    data["tables"]["delayed_scaling"] = _delayed_rows(37, batches=2)
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    sec = html.split('<h2 id="delayed">')[1].split("<h2")[0]
    warn = sec.split('<div class="callout" id="delayed-few">')[1].split("</div>")[0]
    assert "saw 2 batches" in warn and "only 1 cast per site used a delayed scale" in warn
    summary = sec.split('<p id="delayed-summary">')[1].split("</p>")[0]
    assert "72 of 111 layer operands saturated" in " ".join(summary.split())
    assert sec.index('id="delayed-summary"') < sec.index("<details><summary>Per layer and operand (111 rows)")
    # after the recipe-specific sections, not between Sensitivity and the Isolated summary (QA C1)
    assert html.index('id="summary"') < html.index('<h2 id="delayed">')
    data["tables"]["delayed_scaling"] = _delayed_rows(2, batches=8)
    sec = render_report(data, tmp_path / "r8.html", draw=False).read_text("utf-8").split('<h2 id="delayed">')[1]
    assert '<p id="delayed-few">' in sec and "7 casts per site" in sec and "only" not in sec.split("</p>")[1]
    assert "<details>" not in sec.split("<h2")[0]
