"""bitsandbytes 0.49.2 calling conventions the core API accepts (issue 14): int8 weights as B, `out=` of
int8_linear_matmul, every codebook bnb builds, int8 weight storage of Linear8bitLt.

Comparisons with live bitsandbytes run only where it is importable (the `test` extra installs it).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fp8probe as P
import fp8probe.functional as F

warnings.filterwarnings("ignore", module="bitsandbytes")


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _int8_state(out_f: int, in_f: int, seed: int) -> P.MatmulLtState:
    g = torch.Generator().manual_seed(seed)
    s = P.MatmulLtState(has_fp16_weights=False)
    s.CB, s.SCB, _ = P.int8_vectorwise_quant(torch.randn(out_f, in_f, generator=g).half())
    return s


# ------------------------------------------------------------------ item 1: int8 B
@pytest.mark.parametrize("fn", [P.matmul, P.switchback_bnb], ids=["matmul", "switchback_bnb"])
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_int8_weight_as_B_equals_float_weight_path(fn, threshold: float) -> None:
    g = torch.Generator().manual_seed(3)
    s = _int8_state(48, 32, 1)
    s.threshold = threshold
    A = torch.randn(2, 4, 32, generator=g)
    y = fn(A, s.CB, state=s)
    # the same int8 weight reached from its float source: identical result
    s_ref = P.MatmulLtState(has_fp16_weights=False, threshold=threshold, CB=s.CB, SCB=s.SCB)
    w = P.int8_vectorwise_dequant(s.CB, s.SCB)
    y_ref = fn(A, w, state=s_ref)
    assert y.shape == (2, 4, 48)
    assert torch.equal(y, y_ref)


@pytest.mark.parametrize("threshold", [0.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_int8_weight_as_B_equals_live_bnb(threshold: float, dtype: torch.dtype) -> None:
    bnb = _bnb()
    s = _int8_state(48, 32, 2)
    s.threshold, s.is_training = threshold, False
    sb = bnb.MatmulLtState()
    sb.has_fp16_weights, sb.CB, sb.SCB, sb.threshold, sb.is_training = False, s.CB, s.SCB, threshold, False
    A = (torch.randn(6, 32, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    assert torch.equal(P.matmul(A, s.CB, state=s, compat="bnb"), bnb.matmul(A, sb.CB, state=sb))


def test_int8_weight_as_B_errors() -> None:
    CB = _int8_state(8, 16, 0).CB
    with pytest.raises(ValueError, match=r"state.SCB, its float32 row scales of shape \[8\], got NoneType"):
        P.matmul(torch.randn(2, 16), CB, state=P.MatmulLtState(has_fp16_weights=False))
    with pytest.raises(TypeError, match="has_fp16_weights=False and SCB set; got has_fp16_weights=True"):
        P.matmul(torch.randn(2, 16), CB)
    with pytest.raises(ValueError, match=r"must equal B.shape\[1\]"):
        P.matmul(torch.randn(2, 15), CB, state=_int8_state(8, 16, 0))


def test_int8_weight_as_B_gives_input_gradient() -> None:
    s = _int8_state(8, 16, 4)
    A = torch.randn(3, 16, requires_grad=True)
    P.matmul(A, s.CB, state=s).sum().backward()
    w = P.int8_vectorwise_dequant(s.CB, s.SCB)
    assert torch.equal(A.grad, torch.ones(3, 8) @ w)


# ------------------------------------------------------------------ item 5: int8_linear_matmul(out=, dtype=)
def test_int8_linear_matmul_out_and_dtype() -> None:
    g = torch.Generator().manual_seed(9)
    A = torch.randint(-127, 128, (5, 24), generator=g, dtype=torch.int8)
    B = torch.randint(-127, 128, (7, 24), generator=g, dtype=torch.int8)
    out = torch.full((5, 7), 123, dtype=torch.int32)
    got = F.int8_linear_matmul(A, B, out, dtype=torch.int32)
    assert got is out
    assert torch.equal(out, (A.long() @ B.long().T).int())
    with pytest.raises(TypeError, match="dtype must be torch.int32, got torch.float32"):
        F.int8_linear_matmul(A, B, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"out must be a torch.int32 tensor of shape \(5, 7\), got \(5, 6\)"):
        F.int8_linear_matmul(A, B, out=torch.empty(5, 6, dtype=torch.int32))


# ------------------------------------------------------------------ item 2: create_dynamic_map grid
def test_create_dynamic_map_equals_live_bnb_on_every_accepted_combination() -> None:
    bnb_F = _bnb().functional
    accepted = 0
    for signed in (True, False):
        for total_bits in range(1, 10):
            for e in range(0, 13):
                try:
                    ref = bnb_F.create_dynamic_map(signed, e, total_bits)
                except (AssertionError, NameError):  # bnb's length assert / unbound loop variable
                    with pytest.raises(ValueError, match=r"expected 2\*\*total_bits|must be >= 1"):
                        F.create_dynamic_map(signed, e, total_bits)
                    continue
                ours = F.create_dynamic_map(signed, e, total_bits)
                assert torch.equal(ours.view(torch.int32), ref.view(torch.int32)), (signed, e, total_bits)
                accepted += 1
    assert accepted > 100  # e.g. (True, 8, 8) and (True, 12, 8), which fp8probe used to reject


def test_create_dynamic_map_8_exponent_bits_has_256_distinct_values() -> None:
    code = F.create_dynamic_map(True, 8, 8)
    assert code.unique().numel() == 256
    q, st = F.quantize_blockwise(torch.randn(300, generator=torch.Generator().manual_seed(0)), code, blocksize=64)
    assert F.dequantize_blockwise(q, st).shape == (300,)


# ------------------------------------------------------------------ item 3: unsorted few-bit linear maps
@pytest.mark.parametrize("bits", [3, 4, 5, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_unsorted_linear_map_quantises_like_live_bnb(bits: int, dtype: torch.dtype) -> None:
    bnb_F = _bnb().functional
    code = F.create_linear_map(True, total_bits=bits)
    assert not bool((code[1:] >= code[:-1]).all())  # bnb's own map is unsorted
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(bits)) * 3).to(dtype)
    q_b, st_b = bnb_F.quantize_blockwise(x, code=code.clone(), blocksize=64)
    q, st = F.quantize_blockwise(x, code=code, blocksize=64, compat="bnb")
    assert torch.equal(q, q_b)
    assert torch.equal(F.dequantize_blockwise(q, st), bnb_F.dequantize_blockwise(q_b, st_b))


@pytest.mark.parametrize("bits", [3, 5])
def test_unsorted_codebook_default_mode_picks_a_nearest_entry(bits: int) -> None:
    code = F.create_linear_map(True, total_bits=bits)
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(1))
    out = torch.empty(x.shape, dtype=torch.uint8)
    q, st = F.quantize_blockwise(x, code=code, blocksize=100, out=out)
    assert q is out
    xn = x.reshape(-1, 100) / st.absmax[:, None]
    best = (xn.reshape(-1, 1) - code[None, :]).abs().min(dim=1).values
    got = (xn.reshape(-1) - code[q.reshape(-1).long()]).abs()
    assert torch.equal(got, best)
    # the global quantiser takes it too, and dequantisation uses the codebook as given
    qg, stg = F.quantize(x, code=code)
    assert torch.equal(F.dequantize(qg, stg), code[qg.long()] * stg.absmax)


# ------------------------------------------------------------------ item 6: int8 weight storage
def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("cls", [P.Linear8bitLt, P.SwitchBackLinear])
def test_int8_layer_stores_one_byte_per_weight(cls) -> None:
    layer = cls(64, 48, bias=False, has_fp16_weights=False)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert layer.SCB.dtype == torch.float32 and layer.SCB.shape == (48,)
    assert _bytes(layer) == 64 * 48 + 4 * 48
    sd = layer.state_dict()
    assert set(sd) == {"weight", "SCB", "weight_format"} and sd["weight"].dtype == torch.int8
    assert sd["weight_format"].dtype == torch.uint8 and int(sd["weight_format"]) == 0


@pytest.mark.parametrize("compat", [None, "bnb"])
@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_int8_state_dict_round_trips_bit_for_bit(compat, threshold: float) -> None:
    import io

    torch.manual_seed(0)
    layer = P.Linear8bitLt(40, 24, has_fp16_weights=False, threshold=threshold, compat=compat).eval()
    x = torch.randn(5, 40) * 2
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = P.Linear8bitLt(40, 24, has_fp16_weights=False, threshold=threshold, compat=compat).eval()
    assert not torch.equal(fresh(x), y)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x), y)
    assert torch.equal(fresh.weight, layer.weight) and torch.equal(fresh.SCB, layer.SCB)


def test_int8_layer_to_dtype_and_device_keeps_codes_and_scales() -> None:
    layer = P.Linear8bitLt(16, 8, has_fp16_weights=False)
    codes, scales = layer.weight.clone(), layer.SCB.clone()
    layer.half()
    layer.to("cpu", torch.bfloat16)
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    assert torch.equal(layer.weight, codes) and torch.equal(layer.SCB, scales)
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(3, 16).to(torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    meta = P.Linear8bitLt(16, 8, has_fp16_weights=False).to("meta")
    assert meta.weight.device.type == "meta" and meta.SCB.device.type == "meta" and meta.SCB.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_layer_to_cuda_moves_codes_and_scales() -> None:
    layer = P.Linear8bitLt(16, 8, has_fp16_weights=False).eval()
    x = torch.randn(3, 16)
    y = layer(x)
    layer.to("cuda")
    assert layer.weight.device.type == "cuda" and layer.SCB.device.type == "cuda"
    torch.testing.assert_close(layer(x.cuda()).cpu(), y, rtol=0, atol=0)


def test_float_checkpoint_is_quantised_on_load_and_int8_checkpoint_needs_int8_layer() -> None:
    lin = torch.nn.Linear(24, 12)
    layer = P.Linear8bitLt(24, 12, has_fp16_weights=False)
    layer.load_state_dict(lin.state_dict())
    CB, SCB, _ = F.int8_vectorwise_quant(lin.weight.detach())
    assert torch.equal(layer.weight, CB) and torch.equal(layer.SCB, SCB)
    x = torch.randn(4, 24)
    assert torch.equal(layer(x), P.matmul(x, lin.weight.detach(), bias=lin.bias.detach()))
    with pytest.raises(RuntimeError, match="needs has_fp16_weights=False"):
        P.Linear8bitLt(24, 12).load_state_dict(layer.state_dict())
    bad = layer.state_dict()
    bad["weight_format"] = torch.tensor(1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"weight_format: expected 0 \(row-major int8\), got 1"):
        P.Linear8bitLt(24, 12, has_fp16_weights=False).load_state_dict(bad)


@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_int8_checkpoints_load_both_ways_with_live_bnb(threshold: float) -> None:
    bnb = _bnb()
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 16)
    ref = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu").eval()  # bnb quantises on the move to a device
    x = torch.randn(6, 32) * 2
    y_ref = ref(x)
    ours = P.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=threshold, compat="bnb").eval()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours(x), y_ref)
    # fp8probe's checkpoint of the same float weights loads into bitsandbytes (after its .to())
    mine = P.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=threshold, compat="bnb").eval()
    mine.load_state_dict(lin.state_dict())
    back = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False, threshold=threshold).to("cpu").eval()
    back.load_state_dict(mine.state_dict())
    assert torch.equal(back(x), y_ref)


# ------------------------------------------------------------------ item 4: torch.compile(fullgraph=True)
@pytest.mark.parametrize("cls,threshold,bias,fp16_weights,backend", [
    (P.Linear8bitLt, 0.0, False, True, "aot_eager"),
    (P.Linear8bitLt, 6.0, True, False, "aot_eager"),
    (P.Linear8bitLt, 6.0, True, True, "inductor"),
    (P.SwitchBackLinear, 6.0, True, True, "aot_eager"),
], ids=["int8-t0", "int8-t6-int8weights", "int8-t6-inductor", "switchback-t6"])
def test_int8_layers_compile_fullgraph(cls, threshold: float, bias: bool, fp16_weights: bool, backend: str) -> None:
    """One graph for every input: no guard on the data-dependent outlier count, no dropped
    unbacked sizes, no storage-pointer cache key, no saved view of an input; outputs and
    gradients equal eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cls(32, 16, bias=bias, threshold=threshold, has_fp16_weights=fp16_weights).train()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    for n_outliers in (0, 3):  # the same graph with no and with three outlier columns
        x = torch.randn(4, 32, generator=g)
        x[:, :n_outliers] = 9.0
        grads = []
        for fn in (compiled, layer):
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.square().sum().backward()
            grads.append((y.detach(), xi.grad, None if layer.weight.grad is None else layer.weight.grad.clone()))
            layer.weight.grad = None
        (y_c, dx_c, dw_c), (y_e, dx_e, dw_e) = grads
        assert torch.equal(y_c, y_e) and torch.equal(dx_c, dx_e)
        assert (dw_c is None) == (not fp16_weights) and (dw_c is None or torch.equal(dw_c, dw_e))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threshold", [0.0, 2.5, 6.0])
def test_eval_mode_input_gradient_equals_live_bnb_bit_for_bit(dtype: torch.dtype, threshold: float) -> None:
    """compat="bnb" grad_A in float32 was 1 ulp off on 15-50 % of its elements: bnb dequantises the weight as
    CB · fl32(SCB · fl32(1/127)), not (CB · SCB) · fl32(1/127)."""
    bnb = _bnb()
    g = torch.Generator().manual_seed(17)
    A, W = torch.randn(2, 5, 33, generator=g).to(dtype), (torch.randn(7, 33, generator=g) * 0.5).to(dtype)
    grads = []
    for matmul, state in ((bnb.matmul, bnb.MatmulLtState()), (P.matmul, P.MatmulLtState())):
        state.is_training, state.threshold = False, threshold
        a = A.clone().requires_grad_()
        kwargs = {"compat": "bnb"} if matmul is P.matmul else {}
        matmul(a, W.clone(), state=state, threshold=threshold, **kwargs).float().square().sum().backward()
        grads.append(a.grad)
    assert grads[0].dtype == grads[1].dtype == dtype and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_nested_quantisation_with_the_default_code_equals_live_bnb(dtype: torch.dtype) -> None:
    """bnb's nested absmax quantisation (a float32 CPU call on its cached default map) sets that map's code[0] to -1
    after float16/bfloat16 data were quantised with -0.99296875, and the state holds the map: bnb dequantises with
    -1 (29 of 2800 values differed). With an explicit code nothing of the caller's changes."""
    bnb = _bnb()
    BF = bnb.functional
    X = torch.randn(40, 70, generator=torch.Generator().manual_seed(18)).to(dtype)
    BF.name2qmap.clear()  # (Q2: bnb's cache keeps an earlier call's code[0] = -1)
    qa, sa = BF.quantize_blockwise(X.clone(), blocksize=64, nested=True)
    qb, sb = F.quantize_blockwise(X.clone(), blocksize=64, nested=True, compat="bnb")
    assert torch.equal(qa, qb) and torch.equal(sa.code, sb.code) and float(sb.code[0]) == -1.0
    assert torch.equal(BF.dequantize_blockwise(qa, sa), F.dequantize_blockwise(qb, sb))
    if dtype != torch.float32:  # an explicit code: the state holds it as it was (float32: Q2's code[0] = -1 anyway)
        mine = F.create_dynamic_map()
        _, s_mine = F.quantize_blockwise(X, code=mine, blocksize=64, nested=True, compat="bnb")
        assert torch.equal(s_mine.code, mine)


def test_create_linear_map_equals_live_bnb_on_every_combination() -> None:
    """A signed map of fewer than 8 bits with add_zero=False had 2**bits points; bnb builds 2**bits - 1 whatever
    add_zero says (for 1 bit its unsorted map: 255 zeros, then -1)."""
    bnb = _bnb()
    for signed in (True, False):
        for bits in range(1, 9):
            for add_zero in (True, False):
                want = bnb.functional.create_linear_map(signed, bits, add_zero).float()
                assert torch.equal(F.create_linear_map(signed, bits, add_zero), want), (signed, bits, add_zero)
