"""NVIDIA's NVFP4 training recipe pieces: stochastic rounding of the 4/6-bit casts, the 16-point random
Hadamard transform, and the ``nvfp4-train`` strategy built from them.

The independent computations: the E2M1/E2M3 grids written out by hand (OCP MX v1.0 §5.3.3), the
Hadamard matrix by explicit (−1)^popcount(i & j) entries, and float64 products."""
from __future__ import annotations

import math

import pytest
import torch

import fp8probe.functional as F
from fp8probe.analysis import strategies as S
from fp8probe.analysis.pipeline import analyze
from fp8probe.backends import reference as R

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E2M3_GRID = torch.tensor(sorted({m / 8 * 2.0 ** 0 for m in range(8)}  # subnormals: m/8 · 2^0
                                | {(1 + m / 8) * 2.0 ** e for e in (0, 1, 2) for m in range(8)}),
                         dtype=torch.float64)


def _neighbours(v: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest grid value ≤ |v|, smallest grid value ≥ |v|) by search in the hand-written grid."""
    a = v.abs().double()
    hi_idx = torch.searchsorted(grid, a, right=False).clamp(max=len(grid) - 1)
    lo_idx = (torch.searchsorted(grid, a, right=True) - 1).clamp(min=0)
    return grid[lo_idx], grid[hi_idx]


@pytest.mark.parametrize(("fmt", "grid"), [("mxfp4-e2m1", E2M1_GRID), ("nvfp4", E2M1_GRID),
                                           ("mxfp6-e2m3", E2M3_GRID)])
def test_stochastic_rounding_picks_one_of_the_two_neighbouring_grid_values(fmt: str, grid: torch.Tensor) -> None:
    torch.manual_seed(0)
    x = torch.randn(96, 64) * 3
    x[0, :8] = torch.tensor([0.0, -0.0, 1.5, -3.0, 6.0, 0.25, 1e-9, -1e-9])  # grid values and tiny ones
    block = (1, 16) if fmt == "nvfp4" else (1, 32)
    st = F.quantize_scaled(x, fmt, block=block, rounding="stochastic", seed=11)
    near = F.quantize_scaled(x, fmt, block=block)
    assert torch.equal(st.scale, near.scale)  # the scales do not depend on the rounding
    # the element each x maps to before rounding: x / (scale · global scale), in float64 (exact here)
    div = st.scale.repeat_interleave(block[1], dim=1)[:, :x.shape[1]].double()
    if st.global_scale is not None:
        div = div * st.global_scale.double()
    y = (x.double() / div).clamp(-grid[-1], grid[-1])
    lo, hi = _neighbours(y, grid)
    got = st.element_values().double().abs()
    assert bool(((got == lo) | (got == hi)).all())
    assert torch.equal(torch.signbit(st.element_values()[y != 0]), torch.signbit(y[y != 0]))
    on_grid = lo == hi
    assert bool(on_grid.any()) and torch.equal(got[on_grid], lo[on_grid])  # a grid value stays itself
    assert bool((got[~on_grid] == hi[~on_grid]).any()) and bool((got[~on_grid] == lo[~on_grid]).any())


def test_stochastic_rounding_is_unbiased_and_rounds_up_in_proportion_to_the_distance() -> None:
    # one block of values spread over [0, 6] (block amax 6: scale 1, elements are the values themselves)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 32, generator=g, dtype=torch.float64).float() * 6
    x[0, 0] = 6.0
    draws = torch.stack([F.quantize_scaled(x, "mxfp4-e2m1", rounding="stochastic", seed=s).dequantize()
                         for s in range(4000)])
    lo, hi = _neighbours(x[0], E2M1_GRID)
    p_up = torch.where(hi > lo, (x[0].double() - lo) / (hi - lo).clamp(min=1e-30), 0.0)
    frac_up = ((draws[:, 0].double() == hi) & (hi > lo)).double().mean(0)
    # 4000 Bernoulli draws: standard error ≤ 0.008; 5 sigma
    assert float((frac_up - p_up).abs().max()) < 0.04
    assert float((draws.double().mean(0)[0] - x[0].double()).abs().max()) < 0.04
    # round to nearest is biased on the same values: its mean error is the rounding error itself
    nearest = F.quantize_scaled(x, "mxfp4-e2m1").dequantize()[0].double()
    assert float((nearest - x[0].double()).abs().max()) > 0.2


def test_stochastic_rounding_is_a_pure_function_of_seed_and_index() -> None:
    x = torch.randn(64, 48)
    a = F.quantize_scaled(x, "nvfp4", block=(1, 16), rounding="stochastic", seed=5)
    b = F.quantize_scaled(x.clone(), "nvfp4", block=(1, 16), rounding="stochastic", seed=5)
    c = F.quantize_scaled(x, "nvfp4", block=(1, 16), rounding="stochastic", seed=6)
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    u = R.stochastic_uniform((1 << 16,), 5)
    assert torch.equal(u, R.stochastic_uniform((256, 256), 5).reshape(-1))  # by flat index, not by shape
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # 24 random bits
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - math.sqrt(1 / 12)) < 0.01
    # neighbouring indices are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02


def test_the_hash_is_lowbias32_in_uint32_arithmetic() -> None:
    """_mix32 (int64 tensors, products kept inside int64) against the hash written with numpy uint32 wraparound."""
    np = pytest.importorskip("numpy")

    def lowbias32(v: int) -> int:
        x = np.array([v], dtype=np.uint32)
        for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x ^= x >> np.uint32(shift)
            x *= np.uint32(mult)  # wraps mod 2**32
        x ^= x >> np.uint32(16)
        return int(x[0])

    vals = [0, 1, 2, 0x9E3779B9, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (200,)).tolist()
    with np.errstate(over="ignore"):
        want = [lowbias32(v) for v in vals]
    assert R._mix32(torch.tensor(vals, dtype=torch.int64)).tolist() == want
    assert [R._mix32(v) for v in vals] == want


@pytest.mark.parametrize("fmt", ["e4m3", "mxfp8-e4m3"])
def test_stochastic_rounding_is_refused_for_the_8_bit_formats(fmt: str) -> None:
    with pytest.raises(ValueError, match="expected rounding 'nearest'.*got 'stochastic'"):
        F.quantize_scaled(torch.randn(4, 32), fmt, rounding="stochastic")
    with pytest.raises(ValueError, match="expected rounding 'nearest'.*got 'up'"):
        F.quantize_scaled(torch.randn(4, 32), "nvfp4", rounding="up")
    with pytest.raises(TypeError, match="expected an int seed"):
        F.quantize_scaled(torch.randn(4, 32), "nvfp4", rounding="stochastic", seed=1.5)


def _hadamard_by_definition(n: int) -> torch.Tensor:
    """H_n[i, j] = (−1)^popcount(i & j) / sqrt(n), the Sylvester matrix written entry by entry."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)],
                        dtype=torch.float64) / math.sqrt(n)


def test_hadamard_matrix_is_the_signed_sylvester_matrix_and_orthogonal() -> None:
    plain = R.hadamard_matrix(16, None)
    assert torch.equal(plain.double(), _hadamard_by_definition(16))
    signed = R.hadamard_matrix(16, 0)
    signs = (signed / plain)[:, 0]
    assert torch.equal(signed, signs[:, None] * plain) and set(signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(signed @ signed.T, torch.eye(16))  # entries ±1/4: the products and sums are exact
    assert not torch.equal(R.hadamard_matrix(16, 1), signed)  # another seed, other signs
    with pytest.raises(ValueError, match="power of four"):
        R.hadamard_matrix(8)


def test_hadamard_transform_pads_runs_of_16_and_keeps_products() -> None:
    torch.manual_seed(2)
    x = torch.randn(5, 3, 40)
    t = F.hadamard_transform(x, seed=0)
    assert t.shape == (5, 3, 48) and t.dtype == torch.float32
    h = R.hadamard_matrix(16, 0).double()
    padded = torch.nn.functional.pad(x.double(), (0, 8))
    want = (padded.reshape(5, 3, 3, 16) @ h).reshape(5, 3, 48)
    assert torch.allclose(t.double(), want, rtol=0, atol=1e-6)  # float32 sums of 16 exact products
    # a unit vector picks one row of T: one nonzero term, so exact
    assert torch.equal(F.hadamard_transform(torch.eye(16), seed=0), R.hadamard_matrix(16, 0))
    g, a = torch.randn(64, 100), torch.randn(32, 100)  # Gᵀ [N, M], Aᵀ [K, M]: along the tokens M
    prod = F.hadamard_transform(g).double() @ F.hadamard_transform(a).double().T
    assert torch.allclose(prod, g.double() @ a.double().T, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="at least one dim"):
        F.hadamard_transform(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must have dtype in .*got torch.int32"):
        F.hadamard_transform(torch.ones(4, 16, dtype=torch.int32))


def _sqnr(ref: torch.Tensor, q: torch.Tensor) -> float:
    r = ref.double()
    return float(10 * torch.log10((r * r).sum() / ((r - q.double()) ** 2).sum()))


def test_nvfp4_train_is_nvfp4_in_fprop_and_the_training_recipe_in_the_backward() -> None:
    torch.manual_seed(3)
    A, W, G = torch.randn(200, 96), torch.randn(48, 96) * 0.05, torch.randn(200, 48) * 1e-3
    plain = S.run_strategy(S.STRATEGIES["nvfp4"], A, W, G, 6.0)
    train = S.run_strategy(S.STRATEGIES["nvfp4-train"], A, W, G, 6.0)
    assert torch.equal(train.gemms["fprop"], plain.gemms["fprop"])  # A and W round to nearest
    for key in ("activation", "weight"):
        assert torch.equal(train.operands[key][1], plain.operands[key][1])
    # the gradient's dgrad cast: nvfp4's scales, stochastically rounded with the dgrad seed
    qg = train.operands["grad_output"][1]
    st = F.quantize_scaled(G, "nvfp4", block=(1, 16), rounding="stochastic", seed=S.SR_SEEDS["dgrad"])
    assert torch.equal(qg, F.dequantize_scaled(st, torch.float32))
    assert torch.equal(train.gemms["dgrad"], qg @ plain.operands["weight"][1])
    # wgrad: Gᵀ and Aᵀ Hadamard-transformed along the 200 tokens (padded to 208), then 1x16 casts
    gt, at = F.hadamard_transform(G.T, S.RHT_SEED), F.hadamard_transform(A.T, S.RHT_SEED)
    assert gt.shape == (48, 208)
    qgt = F.quantize_scaled(gt, "nvfp4", block=(1, 16), rounding="stochastic", seed=S.SR_SEEDS["wgrad"]).dequantize()
    qat = F.quantize_scaled(at, "nvfp4", block=(1, 16)).dequantize()
    assert torch.equal(train.gemms["wgrad"], qgt @ qat.T)
    ref = S.reference_gemms(A, W, G)
    assert _sqnr(ref["wgrad"], train.gemms["wgrad"]) > 12.0  # NVFP4 with SR on N(0,1)-like data


def test_rht_spreads_a_token_outlier_inside_its_run_of_16() -> None:
    """What the transform does to a block: a lone large value becomes 16 values of equal magnitude, so
    the block's other values are no longer rounded against a 16x larger scale on their own."""
    x = torch.zeros(1, 16)
    x[0, 5] = 8.0
    t = F.hadamard_transform(x, seed=0)
    assert torch.equal(t.abs(), torch.full((1, 16), 2.0))  # 8 / sqrt(16), signs ±


def test_nvfp4_train_runs_in_analyze_the_replay_and_the_end_to_end_mode() -> None:
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    batches = [torch.randn(24, 32) for _ in range(2)]
    res = analyze(model, batches, "nvfp4,nvfp4-train", e2e=True)
    gemm = res.tables["gemm"]
    assert set(gemm["strategy"]) == {"nvfp4", "nvfp4-train"}
    both = gemm.pivot_table(index=["layer", "gemm"], columns="strategy", values="sqnr_db")
    fprop = both.xs("fprop", level="gemm")
    assert (fprop["nvfp4"] == fprop["nvfp4-train"]).all()
    assert (both.xs("dgrad", level="gemm")["nvfp4"] != both.xs("dgrad", level="gemm")["nvfp4-train"]).all()
    again = analyze(model, batches, "nvfp4-train", e2e=False).tables["gemm"]
    mine = gemm[gemm["strategy"] == "nvfp4-train"].reset_index(drop=True)
    assert mine["sqnr_db"].tolist() == again["sqnr_db"].tolist()  # reproducible: no generator state
    e2e = res.tables.get("e2e")
    assert e2e is not None and "nvfp4-train" in set(e2e["strategy"])


def test_stochastic_rounding_and_the_transform_give_the_same_bits_on_every_device(device: str) -> None:
    """Counter-based random numbers and the butterfly's fixed order of adds: a GPU run equals the CPU's."""
    torch.manual_seed(5)
    x = torch.randn(48, 80) * 4
    x[3, 7] = 300.0
    for fmt, block in (("nvfp4", (1, 16)), ("mxfp4-e2m1", (1, 32)), ("mxfp6-e3m2", (1, 32))):
        cpu = F.quantize_scaled(x, fmt, block=block, rounding="stochastic", seed=9)
        dev = F.quantize_scaled(x.to(device), fmt, block=block, rounding="stochastic", seed=9)
        assert torch.equal(dev.data.cpu(), cpu.data) and torch.equal(dev.scale.cpu(), cpu.scale), fmt
    assert torch.equal(F.hadamard_transform(x.to(device), seed=0).cpu(), F.hadamard_transform(x, seed=0))
    G = torch.randn(40, 24)
    for stage in ("dgrad", "wgrad"):
        y = F.hadamard_transform(G.T) if stage == "wgrad" else G
        q_cpu = S._fq_slices(y, "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS[stage])[0]
        q_dev = S._fq_slices(y.to(device), "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS[stage])[0]
        assert torch.equal(q_dev.cpu(), q_cpu), stage


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4-e2m1", "mxfp6-e3m2"])
def test_stacked_stochastic_cast_is_the_slice_by_slice_one(fmt: str, monkeypatch) -> None:
    """A batched operand's stochastically rounded 1×bc cast runs as one stacked reference call: the same q,
    mask and block records as casting each slice alone (its own tensor scale, its own numbers from 0)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 12, 40, generator=g) * torch.logspace(-3, 2, 5)[:, None, None]  # slices of other ranges
    x[2, 3, 7] = float("nan")
    x[4, 0, 1] = float("inf")
    block = (1, 16) if fmt == "nvfp4" else (1, 32)
    calls = []
    real = R.quantize_scaled
    monkeypatch.setattr(R, "quantize_scaled", lambda *a, **k: calls.append(1) or real(*a, **k))
    q, sat, recs = S._cast_slices(x, fmt, "block", block, sr_seed=3)
    assert len(calls) == 1  # one stacked cast, not one per slice
    monkeypatch.setattr(R, "quantize_scaled", real)
    for i in range(x.shape[0]):
        qi, si, ri = S._cast(x[i], fmt, "block", block, sr_seed=3)
        assert torch.equal(q[i].view(torch.int32), qi.view(torch.int32)) and torch.equal(sat[i], si), (fmt, i)
        for a, b in zip(recs[i], ri, strict=True):
            same = torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.dtype == torch.float32 else torch.equal(a, b)
            assert same, (fmt, i)
    assert not torch.equal(q[0], S._cast(x[0], fmt, "block", block)[0])  # (stochastic, not nearest)
