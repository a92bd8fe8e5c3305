"""The hand-written AVX2 loops of the scaled casts (fp8probe/_fastpath.c, "scaled casts: AVX2 element loops")
against the PyTorch reference, bit for bit, where they differ from the scalar loops: x * (1/s) for scales
whose reciprocal is exact, the arithmetic FP8 decode, the 32/8-lane loops and their scalar tails, the
16-bit amax lanes, and the split over 1, 2 and 3 threads. Every test runs the AVX2 and the scalar loops
(the ``isa`` fixture)."""
from __future__ import annotations

import pytest
import torch

from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from fp8probe.formats import FORMATS
from support import raw, same_bits

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
_REF_QUANTIZE = ref.quantize_scaled
_REF_DEQUANTIZE = ref.dequantize_scaled


def every_kind_of_float(n: int, seed: int) -> torch.Tensor:
    """n float32 values of every exponent (subnormals included) and both signs, plus ±0, ±Inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32).clone()
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45])[:n]
    return x


def mixed(n: int, seed: int) -> torch.Tensor:
    """n float32 values within 2**±12 of 1 (most keep a normal code), one in 8 a float of any exponent."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-12, 12, (n,), generator=g).float())
    pick = torch.rand(n, generator=g) < 0.125
    return torch.where(pick, every_kind_of_float(n, seed), x)


def test_division_by_a_power_of_two_equals_multiplication_by_its_reciprocal() -> None:
    """The identity the AVX2 encode relies on (x / s == x * (1/s) bit for bit when 1/s is an exact normal
    float), checked with torch's own float32 division and multiplication over every power of two whose
    reciprocal is normal and values of every exponent, subnormal and overflowing results included."""
    x = every_kind_of_float(4096, seed=1)
    for k in range(-126 - 1, 127):  # s = 2**-127 is subnormal, its reciprocal 2**127 normal
        s = torch.tensor(2.0**k, dtype=torch.float32)
        r = 1.0 / s
        assert r.item() * s.item() == 1.0
        q, p = x / s, x * r
        assert torch.equal(torch.isnan(q), torch.isnan(p)), k
        assert torch.equal(raw(q)[~torch.isnan(q)], raw(p)[~torch.isnan(p)]), k


@pytest.mark.parametrize("fmt", ("e4m3", "e5m2"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_power_of_two_scales_of_every_exponent(isa, no_fallback, fmt: str, dtype: torch.dtype) -> None:
    """Per-row tiles whose amax is fmt max · 2**k, so the scale is exactly 2**k: a normal reciprocal (x * 1/s),
    2**-127 (subnormal scale, normal reciprocal) and 2**-149..-128 (reciprocal overflows: the division
    stays); the other elements are random floats of every exponent. Codes and scales equal the reference's."""
    fmax = 448.0 if fmt == "e4m3" else 57344.0
    ks = [k for k in range(-149, 120) if fmax * 2.0**k < torch.finfo(dtype).max]
    g = torch.Generator().manual_seed(2)
    width = 45  # 32 + 8 + a 5-element tail
    amax = torch.tensor([fmax * 2.0**k for k in ks], dtype=torch.float64)
    u = (torch.rand(len(ks), width, generator=g, dtype=torch.float64) * 2 - 1) * torch.exp2(
        -torch.randint(0, 40, (len(ks), width), generator=g).double())  # |u| < 1, of many exponents
    rows = (u * amax[:, None]).float()
    rows[:, 7] = amax.float()
    x = rows.to(dtype)
    x = x[x.float().abs().amax(1).double() == amax]  # the rows whose amax the dtype holds exactly
    data, scale = cpu.quantize_scaled(x, fmt, 1, width)
    want_d, want_s = _REF_QUANTIZE(x, fmt, 1, width)
    assert same_bits(data, want_d) and same_bits(scale, want_s)
    assert x.shape[0] >= 38 and torch.equal(scale[:, 0], torch.exp2(torch.log2(scale[:, 0]).round()))
    if dtype == torch.float32:  # every scale 2**-149 (reciprocal overflows) .. 2**-127 .. the largest ran
        assert scale.min().item() == 2.0**-149 and scale.max().item() == 2.0**ks[-1]


@pytest.mark.parametrize("fmt", ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2"))
def test_run_lengths_around_the_vector_widths(isa, no_fallback, fmt: str) -> None:
    """Rows of 1..70 elements as one tile (the 32- and 8-lane loops, the scalar tail, each alone and
    together), with every kind of float; all three dtypes; quantize, dequantize and the fused cast."""
    for n in list(range(1, 41)) + [63, 64, 65, 70]:
        x32 = mixed(3 * n, seed=n).view(3, n)
        x32 = torch.where(torch.isnan(x32), 1.0, x32)  # NaN inputs: fused falls back (tested elsewhere)
        tile = (1, 32) if fmt.startswith("mx") else (1, n)
        for dtype in DTYPES:
            x = x32.to(dtype)
            data, scale = cpu.quantize_scaled(x, fmt, *tile)
            want_d, want_s = _REF_QUANTIZE(x, fmt, *tile)
            assert same_bits(data, want_d) and same_bits(scale, want_s), (n, dtype)
            if not torch.isnan(data.float()).any():
                assert same_bits(cpu.dequantize_scaled(data, scale, *tile, dtype),
                                 _REF_DEQUANTIZE(data, scale, *tile, dtype)), (n, dtype)
            got = cpu.fused_scaled(x, fmt, *tile)
            d32, s32 = _REF_QUANTIZE(x.float(), fmt, *tile)
            assert got is not None and same_bits(got.q, _REF_DEQUANTIZE(d32, s32, *tile, torch.float32)), (n, dtype)


@pytest.mark.parametrize("fmt", ("e4m3", "e5m2"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_every_code(isa, fmt: str, out_dtype: torch.dtype, monkeypatch) -> None:
    """Every non-NaN code of the format (arithmetic decode in the AVX2 loop) times scales that keep it
    exact, round it, make fp16/bf16 subnormals and overflow to Inf; 8-lane runs and a 3-element tail."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(FP8[fmt]).float()
    codes = codes[~torch.isnan(vals)]
    n = codes.numel()
    scales = torch.tensor([1.0, 2.0**-20, 1.1, 3.7e-5, 1e-30, 2.0**100, 1e35, 7.0], dtype=torch.float32)
    data = codes.repeat(len(scales), 1).view(FP8[fmt])
    data = torch.cat([data, data[:, :3]], dim=1)
    scale = scales[:, None]
    calls = []
    monkeypatch.setattr(cpu._ref, "dequantize_scaled", lambda *a: calls.append(a) or _REF_DEQUANTIZE(*a))
    got = cpu.dequantize_scaled(data, scale, 1, n + 3, out_dtype)
    assert not calls, "non-NaN codes must not fall back"
    assert same_bits(got, _REF_DEQUANTIZE(data, scale, 1, n + 3, out_dtype))


def test_dequantize_with_a_table_unlike_torchs_decoding_gathers(isa, monkeypatch) -> None:
    """A decode table that is not the FP8 decoding (the 4/6-bit values) takes the gather loop: the codes
    come out as that table's values, not as FP8 values."""
    x = every_kind_of_float(40 * 64, seed=5).view(40, 64)
    x = torch.where(torch.isfinite(x), x, 2.0)
    data, scale = _REF_QUANTIZE(x, "mxfp4-e2m1", 1, 32)
    monkeypatch.setattr(cpu._ref, "dequantize_scaled", lambda *a: pytest.fail("fell back"))
    got = cpu.dequantize_scaled(data, scale, 1, 32, torch.float32, "mxfp4-e2m1")
    assert same_bits(got, _REF_DEQUANTIZE(data, scale, 1, 32, torch.float32, "mxfp4-e2m1"))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_amax_of_16_bit_inputs_from_every_pattern_position(isa, no_fallback, dtype: torch.dtype) -> None:
    """The 16-lane amax of fp16/bf16 tiles: the largest finite |x| in each of the 16 lanes and in the tail,
    next to Inf/NaN patterns that must not count."""
    n = 16 * 3 + 5
    base = torch.full((n, n), 0.5)
    base[torch.arange(n), torch.arange(n)] = 3.0  # row i: its max at position i
    base[:, (torch.arange(n) + 7) % n] = float("inf")
    base[::2, (torch.arange(0, n, 2) + 9) % n] = float("nan")
    x = base.to(dtype)
    for fmt, tile in (("e4m3", (1, n)), ("e5m2", (1, n)), ("mxfp8-e4m3", (1, 32)), ("mxfp6-e2m3", (1, 32))):
        data, scale = cpu.quantize_scaled(x, fmt, *tile)
        want_d, want_s = _REF_QUANTIZE(x, fmt, *tile)
        assert same_bits(data, want_d) and same_bits(scale, want_s), fmt


@pytest.mark.parametrize("threads", (1, 2, 3))
def test_any_thread_count_gives_the_same_bits(isa, no_fallback, threads: int, monkeypatch) -> None:
    """Above the serial cutoff (64K elements) the work is split over 1, 2 or 3 threads: every scaled cast
    equals the reference (quantize, dequantize) and the one-thread fused result."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(301, 577, generator=g) * torch.exp2(torch.linspace(-30, 30, 577))[None, :]
    x[5, 9], x[17, 100] = 0.0, 1e-42
    monkeypatch.setattr(cpu, "_threads", lambda n: 1)
    one = {c: cpu.fused_scaled(x, *c) for c in (("e4m3", 128, 128), ("mxfp8-e4m3", 1, 32), ("nvfp4", 1, 16))}
    monkeypatch.setattr(cpu, "_threads", lambda n: threads)
    for fmt, br, bc in (("e4m3", 10**9, 10**9), ("e4m3", 128, 128), ("e5m2", 1, 128), ("mxfp8-e4m3", 1, 32),
                        ("mxfp4-e2m1", 1, 32), ("nvfp4", 1, 16)):
        g_scale = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
        data, scale = cpu.quantize_scaled(x, fmt, br, bc, "floor", g_scale)
        want_d, want_s = _REF_QUANTIZE(x, fmt, br, bc, "floor", g_scale)
        assert same_bits(data, want_d) and same_bits(scale, want_s), fmt
        assert same_bits(cpu.dequantize_scaled(data, scale, br, bc, torch.float32, fmt, g_scale),
                         _REF_DEQUANTIZE(data, scale, br, bc, torch.float32, fmt, g_scale)), fmt
    for c, want in one.items():
        got = cpu.fused_scaled(x, *c)
        assert same_bits(got.q, want.q) and torch.equal(got.saturated, want.saturated), c
        assert same_bits(got.scale, want.scale) and torch.equal(got.counts, want.counts), c


@pytest.mark.parametrize("rule", ("floor", "rceil", "even"))
@pytest.mark.parametrize("fmt", ref.MX_FORMATS)
def test_mx_scales_eight_tiles_at_a_time(isa, no_fallback, fmt: str, rule: str) -> None:
    """Rows of 61 MX tiles (7 groups of 8 and a tail of 5) whose amax is a random float32 of any exponent,
    0 (scale 1), a float32 subnormal (its group goes to the scalar scale code) or the EVEN/RCEIL
    boundaries; 4/6-bit formats with a NaN in some tiles (NaN scale): scales and codes equal the reference's."""
    g = torch.Generator().manual_seed(7)
    ntiles, rows = 61, 200
    a = torch.randint(0x00800000, 0x7F800000, (rows * ntiles,), generator=g, dtype=torch.int64)
    a = a.to(torch.int32).view(torch.float32)
    a[::17] = 0.0
    a[5::97] = torch.tensor(1e-40)
    edges = torch.tensor([448.0, 511.99, 512.0, 6.0, 7.0, 7.5, 7.75, 28.0, 30.0, 31.0, 57344.0, 61440.0, 3.4e38,
                          1.5, 1.75, 1.875, 1.9375])
    a[1 : 1 + 3 * len(edges) : 3] = edges.repeat(1)
    x = (a[:, None] * torch.linspace(-1, 1, 32)[None, :]).view(rows, ntiles * 32)  # tile amax = a (at the ends)
    if fmt in ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1"):
        x[3, 40], x[9, 700] = float("nan"), float("inf")
    data, scale = cpu.quantize_scaled(x, fmt, 1, 32, rule)
    want_d, want_s = _REF_QUANTIZE(x, fmt, 1, 32, rule)
    assert same_bits(scale, want_s) and same_bits(data, want_d)
    finite = torch.isfinite(x).view(-1, 32).all(1)
    assert same_bits(scale.view(-1)[finite], ref.mx_scale(a[finite], fmt, rule))


@pytest.mark.parametrize("threads", (1, 2, 3))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_inputs_are_copied_by_the_c_transpose(isa, no_fallback, dtype: torch.dtype, threads: int,
                                                         monkeypatch) -> None:
    """A transposed view (the replay's Gᵀ) is put in C order by the C blocked transpose: the same bits as
    torch's .contiguous() (NaN payloads included), for shapes that are not multiples of the 8x8 blocks and
    above the 64K-element serial cutoff; the casts of the view equal the reference's."""
    monkeypatch.setattr(cpu, "_threads", lambda n: threads)
    for rows, cols in ((37, 29), (8, 8), (300, 301), (1000, 131)):
        g = every_kind_of_float(rows * cols, seed=rows).view(rows, cols).to(dtype)
        x = g.T
        assert not x.is_contiguous()
        got = cpu.contiguous(x)
        assert got.is_contiguous() and torch.equal(raw(got), raw(x.contiguous()))
    x = mixed(300 * 301, seed=8).view(300, 301).to(dtype).T
    for fmt, tile in (("e4m3", (1, 128)), ("mxfp8-e4m3", (1, 32)), ("e5m2", (128, 128))):
        data, scale = cpu.quantize_scaled(x, fmt, *tile)
        want_d, want_s = _REF_QUANTIZE(x.contiguous(), fmt, *tile)
        assert same_bits(data, want_d) and same_bits(scale, want_s), fmt
        x_finite = torch.where(torch.isnan(x), 0.0, x).T.contiguous().T  # a transposed view without NaN
        got = cpu.fused_scaled(x_finite, fmt, *tile)
        want = cpu.fused_scaled(x_finite.contiguous(), fmt, *tile)
        assert same_bits(got.q, want.q) and torch.equal(got.saturated, want.saturated), fmt


@pytest.mark.parametrize("fmt", ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4"))
def test_lowbit_run_lengths_around_the_vector_widths(isa, no_fallback, fmt: str) -> None:
    """4/6-bit codes (AVX2: 32- and 8-lane loops, scalar tail) for rows of 1..40 elements in one tile of the
    row's width (MX: 1x32 tiles, short last tiles), every kind of float incl. NaN/±Inf and a zero row (NVFP4
    block scale 0: x * 0 instead of a division), all three dtypes; codes and scales equal the reference's."""
    for n in list(range(1, 41)) + [47, 64, 70]:
        x32 = mixed(4 * n, seed=100 + n).view(4, n)
        x32[3] = 0.0
        tile = (1, 32) if fmt.startswith("mx") else (1, 16)
        for dtype in DTYPES:
            x = x32.to(dtype)
            g = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
            data, scale = cpu.quantize_scaled(x, fmt, *tile, "floor", g)
            want_d, want_s = _REF_QUANTIZE(x, fmt, *tile, "floor", g)
            assert same_bits(data, want_d) and same_bits(scale, want_s), (n, dtype)


def tile_sums(m: torch.Tensor, br: int, bc: int) -> torch.Tensor:
    """Per-tile counts of the bool mask m [R, C] in br x bc tiles (partial edge tiles), row-major tiles."""
    R, C = m.shape
    pad = torch.zeros(-(-R // br) * br, -(-C // bc) * bc, dtype=torch.int64)
    pad[:R, :C] = m
    return pad.view(R // br + (R % br > 0), br, -1, bc).sum(dim=(1, 3)).reshape(-1)


# Narrow tiles (bc 8, 16, 32, 64: "Narrow tiles" in _fastpath.c): the tile amax 8 tiles a step and the FP8 element
# pass a row at a time with per-8-lane reciprocals where every scale of the row is +2^k. Rows of 2 full 8-tile
# groups, 3 more tiles and a 5-element short tile; tiles of 1 and 2 rows.
NARROW = ((1, 8), (1, 16), (1, 32), (1, 64), (2, 16), (3, 32))


def narrow_rows(bc: int, rows: int, seed: int, fmax: float, specials: bool, nan: bool = True, span: int = 30
                ) -> torch.Tensor:
    """rows x (19 bc + 5) float32: even rows with every tile's amax fmax * 2**k (power-of-two e4m3/e5m2 scales:
    the per-8-lane reciprocal loop), odd rows random (other scales: tile by tile); specials: NaN/±Inf in some
    8-tile groups (nan False: ±Inf only), a float32-subnormal tile (MX scale 2**-127: that row tile by tile).
    The tiles' amax spread over 2**±span (NVFP4 needs a small span: its E4M3 block scales underflow to 0 past
    ~2**-17 of the tensor amax, and a row with a zero divisor goes tile by tile)."""
    g = torch.Generator().manual_seed(seed)
    cols = 19 * bc + 5
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-span, span, (rows, 1), generator=g).float())
    k = torch.randint(-span, span, (rows, cols // bc + 1), generator=g).float()
    for r in range(0, rows, 2):
        for t in range(cols // bc + 1):
            seg = x[r, t * bc:(t + 1) * bc]
            seg.mul_(0.9 * fmax * 2.0 ** k[r, t].item() / seg.abs().max().clamp_min(1e-30))
            seg[0] = fmax * 2.0 ** k[r, t].item() * (1 if seg[0] >= 0 else -1)
    x[:, 3 * bc:4 * bc] *= 0.0  # an all-zero tile (scale 1; NVFP4: scale 0, so those rows go tile by tile)
    if specials:
        x[0, 9 * bc + 1], x[rows - 1, 2 * bc + 3] = float("nan") if nan else float("inf"), float("inf")
        x[min(1, rows - 1), 12 * bc + 2] = -float("inf")
        x[rows - 1, 17 * bc:18 * bc] = 1e-42  # float32 subnormal amax
    return x


@pytest.mark.parametrize("tile", NARROW, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("fmt", ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2", "mxfp4-e2m1", "nvfp4"))
@pytest.mark.parametrize("specials", (False, True), ids=("finite", "specials"))
def test_narrow_tiles_quantize(isa, no_fallback, tile, fmt: str, specials: bool) -> None:
    fmax = 448.0 if fmt in ("e4m3", "mxfp8-e4m3") else 57344.0
    rows = 4 * tile[0]
    x = narrow_rows(tile[1], rows, seed=tile[1] + rows, fmax=fmax, specials=specials)
    for rule in ("floor", "rceil") if fmt.startswith("mx") else ("floor",):
        data, scale = cpu.quantize_scaled(x, fmt, *tile, rule)
        want_d, want_s = _REF_QUANTIZE(x, fmt, *tile, rule)
        assert same_bits(data, want_d) and same_bits(scale, want_s), (fmt, tile, rule)
    if fmt in ("e4m3", "e5m2") and not specials and tile[0] == 1:  # the even rows' scales are all powers of two
        s = scale[::2]
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))


@pytest.mark.parametrize("tile", NARROW, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("fmt", ("e4m3", "mxfp8-e4m3", "mxfp6-e2m3", "nvfp4"))
def test_narrow_tiles_fused_and_transposed(isa, tile, fmt: str) -> None:
    """fused_scaled's amax pass (NaN/Inf tracked: its clean-tile flags) and a transposed view (bands) on the
    narrow loops, against the reference ops."""
    x = narrow_rows(tile[1], 4 * tile[0], seed=3, fmax=448.0, specials=fmt.startswith(("e4m3", "mxfp8")), nan=False,
                    span=4 if fmt == "nvfp4" else 30)
    if fmt == "nvfp4":  # rows without a zero tile: every divisor > 0 (the division loop)
        x[1:, 3 * tile[1]:4 * tile[1]] = torch.linspace(-3.0, 5.0, tile[1])
    for view in (x, x.T.contiguous().T):
        got = cpu.fused_scaled(view, fmt, *tile)
        g = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
        data, scale = _REF_QUANTIZE(x, fmt, *tile, "floor", g)
        q = _REF_DEQUANTIZE(data, scale, *tile, torch.float32, fmt, g)
        assert got is not None and same_bits(got.q, q) and same_bits(got.scale, scale), (fmt, tile)
        # the per-tile counts: finite nonzero x, of those q == 0, saturated (|code| at the max and |x| > |q|)
        br, bc = tile
        nz = torch.isfinite(x) & (x != 0)
        sat = (ref.element_values(data, fmt).abs() == FORMATS[fmt].max) & (x.abs() > q.abs())
        want = torch.stack([tile_sums(m, br, bc) for m in (nz, nz & (q == 0), sat)])
        assert torch.equal(got.counts, want) and torch.equal(got.saturated, sat), (fmt, tile)
        d2, s2 = cpu.quantize_scaled(view, fmt, *tile)
        assert same_bits(d2, data) and same_bits(s2, scale)


LOWBIT_FMAX = {"mxfp6-e2m3": 7.5, "mxfp6-e3m2": 28.0, "mxfp4-e2m1": 6.0, "nvfp4": 6.0}


@pytest.mark.parametrize("tile", NARROW, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("fmt", tuple(LOWBIT_FMAX))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_narrow_tiles_lowbit_quantize(isa, no_fallback, tile, fmt: str, dtype: torch.dtype) -> None:
    """The 4/6-bit element pass of quantize_scaled on narrow tiles (a row at a time: x times the reciprocal where
    the row's divisors are all +2^k, x divided by each tile's divisor where they are all > 0, else tile by tile),
    nearest and stochastic rounding, C order and a transposed view, NaN/±Inf/subnormal tiles in some rows, against
    the reference bit for bit. NVFP4: tensor scale 1 (even rows' block scales 2**k: the reciprocal loop; odd rows:
    the division loop; row 0 keeps an all-zero tile: divisor 0, tile by tile) and the computed tensor scale."""
    br, bc = tile
    rows = 4 * br
    fmax = LOWBIT_FMAX[fmt]
    x = narrow_rows(bc, rows, seed=bc + rows + len(fmt), fmax=fmax, specials=True, span=4 if fmt == "nvfp4" else 30)
    x[1:, 3 * bc:4 * bc] = torch.linspace(-3.0, 6.0, bc)  # row 0 alone keeps its zero tile (NVFP4: amax 6, scale 1)
    x = x.to(dtype)
    gs = (torch.tensor(1.0), ref.nvfp4_global_scale(x)) if fmt == "nvfp4" else (None,)
    for view in (x, x.T.contiguous().T):
        for g in gs:
            for rnd in ("nearest", "stochastic"):
                data, scale = cpu.quantize_scaled(view, fmt, br, bc, "floor", g, rnd, 5)
                want_d, want_s = _REF_QUANTIZE(x, fmt, br, bc, "floor", g, rnd, 5)
                assert same_bits(data, want_d) and same_bits(scale, want_s), (rnd, g)
    if fmt == "nvfp4" and br == 1 and dtype == torch.float32:  # the even rows' divisors are powers of two
        d = _REF_QUANTIZE(x, fmt, br, bc, "floor", gs[0])[1][2::2]
        d = d[torch.isfinite(d)]
        assert d.numel() > 0 and torch.equal(d, torch.exp2(torch.log2(d).round()))


@pytest.mark.parametrize("tile", ((1, 16), (2, 16), (1, 32), (4, 64)), ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_block_scales_eight_tiles_at_a_time(isa, no_fallback, tile, dtype: torch.dtype) -> None:
    """NVFP4 block scales and divisors 8 tiles at a time (AVX2: amax / fl32(6 g), E4M3 encode and decode, times g),
    for tensor scales given (the one-pass local mode), computed from x (the two-pass mode), one per row, tiny (the
    E4M3 scale saturates at 448), huge (it rounds to 0 or an E4M3 subnormal), 0, Inf and NaN (tile by tile); tiles
    of every amax exponent, zero tiles, NaN/±Inf tiles (NaN scale) and a short 8-tile group; codes, scales and the
    fused cast's q equal the reference's."""
    br, bc = tile
    rows, cols = 6 * br, 21 * bc + 3
    g = torch.Generator().manual_seed(bc + br)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-40, 40, (rows, cols // 4 + 1), generator=g)
                                                          .float().repeat_interleave(4, 1)[:, :cols])
    x[:, 2 * bc:3 * bc] = 0.0
    x[0, 5 * bc + 1], x[rows - 1, 9 * bc], x[rows // 2, 17 * bc + 2] = float("nan"), float("inf"), -float("inf")
    x[1, 11 * bc:12 * bc] = 1e-42
    x = x.to(dtype)
    finite = torch.where(torch.isfinite(x), x, 0.0)
    scales = [None, ref.nvfp4_global_scale(x), torch.tensor(2.0**-100), torch.tensor(1e30), torch.tensor(0.0),
              torch.tensor(float("inf")), torch.tensor(float("nan"))]
    if br == 1:
        scales.append(torch.exp2(torch.randint(-30, 30, (rows, 1), generator=g).float()) * 1.3)
    for gs in scales:
        data, scale = cpu.quantize_scaled(x, "nvfp4", br, bc, "floor", gs)
        want_d, want_s = _REF_QUANTIZE(x, "nvfp4", br, bc, "floor", gs)
        assert same_bits(data, want_d) and same_bits(scale, want_s), gs
    got = cpu.fused_scaled(finite, "nvfp4", br, bc)
    gx = ref.nvfp4_global_scale(finite)
    d, s = _REF_QUANTIZE(finite, "nvfp4", br, bc, "floor", gx)
    assert got is not None and same_bits(got.scale, s)
    assert same_bits(got.q, _REF_DEQUANTIZE(d, s, br, bc, torch.float32, "nvfp4", gx))
