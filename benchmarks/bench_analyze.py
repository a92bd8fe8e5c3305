"""Wall time and peak memory of ``analyze --strategy all`` on a 6-layer, d=384 encoder (8 x 32 tokens) on CPU.

Usage: ``python benchmarks/bench_analyze.py [--layers 6] [--d-model 384] [--batch 8] [--seq 32]
[--batches 1] [--strategy all] [--threads N]``. Prints the seconds per linear layer (one batch,
all strategies, forward + backward capture included), the total, and the process's peak resident
memory (``resource.getrusage`` maxrss, which also sees torch's C++ allocations, unlike tracemalloc).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from fp8probe.analysis.demo_model import DemoConfig, build_model, make_batches
from fp8probe.analysis.pipeline import analyze


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--strategy", default="all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DemoConfig(vocab=512, d_model=args.d_model, n_heads=6, d_ff=4 * args.d_model, n_layers=args.layers,
                     seq=args.seq, outlier_dims=(7, 100, 300), outlier_magnitudes=(24.0, -36.0, 52.0))
    model = build_model(cfg)
    batches = make_batches(args.batches, args.batch, args.seq, seed=1, vocab=cfg.vocab)
    # Warm-up on one tiny layer set: first calls pay one-off costs (custom-op registration, codebook
    # lookup tables) that are not per-layer work.
    # e2e=False: this times the isolated per-GEMM analysis per layer; bench_e2e.py times the end-to-end part.
    analyze(model, batches[:1], args.strategy, layers=r"^head$", e2e=False)
    start = time.perf_counter()
    res = analyze(model, batches, args.strategy, e2e=False)
    elapsed = time.perf_counter() - start
    n_layers = len(res.tables["layers"])
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"model: {args.layers} blocks, d={args.d_model}, d_ff={4 * args.d_model}, {n_layers} linear layers; "
          f"{args.batches} batch(es) of {args.batch} x {args.seq} tokens; strategies: {', '.join(res.metadata['strategies'])}; "
          f"torch threads: {torch.get_num_threads()}")
    print(f"| total s | s / layer | s / layer / strategy | peak RSS MiB |")
    print(f"|---|---|---|---|")
    n_strat = len(res.metadata["strategies"])
    print(f"| {elapsed:.2f} | {elapsed / n_layers:.3f} | {elapsed / n_layers / n_strat:.4f} | {rss_mib:.0f} |")


if __name__ == "__main__":
    main()
