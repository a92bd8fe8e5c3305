"""Shared pytest fixtures: a `device` fixture over every available device (helpers live in support.py)."""
from __future__ import annotations

import pytest

from support import DEVICES


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Each available device in turn ("cpu", and "cuda" with a GPU)."""
    return request.param
