"""functional.fake_quantize's fused C pass (backends/cpu.fake_quantize_blockwise) against the two steps it
replaces, quantize(_blockwise) then dequantize_blockwise, bit for bit."""
from __future__ import annotations

import pytest
import torch

import fp8probe.functional as F
from fp8probe.backends import cpu
from fp8probe.formats import CODEBOOK_NAMES, create_fp8_map, create_linear_map, get_codebook

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# None = one absmax; 1, 7, 100, 4097: not powers of two (blocks over 2^18: test_fused_large_blocks_over_threads)
BLOCKSIZES = (None, 1, 7, 64, 100, 4096, 4097)

needs_ext = pytest.mark.skipif(not cpu.available(), reason="fp8probe._fastpath not built")


def _data(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values over ~12 binades with exact zeros, float32 subnormals and exact code midpoints nearby."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-6, 6, (n,), generator=g).float())
    x[::17] = 0.0
    x[3::29] = -0.0
    x[5::31] = 3e-41
    return x.to(dtype)


def _two_steps(x: torch.Tensor, code, blocksize: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if blocksize is None:
        q, st = F.quantize(x, code)
    else:
        q, st = F.quantize_blockwise(x, code, blocksize=blocksize)
    return F.dequantize_blockwise(q, st), st.absmax


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("book", CODEBOOK_NAMES)
def test_fused_equals_two_steps(book: str, dtype: torch.dtype, isa: str) -> None:
    for i, bs in enumerate(BLOCKSIZES):
        x = _data(5 * (977 + i), dtype, seed=i).reshape(5, -1)  # odd sizes: partial blocks, SIMD tails
        direct = cpu.fake_quantize_blockwise(x, get_codebook(book, "cpu"), max(x.numel(), 1) if bs is None else bs)
        assert direct is not None, "the C path declined finite data"
        y, absmax = F.fake_quantize(x, book, bs, return_absmax=True)
        y2, absmax2 = _two_steps(x, book, bs)
        _same(y, y2)
        _same(absmax, absmax2)
        _same(direct[0], y2)
        _, only_absmax = cpu.fake_quantize_blockwise(x, get_codebook(book, "cpu"), bs or x.numel(), with_values=False)
        _same(only_absmax, absmax2)


@needs_ext
@pytest.mark.parametrize("bs", [None, 2**18 + 3])
def test_fused_large_blocks_over_threads(bs, isa: str) -> None:
    """Blocks above the C code's one-thread limit (2^18) go through its piece-wise absmax then fused pieces."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype in DTYPES:
            x = _data(700_001, dtype, seed=11)
            y, absmax = F.fake_quantize(x, "bnb-e5m2", bs, return_absmax=True)
            y2, absmax2 = _two_steps(x, "bnb-e5m2", bs)
            _same(y, y2)
            _same(absmax, absmax2)
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_specials_decline_and_take_the_two_steps(dtype: torch.dtype, isa: str) -> None:
    """NaN/±Inf: the C pass reports them and fake_quantize runs the two steps, which restore them."""
    x = _data(1000, dtype, seed=5)
    x[10], x[500], x[501] = float("nan"), float("inf"), float("-inf")
    assert cpu.fake_quantize_blockwise(x, get_codebook("bnb-e4m3", "cpu"), 64) is None
    for bs in (None, 64, 333):
        y, absmax = F.fake_quantize(x, "bnb-e4m3", bs, return_absmax=True)
        y2, absmax2 = _two_steps(x, "bnb-e4m3", bs)
        _same(y, y2)
        _same(absmax, absmax2)
        assert torch.isnan(y[10]) and y[500] == float("inf") and y[501] == float("-inf")


@needs_ext
def test_unsorted_and_custom_codebooks() -> None:
    """An unsorted codebook (bnb's 3-bit linear map) is left to the two steps; a custom sorted one is fused."""
    x = _data(999, torch.float32, seed=2)
    unsorted = create_linear_map(True, total_bits=3)
    assert not bool((unsorted[1:] >= unsorted[:-1]).all())
    assert cpu.fake_quantize_blockwise(x, unsorted, 64) is None
    _same(F.fake_quantize(x, unsorted, 64), _two_steps(x, unsorted, 64)[0])
    custom = create_fp8_map(True, 3, 4, 8)
    assert cpu.fake_quantize_blockwise(x, custom, 64) is not None
    _same(F.fake_quantize(x, custom, 64), _two_steps(x, custom, 64)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_backend_and_compat_take_the_two_steps(dtype: torch.dtype, monkeypatch) -> None:
    x = _data(777, dtype, seed=8)
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert cpu.fake_quantize_blockwise(x, get_codebook("dynamic", "cpu"), 64) is None
    _same(F.fake_quantize(x, "dynamic", 64), _two_steps(x, "dynamic", 64)[0])
    monkeypatch.delenv("FP8PROBE_BACKEND")
    q, st = F.quantize_blockwise(x, "dynamic", blocksize=64, compat="bnb")
    _same(F.fake_quantize(x, "dynamic", 64, compat="bnb"), F.dequantize_blockwise(q, st))


def test_empty_and_bad_arguments() -> None:
    y, absmax = F.fake_quantize(torch.empty(0, 3), "bnb-e4m3", 64, return_absmax=True)
    assert y.shape == (0, 3) and absmax.shape == (0,)
    with pytest.raises(ValueError, match="blocksize must be a positive int, got 0"):
        F.fake_quantize(torch.ones(4), "bnb-e4m3", 0)
    with pytest.raises(TypeError, match="A must have dtype in"):
        F.fake_quantize(torch.ones(4, dtype=torch.int32), "bnb-e4m3", 64)
    with pytest.raises(ValueError, match="compat must be None or 'bnb', got 'x'"):
        F.fake_quantize(torch.ones(4), "bnb-e4m3", 64, compat="x")


def _records_oracle(x: torch.Tensor, y: torch.Tensor, absmax: torch.Tensor, bs: int) -> torch.Tensor:
    """int64 [3, nblocks]: non-zero x, of those y == 0, and |y| >= absmax with |x| > |y| (block_scales' rule)."""
    n = x.numel()
    pad = -n % bs
    xf = torch.nn.functional.pad(x.reshape(-1).float(), (0, pad)).reshape(-1, bs)
    yf = torch.nn.functional.pad(y.reshape(-1).float(), (0, pad)).reshape(-1, bs).abs()
    nz = xf != 0
    clipped = (yf >= absmax[:, None]) & (xf.abs() > yf)
    return torch.stack([nz.sum(1), (nz & (yf == 0)).sum(1), clipped.sum(1)])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs", [1, 7, 64, 100, 4097, 2**18 + 3, None])
def test_records_count_what_block_scales_counts(dtype: torch.dtype, bs, isa: str) -> None:
    """fake_quantize_records: the values and absmax of fake_quantize_blockwise, and per block the non-zero,
    underflow and clipped counts of its output (tiny values beside large ones flush to 0; blocks over 2^18
    take the piece-wise path on two threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n = 700_001 if bs == 2**18 + 3 else 5 * 977
        x = _data(n, dtype, seed=3)
        x[11::37] = x[11::37] * 1e-6  # far below the block absmax: underflow
        blocksize = n if bs is None else bs
        code = get_codebook("bnb-e4m3", "cpu")
        y, absmax, counts = cpu.fake_quantize_records(x, code, blocksize)
        y2, absmax2 = cpu.fake_quantize_blockwise(x, code, blocksize)
        _same(y, y2)
        _same(absmax, absmax2)
        want = _records_oracle(x, y, absmax, blocksize)
        assert counts.dtype == torch.int64 and torch.equal(counts, want)
        assert (bs == 1 or int(counts[1].sum()) > 0) and int(counts[0].sum()) < n  # underflow, zeros present
        x[n // 2] = float("nan")
        assert cpu.fake_quantize_records(x, code, blocksize) is None
    finally:
        torch.set_num_threads(old)
