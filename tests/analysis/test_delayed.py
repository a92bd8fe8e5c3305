"""Delayed scaling: scales from earlier batches' amax (hand-computed with torch's native float8 casts), first batch, overflow counts, state per pass in analyze / e2e / training."""
from __future__ import annotations

import json

import pytest
import torch

from fp8probe.analysis.delayed import DELAYED_COLUMNS, DelayedScaling, DelayedState
from fp8probe.analysis.e2e import Plan, Runner, lp_gemm, new_state
from fp8probe.analysis.loading import Batch
from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.strategies import STRATEGIES, RecipeOptions, run_strategy, with_options
from support import DEVICES

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _hand_cast(x: torch.Tensor, amax: float, fmax: float, dtype: torch.dtype, margin: int = 0) -> torch.Tensor:
    """Independent computation: scale = fl32(amax/fmax)·2^margin, torch's native saturating float8 cast."""
    scale = torch.tensor(amax, dtype=torch.float32) / torch.tensor(fmax, dtype=torch.float32) * 2.0 ** margin
    y = (x.float() / scale).clamp(-fmax, fmax)
    return y.to(dtype).float() * scale


def _strategy(**rule) -> object:
    s, = with_options([STRATEGIES["delayed"]], RecipeOptions(delayed=DelayedScaling(**rule)))
    return s


@pytest.mark.parametrize("device", DEVICES)
def test_first_batch_is_the_tensorwise_cast_bit_for_bit(device) -> None:
    g = torch.Generator().manual_seed(0)
    A, W, G = (torch.randn(*s, generator=g).to(device) for s in ((8, 48), (6, 48), (8, 6)))
    delayed = run_strategy(STRATEGIES["delayed"], A, W, G, state=STRATEGIES["delayed"].new_state(), site="fc")
    tensorwise = run_strategy(STRATEGIES["ocp-tensorwise"], A, W, G)
    for k in ("fprop", "dgrad", "wgrad"):
        assert torch.equal(delayed.gemms[k], tensorwise.gemms[k]), k
    for k in ("activation", "weight", "grad_output"):
        assert torch.equal(delayed.operands[k][1], tensorwise.operands[k][1]), k


@pytest.mark.parametrize("device", DEVICES)
def test_later_batches_use_the_history_and_count_overflow(device) -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 32, generator=g).to(device)
    x, G = torch.randn(8, 32, generator=g).to(device), torch.randn(8, 6, generator=g).to(device)
    xs = [x * m for m in (1.0, 3.0, 0.5)]
    Gs = [G * m for m in (1.0, 0.25, 4.0)]
    s = STRATEGIES["delayed"]
    state = s.new_state()
    outs = [run_strategy(s, x, W, G, state=state, site="fc") for x, G in zip(xs, Gs)]
    amax = [float(x.abs().max()) for x in xs]
    gmax = [float(G.abs().max()) for G in Gs]
    # batch t uses max over batches < t (history 1024, "max"); the first batch its own amax
    want_a = [amax[0], amax[0], max(amax[0], amax[1])]
    want_g = [gmax[0], gmax[0], max(gmax[0], gmax[1])]
    for t in range(3):
        assert torch.equal(outs[t].operands["activation"][1], _hand_cast(xs[t], want_a[t], E4M3_MAX, torch.float8_e4m3fn))
        assert torch.equal(outs[t].operands["grad_output"][1], _hand_cast(Gs[t], want_g[t], E5M2_MAX, torch.float8_e5m2))
    sat = outs[1].operands["activation"][2]
    assert int(sat.sum()) == int((xs[1].abs() > E4M3_MAX * torch.tensor(amax[0]) / E4M3_MAX).sum()) > 0
    rows = {r["operand"]: r for r in state.rows("delayed")}
    assert set(rows) == {"activation", "weight", "grad_output"}
    a, gr, w = rows["activation"], rows["grad_output"], rows["weight"]
    assert (a["batches"], a["warmup_batches"], a["overflow_batches"]) == (3, 1, 1)  # only batch 2 (3x) overflows
    assert a["saturated"] == int(sat.sum()) and a["elements"] == 3 * 8 * 32
    assert a["max_amax_ratio"] == pytest.approx(amax[1] / amax[0], rel=1e-6)
    assert (gr["overflow_batches"], w["overflow_batches"], w["saturated"]) == (1, 0, 0)  # G: batch 3 (4x) overflows


@pytest.mark.parametrize("backend", ["c", "reference"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_saturated_counts_clipped_elements_only(backend, fmt, monkeypatch) -> None:
    """"saturated" counts the elements the cast clipped: |x| above the amax the scale was made for. An amax of
    1.828125 has fl32(amax / fmt_max) · fmt_max one float32 ulp below it: the amax element dequantises to
    1.8281249 at the format's max code, but it is not clipped (QA: a one-batch run reported 38 operands "saturated
    under the delayed scale", every one on an own-amax cast)."""
    if backend == "reference":
        monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    amax = 1.828125
    x = torch.tensor([amax, -0.5, 0.25, 1.0])
    st = DelayedState(DelayedScaling())
    q, sat = st.quantize("fc", "activation", x, fmt)  # own amax
    assert float(q[0]) < amax and bool(sat[0])  # the rounding the mask sees (every cast's metrics count it so)
    q, _ = st.quantize("fc", "activation", x, fmt)  # delayed, the same amax: no overflow
    assert float(q[0]) < amax
    y = torch.tensor([amax * 2, -amax * 1.5, amax * 1.0001, -amax, 0.1])
    st.quantize("fc", "activation", y, fmt)  # delayed, overflows: the three values above amax are clipped
    row, = st.rows("delayed")
    assert (row["batches"], row["warmup_batches"], row["overflow_batches"]) == (3, 1, 1)
    assert row["saturated"] == 3


def test_most_recent_history_length_and_margin() -> None:
    # the last element lands among E4M3 subnormals once the margin shifts the scale up by 2^3
    x1, x2, x3 = (torch.full((2, 5), v) * torch.tensor([1.0, -0.5, 0.25, 0.1, 1.1e-4]) for v in (8.0, 2.0, 1.0))
    for rule, want in (({"compute": "most_recent"}, 2.0), ({"history": 1}, 2.0), ({"compute": "max"}, 8.0)):
        st = DelayedState(DelayedScaling(**rule))
        for x in (x1, x2):
            st.quantize("fc", "activation", x, "e4m3")
        q, _ = st.quantize("fc", "activation", x3, "e4m3")
        assert torch.equal(q, _hand_cast(x3, want, E4M3_MAX, torch.float8_e4m3fn)), rule
    st = DelayedState(DelayedScaling(margin=3))
    st.quantize("fc", "activation", x1, "e4m3")
    q, _ = st.quantize("fc", "activation", x1, "e4m3")
    assert torch.equal(q, _hand_cast(x1, 8.0, E4M3_MAX, torch.float8_e4m3fn, margin=3))
    assert not torch.equal(q, _hand_cast(x1, 8.0, E4M3_MAX, torch.float8_e4m3fn))
    # sites and operands keep separate histories; an all-zero history gives scale 1
    st = DelayedState(DelayedScaling())
    st.quantize("a", "activation", torch.zeros(3), "e4m3")
    q, _ = st.quantize("a", "activation", torch.tensor([0.5, 3.0, 500.0]), "e4m3")
    assert q.tolist() == [0.5, 3.0, 448.0]
    q, _ = st.quantize("b", "activation", torch.tensor([0.5, 3.0, 500.0]), "e4m3")
    assert q.tolist() == _hand_cast(torch.tensor([0.5, 3.0, 500.0]), 500.0, E4M3_MAX, torch.float8_e4m3fn).tolist()


@pytest.mark.parametrize("kw,match", [({"history": 0}, "amax history"), ({"history": 2.5}, "amax history"),
                                      ({"compute": "mean"}, "amax compute"), ({"margin": -1}, "margin"),
                                      ({"margin": True}, "margin")])
def test_bad_rules_raise(kw, match) -> None:
    with pytest.raises(ValueError, match=f"expected {match}"):
        DelayedScaling(**kw)


def test_rule_text_names_the_settings() -> None:
    s = _strategy(history=16, compute="most_recent", margin=2)
    assert "amax history 16" in s.rules and "most recent" in s.rules and "margin 2" in s.rules
    assert "own amax" in s.rules  # the first-batch rule is stated


def test_in_model_backward_records_gradient_history() -> None:
    s = STRATEGIES["delayed"]
    state = s.new_state()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    W = torch.randn(3, 8, generator=g, requires_grad=True)
    y = lp_gemm(s, x, W, 6.0, state=state, site="fc")
    y.backward(torch.randn(4, 3, generator=g))
    assert {k[1] for k in state.history} == {"activation", "weight", "grad_output"}
    assert {k[0] for k in state.history} == {("fc", None)}
    ref = run_strategy(s, x.detach(), W.detach(), None)
    assert torch.equal(y.detach(), ref.gemms["fprop"])


def test_analyze_e2e_and_training_with_delayed(tiny_model, tiny_batches) -> None:
    batches = tiny_batches + tiny_batches[:1]  # 3 batches
    opts = RecipeOptions(delayed=DelayedScaling(history=2))
    res = analyze(tiny_model, batches, "delayed,ocp-tensorwise", gemms="linear", steps=2, options=opts)
    t = res.tables["delayed_scaling"]
    assert list(t.columns) == DELAYED_COLUMNS
    assert set(t["layer"]) == set(res.tables["layers"]["layer"])
    assert (t["batches"] == 3).all() and (t["warmup_batches"] == 1).all()
    assert set(t["operand"]) == {"activation", "weight", "grad_output"}
    assert (t.loc[t["operand"] == "weight", "overflow_batches"] == 0).all()
    assert res.metadata["recipe_options"]["delayed_scaling"] == {"amax_history": 2, "amax_compute": "max",
                                                                   "margin": 0, "first_batch": "current amax"}
    assert "amax history 2" in res.metadata["rules"]["delayed"]
    assert "delayed" in set(res.tables["e2e"]["strategy"]) and "delayed" in set(res.tables["training"]["strategy"])
    g = res.tables["gemm"]
    fprop = g[(g["gemm"] == "fprop")].pivot(index="layer", columns="strategy", values="sqnr_db")
    assert (fprop["delayed"] > 15).all()


def test_each_e2e_pass_starts_from_an_empty_history(tiny_model, tiny_batches) -> None:
    runner = Runner(tiny_model, [Batch(b, {}) if not isinstance(b, Batch) else b for b in tiny_batches],
                    device=torch.device("cpu"), layers=None, loss_fn=None, loss_name=None, threshold=6.0, seed=0)
    runner.reference([])
    s = STRATEGIES["delayed"]
    first, second = runner.evaluate(Plan(s)), runner.evaluate(Plan(s))
    assert first.loss_lp == second.loss_lp and first.output_sqnr_db == second.output_sqnr_db
    assert new_state(s) is not new_state(s) and new_state(STRATEGIES["global"]) is None


def test_refused_under_torchrun(tiny_model, tiny_batches, monkeypatch) -> None:
    """Ranks see every N-th batch, so a history across batches cannot equal one process: a clear error."""
    from fp8probe.analysis import distributed

    monkeypatch.setattr(distributed, "current", lambda: distributed.World(0, 2))
    with pytest.raises(ValueError, match="delayed carries scaling state .* got 2 ranks"):
        analyze(tiny_model, tiny_batches, "int8,delayed", gemms="linear", e2e=False)


def _delayed_sequence(dtype: torch.dtype, rule: DelayedScaling, xs: list[torch.Tensor], fmt: str
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], DelayedState]:
    state = DelayedState(rule)
    return [state.quantize(("fc", 0), "activation", x.to(dtype), fmt) for x in xs], state


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", [DelayedScaling(), DelayedScaling(history=2, compute="most_recent", margin=3)],
                         ids=["max", "recent-margin3"])
def test_c_cast_is_the_torch_ops_bit_for_bit(fmt, dtype, rule, monkeypatch) -> None:
    """On CPU the delayed cast runs in one C call (backends.cpu.fused_scaled with the delayed scale given, or at
    warm-up the amax's times 2^margin); q, the saturation mask, the history and every count equal the torch ops'
    (FP8PROBE_BACKEND=reference) through warm-up, growing (overflowing) and shrinking amax, zeros, ±Inf, a
    3-D batch, a transposed view and an all-zero batch (scale 1)."""
    from fp8probe.backends import cpu
    if not cpu.enabled():
        pytest.skip("the C extension is not built")
    g = torch.Generator().manual_seed(7)
    base = torch.randn(48, 40, generator=g) * 2.0
    special = base * 9.0
    special[3, 5], special[10, 0] = float("inf"), float("-inf")
    special[0, :7] = 0.0
    small = base * 1e-3
    small[1, 1] = 1e-30  # underflows at this scale
    xs = [base, base * 30.0, special, small, base.reshape(6, 8, 40) * 4.0, (base * 3.0).t(), torch.zeros(48, 40),
          base * 100.0]
    got, st_c = _delayed_sequence(dtype, rule, xs, fmt)
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert cpu.fused_scaled(base, fmt, 48, 40) is None  # the torch ops below
    want, st_t = _delayed_sequence(dtype, rule, xs, fmt)
    for t, ((q, sat), (q_want, sat_want)) in enumerate(zip(got, want)):
        assert q.dtype == torch.float32 and q.shape == q_want.shape, t
        assert torch.equal(q.view(torch.int32), q_want.view(torch.int32)), t
        assert torch.equal(sat, sat_want), t
    assert st_c.history == st_t.history
    assert st_c.rows("delayed") == st_t.rows("delayed")
    counts = st_c.rows("delayed")[0]
    assert counts["overflow_batches"] > 0 and counts["saturated"] > 0  # the sequence exercises both


def test_c_cast_takes_a_given_scale_or_multiplier_only_for_fp8_per_tensor() -> None:
    from fp8probe.backends import cpu
    if not cpu.enabled():
        pytest.skip("the C extension is not built")
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="expected format e4m3 or e5m2 with a given scale"):
        cpu.fused_scaled(x, "mxfp8-e4m3", 1, 32, scale=0.5)
    for bad in (0.0, -1.0, float("inf"), 0.1, 1e-46):  # (0.1 and 1e-46 are no float32 values: not sent rounded)
        with pytest.raises(ValueError, match="expected a given scale that is a float32 value > 0 and finite"):
            cpu.fused_scaled(x, "e4m3", 8, 32, scale=bad)
    with pytest.raises(ValueError, match="expected a scale multiplier that is a float32 value > 0"):
        cpu.fused_scaled(x, "e4m3", 8, 32, scale_multiplier=float("inf"))
    # a given scale s: the elements are x / s rounded, whatever x's own amax
    got = cpu.fused_scaled(x, "e4m3", 8, 32, scale=0.25)
    want = (x / 0.25).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * 0.25
    assert torch.equal(got.q, want) and float(got.scale) == 0.25
    assert got.amax == float(x.abs().max())


def test_scale_is_float32_arithmetic() -> None:
    """scale_for's scale is fl32(fl32(amax_h / fmt_max) · 2^margin), as float32 tensors compute it, for amaxes
    from subnormal to the float32 max (overflow to inf included) and margins 0..64."""
    g = torch.Generator().manual_seed(11)
    amaxes = torch.cat([torch.tensor([0.0, 1e-45, 3e-39, 1.0, 448.0, 57344.0, 3.4028234663852886e38]),
                        torch.exp(torch.randn(2000, generator=g, dtype=torch.float64) * 20).float()])
    for fmt, fmax in (("e4m3", E4M3_MAX), ("e5m2", E5M2_MAX)):
        for margin in (0, 1, 7, 64):
            state = DelayedState(DelayedScaling(margin=margin))
            want = amaxes / torch.tensor(fmax) * torch.tensor(2.0 ** margin, dtype=torch.float32)
            for a, w in zip(amaxes.tolist(), want.tolist()):
                state.history[("fc", "x")] = [a]
                scale, limit, warmup = state.scale_for("fc", "x", 0.0, fmt)
                assert not warmup
                assert (scale, limit) == ((w, a * 2.0 ** margin) if w > 0 else (1.0, fmax)), (a, margin)


def test_report_counts_casts_and_shows_a_tiny_saturated_share() -> None:
    """The report's delayed-scaling table called its counts "batches" (128 for an attention GEMM of a 4-batch run:
    one cast per batch and head slice) and showed "0.0%" beside 5 saturated elements (QA of the HTML report)."""
    from fp8probe.report.render import _delayed_section
    rows = [{"layer": "l", "strategy": "delayed", "operand": "activation", "batches": 8, "warmup_batches": 2,
             "overflow_batches": 1, "saturated": 5, "elements": 400_000, "max_amax_ratio": 1.3}]
    table = _delayed_section({"delayed_scaling": rows})["table"]
    text = json.dumps(table)
    assert "casts" in text and "batches" not in text
    assert "0.0013 %" in text
