"""A stack of MLP blocks for the streaming tests (tests/analysis/test_streaming.py): size set by $FP8PROBE_TEST_STREAM_SIZE="width,blocks"."""
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
