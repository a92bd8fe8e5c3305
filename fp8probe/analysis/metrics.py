"""Mergeable error, dynamic-range and outlier accumulators: batches (and later ranks) combine exactly via merge()."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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


def _as_f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(_F64)


def _dots(r: torch.Tensor, q: torch.Tensor) -> tuple[float, float, float, float] | None:
    """(Σr², Σ(r−q)², Σq², Σr·q) of flat float64 tensors, or None if any element is NaN/±Inf.

    float32 data squared cannot overflow float64 (3.4e38² ≈ 1e77), so finite sums prove every
    element finite and the common case skips the elementwise isfinite masks.
    """
    err = r - q
    sums = (float(torch.dot(r, r)), float(torch.dot(err, err)), float(torch.dot(q, q)), float(torch.dot(r, q)))
    return sums if all(math.isfinite(v) for v in sums) else None


# --------------------------------------------------------------------------------------------
# GEMM error: reference (float64) vs low-precision result
# --------------------------------------------------------------------------------------------
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

    def update(self, ref: torch.Tensor, lp: torch.Tensor) -> None:
        """Add one batch: ``ref`` and ``lp`` of the same shape (any float dtype)."""
        if ref.shape != lp.shape:
            raise ValueError(f"ref and lp must have the same shape, got {list(ref.shape)} and {list(lp.shape)}")
        if ref.numel() == 0:
            return
        r, q = _as_f64(ref).flatten(), _as_f64(lp).flatten()
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
        self.sum_ref2 += sums[0]
        self.sum_err2 += sums[1]
        self.sum_lp2 += sums[2]
        self.sum_dot += sums[3]
        if n_ok:
            self.max_abs_err = max(self.max_abs_err, float((r - q).abs().max()))
        self.count += n_ok

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

    def update(self, x: torch.Tensor, q: torch.Tensor, saturated: torch.Tensor | None = None) -> None:
        """Add one batch: ``x`` the operand, ``q`` its dequantised value (same shape)."""
        if x.shape != q.shape:
            raise ValueError(f"x and q must have the same shape, got {list(x.shape)} and {list(q.shape)}")
        if x.numel() == 0:
            return
        r, d = _as_f64(x).flatten(), _as_f64(q).flatten()
        sums = _dots(r, d)
        if sums is None:
            fin = torch.isfinite(r)
            both = fin & torch.isfinite(d)
            rz, dz = torch.where(both, r, 0.0), torch.where(both, d, 0.0)
            sums = _dots(rz, dz)
            n_fin = int(fin.sum())
            self.n_excluded += r.numel() - n_fin
            self.n_nonfinite += n_fin - int(both.sum())
        else:
            fin, dz, n_fin = None, d, r.numel()
        self.sum_ref2 += sums[0]
        self.sum_err2 += sums[1]
        self.n_finite += n_fin
        nz = r != 0 if fin is None else fin & (r != 0)
        self.n_nonzero += int(nz.sum())
        self.n_underflow += int((nz & (d == 0)).sum())
        if saturated is None:
            qmax = float(dz.abs().max()) if n_fin else 0.0
            saturated = r.abs() > qmax
        else:
            saturated = saturated.flatten()
        if fin is not None:
            saturated = saturated & fin
        self.n_saturated += int(saturated.sum())

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


def _block_absmax(x2: torch.Tensor) -> torch.Tensor:
    """Absmax of every 1×BLOCK row segment of the finite values of 2-D ``x2`` (last segment partial)."""
    rows, cols = x2.shape
    nb = -(-cols // BLOCK)
    a = torch.where(torch.isfinite(x2), x2.abs(), 0.0).to(_F64)
    a = torch.nn.functional.pad(a, (0, nb * BLOCK - cols))
    return a.view(rows, nb, BLOCK).amax(dim=2).flatten()


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
        s = TensorStats(numel=x2.numel())
        v = x2.to(_F64)
        nan = torch.isnan(v)
        inf = torch.isinf(v)
        s.nan_count, s.inf_count = int(nan.sum()), int(inf.sum())
        s.neg_inf_count = int((inf & (v < 0)).sum()) if s.inf_count else 0
        f = v[~(nan | inf)]
        s.n = f.numel()
        s.zeros = int((f == 0).sum())
        if s.n:
            a = f.abs()
            s.subnormal_count = int(((a > 0) & (a < tiny)).sum())
            s.over_max = {name: int((a > limit).sum()) for name, limit in RAW_LIMITS}
            s.mean = float(f.mean())
            d = f - s.mean
            d2 = d * d
            s.m2, s.m3, s.m4 = float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum())
            a = f.abs()
            s.amax = float(a.max())
            nz = a[a != 0]
            if nz.numel():
                s.min_nonzero = float(nz.min())
        blocks = _block_absmax(x2)
        blocks = blocks[blocks > 0]
        s.n_blocks = blocks.numel()
        s.log2_block_sum = float(torch.log2(blocks).sum()) if s.n_blocks else 0.0
        s.hist = log2_histogram(x2)
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
        return {"numel": self.numel, "amax": self.amax, "std": math.sqrt(var) if self.n else math.nan,
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
        a = a2.detach().to(_F64).abs().nan_to_num(nan=0.0, posinf=math.inf)
        cmax = a.amax(dim=0).cpu()
        hit = a >= self.threshold
        crows = hit.sum(dim=0).cpu()
        if self.col_amax is None:
            self.col_amax, self.col_rows = cmax, crows
        elif self.col_amax.shape != cmax.shape:
            raise ValueError(f"column count changed between batches: {self.col_amax.numel()} then {cmax.numel()}")
        else:
            self.col_amax = torch.maximum(self.col_amax, cmax)
            self.col_rows = crows if self.col_rows is None else self.col_rows + crows
        self.rows_touched += int(hit.any(dim=1).sum())
        self.rows += a.shape[0]

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
        """Sorted column indices with amax ≥ threshold."""
        if self.col_amax is None:
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
                "frac_rows": self.rows_touched / self.rows if self.rows else 0.0,
                "top_dims": [[d, m] for d, m in top],
                "top_dim_tokens": [int(self.col_rows[d]) / self.rows if self.rows and self.col_rows is not None
                                   else 0.0 for d, _ in top],
                "col_amax": [float(v) for v in cols.tolist()]}
