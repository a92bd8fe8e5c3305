"""Old vs new C scaled-cast kernels in one process: CPU and wall time of quantize_scaled / dequantize_scaled / fused_scaled.

Usage::

    python benchmarks/compare_scaled_kernels.py OLD_SO [--rows 4096] [--dtype float32] [--threads 1] [--reps 7]
        [--wall]

OLD_SO is a ``_fastpath`` extension built from an older ``fp8probe/_fastpath.c`` (for example
``git show REV:fp8probe/_fastpath.c > /tmp/old/_fastpath.c`` and the compile command of setup.py with
``-shared -fPIC -o /tmp/old/_fastpath_old.so``); it is loaded as a second module next to this checkout's
``fp8probe._fastpath``, and both are called on the same seeded N(0, 3²) tensor [rows, 4096] with reused
outputs (no page faults), so the comparison holds on a shared machine where wall clocks do not: the
minimum process CPU time of ``--reps`` calls is printed (with ``--threads 1`` that is the kernel's own time).
``--wall`` adds the minimum wall time of the same calls (``--threads 2``: how well the threads overlap, which
CPU time does not show; only meaningful on an idle machine). ``--rows 64`` (256K elements) measures from
cache, the default 4096 (16M) from memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import ModuleType

import _timing as T  # first: puts the repository root on sys.path
import torch

from fp8probe import _fastpath as NEW
from fp8probe.backends import cpu

# (label, C format code of _fastpath.quantize_scaled, tile rows, tile cols; 0 = the whole dimension)
CASES = [("e4m3 tensor", 0, 0, 0), ("e4m3 row", 0, 1, 0), ("e4m3 1x128", 0, 1, 128), ("e4m3 128x128", 0, 128, 128),
         ("e5m2 1x128", 1, 1, 128), ("mxfp8-e4m3 1x32", 2, 1, 32), ("mxfp4-e2m1 1x32", 6, 1, 32),
         ("nvfp4 1x16", 7, 1, 16)]
TABLE = {1: torch.float8_e5m2, 6: "mxfp4-e2m1", 7: "nvfp4"}


def load_old(path: str) -> ModuleType:
    """The extension at `path` as a module of its own (its init function is PyInit__fastpath)."""
    spec = importlib.util.spec_from_file_location("fp8probe_old._fastpath", path)
    if spec is None:
        raise SystemExit(f"error: cannot load {path!r} as an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_ms(fn, reps: int) -> tuple[float, float]:
    """(minimum process CPU time, minimum wall time) of fn() over reps calls after one warm-up call, in ms."""
    fn()
    cpu_best = wall_best = float("inf")
    for _ in range(reps):
        w, t = time.perf_counter(), time.process_time()
        fn()
        cpu_best = min(cpu_best, time.process_time() - t)
        wall_best = min(wall_best, time.perf_counter() - w)
    return cpu_best * 1e3, wall_best * 1e3


def main(argv: list[str] | None = None) -> int:
    """Print one line per scaling: old → new CPU ms of the three kernels."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_so", help="path of the old _fastpath extension")
    ap.add_argument("--rows", type=int, default=4096, help="rows of 4096 float elements (default 4096: 16M)")
    ap.add_argument("--dtype", choices=sorted(T.DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--wall", action="store_true", help="also print the minimum wall time (idle machine)")
    args = ap.parse_args(argv)
    if args.rows < 1 or args.threads < 1 or args.reps < 1:
        ap.error(f"--rows, --threads and --reps must be >= 1, got {args.rows}, {args.threads}, {args.reps}")
    old = load_old(args.old_so)
    dtype = T.DTYPES[args.dtype]
    R, C = args.rows, 4096
    x = (torch.randn(R, C, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    dt, n = cpu._DT[dtype], R * C
    data, q = torch.zeros(n, dtype=torch.uint8), torch.zeros(n)
    sat, out = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=dtype)
    what = "min CPU ms [wall ms]" if args.wall else "min CPU ms"
    print(f"# {R}x{C} {args.dtype}, {args.threads} thread(s), {what} of {args.reps}: old -> new")
    for label, fmt, br, bc in CASES:
        br, bc = min(br or R, R), min(bc or C, C)
        scale = torch.empty(-(-R // br), -(-C // bc))
        counts = torch.empty(3, scale.numel(), dtype=torch.int64)
        kind = TABLE.get(fmt, torch.float8_e4m3fn)
        table = cpu._fp8_table(kind) if isinstance(kind, torch.dtype) else cpu._lowbit_table(kind)
        cells = []
        for call in ("quantize", "dequantize", "fused"):
            times = []
            for M in (old, NEW):
                if call == "quantize":
                    fn = lambda M=M: M.quantize_scaled(x.data_ptr(), dt, R, C, br, bc, fmt, data.data_ptr(),  # noqa: E731
                                                       scale.data_ptr(), args.threads, 0)
                elif call == "dequantize":
                    M.quantize_scaled(x.data_ptr(), dt, R, C, br, bc, fmt, data.data_ptr(), scale.data_ptr(),
                                      args.threads, 0)
                    fn = lambda M=M: M.dequantize_scaled(data.data_ptr(), table.data_ptr(), scale.data_ptr(), R, C,  # noqa: E731
                                                         br, bc, out.data_ptr(), dt, args.threads)
                else:
                    fn = lambda M=M: M.fused_scaled(x.data_ptr(), dt, R, C, br, bc, fmt, q.data_ptr(),  # noqa: E731
                                                    sat.data_ptr(), scale.data_ptr(), counts.data_ptr(),
                                                    args.threads, 0)
                times.append(best_ms(fn, args.reps))
            (old_cpu, old_wall), (new_cpu, new_wall) = times
            cells.append(f"{call} {old_cpu:7.3f} -> {new_cpu:7.3f}"
                         + (f" [{old_wall:7.3f} -> {new_wall:7.3f}]" if args.wall else ""))
        print(f"{label:16s} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
