#!/usr/bin/env bash
# One-shot GPU verification for a session that is lent an NVIDIA GPU (see benchmarks/RESULTS.md § GPU).
#
# Run from the repository root on the GPU machine:   bash benchmarks/gpu_check.sh
# Budget: under 8 minutes on one H100/H200 (each stage has its own timeout; a stage that fails or times
# out is recorded and the next one still runs). Needs only the repository and a python3 with torch
# (CUDA build) and CuPy; nothing is downloaded and no C/C++ compiler is required (the CPU fast path is
# built when a compiler is there, else the reference runs the CPU side). Set PYTHON to choose the
# interpreter; GPU_CHECK_ONLY="cuda-tests bench-int8 ..." runs only the stages named (a rerun after a fix).
# Writes into $OUT when set (else ./gpu_check_out): at most 8 files, each small:
#   summary.txt        device, versions, one PASS/FAIL/TIMEOUT line per stage (read this first)
#   profile_cuda.txt   benchmarks/profile_analyze.py: cProfile of analyze on the GPU, synchronisations by line
#   quantize_cuda.json, int8_cuda.json, scaled_cuda.json   the three op benchmarks (also printed as Markdown)
#   analyze_cuda.txt   analyze --strategy all on the demo model, CPU vs GPU: wall time, SQNR gaps per row
#   analyze_models_cuda.json   bench_analyze on the GPU: the issue-15 Llama-135M and BERT, split by pipeline part
#   gpu_check.log      everything each stage printed (the CUDA tests' failures too)
# Exit status: 0 when every stage passed, 1 when any failed or timed out, 3 when there is no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset FP8PROBE_BACKEND   # the kernels, not the reference, must run
status=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME SECONDS CMD...: run CMD with a timeout, append its output to the log, record the outcome.
stage() {
    local name=$1 secs=$2; shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        note "SKIP    $name (not in GPU_CHECK_ONLY)"; return
    fi
    local t0=$SECONDS rc
    echo "=== $name ($(date -u +%H:%M:%S)): $*" >>"$LOG"
    timeout --kill-after=10 "$secs" "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        note "PASS    $name (${took} s)"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note "TIMEOUT $name (limit ${secs} s)"; status=1
    else
        note "FAIL    $name (exit $rc, ${took} s; see gpu_check.log)"; status=1
    fi
}

{
    echo "# fp8probe gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/# gpu: /'
    fi
    "$PY" - <<'EOF' 2>&1
import platform
import torch
print(f"# python {platform.python_version()}, torch {torch.__version__}, torch cuda {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"# device 0: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
try:
    import cupy
    print(f"# cupy {cupy.__version__}")
except Exception as exc:  # noqa: BLE001 - reported, not fatal here: the next check decides
    print(f"# cupy not importable: {exc}")
EOF
} | tee -a "$SUMMARY"

if ! "$PY" -c "import torch, cupy, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
    note "no usable GPU (torch.cuda.is_available() false or CuPy missing): nothing to check"
    exit 3
fi

# The CPU fast path is optional (the reference serves the CPU side without it); build it when possible.
if "$PY" setup.py -q build_ext --inplace >>"$LOG" 2>&1; then
    echo "# CPU fast path built" | tee -a "$SUMMARY"
else
    echo "# CPU fast path not built (no compiler?): CPU side uses the reference" | tee -a "$SUMMARY"
fi

# Optional test plugins (the CUDA image has them): workers share the GPU, and one hung test cannot eat the budget.
PYTEST_OPTS=(-q -p no:cacheprovider)
if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST_OPTS+=(-n 6); fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then PYTEST_OPTS+=(--timeout=120); fi

# Stages in order of importance: the kernels compile and equal the reference bit for bit first, the benchmarks after.
stage "nvrtc-compile" 60 "$PY" -m fp8probe.kernels.check
stage "kernels-registered" 45 "$PY" -c "
import torch, fp8probe.ops
from fp8probe.backends import cuda
assert cuda._registered, 'CuPy kernels not registered (FP8PROBE_BACKEND set, or CuPy missing)'
x = torch.randn(4096, device='cuda')
import fp8probe.functional as F
q, st = F.quantize_blockwise(x, blocksize=256)
torch.cuda.synchronize(); print('blockwise quantize on cuda ok', q.device, q.dtype)"
stage "cuda-tests" 180 "$PY" -m pytest "${PYTEST_OPTS[@]}" -m cuda tests/test_cuda_backend.py
# The device-parametrised tests (the `device` fixture: functional ops, autograd functions, Linear modules,
# delayed scaling, accumulation, stochastic rounding and the Hadamard transform) on the GPU.
stage "device-tests" 120 "$PY" -m pytest "${PYTEST_OPTS[@]}" -k cuda tests/test_ops.py tests/test_autograd.py \
    tests/test_nn.py tests/test_functional_mx.py tests/test_functional_props.py tests/test_functional_row_scale.py \
    tests/test_functional_vectors.py tests/analysis/test_accumulation.py tests/analysis/test_delayed.py \
    tests/test_nvfp4_training.py

stage "bench-int8" 60 "$PY" benchmarks/bench_int8.py --device cuda --markdown --json "$OUT_DIR/int8_cuda.json"
stage "bench-quantize" 60 "$PY" benchmarks/bench_quantize.py --device cuda --markdown --sizes 64M \
    --json "$OUT_DIR/quantize_cuda.json"
stage "bench-scaled" 60 "$PY" benchmarks/bench_scaled.py --device cuda --markdown --sizes 64M \
    --json "$OUT_DIR/scaled_cuda.json"

stage "analyze-cuda" 90 "$PY" - <<'EOF'
"""analyze --strategy all on the demo model on the CPU and on the GPU: wall time of each, and the two analyses'
numbers side by side. The GPU runs the model and the recipes' GEMMs in its own summation order, so the captured
tensors and the products differ from the CPU's in the last bits and the SQNRs should differ far less than a dB; a
recipe or metric that computes something else on the GPU shows as a larger gap, and fails this stage (> 1 dB).
(ANALYZE_DEVICES=cpu,cpu runs the comparison without a GPU: every gap is then 0.)"""
import math
import os
import time

import torch

from fp8probe.analysis.demo_model import DemoConfig, build_model, make_batches
from fp8probe.analysis.pipeline import analyze

devices = os.environ.get("ANALYZE_DEVICES", "cpu,cuda").split(",")
cfg = DemoConfig()
batches = make_batches(2, 8, cfg.seq, seed=1, vocab=cfg.vocab)
times, tables = [], []
for device in devices:
    model = build_model(cfg).to(device)
    analyze(model, batches[:1], "all", layers=r"^head$", device=device, e2e=False)  # warm-up: kernels compile once
    t0 = time.perf_counter()
    res = analyze(model, batches, "all", device=device)   # the end-to-end part too (timed, not compared)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    tables.append(res.tables)
    print(f"{device}: {len(res.tables['layers'])} layers, {len(res.tables['gemm'])} gemm rows, {times[-1]:.2f} s")

worst = 0.0
report = []
for name, keys in (("gemm", ["layer", "strategy", "gemm"]), ("operands", ["layer", "strategy", "operand"])):
    a, b = (t[name].set_index(keys)["sqnr_db"].astype(float) for t in tables)
    both = a.to_frame("first").join(b.to_frame("second"), how="outer")
    finite = both[both.apply(lambda col: col.map(math.isfinite)).all(axis=1)]
    gap = (finite["first"] - finite["second"]).abs()
    # rows finite on one device only (an exact result on one, an overflow) are listed, not scored
    odd = [k for k in both.index.difference(finite.index)
           if not (both.loc[k, "first"] == both.loc[k, "second"] or both.loc[k].isna().all())]
    top = gap.sort_values(ascending=False).head(5)
    report.append(f"{name}: {len(both)} rows, max |SQNR gap| {gap.max():.4f} dB, median {gap.median():.5f} dB, "
                  f"finite on one device only: {len(odd)}")
    report += [f"  {k}: {both.loc[k, 'first']:.4f} vs {both.loc[k, 'second']:.4f} dB" for k in top.index]
    report += [f"  one-sided {k}: {both.loc[k, 'first']} vs {both.loc[k, 'second']}" for k in odd[:5]]
    worst = max(worst, float(gap.max()) if len(gap) else 0.0)
line = (f"| demo model, 2 batches, all strategies | {devices[0]} {times[0]:.2f} s | {devices[1]} {times[1]:.2f} s | "
        f"x{times[0] / times[1]:.1f} | max SQNR gap {worst:.4f} dB |")
print(line)
print("\n".join(report))
with open(os.path.join(os.environ.get("OUT_DIR", "."), "analyze_cuda.txt"), "w") as fh:
    fh.write(line + "\n" + "\n".join(report) + "\n")
if worst > 1.0:
    raise SystemExit(f"the two devices' SQNRs differ by up to {worst:.3f} dB (> 1 dB): see analyze_cuda.txt")
EOF

# Where the GPU analysis spends its time (the first GPU run found it slower than the CPU's, host-bound): a cProfile
# of analyze on the BERT model and each host-device synchronisation by the fp8probe line that caused it.
stage "profile-cuda" 120 "$PY" benchmarks/profile_analyze.py --device cuda --model bert --top 40 \
    --out "$OUT_DIR/profile_cuda.txt"

stage "bench-analyze" 170 "$PY" benchmarks/bench_analyze.py --device cuda --model bert,llama-135m --no-e2e \
    --markdown --json "$OUT_DIR/analyze_models_cuda.json"
# FSDP2 (fully_shard) on NCCL, one rank per GPU: capture names the all-gathered weights and the tables
# equal an unsharded run (tests/analysis/test_fsdp.py).
stage "fsdp2-cuda" 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/analysis/test_fsdp.py

note "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)"
exit $status
