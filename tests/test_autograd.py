"""Tests of fp8probe.autograd: FP8 mixed/global, SwitchBack and LLM.int8() matmuls against float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from fp8probe import autograd as AG
from fp8probe import functional as F
from fp8probe.formats import INV_127, get_codebook

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max |impl - float64 ref| / max|ref| allowed when both apply the SAME quantisation: what is left
# is the matmul in the input dtype (fp32 accumulation ~1e-6; fp16 output rounding 2^-11; bf16 2^-8)
# plus re-rounding of the fake-quantised operands to the dtype.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.detach().double(), x.detach().double()
    return 10.0 * math.log10(float((ref**2).sum()) / float(((ref - x) ** 2).sum()))


def assert_rel_close(x: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    x, ref = x.detach(), ref.detach()
    err = float((x.double() - ref.double()).abs().max())
    scale = float(ref.double().abs().max())
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel:.1e} * max|ref| {scale:.3e}"


def gen(seed: int, *shape: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# float64 references built from the codes the functional layer produces
# ---------------------------------------------------------------------------------------------
def deq64_blockwise(x: torch.Tensor, code: torch.Tensor, bs: int) -> torch.Tensor:
    """code[q]·absmax[block] in float64 from quantize_blockwise's codes, rounded to x.dtype like the algorithm."""
    q, st = F.quantize_blockwise(x, code, blocksize=bs)
    vals = st.code.double()[q.reshape(-1).long()]
    absmax = st.absmax.double().repeat_interleave(bs)[: x.numel()]
    return (vals * absmax).reshape(x.shape).to(x.dtype).double()


def deq64_global(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    q, st = F.quantize(x.float(), code)
    return (st.code.double()[q.long()] * st.absmax.double().reshape(())).to(x.dtype).double()


def run_fwd_bwd(fn, A, B, G, *args, **kwargs):
    A = A.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    out = fn(A, B, *args, **kwargs)
    out.backward(G)
    return out.detach(), A.grad, B.grad


E4M3 = "bnb-e4m3"
E5M2 = "bnb-e5m2"


# ---------------------------------------------------------------------------------------------
# get_block_sizes (SPEC §7.1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features,expected", [(1, 64), (64, 64), (65, 128), (1000, 1024), (4096, 4096),
                                               (4097, 4096), (20000, 4096)])
def test_get_block_sizes_rule(features: int, expected: int) -> None:
    assert AG.get_block_sizes(features, 3) == (expected, 64)
    A = torch.empty(2, features)
    assert AG.get_block_sizes(A, torch.empty(100, features)) == (expected, 128)  # [out, in] weight
    assert AG.get_block_sizes(A, torch.empty(features, 100)) == (expected, 128)  # [in, out] weight


def test_get_block_sizes_zero_features() -> None:
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        AG.get_block_sizes(0, 8)
    with pytest.raises(ValueError, match="out_features must be >= 1"):
        AG.get_block_sizes(8, 0)
    with pytest.raises(IndexError):  # bnb walks off its size list (Q20)
        AG.get_block_sizes(0, 8, compat="bnb")


# ---------------------------------------------------------------------------------------------
# MatMulFP8Mixed / MatMulFP8Global (SPEC §7.2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(24, 96), (3, 8, 96)])
def test_fp8_mixed_matches_reference(device: str, dtype: torch.dtype, a_shape: tuple) -> None:
    K, N = a_shape[-1], 80
    A = gen(1, *a_shape, dtype=dtype, device=device)
    B = gen(2, K, N, dtype=dtype, device=device)
    G = gen(3, *a_shape[:-1], N, dtype=dtype, device=device)
    # Small blocks that straddle rows (96 is not a multiple of 64) exercise the flattened blocking.
    out, gA, gB = run_fwd_bwd(AG.matmul_fp8_mixed, A, B, G, bsz=64, bsz2=32)
    e4m3, e5m2 = get_codebook(E4M3, device), get_codebook(E5M2, device)
    fA = deq64_blockwise(A, e4m3, 64)             # blockwise over flattened A
    fB = deq64_global(B, e4m3)                    # global B
    fG = deq64_blockwise(G, e5m2, 32)             # blockwise E5M2 output gradient
    assert out.dtype == dtype and out.shape == (*a_shape[:-1], N)
    assert_rel_close(out, fA @ fB, REL_TOL[dtype])
    assert_rel_close(gA, fG @ fB.T, REL_TOL[dtype])
    A2, G2 = A.double().reshape(-1, K), G.double().reshape(-1, N)
    assert_rel_close(gB, A2.T @ G2, REL_TOL[dtype])  # grad_B unquantised (Q19)
    if dtype == torch.float32:
        # Measured (seeded N(0,1)): fprop 29.0 dB, dgrad 25.2 dB vs the unquantised product.
        assert sqnr_db(A.double() @ B.double(), out) > 26.0
        assert sqnr_db(G.double() @ B.double().T, gA) > 22.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(24, 96), (3, 8, 96)])
def test_fp8_global_matches_reference(device: str, dtype: torch.dtype, a_shape: tuple) -> None:
    K, N = a_shape[-1], 80
    A = gen(4, *a_shape, dtype=dtype, device=device)
    B = gen(5, K, N, dtype=dtype, device=device)
    G = gen(6, *a_shape[:-1], N, dtype=dtype, device=device)
    out, gA, gB = run_fwd_bwd(AG.matmul_fp8_global, A, B, G)
    e4m3, e5m2 = get_codebook(E4M3, device), get_codebook(E5M2, device)
    fA, fB, fG = deq64_global(A, e4m3), deq64_global(B, e4m3), deq64_global(G, e5m2)
    assert_rel_close(out, fA @ fB, REL_TOL[dtype])
    assert_rel_close(gA, fG @ fB.T, REL_TOL[dtype])
    assert_rel_close(gB, fA.reshape(-1, K).T @ fG.reshape(-1, N), REL_TOL[dtype])  # both quantised
    if dtype == torch.float32:
        # Measured (seeded N(0,1)): fprop 28.8 dB, dgrad 24.9 dB, wgrad 24.8 dB.
        assert sqnr_db(A.double() @ B.double(), out) > 26.0
        assert sqnr_db(G.double() @ B.double().T, gA) > 22.0
        assert sqnr_db(A.double().reshape(-1, K).T @ G.double().reshape(-1, N), gB) > 22.0


def test_fp8_mixed_and_global_differ_as_documented() -> None:
    """Mixed: exact grad_B, blockwise A; Global: quantised grad_B. Guards against swapped recipes."""
    A, B, G = gen(7, 32, 64), gen(8, 64, 48), gen(9, 32, 48)
    _, _, gB_mixed = run_fwd_bwd(AG.matmul_fp8_mixed, A, B, G)
    _, _, gB_global = run_fwd_bwd(AG.matmul_fp8_global, A, B, G)
    exact = A.double().T @ G.double()
    assert_rel_close(gB_mixed, exact, 2e-6)
    assert sqnr_db(exact, gB_global) < 35.0  # measured 24.8 dB: visibly quantised


def test_fp8_bsz_defaults_to_get_block_sizes() -> None:
    A, B = gen(10, 16, 200), gen(11, 200, 70)
    auto = AG.matmul_fp8_mixed(A, B)
    assert AG.get_block_sizes(A, B) == (256, 128)
    torch.testing.assert_close(auto, AG.matmul_fp8_mixed(A, B, bsz=256, bsz2=128), rtol=0, atol=0)
    assert not torch.equal(auto, AG.matmul_fp8_mixed(A, B, bsz=64, bsz2=128))


def test_fp8_custom_codes_are_used() -> None:
    A, B = gen(12, 8, 32), gen(13, 32, 16)
    dyn = get_codebook("dynamic")
    out = AG.matmul_fp8_global(A, B, fw_code=dyn)
    torch.testing.assert_close(out.double(), deq64_global(A, dyn) @ deq64_global(B, dyn), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [AG.matmul_fp8_mixed, AG.matmul_fp8_global])
def test_fp8_gradient_linear_in_grad_for_exact_paths(fn) -> None:
    """grad_B of Mixed is an exact VJP (linear in grad_output); Global's is not (grad is quantised)."""
    A, B = gen(14, 16, 64), gen(15, 64, 32)
    G1, G2 = gen(16, 16, 32), gen(17, 16, 32)
    g1, g2, g12 = (run_fwd_bwd(fn, A, B, g)[2] for g in (G1, G2, G1 + 3 * G2))
    lin_err = float((g12.double() - (g1.double() + 3 * g2.double())).abs().max()) / float(g12.abs().max())
    if fn is AG.matmul_fp8_mixed:
        assert lin_err < 1e-5
    else:
        assert lin_err > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [AG.matmul_fp8_mixed, AG.matmul_fp8_global])
def test_fp8_empty_inputs(device: str, fn) -> None:
    for a_shape, b_shape in (((0, 16), (16, 8)), ((2, 0, 16), (16, 8)), ((3, 0), (0, 8))):
        A = torch.randn(a_shape, device=device, requires_grad=True)
        B = torch.randn(b_shape, device=device, requires_grad=True)
        out = fn(A, B)
        assert out.shape == (*a_shape[:-1], b_shape[1])
        assert bool((out == 0).all())  # K = 0 contributes nothing: zeros, not uninitialised memory
        out.sum().backward()
        assert A.grad.shape == A.shape and B.grad.shape == B.shape
        assert bool((A.grad == 0).all()) and bool((B.grad == 0).all())


@pytest.mark.parametrize("fn", [AG.matmul_fp8_mixed, AG.matmul_fp8_global])
def test_fp8_out_is_honoured(fn) -> None:
    A, B = gen(18, 2, 6, 32).requires_grad_(True), gen(19, 32, 16)
    out = torch.full((2, 6, 16), float("nan"))
    res = fn(A, B, out=out)
    assert res is out
    torch.testing.assert_close(out, fn(A.detach(), B), rtol=0, atol=0)
    res.sum().backward()  # the filled `out` stays connected to the graph
    assert A.grad is not None and bool(torch.isfinite(A.grad).all())
    with pytest.raises(ValueError, match="out must have shape"):
        fn(A.detach(), B, out=torch.empty(2, 6, 15))


@pytest.mark.parametrize("fn,weight_in_out", [(AG.matmul_fp8_mixed, True), (AG.matmul_fp8_global, True),
                                               (AG.matmul, False), (AG.switchback_bnb, False)])
def test_one_dimensional_input(fn, weight_in_out: bool) -> None:
    """A [in] behaves like one row of A [1, in] (as in F.linear)."""
    a, w = gen(60, 32), gen(61, 32, 16)
    w = w if weight_in_out else w.t().contiguous()
    a1 = a.clone().requires_grad_(True)
    a2 = a[None].clone().requires_grad_(True)
    y1, y2 = fn(a1, w), fn(a2, w)
    assert y1.shape == (16,)
    torch.testing.assert_close(y1, y2[0], rtol=0, atol=0)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad[0], rtol=0, atol=0)


def test_fp8_input_validation() -> None:
    with pytest.raises(ValueError, match="must equal B.shape"):
        AG.matmul_fp8_mixed(torch.randn(4, 8), torch.randn(9, 3))
    with pytest.raises(TypeError, match="same dtype"):
        AG.matmul_fp8_global(torch.randn(4, 8), torch.randn(8, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="floating-point"):
        AG.matmul_fp8_global(torch.ones(4, 8, dtype=torch.int32), torch.randn(8, 3))
    with pytest.raises(ValueError, match="compat"):
        AG.matmul_fp8_global(torch.randn(4, 8), torch.randn(8, 3), compat="cuda")


# ---------------------------------------------------------------------------------------------
# LLM.int8(): MatMul8bitLt / matmul (SPEC §6.2, §6.3)
# ---------------------------------------------------------------------------------------------
def int8_reference(A2, W, G2, bias, threshold):
    """float64 LLM.int8() forward/backward from the functional layer's codes (default mode)."""
    CA, CAt, SCA, SCAt, cols = F.int8_double_quant(A2, threshold)
    CB, SCB, _ = F.int8_vectorwise_quant(W, 0.0)
    deqW = CB.double() * SCB.double()[:, None] * INV_127
    CA = CA.double().clone()
    idx = cols if (threshold > 0 and cols is not None and cols.numel() > 0) else None
    if idx is not None:
        CA[:, idx] = 0
    out = (CA @ CB.double().T) * SCA.double()[:, None] * SCB.double()[None, :] / 127**2
    if idx is not None:
        out += A2.double()[:, idx] @ deqW[:, idx].T
    if bias is not None:
        out += bias.double()
    _, Cg_col, _, Sg_col, _ = F.int8_double_quant(G2, 0.0)
    QA = CAt.double().clone()
    if idx is not None:
        QA[:, idx] = 0
    gB = (Cg_col.double().T @ QA) * Sg_col.double()[:, None] * SCAt.double()[None, :] / 127**2
    if idx is not None:
        gB[:, idx] += G2.double().T @ A2.double()[:, idx]
    gA = G2.double() @ deqW
    return out, gA, gB, idx


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(32, 64), (2, 16, 64)])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_matmul8bitlt_matches_reference(device, dtype, a_shape, threshold) -> None:
    K, N = a_shape[-1], 48
    A = gen(20, *a_shape, dtype=dtype, device=device)
    W = gen(21, N, K, dtype=dtype, device=device)
    bias = gen(22, N, dtype=dtype, device=device).requires_grad_(True)
    G = gen(23, *a_shape[:-1], N, dtype=dtype, device=device)
    A_, W_ = A.clone().requires_grad_(True), W.clone().requires_grad_(True)
    state = AG.MatmulLtState()
    out = AG.matmul(A_, W_, state=state, threshold=threshold, bias=bias)
    out.backward(G)
    A2, G2 = A.reshape(-1, K), G.reshape(-1, N)
    ref_out, ref_gA, ref_gB, idx = int8_reference(A2, W, G2, bias, threshold)
    assert out.dtype == dtype and out.shape == (*a_shape[:-1], N)
    assert_rel_close(out.reshape(-1, N), ref_out, REL_TOL[dtype])
    assert_rel_close(A_.grad.reshape(-1, K), ref_gA, REL_TOL[dtype])
    assert_rel_close(W_.grad, ref_gB, REL_TOL[dtype])
    assert_rel_close(bias.grad, G2.double().sum(0), REL_TOL[dtype] / 4)  # bias grad: exact sum
    if threshold > 0:
        assert idx is not None and torch.equal(state.idx.cpu(), idx.cpu())  # N(0,1) has |x| >= 2.5 columns
    if dtype == torch.float32:
        exact = A2.double() @ W.double().T + bias.double()
        # Measured: fprop 42.0 dB (thr 0) / 43.0 dB (thr 2.5); wgrad 41.9 / 44.9 dB.
        assert sqnr_db(exact, out.reshape(-1, N)) > 39.0
        assert sqnr_db(G2.double().T @ A2.double(), W_.grad) > 39.0


def test_matmul8bitlt_grad_b_default_vs_bnb_compat() -> None:
    """Q10: bnb rescales the row-quantised gradient with column scales; the default uses Qcol(grad)."""
    M, K, N = 64, 32, 24
    token_scale = torch.logspace(-2, 1, M)[:, None]  # heterogeneous token magnitudes (0.01 … 10)
    A = gen(24, M, K) * token_scale
    W = gen(25, N, K)
    G = gen(26, M, N) * token_scale
    exact = G.double().T @ A.double()
    grads = {}
    for compat in (None, "bnb"):
        W_ = W.clone().requires_grad_(True)
        AG.matmul(A.requires_grad_(False), W_, compat=compat).backward(G)
        grads[compat] = W_.grad
    # Measured: default 45.3 dB, bnb 7.0 dB (i.i.d. data without token scales: 41.7 vs 9.3 dB,
    # i.e. 0.8 % vs 34 % relative error).
    assert sqnr_db(exact, grads[None]) > 40.0
    assert sqnr_db(exact, grads["bnb"]) < 12.0
    # And the compat result is exactly bnb's formula (fp16 inputs, fp16 output).
    A16, G16 = A.half(), G.half()
    _, CAt, _, SCAt, _ = F.int8_double_quant(A16, 0.0, compat="bnb")
    Cg, _, _, Sg_col, _ = F.int8_double_quant(G16, 0.0, compat="bnb")
    ref = (Cg.double().T @ CAt.double()) * Sg_col.double()[:, None] * SCAt.double()[None, :] / 127**2
    assert_rel_close(grads["bnb"], ref, 2e-3)


def test_matmul8bitlt_weight_cache_default_vs_bnb_compat() -> None:
    """Q11: after a backward, bnb reuses the stale int8 weight; the default re-quantises on a version bump."""
    A, W0 = gen(27, 8, 16), gen(28, 12, 16)
    results = {}
    for compat in (None, "bnb"):
        W = W0.clone().requires_grad_(True)
        state = AG.MatmulLtState()
        AG.matmul(A, W, state=state, compat=compat).sum().backward()  # W.grad now exists
        with torch.no_grad():
            W.mul_(-2.0)  # in-place optimizer-style update bumps W._version
        results[compat] = AG.matmul(A, W, state=state, compat=compat).detach()
    fresh = AG.matmul(A, W0 * -2.0)
    torch.testing.assert_close(results[None], fresh, rtol=0, atol=0)
    stale = AG.matmul(A, W0, compat="bnb")
    torch.testing.assert_close(results["bnb"], stale, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
def test_int8_weight_cache_never_serves_a_new_tensor_at_a_freed_address(fn, training) -> None:
    """A freed weight's address comes back with the next tensor of its size, at version 0: the cache key
    (pointer, version, shape) alone took it for the old weight and computed with stale codes."""
    A = gen(40, 4, 64)
    state = AG.MatmulLtState(is_training=training)
    addresses: set[int] = set()
    reused = 0
    # At least 5 weights, and on until one came at a freed weight's address: whether the allocator hands an address
    # out again within 5 depends on what else ran in the process (CI: 1 run in 3 of this file saw 5 new addresses).
    for seed in range(41, 41 + 40):
        W = gen(seed, 32, 64)
        reused += W.data_ptr() in addresses
        addresses.add(W.data_ptr())
        torch.testing.assert_close(fn(A, W, state=state), fn(A, W.clone()), rtol=0, atol=0)
        del W
        if reused and seed >= 45:
            break
    assert reused  # (the allocator did hand an address out again, and that weight's result was checked)


def test_matmul8bitlt_eval_state_reuses_codes_of_the_same_weight() -> None:
    A, W = gen(46, 8, 16), gen(47, 12, 16)
    state = AG.MatmulLtState(is_training=False)
    AG.matmul(A, W, state=state)
    cb = state.CB
    AG.matmul(A, W, state=state)
    assert state.CB is cb
    state.is_training = True  # training: quantised on every call
    AG.matmul(A, W, state=state)
    assert state.CB is not cb


def test_matmul8bitlt_no_fp16_weights_uses_given_int8_weight() -> None:
    A, W = gen(29, 8, 16), gen(30, 12, 16)
    CB, SCB, _ = F.int8_vectorwise_quant(W, 0.0)
    state = AG.MatmulLtState(has_fp16_weights=False, CB=CB, SCB=SCB)
    other = gen(31, 12, 16)  # B's values are not read when the int8 weight is given
    out = AG.matmul(A, other, state=state)
    torch.testing.assert_close(out, AG.matmul(A, W), rtol=0, atol=0)


def _saved_by(fn, *args, **kwargs):
    """(output, [tensors the call saved for its backward]) via saved_tensors_hooks."""
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, saved


@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(32, 64), (2, 16, 64)])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_weight_codes_quantised_again_in_backward(fn, dtype, a_shape, threshold) -> None:
    """MatmulLtState(save_weight_codes=False): no int8 copy of the weight is kept for the backward (the weight
    itself is), and the output and every gradient are the saved-codes call's bit for bit, outlier columns
    included."""
    K, N = a_shape[-1], 48
    A, W = gen(60, *a_shape, dtype=dtype), gen(61, N, K, dtype=dtype)
    bias, G = gen(62, N, dtype=dtype), gen(63, *a_shape[:-1], N, dtype=dtype)
    got = {}
    for keep in (True, False):
        A_, W_, b_ = (t.clone().requires_grad_(True) for t in (A, W, bias))
        state = AG.MatmulLtState(save_weight_codes=keep)
        out, saved = _saved_by(fn, A_, W_, state=state, threshold=threshold, bias=b_)
        codes = [t for t in saved if t is not None and t.dtype == torch.int8 and t.shape == W.shape]
        assert len(codes) == (1 if keep else 0)
        assert keep or any(t is W_ for t in saved)
        out.backward(G)
        got[keep] = (out.detach(), A_.grad, W_.grad, b_.grad)
    if threshold > 0:
        assert state.idx is not None and state.idx.numel() > 0  # N(0,1) has |x| >= 2.5 columns
    for a, b in zip(got[True], got[False]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_weight_codes_kept_where_the_backward_could_not_recompute_them() -> None:
    """save_weight_codes=False keeps CB where quantising the weight again would not give the forward's codes:
    compat="bnb" (its cache may be stale) and a given int8 weight."""
    A, W = gen(64, 8, 16).requires_grad_(True), gen(65, 12, 16).requires_grad_(True)
    _, saved = _saved_by(AG.matmul, A, W, state=AG.MatmulLtState(save_weight_codes=False), compat="bnb")
    assert any(t is not None and t.dtype == torch.int8 and t.shape == W.shape for t in saved)
    CB, SCB, _ = F.int8_vectorwise_quant(W.detach(), 0.0)
    state = AG.MatmulLtState(has_fp16_weights=False, CB=CB, SCB=SCB, save_weight_codes=False)
    _, saved = _saved_by(AG.matmul, A, gen(66, 12, 16).requires_grad_(True), state=state)
    assert any(t is CB for t in saved)


def test_weight_changed_before_backward_is_an_error_without_saved_codes() -> None:
    """Without saved codes the backward reads the weight: an in-place change in between is autograd's error, not a
    gradient from other codes."""
    A, W = gen(67, 8, 16).requires_grad_(True), gen(68, 12, 16).requires_grad_(True)
    for fn in (AG.matmul, AG.switchback_bnb):
        out = fn(A, W, state=AG.MatmulLtState(save_weight_codes=False))
        with torch.no_grad():
            W.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_matmul_threshold_written_only_when_positive() -> None:
    state = AG.MatmulLtState(threshold=3.0)
    AG.matmul(gen(32, 4, 8), gen(33, 5, 8), state=state, threshold=0.0)
    assert state.threshold == 3.0
    AG.matmul(gen(32, 4, 8), gen(33, 5, 8), state=state, threshold=6.0)
    assert state.threshold == 6.0
    for bad in (-1.0, float("nan"), float("inf")):  # NaN ran as threshold 0 before
        for fn in (AG.matmul, AG.switchback_bnb):
            with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
                fn(gen(32, 4, 8), gen(33, 5, 8), threshold=bad)


def test_global_outlier_pooler_keeps_columns() -> None:
    pool = AG.GlobalOutlierPooler.get_instance()
    pool.initialize()
    assert AG.GlobalOutlierPooler.get_instance() is pool
    with pytest.raises(RuntimeError, match="get_instance"):
        AG.GlobalOutlierPooler()
    pool.add_outliers(torch.tensor([5, 1]), 16)
    pool.add_outliers(torch.tensor([9]), 32)  # other width: ignored
    pool.add_outliers(torch.tensor([3, 5]), 16)
    assert pool.get_current_outlier_idx().tolist() == [1, 3, 5]
    # use_pool: a column that was an outlier once stays in 16-bit in later forwards.
    pool.initialize()
    state = AG.MatmulLtState(threshold=4.0, use_pool=True)
    A1 = gen(34, 6, 16) * 0.5
    A1[2, 7] = 9.0
    W = gen(35, 10, 16)
    AG.matmul(A1, W, state=state)
    A2 = gen(36, 6, 16) * 0.5
    AG.matmul(A2, W, state=state)
    assert state.idx.tolist() == [7]
    pool.initialize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
def test_int8_empty_inputs(device: str, fn) -> None:
    for a_shape in ((0, 16), (2, 0, 16)):
        A = torch.randn(a_shape, device=device, requires_grad=True)
        W = torch.randn(8, 16, device=device, requires_grad=True)
        bias = torch.randn(8, device=device, requires_grad=True)
        out = fn(A, W, bias=bias)
        assert out.shape == (*a_shape[:-1], 8)
        out.sum().backward()
        assert bool((A.grad == 0).all()) and bool((W.grad == 0).all()) and bool((bias.grad == 0).all())


@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
def test_int8_out_is_honoured(fn) -> None:
    A, W = gen(37, 3, 5, 16).requires_grad_(True), gen(38, 8, 16)
    out = torch.full((3, 5, 8), float("nan"))
    res = fn(A, W, out=out)
    assert res is out
    torch.testing.assert_close(out, fn(A.detach(), W), rtol=0, atol=0)
    res.sum().backward()
    assert A.grad is not None and bool(torch.isfinite(A.grad).all())


def test_int8_input_validation() -> None:
    with pytest.raises(ValueError, match=r"weight is \[out, in\]"):
        AG.matmul(torch.randn(4, 8), torch.randn(8, 5))
    with pytest.raises(ValueError, match="bias must have shape"):
        AG.switchback_bnb(torch.randn(4, 8), torch.randn(5, 8), bias=torch.randn(4))
    with pytest.raises(TypeError, match="MatmulLtState"):
        AG.matmul(torch.randn(4, 8), torch.randn(5, 8), state={})


def test_matmullt_state_reset_and_legacy_fields() -> None:
    state = AG.MatmulLtState()
    AG.matmul(gen(39, 4, 8), gen(40, 5, 8), state=state)
    assert state.CB is not None and state.CB.dtype == torch.int8 and state.SCB.shape == (5,)
    state.reset_grads()
    assert state.CB is None and state.SCB is None and state.CBt is None
    with pytest.raises(NotImplementedError):
        state.tile_indices


# ---------------------------------------------------------------------------------------------
# SwitchBack (SPEC §7.2)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(32, 64), (2, 16, 64)])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_switchback_matches_reference(device, dtype, a_shape, threshold) -> None:
    K, N = a_shape[-1], 40
    A = gen(41, *a_shape, dtype=dtype, device=device)
    W = gen(42, N, K, dtype=dtype, device=device)
    bias = gen(43, N, dtype=dtype, device=device).requires_grad_(True)
    G = gen(44, *a_shape[:-1], N, dtype=dtype, device=device)
    A_, W_ = A.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = AG.switchback_bnb(A_, W_, threshold=threshold, bias=bias)
    out.backward(G)
    A2, G2 = A.reshape(-1, K), G.reshape(-1, N)
    CA, SCA, cols = F.int8_vectorwise_quant(A2, threshold)
    CB, SCB, _ = F.int8_vectorwise_quant(W, 0.0)
    CA = CA.double().clone()
    ref = None
    if threshold > 0:
        assert cols.numel() > 0
        CA[:, cols] = 0
        ref = A2.double()[:, cols] @ W.double()[:, cols].T  # outliers use the ORIGINAL weight columns
    ref_out = (CA @ CB.double().T) * SCA.double()[:, None] * SCB.double()[None, :] / 127**2 + bias.double()
    if ref is not None:
        ref_out = ref_out + ref
    deqW = CB.double() * SCB.double()[:, None] * INV_127
    assert_rel_close(out.reshape(-1, N), ref_out, REL_TOL[dtype])
    assert_rel_close(A_.grad.reshape(-1, K), G2.double() @ deqW, REL_TOL[dtype])
    assert_rel_close(W_.grad, G2.double().T @ A2.double(), REL_TOL[dtype])  # unquantised
    assert_rel_close(bias.grad, G2.double().sum(0), REL_TOL[dtype] / 4)


def test_switchback_backward_is_an_exact_vjp() -> None:
    """Nothing is quantised in SwitchBack's backward: both grads are linear in grad_output."""
    A, W = gen(45, 16, 32), gen(46, 24, 32)
    G1, G2 = gen(47, 16, 24), gen(48, 16, 24)
    res = []
    for G in (G1, G2, 2 * G1 - G2):
        A_, W_ = A.clone().requires_grad_(True), W.clone().requires_grad_(True)
        AG.switchback_bnb(A_, W_).backward(G)
        res.append((A_.grad.double(), W_.grad.double()))
    for k in range(2):
        torch.testing.assert_close(res[2][k], 2 * res[0][k] - res[1][k], rtol=1e-5, atol=1e-5)


def test_switchback_no_fp16_weights_uses_dequantised_outlier_columns() -> None:
    A, W = gen(49, 16, 32), gen(50, 24, 32)
    A[:, 3] *= 8.0
    kw = dict(threshold=4.0)
    fp16w = AG.switchback_bnb(A, W, state=AG.MatmulLtState(), **kw)
    int8w = AG.switchback_bnb(A, W, state=AG.MatmulLtState(has_fp16_weights=False), **kw)
    cols = F.int8_vectorwise_quant(A, 4.0)[2]
    assert 3 in cols.tolist()
    CB, SCB, _ = F.int8_vectorwise_quant(W, 0.0)
    deqW = (CB.double() * SCB.double()[:, None] * INV_127)
    delta = A.double()[:, cols] @ (deqW[:, cols] - W.double()[:, cols]).T
    assert_rel_close(int8w - fp16w, delta, 1e-3)


# ---------------------------------------------------------------------------------------------
# Differential checks against the real bitsandbytes 0.49.2 (CPU), where it runs on CPU at all
# ---------------------------------------------------------------------------------------------
def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    warnings.filterwarnings("ignore", module="bitsandbytes")
    return bnb


@pytest.mark.parametrize("features", [1, 63, 64, 65, 100, 1000, 1024, 4095, 4097, 20000])
def test_get_block_sizes_equals_bnb(features: int) -> None:
    _bnb()
    from bitsandbytes.research.autograd._functions import get_block_sizes as bnb_get_block_sizes

    A, W = torch.empty(2, features), torch.empty(37, features)
    assert AG.get_block_sizes(A, W) == bnb_get_block_sizes(A, W)
    assert AG.get_block_sizes(A, W.t()) == bnb_get_block_sizes(A, W.t())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape", [(24, 64), (3, 8, 64)])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_matmul_compat_forward_equals_bnb_cpu(dtype, a_shape, threshold) -> None:
    """bnb's CPU inference path is MatMul8bitLt with CPU ops: compat="bnb" must match it bit for bit."""
    bnb = _bnb()
    A, W, bias = gen(70, *a_shape, dtype=dtype), gen(71, 40, 64, dtype=dtype), gen(72, 40, dtype=dtype)
    ref_state = bnb.MatmulLtState()
    ref_state.is_training = False
    ref = bnb.matmul(A, W, bias=bias, state=ref_state, threshold=threshold)
    state = AG.MatmulLtState(is_training=False)
    ours = AG.matmul(A, W, bias=bias, state=state, threshold=threshold, compat="bnb")
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert torch.equal(state.CB, ref_state.CB) and torch.equal(state.SCB, ref_state.SCB)
    if threshold > 0:
        assert torch.equal(state.idx, ref_state.idx)
    # The default differs by the dequant constant (fl32(1/127²) vs bnb's 6.200124e-05, Q9) and by
    # quantising fp32 activations and weights directly instead of through fp16: different int8 codes,
    # so the two differ at the int8 noise level (measured max 3.9e-3 of max|out|).
    if dtype == torch.float32:
        default = AG.matmul(A, W, bias=bias, state=AG.MatmulLtState(is_training=False), threshold=threshold)
        assert not torch.equal(default, ref)
        assert_rel_close(default, ref.double(), 1e-2)


def test_matmullt_state_has_bnb_fields() -> None:
    import dataclasses

    bnb = _bnb()
    ours = {f.name for f in dataclasses.fields(AG.MatmulLtState)}
    assert {f.name for f in dataclasses.fields(bnb.MatmulLtState)} <= ours
    for attr in ("has_accumulated_gradients", "threshold", "is_training", "has_fp16_weights", "use_pool", "formatB"):
        assert getattr(AG.MatmulLtState(), attr) == getattr(bnb.MatmulLtState(), attr)


@pytest.mark.parametrize("threshold", [0.0, 2.0])
@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
def test_int8_matmuls_propagate_nan_like_the_float_product(fn, threshold) -> None:
    """The int8 codes cannot hold a NaN (the row absmax skips it, its code is 0): a NaN activation, weight or
    gradient gave finite results. The outputs and both gradients now have NaN exactly where A·Wᵀ's have."""
    nan = float("nan")
    A, W, G = gen(50, 6, 16), gen(51, 5, 16), gen(52, 6, 5)
    A[1, 3] = A[4, 0] = nan
    W[2, 7] = nan
    G[0, 4] = G[5, 1] = nan
    a, w = A.clone().requires_grad_(), W.clone().requires_grad_()
    kwargs = {"threshold": threshold} if fn is AG.matmul else {}
    y = fn(a, w, **kwargs)
    y.backward(G)
    a32, w32 = A.clone().requires_grad_(), W.clone().requires_grad_()
    y32 = a32 @ w32.T
    y32.backward(G)
    for got, want in ((y, y32), (a.grad, a32.grad), (w.grad, w32.grad)):
        assert got.isnan().any()
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        err = (got[finite] - want[finite]).double().norm()
        assert err <= 0.05 * want[finite].double().norm()  # (the int8 error elsewhere; SwitchBack's wgrad is exact)
    # compat="bnb" keeps bitsandbytes' rule (its NaN row stats poison the rows of A's codes)
    fn(A, W, compat="bnb", **kwargs)


def test_int8_matmul_without_nan_is_unchanged_by_the_check() -> None:
    A, W = gen(53, 8, 16), gen(54, 12, 16)
    A[0, 0] = float("inf")  # an Inf is no NaN: no mask, the plain int8 product
    state = AG.MatmulLtState()
    y = AG.matmul(A, W, state=state)
    assert state.weight_nan is None
    C, S, _ = F.int8_vectorwise_quant(A, 0.0)
    CB, SCB, _ = F.int8_vectorwise_quant(W, 0.0)
    torch.testing.assert_close(y, F.int8_scaled_mm(C, CB, S, SCB, dtype=A.dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 2.5])
def test_matmul_compat_float32_bias_equals_bnb_cpu(dtype, threshold) -> None:
    """bnb passes a float32 bias as it is to int8_scaled_mm / int8_mixed_scaled_mm, whose dequant adds it in
    float32: compat="bnb" rounded it to A's dtype first (double rounding, QA finding 2). The default keeps taking
    the bias in A's dtype (docs/architecture.md, Decisions)."""
    bnb = _bnb()
    A, W = gen(73, 24, 64, dtype=dtype, scale=2.0), gen(74, 40, 64, dtype=dtype)
    bias = gen(75, 40, scale=3.0) + 1e-3  # float32, not representable in A's dtype
    ref_state = bnb.MatmulLtState()
    ref_state.is_training = False
    ref = bnb.matmul(A, W, bias=bias, state=ref_state, threshold=threshold)
    ours = AG.matmul(A, W, bias=bias, state=AG.MatmulLtState(is_training=False), threshold=threshold, compat="bnb")
    assert ours.dtype == ref.dtype == dtype
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))
    default = AG.matmul(A, W, bias=bias, state=AG.MatmulLtState(is_training=False), threshold=threshold)
    rounded = AG.matmul(A, W, bias=bias.to(dtype), state=AG.MatmulLtState(is_training=False), threshold=threshold)
    assert torch.equal(default, rounded)


@pytest.mark.parametrize("fn", [AG.matmul_fp8_mixed, AG.matmul_fp8_global, AG.matmul, AG.switchback_bnb])
def test_double_backward_is_refused_by_name(fn) -> None:
    """The backwards quantise (or read int8 codes): no second derivative. It failed with torch's generic
    "element 0 of tensors does not require grad" (QA finding 9); first-order gradients are unchanged."""
    A = gen(76, 6, 32).requires_grad_()
    B = gen(77, 32, 8) if fn in (AG.matmul_fp8_mixed, AG.matmul_fp8_global) else gen(77, 8, 32)
    B.requires_grad_()
    name = {AG.matmul_fp8_mixed: "MatMulFP8Mixed", AG.matmul_fp8_global: "MatMulFP8Global",
            AG.matmul: "MatMul8bitLt", AG.switchback_bnb: "SwitchBackBnb"}[fn]
    G = gen(78, 6, 8)
    gA, gB = torch.autograd.grad(fn(A, B), (A, B), G, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward through {name} is not supported"):
        (gA.sum() + gB.sum()).backward()
    gA1, gB1 = torch.autograd.grad(fn(A, B), (A, B), G)
    assert torch.equal(gA, gA1) and torch.equal(gB, gB1) and not gA1.requires_grad
    # towards one input with autograd.grad (gradient penalties, Hessian-vector products): it said B "appears to not
    # have been used in the graph", and with allow_unused=True returned None, a zero where the true one is not
    gA, = torch.autograd.grad(fn(A, B).square().sum(), A, create_graph=True)
    for other in (A, B):
        for unused in (False, True):
            with pytest.raises(RuntimeError, match=f"double backward through {name} is not supported"):
                torch.autograd.grad(gA.sum(), other, allow_unused=unused)


def test_double_backward_without_torchs_private_error_node_still_gives_first_order_gradients(monkeypatch) -> None:
    """The named refusal uses torch's private DelayedError node; a torch without it must still give the first-order
    gradients (the second backward then fails with torch's own message), not an AttributeError."""
    monkeypatch.setattr(AG, "_DELAYED_ERROR", None)
    A, B = gen(79, 6, 32).requires_grad_(), gen(80, 32, 8).requires_grad_()
    G = gen(81, 6, 8)
    gA, gB = torch.autograd.grad(AG.matmul_fp8_global(A, B), (A, B), G, create_graph=True)
    gA1, gB1 = torch.autograd.grad(AG.matmul_fp8_global(A, B), (A, B), G)
    assert torch.equal(gA, gA1) and torch.equal(gB, gB1)
    with pytest.raises(RuntimeError):
        (gA.sum() + gB.sum()).backward()


@pytest.mark.parametrize("fn", [AG.matmul, AG.switchback_bnb])
@pytest.mark.parametrize("compat", [None, "bnb"])
def test_int8_matmuls_take_inference_tensors(fn, compat) -> None:
    """An inference tensor has no version counter: reading it for the int8 weight cache raised "Inference tensors do
    not track version counter" (QA finding 5). Its codes are never reused: a write in inference mode is seen."""
    A, W = gen(79, 6, 32), gen(80, 8, 32)
    expected = fn(A, W, state=AG.MatmulLtState(is_training=False), compat=compat)
    state = AG.MatmulLtState(is_training=False, has_fp16_weights=True)
    with torch.inference_mode():
        W_inf = W.clone()
        assert torch.equal(fn(A, W_inf, state=state, compat=compat), expected)
        if compat is None:
            W_inf.mul_(2.0)  # in place, unseen by any version counter
            assert torch.equal(fn(A, W_inf, state=state), fn(A, W * 2.0, state=AG.MatmulLtState(is_training=False)))
