"""Where the peak resident memory of ``analyze`` goes: resident set sampled every few ms, each sample tagged with
the part of the replay running then (a recipe by name, the float64 reference, the tensor statistics, or "model"
for the capture's forward / backward between sites), for the whole model and for its largest GEMM site.

Usage: ``python benchmarks/rss_breakdown.py [--model llama-135m|bert] [--strategy all] [--quick] [--markdown]``.

Why: bench_analyze.py reports one peak RSS per run (issue 15's target: at most 2x the fp32 model). This says
which part sets it. Method: the model of bench_analyze.py (random weights), one batch, end-to-end part off, glibc's
default malloc thresholds (no keep_freed_blocks: freed large blocks go back to the OS, so the resident set follows
what is alive), the replay serial (FP8PROBE_REPLAY_WORKERS=1: one part at a time, so each sample has one owner).
The resident set is sampled by a thread every ``--interval-ms``; a part's peak is the highest sample taken while it
ran, shown as MiB above the resident set just before the measured analysis and as a multiple of the fp32 model.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import _timing as T  # noqa: E402  (puts the repository root on sys.path)
import bench_analyze as B  # noqa: E402

MIB = 1 << 20


def measure(model_name: str, strategy: str, quick: bool, interval_s: float) -> dict:
    """Peak RSS above the start per part of the replay, for the run and for its largest site."""
    import torch

    from fp8probe.analysis import pipeline as P
    from fp8probe.analysis import strategies as S

    model, batches = B.build_model(model_name, quick)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    P.analyze(model, batches[:1], strategy, layers=B.WARMUP_LAYERS, e2e=False)  # one-off costs first
    current = ["model"]
    site: list = [None]
    peaks: dict[str, float] = {}
    site_peaks: dict[tuple, dict[str, float]] = {}

    def tagged(name: str, fn):  # noqa: ANN001, ANN202
        def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            before, current[0] = current[0], name(args) if callable(name) else name
            try:
                return fn(*args, **kwargs)
            finally:
                current[0] = before
        return run

    orig = (P._Analysis._strategy, P._Analysis._stats, P.reference_gemms, P._Analysis._replay)
    P._Analysis._strategy = tagged(lambda a: a[1].name, orig[0])
    P._Analysis._stats = tagged("statistics", orig[1])
    P.reference_gemms = tagged("float64 reference", orig[2])

    def replay(self, call):  # noqa: ANN001, ANN202
        site[0] = (call.name, tuple(call.weight.shape))
        try:
            return orig[3](self, call)
        finally:
            site[0] = None
    P._Analysis._replay = replay
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = B.current_rss() / MIB
            part, where = current[0], site[0]
            peaks[part] = max(peaks.get(part, 0.0), rss)
            if where is not None:
                mine = site_peaks.setdefault(where, {})
                mine[part] = max(mine.get(part, 0.0), rss)
            time.sleep(interval_s)

    workers = os.environ.get("FP8PROBE_REPLAY_WORKERS")
    os.environ["FP8PROBE_REPLAY_WORKERS"] = "1"  # one part at a time: each sample has one owner
    start = B.current_rss() / MIB
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        P.analyze(model, batches[:1], strategy, e2e=False)
    finally:
        stop.set()
        thread.join()
        P._Analysis._strategy, P._Analysis._stats, P.reference_gemms, P._Analysis._replay = orig
        if workers is None:
            os.environ.pop("FP8PROBE_REPLAY_WORKERS", None)
        else:
            os.environ["FP8PROBE_REPLAY_WORKERS"] = workers
    largest = max(site_peaks, key=lambda k: max(site_peaks[k].values()))
    return {"model": model_name + (" (quick)" if quick else ""), "model_mib": model_bytes / MIB, "start_mib": start,
            "peaks": peaks, "largest_site": largest, "site_peaks": site_peaks[largest],
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-135m", choices=sorted(B.MODELS))
    ap.add_argument("--strategy", default="all")
    ap.add_argument("--quick", action="store_true", help="the 2-layer, 64-wide model (a smoke test)")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args.model, args.strategy, args.quick, args.interval_ms / 1000)
    T.print_header("rss_breakdown", T.machine_info("cpu"))
    print(f"# rss_breakdown: {r['model']}, strategy {args.strategy}, 1 batch, e2e off, serial replay; fp32 model "
          f"{r['model_mib']:.0f} MiB, RSS at start {r['start_mib']:.0f} MiB")
    for title, peaks in (("whole run", r["peaks"]),
                         (f"largest site {r['largest_site'][0]} {list(r['largest_site'][1])}", r["site_peaks"])):
        rows = sorted(peaks.items(), key=lambda kv: -kv[1])
        print(f"\n{title}: peak RSS above the start, per part running at the sample")
        print("| part | MiB above start | × fp32 model |" if args.markdown else f"{'part':24s} {'MiB':>8s} {'×model':>8s}")
        if args.markdown:
            print("|---|---:|---:|")
        for part, rss in rows:
            above = rss - r["start_mib"]
            line = (f"| {part} | {above:.0f} | {above / r['model_mib']:.2f} |" if args.markdown
                    else f"{part:24s} {above:8.0f} {above / r['model_mib']:8.2f}")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
