"""Stochastic rounding of the 4/6-bit scaled casts in C (fp8probe/_fastpath.c, "stochastic rounding" at sr_mix32 and
"scaled casts: stochastic rounding, AVX2") against the PyTorch reference (reference.quantize_scaled with
rounding="stochastic"), bit for bit: codes and scales of quantize_scaled; q, saturation mask, scales and tile
counts of fused_scaled; period_rows and per-row NVFP4 tensor scales; transposed inputs; 1-3 threads; the
AVX2 and the scalar loops (the ``isa`` fixture); and the analysis casts that route to them."""
from __future__ import annotations

import pytest
import torch

from fp8probe import functional as F
from fp8probe.analysis import strategies as S
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from support import raw, same_bits, scatter_specials

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")

LOWBIT = ("mxfp4-e2m1", "mxfp6-e2m3", "mxfp6-e3m2", "nvfp4")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: (block_rows, block_cols) at the backend level; None stands for the whole rows / columns (row, tensor)
TILES = ((1, 16), (1, 32), (16, 16), (32, 32), (1, None), (None, None))
R, C = 37, 100  # partial tiles at both ends for every tile above
_F32 = torch.float32
# the reference itself: the no_fallback fixture replaces the module's attributes while a test runs
_REF_QUANTIZE = ref.quantize_scaled
_REF_DEQUANTIZE = ref.dequantize_scaled


def on_grid(rows: int, cols: int, fmt: str, seed: int, span: int = 20) -> torch.Tensor:
    """float32 [rows, cols]: per row a power of two 2**k times, per element, one of the element format's grid
    values, the midpoint of two neighbouring ones (a tie for nearest rounding), or a random value in range;
    so that with the row's scale 2**k (MX floor) the cast sees exact grid values, exact midpoints and the rest;
    k in [-span, span)."""
    g = torch.Generator().manual_seed(seed)
    grid = ref._lowbit_table(ref.ELEMENT_OF[fmt])
    grid = grid[: grid.numel() // 2]  # the non-negative codes, ascending
    mids = (grid[:-1] + grid[1:]) * 0.5
    pick = torch.randint(0, 3, (rows, cols), generator=g)
    vals = torch.where(pick == 0, grid[torch.randint(0, grid.numel(), (rows, cols), generator=g)],
                       torch.where(pick == 1, mids[torch.randint(0, mids.numel(), (rows, cols), generator=g)],
                                   torch.rand(rows, cols, generator=g) * grid[-1]))
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    k = torch.randint(-span, span, (rows, 1), generator=g).float()
    return vals * sign * torch.exp2(k)


def data(fmt: str, dtype: torch.dtype, seed: int, specials: bool, transposed: bool = False,
         shape: tuple[int, int] = (R, C)) -> torch.Tensor:
    """Fresh seeded [rows, cols] input of `dtype`: grid values, ties and random values (on_grid), a zero row, and
    with ``specials`` NaN/±Inf/subnormals/-0 (scatter_specials); else only zeros, -0 and subnormals added. A
    transposed view (x.mT contiguous) with ``transposed``."""
    rows, cols = shape
    x = on_grid(rows, cols, fmt, seed, span=10 if dtype == torch.float16 else 20)  # (fp16: 28·2**10 < 65504)
    x[rows // 2] = 0.0
    if specials:
        x = scatter_specials(x.to(dtype), seed).float()
    else:
        sub = 3 * 2.0**-24 if dtype == torch.float16 else 1e-40
        x.view(-1)[5::97] = sub
        x.view(-1)[7::89] = -sub
        x.view(-1)[11::83] = -0.0
    x = x.to(dtype)
    return x.mT.contiguous().mT if transposed else x


def tile(t: tuple[int | None, int | None]) -> tuple[int, int]:
    return (t[0] or R, t[1] or C)


def rules(fmt: str) -> tuple[str, ...]:
    return ref.SCALE_RULES if fmt in ref.MX_FORMATS else ("floor",)


def reference_fused(x: torch.Tensor, fmt: str, br: int, bc: int, rule: str, seed: int | None,
                    period: int | None = None, g: torch.Tensor | None = None):
    """(q, saturated, scale, records) of the reference ops: what fused_scaled must give (seed None: nearest)."""
    if fmt == "nvfp4" and g is None:
        g = ref.nvfp4_global_scale(x)
    rounding = "nearest" if seed is None else "stochastic"
    codes, scale = _REF_QUANTIZE(x, fmt, br, bc, rule, g, rounding, seed or 0, period)
    q = _REF_DEQUANTIZE(codes, scale, br, bc, _F32, fmt, g)
    x32 = x.to(_F32)
    sat = S._saturated(ref.element_values(codes, fmt), x32, q, fmt)
    rec = S.tile_records(x32, q, sat, scale if g is None else scale * g, (br, bc))
    return q, sat, scale, rec


def assert_fused_equal(got: cpu.FusedScaled | None, want: tuple, fmt: str) -> None:
    q, sat, scale, rec = want
    assert got is not None
    assert same_bits(got.q, q) and torch.equal(got.saturated, sat) and same_bits(got.scale, scale)
    nonzero, underflow, saturated = got.counts
    assert torch.equal(nonzero, rec[2]) and torch.equal(underflow, rec[3]) and torch.equal(saturated > 0, rec[4])
    assert (got.global_scale is not None) == (fmt == "nvfp4")


@pytest.mark.parametrize("transposed", (False, True), ids=("contiguous", "transposed"))
@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LOWBIT)
def test_quantize_scaled_is_the_reference(isa, no_fallback, fmt, dtype, tiles, transposed) -> None:
    """Codes and scales of every 4/6-bit format, scale rule, tiling (partial tiles), dtype and layout, NaN/±Inf,
    zeros, subnormals, grid values and ties included; and they are stochastic (differ from nearest somewhere)."""
    x = data(fmt, dtype, seed=len(fmt) + 7 * DTYPES.index(dtype), specials=True, transposed=transposed)
    br, bc = tile(tiles)
    g = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
    for rule in rules(fmt):
        got_codes, got_scale = cpu.quantize_scaled(x, fmt, br, bc, rule, g, "stochastic", 12345)
        want_codes, want_scale = _REF_QUANTIZE(x, fmt, br, bc, rule, g, "stochastic", 12345)
        assert same_bits(got_codes, want_codes) and same_bits(got_scale, want_scale), rule
        assert not torch.equal(got_codes, _REF_QUANTIZE(x, fmt, br, bc, rule, g)[0])


@pytest.mark.parametrize("transposed", (False, True), ids=("contiguous", "transposed"))
@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LOWBIT)
def test_fused_scaled_is_the_reference(isa, fmt, dtype, tiles, transposed) -> None:
    """q, saturation mask, scales and per-tile counts of the fused cast equal the reference ops' (zeros, -0,
    subnormals, grid values and ties; NVFP4's tensor scale computed from x); a NaN/Inf input gives None
    (NaN scale: the caller runs the ops)."""
    x = data(fmt, dtype, seed=3 + len(fmt) + 5 * DTYPES.index(dtype), specials=False, transposed=transposed)
    br, bc = tile(tiles)
    for rule in rules(fmt):
        got = cpu.fused_scaled(x, fmt, br, bc, rule, "stochastic", 777)
        assert_fused_equal(got, reference_fused(x, fmt, br, bc, rule, 777), fmt)
        if fmt == "nvfp4":
            assert same_bits(got.global_scale, ref.nvfp4_global_scale(x))
    bad = x.clone()
    bad[1, 2] = float("nan")
    assert cpu.fused_scaled(bad, fmt, br, bc, "floor", "stochastic", 777) is None


@pytest.mark.parametrize("transposed", (False, True), ids=("contiguous", "transposed"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", LOWBIT)
def test_period_rows_and_per_row_tensor_scales(isa, no_fallback, fmt, dtype, transposed) -> None:
    """A stack of 5 slices of 12 rows (period_rows=12: each slice draws its numbers from 0) with, for NVFP4, each
    slice's own tensor scale as [R, 1] global_scale: quantize_scaled and fused_scaled equal the reference, and
    each slice's codes equal casting the slice alone."""
    bt, rows, cols = 5, 12, 40
    x = torch.cat([data(fmt, dtype, seed=20 + i, specials=False, shape=(rows, cols)) * 4.0**(i - 2)
                   for i in range(bt)])
    if transposed:
        x = x.mT.contiguous().mT
    bc = 16 if fmt == "nvfp4" else 32
    g = None
    if fmt == "nvfp4":
        g = torch.stack([ref.nvfp4_global_scale(x[i * rows:(i + 1) * rows]) for i in range(bt)])
        g = g.repeat_interleave(rows).reshape(-1, 1)
    got_codes, got_scale = cpu.quantize_scaled(x, fmt, 1, bc, "floor", g, "stochastic", 9, rows)
    want_codes, want_scale = _REF_QUANTIZE(x, fmt, 1, bc, "floor", g, "stochastic", 9, rows)
    assert same_bits(got_codes, want_codes) and same_bits(got_scale, want_scale)
    for i in range(bt):
        gi = None if g is None else g[i * rows]
        alone = _REF_QUANTIZE(x[i * rows:(i + 1) * rows], fmt, 1, bc, "floor", gi, "stochastic", 9)[0]
        assert torch.equal(got_codes[i * rows:(i + 1) * rows], alone), i
    fused = cpu.fused_scaled(x, fmt, 1, bc, "floor", "stochastic", 9, rows, g)
    assert_fused_equal(fused, reference_fused(x, fmt, 1, bc, "floor", 9, rows, g), fmt)
    if g is not None:
        assert fused.global_scale.shape == (bt * rows, 1) and same_bits(fused.global_scale, g)
        nearest = cpu.quantize_scaled(x, fmt, 1, bc, "floor", g)  # per-row scales with nearest rounding too
        want = _REF_QUANTIZE(x, fmt, 1, bc, "floor", g)
        assert same_bits(nearest[0], want[0]) and same_bits(nearest[1], want[1])
        fused = cpu.fused_scaled(x, fmt, 1, bc, "floor", global_scale=g)
        assert_fused_equal(fused, reference_fused(x, fmt, 1, bc, "floor", None, None, g), fmt)
        assert same_bits(fused.global_scale, g)


@pytest.mark.parametrize("transposed", (False, True), ids=("contiguous", "transposed"))
@pytest.mark.parametrize("fmt", ("mxfp4-e2m1", "nvfp4"))
def test_threads_change_no_bit(isa, fmt, transposed) -> None:
    """Above the serial cutoff (64K elements) the work splits over threads; every split gives the reference's
    bits, since an element's number is a function of its index alone."""
    x = data(fmt, torch.float32, seed=31, specials=False, shape=(320, 520), transposed=transposed)
    want_codes, want_scale = _REF_QUANTIZE(x, fmt, 1, 16 if fmt == "nvfp4" else 32, "floor",
                                           ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None, "stochastic", 4)
    want_fused = reference_fused(x, fmt, 16, 16, "floor", 4)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            st = F.quantize_scaled(x, fmt, rounding="stochastic", seed=4)
            assert same_bits(st.data, want_codes) and same_bits(st.scale, want_scale), n
            assert_fused_equal(cpu.fused_scaled(x, fmt, 16, 16, "floor", "stochastic", 4), want_fused, fmt)
    finally:
        torch.set_num_threads(threads)


def _mix32_inverse(h: int) -> int:
    """The h with reference._mix32(h) == the given value (lowbias32 is a bijection of [0, 2**32))."""
    m32 = 0xFFFFFFFF
    h ^= h >> 16
    h = (h * pow(0x846CA68B, -1, 1 << 32)) & m32
    h ^= (h >> 15) ^ (h >> 30)
    h = (h * pow(0x7FEB352D, -1, 1 << 32)) & m32
    return h ^ (h >> 16)


def test_counter_wraps_around_at_2_32(isa) -> None:
    """A seed whose key is 2**32 - 100: the counters key + index pass 2**32 inside the tensor and wrap (mod 2**32)
    exactly as the reference's."""
    key = 2**32 - 100
    seed = _mix32_inverse(key) ^ 0x9E3779B9
    assert ref._mix32((seed & 0xFFFFFFFF) ^ 0x9E3779B9) == key
    x = data("nvfp4", torch.float32, seed=8, specials=False)
    g = ref.nvfp4_global_scale(x)
    got = cpu.quantize_scaled(x, "nvfp4", 1, 16, "floor", g, "stochastic", seed)
    want = _REF_QUANTIZE(x, "nvfp4", 1, 16, "floor", g, "stochastic", seed)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
    assert_fused_equal(cpu.fused_scaled(x, "nvfp4", 1, 16, "floor", "stochastic", seed),
                       reference_fused(x, "nvfp4", 1, 16, "floor", seed), "nvfp4")


def _strategy_casts() -> list[torch.Tensor]:
    """The nvfp4-train casts of the output gradient: 2-D (dgrad), transposed (wgrad's Gᵀ), batched (stacked
    slices, per-slice tensor scales), batched transposed; and an MXFP4 batched one."""
    g = torch.Generator().manual_seed(17)
    G2 = torch.randn(48, 40, generator=g) * 3
    G3 = torch.randn(4, 24, 40, generator=g) * torch.logspace(-2, 2, 4)[:, None, None]
    out = [S._cast(G2, "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS["dgrad"]),
           S._cast_slices(G2.mT, "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS["wgrad"]),
           S._cast_slices(G3, "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS["dgrad"]),
           S._cast_slices(G3.mT, "nvfp4", *S._NV_1D, sr_seed=S.SR_SEEDS["wgrad"]),
           S._cast_slices(G3, "mxfp4-e2m1", *S._MX, sr_seed=5)]
    flat = []
    for q, sat, recs in out:
        flat += [raw(q), sat]
        for rec in recs if isinstance(recs, list) else [recs]:
            flat += [raw(t) if t.dtype == _F32 else t for t in rec]
    st = F.quantize_scaled(G2, "nvfp4", block=(1, 16), rounding="stochastic", seed=3)
    return flat + [st.data, raw(st.scale), raw(st.global_scale)]


def test_strategy_casts_run_in_c_and_equal_the_reference_path(monkeypatch) -> None:
    """With the extension on, the nvfp4-train casts (strategies._cast, _cast_slices' stacked cast, transposed
    operands) and functional.quantize_scaled never reach the reference's random numbers, and give what the
    reference path (FP8PROBE_BACKEND=reference) gives."""
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    want = _strategy_casts()
    monkeypatch.delenv("FP8PROBE_BACKEND")

    def boom(*args, **kwargs):
        raise AssertionError("a stochastic cast fell back to the reference")
    monkeypatch.setattr(ref, "stochastic_uniform", boom)
    got = _strategy_casts()
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and torch.equal(a, b), i


def test_reference_backend_keeps_the_torch_path(monkeypatch) -> None:
    """FP8PROBE_BACKEND=reference: the stochastic casts run the reference (its random numbers are drawn)."""
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    drawn = []
    real = ref.stochastic_uniform
    monkeypatch.setattr(ref, "stochastic_uniform", lambda *a, **k: drawn.append(1) or real(*a, **k))
    S._cast(torch.randn(16, 32), "nvfp4", *S._NV_1D, sr_seed=1)
    F.quantize_scaled(torch.randn(16, 32), "mxfp4-e2m1", rounding="stochastic", seed=1)
    assert len(drawn) == 2


def test_bad_arguments_are_refused() -> None:
    """The C entry points refuse stochastic rounding of FP8 formats, periods that do not divide the rows and
    per-row tensor scales outside NVFP4 1×bc tiles; the Python kernel
    hands bad periods to the reference, which raises."""
    ext = cpu._ext()
    x = torch.randn(8, 32)
    codes = torch.empty(8, 32, dtype=torch.uint8)
    scale = torch.empty(8, 2)
    g = torch.ones(8)
    args = (x.data_ptr(), 0, 8, 32, 1, 16)
    with pytest.raises(ValueError, match="expected a 4/6-bit format for stochastic rounding, got fmt=0"):
        ext.quantize_scaled(*args, 0, codes.data_ptr(), scale.data_ptr(), 1, 0, 0, 1.0, False, True, 1, 8, 0)
    with pytest.raises(ValueError, match="expected period_rows dividing the 8 rows, got 3"):
        ext.quantize_scaled(*args, 7, codes.data_ptr(), scale.data_ptr(), 1, 0, 0, 1.0, False, True, 1, 3, 0)
    with pytest.raises(ValueError, match="expected nvfp4 with 1 x bc tiles for per-row tensor scales, got fmt=6"):
        ext.quantize_scaled(*args, 6, codes.data_ptr(), scale.data_ptr(), 1, 0, 0, 1.0, False, True, 1, 8,
                            g.data_ptr())
    q, sat, counts = torch.empty(8, 32), torch.empty(8, 32, dtype=torch.bool), torch.empty(3, 16, dtype=torch.int64)
    with pytest.raises(ValueError, match="expected nvfp4 with 1 x bc tiles for per-row tensor scales, got fmt=6"):
        ext.fused_scaled(*args, 6, q.data_ptr(), sat.data_ptr(), scale.data_ptr(), counts.data_ptr(), 1, 0, False,
                         False, 1, 8, g.data_ptr())
    with pytest.raises(ValueError, match="expected period_rows dividing the 8 rows, got 3"):
        cpu.quantize_scaled(x, "nvfp4", 1, 16, rounding="stochastic", seed=1, period_rows=3)
    assert cpu.fused_scaled(x, "nvfp4", 1, 16, rounding="stochastic", seed=1, period_rows=3) is None
    with pytest.raises(ValueError, match="expected rounding 'nearest'"):
        cpu.quantize_scaled(x, "e4m3", 1, 16, rounding="stochastic")


@pytest.mark.parametrize("fmt,seed", [("nvfp4", 7), ("mxfp4-e2m1", 7), ("mxfp6-e2m3", 7), ("nvfp4", None)],
                         ids=["nvfp4", "mxfp4-e2m1", "mxfp6-e2m3", "nvfp4-nearest"])
def test_stacked_cast_in_c_is_the_slice_by_slice_one(isa, fmt, seed, monkeypatch) -> None:
    """_cast_slices' stacked 1×bc cast, stochastic or NVFP4 to nearest (one fused C call, per-slice NVFP4 tensor
    scales from reference.nvfp4_global_scale(slices=)), gives each slice's own _cast: q, mask and block records,
    contiguous and transposed stacks; the reference's random numbers and ops are never used."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(6, 20, 48, generator=g) * torch.logspace(-3, 3, 6)[:, None, None]
    x[3] = 0.0  # a zero slice: tensor scale 1
    block = (1, 16) if fmt == "nvfp4" else (1, 32)
    calls = []
    real = cpu.fused_scaled
    monkeypatch.setattr(cpu, "fused_scaled", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(ref, "stochastic_uniform", lambda *a, **k: pytest.fail("the reference's numbers were drawn"))
    for stack in (x, x.transpose(1, 2).contiguous().mT):
        calls.clear()
        q, sat, recs = S._cast_slices(stack, fmt, "block", block, sr_seed=seed)
        assert calls == [(6 * 20, 48)]  # one C call for the stack
        for i in range(stack.shape[0]):
            qi, si, ri = S._cast(stack[i].contiguous(), fmt, "block", block, sr_seed=seed)
            assert same_bits(q[i], qi) and torch.equal(sat[i], si), i
            for a, b in zip(recs[i], ri, strict=True):
                assert torch.equal(raw(a), raw(b)), i


def test_per_slice_tensor_scales_are_each_slice_alone() -> None:
    """reference.nvfp4_global_scale(x, slices=k): float32 [k], each the scale of one slice alone (NaN/±Inf
    ignored, a zero slice 1), every dtype, and the C passes' cpu.nvfp4_global_scale the same bits (a transposed
    stack too); slices that do not divide x are refused."""
    g = torch.Generator().manual_seed(29)
    x = torch.randn(6, 5, 7, generator=g) * torch.logspace(-3, 3, 6)[:, None, None]
    x[2, 1, 1], x[4, 0, 0], x[3] = float("nan"), float("inf"), 0.0
    for dtype in DTYPES:
        y = x.to(dtype)
        want = torch.stack([ref.nvfp4_global_scale(y[i]) for i in range(6)])
        assert same_bits(ref.nvfp4_global_scale(y, slices=6), want)
        assert same_bits(cpu.nvfp4_global_scale(y, slices=6), want)
        yt = y.transpose(1, 2).contiguous().mT  # the same values, stored transposed
        assert same_bits(cpu.nvfp4_global_scale(yt, slices=6), want)
        assert same_bits(cpu.nvfp4_global_scale(y), ref.nvfp4_global_scale(y))
    with pytest.raises(ValueError, match="expected slices dividing the 210 elements, got 4"):
        ref.nvfp4_global_scale(x, slices=4)
    with pytest.raises(ValueError, match="expected slices dividing the 210 elements, got 4"):
        cpu.nvfp4_global_scale(x, slices=4)


def test_functional_takes_the_c_kernel_where_a_nearest_cast_does(monkeypatch) -> None:
    """functional.quantize_scaled with rounding="stochastic" runs the C kernel for plain CPU tensors, autograd-tracked
    ones included (a nearest cast's op call reaches the C kernel through the dispatcher there too), with the
    reference's bits."""
    x = torch.randn(24, 64, requires_grad=True)
    want = _REF_QUANTIZE(x.detach(), "nvfp4", 1, 16, "floor", ref.nvfp4_global_scale(x.detach()), "stochastic", 2)
    monkeypatch.setattr(ref, "stochastic_uniform", lambda *a, **k: pytest.fail("the reference's numbers were drawn"))
    for t in (x, x.detach()):
        st = F.quantize_scaled(t, "nvfp4", block=(1, 16), rounding="stochastic", seed=2)
        assert same_bits(st.data, want[0]) and same_bits(st.scale, want[1])


def test_stacked_nvfp4_cast_off_the_c_path_is_the_slice_by_slice_one(monkeypatch) -> None:
    """Where the C cast does not apply (FP8PROBE_BACKEND=reference, as on a GPU) the stacked NVFP4 cast runs the
    reference once over the stack with per-row tensor scales: each slice's q, mask and records equal its own cast,
    a slice with ±Inf (NaN block scales) and a zero slice included."""
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, 48, generator=g) * torch.logspace(-3, 3, 5)[:, None, None]
    x[1, 2, 3], x[2] = float("inf"), 0.0
    q, sat, recs = S._cast_slices(x, "nvfp4", "block", (1, 16))
    for i in range(5):
        qi, si, ri = S._cast(x[i].contiguous(), "nvfp4", "block", (1, 16))
        assert same_bits(q[i], qi) and torch.equal(sat[i], si), i
        for a, b in zip(recs[i], ri, strict=True):
            assert torch.equal(raw(a), raw(b)), i
