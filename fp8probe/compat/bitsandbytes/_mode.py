"""Which numerics the bitsandbytes drop-in namespace runs: fp8probe's rules (None) or bitsandbytes 0.49.2's ("bnb")."""
from __future__ import annotations

import os

_MODES = (None, "bnb")
_ENV = "FP8PROBE_COMPAT"


def _from_env() -> str | None:
    value = os.environ.get(_ENV, "").strip()
    if value in ("", "none", "fp8probe"):
        return None
    if value != "bnb":
        raise ValueError(f"{_ENV} must be 'bnb', 'none' or unset, got {value!r}")
    return value


_current: str | None = _from_env()


def set_compat(mode: str | None) -> None:
    """Select the numerics of every later call (and layer construction) through the namespace.

    ``None``: fp8probe's defaults (SPEC §10: even-index ties, correct 1/127², NaN kept, ...).
    ``"bnb"``: bitsandbytes 0.49.2's behaviour, bit for bit where bitsandbytes runs on CPU.
    The start value comes from the environment variable ``FP8PROBE_COMPAT`` (``bnb`` or unset),
    so a script can switch without being edited.
    """
    global _current
    if mode not in _MODES:
        raise ValueError(f"compat mode must be None or 'bnb', got {mode!r}")
    _current = mode


def get_compat() -> str | None:
    """The mode selected with :func:`set_compat` (or ``FP8PROBE_COMPAT``)."""
    return _current
