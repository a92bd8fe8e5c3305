"""CuPy kernels vs the PyTorch reference: every op, bit for bit, on a GPU (skipped without one)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fp8probe.ops  # noqa: F401  (declares torch.ops.fp8probe.* and registers the CUDA kernels)
from fp8probe.backends import cuda as cuda_backend
from fp8probe.backends import reference as ref
from fp8probe.formats import get_codebook
from support import scatter_specials

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs CuPy"),
]

OPS = torch.ops.fp8probe
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


@pytest.fixture(autouse=True)
def _kernels_not_reference(monkeypatch):
    monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Exact equality of values and bit patterns; NaNs must coincide (their payloads may differ)."""
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if not (got.dtype.is_floating_point):
        mism = (got != want).nonzero()
        assert mism.numel() == 0, f"{mism.shape[0]} mismatches, first at {mism[:5].tolist()}"
        return
    nan_g, nan_w = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(nan_g, nan_w), f"NaN positions differ at {(nan_g != nan_w).nonzero()[:5].tolist()}"
    bits_g = got.view(_BITS[got.dtype])[~nan_g]
    bits_w = want.view(_BITS[want.dtype])[~nan_w]
    bad = (bits_g != bits_w).nonzero()
    assert bad.numel() == 0, (f"{bad.shape[0]} of {bits_g.numel()} values differ; first: "
                              f"got {got[~nan_g][bad[:3, 0]].tolist()} want {want[~nan_w][bad[:3, 0]].tolist()}")


def assert_all_equal(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_bitwise_equal(g, w)


def sample(shape, dtype, seed: int, *, specials: bool = True, code: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded data with per-row magnitudes spanning 1e-3..1e3, zeros, and (optionally) NaN/±Inf and
    exact codebook midpoints (a tie case for the search: those blocks get absmax exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1)
    n = flat.numel()
    if x.dim() >= 2:
        x *= torch.logspace(-3, 3, x.shape[-2])[:, None]
    flat[torch.randint(0, n, (max(1, n // 50),), generator=g)] = 0.0
    if code is not None and n >= 512:
        mid = ref.code_midpoints(code.cpu())
        head = flat[:512]
        head.copy_(mid[torch.randint(0, 255, (512,), generator=g)])
        head[::32] = 1.0                    # every block (>= 32, aligned) in the head has absmax 1
    if specials and n >= 8:
        pos = torch.randperm(n, generator=g)[:3]
        flat[pos[0]], flat[pos[1]], flat[pos[2]] = float("nan"), float("inf"), float("-inf")
    return x.to(dtype)


def test_kernels_are_registered() -> None:
    # without this, a process started with FP8PROBE_BACKEND=reference would compare the reference
    # with itself below
    assert cuda_backend._registered


# ----------------------------------------------------------------------------- codebook quantisation
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("shape", ((1000,), (33, 77), (2 * 4096 + 5,)))
@pytest.mark.parametrize("code_name", ("dynamic", "bnb-e4m3", "bnb-e5m2"))
def test_quantize_blockwise_matches_reference(dtype, blocksize, shape, code_name) -> None:
    code = get_codebook(code_name)
    A = sample(shape, dtype, seed=blocksize + len(shape), code=code)
    want = ref.quantize_blockwise(A, code, blocksize, "")
    got = OPS.quantize_blockwise(A.cuda(), code.cuda(), blocksize, "")
    assert_all_equal(got, want)
    q, absmax, si, sv = got
    for out_dtype in DTYPES:
        assert_bitwise_equal(
            OPS.dequantize_blockwise(q, absmax, code.cuda(), blocksize, out_dtype, si, sv, ""),
            ref.dequantize_blockwise(*(t.cpu() for t in (q, absmax, code)), blocksize, out_dtype,
                                     si.cpu(), sv.cpu(), ""))


def special_blocks(dtype: torch.dtype) -> torch.Tensor:
    """Six blocks of 64: zeros, all-NaN, all-Inf, a -0.0, one whose 1/absmax overflows, random."""
    A = sample((64 * 6,), torch.float32, seed=3, specials=False)
    A[0:64] = 0.0                         # zero block -> zero code
    A[64:128] = float("nan")              # all-NaN block
    A[128:192] = float("inf")             # all-Inf block
    A[192] = -0.0
    A[256:320] *= 1e-38                   # subnormal-scale block: 1/absmax overflows to Inf
    return A.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_blockwise_special_blocks(dtype) -> None:
    code = get_codebook("bnb-e4m3")
    A = special_blocks(dtype)
    want = ref.quantize_blockwise(A, code, 64, "")
    got = OPS.quantize_blockwise(A.cuda(), code.cuda(), 64, "")
    assert_all_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((1,), (129, 33), (5000,)))
def test_quantize_global_matches_reference(dtype, shape) -> None:
    code = get_codebook("bnb-e4m3")
    A = sample(shape, dtype, seed=7, code=code)
    want = ref.quantize_global(A, code, "")
    got = OPS.quantize_global(A.cuda(), code.cuda(), "")
    assert_all_equal(got, want)
    q, absmax, si, sv = got
    n = A.numel()
    assert_bitwise_equal(OPS.dequantize_blockwise(q, absmax, code.cuda(), n, dtype, si, sv, ""),
                         ref.dequantize_blockwise(q.cpu(), absmax.cpu(), code, n, dtype, si.cpu(), sv.cpu(), ""))


def test_other_blocksizes_run_the_reference_and_empty() -> None:
    code = get_codebook("dynamic", device="cuda")
    A = sample((1000,), torch.float32, seed=3)
    for bs in (4, 16, 100, 8192):  # outside the kernel's 32..4096 powers of two: the reference, on the GPU
        got = OPS.quantize_blockwise(A.cuda(), code, bs, "")
        assert got[0].device.type == "cuda"
        assert_all_equal(got, ref.quantize_blockwise(A, code.cpu(), bs, ""))
    q, absmax, si, sv = OPS.quantize_blockwise(torch.empty(0, 3, device="cuda"), code, 64, "")
    assert q.shape == (0, 3) and absmax.shape == (0,) and si.numel() == 0


def test_non_contiguous_input_is_blocked_in_logical_order() -> None:
    code = get_codebook("dynamic")
    A = sample((64, 96), torch.float32, seed=11, specials=False).t()      # non-contiguous view
    assert_all_equal(OPS.quantize_blockwise(A.cuda(), code.cuda(), 128, ""),
                     ref.quantize_blockwise(A.contiguous(), code, 128, ""))


# ----------------------------------------------------------------------------- LLM.int8()
INT8_SHAPES = ((7, 130), (3, 5, 64), (1, 1000), (300, 4096), (40,))


def int8_sample(shape, dtype, seed) -> torch.Tensor:
    A = sample(shape, torch.float32, seed, specials=False)
    A = A / A.abs().amax().clamp_min(1e-30) * 4.0           # |A| <= 4: threshold 2.5 picks real outliers
    flat = A.view(-1)
    if flat.numel() >= 64:
        flat[5], flat[17] = float("nan"), float("inf")
    if A.dim() >= 2 and A.shape[-2] > 2:
        A.view(-1, A.shape[-1])[1] = 0.0                       # an all-zero row
    return A.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", INT8_SHAPES)
@pytest.mark.parametrize("threshold", (0.0, 2.5))
@pytest.mark.parametrize("compat", ("", "bnb"))
def test_int8_vectorwise_quant_matches_reference(dtype, shape, threshold, compat) -> None:
    A = int8_sample(shape, dtype, seed=len(shape))
    got = OPS.int8_vectorwise_quant(A.cuda(), threshold, compat)
    assert_all_equal(got, ref.int8_vectorwise_quant(A, threshold, compat))
    q, stats, _ = got
    assert_bitwise_equal(OPS.int8_vectorwise_dequant(q, stats), ref.int8_vectorwise_dequant(q.cpu(), stats.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", INT8_SHAPES)
@pytest.mark.parametrize("threshold", (0.0, 2.5))
def test_int8_double_quant_matches_reference(dtype, shape, threshold) -> None:
    A = int8_sample(shape, dtype, seed=3 + len(shape))
    assert_all_equal(OPS.int8_double_quant(A.cuda(), threshold, ""), ref.int8_double_quant(A, threshold, ""))


@pytest.mark.parametrize("mkn", ((1, 1, 1), (5, 3, 7), (17, 8, 8), (64, 4096, 128), (33, 100, 9),
                                 (300, 64, 24), ((2, 3, 16), 32, 40)))
def test_int8_linear_matmul_is_exact(mkn) -> None:
    m, k, n = mkn
    lead = m if isinstance(m, tuple) else (m,)
    g = torch.Generator().manual_seed(k * 31 + n)
    A = torch.randint(-128, 128, (*lead, k), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    A.view(-1, k)[0] = -128                                 # extreme products: |C| up to 128*128*K
    B[0] = -128
    want = (A.reshape(-1, k).long() @ B.long().t()).reshape(*lead, n).to(torch.int32)
    assert_bitwise_equal(OPS.int8_linear_matmul(A.cuda(), B.cuda()), want)


def test_int8_linear_matmul_kernel_path_is_exact() -> None:
    # shapes torch._int_mm accepts would bypass the kernel; call the kernel through odd K instead
    g = torch.Generator().manual_seed(5)
    A = torch.randint(-128, 128, (40, 4099), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (24, 4099), generator=g, dtype=torch.int8)
    want = (A.long() @ B.long().t()).to(torch.int32)
    assert_bitwise_equal(cuda_backend.int8_linear_matmul(A.cuda(), B.cuda()), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_dtype", (None, torch.float16, torch.float32))
@pytest.mark.parametrize("shape", ((9, 33), (2, 7, 64)))
def test_int8_mm_dequant_matches_reference(dtype, bias_dtype, shape) -> None:
    g = torch.Generator().manual_seed(13)
    C = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32)
    rows = C.numel() // shape[-1]
    row = torch.rand(rows, generator=g) * 10
    col = torch.rand(shape[-1], generator=g) * 10
    row[0] = 0.0
    bias = None if bias_dtype is None else torch.randn(shape[-1], generator=g).to(bias_dtype)
    got = OPS.int8_mm_dequant(C.cuda(), row.cuda(), col.cuda(), None if bias is None else bias.cuda(), dtype, "")
    assert_bitwise_equal(got, ref.int8_mm_dequant(C, row, col, bias, dtype, ""))


# ----------------------------------------------------------------------------- scaled casts
TILINGS = ("tensor", "row", (1, 128), (128, 128), (1, 32))


def _tile(tiling, shape) -> tuple[int, int]:
    rows = 1
    for s in shape[:-1]:
        rows *= s
    cols = shape[-1]
    if tiling == "tensor":
        return rows, cols
    if tiling == "row":
        return 1, cols
    return tiling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ("e4m3", "e5m2", "mxfp8-e4m3", "mxfp8-e5m2"))
@pytest.mark.parametrize("tiling", TILINGS, ids=str)
@pytest.mark.parametrize("shape", ((130, 300), (3, 4, 64), (257,)))
def test_scaled_casts_match_reference(dtype, fmt, tiling, shape) -> None:
    if fmt.startswith("mxfp8") and tiling != (1, 32):
        pytest.skip("MX formats use 1x32 tiles")
    br, bc = _tile(tiling, shape)
    x = sample(shape, dtype, seed=17)
    x.view(-1)[: min(40, x.numel())] = 0.0                     # a zero tile (scale 1)
    want = ref.quantize_scaled(x, fmt, br, bc)
    got = OPS.quantize_scaled(x.cuda(), fmt, br, bc)
    assert_all_equal(got, want)
    data, scale = got
    for out_dtype in DTYPES:
        assert_bitwise_equal(OPS.dequantize_scaled(data, scale, br, bc, out_dtype),
                             ref.dequantize_scaled(data.cpu(), scale.cpu(), br, bc, out_dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,tile,rule", (("mxfp8-e4m3", (1, 32), "rceil"), ("mxfp8-e5m2", (1, 32), "even"),
                                           ("mxfp4-e2m1", (1, 32), "floor"), ("mxfp6-e2m3", (1, 32), "rceil"),
                                           ("mxfp6-e3m2", (1, 32), "even"), ("nvfp4", (1, 16), "floor"),
                                           ("nvfp4", (16, 16), "floor")), ids=str)
def test_mx_rules_and_lowbit_casts_match_reference(dtype, fmt, tile, rule) -> None:
    x = sample((67, 96), dtype, seed=23)
    x.view(-1)[:40] = 0.0
    br, bc = tile
    want = ref.quantize_scaled(x, fmt, br, bc, rule)
    got = OPS.quantize_scaled(x.cuda(), fmt, br, bc, rule)
    assert_all_equal(got, want)
    gs = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
    for out_dtype in DTYPES:
        assert_bitwise_equal(OPS.dequantize_scaled(got[0], got[1], br, bc, out_dtype, fmt,
                                                   None if gs is None else gs.cuda()),
                             ref.dequantize_scaled(want[0], want[1], br, bc, out_dtype, fmt, gs))


@pytest.mark.parametrize("fp8", (torch.float8_e4m3fn, torch.float8_e5m2))
def test_dequantize_scaled_every_fp8_code(fp8) -> None:
    data = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).reshape(8, 32)
    scale = torch.tensor([[0.5], [3.0], [1e-3], [2.0**-20], [1.0], [7.0], [2.0**100], [1e30]])
    for out_dtype in DTYPES:
        assert_bitwise_equal(OPS.dequantize_scaled(data.cuda(), scale.cuda(), 1, 32, out_dtype),
                             ref.dequantize_scaled(data, scale, 1, 32, out_dtype))


def test_reference_env_var_routes_to_reference(monkeypatch) -> None:
    code = get_codebook("dynamic")
    A = sample((1000,), torch.float32, seed=1)
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    assert_all_equal(OPS.quantize_blockwise(A.cuda(), code.cuda(), 100, ""),   # 100 is reference-only
                     ref.quantize_blockwise(A, code, 100, ""))


# ----------------------------------------------------------------------------- kernel paths
# The kernels branch on tile size (amax_tiles_small / amax_tiles), blocksize (quantize_blockwise_warp /
# quantize_blockwise), pointer alignment (Pack4 vector or scalar accesses), grid (one grid-stride step or
# many) and size (32- or 64-bit indices); tests/test_kernels_host.py runs each on the emulator, these on
# real warps (shuffles, divergence, memory ordering).
PATH_TILES = ((1, 16), (1, 32), (1, 128), (16, 16), (128, 128), (3, 5), (2, 48), (1, 1), (1, 8), (1, 64), "row",
              "tensor")


@pytest.fixture(params=("default", "small-grid", "unaligned"))
def path_variant(request, monkeypatch) -> str:
    if request.param == "small-grid":            # every grid-stride loop takes many steps
        for cap in ("_MAX_GRID", "_CODEBOOK_GRID", "_REDUCE_GRID"):
            monkeypatch.setattr(cuda_backend, cap, 3)
    return request.param


def _on_gpu(t: torch.Tensor, variant: str) -> torch.Tensor:
    """t on the GPU; for "unaligned" as a contiguous view one element into a buffer (no Pack4 access)."""
    if variant != "unaligned":
        return t.cuda()
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def _path_sample(shape, dtype, seed: int) -> torch.Tensor:
    """sample() plus ~2.5% NaN/±Inf/subnormals/-0 and an all-NaN run: tiles of every finiteness."""
    return scatter_specials(sample(shape, dtype, seed), seed)


@pytest.mark.parametrize("tile", PATH_TILES, ids=str)
@pytest.mark.parametrize("shape", ((257, 131), (3, 5, 333), (4099,)), ids=str)
def test_scaled_kernel_paths_match_reference(path_variant, tile, shape) -> None:
    br, bc = _tile(tile, shape)
    for k, fmt in enumerate(("e4m3", "e5m2", "mxfp4-e2m1", "mxfp6-e3m2", "nvfp4")):
        dtype = DTYPES[(PATH_TILES.index(tile) + k) % 3]
        x = _path_sample(shape, dtype, seed=41 + k)
        want = ref.quantize_scaled(x, fmt, br, bc)
        got = OPS.quantize_scaled(_on_gpu(x, path_variant), fmt, br, bc)
        assert_all_equal(got, want)
        gs = ref.nvfp4_global_scale(x) if fmt == "nvfp4" else None
        out_dtype = DTYPES[(PATH_TILES.index(tile) + k + 1) % 3]
        assert_bitwise_equal(OPS.dequantize_scaled(_on_gpu(got[0].cpu(), path_variant), got[1], br, bc, out_dtype,
                                                   fmt, None if gs is None else gs.cuda()),
                             ref.dequantize_scaled(*want, br, bc, out_dtype, fmt, gs))


@pytest.mark.parametrize("kernel", ("small", "large"))
@pytest.mark.parametrize("tile", PATH_TILES, ids=str)
def test_tile_amax_kernels_match(monkeypatch, kernel, tile) -> None:
    # both amax kernels on the same tiles: finite max and all-value bit max (NaN wins) from one pass
    shape = (257, 131)
    x = _path_sample(shape, torch.bfloat16, seed=PATH_TILES.index(tile))
    br, bc = _tile(tile, shape)
    monkeypatch.setattr(cuda_backend, "_SMALL_TILE", 2**62 if kernel == "small" else 0)
    amax, amax_all = cuda_backend._tile_amax(x.cuda(), 257, 131, br, bc, with_all=True)
    xt, _, _ = ref._tiles(x.float(), min(br, 257), min(bc, 131))
    assert_bitwise_equal(amax, torch.where(torch.isfinite(xt), xt.abs(), 0.0).amax(dim=(1, 3)))
    assert_bitwise_equal(amax_all.view(torch.int32), (xt.view(torch.int32) & 0x7FFFFFFF).amax(dim=(1, 3)))


@pytest.mark.parametrize("blocksize", (32, 64, 256, 512, 1024))
def test_codebook_kernel_paths_match_reference(path_variant, blocksize) -> None:
    code = get_codebook("dynamic")
    for dtype in DTYPES:
        A = _path_sample((3, 1001, 77), dtype, seed=blocksize)       # odd length: partial last block
        got = OPS.quantize_blockwise(_on_gpu(A, path_variant), code.cuda(), blocksize, "")
        assert_all_equal(got, ref.quantize_blockwise(A, code, blocksize, ""))
        q, absmax, si, sv = got
        assert_bitwise_equal(OPS.dequantize_blockwise(_on_gpu(q.cpu(), path_variant), absmax, code.cuda(), blocksize,
                                                      dtype, si, sv, ""),
                             ref.dequantize_blockwise(q.cpu(), absmax.cpu(), code, blocksize, dtype, si.cpu(),
                                                      sv.cpu(), ""))
        got = OPS.quantize_global(_on_gpu(A, path_variant), code.cuda(), "")
        assert_all_equal(got, ref.quantize_global(A, code, ""))


def test_index64_paths_agree_with_32bit_slices() -> None:
    # rows * cols > 2**31 takes the 64-bit index paths; the last rows' tiles (1x32, rows) and blocks
    # (64, cols a multiple) are the same when the slice alone (32-bit paths) is processed
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GiB of free GPU memory")
    rows, cols = 2**31 // 4096 + 3, 4096
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn((rows, cols), device="cuda", dtype=torch.bfloat16, generator=g)
    x[-1, 7], x[-2, 100] = float("nan"), float("inf")
    tail = x[-64:].contiguous()
    for fmt, br, bc in (("mxfp8-e4m3", 1, 32), ("e4m3", 1, cols), ("mxfp4-e2m1", 1, 32)):
        data, scale = OPS.quantize_scaled(x, fmt, br, bc)
        t_data, t_scale = OPS.quantize_scaled(tail, fmt, br, bc)
        assert_bitwise_equal(data[-64:], t_data)
        assert_bitwise_equal(scale[-64:], t_scale)
        fmt_arg = fmt if fmt.startswith("mxfp4") else ""
        y = OPS.dequantize_scaled(data, scale, br, bc, torch.bfloat16, fmt_arg, None)
        assert_bitwise_equal(y[-64:], OPS.dequantize_scaled(t_data, t_scale, br, bc, torch.bfloat16, fmt_arg, None))
        del data, scale, y
    code = get_codebook("dynamic").cuda()
    q, absmax, si, sv = OPS.quantize_blockwise(x, code, 64, "")
    tq, tabsmax, _, _ = OPS.quantize_blockwise(tail, code, 64, "")
    assert_bitwise_equal(q[-64:], tq)
    assert_bitwise_equal(absmax[-64 * cols // 64:], tabsmax)
    empty = torch.empty(0, dtype=torch.int64, device="cuda")
    y = OPS.dequantize_blockwise(q, absmax, code, 64, torch.float16, empty, empty.float(), "")
    assert_bitwise_equal(y[-64:], OPS.dequantize_blockwise(tq, tabsmax, code, 64, torch.float16, empty,
                                                           empty.float(), ""))


# ----------------------------------------------------------------------------- metrics.cu (the analysis' sums)
def _metric_pair(n: int, seed: int, da: torch.dtype, db: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * 10.0
    b = a * (1 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))
    b[torch.rand(n, generator=g) < 0.05] = 0.0
    return scatter_specials(a.to(da), seed), scatter_specials(b.to(db), seed + 1)


@pytest.mark.parametrize("n", (5, 8192 + 13, 5 * 8192 + 1000, 1 << 22))
@pytest.mark.parametrize("da,db", ((torch.float64, torch.float32), (torch.float64, torch.bfloat16),
                                   (torch.float32, torch.float16), (torch.bfloat16, torch.float32)))
def test_metrics_kernels_give_the_c_paths_bits(n, da, db) -> None:
    # error_sums / operand_sums on the GPU sum in the C path's order: the same bits on both devices
    from fp8probe.backends import cpu
    if not cpu.enabled():
        pytest.skip("needs the C extension")
    r, q = _metric_pair(n, n % 97, da, db)
    assert cuda_backend.error_sums(r.cuda(), q.cuda()) == cpu.error_sums(r, q)
    assert cuda_backend.operand_sums(r.cuda(), q.cuda(), None) == cpu.operand_sums(r, q, None)
    mask = r.double().abs() > 5.0
    assert cuda_backend.operand_sums(r.cuda(), q.cuda(), mask.cuda()) == cpu.operand_sums(r, q, mask)


def test_metric_accumulators_equal_on_both_devices_and_wait_once() -> None:
    import warnings

    from fp8probe.analysis import metrics as M
    from fp8probe.backends import cpu
    if not cpu.enabled():
        pytest.skip("needs the C extension (the CPU side of the comparison)")
    r, q = _metric_pair(300 * 70, 4, torch.float64, torch.float32)
    rc, qc = r.cuda(), q.cuda()
    e_cpu, e_gpu, o_cpu, o_gpu = M.ErrorAccumulator(), M.ErrorAccumulator(), M.OperandAccumulator(), M.OperandAccumulator()
    e_cpu.update(r, q)
    o_cpu.update(r, q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")        # torch warns at every operation that waits for the GPU
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e_gpu.update(rc, qc)
            o_gpu.update(rc, qc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) <= 2, [str(w.message) for w in waits]   # one copy of the results per update
    assert e_gpu == e_cpu and o_gpu == o_cpu
