"""Factory file used by the CLI tests as ``--factory tests/analysis/tiny_factory.py:build``."""
from __future__ import annotations

from fp8probe.analysis.demo_model import DemoConfig, build_model, make_batches

CONFIG = DemoConfig(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, seq=16, seed=3,
                    outlier_dims=(3, 17, 30), outlier_magnitudes=(20.0, -33.0, 58.0))


def build():
    """(model, batches): the tiny demo encoder and two seeded batches of 4 x 16 tokens."""
    return build_model(CONFIG), make_batches(2, 4, CONFIG.seq, seed=11, vocab=CONFIG.vocab)


def build_model_only():
    """Just the model (no batches), for the state_dict + factory path."""
    return build_model(CONFIG)


def logits_loss(output, batch):
    """A custom loss for --loss: mean absolute logit (the model is called without targets)."""
    return output.abs().mean()
