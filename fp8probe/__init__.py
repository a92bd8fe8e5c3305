"""fp8probe: FP8 / INT8 matmul numerics — a bitsandbytes-compatible quantisation suite on CPU and CUDA, plus analysis and reports."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from . import autograd, formats, functional, nn  # noqa: E402  (after __version__: submodules may read it)
from .autograd import *  # noqa: E402,F401,F403
from .formats import *  # noqa: E402,F401,F403
from .functional import *  # noqa: E402,F401,F403
from .nn import *  # noqa: E402,F401,F403

# Public names of each layer, de-duplicated (functional re-exports the codebook constructors).
__all__ = list(dict.fromkeys([
    "__version__",
    *formats.__all__,
    *functional.__all__,
    *autograd.__all__,
    *nn.__all__,
]))

# Resolved on first access only: the analysis layer pulls in pandas/matplotlib, and `import fp8probe`
# must stay cheap (tests/test_layering.py). Kept out of __all__ so `from fp8probe import *` stays cheap too.
_LAZY = {"analyze": ("fp8probe.analysis.pipeline", "analyze"),
         "analyze_weights": ("fp8probe.analysis.weights_only", "analyze_weights")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'fp8probe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
