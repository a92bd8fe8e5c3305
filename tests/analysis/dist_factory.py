"""Factories for the torchrun tests (tests/analysis/test_distributed.py): the tiny demo encoder with an odd number of batches."""
from __future__ import annotations

import os

import torch

from fp8probe.analysis.demo_model import DemoConfig, build_model, make_batches

CONFIG = DemoConfig(vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=2, seq=16, seed=3,
                    outlier_dims=(3, 17, 30), outlier_magnitudes=(20.0, -33.0, 58.0))
N_BATCHES = 5  # odd: rank 0 of 2 takes batches 0, 2, 4 and rank 1 batches 1, 3


LOG_ENV = "FP8PROBE_TEST_FORWARD_LOG"


def build():
    """(model, batches): the tiny demo encoder and five seeded batches of 2 x 16 tokens.

    With $FP8PROBE_TEST_FORWARD_LOG set, every forward appends "<rank> <batch index>" to that file
    (which rank ran which batch: the test checks the sharding)."""
    model = build_model(CONFIG)
    batches = make_batches(N_BATCHES, 2, CONFIG.seq, seed=11, vocab=CONFIG.vocab)
    log = os.environ.get(LOG_ENV)
    if log:
        index = {tuple(b[0].flatten().tolist()): i for i, b in enumerate(batches)}

        def record(module, args):
            with open(log, "a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {index[tuple(args[0].flatten().tolist())]}\n")

        model.register_forward_pre_hook(record)
    return model, batches


class _FailsOnThreeRows(torch.nn.Module):
    """The encoder, raising on a batch of 3 rows: the planted error of one rank only."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_model(CONFIG)

    def forward(self, tokens, targets=None):
        if tokens.shape[0] == 3:
            raise RuntimeError("planted failure on a 3-row batch")
        return self.inner(tokens, targets)


def build_failing():
    """Four batches; batch 1 (rank 1's first of 2 ranks) has 3 rows and makes the model raise."""
    batches = make_batches(4, 2, CONFIG.seq, seed=11, vocab=CONFIG.vocab)
    batches[1] = make_batches(1, 3, CONFIG.seq, seed=5, vocab=CONFIG.vocab)[0]
    return _FailsOnThreeRows(), batches


def build_per_rank():
    """Rank 1 builds the encoder from another seed: another model than rank 0's (its results were merged)."""
    import dataclasses

    rank = int(os.environ.get("RANK", "0"))
    model = build_model(dataclasses.replace(CONFIG, seed=CONFIG.seed + rank))
    return model, make_batches(N_BATCHES, 2, CONFIG.seq, seed=11, vocab=CONFIG.vocab)


def build_per_rank_batches():
    """Rank 1 loads three batches where rank 0 loads five (the rounds failed with raw Python errors)."""
    rank = int(os.environ.get("RANK", "0"))
    return build_model(CONFIG), make_batches(N_BATCHES if rank == 0 else 3, 2, CONFIG.seq, seed=11, vocab=CONFIG.vocab)


#: How long rank 1 of build_hanging sleeps in its first forward: far beyond the test's FP8PROBE_DIST_TIMEOUT, and
#: bounded, so a rank that torchrun failed to stop still ends.
HANG_S = 120


def build_hanging():
    """Rank 1 sleeps in its first forward (a hung rank): rank 0 waits at the round's gather until the timeout."""
    import time

    model, batches = build()
    if int(os.environ.get("RANK", "0")) == 1:
        model.register_forward_pre_hook(lambda module, args: time.sleep(HANG_S))
    return model, batches
