"""Delayed scaling (Transformer Engine's recipe): per-tensor FP8 scales from the amax history of earlier batches, per GEMM site and operand, with overflow counts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np
import pandas as pd
import torch

from fp8probe.backends import cpu as _cpu
from fp8probe.backends.reference import fp8_saturate
from fp8probe.formats import FORMATS

AMAX_COMPUTE = ("max", "most_recent")
# Transformer Engine's DelayedScaling defaults (amax_history_len=1024, amax_compute_algo="max", margin=0).
DEFAULT_HISTORY = 1024
_F32 = torch.float32
# The per-tensor OCP formats delayed scaling casts to (E4M3 forward, E5M2 backward: HYBRID).
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}

DELAYED_COLUMNS = ["layer", "strategy", "operand", "batches", "warmup_batches", "overflow_batches", "saturated",
                   "elements", "max_amax_ratio"]


@dataclass(frozen=True)
class DelayedScaling:
    """The delayed-scaling rule (written once here; fp8probe's convention x ≈ data·scale).

    For each GEMM site and operand, batch t uses ``amax_h`` = max over the last ``history`` recorded
    amaxes ("max") or the last one ("most_recent"), then ``scale = fl32(fl32(amax_h / fmt_max) · 2^margin)``
    (Transformer Engine writes the reciprocal, fmt_max / amax / 2^margin, and multiplies),
    ``data = fp8_rne(saturate(fl32(x / scale)))`` as in functional.quantize_scaled; scale 1 when
    amax_h is 0. Batch t's own amax (max |x| over finite values) is recorded after the cast.
    The first batch of a site (empty history) uses its own amax: a just-in-time per-tensor scale,
    bit for bit the ocp-tensorwise cast (Transformer Engine starts from scale 1, which only measures
    initialisation). An overflow is a batch whose amax exceeds the amax the scale was made for,
    amax_h · 2^margin (= fmt_max · scale): its largest values saturate. The first batch never overflows.
    """

    history: int = DEFAULT_HISTORY
    compute: str = "max"
    margin: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            raise ValueError(f"expected amax history length an int >= 1, got {self.history!r}")
        if self.compute not in AMAX_COMPUTE:
            raise ValueError(f"expected amax compute one of {', '.join(AMAX_COMPUTE)}, got {self.compute!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or not 0 <= self.margin <= 64:
            raise ValueError(f"expected margin an int in 0..64, got {self.margin!r}")

    def describe(self) -> str:
        return (f"amax history {self.history}, amax = {self.compute.replace('_', ' ')} of the history, margin "
                f"{self.margin} (scale = amax·2^{self.margin}/fmt_max); the first batch of each GEMM site uses its "
                f"own amax")

    def metadata(self) -> dict:
        return {"amax_history": self.history, "amax_compute": self.compute, "margin": self.margin,
                "first_batch": "current amax"}


@dataclass
class _Counts:
    batches: int = 0
    warmup: int = 0
    overflow: int = 0
    saturated: int = 0
    elements: int = 0
    max_ratio: float = 0.0


@dataclass
class DelayedState:
    """Amax histories and overflow counts of one pass over the batches (one per strategy and run).

    ``quantize(site, operand, x, fmt)``: site = any hashable naming the GEMM (layer name, slice of a
    batched GEMM); counts are kept per ``layer`` = site[0] when site is a tuple, else site.
    """

    rule: DelayedScaling
    history: dict[tuple[Hashable, str], list[float]] = field(default_factory=dict)
    counts: dict[tuple[str, str], _Counts] = field(default_factory=dict)
    #: the float32 scale of the last quantize per (site, operand): recast uses it
    scales: dict[tuple[Hashable, str], float] = field(default_factory=dict)

    def history_amax(self, site: Hashable, operand: str) -> float | None:
        """The amax this batch's scale is made for (max or most recent of the history), None when the history
        is empty (warm-up: the batch's own amax)."""
        hist = self.history.get((site, operand))
        if not hist:
            return None
        return max(hist) if self.rule.compute == "max" else hist[-1]

    def _scale_of(self, amax: float, fmt: str) -> tuple[float, float]:
        """(float32 scale made for ``amax``, the largest |x| it represents without saturating): amax · 2^margin
        (fmt_max · scale up to the scale's float32 rounding, which the per-tensor cast shares), fmt_max for
        scale 1."""
        fmax = FORMATS[fmt].max
        # float32 arithmetic on numpy scalars (a 0-D torch tensor per operand cost ~25 µs a batch and operand:
        # an attention site has one per head); overflow to inf is the float32 result, not an error
        with np.errstate(over="ignore"):
            scale = float(np.float32(amax) / np.float32(fmax) * np.float32(2.0 ** self.rule.margin))
        if scale > 0:
            return scale, amax * 2.0 ** self.rule.margin
        return 1.0, fmax

    def scale_for(self, site: Hashable, operand: str, amax_now: float, fmt: str) -> tuple[float, float, bool]:
        """(float32 scale for this batch, the largest |x| it represents without saturating, warm-up: True
        when the history was empty): _scale_of the history's amax, or of ``amax_now`` at warm-up."""
        amax = self.history_amax(site, operand)
        return (*self._scale_of(amax_now if amax is None else amax, fmt), amax is None)

    def _fused(self, x: torch.Tensor, fmt: str, scale: float | None) -> _cpu.FusedScaled | None:
        """The cast in one C call (backends.cpu.fused_scaled, one tile: the per-tensor cast with ``scale`` given,
        or at warm-up, ``scale`` None, the one from x's amax times 2^margin), or None where it does not apply
        (not a CPU float tensor, no extension, FP8PROBE_BACKEND=reference, a scale not finite in float32, NaN
        in the result): the torch ops then."""
        if x.dim() == 0 or x.numel() == 0:
            return None
        rows, cols = x.numel() // x.shape[-1], x.shape[-1]
        if scale is None:
            return _cpu.fused_scaled(x, fmt, rows, cols, scale_multiplier=2.0 ** self.rule.margin)
        if not math.isfinite(scale):
            return None
        return _cpu.fused_scaled(x, fmt, rows, cols, scale=scale)

    @staticmethod
    def _clipped(x: torch.Tensor, saturated: torch.Tensor, limit: float) -> int:
        """Elements of the ``saturated`` mask the clamp clipped: |x| above ``limit``, the amax the scale was made
        for (±Inf included). The mask (|data| == fmt_max and |x| > |q|, as every cast's metrics count it) also
        holds the amax element of a cast whose float32 scale fl32(amax / fmt_max) rounded down: fmt_max · scale
        < amax by a float32 rounding, so q < |x| though x / scale rounds to fmt_max unclamped (QA: 38 operands
        of a one-batch run "saturated under the delayed scale", all on own-amax casts). ``limit`` is a float32
        amax times 2^margin, exact in float32 unless it overflows to inf (then nothing is above it)."""
        return int((x[saturated].to(_F32).abs() > limit).sum())

    def quantize(self, site: Hashable, operand: str, x: torch.Tensor, fmt: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dequantised x in float32, saturated mask) with this batch's delayed scale; records x's amax. The
        ``saturated`` count is of the elements clipped (_clipped): none on a cast that did not overflow."""
        amax_h = self.history_amax(site, operand)
        warmup = amax_h is None
        made = None if warmup else self._scale_of(amax_h, fmt)  # (the warm-up's scale needs x's amax first)
        fused = self._fused(x, fmt, None if made is None else made[0])
        if fused is not None:
            amax_now, q, saturated = fused.amax, fused.q, fused.saturated
            limit = (made or self._scale_of(amax_now, fmt))[1]
            n_saturated = int(fused.counts[2].sum())
            scale = made[0] if made else float(fused.scale.reshape(-1)[0])  # (warm-up: the one the C code made)
        else:
            fp8, fmax = FP8_DTYPES[fmt], FORMATS[fmt].max
            x32 = x.to(_F32)
            finite_abs = torch.where(torch.isfinite(x32), x32.abs(), 0.0)
            amax_now = float(finite_abs.amax()) if x32.numel() else 0.0
            scale, limit = made or self._scale_of(amax_now, fmt)
            s = torch.tensor(scale, dtype=_F32, device=x.device)
            data = fp8_saturate(x32 / s, fp8, fmax).to(fp8)
            q = data.to(_F32) * s
            saturated = (data.to(_F32).abs() == fmax) & (x32.abs() > q.abs())
            n_saturated = int(saturated.sum())
        n_saturated = self._clipped(x, saturated, limit) if n_saturated else 0
        self.scales[(site, operand)] = scale
        hist = self.history.setdefault((site, operand), [])
        hist.append(amax_now)
        del hist[:-self.rule.history]
        layer = site[0] if isinstance(site, tuple) else site
        c = self.counts.setdefault((str(layer), operand), _Counts())
        ratio = amax_now / limit
        c.batches += 1
        c.warmup += warmup
        c.overflow += ratio > 1.0
        c.saturated += n_saturated
        c.elements += x.numel()
        c.max_ratio = max(c.max_ratio, ratio)
        return q, saturated

    def recast(self, x: torch.Tensor, fmt: str, scale: float) -> torch.Tensor:
        """x cast again with ``scale`` (one quantize's: ``scales[(site, operand)]``), recording nothing: bit for bit that
        quantize's dequantised x, by the same path (the C cast with the scale given, or the torch ops). A weight's
        cast in the backward: a second quantize would step its amax history, and saving the first cast's float32
        copy held one of every weight through a model's pass (+400 MiB at Llama-135M's peak)."""
        fused = self._fused(x, fmt, scale)
        if fused is not None:
            return fused.q
        fp8, fmax = FP8_DTYPES[fmt], FORMATS[fmt].max
        s = torch.tensor(scale, dtype=_F32, device=x.device)
        return fp8_saturate(x.to(_F32) / s, fp8, fmax).to(fp8).to(_F32) * s

    def rows(self, strategy: str) -> list[dict]:
        """One ``delayed_scaling`` row per (layer, operand): batches, warm-up batches, batches whose amax
        overflowed the delayed scale, saturated (clipped: |x| above the amax the scale was made for, so only in overflow
        batches) elements of all elements, max over batches of
        amax / (amax_h · 2^margin) (> 1 = overflow)."""
        return [{"layer": layer, "strategy": strategy, "operand": op, "batches": c.batches,
                 "warmup_batches": c.warmup, "overflow_batches": c.overflow, "saturated": c.saturated,
                 "elements": c.elements, "max_amax_ratio": c.max_ratio}
                for (layer, op), c in self.counts.items()]


def delayed_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=DELAYED_COLUMNS)
