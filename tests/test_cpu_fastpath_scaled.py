"""The C CPU fast path of the OCP FP8 / MX scaled casts against the PyTorch reference and torch's casts, bit for bit.

``cpu.quantize_scaled`` / ``cpu.dequantize_scaled`` are called directly (not through torch.ops), and a
spy on the reference proves the C code ran for every case that must not fall back. Both the AVX2 and
the scalar loops are checked.
"""
from __future__ import annotations

import pytest
import torch

import fp8probe.functional as F
from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from support import forbid_full_copies

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.uint8: torch.uint8}
FMTS = ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2")
LOWBIT_FMTS = ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1", "nvfp4")
RULES = ("floor", "rceil", "even")
# per-tensor, per-row, 1x128 (activations), 128x128 (weights), MX 1x32, ragged 7x13, a column tile
TILES = ((10**9, 10**9), (1, 10**9), (1, 128), (128, 128), (1, 32), (7, 13), (10**9, 1))


def sample(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded data over 2**-40 .. 2**40 per column, with NaN, ±Inf, ±0, an all-zero row and tiny values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x2 = x.view(-1, shape[-1])
    x2 *= torch.exp2(torch.linspace(-40, 40, shape[-1]))[None, :]
    if x2.shape[0] > 4 and x2.shape[1] > 12:
        x2[1, 3], x2[2, 5], x2[3, 7], x2[2, 9] = float("nan"), float("inf"), -float("inf"), -float("nan")
        x2[4, :] = 0.0
        x2[0, 11] = -0.0
        x2[0, 12] = 1e-42  # float32 subnormal
    return x


def assert_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        g, w = got.view(torch.uint8), want.view(torch.uint8)
    else:
        g, w = got.view(BITS[got.dtype]), want.view(BITS[want.dtype])
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {g.numel()} differ, first at {bad[:3].tolist()}"


_REF_QUANTIZE = ref.quantize_scaled      # kept before no_fallback replaces the module attribute
_REF_DEQUANTIZE = ref.dequantize_scaled


def check_quantize(x: torch.Tensor, fmt: str, tiles=TILES, rule: str = "floor", global_scale=None) -> None:
    for br, bc in tiles:
        want_d, want_s = _REF_QUANTIZE(x, fmt, br, bc, rule, global_scale)
        got_d, got_s = cpu.quantize_scaled(x, fmt, br, bc, rule, global_scale)
        assert_bits(got_d, want_d)
        assert_bits(got_s, want_s)  # bit patterns: the 4/6-bit NaN scales compare too


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_scaled_matches_reference(isa, no_fallback, fmt: str, dtype: torch.dtype) -> None:
    for shape in ((130, 300), (3, 5, 257)):
        check_quantize(sample(shape, seed=sum(shape)).to(dtype), fmt)


@pytest.mark.parametrize("shape", ((1, 200_000), (140_000, 3)), ids=("one-long-row", "many-short-rows"))
def test_work_split_into_many_pieces(isa, no_fallback, shape: tuple[int, int]) -> None:
    """Inputs above the 64K-element unit: tiles split over row pieces and column pieces (one tile of
    200000 columns is cut into pieces whose amax partials are merged), each of these tilings."""
    x = sample(shape, seed=7)
    for fmt in ("e4m3", "mxfp8-e5m2"):
        check_quantize(x, fmt, tiles=((10**9, 10**9), (1, 10**9), (1, 128), (128, 128), (10**9, 1)))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_scaled_matches_reference(isa, fmt: str, out_dtype: torch.dtype, monkeypatch) -> None:
    x = sample((300, 700), seed=3)
    x = torch.where(torch.isfinite(x), x, 1.0)  # NaN codes fall back (checked below); finite ones must not
    for br, bc in TILES:
        data, scale = _REF_QUANTIZE(x, fmt, br, bc)
        calls = []
        monkeypatch.setattr(cpu._ref, "dequantize_scaled", lambda *a: calls.append(a) or _REF_DEQUANTIZE(*a))
        got = cpu.dequantize_scaled(data, scale, br, bc, out_dtype)
        assert not calls, "finite data must not fall back"
        assert_bits(got, _REF_DEQUANTIZE(data, scale, br, bc, out_dtype))


def test_dequantize_with_nan_codes_falls_back_to_the_reference(isa) -> None:
    x = sample((64, 64), seed=4)
    data, scale = _REF_QUANTIZE(x, "e4m3", 1, 32)
    assert torch.isnan(data.float()).any()
    for out_dtype in DTYPES:
        assert_bits(cpu.dequantize_scaled(data, scale, 1, 32, out_dtype),
                    _REF_DEQUANTIZE(data, scale, 1, 32, out_dtype))


@pytest.mark.parametrize("fmt", ("e4m3", "mxfp8-e4m3", "mxfp4-e2m1", "nvfp4"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_scaled_into_a_reused_buffer(isa, fmt: str, out_dtype: torch.dtype, monkeypatch) -> None:
    """F.dequantize_scaled(st, dtype, out=buf): the C kernel writes buf in place (no fresh output), bit for bit
    the fresh result; NaN codes and FP8PROBE_BACKEND=reference fill buf from the reference's result; a buffer
    of the wrong shape or dtype is refused."""
    x = sample((96, 320), seed=7)
    finite = torch.where(torch.isfinite(x), x, 1.0)
    block = "block" if fmt != "e4m3" else "row"
    tile = None if block == "row" else ((1, 16) if fmt == "nvfp4" else (1, 32))
    for data_in in (finite, x):
        st = F.quantize_scaled(data_in, fmt, block, tile)
        want = F.dequantize_scaled(st, out_dtype)
        buf = torch.full(x.shape, 7.0, dtype=out_dtype)
        fresh = []
        monkeypatch.setattr(cpu, "_fresh", lambda *a: fresh.append(a) or torch.empty(*a[:1], dtype=a[1]))
        got = F.dequantize_scaled(st, out_dtype, out=buf)
        monkeypatch.undo()
        assert got is buf
        assert_bits(buf, want)
        if data_in is finite and cpu.enabled():
            assert fresh == [], "the kernel must write the caller's buffer, not a fresh one"
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    buf = torch.zeros(x.shape, dtype=out_dtype)
    assert_bits(F.dequantize_scaled(st, out_dtype, out=buf), want)
    with pytest.raises(ValueError, match="out must be"):
        F.dequantize_scaled(st, out_dtype, out=torch.zeros(3, 3, dtype=out_dtype))
    monkeypatch.delenv("FP8PROBE_BACKEND")
    with pytest.raises(ValueError, match="out must be"):
        F.dequantize_scaled(st, out_dtype, out=torch.zeros(x.shape, dtype=torch.float64))


@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2), ids=str)
def test_every_float_near_each_code_rounds_like_torch(isa, fp8: torch.dtype) -> None:
    """With scale 1 (amax = fmt max), the cast is torch's own: every code, the midpoints between neighbours
    (ties to even) and one float32 ulp either side, in the subnormal and normal ranges, both signs."""
    fmt = "e4m3" if fp8 == torch.float8_e4m3fn else "e5m2"
    fmax = 448.0 if fmt == "e4m3" else 57344.0
    codes = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    vals = codes[torch.isfinite(codes)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    pts = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(float("inf"))),
                     torch.nextafter(mids, torch.tensor(-float("inf")))])
    pts = pts[pts.abs() <= fmax]
    x = torch.cat([pts, -pts, torch.tensor([fmax, -fmax, 0.0, -0.0])])  # the max sets scale exactly 1
    data, scale = cpu.quantize_scaled(x, fmt, 1, x.numel())
    assert scale.item() == 1.0
    assert_bits(data, x.to(fp8))


def test_public_api_runs_the_c_kernels(no_fallback) -> None:
    """functional.quantize_scaled / dequantize_scaled reach the C kernels through torch.ops (no fallback)."""
    if not cpu.enabled():
        pytest.skip("C kernels not enabled")
    x = torch.where(torch.isfinite(sample((256, 384), seed=9)), sample((256, 384), seed=9), 0.0)
    for fmt, gran, block in (("e4m3", "block", (1, 128)), ("e5m2", "row", None), ("mxfp8-e4m3", "block", (1, 32))):
        st = F.quantize_scaled(x, fmt, gran, block)
        want_d, want_s = _REF_QUANTIZE(x, fmt, *((1, 10**9) if gran == "row" else block))
        assert_bits(st.data, want_d)
        assert torch.equal(st.scale, want_s)
        y = F.dequantize_scaled(st, torch.bfloat16)
        assert y.dtype == torch.bfloat16 and y.shape == x.shape


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("fmt", ("e5m2", "mxfp8-e4m3"))
def test_every_16_bit_pattern(isa, no_fallback, dtype: torch.dtype, fmt: str) -> None:
    """All 65536 fp16 / bf16 bit patterns (subnormals, Inf, NaN payloads included) through the C
    conversion to float32 and the cast, in 1x64 tiles (many different scales) and per tensor."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    check_quantize(x, fmt, tiles=((1, 64), (10**9, 10**9)))


# ------------------------------------------------------- MX scale rules, 4/6-bit elements, NVFP4


def band_sample(fmt: str, rows: int, seed: int) -> torch.Tensor:
    """[rows, 96] with each 1x32 block's amax drawn from [fmt_max, 2**(emax+1))·2**k or just below
    fmt_max·2**k (where floor saturates, rceil moves up and even rounds up or not), k per block over
    -130 .. 120 (E8M0 clamp, float32 subnormal scales), plus exact ties of the element grid."""
    g = torch.Generator().manual_seed(seed)
    _, fmax, emax = ref.SCALED_FORMATS[fmt]
    top = 2.0 ** (emax + 1)
    x = (torch.rand(rows, 96, generator=g) * 2 - 1) * fmax
    x[:, ::7] = torch.round(x[:, ::7] * 4) / 4 + 0.125      # on and between element grid points
    k = torch.randint(-130, 121, (rows, 3), generator=g).float()
    peak = fmax + torch.rand(rows, 3, generator=g) * (top - fmax)
    peak[::3] = torch.nextafter(torch.full_like(peak[::3], fmax), torch.tensor(0.0))
    peak[1::5] = fmax
    sign = torch.where(torch.rand(rows, 3, generator=g) < 0.5, -1.0, 1.0)
    x = x.view(rows, 3, 32)
    x[:, :, 5] = sign * peak
    return (x * torch.exp2(k)[:, :, None]).view(rows, 96)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", ("mxfp8-e4m3", "mxfp8-e5m2"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mx_fp8_scale_rules_match_reference(isa, no_fallback, fmt: str, rule: str, dtype: torch.dtype) -> None:
    """RCEIL and EVEN (and FLOOR) E8M0 scales with FP8 elements: data and scales bit-exact, incl. the
    448..512·2**k band, NaN/Inf, zeros, float32 subnormals and partial tiles."""
    for shape in ((130, 300), (3, 5, 257)):
        check_quantize(sample(shape, seed=sum(shape)).to(dtype), fmt, rule=rule)
    check_quantize(band_sample(fmt, 64, seed=11).to(dtype), fmt, tiles=((1, 32), (7, 13), (4, 64)), rule=rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", LOWBIT_FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowbit_formats_match_reference(isa, no_fallback, fmt: str, rule: str, dtype: torch.dtype) -> None:
    """MXFP6 / MXFP4 codes and E8M0 scales under each rule, and NVFP4 codes and E4M3 block scales:
    bit-exact, tiles with NaN/Inf get NaN scales, ragged shapes and partial tiles."""
    tiles = ((1, 32), (1, 16), (16, 16), (7, 13), (10**9, 10**9), (10**9, 1))
    for shape in ((130, 300), (3, 5, 257)):
        check_quantize(sample(shape, seed=sum(shape)).to(dtype), fmt, tiles=tiles, rule=rule)
    check_quantize(band_sample(fmt, 64, seed=12).to(dtype), fmt, tiles=((1, 32), (1, 16), (7, 13)), rule=rule)


@pytest.mark.parametrize("fmt", ("mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1"))
def test_lowbit_every_code_midpoint_and_neighbour(isa, no_fallback, fmt: str) -> None:
    """Scale 1 (the block amax is fmt_max): every element value, the midpoints between neighbours (ties
    to the even code), one float32 ulp either side and values past fmt_max (saturate), both signs, ±0."""
    fmax = ref.SCALED_FORMATS[fmt][1]
    vals = ref._lowbit_table(ref.ELEMENT_OF[fmt]).unique()
    vals = vals[vals >= 0]
    mids = (vals[1:] + vals[:-1]) / 2
    pts = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(float("inf"))),
                     torch.nextafter(mids, torch.tensor(-float("inf")))])
    pts = pts[pts < fmax]
    x = torch.cat([pts, -pts, torch.tensor([fmax, -fmax, 0.0, -0.0])])
    data, scale = cpu.quantize_scaled(x, fmt, 1, x.numel())
    assert scale.item() == 1.0
    assert_bits(data, ref.lowbit_encode(x, ref.ELEMENT_OF[fmt]))
    assert torch.equal(ref.lowbit_values(data, ref.ELEMENT_OF[fmt])[:pts.numel()].abs(),
                       ref.lowbit_values(data, ref.ELEMENT_OF[fmt])[pts.numel():2 * pts.numel()].abs())


def test_nvfp4_given_global_scale_runs_in_c(isa, no_fallback) -> None:
    """A 0-D float32 or float64 tensor scale runs in C (also 0, where every block scale is NaN or 448
    and the divisor is not > 0); the result matches the reference's with the same tensor."""
    x = sample((130, 300), seed=5)
    for g in (torch.tensor(0.37), torch.tensor(1e-30, dtype=torch.float64), torch.tensor(0.0), torch.tensor(3e3)):
        check_quantize(x, "nvfp4", tiles=((1, 16), (16, 16)), global_scale=g)


def test_nvfp4_global_scale_of_another_shape_falls_back(isa, monkeypatch) -> None:
    x = sample((32, 64), seed=6)
    calls = []
    monkeypatch.setattr(cpu._ref, "quantize_scaled", lambda *a: calls.append(a) or _REF_QUANTIZE(*a))
    g = torch.tensor([0.5])
    got = cpu.quantize_scaled(x, "nvfp4", 1, 16, "floor", g)
    assert len(calls) == 1
    assert_bits(got[0], _REF_QUANTIZE(x, "nvfp4", 1, 16, "floor", g)[0])


@pytest.mark.parametrize("shape", ((1, 200_000), (140_000, 3)), ids=("one-long-row", "many-short-rows"))
def test_lowbit_work_split_into_many_pieces(isa, no_fallback, shape: tuple[int, int]) -> None:
    """Above the 64K unit: NaN/Inf flags and amax partials merged over pieces, the NVFP4 tensor amax
    taken over all of them."""
    x = sample(shape, seed=8)
    for fmt, rule in (("mxfp4-e2m1", "even"), ("nvfp4", "floor"), ("mxfp6-e3m2", "rceil")):
        check_quantize(x, fmt, tiles=((10**9, 10**9), (1, 10**9), (1, 16), (10**9, 1)), rule=rule)


@pytest.mark.parametrize("fmt", LOWBIT_FMTS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_lowbit_dequantize_matches_reference(isa, fmt: str, out_dtype: torch.dtype, monkeypatch) -> None:
    """Codes x scale (x the NVFP4 tensor scale) in C for finite tiles; a NaN-scale tile (input NaN/Inf)
    falls back to the reference, as does a code past the format's last one (the reference raises a ValueError)."""
    x = sample((300, 700), seed=3)
    finite = torch.where(torch.isfinite(x), x, 1.0)
    g = ref.nvfp4_global_scale(finite) if fmt == "nvfp4" else None
    for br, bc in ((1, 32), (1, 16), (16, 16), (7, 13)):
        data, scale = _REF_QUANTIZE(finite, fmt, br, bc)
        calls = []
        monkeypatch.setattr(cpu._ref, "dequantize_scaled", lambda *a: calls.append(a) or _REF_DEQUANTIZE(*a))
        got = cpu.dequantize_scaled(data, scale, br, bc, out_dtype, fmt, g)
        assert not calls, "finite tiles must not fall back"
        assert_bits(got, _REF_DEQUANTIZE(data, scale, br, bc, out_dtype, fmt, g))
        data, scale = _REF_QUANTIZE(x, fmt, br, bc)
        assert torch.isnan(scale).any()
        assert_bits(cpu.dequantize_scaled(data, scale, br, bc, out_dtype, fmt, g),
                    _REF_DEQUANTIZE(data, scale, br, bc, out_dtype, fmt, g))
        assert calls
    data[0, 0] = 255
    with pytest.raises(ValueError, match=f"{fmt} element codes must be in 0..(15|63), got 255"):
        cpu.dequantize_scaled(data, torch.ones_like(scale), br, bc, out_dtype, fmt, g)


def test_public_api_runs_the_c_kernels_for_the_new_formats(no_fallback) -> None:
    """functional.quantize_scaled with the MX rules and 4/6-bit formats reaches the C kernels (no fallback)."""
    if not cpu.enabled():
        pytest.skip("C kernels not enabled")
    x = torch.where(torch.isfinite(sample((64, 256), seed=10)), sample((64, 256), seed=10), 0.0)
    for fmt, rule in (("mxfp8-e4m3", "rceil"), ("mxfp4-e2m1", "even"), ("mxfp6-e2m3", "floor")):
        st = F.quantize_scaled(x, fmt, "block", (1, 32), scale_rule=rule)
        want_d, want_s = _REF_QUANTIZE(x, fmt, 1, 32, rule)
        assert_bits(st.data, want_d)
        assert torch.equal(st.scale, want_s)
        assert F.dequantize_scaled(st, torch.float32).shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_global_scale_matches_reference(isa, dtype: torch.dtype) -> None:
    """cpu.nvfp4_global_scale (one C amax pass) equals the reference's bits: NaN/±Inf ignored, above the
    64K unit, all-zero and all-non-finite tensors give 1."""
    for x in (sample((300, 700), seed=2), sample((3, 70_000), seed=3), torch.zeros(5, 7),
              torch.tensor([float("nan"), float("inf"), -float("inf")]), torch.tensor([1e-42, -3e38])):
        x = x.to(dtype)
        got, want = cpu.nvfp4_global_scale(x), ref.nvfp4_global_scale(x)
        assert got.shape == () and got.dtype == torch.float32
        assert_bits(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nvfp4_global_scale_reads_a_transposed_view_without_a_copy(isa, dtype: torch.dtype, monkeypatch) -> None:
    """The amax is a max over all elements: a transposed view (x.mT contiguous) is read as its storage."""
    x = sample((700, 300), seed=4).to(dtype).mT  # logical [300, 700]
    x[7, 9] = float("inf")
    want = ref.nvfp4_global_scale(x.contiguous())
    copied = forbid_full_copies(monkeypatch)
    assert_bits(cpu.nvfp4_global_scale(x), want)
    assert copied == []


def test_functional_nvfp4_takes_the_global_scale_from_c(monkeypatch) -> None:
    """F.quantize_scaled(x, "nvfp4") on CPU does not run the reference's slow global-scale chain."""
    if not cpu.enabled():
        pytest.skip("C kernels not enabled")
    x = sample((64, 128), seed=13)
    want = ref.nvfp4_global_scale(x)
    monkeypatch.setattr(cpu._ref, "nvfp4_global_scale", lambda *a: pytest.fail("reference global scale ran"))
    st = F.quantize_scaled(x, "nvfp4")
    assert_bits(st.global_scale, want)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", ref.MX_FORMATS)
def test_mx_scale_of_every_kind_of_amax(isa, no_fallback, fmt: str, rule: str) -> None:
    """One 1x1 tile per value: the C scale (bit tricks for normal amax, frexpf for subnormals) equals
    reference.mx_scale over 100K random float32 patterns of every exponent, the EVEN rounding ties at
    1-3 mantissa bits (normal and subnormal) and the format maxima's neighbourhood."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(1, 0x7F800000, (100_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    ties = torch.tensor([0x3F000000 | (f << (23 - k)) | (1 << (22 - k)) for k in (1, 2, 3) for f in range(8)],
                        dtype=torch.int32).view(torch.float32)
    a = torch.cat([a, ties, ties * 1e-40, torch.tensor([448.0, 512.0, 511.99, 6.0, 7.0, 7.5, 7.75, 28.0, 30.0,
                                                        31.0, 57344.0, 61440.0, 3.4e38, 1e-45])])
    got = cpu.quantize_scaled(a[:, None], fmt, 1, 1, rule)[1][:, 0]
    assert_bits(got, ref.mx_scale(a, fmt, rule))


def test_nvfp4_every_e4m3_block_scale(isa, no_fallback) -> None:
    """Tensor scale 1 and a block amax of 6·v for every finite E4M3 value v (subnormals included): the
    block scale decoded in C is v, bit for bit, and the codes match."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals) & (vals >= 0)]
    x = (vals * 6.0)[:, None] * torch.linspace(-1, 1, 16)[None, :]
    check_quantize(x, "nvfp4", tiles=((1, 16),), global_scale=torch.tensor(1.0))
    assert torch.equal(cpu.quantize_scaled(x, "nvfp4", 1, 16, "floor", torch.tensor(1.0))[1][:, 0], vals)
