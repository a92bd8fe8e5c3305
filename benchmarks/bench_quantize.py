"""Codebook quantize/dequantize throughput (global, blockwise) vs a copy, bitsandbytes and torch fp8 casts.

Usage::

    python benchmarks/bench_quantize.py [--device cpu|cuda] [--quick] [--markdown] [--json PATH]
        [--sizes 1M,16M,64M] [--dtypes float32,float16,bfloat16] [--blocksizes 64,...,4096]
        [--threads N] [--bnb-cap-s 5]

For each element count (default 1M, 16M, 64M; ``--quick``: 16K) and input dtype (fp32, fp16, bf16)
one run measures, on the same seeded N(0, 3²) inputs:

* ``copy``: ``dst.copy_(x)`` into a preallocated buffer, the memory-bandwidth ceiling of the run;
* ``torch cast``: ``x.to(float8_e4m3fn)`` / ``x.to(float8_e5m2)`` and back (``f8.to(dtype)``), torch's
  native unscaled fp8 casts; ``out`` mode is ``buf.copy_(x)`` into a preallocated fp8 buffer;
* fp8probe ``quantize``/``dequantize`` (one global absmax) and ``quantize_blockwise``/
  ``dequantize_blockwise`` for every block size 64..4096, with the signed dynamic codebook (bnb's
  default, so both libraries do the same work), in two modes: ``fresh`` (new outputs each call) and
  ``out`` (preallocated ``out=``/``absmax=`` buffers);
* bitsandbytes' own ``quantize_blockwise``/``dequantize_blockwise`` (its CPU backend on CPU), fresh
  outputs. bnb's CPU quantize is slow (measured 0.8 s for 1M fp32 elements at block 64 and 1.3-2.7 s
  for fp16/bf16 on the 2-core development machine, 0.01-0.1 GB/s), so it is measured at a size only
  when its time per element at the smallest size predicts a call under ``--bnb-cap-s`` seconds, with
  1-3 timed calls after a warm-up on a 4096-element tensor; skipped cells print '—'. bnb's dequantize
  is fast and runs at every size on fp8probe's codes (the two libraries share the code format).

Byte model (GB/s = bytes / median seconds / 1e9; each input read once, each output written once;
n elements, b = 4 (fp32) or 2 (fp16/bf16) bytes per input element, nb = ceil(n / blocksize) blocks,
the 1 KiB codebook is not counted):

* copy: 2·n·b                     * torch cast to fp8: n·b + n        * cast back: n + n·b
* quantize_blockwise: n·b + n + 4·nb  (input read, uint8 codes and float32 absmax written)
* dequantize_blockwise: n + 4·nb + n·b (codes and absmax read, output in the input dtype written)
* quantize / dequantize (global): the same with nb = 1. A global absmax needs a second pass over
  the input for tensors larger than the cache; the model counts the minimum (one read) anyway.

Columns: ``median ms``/``min ms`` over ``n`` timed calls; ``×copy`` = GB/s of the row over GB/s of the
copy of the same input in the same run (the fraction of memory bandwidth reached); ``×bnb`` and
``×torch`` = time of the alternative / time of the row, same input (> 1: fp8probe is faster), where
the alternative is bnb's op with the same block size (fresh outputs) and torch's e4m3 cast in the
same mode. ``target``: issue 6's goals with PASS/FAIL — on CPU, blockwise quantize ≥ 5 GB/s and
dequantize ≥ 10 GB/s at 16M fp32 elements; on CUDA, blockwise quantize/dequantize ≥ 80 % of the
copy bandwidth at 64M elements. On CUDA the copy rows are the device-to-device copy bandwidth.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import _timing as T  # first: puts the repository root on sys.path
import torch

import fp8probe.functional as F

DEFAULT_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
QUICK_BLOCKSIZES = (64, 256, 4096)  # smallest, bnb's usual, largest: the smoke test stays a few seconds
CODEBOOK = "dynamic"  # bnb's default map, so bnb and fp8probe search the same 256 codes
CPU_QUANT_TARGET_GBPS = 5.0     # issue 6: blockwise quantize at 16M fp32 elements on the 2-core CPU
CPU_DEQUANT_TARGET_GBPS = 10.0  # issue 6: blockwise dequantize, same size
CPU_TARGET_NUMEL = 16 * T.MI
GPU_COPY_FRACTION = 0.8         # issue 6: blockwise quantize/dequantize >= 80 % of copy bandwidth ...
GPU_TARGET_NUMEL = 64 * T.MI    # ... at 64M elements
BNB_WARMUP_NUMEL = 4096

COLUMNS = [
    T.Column("op", "op"), T.Column("dtype", "dtype"), T.Column("numel", "numel"),
    T.Column("block", "block"), T.Column("mode", "mode"),
    T.Column("median_ms", "median ms"), T.Column("min_ms", "min ms"),
    T.Column("reps", "n"), T.Column("gbps", "GB/s"), T.Column("x_copy", "×copy"),
    T.Column("x_bnb", "×bnb"), T.Column("x_torch", "×torch"), T.Column("target", "target"),
]


def bnb_functional(device: str):
    """bitsandbytes.functional when it imports and runs a tiny blockwise quantize on `device`, else None."""
    try:
        import bitsandbytes.functional as bnbF
        bnbF.quantize_blockwise(torch.randn(256, device=device), blocksize=64)
    except Exception as exc:  # not installed, no native library for this device, ...
        print(f"# bitsandbytes unavailable on {device}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return bnbF


class Bench:
    """One benchmark run: holds the options, the rows measured so far and bnb's per-element rates."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args = args
        self.device = device
        self.rows: list[dict[str, object]] = []
        self.bnbF = bnb_functional(device)
        # bnb's quantize per (dtype, blocksize) is skipped where predicted over --bnb-cap-s per call
        self.bnb_cap = T.PredictedCap(args.bnb_cap_s)

    def add(self, op: str, dtype: torch.dtype, numel: int, block: object, mode: str, nbytes: int,
            t: T.Timing | None, copy_gbps: float | None, **extra: object) -> dict[str, object]:
        """Append one result row (see the module docstring for the columns) and return it."""
        row = T.make_row(self.device, op, dtype, numel, mode, nbytes, t, copy_gbps, block=block, **extra)
        self.rows.append(row)
        return row

    def target(self, op: str, dtype: torch.dtype, numel: int, gbps: float, x_copy: float | None) -> str | None:
        """Issue 6's PASS/FAIL cell for a blockwise row, or None where no target applies."""
        if self.device == "cpu" and dtype == torch.float32 and numel == CPU_TARGET_NUMEL:
            goal = CPU_QUANT_TARGET_GBPS if op == "quantize_blockwise" else CPU_DEQUANT_TARGET_GBPS
            return f"≥{goal:g} GB/s: {'PASS' if gbps >= goal else 'FAIL'}"
        if self.device == "cuda" and numel == GPU_TARGET_NUMEL and x_copy is not None:
            return f"≥{GPU_COPY_FRACTION:.0%} copy: {'PASS' if x_copy >= GPU_COPY_FRACTION else 'FAIL'}"
        return None

    # ----------------------------------------------------------------------------------------
    def group(self, numel: int, dtype: torch.dtype, blocksizes: list[int]) -> None:
        """Every row for one (element count, dtype): copy, torch casts, fp8probe ops, bnb ops."""
        dev, b = self.device, T.ITEMSIZE[dtype]
        pol = T.policies(dev, self.args.quick, numel)
        n_sets = T.rotation_sets(2 * numel * b, dev)
        xs = T.random_inputs(numel, dtype, dev, n_sets, seed=numel + b)
        pick = lambda seq, i: seq[i % len(seq)]  # noqa: E731  (rotation over the input sets)
        code = F.get_codebook(CODEBOOK, device=dev)

        def run(fn: Callable[[int], object], policy: T.Policy = pol) -> T.Timing:
            return T.measure(fn, dev, policy)

        # copy: the bandwidth ceiling for this input. ×copy uses this first measurement; a second
        # one at the end of the group (copy_gbps_again in the JSON) shows how much the machine drifted.
        dsts = [T.touched(torch.empty_like(x)) for x in xs]
        t_copy = run(lambda i: pick(dsts, i).copy_(pick(xs, i)))
        copy_row = self.add("copy dst.copy_(x)", dtype, numel, None, "out", 2 * numel * b, t_copy, None)
        copy_gbps = copy_row["gbps"]

        # torch's native fp8 casts, both directions, fresh and into preallocated buffers
        cast_t: dict[tuple[str, str], T.Timing] = {}
        for f8name, f8 in (("float8_e4m3fn", torch.float8_e4m3fn), ("float8_e5m2", torch.float8_e5m2)):
            f8s = [x.to(f8) for x in xs]
            f8_bufs = [T.touched(torch.empty_like(v)) for v in f8s]
            t = run(lambda i, f8=f8: pick(xs, i).to(f8))
            self.add(f"torch cast → {f8name}", dtype, numel, None, "fresh", numel * (b + 1), t, copy_gbps)
            cast_t[(f8name, "fresh")] = t
            t = run(lambda i: pick(f8_bufs, i).copy_(pick(xs, i)))
            self.add(f"torch cast → {f8name}", dtype, numel, None, "out", numel * (b + 1), t, copy_gbps)
            cast_t[(f8name, "out")] = t
            t = run(lambda i: pick(f8s, i).to(dtype))
            self.add(f"torch cast {f8name} →", dtype, numel, None, "fresh", numel * (1 + b), t, copy_gbps)
            cast_t[(f8name + " back", "fresh")] = t
            t = run(lambda i: pick(dsts, i).copy_(pick(f8s, i)))
            self.add(f"torch cast {f8name} →", dtype, numel, None, "out", numel * (1 + b), t, copy_gbps)
            cast_t[(f8name + " back", "out")] = t

        for bs in [None, *blocksizes]:
            self._codebook_rows(numel, dtype, bs, xs, dsts, code, copy_gbps, cast_t, pick, run)
        if self.bnbF is not None:
            self._bnb_quantize_rows(numel, dtype, blocksizes, xs[0], copy_gbps)

        t_copy2 = run(lambda i: pick(dsts, i).copy_(pick(xs, i)))
        copy_row["copy_gbps_again"] = T.gbps(2 * numel * b, t_copy2.median_s)

    def _codebook_rows(self, numel: int, dtype: torch.dtype, bs: int | None, xs: list[torch.Tensor],
                       dsts: list[torch.Tensor], code: torch.Tensor, copy_gbps: float,
                       cast_t: dict[tuple[str, str], T.Timing], pick: Callable, run: Callable) -> None:
        """fp8probe (de)quantize rows for one block size (None: global), both modes, + bnb dequantize."""
        b = T.ITEMSIZE[dtype]
        nb = 1 if bs is None else math.ceil(numel / bs)
        q_bytes = numel * b + numel + 4 * nb
        label = "global" if bs is None else bs
        qop, dqop = ("quantize", "dequantize") if bs is None else ("quantize_blockwise", "dequantize_blockwise")

        if bs is None:
            quant = lambda x, **kw: F.quantize(x, code, **kw)  # noqa: E731
            dequant = lambda q, st, **kw: F.dequantize(q, st, **kw)  # noqa: E731
        else:
            quant = lambda x, **kw: F.quantize_blockwise(x, code, blocksize=bs, **kw)  # noqa: E731
            dequant = lambda q, st, **kw: F.dequantize_blockwise(q, st, **kw)  # noqa: E731
        states = [quant(x) for x in xs]  # (q, QuantState) per input set
        q_bufs = [T.touched(torch.empty_like(q)) for q, _ in states]
        am_bufs = [T.touched(torch.empty_like(st.absmax)) for _, st in states]

        # bnb dequantize on fp8probe's codes (fresh outputs): the comparison for both our modes
        t_bnb_dq = None
        if self.bnbF is not None and bs is not None:
            bnb_states = [self.bnbF.QuantState(absmax=st.absmax, code=code, blocksize=bs, dtype=dtype)
                          for _, st in states]
            pol = T.policies(self.device, self.args.quick, numel)
            t_bnb_dq, why = T.try_measure(lambda i: self.bnbF.dequantize_blockwise(
                pick(states, i)[0], quant_state=pick(bnb_states, i)), self.device, pol)
            self.add("bnb dequantize_blockwise", dtype, numel, bs, "fresh", q_bytes, t_bnb_dq, copy_gbps, skipped=why)

        for mode in ("fresh", "out"):
            if mode == "fresh":
                t = run(lambda i: quant(pick(xs, i)))
            elif bs is None:  # global quantize takes out= only (one absmax)
                t = run(lambda i: quant(pick(xs, i), out=pick(q_bufs, i)))
            else:
                t = run(lambda i: quant(pick(xs, i), out=pick(q_bufs, i), absmax=pick(am_bufs, i)))
            row = self.add(qop, dtype, numel, label, mode, q_bytes, t, copy_gbps,
                           x_torch=T.ratio(cast_t[("float8_e4m3fn", mode)].median_s, t.median_s))
            row["_bnb_key"] = (dtype, bs, numel)  # filled in by _bnb_quantize_rows
            if bs is not None:
                row["target"] = self.target(qop, dtype, numel, row["gbps"], row["x_copy"])

            if mode == "fresh":
                t = run(lambda i: dequant(*pick(states, i)))
            else:
                t = run(lambda i: dequant(*pick(states, i), out=pick(dsts, i)))
            row = self.add(dqop, dtype, numel, label, mode, q_bytes, t, copy_gbps,
                           x_torch=T.ratio(cast_t[("float8_e4m3fn back", mode)].median_s, t.median_s),
                           x_bnb=T.ratio(t_bnb_dq.median_s if t_bnb_dq else None, t.median_s))
            if bs is not None:
                row["target"] = self.target(dqop, dtype, numel, row["gbps"], row["x_copy"])

    def _bnb_quantize_rows(self, numel: int, dtype: torch.dtype, blocksizes: list[int], x: torch.Tensor,
                           copy_gbps: float) -> None:
        """bnb quantize_blockwise rows (capped, see the module docstring) and the ×bnb of our rows."""
        bnbF = self.bnbF
        pol = T.Policy(0, 1, 2, 0.1) if self.args.quick else T.Policy(0, 1, 3, 2.0)
        code = F.get_codebook(CODEBOOK, device=self.device)
        b = T.ITEMSIZE[dtype]
        for bs in blocksizes:
            key = (dtype, bs)
            q_bytes = numel * (b + 1) + 4 * math.ceil(numel / bs)
            skip = self.bnb_cap.skip_reason(key, numel)
            if skip is not None:
                self.add("bnb quantize_blockwise", dtype, numel, bs, "fresh", q_bytes, None, copy_gbps, skipped=skip)
                continue
            try:  # warm-up on a slice: bnb's first call loads its kernels, the size does not matter
                bnbF.quantize_blockwise(x.reshape(-1)[:BNB_WARMUP_NUMEL], code=code, blocksize=bs)
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                pass  # try_measure below records the reason
            t, why = T.try_measure(lambda i: bnbF.quantize_blockwise(x, code=code, blocksize=bs), self.device, pol)
            self.add("bnb quantize_blockwise", dtype, numel, bs, "fresh", q_bytes, t, copy_gbps, skipped=why)
            if t is None:
                continue
            self.bnb_cap.record(key, numel, t)
            for row in self.rows:
                if row.get("_bnb_key") == (dtype, bs, numel):
                    row["x_bnb"] = T.ratio(t.median_s, row["median_ms"] / 1e3)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every group, print the header and the table; 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(ap)
    ap.add_argument("--blocksizes", default=None,
                    help="comma-separated block sizes (default 64,128,256,512,1024,2048,4096)")
    ap.add_argument("--bnb-cap-s", type=float, default=None,
                    help="skip bnb's quantize at a size where it is predicted to take longer per call "
                         "(default 5 s; 0.5 s with --quick)")
    args = ap.parse_args(argv)
    device = T.setup_device(args)
    sizes = args.sizes or ([T.QUICK_NUMEL] if args.quick else list(T.FULL_SIZES))
    dtypes = args.dtypes or list(T.DTYPES.values())
    try:
        blocksizes = ([int(s) for s in args.blocksizes.split(",")] if args.blocksizes
                      else list(QUICK_BLOCKSIZES if args.quick else DEFAULT_BLOCKSIZES))
    except ValueError:
        ap.error(f"--blocksizes must be comma-separated integers, got {args.blocksizes!r}")
    if any(bs <= 0 for bs in blocksizes):
        ap.error(f"--blocksizes must be positive, got {blocksizes}")
    if args.bnb_cap_s is None:
        args.bnb_cap_s = 0.5 if args.quick else 5.0

    info = T.machine_info(device)
    bench = Bench(args, device)
    for numel in sorted(sizes):
        for dtype in dtypes:
            print(f"# measuring numel={numel} dtype={dtype} ...", file=sys.stderr, flush=True)
            bench.group(numel, dtype, blocksizes)
    for row in bench.rows:
        row.pop("_bnb_key", None)

    config = {"sizes": sorted(sizes), "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
              "blocksizes": blocksizes, "codebook": CODEBOOK, "bnb_cap_s": args.bnb_cap_s,
              "quick": args.quick, "policy": {n: T.policy_dict(T.policies(device, args.quick, n)) for n in sizes}}
    T.print_header("fp8probe bench_quantize: codebook quantize/dequantize throughput", info)
    print(T.render_table(bench.rows, COLUMNS, args.markdown))
    if args.json is not None:
        T.write_json(args.json, "bench_quantize", info, config, bench.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
