"""The C metrics reductions (error_sums, operand_sums) against torch's float64 passes, and old vs new builds.

Usage::

    python benchmarks/bench_metrics.py [OLD_SO] [--threads 1] [--reps 15] [--quick]

What the replay runs per recipe and GEMM: ``error_sums`` (Σr², Σ(r−q)², Σq², Σr·q, max|r−q| and counts of a
float64 reference r against a float32 result q) and ``operand_sums`` (Σx², Σ(x−q)² and six counts of an
operand x against its quantised value q, with a saturation mask or without one: then a first pass finds
max|q|). Shapes: an MLP weight-sized [1536, 576] (in cache, the common case) and an LM head's [49152, 576]
(from memory). Seeded N(0, 1) data, finite. For each: the minimum process CPU time of ``--reps`` calls of
this checkout's extension, of ``OLD_SO`` (an older ``_fastpath`` build, loaded as a second module as in
compare_scaled_kernels.py) when given, and of the same sums by torch float64 ops (what analysis/metrics.py
runs without the extension), in ns per element. ``--quick``: small shapes, 2 reps (a smoke test).
"""
from __future__ import annotations

import argparse
import sys
import time
from types import ModuleType

import _timing as T  # first: puts the repository root on sys.path
import torch

from compare_scaled_kernels import load_old
from fp8probe import _fastpath as NEW

F32, F64 = 0, 3  # the C dtype codes (backends/cpu.py _SUM_DT)


def cpu_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best * 1e3


def torch_error(r: torch.Tensor, q: torch.Tensor) -> None:
    q64 = q.to(torch.float64)
    e = r - q64
    (r * r).sum(), (e * e).sum(), (q64 * q64).sum(), (r * q64).sum(), e.abs().max(), torch.isfinite(r).sum()


def torch_operand(x: torch.Tensor, q: torch.Tensor) -> None:
    x64 = x.to(torch.float64)
    e = x64 - q
    (x64 * x64).sum(), (e * e).sum(), (x != 0).sum(), (q == 0).sum(), torch.isfinite(x).sum()


def rows(mods: dict[str, ModuleType], shape: tuple[int, int], threads: int, reps: int) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    q = (r * (1 + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64))).float()
    x = torch.randn(shape, generator=gen)
    qx = x.to(torch.float8_e4m3fn).float()
    sat = torch.zeros(shape, dtype=torch.bool)
    n = r.numel()
    ops = {
        "error_sums": (lambda m: m.error_sums(r.data_ptr(), F64, q.data_ptr(), F32, n, threads),
                       lambda: torch_error(r, q)),
        "operand_sums, mask": (lambda m: m.operand_sums(x.data_ptr(), F32, qx.data_ptr(), F32, sat.data_ptr(), n,
                                                        threads),
                               lambda: torch_operand(x, qx)),
        "operand_sums, no mask": (lambda m: m.operand_sums(x.data_ptr(), F32, qx.data_ptr(), F32, 0, n, threads),
                                  None),
    }
    out = []
    for op, (c_call, torch_call) in ops.items():
        row: dict[str, object] = {"op": op, "shape": "x".join(map(str, shape))}
        for label, mod in mods.items():
            row[label] = cpu_ms(lambda: c_call(mod), reps) * 1e6 / n
        row["torch"] = cpu_ms(torch_call, reps) * 1e6 / n if torch_call is not None else None
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old_so", nargs="?", help="an older _fastpath extension to compare with")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 reps (a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mods = {"new": NEW}
    if args.old_so:
        mods = {"old": load_old(args.old_so), "new": NEW}
    shapes = [(64, 96), (300, 70)] if args.quick else [(1536, 576), (49152, 576)]
    reps = 2 if args.quick else args.reps
    T.print_header("fp8probe bench_metrics: the C metrics reductions, ns per element (min CPU time)",
                   T.machine_info("cpu"))
    labels = list(mods) + ["torch"]
    print("| op | shape | " + " | ".join(f"{k} ns/el" for k in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for shape in shapes:
        for row in rows(mods, shape, args.threads, reps):
            cells = ["—" if row[k] is None else f"{row[k]:.3g}" for k in labels]
            print(f"| {row['op']} | {row['shape']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
