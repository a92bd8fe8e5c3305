"""Pure-PyTorch reference implementations of every fp8probe op: any device, vectorised, the numerical oracle.

Every function here performs the same float32 operations, in the same order, that a CUDA kernel
must perform to agree bit for bit (fl32 = IEEE binary32 round-to-nearest-even of the exact result):

* blockwise normalisation: ``s = fl32(1 / absmax)`` then ``x = fl32(float(A) * s)`` (SPEC §4.2);
  in default mode ``x = A`` where ``A == ±0`` (so a zero or subnormal-absmax block never makes
  ``0 * Inf = NaN``).
* nearest code: SPEC §2.1 (ties to the even index), midpoints ``fl32(fl32(c[j] + c[j+1]) * 0.5)``.
* blockwise dequant: ``fl32(code[q] * absmax[b])`` then a round-to-nearest-even cast to the dtype.
* int8 row quant: ``scale = fl32(fl32(1 / row_stats) * 127)``, ``q = round_half_even(fl32(A * scale))``.
* int8_mm_dequant (default): ``y = fl32(fl32(fl32(fl32(float(C) * row_i) * col_j) * INV_127_SQ) + float(bias_j))``
  where ``float(C)`` is the RNE int32→float32 conversion; then an RNE cast to the dtype.
* scaled casts: ``data = fp8_rne(saturate(fl32(x / scale)))`` (see :func:`quantize_scaled`).

Op arguments: ``compat`` is ``""`` (fp8probe rules) or ``"bnb"`` (bitsandbytes 0.49.2 CPU, see
docs/architecture.md); tensors are never mutated and outputs never alias inputs.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from fp8probe.backends.int8_gemm import int8_gemm, int_mm_or_none
from fp8probe.formats import BNB_INV_127_SQ_TYPO, INV_127, INV_127_SQ, SCALE_INT8

_F32 = torch.float32


def _environ_reader(name: str, value: str):
    """A function telling whether environment variable ``name`` equals ``value`` now. os.environ.get costs
    ~1.6 us (a KeyError raised and caught when unset); the backends ask at every op call (~150k times in
    the demo), so the mapping's own store is read directly (~0.05 us): os.environ and everything that
    writes through it (monkeypatch.setenv, os.environ[...] = ...) update that store. Python builds without
    it get the plain lookup."""
    data = getattr(os.environ, "_data", None)
    try:
        key, want = os.environ.encodekey(name), os.environ.encodevalue(value)
    except (AttributeError, TypeError):
        data = None
    if not isinstance(data, dict):
        return lambda: os.environ.get(name) == value
    return lambda: data.get(key) == want


_backend_is_reference = _environ_reader("FP8PROBE_BACKEND", "reference")


def use_reference() -> bool:
    """True when FP8PROBE_BACKEND=reference forces this PyTorch reference on every device (the CPU
    and CUDA backends check it at every call)."""
    return _backend_is_reference()

# --------------------------------------------------------------------------------------------
# nearest-code search
# --------------------------------------------------------------------------------------------


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision midpoints ``fl32(fl32(code[j] + code[j+1]) * 0.5)`` (SPEC §2.1), float32."""
    return (code[:-1] + code[1:]) * 0.5


def search_even(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Nearest-code index with CUDA ``dQuantize<0>`` rules: exact midpoints go to the even index,
    no clamping (x > code[255] → 255), NaN → 0 (SPEC §2.1 closed form). `x` float32, any shape;
    returns int32 indices of the same shape.

    With ``p = 2k`` (k = number of odd codes strictly below x) the closed form's three-way test
    reduces to ``p + (x > mid[p]) - (x < mid[p-1])``, because ``mid[p-1] <= code[p] <= mid[p]``
    (fl32 rounding is monotonic), so the ``x > code[p]`` guard never changes the answer.
    """
    code = code.to(device=x.device, dtype=_F32).contiguous()
    mid = code_midpoints(code)
    # k = #{odd j in 1..253 : x > code[j]}: searchsorted(side="left") counts entries strictly below x.
    odd = code[1:254:2].contiguous()
    k = torch.searchsorted(odd, x.contiguous(), side="left", out_int32=True)
    mid_up = mid[0::2].contiguous()  # mid[2k], k = 0..127
    # mid[2k-1]; for k = 0 nothing lies below index 0, so -inf makes the test false.
    mid_dn = torch.cat([mid.new_full((1,), -math.inf), mid[1::2]])
    idx = 2 * k + (x > mid_up[k]).to(torch.int32) - (x < mid_dn[k]).to(torch.int32)
    return torch.where(torch.isnan(x), 0, idx)  # NaN compares false everywhere ⇒ k = 0 ⇒ index 0


def search_lower_bound(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes CPU-C++ rule (SPEC §2.3): clamp to [-1, 1], lower_bound, tie → lower index, NaN → 0."""
    code = code.to(device=x.device, dtype=_F32).contiguous()
    x = x.clamp(-1.0, 1.0)
    i = torch.searchsorted(code, x.contiguous(), side="left")
    ic = i.clamp(1, 255)
    hi = code[ic]
    lo = code[ic - 1]
    pick = torch.where((hi - x) < (x - lo), ic, ic - 1)
    pick = torch.where(i == 0, 0, torch.where(i == 256, 255, pick))
    return torch.where(torch.isnan(x), 0, pick)


def search_argmin(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes CPU-torch rule (SPEC §2.4): ``argmin_j |x - code[j]|`` in float32, first minimum.

    Computed from the two bracketing codes instead of a [n, 256] distance matrix: rounding is
    monotonic, so no farther code can have a strictly smaller float32 distance, and among equal
    code values (e.g. +0.0 at 127 and -0.0 at 128) argmin returns the first index. NaN → 0.
    """
    code = code.to(device=x.device, dtype=_F32).contiguous()
    i = torch.searchsorted(code, x.contiguous(), side="left")  # first index with code >= x
    ic = i.clamp(1, 255)
    hi = code[ic]
    lo_val = code[ic - 1]
    lo_first = torch.searchsorted(code, lo_val, side="left")  # first index holding that value
    pick = torch.where((hi - x).abs() < (x - lo_val).abs(), ic, lo_first)
    top_first = torch.searchsorted(code, code[255:], side="left")  # x above every code
    pick = torch.where(i == 0, 0, torch.where(i == 256, top_first, pick))
    return torch.where(torch.isnan(x), 0, pick)


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 → int32 key ordered like the float values (-0.0 → -1, +0.0 → 0, -inf lowest)."""
    s = x.contiguous().view(torch.int32)
    return s ^ ((s >> 31) & 0x7FFFFFFF)


def _key_to_float(k: torch.Tensor) -> torch.Tensor:
    k = k.to(torch.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).view(_F32)


_RULES = {"even": search_even, "lower_bound": search_lower_bound, "argmin": search_argmin}
_LUT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}
_KEY_MAX = 2**31 - 1  # a NaN pattern: comparisons against it are false
_MAX_PER_BUCKET = 8


def _search_tables(code: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Lookup tables that evaluate a monotone search rule with 1 + M table reads per element.

    Every rule maps non-NaN x to an index that is non-decreasing in x, so ``idx(x) = #{i :
    x >= T_i}`` with ``T_i`` the smallest float32 whose index is >= i, found by bisection over
    the ordered float32 bit patterns using the rule itself (exact by construction; -0.0 and +0.0
    give the same index, so no threshold is +0.0 and float comparisons agree with key order).
    The top 16 bits of x's bit pattern select one of 65536 buckets; ``base[b]`` counts the
    thresholds below the bucket and at most M thresholds fall inside any bucket (M <= 2 for every
    named codebook). Returns None for a non-monotone rule or M > 8: callers then search directly.
    """
    cpu = code.detach().to("cpu", _F32).contiguous()
    ck = (rule, cpu.numpy().tobytes(), str(code.device))
    if ck in _LUT_CACHE:
        return _LUT_CACHE[ck]
    f = _RULES[rule]
    if bool((f(cpu, torch.tensor([-math.inf])) != 0).any()):
        return None
    i = torch.arange(1, 256, dtype=torch.int64)
    if rule == "even":
        # The even rule only compares x with codes and midpoints (x > c, x < c), so its value can
        # change only at c or nextafter(c, +inf): evaluate it there and take, for each i, the
        # first candidate (in float order) whose index reaches i.
        pts = torch.cat([cpu, code_midpoints(cpu), torch.tensor([-math.inf, -0.0, 0.0])])
        pts = torch.cat([pts, torch.nextafter(pts, torch.tensor(math.inf))])
        keys = torch.unique(_order_key(pts).to(torch.int64))
        vals = f(cpu, _key_to_float(keys)).to(torch.int64)
        if bool((vals[1:] < vals[:-1]).any()):
            return None
        first = torch.searchsorted(vals, i, side="left")
        thresholds = torch.where(first < keys.numel(), keys[first.clamp(max=keys.numel() - 1)], _KEY_MAX)
    else:
        # lower_bound / argmin compare float32 distances: bisect on the ordered bit patterns.
        key_ninf = int(_order_key(torch.tensor([-math.inf]))[0])
        key_pinf = int(_order_key(torch.tensor([math.inf]))[0])
        lo = torch.full((255,), key_ninf, dtype=torch.int64)  # idx(lo) < i
        hi = torch.full((255,), key_pinf + 1, dtype=torch.int64)  # idx(hi) >= i (virtual above +inf)
        for _ in range(34):  # 2**34 > key range
            mid = (lo + hi) // 2
            ok = f(cpu, _key_to_float(mid)).to(torch.int64) >= i
            hi = torch.where(ok, mid, hi)
            lo = torch.where(ok, lo, mid)
        thresholds = hi.clamp(max=_KEY_MAX)  # thresholds above +inf are never reached
    if bool((thresholds[1:] < thresholds[:-1]).any()):
        return None
    # raw bucket r holds bit patterns r<<16 .. r<<16|0xFFFF; its key range in either order
    patterns = torch.arange(65536, dtype=torch.int64) << 16
    ends = torch.stack([patterns, patterns | 0xFFFF]).to(torch.int64)
    ends = torch.where(ends >= 2**31, ends - 2**32, ends)  # as signed int32 values
    keys = torch.where(ends < 0, ends ^ 0x7FFFFFFF, ends)
    kmin, kmax = keys.min(dim=0).values, keys.max(dim=0).values
    base = torch.searchsorted(thresholds, kmin, side="left")
    m = int((torch.searchsorted(thresholds, kmax, side="right") - base).max())
    if m > _MAX_PER_BUCKET:
        return None
    t_pad = torch.cat([thresholds, torch.full((max(m, 1),), _KEY_MAX, dtype=torch.int64)])
    tables = (base.to(torch.int32).to(code.device), _key_to_float(t_pad).to(code.device), m)
    _LUT_CACHE[ck] = tables
    return tables


def search_argmin_unsorted(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``argmin_j |x - code[j]|`` over a codebook in any order (SPEC §2.4), first minimum, NaN → 0.

    bnb's torch path searches unsorted codebooks (its own few-bit linear maps) with a plain
    argmin; the distance matrix is built in chunks of rows so memory stays ~16 MiB.
    """
    code = code.to(device=x.device, dtype=_F32).contiguous()
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.int64, device=x.device)
    step = 16384
    for s in range(0, flat.numel(), step):
        out[s:s + step] = (flat[s:s + step, None] - code[None, :]).abs().argmin(dim=1)
    return torch.where(torch.isnan(flat), 0, out).reshape(x.shape)


def is_sorted(code: torch.Tensor) -> bool:
    """True when the codebook is non-decreasing (what every table and kernel search assumes)."""
    return bool((code[1:] >= code[:-1]).all())


def search(code: torch.Tensor, x: torch.Tensor, rule: str = "even", nan_free: bool = False) -> torch.Tensor:
    """Fast nearest-code search: same result as ``search_<rule>(code, x)`` (int32, x.shape).

    rule: "even" (SPEC §2.1), "lower_bound" (§2.3, includes the clamp) or "argmin" (§2.4).
    ``nan_free=True`` promises that x holds no NaN and skips the NaN → 0 pass. An unsorted
    codebook (only reached in ``compat="bnb"``) runs the rule directly, as bnb does: lower_bound's
    binary search probes the same entries as std::lower_bound; argmin scans every entry.
    """
    if not is_sorted(code):
        if rule == "argmin":
            return search_argmin_unsorted(code, x).to(torch.int32)
        return _RULES[rule](code, x).to(torch.int32)
    tables = _search_tables(code, rule)
    if tables is None or x.numel() < 4096:
        return _RULES[rule](code, x).to(torch.int32)
    base, t_val, m = tables
    flat = x.reshape(-1).to(_F32).contiguous()
    bucket = (flat.view(torch.int32) >> 16) & 0xFFFF
    start = base.index_select(0, bucket)
    idx = start
    for t in range(m):
        idx = idx + (flat >= t_val.index_select(0, start + t if t else start))
    if not nan_free:
        idx = torch.where(torch.isnan(flat), 0, idx)
    return idx.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# codebook quantisation (SPEC §3, §4)
# --------------------------------------------------------------------------------------------


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int, int]:
    """A as float32 [nb, blocksize] over its C-order flattening, zero-padded; returns (xb, n, nb)."""
    n = A.numel()
    nb = -(-n // blocksize)
    # a block larger than the tensor is the whole tensor: padding to it could ask for terabytes
    blocksize = min(blocksize, n)
    x = A.reshape(-1).to(_F32)
    pad = nb * blocksize - n
    if pad:
        x = F.pad(x, (0, pad))  # zeros do not change |.|-maxima
    return x.view(nb, blocksize), n, nb


def _empty_specials(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=_F32, device=device))


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int, compat: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blockwise codebook quantisation over the C-order flattened tensor (SPEC §4.2).

    A: fp32/fp16/bf16, any shape; code: float32 [256], ascending except in compat "bnb"; blocksize > 0.
    Returns ``q`` (uint8, A.shape), ``absmax`` (float32 [ceil(n/blocksize)]), ``special_index``
    (int64 [k], flat indices of NaN/±Inf, default mode only) and ``special_value`` (float32 [k]).

    Default: absmax over finite values, NaN → code 0, ±Inf → code 255/0 (both recorded), search
    ties → even index, zero-absmax block → the code of 0.0. ``compat="bnb"``: the bnb CPU paths —
    fp32 through the C++ kernel (effective ``code[0] = -1``, NaN ignored by absmax, clamp,
    lower_bound), fp16/bf16 through torch (NaN-propagating absmax, clamp, argmin).
    """
    dev = A.device
    n = A.numel()
    if n == 0:
        return (torch.empty(A.shape, dtype=torch.uint8, device=dev), torch.empty(0, dtype=_F32, device=dev),
                *_empty_specials(dev))
    code = code.to(device=dev, dtype=_F32)
    xb, n, nb = _blocks(A, blocksize)
    if compat == "":
        absmax = xb.abs().amax(dim=1)  # NaN-propagating: non-finite iff the block has a special
        all_finite = bool(torch.isfinite(absmax).all())
        if not all_finite:  # rare path: absmax over finite values only, specials recorded
            finite = torch.isfinite(xb)
            absmax = torch.where(finite, xb.abs(), 0.0).amax(dim=1)
            flat_special = ~finite.reshape(-1)[:n]
            special_index = flat_special.nonzero().reshape(-1)
            special_value = xb.reshape(-1)[special_index]
        else:
            special_index, special_value = _empty_specials(dev)
        recip = torch.reciprocal(absmax)
        xn = xb * recip[:, None]
        if bool(torch.isinf(recip).any()):
            # zero block (or absmax < 2**-128): 0 · Inf would be NaN; ±0 must stay ±0 → code of 0
            xn = torch.where(xb == 0, xb, xn)
        idx = search(code, xn, "even", nan_free=all_finite)
    elif compat == "bnb":
        if A.dtype == _F32:
            # C++ kernel: fmax-style absmax ignores NaN (an all-NaN block keeps the initial 0),
            # writes code[0] = -1 before searching (quirk Q2, modelled on a copy).
            code = code.clone()
            code[0] = -1.0
            absmax = torch.where(torch.isnan(xb), 0.0, xb.abs()).amax(dim=1)
            idx = search(code, xb * torch.reciprocal(absmax)[:, None], "lower_bound")
        else:
            absmax = xb.abs().amax(dim=1)  # torch max propagates NaN: the block is poisoned
            recip = torch.reciprocal(absmax)
            xn = xb * recip[:, None]
            if n % blocksize:
                # bnb scales the partial last block with a 0-dim reciprocal, so torch's type
                # promotion keeps A's dtype: fl_dt(float(A) * fl32(1/absmax)) — one rounding to
                # fp16/bf16 that the full blocks (2-D operand, promoted to fp32) do not get.
                xn[-1] = xn[-1].to(A.dtype).to(_F32)
            idx = search(code, xn.clamp(-1.0, 1.0), "argmin")
        special_index, special_value = _empty_specials(dev)
    else:
        raise ValueError(f"compat must be '' or 'bnb', got {compat!r}")
    q = idx.reshape(-1)[:n].to(torch.uint8).reshape(A.shape)
    return q, absmax, special_index, special_value


def quantize_global(A: torch.Tensor, code: torch.Tensor, compat: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensor-wise codebook quantisation (SPEC §3): one absmax (float32 [1]).

    Default: exactly :func:`quantize_blockwise` with one block. ``compat="bnb"``: bnb's CUDA
    semantics — NaN-propagating absmax, true division ``A / absmax``, no clamp, even-index ties.
    """
    n = A.numel()
    if compat == "":
        return quantize_blockwise(A, code, max(n, 1), "")
    if compat != "bnb":
        raise ValueError(f"compat must be '' or 'bnb', got {compat!r}")
    dev = A.device
    if n == 0:
        return (torch.empty(A.shape, dtype=torch.uint8, device=dev), torch.empty(0, dtype=_F32, device=dev),
                *_empty_specials(dev))
    x = A.to(_F32)
    absmax = x.abs().amax().reshape(1)
    q = search(code.to(device=dev, dtype=_F32), x / absmax, "even").to(torch.uint8)
    return (q.reshape(A.shape), absmax, *_empty_specials(dev))


def _half_away_fp16(y: torch.Tensor) -> torch.Tensor:
    """float32 → float16 rounding half away from zero, as bnb's CPU-C++ dequant does (SPEC §4.3).

    In the fp16 normal range [2**-14, 65504] adding 0x1000 to the float32 bit pattern and
    clearing the 13 dropped mantissa bits rounds the magnitude half-up. In the fp16 subnormal
    range the kernel also rounds half away on the 2**-24 grid but flushes |y| < 2**-24 to a signed
    zero (checked against live bnb on 580k subnormal products). Elsewhere (Inf/NaN/overflow) RNE.
    """
    bits = y.view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(_F32)
    a = y.abs()
    normal = (a >= 2.0**-14) & (rounded.abs() <= 65504.0) & torch.isfinite(y)
    # a·2**24 < 1024 here, so the +0.5 and floor are exact in float32
    sub = torch.where(a < 2.0**-24, 0.0, torch.floor(a * 2.0**24 + 0.5) * 2.0**-24).copysign(y)
    return torch.where(normal, rounded, torch.where(a < 2.0**-14, sub, y)).to(torch.float16)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype, special_index: torch.Tensor, special_value: torch.Tensor,
                         compat: str) -> torch.Tensor:
    """``y = cast_dtype(fl32(code[q] * absmax[block]))`` then special values scattered back (SPEC §4.2).

    q: uint8, any shape; absmax: float32 [ceil(n/blocksize)]; returns `dtype`, q.shape. The cast
    is RNE, except fp16 with ``compat="bnb"`` (half away from zero, like bnb's C++ kernel).
    """
    dev = q.device
    n = q.numel()
    if n == 0:
        return torch.empty(q.shape, dtype=dtype, device=dev)
    nb = -(-n // blocksize)
    blocksize = min(blocksize, n)  # one block covers everything: no padding to the nominal size
    vals = code.to(device=dev, dtype=_F32).index_select(0, q.reshape(-1).to(torch.int32))
    pad = nb * blocksize - n
    if pad:
        vals = F.pad(vals, (0, pad))
    y = (vals.view(nb, blocksize) * absmax.to(device=dev, dtype=_F32)[:, None]).reshape(-1)[:n]
    if compat == "bnb" and dtype == torch.float16:
        out = _half_away_fp16(y)
    else:
        out = y.to(dtype)
    if special_index.numel():
        out[special_index.to(dev)] = special_value.to(device=dev, dtype=dtype)
    return out.reshape(q.shape)


# --------------------------------------------------------------------------------------------
# LLM.int8() (SPEC §5)
# --------------------------------------------------------------------------------------------


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    """[rows, cols] view of an N-D shape: rows = prod(shape[:-1]), cols = shape[-1] (0-D → 1x1)."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _round_int8(v: torch.Tensor, inf_to_zero: bool = False) -> torch.Tensor:
    """round_half_even, NaN → 0 (PTX float→int semantics), saturate to ±127, as int8. ``inf_to_zero``: ±Inf → 0
    as well, what bnb's CPU ``torch.round(v).to(torch.int8)`` gives on x86 (a row whose absmax is below
    127/FLT_MAX ≈ 3.7e-37, e.g. subnormal, has scale 127/absmax = Inf: A·Inf = ±Inf, 0·Inf = NaN, all → 0)."""
    v = torch.where(~torch.isfinite(v) if inf_to_zero else torch.isnan(v), 0.0, v)
    return torch.round(v).clamp(-SCALE_INT8, SCALE_INT8).to(torch.int8)


def _int8_rows(A: torch.Tensor, threshold: float, compat: str):
    """Shared row/column statistics for int8_vectorwise_quant / int8_double_quant."""
    R, C = _rows_cols(A.shape)
    a = A.reshape(R, C).to(_F32)
    absa = a.abs()
    outlier = absa >= threshold if threshold > 0 else None  # >=, not > (SPEC §5.1)
    masked = absa if outlier is None else torch.where(outlier, 0.0, absa)
    if compat == "":
        masked = torch.where(torch.isnan(masked), 0.0, masked)  # NaN ignored like CUDA's fmaxf
    elif compat != "bnb":
        raise ValueError(f"compat must be '' or 'bnb', got {compat!r}")
    return a, outlier, masked, R, C


def _outlier_cols(outlier: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if outlier is None:
        return torch.empty(0, dtype=torch.int64, device=device)
    return outlier.any(dim=0).nonzero().reshape(-1)


def int8_vectorwise_quant(A: torch.Tensor, threshold: float, compat: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() row-wise quantisation (SPEC §5.1).

    A: fp16/bf16/fp32, rank >= 1, viewed as [rows, cols]. Returns ``q`` (int8, A.shape),
    ``row_stats`` (float32 [rows], max |A| over non-outlier elements) and ``outlier_cols``
    (int64, sorted; empty when threshold == 0 or none). Outlier columns are zeroed in every row.
    Default ignores NaN in row_stats; ``compat="bnb"`` lets NaN poison the row's stats.
    """
    dev = A.device
    if A.numel() == 0:
        R, _ = _rows_cols(A.shape)
        return (torch.empty(A.shape, dtype=torch.int8, device=dev), torch.zeros(R, dtype=_F32, device=dev),
                torch.empty(0, dtype=torch.int64, device=dev))
    a, outlier, masked, R, C = _int8_rows(A, threshold, compat)
    row_stats = masked.amax(dim=1)
    # torch lowers `127 / t` to reciprocal-then-multiply (two roundings, as bnb's CPU path); written
    # out so the order cannot change with torch's lowering. All-zero row → Inf → 0·Inf = NaN → 0. A row whose
    # absmax is tiny (scale Inf) saturates to ±127 by default (README, numeric limits) and is 0 for bnb
    scale = torch.reciprocal(row_stats) * SCALE_INT8
    q = _round_int8(a * scale[:, None], inf_to_zero=compat == "bnb")
    cols = _outlier_cols(outlier, dev)
    if outlier is not None and cols.numel():
        colmask = torch.zeros(C, dtype=torch.bool, device=dev)
        colmask[cols] = True
        q = torch.where(colmask[None, :] | outlier, 0, q).to(torch.int8)
    return q.reshape(A.shape), row_stats, cols


def int8_vectorwise_dequant(q: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``fl32(fl32(float(q) * stats[row]) * fl32(1/127))`` (SPEC §5.2): float32, q.shape."""
    R, C = _rows_cols(q.shape)
    out = q.reshape(R, C).to(_F32) * stats.to(_F32).reshape(R, 1) * INV_127
    return out.reshape(q.shape)


def int8_double_quant(A: torch.Tensor, threshold: float, compat: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row- and column-wise int8 quantisation (SPEC §5.3).

    Returns ``q_row`` (int8, A.shape), ``q_col`` (int8, A.shape), ``row_stats`` (float32 [rows]),
    ``col_stats`` (float32 [cols]), ``outlier_cols`` (int64). Column codes:
    ``round_half_even(fl32(fl32(A * 127) / col_stats))`` by default; ``compat="bnb"`` rounds the
    product ``A * 127`` to fp16 first (Q17). In q_col only outlier *elements* are zeroed.
    """
    dev = A.device
    q_row, row_stats, cols = int8_vectorwise_quant(A, threshold, compat)
    R, C = _rows_cols(A.shape)
    if A.numel() == 0:
        return q_row, torch.empty(A.shape, dtype=torch.int8, device=dev), row_stats, \
            torch.zeros(C, dtype=_F32, device=dev), cols
    a, outlier, masked, R, C = _int8_rows(A, threshold, compat)
    col_stats = masked.amax(dim=0)
    if compat == "bnb":
        num = (A.reshape(R, C).to(torch.float16) * SCALE_INT8).to(_F32)
    else:
        num = a * SCALE_INT8
    q_col = _round_int8(num / col_stats[None, :])
    if outlier is not None:
        q_col = torch.where(outlier, 0, q_col).to(torch.int8)
    return q_row, q_col.reshape(A.shape), row_stats, col_stats, cols


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Exact ``C = A @ B.T`` with int32 results: A int8 [..., K], B int8 [N, K] → int32 [..., N].

    On CPU the fastest exact method for this machine (backends/int8_gemm.py: ``torch._int_mm``,
    chunked float32 or float64 GEMM, chosen at run time; all bit-identical). Elsewhere
    ``torch._int_mm`` where the device accepts the shapes, else float64 matmul, which is exact
    because every partial sum is an integer below K·128·128 < 2**53 for any K < 5e11.
    """
    K = A.shape[-1]
    N = B.shape[0]
    out_shape = (*A.shape[:-1], N)
    rows = math.prod(A.shape[:-1])
    if rows == 0 or N == 0 or K == 0:  # an empty sum is 0
        return torch.zeros(out_shape, dtype=torch.int32, device=A.device)
    a2 = A.reshape(rows, K)
    if A.device.type == "cpu":
        return int8_gemm(a2, B).reshape(out_shape)
    c = int_mm_or_none(a2, B)
    if c is None:
        c = (a2.to(torch.float64) @ B.to(torch.float64).t()).to(torch.int64).to(torch.int32)
    return c.reshape(out_shape)


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype, compat: str) -> torch.Tensor:
    """Dequantise an int32 product (SPEC §5.5): A int32 [..., N], row_stats [rows], col_stats [N].

    Default: ``fl32(fl32(fl32(fl32(float(C) * row_i) * col_j) * INV_127_SQ) + float(bias_j))``,
    RNE-cast to `dtype`, shape A.shape. ``compat="bnb"``: ``fl32(fl32(float(C) * fl32(row_i *
    col_j)) * 6.200124e-05) + bias`` and the output flattened to [rows, N] (bnb CPU, Q9).
    """
    rows, N = _rows_cols(A.shape)
    c = A.reshape(rows, N).to(_F32)
    row = row_stats.to(_F32).reshape(-1, 1)
    col = col_stats.to(_F32).reshape(1, -1)
    if compat == "":
        y = c * row * col * INV_127_SQ
    elif compat == "bnb":
        y = c * (row * col) * BNB_INV_127_SQ_TYPO
    else:
        raise ValueError(f"compat must be '' or 'bnb', got {compat!r}")
    if bias is not None:
        y = y + bias.to(_F32)
    out = y.to(dtype)
    return out if compat == "bnb" else out.reshape(A.shape)


# --------------------------------------------------------------------------------------------
# OCP FP8 / MX scaled casts
# --------------------------------------------------------------------------------------------

#: scaled format → (storage dtype, largest finite element magnitude, emax of the element format).
#: The 4- and 6-bit formats store one element code per uint8 (not packed): sign bit at 2**(ebits+mbits),
#: then the exponent field, then the mantissa field (OCP MX v1.0 §5.3 bit layout, no Inf/NaN codes).
SCALED_FORMATS = {
    "e4m3": (torch.float8_e4m3fn, 448.0, 8),
    "e5m2": (torch.float8_e5m2, 57344.0, 15),
    "mxfp8-e4m3": (torch.float8_e4m3fn, 448.0, 8),
    "mxfp8-e5m2": (torch.float8_e5m2, 57344.0, 15),
    "mxfp6-e2m3": (torch.uint8, 7.5, 2),
    "mxfp6-e3m2": (torch.uint8, 28.0, 4),
    "mxfp4-e2m1": (torch.uint8, 6.0, 2),
    "nvfp4": (torch.uint8, 6.0, 2),
}
#: 4/6-bit element format → (exponent bits, mantissa bits, exponent bias) (OCP MX v1.0 §5.3.2/§5.3.3)
LOWBIT_ELEMENTS = {"e2m1": (2, 1, 1), "e2m3": (2, 3, 1), "e3m2": (3, 2, 3)}
#: scaled format → its element format's name (the key of fp8probe.formats.FORMATS for the element)
ELEMENT_OF = {"e4m3": "e4m3", "e5m2": "e5m2", "mxfp8-e4m3": "e4m3", "mxfp8-e5m2": "e5m2",
              "mxfp6-e2m3": "e2m3", "mxfp6-e3m2": "e3m2", "mxfp4-e2m1": "e2m1", "nvfp4": "e2m1"}
#: mantissa bits of each element format (the EVEN scale rule rounds amax to this precision)
ELEMENT_MBITS = {"e4m3": 3, "e5m2": 2, "e2m1": 1, "e2m3": 3, "e3m2": 2}
#: formats with E8M0 power-of-two block scales (OCP MX); they take a scale rule
MX_FORMATS = ("mxfp8-e4m3", "mxfp8-e5m2", "mxfp6-e2m3", "mxfp6-e3m2", "mxfp4-e2m1")
SCALE_RULES = ("floor", "rceil", "even")
#: NVFP4's global scale maps the tensor amax onto E4M3_MAX · E2M1_MAX = 448 · 6 (NVIDIA's definition)
NVFP4_GLOBAL_RANGE = 448.0 * 6.0
E8M0_EXP_MIN, E8M0_EXP_MAX = -127, 127


def _lowbit_table(elem: str) -> torch.Tensor:
    """float32 value of every code 0 .. 2**(1+ebits+mbits)-1 of a 4/6-bit element format."""
    ebits, mbits, bias = LOWBIT_ELEMENTS[elem]
    vals = []
    for code in range(2 ** (1 + ebits + mbits)):
        sign = -1.0 if code >> (ebits + mbits) else 1.0
        e, m = (code >> mbits) & (2**ebits - 1), code & (2**mbits - 1)
        mag = m * 2.0 ** (1 - bias - mbits) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
        vals.append(sign * mag)
    return torch.tensor(vals, dtype=_F32)


_LOWBIT_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def lowbit_values(codes: torch.Tensor, elem: str) -> torch.Tensor:
    """Decode uint8 element codes of a 4/6-bit format (`elem` in LOWBIT_ELEMENTS) to float32 values."""
    key = (elem, codes.device)
    table = _LOWBIT_TABLES.get(key)
    if table is None:
        table = _LOWBIT_TABLES[key] = _lowbit_table(elem).to(codes.device)
    return table[codes.long()]


def lowbit_encode(y: torch.Tensor, elem: str, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `y`, finite and already clamped to ±max → uint8 codes, round to nearest even, or
    stochastically with ``uniform`` (float32 in [0, 1), y's shape: :func:`stochastic_uniform`).

    With emin = 1 - bias and e = max(floor(log2|y|), emin) the spacing of the binade is
    q = 2**(e - mbits); t = |y| / q (exact: q is a power of two) and n = round_half_even(t), or with
    ``uniform`` n = floor(t) + (u < t − floor(t)): |y| rounds up to the next grid value with probability
    equal to its distance from the one below, so E[value] = |y| (unbiased); a grid value stays itself.
    The code magnitude is (e - emin)·2**mbits + n, which also covers subnormals (e = emin, n < 2**mbits)
    and the carry into the next binade (n = 2**(mbits+1)); |y| ≤ max never rounds past max. The sign
    bit follows y's sign bit (−0 keeps it).
    """
    ebits, mbits, bias = LOWBIT_ELEMENTS[elem]
    emin = 1 - bias
    a = y.abs()
    _, e = torch.frexp(a)                      # a = m·2**e, m in [0.5, 1) ⇒ floor(log2 a) = e - 1
    e = torch.where(a > 0, e - 1, emin).clamp(min=emin)   # frexp(0) has e = 0, but 0 sits in binade emin
    t = torch.ldexp(a, (mbits - e).to(_F32))
    if uniform is None:
        n = torch.round(t)
    else:
        lo = torch.floor(t)
        n = lo + (uniform < t - lo).to(_F32)    # t - lo is exact (t has at most 24 significant bits)
    mag = (e - emin) * 2**mbits + n.to(torch.int32)
    sign = torch.signbit(y).to(torch.int32) << (ebits + mbits)
    return (mag | sign).to(torch.uint8)


#: rounding modes of the 4/6-bit scaled casts (quantize_scaled's ``rounding``)
ROUNDINGS = ("nearest", "stochastic")


def rounding_allowed(rounding: str, fmt: str) -> bool:
    """Whether ``rounding`` is one of ROUNDINGS, "stochastic" only for a 4/6-bit format (fmt a known format)."""
    return rounding in ROUNDINGS and (rounding != "stochastic" or SCALED_FORMATS[fmt][0] == torch.uint8)


def check_rounding(rounding: str, fmt: str) -> None:
    """ValueError unless ``rounding`` is one of ROUNDINGS, "stochastic" only for a 4/6-bit format."""
    if not rounding_allowed(rounding, fmt):
        raise ValueError(f"expected rounding 'nearest' (or 'stochastic' for the 4/6-bit formats), got "
                         f"{rounding!r} for fmt={fmt!r}")


_M32 = 0xFFFFFFFF
# the "lowbias32" hash's rounds: (shift, multiplier); the second multiplier is taken as itself − 2**32
# (the same product mod 2**32), so that both products of a 32-bit value stay inside int64
_MIX_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)))


def _mix32(h: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (xor-shift-multiply rounds with the "lowbias32" constants) of values in
    [0, 2**32): an int64 tensor (modified in place and returned) or a Python int, the same function."""
    if isinstance(h, int):
        for shift, mult in _MIX_ROUNDS:
            h = ((h ^ (h >> shift)) * mult) & _M32
        return h ^ (h >> 16)
    for shift, mult in _MIX_ROUNDS:
        h.bitwise_xor_(h >> shift).mul_(mult).bitwise_and_(_M32)  # |h·mult| < 2**63: no int64 overflow
    return h.bitwise_xor_(h >> 16)


def stochastic_uniform(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu"
                       ) -> torch.Tensor:
    """Counter-based uniform numbers for stochastic rounding: float32 in [0, 1) with 24 random bits,
    element i (flat C-order index) = (mix32((i + key) mod 2**32) >> 8) · 2**-24 with
    key = mix32(seed mod 2**32 ^ 0x9E3779B9) (_mix32). A pure function of (seed, index): the same numbers
    on every device, thread count and process, whatever ran before (no generator state), so replays
    stay reproducible and a distributed run equals a single-process one."""
    key = _mix32((int(seed) & _M32) ^ 0x9E3779B9)
    h = torch.arange(key, key + math.prod(shape), dtype=torch.int64, device=device).bitwise_and_(_M32)
    return _mix32(h).bitwise_right_shift_(8).to(_F32).mul_(2.0**-24).reshape(shape)


#: the Walsh–Hadamard size of the random Hadamard transform (NVIDIA's NVFP4 recipe: 16×16)
HADAMARD_SIZE = 16


def _hadamard_signs(n: int, signs_seed: int | None) -> tuple[float, ...]:
    """The random signs s of :func:`hadamard_matrix` (validating n): s_i = −1 where bit i of
    mix32(seed mod 2**32 ^ 0x9E3779B9) is set (_mix32, which maps 0 to 0: hence the constant); None: all +1."""
    if n < 1 or n & (n - 1) or (n.bit_length() - 1) % 2:
        raise ValueError(f"expected a Hadamard size that is a power of four, got {n}")
    if signs_seed is None:
        return (1.0,) * n
    word = _mix32((int(signs_seed) & _M32) ^ 0x9E3779B9)
    return tuple(-1.0 if (word >> i) & 1 else 1.0 for i in range(n))


def hadamard_matrix(n: int = HADAMARD_SIZE, signs_seed: int | None = 0, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
    """float32 [n, n] = diag(s) · H_n / sqrt(n): the Sylvester Hadamard matrix (H_1 = [1],
    H_2k = [[H_k, H_k], [H_k, −H_k]]) normalised to be orthogonal (n a power of four keeps 1/sqrt(n) a
    power of two, so every entry is exact), rows multiplied by the random signs s = ±1 of
    _hadamard_signs. T·Tᵀ = I exactly."""
    signs = torch.tensor(_hadamard_signs(n, signs_seed), dtype=_F32)
    h = torch.ones(1, 1, dtype=_F32)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (signs[:, None] * (h * (1.0 / math.sqrt(n)))).to(device)


_HADAMARD_SIGNS: dict[tuple[int, int | None, torch.device], torch.Tensor] = {}


def _hadamard_signs_on(n: int, signs_seed: int | None, device: torch.device) -> torch.Tensor:
    """_hadamard_signs as a float32 tensor on ``device``, made once per device (read only): a tensor built
    from a list on a GPU is a copy from host memory, which waits for the GPU's queue at every call."""
    key = (n, signs_seed, device)
    signs = _HADAMARD_SIGNS.get(key)
    if signs is None:
        signs = _HADAMARD_SIGNS[key] = torch.tensor(_hadamard_signs(n, signs_seed), dtype=_F32).to(device)
    return signs


def hadamard_transform(x: torch.Tensor, signs_seed: int | None = 0, n: int = HADAMARD_SIZE) -> torch.Tensor:
    """x [..., C] → float32 [..., ceil(C/n)·n]: each run of n elements along the last dim (x zero-padded to
    whole runs) times :func:`hadamard_matrix` T = diag(s)·H/sqrt(n). Computed as (x∘s)·H by the fast
    Walsh–Hadamard butterfly (log2 n stages of float32 sums a+b and differences a−b of elements h apart,
    h = 1, 2, 4, ...), then ·1/sqrt(n) (exact): elementwise adds in a fixed order, so the same bits on
    every device (a matmul's summation order is the BLAS's). Orthogonal per run, so for two operands
    transformed alike along their contraction dim the product is unchanged in exact arithmetic:
    (Gᵀ·T)·(Aᵀ·T)ᵀ = Gᵀ·A (the random Hadamard transform of NVFP4's wgrad)."""
    signs = _hadamard_signs_on(n, signs_seed, x.device)
    x32 = x.to(_F32)
    pad = -x32.shape[-1] % n
    if pad:
        x32 = F.pad(x32, (0, pad))
    lead, cols = x32.shape[:-1], x32.shape[-1]
    y = x32.reshape(*lead, cols // n, n) * signs
    h = 1
    while h < n:
        y = y.reshape(*lead, cols // n, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x32.shape) * (1.0 / math.sqrt(n))


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """float32 → nearest E4M3FN value (RNE, finite values saturate to ±448), back in float32."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(_F32)


def mx_scale(amax: torch.Tensor, fmt: str, scale_rule: str) -> torch.Tensor:
    """E8M0 block scales (float32 powers of two) from block amaxima; scale 1 where amax is 0.

    With emax the element format's largest exponent and fmt_max its largest value:

    * ``floor`` (OCP MX v1.0 §6.3): ``2**(floor(log2 amax) - emax)``. Block maxima in
      [fmt_max, 2**(emax+1))·scale saturate (E4M3: amax in [448, 512)·2**k clips to 448·2**k).
    * ``rceil`` (NVIDIA cuBLAS / Transformer Engine, torchao RCEIL): the smallest power of two with
      ``amax / scale <= fmt_max``, i.e. floor's exponent plus 1 where ``amax / 2**floor > fmt_max``
      (computed exactly; nothing saturates).
    * ``even`` (Microsoft microxcaling, torchao EVEN): floor's rule applied to amax rounded to the
      element format's mantissa width (round half to even), so block maxima whose mantissa rounds up
      to the next power of two move to the next scale.

    The exponent is clamped to the E8M0 range [-127, 127].
    """
    fmax, emax = SCALED_FORMATS[fmt][1], SCALED_FORMATS[fmt][2]
    # Work on frexp's mantissa m in [0.5, 1) (amax = m·2**e, floor(log2 amax) = e - 1): exact, and no
    # power of two is formed that could overflow or flush for extreme amax.
    m, e = torch.frexp(amax)
    if scale_rule == "even":
        mb = ELEMENT_MBITS[ELEMENT_OF[fmt]] + 1       # m carries mbits+1 significant bits
        e = e + (torch.round(m * 2.0**mb) >= 2.0**mb).to(e.dtype)
    exp = e - 1 - emax
    if scale_rule == "rceil":
        # amax / 2**exp = 2m·2**emax > fmt_max  ⟺  m > fmt_max / 2**(emax+1)
        exp = exp + (m > fmax / 2.0 ** (emax + 1)).to(exp.dtype)
    exp = exp.clamp(E8M0_EXP_MIN, E8M0_EXP_MAX)
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exp.to(_F32)), 1.0)


def nvfp4_global_scale(x: torch.Tensor, slices: int | None = None) -> torch.Tensor:
    """NVFP4 per-tensor float32 decode scale ``fl32(amax / 2688)`` (0-D), amax over x's finite values;
    1 when that is 0. 2688 = 448 · 6 maps the tensor amax onto the largest E4M3 block scale times the
    largest E2M1 element. ``slices`` k: x's C-order elements cut into k equal consecutive parts (the slices
    of a stack), one scale each, float32 [k]: what each slice alone gives."""
    if slices is not None and (slices < 1 or x.numel() % slices):
        raise ValueError(f"expected slices dividing the {x.numel()} elements, got {slices}")
    k = 1 if slices is None else slices
    x32 = x.to(_F32).reshape(k, -1)
    amax = torch.where(torch.isfinite(x32), x32.abs(), 0.0).amax(dim=1) if x.numel() else x32.new_zeros(k)
    if slices is None:
        amax = amax.reshape(())
    g = amax / torch.full_like(amax, NVFP4_GLOBAL_RANGE)
    return torch.where(g > 0, g, 1.0)


def _tiles(x2: torch.Tensor, br: int, bc: int) -> tuple[torch.Tensor, int, int]:
    """[R, C] float32 → zero-padded [nbr, br, nbc, bc] view."""
    R, C = x2.shape
    nbr, nbc = -(-R // br), -(-C // bc)
    pr, pc = nbr * br - R, nbc * bc - C
    if pr or pc:
        x2 = F.pad(x2, (0, pc, 0, pr))
    return x2.view(nbr, br, nbc, bc), nbr, nbc


def _scale_rule(amax: torch.Tensor, x: torch.Tensor, fmt: str, scale_rule: str, global_scale: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, divisor of the elements) per tile from the tiles' finite amax (see quantize_scaled)."""
    if fmt in MX_FORMATS:
        scale = mx_scale(amax, fmt, scale_rule)
        return scale, scale
    if fmt == "nvfp4":
        g = (nvfp4_global_scale(x) if global_scale is None else global_scale).to(device=amax.device, dtype=_F32)
        scale = e4m3_round(amax / (torch.full_like(g, 6.0) * g))
        return scale, scale * g
    # tensor / tensor: a Python-number divisor is lowered to a multiply by its reciprocal on
    # CUDA but to a true division on CPU, which would make the reference device-dependent
    scale = amax / torch.full_like(amax, SCALED_FORMATS[fmt][1])
    scale = torch.where(scale > 0, scale, 1.0)
    return scale, scale


def tile_scales(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The ``scale`` output of :func:`quantize_scaled` alone (no element cast), same bits: for statistics
    of the scales. NVFP4: the E4M3 block scale (the tensor scale is not included)."""
    R, C = _rows_cols(x.shape)
    if x.numel() == 0:
        return torch.ones(-(-R // block_rows), -(-C // block_cols), dtype=_F32, device=x.device)
    xt, _, _ = _tiles(x.reshape(R, C).to(_F32), min(block_rows, R), min(block_cols, C))
    finite = torch.isfinite(xt)
    amax = torch.where(finite, xt.abs(), 0.0).amax(dim=(1, 3))
    scale, _ = _scale_rule(amax, x, fmt, scale_rule, global_scale)
    if SCALED_FORMATS[fmt][0] == torch.uint8:
        scale = torch.where(finite.all(dim=(1, 3)), scale, torch.nan)
    return scale


def quantize_scaled(x: torch.Tensor, fmt: str, block_rows: int, block_cols: int, scale_rule: str = "floor",
                    global_scale: torch.Tensor | None = None, rounding: str = "nearest", seed: int = 0,
                    period_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cast; returns ``data`` (float8, or uint8 element codes for the 4/6-bit formats; x.shape)
    and ``scale`` (float32).

    Scale convention (the only one used in fp8probe): **x ≈ data_value * scale** (times the global
    scale for NVFP4). `x` is viewed as [R, C] (R = prod(shape[:-1]), C = shape[-1]) and cut into
    (block_rows × block_cols) tiles, partial tiles at the ends; ``scale`` has shape
    [ceil(R/block_rows), ceil(C/block_cols)]. Per-tensor, per-row, 1×128, 128×128, MX 1×32 and NVFP4
    1×16 / 16×16 granularities are all this with different tiles. amax = the tile's largest finite |x|.

    * e4m3 / e5m2: ``scale = fl32(amax / fmt_max)``; where that is 0 (zero tile, or amax below
      ~2**-140) the scale is 1.
    * MX formats (mxfp8-*, mxfp6-*, mxfp4-e2m1): E8M0 power of two from :func:`mx_scale` with
      `scale_rule` ("floor" = OCP MX v1.0, "rceil", "even"); emax 8 (E4M3), 15 (E5M2), 2 (E2M1,
      E2M3), 4 (E3M2).
    * nvfp4: `global_scale` g = :func:`nvfp4_global_scale` (computed here when None);
      ``scale = e4m3_rne_sat(fl32(amax / fl32(6 · g)))`` (the E4M3 block scale, stored decoded as
      float32) and the elements are divided by ``fl32(scale · g)``; a block whose scale rounds to 0
      encodes as zeros.

    ``data = rne(clamp(fl32(x / divisor), -fmt_max, fmt_max))`` — finite values saturate. FP8: NaN
    stays NaN; E5M2 keeps ±Inf; E4M3FN has no Inf and ±Inf saturates to ±448 (as kernels/scaled_cast.cu
    and torch 2.13's cast do; clamped here, since torch 2.11's cast gave NaN). 4/6-bit formats have no
    Inf/NaN codes: a tile holding a NaN or ±Inf gets a NaN scale (the E8M0/E4M3 NaN, OCP MX §6.3: the whole block
    dequantises to NaN); its elements encode as if the non-finite ones were ±fmt_max (NaN as +0).
    ``rounding="stochastic"`` (4/6-bit formats): the elements round as in :func:`lowbit_encode` with
    :func:`stochastic_uniform` ``(x.shape, seed)`` (element i of x's C order draws number i); the scales
    are the same as with "nearest". ``period_rows`` P: the [R, C] view is a stack of R/P slices of P rows and
    each draws from number 0 (element (r, c) draws (r mod P)·C + c), as casting each slice alone would;
    with NVFP4 ``global_scale`` may then be [R, 1], each row's slice's tensor scale (1×bc tiles only).
    """
    if fmt not in SCALED_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(SCALED_FORMATS)}, got {fmt!r}")
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {', '.join(SCALE_RULES)}, got {scale_rule!r}")
    dtype, fmax, emax = SCALED_FORMATS[fmt]
    lowbit = dtype == torch.uint8
    check_rounding(rounding, fmt)
    dev = x.device
    R, C = _rows_cols(x.shape)
    nbr, nbc = -(-R // block_rows), -(-C // block_cols)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=dtype, device=dev), torch.ones(nbr, nbc, dtype=_F32, device=dev)
    block_rows, block_cols = min(block_rows, R), min(block_cols, C)  # a tile larger than x is all of x
    xt, nbr, nbc = _tiles(x.reshape(R, C).to(_F32), block_rows, block_cols)
    finite = torch.isfinite(xt)
    amax = torch.where(finite, xt.abs(), 0.0).amax(dim=(1, 3))
    scale, divisor = _scale_rule(amax, x, fmt, scale_rule, global_scale)
    if lowbit:
        d = divisor[:, None, :, None]
        y = torch.where(finite, xt, torch.where(torch.isnan(xt), 0.0, xt.clamp(-fmax, fmax)))
        y = torch.where(d > 0, y / d, y * 0.0).clamp(-fmax, fmax)
        uniform = None
        if rounding == "stochastic":  # element (r, c) of x draws number r·C + c, laid out like the padded tiles
            period = R if period_rows is None else period_rows
            if period < 1 or R % period:
                raise ValueError(f"expected period_rows dividing the {R} rows, got {period_rows}")
            u = stochastic_uniform((period, C), seed, dev)
            if period < R:
                u = u.repeat(R // period, 1)
            uniform = F.pad(u, (0, nbc * block_cols - C, 0, nbr * block_rows - R)).view(y.shape)
        codes = lowbit_encode(y, ELEMENT_OF[fmt], uniform)
        scale = torch.where(finite.all(dim=(1, 3)), scale, torch.nan)
        return codes.reshape(nbr * block_rows, nbc * block_cols)[:R, :C].contiguous().reshape(x.shape), scale
    y = fp8_saturate(xt / divisor[:, None, :, None], dtype, fmax)
    data = y.reshape(nbr * block_rows, nbc * block_cols)[:R, :C].to(dtype)
    return data.reshape(x.shape), scale


def fp8_saturate(y: torch.Tensor, dtype: torch.dtype, fmax: float) -> torch.Tensor:
    """`y` ready for torch's cast to the FP8 `dtype`: finite values clamped to ±fmax, NaN kept, ±Inf kept for
    E5M2 and clamped to ±448 for E4M3FN (no Inf code). Explicit because torch's own cast of ±Inf to E4M3FN
    changed between versions (2.13 gives ±448; 2.11 gave NaN, seen on the GPU machine's torch)."""
    keep = torch.isnan(y) if dtype == torch.float8_e4m3fn else ~torch.isfinite(y)
    return torch.where(keep, y, y.clamp(-fmax, fmax))


def element_values(data: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 value of each stored element (before scaling): fp8 data cast, 4/6-bit codes decoded."""
    if data.dtype == torch.uint8:
        return lowbit_values(data, ELEMENT_OF[fmt])
    return data.to(_F32)


def dequantize_scaled(data: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int,
                      dtype: torch.dtype, fmt: str = "", global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``cast_dtype(fl32(value(data) * scale[tile]))`` with the tiling of :func:`quantize_scaled`; NVFP4
    ``cast_dtype(fl32(fl32(value * scale[tile]) * global_scale))`` (value · scale is exact: a 2-bit by a
    4-bit significand); with 1×bc tiles ``global_scale`` may be [R, 1], one per row, as in quantize_scaled.
    `fmt` is needed for uint8 element codes only (which 4/6-bit format)."""
    dev = data.device
    if data.numel() == 0:
        return torch.empty(data.shape, dtype=dtype, device=dev)
    if data.dtype == torch.uint8 and fmt not in SCALED_FORMATS:
        raise ValueError(f"uint8 element codes need fmt, one of {', '.join(MX_FORMATS[2:])}, nvfp4, got {fmt!r}")
    if data.dtype == torch.uint8:
        # (the C path reruns this on a stray code; indexing the table with it raised an IndexError)
        n_codes = 2 ** (1 + sum(LOWBIT_ELEMENTS[ELEMENT_OF[fmt]][:2]))
        top = int(data.max())
        if top >= n_codes:
            raise ValueError(f"{fmt} element codes must be in 0..{n_codes - 1}, got {top}")
    R, C = _rows_cols(data.shape)
    block_rows, block_cols = min(block_rows, R), min(block_cols, C)
    xt, nbr, nbc = _tiles(element_values(data.reshape(R, C), fmt), block_rows, block_cols)
    y = xt * scale.to(device=dev, dtype=_F32)[:, None, :, None]
    if global_scale is not None:
        g = global_scale.to(device=dev, dtype=_F32)
        y = y * (g.reshape(nbr, 1, 1, 1) if g.dim() else g)  # (per row: nbr = R rows of 1×bc tiles)
    return y.reshape(nbr * block_rows, nbc * block_cols)[:R, :C].to(dtype).contiguous().reshape(data.shape)
