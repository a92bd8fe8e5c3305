"""``bitsandbytes.research`` of bitsandbytes 0.49.2 (removed in 0.50.0): the FP8 research matmuls and SwitchBack, runnable on CPU."""
from __future__ import annotations

import torch

from fp8probe import autograd as _AG
from fp8probe.autograd import MatmulLtState

from .._mode import get_compat
from . import nn

__all__ = ["matmul_fp8_mixed", "matmul_fp8_global", "switchback_bnb", "nn"]


def matmul_fp8_mixed(A: torch.Tensor, B: torch.Tensor, fw_code: torch.Tensor | None = None,
                     bw_code: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     bsz: int = -1, bsz2: int = -1) -> torch.Tensor:
    """FP8 "mixed" ``A [..., in] @ B [in, out]`` (bnb's signature; codes default to its E4M3/E5M2 maps)."""
    return _AG.matmul_fp8_mixed(A, B, fw_code, bw_code, out, bsz, bsz2, compat=get_compat())


def matmul_fp8_global(A: torch.Tensor, B: torch.Tensor, fw_code: torch.Tensor | None = None,
                      bw_code: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      bsz: int = -1, bsz2: int = -1) -> torch.Tensor:
    """FP8 "global" ``A [..., in] @ B [in, out]`` (bnb's signature; bsz/bsz2 ignored, as in bnb)."""
    return _AG.matmul_fp8_global(A, B, fw_code, bw_code, out, bsz, bsz2, compat=get_compat())


def switchback_bnb(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None,
                   state: MatmulLtState | None = None, threshold: float = 0.0,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """SwitchBack ``A [..., in] · Bᵀ`` with B the weight [out, in] or bnb's int8 ``state.CB``."""
    return _AG.switchback_bnb(A, B, out, state, threshold, bias, compat=get_compat())


from . import autograd  # noqa: E402  (last: research.autograd re-exports the functions above)

__all__ += ["autograd"]
