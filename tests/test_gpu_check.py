"""benchmarks/gpu_check.sh: valid bash, a clean "no GPU" exit here, and every script/option it calls exists."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: run the script itself")
def test_without_a_gpu_it_exits_3_and_says_why(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "no usable GPU" in summary
    assert "torch " in summary  # versions are recorded before giving up


def test_every_benchmark_option_it_passes_exists() -> None:
    text = SCRIPT.read_text()
    calls = re.findall(r"benchmarks/(bench_\w+\.py)((?:\s+--[\w-]+(?:\s+[^\s-][^\s]*)?|\s*\\\n)*)", text)
    assert {c[0] for c in calls} == {"bench_quantize.py", "bench_int8.py", "bench_scaled.py", "bench_analyze.py"}
    for script, args in calls:
        helptext = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                                  text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
        for opt in re.findall(r"--[\w-]+", args):
            assert opt in helptext, f"{script} has no option {opt}"


def test_the_analyze_stage_compares_two_runs_without_a_gpu(tmp_path: Path) -> None:
    # the analyze-cuda stage's script, run on the CPU twice: it must work before a GPU session spends time on it
    text = SCRIPT.read_text()
    body = re.search(r'stage "analyze-cuda" \d+ "\$PY" - <<\'EOF\'\n(.*?)\nEOF\n', text, re.S)
    assert body is not None
    env = {**os.environ, "ANALYZE_DEVICES": "cpu,cpu", "OUT_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-"], input=body.group(1), env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = (tmp_path / "analyze_cuda.txt").read_text()
    assert "max SQNR gap 0.0000 dB" in out and "gemm: " in out and "operands: " in out
