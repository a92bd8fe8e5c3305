"""CUDA implementations of the fp8probe ops: thin CuPy launchers over the kernels in fp8probe/kernels/*.cu.

Each launcher takes exactly the arguments of its ``fp8probe::<op>`` schema (see fp8probe/ops.py),
makes its inputs contiguous, allocates outputs with torch (so the caching allocator and torch's
streams own them), passes their device addresses to the kernel and launches on torch's current
stream. Results equal ``backends/reference.py`` bit for bit: the kernels perform the same float32
operations in the same order. What the kernels do not implement runs the reference on the GPU tensors:
``compat="bnb"`` variants (cross-check modes; ``int8_vectorwise_quant`` is the exception, it has a
NaN-propagating kernel switch), output dtypes other than fp32/fp16/bf16, blockwise blocksizes outside
CUDA_BLOCKSIZES, and empty tensors.
``FP8PROBE_BACKEND=reference`` routes every call to the reference. CuPy is imported lazily, never at
module import, so ``import fp8probe`` stays free of CUDA.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from fp8probe.backends import reference as _ref
from fp8probe.backends.reference import use_reference
from fp8probe.formats import INV_127, INV_127_SQ

_F32 = torch.float32
#: torch dtype -> the C++ storage type the templated kernels are instantiated for (common.cuh)
_CUDA_TYPE = {torch.float32: "float", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
#: fp8 element format -> the `fmt` argument of scaled_cast.cu (FMT_E4M3 / FMT_E5M2)
_FP8_FMT = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
#: 4/6-bit element format -> the `fmt` argument of cast_to_lowbit / cast_from_lowbit (FMT_E2M1 ...)
_LOWBIT_FMT = {"e2m1": 2, "e2m3": 3, "e3m2": 4}
_THREADS = 256
_MAX_GRID = 1 << 20          # grid-stride kernels loop; more blocks than this buys nothing
#: grid cap of the kernels that stage the 1 KB codebook in shared memory per thread block: 4096 blocks
#: of 256 threads (~16 per SM on an H200) amortise that load over many quantisation blocks
_CODEBOOK_GRID = 4096
#: grid cap of absmax_global: every block ends in one atomicMax on the same word, so few blocks
_REDUCE_GRID = 2048
#: tiles of at most this many elements are reduced by one lane group each (amax_tiles_small: 32 items
#: per lane at most); larger ones by thread blocks meeting in atomics (amax_tiles)
_SMALL_TILE = 1024
#: elements per lane the small-tile amax aims at (AMAX_UNROLL in scaled_cast.cu)
_AMAX_ITEMS = 4
#: largest blocksize quantised by one warp per block (QW_MAX_ITEMS = 16 items per lane)
_WARP_BLOCKSIZE_MAX = 512
#: elements per thread and grid-stride step of the elementwise kernels (map_tiles in common.cuh)
_VEC = 4
#: blocksizes the fused blockwise kernels support: a warp per block up to 512, 256 threads above
#: (<= 16 items per thread either way)
CUDA_BLOCKSIZES = tuple(2**k for k in range(5, 13))  # 32 ... 4096

_registered = False


# --------------------------------------------------------------------------------------------
# launch plumbing
# --------------------------------------------------------------------------------------------


def _kernel_arg(a):
    """A launch argument as CuPy passes it to cuLaunchKernel: a tensor as its device address (an 8-byte
    np.uint64, the size of the kernel's pointer parameter: CuPy copies a NumPy scalar's bytes as they are),
    anything else unchanged. The kernels reinterpret the bits of 16-bit floats and fp8 themselves
    (common.cuh), so no dtype travels. Raw addresses instead of a DLPack export/import per tensor and
    launch: every call cost ~0.2 ms of host time on an H200 (benchmarks/RESULTS.md § GPU). The tensors stay
    referenced by the caller's argument tuple until the launch is queued on torch's current stream, and
    torch's caching allocator reuses a freed block only in that stream's order, as for its own kernels."""
    return np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a


def _launch(file: str, kernel: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
            device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Run `kernel` (`kernel<T>` when dtype is given) from `file`.cu on torch's current stream.

    Tensor arguments travel as device addresses (_kernel_arg); scalars must already carry their C type
    (np.int64 for long long, np.int32 for int, np.float32 for float).
    """
    import cupy

    from fp8probe.kernels import get_function

    expr = f"{kernel}<{_CUDA_TYPE[dtype]}>" if dtype is not None else kernel
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        fn = get_function(file, expr)
        fn(grid, block, tuple(_kernel_arg(a) for a in args),
           stream=_cupy_stream(torch.cuda.current_stream(index).cuda_stream, index))


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int, index: int):
    """CuPy's view of torch's stream `ptr` on device `index`, made once per stream: a launch costs ~0.2 ms of
    host time on an H200 (benchmarks/RESULTS.md § GPU), and CuPy 14 warns (DeprecationWarning) at every
    ExternalStream it makes. The object only wraps the handle, which torch keeps alive for its streams."""
    import warnings

    import cupy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, index)


def _grid(items: int, per_block: int, cap: int = _MAX_GRID) -> tuple[int]:
    """1-D grid of thread blocks covering `items` at `per_block` items each, between 1 and `cap` blocks (the
    kernels loop grid-stride over what a capped grid does not cover)."""
    return (max(1, min(-(-items // per_block), cap)),)


def _grid_1d(n: int) -> tuple[int]:
    """One element per thread (_THREADS per block)."""
    return _grid(n, _THREADS)


def _grid_vec(n: int, cap: int = _MAX_GRID) -> tuple[int]:
    """Grid of a map_tiles kernel (_VEC elements per thread and step) over n elements, at most `cap`."""
    return _grid(n, _THREADS * _VEC, cap)


def _row_threads(cols: int) -> int:
    """Threads for a one-block-per-row kernel: a multiple of 32 (warp reductions), at most 256."""
    return min(_THREADS, max(32, -(-cols // 32) * 32))


def _specials(A: torch.Tensor, nonfinite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and float32 values of the non-finite elements (default-mode QuantState fields).

    `nonfinite` is the kernel's flag (int32 [1], 1 when it met a NaN/±Inf): reading it is the one host
    sync, and the usual all-finite input then costs no isfinite/any passes over A.
    """
    if not bool(nonfinite.item()):
        return (torch.empty(0, dtype=torch.int64, device=A.device), torch.empty(0, dtype=_F32, device=A.device))
    flat = A.reshape(-1)
    index = (~torch.isfinite(flat)).nonzero().reshape(-1)
    return index, flat[index].to(_F32)


# --------------------------------------------------------------------------------------------
# codebook quantisation (codebook_quant.cu)
# --------------------------------------------------------------------------------------------


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA `fp8probe::quantize_blockwise`: fused absmax + search; blocksizes up to 512 one warp per
    block (quantize_blockwise_warp, many blocks per thread block), larger ones one thread block each."""
    # The fused kernel takes the power-of-two blocksizes 32..4096 (CUDA_BLOCKSIZES); any other positive
    # blocksize (the functional API accepts them, as the CPU does) runs the reference on the GPU tensors.
    if (use_reference() or blocksize not in CUDA_BLOCKSIZES or compat != "" or A.numel() == 0
            or A.dtype not in _CUDA_TYPE):
        return _ref.quantize_blockwise(A, code, blocksize, compat)
    A = A.contiguous()
    code = code.to(device=A.device, dtype=_F32).contiguous()
    n = A.numel()
    nb = -(-n // blocksize)
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(nb, dtype=_F32, device=A.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=A.device)
    if blocksize <= _WARP_BLOCKSIZE_MAX:
        grid = _grid(nb, _THREADS // 32, _CODEBOOK_GRID)   # a warp per block
        _launch("codebook_quant", "quantize_blockwise_warp", grid, (_THREADS,),
                (A, code, q, absmax, nonfinite, np.int64(n), np.int32(blocksize)), A.device, A.dtype)
    else:
        _launch("codebook_quant", "quantize_blockwise", (nb,), (_THREADS,),
                (A, code, q, absmax, nonfinite, np.int64(n), np.int32(blocksize)), A.device, A.dtype)
    return (q, absmax, *_specials(A, nonfinite))


def quantize_global(A: torch.Tensor, code: torch.Tensor, compat: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA `fp8probe::quantize_global`: atomic absmax pass, then an elementwise search pass."""
    if use_reference() or compat != "" or A.numel() == 0 or A.dtype not in _CUDA_TYPE:
        return _ref.quantize_global(A, code, compat)
    A = A.contiguous()
    code = code.to(device=A.device, dtype=_F32).contiguous()
    n = A.numel()
    absmax = torch.zeros(1, dtype=_F32, device=A.device)     # atomicMax identity for magnitudes
    nonfinite = torch.zeros(1, dtype=torch.int32, device=A.device)
    _launch("codebook_quant", "absmax_global", _grid_vec(n, _REDUCE_GRID), (_THREADS,),
            (A, absmax, nonfinite, np.int64(n)), A.device, A.dtype)
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    _launch("codebook_quant", "quantize_with_absmax", _grid_vec(n, _CODEBOOK_GRID), (_THREADS,),
            (A, code, absmax, q, np.int64(n), np.int64(n)), A.device, A.dtype)
    return (q, absmax, *_specials(A, nonfinite))


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype, special_index: torch.Tensor, special_value: torch.Tensor,
                         compat: str) -> torch.Tensor:
    """CUDA `fp8probe::dequantize_blockwise`: code lookup * absmax, RNE cast, specials scattered back.

    Any blocksize works here (the kernel's block cursor takes any), so the global state (blocksize = n)
    shares this launcher.
    """
    if use_reference() or compat != "" or q.numel() == 0 or dtype not in _CUDA_TYPE:
        return _ref.dequantize_blockwise(q, absmax, code, blocksize, dtype, special_index, special_value, compat)
    q = q.contiguous()
    absmax = absmax.to(device=q.device, dtype=_F32).contiguous()
    code = code.to(device=q.device, dtype=_F32).contiguous()
    n = q.numel()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    _launch("codebook_quant", "dequantize_blockwise", _grid_vec(n, _CODEBOOK_GRID), (_THREADS,),
            (q, code, absmax, out, np.int64(n), np.int64(blocksize)), q.device, dtype)
    if special_index.numel():
        out.view(-1)[special_index.to(q.device)] = special_value.to(device=q.device, dtype=dtype)
    return out


# --------------------------------------------------------------------------------------------
# LLM.int8() (int8.cu)
# --------------------------------------------------------------------------------------------


def _int8_rows(A: torch.Tensor, threshold: float, nan_propagates: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row quantisation kernel + column zeroing: (q [rows, cols], row_stats [rows], outlier_cols)."""
    rows, cols = _ref._rows_cols(A.shape)
    A2 = A.contiguous()
    dev = A.device
    q = torch.empty((rows, cols), dtype=torch.int8, device=dev)
    row_stats = torch.empty(rows, dtype=_F32, device=dev)
    col_flags = torch.zeros(cols, dtype=torch.int32, device=dev)
    _launch("int8", "int8_vectorwise_quant", (rows,), (_row_threads(cols),),
            (A2, q, row_stats, col_flags, np.int64(rows), np.int64(cols), np.float32(threshold),
             np.int32(nan_propagates)), dev, A.dtype)
    if threshold > 0:
        outlier_cols = col_flags.nonzero().reshape(-1)
        if outlier_cols.numel():
            _launch("int8", "int8_zero_columns", _grid_1d(rows * cols), (_THREADS,),
                    (q, col_flags, np.int64(rows), np.int64(cols)), dev)
    else:
        outlier_cols = torch.empty(0, dtype=torch.int64, device=dev)
    return q, row_stats, outlier_cols


def _int8_kernel_ok(A: torch.Tensor, threshold: float) -> bool:
    # A positive threshold below the smallest float32 would be 0 in the kernel but still "> 0" in the
    # reference (which then marks everything an outlier): leave that corner to the reference.
    return (A.numel() > 0 and A.dim() > 0 and A.dtype in _CUDA_TYPE
            and (threshold <= 0 or float(np.float32(threshold)) > 0))


def int8_vectorwise_quant(A: torch.Tensor, threshold: float, compat: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA `fp8probe::int8_vectorwise_quant`: one thread block per row; compat "bnb" lets NaN poison
    row_stats and turns a ±Inf product (scale 127/absmax = Inf) into code 0, the reference's differences
    between the modes for this op."""
    if use_reference() or compat not in ("", "bnb") or not _int8_kernel_ok(A, threshold):
        return _ref.int8_vectorwise_quant(A, threshold, compat)
    q, row_stats, outlier_cols = _int8_rows(A, threshold, nan_propagates=compat == "bnb")
    return q.reshape(A.shape), row_stats, outlier_cols


def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """CUDA `fp8probe::int8_vectorwise_dequant`: fl32(fl32(float(q) * stats[row]) * fl32(1/127))."""
    if use_reference() or q.numel() == 0 or q.dim() == 0:
        return _ref.int8_vectorwise_dequant(q, stats)
    rows, cols = _ref._rows_cols(q.shape)
    q2 = q.contiguous()
    stats = stats.to(device=q.device, dtype=_F32).contiguous()
    out = torch.empty(q.shape, dtype=_F32, device=q.device)
    _launch("int8", "int8_vectorwise_dequant", _grid_1d(rows * cols), (_THREADS,),
            (q2, stats, out, np.int64(rows), np.int64(cols), np.float32(INV_127)), q.device)
    return out


def int8_double_quant(A: torch.Tensor, threshold: float, compat: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA `fp8probe::int8_double_quant`: row kernel, atomic column-max kernel, column-code kernel."""
    if use_reference() or compat != "" or not _int8_kernel_ok(A, threshold):
        return _ref.int8_double_quant(A, threshold, compat)
    q_row, row_stats, outlier_cols = _int8_rows(A, threshold, nan_propagates=False)
    rows, cols = _ref._rows_cols(A.shape)
    A2 = A.contiguous()
    dev = A.device
    col_stats = torch.zeros(cols, dtype=_F32, device=dev)   # atomicMax identity for magnitudes
    row_split = max(1, min(rows, 256))
    _launch("int8", "int8_col_stats", (-(-cols // _THREADS), row_split), (_THREADS,),
            (A2, col_stats, np.int64(rows), np.int64(cols), np.float32(threshold), np.int32(0)), dev, A.dtype)
    q_col = torch.empty(A.shape, dtype=torch.int8, device=dev)
    _launch("int8", "int8_col_quant", _grid_1d(rows * cols), (_THREADS,),
            (A2, col_stats, q_col, np.int64(rows), np.int64(cols), np.float32(threshold)), dev, A.dtype)
    return q_row.reshape(A.shape), q_col, row_stats, col_stats, outlier_cols


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """CUDA `fp8probe::int8_linear_matmul`: C = A · Bᵀ with exact int32 accumulation.

    torch._int_mm (cuBLASLt IMMA, exact int32) where its shape rules hold (M > 16, K and N
    multiples of 8); the tiled kernel of int8.cu everywhere else. Both wrap modulo 2**32 alike.
    """
    K = A.shape[-1] if A.dim() else 0
    N = B.shape[0] if B.dim() else 0
    if use_reference() or A.dim() == 0 or B.dim() != 2 or A.numel() == 0 or B.numel() == 0:
        return _ref.int8_linear_matmul(A, B)
    A2 = A.reshape(-1, K).contiguous()
    B2 = B.contiguous()
    M = A2.shape[0]
    out_shape = (*A.shape[:-1], N)
    if M > 16 and K % 8 == 0 and N % 8 == 0:
        try:
            return torch._int_mm(A2, B2.t()).reshape(out_shape)
        except RuntimeError:
            pass  # cuBLASLt refused this shape/layout on this GPU: the kernel is exact too
    tile = 16  # MM_TILE in int8.cu
    if -(-N // tile) > 65535:  # N rides on grid y (CUDA limit 65535 blocks): leave giant N to torch
        return _ref.int8_linear_matmul(A, B)
    C = torch.empty((M, N), dtype=torch.int32, device=A.device)
    _launch("int8", "int8_linear_matmul", (-(-M // tile), -(-N // tile)), (tile, tile),
            (A2, B2, C, np.int64(M), np.int64(N), np.int64(K)), A.device)
    return C.reshape(out_shape)


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype, compat: str) -> torch.Tensor:
    """CUDA `fp8probe::int8_mm_dequant` (default mode): the reference's four rounded fp32 steps."""
    if use_reference() or compat != "" or A.numel() == 0 or A.dim() == 0 or dtype not in _CUDA_TYPE:
        return _ref.int8_mm_dequant(A, row_stats, col_stats, bias, dtype, compat)
    dev = A.device
    N = A.shape[-1]
    rows = A.numel() // N
    C = A.contiguous()
    row_stats = row_stats.to(device=dev, dtype=_F32).contiguous()
    col_stats = col_stats.to(device=dev, dtype=_F32).contiguous()
    has_bias = bias is not None
    bias32 = (bias.to(device=dev, dtype=_F32).contiguous() if has_bias
              else torch.zeros(1, dtype=_F32, device=dev))  # never read; a valid pointer all the same
    out = torch.empty(A.shape, dtype=dtype, device=dev)
    _launch("int8", "int8_mm_dequant", _grid_1d(rows * N), (_THREADS,),
            (C, row_stats, col_stats, bias32, out, np.int64(rows), np.int64(N), np.float32(INV_127_SQ),
             np.int32(has_bias)), dev, dtype)
    return out


# --------------------------------------------------------------------------------------------
# OCP FP8 / MX scaled casts (scaled_cast.cu)
# --------------------------------------------------------------------------------------------


def _scale_from_amax(amax: torch.Tensor, fmt: str, scale_rule: str = "floor") -> torch.Tensor:
    """The scale rule of reference.quantize_scaled, with the same torch ops (so the same bits).

    One deliberate difference: ``amax / fmax`` is written tensor / tensor. With a Python-scalar divisor
    torch's CUDA kernel multiplies by the rounded reciprocal (``x * fl32(1/448)``) while its CPU kernel
    divides, so the scalar form gives different bits on the two devices; a tensor divisor is an IEEE
    division on both, equal to the CPU reference. Kept in sync by the scale checks in
    tests/test_kernels_host.py and tests/test_cuda_backend.py.
    """
    _, fmax, emax = _ref.SCALED_FORMATS[fmt]
    if fmt in _ref.MX_FORMATS:
        return _ref.mx_scale(amax, fmt, scale_rule)
    scale = amax / torch.full_like(amax, fmax)
    return torch.where(scale > 0, scale, 1.0)


def quantize_scaled(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                    global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA `fp8probe::quantize_scaled`: tile-amax kernel, scale rule in torch, cast kernel (FP8 formats;
    the 4/6-bit formats: _quantize_lowbit)."""
    if (use_reference() or x.numel() == 0 or x.dtype not in _CUDA_TYPE or fmt not in _ref.SCALED_FORMATS
            or scale_rule not in _ref.SCALE_RULES):
        return _ref.quantize_scaled(x, fmt, block_rows, block_cols, scale_rule, global_scale)
    if _ref.SCALED_FORMATS[fmt][0] == torch.uint8:
        return _quantize_lowbit(x, fmt, block_rows, block_cols, scale_rule, global_scale)
    fp8 = _ref.SCALED_FORMATS[fmt][0]
    dev = x.device
    rows, cols = _ref._rows_cols(x.shape)
    x2 = x.contiguous()
    amax, _ = _tile_amax(x2, rows, cols, block_rows, block_cols, with_all=False)
    scale = _scale_from_amax(amax, fmt, scale_rule).contiguous()
    data = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    _launch("scaled_cast", "cast_to_fp8", _grid_vec(rows * cols), (_THREADS,),
            (x2, scale, data, np.int64(rows), np.int64(cols), np.int64(block_rows), np.int64(block_cols),
             np.int32(_FP8_FMT[fp8])), dev, x.dtype)
    return data.view(fp8), scale


def _tile_amax(x2: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int, with_all: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tile max |x| over finite elements [nbr, nbc], and (with_all) over all elements, NaN/Inf bits
    winning, in the same pass (None without with_all)."""
    nbr, nbc = -(-rows // block_rows), -(-cols // block_cols)
    ntiles = nbr * nbc
    tile = min(block_rows, rows) * min(block_cols, cols)
    shape = (nbr, nbc)
    if tile <= _SMALL_TILE:
        # one group of `group` lanes (power of two <= 32) per tile, ~4 elements per lane (4 loads in
        # flight per lane, fewer shuffle levels), writes every tile once
        group = min(32, max(1, (1 << (tile - 1).bit_length()) // _AMAX_ITEMS))
        amax = torch.empty(shape, dtype=_F32, device=x2.device)
        amax_all = torch.empty(shape, dtype=_F32, device=x2.device) if with_all else amax
        grid = _grid(ntiles, _THREADS // group)   # a lane group per tile
        _launch("scaled_cast", "amax_tiles_small", grid, (_THREADS,),
                (x2, amax, amax_all, np.int64(rows), np.int64(cols), np.int64(block_rows), np.int64(block_cols),
                 np.int32(group), np.int32(with_all)), x2.device, x2.dtype)
    else:
        amax = torch.zeros(shape, dtype=_F32, device=x2.device)     # atomicMax identity for magnitudes
        amax_all = torch.zeros(shape, dtype=_F32, device=x2.device) if with_all else amax
        # >= 8 elements per thread per block, and blocks enough to fill the GPU when there are few tiles
        split = max(1, min(65535, -(-tile // (_THREADS * 8)), -(-_REDUCE_GRID // ntiles)))
        _launch("scaled_cast", "amax_tiles", (ntiles, split), (_THREADS,),
                (x2, amax, amax_all, np.int64(rows), np.int64(cols), np.int64(block_rows), np.int64(block_cols),
                 np.int32(with_all)), x2.device, x2.dtype)
    return amax, (amax_all if with_all else None)


def _quantize_lowbit(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str,
                     global_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 / MXFP6 / NVFP4: one tile-amax pass (finite values; all values, to find non-finite tiles),
    the reference's scale rule in torch, then the element-code kernel."""
    dev = x.device
    _, fmax, _ = _ref.SCALED_FORMATS[fmt]
    rows, cols = _ref._rows_cols(x.shape)
    x2 = x.contiguous()
    amax, amax_all = _tile_amax(x2, rows, cols, block_rows, block_cols, with_all=True)
    if fmt in _ref.MX_FORMATS:
        scale = _ref.mx_scale(amax, fmt, scale_rule)
        divisor = scale
    else:
        g = (_ref.nvfp4_global_scale(x) if global_scale is None else global_scale).to(device=dev, dtype=_F32)
        scale = _ref.e4m3_round(amax / (torch.full_like(g, 6.0) * g))
        divisor = scale * g
    data = torch.empty(x.shape, dtype=torch.uint8, device=dev)
    _launch("scaled_cast", "cast_to_lowbit", _grid_vec(rows * cols), (_THREADS,),
            (x2, divisor.contiguous(), data, np.int64(rows), np.int64(cols), np.int64(block_rows),
             np.int64(block_cols), np.int32(_LOWBIT_FMT[_ref.ELEMENT_OF[fmt]]), np.float32(fmax)), dev, x.dtype)
    return data, torch.where(torch.isfinite(amax_all), scale, torch.nan).contiguous()


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    """float32 [1] holding 1.0 on ``device``, made once (read only): cast_from_lowbit's scale without NVFP4's."""
    return torch.ones(1, dtype=_F32, device=device)


def dequantize_scaled(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                      dtype: torch.dtype, fmt: str = "", global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA `fp8probe::dequantize_scaled`: cast<dtype>(fl32(float(data) * scale[tile])) (4/6-bit codes:
    decoded, and times NVFP4's tensor scale)."""
    lowbit = data.dtype == torch.uint8 and fmt in _ref.ELEMENT_OF and _ref.ELEMENT_OF[fmt] in _LOWBIT_FMT
    if (use_reference() or data.numel() == 0 or dtype not in _CUDA_TYPE or (data.dtype not in _FP8_FMT and not lowbit)
            or (global_scale is not None and global_scale.numel() != 1)):   # (a tensor scale per row: the reference)
        return _ref.dequantize_scaled(data, scale, block_rows, block_cols, dtype, fmt, global_scale)
    if lowbit:
        dev = data.device
        rows, cols = _ref._rows_cols(data.shape)
        # the tensor scale stays on the device (float() of it would make the host wait for the GPU)
        post = _one(dev) if global_scale is None else global_scale.to(device=dev, dtype=_F32).reshape(1).contiguous()
        out = torch.empty(data.shape, dtype=dtype, device=dev)
        _launch("scaled_cast", "cast_from_lowbit", _grid_vec(rows * cols), (_THREADS,),
                (data.contiguous(), scale.to(device=dev, dtype=_F32).contiguous(), out, np.int64(rows),
                 np.int64(cols), np.int64(block_rows), np.int64(block_cols),
                 np.int32(_LOWBIT_FMT[_ref.ELEMENT_OF[fmt]]), post), dev, dtype)
        return out
    dev = data.device
    rows, cols = _ref._rows_cols(data.shape)
    bits = data.contiguous().view(torch.uint8)
    scale = scale.to(device=dev, dtype=_F32).contiguous()
    out = torch.empty(data.shape, dtype=dtype, device=dev)
    _launch("scaled_cast", "cast_from_fp8", _grid_vec(rows * cols), (_THREADS,),
            (bits, scale, out, np.int64(rows), np.int64(cols), np.int64(block_rows), np.int64(block_cols),
             np.int32(_FP8_FMT[data.dtype])), dev, dtype)
    return out


# --------------------------------------------------------------------------------------------
# the analysis' error and operand statistics (metrics.cu), for analysis/metrics.py
# --------------------------------------------------------------------------------------------

#: torch dtype -> the C++ type the metrics kernels read (SUM_TYPES in fp8probe/kernels/__init__.py)
_SUM_TYPE = {torch.float64: "double", **_CUDA_TYPE}
#: the summation blocks and lanes of metrics.cu (and of the C path, backends/cpu.py error_sums)
_SUM_BLOCK = 8192
_SUM_LANES = 8


def sums_ready() -> bool:
    """True when error_sums / operand_sums can run: the kernels are registered (CuPy installed) and
    FP8PROBE_BACKEND is not ``reference``. Imports no CuPy."""
    return _registered and not use_reference()


def _sums_apply(*tensors: torch.Tensor) -> bool:
    return sums_ready() and all(t.dtype in _SUM_TYPE and t.numel() > 0 for t in tensors)


def _sum_blocks(kernel: str, a: torch.Tensor, b: torch.Tensor, args: tuple, nsums: int, width: int, ncounts: int
                ) -> list[float]:
    """Launch ``kernel<type(a), type(b)>`` (one thread per lane of every summation block, writing each block's
    ``width`` float64 values, the first ``nsums`` of them sums and the rest maxima, and ``ncounts`` counts), then
    sums_finish; the finished vector reaches the host in one copy (the call's one wait for the GPU)."""
    dev, n = a.device, a.numel()
    nb = -(-n // _SUM_BLOCK)
    slot = torch.empty(nb * width, dtype=torch.float64, device=dev)
    counts = torch.empty(nb * ncounts, dtype=torch.int64, device=dev)
    expr = f"{kernel}<{_SUM_TYPE[a.dtype]}, {_SUM_TYPE[b.dtype]}>"
    _launch("metrics", expr, (-(-nb * _SUM_LANES // _THREADS),), (_THREADS,), (*args, np.int64(n), slot, counts), dev)
    out = torch.empty(width + ncounts, dtype=torch.float64, device=dev)
    _launch("metrics", "sums_finish", (1,), (32,),
            (slot, np.int32(width), np.int32(nsums), counts, np.int32(ncounts), np.int64(nb), out), dev)
    return out.tolist()


def error_sums(ref: torch.Tensor, lp: torch.Tensor) -> tuple[float, float, float, float, float, int, int, int] | None:
    """backends/cpu.py ``error_sums`` for CUDA tensors, with the same bits: (Σr², Σ(r−q)², Σq², Σr·q, max|r−q|,
    compared, nonfinite, excluded). None when it does not apply (no kernels, FP8PROBE_BACKEND=reference, a dtype
    other than float64/float32/fp16/bf16, an empty tensor): the caller then uses torch."""
    if ref.numel() != lp.numel():
        raise ValueError(f"expected ref and lp with the same number of elements, got {ref.numel()} and {lp.numel()}")
    if not _sums_apply(ref, lp):
        return None
    r, q = ref.detach().contiguous(), lp.detach().contiguous()
    r2, e2, q2, rq, mx, compared, finite_r = _sum_blocks("error_sums_blocks", r, q, (r, q), 4, 5, 2)
    n = r.numel()
    return r2, e2, q2, rq, mx, int(compared), int(finite_r - compared), n - int(finite_r)


def operand_sums(x: torch.Tensor, q: torch.Tensor, saturated: torch.Tensor | None
                 ) -> tuple[float, float, int, int, int, int, int, int] | None:
    """backends/cpu.py ``operand_sums`` for CUDA tensors, with the same bits: (Σx², Σ(x−q)², finite, nonzero,
    underflow, saturated, excluded, nonfinite); ``saturated`` a bool mask, or None for |x| > max|q| over the
    finite pairs (a first pass finds that max on the GPU). None when it does not apply (as error_sums)."""
    if x.numel() != q.numel() or (saturated is not None and saturated.numel() != x.numel()):
        raise ValueError(f"expected x, q (and saturated) with the same number of elements, got {x.numel()}, "
                         f"{q.numel()}" + ("" if saturated is None else f", {saturated.numel()}"))
    if not _sums_apply(x, q) or (saturated is not None and saturated.dtype != torch.bool):
        return None
    xc, qc = x.detach().contiguous(), q.detach().contiguous()
    n, dev = xc.numel(), xc.device
    qmax = torch.zeros(1, dtype=torch.int64, device=dev)   # bits of max|q|, 0 = +0.0
    if saturated is None:
        _launch("metrics", f"operand_qmax<{_SUM_TYPE[xc.dtype]}, {_SUM_TYPE[qc.dtype]}>",
                _grid_vec(n, _REDUCE_GRID), (_THREADS,), (xc, qc, np.int64(n), qmax), dev)
        sat, has_sat = qmax, 0                                # the mask pointer is not read
    else:
        sat, has_sat = saturated.detach().contiguous().view(torch.uint8), 1
    x2, e2, fin, nz, under, nsat, qbad = _sum_blocks("operand_sums_blocks", xc, qc,
                                                     (xc, qc, sat, np.int32(has_sat), qmax), 2, 2, 5)
    return x2, e2, int(fin), int(nz), int(under), int(nsat), n - int(fin), int(qbad)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------

#: every fp8probe op and its CUDA launcher (names = fp8probe/ops.py schemas)
CUDA_KERNELS = {
    "quantize_blockwise": quantize_blockwise,
    "quantize_global": quantize_global,
    "dequantize_blockwise": dequantize_blockwise,
    "int8_vectorwise_quant": int8_vectorwise_quant,
    "int8_vectorwise_dequant": int8_vectorwise_dequant,
    "int8_double_quant": int8_double_quant,
    "int8_linear_matmul": int8_linear_matmul,
    "int8_mm_dequant": int8_mm_dequant,
    "quantize_scaled": quantize_scaled,
    "dequantize_scaled": dequantize_scaled,
}


def register() -> None:
    """Register the CuPy launchers for CUDA tensors (called once by fp8probe/ops.py at import).

    Does nothing when CuPy is not installed or FP8PROBE_BACKEND=reference; imports no CuPy itself
    (find_spec only locates the package), so importing fp8probe never initialises CUDA.
    """
    global _registered
    if _registered or use_reference() or importlib.util.find_spec("cupy") is None:
        return
    for name, fn in CUDA_KERNELS.items():
        torch.library.register_kernel(f"fp8probe::{name}", "cuda", fn)
    _registered = True
