"""Shared pytest helpers: the device list, a `device` fixture and the location of the bnb reference vectors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: "cpu" always, plus "cuda" when a GPU is visible; parametrise device-dependent tests over it.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_REPO = Path(__file__).resolve().parents[1]
#: bitsandbytes 0.49.2 reference vectors (shared/vectors/README.md); FP8PROBE_VECTORS overrides.
VECTORS_DIR = (
    Path(os.environ["FP8PROBE_VECTORS"]) if os.environ.get("FP8PROBE_VECTORS") else _REPO / "tests" / "data" / "bnb_vectors"
)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn ("cpu", and "cuda" with a GPU)."""
    return request.param


def vectors_file(name: str) -> Path:
    """Path of a reference-vector file (committed under tests/data/bnb_vectors)."""
    path = VECTORS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"reference vectors not found at {path} (set FP8PROBE_VECTORS or restore tests/data/bnb_vectors)")
    return path
