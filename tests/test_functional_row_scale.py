"""LLM.int8 row scale "paper" (outlier columns out of the row absmax) vs "bnb" (SPEC §5.1): hand-computed codes, threshold independence, MatMul8bitLt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fp8probe import autograd as AG
from fp8probe import functional as F
from support import DEVICES


def _planted(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[6, 10]: columns 3 and 7 hold one value >= 8 (outlier columns at thresholds 4 and 6 alike) and, in
    other rows, sub-threshold values 5.0 / -4.5 that are larger than every other entry of their row."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 10, generator=g).clamp(-2, 2)
    A[1, 3], A[4, 7] = 9.0, -12.0
    A[0, 3], A[2, 7], A[5, 3] = 5.0, -4.5, 5.0
    return A.to(dtype)


def _hand_paper(A: torch.Tensor, cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Codes and row stats by hand in numpy float32: absmax over the non-outlier columns, then
    round_half_even(a · fl32(fl32(1/absmax) · 127)) (the reciprocal-then-multiply order of SPEC §4.2/§5.1)."""
    a = A.float().numpy()
    keep = [j for j in range(a.shape[1]) if j not in cols]
    stats = np.abs(a[:, keep]).max(axis=1).astype(np.float32)
    scale = (np.float32(1.0) / stats).astype(np.float32) * np.float32(127.0)
    q = np.rint((a * scale[:, None]).astype(np.float32)).clip(-127, 127).astype(np.int8)
    q[:, cols] = 0
    return q, stats


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paper_codes_match_hand_computation(device, dtype) -> None:
    A = _planted(dtype)
    q, stats, cols = F.int8_vectorwise_quant(A.to(device), 6.0, row_scale="paper")
    assert cols.tolist() == [3, 7]
    want_q, want_stats = _hand_paper(A, [3, 7])
    assert np.array_equal(stats.cpu().numpy(), want_stats)
    assert np.array_equal(q.cpu().numpy(), want_q)
    # bnb keeps the sub-threshold 5.0 / -4.5 of the outlier columns in rows 0, 2, 5
    _, stats_bnb, cols_bnb = F.int8_vectorwise_quant(A.to(device), 6.0)
    assert torch.equal(cols_bnb, cols)
    assert stats_bnb.cpu()[[0, 2, 5]].tolist() == [5.0, 4.5, 5.0]
    assert (stats.cpu()[[0, 2, 5]] < 2.01).all()


@pytest.mark.parametrize("device", DEVICES)
def test_double_quant_paper_rows_and_zero_outlier_columns(device) -> None:
    A = _planted().to(device)
    q_row, q_col, rs, cs, cols = F.int8_double_quant(A, 6.0, row_scale="paper")
    q, stats, _ = F.int8_vectorwise_quant(A, 6.0, row_scale="paper")
    assert torch.equal(q_row, q) and torch.equal(rs, stats) and cols.tolist() == [3, 7]
    assert (q_col[:, cols] == 0).all() and (cs[cols] == 0).all()
    # the other columns' codes are bnb's (no outlier element lives in them)
    _, q_col_bnb, _, cs_bnb, _ = F.int8_double_quant(A, 6.0)
    keep = [j for j in range(10) if j not in (3, 7)]
    assert torch.equal(q_col[:, keep], q_col_bnb[:, keep]) and torch.equal(cs[keep], cs_bnb[keep])


def test_threshold_zero_and_default_are_bnb() -> None:
    A = _planted()
    for rs in ("bnb", "paper"):  # no outlier columns: the two rules coincide
        q0, s0, c0 = F.int8_vectorwise_quant(A, 0.0, row_scale=rs)
        q1, s1, c1 = F.int8_vectorwise_quant(A, 0.0)
        assert torch.equal(q0, q1) and torch.equal(s0, s1) and c0 is None and c1 is None
    with pytest.raises(ValueError, match="row_scale must be one of bnb, paper, got 'Paper'"):
        F.int8_vectorwise_quant(A, 6.0, row_scale="Paper")
    with pytest.raises(ValueError, match="row_scale must be one of"):
        F.int8_double_quant(A, 6.0, row_scale=None)


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - y.double()).pow(2).sum()))


def test_paper_output_is_independent_of_the_threshold_when_the_same_columns_are_kept() -> None:
    A = _planted()
    W = torch.randn(5, 10, generator=torch.Generator().manual_seed(1))
    ref = A.double() @ W.double().T
    out = {(rs, t): AG.matmul(A, W, threshold=t, row_scale=rs) for rs in ("bnb", "paper") for t in (4.0, 6.0)}
    assert torch.equal(out["paper", 4.0], out["paper", 6.0])
    # bnb: at 6 the sub-threshold 5.0 / -4.5 enter the row absmax of rows 0, 2, 5, and the SQNR drops
    assert not torch.equal(out["bnb", 4.0], out["bnb", 6.0])
    assert _sqnr(ref, out["bnb", 6.0]) < _sqnr(ref, out["bnb", 4.0]) - 1.0
    assert _sqnr(ref, out["paper", 6.0]) > _sqnr(ref, out["bnb", 6.0])


def test_matmul_state_row_scale_and_backward() -> None:
    A = _planted().requires_grad_(True)
    W = torch.randn(5, 10, generator=torch.Generator().manual_seed(2), requires_grad=True)
    state = AG.MatmulLtState()
    assert state.row_scale == "bnb"
    y = AG.matmul(A, W, state=state, threshold=6.0, row_scale="paper")
    assert state.row_scale == "paper" and state.idx.tolist() == [3, 7]
    y.sum().backward()
    assert A.grad is not None and torch.isfinite(W.grad).all()
    with pytest.raises(ValueError, match="row_scale must be one of"):
        AG.matmul(A, W, threshold=6.0, row_scale="lol")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0,), (5, 0), (2, 3, 0), (0, 4)])
def test_paper_empty_inputs_short_circuit(device, shape) -> None:
    """An empty last dim reshaped to [-1, 0] (ambiguous) and raised a torch RuntimeError with row_scale="paper" and
    threshold > 0 (QA finding 6): empty inputs give row_scale="bnb"'s empty outputs."""
    A = torch.randn(shape, generator=torch.Generator().manual_seed(8)).to(device)
    for fn in (F.int8_vectorwise_quant, F.int8_double_quant):
        paper = fn(A, 3.0, row_scale="paper")
        bnb = fn(A, 3.0, row_scale="bnb")
        assert len(paper) == len(bnb)
        for p, b in zip(paper, bnb):
            assert p.shape == b.shape and p.dtype == b.dtype and p.device == b.device and torch.equal(p, b)
        assert paper[-1].dtype == torch.int64 and paper[-1].numel() == 0
