"""The bitsandbytes drop-in (fp8probe/compat/bitsandbytes): scripts in bitsandbytes 0.49.2's calling
conventions run with one import line changed, bit for bit with live bitsandbytes where it runs on CPU.

Each script below is plain bitsandbytes code. `_run` executes it as written (live bitsandbytes) or
with its one `import bitsandbytes as bnb` line replaced by `import fp8probe.compat.bitsandbytes as bnb`.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fp8probe as P
import fp8probe.compat.bitsandbytes as fbnb

warnings.filterwarnings("ignore", module="bitsandbytes")
BNB_IMPORT = "import bitsandbytes as bnb"
DROP_IN = "import fp8probe.compat.bitsandbytes as bnb"


@pytest.fixture(autouse=True)
def _default_mode():
    """Every test starts in fp8probe's mode, whatever an earlier test or FP8PROBE_COMPAT selected."""
    fbnb.set_compat(None)
    yield
    fbnb.set_compat(None)


@pytest.fixture(params=[None, "bnb"], ids=["fp8probe", "compat-bnb"])
def mode(request):
    fbnb.set_compat(request.param)
    yield request.param
    fbnb.set_compat(None)


def _run(script: str, drop_in: bool) -> dict:
    assert script.count(BNB_IMPORT) == 1
    src = script.replace(BNB_IMPORT, DROP_IN) if drop_in else script
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(src, "<bnb script>", "exec"), scope)
    return scope["results"]


def _assert_same(ours: dict, ref: dict) -> None:
    assert ours.keys() == ref.keys()
    for key, want in ref.items():
        got = ours[key]
        if want is None or isinstance(want, (int, float, str)):
            assert got == want, key
            continue
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got.view(torch.uint8) if got.is_floating_point() else got,
                           want.view(torch.uint8) if want.is_floating_point() else want), key


# Functional API as bitsandbytes users call it on CPU. Codebooks are built fresh for every call:
# bnb's fp32 CPU kernel writes code[0] = -1 into the caller's codebook (SPEC Q2).
FUNCTIONAL_SCRIPT = '''
import torch
import bitsandbytes as bnb

F = bnb.functional
g = torch.Generator().manual_seed(11)
x = torch.randn(40, 100, generator=g) * torch.exp(torch.randn(40, 1, generator=g))
results = {}
books = {
    "dynamic": lambda: F.create_dynamic_map(),
    "dynamic8": lambda: F.create_dynamic_map(True, 8, 8),
    "e4m3": lambda: F.create_fp8_map(True, 4, 3, 8),
    "linear3": lambda: F.create_linear_map(True, total_bits=3),
}
for name, book in books.items():
    results["code " + name] = book()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, state = F.quantize_blockwise(x.to(dtype), code=book(), blocksize=256)
        results[f"q {name} {dtype}"] = q
        results[f"y {name} {dtype}"] = F.dequantize_blockwise(A=q, quant_state=state)
        q2, state2 = F.quantize_blockwise(x.to(dtype), code=book(), blocksize=64, nested=True)
        results[f"nested {name} {dtype}"] = F.dequantize_blockwise(q2, state2)
        results[f"loose {name} {dtype}"] = F.dequantize_blockwise(q, absmax=state.absmax, code=state.code,
                                                                  blocksize=256)

h = (x[:, :96] * 2).half()
CA, SCA, cols = F.int8_vectorwise_quant(h, threshold=4.0)
results.update({"CA": CA, "SCA": SCA, "cols": cols})
results["dequant A"] = F.int8_vectorwise_dequant(A=CA, stats=SCA)
CB, SCB, none_cols = F.int8_vectorwise_quant(torch.randn(24, 96, generator=g).half())
results["no cols"] = none_cols
C = F.int8_linear_matmul(CA, CB)
buf = torch.zeros_like(C)
F.int8_linear_matmul(CA, CB, buf)
results.update({"C": C, "C out": buf})
results["mm_dequant"] = F.int8_mm_dequant(C, SCA, SCB, bias=torch.randn(24, generator=g).half())
'''

# LLM.int8() inference as in bitsandbytes' Linear8bitLt docstring, plus bnb.matmul with an int8 state.
INT8_SCRIPT = '''
import torch
import bitsandbytes as bnb

torch.manual_seed(0)
fp16_model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
int8_model = torch.nn.Sequential(
    bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0),
    bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False),
)
int8_model.load_state_dict(fp16_model.state_dict())
int8_model = int8_model.to("cpu")  # bitsandbytes quantises here
int8_model.eval()
g = torch.Generator().manual_seed(1)
x = torch.randn(8, 64, generator=g) * 2
x[:, 5] = 9.0
results = {"y": int8_model(x)}
for key, value in int8_model.state_dict().items():
    results["sd " + key] = value
results["y half"] = int8_model(x.half())
results["bias dtype"] = str(int8_model[0].bias.dtype)  # bitsandbytes recasts the bias in place

W = torch.randn(48, 64, generator=g)
state = bnb.MatmulLtState()
state.has_fp16_weights = False
state.is_training = False
state.CB, state.SCB, _ = bnb.functional.int8_vectorwise_quant(W.half())
results["matmul int8 B"] = bnb.matmul(x, state.CB, state=state, threshold=6.0)
fresh = bnb.MatmulLtState()
fresh.is_training = False
results["matmul float B"] = bnb.matmul(x.half(), W.half(), state=fresh, bias=torch.ones(48).half())
'''

# Int8Params as code written for bitsandbytes uses it (its Linear8bitLt docstring, Hugging Face's 8-bit loader):
# a float weight quantised by .to(device), a prequantised int8 weight given its SCB, a float Int8Params forwarded
# before any move (bitsandbytes' first forward quantises and keeps it), the module moved after load_state_dict.
INT8PARAMS_SCRIPT = '''
import copy
import torch
import bitsandbytes as bnb

g = torch.Generator().manual_seed(4)
W, b = torch.randn(24, 40, generator=g) * 3, torch.randn(24, generator=g)
x = torch.randn(6, 40, generator=g)
x[:, 7] = 9.0
results = {}
p = bnb.nn.Int8Params(W.half(), requires_grad=False, has_fp16_weights=False)
results["fresh dtype"], results["fresh SCB"] = str(p.dtype), p.SCB
q = p.to("cpu")
results.update({"to is self": q is p, "CB": q.data, "CB attr": q.CB, "SCB": q.SCB})
results["moved again SCB"] = q.to("cpu").SCB
results["deepcopy"] = copy.deepcopy(q).SCB
for name, threshold in (("float", 6.0), ("float t0", 0.0)):
    layer = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False, threshold=threshold)
    results[name + " init type"] = type(layer.weight).__name__
    layer.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False).to("cpu")
    layer.bias = torch.nn.Parameter(b.clone())
    layer.eval()
    results[name + " y"] = layer(x)
    results[name + " y again"] = layer(x)
    for key, value in layer.state_dict().items():
        results[name + " sd " + key] = value
CB, SCB, _ = bnb.functional.int8_vectorwise_quant(W.half())
pre = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False, threshold=6.0)
pre.weight = bnb.nn.Int8Params(CB.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
pre.weight.SCB = SCB.clone()
pre.bias = torch.nn.Parameter(b.clone())
pre.eval()
results["prequantised y"] = pre(x)
late = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False)
late.weight = bnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False)
late.bias = torch.nn.Parameter(b.clone())
late.eval()
results["late y"] = late(x)
results["late weight"] = late.weight.data
plain = torch.nn.Linear(40, 24)
plain.weight.data, plain.bias.data = W.clone(), b.clone()
moved = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False, threshold=6.0)
moved.load_state_dict(plain.state_dict())
moved = moved.to("cpu").eval()
results["moved y"] = moved(x)
results["moved weight"] = moved.weight.data
trained = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=True)
results["fp16 weights type"] = type(trained.weight).__name__
results["fp16 weights grad"] = trained.weight.requires_grad
results["switchback type"] = type(bnb.nn.SwitchBackLinearBnb(40, 24, has_fp16_weights=False).weight).__name__
'''


# The research API (CUDA-only in bitsandbytes 0.49.2: on CPU it raises there) and the calls that
# need its argument conventions: int8_double_quant's positional order, quantize's return pair.
RESEARCH_SCRIPT = '''
import torch
import bitsandbytes as bnb

g = torch.Generator().manual_seed(2)
torch.manual_seed(3)
F = bnb.functional
fw_code = F.create_fp8_map(True, 4, 3, 8)
bw_code = F.create_fp8_map(True, 5, 2, 8)
A = torch.randn(6, 40, generator=g, requires_grad=True)
W = torch.randn(24, 40, generator=g, requires_grad=True)
results = {}
for name, fn in (("mixed", bnb.research.matmul_fp8_mixed), ("global", bnb.research.matmul_fp8_global)):
    out = fn(A, W.t(), fw_code, bw_code)
    out.square().sum().backward()
    results.update({name: out.detach(), name + " dA": A.grad.clone(), name + " dW": W.grad.clone()})
    A.grad = W.grad = None
state = bnb.MatmulLtState()
results["switchback"] = bnb.research.switchback_bnb(A, W, None, state, 1.5).detach()
for cls in (bnb.research.nn.LinearFP8Mixed, bnb.research.nn.LinearFP8Global):
    layer = cls(input_features=40, output_features=24)
    results[cls.__name__] = layer(A).detach()
sb = bnb.nn.SwitchBackLinearBnb(40, 24, has_fp16_weights=True, threshold=1.5)
results["SwitchBackLinearBnb"] = sb(A).detach()
h = (A.detach() * 2).half()
CA, CAt, SCA, SCAt, cols = F.int8_double_quant(h, None, None, None, None, 3.0)
results.update({"CA": CA, "CAt": CAt, "SCA": SCA, "SCAt": SCAt, "cols": cols})
q, (absmax, code) = F.quantize(A.detach())
results.update({"q": q, "absmax": absmax, "code": code})
results["dequantized"] = F.dequantize(q, (absmax, code))
results["dequantized loose"] = F.dequantize(q, absmax=absmax, code=code)
'''


@pytest.mark.parametrize("script", [FUNCTIONAL_SCRIPT, INT8_SCRIPT, INT8PARAMS_SCRIPT],
                         ids=["functional", "int8", "int8params"])
def test_script_equals_live_bitsandbytes_in_compat_mode(script: str) -> None:
    pytest.importorskip("bitsandbytes")
    ref = _run(script, drop_in=False)
    fbnb.set_compat("bnb")
    try:
        ours = _run(script, drop_in=True)
    finally:
        fbnb.set_compat(None)
    if "bias dtype" in ref:
        # Kept difference (docs/architecture.md): bitsandbytes overwrites the bias with the input's
        # dtype on every forward; fp8probe casts a copy per call and leaves the Parameter alone.
        assert (ref.pop("bias dtype"), ours.pop("bias dtype")) == ("torch.float16", "torch.float32")
    _assert_same(ours, ref)


@pytest.mark.parametrize("script", [FUNCTIONAL_SCRIPT, INT8_SCRIPT, INT8PARAMS_SCRIPT, RESEARCH_SCRIPT],
                         ids=["functional", "int8", "int8params", "research"])
def test_script_runs_in_default_mode(script: str) -> None:
    res = _run(script, drop_in=True)
    for key, value in res.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_research_script_equals_fp8probe_api(mode) -> None:
    """The research calls are thin: the same numbers as fp8probe's own API in the selected mode."""
    res = _run(RESEARCH_SCRIPT, drop_in=True)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(6, 40, generator=g)
    W = torch.randn(24, 40, generator=g)
    assert torch.equal(res["mixed"], P.matmul_fp8_mixed(A, W.t(), compat=mode))
    assert torch.equal(res["global"], P.matmul_fp8_global(A, W.t(), compat=mode))
    Ar = A.clone().requires_grad_(True)
    P.matmul_fp8_mixed(Ar, W.t(), compat=mode).square().sum().backward()
    assert torch.equal(res["mixed dA"], Ar.grad)
    assert torch.equal(res["switchback"], P.switchback_bnb(A, W, threshold=1.5, compat=mode))
    q_row, q_col, rs, cs, cols = P.int8_double_quant((A * 2).half(), 3.0, compat=mode)
    assert torch.equal(res["CA"], q_row) and torch.equal(res["CAt"], q_col) and torch.equal(res["SCAt"], cs)
    q, st = P.quantize(A, compat=mode)
    assert torch.equal(res["q"], q)
    assert res["absmax"].shape == () and res["absmax"].dtype == torch.float32  # bnb: abs(A).max()
    assert res["dequantized"].dtype == torch.float32
    assert torch.equal(res["dequantized"], res["dequantized loose"])
    assert torch.equal(res["dequantized"], res["code"][q.long()] * res["absmax"])


def test_signatures_mirror_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    pairs = [(getattr(fbnb.functional, n), getattr(bnb.functional, n)) for n in fbnb.functional.__all__
             if n != "QuantState"]
    pairs += [(getattr(fbnb.research, n), getattr(bnb.research, n))
              for n in ("matmul_fp8_mixed", "matmul_fp8_global", "switchback_bnb")]
    pairs += [(fbnb.matmul, bnb.matmul)]
    pairs += [(getattr(fbnb.research.nn, n).__init__, getattr(bnb.research.nn, n).__init__)
              for n in ("LinearFP8Mixed", "LinearFP8Global")]
    pairs += [(getattr(fbnb.nn, n).__init__, getattr(bnb.nn, n).__init__)
              for n in ("Linear8bitLt", "SwitchBackLinearBnb")]
    pairs += [(getattr(fbnb.nn.Int8Params, n), getattr(bnb.nn.Int8Params, n)) for n in ("__new__", "cpu", "cuda")]
    for ours, theirs in pairs:
        want = [(p.name, p.kind) for p in inspect.signature(theirs).parameters.values()]
        got = [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()]
        assert got == want, ours.__qualname__
    assert fbnb.MatmulLtState is P.MatmulLtState


def test_double_quant_refuses_preallocated_outputs_like_bnb() -> None:
    h = torch.randn(4, 8).half()
    with pytest.raises(ValueError, match="out_row must be None"):
        fbnb.functional.int8_double_quant(h, None, None, None, torch.empty(4, 8, dtype=torch.int8))


def test_mode_is_validated_and_read_from_the_environment() -> None:
    with pytest.raises(ValueError, match="compat mode must be None or 'bnb', got 'cuda'"):
        fbnb.set_compat("cuda")
    code = "import fp8probe.compat.bitsandbytes as b; print(b.get_compat())"
    env = {**os.environ, "FP8PROBE_COMPAT": "bnb"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "bnb", out.stderr
    env["FP8PROBE_COMPAT"] = "cuda"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "FP8PROBE_COMPAT must be 'bnb', 'none' or unset, got 'cuda'" in out.stderr


def test_modules_take_the_mode_at_construction(mode) -> None:
    assert fbnb.nn.Linear8bitLt(8, 4).compat == mode
    assert fbnb.research.nn.LinearFP8Mixed(8, 4).compat == mode
    assert fbnb.nn.SwitchBackLinearBnb(8, 4, memory_efficient_backward=True).state.memory_efficient_backward


def test_autograd_import_paths_of_bitsandbytes_exist_and_take_its_apply_arguments(mode) -> None:
    """bnb.autograd._functions (MatMul8bitLt, MatmulLtState), bnb.research.autograd._functions (get_block_sizes,
    MatMulFP8Mixed/Global, SwitchBackBnb) and bnb.nn.modules were missing from the drop-in (ModuleNotFoundError)."""
    from fp8probe.compat.bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState, matmul
    from fp8probe.compat.bitsandbytes.nn.modules import Linear8bitLt, SwitchBackLinearBnb
    from fp8probe.compat.bitsandbytes.research.autograd._functions import (MatMulFP8Global, MatMulFP8Mixed,
                                                                          SwitchBackBnb, get_block_sizes)

    assert MatmulLtState is P.MatmulLtState and Linear8bitLt is fbnb.nn.Linear8bitLt
    assert SwitchBackLinearBnb is fbnb.nn.SwitchBackLinearBnb and matmul.__module__.endswith("_functions")
    assert get_block_sizes(torch.empty(3, 100), torch.empty(100, 300)) == P.get_block_sizes(100, 300, compat=mode)
    g = torch.Generator().manual_seed(19)
    A, W = torch.randn(5, 40, generator=g), torch.randn(24, 40, generator=g)
    for fn, ours, args in ((MatMulFP8Mixed, P.matmul_fp8_mixed, (None, None, None, -1, -1)),
                           (MatMulFP8Global, P.matmul_fp8_global, ())):
        a = A.clone().requires_grad_()
        y = fn.apply(a, W.t(), *args)  # (bnb apply's own bsz default is 1024; -1 = get_block_sizes)
        y.square().sum().backward()
        a_ref = A.clone().requires_grad_()
        y_ref = ours(a_ref, W.t(), compat=mode)
        y_ref.square().sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(a.grad, a_ref.grad), fn.__name__
    for fn, ours in ((MatMul8bitLt, P.matmul), (SwitchBackBnb, P.switchback_bnb)):
        a, a_ref = A.clone().requires_grad_(), A.clone().requires_grad_()
        y = fn.apply(a, W, None, None, MatmulLtState(threshold=2.0, is_training=False))
        y_ref = ours(a_ref, W, state=MatmulLtState(threshold=2.0, is_training=False), compat=mode)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(a.grad, a_ref.grad), fn.__name__


def test_matmul8bitlt_apply_equals_live_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.autograd._functions import MatMul8bitLt as TheirFn

    from fp8probe.compat.bitsandbytes.autograd._functions import MatMul8bitLt

    fbnb.set_compat("bnb")
    g = torch.Generator().manual_seed(20)
    A, W = torch.randn(5, 33, generator=g).half(), torch.randn(7, 33, generator=g).half()
    outs = []
    for fn, state in ((TheirFn, bnb.MatmulLtState()), (MatMul8bitLt, fbnb.MatmulLtState())):
        state.is_training, state.threshold = False, 2.0
        a = A.clone().requires_grad_()
        y = fn.apply(a, W, None, None, state)
        y.float().sum().backward()
        outs.append((y, a.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dequantize_blockwise_reads_a_state_bitsandbytes_made(nested: bool, dtype: torch.dtype) -> None:
    """After the one-line import switch a state saved by bitsandbytes was refused: "expected a QuantState, got
    QuantState"."""
    bnb = pytest.importorskip("bitsandbytes")
    fbnb.set_compat("bnb")
    bnb.functional.name2qmap.clear()
    X = torch.randn(30, 70, generator=torch.Generator().manual_seed(21)).to(dtype)
    q, state = bnb.functional.quantize_blockwise(X, blocksize=64, nested=nested)
    assert torch.equal(fbnb.functional.dequantize_blockwise(q, state), bnb.functional.dequantize_blockwise(q, state))
    with pytest.raises(TypeError, match="expected fp8probe.functional.QuantState, got bitsandbytes.functional.QuantState"):
        P.dequantize_blockwise(q, state)


def _int8_layer(cls=None, **kwargs):
    layer = (cls or fbnb.nn.Linear8bitLt)(40, 24, has_fp16_weights=False, **kwargs).eval()
    g = torch.Generator().manual_seed(22)
    return layer, torch.randn(24, 40, generator=g), torch.randn(6, 40, generator=g)


@pytest.mark.parametrize("cls", ["Linear8bitLt", "SwitchBackLinearBnb"])
def test_int8_layers_weight_is_int8params_sharing_the_scb_buffer(mode, cls) -> None:
    """The drop-in had no nn.Int8Params: code written for bitsandbytes (isinstance checks, Int8Params(w).to(device)
    assigned as the weight, weight.SCB set by a loader) failed with AttributeError."""
    layer, W, x = _int8_layer(getattr(fbnb.nn, cls))
    w = layer.weight
    assert isinstance(w, fbnb.nn.Int8Params) and isinstance(w, torch.nn.Parameter) and not w.requires_grad
    assert w.SCB is layer.SCB and w.CB.data_ptr() == w.data_ptr() and w.dtype == torch.int8 and not w.has_fp16_weights
    layer.weight = fbnb.nn.Int8Params(W, requires_grad=False, has_fp16_weights=False).to("cpu")
    want = getattr(P, "Linear8bitLt" if cls == "Linear8bitLt" else "SwitchBackLinear")(
        40, 24, has_fp16_weights=False, compat=mode).eval()
    want.load_state_dict({"weight": W, "bias": layer.bias.detach()})
    assert torch.equal(layer(x), want(x))
    assert torch.equal(layer.SCB, want.SCB) and layer.weight.SCB is layer.SCB
    sd = layer.state_dict()
    assert torch.equal(sd["SCB"], want.SCB) and torch.equal(sd["weight"], want.weight)
    # the state dict loads back, and the weight's SCB is then the loaded buffer
    fresh = getattr(fbnb.nn, cls)(40, 24, has_fp16_weights=False).eval()
    fresh.load_state_dict(sd)
    assert fresh.weight.SCB is fresh.SCB and torch.equal(fresh.SCB, want.SCB) and torch.equal(fresh(x), want(x))
    assert isinstance(getattr(fbnb.nn, cls)(40, 24, has_fp16_weights=True).weight, fbnb.nn.Int8Params)


def test_int8params_weight_scb_set_after_a_forward_is_used(mode) -> None:
    layer, W, x = _int8_layer()
    CB, SCB = P.nn.int8_weight_rows(W, mode)
    layer.weight = fbnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
    layer.weight.SCB = SCB
    first = layer(x)
    layer.weight.SCB = SCB * 2  # a loader replacing the scales of a cached layer
    second = layer(x)
    assert torch.equal(layer.SCB, SCB * 2) and not torch.equal(first, second)
    want = P.Linear8bitLt(40, 24, has_fp16_weights=False, compat=mode).eval()
    want.load_state_dict({"weight": CB, "SCB": SCB * 2, "bias": layer.bias.detach()})
    assert torch.equal(second, want(x))


def test_int8params_refuses_an_int8_weight_without_scales_or_with_wrong_ones() -> None:
    """(bitsandbytes quantises the int8 codes again as if they were the float weight: every output ~127x off)."""
    layer, W, x = _int8_layer()
    CB, SCB = P.nn.int8_weight_rows(W)
    layer.weight = fbnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
    with pytest.raises(ValueError, match=r"int8 weight \[24, 40\] has no scales: set layer.weight.SCB"):
        layer(x)
    layer.weight.SCB = SCB[:5]
    with pytest.raises(ValueError, match=r"weight.SCB must have shape \[24\].*got \[5\]"):
        layer(x)


def test_int8params_survives_copies_moves_and_pickling(tmp_path) -> None:
    layer, W, x = _int8_layer(threshold=6.0)
    y = layer(x)
    twin = __import__("copy").deepcopy(layer)
    assert isinstance(twin.weight, fbnb.nn.Int8Params) and twin.weight.SCB is twin.SCB
    assert torch.equal(twin(x), y)
    half = layer.half()  # the int8 weight and float32 scales stay; only the bias follows
    assert half.weight.dtype == torch.int8 and half.weight.SCB is half.SCB and half.SCB.dtype == torch.float32
    torch.save(layer, tmp_path / "layer.pt")
    back = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert isinstance(back.weight, fbnb.nn.Int8Params) and torch.equal(back(x.half()), layer(x.half()))
    meta = fbnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False).to("meta")
    assert meta.weight.is_meta and meta.weight.SCB is meta.SCB
