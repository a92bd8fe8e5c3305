"""Shared timing, machine-description, table and JSON helpers for the benchmarks/bench_*.py scripts.

Timing method (device METHOD.md): one or more warm-up calls first (module load, lookup-table caches,
page faults of preallocated buffers), then timed calls until both ``min_reps`` and ``budget_s`` are
reached or ``max_reps`` is hit; the median and the minimum are reported. CPU calls are timed with
``time.perf_counter``; CUDA calls with CUDA events recorded around each call on the current stream
(host-side gaps between calls are not counted). Every timed callable takes the repetition index
``i`` so it can rotate among several input sets: a set that fits in the last-level cache (105 MiB
L3 on the 2-core development CPU, 50 MiB L2 on an H100) would otherwise be measured from cache on
every call after the first. ``rotation_sets`` picks enough sets to cover twice the cache.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python benchmarks/bench_x.py` from a checkout works without an install (and with an editable
    # install whose recorded path no longer exists).
    sys.path.insert(0, str(REPO_ROOT))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
MI = 1 << 20
#: element counts of a full run (issue 6) and of --quick (a smoke test: 16K elements = 4 rows of 4096)
FULL_SIZES = (MI, 16 * MI, 64 * MI)
QUICK_NUMEL = 1 << 14
# Last-level cache assumed when the device does not say: the development CPU's L3 (105 MiB).
_DEFAULT_CACHE_BYTES = 105 * MI
# Upper bound on rotation sets: 1M fp32 elements x 2 (copy traffic) = 8 MiB per set, so 27 sets
# already cover 2 x 105 MiB; 64 leaves room for smaller quick-mode tensors without unbounded memory.
_MAX_SETS = 64


@dataclass(frozen=True)
class Policy:
    """How many times to call an op: warm-up calls, then timed calls within [min_reps, max_reps].

    Timed calls continue past ``min_reps`` until their summed time reaches ``budget_s`` seconds.
    """

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.min_reps < 1 or self.max_reps < self.min_reps or self.budget_s < 0:
            raise ValueError(f"Policy needs warmup >= 0, 1 <= min_reps <= max_reps, budget_s >= 0; got {self}")


def policies(device: str, quick: bool, numel: int) -> Policy:
    """Call counts shared by every script: many on CUDA (cheap), few for 64M-element CPU cases.

    64M fp32 inputs are 256 MiB (and a 64M-output int8 matmul is ~550 GOP): 2-5 calls keep a whole
    CPU run under ~10 minutes.
    """
    if device == "cuda":
        return Policy(3, 5, 20, 0.05) if quick else Policy(5, 30, 200, 0.5)
    if quick:
        return Policy(1, 2, 5, 0.02)
    if numel > 16 * MI:
        return Policy(1, 2, 5, 0.5)
    return Policy(1, 3, 15, 0.4)


@dataclass(frozen=True)
class Timing:
    """Median and minimum seconds per call over ``reps`` timed calls."""

    median_s: float
    min_s: float
    reps: int


def sync(device: str) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[int], object], device: str, policy: Policy) -> Timing:
    """Time ``fn(i)`` (i = repetition index, for input rotation) per `policy`; see the module docstring."""
    for i in range(policy.warmup):
        fn(i)
    sync(device)
    # No cyclic-GC pass inside the timed calls (a full gc.collect() costs ~0.5 s once torch.compile's
    # modules are loaded, so it is switched off rather than run before each measurement).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = _timed_calls(fn, device, policy)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(times), min(times), len(times))


def _timed_calls(fn: Callable[[int], object], device: str, policy: Policy) -> list[float]:
    times: list[float] = []
    if device == "cuda":
        # Events in batches of 10 between synchronisations: the budget check needs elapsed times,
        # but a sync after every call would add the host round trip to the gaps between calls.
        i = policy.warmup
        while len(times) < policy.max_reps and (len(times) < policy.min_reps or sum(times) < policy.budget_s):
            batch = min(10, policy.max_reps - len(times))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(batch)]
            for start, end in events:
                start.record()
                fn(i)
                end.record()
                i += 1
            torch.cuda.synchronize()
            times += [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        i = policy.warmup
        while len(times) < policy.max_reps and (len(times) < policy.min_reps or sum(times) < policy.budget_s):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
            i += 1
    return times


def cache_bytes(device: str) -> int:
    """Bytes of the last-level cache that repeated calls could hit (L2 on CUDA, L3 on CPU)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 50 * MI)
    best = 0
    cache_dir = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in cache_dir.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": MI, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or _DEFAULT_CACHE_BYTES


def rotation_sets(set_bytes: int, device: str) -> int:
    """Number of input sets (each `set_bytes` of traffic per call) whose rotation covers 2x the cache."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    return max(1, min(_MAX_SETS, math.ceil(2 * cache_bytes(device) / set_bytes)))


def touched(t: torch.Tensor) -> torch.Tensor:
    """``t`` written once (zeros), for a buffer that timed calls write into (``out=``, ``dst.copy_``): its pages are
    then mapped before the first timed call. An untouched ``torch.empty`` page-faults on its first write, and with
    several rotation sets each buffer's first write fell inside the timed calls: a 64 MB ``dst.copy_(x)`` took
    95-101 ms against 4.5-5 ms warm (Intel Xeon VM, 2026-12-01), which made every ``×copy`` ratio 20x too kind."""
    return t.zero_()


def random_inputs(numel: int, dtype: torch.dtype, device: str, sets: int, seed: int) -> list[torch.Tensor]:
    """`sets` fresh seeded N(0, 3²) tensors [numel // 4096 or 1, ...] in `dtype` on `device` (never zeros).

    Two-dimensional [rows, 4096] when numel is a multiple of 4096 so row-wise ops see LLM-like rows.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (numel // 4096, 4096) if numel % 4096 == 0 and numel >= 4096 else (numel,)
    return [(torch.randn(shape, generator=g) * 3.0).to(dtype).to(device) for _ in range(sets)]


# --------------------------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_backend() -> str:
    """Which implementation serves fp8probe ops on CPU tensors: the C fast path or the torch reference.

    Probes ``fp8probe.backends.cpu`` defensively: the module and its ``available()`` may not exist
    in every checkout, and FP8PROBE_BACKEND=reference forces the reference.
    """
    if os.environ.get("FP8PROBE_BACKEND") == "reference":
        return "reference (FP8PROBE_BACKEND=reference)"
    try:
        mod = importlib.import_module("fp8probe.backends.cpu")
    except ImportError:
        return "reference (no fp8probe.backends.cpu module)"
    name = getattr(mod, "backend_name", None)
    available = getattr(mod, "available", None)
    try:
        if name is not None:  # e.g. "c-avx2", "c-scalar" or "reference"
            return f"{name()} (fp8probe.backends.cpu.backend_name())"
        if available is None:
            return "fp8probe.backends.cpu present (no available() to ask)"
        ok = bool(available())
    except Exception as exc:  # a broken fast path must not stop the benchmark from reporting
        return f"unknown (fp8probe.backends.cpu raised {type(exc).__name__}: {exc})"
    return "C fast path (fp8probe.backends.cpu.available() is True)" if ok else \
        "reference (fp8probe.backends.cpu.available() is False)"


def cuda_backend() -> str:
    """Which implementation serves fp8probe ops on CUDA tensors: CuPy kernels or the reference."""
    try:
        from fp8probe.backends import cuda as cuda_mod
    except ImportError as exc:
        return f"unknown (fp8probe.backends.cuda failed to import: {exc})"
    if getattr(cuda_mod, "_registered", False):
        return "CuPy/NVRTC kernels (fp8probe.backends.cuda registered)"
    return "reference (CuPy kernels not registered: FP8PROBE_BACKEND=reference or no CuPy)"


def machine_info(device: str) -> dict[str, object]:
    """Machine, library versions and active backend, for the printed header and the JSON file."""
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "fp8probe": _version("fp8probe"),
        "cpu_backend": cpu_backend(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["cuda_backend"] = cuda_backend()
    return info


def print_header(title: str, info: dict[str, object]) -> None:
    """Print the machine description as '# key: value' lines (kept out of the table)."""
    print(f"# {title}")
    for key, value in info.items():
        print(f"# {key}: {value}")


# --------------------------------------------------------------------------------------------
# command line, tables, JSON
# --------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    """'1M,16M,65536' -> [1048576, 16777216, 65536] (K/M suffixes are powers of two)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().upper()
        scale = {"K": 1 << 10, "M": MI}.get(part[-1:], 1)
        digits = part.rstrip("KM")
        if not digits.isdigit() or int(digits) <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive integers with optional K/M, got {text!r}")
        sizes.append(int(digits) * scale)
    return sizes


def parse_dtypes(text: str) -> list[torch.dtype]:
    """'float32,bfloat16' -> [torch.float32, torch.bfloat16]."""
    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"dtypes must be among {sorted(DTYPES)}, got {bad}")
    return [DTYPES[n] for n in names]


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options every bench script shares: device, quick mode, JSON and Markdown output, threads."""
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and few repeats (a smoke test that finishes in seconds)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for RESULTS.md)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's choice; 1 with --quick)")
    ap.add_argument("--sizes", type=parse_sizes, default=None, help="element counts, e.g. 1M,16M,64M")
    ap.add_argument("--dtypes", type=parse_dtypes, default=None, help="e.g. float32,float16,bfloat16")


def setup_device(args: argparse.Namespace) -> str:
    """Apply --threads and check that --device is usable; exits with status 2 when it is not.

    --quick defaults to one thread: its 16K-element tensors gain nothing from a second one, and
    on a shared 2-core machine each parallel region can wait a whole scheduler slice (~10 ms, seen
    here as 64K-element copies taking 10 ms instead of 0.02 ms) for a descheduled worker.
    """
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        raise SystemExit(2)
    return args.device


def gbps(nbytes: int, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either side was not measured."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Column:
    """One table column: the row key, its printed title and a format for floats ("sig": see sig3)."""

    key: str
    title: str
    fmt: str = "sig"


def sig3(value: float) -> str:
    """Three significant digits without exponents: 1234.5 -> '1235', 21.46 -> '21.5', 0.004567 -> '0.00457'.

    Throughputs here span 0.002 GB/s (bnb's CPU quantize) to thousands (GPU copies), so a fixed
    number of decimals would print the slow rows as 0.00.
    """
    if not math.isfinite(value) or value == 0:
        return str(value)
    if abs(value) >= 99.95:
        return f"{value:.0f}"
    value = float(f"{value:.3g}")  # round first so 9.999 prints as 10.0, not 10.00
    decimals = 2 - math.floor(math.log10(abs(value)))
    return f"{value:.{decimals}f}"


def _cell(value: object, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return sig3(value) if fmt == "sig" else fmt.format(value)
    return str(value)


def render_table(rows: Sequence[dict[str, object]], columns: Sequence[Column], markdown: bool) -> str:
    """The rows as a Markdown table or a space-aligned text table (missing values print as '—')."""
    cells = [[_cell(r.get(c.key), c.fmt) for c in columns] for r in rows]
    titles = [c.title for c in columns]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(t), *(len(row[k]) for row in cells)) if cells else len(t) for k, t in enumerate(titles)]
    lines = ["  ".join(t.ljust(w) for t, w in zip(titles, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: Path, script: str, info: dict[str, object], config: dict[str, object],
               rows: Sequence[dict[str, object]]) -> None:
    """Write {"schema": "fp8probe.bench", "version": 1, script, machine, config, rows} to `path`."""
    doc = {"schema": "fp8probe.bench", "version": 1, "script": script, "machine": info, "config": config,
           "rows": list(rows)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def policy_dict(policy: Policy) -> dict[str, object]:
    """A Policy as a plain dict for the JSON config."""
    return asdict(policy)


def make_row(device: str, op: str, dtype: torch.dtype | str, numel: int, mode: str, nbytes: int,
             t: Timing | None, copy_gbps: float | None, **extra: object) -> dict[str, object]:
    """One result row: times in ms, GB/s from the byte model, ×copy against this run's copy.

    ``t=None`` records a row that was not measured (its time columns print '—'); `extra` adds or
    overrides columns (block, shape, x_bnb, x_torch, target, skipped, ...).
    """
    rate = None if t is None else gbps(nbytes, t.median_s)
    row: dict[str, object] = {
        "device": device, "op": op, "dtype": str(dtype).removeprefix("torch."), "numel": numel, "mode": mode,
        "median_ms": None if t is None else t.median_s * 1e3, "min_ms": None if t is None else t.min_s * 1e3,
        "reps": 0 if t is None else t.reps, "bytes": nbytes, "gbps": rate, "x_copy": ratio(rate, copy_gbps),
        "x_bnb": None, "x_torch": None, "target": None}
    row.update(extra)
    return row


class PredictedCap:
    """Skips a slow alternative (bnb's CPU quantize) where a call is predicted to exceed `cap_s` seconds.

    The prediction is linear in the element count, from the first size measured for the same key
    (its seconds per element), so the smallest size of a run is always measured.
    """

    def __init__(self, cap_s: float) -> None:
        if not cap_s > 0:
            raise ValueError(f"cap_s must be > 0 seconds, got {cap_s!r}")
        self.cap_s = cap_s
        self._rate: dict[object, float] = {}

    def skip_reason(self, key: object, numel: int) -> str | None:
        """Why `key` is not measured at `numel` elements, or None when it should be."""
        rate = self._rate.get(key)
        if rate is None or rate * numel <= self.cap_s:
            return None
        return f"predicted {rate * numel:.1f} s per call > cap {self.cap_s:g} s"

    def record(self, key: object, numel: int, t: Timing) -> None:
        """Remember the first measured seconds per element for `key`."""
        self._rate.setdefault(key, t.median_s / numel)


def try_measure(fn: Callable[[int], object], device: str, policy: Policy) -> tuple[Timing | None, str | None]:
    """measure() for an alternative implementation that may reject the case: (timing, None) or (None, why).

    Used for bitsandbytes and torch._int_mm, whose support differs by device, dtype and shape (e.g.
    CUDA's torch._int_mm needs more than 16 rows); their failure leaves '—' cells, not a crash.
    """
    try:
        return measure(fn, device, policy), None
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
