"""The C fast path's serial cutoff: one call on the machine's threads against the same call on one thread, by size.

Usage::

    python benchmarks/bench_threads.py [--cutoffs 65536,shipped] [--reps 5] [--calls 50] [--competing-load]
                                       [--markdown] [--quick]

Every C entry point runs on one thread below ``_fastpath.serial_cutoff()`` elements and on
``torch.get_num_threads()`` threads from there (each call starts its helper threads and joins them). This script
switches the cutoff inside one process (``serial_cutoff(n)``) between the values of ``--cutoffs`` and times the
calls the replay makes most on the operand sizes of the issue's models (a 128- or 256-token batch against
576- and 1536-wide layers): ``fused_scaled`` per tensor (e4m3) and MX 1x32 (mxfp8-e4m3), and ``error_sums`` of a
float64 reference against a float32 result. Per size and cutoff: the best of ``--reps`` rounds of ``--calls`` calls,
wall and process CPU time per call, the rounds of every cutoff interleaved so that a slow spell of a shared
machine hits all of them. ``--competing-load`` measures again while another process keeps two threads busy.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import _timing as T  # first: puts the repository root on sys.path
import torch

from bench_analyze import _with_load
from fp8probe.analysis.capture import keep_freed_blocks
from fp8probe.backends import cpu

SHAPES = ((128, 576), (256, 576), (128, 1536), (576, 576), (256, 1536), (1024, 576), (1536, 576), (2048, 1536))
QUICK_SHAPES = ((64, 64), (256, 576))


def _ops(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {"fused_scaled e4m3 tensor": lambda: cpu.fused_scaled(x, "e4m3", x.shape[0], x.shape[1]),
            "fused_scaled mxfp8 1x32": lambda: cpu.fused_scaled(x, "mxfp8-e4m3", 1, 32),
            "error_sums": lambda: cpu.error_sums(ref, x)}


def measure(shapes: tuple[tuple[int, int], ...], cutoffs: list[int], reps: int, calls: int) -> list[dict[str, object]]:
    """One row per shape and op: best wall / CPU microseconds per call under each cutoff."""
    ext = cpu._ext()
    shipped = ext.serial_cutoff()
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        for shape in shapes:
            x = torch.randn(*shape, generator=gen)
            ref = x.double() + torch.randn(*shape, generator=gen, dtype=torch.float64) * 1e-3
            for op, fn in _ops(x, ref).items():
                best = {c: [float("inf"), float("inf")] for c in cutoffs}
                for _ in range(reps):
                    for c in cutoffs:
                        ext.serial_cutoff(c)
                        fn()
                        w0, c0 = time.perf_counter(), time.process_time()
                        for _ in range(calls):
                            fn()
                        wall, cpu_s = (time.perf_counter() - w0) / calls, (time.process_time() - c0) / calls
                        best[c] = [min(best[c][0], wall), min(best[c][1], cpu_s)]
                row: dict[str, object] = {"op": op, "shape": f"{shape[0]}x{shape[1]}", "elements": x.numel()}
                for c in cutoffs:
                    row[f"wall_us_{c}"], row[f"cpu_us_{c}"] = best[c][0] * 1e6, best[c][1] * 1e6
                base = cutoffs[-1]
                for c in cutoffs[:-1]:
                    row[f"x_wall_{c}"] = best[c][0] / best[base][0]
                rows.append(row)
    finally:
        ext.serial_cutoff(shipped)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cutoffs", default="65536,shipped",
                    help="element counts to compare, 'shipped' = the one in use (the built-in one outside the tests); the last "
                         "is the ratios' base")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--reps", type=int, default=5, help="rounds per cutoff (the best counts)")
    ap.add_argument("--calls", type=int, default=50, help="calls per round")
    ap.add_argument("--competing-load", action="store_true",
                    help="measure again while another process keeps two threads busy")
    ap.add_argument("--quick", action="store_true", help="two small shapes, 1 round of 3 calls (a smoke test)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for RESULTS.md)")
    args = ap.parse_args(argv)
    if not cpu.available():
        raise SystemExit("error: the C extension fp8probe._fastpath is not built (pip install -e . builds it)")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    shipped = cpu._ext().serial_cutoff()
    try:
        cutoffs = [shipped if c.strip() == "shipped" else int(c) for c in args.cutoffs.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"error: --cutoffs must be element counts or 'shipped', got {args.cutoffs!r}") from None
    if len(cutoffs) < 2 or len(set(cutoffs)) != len(cutoffs) or min(cutoffs) < 0:
        raise SystemExit(f"error: --cutoffs needs two or more distinct counts >= 0, got {args.cutoffs!r}")
    reps, calls, shapes = (1, 3, QUICK_SHAPES) if args.quick else (args.reps, args.calls, SHAPES)
    keep_freed_blocks()  # as the command line: outputs from freed heap blocks, not fresh page-faulting maps
    info = T.machine_info("cpu")
    info["serial_cutoff"] = f"{shipped} (in use; --cutoffs 'shipped')"
    T.print_header("bench_threads: the C fast path's serial cutoff", info)
    columns = [T.Column("op", "op"), T.Column("shape", "shape"), T.Column("elements", "elements")]
    for c in cutoffs:
        columns += [T.Column(f"wall_us_{c}", f"µs, cutoff {c}"), T.Column(f"cpu_us_{c}", f"CPU µs, cutoff {c}")]
    columns += [T.Column(f"x_wall_{c}", f"time ×, cutoff {c}", "{:.2f}") for c in cutoffs[:-1]]
    loads = [("idle", lambda: measure(shapes, cutoffs, reps, calls))]
    if args.competing_load:
        loads.append(("beside a 2-thread busy loop", lambda: _with_load(lambda: measure(shapes, cutoffs, reps, calls))))
    for label, run in loads:
        print(f"\n{label}, torch threads {torch.get_num_threads()}:")
        print(T.render_table(run(), columns, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
