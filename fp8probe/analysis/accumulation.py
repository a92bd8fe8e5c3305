"""Simulated reduced-precision tensor-core accumulation: partial sums over N_c contraction elements truncated to a short mantissa, promoted into an FP32 accumulator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP32_MANTISSA_BITS = 23
FP64_MANTISSA_BITS = 52
# DeepSeek-V3 (§3.3.2) measured about 14 retained bits on H800 and promotes every 128 elements (4 WGMMAs).
DEFAULT_PROMOTE_EVERY = 128


@dataclass(frozen=True)
class Accumulation:
    """How a simulated FP8 GEMM accumulates (the rule, written once; every caller refers to it).

    For each output element, the contraction index k runs in chunks of ``promote_every`` consecutive
    elements. Inside a chunk, starting from 0, ``partial = trunc(fl64(partial + a_k·b_k))``: the
    product of the two dequantised float32 operands is exact in float64, the sum is rounded to
    float64 and then truncated toward zero to ``mantissa_bits`` explicit fraction bits (FP32 has 23;
    truncation, not rounding, because that is what measurements of Hopper's FP8 accumulator suggest).
    At the end of each chunk the partial sum is promoted: ``acc = fl32(acc + partial)`` (float32
    round to nearest even; the partial converts to float32 exactly). The exponent range is float32's.
    """

    mantissa_bits: int
    promote_every: int = DEFAULT_PROMOTE_EVERY

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("mantissa_bits", self.mantissa_bits, 1, FP32_MANTISSA_BITS),
                                    ("promote_every", self.promote_every, 1, None)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                bound = f"an int in {lo}..{hi}" if hi is not None else f"an int >= {lo}"
                raise ValueError(f"expected {name} {bound}, got {value!r}")

    def describe(self) -> str:
        """One sentence for the report's recipe text."""
        return (f"Accumulation simulated: partial sums over {self.promote_every} contraction elements truncated "
                f"toward zero to {self.mantissa_bits} mantissa bits after every addition, then added into a "
                f"float32 accumulator (round to nearest even).")

    def metadata(self) -> dict:
        return {"mantissa_bits": self.mantissa_bits, "promote_every": self.promote_every, "rounding": "truncate"}


def truncate_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """float64 ``x`` with all but the top ``mantissa_bits`` fraction bits cleared: truncation toward zero
    (IEEE sign-magnitude: clearing low bits shrinks |x| for either sign). NaN keeps its quiet bit."""
    if x.dtype != torch.float64:
        raise TypeError(f"expected a float64 tensor, got {x.dtype}")
    mask = ~((1 << (FP64_MANTISSA_BITS - mantissa_bits)) - 1)
    return torch.bitwise_and(x.view(torch.int64), mask).view(torch.float64)


def matmul_limited(a: torch.Tensor, b: torch.Tensor, accum: Accumulation) -> torch.Tensor:
    """``a · bᵀ`` (a [M, K], b [N, K], float32 values) accumulated as :class:`Accumulation` says;
    returns float32 [M, N]. Cost: K passes over an [M, N] float64 buffer (slow: an analysis option)."""
    if not isinstance(accum, Accumulation):
        raise TypeError(f"expected an Accumulation, got {type(accum).__name__}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected a [M, K] and b [N, K], got {list(a.shape)} and {list(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for start in range(0, K, accum.promote_every):
        partial = torch.zeros(M, N, dtype=torch.float64, device=a.device)
        for k in range(start, min(start + accum.promote_every, K)):
            partial = truncate_mantissa(partial + a64[:, k, None] * b64[None, :, k], accum.mantissa_bits)
        acc = acc + partial.to(torch.float32)
    return acc
