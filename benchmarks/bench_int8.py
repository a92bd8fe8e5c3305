"""LLM.int8() op throughput (vectorwise quant, int8 matmul, mm dequant) vs a copy, bitsandbytes, torch._int_mm.

Usage::

    python benchmarks/bench_int8.py [--device cpu|cuda] [--quick] [--markdown] [--json PATH]
        [--sizes 1M,16M,64M] [--dtypes float32,float16,bfloat16] [--mm-k 4096] [--threads N]
        [--bnb-cap-s 5]

Every size is an element count n (default 1M, 16M, 64M; ``--quick``: 16K) laid out as rows of
4096 (LLM hidden size), on seeded random data (never zeros):

* ``int8_vectorwise_quant``: A [n/4096, 4096] in fp32/fp16/bf16 → int8 codes + float32 row absmax.
  Alternatives: bitsandbytes' ``int8_vectorwise_quant`` on the same input (its CPU backend on CPU).
* ``int8_linear_matmul``: ``C = A @ B.T`` with A int8 [M, K], B int8 [N, K] (a linear weight),
  N = 4096, K = ``--mm-k`` (4096; 1024 with ``--quick``), M = n / N, so n is the element count of
  the int32 product C.
  Alternatives: ``torch._int_mm(A, B.t())`` (B.t() is the [K, N] view, no copy), bnb's
  ``int8_linear_matmul`` and, on CPU, the two float methods of fp8probe/backends/int8_gemm.py run
  directly (chunked float32, float64; both exact). ``×best`` = the fastest of _int_mm and the two
  float methods over fp8probe's time; the CPU target is ×best ≥ 0.9 (fp8probe picks the method at run
  time). The GOP/s column counts 2·M·N·K integer operations.
* ``int8_mm_dequant``: C int32 [M, N] (n elements) × row_stats [M] × col_stats [N] / 127² → the
  output dtype (fp32/fp16/bf16 rows), ``fresh`` and preallocated ``out=`` modes. Alternative:
  bitsandbytes' ``int8_mm_dequant`` op with the same output dtype (``torch.ops.bitsandbytes``).

Byte model (GB/s = bytes / median seconds / 1e9; each input read once, each output written once;
b = input/output bytes per element, 4 or 2):

* copy: 2·n·b (``dst.copy_(x)``; for mm_dequant the copy of the int32 C, 8·n)
* int8_vectorwise_quant: n·b + n + 4·rows
* int8_linear_matmul: M·K + N·K + 4·M·N (compute-bound: judge it by GOP/s, ×copy is left out)
* int8_mm_dequant: 4·n + 4·M + 4·N + n·b

Columns as in bench_quantize.py: ``×copy`` = GB/s over the copy's GB/s in the same run; ``×bnb``,
``×torch`` = alternative's time / fp8probe's time on the same input (> 1: fp8probe faster);
``target`` on CUDA: int8_linear_matmul within 80 % of torch._int_mm (×torch ≥ 0.8). bnb's CPU
vectorwise quant is slow (~37 ms per 1M fp32 elements, 0.13 GB/s), so it is skipped at a size where
its smaller-size rate predicts more than ``--bnb-cap-s`` seconds per call.
"""
from __future__ import annotations

import argparse
import sys

import _timing as T  # first: puts the repository root on sys.path
import torch

import fp8probe.functional as F
from fp8probe.backends import int8_gemm

MM_N = 4096              # output features of the int8 matmul (LLM hidden size)
INT_MM_FRACTION = 0.8    # issue 6: int8 matmul within 80 % of torch._int_mm on the same shapes (GPU)
BEST_EXACT_FRACTION = 0.9  # issue 15: CPU int8 matmul within 90 % of the fastest exact method

COLUMNS = [
    T.Column("op", "op"), T.Column("dtype", "dtype"), T.Column("numel", "numel"),
    T.Column("shape", "shape"), T.Column("mode", "mode"),
    T.Column("median_ms", "median ms"), T.Column("min_ms", "min ms"),
    T.Column("reps", "n"), T.Column("gbps", "GB/s"), T.Column("gops", "GOP/s"),
    T.Column("x_copy", "×copy"), T.Column("x_bnb", "×bnb"),
    T.Column("x_torch", "×torch"), T.Column("x_best", "×best"), T.Column("target", "target"),
]


def bnb_modules(device: str):
    """(bitsandbytes.functional, torch.ops.bitsandbytes) when bnb runs an int8 op on `device`, else None."""
    try:
        import bitsandbytes.functional as bnbF
        bnbF.int8_vectorwise_quant(torch.randn(4, 64, device=device, dtype=torch.float16))
    except Exception as exc:  # not installed, or no native library for this device
        print(f"# bitsandbytes unavailable on {device}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return bnbF, torch.ops.bitsandbytes


def int_mm_available(device: str) -> bool:
    """Whether torch._int_mm runs here on a [32, 64] x [64, 32] int8 product."""
    try:
        a = torch.ones(32, 64, dtype=torch.int8, device=device)
        torch._int_mm(a, a.t())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class Bench:
    """One run of the int8 benchmarks: options, rows, bnb and torch._int_mm availability."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args = args
        self.device = device
        self.rows: list[dict[str, object]] = []
        self.bnb = bnb_modules(device)
        self.int_mm = int_mm_available(device)
        self.bnb_cap = T.PredictedCap(args.bnb_cap_s)

    def add(self, *args: object, **kw: object) -> dict[str, object]:
        """T.make_row on this device, appended to the rows."""
        row = T.make_row(self.device, *args, **kw)
        self.rows.append(row)
        return row

    def vectorwise(self, numel: int, dtype: torch.dtype) -> None:
        """int8_vectorwise_quant rows (fresh outputs: the API has no out=) and bnb's, for one size/dtype."""
        dev, b = self.device, T.ITEMSIZE[dtype]
        pol = T.policies(dev, self.args.quick, numel)
        xs = T.random_inputs(numel, dtype, dev, T.rotation_sets(2 * numel * b, dev), seed=numel + 7 * b)
        rows = xs[0].shape[0] if xs[0].dim() == 2 else 1
        pick = lambda seq, i: seq[i % len(seq)]  # noqa: E731
        dsts = [T.touched(torch.empty_like(x)) for x in xs]
        t = T.measure(lambda i: pick(dsts, i).copy_(pick(xs, i)), dev, pol)
        copy_gbps = self.add("copy dst.copy_(x)", dtype, numel, "out", 2 * numel * b, t, None,
                             shape=list(xs[0].shape))["gbps"]
        nbytes = numel * b + numel + 4 * rows
        t_bnb = None
        if self.bnb is not None:
            key = ("vectorwise", dtype)
            skip = self.bnb_cap.skip_reason(key, numel)
            if skip is None:
                bnbF = self.bnb[0]
                t_bnb, skip = T.try_measure(lambda i: bnbF.int8_vectorwise_quant(pick(xs, i)), dev,
                                            self._bnb_policy())
                if t_bnb is not None:
                    self.bnb_cap.record(key, numel, t_bnb)
            self.add("bnb int8_vectorwise_quant", dtype, numel, "fresh", nbytes, t_bnb, copy_gbps,
                     shape=list(xs[0].shape), skipped=skip)
        t = T.measure(lambda i: F.int8_vectorwise_quant(pick(xs, i)), dev, pol)
        self.add("int8_vectorwise_quant", dtype, numel, "fresh", nbytes, t, copy_gbps, shape=list(xs[0].shape),
                 x_bnb=T.ratio(t_bnb.median_s if t_bnb else None, t.median_s))

    def _bnb_policy(self) -> T.Policy:
        # one warm-up call (bnb's first call loads its kernels), then 1-3 calls bound bnb's share of the run
        return T.Policy(1, 1, 2, 0.1) if self.args.quick else T.Policy(1, 1, 3, 2.0)

    def matmul(self, numel: int) -> None:
        """int8_linear_matmul vs torch._int_mm and bnb on A [M, K] x B [N, K]^T with M·N = numel."""
        dev, K = self.device, self.args.mm_k
        M = max(1, numel // MM_N)
        pol = T.policies(dev, self.args.quick, numel)
        g = torch.Generator().manual_seed(numel)
        A = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8).to(dev)
        B = torch.randint(-127, 128, (MM_N, K), generator=g, dtype=torch.int8).to(dev)
        nbytes, ops = M * K + MM_N * K + 4 * M * MM_N, 2 * M * MM_N * K
        shape = f"{M}x{K} @ {K}x{MM_N}"

        def add(op: str, t: T.Timing | None, **kw: object) -> dict[str, object]:
            return self.add(op, "int8", M * MM_N, kw.pop("mode", "fresh"), nbytes, t, None, shape=shape,
                            gops=None if t is None else ops / t.median_s / 1e9, **kw)

        t_torch = t_bnb = None
        if self.int_mm:
            t_torch, why = T.try_measure(lambda i: torch._int_mm(A, B.t()), dev, pol)
            add("torch._int_mm", t_torch, skipped=why)
        if self.bnb is not None:
            t_bnb, why = T.try_measure(lambda i: self.bnb[0].int8_linear_matmul(A, B), dev, pol)
            add("bnb int8_linear_matmul", t_bnb, skipped=why)
        exact = [t_torch.median_s] if t_torch else []
        if dev == "cpu":
            for name in ("f32", "f64"):
                fn = int8_gemm._IMPL[name]
                t_m, why = T.try_measure(lambda i, fn=fn: fn(A, B), dev, pol)
                label = "torch float32 GEMM, K chunks ≤ 1024" if name == "f32" else "torch float64 GEMM"
                add(f"{label} (exact)", t_m, skipped=why)
                if t_m is not None:
                    exact.append(t_m.median_s)
        t = T.measure(lambda i: F.int8_linear_matmul(A, B), dev, pol)
        x_torch = T.ratio(t_torch.median_s if t_torch else None, t.median_s)
        x_best = T.ratio(min(exact), t.median_s) if exact else None
        target = None
        if dev == "cuda" and x_torch is not None:
            target = f"≥{INT_MM_FRACTION:.0%} _int_mm: {'PASS' if x_torch >= INT_MM_FRACTION else 'FAIL'}"
        elif dev == "cpu" and x_best is not None:
            target = f"≥{BEST_EXACT_FRACTION:.0%} best exact: {'PASS' if x_best >= BEST_EXACT_FRACTION else 'FAIL'}"
        add("int8_linear_matmul", t, mode=int8_gemm.method() if dev == "cpu" else "fresh", x_torch=x_torch,
            x_bnb=T.ratio(t_bnb.median_s if t_bnb else None, t.median_s), x_best=x_best, target=target)

    def mm_dequant(self, numel: int, dtypes: list[torch.dtype]) -> None:
        """int8_mm_dequant rows per output dtype, fresh and out=, vs bnb's op, on C int32 [M, 4096]."""
        dev = self.device
        M = max(1, numel // MM_N)
        n = M * MM_N
        pol = T.policies(dev, self.args.quick, numel)
        g = torch.Generator().manual_seed(numel + 1)
        sets = T.rotation_sets(8 * n, dev)
        # |C| up to 2**20: the size of a K = 4096 product of int8 rows with typical (not extreme) codes
        Cs = [torch.randint(-(1 << 20), 1 << 20, (M, MM_N), generator=g, dtype=torch.int32).to(dev)
              for _ in range(sets)]
        row_stats = (torch.rand(M, generator=g) * 4 + 0.1).to(dev)
        col_stats = (torch.rand(MM_N, generator=g) * 4 + 0.1).to(dev)
        pick = lambda seq, i: seq[i % len(seq)]  # noqa: E731
        dsts = [T.touched(torch.empty_like(c)) for c in Cs]
        shape = [M, MM_N]
        t = T.measure(lambda i: pick(dsts, i).copy_(pick(Cs, i)), dev, pol)
        copy_gbps = self.add("copy dst.copy_(C)", "int32", n, "out", 8 * n, t, None, shape=shape)["gbps"]
        dsts.clear()  # the int32 copies (up to 256 MiB each) are not needed any more
        for dtype in dtypes:
            nbytes = 4 * n + 4 * M + 4 * MM_N + n * T.ITEMSIZE[dtype]
            t_bnb = None
            if self.bnb is not None:
                bnb_op = self.bnb[1].int8_mm_dequant
                t_bnb, why = T.try_measure(lambda i: bnb_op(pick(Cs, i), row_stats, col_stats, dtype=dtype), dev, pol)
                self.add("bnb int8_mm_dequant", dtype, n, "fresh", nbytes, t_bnb, copy_gbps, shape=shape, skipped=why)
            outs = [T.touched(torch.empty(M, MM_N, dtype=dtype, device=dev)) for _ in Cs]
            for mode in ("fresh", "out"):
                if mode == "fresh":
                    fn = lambda i: F.int8_mm_dequant(pick(Cs, i), row_stats, col_stats, dtype=dtype)  # noqa: E731
                else:
                    fn = lambda i: F.int8_mm_dequant(pick(Cs, i), row_stats, col_stats,  # noqa: E731
                                                     out=pick(outs, i), dtype=dtype)
                t = T.measure(fn, dev, pol)
                self.add("int8_mm_dequant", dtype, n, mode, nbytes, t, copy_gbps, shape=shape,
                         x_bnb=T.ratio(t_bnb.median_s if t_bnb else None, t.median_s))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run vectorwise quant, matmul and mm dequant per size, print header and table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(ap)
    ap.add_argument("--mm-k", type=int, default=None,
                    help="inner dimension K of the int8 matmul (default 4096; 1024 with --quick)")
    ap.add_argument("--bnb-cap-s", type=float, default=None,
                    help="skip bnb's vectorwise quant where predicted slower per call (default 5 s; 0.5 s --quick)")
    args = ap.parse_args(argv)
    if args.mm_k is None:
        args.mm_k = 1024 if args.quick else 4096
    if args.mm_k < 1:
        ap.error(f"--mm-k must be >= 1, got {args.mm_k}")
    if args.bnb_cap_s is None:
        args.bnb_cap_s = 0.5 if args.quick else 5.0
    device = T.setup_device(args)
    sizes = sorted(args.sizes or ([T.QUICK_NUMEL] if args.quick else list(T.FULL_SIZES)))
    dtypes = args.dtypes or list(T.DTYPES.values())

    info = T.machine_info(device)
    bench = Bench(args, device)
    info["torch_int_mm"] = bench.int_mm
    for numel in sizes:
        print(f"# measuring numel={numel} ...", file=sys.stderr, flush=True)
        for dtype in dtypes:
            bench.vectorwise(numel, dtype)
        bench.matmul(numel)
        bench.mm_dequant(numel, dtypes)

    config = {"sizes": sizes, "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "mm_n": MM_N,
              "mm_k": args.mm_k, "bnb_cap_s": args.bnb_cap_s, "quick": args.quick,
              "policy": {n: T.policy_dict(T.policies(device, args.quick, n)) for n in sizes}}
    T.print_header("fp8probe bench_int8: LLM.int8() op throughput", info)
    print(T.render_table(bench.rows, COLUMNS, args.markdown))
    if args.json is not None:
        T.write_json(args.json, "bench_int8", info, config, bench.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
