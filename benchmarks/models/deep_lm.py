"""A small but deep LLaMA-shaped language model: 30 blocks of q/k/v/o + gate/up/down projections and an LM
head = 211 linear layers (width 64), with a few planted outlier channels, plus 2 seeded batches of tokens.
For the 200-layer report screenshot and size check."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTH, FF, BLOCKS, VOCAB, SEQ = 64, 128, 30, 256, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(WIDTH, WIDTH, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(WIDTH, FF, bias=False)
        self.mlp.up_proj = nn.Linear(WIDTH, FF, bias=False)
        self.mlp.down_proj = nn.Linear(FF, WIDTH, bias=False)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        h = self.norm1(x)
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        x = x + a.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        h = self.norm2(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class DeepLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        with torch.no_grad():  # outlier channels in the residual stream, as large LMs develop them
            self.embed.weight[:, [5, 41]] *= 25.0

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        logits = self.lm_head(x)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def build():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        batches.append(((ids,), {"labels": ids.roll(-1, dims=1)}))
    return DeepLM(), batches
