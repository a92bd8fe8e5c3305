"""Shared fixtures for the analysis tests: a tiny seeded demo encoder (d=32, 2 layers) and its batches."""
from __future__ import annotations

import pytest
import torch

from tiny_factory import CONFIG as TINY

from fp8probe.analysis.demo_model import build_model, make_batches


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return build_model(TINY)


@pytest.fixture
def tiny_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(2, 4, TINY.seq, seed=11, vocab=TINY.vocab)
