"""Per-block scale statistics of the block-scaled recipes (bnb blockwise, 1×128 / 128×128, MX, NVFP4): scale range, exponent histogram, clipping and underflow per block."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fp8probe import autograd as AG
from fp8probe import functional as F
from fp8probe.backends import cpu as _cpu
from fp8probe.backends import reference as _ref

from .strategies import Strategy, _run_mixed, _Scaled, tile_records

_F64 = torch.float64


@dataclass
class BlockScaleStats:
    """Mergeable statistics of one operand's block scales over batches (one layer, one strategy).

    "scale" is what multiplies the stored element: OCP blocks ``amax / fmt_max``, MX the E8M0 power
    of two, NVFP4 the E4M3 block scale times the tensor scale, bnb blockwise the block absmax (its
    codebook spans [-1, 1]). Blocks whose finite elements are all zero have no meaningful scale and
    are only counted (``n_zero_blocks``); NaN scales (a 4/6-bit block holding NaN/Inf) are counted in
    ``n_nonfinite_blocks``; a scale that itself rounded to 0 (NVFP4's E4M3 scale below 2**-10 of the
    tensor scale range) in ``n_zero_scale_blocks``. The scale statistics cover the other blocks.
    Every field is a count, a min/max or an exact dict count, except ``sum_log2``/``sum_log2_sq``
    (float64 sums added batch by batch), so merging the per-batch accumulators in order equals
    updating one accumulator with the batches in order.
    """

    n_blocks: int = 0
    n_zero_blocks: int = 0
    n_nonfinite_blocks: int = 0
    n_zero_scale_blocks: int = 0
    n_clipped_blocks: int = 0          # blocks with at least one saturated element
    n_underflow_blocks: int = 0        # blocks with at least one nonzero element flushed to 0
    n_nonzero: int = 0                 # finite nonzero elements
    n_underflow: int = 0               # of those, quantised to 0
    max_block_underflow: float = 0.0   # largest per-block fraction of nonzero elements flushed
    scale_min: float = math.inf
    scale_max: float = -math.inf
    n_scales: int = 0
    sum_log2: float = 0.0
    sum_log2_sq: float = 0.0
    exp_counts: dict[int, int] = field(default_factory=dict)   # floor(log2 scale) → blocks

    def update(self, scale: torch.Tensor, zero_block: torch.Tensor, nonzero: torch.Tensor, underflow: torch.Tensor,
               clipped: torch.Tensor) -> None:
        """Add one batch of blocks, all 1-D of the same length: ``scale`` (float), ``zero_block`` (bool:
        no nonzero finite element), ``nonzero``/``underflow`` (element counts per block), ``clipped`` (bool)."""
        self.merge_in(_batch_stats([(scale, zero_block, nonzero, underflow, clipped)]))

    def merge_in(self, other: BlockScaleStats) -> None:
        """Add ``other``'s blocks to this accumulator (in place)."""
        for name in ("n_blocks", "n_zero_blocks", "n_nonfinite_blocks", "n_zero_scale_blocks", "n_clipped_blocks",
                     "n_underflow_blocks", "n_nonzero", "n_underflow", "n_scales", "sum_log2", "sum_log2_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_block_underflow = max(self.max_block_underflow, other.max_block_underflow)
        self.scale_min = min(self.scale_min, other.scale_min)
        self.scale_max = max(self.scale_max, other.scale_max)
        for e, c in other.exp_counts.items():
            self.exp_counts[e] = self.exp_counts.get(e, 0) + c

    def merge(self, other: BlockScaleStats) -> BlockScaleStats:
        """A new accumulator holding both (neither input is modified)."""
        out = BlockScaleStats(exp_counts=dict(self.exp_counts))
        for name in ("n_blocks", "n_zero_blocks", "n_nonfinite_blocks", "n_zero_scale_blocks", "n_clipped_blocks",
                     "n_underflow_blocks", "n_nonzero", "n_underflow", "n_scales", "sum_log2", "sum_log2_sq",
                     "max_block_underflow", "scale_min", "scale_max"):
            setattr(out, name, getattr(self, name))
        out.merge_in(other)
        return out

    def result(self) -> dict:
        """The row of the ``block_scales`` table (without layer/strategy/operand)."""
        n = self.n_scales
        mean = self.sum_log2 / n if n else math.nan
        var = max(self.sum_log2_sq / n - mean * mean, 0.0) if n else math.nan
        lo = min(self.exp_counts) if self.exp_counts else 0
        hi = max(self.exp_counts) if self.exp_counts else -1
        nb = self.n_blocks
        return {
            "n_blocks": nb, "zero_blocks": self.n_zero_blocks, "nonfinite_blocks": self.n_nonfinite_blocks,
            "zero_scale_blocks": self.n_zero_scale_blocks,
            "scale_min": self.scale_min if n else math.nan, "scale_max": self.scale_max if n else math.nan,
            "scale_log2_mean": mean, "scale_log2_std": math.sqrt(var) if n else math.nan,
            "clipped_block_frac": self.n_clipped_blocks / nb if nb else 0.0,
            "underflow_block_frac": self.n_underflow_blocks / nb if nb else 0.0,
            "underflow_frac": self.n_underflow / self.n_nonzero if self.n_nonzero else 0.0,
            "max_block_underflow_frac": self.max_block_underflow,
            "exp_lo": lo, "exp_counts": [self.exp_counts.get(e, 0) for e in range(lo, hi + 1)],
        }


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` flattened and concatenated: a view where they lie back to back in one storage (a stacked
    cast's records, split into slices by _cast_slices / _fq_blocks), else a copy."""
    first = parts[0]
    if len(parts) == 1:
        return first.reshape(-1)
    pos, base = first.data_ptr(), first.untyped_storage().data_ptr()
    for p in parts:
        if not p.is_contiguous() or p.data_ptr() != pos or p.untyped_storage().data_ptr() != base:
            return torch.cat([q.reshape(-1) for q in parts])
        pos += p.numel() * p.element_size()
    return first.as_strided((sum(p.numel() for p in parts),), (1,))


def _batch_stats(records: list[tuple[torch.Tensor, ...]]) -> BlockScaleStats:
    """One batch's statistics from its blocks: ``records``, one (scale, zero_block, nonzero, underflow,
    clipped) per slice, taken as their concatenation in slice order. One C pass where it applies
    (backends/cpu.block_stats: Σlog2 and Σlog2² in block order), else torch."""
    fields = [_joined([r[k] for r in records]) for k in range(5)]
    r = _cpu.block_stats(*fields)
    if r is None:
        return _torch_batch_stats(*fields)
    (zero, nan, zero_scale, clipped, under_blocks, nonzero, under, n_scales, max_frac, smin, smax,
     sum_log2, sum_log2_sq, lo, counts) = r
    out = BlockScaleStats(n_blocks=fields[0].numel(), n_zero_blocks=zero, n_nonfinite_blocks=nan,
                          n_zero_scale_blocks=zero_scale, n_clipped_blocks=clipped, n_underflow_blocks=under_blocks,
                          n_nonzero=nonzero, n_underflow=under, max_block_underflow=max_frac)
    if n_scales:
        out.n_scales, out.scale_min, out.scale_max, out.sum_log2, out.sum_log2_sq = n_scales, smin, smax, sum_log2, sum_log2_sq
        out.exp_counts = {lo + k: c for k, c in enumerate(counts) if c}
    return out


#: floor(log2 s) of a positive float64 lies in [-1074, 1023]: the exponent histogram's fixed bins (torch path)
_EXP_LO, _EXP_BINS = -1074, 2098


def _torch_batch_stats(scale: torch.Tensor, zero_block: torch.Tensor, nonzero: torch.Tensor, underflow: torch.Tensor,
                       clipped: torch.Tensor) -> BlockScaleStats:
    """The torch path of _batch_stats (CUDA tensors, no C extension). Masks instead of boolean indexing and every
    number in one copy to the host: on a GPU each ``int()``/``float()``/indexing by a mask makes the host wait
    (benchmarks/profile_analyze.py). Σlog2 and Σlog2² are summed over all blocks with 0 for the unscaled ones."""
    n = scale.numel()
    if n == 0:
        return BlockScaleStats()
    s = scale.to(_F64)
    nan = torch.isnan(s)
    zero_scale = (s == 0) & ~zero_block & ~nan
    good = ~zero_block & ~nan & ~zero_scale
    has = nonzero > 0
    # per-block fraction of nonzero elements flushed to 0 (>= 0, so the blocks without nonzeros count as 0)
    frac = torch.where(has, underflow.to(_F64) / torch.where(has, nonzero, 1).to(_F64), 0.0)
    sg = torch.where(good, s, 1.0)
    lg = torch.where(good, torch.log2(sg), 0.0)
    _, e = torch.frexp(sg)                         # floor(log2 s) = e - 1, exact for any float
    hist = torch.zeros(_EXP_BINS, dtype=_F64, device=s.device).scatter_add_(
        0, (e.to(torch.int64) - 1 - _EXP_LO).clamp_(0, _EXP_BINS - 1), good.to(_F64))
    head = torch.stack([(zero_block & ~nan).sum(), nan.sum(), zero_scale.sum(), clipped.sum(), (underflow > 0).sum(),
                        nonzero.sum(), underflow.sum(), frac.max(), good.sum(), torch.where(good, s, math.inf).min(),
                        torch.where(good, s, -math.inf).max(), lg.sum(), (lg * lg).sum()]).to(_F64)
    vals = torch.cat([head, hist]).tolist()
    (zero, nan_n, zero_scale_n, clipped_n, under_blocks, nonzero_n, under_n, max_frac, n_scales, smin, smax,
     sum_log2, sum_log2_sq) = vals[:13]
    out = BlockScaleStats(n_blocks=n, n_zero_blocks=int(zero), n_nonfinite_blocks=int(nan_n),
                          n_zero_scale_blocks=int(zero_scale_n), n_clipped_blocks=int(clipped_n),
                          n_underflow_blocks=int(under_blocks), n_nonzero=int(nonzero_n), n_underflow=int(under_n),
                          max_block_underflow=max_frac)
    if n_scales:
        out.n_scales, out.scale_min, out.scale_max = int(n_scales), smin, smax
        out.sum_log2, out.sum_log2_sq = sum_log2, sum_log2_sq
        out.exp_counts = {_EXP_LO + k: int(c) for k, c in enumerate(vals[13:]) if c}
    return out


# --------------------------------------------------------------------------------------------
# Which operands of which recipe are block-scaled, and their per-block records
# --------------------------------------------------------------------------------------------
def _scaled_records(x2: torch.Tensor, q2: torch.Tensor, sat2: torch.Tensor | None, fmt: str, block: tuple[int, int],
                    scale_rule: str) -> tuple[torch.Tensor, ...]:
    # the scales alone (tests/analysis/test_block_scales.py checks them against quantize_scaled's):
    # repeating the element cast would add a third to the replay's time
    x32 = x2.to(torch.float32)
    g = _ref.nvfp4_global_scale(x32) if fmt == "nvfp4" else None
    scale = _ref.tile_scales(x32, fmt, block[0], block[1], scale_rule, g)
    return tile_records(x2, q2, sat2, scale if g is None else scale * g, block)


def _codebook_records(x2: torch.Tensor, q2: torch.Tensor, book: str, blocksize: int) -> tuple[torch.Tensor, ...]:
    """bnb blockwise: blocks of `blocksize` over the flattened tensor; the scale is the block absmax."""
    flat = x2.reshape(1, -1).to(torch.float32).contiguous()
    absmax = F.blockwise_absmax(flat, blocksize)  # the quantiser's scales, without re-quantising (one read)
    qf = q2.reshape(1, -1)
    # a codebook spans [-1, 1]: a block can only clip what lies beyond its absmax (never, by construction).
    # Compared in float32: x, the absmax and q (float32/bf16/fp16) are all float32 values, so each
    # comparison decides exactly as in float64 (NaN compares False either way), without float64 copies.
    top = absmax.repeat_interleave(blocksize)[: flat.shape[1]].reshape(1, -1)
    qa = qf.abs().to(torch.float32)
    sat = (qa >= top) & (flat.abs() > qa)
    return tile_records(flat, qf, sat, absmax, (1, blocksize))


def block_operands(strategy: Strategy, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                   b_is_weight: bool = True) -> dict[str, dict[str, Any]]:
    """The block-scaled operands of ``strategy`` on one 2-D GEMM: operand → {"x", "kind", "fmt", "block",
    "scale_rule"/"blocksize"}. Per-tensor and per-row scaled operands are absent; so is everything of
    recipes without block scales. The layouts are read from the recipe objects the runners use."""
    recipe = getattr(strategy.run, "__self__", None)
    if isinstance(recipe, _Scaled):
        specs = {"activation": (A, recipe.fmt_fwd, recipe.act), "weight": (W, recipe.fmt_fwd, recipe._gran_b(b_is_weight)),
                 "grad_output": (G, recipe.fmt_bwd, recipe.act)}
        return {op: {"x": x, "kind": "scaled", "fmt": fmt, "block": gran[1], "scale_rule": recipe.scale_rule}
                for op, (x, fmt, gran) in specs.items() if x is not None and gran[0] == "block"}
    func = getattr(strategy.run, "func", strategy.run)
    if func is _run_mixed:
        blocks = getattr(strategy.run, "keywords", {}).get("blocks") or AG.get_block_sizes(A, W)
        out = {"activation": {"x": A, "kind": "codebook", "fmt": "bnb-e4m3", "blocksize": blocks[0]}}
        if G is not None:
            out["grad_output"] = {"x": G, "kind": "codebook", "fmt": "bnb-e5m2", "blocksize": blocks[1]}
        return out
    return {}


def _label(spec: dict) -> dict:
    if spec["kind"] == "codebook":
        return {"format": spec["fmt"], "block": f"{spec['blocksize']} (flattened)", "scale_rule": "absmax"}
    rule = {"nvfp4": "e4m3(amax/(6·g))·g"}.get(spec["fmt"], spec["scale_rule"] if spec["fmt"].startswith("mx")
                                                else "amax/fmt_max")
    return {"format": spec["fmt"], "block": f"{spec['block'][0]}x{spec['block'][1]}", "scale_rule": rule}


def update_block_stats(stats: dict[tuple[str, str], BlockScaleStats], labels: dict[tuple[str, str], dict],
                       strategy: Strategy, A: torch.Tensor, W: torch.Tensor, G: torch.Tensor | None,
                       operands: dict[str, tuple], b_is_weight: bool = True, include_weight: bool = True,
                       blocks: dict[str, list] | None = None) -> None:
    """Add one GEMM call's block statistics of ``strategy`` to ``stats`` ((strategy, operand) → accumulator).

    ``operands``: StrategyOutput.operands of the same call (x, dequantised q, saturation mask), so the
    clipping and underflow counted here are the replay's own. ``blocks``: StrategyOutput.blocks of the
    same call: a slice's BlockRecords there are used as they are (the fused cast counted them); the
    others are computed here from x, q and the mask. Batched GEMMs ([Bt, M, K]) are taken slice by
    slice, as the recipes quantise them. ``labels`` receives each operand's format/block/rule.
    """
    slices = [(A, W, G)] if A.dim() == 2 else [(A[i], W[i], None if G is None else G[i]) for i in range(A.shape[0])]
    # Every slice's blocks of one operand go into the accumulator in one update (the slices' records
    # concatenated in slice order): one pass of the statistics instead of one per attention head.
    records: dict[str, list[tuple[torch.Tensor, ...]]] = {}
    for i, (a, w, g) in enumerate(slices):
        for op, spec in block_operands(strategy, a, w, g, b_is_weight).items():
            if op not in operands or (op == "weight" and not include_weight):
                continue
            _, q, sat = operands[op]
            if A.dim() == 3:
                q, sat = q[i], None if sat is None else sat[i]
            x = spec["x"]
            if x.numel() == 0:                          # an empty batch has no blocks
                continue
            carried = (blocks or {}).get(op)
            rec = carried[i] if carried else None
            if rec is None and spec["kind"] == "scaled":
                rec = _scaled_records(x, q, sat, spec["fmt"], spec["block"], spec["scale_rule"])
            elif rec is None:
                rec = _codebook_records(x, q, spec["fmt"], spec["blocksize"])
            records.setdefault(op, []).append(rec)
            labels.setdefault((strategy.name, op), _label(spec))
    for op, recs in records.items():
        stats.setdefault((strategy.name, op), BlockScaleStats()).merge_in(_batch_stats(recs))
