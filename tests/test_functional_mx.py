"""MX scale rules (FLOOR / RCEIL / EVEN), the 4/6-bit element formats and NVFP4, against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fp8probe.functional as F
from fp8probe.backends import reference as R

# Positive values of each element format written out from the OCP MX v1.0 tables (§5.3.2, §5.3.3).
E2M1_POS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M3_POS = ([k / 8 for k in range(8)] + [1 + k / 8 for k in range(8)] + [2 + k / 4 for k in range(8)]
            + [4 + k / 2 for k in range(8)])
E3M2_POS = ([k / 16 for k in range(4)] + [0.25 + k / 16 for k in range(4)] + [0.5 + k / 8 for k in range(4)]
            + [1 + k / 4 for k in range(4)] + [2 + k / 2 for k in range(4)] + [4 + k for k in range(4)]
            + [8 + 2 * k for k in range(4)] + [16 + 4 * k for k in range(4)])
POS = {"e2m1": E2M1_POS, "e2m3": E2M3_POS, "e3m2": E3M2_POS}
MAXES = {"e2m1": 6.0, "e2m3": 7.5, "e3m2": 28.0}


@pytest.mark.parametrize("elem", list(POS))
def test_element_tables_match_the_spec(elem):
    n = len(POS[elem])
    codes = torch.arange(2 * n, dtype=torch.uint8)
    vals = R.lowbit_values(codes, elem)
    assert vals[:n].tolist() == POS[elem]
    assert (-vals[n:]).tolist() == POS[elem] and bool(torch.signbit(vals[n:]).all())
    assert max(POS[elem]) == MAXES[elem]


def _nearest_even(y: np.ndarray, pos: list[float]) -> np.ndarray:
    """Brute force: the code of the nearest table value, ties to the even code (even mantissa LSB)."""
    table = np.array(pos)
    d = np.abs(np.abs(y)[:, None] - table[None, :])
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    idx = np.where(cand & (np.arange(len(pos)) % 2 == 0)[None, :], np.arange(len(pos)), 10**6).min(axis=1)
    idx = np.where(cand.sum(axis=1) == 1, d.argmin(axis=1), idx)
    return idx + np.where(np.signbit(y), len(pos), 0)


@pytest.mark.parametrize("elem", list(POS))
def test_element_rounding_is_nearest_even(elem):
    pos = POS[elem]
    mids = [(a + b) / 2 for a, b in zip(pos, pos[1:])]
    rnd = np.random.default_rng(3).uniform(-MAXES[elem], MAXES[elem], 4000)
    y = np.concatenate([rnd, mids, [-m for m in mids], pos, [-p for p in pos[1:]]]).astype(np.float32)
    got = R.lowbit_encode(torch.from_numpy(y), elem).numpy()
    assert (got == _nearest_even(y, pos)).all()


# ------------------------------------------------------------------ E8M0 scale rules
# amax → expected scale exponent for MXFP8 E4M3 (emax 8, max 448), worked by hand:
# FLOOR = floor(log2 amax) - 8; RCEIL = smallest k with amax / 2**k <= 448; EVEN rounds the mantissa
# of amax to 3 bits (half to even) before the floor: 496 = 1.9375·2**8 → 15.5/8 → 16/8 = 2 → carry.
E4M3_CASES = [
    # amax,   floor, rceil, even
    (1.0, -8, -8, -8),
    (448.0, 0, 0, 0),
    (449.0, 0, 1, 0),
    (480.0, 0, 1, 0),
    (495.0, 0, 1, 0),
    (496.0, 0, 1, 1),
    (511.0, 0, 1, 1),
    (512.0, 1, 1, 1),
    (0.875, -9, -9, -9),
    (0.9375, -9, -8, -9),
    (0.96875, -9, -8, -8),
    (3.0e38, 119, 120, 119),
]


@pytest.mark.parametrize(("amax", "floor", "rceil", "even"), E4M3_CASES)
def test_mx_scale_rules_worked_examples(amax, floor, rceil, even):
    a = torch.tensor([amax])
    for rule, exp in (("floor", floor), ("rceil", rceil), ("even", even)):
        assert R.mx_scale(a, "mxfp8-e4m3", rule).item() == 2.0**exp, rule


def _independent_exponents(amax: np.ndarray, fmax: float, emax: int, mbits: int) -> dict[str, np.ndarray]:
    """float64 log2/ceil/round formulas (no frexp): exact for float32 amax."""
    fl = np.floor(np.log2(amax))
    mant = amax / 2.0**fl                                         # [1, 2), exact in float64
    rounded = np.round(mant * 2**mbits) / 2**mbits                # numpy rounds half to even
    return {"floor": fl - emax, "rceil": np.ceil(np.log2(amax / fmax)),
            "even": np.floor(np.log2(rounded * 2.0**fl)) - emax}


@pytest.mark.parametrize(("fmt", "fmax", "emax", "mbits"), [
    ("mxfp8-e4m3", 448.0, 8, 3), ("mxfp8-e5m2", 57344.0, 15, 2), ("mxfp6-e2m3", 7.5, 2, 3),
    ("mxfp6-e3m2", 28.0, 4, 2), ("mxfp4-e2m1", 6.0, 2, 1)])
def test_mx_scale_rules_match_independent_formulas(fmt, fmax, emax, mbits):
    g = np.random.default_rng(5)
    k = g.integers(-60, 60, 3000)
    # dense in the saturation band [fmax, 2**(emax+1))·2**k and around it, plus random magnitudes
    band = g.uniform(fmax * 0.9, 2.0 ** (emax + 1) * 1.01, 3000) * 2.0 ** (k - emax)
    anywhere = np.exp(g.uniform(-80, 80, 3000))
    amax = np.concatenate([band, anywhere, [fmax, 2.0 ** (emax + 1)]]).astype(np.float32).astype(np.float64)
    want = _independent_exponents(amax, fmax, emax, mbits)
    a = torch.from_numpy(amax.astype(np.float32))
    for rule in ("floor", "rceil", "even"):
        got = R.mx_scale(a, fmt, rule)
        assert (got.numpy() == 2.0 ** np.clip(want[rule], -127, 127)).all(), rule
        # every scale is an E8M0 value: torch's own E8M0 dtype round-trips it
        assert torch.equal(got.to(torch.float8_e8m0fnu).to(torch.float32), got)
        if rule == "rceil":
            assert bool((a / got <= fmax).all())


def test_rceil_removes_mxfp8_saturation_in_the_448_512_band():
    # every block max in [448, 512)·2**k: FLOOR clips it to 448·2**k, RCEIL keeps it to E4M3 precision
    g = torch.Generator().manual_seed(11)
    k = torch.randint(-10, 10, (64, 1), generator=g).float()
    x = torch.randn(64, 32, generator=g).clamp(-1, 1) * 400 * 2.0**k
    x[:, 5] = (449 + 62 * torch.rand(64, generator=g)) * 2.0 ** k[:, 0]
    floor = F.quantize_scaled(x, "mxfp8-e4m3", scale_rule="floor")
    rceil = F.quantize_scaled(x, "mxfp8-e4m3", scale_rule="rceil")
    assert bool((floor.data[:, 5].float() == 448).all())
    assert not bool((rceil.data.float().abs() == 448).any())
    # the element cast is torch's native float8 cast of x / scale
    scale = rceil.scale.repeat_interleave(32, 1)
    assert torch.equal(rceil.data, (x / scale).to(torch.float8_e4m3fn))
    y = rceil.dequantize()
    assert bool(((y - x).abs() <= x.abs() * 2.0**-4).all())


@pytest.mark.parametrize("fmt", ["mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1"])
@pytest.mark.parametrize("rule", ["floor", "rceil", "even"])
def test_mx_lowbit_cast_equals_table_rounding(fmt, rule):
    elem = R.ELEMENT_OF[fmt]
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(2)) * 3
    st = F.quantize_scaled(x, fmt, scale_rule=rule)
    assert st.data.dtype == torch.uint8 and st.scale.shape == (48, 3)
    scale = st.scale.repeat_interleave(32, 1)
    y = (x / scale).clamp(-MAXES[elem], MAXES[elem]).numpy()
    assert (st.data.numpy().reshape(-1) == _nearest_even(y.reshape(-1), POS[elem])).all()
    table = torch.tensor(POS[elem] + [-p for p in POS[elem]])
    assert torch.equal(st.dequantize(torch.float32), table[st.data.long()] * scale)


# ------------------------------------------------------------------ NVFP4
def test_nvfp4_worked_example():
    """Global scale = 2688 / 2688 = 1. Block 0: amax 2688 → E4M3 scale 448; 2688/448 = 6, 1344/448 = 3,
    112/448 = 0.25 (tie between 0 and 0.5 → even code 0). Block 1: amax 60 → scale 10 (E4M3 1.25·2**3);
    25/10 = 2.5 (tie 2|3 → even code 4 = 2.0 → 20), -13/10 = -1.3 → -1.5 → -15. Block 2: amax 7 →
    7/6 = 1.1667 → E4M3 1.125; 7/1.125 = 6.22 saturates to 6 → 6.75 (the E4M3 scale rounds down: clips)."""
    x = torch.zeros(1, 48)
    x[0, :3] = torch.tensor([2688.0, 1344.0, 112.0])
    x[0, 16:19] = torch.tensor([60.0, 25.0, -13.0])
    x[0, 32] = 7.0
    st = F.quantize_scaled(x, "nvfp4")
    assert st.global_scale.item() == 1.0 and st.block == (1, 16)
    assert st.scale.tolist() == [[448.0, 10.0, 1.125]]
    assert st.data[0, :3].tolist() == [7, 5, 0] and st.data[0, 16:19].tolist() == [7, 4, 8 | 3]
    assert st.data[0, 32].item() == 7
    y = st.dequantize()
    assert y[0, :3].tolist() == [2688.0, 1344.0, 0.0]
    assert y[0, 16:19].tolist() == [60.0, 20.0, -15.0] and y[0, 32].item() == 6.75


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_matches_numpy_float32_rule(block):
    x = torch.randn(40, 72, generator=torch.Generator().manual_seed(4)) * 0.03
    st = F.quantize_scaled(x, "nvfp4", block=block)
    xn = x.numpy()
    g = np.float32(np.abs(xn).max()) / np.float32(2688.0)
    assert st.global_scale.item() == g
    br, bc = block
    for i in range(0, 40, br):
        for j in range(0, 72, bc):
            blk = xn[i:i + br, j:j + bc]
            s = np.float32(np.abs(blk).max()) / np.float32(np.float32(6.0) * g)
            s_e4m3 = torch.tensor(s).to(torch.float8_e4m3fn).float().item()      # torch's native E4M3 cast
            assert st.scale[i // br, j // bc].item() == s_e4m3
            y = np.clip(blk / np.float32(np.float32(s_e4m3) * g), -6, 6).astype(np.float32)
            codes = _nearest_even(y.reshape(-1), E2M1_POS).reshape(y.shape)
            assert (st.data[i:i + br, j:j + bc].numpy() == codes).all()
            vals = np.array(E2M1_POS + [-p for p in E2M1_POS], dtype=np.float32)[codes]
            want = (vals * np.float32(s_e4m3)).astype(np.float32) * g
            assert (st.dequantize()[i:i + br, j:j + bc].numpy() == want).all()


# ------------------------------------------------------------------ specials, errors, SQNR
def test_nonfinite_block_gets_nan_scale_in_lowbit_formats():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(8))
    x[0, 3], x[1, 40] = float("nan"), float("inf")
    for fmt in ("mxfp4-e2m1", "nvfp4"):
        st = F.quantize_scaled(x, fmt)
        y = st.dequantize()
        nb = st.scale.shape[1]
        bad = torch.zeros(2, nb, dtype=torch.bool)
        bad[0, 3 // st.block[1]] = bad[1, 40 // st.block[1]] = True
        assert torch.equal(torch.isnan(st.scale), bad)
        assert torch.equal(torch.isnan(y), bad.repeat_interleave(st.block[1], 1))


@pytest.mark.parametrize(("fmt", "gran", "block"), [
    ("mxfp8-e4m3", "tensor", None), ("mxfp8-e5m2", "row", None), ("mxfp4-e2m1", "block", (1, 128)),
    ("mxfp6-e2m3", "block", (32, 32)), ("nvfp4", "block", (1, 32)), ("nvfp4", "tensor", None)])
def test_block_scaled_formats_reject_other_granularities(fmt, gran, block):
    with pytest.raises(ValueError, match=r"needs granularity='block' with block in .*got granularity="):
        F.quantize_scaled(torch.randn(4, 64), fmt, gran, block)


def test_scale_rule_errors():
    with pytest.raises(ValueError, match="scale_rule must be one of floor, rceil, even, got 'up'"):
        F.quantize_scaled(torch.randn(4, 64), "mxfp8-e4m3", scale_rule="up")
    with pytest.raises(ValueError, match="expected 'floor' for fmt='e4m3', got 'rceil'"):
        F.quantize_scaled(torch.randn(4, 64), "e4m3", scale_rule="rceil")
    with pytest.raises(ValueError, match="uint8 element codes need fmt"):
        torch.ops.fp8probe.dequantize_scaled(torch.zeros(2, 32, dtype=torch.uint8), torch.ones(2, 1), 1, 32,
                                             torch.float32)


def test_old_op_calls_keep_floor_and_fp8():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    d0, s0 = torch.ops.fp8probe.quantize_scaled(x, "mxfp8-e4m3", 1, 32)
    d1, s1 = torch.ops.fp8probe.quantize_scaled(x, "mxfp8-e4m3", 1, 32, "floor")
    assert torch.equal(d0.view(torch.uint8), d1.view(torch.uint8)) and torch.equal(s0, s1)
    assert torch.equal(F.quantize_scaled(x, "mxfp8-e4m3").data.view(torch.uint8), d0.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["mxfp4-e2m1", "nvfp4", "mxfp6-e3m2"])
def test_lowbit_empty(fmt):
    st = F.quantize_scaled(torch.empty(0, 64), fmt)
    assert st.data.shape == (0, 64) and st.dequantize().shape == (0, 64)


@pytest.mark.parametrize(("fmt", "rule", "block", "floor_db"), [
    ("mxfp8-e4m3", "floor", None, 30.0), ("mxfp8-e4m3", "rceil", None, 31.0), ("mxfp8-e4m3", "even", None, 30.5),
    ("mxfp8-e5m2", "rceil", None, 25.0), ("mxfp6-e2m3", "floor", None, 30.5), ("mxfp6-e2m3", "rceil", None, 30.5),
    ("mxfp6-e3m2", "floor", None, 25.0), ("mxfp6-e3m2", "rceil", None, 25.0), ("mxfp4-e2m1", "floor", None, 18.3),
    ("mxfp4-e2m1", "rceil", None, 18.3), ("mxfp4-e2m1", "even", None, 18.5), ("nvfp4", "floor", None, 20.0),
    ("nvfp4", "floor", (16, 16), 18.6)])
def test_sqnr_floor_on_normal_data(fmt, rule, block, floor_db, device):
    """N(0,1) 256x384, measured on CPU: MXFP8-E4M3 30.6 / 31.5 / 31.1 dB (floor / rceil / even), E5M2 rceil
    25.5; MXFP6 E2M3 30.9 / 30.9, E3M2 25.3 / 25.5; MXFP4 18.8 / 18.8 / 19.0; NVFP4 20.5 (1x16), 19.1 (16x16)."""
    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(7)).to(device)
    y = F.quantize_scaled(x, fmt, block=block, scale_rule=rule).dequantize()
    assert 10 * math.log10(float(x.pow(2).sum() / (x - y).pow(2).sum())) >= floor_db


@pytest.mark.parametrize(("fmt", "block", "rule"), [
    ("e4m3", (1, 128), "floor"), ("e5m2", (128, 128), "floor"), ("mxfp8-e4m3", (1, 32), "rceil"),
    ("mxfp8-e5m2", (1, 32), "even"), ("mxfp4-e2m1", (1, 32), "floor"), ("mxfp6-e3m2", (1, 32), "rceil"),
    ("nvfp4", (16, 16), "floor")])
def test_tile_scales_equal_the_casts_scales(fmt, block, rule):
    x = torch.randn(150, 200, generator=torch.Generator().manual_seed(9)) * torch.logspace(-4, 3, 200)
    x[7, 7] = float("nan")
    g = R.nvfp4_global_scale(x) if fmt == "nvfp4" else None
    _, want = R.quantize_scaled(x, fmt, *block, rule, g)
    got = R.tile_scales(x, fmt, *block, rule, g)
    assert torch.equal(got.nan_to_num(nan=-1.0), want.nan_to_num(nan=-1.0))


def test_nvfp4_16x16_weight_blocks_transpose_exactly():
    """The nvfp4 recipe reuses qWᵀ for dgrad: with 16x16 blocks and one tensor scale, quantising Wᵀ gives exactly qWᵀ."""
    W = torch.randn(72, 200, generator=torch.Generator().manual_seed(12)) * torch.logspace(-3, 1, 200)
    q = F.quantize_scaled(W, "nvfp4", block=(16, 16)).dequantize()
    qt = F.quantize_scaled(W.t().contiguous(), "nvfp4", block=(16, 16)).dequantize()
    assert torch.equal(q.t(), qt)
