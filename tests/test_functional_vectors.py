"""fp8probe.functional against the bitsandbytes 0.49.2 CPU reference vectors (shared/vectors).

compat="bnb" must reproduce every recorded tensor bit for bit. The default mode follows
fp8probe's own rules (docs/architecture.md), so it is compared with the vectors only where the
rules coincide, and every difference must be one the rules explain:

* bnb's CPU paths break exact midpoints towards the lower index, fp8probe towards the even index
  (SPEC §2.1/§2.3/§2.4) — a code may differ where the normalised value is exactly a decision
  midpoint (none for these fp32 inputs; a few for the coarse bf16 inputs).
* fp16/bf16 inputs: bnb scales the partial last block through a 0-dim tensor, so torch's type
  promotion rounds the normalised value to fp16/bf16 before the search; fp8probe keeps fp32. Codes
  may therefore differ by one index inside the partial last block only.
* int8_mm_dequant: bnb CPU multiplies by the mistyped 6.200124e-05; fp8probe by fl32(1/127²),
  so the fp16 results may differ by at most one fp16 ulp.
"""
from __future__ import annotations

import pytest
import torch
from support import vectors_file

import fp8probe.functional as F
from fp8probe.formats import get_codebook

CODES = {"e4m3": "bnb-e4m3", "dynamic": "dynamic"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CASES = [f"{c}/{d}/{s}/bs{b}" for c in CODES for d in DTYPES for s in ("1000", "7x300", "2x3x130")
         for b in (64, 256, 4096)]


@pytest.fixture(scope="module")
def bw() -> dict:
    return torch.load(vectors_file("blockwise_cpu.pt"), weights_only=True)


@pytest.fixture(scope="module")
def i8() -> dict:
    return torch.load(vectors_file("int8_vectorwise_cpu.pt"), weights_only=True)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality except that any NaN equals any NaN (so -0.0 != +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    return torch.equal(a[~nan].contiguous().view(view), b[~nan].contiguous().view(view))


def _case(bw: dict, key: str, device: str):
    cn, dn, shape, bs = key.split("/")
    x = bw["inputs"][f"{dn}/{shape}"].to(device)
    return bw["cases"][key], x, get_codebook(CODES[cn], device), int(bs[2:])


@pytest.mark.parametrize("key", CASES)
def test_blockwise_compat_bnb_bit_exact(bw: dict, key: str, device: str) -> None:
    ref, x, code, bs = _case(bw, key, device)
    q, st = F.quantize_blockwise(x, code, blocksize=bs, compat="bnb")
    assert torch.equal(q.cpu(), ref["q"])
    assert _same_bits(st.absmax.cpu(), ref["absmax"])
    assert _same_bits(st.code.cpu(), ref["state_code"])  # includes bnb's code[0] = -1 for fp32 (Q2)
    y = F.dequantize_blockwise(q, st)
    assert y.dtype == x.dtype
    assert _same_bits(y.cpu(), ref["deq"])  # fp16 output rounds half away from zero like bnb's C++


def test_fp16_half_away_rounding_accounts_for_exactly_63_elements(bw: dict) -> None:
    """vectors/README: RNE dequantisation differs from bnb's fp16 output in exactly 63 elements."""
    total = 0
    for key in CASES:
        ref, x, code, bs = _case(bw, key, "cpu")
        if x.dtype != torch.float16:
            continue
        n = x.numel()
        y32 = ref["state_code"][ref["q"].reshape(-1).long()]
        y32 = torch.nn.functional.pad(y32, (0, -n % bs)).view(-1, bs) * ref["absmax"][:, None]
        rne = y32.reshape(-1)[:n].half().reshape(x.shape)
        differs = rne != ref["deq"]
        assert not differs.any() or key.startswith("dynamic/"), key
        total += int(differs.sum())
    assert total == 63


@pytest.mark.parametrize("key", CASES)
def test_blockwise_default_differs_only_where_rules_differ(bw: dict, key: str, device: str) -> None:
    ref, x, code, bs = _case(bw, key, device)
    q, st = F.quantize_blockwise(x, code, blocksize=bs)
    assert _same_bits(st.absmax.cpu(), ref["absmax"])  # finite inputs: same absmax in both modes
    assert st.special_index.numel() == 0
    q, ref_q = q.cpu().reshape(-1).long(), ref["q"].reshape(-1).long()
    diff = (q != ref_q).nonzero().reshape(-1)
    assert int((q - ref_q).abs().max()) <= 1
    n = x.numel()
    if x.dtype != torch.float32 and n % bs:
        diff = diff[diff < (n // bs) * bs]  # the partial last block may differ by one index anyway
    xn = x.cpu().reshape(-1).float()[diff] * (1.0 / st.absmax.cpu())[diff // bs]
    lo = torch.minimum(q[diff], ref_q[diff])
    c = get_codebook(CODES[key.split("/")[0]])
    mids = (c[lo] + c[lo + 1]) * 0.5
    assert torch.equal(xn, mids), f"{diff.numel()} codes differ away from exact midpoints"
    # the dequantised values agree wherever the codes agree
    y = F.dequantize_blockwise(q.to(torch.uint8).reshape(x.shape).to(device), st).cpu()
    same = (q == ref_q).reshape(x.shape)
    if x.dtype == torch.float32:
        same &= (ref_q != 0).reshape(x.shape)  # bnb's effective code[0] is -1 for fp32 (Q2)
    if x.dtype != torch.float16:  # bnb's fp16 output rounds half away from zero
        assert _same_bits(y[same], ref["deq"][same])


def test_nested_absmax_compat_bnb(bw: dict, device: str) -> None:
    ref = bw["nested_e4m3_float32_7x300_bs64"]
    x = bw["inputs"]["float32/7x300"].to(device)
    q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64, nested=True, compat="bnb")
    assert st.nested and st.state2.blocksize == ref["blocksize2"]
    assert torch.equal(q.cpu(), ref["q"])
    assert torch.equal(st.absmax.cpu(), ref["qabsmax"])
    assert _same_bits(st.offset.cpu(), ref["offset"])
    assert _same_bits(st.state2.absmax.cpu(), ref["absmax2"])
    assert _same_bits(st.state2.code.cpu(), ref["code2"])
    assert _same_bits(F.dequantize_blockwise(q, st).cpu(), ref["deq"])


def test_nested_absmax_default_close_to_plain(bw: dict, device: str) -> None:
    x = bw["inputs"]["float32/7x300"].to(device)
    q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64, nested=True)
    q0, st0 = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
    assert torch.equal(q, q0)  # nesting changes only how absmax is stored
    y, y0 = F.dequantize_blockwise(q, st), F.dequantize_blockwise(q0, st0)
    # the re-quantised (centred) absmax is off by at most ~1 % of its spread
    assert float((y - y0).abs().max()) <= 0.02 * float(x.abs().max())


EDGE = ["zeros", "nan", "pos_inf", "signed_zero"]


@pytest.mark.parametrize("case", EDGE)
@pytest.mark.parametrize("dn", ["float32", "float16"])
def test_edge_cases_compat_bnb(bw: dict, case: str, dn: str, device: str) -> None:
    ref = bw["edge_e4m3_bs64"][f"{case}/{dn}"]
    x = ref["x"].to(device)
    q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64, compat="bnb")
    assert torch.equal(q.cpu(), ref["q"])
    assert _same_bits(st.absmax.cpu(), ref["absmax"])
    assert _same_bits(F.dequantize_blockwise(q, st).cpu(), ref["deq"])


@pytest.mark.parametrize("dn", ["float32", "float16"])
def test_edge_cases_default(bw: dict, dn: str, device: str) -> None:
    edges = bw["edge_e4m3_bs64"]
    # all-zero block: zero code (127, +0.0), absmax 0, dequantised +0.0 (Q7)
    x = edges[f"zeros/{dn}"]["x"].to(device)
    q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
    assert q.eq(127).all() and st.absmax.item() == 0.0
    assert _same_bits(F.dequantize_blockwise(q, st).cpu(), torch.zeros(8, dtype=x.dtype))
    # NaN / +Inf: excluded from absmax, recorded, restored on dequantisation (Q6)
    for case, bad in (("nan", float("nan")), ("pos_inf", float("inf"))):
        x = edges[f"{case}/{dn}"]["x"].to(device)
        q, st = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
        assert st.absmax.item() == 1.0
        assert st.special_index.tolist() == [1]
        y = F.dequantize_blockwise(q, st).cpu()
        assert _same_bits(y[1:2], torch.tensor([bad], dtype=x.dtype))
        finite = torch.tensor([True, False, True, True, True, True, True, True])
        # away from the special, the codes are those of bnb's fp32 kernel on the NaN input
        # (absmax 1 either way), except that both zeros take the +0.0 code
        assert torch.equal(q.cpu()[finite], edges["nan/float32"]["q"][finite])
        code = get_codebook("bnb-e4m3")
        assert _same_bits(y[finite], code[q.cpu()[finite].long()].to(x.dtype))
    x = edges[f"signed_zero/{dn}"]["x"].to(device)
    q, _ = F.quantize_blockwise(x, "bnb-e4m3", blocksize=64)
    assert torch.equal(q.cpu(), edges[f"signed_zero/{dn}"]["q"])


# ------------------------------------------------------------------ LLM.int8()
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("compat", [None, "bnb"])
def test_int8_vectorwise_quant_vectors(i8: dict, threshold: float, compat: str | None, device: str) -> None:
    ref = i8[f"A_th{threshold}"]
    A = i8["A"].to(device)
    A_before = A.clone()
    q, rs, cols = F.int8_vectorwise_quant(A, threshold, compat=compat)
    assert torch.equal(A, A_before)  # bnb writes into A temporarily (Q13); we never do
    assert torch.equal(q.cpu(), ref["q"])
    assert torch.equal(rs.cpu(), ref["row_stats"])
    if threshold == 0.0:
        assert cols is None and ref["outlier_cols"] is None
    else:
        assert torch.equal(cols.cpu(), ref["outlier_cols"])
        assert 5 in cols.tolist() and 63 not in cols.tolist()  # 6.0 is an outlier (>=), 5.996 is not


def test_int8_weight_and_matmul_vectors(i8: dict, device: str) -> None:
    W = i8["W"].to(device)
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    assert torch.equal(CB.cpu(), i8["W_th0.0"]["q"]) and torch.equal(SCB.cpu(), i8["W_th0.0"]["row_stats"])
    CA, SCA, _ = F.int8_vectorwise_quant(i8["A"].to(device))
    acc = F.int8_linear_matmul(CA, CB)
    assert acc.dtype == torch.int32 and torch.equal(acc.cpu(), i8["mm"]["int32"])
    bias = i8["bias"].to(device)
    assert _same_bits(F.int8_mm_dequant(acc, SCA, SCB, compat="bnb").cpu(), i8["mm"]["dequant_fp16"])
    assert _same_bits(F.int8_mm_dequant(acc, SCA, SCB, bias=bias, compat="bnb").cpu(), i8["mm"]["dequant_fp16_bias"])
    for got, want in ((F.int8_mm_dequant(acc, SCA, SCB), i8["mm"]["dequant_fp16"]),
                      (F.int8_mm_dequant(acc, SCA, SCB, bias=bias), i8["mm"]["dequant_fp16_bias"])):
        ulps = (got.cpu().view(torch.int16).int() - want.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1  # 1/127² vs the 6.200124e-05 typo: +1.8e-5 relative


def test_int8_zero_row_gives_zero_codes(i8: dict, device: str) -> None:
    ref = i8["zero_row_platform_dependent"]
    q, rs, _ = F.int8_vectorwise_quant(ref["A"].to(device))
    assert q[1].eq(0).all() and rs[1].item() == 0.0  # defined as 0 here, UB in bnb's C++ (README)
    assert torch.equal(q.cpu()[0], ref["q"][0])
