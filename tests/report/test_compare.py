"""The compare gate: identical results pass, a degraded layer fails by name, bad input exits 2."""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from fp8probe.cli import cli
from fp8probe.report.compare import Gates, compare_markdown, compare_results, gated_text
from fp8probe.report.render import load_results, render_compare

DATA = Path(__file__).parent / "data" / "results_small.json"
DEGRADED = "blocks.0.mlp.fc2"


@pytest.fixture(scope="module")
def base() -> dict:
    return load_results(DATA)


def _degrade(results: dict, layer: str = DEGRADED, drop_db: float = 3.0) -> dict:
    cur = copy.deepcopy(results)
    for r in cur["tables"]["gemm"]:
        if r["layer"] == layer and r["gemm"] == "fprop" and r["strategy"] == "fp8-global":
            r["sqnr_db"] -= drop_db
    return cur


def _write(tmp_path: Path, name: str, data: dict) -> str:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_identical_pair_passes(base: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    assert (tmp_path / "c" / "compare.html").exists()
    md = (tmp_path / "c" / "compare.md").read_text()
    assert "PASS" in md and "No SQNR decreased." in md
    html = (tmp_path / "c" / "compare.html").read_text()
    assert "http" not in html


def test_degraded_layer_fails_and_is_named(base: dict, tmp_path: Path) -> None:
    cur = _write(tmp_path, "cur.json", _degrade(base))
    summary = tmp_path / "summary.md"
    res = CliRunner().invoke(cli, ["compare", str(DATA), cur, "--out", str(tmp_path / "c"),
                                   "--markdown", str(summary)])
    assert res.exit_code == 1, res.output
    assert DEGRADED in res.output
    assert "max-sqnr-drop" in res.output
    # only the degraded layer is named
    others = {r["layer"] for r in base["tables"]["layers"]} - {DEGRADED}
    fail_line = [ln for ln in res.output.splitlines() if ln.startswith("FAIL")][0]
    assert not any(o in fail_line for o in others)
    assert DEGRADED in summary.read_text() and "FAIL" in summary.read_text()
    assert DEGRADED in (tmp_path / "c" / "compare.html").read_text()


def test_the_end_to_end_gate_is_not_counted_as_a_layer(base: dict, tmp_path: Path) -> None:
    """A degraded layer and a failed end-to-end gate read "FAIL: ... in layer(s): fcs.2, fcs.3, (end to end)" and
    "FAIL — 3 layer(s)" (QA F8): the headlines count the layers and name the whole-run gate apart."""
    cur = _write(tmp_path, "cur.json", _degrade(base))  # (the baseline has no e2e table: the e2e gate fails too)
    res = CliRunner().invoke(cli, ["compare", str(DATA), cur, "--out", str(tmp_path / "c"),
                                   "--max-loss-increase", "0.005"])
    assert res.exit_code == 1, res.output
    fail_line = next(ln for ln in res.output.splitlines() if ln.startswith("FAIL"))
    assert fail_line == f"FAIL: 2 gate violation(s): 1 layer(s) ({DEGRADED}) + the end-to-end gate"
    md = (tmp_path / "c" / "compare.md").read_text(encoding="utf-8")
    assert md.splitlines()[0] == "## fp8probe compare: ❌ **FAIL** — 1 layer(s) + the end-to-end gate"
    html = (tmp_path / "c" / "compare.html").read_text(encoding="utf-8")
    assert f"2 gate violations:\n1 layer(s) ({DEGRADED}) + the end-to-end gate</div>" in html
    # the end-to-end gate alone: no "0 layer(s)"
    only = compare_results(base, base, Gates(max_loss_increase=0.005))
    assert compare_markdown(only).splitlines()[0] == "## fp8probe compare: ❌ **FAIL** — the end-to-end gate"


def test_gate_limit_is_respected(base: dict) -> None:
    cur = _degrade(base, drop_db=0.9)
    assert compare_results(base, cur, Gates(max_sqnr_drop=1.0))["passed"]
    assert not compare_results(base, cur, Gates(max_sqnr_drop=0.5))["passed"]
    # an improvement never fails
    assert compare_results(base, _degrade(base, drop_db=-5.0))["passed"]


def test_outlier_and_underflow_gates(base: dict) -> None:
    cur = copy.deepcopy(base)
    cur["tables"]["outliers"][1]["n_outlier_cols"] += 2
    layer_o = cur["tables"]["outliers"][1]["layer"]
    cur["tables"]["operands"][4]["underflow_frac"] += 0.05
    layer_u = cur["tables"]["operands"][4]["layer"]
    cmp = compare_results(base, cur)
    gates = {(v["gate"], v["layer"]) for v in cmp["violations"]}
    assert gates == {("max-new-outlier-cols", layer_o), ("max-underflow-increase", layer_u)}
    assert compare_results(base, cur, Gates(max_new_outlier_cols=2, max_underflow_increase=5.1))["passed"]


def test_nan_and_missing_layers(base: dict) -> None:
    cur = copy.deepcopy(base)
    cur["tables"]["gemm"][0]["sqnr_db"] = float("nan")
    cur["tables"]["layers"].append({"layer": "new.layer"})
    cmp = compare_results(base, cur)
    assert not cmp["passed"] and cmp["failed_layers"] == [base["tables"]["gemm"][0]["layer"]]
    assert cmp["added_layers"] == ["new.layer"]
    md = compare_markdown(cmp)
    assert "new.layer" in md and "FAIL" in md


def test_markdown_escapes_pipes(base: dict) -> None:
    data = json.loads(json.dumps(base).replace(DEGRADED, "a|b"))
    md = compare_markdown(compare_results(data, _degrade(data, "a|b")))
    assert "a\\|b" in md


def test_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    for args in ([str(bad), str(DATA)], [str(DATA), str(tmp_path / "missing.json")]):
        res = CliRunner().invoke(cli, ["compare", *args, "--out", str(tmp_path / "c")])
        assert res.exit_code == 2
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:")


def test_a_truncated_file_says_where_it_ends(tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    cut.write_text(DATA.read_text()[:500])
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(cut), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert re.search(r"is not JSON \([^()]*: line \d+ column \d+\)", res.output), res.output
    assert "at at" not in res.output


def test_kind_mismatch_and_bad_gate_exit_2(base: dict, tmp_path: Path) -> None:
    other = copy.deepcopy(base)
    other["kind"] = "sweep-threshold"
    res = CliRunner().invoke(cli, ["compare", str(DATA), _write(tmp_path, "o.json", other), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "cannot compare an 'analyze' result with a 'sweep-threshold' result" in res.output
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--max-sqnr-drop", "-1", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--max-sqnr-drop" in res.output


def test_null_sqnr_is_decoded_by_its_note(base: dict, tmp_path) -> None:
    # JSON stores +inf/−inf/NaN SQNRs as null; the row's note (report/schema.py NOTE_*) tells them apart.
    cur = copy.deepcopy(base)
    row0 = cur["tables"]["gemm"][0]
    row0["sqnr_db"], row0["note"] = None, "exact"  # became exact: better, not a failure
    cmp = compare_results(base, cur)
    row = [r for r in cmp["sqnr"] if r["layer"] == row0["layer"]][0]
    assert cmp["passed"] and row["current"] == math.inf and not row["failed"]
    row0["note"] = None  # null with no reason: undefined (NaN) where there was a number must fail, never pass silently
    cmp = compare_results(base, cur)
    row = [r for r in cmp["sqnr"] if r["layer"] == row0["layer"]][0]
    assert not cmp["passed"] and math.isnan(row["current"]) and row["delta_db"] == -math.inf
    assert "NaN" in compare_markdown(cmp)
    render_compare(cmp, tmp_path / "c.html")


def test_sweep_rows_are_gated_too() -> None:
    demo = load_results(DATA.parent / "results_demo_small.json")  # real pipeline output with both sweeps
    cur = copy.deepcopy(demo)
    row = next(r for r in cur["tables"]["blocksize_sweep"] if r["target"] == "fprop" and r["blocksize"] == 32)
    row["sqnr_db"] -= 2.0
    th = next(r for r in cur["tables"]["threshold_sweep"] if r["threshold"] == 6.0)
    th["fprop_sqnr_db"] -= 2.0
    cmp = compare_results(demo, cur)
    details = {(v["layer"], v["detail"].split(" SQNR")[0]) for v in cmp["violations"]}
    assert details == {(row["layer"], "blockwise bs=32 fprop"), (th["layer"], "int8 threshold=6 fprop")}
    assert compare_results(demo, copy.deepcopy(demo))["passed"]


# ------------------------------------------------------------------------------------------------
# The gate never passes on nothing, never fails on float32 noise (issue 11 items 7, 8, 11, 13)
# ------------------------------------------------------------------------------------------------
def _cli_compare(tmp_path: Path, base_path: str, cur: dict | str, *extra: str):
    cur_path = cur if isinstance(cur, str) else _write(tmp_path, "cur.json", cur)
    return CliRunner().invoke(cli, ["compare", base_path, cur_path, "--out", str(tmp_path / "c"), "--overwrite", *extra])


def _without(results: dict, **drop) -> dict:
    cur = copy.deepcopy(results)
    for table, pred in drop.items():
        cur["tables"][table] = [r for r in cur["tables"][table] if not pred(r)]
    return cur


@pytest.mark.parametrize("case", ["no gemm table", "empty gemm table", "strategy missing", "layer missing"])
def test_missing_baseline_rows_fail_and_are_listed(base: dict, tmp_path: Path, case: str) -> None:
    """Used to exit 0 "no gate exceeded" whenever the current results lacked what the baseline had."""
    cur = copy.deepcopy(base)
    if case == "no gemm table":
        del cur["tables"]["gemm"]
    elif case == "empty gemm table":
        cur["tables"]["gemm"] = []
    elif case == "strategy missing":
        cur = _without(base, gemm=lambda r: r["strategy"] == "llm-int8", operands=lambda r: r["strategy"] == "llm-int8")
    else:
        cur = _without(base, **{t: (lambda r: r["layer"] == DEGRADED) for t in ("layers", "gemm", "operands", "outliers")})
    res = _cli_compare(tmp_path, str(DATA), cur)
    assert res.exit_code == 1, res.output
    assert "missing:" in res.stderr
    assert ("not run in current" if case == "strategy missing" else "missing from current") in res.stderr
    if case == "layer missing":
        assert DEGRADED in res.stderr
    if case == "strategy missing":
        # one violation for the strategy, not one per layer (QA: "74 gate violation(s): 37 layer(s)" for a re-run of
        # 3 of 15 strategies, each layer listing the same rows)
        assert "1 strategy of the baseline not run in current: llm-int8: run them (--strategy)" in res.stderr
        assert "llm-int8 fprop" not in res.stderr and "FAIL: 1 gate violation(s): missing strategies" in res.stderr
    assert "missing" in (tmp_path / "c" / "compare.md").read_text()
    res = _cli_compare(tmp_path, str(DATA), cur, "--allow-missing")
    assert res.exit_code == 0, res.output
    assert "allowed by --allow-missing" in res.output
    if case == "strategy missing":
        assert "1 strategy of the baseline (llm-int8)" in res.output and "baseline rows of" not in res.output


def test_unrelated_models_exit_2(base: dict, tmp_path: Path) -> None:
    other = json.loads(json.dumps(base).replace("blocks.", "encoder.layer.").replace('"head"', '"classifier"'))
    res = _cli_compare(tmp_path, str(DATA), other)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "no layer in common" in lines[0], res.output


def test_models_sharing_a_layer_name_or_two_exit_2_and_a_layers_subset_compares(base: dict, tmp_path: Path) -> None:
    """A Llama and a GPT-2 share "lm_head": the other layers came out as 54 missing rows, exit 1, as if the model had
    regressed (user test). Fewer than half of the smaller run's layers in common is another model (exit 2); a run of
    some of the baseline's layers (--layers) is all in common and compares."""
    other = json.loads(json.dumps(base).replace("blocks.", "encoder.layer."))  # ("head" stays shared)
    n_layers = len(base["tables"]["layers"])
    assert n_layers >= 3
    res = _cli_compare(tmp_path, str(DATA), other)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"share only 1 of their {n_layers} and {n_layers} layers" in lines[0]
    subset = json.loads(json.dumps(base))
    keep = {r["layer"] for r in subset["tables"]["layers"][:1]}
    for name, rows in subset["tables"].items():
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "layer" in rows[0]:
            subset["tables"][name] = [r for r in rows if r.get("layer") in keep]
    res = _cli_compare(tmp_path, str(DATA), subset, "--allow-missing")
    assert res.exit_code == 0, res.output


def test_unrelated_models_say_what_differs(base: dict, tmp_path: Path) -> None:
    """The refusal listed three layer names of each side and nothing else: not the models, not the counts."""
    other = json.loads(json.dumps(base).replace("blocks.", "encoder.layer.").replace('"head"', '"classifier"'))
    other["metadata"]["model"] = "other:model"
    res = _cli_compare(tmp_path, str(DATA), other)
    line = res.stderr.strip()
    assert res.exit_code == 2 and "\n" not in line, res.output
    assert "(model: demo:transformer-small vs other:model; 5 layer(s) only in baseline (" in line
    assert ", …), 5 only in current (encoder.layer." in line and ", 0 in common)" in line


def test_results_of_other_strategies_say_so(base: dict, tmp_path: Path) -> None:
    """Used to exit 1 "missing strategies" with 0 GEMMs gated, not naming what current ran."""
    cur = copy.deepcopy(base)
    for table in ("gemm", "operands"):
        cur["tables"][table] = [r for r in cur["tables"][table] if r["strategy"] == "llm-int8"]
    base_path = _write(tmp_path, "fp8.json", _without(base, gemm=lambda r: r["strategy"] == "llm-int8",
                                                      operands=lambda r: r["strategy"] == "llm-int8"))
    for extra in ((), ("--allow-missing",)):
        res = _cli_compare(tmp_path, base_path, cur, *extra)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert ("share no strategy, so no recipe's numbers can be compared (strategy: fp8-mixed,fp8-global vs "
                "llm-int8): run current with the baseline's --strategy fp8-mixed,fp8-global") in lines[0]


def test_nothing_comparable_exits_2(base: dict, tmp_path: Path) -> None:
    empty = copy.deepcopy(base)
    for t in ("gemm", "operands", "outliers", "blocksize_sweep", "threshold_sweep"):
        empty["tables"][t] = []
    res = _cli_compare(tmp_path, _write(tmp_path, "empty_base.json", empty), empty)
    assert res.exit_code == 2 and "nothing would be gated" in res.stderr, res.output


@pytest.mark.parametrize("table, key, value", [("gemm", "sqnr_db", True), ("gemm", "sqnr_db", "12.5"),
                                               ("operands", "underflow_frac", False), ("outliers", "n_outlier_cols", "3")])
def test_non_numeric_metric_exits_2(base: dict, tmp_path: Path, table: str, key: str, value) -> None:
    cur = copy.deepcopy(base)
    cur["tables"][table][0][key] = value
    res = _cli_compare(tmp_path, str(DATA), cur)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and key in lines[0] and "expected a number" in lines[0], res.output


def _with_wgrad(results: dict, base_db: float, cur_db: float, quantized: bool | None) -> tuple[dict, dict]:
    b, c = copy.deepcopy(results), copy.deepcopy(results)
    for doc, db in ((b, base_db), (c, cur_db)):
        for r in doc["tables"]["gemm"]:
            if r["layer"] == DEGRADED and r["strategy"] == "fp8-mixed" and r["gemm"] == "wgrad":
                r["sqnr_db"] = db
            if quantized is not None:
                r["quantized"] = quantized if (r["strategy"], r["gemm"]) == ("fp8-mixed", "wgrad") else True
    return b, c


@pytest.mark.parametrize("quantized", [False, None], ids=["flagged-unquantised", "old-file-noise-floor"])
def test_float32_noise_does_not_fail_the_gate(base: dict, quantized) -> None:
    """mixed leaves wgrad unquantised (~130 dB): 132.2 → 130.7 dB is float32 rounding, not a regression."""
    b, c = _with_wgrad(base, 132.2, 130.7, quantized)
    cmp = compare_results(b, c)
    assert cmp["passed"], cmp["violations"]
    row = next(r for r in cmp["sqnr"] if r["layer"] == DEGRADED and r["recipe"] == "fp8-mixed" and r["what"] == "wgrad")
    assert not row["gated"] and row["delta_db"] == pytest.approx(-1.5)
    text = compare_markdown(cmp)
    counts = cmp["gated"]
    n_mixed_wgrad = sum((r["strategy"], r["gemm"]) == ("fp8-mixed", "wgrad") for r in base["tables"]["gemm"])
    assert (counts["unquantised"], counts["noise_floor"]) == ((n_mixed_wgrad, 0) if quantized is False else (0, 1))
    n_gemms = counts["quantised"] - counts["quantised_tensors"]
    n_weights = sum(r["gated"] and r["what"] not in ("fprop", "dgrad", "wgrad") for r in cmp["sqnr"])
    assert counts["quantised_tensors"] == n_weights > 0 and n_gemms == sum(
        r["gated"] and r["what"] in ("fprop", "dgrad", "wgrad") for r in cmp["sqnr"]) > 0
    assert (f"SQNR gate applied to {n_gemms} quantised GEMM(s) and {n_weights} quantised tensor(s) (weight / "
            "operand SQNR)") in text


def test_quantised_gemm_and_fall_from_noise_floor_are_still_gated(base: dict) -> None:
    b, c = _with_wgrad(base, 132.2, 40.0, None)  # an unquantised GEMM that became lossy: a real regression
    assert not compare_results(b, c)["passed"]
    cur = _degrade(base, drop_db=1.5)
    for doc in (base, cur):
        assert all("quantized" not in r for r in doc["tables"]["gemm"])
    assert not compare_results(base, cur)["passed"]


def test_markdown_naming_an_input_is_refused(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes(DATA.read_bytes())
    before = baseline.read_bytes()
    res = CliRunner().invoke(cli, ["compare", str(baseline), str(DATA), "--out", str(tmp_path / "c"),
                                   "--markdown", str(baseline)])
    assert res.exit_code == 2 and "baseline results file" in res.stderr, res.output
    assert baseline.read_bytes() == before
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(baseline), "--out", str(tmp_path)])
    assert res.exit_code == 0  # --out holding an input under another name is fine
    (tmp_path / "c2").mkdir()
    cur = tmp_path / "c2" / "compare.md"
    cur.write_bytes(DATA.read_bytes())
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(cur), "--out", str(tmp_path / "c2"), "--overwrite"])
    assert res.exit_code == 2 and "current results file" in res.stderr and cur.read_bytes() == DATA.read_bytes()


def test_huge_json_integer_exits_2(base: dict, tmp_path: Path) -> None:
    """A 400-digit integer used to raise OverflowError (exit 3) where it became a float."""
    cur = copy.deepcopy(base)
    cur["tables"]["gemm"][0]["sqnr_db"] = 10**400
    path = _write(tmp_path, "huge.json", cur)
    for args in (["compare", str(DATA), path, "--out", str(tmp_path / "c")], ["report", path, "-o", str(tmp_path / "r.html")]):
        res = CliRunner().invoke(cli, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and "401 digits" in lines[0] and "huge.json" in lines[0], res.output


def test_different_recipe_settings_fail_the_gate(base: dict, tmp_path: Path) -> None:
    """--accum-bits / --int8-row-scale / delayed history change what a strategy name measures: comparing such runs
    fails with the settings named, even when every number is equal; equal settings (or results that predate
    the settings) pass."""
    opts = {"int8_row_scale": "bnb", "accumulation": None,
            "delayed_scaling": {"amax_history": 1024, "amax_compute": "max", "margin": 0, "first_batch": "current amax"}}
    b = copy.deepcopy(base)
    b["metadata"]["recipe_options"] = opts
    c = copy.deepcopy(b)
    assert compare_results(b, c)["passed"]
    assert compare_results(base, c)["passed"]  # a baseline without recorded settings
    c["metadata"]["recipe_options"] = {**opts, "int8_row_scale": "paper",
                                       "accumulation": {"mantissa_bits": 13, "promote_every": 128}}
    out = compare_results(b, c)
    assert not out["passed"]
    v, = [x for x in out["violations"] if x["gate"] == "recipe-settings"]
    assert "int8_row_scale \"bnb\" → \"paper\"" in v["detail"] and "accumulation null → " in v["detail"]
    res = CliRunner().invoke(cli, ["compare", _write(tmp_path, "b.json", b), _write(tmp_path, "c.json", c),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "recipe-settings" in res.output, res.output


@pytest.mark.parametrize(("table", "key"), [("gemm", "sqnr_db"), ("operands", "underflow_frac"),
                                            ("operands", "sqnr_db"), ("outliers", "n_outlier_cols")])
def test_a_current_file_missing_a_metric_is_refused_not_passed(base: dict, tmp_path: Path, table: str,
                                                               key: str) -> None:
    """A metric key deleted from the current file read as "no value": the row was skipped, still counted as
    gated, and the gate passed (a truncated or edited CI artifact was green)."""
    cur = copy.deepcopy(base)
    rows = [r for r in cur["tables"][table] if key in r and (table != "operands" or r.get("operand") == "weight")]
    assert rows
    del rows[0][key]
    with pytest.raises(ValueError, match=f"table '{table}' .* has no {key}; expected a number or null"):
        compare_results(base, cur)
    res = CliRunner().invoke(cli, ["compare", str(DATA), _write(tmp_path, "cur.json", cur), "--out",
                                   str(tmp_path / "c")])
    assert res.exit_code == 2 and f"has no {key}" in res.output


def test_a_different_int8_threshold_is_a_recipe_settings_violation(base: dict) -> None:
    """int8 at --threshold 0.5 against int8 at 6 failed one way round (its wgrad "dropped" 100 dB) and passed
    the other: they are different recipes."""
    cur = copy.deepcopy(base)
    cur["metadata"]["threshold"] = 0.5
    for a, b in ((base, cur), (cur, base)):
        out = compare_results(a, b)
        v, = [x for x in out["violations"] if x["gate"] == "recipe-settings"]
        assert "threshold" in v["detail"] and not out["passed"]
    # without an int8 recipe in both runs the threshold changes no number that is gated
    fp8_only = copy.deepcopy(base)
    fp8_only["metadata"]["strategies"] = ["fp8-mixed", "fp8-global"]
    cur_fp8 = copy.deepcopy(fp8_only)
    cur_fp8["metadata"]["threshold"] = 0.5
    assert not [x for x in compare_results(fp8_only, cur_fp8)["violations"] if x["gate"] == "recipe-settings"]


def test_markdown_into_the_out_directory_is_written_once_and_missing_layers_counted(base: dict, tmp_path: Path) -> None:
    out = tmp_path / "c"
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--out", str(out), "--markdown",
                                   str(out / "compare.md")])
    assert res.exit_code == 0, res.output
    md = (out / "compare.md").read_text()
    assert md.count("PASS") == 1, md  # (it was written, then appended to itself)
    cur = copy.deepcopy(base)
    layer = cur["tables"]["layers"][0]["layer"]
    for name in ("gemm", "operands", "outliers"):
        cur["tables"][name] = [r for r in cur["tables"][name] if r["layer"] != layer]
    text = compare_markdown(compare_results(base, cur, Gates(allow_missing=True)))
    assert f"baseline rows of 1 layer(s) ({layer})" in text


def test_a_layer_whose_weight_changed_shape_is_not_compared_and_fails_unless_allowed(base: dict) -> None:
    """A wider model (or another model sharing layer names) was gated row by row as if it were the same one."""
    cur = copy.deepcopy(base)
    layer = cur["tables"]["layers"][0]
    layer["in_features"] *= 2
    cmp = compare_results(base, cur)
    assert not cmp["passed"]
    assert [v["gate"] for v in cmp["violations"]] == ["layer-shape"]
    assert cmp["violations"][0]["detail"].startswith(f"weight [{layer['out_features']}, {layer['in_features'] // 2}] "
                                                     f"→ [{layer['out_features']}, {layer['in_features']}]")
    assert not any(r["layer"] == layer["layer"] for r in cmp["sqnr"])
    allowed = compare_results(base, cur, Gates(allow_missing=True))
    assert allowed["passed"] and f"Not compared: 1 layer(s) whose weight changed shape ({layer['layer']} [" in \
        gated_text(allowed)
    for r in cur["tables"]["layers"]:
        r["out_features"] += 1
    with pytest.raises(ValueError, match="every layer the runs share has another weight shape"):
        compare_results(base, cur)


def test_an_undefined_current_sqnr_is_said_so_and_a_nan_token_is_refused(base: dict, tmp_path: Path) -> None:
    """It read "28.90 → nan dB (drop inf dB > 1 dB)"; a file with a bare NaN token was accepted."""
    cur = copy.deepcopy(base)
    row = next(r for r in cur["tables"]["gemm"] if r["gemm"] == "fprop")
    row["sqnr_db"], row["note"] = None, "no finite result"
    cmp = compare_results(base, cur)
    detail = next(v["detail"] for v in cmp["violations"] if v["layer"] == row["layer"])
    assert "→ undefined (no finite result" in detail and "inf" not in detail and "nan" not in detail
    text = json.dumps(base).replace('"sqnr_db": ' + json.dumps(base["tables"]["gemm"][0]["sqnr_db"]),
                                    '"sqnr_db": NaN', 1)
    (tmp_path / "nan.json").write_text(text)
    with pytest.raises(ValueError, match="holds a NaN token; fp8probe writes strict JSON"):
        load_results(tmp_path / "nan.json")


def test_an_unwritable_markdown_target_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """compare.html / compare.md were written, then exit 2 without a verdict: a regression read as a usage error."""
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--out", str(tmp_path / "c"), "--markdown",
                                   str(tmp_path / "nowhere" / "sum.md")])
    assert res.exit_code == 2 and "cannot be appended to: there is no directory" in res.output
    assert not (tmp_path / "c").exists()


def test_an_output_path_that_is_not_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    """`report -o` on a FIFO (or, as root, /dev/null) put a regular file in its place, exit 0."""
    import os
    import stat

    fifo = tmp_path / "pipe.html"
    os.mkfifo(fifo)
    res = CliRunner().invoke(cli, ["report", str(DATA), "-o", str(fifo)])
    assert res.exit_code == 2 and "is not a regular file" in res.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_no_change_says_so_instead_of_an_empty_chart(base: dict, tmp_path: Path) -> None:
    """Two runs with the same numbers drew a full-screen chart of every layer's label and no bar (QA)."""
    html = render_compare(compare_results(base, copy.deepcopy(base)), tmp_path / "same.html").read_text("utf-8")
    n = len({r["layer"] for r in compare_results(base, base)["sqnr"] if r["delta_db"] is not None})
    assert f"No change: every one of the {n} layers' SQNRs is within ±0.005 dB" in html
    assert "data:image/png" not in html
    cur = copy.deepcopy(base)
    next(r for r in cur["tables"]["gemm"] if r.get("sqnr_db") is not None)["sqnr_db"] -= 0.5
    html = render_compare(compare_results(base, cur), tmp_path / "moved.html").read_text("utf-8")
    assert "data:image/png" in html and "No change" not in html


def test_gate_limits_read_in_the_singular_at_one_point(base: dict) -> None:
    """The compare summary read "underflow increase ≤ 1 percentage points" with the default gate."""
    md = compare_markdown(compare_results(base, base, Gates(max_loss_increase=0.005)))
    assert ("underflow increase ≤ 1 percentage point, new NaN/Inf outputs ≤ 0, end-to-end |loss change| increase ≤ 0.5 "
            "percentage points.") in md
    md = compare_markdown(compare_results(base, base, Gates(max_underflow_increase=2.5, max_loss_increase=0.01)))
    assert ("underflow increase ≤ 2.5 percentage points, new NaN/Inf outputs ≤ 0, end-to-end |loss change| increase ≤ 1 "
            "percentage point.") in md


def test_the_compare_page_reads_the_underflow_gate_in_the_singular_at_one_point(base: dict, tmp_path: Path) -> None:
    """compare.html read "underflow increase ≤ 1 percentage points" with the default gate (the Markdown was fixed)."""
    html = render_compare(compare_results(base, base), tmp_path / "one.html").read_text("utf-8")
    assert "underflow increase ≤ 1 percentage point; new NaN/Inf outputs ≤ 0</dd>" in html
    html = render_compare(compare_results(base, base, Gates(max_underflow_increase=2.5)),
                          tmp_path / "more.html").read_text("utf-8")
    assert "underflow increase ≤ 2.5 percentage points; new NaN/Inf outputs ≤ 0</dd>" in html


def test_a_baseline_row_of_a_gemm_training_does_not_run_is_not_missing(base: dict) -> None:
    """Results written before fp8probe left out the backward GEMMs training does not run (the input data's dgrad,
    a frozen weight's wgrad) have those rows; current, which says so in its metadata, failed the gate on them as
    "missing". Other missing rows still fail."""
    first = base["tables"]["layers"][0]["layer"]
    last = base["tables"]["layers"][-1]["layer"]
    cur = copy.deepcopy(base)
    cur["tables"]["gemm"] = [r for r in cur["tables"]["gemm"]
                             if not (r["layer"] == first and r["gemm"] == "dgrad")
                             and not (r["layer"] == last and r["gemm"] == "wgrad")]
    assert len(cur["tables"]["gemm"]) < len(base["tables"]["gemm"])
    failed = compare_results(base, cur)
    assert not failed["passed"] and {v["layer"] for v in failed["violations"]} == {first, last}
    cur["metadata"].update({"no_dgrad_layers": [first], "frozen_layers": [last]})
    assert compare_results(base, cur)["passed"]
    cur["metadata"].update({"frozen_layers": [], "no_wgrad_layers": [last]})
    assert compare_results(base, cur)["passed"]
    cur["metadata"]["no_dgrad_layers"] = []
    assert [v["layer"] for v in compare_results(base, cur)["violations"]] == [first]


def _with_nonfinite(results: dict) -> dict:
    out = copy.deepcopy(results)
    for table in ("gemm", "operands"):
        for r in out["tables"][table]:
            r["nonfinite"], r["compared"] = 0, 2048
    return out


def test_new_nan_outputs_fail_the_gate_although_the_sqnr_barely_moves(base: dict, tmp_path: Path) -> None:
    """One +Inf weight turned 480 of an NVFP4 layer's 2048 outputs NaN; the SQNR (over the finite ones) moved 16.34 →
    16.19 dB and compare passed: no gate read `nonfinite`."""
    before = _with_nonfinite(base)
    after = copy.deepcopy(before)
    row = next(r for r in after["tables"]["gemm"] if r["layer"] == DEGRADED and r["gemm"] == "dgrad")
    row["nonfinite"], row["compared"], row["sqnr_db"] = 480, 1568, row["sqnr_db"] - 0.15
    op = next(r for r in after["tables"]["operands"] if r["operand"] == "weight")
    op["nonfinite"] = 3
    cmp = compare_results(before, after)
    assert not cmp["passed"]
    got = {(v["gate"], v["layer"]): v["detail"] for v in cmp["violations"]}
    assert set(got) == {("max-new-nonfinite", DEGRADED), ("max-new-nonfinite", op["layer"])}
    assert got[("max-new-nonfinite", DEGRADED)] == (
        f"{row['strategy']} dgrad: 480 of 2048 low-precision outputs NaN/Inf where the float64 reference is finite "
        "(baseline 0; +480 > 0); the SQNR counts only the finite ones")
    assert got[("max-new-nonfinite", op["layer"])].startswith(f"{op['strategy']} weight operand: 3 of 2051 quantised "
                                                              "values NaN/Inf where the input is finite")
    assert {(r["layer"], r["what"], r["new"]) for r in cmp["nonfinite"]} == {
        (DEGRADED, "dgrad", 480), (op["layer"], "weight operand", 3)}
    assert compare_results(before, after, Gates(max_new_nonfinite=480))["passed"]
    assert compare_results(after, before)["passed"]  # fewer NaN outputs is no regression
    # the command line: the gate, its option and the page's table
    res = CliRunner().invoke(cli, ["compare", _write(tmp_path, "b.json", before), _write(tmp_path, "a.json", after),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "max-new-nonfinite" in res.output, res.output
    html = (tmp_path / "c" / "compare.html").read_text("utf-8")
    assert "NaN/Inf outputs where the reference is finite</h2>" in html and "new NaN/Inf outputs ≤ 0</dd>" in html
    res = CliRunner().invoke(cli, ["compare", _write(tmp_path, "b.json", before), _write(tmp_path, "a.json", after),
                                   "--out", str(tmp_path / "d"), "--max-new-nonfinite", "480"])
    assert res.exit_code == 0, res.output


def test_the_markdown_summary_shows_every_gate_that_failed(base: dict) -> None:
    """compare.md listed the first 20 violations in layer order: 111 underflow violations were all behind "… 253
    more" (QA: a weight going 0 % → 68.75 % underflow never reached the CI job summary)."""
    cur = copy.deepcopy(base)
    for r in cur["tables"]["gemm"]:
        r["sqnr_db"] -= 5.0
    last = cur["tables"]["operands"][-1]
    last["underflow_frac"] += 0.5
    cmp = compare_results(base, cur)
    gates = [v["gate"] for v in cmp["violations"]]
    assert gates.count("max-sqnr-drop") > 20 and gates.count("max-underflow-increase") == 1
    md = compare_markdown(cmp)
    assert (f"Violations per gate: max-sqnr-drop {gates.count('max-sqnr-drop')}, max-underflow-increase 1; the first "
            f"of each gate below (20 of {len(gates)}).") in md
    assert f"| max-underflow-increase | `{last['layer']}` |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| max-")]
    assert len(rows) == 20 and rows[-1].startswith("| max-underflow-increase")
    assert f"| … | | {len(gates) - 20} more |" in md


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_markdown_path_that_cannot_be_created_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """os.access said /proc was writable (root): compare wrote compare.html / compare.md, then failed on the append
    with exit 2, so the gate's verdict was lost (QA)."""
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--out", str(tmp_path / "c"),
                                   "--markdown", "/proc/fp8probe-summary.md"])
    assert res.exit_code == 2 and "--markdown /proc/fp8probe-summary.md cannot be appended to" in res.output
    assert not (tmp_path / "c").exists()
    fresh = tmp_path / "summary.md"  # a file the probe creates is taken back until the summary is appended
    res = CliRunner().invoke(cli, ["compare", str(DATA), str(DATA), "--out", str(tmp_path / "d"),
                                   "--markdown", str(fresh)])
    assert res.exit_code == 0 and "PASS" in fresh.read_text("utf-8")


def test_duplicate_rows_and_negative_counts_are_refused(base: dict) -> None:
    """A regressed row followed by a good one for the same layer × recipe × GEMM passed: the later row silently won
    (QA). A negative outlier count passed too."""
    cur = copy.deepcopy(base)
    row = cur["tables"]["gemm"][0]
    cur["tables"]["gemm"].insert(0, dict(row, sqnr_db=row["sqnr_db"] - 20))
    with pytest.raises(ValueError, match=f"current: table 'gemm' has two rows for {row['layer']} {row['strategy']} "
                                         f"{row['gemm']}; expected one"):
        compare_results(base, cur)
    cur = copy.deepcopy(base)
    cur["tables"]["outliers"][0]["n_outlier_cols"] = -3
    with pytest.raises(ValueError, match="n_outlier_cols = -3 .* expected a count >= 0"):
        compare_results(base, cur)


def test_missing_sweep_points_name_the_options_that_run_them(base: dict) -> None:
    """Sweep points missing from current were to be run with --strategy, which cannot run them (QA)."""
    cur = copy.deepcopy(base)
    cur["tables"]["blocksize_sweep"] = []
    cur["tables"]["threshold_sweep"] = []
    (gone,) = [v for v in compare_results(base, cur)["violations"] if v["layer"] == "(strategies)"]
    assert gone["detail"].endswith("run them (analyze --sweeps or sweep-blocksize --blocksizes; analyze --sweeps or "
                                   "sweep-threshold --thresholds) or pass --allow-missing")
    assert "--strategy" not in gone["detail"]
