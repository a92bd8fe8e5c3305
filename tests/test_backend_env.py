"""FP8PROBE_BACKEND is read at every call (reference._environ_reader reads os.environ's own store)."""
from __future__ import annotations

import os

import pytest

from fp8probe.backends import reference


@pytest.mark.parametrize("value, expected", [("reference", True), ("", False), ("Reference", False), ("cuda", False)])
def test_use_reference_follows_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.delenv("FP8PROBE_BACKEND", raising=False)
    assert reference.use_reference() is False
    monkeypatch.setenv("FP8PROBE_BACKEND", value)
    assert reference.use_reference() is expected
    os.environ["FP8PROBE_BACKEND"] = "reference"
    assert reference.use_reference() is True
    monkeypatch.delenv("FP8PROBE_BACKEND")
    assert reference.use_reference() is False


def test_reader_without_the_store_falls_back_to_get(monkeypatch: pytest.MonkeyPatch) -> None:
    class Plain(dict):  # a mapping without os._Environ's _data / encodekey
        pass

    env = Plain(FP8PROBE_TEST_X="1")
    monkeypatch.setattr(os, "environ", env)
    check = reference._environ_reader("FP8PROBE_TEST_X", "1")
    assert check() is True
    env["FP8PROBE_TEST_X"] = "0"
    assert check() is False
