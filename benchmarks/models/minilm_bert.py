"""A 6-layer BERT encoder shaped like MiniLM-L6 (d=384, 12 heads, MLP 1536, vocab 30522, pooler: 37 linear layers)
with random weights from a config (no download) and seeded batches of token ids (default 2 x 128 = 256 tokens).
It has no loss of its own: analyze differentiates its surrogate (flagged in the report)."""
from __future__ import annotations

import torch


def build(batches: int = 2, batch: int = 1, seq: int = 128, layers: int = 6, d_model: int = 384, heads: int = 12,
          d_ff: int = 1536, vocab: int = 30522):
    """(model, batches): ``batches`` dicts of ``batch`` x ``seq`` token ids and attention masks."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=d_ff, max_position_embeddings=512, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = BertModel(cfg)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return model, out
