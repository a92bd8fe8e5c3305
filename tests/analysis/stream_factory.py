"""Models for the streaming tests (tests/analysis/test_streaming.py): a stack of MLP blocks (size set by $FP8PROBE_TEST_STREAM_SIZE="width,blocks"), a weight-tied LM, and one whose output reads a block's weight."""
from __future__ import annotations

import os

import torch
from torch import nn

SIZE_ENV = "FP8PROBE_TEST_STREAM_SIZE"


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Tower(nn.Module):
    """Embedding-free: inputs are float [batch, tokens, width]; ``blocks`` then a ``head``."""

    def __init__(self, width: int, n_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build() -> Tower:
    width, n_blocks = (int(v) for v in os.environ.get(SIZE_ENV, "32,3").split(","))
    torch.manual_seed(0)
    return Tower(width, n_blocks)


class TiedLM(nn.Module):
    """nanoGPT's weight tying: ``head.weight`` is the Parameter ``embed.weight``; inputs are token ids [batch, tokens]."""

    def __init__(self, vocab: int = 48, width: int = 32, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(n_blocks))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CrossUse(Tower):
    """The output projection reads ``blocks[0].fc2.weight`` outside that block's forward (functionally)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.nn.functional.linear(x, self.blocks[0].fc2.weight.t())


def build_tied() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


def build_cross_use() -> CrossUse:
    torch.manual_seed(0)
    return CrossUse(32, 2)
