"""Each thing said once (QA C2, C1, C4): the sentence every recipe rule holds, the recommendation rows that are the
Verdict's, the isolated counts the Verdict's table gives, "no NaN/Inf", and no reference to design notes the reader
does not have."""
from __future__ import annotations

from pathlib import Path

import pytest

from fp8probe.analysis.strategies import BATCHED_RULE, ROW_SCALE_RULES, STRATEGIES, RecipeOptions, with_options
from fp8probe.analysis.delayed import DelayedScaling
from fp8probe.report import render
from fp8probe.report.render import render_report
from report_tables import deep_results

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
    assert render._rule_text("float32 matmuls (MatMulFP8Global, SPEC §7.2). Row absmax still sets it (SPEC §5.1).") == \
        "float32 matmuls (MatMulFP8Global). Row absmax still sets it."
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
