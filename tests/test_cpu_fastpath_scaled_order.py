"""The memory order of the C scaled casts (fp8probe/_fastpath.c, "scaled casts: memory order") against the
PyTorch reference, bit for bit: units of whole tile rows (128x128 one-pass), units of column pieces whose
next-unit prefetch walks row segments, and fused_scaled's FP8 element loops that skip the NaN/Inf handling
of pieces their amax pass found clean, beside pieces holding NaN/±Inf.
Every test runs the AVX2 and the scalar loops (the ``isa`` fixture) on 1 and 3 threads."""
from __future__ import annotations

import pytest
import torch

from fp8probe.backends import cpu
from fp8probe.backends import reference as ref
from support import same_bits

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")

_REF_QUANTIZE = ref.quantize_scaled  # before the no_fallback fixture replaces them
_REF_DEQUANTIZE = ref.dequantize_scaled


def wide_range(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] float32: N(0, 1) times 2**k, k in -40..40 per column (tile scales of every size, FP8
    subnormal codes, saturation), with zeros and float32 subnormals sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-40, 41, (cols,), generator=g).float())
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (64,), generator=g)] = 0.0
    flat[torch.randint(0, flat.numel(), (64,), generator=g)] = 3e-41
    return x


def check_casts(x: torch.Tensor, fmt: str, br: int, bc: int, dequantize: bool = True) -> None:
    """quantize_scaled and (dequantize) dequantize_scaled (float32 and x's dtype) of the C kernels equal the
    reference's."""
    data, scale = cpu.quantize_scaled(x, fmt, br, bc)
    want_d, want_s = _REF_QUANTIZE(x, fmt, br, bc)
    assert same_bits(data, want_d) and same_bits(scale, want_s), (fmt, br, bc)
    for dtype in {torch.float32, x.dtype} if dequantize else ():
        assert same_bits(cpu.dequantize_scaled(data, scale, br, bc, dtype, fmt),
                         _REF_DEQUANTIZE(data, scale, br, bc, dtype, fmt)), (fmt, br, bc, dtype)


def check_fused(x: torch.Tensor, fmt: str, br: int, bc: int) -> None:
    """fused_scaled equals the two ops (q = dequantize(quantize(x)) in float32, the scales) and its counts and
    saturation mask follow from them as fused_scaled documents."""
    got = cpu.fused_scaled(x, fmt, br, bc)
    assert got is not None, (fmt, br, bc)
    data, scale = _REF_QUANTIZE(x, fmt, br, bc)
    q = _REF_DEQUANTIZE(data, scale, br, bc, torch.float32, fmt)
    assert same_bits(got.q, q) and same_bits(got.scale, scale), (fmt, br, bc)
    xf = x.float()
    v = data.float()
    fmax = ref.SCALED_FORMATS[fmt][1]
    sat = (v.abs() == fmax) & (xf.abs() > q.abs())
    assert torch.equal(got.saturated, sat), (fmt, br, bc)
    nz = (xf != 0) & torch.isfinite(xf)
    R, C = x.shape
    tiles = lambda m: m.view(-(-R // br), br, -(-C // bc), bc).sum((1, 3)).view(-1)  # noqa: E731
    if R % br == 0 and C % bc == 0:
        want = torch.stack([tiles(nz), tiles(nz & (q == 0)), tiles(sat)])
        assert torch.equal(got.counts, want), (fmt, br, bc)


@pytest.mark.parametrize("threads", (1, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_whole_tile_rows_and_column_pieces(isa, no_fallback, dtype: torch.dtype, threads: int, monkeypatch) -> None:
    """Tiles that fit in a unit take units of whole tile rows up to 512K elements (128x128 on 4000 columns: one
    contiguous run each, prefetched by the thread that runs the unit before) and column pieces of whole tiles
    beyond (64x64 on 8200 columns: 1024-column pieces, the prefetch walking 64 row segments, the last piece
    short); per-tensor scales (two passes) beside them. All equal the reference."""
    monkeypatch.setattr(cpu, "_threads", lambda n: threads)
    x = wide_range(384, 4000, seed=1).to(dtype)
    for fmt, br, bc in (("e4m3", 128, 128), ("e5m2", 128, 128), ("e4m3", 10**9, 10**9)):
        check_casts(x, fmt, br, bc)
    y = wide_range(192, 8200, seed=2).to(dtype)
    for fmt, br, bc in (("e4m3", 64, 64), ("mxfp6-e3m2", 64, 64)):
        check_casts(y, fmt, br, bc)
    check_fused(y, "e5m2", 64, 64)


@pytest.mark.parametrize("threads", (1, 3))
@pytest.mark.parametrize("fmt", ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2"))
def test_clean_pieces_beside_pieces_with_nan_and_inf(isa, no_fallback, fmt: str, threads: int, monkeypatch) -> None:
    """FP8 tiles of 1x128, 1x4096, 128x128 and MX 1x32: a NaN, +Inf or -Inf in some tiles, the tiles beside
    them clean (fused_scaled's amax pass flags NaN/±Inf per piece and its element loops skip their handling
    in clean pieces). Codes and scales equal the reference's; dequantize_scaled and fused_scaled,
    given the same tiles with ±Inf only (a NaN output sends both to the reference / the two ops by design),
    equal the reference."""
    monkeypatch.setattr(cpu, "_threads", lambda n: threads)
    x = wide_range(256, 4096, seed=3)
    x[3, 130], x[7, 4000], x[200, 77], x[255, 4095] = float("nan"), float("inf"), -float("inf"), float("nan")
    no_nan = torch.where(torch.isnan(x), 1.0, x)
    tiles = ((1, 128), (1, 4096), (128, 128)) if not fmt.startswith("mx") else ((1, 32),)
    for br, bc in tiles:
        check_casts(x, fmt, br, bc, dequantize=False)
        check_casts(no_nan, fmt, br, bc)
        check_fused(no_nan, fmt, br, bc)
