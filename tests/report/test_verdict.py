"""The verdict (report/verdict.py): recipe, 16-bit layers, loss change, coverage and warnings from the tables."""
from __future__ import annotations

import json
import random
from html import escape
from pathlib import Path

import pandas as pd

from fp8probe.report.verdict import (KL_FAR_RATIO, LOW_GAIN_LP_SHARE, UNDERFLOW_WARN_FRAC, build_verdict,
                                     coverage_summary, verdict_lines)
from report_tables import coverage_rows, e2e_rows, recommendation_rows, training_rows

DATA = Path(__file__).parent / "data" / "results_small.json"


def _small() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


def test_recommended_recipe_first_with_kept_layers_loss_and_flops() -> None:
    tables = {"e2e": e2e_rows(), "recommendation": recommendation_rows(["blocks.0.attn.qkv"]),
              "coverage": coverage_rows()}
    lines = verdict_lines(tables)
    assert lines[0] == ("verdict: mxfp8, keep 1 layer(s) in 16-bit (blocks.0.attn.qkv): loss change +0.12 % of 2.5, KL 0.0009 "
                        "(budget |loss change| ≤ 1 %); 94.7 % of the analysed forward GEMM FLOPs (90.0 % of the "
                        "model's) in low precision")  # (28 of 30 GEMMs, 95 % of the FLOPs, were captured and replaced)
    assert "block size for the whole model (mixed): 128 (validated: loss +0.40 %, KL 0.003)" in lines
    assert "outlier threshold for the whole model (int8): 6 (validated: loss +0.60 %, KL 0.004)" in lines
    e2e = [x for x in lines if x.startswith("end-to-end")]
    assert e2e[0].startswith("end-to-end global: loss +4.00 %, KL 0.031, top-1 91.0 %")
    # (with the keep-set's own share: the line's 100 % is every layer in low precision)
    assert e2e[1].endswith("← recommended, keeping 1 layer(s) in 16-bit, 94.7 % analysed forward FLOPs (90.0 % of the "
                           "model's) low precision (see the verdict line)")
    assert "recommended" not in e2e[0]
    # 3.8 of 4.0 GFLOPs captured; the conv3d calls are named with their reason
    assert "captured 28 of 30 GEMMs = 95.0 % of GEMM FLOPs; skipped: 2 × conv3d: conv3d not supported" in lines
    assert any(x.startswith("warning: 2 GEMM call(s) not analysed") for x in lines)


def test_dataframes_and_records_give_the_same_lines() -> None:
    tables = {"e2e": e2e_rows(), "recommendation": recommendation_rows(["a", "b"]), "coverage": coverage_rows()}
    frames = {k: pd.DataFrame(v) for k, v in tables.items()}
    assert verdict_lines(frames) == verdict_lines(tables)


def test_no_strategy_within_budget_says_so() -> None:
    rows = [dict(r, recommended=False, within_budget=False) for r in recommendation_rows([])]
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows})
    assert lines[0] == ("verdict: no strategy stays within the budget (|loss change| ≤ 1 %) even with layers kept in "
                        "16-bit")


def test_an_undefined_budget_metric_is_not_blamed_on_the_recipes() -> None:
    """A NaN high-precision loss (NaN weights, an empty batch) or an undefined KL read 'no strategy stays within
    the budget even with layers kept in 16-bit', as if the recipes had failed."""
    rows = [dict(r, recommended=False, within_budget=False) for r in recommendation_rows([])]
    nan_loss = [dict(r, loss_hp=None, loss_lp=None, loss_rel_change=None) for r in e2e_rows()]
    line = verdict_lines({"e2e": nan_loss, "recommendation": rows})[0]
    assert line.startswith("verdict: the loss budget cannot be judged: the high-precision loss itself is not finite")
    zero = [dict(r, loss_hp=0.0, loss_rel_change=float("nan")) for r in e2e_rows()]
    assert "loss is 0" in verdict_lines({"e2e": zero, "recommendation": rows})[0]
    kl_rows = [dict(r, budget_kind="kl") for r in rows]
    no_kl = [dict(r, kl_div=None) for r in e2e_rows()]
    assert verdict_lines({"e2e": no_kl, "recommendation": kl_rows})[0].startswith(
        "verdict: the KL budget cannot be judged: the KL divergence is undefined")
    one_defined = no_kl[:1] + [dict(r, kl_div=0.5) for r in no_kl[1:]]  # one number: the recipes' verdict stands
    assert "no strategy stays within the budget (KL ≤ 0.01)" in verdict_lines({"e2e": one_defined, "recommendation": kl_rows})[0]


def test_without_e2e_the_isolated_numbers_and_one_line_notes() -> None:
    data = _small()
    lines = verdict_lines(data["tables"], data["metadata"])
    isolated = [x for x in lines if x.startswith("isolated ")]
    assert len(isolated) == len(data["metadata"]["strategies"])
    # the fixture plants fprop SQNR below 20 dB in qkv and fc1 under the fp8 strategies
    glob = next(x for x in isolated if x.startswith("isolated fp8-global:"))
    fprop = [r for r in data["tables"]["gemm"] if r["strategy"] == "fp8-global" and r["gemm"] == "fprop"]
    below = sum(1 for r in fprop if r["sqnr_db"] is not None and r["sqnr_db"] < 20)
    assert below >= 1 and f"{below} of {len(fprop)} layer(s) below 20 dB" in glob
    assert "note: no end-to-end run in these results: run analyze without --no-e2e" in " ".join(lines)
    assert any(x.startswith("note: no coverage table") for x in lines)
    assert not any(x.startswith("verdict:") for x in lines)
    # the headline without an end-to-end run: the strategy with the fewest layers below 20 dB, marked as such
    assert lines[0].startswith("verdict (isolated GEMMs, not validated end to end): llm-int8 keeps every layer at "
                               "or above 20 dB fprop SQNR; worst layer ")


def test_an_undefined_layer_is_the_worst_layer_everywhere(tmp_path: Path) -> None:
    """A layer whose fprop SQNR is undefined (NaN weights: no finite reference) counts below 20 dB; the verdict and
    isolated lines named the worst *measured* layer instead (fc1 at 29.0 dB beside an undefined fc2, user test), and
    the report's list said "(undefined: no finite reference dB)"."""
    from fp8probe.report.render import render_report

    data = _small()
    gemm = data["tables"]["gemm"]
    strategies = data["metadata"]["strategies"]
    victim = next(r["layer"] for r in gemm if r["gemm"] == "fprop")
    for r in gemm:
        if r["layer"] == victim and r["gemm"] == "fprop":
            r.update(sqnr_db=None, rel_err=None, note="no finite reference")
    lines = verdict_lines(data["tables"], data["metadata"])
    for s in strategies:
        line = next(x for x in lines if x.startswith(f"isolated {s}:"))
        assert line.endswith(f"; worst: {victim} (SQNR undefined: no finite reference)"), line
    assert lines[0].startswith("verdict (isolated GEMMs, not validated end to end): ")
    assert lines[0].endswith(f"; worst layer {victim} at an undefined SQNR (no finite reference)")
    out = tmp_path / "r.html"
    render_report(data, out)
    html = out.read_text(encoding="utf-8")
    assert f"<code>{victim}</code> (SQNR undefined: no finite reference)" in html and "reference dB" not in html
    assert ">undefined<" in html  # the isolated summary's worst-layer cell


def test_warnings_surrogate_loss_nan_and_failures() -> None:
    data = _small()
    data["metadata"]["loss"] = {"kind": "surrogate", "detail": "mean(output^2)"}
    data["tables"]["tensors"][0]["nan_count"] = 5
    data["tables"]["errors"] = [{"layer": "x", "strategy": "int8", "error": "boom"}]
    warnings = [x for x in verdict_lines(data["tables"], data["metadata"]) if x.startswith("warning:")]
    assert len(warnings) == 3
    assert "surrogate loss" in warnings[0]
    assert warnings[1].startswith("warning: 5 NaN and 0 Inf values in captured tensors of 1 layer(s): "
                                  + data["tables"]["tensors"][0]["layer"])
    assert "1 strategy/layer combination(s) failed" in warnings[2]


def test_coverage_from_metadata_when_the_table_is_absent() -> None:
    cov = coverage_summary([], {"gemms_executed": 250, "gemms_captured": 248, "flop_share": 0.998,
                                "skipped": {"conv3d unsupported": 2}, "kinds": ["linear"]})
    assert cov == {"executed": 250, "captured": 248, "flop_share": 0.998, "skipped": {"conv3d unsupported": 2}}
    v = build_verdict({}, {"coverage": {"gemms_executed": 3, "gemms_captured": 3, "flop_share": 1.0, "skipped": {}}})
    assert v["coverage"]["captured"] == 3 and not v["warnings"]


def test_note_every_end_to_end_row_repeats_is_said_once(tmp_path: Path) -> None:
    shared = "3 parameter(s) with a numerically zero gradient (RMS < 2^-20 × the median) left out: a.k.bias"
    rows = e2e_rows()
    for r in rows:
        r["note"] = f"compared: logits; {shared}"
    rows[0]["note"] += "; 2 layer(s) overflowed"
    v = build_verdict({"e2e": rows, "recommendation": recommendation_rows([])})
    assert v["e2e_notes"] == ["compared: logits", shared]
    assert [r["note"] for r in v["e2e"]] == ["2 layer(s) overflowed"] + [""] * (len(rows) - 1)
    html = _render(rows, tmp_path)
    assert html.count(escape(shared)) == 1 and "Every row: compared: logits." in html


def test_one_end_to_end_row_keeps_its_note() -> None:
    rows = e2e_rows()[:1]
    rows[0]["note"] = "compared: logits"
    v = build_verdict({"e2e": rows})
    assert v["e2e_notes"] == [] and v["e2e"][0]["note"] == "compared: logits"


def _render(e2e: list[dict], tmp_path: Path) -> str:
    from fp8probe.report.render import render_report

    data = _small()
    data["tables"]["e2e"] = e2e
    data["metadata"]["strategies"] = [r["strategy"] for r in e2e]
    return render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")


def test_gemms_left_out_by_the_users_layers_are_listed_not_warned() -> None:
    """'warning: 7 GEMM call(s) not analysed: addmm: not matched by --layers (4) (4)': the count twice, and a
    warning for what --layers asked for."""
    cov = [{"kind": "linear", "op": "addmm", "executed": 8, "captured": 4, "skipped": 4,
            "reason": "not matched by --layers (4)", "gflops": 2.0, "gflops_captured": 1.0},
           {"kind": "conv", "op": "conv3d", "executed": 2, "captured": 0, "skipped": 2,
            "reason": "conv3d not supported (2)", "gflops": 1.0, "gflops_captured": 0.0}]
    lines = verdict_lines({"coverage": cov})
    assert ("captured 4 of 10 GEMMs = 33.3 % of GEMM FLOPs; skipped: 4 × addmm: not matched by --layers; "
            "2 × conv3d: conv3d not supported") in lines, lines
    warned = [x for x in lines if "not analysed" in x]
    assert warned == ["warning: 2 GEMM call(s) not analysed: conv3d: conv3d not supported (2)"]


def test_a_model_wide_value_over_the_budget_is_not_called_validated() -> None:
    """analyze --sweeps printed "block size for the whole model: 32 (validated: loss +24.82 %)" for a row over the
    budget, where the sweep commands said OVER the budget."""
    rows = recommendation_rows(["blocks.0.attn.qkv"])
    for r in rows:
        if r["kind"] == "blocksize":
            r.update(value=32, loss_rel_change=0.2482, within_budget=False)
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows, "coverage": coverage_rows()})
    line = next(x for x in lines if x.startswith("block size"))
    assert line.startswith("block size for the whole model (mixed): none of the swept values stays within the budget "
                           "(nearest: 32, loss +24.82 %") and "validated" not in line


def test_a_model_wide_threshold_of_zero_says_what_it_means() -> None:
    """The demo printed "outlier threshold for the whole model: 0", which reads as every column in 16-bit; 0 is plain
    int8 with no outlier columns (SPEC §5.1)."""
    rows = recommendation_rows([])
    for r in rows:
        if r["kind"] == "threshold":
            r.update(value=0.0)
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows, "coverage": coverage_rows()})
    line = next(x for x in lines if x.startswith("outlier threshold"))
    assert line.startswith("outlier threshold for the whole model (int8): 0 = plain int8, no outlier columns in "
                           "16-bit (validated: loss +0.60 %"), line
    # the run's own --threshold, which the end-to-end int8 line was measured with, is named beside it (QA: the
    # header's 6, the model-wide 0 and the sweep's per-layer 8 met the reader unexplained)
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows, "coverage": coverage_rows()}, {"threshold": 6.0})
    line = next(x for x in lines if x.startswith("outlier threshold"))
    assert line.endswith("(validated: loss +0.60 %, KL 0.004); the end-to-end int8 lines used --threshold 6"), line


def test_the_recommended_mark_on_an_all_low_precision_line_says_layers_are_kept() -> None:
    """'end-to-end ocp-rowwise: loss +4.94 % … ← recommended' read as that line being within the 0.5 % budget, when
    the recommended plan kept two layers in 16-bit (QA F8a)."""
    for keep, mark in (([], " ← recommended"), (["fc1", "fc3"], " ← recommended, keeping 2 layer(s) in 16-bit")):
        lines = verdict_lines({"e2e": e2e_rows(), "recommendation": recommendation_rows(keep)})
        line = next(x for x in lines if x.startswith("end-to-end mxfp8:"))
        assert line.endswith(mark) if not keep else mark in line, line
        assert "low precision ← recommended" in line  # (the line's own numbers stay those of every layer in LP)


def test_the_budget_reads_as_the_bound_it_sets() -> None:
    """'loss -0.24 % … (budget 0.005 loss)' for --budget 0.5% (QA F8c); then '(budget 1e-05 kl)' for --budget kl:1e-5,
    the kind named after the number as if it were a unit (QA C4): the budget is the bound, "KL ≤ 1e-05"."""
    from fp8probe.report.verdict import budget_text
    rows = [dict(r, budget=0.005) for r in recommendation_rows(["fc1"])]
    assert "loss change +0.12 %, KL 0.0009 (budget |loss change| ≤ 0.5 %);" in verdict_lines({"recommendation": rows})[0]
    kl = [dict(r, budget=1e-5, budget_kind="kl") for r in rows]
    assert "(budget KL ≤ 1e-05);" in verdict_lines({"recommendation": kl})[0]
    assert (budget_text(0.01, None), budget_text(0.002, "kl")) == ("|loss change| ≤ 1 %", "KL ≤ 0.002")
    over = [dict(r, recommended=False, within_budget=False) for r in rows]
    assert verdict_lines({"e2e": e2e_rows(), "recommendation": over})[0] == (
        "verdict: no strategy stays within the budget (|loss change| ≤ 0.5 %) even with layers kept in 16-bit")


def test_html_headline_has_the_kl_and_the_budget(tmp_path: Path) -> None:
    """The HTML verdict said 'loss change -0.24 %, 46.3 % …' and dropped the KL (0.19 in a broken-output case) and
    the budget the terminal line shows (QA F8b)."""
    from fp8probe.report.render import render_report

    data = _small()
    data["tables"].update({"e2e": e2e_rows(), "recommendation": [dict(r, budget=0.005) for r in
                                                                 recommendation_rows(["blocks.0.attn.qkv"])]})
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    main = html[html.index('verdict-main'):]
    main = " ".join(main[:main.index("</div>")].split())
    assert "loss change <strong>+0.12 %</strong> of 2.5, KL <strong>0.0009</strong> (budget |loss change| ≤ 0.5 %)," in main, main
    rec = html[html.index('id="recommendation"'):]
    assert "(|loss change| ≤ 0.5 %)" in rec[:rec.index("</table>")]  # the Recommendation table's (every row's) budget too
    data["tables"]["recommendation"] = [dict(r, kl_div=None) for r in data["tables"]["recommendation"]]
    html = render_report(data, tmp_path / "r2.html", draw=False).read_text(encoding="utf-8")
    main = html[html.index('verdict-main'):]
    assert "KL" not in main[:main.index("</div>")]  # (not computed: not shown as "None")


def test_the_isolated_list_is_not_a_second_keep_set(tmp_path: Path) -> None:
    """The isolated summary's heading 'Layers to keep in 16-bit' (the 20 dB rule, one layer at a time) contradicted
    the validated Verdict in the same report: 'keep fc1, fc3' above, 'none of 4 layers' below (QA F5)."""
    from fp8probe.report.render import render_report

    data = _small()
    data["tables"].update({"e2e": e2e_rows(), "recommendation": recommendation_rows(["blocks.0.mlp.fc2"])})
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    assert "Layers to keep in 16-bit" not in html and "keep-in-16-bit" not in html
    summary = html[html.index('id="summary"'):]
    assert summary.index("Layers below 20 dB fprop SQNR in isolation") < summary.index('id="validated-keep"')
    said = " ".join(summary[summary.index('id="validated-keep"'):].split("</p>")[0].split())
    assert "the validated keep-set, measured end to end, is the" in said
    assert "<strong>mxfp8</strong> keeping <code>blocks.0.mlp.fc2</code> in 16-bit." in said
    # without an end-to-end recommendation there is nothing validated to point to
    bare = render_report(_small(), tmp_path / "b.html", draw=False).read_text(encoding="utf-8")
    assert "Layers below 20 dB fprop SQNR in isolation" in bare and 'id="validated-keep"' not in bare


def test_training_line_from_results_written_before_the_mean_and_step_columns() -> None:
    """Older results carry final_loss_ratio and the note only: the line still names the diverged run."""
    rows = training_rows(4)
    rows[-1]["note"] = "diverged: loss not finite from step 3"
    lines = verdict_lines({"e2e": e2e_rows(), "training": rows})
    line = next(x for x in lines if x.startswith("training over"))
    assert line == (f"training over 3 steps, mean loss of the last steps / high precision's: mxfp8 "
                    f"{rows[-1]['final_loss_ratio']:.4f} (diverged)")
    assert "warning: the training simulation diverged: mxfp8 (diverged: loss not finite from step 3); lower --lr" in lines


def test_training_line_keeps_four_decimals_of_a_ratio_near_one() -> None:
    """A ratio of 1.0004 read "1" (3 significant digits), as if the recipe trained exactly like high precision."""
    from fp8probe.report.verdict import training_line

    runs = [{"strategy": "mxfp8", "ratio": 1.0004, "diverged": ""}, {"strategy": "nvfp4", "ratio": 0.99951, "diverged": ""},
            {"strategy": "global", "ratio": 3.2e30, "diverged": "diverged from step 2"}]
    line = training_line({"steps": 20, "window": 2, "hp_diverged": "", "runs": runs})
    assert line.endswith("high precision's: mxfp8 1.0004, nvfp4 0.9995, global 3.2e+30 (diverged from step 2)")


def _operands(seed: int, flushed: dict[str, tuple[float, float]]) -> list[dict]:
    """Operand rows of 5 layers × 3 recipes; ``flushed``: recipe → the (low, high) range its grad_output underflow is
    drawn from (others: under 0.5 %), every other operand under 0.5 %."""
    rng = random.Random(seed)
    rows = []
    for layer in ("fc1", "fc2", "fc3", "fc4", "head"):
        for s in ("ocp-tensorwise", "ocp-rowwise", "global"):
            for op in ("activation", "weight", "grad_output"):
                lo, hi = flushed.get(s, (0.0, 0.005)) if op == "grad_output" else (0.0, 0.005)
                rows.append({"layer": layer, "strategy": s, "operand": op, "sqnr_db": 20 + 10 * rng.random(),
                             "underflow_frac": rng.uniform(lo, hi), "saturation_frac": 0.0})
    return rows


def test_a_recipe_flushing_a_large_share_of_an_operand_is_warned_with_what_avoids_it(tmp_path: Path) -> None:
    """46-66 % of grad_output's non-zero elements flushed to zero in every layer under per-tensor FP8 showed only in
    the collapsed per-strategy operand tables: no terminal or verdict line said so (QA F7)."""
    from fp8probe.report.render import render_report

    rows = _operands(11, {"ocp-tensorwise": (0.46, 0.66), "global": (0.0, 0.005)})
    rows[-1]["underflow_frac"] = 0.35  # global flushes 35 % of head's grad_output, in that layer only
    worst = max((r for r in rows if r["strategy"] == "ocp-tensorwise" and r["operand"] == "grad_output"),
                key=lambda r: r["underflow_frac"])
    lines = verdict_lines({"operands": rows})
    warned = [x for x in lines if "underflow" in x]
    assert warned == [f"warning: grad_output underflow: over 10 % of its non-zero elements flush to zero in 5 of 5 "
                      f"layer(s); worst: {worst['layer']} under ocp-tensorwise {100 * worst['underflow_frac']:.1f} %; "
                      "head under global 35.0 %"]
    # the limit is the named constant, inclusive of it: exactly 10 % is not flagged
    at = [dict(r, underflow_frac=UNDERFLOW_WARN_FRAC if r["underflow_frac"] > 0.1 else r["underflow_frac"]) for r in rows]
    assert not any("underflow" in x for x in verdict_lines({"operands": at}))
    # nothing in the run avoids it: say what might (test_the_underflow_hint_names_only_recipes_the_run_did_not_try)
    every = _operands(12, {s: (0.2, 0.3) for s in ("ocp-tensorwise", "ocp-rowwise", "global")})
    line = next(x for x in verdict_lines({"operands": every}) if "underflow" in x)
    assert "no recipe of this run stays under it there" in line
    # and the report's verdict says it too, not only the collapsed per-layer tables
    data = _small()
    data["tables"]["operands"] = rows
    html = render_report(data, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    verdict = html[html.index('id="verdict"'):html.index("</section>")]
    assert "Warning: grad_output underflow: over 10 % of its non-zero elements flush to zero in 5 of 5" in verdict


def test_the_underflow_hint_names_only_recipes_the_run_did_not_try() -> None:
    """A run of ocp-rowwise alone, flushing 88 % of fcs.3's activations, was told that "a per-row or per-block scale
    (e.g. ocp-rowwise, mxfp8)" would help (QA F5): the examples never name a recipe of the run, and a run of every
    finer-scaled recipe is told that their scales did not help."""
    from fp8probe.report.verdict import FINER_SCALE_RECIPES, underflow_warnings

    rng = random.Random(13)

    def rows(recipes: list[str]) -> list[dict]:
        return [{"layer": layer, "strategy": s, "operand": "activation", "underflow_frac": rng.uniform(0.2, 0.9)}
                for layer in ("fcs.2", "fcs.3") for s in recipes]

    # a per-tensor run: the finer scales are worth a try
    (line,) = underflow_warnings(rows(["ocp-tensorwise"]), ["ocp-tensorwise"])
    assert line.endswith("no recipe of this run stays under it there: a per-row or per-block scale (e.g. ocp-rowwise, "
                         "mxfp8) gives small rows their own scale")
    # the run's own per-row recipe flushes too: it is not offered as the cure, the untried ones are
    (line,) = underflow_warnings(rows(["ocp-rowwise"]), ["ocp-rowwise"])
    assert line.endswith("no recipe of this run stays under it there, not even the finer scales of ocp-rowwise: the "
                         "small values sit inside each row or block next to large ones; other per-row or per-block "
                         "scales (e.g. mxfp8, ocp-blockwise) were not tried")
    # every finer-scaled recipe was run and flushes: nothing to offer, and no example named
    every = ["ocp-tensorwise", *FINER_SCALE_RECIPES]
    (line,) = underflow_warnings(rows(every), every)
    assert line.endswith(f"no recipe of this run stays under it there, not even the finer scales of "
                         f"{', '.join(FINER_SCALE_RECIPES)}: the small values sit inside each row or block next to "
                         "large ones")
    assert "e.g." not in line


def test_a_loss_change_too_small_for_two_decimals_keeps_two_significant_digits() -> None:
    """The demo's sensitivity table read "+0.00 %" / "-0.00 %" in every row, and -0.0159 % / 0.0103 % / 0.0109 % read
    "-0.02 %" / "+0.01 %" / "+0.01 %": rankings and ties could not be read (QA)."""
    from fp8probe.report.verdict import signed_pct
    assert signed_pct(3.21e-7) == "+0.000032 %"
    assert signed_pct(-4.0e-6) == "-0.00040 %"
    assert signed_pct(0.0) == "+0.00 %"
    assert signed_pct(0.0012) == "+0.12 %"
    assert signed_pct(-0.25) == "-25.00 %"
    assert signed_pct(4.9e-5) == "+0.0049 %"
    assert signed_pct(-1.59e-4) == "-0.016 %"
    assert (signed_pct(1.03e-4), signed_pct(1.09e-4)) == ("+0.010 %", "+0.011 %")
    assert signed_pct(9.99e-4) == "+0.10 %" and signed_pct(1.0e-3) == "+0.10 %"
    # beside a bound of two significant digits (the nearest plan's --budget) it never reads above it (QA F6)
    assert signed_pct(6.94e-5) == "+0.0069 %"
    assert signed_pct(-9.51e-4) == "-0.095 %"


def test_a_tiny_loss_change_reads_as_a_plain_decimal_and_a_negligible_one_as_about_zero() -> None:
    """The sensitivity table read "+8.9e-05 %" beside "+0.0012 %" (QA D1): two significant digits in plain decimal
    at every magnitude, down to 10^-6 %; below that "≈ ±0 %" with the sign, where the digits are rounding noise."""
    from fp8probe.report.verdict import NEGLIGIBLE_PCT, signed_pct
    assert signed_pct(8.9e-7) == "+0.000089 %"
    assert signed_pct(-5.2e-7) == "-0.000052 %"
    assert signed_pct(9.96e-7) == "+0.00010 %"  # rounds up into the next decade: still two significant digits
    assert signed_pct(NEGLIGIBLE_PCT / 100) == "+0.0000010 %"
    assert signed_pct(6.3e-9) == "≈ +0 %" and signed_pct(-2e-12) == "≈ -0 %"
    assert signed_pct(0.0) == "+0.00 %"  # exactly no change is not "about" none
    assert [signed_pct(v) for v in (3.3e-5, 3.3e-6, 3.3e-7, 3.3e-8)] == ["+0.0033 %", "+0.00033 %", "+0.000033 %",
                                                                         "+0.0000033 %"]


def test_a_kl_the_loss_hides_is_warned_of_with_a_kl_budget_to_try() -> None:
    """A loss budget accepted a plan whose output distribution moved far more than the loss did (per-token changes
    that cancel in the mean): nothing in the verdict said so (QA: a layer whose harm shows only in the KL)."""
    rows = recommendation_rows([])
    for r in rows:
        if r["strategy"] == "mxfp8":
            r.update(kl_div=0.19)  # loss +0.12 % of 2.5 = 0.003 nats; the budget lets it move 0.025
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows, "coverage": coverage_rows()})
    warned = [x for x in lines if "cancel" in x]
    assert warned == ["warning: mxfp8 keeps the loss within its 1 % budget, but its output distribution moves by KL "
                      "0.19 nats per row, over 2x its loss change (0.003 nats) and over the 0.025 the budget lets the "
                      "loss move: per-token changes cancel in the loss; --budget kl:0.025 bounds the output "
                      "distribution instead of the loss"], lines
    # no warning: a KL within what the budget lets the loss move; a KL about the size of the plan's own loss change
    # (QA: loss 0.0029 nats, KL 0.0034, nothing cancels); a KL budget; no KL
    for change in ({"kl_div": 0.02}, {"kl_div": 0.034, "loss_rel_change": 0.0116, "budget": 0.012},
                   {"kl_div": 0.19, "budget_kind": "kl", "budget": 0.5}, {"kl_div": None}):
        rows = recommendation_rows([])
        for r in rows:
            if r["strategy"] == "mxfp8":
                r.update(change)
        lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows, "coverage": coverage_rows()})
        assert not any("cancel" in x for x in lines), (change, lines)


def test_the_finer_scale_recipes_the_underflow_hint_offers_exist() -> None:
    """report may not import analysis, so verdict names the finer-scaled recipes itself: each must be a recipe."""
    from fp8probe.analysis.strategies import STRATEGIES
    from fp8probe.report.verdict import FINER_SCALE_RECIPES
    assert set(FINER_SCALE_RECIPES) <= set(STRATEGIES)


def _flushing(seed: int, worst: dict[str, tuple[str, float]], fine: tuple[str, ...] = ("global", "int8")) -> list[dict]:
    """Activation operand rows of layers L0-L3: each recipe of ``worst`` flushes its (layer, share) and 11-15 % in
    L2; the ``fine`` recipes flush under 1 % everywhere."""
    rng = random.Random(seed)
    rows = []
    for layer in ("L0", "L1", "L2", "L3"):
        for s in (*fine, *worst):
            frac = rng.uniform(0.0, 0.01)
            if s in worst:
                frac = worst[s][1] if worst[s][0] == layer else rng.uniform(0.11, 0.15) if layer == "L2" else frac
            rows.append({"layer": layer, "strategy": s, "operand": "activation", "underflow_frac": frac})
    return rows


def test_an_underflow_warning_names_the_worst_layers_and_shares_not_the_recipes_that_are_fine() -> None:
    """Each underflow warning ran 4-5 lines: per recipe "in N of M layer(s) (worst: …)", then every recipe at or under
    10 % (QA B6). Now: how many layers, each worst layer with the recipes that flush it most, largest share first."""
    from fp8probe.report.verdict import MAX_NAMES, underflow_warnings

    worst = {"nvfp4": ("L3", 0.229), "mxfp4": ("L3", 0.291), "nvfp4-train": ("L3", 0.2291), "mxfp6-e2m3": ("L1", 0.3)}
    run = ["global", "int8", "nvfp4", "nvfp4-train", "mxfp4", "mxfp6-e2m3"]
    (line,) = underflow_warnings(_flushing(3, worst), run)
    assert line == ("activation underflow: over 10 % of its non-zero elements flush to zero in 3 of 4 layer(s); worst: "
                    "L1 under mxfp6-e2m3 30.0 %; L3 under mxfp4 29.1 %, nvfp4-train 22.9 %, nvfp4 22.9 %")
    assert "global" not in line and "int8" not in line and "at or under" not in line
    # many recipes: the first MAX_NAMES by share, then a count
    many = {f"r{i}": ("L3", 0.2 + 0.01 * i) for i in range(MAX_NAMES + 2)}
    (line,) = underflow_warnings(_flushing(4, many), ["global", "int8", *many])
    assert line.endswith(f"L3 under r{MAX_NAMES + 1} 27.0 %, r{MAX_NAMES} 26.0 %, r5 25.0 %, r4 24.0 %, r3 23.0 %, "
                         "r2 22.0 % and 2 more recipe(s)")
    assert "r1 " not in line and "r0 " not in line


def test_underflow_warnings_do_not_depend_on_the_budget() -> None:
    """A recipe within a loss budget with every layer in low precision was left out of the underflow warnings, so the
    same tensors warned under --budget kl:1e-5 (where the recipe needed a keep-set) and not under a loss budget (QA
    A3: FP4 with top-1 agreement 30 % read "yes" and unwarned). The warnings now read the operands table only."""
    operands = _flushing(5, {"mxfp4": ("L3", 0.291), "nvfp4": ("L3", 0.229)})
    e2e = [dict(e2e_rows()[0], strategy=s) for s in ("global", "int8", "mxfp4", "nvfp4")]

    def plan(s: str, kind: str, budget: float, keep: list[str]) -> dict:
        return {"kind": "strategy", "strategy": s, "value": None, "keep_16bit": keep, "n_keep": len(keep),
                "loss_rel_change": 1e-5, "kl_div": 0.0076, "within_budget": True, "lp_flop_share": 1 - 0.2 * len(keep),
                "budget": budget, "budget_kind": kind, "recommended": s == "int8"}

    loss = [plan(s, "loss", 0.01, []) for s in ("global", "int8", "mxfp4", "nvfp4")]
    kl = [plan(s, "kl", 1e-5, ["L3", "L2"] if "fp4" in s else []) for s in ("global", "int8", "mxfp4", "nvfp4")]
    warned = [[w for w in build_verdict({"e2e": e2e, "recommendation": rows, "operands": operands})["warnings"]
               if "underflow" in w] for rows in (loss, kl)]
    assert warned[0] == warned[1] and len(warned[0]) == 1
    assert "L3 under mxfp4 29.1 %, nvfp4 22.9 %" in warned[0][0]


def test_the_verdict_line_gives_the_high_precision_loss_the_change_is_of() -> None:
    """Only relative loss changes appeared, the model's own loss (9.049 in QA's Llama) nowhere (QA C3); then "loss 9.049 →
    -0.0023 %" read as the loss going to -0.0023 % (QA 2): "loss change -0.0023 % of 9.049"."""
    from fp8probe.report.verdict import loss_change_text
    e2e = [dict(r, loss_hp=9.048840522766113) for r in e2e_rows()]
    line = verdict_lines({"e2e": e2e, "recommendation": recommendation_rows([])})[0]
    assert "no layer needs 16-bit: loss change +0.12 % of 9.049, KL 0.0009" in line
    # no end-to-end table, or a loss that is not finite: the change alone
    assert "no layer needs 16-bit: loss change +0.12 %, KL" in verdict_lines({"recommendation": recommendation_rows([])})[0]
    assert loss_change_text(0.0012, float("nan")) == "loss change +0.12 %" and loss_change_text(None, 2.5) == "loss change –"


def _keep_sets(global_share: float, chosen_share: float, kind: str = "kl") -> list[dict]:
    """recommendation_rows with global within a ``kind`` budget too, and each keep-set's share of FLOPs in LP."""
    rows = recommendation_rows(["fc1", "fc2"])
    rows[0].update(within_budget=True, lp_flop_share=global_share, kl_div=0.0005)
    rows[1].update(lp_flop_share=chosen_share)
    return [dict(r, budget_kind=kind, budget=1e-3 if kind == "kl" else 0.01) for r in rows]


def test_a_keep_set_that_leaves_little_in_low_precision_says_so() -> None:
    """Under kl:1e-5 nvfp4 kept 32 of 37 layers (5.2 % of the FLOPs in low precision) and the end-to-end table said
    "yes" in green beside 100 % low-precision FLOPs, every layer's share, not the keep-set's (QA A3). The verdict rows
    carry the keep-set's share and whether it is under LOW_GAIN_LP_SHARE; the terminal says so where it names one."""
    rows = _keep_sets(0.052, 0.372)
    v = build_verdict({"e2e": e2e_rows(), "recommendation": rows})
    by = {r["strategy"]: r for r in v["e2e"]}
    assert (by["global"]["lp_flop_share"], by["global"]["keep_lp_flop_share"]) == (1.0, 0.052)
    assert by["global"]["little_gain"] and by["mxfp8"]["little_gain"] and v["recommended"]["little_gain"]
    lines = verdict_lines({"e2e": e2e_rows(), "recommendation": rows})
    assert lines[0].endswith("; 37.2 % of forward GEMM FLOPs in low precision (under 50 %: little gain over 16-bit)")
    assert next(x for x in lines if x.startswith("end-to-end mxfp8:")).endswith(
        "← recommended, keeping 2 layer(s) in 16-bit, 37.2 % forward FLOPs low precision (under 50 %: little gain over "
        "16-bit; see the verdict line)")
    # at or over the bound: no qualifier; a plan outside the budget is not "within budget, little gain"
    rows = _keep_sets(LOW_GAIN_LP_SHARE, 0.947)
    rows[0]["within_budget"] = False
    rows[0]["lp_flop_share"] = 0.1
    v = build_verdict({"e2e": e2e_rows(), "recommendation": rows})
    assert not any(r["little_gain"] for r in v["e2e"]) and not v["recommended"]["little_gain"]
    assert "little gain" not in " ".join(verdict_lines({"e2e": e2e_rows(), "recommendation": rows}))
    # no layer kept: the keep-set is the end-to-end run, its share that run's where the row lacks one
    rows = [dict(r, keep_16bit=[], n_keep=0, lp_flop_share=None) for r in recommendation_rows([])]
    e2e = [dict(r, lp_flop_share=0.977) for r in e2e_rows()]
    assert [r["keep_lp_flop_share"] for r in build_verdict({"e2e": e2e, "recommendation": rows})["e2e"]] == [0.977] * 2


def test_a_plan_within_a_loss_budget_with_a_kl_far_above_the_recommended_plans_is_flagged() -> None:
    """FP4 recipes met a 1 % loss budget with KL 0.0076, 196x the recommended int8's 3.9e-5, and top-1 agreement 30 %
    (QA A3): the loss of a random-init model barely moves. The row's KL (its keep-set's) over KL_FAR_RATIO x the
    recommended plan's is flagged under a loss budget; not under a KL budget, which bounds the KL itself."""
    rows = _keep_sets(1.0, 0.947, kind="loss")
    rows[0].update(keep_16bit=[], n_keep=0)
    for kl, far in ((KL_FAR_RATIO * 0.0009 * 0.99, None), (0.0009 * 196, 196.0)):
        rows[0]["kl_div"] = kl
        v = build_verdict({"e2e": e2e_rows(), "recommendation": rows})
        by = {r["strategy"]: r for r in v["e2e"]}
        assert (by["global"]["kl_far"] if far is None else round(by["global"]["kl_far"], 6)) == far
        assert by["mxfp8"]["kl_far"] is None  # (the recommended plan itself)
    assert by["global"]["keep_kl_div"] == rows[0]["kl_div"]  # the keep-set's KL, not the e2e row's 0.031
    v = build_verdict({"e2e": e2e_rows(), "recommendation": [dict(r, budget_kind="kl") for r in rows]})
    assert all(r["kl_far"] is None for r in v["e2e"])
    rows[0]["within_budget"] = False
    assert all(r["kl_far"] is None for r in build_verdict({"e2e": e2e_rows(), "recommendation": rows})["e2e"])


def test_the_isolated_pick_says_the_worst_layer_decided_a_tie() -> None:
    """QA: 11 recipes tied at "0 of 271" layers below 20 dB and the headline named int8 with no rule given."""
    from fp8probe.report.verdict import isolated_headline

    base = {"strategy": "int8", "n_below": 0, "n_layers": 271, "worst_layer": "l7", "worst_db": 36.04}
    line = isolated_headline({**base, "tied": 11})
    assert line.endswith("worst layer l7 at 36.0 dB, the highest worst layer of the 11 recipes with none below "
                         "(ties: the first in --strategy)"), line
    assert isolated_headline({**base, "tied": 1}).endswith("worst layer l7 at 36.0 dB")
    assert "recipes with 3 below" in isolated_headline({**base, "n_below": 3, "tied": 2})
    data = _small()
    for t in ("e2e", "recommendation"):
        data["tables"].pop(t, None)
    v = build_verdict(data["tables"], data["metadata"])
    assert v["best_isolated"]["tied"] == sum(r["n_below"] == v["best_isolated"]["n_below"] for r in v["isolated"]
                                             if r["worst_db"] is not None)


def test_an_underflow_warning_naming_the_recommended_recipe_says_its_end_to_end_check_passed() -> None:
    """The demo warned "… switchback 15.8 %" right under "Recommended: switchback" with nothing relating the two
    (QA A4). A warning that names the recommended recipe says so; one that does not name it says nothing of it."""
    flushed = _flushing(5, {"mxfp4": ("L3", 0.291), "int8": ("L1", 0.158)})
    weights = [dict(r, operand="weight") for r in _flushing(6, {"mxfp4": ("L3", 0.2)}, fine=("global", "int8"))]
    grads = [dict(r, operand="grad_output") for r in flushed]
    e2e = [dict(e2e_rows()[0], strategy=s) for s in ("global", "int8", "mxfp4")]

    def warnings(keep: list[str], operands: list[dict]) -> list[str]:
        rec = [{"kind": "strategy", "strategy": s, "value": None, "keep_16bit": keep if s == "int8" else [],
                "n_keep": len(keep) if s == "int8" else 0, "loss_rel_change": 1e-5, "kl_div": 0.0076,
                "within_budget": s == "int8", "lp_flop_share": 1.0, "budget": 0.01, "budget_kind": "loss",
                "recommended": s == "int8"} for s in ("global", "int8", "mxfp4")]
        return [w for w in build_verdict({"e2e": e2e, "recommendation": rec, "operands": operands})["warnings"]
                if "underflow" in w]

    activation, weight = warnings([], flushed + weights)
    assert activation.endswith("L1 under int8 15.8 % (int8 is the recommended recipe: its end-to-end check passed "
                               "with this underflow)"), activation
    assert "recommended" not in weight  # (int8 is not named there)
    # its keep-set holds every layer it flushes in 16-bit: the end-to-end check ran without that underflow
    (activation,) = warnings(["L1", "L2"], flushed)
    assert activation.endswith("(int8 is the recommended recipe: it keeps these layers in 16-bit)"), activation
    # a gradient: the budget reads the forward outputs only (the end-to-end share and loss are forward, QA A3)
    (grad,) = warnings([], grads)
    assert grad.endswith("(int8 is the recommended recipe: its budget reads the forward outputs; see its gradient "
                         "SQNR)"), grad


def test_an_underflow_warning_naming_the_isolated_pick_says_it_was_not_validated_end_to_end() -> None:
    """Without an end-to-end run the banner said int8 "keeps every layer at or above 20 dB fprop SQNR" and the warning
    under it "… v_proj under int8 29.7 %" (QA A4): the warning now says the pick was not validated end to end."""
    operands = [dict(r, operand="grad_output") for r in _flushing(7, {"int8": ("L1", 0.297), "mxfp4": ("L3", 0.4)})]
    gemm = [{"layer": layer, "strategy": s, "gemm": "fprop", "sqnr_db": 40.0 if s == "int8" else 15.0}
            for layer in ("L0", "L1", "L2", "L3") for s in ("global", "int8", "mxfp4")]
    v = build_verdict({"gemm": gemm, "operands": operands})
    assert v["best_isolated"]["strategy"] == "int8"
    (line,) = [w for w in v["warnings"] if "underflow" in w]
    assert line.endswith("L1 under int8 29.7 % (int8, the isolated pick, was not validated end to end: run without "
                         "--no-e2e)"), line
    # a forward-only run cannot be run "without --no-e2e": its note says why it has no end-to-end part
    v = build_verdict({"gemm": gemm, "operands": operands}, {"e2e_off": "forward-only run: no gradients"})
    (line,) = [w for w in v["warnings"] if "underflow" in w]
    assert line.endswith("(int8, the isolated pick, was not validated end to end)"), line
    # a pick the warning does not name: no clause
    gemm = [dict(r, sqnr_db=40.0 if r["strategy"] == "global" else 15.0) for r in gemm]
    v = build_verdict({"gemm": gemm, "operands": operands})
    assert v["best_isolated"]["strategy"] == "global" and "isolated pick" not in " ".join(v["warnings"])


def test_a_share_under_one_never_reads_100_percent() -> None:
    """int8 with outlier columns in 16-bit left 99.96 % of the FLOPs in low precision and read "100.0 %", as if every
    FLOP were (QA)."""
    from fp8probe.report.verdict import pct

    assert [pct(x) for x in (1.0, 0.9996, 0.9994, 0.0, None)] == ["100.0 %", ">99.9 %", "99.9 %", "0.0 %", "–"]
    assert pct(0.996, 0) == ">99 %" and pct(1, 0) == "100 %"


def test_a_plan_within_a_loss_budget_with_a_low_output_sqnr_is_flagged() -> None:
    """A loss averages its errors: a plan moving the model output to 8.6 dB SQNR met a 1 % loss budget with a green
    "yes" and a plain verdict line (QA). Flagged with the plan's own output SQNR under the --keep-16bit-db line, for a
    loss budget only (a KL budget bounds the output distribution itself)."""
    rec = recommendation_rows(["blocks.0.attn.qkv"])
    rec[1]["output_sqnr_db"] = 12.34  # mxfp8's keep-set plan, recommended
    tables = {"e2e": e2e_rows(), "recommendation": rec}
    lines = verdict_lines(tables)
    assert lines[0].endswith("in low precision; output SQNR 12.3 dB (under 20 dB: see the warning)"), lines[0]
    (warned,) = [x for x in lines if "model output's SQNR" in x]
    assert warned.startswith("warning: within the loss budget, but the model output's SQNR is under 20 dB: mxfp8 "
                             "12.3 dB: the loss averages out errors the output shows")
    v = build_verdict(tables)
    assert v["recommended"]["low_sqnr"] and [r["low_sqnr"] for r in v["e2e"]] == [False, True]
    # at or above the line, or judged by a KL budget: no flag
    assert not any("SQNR is under" in x for x in verdict_lines(tables, keep_db=12.0))
    for r in rec:
        r["budget_kind"] = "kl"
    assert not any("SQNR is under" in x for x in verdict_lines(tables)) and not build_verdict(tables)["recommended"][
        "low_sqnr"]


def test_the_underflow_hint_for_4_and_6_bit_recipes_names_their_elements_and_share() -> None:
    """A run of mxfp4 alone, flushing most of an operand, was told that "a per-row or per-block scale (e.g. ocp-rowwise,
    mxfp8)" would help: mxfp4 has a scale per block of 32; its E2M1 elements are what cannot hold the small values."""
    from fp8probe.report.verdict import underflow_warnings

    def rows(shares: dict[str, float]) -> list[dict]:
        return [{"layer": layer, "strategy": s, "operand": "activation", "underflow_frac": share * (0.5 if layer == "a"
                                                                                                    else 1.0)}
                for layer in ("a", "b") for s, share in shares.items()]

    (line,) = underflow_warnings(rows({"mxfp4": 0.875}), ["mxfp4"])
    assert line.endswith("no recipe of this run stays under it there: mxfp4 flushes up to 87.5 %: 4- and 6-bit elements "
                         "(2-3 exponent bits) cannot hold values far below their block's largest, whatever the scale; a "
                         "format with more exponent bits keeps them (an FP8 recipe such as mxfp8 or mxfp6-e3m2)")
    assert "per-row or per-block scale" not in line
    (line,) = underflow_warnings(rows({"nvfp4": 0.707, "mxfp6-e3m2": 0.3}), ["nvfp4", "mxfp6-e3m2"])
    assert "nvfp4 flushes up to 70.7 %, mxfp6-e3m2 flushes up to 30.0 %" in line and line.endswith("such as mxfp8)")
    # beside a per-tensor FP8 recipe that flushes too, each is told its own cure
    (line,) = underflow_warnings(rows({"mxfp4": 0.6, "ocp-tensorwise": 0.4}), ["mxfp4", "ocp-tensorwise"])
    assert "mxfp4 flushes up to 60.0 %: 4- and 6-bit elements" in line
    assert line.endswith("; for ocp-tensorwise: a per-row or per-block scale (e.g. ocp-rowwise, mxfp8) gives small rows "
                         "their own scale")


def test_nan_outputs_where_the_reference_is_finite_are_warned_of_and_marked_in_the_heat_map() -> None:
    """One +Inf weight turned 480 of 2016 NVFP4 outputs NaN and an int8 row scale of +Inf every switchback dgrad
    output: the heat map showed an ordinary 16.2 dB (the SQNR is over the finite outputs) and the verdict recommended
    switchback with no word of it (QA)."""
    from fp8probe.report.render import _heat_cell
    from fp8probe.report.verdict import nonfinite_output_warning

    def row(s: str, layer: str, gemm: str, n: int, compared: int, sqnr: float | None = 16.2) -> dict:
        return {"layer": layer, "strategy": s, "gemm": gemm, "sqnr_db": sqnr, "nonfinite": n, "compared": compared,
                "note": None if sqnr is not None else "low precision non-finite", "quantized": True}

    gemm = [row("nvfp4", "infw", "fprop", 480, 1536), row("nvfp4", "b", "fprop", 0, 2048),
            row("switchback", "infw", "dgrad", 2016, 0, None), row("switchback", "b", "dgrad", 0, 2048),
            row("global", "infw", "fprop", 0, 2048)]
    text = nonfinite_output_warning(gemm, ["global", "switchback", "nvfp4"])
    assert text == ("NaN/Inf low-precision GEMM outputs where the float64 reference is finite (their SQNRs count only "
                    "the finite outputs; cells marked ⚠): switchback in 1 GEMM(s) (worst: infw dgrad, 2016 of 2016); "
                    "nvfp4 in 1 GEMM(s) (worst: infw fprop, 480 of 2016)")
    assert nonfinite_output_warning([r for r in gemm if not r["nonfinite"]], ["global"]) is None
    # the verdict's pick among them is told what to do
    e2e = [dict(e2e_rows()[0], strategy=s) for s in ("global", "switchback", "nvfp4")]
    rec = [{"kind": "strategy", "strategy": s, "value": None, "keep_16bit": [], "n_keep": 0, "loss_rel_change": 1e-4,
            "kl_div": 1e-4, "within_budget": True, "lp_flop_share": 1.0, "budget": 0.01, "budget_kind": "loss",
            "recommended": s == "switchback"} for s in ("global", "switchback", "nvfp4")]
    warned = [w for w in build_verdict({"e2e": e2e, "recommendation": rec, "gemm": gemm})["warnings"] if "⚠" in w]
    assert warned == [text + " (switchback, the verdict's pick, is one of them: keep infw in 16-bit, or find the NaN/Inf "
                             "in the tensors table)"]
    rec = [dict(r, keep_16bit=["infw"], n_keep=1) for r in rec]
    warned = [w for w in build_verdict({"e2e": e2e, "recommendation": rec, "gemm": gemm})["warnings"] if "⚠" in w]
    assert warned == [text + " (switchback is the recommended recipe: it keeps these layers in 16-bit)"]
    # the heat-map cell: its SQNR, marked, with the count in its title; a clean cell unchanged
    c = _heat_cell(gemm[0], 20.0)
    assert c["text"] == "16.2 ⚠" and c["sort"] == 16.2 and c["title"].startswith("480 of 2016 outputs NaN/Inf")
    assert _heat_cell(gemm[1], 20.0) == {"text": "16.2", "sort": None, "cls": c["cls"]}
    assert _heat_cell(gemm[2], 20.0)["text"] == "undef"
