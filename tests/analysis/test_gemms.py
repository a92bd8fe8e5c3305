"""gemms.py + capture.py: every GEMM of a model is found (linear anywhere, matmul/einsum, attention, conv), named the
same eager and exported, replaceable at its site, and what is not captured is counted with its reason."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fp8probe.analysis.capture import capture_batch
from fp8probe.analysis.gemms import Coverage, GemmHandler, coverage_line, im2col, intercept, parse_kinds
from fp8probe.analysis.loading import Batch, from_exported_program
from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.strategies import STRATEGIES, _fq_scaled


def _capture(model, *args, kinds=None, layers=None):
    cov = Coverage(parse_kinds(kinds))
    calls = []
    capture_batch(model, Batch(args), calls.append, coverage=cov, layers=layers)
    return {c.name: c for c in calls}, cov


def _sqnr_db(ref: torch.Tensor, lp: torch.Tensor) -> float:
    ref, lp = ref.double(), lp.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - lp).pow(2).sum().item())


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()


def test_transformer_encoder_every_gemm_with_gradients() -> None:
    model = _encoder()
    x = torch.randn(2, 5, 16)
    calls, cov = _capture(model, x)
    for i in range(2):
        p = f"0.layers.{i}."
        for name in ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2", "self_attn#qk", "self_attn#pv"):
            c = calls[p + name]
            assert c.grad_output is not None, name
            assert c.grad_output.shape == (*c.activation.shape[:-1], c.weight.shape[-2])
        qk, pv = calls[p + "self_attn#qk"], calls[p + "self_attn#pv"]
        assert qk.kind == pv.kind == "attention" and not qk.b_is_weight
        assert qk.activation.shape == (2 * 2, 5, 8) and pv.weight.shape == (2 * 2, 8, 5)  # [B·heads, ...]
        assert calls[p + "self_attn.in_proj"].weight.shape == (48, 16)
    assert "1" in calls and len(calls) == 13
    summary = cov.summary()
    assert summary["gemms_executed"] == summary["gemms_captured"] == 13 and summary["flop_share"] == 1.0
    assert set(cov.table()["kind"]) == {"linear", "attention"}


def test_attention_probabilities_and_output_match_the_fused_kernel() -> None:
    model = _encoder()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
    seen = {}

    class Keep(GemmHandler):
        def output(self, site, y):
            seen[site.name] = (site.operands(), y)
            return y

    with torch.no_grad(), intercept(model, Keep(), Coverage()):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (q, k), scores = seen["0.layers.0.self_attn#qk"]
    (probs, vt), out = seen["0.layers.0.self_attn#pv"]
    # outputs arrive in the op's layout [batch, heads, L, S]; operands in normal form [batch·heads, ...]
    torch.testing.assert_close(scores.reshape(4, 5, 5), q @ k.mT)
    torch.testing.assert_close(probs, torch.softmax(q @ k.mT / math.sqrt(8), -1))
    torch.testing.assert_close(out.reshape(4, 5, 8), probs @ vt.mT)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.conv3 = nn.Conv1d(8, 4, 2, dilation=2, padding="same")
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        h = self.conv3(h.flatten(2))
        return self.fc(h.mean(-1))


def test_cnn_convs_as_implicit_gemms_and_sqnr_by_hand() -> None:
    torch.manual_seed(1)
    model, x = _CNN().eval(), torch.randn(2, 3, 8, 8)
    res = analyze(model, [x], "ocp-tensorwise")
    layers = res.tables["layers"].set_index("layer")
    assert list(layers.index) == ["conv1", "conv2", "conv3", "fc"]
    assert layers.loc[["conv1", "conv2", "conv3"], "kind"].tolist() == ["conv"] * 3
    assert layers.loc["conv1", "in_features"] == 27 and layers.loc["conv1", "tokens"] == 2 * 64
    assert layers.loc["conv2", "batch"] == 2  # two groups: two GEMMs per call
    assert res.metadata["coverage"]["flop_share"] == 1.0
    # conv1 sees the batch itself: im2col with F.unfold, E4M3FN per-tensor quantiser, float32 GEMM
    A = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    W = model.conv1.weight.detach().reshape(8, 27)
    qA, _ = _fq_scaled(A, "e4m3", "tensor", None)
    qW, _ = _fq_scaled(W, "e4m3", "tensor", None)
    gemm = res.tables["gemm"].set_index(["layer", "strategy", "gemm"])
    assert gemm.loc[("conv1", "ocp-tensorwise", "fprop"), "sqnr_db"] == pytest.approx(_sqnr_db(A @ W.T, qA @ qW.T),
                                                                                       rel=1e-6)
    assert {"dgrad", "wgrad"} <= set(res.tables["gemm"]["gemm"])


def test_im2col_matches_conv_for_1d_2d_3d_strides_dilations() -> None:
    torch.manual_seed(2)
    for nd, conv in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
        x = torch.randn(2, 3, *([7] * nd))
        w = torch.randn(4, 3, *([3] * nd))
        stride, dilation, pad = (2,) * nd, (2,) * nd, [1, 2] * nd
        torch_pad = [p for i in reversed(range(nd)) for p in pad[2 * i:2 * i + 2]]  # F.pad: last dim first
        ref = conv(F.pad(x, torch_pad), w, stride=stride, dilation=dilation)
        cols = im2col(x, (3,) * nd, stride, pad, dilation)
        got = (cols @ w.reshape(4, -1).T).reshape(2, -1, 4).transpose(1, 2).reshape(ref.shape)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _Mixed(nn.Module):
    """One of each: F.linear with a raw parameter, x @ W.t(), bmm, einsum, sdpa (GQA, causal), conv, addmm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.proj = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x [2, 6, 16]
        h = F.linear(x, self.w)
        h = h @ self.proj.weight.t()
        s = torch.bmm(h, x.transpose(1, 2))                      # [2, 6, 6]
        h = h + torch.einsum("bqk,bkd->bqd", s.softmax(-1), x)
        q = h.view(2, 6, 4, 4).transpose(1, 2)                   # 4 query heads, 2 key/value heads
        kv = x.view(2, 6, 4, 4).transpose(1, 2)[:, :2]
        a = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(2, 6, 16)
        c = self.conv(a.transpose(1, 2)).transpose(1, 2)
        return torch.addmm(self.b, c.reshape(-1, 16), self.w).sum(0)


@pytest.mark.parametrize("L,S", [(3, 5), (5, 3), (4, 4)])
def test_causal_sdpa_under_interception_is_torchs_own(L: int, S: int) -> None:
    """is_causal with fewer queries than keys (a KV-cache step) was masked bottom-right under interception: the
    model's output changed by up to 1.2 with a handler that replaces nothing."""
    gen = torch.Generator().manual_seed(L * 10 + S)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (L, S, S))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.no_grad(), intercept(nn.Identity(), GemmHandler(), Coverage()):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_site_replaced_by_its_own_normal_form_gives_the_model_output() -> None:
    torch.manual_seed(3)
    model, x = _Mixed(), torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = model(x)

    class Recompute(GemmHandler):
        def __init__(self) -> None:
            self.sites = []

        def replace(self, site):
            a, b = site.operands()
            self.sites.append((site.name, site.kind, site.op))
            return a @ b.mT

    h = Recompute()
    with torch.no_grad(), intercept(model, h, Coverage()):
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert h.sites == [("w", "linear", "linear"), ("proj", "linear", "matmul"), ("#bmm", "matmul", "bmm"),
                       ("#einsum", "matmul", "einsum"), ("#qk", "attention", "sdpa"), ("#pv", "attention", "sdpa"),
                       ("conv", "conv", "conv1d"), ("w#1", "linear", "addmm")]

    class Zero(GemmHandler):
        def replace(self, site):
            return torch.zeros(site.shapes()[0][:-1] + (site.shapes()[1][-2],)) if site.name == "conv" else None

    with torch.no_grad(), intercept(model, Zero(), Coverage()):
        zeroed = model(x)
    # conv output = its bias only, so the last GEMM sees rows equal to conv.bias
    torch.testing.assert_close(zeroed, 12 * (model.conv.bias @ model.w + model.b), rtol=1e-4, atol=1e-4)


def test_kinds_selection_and_skips_counted_with_flop_share() -> None:
    torch.manual_seed(4)
    model, x = _Mixed(), torch.randn(2, 6, 16)
    calls, cov = _capture(model, x, kinds="linear,conv")
    assert sorted(calls) == ["conv", "proj", "w", "w#1"]
    table = cov.table().set_index("op")
    assert table.loc["sdpa", "skipped"] == 2 and table.loc["sdpa", "reason"] == "not selected (--gemms) (2)"
    s = cov.summary()
    assert s["gemms_executed"] == 8 and s["gemms_captured"] == 4
    expected = table["gflops_captured"].sum() / table["gflops"].sum()
    assert s["flop_share"] == pytest.approx(expected) and 0 < s["flop_share"] < 1
    assert s["skipped"] == {"bmm: not selected (--gemms)": 1, "einsum: not selected (--gemms)": 1,
                            "sdpa: not selected (--gemms)": 2}
    line = coverage_line(s)
    assert line.startswith(f"captured 4 of 8 GEMMs = {100 * expected:.1f} % of GEMM FLOPs; skipped: ")
    assert "2 × sdpa: not selected (--gemms)" in line
    with pytest.raises(ValueError, match="expected GEMM kinds"):
        parse_kinds("linear,fp4")


class _Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.ones(32, 32, dtype=torch.int8)
        int_sum = torch._int_mm(codes, codes).sum() * 0  # an already-int8 GEMM (a quantised model's own)
        return (self.fc(self.up(x).flatten(1)) + int_sum
                + torch.einsum("bi,bj,bk->b", x[:, 0, 0], x[:, 0, 0], x[:, 0, 0])[:, None])


def test_unsupported_ops_are_skipped_with_reason_and_flops() -> None:
    torch.manual_seed(5)
    calls, cov = _capture(_Unsupported(), torch.randn(2, 4, 2, 2))
    assert list(calls) == ["fc"]
    table = cov.table().set_index("op")
    assert table.loc["conv_transpose2d", "kind"] == "other"
    assert "transposed convolution" in table.loc["conv_transpose2d", "reason"]
    # conv_transpose2d: 2 · N·C_in·H·W · C_out·k·k = 2·2·4·4·4·4 FLOPs; fc: 2·2·64·3
    assert table.loc["conv_transpose2d", "gflops"] * 1e9 == pytest.approx(2 * 2 * 16 * 16)
    # a three-operand einsum has no single-GEMM form: skipped; torch sums i, j and k out of their operands and
    # multiplies the three [b] vectors, no GEMM FLOPs (2·b·i·j·k = 32 were counted before)
    assert table.loc["einsum", "skipped"] == 1 and table.loc["einsum", "gflops"] == 0
    assert table.loc["einsum", "reason"].startswith("einsum that is not a contraction of two")
    assert table.loc["_int_mm", "reason"] == "already a low-precision GEMM (1)"
    assert table.loc["_int_mm", "gflops"] * 1e9 == 2 * 32 ** 3
    s = cov.summary()
    assert s["gemms_captured"] == 1 and s["flop_share"] == pytest.approx(768 / (768 + 1024 + 2 * 32 ** 3))
    assert any(k.startswith("conv_transpose2d: transposed convolution") for k in s["skipped"])


class _WeightForms(nn.Module):
    """One weight [in, out] used as x @ W, and through einsum (right and left), inner, tensordot."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.W = nn.Parameter(torch.randn(32, 24) / 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # x [4, 8, 32]
        if self.form == "einsum":
            return torch.einsum("bti,io->bto", x, self.W)
        if self.form == "einsum-left":
            return torch.einsum("io,bti->bto", self.W, x)
        if self.form == "inner":
            return torch.inner(x, self.W.t())
        if self.form == "tensordot":
            return torch.tensordot(x, self.W, dims=1)
        return x @ self.W


@pytest.mark.parametrize("form", ["einsum", "einsum-left", "inner", "tensordot"])
def test_a_weight_through_einsum_inner_or_tensordot_is_the_weight_of_x_at_w(form: str) -> None:
    """A parameter used through einsum was an activation (its quantiser, name #einsum, kind matmul); inner and
    tensordot were skipped as having no GEMM normal form."""
    torch.manual_seed(8)
    x = torch.randn(4, 8, 32)
    ref = _WeightForms("matmul")
    model = _WeightForms(form)
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    calls, cov = _capture(model, x)
    want, _ = _capture(ref, x)
    assert list(calls) == ["W"] and calls["W"].kind == "linear" and calls["W"].b_is_weight
    assert cov.summary()["flop_share"] == 1.0
    for attr in ("activation", "weight", "grad_output"):
        torch.testing.assert_close(getattr(calls["W"], attr), getattr(want["W"], attr), rtol=0, atol=0)
    a = analyze(model, [x], "ocp-blockwise,nvfp4").tables["gemm"].set_index(["layer", "strategy", "gemm"])["sqnr_db"]
    b = analyze(ref, [x], "ocp-blockwise,nvfp4").tables["gemm"].set_index(["layer", "strategy", "gemm"])["sqnr_db"]
    assert (a - b).abs().max() < 1e-9


def test_a_parametrized_weight_is_its_modules_weight() -> None:
    """weight_norm's weight (computed from two parameters on each forward) was an activation named wn#linear."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(32, 16)), nn.ReLU(), nn.Linear(16, 4))
    calls, _ = _capture(model, torch.randn(8, 32))
    assert sorted(calls) == ["0", "2"]
    assert calls["0"].kind == "linear" and calls["0"].b_is_weight and calls["0"].grad_output is not None
    torch.testing.assert_close(calls["0"].weight, model[0].weight.detach())


class _ChainOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.A, self.B = nn.Parameter(torch.randn(16, 16) / 4), nn.Parameter(torch.randn(16, 40) / 4)
        self.bil = nn.Bilinear(16, 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:        # x [6, 16]
        y = torch.linalg.multi_dot([x, self.A, self.B])          # (x·A)·B: 2·6·16·16 + 2·6·16·40 FLOPs
        z = torch.addbmm(torch.zeros(6, 16), x.expand(3, 6, 16), self.A.expand(3, 16, 16))   # 3·2·6·16·16
        w = self.bil(x, x[:, :8])                                  # 2·6·4·16·8
        return y.sum() + z.sum() + w.sum()


def test_chains_addbmm_and_bilinear_count_their_flops() -> None:
    """multi_dot and bilinear were counted with 0 FLOPs (the captured share read 100 %); addbmm was skipped."""
    torch.manual_seed(9)
    x = torch.randn(6, 16)
    calls, cov = _capture(_ChainOps(), x)
    assert list(calls) == ["#addbmm"] and calls["#addbmm"].grad_output is not None
    torch.testing.assert_close(calls["#addbmm"].activation, x.repeat(1, 3))
    table = cov.table().set_index("op")
    assert table.loc["multi_dot", "gflops"] * 1e9 == pytest.approx(2 * 6 * 16 * 16 + 2 * 6 * 16 * 40)
    assert "a chain of GEMMs" in table.loc["multi_dot", "reason"]
    assert table.loc["bilinear", "gflops"] * 1e9 == pytest.approx(2 * 6 * 4 * 16 * 8)
    captured = 3 * 2 * 6 * 16 * 16
    total = captured + 2 * 6 * 16 * 16 + 2 * 6 * 16 * 40 + 2 * 6 * 4 * 16 * 8
    assert cov.summary()["flop_share"] == pytest.approx(captured / total)


def test_wrapped_export_and_eager_share_names_and_numbers() -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.m = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x)

    model, x = _encoder(), torch.randn(2, 5, 16)
    eager = analyze(model, [x], "ocp-rowwise")
    exported = analyze(from_exported_program(torch.export.export(Wrapper(model), (x,))), [x], "ocp-rowwise")
    assert exported.tables["layers"]["layer"].tolist() == eager.tables["layers"]["layer"].tolist()
    a = exported.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    b = eager.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    assert len(a) == 13 * 3 - 1  # (the first layer's input is the data: no dgrad)
    assert (a - b).abs().max() < 1e-3


def test_layers_regex_skips_are_counted() -> None:
    calls, cov = _capture(_encoder(), torch.randn(2, 5, 16), layers=r"#(qk|pv)$")
    assert sorted(calls) == sorted(f"0.layers.{i}.self_attn#{g}" for i in (0, 1) for g in ("qk", "pv"))
    assert cov.summary()["skipped"] == {"linear: not matched by --layers": 9}


def test_strategies_run_two_activation_gemms_per_slice() -> None:
    torch.manual_seed(6)
    A, B, G = torch.randn(3, 8, 32), torch.randn(3, 5, 32), torch.randn(3, 8, 5)
    from fp8probe.analysis.strategies import run_strategy

    for name, strat in STRATEGIES.items():
        out = run_strategy(strat, A, B, G, b_is_weight=False)
        assert out.gemms["fprop"].shape == (3, 8, 5) and out.gemms["wgrad"].shape == (3, 5, 32), name
        one = run_strategy(strat, A[1], B[1], G[1], b_is_weight=False)
        torch.testing.assert_close(out.gemms["fprop"][1], one.gemms["fprop"])
        assert "Two activations" in strat.rules and "slice" in strat.rules
    # ocp-blockwise: a second activation gets 1x128 tiles, not the weight's 128x128 blocks
    blk = STRATEGIES["ocp-blockwise"]
    a2, b2 = torch.randn(4, 256), torch.randn(130, 256)
    q_act = run_strategy(blk, a2, b2, None, b_is_weight=False).operands["weight"][1]
    q_w = run_strategy(blk, a2, b2, None, b_is_weight=True).operands["weight"][1]
    torch.testing.assert_close(q_act, _fq_scaled(b2, "e4m3", "block", (1, 128))[0])
    assert not torch.equal(q_act, q_w)


@pytest.mark.parametrize("equation, shapes, captured", [
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)], True),
    ("...qd,...kd->...qk", [(2, 3, 5, 4), (2, 3, 6, 4)], True),
    ("bqd,kd->bkq", [(2, 5, 4), (6, 4)], True),
    ("ij,jk", [(5, 4), (4, 6)], True),                      # implicit output "ik"
    ("i,j->ij", [(5,), (6,)], False),                       # outer product: no contraction
    ("bij,bjk,bkl->bil", [(2, 3, 4), (2, 4, 5), (2, 5, 6)], False),
])
def test_einsum_becomes_one_bmm_or_is_skipped_with_reason(equation, shapes, captured) -> None:
    torch.manual_seed(7)
    ops = [torch.randn(s) for s in shapes]
    expected = torch.einsum(equation, *ops)

    class Recompute(GemmHandler):
        def replace(self, site):
            a, b = site.operands()
            return a @ b.mT

    cov = Coverage()
    with intercept(nn.Identity(), Recompute(), cov):
        got = torch.einsum(equation, *ops)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    row = cov.table().iloc[0]
    assert (row["op"], row["kind"], row["captured"]) == ("einsum", "matmul" if captured else "other", int(captured))
    if not captured:
        assert row["reason"].startswith("einsum ")
        # an outer product sums no index: torch multiplies, no GEMM FLOPs; the chain is two bmm
        assert row["gflops"] * 1e9 == pytest.approx(0.0 if len(ops) == 2 else 2 * 2 * 3 * 4 * 5 + 2 * 2 * 3 * 5 * 6)


@pytest.mark.parametrize("equation, shapes", [
    ("ti,ij,jk->tk", [(32, 64), (64, 64), (64, 64)]),
    ("ij,jk,kl,lm->im", [(3, 40), (40, 2), (2, 50), (50, 7)]),
    ("ij,ij,ij->i", [(3, 4), (3, 4), (3, 4)]),                # an elementwise product first, then one bmm
    ("...ij,...jk,k->...i", [(2, 3, 4), (2, 4, 5), (5,)]),
    ("ab,bc,ca->", [(4, 5), (5, 6), (6, 4)]),
    ("bi,bj,ij->b", [(2, 3), (2, 4), (3, 4)]),                # an outer product first, then one bmm
])
def test_an_einsum_of_more_operands_counts_the_pairwise_gemms_torch_runs(equation, shapes) -> None:
    """Its FLOPs were the product of every index size (32x too many on the first chain: the coverage share read
    1.5 % where it is 33 %) and the reason did not say how to capture it."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(8)
    ops = [torch.randn(s) for s in shapes]
    with FlopCounterMode(display=False) as counter:
        expected = torch.einsum(equation, *ops)
    cov = Coverage()
    with intercept(nn.Identity(), GemmHandler(), cov):
        got = torch.einsum(equation, *ops)
    torch.testing.assert_close(got, expected)
    row = cov.table().iloc[0]
    assert (row["op"], row["kind"], row["executed"], row["captured"]) == ("einsum", "other", 1, 0)
    assert row["gflops"] * 1e9 == pytest.approx(counter.get_total_flops())
    assert f"einsum of {len(shapes)} operands: torch runs it as " in row["reason"]
    if not torch.backends.opt_einsum.is_available():  # left to right (opt_einsum would pick its own pairs)
        gemms = 1 if equation in ("ij,ij,ij->i", "bi,bj,ij->b") else len(shapes) - 1
        assert f"torch runs it as {gemms} pairwise GEMM" in row["reason"]


def _packed() -> tuple:
    torch.manual_seed(12)
    return (nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 8), torch.tensor([3, 2])),)


@pytest.mark.parametrize("make, args, op", [
    (lambda: nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True), lambda: (torch.randn(2, 5, 8),),
     "lstm"),
    (lambda: nn.LSTM(8, 16, proj_size=4), lambda: (torch.randn(5, 2, 8),), "lstm"),
    (lambda: nn.LSTM(8, 16), _packed, "lstm"),
    (lambda: nn.GRU(8, 16), lambda: (torch.randn(5, 2, 8),), "gru"),
    (lambda: nn.RNN(8, 16, nonlinearity="relu"), lambda: (torch.randn(5, 8),), "rnn_relu"),
    (lambda: nn.LSTMCell(8, 16), lambda: (torch.randn(2, 8),), "lstm_cell"),
    (lambda: nn.GRUCell(8, 16), lambda: (torch.randn(2, 8),), "gru_cell"),
    (lambda: nn.RNNCell(8, 16), lambda: (torch.randn(8),), "rnn_tanh_cell"),
])
def test_recurrent_layers_are_counted_as_skipped_with_their_flops(make, args, op) -> None:
    """An LSTM/GRU/RNN (or cell) ran its GEMMs in one fused op the capture never saw: it was neither captured nor
    counted, and a model whose FLOPs were 99 % an LSTM read "captured 1 of 1 GEMMs = 100.0 %"."""
    torch.manual_seed(11)
    layer, inputs = make(), args()
    expected = layer(*inputs)
    cov = Coverage()
    with intercept(nn.Identity(), GemmHandler(), cov):
        got = layer(*inputs)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    torch.testing.assert_close(first(got).data if op == "lstm" and isinstance(first(got), nn.utils.rnn.PackedSequence)
                               else first(got), first(expected).data
                               if isinstance(first(expected), nn.utils.rnn.PackedSequence) else first(expected))
    row = cov.table().iloc[0]
    assert (row["op"], row["kind"], row["executed"], row["captured"], row["skipped"]) == (op, "other", 1, 0, 1)
    assert "recurrent layer" in row["reason"]
    # every 2-D weight (each layer and direction: w_ih, w_hh, an LSTM's projection) times every token, twice
    x = inputs[0].data if isinstance(inputs[0], nn.utils.rnn.PackedSequence) else inputs[0]
    tokens = x.numel() // x.shape[-1]
    weights = [p for n, p in layer.named_parameters() if p.dim() == 2]
    assert row["gflops"] * 1e9 == pytest.approx(2 * tokens * sum(w.numel() for w in weights))


def test_a_model_around_an_lstm_reports_its_share() -> None:
    """The coverage line of the CLI: the LSTM's FLOPs are in the total, so the captured share is the head's."""
    torch.manual_seed(13)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(64, 128, batch_first=True), nn.Linear(128, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])

    calls, cov = _capture(Tagger(), torch.randn(2, 16, 64))
    assert list(calls) == ["head"]
    head = 2 * 32 * 128 * 8
    lstm = 2 * 32 * (512 * 64 + 512 * 128)
    assert cov.summary()["flop_share"] == pytest.approx(head / (head + lstm))
    assert cov.summary()["skipped"] == {"lstm: recurrent layer: its GEMMs run inside one fused op (not captured)": 1}


def test_exported_cnn_has_the_same_conv_sites_and_numbers() -> None:
    torch.manual_seed(8)
    model, x = _CNN().eval(), torch.randn(2, 3, 8, 8)
    eager = analyze(model, [x], "mxfp8")
    program = from_exported_program(torch.export.export(model, (x,)))
    targets = {str(n.target) for n in program.module.graph.nodes if n.op == "call_function"}
    assert "aten.conv1d.padding" in targets  # padding="same" keeps its own overload in the graph
    exported = analyze(program, [x], "mxfp8")
    for name in ("layers", "coverage"):
        assert exported.tables[name].equals(eager.tables[name]), name
    a = exported.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    b = eager.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    assert len(a) == 4 * 3 - 1 and (a - b).abs().max() < 1e-3  # (conv1 takes the data: no dgrad)


_MHA_SCRIPT = r"""
import json, sys
import torch
if sys.argv[1] == "old-torch":  # torch < 2.12 has no torch.overrides.redispatch_function
    del torch.overrides.redispatch_function
from torch import nn
from fp8probe.analysis.pipeline import analyze

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 4)
    def forward(self, x):
        return self.out(self.att(x, x, x)[0])

torch.manual_seed(0)
res = analyze(Net(), torch.randn(2, 6, 16), "global", e2e=False)
layers = res.tables["layers"]
print(json.dumps({"layers": list(zip(layers["layer"], layers["kind"])),
                  "sqnr": [float(v) for v in res.tables["gemm"]["sqnr_db"]]}))
"""


def test_multihead_attention_is_captured_without_torch_redispatch_function() -> None:
    """torch < 2.12 (the GPU machine's 2.11) has no torch.overrides.redispatch_function; gemms.py then skips
    the dispatch hop with torch's private function: nn.MultiheadAttention (a Python composite the mode
    re-enters) gives the same GEMMs and numbers either way."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    runs = {}
    for mode in ("current", "old-torch"):
        out = subprocess.run([sys.executable, "-c", _MHA_SCRIPT, mode], capture_output=True, text=True, timeout=300,
                             cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        assert out.returncode == 0, out.stderr[-2000:]
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    kinds = dict(map(tuple, runs["current"]["layers"]))
    # the composite's body ran under the mode: its projections and its two batched products were captured
    assert kinds["att.in_proj"] == kinds["att.out_proj"] == "linear" and kinds["att#bmm"] == kinds["att#bmm#1"] == "matmul"
    assert runs["old-torch"] == runs["current"]


@pytest.mark.parametrize("how", ["script", "trace", "inside"])
def test_torchscript_modules_are_refused_by_name(how: str) -> None:
    """A scripted module was blamed on the inputs (register_forward_pre_hook is not supported on ScriptModules),
    a traced one "ran no GEMM"."""
    from fp8probe.analysis.loading import LoadError

    torch.manual_seed(11)
    body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 8)
    if how == "script":
        model, name = torch.jit.script(body), "the model is"
    elif how == "trace":
        model, name = torch.jit.trace(body, x), "the model is"
    else:
        model, name = nn.Sequential(nn.Linear(8, 8), torch.jit.script(body)), "1 is"
    with pytest.raises(LoadError, match=f"^{name} a TorchScript module .* torch.export"):
        analyze(model, [x], "global", e2e=False)


class _PooledBackbone(nn.Module):
    """Every parameter under one child, a parameter-free head: the names keep the child's path."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean(-1)


def test_names_are_module_paths_even_when_every_parameter_shares_a_prefix() -> None:
    """"backbone." was stripped: the layers were "0" and "2", and --layers '^backbone\\.2$' matched nothing."""
    torch.manual_seed(12)
    model, x = _PooledBackbone(), torch.randn(4, 8)
    calls, _ = _capture(model, x)
    assert sorted(calls) == ["backbone.0", "backbone.2"]
    res = analyze(model, [x], "global", layers=r"^backbone\.2$", e2e=False)
    assert res.tables["layers"]["layer"].tolist() == ["backbone.2"]


def test_a_bare_linear_is_named_after_its_weight_as_its_state_dict_and_a_weights_only_run_name_it(tmp_path) -> None:
    """A model that is itself an nn.Linear got the empty name: "worst layer  at 30.4 dB" and an empty layer column
    (user test). Its GEMM is "weight", its state_dict key, the name a weights-only run of that state dict gives."""
    from fp8probe.analysis.weights_only import analyze_weights, open_checkpoint

    torch.manual_seed(13)
    model, x = nn.Linear(16, 8), torch.randn(4, 16)
    calls, _ = _capture(model, x)
    assert list(calls) == ["weight"]
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    res = analyze_weights(open_checkpoint(tmp_path / "sd.pt"), "global")
    assert res.tables["layers"]["layer"].tolist() == ["weight"]


def test_a_model_of_uncapturable_gemms_says_which_ran() -> None:
    """A model whose GEMMs all ran but none could be captured (an LSTM, a complex linear, an integer conv) was told
    "the model ran no GEMM of the selected kinds": it ran them, and the message names them with their reasons."""
    from fp8probe.analysis.loading import LoadError

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(x)[0]

    class Complex(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8, dtype=torch.complex64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.w).abs()

    class IntConv(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv1d(x, torch.ones(2, 3, 1, dtype=torch.long)).float()

    torch.manual_seed(14)
    for model, x, want in [(Recurrent(), torch.randn(3, 2, 8), "1 × gru: recurrent layer"),
                           (Complex(), torch.randn(3, 8, dtype=torch.complex64),
                            "1 × linear: complex operands (no FP8/INT8 form)"),
                           (IntConv(), torch.ones(2, 3, 5, dtype=torch.long), "1 × conv1d: non-floating-point operands")]:
        with pytest.raises(LoadError, match="no GEMM was captured") as err:
            analyze(model, [x], "int8", e2e=False)
        assert f"the GEMMs the model ran cannot be analysed: {want}" in str(err.value)
