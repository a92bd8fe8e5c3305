"""Throughput of the fp8probe quantisation ops (GB/s) vs torch's native fp8 cast, a copy and bitsandbytes.

Usage: ``python benchmarks/bench_ops.py [--device cpu|cuda|all] [--numel N] [--repeat R]``.
Runs on CPU always and on CUDA when a GPU is present (``--device all``, the default). Prints one
Markdown table. GB/s counts the bytes each op must move at minimum (input read + outputs written,
e.g. fp32 -> uint8 codes + one fp32 absmax per block = 4 + 1 + 4/blocksize bytes per element), so
the copy row (``x.clone()``: read + write) is the memory-bandwidth ceiling of the machine.
The CPU numbers are the PyTorch reference backend (vectorised torch ops); CUDA numbers are the CuPy
kernels unless FP8PROBE_BACKEND=reference is set.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import fp8probe.functional as F

_ITEM = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_op(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median wall time of `fn` in seconds over `repeat` runs after one warm-up (compiles kernels)."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(device: str, numel: int) -> list[tuple[str, str, int, Callable[[], object]]]:
    """(op, dtype label, bytes moved, thunk) for every benchmarked operation on `device`."""
    g = torch.Generator().manual_seed(0)
    cols = 4096
    rows = max(1, numel // cols)
    n = rows * cols
    out: list[tuple[str, str, int, Callable[[], object]]] = []
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        b = _ITEM[dtype]
        x = (torch.randn(rows, cols, generator=g) * 3).to(dtype).to(device)
        code = F.get_codebook("bnb-e4m3", device=device)
        for bs in (256, 4096):
            q, st = F.quantize_blockwise(x, code, blocksize=bs)
            out.append((f"quantize_blockwise bs={bs}", label, n * (b + 1) + 4 * math.ceil(n / bs),
                        lambda x=x, bs=bs: F.quantize_blockwise(x, code, blocksize=bs)))
            out.append((f"dequantize_blockwise bs={bs}", label, n * (1 + b) + 4 * math.ceil(n / bs),
                        lambda q=q, st=st: F.dequantize_blockwise(q, st)))
        out.append(("int8_vectorwise_quant", label, n * (b + 1) + 4 * rows,
                    lambda x=x: F.int8_vectorwise_quant(x)))
        out.append(("int8_vectorwise_quant thr=2", label, n * (b + 1) + 4 * rows,
                    lambda x=x: F.int8_vectorwise_quant(x, threshold=2.0)))
        for fmt, gran, block in (("e4m3", "tensor", None), ("e4m3", "block", (1, 128)),
                                 ("e4m3", "block", (128, 128)), ("mxfp8-e4m3", "block", (1, 32))):
            tag = gran if block is None else f"{block[0]}x{block[1]}"
            st = F.quantize_scaled(x, fmt, gran, block)
            out.append((f"quantize_scaled {fmt} {tag}", label, n * (b + 1),
                        lambda x=x, fmt=fmt, gran=gran, block=block: F.quantize_scaled(x, fmt, gran, block)))
            if tag == "1x128":
                out.append((f"dequantize_scaled {fmt} {tag}", label, n * (1 + b),
                            lambda st=st: F.dequantize_scaled(st)))
        out.append(("torch x.to(float8_e4m3fn) (no scaling)", label, n * (b + 1),
                    lambda x=x: x.to(torch.float8_e4m3fn)))
        out.append(("torch x.clone() (copy bandwidth)", label, 2 * n * b, lambda x=x: x.clone()))
    out += _bnb_cases(device, rows, cols, g)
    return out


def _bnb_cases(device: str, rows: int, cols: int, g: torch.Generator) -> list:
    """bitsandbytes' own ops on the same data when it is importable (its CPU backend on CPU)."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or no usable native library
        return []
    n = rows * cols
    x = torch.randn(rows, cols, generator=g).to(device)
    res = []
    for bs in (256, 4096):
        q, st = bnbF.quantize_blockwise(x, blocksize=bs)
        res.append((f"bitsandbytes quantize_blockwise bs={bs}", "float32", n * 5 + 4 * math.ceil(n / bs),
                    lambda bs=bs: bnbF.quantize_blockwise(x, blocksize=bs)))
        res.append((f"bitsandbytes dequantize_blockwise bs={bs}", "float32", n * 5 + 4 * math.ceil(n / bs),
                    lambda q=q, st=st: bnbF.dequantize_blockwise(q, st)))
    xh = x.half()
    res.append(("bitsandbytes int8_vectorwise_quant", "float16", n * 3 + 4 * rows,
                lambda: bnbF.int8_vectorwise_quant(xh)))
    return res


def main() -> None:
    """Parse arguments, run every case on every requested device, print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    ap.add_argument("--numel", type=int, default=1 << 22, help="elements per input tensor (default 4M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case; the median is reported")
    args = ap.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
        devices.remove("cuda")
    print(f"fp8probe bench_ops: numel={args.numel}, median of {args.repeat}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""))
    print()
    print("| device | op | input dtype | time (ms) | GB/s |")
    print("|---|---|---|---:|---:|")
    for device in devices:
        for name, label, nbytes, fn in cases(device, args.numel):
            t = time_op(fn, device, args.repeat)
            print(f"| {device} | {name} | {label} | {t * 1e3:.2f} | {nbytes / t / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
