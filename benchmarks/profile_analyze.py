"""Where ``analyze`` spends its time on a device: a cProfile of one run and, on CUDA, every host-device
synchronisation attributed to the fp8probe line that caused it.

Usage: ``python benchmarks/profile_analyze.py [--device cpu|cuda] [--model bert|llama-135m] [--strategy all]
[--top 40] [--quick] [--out PATH]``.

Why: on the first GPU run (benchmarks/RESULTS.md § GPU) analyze was slower on an H200 than on the CPU, with one
host thread busy the whole time: Python-side work per small operation bounds it. This script tells which.
It builds the model of ``bench_analyze.py`` (random weights), warms up on one layer (kernel compilation, lookup
tables), then

1. profiles one ``analyze(..., e2e=False)`` (``--e2e``: the end-to-end part too) with cProfile (the CUDA replay is serial, on this thread) and prints
   the functions with the most own time and the most cumulative time;
2. on CUDA, runs the same analysis again under ``torch.cuda.set_sync_debug_mode("warn")``: torch warns at every
   operation that makes the host wait for the GPU (``.item()``, ``bool()``, ``nonzero``, copies to the CPU, ...);
   each warning is attributed to the innermost fp8probe frame on the stack, and the lines with the most
   synchronisations are printed with their counts.

The report goes to stdout and, with ``--out``, to a file.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import _timing as T  # noqa: F401  (puts the repository root on sys.path)

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from bench_analyze import MODELS, WARMUP_LAYERS, build_model  # noqa: E402

PACKAGE_DIR = str(BENCH_DIR.parent / "fp8probe")


def _profile(model, batches, strategy: str, device: str, top: int, e2e: bool = False) -> tuple[float, str]:
    from fp8probe.analysis.pipeline import analyze

    prof = cProfile.Profile()
    wall0 = time.perf_counter()
    prof.enable()
    analyze(model, batches, strategy, e2e=e2e, device=device)
    T.sync(device)
    prof.disable()
    wall = time.perf_counter() - wall0
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return wall, out.getvalue()


def warnings_by_frame(run, match: str) -> Counter:
    """Run ``run()``; count the warnings whose text contains `match` by the innermost frame inside the fp8probe
    package at the moment they were issued ("fp8probe/file.py:line function"; "(outside fp8probe)" if none)."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if match not in str(message):
            return
        where = "(outside fp8probe)"
        for frame in reversed(traceback.extract_stack()[:-1]):
            if frame.filename.startswith(PACKAGE_DIR + "/"):
                where = f"fp8probe/{frame.filename[len(PACKAGE_DIR) + 1:]}:{frame.lineno} {frame.name}"
                break
        sites[where] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        run()
    return sites


def sync_sites(run) -> Counter:
    """``warnings_by_frame`` of torch's CUDA sync debug mode: every operation in ``run()`` that makes the host
    wait for the GPU (``.item()``, ``bool()``, ``nonzero``, copies to the CPU, ...) warns once."""
    import torch

    def debugged() -> None:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return warnings_by_frame(debugged, "synchroniz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="bert")
    ap.add_argument("--strategy", default="all")
    ap.add_argument("--top", type=int, default=40, help="functions listed per profile ordering")
    ap.add_argument("--quick", action="store_true", help="the small model configs (a smoke test)")
    ap.add_argument("--e2e", action="store_true",
                    help="profile the end-to-end part too (the default run's; without it the isolated analysis alone)")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args(argv)

    import torch

    from fp8probe.analysis.pipeline import analyze

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    from fp8probe.analysis import capture

    # the command line's process settings for analyze (cli._replay_process): without them every large temporary is
    # a fresh mapping whose page faults the profile charged to the C casts (3x their time in a Llama e2e profile)
    capture.keep_freed_blocks()
    model, batches = build_model(args.model, args.quick)
    analyze(model, batches[:1], args.strategy, layers=WARMUP_LAYERS, e2e=False, device=args.device)
    capture.freeze_loaded_objects()
    lines = [f"# profile_analyze: {args.model}{' (quick)' if args.quick else ''}, strategy {args.strategy}, "
             f"device {args.device}, torch {torch.__version__}, end-to-end part {'on' if args.e2e else 'off'}"]
    if args.device == "cuda":
        lines.append(f"# gpu: {torch.cuda.get_device_name(0)}")
    wall, report = _profile(model, batches, args.strategy, args.device, args.top, e2e=args.e2e)
    lines.append(f"# analyze under cProfile: {wall:.2f} s wall")
    if args.device == "cuda":
        t0 = time.perf_counter()
        sites = sync_sites(lambda: analyze(model, batches, args.strategy, e2e=False, device=args.device))
        total = sum(sites.values())
        lines.append(f"# host-device synchronisations in one analyze: {total} "
                     f"({time.perf_counter() - t0:.2f} s with the sync debug mode on)")
        lines.append("| syncs | fp8probe frame |")
        lines.append("|---|---|")
        lines += [f"| {n} | {where} |" for where, n in sites.most_common(args.top)]
    lines.append(report)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
