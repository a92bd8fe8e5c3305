"""Differential test against the real bitsandbytes 0.49.2 CPU ops on fresh seeded data (compat="bnb" must match bit for bit).

The committed vectors (test_functional_vectors.py) pin a few fixed cases; this test draws new data
every parameter combination, including block sizes bnb never ships vectors for, and compares whole
outputs. It runs only where `bitsandbytes` is importable (the `test` extra installs it).
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch

import fp8probe.functional as F

bnb_F = pytest.importorskip("bitsandbytes.functional")
warnings.filterwarnings("ignore", module="bitsandbytes")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _draw(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed rows so blocks see very different absmax values
    x = torch.randn(shape, generator=g) * torch.exp(2 * torch.randn(shape[:-1] + (1,), generator=g))
    return x.to(dtype)


@pytest.mark.parametrize("codename,bnb_code", [("bnb-e4m3", (True, 4, 3, 8)), ("bnb-e5m2", (True, 5, 2, 8)),
                                               ("dynamic", None)])
def test_codebooks_equal_live_bnb(codename: str, bnb_code: tuple | None) -> None:
    ref = bnb_F.create_fp8_map(*bnb_code) if bnb_code else bnb_F.create_dynamic_map(True, 7, 8)
    ours = F.get_codebook(codename)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codename", ["bnb-e4m3", "bnb-e5m2", "dynamic"])
@pytest.mark.parametrize("blocksize,shape", [(64, (33, 70)), (100, (5, 7, 31)), (4096, (3, 5000)), (37, (999,))])
def test_blockwise_equals_live_bnb(dtype: torch.dtype, codename: str, blocksize: int, shape: tuple[int, ...]) -> None:
    seed = zlib.crc32(repr((str(dtype), codename, blocksize, shape)).encode())  # stable across processes
    x = _draw(seed, shape, dtype)
    code = F.get_codebook(codename)
    q_b, st_b = bnb_F.quantize_blockwise(x.clone(), code=code.clone(), blocksize=blocksize)
    y_b = bnb_F.dequantize_blockwise(q_b, st_b)

    q, st = F.quantize_blockwise(x, code=code, blocksize=blocksize, compat="bnb")
    y = F.dequantize_blockwise(q, st)
    assert torch.equal(q, q_b)
    assert torch.equal(st.absmax, st_b.absmax)
    assert torch.equal(st.code, st_b.code)
    assert y.dtype == y_b.dtype == dtype
    assert torch.equal(y.float().view(torch.int32), y_b.float().view(torch.int32))

    # Default mode differs from bnb only near decision midpoints: the even-index tie rule
    # (SPEC §2.1) vs bnb's lower-index rules, whose fp32 distance comparisons (§2.3/§2.4) also turn
    # values within an ulp of a midpoint into ties; and bnb's code[0] = -1 write for fp32 (Q2).
    # bnb's fp16/bf16 path also rounds the normalised values of a *partial last block* to the input
    # dtype (a 0-dim reciprocal keeps A's dtype in torch's promotion), so compare full blocks only.
    q_d, _ = F.quantize_blockwise(x, code=code, blocksize=blocksize)
    n_cmp = x.numel() if dtype == torch.float32 else (x.numel() // blocksize) * blocksize
    qd, qb = q_d.flatten()[:n_cmp].long(), q_b.flatten()[:n_cmp].long()
    differ = (qd != qb).nonzero().flatten()
    assert n_cmp == 0 or int((qd - qb).abs().max()) <= 1
    xn = x.flatten()[:n_cmp].float() * torch.reciprocal(st.absmax).repeat_interleave(blocksize)[:n_cmp]
    lo, hi = torch.minimum(qd, qb)[differ], torch.maximum(qd, qb)[differ]
    eff = st.code  # the effective code (code[0] = -1 for fp32 in bnb)
    mid = (eff[lo] + eff[hi]) * 0.5
    near = (xn[differ] - mid).abs() <= 4 * torch.finfo(torch.float32).eps * mid.abs() + 1e-30
    at_code0 = lo == 0  # Q2: the -1 vs -0.99296875 entry moves the first midpoint
    same_value = eff[lo] == eff[hi]  # +0.0 (127) vs -0.0 (128): the even rule sends tiny positives to 128
    ok = near | at_code0 | same_value
    assert bool(ok.all()), f"{int((~ok).sum())} code differences away from a midpoint"


@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_vectorwise_equals_live_bnb(threshold: float, dtype: torch.dtype) -> None:
    A = (_draw(7, (48, 96), torch.float32) * 2).to(dtype)
    q_b, rs_b, oc_b = bnb_F.int8_vectorwise_quant(A.clone(), threshold=threshold)
    q, rs, oc = F.int8_vectorwise_quant(A, threshold=threshold, compat="bnb")
    assert torch.equal(q, q_b)
    assert torch.equal(rs, rs_b)
    if threshold == 0.0:
        assert oc is None and oc_b is None
    else:
        assert torch.equal(oc, oc_b)


@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_matmul_and_dequant_equal_live_bnb(with_bias: bool) -> None:
    g = torch.Generator().manual_seed(11)
    A = (torch.randn(40, 256, generator=g) * 3).half()
    W = torch.randn(24, 256, generator=g).half()
    bias = torch.randn(24, generator=g).half() if with_bias else None
    CA, SCA, _ = bnb_F.int8_vectorwise_quant(A.clone())
    CB, SCB, _ = bnb_F.int8_vectorwise_quant(W.clone())
    acc_b = bnb_F.int8_linear_matmul(CA, CB)
    acc = F.int8_linear_matmul(CA, CB)
    assert acc.dtype == torch.int32 and torch.equal(acc, acc_b)
    y_b = bnb_F.int8_mm_dequant(acc_b, SCA, SCB, bias=bias)
    y = F.int8_mm_dequant(acc, SCA, SCB, bias=bias, compat="bnb")
    assert y.dtype == y_b.dtype
    assert torch.equal(y, y_b)


def test_fp16_dequant_rounding_equals_live_bnb_in_subnormal_range() -> None:
    """bnb's C++ fp16 output rounds half away from zero, also on the fp16 subnormal grid (SPEC §4.3)."""
    from bitsandbytes.functional import QuantState as BnbState

    code = F.get_codebook("linear")
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (16 * 4096,), generator=g, dtype=torch.uint8)
    absmax = torch.rand(16, generator=g) * 2.0**-12  # products span fp16 subnormals and tiny normals
    y_b = bnb_F.dequantize_blockwise(q, BnbState(absmax=absmax, code=code.clone(), blocksize=4096, dtype=torch.float16))
    y = F.dequantize_blockwise(q, F.QuantState(absmax=absmax, code=code, blocksize=4096, dtype=torch.float16,
                                               compat="bnb"))
    assert torch.equal(y.float().view(torch.int32), y_b.float().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_vectorwise_tiny_rows_equal_live_bnb(dtype: torch.dtype) -> None:
    """A row whose absmax is below 127/FLT_MAX (subnormal activations) has scale 127/absmax = Inf: bnb's
    ``round(A·Inf).to(int8)`` is 0 on x86, where compat="bnb" saturated to ±127 (QA finding 3). fp16 cannot hold
    such a value. The default mode keeps saturating (README, numeric limits kept on purpose)."""
    A = _draw(12, (16, 40), torch.float32)
    g = torch.Generator().manual_seed(13)
    A[::3] = torch.randn(6, 40, generator=g) * 1e-39  # subnormal float32 rows, some in bf16 too
    A[7] = torch.randn(40, generator=g) * 2e-37      # normal, still below 127/FLT_MAX ≈ 3.7e-37
    A = A.to(dtype)
    q_b, rs_b, _ = bnb_F.int8_vectorwise_quant(A.clone())
    q, rs, _ = F.int8_vectorwise_quant(A, compat="bnb")
    assert torch.equal(rs, rs_b)
    assert torch.equal(q, q_b)
    assert not q[::3].any()  # what bnb gives: all zero
    assert F.int8_vectorwise_quant(A)[0][::3].abs().max() == 127


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_float32_state_equals_live_bnb(shape) -> None:
    """bnb's fp32 kernel never runs on an empty input, so it leaves code[0] as it is (no Q2 write), and the nested
    offset is the mean of no absmax, NaN; compat="bnb" wrote code[0] = -1 and offset 0 (QA finding 10)."""
    code = F.get_codebook("dynamic")
    A = torch.empty(shape)
    _, st_b = bnb_F.quantize_blockwise(A, code=code.clone(), blocksize=64, nested=True)
    _, st = F.quantize_blockwise(A, code=code, blocksize=64, nested=True, compat="bnb")
    assert torch.equal(st.code, st_b.code) and st.code[0] == code[0]
    assert bool(st_b.offset.isnan()) and bool(st.offset.isnan()) and st.offset.shape == st_b.offset.shape
    assert F.quantize_blockwise(A, code=code, blocksize=64, nested=True)[1].offset == 0  # default: a finite offset
