"""Wall time, CPU time and peak memory of ``analyze --strategy all`` on the issue-15 models, split by pipeline part.

Usage: ``python benchmarks/bench_analyze.py [--model llama-135m,bert] [--strategy all] [--device cpu|cuda]
[--threads N] [--no-e2e] [--competing-load] [--markdown] [--json PATH] [--quick]``.

Models (benchmarks/models/, random weights from a config, nothing downloaded):
* ``llama-135m``: SmolLM-135M's shape (30 layers, d=576, MLP 1536, 9 / 3 KV heads, vocab 49152, tied
  embeddings; 211 linear layers), 2 batches of 1 x 128 tokens, its own next-token loss.
* ``bert``: a MiniLM-L6-shaped BERT encoder (6 layers, d=384, 12 heads, 37 linear layers), 2 x 128 tokens.

Each model runs in its own child process, so peak RSS (``ru_maxrss``: torch's C++ allocations
included) is that model's alone: import, model build, one warm-up analysis of a single small layer
(first calls pay one-off costs: op registration, lookup tables), then the measured ``analyze`` and
the HTML report. CPU time is the process's (all threads) over the same span as the wall time.
The split comes from ``Results.metadata["timings"]`` (pipeline.analyze): capture (model forward +
backward), stats (tensor statistics, outlier census), reference (float64 GEMMs), recipes, metrics,
tables; ``coverage`` is the replay of the GEMMs that are not linear layers (attention QKᵀ/PV,
matmul), the cost of covering them; ``e2e`` the end-to-end part (off with --no-e2e); ``report``
the HTML rendering. ``isolated`` = the per-GEMM analysis without e2e, what the targets are for.
A second table gives each recipe's share of recipes + metrics (``timings.recipe_s_by_strategy``), one column per
measured row: which recipes an ``--strategy all`` run spends its time on.

``RSS at start`` is the process's resident set just before the measured analysis (interpreter, torch,
transformers, fp8probe, the model, the heap the warm-up keeps); ``added/fp32 model`` = (peak − start) / the
fp32 parameter bytes, what the analysis itself holds at its peak. For Llama-135M the start alone is ~2× the
model (torch + transformers ~370 MiB beside 513 MiB of parameters), so the whole-process 2× target cannot be
met by any analysis; the added column is the part fp8probe controls.

``--competing-load`` measures every model twice: alone, then while another process keeps two
threads busy (SHA-256 over 1 MiB buffers: C code that releases the GIL, so both threads spin
on the CPUs). The ``×CPU`` column is the loaded CPU time over the unloaded one (target ≤ 1.5:
thread pools that busy-wait multiply CPU time when their workers are descheduled).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _timing as T  # noqa: F401  (also puts the repository root on sys.path)

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

MIB = 1 << 20
# name -> (builder module in benchmarks/models, full-size kwargs, --quick kwargs, target wall s on 2 idle cores)
MODELS: dict[str, tuple[str, dict, dict, float]] = {
    "llama-135m": ("llama_135m", {}, {"layers": 2, "d_model": 64, "d_ff": 128, "heads": 4, "kv_heads": 2,
                                      "vocab": 256, "seq": 16}, 30.0),
    "bert": ("minilm_bert", {}, {"layers": 2, "d_model": 64, "heads": 4, "d_ff": 128, "vocab": 256, "seq": 16}, 5.0),
}
#: peak RSS target: at most this many times the fp32 parameter bytes (issue 15)
RSS_TARGET_X = 2.0
CPU_GROWTH_TARGET = 1.5
# Warm-up analysis: one small GEMM site of each model (its first layer's key projection).
WARMUP_LAYERS = r"layers?\.0\.(self_attn\.k_proj|attention\.self\.key)(#|$)"

LOAD_CODE = """
import hashlib, threading
buf = bytes(1 << 20)
def spin():
    while True:
        hashlib.sha256(buf).digest()  # releases the GIL for large buffers: a real CPU-bound thread
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
threading.Event().wait()
"""

COLUMNS = [T.Column("model", "model"), T.Column("linears", "linears"), T.Column("tokens", "tokens"),
           T.Column("threads", "threads"), T.Column("load", "load"),
           T.Column("wall_s", "wall s", "{:.1f}"), T.Column("cpu_s", "CPU s", "{:.1f}"),
           T.Column("isolated_s", "isolated s", "{:.1f}"), T.Column("capture_s", "capture", "{:.1f}"),
           T.Column("stats_s", "stats", "{:.1f}"), T.Column("reference_s", "reference", "{:.1f}"),
           T.Column("recipes_s", "recipes", "{:.1f}"), T.Column("metrics_s", "metrics", "{:.1f}"),
           T.Column("tables_s", "tables", "{:.2f}"), T.Column("coverage_s", "coverage", "{:.1f}"),
           T.Column("e2e_s", "e2e", "{:.1f}"), T.Column("report_s", "report", "{:.1f}"),
           T.Column("rss_mib", "peak RSS MiB", "{:.0f}"), T.Column("rss_x_model", "RSS/fp32 model", "{:.2f}"),
           T.Column("start_rss_mib", "RSS at start MiB", "{:.0f}"),
           T.Column("added_x_model", "added/fp32 model", "{:.2f}"),
           T.Column("gpu_peak_mib", "GPU peak MiB", "{:.0f}"),
           T.Column("cpu_growth", "×CPU", "{:.2f}"), T.Column("target", "target")]


def current_rss() -> int | None:
    """This process's resident set now (VmRSS, bytes; None where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_model(name: str, quick: bool) -> tuple[Any, list]:
    """(model, batches) of MODELS[name] (benchmarks/models), the --quick config or the full one."""
    module, full, small, _ = MODELS[name]
    return importlib.import_module(f"models.{module}").build(**(small if quick else full))


def measure_one(name: str, strategy: str, threads: int | None, e2e: bool, quick: bool,
                device: str = "cpu") -> dict[str, object]:
    """Build model `name`, analyze it once to warm up, then measure analyze + report (run in a child process)."""
    import torch

    from fp8probe.analysis.pipeline import analyze

    if threads:
        torch.set_num_threads(threads)
    from fp8probe.analysis import capture
    keep, freeze = replay_settings()
    if keep:
        capture.keep_freed_blocks()
    if freeze:
        capture.freeze_loaded_objects()
    target_s = MODELS[name][3]
    model, batches = build_model(name, quick)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32 size (tied weights counted once)
    analyze(model, batches[:1], strategy, layers=WARMUP_LAYERS, e2e=False, device=device)  # CUDA: kernels compile
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # what the process holds before the measured analysis (interpreter, torch, transformers, fp8probe, the
    # model, the warm-up's retained heap): peak RSS minus this is what the analysis itself added
    start_rss = current_rss()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    res = analyze(model, batches, strategy, e2e=e2e, device=device)
    T.sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        report0 = time.perf_counter()
        res.to_html(Path(tmp) / "report.html")
        report_s = time.perf_counter() - report0
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    # An older fp8probe (a "before" measurement) has no timings: its split columns stay empty.
    t = res.metadata.get("timings") or {"total_s": wall - report_s, "e2e_s": 0.0, "replay_s_by_kind": {}}
    layers = res.tables["layers"]
    row: dict[str, object] = {
        "model": name + (" (quick)" if quick else ""), "linears": int((layers["kind"] == "linear").sum()),
        "gemm_sites": len(layers), "tokens": " + ".join(str(b["input_ids"].numel()) for b in batches),
        "strategies": len(res.metadata["strategies"]), "threads": torch.get_num_threads(), "device": device,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / MIB if device == "cuda" else None,
        "wall_s": wall, "cpu_s": cpu, "report_s": report_s,
        "coverage_s": sum(s for kind, s in t["replay_s_by_kind"].items() if kind != "linear") or None,
        "rss_mib": rss / MIB, "model_mib": model_bytes / MIB, "rss_x_model": rss / model_bytes,
        "start_rss_mib": None if start_rss is None else start_rss / MIB,
        "added_x_model": None if start_rss is None else (rss - start_rss) / model_bytes,
        "target": f"isolated ≤ {target_s:g} s" + (f", RSS ≤ {RSS_TARGET_X:g}× model" if name == "llama-135m" else ""),
        "timings": t,
    }
    row.update({k: v for k, v in t.items() if k.endswith("_s")})
    row["isolated_s"] = t["total_s"] - t["e2e_s"]
    return row


def recipe_table(rows: list[dict[str, object]]) -> tuple[list[dict[str, object]], list[T.Column]] | None:
    """(rows, columns) of a table of each recipe's replay + metrics seconds, one column per measured row (model
    and load), or None when no row has them (an fp8probe without ``recipe_s_by_strategy``)."""
    per_row = [(r, r["timings"].get("recipe_s_by_strategy")) for r in rows if isinstance(r.get("timings"), dict)]
    per_row = [(r, by) for r, by in per_row if by]
    if not per_row:
        return None
    columns = [T.Column("strategy", "strategy")]
    table: dict[str, dict[str, object]] = {}
    for k, (r, by) in enumerate(per_row):
        key = f"m{k}"
        columns.append(T.Column(key, f"{r['model']}" + ("" if r.get("load") in (None, "none") else f" ({r['load']})"),
                                "{:.2f}"))
        for name, seconds in by.items():
            table.setdefault(name, {"strategy": name})[key] = seconds
    return list(table.values()), columns


def replay_settings() -> tuple[bool, bool]:
    """(keep_freed_blocks, freeze_loaded_objects): what the measured processes apply, as the command line does
    for analyze (cli._replay_process). FP8PROBE_BENCH_GLIBC_DEFAULTS=1 (or an older fp8probe without it) keeps
    glibc's malloc thresholds, and an older fp8probe without the freeze the collector's generations."""
    from fp8probe.analysis import capture

    keep = os.environ.get("FP8PROBE_BENCH_GLIBC_DEFAULTS", "0") != "1" and hasattr(capture, "keep_freed_blocks")
    return keep, hasattr(capture, "freeze_loaded_objects")


def child_wait_policy() -> str:
    """The OpenMP wait policy of the measured processes: the user's OMP_WAIT_POLICY, else PASSIVE, as the
    fp8probe command line sets it (fp8probe/__init__.py); the children are not the CLI, so it is passed.
    OMP_WAIT_POLICY=default leaves it unset in the children (libgomp's default, as before issue 15)."""
    return os.environ.get("OMP_WAIT_POLICY", "PASSIVE")


def _child(args: argparse.Namespace, name: str) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--strategy", args.strategy]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--no-e2e"] if args.no_e2e else []
    cmd += ["--quick"] if args.quick else []
    cmd += ["--device", args.device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(T.REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_WAIT_POLICY": child_wait_policy()}
    if env["OMP_WAIT_POLICY"] == "default":  # libgomp's own default (spin a while, then sleep): the "before"
        del env["OMP_WAIT_POLICY"]
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the command line sets it (fp8probe/__init__.py); 0: off
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: measuring {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _with_load(fn):  # type: ignore[no-untyped-def]
    """fn() while another process keeps two threads busy; the load process is stopped afterwards."""
    load = subprocess.Popen([sys.executable, "-c", LOAD_CODE])
    try:
        time.sleep(0.5)  # let both threads start spinning
        return fn()
    finally:
        load.terminate()
        load.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=",".join(MODELS), help=f"comma-separated, among {', '.join(MODELS)}")
    ap.add_argument("--strategy", default="all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where analyze runs (peak GPU memory "
                    "is reported for cuda)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end part (isolated per-GEMM analysis only)")
    ap.add_argument("--competing-load", action="store_true",
                    help="measure each model again under a 2-thread busy loop in another process")
    ap.add_argument("--quick", action="store_true", help="2-layer, 64-wide versions of the models (a smoke test)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for RESULTS.md)")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
    if args.child:
        print(json.dumps(measure_one(args.child, args.strategy, args.threads, not args.no_e2e, args.quick,
                                     args.device), default=float))
        return 0
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise SystemExit(f"error: --model must be among {', '.join(MODELS)}, got {args.model!r}")
    T.setup_device(argparse.Namespace(device=args.device, threads=args.threads, quick=False))  # exit 2 without a GPU
    info = T.machine_info(args.device)
    info["omp_wait_policy"] = child_wait_policy()
    info["thp_mem_alloc_enable"] = os.environ.get("THP_MEM_ALLOC_ENABLE", "1")
    keep, freeze = replay_settings()
    info["malloc"] = "keep_freed_blocks (as the command line)" if keep else "glibc defaults"
    info["gc"] = "freeze_loaded_objects (as the command line)" if freeze else "Python's defaults"
    # the parallel replay of small sites (pipeline.replay_workers); 1 = the serial replay
    info["replay_workers"] = os.environ.get("FP8PROBE_REPLAY_WORKERS", "default (torch threads)")
    T.print_header("bench_analyze: analyze --strategy " + args.strategy, info)
    rows = []
    for name in names:
        alone = _child(args, name)
        alone["load"] = "none"
        rows.append(alone)
        if args.competing_load:
            loaded = _with_load(lambda: _child(args, name))
            loaded["load"] = "2-thread busy loop"
            loaded["cpu_growth"] = loaded["cpu_s"] / alone["cpu_s"]
            loaded["wall_growth"] = loaded["wall_s"] / alone["wall_s"]
            loaded["target"] = f"×CPU ≤ {CPU_GROWTH_TARGET:g}"
            rows.append(loaded)
    print(T.render_table(rows, COLUMNS, args.markdown))
    per_recipe = recipe_table(rows)
    if per_recipe is not None:
        print("\nEach recipe's replay and metrics (seconds of recipes + metrics; timings.recipe_s_by_strategy):")
        print(T.render_table(*per_recipe, args.markdown))
    if args.json:
        T.write_json(args.json, "bench_analyze", info, {"models": names, "strategy": args.strategy,
                                                         "threads": args.threads, "e2e": not args.no_e2e,
                                                         "device": args.device,
                                                         "quick": args.quick}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
