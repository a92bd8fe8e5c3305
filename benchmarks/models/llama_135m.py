"""A Llama-style LM shaped like SmolLM-135M (30 layers, d=576, MLP 1536, 9 query / 3 KV heads, vocab 49152, tied
embeddings; 134.5M parameters, 211 linear layers) with random weights from a config (no download), and seeded
batches of token ids with next-token labels, so the model's own loss drives the gradients."""
from __future__ import annotations

import torch

VOCAB = 49152


def config(layers: int = 30, d_model: int = 576, d_ff: int = 1536, heads: int = 9, kv_heads: int = 3,
           vocab: int = VOCAB):
    """The transformers LlamaConfig (SmolLM-135M's shape by default; smaller for smoke tests)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                       tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa")


def build(batches: int = 2, batch: int = 1, seq: int = 128, **shape: int):
    """(model, batches): ``batches`` dicts of ``batch`` x ``seq`` token ids with labels (default 2 x 128 tokens)."""
    from transformers import LlamaForCausalLM

    cfg = config(**shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})  # the model shifts labels itself
    return model, out
