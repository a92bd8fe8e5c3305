"""Small seeded models for the end-to-end tests: a classifier whose one layer reads planted outlier columns
(global FP8 must fail there) and the same classifier without them (no hard layer)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HARD_LAYER = "blocks.2"
OUTLIER_COLS = (3, 11)
# A soft head (loss ≈ 1.76 nats on its own argmax labels): the ~28 dB noise of 8-bit recipes in every
# layer then moves the loss by ~0.35 % (inside the 1 % budget), while losing blocks.2's input moves it
# by ~2 % with global FP8 (measured).
HEAD_SCALE = 0.25
# |x| ≈ 1e6 (2^20) in two columns next to |x| < 1 elsewhere: one absmax per tensor puts the unit-scale
# columns below the smallest bnb-e4m3 / OCP E4M3 step (2^-17 of the max): they quantise to 0.
OUTLIER_GAIN = 1e6


class PlantedClassifier(nn.Module):
    """x [B, 16] → input linear → 4 residual tanh blocks → head (10 classes); forward(x, y) = cross-entropy.

    With ``planted`` the input of ``blocks.2`` carries columns OUTLIER_COLS multiplied by OUTLIER_GAIN,
    and that layer's weight columns are divided by it: the high-precision function is unchanged.
    Labels are the high-precision argmax, so damage to the function raises the loss.
    """

    def __init__(self, planted: bool, d: int = 32, n_blocks: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n_blocks))
        self.head = nn.Linear(d, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / (p.shape[-1] ** 0.5 if p.dim() == 2 else 10))
            self.head.weight.mul_(HEAD_SCALE)
        gain = torch.ones(d)
        if planted:
            gain[list(OUTLIER_COLS)] = OUTLIER_GAIN
            with torch.no_grad():
                self.blocks[2].weight[:, list(OUTLIER_COLS)] /= OUTLIER_GAIN
        self.register_buffer("gain", gain)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for i, blk in enumerate(self.blocks):
            h = h + torch.tanh(blk(h * self.gain if i == 2 else h))
        return self.head(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.logits(x)
        return out if y is None else F.cross_entropy(out, y)


def build(planted: bool, n_batches: int = 2, batch: int = 64, seed: int = 0):
    """(model in eval mode, [(x, y), ...]) with y the model's own high-precision argmax."""
    model = PlantedClassifier(planted, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, 16, generator=gen)
        with torch.no_grad():
            y = model.logits(x).argmax(-1)
        batches.append((x, y))
    return model, batches


def build_planted():
    """Factory for the CLI (``planted_models.py:build_planted``): the model with the hard layer and its batches."""
    return build(True)


def build_clean():
    """Factory for the CLI: the same classifier without planted outliers (no hard layer)."""
    return build(False)
