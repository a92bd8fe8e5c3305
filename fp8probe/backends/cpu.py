"""CPU fast path: the C kernels of fp8probe._fastpath for codebook quantise/dequantise, bit-exact with the reference.

``register()`` (called at the end of ``fp8probe/ops.py``) installs CPU kernels for
``fp8probe::quantize_blockwise``, ``quantize_global``, ``dequantize_blockwise``,
``int8_vectorwise_quant`` and the OCP FP8 / MX (every scale rule, FP8/FP6/FP4 elements) / NVFP4 scaled casts ``quantize_scaled`` / ``dequantize_scaled`` with
``torch.library.register_kernel(..., "cpu", ...)``. Each kernel takes exactly its op's arguments and
returns what ``backends/reference.py`` returns, bit for bit: the C code performs the same float32
operations in the same order (see the header of fp8probe/_fastpath.c) and reuses the reference's
65536-bucket search tables (``reference._search_tables``). The reference runs instead for whatever
the C code does not cover:

* the extension was not built (it is optional: a failed compile still installs fp8probe), or
  ``FP8PROBE_BACKEND=reference`` is set (checked at every call);
* ``compat="bnb"`` quantisation (codebook and int8), and bnb's half-away-from-zero fp16 dequant cast;
* tensors with a NaN/±Inf (the C absmax pass reports them; specials are rare, so the whole call is
  re-run by the reference, which records them), and non-finite absmax/codebook on dequantisation;
* empty tensors, and codebooks whose search tables do not exist (a non-monotone rule).

Non-contiguous inputs are made contiguous first (the reference reads them in C order too), except transposed
views (x.mT contiguous: the replay's Gᵀ, Aᵀ, Wᵀ and wgrad's result), which the scaled casts, nvfp4_global_scale
and the metrics reductions read in place: a band or work unit at a time, gathered by 8x8 transposes into a
buffer of ~64K elements, instead of a copy of the whole tensor (108 MiB at a 49152x576 LM head).
``quantize_blockwise_into`` / ``dequantize_blockwise_into`` write into caller-provided outputs
without temporaries; ``functional.py`` uses them for ``out=`` / ``absmax=``.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import NamedTuple

import torch

from fp8probe.backends import reference as _ref
from fp8probe.backends.int8_gemm import int8_gemm_float
from fp8probe.backends.reference import use_reference
from fp8probe.formats import fl32

_F32 = torch.float32
_F32_MAX = torch.finfo(torch.float32).max
#: torch dtype -> the dtype code of the C functions (0 fp32, 1 fp16, 2 bf16)
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_EXT: ModuleType | None = None
_EXT_TRIED = False
_TABLES: dict[bytes, tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None] = {}
_registered = False


def _ext() -> ModuleType | None:
    """The compiled extension, imported on first use; None when it was not built."""
    global _EXT, _EXT_TRIED
    if not _EXT_TRIED:
        _EXT_TRIED = True
        try:
            from fp8probe import _fastpath
        except ImportError:
            _fastpath = None
        _EXT = _fastpath
    return _EXT


def available() -> bool:
    """True when the C extension ``fp8probe._fastpath`` is built and importable."""
    return _ext() is not None


def enabled() -> bool:
    """True when CPU calls of the covered ops run the C kernels (built and not forced off)."""
    return available() and not use_reference()


def backend_name() -> str:
    """The active CPU backend for display: ``"c-avx2"``, ``"c-scalar"`` or ``"reference"``."""
    if not enabled():
        return "reference"
    return f"c-{_ext().simd()}"


def _threads(n: int) -> int:
    """Worker threads for n elements: torch's intra-op setting (the C side runs small inputs serially)."""
    return max(1, torch.get_num_threads())


def _tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None:
    """(base uint8 [65536 + 4], thresholds float32 [255 + m], m, packed int32 [65536] or None) for the
    even rule, cached per codebook.

    ``base`` is the reference's int32 bucket table narrowed to bytes (it counts thresholds, <= 255)
    so it is 64 KiB instead of 256 KiB; the 4 padding bytes let the C code read it with 4-byte gathers.
    """
    key = code.numpy().tobytes()
    if key not in _TABLES:
        t = _ref._search_tables(code, "even")
        if t is None:
            _TABLES[key] = None
        else:
            base, t_val, m = t
            base8 = torch.cat([base.to(torch.uint8), torch.zeros(4, dtype=torch.uint8)])
            _TABLES[key] = (base8.contiguous(), t_val.to(_F32).contiguous(), int(m), _packed(base, t_val, int(m)))
    return _TABLES[key]


def _packed(base: torch.Tensor, t_val: torch.Tensor, m: int) -> torch.Tensor | None:
    """int32 [65536] one-gather table for m <= 1: ``base | has << 8 | low16(key(T)) << 16`` per bucket.

    T = t_val[base[b]] is the only threshold the bucket can hold; ``has`` says whether it lies in
    the bucket (same top 16 bits). All keys of one bucket share their top 16 bits, so comparing
    the low 16 bits of the order keys decides ``xn >= T`` exactly (see _fastpath.c).
    """
    if m > 1:
        return None
    b = torch.arange(65536, dtype=torch.int64)
    base = base.to(torch.int64)
    if m == 0:
        return base.to(torch.int32).contiguous()
    tb = t_val.view(torch.int32).to(torch.int64)[base]  # T's bit pattern, as a signed value
    has = ((tb >> 16) & 0xFFFF) == b
    key = tb ^ ((tb >> 31) & 0x7FFFFFFF)
    w = base | (has.to(torch.int64) << 8) | ((key & 0xFFFF) << 16)
    w = torch.where(w >= 2**31, w - 2**32, w)  # wrap to int32
    return w.to(torch.int32).contiguous()


_HUGE_MIN = 8 << 20  # bytes: below this the page faults of a fresh output are not worth an madvise


def _fresh(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new output tensor; large ones get transparent huge pages advised before the C code first
    touches them (fresh 64 MB dequant output: 1.6-2.0 -> 3.6-3.9 GB/s, one page fault per 2 MiB)."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes >= _HUGE_MIN:
        _ext().advise_hugepages(t.data_ptr(), nbytes)
    return t


def _cpu_code(code: torch.Tensor) -> torch.Tensor:
    return code.detach().to("cpu", _F32).contiguous()


def _run_quantize(A: torch.Tensor, code: torch.Tensor, blocksize: int, q: torch.Tensor,
                  absmax: torch.Tensor) -> bool:
    """Run the C quantiser into contiguous q (uint8, n) / absmax (float32, nb); False if it declined."""
    tables = _tables(code)
    if tables is None:
        return False
    base8, t_val, m, packed = tables
    n = A.numel()
    rc = _ext().quantize_blockwise(A.data_ptr(), _DT[A.dtype], n, blocksize, q.data_ptr(), absmax.data_ptr(),
                                   base8.data_ptr(), t_val.data_ptr(), m, _threads(n),
                                   packed.data_ptr() if packed is not None else 0)
    return rc == 0


def _quant_applies(A: torch.Tensor, compat: str) -> bool:
    return (compat == "" and A.device.type == "cpu" and A.dtype in _DT and A.numel() > 0
            and enabled())


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``fp8probe::quantize_blockwise``: same arguments and results as the reference's.

    A: fp32/fp16/bf16, any shape; code: float32 [256]; blocksize: any int > 0. Returns ``q`` (uint8,
    A.shape), ``absmax`` (float32 [ceil(n/blocksize)]) and the (empty) special index/value tensors.
    """
    if not _quant_applies(A, compat):
        return _ref.quantize_blockwise(A, code, blocksize, compat)
    Ac = contiguous(A)
    q = _fresh(A.shape, torch.uint8)
    absmax = torch.empty(-(-A.numel() // blocksize), dtype=_F32)
    if not _run_quantize(Ac, _cpu_code(code), blocksize, q, absmax):
        return _ref.quantize_blockwise(A, code, blocksize, compat)
    return (q, absmax, *_ref._empty_specials(torch.device("cpu")))


def quantize_global(A: torch.Tensor, code: torch.Tensor, compat: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``fp8probe::quantize_global``: the default mode is one block over the whole tensor
    (the C code reduces the absmax over per-thread chunks, then searches the chunks)."""
    if not _quant_applies(A, compat):
        return _ref.quantize_global(A, code, compat)
    return quantize_blockwise(A, code, A.numel(), compat)


def quantize_blockwise_into(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str,
                            q: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Quantise straight into caller-provided ``q`` (uint8, A.shape) and ``absmax`` (float32 [nb]).

    Returns the special index/value tensors (empty) when the C path wrote both outputs, or None when
    it does not apply (reference-only case, wrong shape/dtype/device, non-contiguous output, NaN/Inf
    in A): the caller then computes the result another way (q/absmax may hold partial garbage).
    """
    nb = -(-A.numel() // blocksize)
    if not (_quant_applies(A, compat) and isinstance(q, torch.Tensor) and isinstance(absmax, torch.Tensor)
            and q.dtype == torch.uint8 and q.shape == A.shape and q.device.type == "cpu" and q.is_contiguous()
            and absmax.dtype == _F32 and absmax.shape == (nb,) and absmax.device.type == "cpu"
            and absmax.is_contiguous()):
        return None
    if not _run_quantize(contiguous(A), _cpu_code(code), blocksize, q, absmax):
        return None
    return _ref._empty_specials(torch.device("cpu"))


def _deq_applies(q: torch.Tensor, dtype: torch.dtype, compat: str) -> bool:
    # compat only changes the fp16 cast (bnb rounds half away from zero); fp32/bf16 are the same op
    return (q.device.type == "cpu" and q.dtype == torch.uint8 and dtype in _DT and q.numel() > 0 and enabled()
            and (compat == "" or (compat == "bnb" and dtype != torch.float16)))


def _run_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    out: torch.Tensor) -> bool:
    n = q.numel()
    am = absmax.detach().to("cpu", _F32).contiguous()
    if am.numel() != -(-n // blocksize):
        return False
    code = _cpu_code(code)
    rc = _ext().dequantize_blockwise(q.data_ptr(), n, blocksize, am.data_ptr(), code.data_ptr(),
                                     out.data_ptr(), _DT[out.dtype], _threads(n))
    return rc == 0


def _scatter_specials(out: torch.Tensor, special_index: torch.Tensor, special_value: torch.Tensor) -> None:
    if special_index.numel():
        out.view(-1)[special_index.to(out.device)] = special_value.to(device=out.device, dtype=out.dtype)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype, special_index: torch.Tensor, special_value: torch.Tensor,
                         compat: str) -> torch.Tensor:
    """CPU kernel of ``fp8probe::dequantize_blockwise``: ``cast(fl32(code[q] * absmax[b]))``, RNE cast,
    then the special values scattered back; `dtype`, q.shape."""
    if not _deq_applies(q, dtype, compat):
        return _ref.dequantize_blockwise(q, absmax, code, blocksize, dtype, special_index, special_value, compat)
    qc = contiguous(q)
    out = _fresh(q.shape, dtype)
    if not _run_dequantize(qc, absmax, code, blocksize, out):
        return _ref.dequantize_blockwise(q, absmax, code, blocksize, dtype, special_index, special_value, compat)
    _scatter_specials(out, special_index, special_value)
    return out


def dequantize_blockwise_into(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              dtype: torch.dtype, special_index: torch.Tensor, special_value: torch.Tensor,
                              compat: str, out: torch.Tensor) -> bool:
    """Dequantise straight into ``out`` (`dtype`, q.shape, contiguous CPU). True when done; False when
    the C path does not apply (the caller then computes the result another way and validates `out`)."""
    if not (isinstance(out, torch.Tensor) and out.dtype == dtype and _deq_applies(q, dtype, compat)
            and out.shape == q.shape and out.device.type == "cpu" and out.is_contiguous()):
        return False
    if not _run_dequantize(contiguous(q), absmax, code, blocksize, out):
        return False
    _scatter_specials(out, special_index, special_value)
    return True


def int8_vectorwise_quant(A: torch.Tensor, threshold: float, compat: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``fp8probe::int8_vectorwise_quant`` (default mode; ``compat="bnb"`` runs the reference).

    A: fp32/fp16/bf16, viewed as [rows, cols]. Returns ``q`` (int8, A.shape), ``row_stats`` (float32
    [rows]) and ``outlier_cols`` (int64, sorted; empty when threshold == 0), like the reference.
    """
    if not _quant_applies(A, compat):
        return _ref.int8_vectorwise_quant(A, threshold, compat)
    rows, cols = _ref._rows_cols(A.shape)
    Ac = contiguous(A)
    q = _fresh(A.shape, torch.int8)
    row_stats = torch.empty(rows, dtype=_F32)
    colmask = torch.zeros(cols if threshold > 0 else 1, dtype=torch.uint8)
    _ext().int8_vectorwise_quant(Ac.data_ptr(), _DT[A.dtype], rows, cols, float(threshold), q.data_ptr(),
                                 row_stats.data_ptr(), colmask.data_ptr(), _threads(A.numel()))
    if threshold > 0:
        outlier_cols = colmask.nonzero().reshape(-1)
        if outlier_cols.numel():
            q.view(rows, cols)[:, outlier_cols] = 0  # a column with any outlier is zeroed in every row
    else:
        outlier_cols = torch.empty(0, dtype=torch.int64)
    return q, row_stats, outlier_cols


_SCALED_FMT = {"e4m3": 0, "e5m2": 1, "mxfp8-e4m3": 2, "mxfp8-e5m2": 3, "mxfp6-e2m3": 4, "mxfp6-e3m2": 5,
               "mxfp4-e2m1": 6, "nvfp4": 7}
_SCALE_RULE = {"floor": 0, "rceil": 1, "even": 2}
_FP8_TABLES: dict[torch.dtype, torch.Tensor] = {}
_LOWBIT_TABLES: dict[str, torch.Tensor] = {}


def _fp8_table(fp8: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 codes of an fp8 dtype (torch's own decoding, cached)."""
    table = _FP8_TABLES.get(fp8)
    if table is None:
        table = _FP8_TABLES[fp8] = torch.arange(256, dtype=torch.uint8).view(fp8).to(_F32)
    return table


def _lowbit_table(fmt: str) -> torch.Tensor:
    """float32 [256]: the values of a 4/6-bit format's element codes, NaN past its last code (a stray
    code then gives a NaN output, and the reference runs and reports it)."""
    table = _LOWBIT_TABLES.get(fmt)
    if table is None:
        values = _ref._lowbit_table(_ref.ELEMENT_OF[fmt])
        table = torch.full((256,), float("nan"), dtype=_F32)
        table[: values.numel()] = values
        _LOWBIT_TABLES[fmt] = table
    return table


def _scalar_scale(g: torch.Tensor | None) -> tuple[int, float] | None:
    """(has_g, g as float32) for the C calls; None when the tensor scale is not a 0-D tensor (the
    reference then runs: it broadcasts other shapes)."""
    if g is None:
        return 0, 1.0
    if not isinstance(g, torch.Tensor) or g.dim() != 0:
        return None
    return 1, float(g.detach().to("cpu", _F32))


_HT_SIGNS: dict[tuple[int, int | None], torch.Tensor] = {}


def hadamard_transform(x: torch.Tensor, signs_seed: int | None = 0, n: int = _ref.HADAMARD_SIZE) -> torch.Tensor:
    """CPU kernel of ``reference.hadamard_transform`` (same arguments, the same bits): one C pass over x, the
    butterfly's float32 operations in the reference's order (NaN payloads included; a float16 NaN keeps its
    payload, as torch's vectorised conversion does). A transposed view (x.mT contiguous: the wgrad operands Gᵀ
    and Aᵀ) is read in place, other layouts through contiguous(). The reference runs for other devices and
    dtypes, empty tensors, 0-d tensors, n > 256 and with the extension off (it also validates n)."""
    if (x.device.type != "cpu" or x.dtype not in _DT or x.dim() == 0 or x.numel() == 0 or not enabled()
            or not isinstance(n, int) or not 1 <= n <= 256):
        return _ref.hadamard_transform(x, signs_seed, n)
    key = (n, None if signs_seed is None else int(signs_seed) & _ref._M32)
    signs = _HT_SIGNS.get(key)
    if signs is None:
        signs = torch.tensor(_ref._hadamard_signs(n, signs_seed), dtype=_F32)  # validates n (a power of four)
        if len(_HT_SIGNS) < 64:
            _HT_SIGNS[key] = signs
    x = x.detach()
    C = x.shape[-1]
    if x.dim() >= 2 and _is_transposed(x):
        xc, xt, R = x, True, x.shape[-2]
    else:
        xc, xt, R = x.contiguous(), False, x.numel() // C
    B = x.numel() // (R * C)
    out = _fresh((*x.shape[:-1], -(-C // n) * n), _F32)
    _ext().hadamard(xc.data_ptr(), _DT[x.dtype], B, R, C, n, signs.data_ptr(), 1.0 / math.sqrt(n), out.data_ptr(),
                    xt, _threads(x.numel()))
    return out


def nvfp4_global_scale(x: torch.Tensor, slices: int | None = None) -> torch.Tensor:
    """``reference.nvfp4_global_scale`` (0-D float32 ``fl32(finite amax / 2688)``, 1 when not > 0; with
    ``slices`` k, float32 [k]: one per equal consecutive part of x's C-order elements), each amax by one C pass on
    CPU (the reference's isfinite/abs/where/amax chain is ~6x slower; a stacked attention operand has a slice
    per head); other devices, dtypes, empty tensors and slices that do not divide x run the reference."""
    if x.device.type != "cpu" or x.dtype not in _DT or x.numel() == 0 or not enabled() \
            or (slices is not None and (slices < 1 or x.numel() % slices)):
        return _ref.nvfp4_global_scale(x, slices)
    x = x.detach()
    if slices is None:
        xc = x.mT if _is_transposed(x) else contiguous(x)  # a max of all elements: any order, the storage as it is
        amax = torch.tensor(_ext().finite_amax(xc.data_ptr(), _DT[x.dtype], x.numel(), _threads(x.numel())),
                            dtype=_F32)
    else:  # each slice's elements are consecutive in C order
        xc, n = contiguous(x), x.numel() // slices
        base, step = xc.data_ptr(), n * xc.element_size()
        amax = torch.tensor([_ext().finite_amax(base + k * step, _DT[x.dtype], n, _threads(n)) for k in range(slices)],
                            dtype=_F32)
    g = amax / torch.full_like(amax, _ref.NVFP4_GLOBAL_RANGE)
    return torch.where(g > 0, g, 1.0)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """x.detach().contiguous(); a transposed view of a contiguous tensor (2-D, or [Bt, R, C] whose last two dims
    are swapped: a weight's fake-quantised Wᵀ; the C passes that read such views in place do not come here) is
    copied by the C blocked transpose, slice by slice: the same bits, 2-4x faster (256x576 float32: 0.147
    -> 0.067 ms CPU; 256x1536: 0.47 -> 0.15 ms; the 49152x576 LM head ~0.23 s -> ~0.06 s)."""
    x = x.detach()
    if x.dim() in (2, 3) and _is_transposed(x) and x.dtype in _DT and x.device.type == "cpu" and enabled():
        out = _fresh(x.shape, x.dtype)
        rows, cols, size = x.shape[-2], x.shape[-1], x.element_size()
        step = rows * cols * size
        for b in range(x.shape[0] if x.dim() == 3 else 1):
            _ext().transpose_copy(x.data_ptr() + b * step, out.data_ptr() + b * step, cols, rows, size,
                                  _threads(rows * cols))
        return out
    return x.contiguous()


def _scaled_cast_applies(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str) -> bool:
    """Whether the C scaled cast (quantize_scaled, fused_scaled) takes these arguments: a non-empty CPU
    float32/float16/bfloat16 tensor, a known format and rule, positive tiles, the extension enabled."""
    return (x.device.type == "cpu" and x.dtype in _DT and x.numel() > 0 and fmt in _SCALED_FMT
            and scale_rule in _SCALE_RULE and block_rows > 0 and block_cols > 0 and enabled())


def _is_transposed(x: torch.Tensor) -> bool:
    """Whether x is a transposed view of a contiguous tensor: x.mT contiguous (storage [.., cols, rows] of
    the logical [.., rows, cols]), x itself not contiguous."""
    return x.dim() >= 2 and x.numel() > 0 and not x.is_contiguous() and x.mT.is_contiguous()


def _scaled_input(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor, transposed) for the C scaled casts: a 2-D transposed view (x.mT contiguous: the replay's Gᵀ, Aᵀ
    and Wᵀ) as it is, the C code reading it band by band (no copy: the LM head's Wᵀ is 108 MiB); anything else
    through contiguous()."""
    x = x.detach()
    if x.dim() == 2 and _is_transposed(x):
        return x, True
    return contiguous(x), False


#: _rounding_args of a nearest cast without per-row tensor scales (period 0: the C code takes R)
_NEAREST = ((False, 0, 0, 0), None)


def _rounding_args(x: torch.Tensor, fmt: str, block_rows: int, rounding: str, seed: int, period_rows: int | None,
                   global_scale: torch.Tensor | None) -> tuple[tuple, torch.Tensor | None] | None:
    """The C scaled casts' trailing arguments (stochastic, key, period_rows, per-row tensor scales' address) and
    the contiguous float32 per-row scales they point at (kept alive by the caller), for reference.quantize_scaled's
    ``rounding``, ``seed``, ``period_rows`` and an NVFP4 [R, 1] ``global_scale`` with 1×bc tiles; the tensor
    scale stays the caller's business otherwise (``(..., 0)``, None). None when the reference must run (it also
    raises for what it rejects): an unknown rounding or one the format does not take, a period that does not
    divide the rows, any other non-0-D tensor scale."""
    if rounding == "nearest" and (global_scale is None or (isinstance(global_scale, torch.Tensor)
                                                          and global_scale.dim() == 0)):
        return _NEAREST  # (the reference ignores period_rows and seed here)
    if fmt not in _SCALED_FMT or not _ref.rounding_allowed(rounding, fmt):
        return None
    R, _ = _ref._rows_cols(x.shape)
    period = R if period_rows is None or rounding == "nearest" else period_rows
    if isinstance(period, bool) or not isinstance(period, int) or period < 1 or R % period:
        return None
    key = _ref._mix32((int(seed) & _ref._M32) ^ 0x9E3779B9) if rounding == "stochastic" else 0
    g_rows = None
    if isinstance(global_scale, torch.Tensor) and global_scale.dim() != 0:
        if not (fmt == "nvfp4" and min(block_rows, R) == 1 and tuple(global_scale.shape) == (R, 1)):
            return None
        g_rows = global_scale.detach().to("cpu", _F32).contiguous()
    return (rounding == "stochastic", key, period, 0 if g_rows is None else g_rows.data_ptr()), g_rows


def quantize_scaled(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                    global_scale: torch.Tensor | None = None, rounding: str = "nearest", seed: int = 0,
                    period_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU kernel of ``fp8probe::quantize_scaled``: same arguments, results and errors as the reference's.

    One pass for the tile amax (finite values; and, for the 4/6-bit formats, whether the tile holds a
    NaN/Inf) and one for the divide-clamp-round; NaN/±Inf inputs are handled in C exactly as the
    reference does. Every format and MX scale rule runs in C, with stochastic rounding (the reference's
    random numbers, ``period_rows`` and per-row NVFP4 tensor scales of 1×bc tiles included); the reference
    runs for empty tensors, unknown formats, rules or roundings (it raises), non-positive tile sizes, a
    period that does not divide the rows and any other NVFP4 `global_scale` that is not a 0-D tensor.
    """
    extra = _rounding_args(x, fmt, block_rows, rounding, seed, period_rows, global_scale)
    g = (_scalar_scale(None if extra is None or extra[1] is not None else global_scale)
         if fmt == "nvfp4" else (0, 1.0))
    if extra is None or g is None or not _scaled_cast_applies(x, fmt, block_rows, block_cols, scale_rule):
        return _ref.quantize_scaled(x, fmt, block_rows, block_cols, scale_rule, global_scale, rounding, seed,
                                    period_rows)
    storage = _ref.SCALED_FORMATS[fmt][0]
    R, C = _ref._rows_cols(x.shape)
    br, bc = min(block_rows, R), min(block_cols, C)
    xc, xt = _scaled_input(x)
    data = _fresh(x.shape, storage)
    scale = torch.empty(-(-R // br), -(-C // bc), dtype=_F32)
    _ext().quantize_scaled(xc.data_ptr(), _DT[x.dtype], R, C, br, bc, _SCALED_FMT[fmt], data.data_ptr(),
                           scale.data_ptr(), _threads(x.numel()), _SCALE_RULE[scale_rule], *g, xt, *extra[0])
    return data, scale


def dequantize_scaled(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                      dtype: torch.dtype, fmt: str = "", global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CPU kernel of ``fp8probe::dequantize_scaled``; the reference runs for NaN results (torch's NaN
    casts to bf16 drop the sign; 4/6-bit tiles with a NaN scale; stray codes), empty tensors, shapes
    it would reject, uint8 data without a 4/6-bit `fmt` and a `global_scale` that is not 0-D."""
    out = _fresh(data.shape, dtype) if _deq_scaled_applies(data, scale, block_rows, block_cols, dtype, fmt,
                                                           global_scale) else None
    if out is None or not _run_dequantize_scaled(data, scale, block_rows, block_cols, dtype, fmt, global_scale, out):
        return _ref.dequantize_scaled(data, scale, block_rows, block_cols, dtype, fmt, global_scale)
    return out


def dequantize_scaled_into(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                           dtype: torch.dtype, fmt: str, global_scale: torch.Tensor | None, out: torch.Tensor) -> bool:
    """Dequantise straight into ``out`` (`dtype`, data.shape, contiguous CPU). True when done; False when the
    C path does not apply or gave a NaN (``out`` may then hold anything: the caller computes the result another
    way and writes all of ``out``)."""
    if not (isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == data.shape
            and out.device.type == "cpu" and out.is_contiguous()
            and _deq_scaled_applies(data, scale, block_rows, block_cols, dtype, fmt, global_scale)):
        return False
    return _run_dequantize_scaled(data, scale, block_rows, block_cols, dtype, fmt, global_scale, out)


def _deq_scaled_applies(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                        dtype: torch.dtype, fmt: str, global_scale: torch.Tensor | None) -> bool:
    fp8 = data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    lowbit = data.dtype == torch.uint8 and _ref.SCALED_FORMATS.get(fmt, (None,))[0] == torch.uint8
    if (data.device.type != "cpu" or data.numel() == 0 or dtype not in _DT or not enabled()
            or _scalar_scale(global_scale) is None or not (fp8 or lowbit) or block_rows <= 0 or block_cols <= 0):
        return False
    R, C = _ref._rows_cols(data.shape)
    return tuple(scale.shape) == (-(-R // min(block_rows, R)), -(-C // min(block_cols, C)))


def _run_dequantize_scaled(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                           dtype: torch.dtype, fmt: str, global_scale: torch.Tensor | None, out: torch.Tensor) -> bool:
    """The C kernel into ``out`` (_deq_scaled_applies checked); False when it found a NaN result."""
    R, C = _ref._rows_cols(data.shape)
    br, bc = min(block_rows, R), min(block_cols, C)
    sc = scale.detach().to("cpu", _F32).contiguous()
    dc = contiguous(data)
    lowbit = data.dtype == torch.uint8
    table = _lowbit_table(fmt) if lowbit else _fp8_table(data.dtype)
    bad = _ext().dequantize_scaled(dc.view(torch.uint8).data_ptr(), table.data_ptr(), sc.data_ptr(),
                                   R, C, br, bc, out.data_ptr(), _DT[dtype], _threads(data.numel()),
                                   *_scalar_scale(global_scale))
    return not bad


#: the ops whose CPU kernel is this module's function of the same name (register() installs them;
#: kernel() hands them to functional.py's direct eager calls)
CPU_KERNELS = ("quantize_blockwise", "quantize_global", "dequantize_blockwise", "int8_vectorwise_quant",
               "quantize_scaled", "dequantize_scaled",
               "int8_double_quant", "int8_vectorwise_dequant", "int8_mm_dequant")  # bnb part


def register() -> None:
    """Install the CPU kernels (idempotent). Does nothing when the extension is not built or
    FP8PROBE_BACKEND=reference is set at import time."""
    global _registered
    if _registered or not enabled():
        return
    _registered = True
    for name in CPU_KERNELS:
        torch.library.register_kernel(f"fp8probe::{name}", "cpu", globals()[name])


# --------------------------------------------------------------------------------------------
# Metrics reductions (analysis/metrics.py): the sums, counts and extremes of the error, operand and
# dynamic-range accumulators in one C pass per tensor, instead of ~10 torch passes with float64 copies.
# --------------------------------------------------------------------------------------------
#: dtype codes of the metrics reductions: the quantiser codes plus 3 = float64 (read as is)
_SUM_DT = {**_DT, torch.float64: 3}
#: Elements per block of the deterministic float64 sums (see ``error_sums``).
SUM_BLOCK = 8192
SUM_LANES = 8


def _flat_operand(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(tensor, rows, cols) for the C reductions, which read x flat in C order: x itself with its logical
    (rows, cols) when it is a transposed view (the C pass gathers it block by block: no copy of x, e.g. the
    108 MiB wgrad result of a 49152x576 LM head), else contiguous(x) and (0, 0)."""
    x = x.detach()
    if _is_transposed(x):
        return x, x.shape[-2], x.shape[-1]
    return contiguous(x), 0, 0


def _sums_apply(*tensors: torch.Tensor) -> bool:
    return enabled() and all(t.device.type == "cpu" and t.dtype in _SUM_DT and t.numel() > 0 for t in tensors)


def error_sums(ref: torch.Tensor, lp: torch.Tensor) -> tuple[float, float, float, float, float, int, int, int] | None:
    """(Σr², Σ(r−q)², Σq², Σr·q, max|r−q|, compared, nonfinite, excluded) of ``ref`` (r) and ``lp`` (q) in one pass.

    ref, lp: CPU float32/float64/bf16/fp16, the same number of elements (read flat in C order; a transposed
    view, x.mT contiguous, is read in place block by block, no copy of it is made). Sums
    and the max run over the pairs where both are finite (``compared``); ``nonfinite`` counts pairs
    with a finite r and a NaN/±Inf q, ``excluded`` those with a NaN/±Inf r. Values widen exactly to
    float64, products and differences are formed in float64.

    Summation order (the same bits for any thread count or SIMD path): the flat index range is cut
    into blocks of SUM_BLOCK = 8192 elements (the last one partial); inside a block element i
    (block-relative) is added to lane i % 8 of 8 float64 lanes, in index order (a left-out element
    adds +0.0, which changes no lane); the lanes combine as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)) and
    the block results are added in block order to 0.0. Max and counts are exact.

    None when the C path does not apply (extension not built or FP8PROBE_BACKEND=reference, a
    non-CPU tensor, another dtype, an empty tensor): the caller then uses torch.
    """
    if ref.numel() != lp.numel():
        raise ValueError(f"expected ref and lp with the same number of elements, got {ref.numel()} and {lp.numel()}")
    if not _sums_apply(ref, lp):
        return None
    (r, r_rows, r_cols), (q, q_rows, q_cols) = _flat_operand(ref), _flat_operand(lp)
    n = r.numel()
    return _ext().error_sums(r.data_ptr(), _SUM_DT[r.dtype], q.data_ptr(), _SUM_DT[q.dtype], n, _threads(n),
                             r_rows, r_cols, q_rows, q_cols)


def operand_sums(x: torch.Tensor, q: torch.Tensor, saturated: torch.Tensor | None
                 ) -> tuple[float, float, int, int, int, int, int, int] | None:
    """(Σx², Σ(x−q)², finite, nonzero, underflow, saturated, excluded, nonfinite) of an operand x and its
    dequantised value q in one pass (two when ``saturated`` is None: max|q| first).

    x, q: CPU float32/float64/bf16/fp16 with the same number of elements; ``saturated``: a bool mask
    of as many elements, or None for |x| > max|q| over the pairs where both are finite (compared in
    float64, which holds both exactly). The sums run over the pairs where both are finite, in the
    order of ``error_sums``; finite: finite x; nonzero: finite non-zero x; underflow: those with
    q == 0; saturated: finite x in the mask; excluded: NaN/±Inf x; nonfinite: finite x with NaN/±Inf q.
    None when the C path does not apply (as ``error_sums``).
    """
    if x.numel() != q.numel() or (saturated is not None and saturated.numel() != x.numel()):
        raise ValueError(f"expected x, q (and saturated) with the same number of elements, got {x.numel()}, "
                         f"{q.numel()}" + ("" if saturated is None else f", {saturated.numel()}"))
    if not _sums_apply(x, q) or (saturated is not None and saturated.device.type != "cpu"):
        return None
    (xc, x_rows, x_cols), (qc, q_rows, q_cols) = _flat_operand(x), _flat_operand(q)
    sat_ptr, s_rows, s_cols = 0, 0, 0
    if saturated is not None:
        sat = saturated.detach()
        sat, s_rows, s_cols = _flat_operand(sat if sat.dtype == torch.bool else sat != 0)
        sat_ptr = sat.data_ptr()  # bool is one byte, 0 or 1: read as uint8
    n = xc.numel()
    return _ext().operand_sums(xc.data_ptr(), _SUM_DT[xc.dtype], qc.data_ptr(), _SUM_DT[qc.dtype], sat_ptr, n,
                               _threads(n), x_rows, x_cols, q_rows, q_cols, s_rows, s_cols)


def tensor_stats(x2: torch.Tensor, tiny: float, limits: tuple[float, float, float], segment: int,
                 log2_lo: int, bins: int) -> dict | None:
    """One tensor's dynamic-range statistics in two C passes, over a 2-D view ``x2`` [rows, cols] (a transposed
    view, x2.mT contiguous, is read in place, a work unit at a time).

    Returns a dict: n (finite values), sum and mean (Σx in the order of ``error_sums``, mean = Σ/n),
    m2, m3, m4 (Σd², Σd²·d, Σd²·d² with d = x − mean in float64, same order; 0 when n == 0), amax
    (finite |x|, 0.0 when none), min_nonzero (smallest finite non-zero |x|, inf when none), the counts
    nan, pos_inf, neg_inf, zeros, subnormal (0 < |x| < tiny), over (finite |x| > each of ``limits``),
    hist (int64 [bins]: finite non-zero |x| by floor(log2|x|), clamped into [log2_lo, log2_lo + bins))
    and segmax (float64 [rows · ceil(cols / segment)]: the absmax of every 1 × segment row piece, the
    last one of a row partial, NaN/±Inf counted as 0). None when the C path does not apply.
    """
    if x2.dim() != 2:
        raise ValueError(f"expected a 2-D view [rows, cols], got shape {list(x2.shape)}")
    if len(limits) != 3:
        raise ValueError(f"expected 3 limits, got {len(limits)}")
    if not _sums_apply(x2):
        return None
    xc, x_rows, _ = _flat_operand(x2)  # a transposed view is read in place
    rows, cols = xc.shape
    hist = torch.empty(bins, dtype=torch.int64)
    segmax = torch.zeros(rows * -(-cols // segment), dtype=torch.float64)
    out = _ext().tensor_stats(xc.data_ptr(), _SUM_DT[xc.dtype], xc.numel(), cols, segment, float(tiny),
                              *(float(v) for v in limits), log2_lo, bins, hist.data_ptr(), segmax.data_ptr(),
                              _threads(xc.numel()), x_rows > 0)
    out["hist"], out["segmax"] = hist, segmax
    return out


def block_stats(scale: torch.Tensor, zero_block: torch.Tensor, nonzero: torch.Tensor, underflow: torch.Tensor,
                clipped: torch.Tensor) -> tuple | None:
    """One batch of block records in one C pass (analysis/block_scales._batch_stats): (zero blocks, NaN
    scales, zero scales, clipped blocks, underflow blocks, nonzero, underflow, scales, max block underflow
    fraction, scale min, scale max, Σlog2 s, Σ(log2 s)², exp_lo, exp counts), the sums in index order;
    None when the C path does not apply (not built or disabled, not CPU, a scale
    that is not float32, counts that are not int64 or flags that are not bool)."""
    n = scale.numel()
    if not (enabled() and all(t.device.type == "cpu" and t.numel() == n for t in (zero_block, nonzero, underflow, clipped))
            and scale.device.type == "cpu" and scale.dtype == torch.float32 and nonzero.dtype == underflow.dtype == torch.int64
            and zero_block.dtype == clipped.dtype == torch.bool):
        return None
    ts = [t.detach().reshape(-1).contiguous() for t in (scale, zero_block, nonzero, underflow, clipped)]
    return _ext().block_stats(*(t.data_ptr() for t in ts), n)


def outlier_census(a2: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(col_amax float64 [cols], col_hits int64 [cols], rows_touched) of activations ``a2`` [rows, cols] in one pass.

    col_amax: max |x| per column with NaN read as 0 and ±Inf as Inf; col_hits: rows with |x| ≥ threshold
    per column (decided in float64, i.e. in real numbers: every value and the threshold are exact there);
    rows_touched: rows holding any such element. None when the C path does not apply (as ``error_sums``).
    """
    if a2.dim() != 2:
        raise ValueError(f"expected a 2-D activation [rows, cols], got shape {list(a2.shape)}")
    if not _sums_apply(a2):
        return None
    xc = contiguous(a2)
    rows, cols = xc.shape
    amax, hits = torch.empty(cols, dtype=torch.float64), torch.empty(cols, dtype=torch.int64)
    touched = _ext().outlier_census(xc.data_ptr(), _SUM_DT[xc.dtype], rows, cols, float(threshold), amax.data_ptr(),
                                    hits.data_ptr(), _threads(xc.numel()))
    return amax, hits, touched


# --------------------------------------------------------------------------------------------
# bnb part: direct eager calls, fused codebook fake-quantisation
# --------------------------------------------------------------------------------------------
def kernel(name: str):
    """The function a CPU call of ``torch.ops.fp8probe.<name>`` reaches through the dispatcher: this
    module's kernel when register() installed it, else the reference (functional.py calls it directly
    in plain eager CPU calls, skipping ~60 us of custom-op dispatch)."""
    if _registered and name in CPU_KERNELS:
        return globals()[name]
    return getattr(_ref, name)


_SORTED: dict[bytes, bool] = {}


def fake_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, with_values: bool = True
                            ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """``dequantize_blockwise(quantize_blockwise(A, code, blocksize))`` (default mode, A.dtype) and the block
    absmax (float32 [ceil(n/blocksize)]) from one fused C pass, bit-identical to the two steps; with
    ``with_values`` False only the absmax (values None). None when the C path does not apply (fast path
    off or not built, not a CPU fp32/fp16/bf16 tensor, empty, a codebook that is not sorted ascending or
    has no search tables, NaN/±Inf in A): the caller then runs the two steps."""
    out = _fake_quantize_c(A, code, blocksize, with_values, False)
    return None if out is None else out[:2]


def fake_quantize_records(A: torch.Tensor, code: torch.Tensor, blocksize: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """fake_quantize_blockwise's (values, absmax) plus ``counts`` int64 [3, nblocks] from the same C pass: per
    block of the flattened A, its non-zero elements (all are finite when this applies), those dequantised
    to 0 (underflow) and those clipped (|y| >= absmax and |a| > |y|), compared in float32 as
    analysis/block_scales._codebook_records does on (A, values). None where fake_quantize_blockwise is."""
    return _fake_quantize_c(A, code, blocksize, True, True)


def _fake_quantize_c(A: torch.Tensor, code: torch.Tensor, blocksize: int, with_values: bool, with_counts: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None:
    if not _quant_applies(A, "") or A.requires_grad:
        return None
    code = _cpu_code(code)
    key = code.numpy().tobytes()
    if key not in _SORTED:
        _SORTED[key] = _ref.is_sorted(code)
    tables = _tables(code) if _SORTED[key] else None
    if tables is None:
        return None
    base8, t_val, m, packed = tables
    n = A.numel()
    Ac = contiguous(A)
    out = _fresh(A.shape, A.dtype) if with_values else None
    nb = -(-n // blocksize)
    absmax = torch.empty(nb, dtype=_F32)
    counts = torch.empty(3, nb, dtype=torch.int64) if with_counts else None
    rc = _ext().fake_quantize_blockwise(Ac.data_ptr(), _DT[A.dtype], n, blocksize, 0 if out is None else out.data_ptr(),
                                        absmax.data_ptr(), code.data_ptr(), base8.data_ptr(), t_val.data_ptr(), m,
                                        _threads(n), packed.data_ptr() if packed is not None else 0,
                                        0 if counts is None else counts.data_ptr())
    return None if rc else (out, absmax, counts)


_I8_SCALES = {"vectorwise": float(_ref.INV_127), "mm": float(_ref.INV_127_SQ)}


def int8_double_quant(A: torch.Tensor, threshold: float, compat: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU kernel of ``fp8probe::int8_double_quant`` (default mode): the row half is int8_vectorwise_quant's,
    the column half one C call (stats pass over column strips, then the codes); the reference's results
    bit for bit. ``compat="bnb"`` and empty tensors run the reference."""
    if not _quant_applies(A, compat):
        return _ref.int8_double_quant(A, threshold, compat)
    q_row, row_stats, cols = int8_vectorwise_quant(A, threshold, compat)
    R, C = _ref._rows_cols(A.shape)
    Ac = contiguous(A)
    q_col = _fresh(A.shape, torch.int8)
    col_stats = torch.empty(C, dtype=_F32)
    _ext().int8_col_quant(Ac.data_ptr(), _DT[A.dtype], R, C, float(threshold), q_col.data_ptr(), col_stats.data_ptr(),
                          _threads(A.numel()))
    return q_row, q_col, row_stats, col_stats, cols


def _i8_applies(src: torch.Tensor, *scales: torch.Tensor | None) -> bool:
    return (src.device.type == "cpu" and src.numel() > 0 and src.shape[-1] > 0 and enabled()
            and all(s is None or (s.device.type == "cpu" and s.dtype in _DT) for s in scales))


def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """CPU kernel of ``fp8probe::int8_vectorwise_dequant``: ``fl32(fl32(float(q) * stats[row]) * fl32(1/127))``,
    float32 q.shape, as the reference; it runs instead for non-finite stats and empty tensors."""
    R, C = _ref._rows_cols(q.shape)
    if not (_i8_applies(q, stats) and stats.dtype == _F32 and q.dtype == torch.int8 and stats.numel() == R):
        return _ref.int8_vectorwise_dequant(q, stats)
    qc, sc = contiguous(q), contiguous(stats)
    out = _fresh(q.shape, _F32)
    if _ext().int8_dequant(0, qc.data_ptr(), R, C, sc.data_ptr(), 0, 0, 0, _I8_SCALES["vectorwise"], out.data_ptr(),
                           0, _threads(q.numel())):
        return _ref.int8_vectorwise_dequant(q, stats)
    return out


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype, compat: str) -> torch.Tensor:
    """CPU kernel of ``fp8probe::int8_mm_dequant`` (default mode): the reference's float32 order, then its
    RNE cast; the reference runs for ``compat="bnb"``, empty tensors, non-finite stats or bias, a bias
    dtype other than fp32/fp16/bf16 and NaN results."""
    R, N = _ref._rows_cols(A.shape)
    if not (compat == "" and dtype in _DT and A.dtype == torch.int32 and _i8_applies(A, row_stats, col_stats, bias)
            and row_stats.dtype == _F32 and col_stats.dtype == _F32 and row_stats.numel() == R
            and col_stats.numel() == N and (bias is None or bias.numel() == N)):
        return _ref.int8_mm_dequant(A, row_stats, col_stats, bias, dtype, compat)
    out = _mm_dequant_c(A, row_stats, col_stats, bias, dtype)
    return _ref.int8_mm_dequant(A, row_stats, col_stats, bias, dtype, compat) if out is None else out


def int8_mm_dequant_into(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                         bias: torch.Tensor | None, dtype: torch.dtype, compat: str, out: torch.Tensor) -> bool:
    """``out.copy_(int8_mm_dequant(...))`` with the C code writing ``out`` itself, no result tensor and no copy
    (functional.int8_mm_dequant's ``out=``: it ran 0.5x as fast as a fresh result, 2026-12-01). Arguments already
    validated, ``out`` of the result's shape and dtype. False, ``out`` then unspecified, where it does not apply:
    int8_mm_dequant's C conditions, ``out`` not a contiguous plain CPU tensor or sharing memory with an input; the
    caller then computes the result and copies it."""
    R, N = _ref._rows_cols(A.shape)
    if not (compat == "" and dtype in _DT and A.dtype == torch.int32 and _i8_applies(A, row_stats, col_stats, bias)
            and row_stats.dtype == _F32 and col_stats.dtype == _F32 and row_stats.numel() == R
            and col_stats.numel() == N and (bias is None or bias.numel() == N) and type(out) is torch.Tensor
            and out.device.type == "cpu" and out.dtype == dtype and out.shape == A.shape and out.is_contiguous()
            and not any(_overlaps(out, t) for t in (A, row_stats, col_stats, bias) if t is not None)):
        return False
    return _mm_dequant_c(A, row_stats, col_stats, bias, dtype, out) is not None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storage bytes of ``a`` and ``b`` (whole storages) intersect."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()


def _mm_dequant_c(C: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """The C int8_mm_dequant of an int32 C, or of float32 C holding float(int32 C) (int8_gemm_float), into a
    new `dtype` tensor of C's shape (or ``out``, contiguous, of that shape and dtype); None when the C code
    declines (non-finite stats or bias, NaN result)."""
    R, N = _ref._rows_cols(C.shape)
    Cc, rs, cs = contiguous(C), contiguous(row_stats), contiguous(col_stats)
    bc = None if bias is None else contiguous(bias)
    if out is None:
        out = _fresh(C.shape, dtype)
    if _ext().int8_dequant(1 if C.dtype == torch.int32 else 2, Cc.data_ptr(), R, N, rs.data_ptr(), cs.data_ptr(),
                           0 if bc is None else bc.data_ptr(), 0 if bc is None else _DT[bc.dtype], _I8_SCALES["mm"],
                           out.data_ptr(), _DT[dtype], _threads(C.numel())):
        return None
    return out


def int8_scaled_mm(A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias, dtype)`` (default mode) bit for
    bit, without the int32 product: int8_gemm.int8_gemm_float's float32 values are what the dequantisation
    converts the int32 to, so the C dequantiser reads them directly (the int32 cast and its tensor cost
    ~a fifth of the f32 method's time besides the GEMM). A int8 [..., K] (any strides), B int8 [N, K],
    arguments already validated (functional.int8_scaled_mm). None when this does not apply (fast path
    off, not CPU, empty, another int8 GEMM method or K > int8_gemm.F32_FLOAT_MAX_K, stats other than
    float32, a bias of another dtype): the caller runs the two ops."""
    K, N = A.shape[-1], B.shape[0]
    rows = A.numel() // K if K else 0
    if not (rows and N and K and A.dtype == B.dtype == torch.int8 and dtype in _DT and B.device.type == "cpu"
            and _i8_applies(A, row_stats, col_stats, bias) and row_stats.dtype == col_stats.dtype == _F32
            and row_stats.numel() == rows and col_stats.numel() == N and (bias is None or bias.numel() == N)):
        return None
    P = int8_gemm_float(A.reshape(rows, K), B)
    if P is None:
        return None
    y = _mm_dequant_c(P, row_stats, col_stats, bias, dtype)
    if y is None:  # non-finite stats/bias or a NaN result: the reference, from the same exact product
        y = _ref.int8_mm_dequant(P.to(torch.int32), row_stats, col_stats, bias, dtype, "")
    return y.reshape(*A.shape[:-1], N)


# --------------------------------------------------------------------------------------------
# Fused scaled fake-quantisation (the OCP/MX/NVFP4 replay, analysis/strategies._fq_scaled)
# --------------------------------------------------------------------------------------------
class FusedScaled(NamedTuple):
    """One fused scaled cast of x viewed as [R, C] in (block_rows × block_cols) tiles (see fused_scaled).

    ``q``: float32, x's shape, ``dequantize_scaled(quantize_scaled(x), float32)`` bit for bit;
    ``saturated``: bool, x's shape, |element value| == format max and |x| > |q|; ``scale``: float32
    [ceil(R/br), ceil(C/bc)], quantize_scaled's scale (NVFP4: the E4M3 block scale); ``global_scale``:
    NVFP4's 0-D float32 tensor scale (or the per-row [R, 1] scales it was given), else None; ``counts``: int64
    [3, tiles] in row-major tile order, per tile the finite nonzero elements of x, those of them with q == 0 (underflow) and the
    saturated elements; ``amax``: x's largest finite |x| (0.0 when there is none), a float32 value.
    """

    q: torch.Tensor
    saturated: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    counts: torch.Tensor
    amax: float


def fused_scaled(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                 rounding: str = "nearest", seed: int = 0, period_rows: int | None = None,
                 global_scale: torch.Tensor | None = None, scale: float | None = None,
                 scale_multiplier: float = 1.0) -> FusedScaled | None:
    """quantize_scaled + dequantize_scaled to float32 + the saturation mask + per-tile counts in one C
    call (one amax pass, one element pass), for ``analysis.strategies._fq_scaled``.

    Same tiles, scales (NVFP4's tensor scale computed from x, as ``functional.quantize_scaled`` does)
    and bits as the two ops. None when the C code does not apply: not a CPU float32/float16/bfloat16
    tensor, empty, an unknown format or rule, non-positive tiles, the extension not enabled
    (FP8PROBE_BACKEND=reference), or a NaN in q (NaN inputs, 4/6-bit tiles with a NaN scale): the
    caller then runs the two ops, whose NaN bits come from torch's casts.

    ``rounding``, ``seed``, ``period_rows``: quantize_scaled's (stochastic rounding of the 4/6-bit formats).
    ``global_scale``: None (NVFP4's computed from x), or, with NVFP4 and 1×bc tiles, the per-row tensor scales
    [R, 1] (returned as ``global_scale``; q = fl32(fl32(value · scale) · g_row)): a stack of slices, each with
    its own tensor scale. Anything else the C code does not take (a 0-D tensor scale, arguments the reference
    rejects) gives None.

    ``scale``, ``scale_multiplier`` (e4m3/e5m2 only; delayed scaling, analysis/delayed.py): ``scale`` (a float32
    value > 0) is every tile's scale instead of the one from its amax; else the scale from the amax is
    ``fl32(fl32(amax / fmt_max) · scale_multiplier)`` (a power of two: delayed scaling's margin), 1 where that is
    not > 0. The element codes, q and the mask follow from the scale as for a computed one.
    """
    if not _scaled_cast_applies(x, fmt, block_rows, block_cols, scale_rule):
        return None
    if (scale is not None or scale_multiplier != 1.0) and fmt not in ("e4m3", "e5m2"):
        raise ValueError(f"expected format e4m3 or e5m2 with a given scale or multiplier, got {fmt!r}")
    if scale is not None and not (0.0 < scale <= _F32_MAX and fl32(scale) == scale):
        raise ValueError(f"expected a given scale that is a float32 value > 0 and finite, got {scale!r}")
    if not (0.0 < scale_multiplier <= _F32_MAX and fl32(scale_multiplier) == scale_multiplier):
        raise ValueError(f"expected a scale multiplier that is a float32 value > 0 and finite, got "
                         f"{scale_multiplier!r}")
    extra = _rounding_args(x, fmt, block_rows, rounding, seed, period_rows, global_scale)
    if extra is None or (global_scale is not None and extra[1] is None):
        return None
    (sr, key, period, g_ptr), g_rows = extra
    R, C = _ref._rows_cols(x.shape)
    br, bc = min(block_rows, R), min(block_cols, C)
    xc, xt = _scaled_input(x)
    q = _fresh(x.shape, _F32)
    sat = _fresh(x.shape, torch.bool)
    nbr, nbc = -(-R // br), -(-C // bc)
    scales = torch.empty(nbr, nbc, dtype=_F32)
    counts = torch.empty(3, nbr * nbc, dtype=torch.int64)
    g, bad, amax = _ext().fused_scaled(xc.data_ptr(), _DT[x.dtype], R, C, br, bc, _SCALED_FMT[fmt], q.data_ptr(),
                                       sat.data_ptr(), scales.data_ptr(), counts.data_ptr(), _threads(x.numel()),
                                       _SCALE_RULE[scale_rule], xt, sr, key, period, g_ptr,
                                       0.0 if scale is None else scale, scale_multiplier)
    if bad:
        return None
    if g_rows is not None:
        return FusedScaled(q, sat, scales, g_rows, counts, amax)
    return FusedScaled(q, sat, scales, torch.tensor(g, dtype=_F32) if fmt == "nvfp4" else None, counts, amax)
