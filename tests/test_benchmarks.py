"""The benchmark scripts run end to end in --quick mode and print well-formed tables (no timing assertions)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
import _timing as T  # noqa: E402  (benchmarks/ is not a package)

# The columns each script's table must have, in order (the contract RESULTS.md is written against).
COMMON = ["op", "dtype", "numel"]
TIMES = ["median ms", "min ms", "n", "GB/s"]
EXPECTED = {
    "bench_quantize.py": {
        "columns": [*COMMON, "block", "mode", *TIMES, "×copy", "×bnb", "×torch", "target"],
        "ops": {"copy dst.copy_(x)", "torch cast → float8_e4m3fn", "torch cast → float8_e5m2", "quantize",
                "dequantize", "quantize_blockwise", "dequantize_blockwise", "bnb quantize_blockwise",
                "bnb dequantize_blockwise"},
        "modes": {"quantize_blockwise": {"fresh", "out"}, "dequantize_blockwise": {"fresh", "out"}},
    },
    "bench_int8.py": {
        "columns": [*COMMON, "shape", "mode", *TIMES, "GOP/s", "×copy", "×bnb", "×torch", "×best", "target"],
        "ops": {"copy dst.copy_(x)", "int8_vectorwise_quant", "bnb int8_vectorwise_quant", "int8_linear_matmul",
                "torch._int_mm", "bnb int8_linear_matmul", "int8_mm_dequant", "bnb int8_mm_dequant",
                "torch float32 GEMM, K chunks ≤ 1024 (exact)", "torch float64 GEMM (exact)"},
        "modes": {"int8_mm_dequant": {"fresh", "out"}},
    },
    "bench_scaled.py": {
        "columns": [*COMMON, "scaling", *TIMES, "×copy", "×clone", "×torch"],
        "ops": {"copy dst.copy_(x)", "copy x.clone()", "quantize_scaled", "dequantize_scaled",
                "torch cast → float8_e4m3fn"},
        "modes": {},
    },
}
NUMERIC = {"median ms", "min ms", "GB/s", "GOP/s", "×copy", "×clone", "×bnb", "×torch", "×best"}


def _run_in_process(script: str, argv: list[str]) -> str:
    """stdout of ``benchmarks/<script>``'s main(argv), run in this interpreter (torch threads restored)."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCH / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert module.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --quick sets one thread; do not leak it into other tests
    return buf.getvalue()


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def quick_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict]:
    """(script, stdout, JSON document) of ``python benchmarks/<script> --quick --json PATH``.

    bench_quantize.py runs as a real subprocess (the command the issue names); its siblings run
    their main() in this process, because each fresh interpreter re-imports torch and bitsandbytes
    (~10 s of CPU on the shared 2-core machine) and the whole suite must stay within minutes.
    """
    script = request.param
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    argv = ["--quick", "--json", str(out)]
    if script == "bench_quantize.py":
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, str(BENCH / script), *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        stdout = proc.stdout
    else:
        stdout = _run_in_process(script, argv)
    return script, stdout, json.loads(out.read_text(encoding="utf-8"))


def _table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """Header titles and cell rows of the space-aligned table (after the '# ...' machine lines)."""
    lines = [ln for ln in stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    header = lines[0]
    # columns are left-aligned and joined by two spaces (titles hold at most single spaces, e.g.
    # "median ms"), so a column starts where a non-space follows two spaces; cut every line there
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 2:i] == "  ")]
    cut = lambda ln: [ln[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]  # noqa: E731
    return cut(header), [cut(ln) for ln in lines[1:]]


@pytest.mark.slow
def test_quick_table_has_the_expected_columns_and_positive_numbers(quick_run) -> None:
    script, stdout, doc = quick_run
    titles, rows = _table(stdout)
    assert titles == EXPECTED[script]["columns"]
    assert len(rows) == len(doc["rows"]) > 0
    for row in rows:
        for title, cell in zip(titles, row):
            if title in NUMERIC and cell != "—":
                value = float(cell)
                assert math.isfinite(value) and value > 0, (title, row)
    for line in ("# cpu_model:", "# torch:", "# bitsandbytes:", "# cpu_backend:", "# torch_threads:"):
        assert line in stdout


@pytest.mark.slow
def test_quick_json_rows_cover_every_op_and_mode(quick_run) -> None:
    script, _, doc = quick_run
    assert doc["schema"] == "fp8probe.bench" and doc["script"] == script.removesuffix(".py")
    rows = doc["rows"]
    expected_ops = EXPECTED[script]["ops"]
    if importlib.util.find_spec("bitsandbytes") is None:  # the test extra installs it; a bare env may not
        expected_ops = {op for op in expected_ops if not op.startswith("bnb")}
    assert expected_ops <= {r["op"] for r in rows}
    for op, modes in EXPECTED[script]["modes"].items():
        assert {r["mode"] for r in rows if r["op"] == op} == modes
    measured = [r for r in rows if r["reps"] > 0]
    assert measured, "no row was measured"
    for r in measured:
        assert 0 < r["min_ms"] <= r["median_ms"] and math.isfinite(r["median_ms"]), r
        assert r["gbps"] > 0 and math.isfinite(r["gbps"]), r
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9), r
        for key in ("x_copy", "x_bnb", "x_torch"):
            assert r[key] is None or (r[key] > 0 and math.isfinite(r[key])), (key, r)
    # every fp8probe row (not the copy/alternative rows) is compared with the copy of the same run
    ours = [r for r in measured if not r["op"].startswith(("copy", "torch", "bnb")) and "matmul" not in r["op"]]
    assert ours and all(r["x_copy"] is not None for r in ours)


def test_render_table_markdown_and_text() -> None:
    cols = [T.Column("op", "op"), T.Column("gbps", "GB/s", "{:.2f}")]
    rows = [{"op": "copy", "gbps": 21.456}, {"op": "quantize_blockwise", "gbps": None}]
    assert T.render_table(rows, cols, markdown=True).splitlines() == [
        "| op | GB/s |", "|---|---|", "| copy | 21.46 |", "| quantize_blockwise | — |"]
    text = T.render_table(rows, cols, markdown=False).splitlines()
    assert text[0].split() == ["op", "GB/s"] and text[1].split() == ["copy", "21.46"]
    assert text[2].split() == ["quantize_blockwise", "—"]


def test_parse_sizes_and_policy_validation() -> None:
    assert T.parse_sizes("1M,16K,3") == [1 << 20, 1 << 14, 3]
    with pytest.raises(Exception, match="positive integers"):
        T.parse_sizes("0")
    with pytest.raises(ValueError, match="min_reps"):
        T.Policy(warmup=1, min_reps=3, max_reps=2, budget_s=0.1)


def test_measure_counts_calls_per_policy() -> None:
    calls: list[int] = []
    t = T.measure(calls.append, "cpu", T.Policy(warmup=2, min_reps=3, max_reps=4, budget_s=0.0))
    # two warm-up calls, then min_reps timed calls (budget 0 is met at once), indices keep counting
    assert calls == [0, 1, 2, 3, 4] and t.reps == 3 and 0 <= t.min_s <= t.median_s


def test_predicted_cap_skips_only_after_a_measurement() -> None:
    cap = T.PredictedCap(cap_s=1.0)
    assert cap.skip_reason("k", 10**9) is None  # nothing measured yet: measure it
    cap.record("k", 1000, T.Timing(median_s=0.01, min_s=0.01, reps=1))  # 1e-5 s per element
    assert cap.skip_reason("k", 50_000) is None  # 0.5 s predicted
    assert "predicted 2.0 s" in cap.skip_reason("k", 200_000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_device_cuda_without_gpu_exits_2() -> None:
    import argparse

    with pytest.raises(SystemExit) as exc:
        T.setup_device(argparse.Namespace(device="cuda", threads=None, quick=False))
    assert exc.value.code == 2


def test_try_measure_turns_a_rejected_case_into_a_reason() -> None:
    def reject(i: int) -> None:
        raise RuntimeError("self.size(0) needs to be greater than 16\nmore detail")

    t, why = T.try_measure(reject, "cpu", T.Policy(warmup=1, min_reps=1, max_reps=1, budget_s=0.0))
    assert t is None and why == "RuntimeError: self.size(0) needs to be greater than 16"
    t, why = T.try_measure(lambda i: None, "cpu", T.Policy(warmup=0, min_reps=2, max_reps=2, budget_s=0.0))
    assert why is None and t.reps == 2


@pytest.mark.slow
def test_bench_analyze_quick_with_competing_load(tmp_path: Path) -> None:
    """bench_analyze.py --quick: each model in a child process, the pipeline's split in the table, and under
    --competing-load a second row per model with the CPU-time growth; then each recipe's seconds per row."""
    out = tmp_path / "analyze.json"
    stdout = _run_in_process("bench_analyze.py", ["--quick", "--model", "bert,llama-135m", "--strategy",
                                                  "ocp-rowwise,mxfp8", "--competing-load", "--json", str(out)])
    stdout, _, per_recipe = stdout.partition("\nEach recipe's replay and metrics")
    titles, cells = _table(stdout)
    r_titles, r_cells = _table(per_recipe.split("\n", 1)[1])
    assert r_titles == ["strategy", "bert (quick)", "bert (quick) (2-thread busy loop)", "llama-135m (quick)",
                        "llama-135m (quick) (2-thread busy loop)"]
    assert [c[0] for c in r_cells] == ["ocp-rowwise", "mxfp8"] and all(float(v) > 0 for c in r_cells for v in c[1:])
    assert titles[:5] == ["model", "linears", "tokens", "threads", "load"]
    assert {"capture", "recipes", "metrics", "coverage", "e2e", "report", "peak RSS MiB", "×CPU"} <= set(titles)
    assert "# omp_wait_policy:" in stdout and "# cpu_model:" in stdout
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert [(r["model"], r["load"]) for r in rows] == [
        ("bert (quick)", "none"), ("bert (quick)", "2-thread busy loop"),
        ("llama-135m (quick)", "none"), ("llama-135m (quick)", "2-thread busy loop")]
    assert len(cells) == 4
    for r in rows:
        assert r["linears"] == (13 if r["model"].startswith("bert") else 15)  # 2 layers x 6 (+ pooler) / x 7 (+ head)
        assert r["strategies"] == 2 and r["rss_mib"] > r["model_mib"] > 0
        by = r["timings"]["recipe_s_by_strategy"]
        assert list(by) == ["ocp-rowwise", "mxfp8"] and sum(by.values()) == pytest.approx(r["recipes_s"] + r["metrics_s"])
        # the start (imports, model) is part of the peak; the added part is what the analysis held
        assert 0 < r["start_rss_mib"] <= r["rss_mib"]
        assert r["added_x_model"] == pytest.approx((r["rss_mib"] - r["start_rss_mib"]) / r["model_mib"])
        parts = sum(r[k] for k in ("capture_s", "stats_s", "reference_s", "recipes_s", "metrics_s", "tables_s", "e2e_s"))
        assert 0 < parts <= r["timings"]["total_s"] <= r["wall_s"]
        assert r["isolated_s"] == pytest.approx(r["timings"]["total_s"] - r["e2e_s"])
        assert r["e2e_s"] > 0 and r["report_s"] > 0 and r["coverage_s"] > 0  # attention GEMMs are replayed too
    for alone, loaded in zip(rows[::2], rows[1::2]):
        assert loaded["cpu_growth"] == pytest.approx(loaded["cpu_s"] / alone["cpu_s"])
        assert "cpu_growth" not in alone


def test_bench_analyze_rejects_unknown_models_and_a_missing_gpu() -> None:
    with pytest.raises(SystemExit, match="--model must be among llama-135m, bert"):
        _run_in_process("bench_analyze.py", ["--model", "gpt5"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            _run_in_process("bench_analyze.py", ["--device", "cuda"])
        assert exc.value.code == 2


def _compare_scaled_kernels():
    """(benchmarks/compare_scaled_kernels.py as a module, backends.cpu); skips without the C extension."""
    from fp8probe.backends import cpu
    if not cpu.available():
        pytest.skip("fp8probe._fastpath not built")
    spec = importlib.util.spec_from_file_location("compare_scaled_kernels", BENCH / "compare_scaled_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, cpu


def test_compare_scaled_kernels_runs_with_this_checkouts_extension_as_the_old_one(capsys) -> None:
    """benchmarks/compare_scaled_kernels.py loads a second _fastpath and prints old -> new for every scaling."""
    module, cpu = _compare_scaled_kernels()
    assert module.main([cpu._ext().__file__, "--rows", "2", "--reps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# 2x4096 float32") and len(lines) == 1 + len(module.CASES)
    for line, (label, *_) in zip(lines[1:], module.CASES):
        assert line.startswith(label) and line.count("->") == 3


def test_compare_scaled_kernels_wall_adds_the_minimum_wall_times(capsys) -> None:
    """--wall puts the old -> new minimum wall ms in brackets after each CPU pair (2 threads: the overlap)."""
    module, cpu = _compare_scaled_kernels()
    assert module.main([cpu._ext().__file__, "--rows", "2", "--reps", "1", "--threads", "2", "--wall"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# 2x4096 float32, 2 thread(s), min CPU ms [wall ms]")
    for line, (label, *_) in zip(lines[1:], module.CASES):
        assert line.startswith(label) and line.count("->") == 6 and line.count("[") == 3
        walls = [float(v) for v in re.findall(r"\[\s*([\d.]+) ->\s*([\d.]+)\]", line)[0]]
        assert all(w > 0 for w in walls)


def test_profile_analyze_quick_writes_both_profile_orderings(tmp_path: Path) -> None:
    """benchmarks/profile_analyze.py --quick on the CPU: the header, the wall time and the two cProfile listings."""
    out = tmp_path / "profile.txt"
    stdout = _run_in_process("profile_analyze.py", ["--quick", "--top", "5", "--strategy", "global,int8",
                                                    "--out", str(out)])
    text = out.read_text()
    assert text.strip() == stdout.strip()
    assert text.startswith("# profile_analyze: bert (quick), strategy global,int8, device cpu")
    assert re.search(r"# analyze under cProfile: [\d.]+ s wall", text)
    assert "Ordered by: internal time" in text and "Ordered by: cumulative time" in text
    assert "pipeline.py" in text and "end-to-end part off" in text.splitlines()[0] and "e2e.py" not in text


def test_rss_breakdown_quick_names_each_part_of_the_replay() -> None:
    """benchmarks/rss_breakdown.py --quick: every recipe, the float64 reference, the statistics and the model's own
    passes each get a peak, for the run and for its largest site, and the pipeline is left unpatched."""
    from fp8probe.analysis import pipeline

    before = (pipeline._Analysis._strategy, pipeline._Analysis._replay, pipeline.reference_gemms)
    stdout = _run_in_process("rss_breakdown.py", ["--quick", "--strategy", "global,int8", "--markdown",
                                                  "--interval-ms", "0.5"])
    assert (pipeline._Analysis._strategy, pipeline._Analysis._replay, pipeline.reference_gemms) == before
    head = next(line for line in stdout.splitlines() if line.startswith("# rss_breakdown:"))
    assert head.startswith("# rss_breakdown: llama-135m (quick), strategy global,int8, 1 batch, e2e off")
    whole = stdout.split("whole run:")[1].split("largest site")[0]
    parts = {line.split("|")[1].strip() for line in whole.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"global", "int8", "float64 reference"} <= parts - {"part"}
    assert "largest site model." in stdout


def test_profile_analyze_e2e_profiles_the_end_to_end_part(tmp_path: Path) -> None:
    """--e2e: the default run's end-to-end part is in the profile (it was left out: 59 of 98 s of a Llama run)."""
    stdout = _run_in_process("profile_analyze.py", ["--quick", "--top", "60", "--strategy", "global", "--e2e"])
    assert stdout.splitlines()[0].endswith("end-to-end part on") and "e2e.py" in stdout


def test_profile_analyze_attributes_warnings_to_the_innermost_fp8probe_frame() -> None:
    """The sync counter names the fp8probe line that issued each matching warning (torch's sync debug mode
    warns from inside torch: the innermost fp8probe frame is the caller to fix)."""
    spec = importlib.util.spec_from_file_location("profile_analyze", BENCH / "profile_analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inside = {}
    exec(compile("import warnings\n\ndef waits(n):\n    for _ in range(n):\n"
                 "        warnings.warn('called a synchronizing CUDA operation')\n",
                 module.PACKAGE_DIR + "/fake_site.py", "exec"), inside)

    def run() -> None:
        inside["waits"](3)
        warnings.warn("called a synchronizing CUDA operation")   # not under fp8probe
        warnings.warn("something else")                          # not a sync: ignored
    sites = module.warnings_by_frame(run, "synchroniz")
    assert sites == {"fp8probe/fake_site.py:5 waits": 3, "(outside fp8probe)": 1}


def test_bench_metrics_quick_compares_two_builds_and_torch() -> None:
    """benchmarks/bench_metrics.py --quick with this checkout's extension as the old one: a row per reduction and
    shape, positive ns per element for old, new and (where it has one) torch."""
    from fp8probe.backends import cpu
    if not cpu.available():
        pytest.skip("fp8probe._fastpath not built")
    lines = [line for line in _run_in_process("bench_metrics.py", [cpu._ext().__file__, "--quick"]).splitlines()
             if line.startswith("| ") and not line.startswith("| op |")]
    assert [line.split(" | ")[0][2:] for line in lines] == ["error_sums", "operand_sums, mask",
                                                              "operand_sums, no mask"] * 2
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        values = [float(c) for c in cells if c != "—"]
        assert len(values) == (3 if "no mask" not in line else 2) and all(v > 0 for v in values)


def test_bench_threads_quick_compares_cutoffs_and_restores_the_one_in_use() -> None:
    """benchmarks/bench_threads.py --quick: a row per op and shape with positive times under both cutoffs and their
    ratio; the cutoff in use before the run is in use after it."""
    from fp8probe.backends import cpu
    if not cpu.available():
        pytest.skip("fp8probe._fastpath not built")
    before = cpu._ext().serial_cutoff()
    out = _run_in_process("bench_threads.py", ["--quick", "--cutoffs", "1024,shipped", "--markdown"])
    assert cpu._ext().serial_cutoff() == before
    assert f"# serial_cutoff: {before} (in use" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| op |")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["fused_scaled e4m3 tensor", "fused_scaled mxfp8 1x32",
                                                     "error_sums"] * 2
    for r in rows:
        values = [float(c) for c in r.strip("| ").split(" | ")[3:]]
        assert len(values) == 5 and all(v > 0 for v in values)
