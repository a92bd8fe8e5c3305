"""fp8probe: FP8 / INT8 matmul numerics — a bitsandbytes-compatible quantisation suite on CPU and CUDA, plus analysis and reports."""
from __future__ import annotations

import signal as _signal
import sys as _sys
from typing import Any

__version__ = "0.1.0"


def _exit_interrupted(signum: int, frame: Any) -> None:
    # os._exit, not SystemExit: the handler may run inside an import that swallows BaseException, and
    # nothing has been written yet that would need flushing or cleaning up.
    _sys.stderr.write("Aborted.\n")
    _sys.stderr.flush()
    import os

    os._exit(130)


# Ctrl-C while the command line is still importing torch (the first seconds) would print a 20-50 line
# KeyboardInterrupt traceback and die by SIGINT (-2) before cli.main() can turn it into exit 130. The
# CLI is the only process whose argv[0] is the "fp8probe" console script, or "-m" while Python is
# locating `python -m fp8probe`; there (and only there: a library user's Ctrl-C stays a
# KeyboardInterrupt) SIGINT exits 130 quietly until cli.main() restores the default handler.
_IS_CLI = bool(_sys.argv) and (_sys.argv[0] == "-m" or _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1]
                                in ("fp8probe", "fp8probe.exe"))
if _IS_CLI:
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _exit_interrupted)

# torch's CPU thread pool (OpenMP; GNU libgomp in the PyPI wheels) lets idle workers spin for work
# by default. On a shared machine a spinning worker burns a core another process needs, and a
# descheduled one stalls every parallel region: bench_analyze.py on a 2-core machine at load
# average ~5 took 17.5 s of CPU (34.6 s wall) by default, 4.4 s (6.8 s wall) with passive waiting.
# libgomp reads the variable once, when torch loads it, so the CLI process sets it here, before
# any torch import, unless the user chose a policy; a library user sets it before importing torch
# (README "Speed").
#
# Likewise THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator then aligns tensors of >= 2 MB to 2 MB and asks
# for transparent huge pages (madvise), so a fresh large temporary takes one page fault per 2 MB instead
# of one per 4 KiB. The replay allocates many (float64 references, quantised weights, transposed
# copies): on this project's AMD EPYC a fresh 113 MB clone took 80 ms, 20 ms so; a float32 → float64
# copy 150 → 32 ms. torch reads it at its first allocation; without THP in the kernel it changes nothing.
if _IS_CLI and "torch" not in _sys.modules:
    import os as _os

    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
