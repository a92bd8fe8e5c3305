"""Metrics vs hand-computed values on tiny cases; accumulator merge == single pass; NaN/Inf counted, never fatal."""
from __future__ import annotations

import math

import pytest
import torch

from fp8probe.analysis.metrics import (BLOCK, LOG2_HI, LOG2_LO, RAW_LIMITS, ErrorAccumulator, OperandAccumulator,
                                       OutlierCensus, TensorStats, log2_histogram, sqnr_db)
from fp8probe.backends import cpu


@pytest.fixture(autouse=True, params=["c", "torch"])
def metrics_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on the C reductions (backends/cpu.py) and on the torch path (FP8PROBE_BACKEND=reference)."""
    if request.param == "c":
        if not cpu.available():
            pytest.skip("fp8probe._fastpath not built")
        monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    return request.param


def test_error_metrics_hand_computed() -> None:
    ref = torch.tensor([3.0, -4.0])
    lp = torch.tensor([3.0, -3.0])
    acc = ErrorAccumulator()
    acc.update(ref, lp)
    r = acc.result()
    # Σref² = 25, Σerr² = 1 → 10·log10(25) dB; rel = 1/5; cos = (9+12)/(5·√18)
    assert r["sqnr_db"] == pytest.approx(10 * math.log10(25.0), abs=1e-12)
    assert r["rel_err"] == pytest.approx(0.2, abs=1e-15)
    assert r["cosine"] == pytest.approx(21.0 / (5.0 * math.sqrt(18.0)), abs=1e-15)
    assert r["max_abs_err"] == 1.0
    assert r["nonfinite"] == 0


def test_sqnr_edge_cases() -> None:
    assert sqnr_db(4.0, 0.0) == math.inf
    assert math.isnan(sqnr_db(0.0, 0.0))
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


def test_operand_metrics_hand_computed() -> None:
    x = torch.tensor([1.0, 0.001, -2.0, 0.0, 8.0])
    q = torch.tensor([1.0, 0.0, -2.0, 0.0, 4.0])
    sat = torch.tensor([False, False, False, False, True])
    acc = OperandAccumulator()
    acc.update(x, q, sat)
    r = acc.result()
    signal = 1 + 1e-6 + 4 + 64
    noise = 1e-6 + 16
    assert r["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-12)
    assert r["underflow_frac"] == pytest.approx(1 / 4)  # 0.001 → 0 among 4 non-zeros
    assert r["saturation_frac"] == pytest.approx(1 / 5)
    # Without a mask: |x| above the largest |q| (8 > 4) is the saturation criterion.
    acc2 = OperandAccumulator()
    acc2.update(x, q)
    assert acc2.result()["saturation_frac"] == pytest.approx(1 / 5)


def test_tensor_stats_hand_computed() -> None:
    x = torch.tensor([[1.0, -1.0, 2.0, 0.0], [-2.0, 0.5, 0.0, 4.0]])
    s = TensorStats()
    s.update(x)
    r = s.result()
    v = x.double().flatten()
    m = v.mean()
    d = v - m
    var = (d**2).mean()
    assert r["numel"] == 8 and r["amax"] == 4.0
    assert r["std"] == pytest.approx(float(var.sqrt()), rel=1e-12)
    assert r["kurtosis"] == pytest.approx(float((d**4).mean() / var**2), rel=1e-12)
    assert r["zero_frac"] == pytest.approx(2 / 8)
    assert r["range_bits"] == pytest.approx(math.log2(4.0 / 0.5))  # 3 bits
    # One 1x128 block per row (4 cols): block absmaxes 2 and 4 → amax / geomean = 4 / √8
    assert r["block_absmax_ratio"] == pytest.approx(4.0 / math.sqrt(8.0), rel=1e-12)
    h = s.histogram()
    counts = dict(zip(h["edges"], h["counts"]))
    # |x| = 1,1,2,2,0.5,4 → floor(log2): 0,0,1,1,-1,2
    assert counts[0] == 2 and counts[1] == 2 and counts[-1] == 1 and counts[2] == 1
    assert sum(h["counts"]) == 6 and len(h["edges"]) == len(h["counts"]) + 1


def test_log2_histogram_is_exact_at_powers_of_two_and_clamps() -> None:
    below = torch.nextafter(torch.tensor(2.0), torch.tensor(0.0))  # 2 − ulp: floor(log2) = 0
    h = log2_histogram(torch.stack([torch.tensor(2.0), below, torch.tensor(1e-30), torch.tensor(1e30)]))
    assert h[1 - LOG2_LO] == 1 and h[0 - LOG2_LO] == 1
    assert h[0] == 1 and h[-1] == 1  # clamped into the end bins, never lost


def _same(got: object, want: object, rel: float) -> bool:
    """Numbers within `rel`; anything else (a note string, None) exactly equal (pytest >= 9.1's
    approx refuses None with a relative tolerance)."""
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return got == pytest.approx(want, rel=rel)
    return got == want


def test_merge_equals_single_pass() -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(37, 200, generator=gen) * 3 + 1.5
    b = torch.randn(11, 200, generator=gen) * 0.2 - 4
    both = torch.cat([a, b])
    noise = lambda t: t + 0.01 * torch.randn(t.shape, generator=gen)  # noqa: E731
    na, nb = noise(a), noise(b)

    s1, s2, sall = TensorStats(), TensorStats(), TensorStats()
    s1.update(a)
    s2.update(b)
    sall.update(both)
    merged = s1.merge(s2)
    for k, v in sall.result().items():
        assert _same(merged.result()[k], v, 1e-9), k
    assert torch.equal(merged.hist, sall.hist)

    e1, e2, eall = ErrorAccumulator(), ErrorAccumulator(), ErrorAccumulator()
    e1.update(a, na)
    e2.update(b, nb)
    eall.update(both, torch.cat([na, nb]))
    for k, v in eall.result().items():
        assert _same(e1.merge(e2).result()[k], v, 1e-12), k

    o1, o2, oall = OperandAccumulator(), OperandAccumulator(), OperandAccumulator()
    qa, qb = a.round(), b.round()
    mask_a, mask_b = a.abs() > 5, b.abs() > 5
    o1.update(a, qa, mask_a)
    o2.update(b, qb, mask_b)
    oall.update(both, torch.cat([qa, qb]), torch.cat([mask_a, mask_b]))
    merged_o = o1.merge(o2).result()
    assert merged_o.keys() == oall.result().keys()
    for k, v in oall.result().items():
        assert _same(merged_o[k], v, 1e-12), k

    c1, c2, call = OutlierCensus(6.0), OutlierCensus(6.0), OutlierCensus(6.0)
    c1.update(a)
    c2.update(b)
    call.update(both)
    assert c1.merge(c2).result() == call.result()


def test_outlier_census_hand_computed() -> None:
    a = torch.tensor([[0.5, 7.0, -1.0, 0.0],
                      [1.0, 2.0, -6.0, 0.0],
                      [0.1, 0.2, 0.3, float("nan")]])
    c = OutlierCensus(6.0)
    c.update(a)
    r = c.result()
    assert c.outlier_dims() == [1, 2]  # |−6| ≥ 6 counts (≥, not >); NaN ignored
    assert r["n_outlier_cols"] == 2 and r["frac_cols"] == 0.5
    assert r["frac_rows"] == pytest.approx(2 / 3)
    assert r["top_dims"] == [[1, 7.0], [2, 6.0]]
    assert r["col_amax"] == [1.0, 7.0, 6.0, 0.0]
    # dim 1 is an outlier in row 0 only, dim 2 in row 1 only: one token of three each
    assert r["top_dim_tokens"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    c.update(torch.tensor([[0.0, 9.0, 6.5, 0.0]]))  # a second batch: both dims hit again
    assert c.result()["top_dim_tokens"] == [0.5, 0.5]


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_a_tensor_with_no_finite_value_has_no_amax(fill: float) -> None:
    """An all-NaN gradient read "amax 0" in the JSON and the report (as if all zeros) while its std, kurtosis and
    range were null (QA)."""
    s = TensorStats()
    s.update(torch.full((3, 200), fill))
    r = s.result()
    assert math.isnan(r["amax"]) and math.isnan(r["std"]) and r["numel"] == 600
    s.update(torch.tensor([[0.5, -2.0]]))  # merged with finite values: theirs
    assert s.result()["amax"] == 2.0


def test_nan_inf_counted_not_fatal() -> None:
    x = torch.randn(4, BLOCK + 3, generator=torch.Generator().manual_seed(1))
    x[0, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, 1] = -float("inf")
    s = TensorStats()
    s.update(x)
    r = s.result()
    assert r["nan_count"] == 1 and r["inf_count"] == 2
    assert math.isfinite(r["std"]) and math.isfinite(r["amax"])
    e = ErrorAccumulator()
    lp = x.clone()
    lp[1, 1] = float("inf")  # recipe overflow where the reference is finite
    e.update(x, lp)
    assert e.result()["nonfinite"] == 1 and e.result()["sqnr_db"] == math.inf
    o = OperandAccumulator()
    q = x.clone()
    q[0, 0] = 0.0  # one finite element quantised to zero
    o.update(x, q)
    # Non-finite pairs are skipped: only x[0, 0] contributes noise.
    finite = x[torch.isfinite(x)].double()
    expected = 10 * math.log10(float((finite**2).sum()) / float(x[0, 0].double() ** 2))
    assert o.result()["sqnr_db"] == pytest.approx(expected, rel=1e-12)
    assert o.result()["underflow_frac"] == pytest.approx(1 / int((finite != 0).sum()))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ErrorAccumulator().update(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="2-D"):
        OutlierCensus(6.0).update(torch.ones(3))


def _plain_stats(x: torch.Tensor) -> dict:
    """TensorStats' numbers by the obvious float64 formulas (every pass separate, masked copies)."""
    v = x.detach().to(torch.float64).flatten()
    fin = v[torch.isfinite(v)]
    a = fin.abs()
    nz = a[a != 0]
    tiny = torch.finfo(x.dtype).tiny
    mean = fin.mean()
    d = fin - mean
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    seg = torch.nn.functional.pad(torch.where(torch.isfinite(rows), rows.abs(), 0.0), (0, -rows.shape[1] % BLOCK))
    blocks = seg.reshape(rows.shape[0], -1, BLOCK).amax(dim=2).flatten()
    blocks = blocks[blocks > 0]
    _, e = torch.frexp(nz)
    hist = torch.bincount((e.long() - 1).clamp(LOG2_LO, LOG2_HI - 1) - LOG2_LO, minlength=LOG2_HI - LOG2_LO)
    var = float((d * d).sum()) / fin.numel()
    return {"numel": x.numel(), "amax": float(a.max()), "std": math.sqrt(var),
            "kurtosis": float((d**4).sum()) / fin.numel() / var**2, "zero_frac": float((a == 0).sum()) / fin.numel(),
            "nan_count": int(torch.isnan(v).sum()), "inf_count": int(torch.isinf(v).sum()),
            "range_bits": math.log2(float(a.max()) / float(nz.min())),
            "block_absmax_ratio": float(a.max()) / 2.0 ** float(torch.log2(blocks).mean()),
            "pos_inf_count": int((v == math.inf).sum()), "neg_inf_count": int((v == -math.inf).sum()),
            "zero_count": int((a == 0).sum()), "subnormal_count": int(((nz > 0) & (nz < tiny)).sum()),
            **{f"over_{name}_max": int((a > limit).sum()) for name, limit in RAW_LIMITS}, "hist": hist.tolist()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("specials", [False, True])
def test_tensor_stats_equal_the_plain_float64_formulas(dtype: torch.dtype, specials: bool) -> None:
    """The few-pass TensorStats (float32 magnitudes, float64 moments only) gives the plain float64 numbers:
    counts, extremes and the histogram exactly, the moment-based ones to 1e-12 (sums in another order)."""
    gen = torch.Generator().manual_seed(3 + specials)
    x = torch.randn(37, 300, generator=gen) * torch.logspace(-6, 1, 300)
    x[0, :5] = torch.tensor([0.0, -0.0, 448.0, 449.0, -600.0])   # exactly at / beyond the e4m3 max
    x[1, :3] = torch.tensor([57344.0, 60000.0, 65504.0])          # e5m2 max, between, fp16 max
    x[2, :2] = torch.tensor([65520.0, -1e5]) if dtype != torch.float16 else torch.tensor([1.0, 2.0])
    tiny = torch.finfo(dtype).tiny
    x[3, :3] = torch.tensor([tiny / 4, tiny, tiny * 0.75])        # subnormals of the dtype and its smallest normal
    if specials:
        x[4, :4] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    x = x.to(dtype)
    stats = TensorStats()
    stats.update(x)
    got = {**stats.result(), "hist": stats.histogram()["counts"]}
    want = _plain_stats(x)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key in ("std", "kurtosis", "block_absmax_ratio", "range_bits"):
            assert got[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert got[key] == value, key
    assert got["subnormal_count"] > 0 and got["over_e4m3_max"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_census_threshold_between_representable_values(dtype: torch.dtype) -> None:
    """|x| ≥ 6.1 decided in real numbers: the float32/bf16 neighbours of 6.1 fall on the right sides."""
    below = torch.tensor(6.1, dtype=torch.float64).to(dtype)
    if float(below) >= 6.1:
        below = torch.nextafter(below, torch.tensor(0.0, dtype=dtype))
    above = torch.nextafter(below, torch.tensor(math.inf, dtype=dtype))
    assert float(below) < 6.1 <= float(above)
    a = torch.zeros(3, 4, dtype=dtype)
    a[0, 1], a[1, 2], a[2, 3] = below, above, -above
    c = OutlierCensus(6.1)
    c.update(a)
    assert c.outlier_dims() == [2, 3] and c.result()["frac_rows"] == pytest.approx(2 / 3)
    assert c.col_amax.dtype == torch.float64 and c.col_amax.tolist() == [0.0, float(below), float(above), float(above)]


@pytest.mark.parametrize("specials", [False, True])
def test_operand_and_error_accumulators_equal_the_plain_float64_formulas(specials: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(64, 96, generator=gen)
    q = (x * 16).round() / 16
    q[q.abs() > 2.5] = 2.5 * q[q.abs() > 2.5].sign()     # clipped: saturated
    if specials:
        x[0, 0], q[1, 1], x[2, 2] = math.nan, math.inf, -math.inf
    o = OperandAccumulator()
    o.update(x, q)
    r, d = x.double().flatten(), q.double().flatten()
    fin = torch.isfinite(r)
    both = fin & torch.isfinite(d)
    err2 = float(((r - d)[both] ** 2).sum())
    res = o.result()
    assert res["sqnr_db"] == pytest.approx(10 * math.log10(float((r[both] ** 2).sum()) / err2), rel=1e-13)
    nz = fin & (r != 0)
    assert res["underflow_frac"] == int((nz & (d == 0)).sum()) / int(nz.sum())
    qmax = float(d[both].abs().max())
    assert res["saturation_frac"] == int((fin & (r.abs() > qmax)).sum()) / int(fin.sum()) > 0
    assert (res["excluded"], res["nonfinite"]) == ((2, 1) if specials else (0, 0))
    e = ErrorAccumulator()
    e.update(r.view(64, 96), q)
    assert e.result()["max_abs_err"] == float((r - d)[both].abs().max())


@pytest.mark.parametrize("saturated_given", [False, True])
def test_chunked_accumulators_equal_one_pass(monkeypatch: pytest.MonkeyPatch, saturated_given: bool) -> None:
    """Tensors longer than metrics.CHUNK are summed chunk by chunk on the torch path (bounded float64
    temporaries; the C path takes one pass, no temporaries): counts and max exact, sums to 1e-13;
    saturation without a mask still compares with the whole tensor's max|q|."""
    import fp8probe.analysis.metrics as M

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, 40, generator=gen)
    x[0, 0], x[49, 39], x[20, 3] = 7.0, math.nan, 0.0
    q = (x * 8).round() / 8
    q[q.abs() > 3] = 3 * q[q.abs() > 3].sign()
    q[10, 0] = 0.0  # underflow of a non-zero x
    sat = (x.abs() > 3) if saturated_given else None
    ref = x.double() @ torch.randn(40, 30, generator=gen, dtype=torch.float64)
    lp = (q.double() @ torch.randn(40, 30, generator=gen, dtype=torch.float64)).float()
    whole_o, whole_e = OperandAccumulator(), ErrorAccumulator()
    whole_o.update(x, q, sat)
    whole_e.update(ref, lp)
    monkeypatch.setattr(M, "CHUNK", 333)  # 2000 elements: 7 chunks, the last one partial
    chunked_o, chunked_e = OperandAccumulator(), ErrorAccumulator()
    chunked_o.update(x, q, sat)
    chunked_e.update(ref, lp)
    for whole, chunked in ((whole_o, chunked_o), (whole_e, chunked_e)):
        for key, value in vars(whole).items():
            if isinstance(value, int) or key == "max_abs_err":
                assert getattr(chunked, key) == value, key
            else:
                assert getattr(chunked, key) == pytest.approx(value, rel=1e-13), key
    assert whole_o.n_saturated > 0 and whole_o.n_excluded == 1 and whole_e.excluded > 0
