"""Mergeable error, dynamic-range and outlier accumulators: batches (and later ranks) combine exactly via merge()."""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fp8probe.backends import cpu as _cpu
from fp8probe.backends import cuda as _cuda
from fp8probe.formats import FORMATS
from fp8probe.report.schema import (NOTE_EXACT, NOTE_LP_NONFINITE, NOTE_NO_ELEMENTS, NOTE_NO_FINITE_REFERENCE,
                                    NOTE_ZERO_SIGNAL)

# Fixed integer log2 bins for magnitude histograms: bin k counts finite non-zero |x| with
# floor(log2|x|) == k. 2**-40 ≈ 9e-13 is far below every fp8 format's smallest subnormal
# (e5m2 2**-16 times any realistic scale) and 2**24 far above fp16's 65504; values outside
# are clamped into the end bins so no count is ever lost.
LOG2_LO = -40
LOG2_HI = 24
HIST_EDGES = list(range(LOG2_LO, LOG2_HI + 1))
# Row-segment length of the per-block absmax statistic: the 1x128 tile of DeepSeek-V3-style and
# OCP blockwise recipes, so "what blockwise buys" is measured on the blocking those recipes use.
BLOCK = 128
# Top outlier dimensions listed per layer in the census.
TOP_K = 8

_F64 = torch.float64
# Elements per pass of the GEMM-error and operand accumulators: their float64 temporaries (a few per
# element) then stay at ~32 MiB each, instead of 226 MiB each for a 49152 x 576 LM-head gradient.
# Sums over chunks are sequential updates, like batches; tensors up to CHUNK take one pass. The C
# path (backends/cpu.py: error_sums, operand_sums, tensor_stats; CPU tensors when the extension is
# enabled) makes no temporaries and takes every tensor in one call, its float64 sums in the fixed
# block order documented there; values, counts and extremes are the same either way, the sums
# differ from torch's only in the order of the float64 additions.
CHUNK = 1 << 22
# Magnitude limits a raw (unscaled) cast would overflow: fp16's largest finite value (what the
# bnb-compat paths and fp16 models cast to) and the OCP FP8 element maxima (MX elements share them).
# bnb codebooks and int8 are always absmax-scaled, so no raw limit applies to them.
RAW_LIMITS = (("fp16", float(torch.finfo(torch.float16).max)), ("e4m3", FORMATS["e4m3"].max),
              ("e5m2", FORMATS["e5m2"].max))


def _error_metrics(count: int, sum_ref2: float, sum_err2: float, excluded: int, lp_nonfinite: int
                   ) -> tuple[float, float, str | None]:
    """(sqnr_db, rel_err, note) with the degenerate cases decided once (report/schema.py NOTE_*).

    Nothing compared (empty batch, every reference or result element NaN/Inf): both NaN, written as
    JSON null, with the note saying why. Error exactly zero: SQNR +inf and rel_err 0 even when the
    reference itself is all zero (0/0): the recipe reproduced it exactly, so "no loss" is the
    answer a gate needs. Reference all zero but result not: SQNR −inf, rel_err +inf.
    """
    if count == 0:
        note = NOTE_LP_NONFINITE if lp_nonfinite else NOTE_NO_FINITE_REFERENCE if excluded else NOTE_NO_ELEMENTS
        return math.nan, math.nan, note
    if sum_err2 == 0.0:
        return math.inf, 0.0, NOTE_EXACT
    if sum_ref2 == 0.0:
        return -math.inf, math.inf, NOTE_ZERO_SIGNAL
    return sqnr_db(sum_ref2, sum_err2), math.sqrt(sum_err2 / sum_ref2), None


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """10·log10(Σref² / Σ(ref−lp)²) in dB; +inf for zero noise, nan when both are zero."""
    if noise_energy == 0.0:
        return math.inf if signal_energy > 0 else math.nan
    if signal_energy == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_energy / noise_energy)


def fused_error_sums(ref: torch.Tensor, lp: torch.Tensor) -> tuple[float, float, float, float, float, int, int, int] | None:
    """ErrorAccumulator's sums, counts and max in one pass: backends/cpu.py ``error_sums`` on CPU tensors (C),
    backends/cuda.py ``error_sums`` on CUDA ones (metrics.cu, the same summation order, so the same bits); None
    where neither applies (no extension or kernels, FP8PROBE_BACKEND=reference, another dtype): torch then."""
    return (_cuda if ref.device.type == "cuda" else _cpu).error_sums(ref, lp)


def fused_operand_sums(x: torch.Tensor, q: torch.Tensor, saturated: torch.Tensor | None
                       ) -> tuple[float, float, int, int, int, int, int, int] | None:
    """OperandAccumulator's sums and counts in one pass, as fused_error_sums."""
    return (_cuda if x.device.type == "cuda" else _cpu).operand_sums(x, q, saturated)


def _as_f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(_F64)


def _dots(r: torch.Tensor, q: torch.Tensor) -> tuple[float, float, float, float, float] | None:
    """(Σr², Σ(r−q)², Σq², Σr·q, max|r−q|) of flat float64 tensors, or None if any element is NaN/±Inf.

    float32 data squared cannot overflow float64 (3.4e38² ≈ 1e77), so finite sums prove every
    element finite and the common case skips the elementwise isfinite masks.
    """
    err = r - q
    # the ∞-norm is max|err| in one pass, without the |err| temporary. All five values reach the host in one
    # copy: each float() of a CUDA tensor makes the host wait for the GPU (benchmarks/profile_analyze.py).
    parts = [torch.dot(r, r), torch.dot(err, err), torch.dot(q, q), torch.dot(r, q)]
    if err.numel():
        parts.append(torch.linalg.vector_norm(err, math.inf))
    vals = torch.stack(parts).tolist()
    if not all(math.isfinite(v) for v in vals[:4]):
        return None
    return (*vals[:4], vals[4] if err.numel() else 0.0)


# --------------------------------------------------------------------------------------------
# GEMM error: reference (float64) vs low-precision result
# --------------------------------------------------------------------------------------------
def tensor_key(t: torch.Tensor) -> tuple:
    """A tensor's identity in a memo of one GEMM call's replay (strategies.shared_site): its memory, shape,
    strides, dtype and version (a view of the same elements in the same layout has the same key). An entry
    must make sure the keyed tensors still live, so that no other tensor has taken their memory."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


def memoized(memo: dict | None, tag: str, make: Callable[[], Any], *tensors: torch.Tensor | None,
             keep_alive: bool = False) -> Any:
    """make(), or the value it gave earlier for ``tag`` and the same tensors (tensor_key) in ``memo``; no memo:
    make(). ``keep_alive``: the entry holds the tensors, so their memory stays theirs while the memo lives;
    else it holds weak references and is not used once one of them died (an accumulator must not keep a
    recipe's W-sized result alive for the rest of its group). A None value (a C pass that did not apply) is
    not stored."""
    if memo is None:
        return make()
    key = (tag, *(None if t is None else tensor_key(t) for t in tensors))
    seen = memo.get(key)
    if seen is not None and (keep_alive or all(r() is not None for r in seen[0])):
        return seen[1]
    value = make()
    if value is not None:
        held = [t for t in tensors if t is not None]
        memo[key] = (held if keep_alive else [weakref.ref(t) for t in held], value)
    return value


@dataclass
class ErrorAccumulator:
    """Σref², Σ(ref−lp)², Σlp², Σref·lp, max|ref−lp| over elements where both are finite.

    ``count``: elements compared. ``excluded``: elements whose reference is NaN/±Inf (the inputs
    held specials). ``nonfinite``: reference finite but the low-precision result not (overflow or
    NaN produced by the recipe). Both are left out of the sums and reported, so a special value
    never turns a summary metric into NaN.
    """

    sum_ref2: float = 0.0
    sum_err2: float = 0.0
    sum_lp2: float = 0.0
    sum_dot: float = 0.0
    max_abs_err: float = 0.0
    count: int = 0
    nonfinite: int = 0
    excluded: int = 0

    def update(self, ref: torch.Tensor, lp: torch.Tensor, memo: dict | None = None) -> None:
        """Add one batch: ``ref`` and ``lp`` of the same shape (any float dtype). ``memo``: a dict shared by
        the accumulators of one GEMM call (strategies.site_memo), where the C pass's sums of the same
        (ref, lp) tensors are reused instead of recomputed (two recipes with one shared result)."""
        if ref.shape != lp.shape:
            raise ValueError(f"ref and lp must have the same shape, got {list(ref.shape)} and {list(lp.shape)}")
        if ref.numel() == 0:
            return
        sums = memoized(memo, "error_sums", lambda: fused_error_sums(ref, lp), ref, lp)
        if sums is not None:
            self._add_sums(*sums)
            return
        rf, lf = ref.detach().flatten(), lp.detach().flatten()
        for start in range(0, rf.numel(), CHUNK):  # one chunk (the whole tensor) below CHUNK elements
            self._add(rf[start:start + CHUNK], lf[start:start + CHUNK])

    def _add(self, ref: torch.Tensor, lp: torch.Tensor) -> None:
        # float64 for both: the sums need it (float32 squares of 1e6 elements keep ~3 digits of an
        # 80 dB error), and Σlp², Σref·lp need lp in the same dtype as ref for torch.dot.
        r, q = _as_f64(ref), _as_f64(lp)
        sums = _dots(r, q)
        if sums is None:  # rare: some element is NaN/Inf; zero those pairs and count them
            ok_ref = torch.isfinite(r)
            ok = ok_ref & torch.isfinite(q)
            self.nonfinite += int((ok_ref & ~ok).sum())
            self.excluded += int((~ok_ref).sum())
            r, q = torch.where(ok, r, 0.0), torch.where(ok, q, 0.0)
            sums = _dots(r, q)
            n_ok = int(ok.sum())
        else:
            n_ok = r.numel()
        self._add_sums(*sums, n_ok, 0, 0)

    def _add_sums(self, sum_ref2: float, sum_err2: float, sum_lp2: float, sum_dot: float, max_abs_err: float,
                  count: int, nonfinite: int, excluded: int) -> None:
        self.sum_ref2 += sum_ref2
        self.sum_err2 += sum_err2
        self.sum_lp2 += sum_lp2
        self.sum_dot += sum_dot
        if count:
            self.max_abs_err = max(self.max_abs_err, max_abs_err)
        self.count += count
        self.nonfinite += nonfinite
        self.excluded += excluded

    def merge(self, other: ErrorAccumulator) -> ErrorAccumulator:
        """A new accumulator equal to having seen both inputs."""
        return ErrorAccumulator(self.sum_ref2 + other.sum_ref2, self.sum_err2 + other.sum_err2,
                                self.sum_lp2 + other.sum_lp2, self.sum_dot + other.sum_dot,
                                max(self.max_abs_err, other.max_abs_err), self.count + other.count,
                                self.nonfinite + other.nonfinite, self.excluded + other.excluded)

    def result(self) -> dict:
        """sqnr_db, rel_err (‖ref−lp‖_F/‖ref‖_F), cosine, max_abs_err over the compared elements;
        nonfinite, excluded, compared (counts) and note (why a metric is ±inf/NaN, else None)."""
        sqnr, rel, note = _error_metrics(self.count, self.sum_ref2, self.sum_err2, self.excluded, self.nonfinite)
        denom = math.sqrt(self.sum_ref2 * self.sum_lp2)
        cosine = self.sum_dot / denom if denom > 0 else math.nan  # undefined when either side is all zero
        return {"sqnr_db": sqnr, "rel_err": rel, "cosine": cosine,
                "max_abs_err": self.max_abs_err if self.count else math.nan, "nonfinite": self.nonfinite,
                "excluded": self.excluded, "compared": self.count, "note": note}


# --------------------------------------------------------------------------------------------
# Operand quantisation: x vs its quantised (dequantised) value q
# --------------------------------------------------------------------------------------------
@dataclass
class OperandAccumulator:
    """Quantisation SQNR, underflow (x ≠ 0 → q == 0) and saturation fractions of one operand.

    Saturation: a finite x whose magnitude exceeds what its scale can represent and was clipped.
    Callers that know the format pass the exact mask (scaled OCP/MX casts: |data| == fmt max and
    |x| > |q|); otherwise it is |x| > max|q| over the tensor, which absmax-scaled formats
    (bnb codebooks, int8) never reach, so 0 is reported for them — by construction, not by luck.
    """

    sum_ref2: float = 0.0
    sum_err2: float = 0.0
    n_finite: int = 0  # finite x (NaN/±Inf x are excluded and counted in n_excluded)
    n_nonzero: int = 0
    n_underflow: int = 0
    n_saturated: int = 0
    n_excluded: int = 0
    n_nonfinite: int = 0  # finite x whose quantised value is NaN/±Inf (left out of the sums)

    def update(self, x: torch.Tensor, q: torch.Tensor, saturated: torch.Tensor | None = None,
               memo: dict | None = None) -> None:
        """Add one batch: ``x`` the operand, ``q`` its dequantised value (same shape); ``memo`` as in
        ErrorAccumulator.update."""
        if x.shape != q.shape:
            raise ValueError(f"x and q must have the same shape, got {list(x.shape)} and {list(q.shape)}")
        if x.numel() == 0:
            return
        # in this class's field order
        sums = memoized(memo, "operand_sums", lambda: fused_operand_sums(x, q, saturated), x, q, saturated)
        if sums is not None:
            self.__dict__.update(self.merge(OperandAccumulator(*sums)).__dict__)
            return
        xf, qf = x.detach().flatten(), q.detach().flatten()
        if saturated is None:  # |x| > max|q| needs the whole tensor's max before any chunk is counted
            ok = torch.isfinite(xf) & torch.isfinite(qf)
            # max |q| over the finite pairs (0 when there are none), kept on the device: no host wait
            qmax = torch.where(ok, qf.abs(), 0).max()
            del ok
            # compared in a dtype holding x's and q's values exactly (x bf16, q float32: float32)
            wide = torch.promote_types(torch.promote_types(xf.dtype, qf.dtype), torch.float32)
            saturated = xf.abs().to(wide) > qmax.to(wide)
        saturated = saturated.flatten()
        for start in range(0, xf.numel(), CHUNK):  # one chunk (the whole tensor) below CHUNK elements
            end = start + CHUNK
            self._add(xf[start:end], qf[start:end], saturated[start:end])

    def _add(self, xf: torch.Tensor, qf: torch.Tensor, saturated: torch.Tensor) -> None:
        # Common case in two float64 sums: x in float64 (Σx² of float32 values needs it), x − q with q
        # promoted inside the subtraction (no float64 copy of q), the same values the elementwise
        # float64 difference gives.
        r = _as_f64(xf)
        err = r - qf
        # the common case's sums and counts reach the host in one copy (one GPU wait, not five); the counts
        # are exact in float64 (< 2^53)
        nz = xf != 0
        vals = torch.stack([torch.dot(r, r), torch.dot(err, err), nz.sum(), (nz & (qf == 0)).sum(),
                            saturated.sum()]).tolist()
        del err
        sums = vals[:2]
        if all(math.isfinite(v) for v in sums):
            self.sum_ref2 += sums[0]
            self.sum_err2 += sums[1]
            self.n_finite += r.numel()
            self.n_nonzero += int(vals[2])
            self.n_underflow += int(vals[3])
            self.n_saturated += int(vals[4])
            return
        # rare: NaN/±Inf in x or q; compare the pairs where both are finite
        d = _as_f64(qf)
        fin = torch.isfinite(r)
        both = fin & torch.isfinite(d)
        rz, dz = torch.where(both, r, 0.0), torch.where(both, d, 0.0)
        sums = _dots(rz, dz)
        del r, d, rz, dz
        # counts and comparisons on the tensors as given: exact in any float dtype (no float64 copy)
        nz = fin & (xf != 0)
        n_fin, n_both, n_nz, n_under, n_sat = (int(v) for v in torch.stack(
            [fin.sum(), both.sum(), nz.sum(), (nz & (qf == 0)).sum(), (saturated & fin).sum()]).tolist())
        self.n_excluded += xf.numel() - n_fin
        self.n_nonfinite += n_fin - n_both
        self.sum_ref2 += sums[0]
        self.sum_err2 += sums[1]
        self.n_finite += n_fin
        self.n_nonzero += n_nz
        self.n_underflow += n_under
        self.n_saturated += n_sat

    def merge(self, other: OperandAccumulator) -> OperandAccumulator:
        """A new accumulator equal to having seen both inputs."""
        return OperandAccumulator(self.sum_ref2 + other.sum_ref2, self.sum_err2 + other.sum_err2,
                                  self.n_finite + other.n_finite, self.n_nonzero + other.n_nonzero,
                                  self.n_underflow + other.n_underflow, self.n_saturated + other.n_saturated,
                                  self.n_excluded + other.n_excluded, self.n_nonfinite + other.n_nonfinite)

    def result(self) -> dict:
        """sqnr_db, underflow_frac (of non-zero finite elements), saturation_frac (of finite elements),
        excluded (NaN/±Inf x), nonfinite (finite x quantised to NaN/±Inf), note (as ErrorAccumulator)."""
        compared = self.n_finite - self.n_nonfinite
        sqnr, _, note = _error_metrics(compared, self.sum_ref2, self.sum_err2, self.n_excluded, self.n_nonfinite)
        return {"sqnr_db": sqnr, "excluded": self.n_excluded, "nonfinite": self.n_nonfinite, "note": note,
                "underflow_frac": self.n_underflow / self.n_nonzero if self.n_nonzero else 0.0,
                "saturation_frac": self.n_saturated / self.n_finite if self.n_finite else 0.0}


# --------------------------------------------------------------------------------------------
# Dynamic range of one tensor
# --------------------------------------------------------------------------------------------
def log2_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts (int64 [LOG2_HI − LOG2_LO]) of finite non-zero |x| by floor(log2|x|), clamped to the end bins."""
    a = x.detach().abs()
    a = a[torch.isfinite(a) & (a != 0)]
    if a.numel() == 0:
        return torch.zeros(LOG2_HI - LOG2_LO, dtype=torch.int64)
    # frexp gives the exponent exactly (a = m·2**e, m in [0.5, 1) ⇒ floor(log2 a) = e − 1); a
    # float log2 could round 2**k − ulp up to k.
    _, e = torch.frexp(a.to(_F64))
    k = (e.to(torch.int64) - 1).clamp(LOG2_LO, LOG2_HI - 1) - LOG2_LO
    return torch.bincount(k.flatten(), minlength=LOG2_HI - LOG2_LO).cpu()


def _block_absmax(a2: torch.Tensor) -> torch.Tensor:
    """float64 absmax of every 1×BLOCK row segment of 2-D magnitudes ``a2`` (finite, ≥ 0; last segment partial)."""
    rows, cols = a2.shape
    nb = -(-cols // BLOCK)
    if nb * BLOCK != cols:
        a2 = torch.nn.functional.pad(a2, (0, nb * BLOCK - cols))
    return a2.reshape(rows, nb, BLOCK).amax(dim=2).flatten().to(_F64)


def _log2_block_terms(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, Σ log2) of the non-zero float64 block absmaxes as 0-dim tensors on their device (no host wait: a
    zero block adds +0.0 in place, where selecting the non-zero ones would wait for the GPU). torch.log2 and
    torch's sum on both the C and the torch path, so the two agree bit for bit (C's log2 may differ from torch's
    in the last bit)."""
    pos = blocks > 0
    return pos.sum(), torch.where(pos, torch.log2(blocks), 0.0).sum()


def _log2_block_sum(blocks: torch.Tensor) -> tuple[int, float]:
    """_log2_block_terms as Python numbers."""
    n, total = _log2_block_terms(blocks)
    return int(n), float(total)


def _log2_counts(a: torch.Tensor) -> torch.Tensor:
    """Counts (int64 [LOG2_HI − LOG2_LO], on a's device) by floor(log2) of finite magnitudes ``a``
    (float32/float64, any shape), exact zeros included in the floor(log2) = −1 bin: the caller takes them off
    (log2_histogram's counts then), which saves a masked copy of the non-zeros.

    frexp on float32 gives the exponent of float32 values (subnormals included) exactly; zeros come
    out with exponent 0.
    """
    _, e = torch.frexp(a.flatten())
    k = (e - 1).clamp_(LOG2_LO, LOG2_HI - 1).sub_(LOG2_LO)
    return torch.bincount(k, minlength=LOG2_HI - LOG2_LO)


@dataclass
class TensorStats:
    """amax, mean/central moments (Chan et al. merge), special-value counts, log2 histogram, block absmaxes.

    Moments are over finite values; kurtosis is Pearson's m4/m2² (3 for a Gaussian).
    Special values: NaN, +Inf, −Inf, exact zeros, subnormals of the tensor's own dtype
    (0 < |x| < finfo(dtype).tiny: 2**-126 for fp32/bf16, 2**-14 for fp16; flush-to-zero hardware
    loses them) and finite values beyond each RAW_LIMITS max (what a raw, unscaled cast overflows).
    ``block_absmax_ratio`` = amax / geometric mean of the non-zero 1×128 row-segment absmaxes:
    how many times larger the global scale is than a typical block's (what blockwise buys).
    """

    numel: int = 0
    n: int = 0  # finite values
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    amax: float = 0.0
    min_nonzero: float = math.inf
    zeros: int = 0
    nan_count: int = 0
    inf_count: int = 0
    neg_inf_count: int = 0
    subnormal_count: int = 0
    over_max: dict[str, int] = field(default_factory=lambda: {name: 0 for name, _ in RAW_LIMITS})
    log2_block_sum: float = 0.0
    n_blocks: int = 0
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(LOG2_HI - LOG2_LO, dtype=torch.int64))

    def update(self, x: torch.Tensor) -> None:
        """Add one batch of the tensor; a 2-D view [rows, last dim] is used for the block statistic."""
        if x.numel() == 0:
            return
        x = x.detach()
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
        tiny = torch.finfo(x.dtype).tiny if x.is_floating_point() else 1.0
        other = TensorStats._from_batch(x2, tiny)
        merged = self.merge(other)
        self.__dict__.update(merged.__dict__)

    @staticmethod
    def _from_batch(x2: torch.Tensor, tiny: float) -> TensorStats:
        c = _cpu.tensor_stats(x2, tiny, tuple(limit for _, limit in RAW_LIMITS), BLOCK, LOG2_LO, LOG2_HI - LOG2_LO)
        if c is not None:
            return TensorStats._from_c(x2.numel(), c)
        s = TensorStats(numel=x2.numel())
        # Magnitudes, counts, extremes and log2 exponents in float32 (float64 input stays float64):
        # exact for every float32/bf16/fp16 value, and the RAW_LIMITS and ``tiny`` are float32 numbers,
        # so each comparison decides as in float64. (bf16/fp16 are widened first: 65504 rounds to
        # 65536 in bf16.) float64 is used only for the moment sums below.
        x = x2 if x2.dtype in (torch.float32, _F64) else x2.to(torch.float32 if x2.is_floating_point() else _F64)
        a = x.abs()
        done = TensorStats._finite_summary(s, x.flatten(), a.flatten(), a, tiny)
        if done is not None:  # the common case: every value finite
            return done
        # rare: count and drop the specials
        nan, inf = torch.isnan(x), torch.isinf(x)
        s.nan_count, s.inf_count = int(nan.sum()), int(inf.sum())
        s.neg_inf_count = int((inf & (x < 0)).sum()) if s.inf_count else 0
        keep = ~(nan | inf)
        f, af = x[keep], a[keep]
        if not f.numel():
            return s
        return TensorStats._finite_summary(s, f, af, torch.where(keep, a, 0.0), tiny)

    @staticmethod
    def _finite_summary(s: TensorStats, f: torch.Tensor, af: torch.Tensor, a_blocks: torch.Tensor, tiny: float
                        ) -> TensorStats | None:
        """s with the statistics of the values f (flat, float32/float64, non-empty; af = |f|; a_blocks: the 2-D
        magnitudes with the left-out values as 0, for the block statistic), all computed on the device and
        brought to the host in one copy (each float()/int() of a CUDA tensor makes the host wait for the GPU);
        None when some value of f is NaN/±Inf (its max is not finite: the caller drops those first). Passes
        whose result the extremes decide (no subnormal or over-limit value) run anyway and count zero."""
        # counts (int64), extremes (f's dtype) and float64 sums, each group stacked once, then one copy
        counts = [(af == 0).sum(), ((af > 0) & (af < tiny)).sum(), *((af > limit).sum() for _, limit in RAW_LIMITS)]
        extremes = [af.max(), torch.where(af == 0, math.inf, af).min()]
        # float64 for the moments: the mean and the 2nd-4th central power sums of up to ~1e8
        # values would keep only a few digits in float32 (kurtosis of outlier-heavy tensors).
        v = f.to(_F64)
        mean = v.mean()
        d = v - mean
        del v
        d2 = d * d
        n_blocks, log2_sum = _log2_block_terms(_block_absmax(a_blocks))
        sums = [mean, d2.sum(), torch.dot(d2, d), torch.dot(d2, d2), log2_sum]
        del d, d2
        counts += [n_blocks, _log2_counts(af)]
        vals = torch.cat([torch.stack(extremes).to(_F64), torch.stack(sums),
                          torch.cat([c.reshape(-1) for c in counts]).to(_F64)]).tolist()
        if not math.isfinite(vals[0]):
            return None
        nlim = len(RAW_LIMITS)
        (s.amax, s.min_nonzero, s.mean, s.m2, s.m3, s.m4, s.log2_block_sum), c = vals[:7], [int(v) for v in vals[7:]]
        s.n, s.zeros, s.subnormal_count = f.numel(), c[0], c[1]
        s.over_max = {name: count for (name, _), count in zip(RAW_LIMITS, c[2:2 + nlim])}
        s.n_blocks = c[2 + nlim]
        s.hist = torch.tensor(c[3 + nlim:], dtype=torch.int64)
        s.hist[-1 - LOG2_LO] -= s.zeros   # zeros came out of frexp with exponent 0: bin floor(log2) = -1
        return s

    @staticmethod
    def _from_c(numel: int, c: dict) -> TensorStats:
        """The batch statistics from backends.cpu.tensor_stats' one-pass results (same values as the torch
        path; the mean and moment sums in its fixed float64 order)."""
        s = TensorStats(numel=numel, n=c["n"], zeros=c["zeros"], nan_count=c["nan"],
                        inf_count=c["pos_inf"] + c["neg_inf"], neg_inf_count=c["neg_inf"],
                        over_max={name: count for (name, _), count in zip(RAW_LIMITS, c["over"])}, hist=c["hist"])
        if s.n:
            s.mean, s.m2, s.m3, s.m4 = c["mean"], c["m2"], c["m3"], c["m4"]
            s.amax, s.min_nonzero, s.subnormal_count = c["amax"], c["min_nonzero"], c["subnormal"]
        s.n_blocks, s.log2_block_sum = _log2_block_sum(c["segmax"])
        return s

    def merge(self, other: TensorStats) -> TensorStats:
        """A new TensorStats equal to having seen both inputs (pairwise moment update, exact in real arithmetic)."""
        na, nb = self.n, other.n
        n = na + nb
        out = TensorStats(numel=self.numel + other.numel, n=n, amax=max(self.amax, other.amax),
                          min_nonzero=min(self.min_nonzero, other.min_nonzero), zeros=self.zeros + other.zeros,
                          nan_count=self.nan_count + other.nan_count, inf_count=self.inf_count + other.inf_count,
                          neg_inf_count=self.neg_inf_count + other.neg_inf_count,
                          subnormal_count=self.subnormal_count + other.subnormal_count,
                          over_max={k: self.over_max[k] + other.over_max[k] for k in self.over_max},
                          log2_block_sum=self.log2_block_sum + other.log2_block_sum,
                          n_blocks=self.n_blocks + other.n_blocks, hist=self.hist + other.hist)
        if na == 0 or nb == 0:
            src = other if na == 0 else self
            out.mean, out.m2, out.m3, out.m4 = src.mean, src.m2, src.m3, src.m4
            return out
        delta = other.mean - self.mean
        out.mean = self.mean + delta * nb / n
        out.m2 = self.m2 + other.m2 + delta**2 * na * nb / n
        out.m3 = (self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2
                  + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        out.m4 = (self.m4 + other.m4 + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
                  + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
                  + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        return out

    def result(self) -> dict:
        """numel, amax, std (population), kurtosis, zero_frac, nan_count, inf_count, range_bits, block_absmax_ratio,
        and the special-value counts pos_inf_count, neg_inf_count, zero_count, subnormal_count, over_<fmt>_max."""
        var = self.m2 / self.n if self.n else math.nan
        kurt = (self.m4 / self.n) / var**2 if self.n and var > 0 else math.nan
        range_bits = math.log2(self.amax / self.min_nonzero) if self.min_nonzero < math.inf else math.nan
        ratio = (self.amax / 2.0 ** (self.log2_block_sum / self.n_blocks)) if self.n_blocks else math.nan
        # (no finite value, e.g. an all-NaN gradient: amax is undefined like the moments; 0 read as "all zeros")
        return {"numel": self.numel, "amax": self.amax if self.n else math.nan,
                "std": math.sqrt(var) if self.n else math.nan,
                "kurtosis": kurt, "zero_frac": self.zeros / self.n if self.n else math.nan,
                "nan_count": self.nan_count, "inf_count": self.inf_count, "range_bits": range_bits,
                "block_absmax_ratio": ratio, "pos_inf_count": self.inf_count - self.neg_inf_count,
                "neg_inf_count": self.neg_inf_count, "zero_count": self.zeros, "subnormal_count": self.subnormal_count,
                **{f"over_{name}_max": c for name, c in self.over_max.items()}}

    def histogram(self) -> dict:
        """{"edges": integer log2 bin edges (len bins+1), "counts": counts per bin}."""
        return {"edges": list(HIST_EDGES), "counts": [int(c) for c in self.hist.tolist()]}


# --------------------------------------------------------------------------------------------
# LLM.int8 outlier census of an activation
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _at_least(threshold: float, dtype: torch.dtype) -> float:
    """The smallest ``dtype`` value ≥ ``threshold``, so that ``a >= it`` on a ``dtype`` tensor decides exactly
    as ``a >= threshold`` in real numbers (torch rounds a Python scalar to the tensor's dtype first)."""
    t = torch.tensor(threshold, dtype=_F64).to(dtype)
    if float(t) < threshold:
        t = torch.nextafter(t, torch.tensor(math.inf, dtype=dtype))
    return float(t)


@dataclass
class OutlierCensus:
    """Columns (feature dims) of A [rows, cols] holding any |x| ≥ threshold (LLM.int8 criterion, ≥ not >).

    NaN is ignored; ±Inf counts as an outlier (it is ≥ any threshold).
    """

    threshold: float
    col_amax: torch.Tensor | None = None  # float64 [cols], NaN-free
    rows_touched: int = 0
    rows: int = 0
    col_rows: torch.Tensor | None = None  # int64 [cols]: rows (tokens) with |x| ≥ threshold in that column

    def update(self, a2: torch.Tensor) -> None:
        """Add one batch of activations [rows, cols]."""
        if a2.dim() != 2:
            raise ValueError(f"activation must be 2-D [rows, cols], got shape {list(a2.shape)}")
        if a2.shape[0] == 0:
            return
        c = _cpu.outlier_census(a2, self.threshold)  # one C pass on CPU; else torch below
        if c is not None:
            cmax, crows, touched = c
        else:
            x = a2.detach()
            if x.dtype in (torch.float32, _F64):
                a, limit = x.abs(), _at_least(self.threshold, x.dtype)
            else:  # bf16/fp16 (and ints) widened: the comparison must not round the threshold to their grid
                a, limit = x.to(_F64).abs(), self.threshold
            a = a.nan_to_num_(nan=0.0, posinf=math.inf)
            hit = a >= limit
            # column maxima, column counts (exact in float64) and rows touched reach the host in one copy
            cols = a.shape[1]
            packed = torch.cat([a.amax(dim=0).to(_F64), hit.sum(dim=0).to(_F64),
                                hit.any(dim=1).sum().reshape(1).to(_F64)]).cpu()
            cmax, crows, touched = packed[:cols], packed[cols:2 * cols].to(torch.int64), int(packed[-1])
        if self.col_amax is None:
            self.col_amax, self.col_rows = cmax, crows
        elif self.col_amax.shape != cmax.shape:
            raise ValueError(f"column count changed between batches: {self.col_amax.numel()} then {cmax.numel()}")
        else:
            self.col_amax = torch.maximum(self.col_amax, cmax)
            self.col_rows = crows if self.col_rows is None else self.col_rows + crows
        self.rows_touched += touched
        self.rows += a2.shape[0]

    def merge(self, other: OutlierCensus) -> OutlierCensus:
        """A new census equal to having seen both inputs (same threshold required)."""
        if other.threshold != self.threshold:
            raise ValueError(f"cannot merge censuses with thresholds {self.threshold} and {other.threshold}")
        if self.col_amax is None or other.col_amax is None:
            cm = other.col_amax if self.col_amax is None else self.col_amax
        else:
            cm = torch.maximum(self.col_amax, other.col_amax)
        if self.col_rows is None or other.col_rows is None:
            cr = other.col_rows if self.col_rows is None else self.col_rows
        else:
            cr = self.col_rows + other.col_rows
        return OutlierCensus(self.threshold, None if cm is None else cm.clone(),
                             self.rows_touched + other.rows_touched, self.rows + other.rows,
                             None if cr is None else cr.clone())

    def outlier_dims(self) -> list[int]:
        """Sorted column indices with amax ≥ threshold; none at threshold 0, LLM.int8's plain int8 (no column kept in
        16-bit: every column was counted, since every |x| ≥ 0)."""
        if self.col_amax is None or self.threshold == 0:
            return []
        return (self.col_amax >= self.threshold).nonzero().flatten().tolist()

    def result(self) -> dict:
        """threshold, n_outlier_cols, frac_cols, frac_rows, top_dims ([[dim, amax], …] ≤ TOP_K, largest first),
        top_dim_tokens (for each top dim, the fraction of rows/tokens with |x| ≥ threshold in it), col_amax."""
        cols = self.col_amax if self.col_amax is not None else torch.zeros(0, dtype=_F64)
        dims = self.outlier_dims()
        top = sorted(((d, float(cols[d])) for d in dims), key=lambda t: -t[1])[:TOP_K]
        return {"threshold": self.threshold, "n_outlier_cols": len(dims),
                "frac_cols": len(dims) / cols.numel() if cols.numel() else 0.0,
                "frac_rows": self.rows_touched / self.rows if self.rows and self.threshold != 0 else 0.0,
                "top_dims": [[d, m] for d, m in top],
                "top_dim_tokens": [int(self.col_rows[d]) / self.rows if self.rows and self.col_rows is not None
                                   else 0.0 for d, _ in top],
                "col_amax": [float(v) for v in cols.tolist()]}
