"""Drop-in for ``import bitsandbytes as bnb`` (0.49.2 import paths and argument names) running on fp8probe, CPU included.

Change one line — ``import fp8probe.compat.bitsandbytes as bnb`` — and ``bnb.functional``,
``bnb.research`` (``matmul_fp8_mixed``/``matmul_fp8_global``/``switchback_bnb``,
``research.nn.LinearFP8Mixed``/``LinearFP8Global``), ``bnb.nn.Int8Params``, ``bnb.nn.Linear8bitLt``,
``bnb.nn.SwitchBackLinearBnb``, ``bnb.matmul``, ``bnb.MatmulLtState`` and the autograd functions
(``bnb.autograd._functions``, ``bnb.research.autograd._functions``) run on fp8probe.
Numerics: fp8probe's defaults, or bitsandbytes 0.49.2's with ``set_compat("bnb")`` /
``FP8PROBE_COMPAT=bnb`` (bit for bit where bitsandbytes runs on CPU). The kept differences are
listed in docs/architecture.md ("bitsandbytes drop-in").
"""
from __future__ import annotations

import torch

from fp8probe import autograd as _AG
from fp8probe.autograd import MatmulLtState

from . import autograd, functional, nn, research
from ._mode import get_compat, set_compat

__all__ = ["autograd", "functional", "nn", "research", "matmul", "MatmulLtState", "set_compat", "get_compat"]


def matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None, state: MatmulLtState | None = None,
           threshold: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """LLM.int8() ``A [..., in] · Bᵀ (+ bias)``; B the float weight [out, in] or bnb's int8 ``state.CB``.

    fp8probe runs the LLM.int8() algorithm on every device; bitsandbytes' CPU *training* path
    (``MatMul8bitFp``, weight-only fake quantisation) is not reproduced (SPEC Q12).
    """
    return _AG.matmul(A, B, out, state, threshold, bias, compat=get_compat())
