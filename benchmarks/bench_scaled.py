"""OCP/MX scaled FP8 cast throughput (quantize_scaled, dequantize_scaled) vs a copy and torch's unscaled casts.

Usage::

    python benchmarks/bench_scaled.py [--device cpu|cuda] [--quick] [--markdown] [--json PATH]
        [--sizes 1M,16M] [--dtypes float32,float16,bfloat16] [--threads N]

For each element count (default 1M and 16M; ``--sizes 1M,16M,64M`` adds 64M, which the reference
implementation needs 5-8 s per call for on the shared 2-core machine; ``--quick``: 16K) and input
dtype, on seeded N(0, 3²) inputs laid out [n/4096, 4096]: a copy into a reused tensor (``dst.copy_(x)``)
and into a fresh one (``x.clone()``), torch's unscaled
``x.to(float8_e4m3fn|float8_e5m2)`` and ``f8.to(dtype)``, and fp8probe's ``quantize_scaled`` /
``dequantize_scaled`` for per-tensor, per-row, 1x128 and 128x128 block scales (E4M3), 1x128 E5M2,
MX FP8 (32-element blocks, power-of-two scales; FLOOR, RCEIL and EVEN rules), MXFP6 E2M3/E3M2 and MXFP4
(FLOOR), and NVFP4 1x16 (E4M3 block scales x the tensor scale; 4/6-bit codes one per byte, no torch cast
to compare with: ``×torch`` empty). ``FP8PROBE_BACKEND=reference`` measures the PyTorch reference
instead of the C kernels (the header names the backend). bitsandbytes has no scaled-FP8 cast, so torch's
unscaled cast of the same format is the alternative. Quantize writes fresh outputs; dequantize is measured
both ways: a fresh output, and ``out=`` reused buffers (``dequantize_scaled out=``, like ``dst.copy_(x)``).

Byte model (n elements, b input bytes per element, s float32 scales):
quantize_scaled n·b + n + 4·s; dequantize_scaled n + 4·s + n·b; casts n·b + n; copy 2·n·b.
``×copy`` and ``×torch`` as in bench_quantize.py (×torch = cast time / fp8probe time); ``×clone``: GB/s over
the fresh-output copy's (the ops allocate their outputs too; fp8probe's large ones get huge pages advised).
"""
from __future__ import annotations

import argparse
import sys

import _timing as T  # first: puts the repository root on sys.path
import torch

import fp8probe.functional as F

# (fmt, granularity, block, the torch dtype of the same element format or None (4/6-bit: no torch
# cast to compare with), MX scale rule)
VARIANTS = [
    ("e4m3", "tensor", None, torch.float8_e4m3fn, "floor"),
    ("e4m3", "row", None, torch.float8_e4m3fn, "floor"),
    ("e4m3", "block", (1, 128), torch.float8_e4m3fn, "floor"),
    ("e4m3", "block", (128, 128), torch.float8_e4m3fn, "floor"),
    ("e5m2", "block", (1, 128), torch.float8_e5m2, "floor"),
    ("mxfp8-e4m3", "block", (1, 32), torch.float8_e4m3fn, "floor"),
    ("mxfp8-e4m3", "block", (1, 32), torch.float8_e4m3fn, "rceil"),
    ("mxfp8-e4m3", "block", (1, 32), torch.float8_e4m3fn, "even"),
    ("mxfp6-e2m3", "block", (1, 32), None, "floor"),
    ("mxfp6-e3m2", "block", (1, 32), None, "floor"),
    ("mxfp4-e2m1", "block", (1, 32), None, "floor"),
    ("nvfp4", "block", (1, 16), None, "floor"),
]

COLUMNS = [
    T.Column("op", "op"), T.Column("dtype", "dtype"), T.Column("numel", "numel"), T.Column("scaling", "scaling"),
    T.Column("median_ms", "median ms"), T.Column("min_ms", "min ms"), T.Column("reps", "n"),
    T.Column("gbps", "GB/s"), T.Column("x_copy", "×copy"), T.Column("x_clone", "×clone"), T.Column("x_torch", "×torch"),
]


def group(device: str, quick: bool, numel: int, dtype: torch.dtype) -> list[dict[str, object]]:
    """Rows for one (element count, dtype): copy, torch casts both ways, every scaled variant both ways."""
    b = T.ITEMSIZE[dtype]
    pol = T.policies(device, quick, numel)
    xs = T.random_inputs(numel, dtype, device, T.rotation_sets(2 * numel * b, device), seed=numel + 3 * b)
    pick = lambda seq, i: seq[i % len(seq)]  # noqa: E731
    rows: list[dict[str, object]] = []

    clone_gbps: float | None = None

    def add(op: str, scaling: str, nbytes: int, t: T.Timing, copy_gbps: float | None, mode: str = "fresh",
            **kw: object) -> dict:
        rows.append(T.make_row(device, op, dtype, numel, mode, nbytes, t, copy_gbps, scaling=scaling, **kw))
        rows[-1]["x_clone"] = T.ratio(rows[-1]["gbps"], clone_gbps)
        return rows[-1]

    dsts = [T.touched(torch.empty_like(x)) for x in xs]
    t = T.measure(lambda i: pick(dsts, i).copy_(pick(xs, i)), device, pol)
    copy_gbps = add("copy dst.copy_(x)", "—", 2 * numel * b, t, None, mode="out")["gbps"]
    dsts.clear()  # free the copy buffers before the casts allocate theirs
    # the same copy into a fresh tensor, as every op here writes one: its page faults count (torch's
    # allocator advises no huge pages: ~4-6x slower than copy_ at 16M float32 on the development CPU)
    t = T.measure(lambda i: pick(xs, i).clone(), device, pol)
    clone_gbps = add("copy x.clone()", "—", 2 * numel * b, t, copy_gbps)["gbps"]
    cast_t: dict[tuple[torch.dtype, str], T.Timing] = {}
    for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        name = str(f8).removeprefix("torch.")
        f8s = [x.to(f8) for x in xs]
        cast_t[(f8, "to")] = t = T.measure(lambda i, f8=f8: pick(xs, i).to(f8), device, pol)
        add(f"torch cast → {name}", "none", numel * (b + 1), t, copy_gbps)
        cast_t[(f8, "back")] = t = T.measure(lambda i: pick(f8s, i).to(dtype), device, pol)
        add(f"torch cast {name} →", "none", numel * (1 + b), t, copy_gbps)
    for fmt, gran, block, f8, rule in VARIANTS:
        scaling = f"{fmt} {gran if block is None else f'{block[0]}x{block[1]}'}"
        scaling += f" {rule}" if rule != "floor" else ""
        sts = [F.quantize_scaled(x, fmt, gran, block, rule) for x in xs]
        n_scales = sts[0].scale.numel()
        t = T.measure(lambda i: F.quantize_scaled(pick(xs, i), fmt, gran, block, rule), device, pol)
        add("quantize_scaled", scaling, numel * (b + 1) + 4 * n_scales, t, copy_gbps,
            x_torch=T.ratio(cast_t[(f8, "to")].median_s, t.median_s) if f8 else None)
        t = T.measure(lambda i: F.dequantize_scaled(pick(sts, i)), device, pol)
        add("dequantize_scaled", scaling, numel * (1 + b) + 4 * n_scales, t, copy_gbps,
            x_torch=T.ratio(cast_t[(f8, "back")].median_s, t.median_s) if f8 else None)
        # into reused buffers, as the copy_ row writes into reused ones (out=)
        outs = [T.touched(torch.empty_like(x)) for x in xs]
        t = T.measure(lambda i: F.dequantize_scaled(pick(sts, i), out=pick(outs, i)), device, pol)
        add("dequantize_scaled out=", scaling, numel * (1 + b) + 4 * n_scales, t, copy_gbps, mode="out",
            x_torch=T.ratio(cast_t[(f8, "back")].median_s, t.median_s) if f8 else None)
        del outs
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every group, print the header and the table; 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(ap)
    args = ap.parse_args(argv)
    device = T.setup_device(args)
    # 64M only on request: at 0.05 GB/s (reference backend, shared machine) it alone took 15 minutes
    sizes = sorted(args.sizes or ([T.QUICK_NUMEL] if args.quick else [T.MI, 16 * T.MI]))
    dtypes = args.dtypes or list(T.DTYPES.values())
    if any(n % 4096 for n in sizes):
        ap.error(f"--sizes must be multiples of 4096 (rows of 4096 for the 128x128 blocks), got {sizes}")
    info = T.machine_info(device)
    rows: list[dict[str, object]] = []
    for numel in sizes:
        for dtype in dtypes:
            print(f"# measuring numel={numel} dtype={dtype} ...", file=sys.stderr, flush=True)
            rows += group(device, args.quick, numel, dtype)
    config = {"sizes": sizes, "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "quick": args.quick,
              "variants": [[fmt, gran, block, rule] for fmt, gran, block, _, rule in VARIANTS],
              "policy": {n: T.policy_dict(T.policies(device, args.quick, n)) for n in sizes}}
    T.print_header("fp8probe bench_scaled: OCP/MX scaled FP8 cast throughput", info)
    print(T.render_table(rows, COLUMNS, args.markdown))
    if args.json is not None:
        T.write_json(args.json, "bench_scaled", info, config, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
