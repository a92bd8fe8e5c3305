"""Hugging Face models built from tiny configs (random init, never downloaded): the saved class is the loaded class,
weights that do not fit are an error, GPT-2 gives the same layers and numbers as a directory and as .pt2, and
Llama's scaled_dot_product_attention is captured as QKᵀ and PV per layer."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from fp8probe.analysis.capture import capture_batch  # noqa: E402
from fp8probe.analysis.gemms import Coverage  # noqa: E402
from fp8probe.analysis.loading import Batch, LoadError, load_model  # noqa: E402
from fp8probe.analysis.pipeline import analyze  # noqa: E402
from fp8probe.analysis.strategies import _fq_scaled  # noqa: E402


def _bert(tmp_path, cls_name: str = "BertForSequenceClassification"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = getattr(transformers, cls_name)(cfg)
    d = tmp_path / cls_name
    model.save_pretrained(d)
    return model, d


def test_bert_directory_loads_the_saved_head_and_analyses_its_classifier(tmp_path) -> None:
    model, d = _bert(tmp_path)
    loaded = load_model(d)
    assert type(loaded.module) is transformers.BertForSequenceClassification
    assert "BertForSequenceClassification" in loaded.description
    for name, p in model.state_dict().items():  # exactly the saved weights, none re-initialised
        torch.testing.assert_close(loaded.module.state_dict()[name], p, rtol=0, atol=0)
    ids = torch.randint(0, 40, (2, 6))
    res = analyze(loaded, [{"input_ids": ids, "labels": torch.tensor([0, 2])}], "global")
    names = res.tables["layers"]["layer"].tolist()
    assert "classifier" in names and "bert.pooler.dense" in names
    assert "bert.encoder.layer.0.attention.self#qk" in names
    assert res.metadata["loss"]["kind"] == "model" and res.metadata["model"] == loaded.description


def test_hf_weights_that_do_not_fit_or_unknown_class_exit_with_the_reason(tmp_path) -> None:
    _, d = _bert(tmp_path, "BertModel")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"do not fit BertForSequenceClassification: .*missing weight\(s\) \(classifier"):
        load_model(d)
    cfg["architectures"] = ["BertForTimeTravel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="cannot build BertForTimeTravel .*has no such class, and modelling code"):
        load_model(d)
    # A directory whose config.json maps the classes to its own code (auto_map): what to do instead is said.
    cfg["auto_map"] = {"AutoModel": "modeling_travel.BertForTimeTravel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"has no such class; its config\.json maps the model to code in the "
                                        r"directory \(auto_map\).*--factory file\.py:build"):
        load_model(d)
    cfg["model_type"] = "time-travel"  # (AutoConfig itself needs the custom code now)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config\.json is not usable .*\(auto_map\), which fp8probe never runs"):
        load_model(d)


def test_a_failed_load_prints_nothing_but_the_error_and_names_a_missing_architecture(tmp_path, capfd) -> None:
    """transformers' own load report (a coloured multi-line table of missing/unexpected weights) went to stderr
    before the one-line error; a config.json without "architectures" built the headless base model and the error
    said only "1 unexpected weight(s) (classifier...)" (user test)."""
    _, d = _bert(tmp_path, "BertForSequenceClassification")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("architectures", None)
    (d / "config.json").write_text(json.dumps(cfg))
    capfd.readouterr()
    with pytest.raises(LoadError, match=r"do not fit BertModel: .*unexpected weight\(s\) .*config.json names no "
                                        r"architecture, so the base model without a head was built"):
        load_model(d)
    out, err = capfd.readouterr()
    assert err == "" and out == "", (out, err)


class _Logits(nn.Module):
    """What people export: the HF model wrapped so the program returns plain logits."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids).logits


def test_gpt2_directory_and_pt2_give_the_same_layers_and_numbers(tmp_path) -> None:
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    model.save_pretrained(tmp_path / "gpt2")
    torch.export.save(torch.export.export(_Logits(model), (), {"input_ids": ids}), tmp_path / "gpt2.pt2")
    batch = [{"input_ids": ids}]
    # one loss for both (the directory's causal LM would otherwise get its next-token loss, and the .pt2 of its
    # bare logits the surrogate): the gradients, and so dgrad / wgrad, are then the same
    def loss(o, b):
        return (o if isinstance(o, torch.Tensor) else o.logits).float().pow(2).mean()
    from_dir = analyze(load_model(tmp_path / "gpt2"), batch, "ocp-tensorwise", loss=loss)
    from_pt2 = analyze(load_model(tmp_path / "gpt2.pt2"), batch, "ocp-tensorwise", loss=loss)
    layers = from_dir.tables["layers"]["layer"].tolist()
    assert layers == from_pt2.tables["layers"]["layer"].tolist()
    # 4 Conv1D (addmm) + QKᵀ + PV per block, and the tied lm_head
    assert layers[:6] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn#qk", "transformer.h.0.attn#pv",
                          "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert len(layers) == 13 and layers[-1] == "lm_head"
    a = from_dir.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    b = from_pt2.tables["gemm"].set_index(["layer", "gemm"])["sqnr_db"]
    assert (a - b).abs().max() < 1e-3
    assert from_dir.metadata["coverage"]["flop_share"] == from_pt2.metadata["coverage"]["flop_share"] == 1.0


def test_llama_sdpa_captured_as_qk_and_pv_per_layer_matching_a_hand_decomposition() -> None:
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    calls, cov = [], Coverage()
    # The captured run's logits equal the fused kernel's (the decomposition is sdpa's math).
    out = {}
    capture_batch(model, Batch((), {"input_ids": ids}), calls.append, coverage=cov,
                  loss_fn=lambda o, b: out.setdefault("logits", o.logits).pow(2).mean(), loss_name="test")
    torch.testing.assert_close(out["logits"].detach(), expected, rtol=1e-5, atol=1e-5)
    by_name = {c.name: c for c in calls}
    for i in range(2):
        qk, pv = by_name[f"model.layers.{i}.self_attn#qk"], by_name[f"model.layers.{i}.self_attn#pv"]
        assert qk.activation.shape == (2 * 4, 7, 8) and qk.weight.shape == (2 * 4, 7, 8)  # k repeated for 4 heads
        assert qk.grad_output.shape == (8, 7, 7) and pv.grad_output.shape == (8, 7, 8)
        # PV's first operand is softmax(causal(q·kᵀ / sqrt(d))) of QKᵀ's operands
        scores = qk.activation @ qk.weight.mT / math.sqrt(8)
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        torch.testing.assert_close(pv.activation, scores.masked_fill(~causal, -math.inf).softmax(-1))
    assert cov.summary()["flop_share"] == 1.0 and cov.summary()["gemms_captured"] == 2 * (7 + 2) + 1
    # the recipe's number for a QKᵀ GEMM equals the one computed by hand from the captured operands
    res = analyze(model, [{"input_ids": ids}], "ocp-rowwise", layers=r"layers\.0\.self_attn#qk")
    qk = by_name["model.layers.0.self_attn#qk"]
    lp = torch.stack([_fq_scaled(qk.activation[h], "e4m3", "row", None)[0]
                      @ _fq_scaled(qk.weight[h], "e4m3", "row", None)[0].T for h in range(8)])
    ref = qk.activation.double() @ qk.weight.double().mT
    hand = 10 * math.log10(ref.pow(2).sum().item() / (ref - lp.double()).pow(2).sum().item())
    got = res.tables["gemm"].set_index(["layer", "gemm"]).loc[("model.layers.0.self_attn#qk", "fprop"), "sqnr_db"]
    assert got == pytest.approx(hand, rel=1e-6)


def test_causal_lm_without_labels_is_trained_on_its_next_token_loss_and_gets_kl() -> None:
    """A causal LM given only input_ids returned no loss, so its gradients came from the mean-of-squares surrogate
    and the end-to-end table had no KL or top-1 (QA). Its loss is now the one it computes from labels=input_ids,
    padding ignored, and its logits are compared as distributions."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on the second row
    labels = ids.masked_fill(mask == 0, -100)
    own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    info = capture_batch(model, Batch((), {"input_ids": ids, "attention_mask": mask}), lambda c: None,
                         loss_fn=None)
    assert info.kind == "next-token" and "input_ids" in info.detail
    from fp8probe.analysis.capture import choose_loss
    output = model(input_ids=ids, attention_mask=mask)
    loss, _ = choose_loss(output, Batch((), {"input_ids": ids, "attention_mask": mask}), None, None, model)
    torch.testing.assert_close(loss.detach(), own.detach(), rtol=1e-6, atol=1e-6)
    # the same model output without a causal LM's class is no next-token problem: still the surrogate
    _, plain = choose_loss(output, Batch((), {"input_ids": ids}), None, None, nn.Linear(2, 2))
    assert plain.kind == "surrogate"
    res = analyze(model, [{"input_ids": ids, "attention_mask": mask}], "ocp-tensorwise")
    assert res.metadata["loss"]["kind"] == "next-token"
    e2e = res.tables["e2e"].set_index("strategy")
    kl = e2e.loc["ocp-tensorwise", "kl_div"]
    assert kl is not None and math.isfinite(kl) and kl >= 0
    assert 0 <= e2e.loc["ocp-tensorwise", "top1_agreement"] <= 1


def test_too_long_saved_token_ids_are_named_as_too_long_not_as_the_first_layers_problem() -> None:
    """Saved ids longer than a GPT-2's positions fail in its position embedding ("index out of range"); the hint
    named the token embedding, the first layer, whose ids were valid (user test)."""
    from fp8probe.analysis.capture import InputsError, capture_batch
    from fp8probe.analysis.loading import Batch

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1,
                                                                 n_head=2)).eval()
    ids = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(1))
    with pytest.raises(InputsError, match=r"input_ids 1 x 20 int64: sequences of 20 tokens, longer than the 16 "
                                          r"positions the model's config allows \(max_position_embeddings\)"):
        capture_batch(model, Batch((), {"input_ids": ids}), lambda call: None)
    capture_batch(model, Batch((), {"input_ids": ids[:, :16]}), lambda call: None)  # (16 positions run)


def test_a_loss_leading_the_models_output_tuple_is_the_models_loss() -> None:
    """return_dict=False models return (loss, logits, ...): the loss was squared into the surrogate together with the
    logits (user test). The leading float scalar is the model's loss; a tuple without one keeps the surrogate."""
    from fp8probe.analysis.capture import TUPLE_LOSS_DETAIL, choose_loss

    torch.manual_seed(4)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(5))
    out = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    loss, info = choose_loss(out, Batch((), {"input_ids": ids}), None, None, nn.Linear(2, 2))
    assert info.kind == "model" and info.detail == TUPLE_LOSS_DETAIL and loss is out[0]
    _, info = choose_loss(out[1:], Batch((), {"input_ids": ids}), None, None, nn.Linear(2, 2))
    assert info.kind == "surrogate"
