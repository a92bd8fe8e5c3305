"""NaN/±Inf, all-zero, subnormal, huge (beyond fp16) values and empty batches: counted, shown, never a silent NaN metric."""
from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fp8probe.analysis.metrics import ErrorAccumulator, OperandAccumulator, TensorStats
from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.results import Results
from fp8probe.analysis.strategies import STRATEGIES
from fp8probe.cli import cli
from fp8probe.report.render import build_report_view, render_report
from fp8probe.report.schema import (NOTE_EXACT, NOTE_LP_NONFINITE, NOTE_NO_ELEMENTS, NOTE_NO_FINITE_REFERENCE,
                                    NOTE_ZERO_SIGNAL, NOTES, metric_value)

IN, HID, OUT, TOKENS = 64, 48, 32, 16
FP16_MAX = 65504.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(IN, HID), nn.Linear(HID, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _model(seed: int = 0) -> TwoLayer:
    torch.manual_seed(seed)
    return TwoLayer()


def _strict_json(results: Results) -> dict:
    """The results document through strict JSON: a bare NaN/Infinity token would raise here."""
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(json.dumps(results.to_json(), allow_nan=False), parse_constant=refuse)


def _assert_no_silent_nan(doc: dict) -> None:
    """Every gemm/operand SQNR is a finite number, or null with a note saying why (never a bare NaN)."""
    for table in ("gemm", "operands"):
        for row in doc["tables"][table]:
            if row["sqnr_db"] is None:
                assert row["note"] in NOTES, row
            else:
                assert math.isfinite(row["sqnr_db"]), row


# ------------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------------
def test_tensor_stats_count_every_kind_of_special_value() -> None:
    x = torch.randn(6, 40, generator=_gen(1))
    x[0, :3] = float("nan")
    x[1, 0], x[1, 1] = float("inf"), -float("inf")
    x[1, 2] = -float("inf")
    x[2, :4] = 0.0
    x[3, :5] = torch.tensor([1e-40, -3e-39, 1e-45, 2e-38, 1.2e-38])  # 3 fp32 subnormals (< 2**-126 ≈ 1.1755e-38)
    x[4, :3] = torch.tensor([500.0, -6e4, 7e4])  # > e4m3 448; −6e4 and 7e4 > e5m2 57344; 7e4 > fp16 65504
    x[5, :2] = torch.tensor([1e6, -1e30])
    s1, s2 = TensorStats(), TensorStats()
    s1.update(x[:3])
    s2.update(x[3:])
    r = s1.merge(s2).result()
    assert (r["nan_count"], r["pos_inf_count"], r["neg_inf_count"], r["inf_count"]) == (3, 1, 2, 3)
    assert r["zero_count"] == 4 and r["subnormal_count"] == 3  # 2e-38 and 1.2e-38 are normal float32
    finite = x[torch.isfinite(x)].abs()
    assert r["over_fp16_max"] == int((finite > FP16_MAX).sum()) == 3
    assert r["over_e4m3_max"] == int((finite > 448).sum()) == 5
    assert r["over_e5m2_max"] == int((finite > 57344).sum()) == 4
    assert r["amax"] == pytest.approx(1e30, rel=1e-6) and math.isfinite(r["std"])


def test_subnormals_are_counted_in_the_tensors_own_dtype() -> None:
    x = torch.randn(4, 16, generator=_gen(2)).to(torch.float16)
    x[0, :3] = torch.tensor([1e-5, -3e-6, 6e-8], dtype=torch.float16)  # fp16 subnormals: below 2**-14 ≈ 6.1e-5
    s = TensorStats()
    s.update(x)
    expected = int(((x.float().abs() > 0) & (x.float().abs() < 2.0**-14)).sum())
    assert s.result()["subnormal_count"] == expected >= 3


# ------------------------------------------------------------------------------------------------
# Degenerate metrics are decided, not NaN
# ------------------------------------------------------------------------------------------------
def test_error_metric_edge_cases_carry_a_note() -> None:
    z = torch.zeros(3, 5)
    exact = ErrorAccumulator()
    exact.update(z, z)  # all-zero layer reproduced exactly: 0/0 decided as "no loss"
    r = exact.result()
    assert (r["sqnr_db"], r["rel_err"], r["note"], r["compared"]) == (math.inf, 0.0, NOTE_EXACT, 15)
    zero_sig = ErrorAccumulator()
    zero_sig.update(z, torch.randn(3, 5, generator=_gen(3)))
    r = zero_sig.result()
    assert (r["sqnr_db"], r["rel_err"], r["note"]) == (-math.inf, math.inf, NOTE_ZERO_SIGNAL)
    empty = ErrorAccumulator()
    empty.update(torch.zeros(0, 5), torch.zeros(0, 5))
    r = empty.result()
    assert math.isnan(r["sqnr_db"]) and r["note"] == NOTE_NO_ELEMENTS and r["compared"] == 0
    ref = torch.randn(4, 4, generator=_gen(4))
    all_nan = ErrorAccumulator()
    all_nan.update(torch.full((4, 4), float("nan")), ref)
    assert all_nan.result()["note"] == NOTE_NO_FINITE_REFERENCE and all_nan.result()["excluded"] == 16
    overflow = ErrorAccumulator()
    overflow.update(ref, torch.full((4, 4), float("inf")))
    assert overflow.result()["note"] == NOTE_LP_NONFINITE and overflow.result()["nonfinite"] == 16


def test_partial_specials_are_excluded_and_counted() -> None:
    ref = torch.randn(8, 8, generator=_gen(5))
    lp = ref + 0.01 * torch.randn(8, 8, generator=_gen(6))
    ref[0, :2] = float("nan")
    ref[1, 0] = float("inf")
    lp[2, 3] = float("inf")  # recipe overflow where the reference is finite
    e = ErrorAccumulator()
    e.update(ref, lp)
    r = e.result()
    ok = torch.isfinite(ref) & torch.isfinite(lp)
    r64, l64 = ref[ok].double(), lp[ok].double()
    expected = 10 * math.log10(float((r64**2).sum()) / float(((r64 - l64) ** 2).sum()))
    assert r["sqnr_db"] == pytest.approx(expected, rel=1e-12) and r["note"] is None
    assert (r["compared"], r["excluded"], r["nonfinite"]) == (60, 3, 1)
    o = OperandAccumulator()
    o.update(ref, lp)
    ro = o.result()
    assert (ro["excluded"], ro["nonfinite"]) == (3, 1) and ro["sqnr_db"] == pytest.approx(expected, rel=1e-12)
    z = OperandAccumulator()
    z.update(torch.zeros(4, 4), torch.zeros(4, 4))
    assert z.result()["sqnr_db"] == math.inf and z.result()["note"] == NOTE_EXACT


def test_json_null_metrics_decode_by_note() -> None:
    assert metric_value({"sqnr_db": None, "note": NOTE_EXACT}) == math.inf
    assert metric_value({"sqnr_db": None, "note": NOTE_ZERO_SIGNAL}) == -math.inf
    assert math.isnan(metric_value({"sqnr_db": None, "note": NOTE_NO_ELEMENTS}))
    assert math.isnan(metric_value({"sqnr_db": None}))  # old results without a note: undefined, not "fine"
    assert metric_value({"sqnr_db": 31.5, "note": None}) == 31.5
    assert metric_value({}) is None


# ------------------------------------------------------------------------------------------------
# analyze + report, every strategy
# ------------------------------------------------------------------------------------------------
def _special_batch() -> torch.Tensor:
    x = torch.randn(TOKENS, IN, generator=_gen(7))
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[1, 6] = -float("inf")
    x[2] = 1e-40                      # a row of fp32 subnormals
    x[3, :4] = torch.tensor([1e6, -1e6, 1e30, -1e30])  # beyond fp16 (and far beyond FP8)
    return x


def test_analyze_counts_specials_for_every_strategy_and_the_report_shows_them(tmp_path) -> None:
    res = analyze(_model(), _special_batch(), "all")
    assert "errors" not in res.tables  # no recipe failed on any layer
    assert set(res.tables["gemm"]["strategy"]) == set(STRATEGIES)
    t = res.tables["tensors"].set_index(["layer", "tensor"])
    act = t.loc[("a", "activation")]
    assert (act["nan_count"], act["pos_inf_count"], act["neg_inf_count"]) == (1, 1, 1)
    assert act["subnormal_count"] == IN and act["over_fp16_max"] == 4 and act["over_e4m3_max"] == 4
    # NaN/Inf rows propagate: layer b's input holds them too, and every gradient row of those tokens is NaN.
    assert t.loc[("b", "activation"), "nan_count"] > 0 and t.loc[("a", "grad_output"), "nan_count"] > 0
    doc = _strict_json(res)
    _assert_no_silent_nan(doc)
    gemm = {(r["layer"], r["strategy"], r["gemm"]): r for r in doc["tables"]["gemm"]}
    for s in STRATEGIES:
        fprop = gemm[("a", s, "fprop")]
        # Tokens 0 and 1 (NaN/Inf) are left out of the sums and counted; the rest gives a finite SQNR.
        assert fprop["excluded"] == 2 * HID and fprop["compared"] == (TOKENS - 2) * HID, s
        assert math.isfinite(fprop["sqnr_db"]), s
        # wgrad sums over every token, so every reference element meets a NaN: undefined, with the reason.
        assert gemm[("a", s, "wgrad")]["sqnr_db"] is None, s
        assert gemm[("a", s, "wgrad")]["note"] == NOTE_NO_FINITE_REFERENCE, s

    html = render_report(doc, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    assert 'id="naninf-warning"' in html and "Warning:" in html
    assert 'id="special"' in html and "<code>a</code>" in html
    view = build_report_view(doc, draw=False)
    special = {(r[0]["text"], r[1]["text"]): [c["text"] for c in r] for r in view["special"]["table"]["rows"]}
    cols = view["special"]["table"]["columns"]
    row = dict(zip(cols, special[("a", "activation")]))
    assert (row["NaN"], row["+Inf"], row["−Inf"], row["subnormal"], row["> fp16 max"]) == ("1", "1", "1", "64", "4")
    undefined = [r for r in view["special"]["notes"]["rows"] if r[6]["text"] == "undefined"]
    assert {r[1]["text"] for r in undefined} == set(STRATEGIES)
    # The summary lists the undefined SQNRs with their reason instead of hiding or mis-sorting them.
    keep = {k["strategy"]: k for k in view["summary"]["keep"]}
    assert all(k["n_measured"] == 2 for k in keep.values())


@pytest.mark.parametrize("case", ["zeros", "huge", "empty"])
def test_zero_huge_and_empty_inputs_complete_with_decided_metrics(case: str, tmp_path) -> None:
    model = _model(1)
    x = torch.randn(TOKENS, IN, generator=_gen(8))
    if case == "zeros":
        x = torch.zeros(TOKENS, IN)
    elif case == "huge":
        x = x * 1e30  # activations far beyond fp16; the weights and output gradient get huge values too
        with torch.no_grad():
            model.b.weight[0, :3] = torch.tensor([1e6, -1e6, 7e4])
    else:
        x = torch.randn(0, IN)  # a batch of 0 tokens
    res = analyze(model, x, "all")
    assert "errors" not in res.tables
    doc = _strict_json(res)
    _assert_no_silent_nan(doc)
    gemm = {(r["layer"], r["strategy"], r["gemm"]): r for r in doc["tables"]["gemm"]}
    tensors = {(r["layer"], r["tensor"]): r for r in doc["tables"]["tensors"]}
    if case == "zeros":
        assert tensors[("a", "activation")]["zero_count"] == TOKENS * IN
        for s in STRATEGIES:  # an all-zero activation is reproduced exactly by every recipe: +inf, not NaN
            assert gemm[("a", s, "fprop")]["note"] == NOTE_EXACT and gemm[("a", s, "fprop")]["rel_err"] == 0.0
    elif case == "huge":
        assert tensors[("a", "activation")]["over_fp16_max"] == TOKENS * IN
        assert tensors[("b", "weight")]["over_fp16_max"] == 3 and tensors[("b", "weight")]["over_e4m3_max"] == 3
        # The model's own float32 backward overflows: dA of layer a = G·W with |G| ~ 1e34 and W holding 1e6
        # gives ~1e40 > 3.4e38. Counted as Inf (and warned about), not hidden.
        assert tensors[("b", "grad_output")]["over_fp16_max"] > 0 and tensors[("a", "grad_output")]["inf_count"] > 0
        for s in STRATEGIES:  # scaled recipes handle any magnitude: the forward GEMM stays measurable
            assert gemm[("a", s, "fprop")]["sqnr_db"] > 10, s
    else:
        assert doc["tables"]["layers"][0]["tokens"] == 0 and tensors[("a", "activation")]["numel"] == 0
        for s in STRATEGIES:
            assert gemm[("a", s, "fprop")]["note"] == NOTE_NO_ELEMENTS, s
            # dW = Gᵀ·A over 0 tokens is exactly the zero matrix, and every recipe returns it.
            assert gemm[("a", s, "wgrad")]["note"] == NOTE_EXACT, s
    view = build_report_view(doc, draw=False)
    assert view["special"]["table"]["rows"]  # the all-zero / huge / empty tensors are listed
    html = render_report(doc, tmp_path / "r.html", draw=False).read_text(encoding="utf-8")
    if case == "huge":
        assert 'id="naninf-warning"' in html
    else:
        assert "naninf-warning" not in html and "No NaN or Inf" in html


def test_cli_analyze_all_strategies_on_special_batches(tmp_path) -> None:
    factory = tmp_path / "special_factory.py"
    factory.write_text(textwrap.dedent(f"""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear({IN}, {HID}), nn.ReLU(), nn.Linear({HID}, {OUT}))
            g = torch.Generator().manual_seed(9)
            x = torch.randn({TOKENS}, {IN}, generator=g)
            x[0, 1] = float("nan")
            x[2, 2] = float("inf")
            return model, [x, torch.zeros({TOKENS}, {IN}), torch.randn({TOKENS}, {IN}, generator=g) * 1e30,
                           torch.randn(0, {IN})]
    """), encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["analyze", f"{factory}:build", "--strategy", "all", "--out", str(out),
                                      "--quiet", "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"), parse_constant=refuse)
    _assert_no_silent_nan(doc)
    tensors = {(r["layer"], r["tensor"]): r for r in doc["tables"]["tensors"]}
    assert tensors[("0", "activation")]["nan_count"] == 1 and tensors[("0", "activation")]["inf_count"] == 1
    assert tensors[("0", "activation")]["over_fp16_max"] > 0 and tensors[("0", "activation")]["zero_count"] >= TOKENS * IN
    html = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="naninf-warning"' in html and "Special values per layer and tensor" in html


def test_compare_gate_fails_on_an_sqnr_that_became_undefined_and_passes_exact_to_exact() -> None:
    """A null SQNR is decoded by its note: undefined where the baseline had a number fails the gate
    (it used to be skipped: a silent pass); exact → exact is no change."""
    from fp8probe.report.compare import compare_results

    base = _strict_json(analyze(_model(), torch.randn(TOKENS, IN, generator=_gen(10)), "global"))
    broken = _strict_json(analyze(_model(), _special_batch(), "global"))
    verdict = compare_results(base, broken)
    failed = {(r["layer"], r["what"]) for r in verdict["sqnr"] if r["failed"]}
    assert ("a", "wgrad") in failed and not verdict["passed"]  # wgrad: no finite reference any more
    zeros = _strict_json(analyze(_model(), torch.zeros(TOKENS, IN), "global"))
    same = compare_results(zeros, zeros)
    exact = [r for r in same["sqnr"] if r["layer"] == "a" and r["what"] == "fprop"]
    assert exact[0]["baseline"] == math.inf and exact[0]["delta_db"] == 0.0 and same["passed"]


@pytest.mark.parametrize("case", ["specials", "empty"])
def test_sweeps_complete_and_every_null_sqnr_has_a_reason(case: str) -> None:
    from fp8probe.analysis.sweeps import sweep_blocksize, sweep_threshold

    x = _special_batch() if case == "specials" else torch.randn(0, IN)
    for sweep, key in ((sweep_blocksize, "sqnr_db"), (sweep_threshold, "fprop_sqnr_db")):
        doc = _strict_json(sweep(_model(), x))
        rows = next(t for name, t in doc["tables"].items() if name.endswith("_sweep"))
        assert rows
        for row in rows:
            assert (row[key] is not None and math.isfinite(row[key])) or row["note"] in NOTES, row
        if case == "empty":
            assert any(row["note"] == NOTE_NO_ELEMENTS for row in rows)
