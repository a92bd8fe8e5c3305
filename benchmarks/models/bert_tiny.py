"""BERT-tiny-sized masked LM (2 layers, hidden 128, 2 heads; random weights from a config, no download) and
4 seeded batches of 4 x 32 tokens with MLM labels, so the model's own loss drives the gradients."""
from __future__ import annotations

import torch


def build():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=64)
    model = BertForMaskedLM(cfg)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=g)
        labels = torch.where(torch.rand(4, 32, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return model, batches
