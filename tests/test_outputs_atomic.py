"""Outputs are atomic (a run killed mid-write leaves no half file) and a re-run never silently mixes with old outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import fp8probe.report.files as files
from fp8probe.cli import EXIT_USAGE, cli
from fp8probe.report.files import (LOCK_FILE, atomic_write_text, claim_output_dir, existing_outputs, lock_output_dir,
                                   remove_outputs)

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{REPO / 'tests' / 'analysis' / 'tiny_factory.py'}:build"
RESULTS = REPO / "tests" / "report" / "data" / "results_small.json"
FACTORY = f"{REPO / 'tests' / 'analysis' / 'tiny_factory.py'}:build"
# A fast analyze: one batch of the tiny encoder, one strategy, two layers.
ANALYZE = ["analyze", FACTORY, "--strategy", "global", "--batches", "1", "--layers", "fc1", "-q", "--threads", "1"]


def _litter(d: Path) -> list[Path]:
    return sorted(d.rglob(".*.tmp"))


# ------------------------------------------------------------------------------------------------
# Killed mid-write (a real SIGKILL in a subprocess, halfway through the bytes of one file)
# ------------------------------------------------------------------------------------------------
_KILL_MIDWAY = r'''
import os, signal, sys
TARGET = {target!r}
real_fdopen = os.fdopen

class HalfThenKill:
    """Writes half of the data, makes sure it is on disk, then SIGKILLs this process."""
    def __init__(self, fh):
        self.fh = fh
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)
    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        os.fsync(self.fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name):
        return getattr(self.fh, name)

def fdopen(fd, *args, **kwargs):
    fh = real_fdopen(fd, *args, **kwargs)
    name = os.path.basename(os.readlink(f"/proc/self/fd/{{fd}}"))
    return HalfThenKill(fh) if name.startswith("." + TARGET + ".") else fh

os.fdopen = fdopen
import fp8probe.report.figures as figures
figures.figure_to_data_uri = lambda fig: "data:image/png;base64,"  # PNG encoding is slow and beside the point
sys.argv = ["fp8probe", *{argv!r}]
from fp8probe.cli import main
main()
'''


def _run_killed(target: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _KILL_MIDWAY.format(target=target, argv=argv)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self/fd to name the file being written")
def test_sigkill_mid_write_leaves_no_half_file(tmp_path, monkeypatch) -> None:
    import fp8probe.report.figures as figures

    monkeypatch.setattr(figures, "figure_to_data_uri", lambda fig: "data:image/png;base64,")
    out = tmp_path / "run"
    # 1. killed halfway through results.json on a first run: no results.json at all, and every file
    #    that is there is complete (the CSVs written before it parse in full).
    proc = _run_killed("results.json", [*ANALYZE, "--out", str(out), "--no-html"])
    assert proc.returncode == -9, proc.stderr
    assert not (out / "results.json").exists()
    tmp = _litter(out)
    assert [p.name.split(".tmp")[0].rsplit(".", 1)[0] for p in tmp] == [".results.json"]
    half = tmp[0].read_text()
    with pytest.raises(json.JSONDecodeError):
        json.loads(half)  # the temp file really holds half a document
    for csv in out.glob("*.csv"):
        assert len(pd.read_csv(csv)) > 0
    # 2. a complete run with --overwrite replaces the partial outputs and sweeps the litter away
    res = CliRunner().invoke(cli, [*ANALYZE, "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    old = json.loads((out / "results.json").read_text())
    assert _litter(out) == [] and (out / "index.html").is_file()
    # 3. killed halfway through index.html on a re-run: the old index.html was removed before the new
    #    files were written, so the directory never pairs the new results.json with the old report.
    proc = _run_killed("index.html", [*ANALYZE, "--out", str(out), "--overwrite", "--seed", "5"])
    assert proc.returncode == -9, proc.stderr
    assert not (out / "index.html").exists()
    new = json.loads((out / "results.json").read_text())
    assert new["metadata"]["seed"] == 5 and old["metadata"]["seed"] == 0


# ------------------------------------------------------------------------------------------------
# An ordinary error midway through a write: the exception propagates, nothing is left behind
# ------------------------------------------------------------------------------------------------
class _FailingFile:
    """A file object that writes half of the data and then fails like a full disk."""

    def __init__(self, fh) -> None:
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_error_mid_write_leaves_neither_file_nor_litter(tmp_path, monkeypatch) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old complete content\n")
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k)))
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(target, json.dumps({"a": list(range(1000))}))
    assert target.read_text() == "old complete content\n"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file


def test_cli_disk_full_is_one_line_and_leaves_no_litter(tmp_path, monkeypatch) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, *a, **k: _FailingFile(real_fdopen(fd, *a, **k)))
    res = CliRunner().invoke(cli, ["compare", str(RESULTS), str(RESULTS), "--out", str(tmp_path / "c")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE and len(lines) == 1 and "No space left on device" in lines[0], res.output
    assert str(tmp_path / "c" / "compare.html") in lines[0]  # names the file it could not write (issue 11 item 14)
    assert "Traceback" not in res.output
    assert not (tmp_path / "c").exists()  # the run created it, so it also removes it again, empty


def test_written_files_get_normal_permissions(tmp_path) -> None:
    path = atomic_write_text(tmp_path / "x.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------------
# Every output of every command goes through the atomic writer
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def record_writes(monkeypatch) -> list[Path]:
    written: list[Path] = []
    real = files.atomic_write_bytes

    def recording(path, data):
        written.append(Path(path).resolve())
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", recording)
    return written


def _all_files(d: Path) -> set[Path]:
    return {p.resolve() for p in d.rglob("*") if p.is_file()}


def _tiny_demo(monkeypatch) -> None:
    """`fp8probe demo` on the tiny encoder (same code path, seconds instead of a minute); figures are
    not rasterised (PNG encoding is most of a render's time and these tests are about files)."""
    import fp8probe.analysis.demo_model as demo_model
    import fp8probe.report.figures as figures

    monkeypatch.setattr(figures, "figure_to_data_uri", lambda fig: "data:image/png;base64,")

    real = demo_model.build_demo
    monkeypatch.setattr(demo_model, "build_demo", lambda n_batches, batch: real(
        n_batches=1, batch=2, vocab=64, d_model=32, n_heads=4, d_ff=64, n_layers=1, seq=8,
        outlier_dims=(3, 17), outlier_magnitudes=(20.0, -33.0)))


def test_every_output_goes_through_the_atomic_writer(tmp_path, monkeypatch, record_writes) -> None:
    runs = {
        "analyze": [*ANALYZE, "--out", str(tmp_path / "analyze")],
        "sweep-blocksize": ["sweep-blocksize", FACTORY, "--blocksizes", "64,256", "--batches", "1", "--layers", "fc1",
                            "--out", str(tmp_path / "sweep-blocksize")],
        "sweep-threshold": ["sweep-threshold", FACTORY, "--thresholds", "0,6", "--batches", "1", "--layers", "fc1",
                            "--out", str(tmp_path / "sweep-threshold")],
        "compare": ["compare", str(RESULTS), str(RESULTS), "--out", str(tmp_path / "compare")],
        "report": ["report", str(RESULTS), "-o", str(tmp_path / "report" / "r.html")],
        "demo": ["demo", "--small", "--out", str(tmp_path / "demo")],
    }
    _tiny_demo(monkeypatch)
    for name, argv in runs.items():
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, (name, res.output, res.exception)
        made = _all_files(tmp_path / name)
        assert made, name
        assert made <= set(record_writes), (name, made - set(record_writes))
    assert _litter(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Re-runs into an existing --out
# ------------------------------------------------------------------------------------------------
def test_rerun_needs_overwrite_and_replaces_only_fp8probe_outputs(tmp_path) -> None:
    out = tmp_path / "run"
    args = [*ANALYZE, "--out", str(out), "--no-html"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    (out / "notes.txt").write_text("mine")
    (out / "index.html").write_text("<html>an old report</html>")   # an output this run will not rewrite
    (out / "errors.csv").write_text("layer,strategy,error\nold,old,old\n")  # a table the new run lacks
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    res = CliRunner().invoke(cli, args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE and len(lines) == 1 and "--overwrite" in lines[0], res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before touching anything

    # a run that fails after the check leaves the old outputs as they were, even with --overwrite
    res = CliRunner().invoke(cli, [*args, "--overwrite", "--layers", "^no_such_layer$"])
    assert res.exit_code == EXIT_USAGE
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    res = CliRunner().invoke(cli, [*args, "--overwrite", "--seed", "3"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert "notes.txt" in names and (out / "notes.txt").read_text() == "mine"
    assert "errors.csv" not in names and "index.html" not in names  # stale outputs of the old run are gone
    assert json.loads((out / "results.json").read_text())["metadata"]["seed"] == 3
    assert names - {"notes.txt"} == {"results.json", *(f"{t}.csv" for t in json.loads(
        (out / "results.json").read_text())["tables"])}


def test_demo_twice_in_its_default_directory(tmp_path, monkeypatch) -> None:
    """`fp8probe demo` replaces its own reports/demo on every run; an explicit --out needs --overwrite."""
    _tiny_demo(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        res = CliRunner().invoke(cli, ["demo", "--small"])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "reports" / "demo" / "index.html").is_file()
    res = CliRunner().invoke(cli, ["demo", "--small", "--out", "reports/demo"])
    assert res.exit_code == EXIT_USAGE and "--overwrite" in res.stderr  # refused before any work
    assert _litter(tmp_path) == []


def test_claims_by_kind(tmp_path) -> None:
    """Each command claims only its own file names: compare.* do not block analyze and vice versa."""
    (tmp_path / "compare.md").write_text("x")
    assert claim_output_dir(tmp_path, "run", overwrite=False) == []
    (tmp_path / "results.json").write_text(json.dumps({"tables": {"custom_table": []}}))
    (tmp_path / "custom_table.csv").write_text("a\n1\n")
    (tmp_path / ".index.html.abc123.tmp").write_text("half")
    found = {p.name for p in existing_outputs(tmp_path, "run")}
    # custom_table.csv is named only by the JSON: not an fp8probe output name, so never claimed (issue 11)
    assert found == {"results.json", ".index.html.abc123.tmp"}
    with pytest.raises(FileExistsError, match="--overwrite"):
        claim_output_dir(tmp_path, "compare", overwrite=False)
    assert {p.name for p in claim_output_dir(tmp_path, "compare", overwrite=True)} == {"compare.md"}
    with pytest.raises(ValueError, match="kind must be"):
        existing_outputs(tmp_path, "everything")


# ------------------------------------------------------------------------------------------------
# A planted results.json never widens what --overwrite deletes; one run per directory (issue 11)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [True, False])
def test_planted_results_json_cannot_name_files_to_delete(tmp_path, overwrite) -> None:
    """results.json table keys "../elsewhere/victim", "/abs/.../victim" and "mydata" used to make
    --overwrite delete those CSVs (outside --out too) and, without it, exit 3 from relative_to."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    victims = [elsewhere / "victim.csv", tmp_path / "absvictim.csv", out / "mydata.csv"]
    for v in victims:
        v.write_text("precious\n")
    keys = ["../elsewhere/victim", str(tmp_path / "absvictim"), "mydata"]
    (out / "results.json").write_text(json.dumps({"format": "fp8probe.results", "tables": {k: [] for k in keys}}))
    found = existing_outputs(out, "run")
    assert found == [out / "results.json"]
    res = CliRunner().invoke(cli, ["analyze", FACTORY, "--out", str(out), "--quiet",
                                   *(["--overwrite"] if overwrite else [])])
    if overwrite:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code == EXIT_USAGE and "--overwrite" in res.stderr and "Traceback" not in res.output
    assert all(v.read_text() == "precious\n" for v in victims)


def test_symlinked_output_name_is_not_followed_or_claimed(tmp_path) -> None:
    """A gemm.csv in --out that is a symlink to a file elsewhere is not an fp8probe output: --overwrite
    neither deletes its target nor counts it."""
    (tmp_path / "victim.csv").write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "gemm.csv").symlink_to(tmp_path / "victim.csv")
    assert existing_outputs(out, "run") == []
    remove_outputs(claim_output_dir(out, "run", overwrite=True))
    assert (tmp_path / "victim.csv").read_text() == "precious\n"


def test_second_run_into_a_claimed_directory_exits_2_naming_the_holder(tmp_path) -> None:
    """While one command holds --out (lock file, flock), a second one into the same directory is refused
    before it does any work; the claim goes away with the first command, even when it crashed."""
    out = tmp_path / "out"
    held = lock_output_dir(out, "analyze")
    try:
        res = CliRunner().invoke(cli, ["analyze", FACTORY, "--out", str(out), "--quiet"])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == EXIT_USAGE and len(lines) == 1, res.output
        assert "in use by fp8probe analyze (pid" in lines[0] and str(os.getpid()) in lines[0]
        assert not (out / "results.json").exists()
    finally:
        held.release()
    assert not out.exists()  # the holder created it and left it empty
    res = CliRunner().invoke(cli, ["analyze", FACTORY, "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert not (out / LOCK_FILE).exists()


def test_concurrent_runs_never_mix_outputs(tmp_path) -> None:
    """Two processes into one empty --out: exactly one succeeds, the other exits 2 naming the holder
    (before: both exited 0, and results.json and index.html could come from different runs)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The first process takes the claim and holds it while the second one starts (a crashed holder
    # would release it too: flock dies with the process).
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; from fp8probe.report.files import lock_output_dir; "
                               f"lock_output_dir({str(out)!r}, 'analyze'); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "fp8probe", "analyze", FACTORY,
                              "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300,
                             cwd=Path(__file__).resolve().parents[1])
        assert res.returncode == EXIT_USAGE and f"pid {holder.pid}" in res.stderr, res.stderr
    finally:
        holder.kill()
        holder.wait()
    res = subprocess.run([sys.executable, "-m", "fp8probe", "analyze", FACTORY,
                          "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr  # the killed holder left no stale claim


@pytest.mark.parametrize("kind", ["dangling-symlink", "read-only", "below-a-file"])
def test_unusable_out_fails_before_the_analysis(tmp_path, monkeypatch, kind) -> None:
    """A dangling-symlink or read-only --out is refused before the model is even loaded (issue 11 item 14)."""
    import fp8probe.analysis.loading as loading

    out = tmp_path / "out"
    if kind == "dangling-symlink":
        out.symlink_to(tmp_path / "missing")
    elif kind == "below-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        tmp_path.chmod(0o500)
    calls = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: calls.append(a))
    try:
        res = CliRunner().invoke(cli, ["analyze", FACTORY, "--out", str(out)])
    finally:
        tmp_path.chmod(0o700)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE and len(lines) == 1 and str(out) in lines[0], res.output
    assert calls == []


# ------------------------------------------------------------------------------------------------
# Text from the command line under an ASCII locale: the outputs are complete and valid UTF-8
# ------------------------------------------------------------------------------------------------
# Python decodes argv with the filesystem encoding; with an ASCII one (LC_ALL=C without UTF-8 mode) each byte of
# "é" is kept as a lone surrogate (PEP 383), and json.dumps wrote those as escapes no UTF-8 writer could encode.
TYPED = "run é ✓"
AS_DECODED_UNDER_C = TYPED.encode("utf-8").decode("ascii", "surrogateescape")  # "run \udcc3\udca9 \udce2..."


def _assert_utf8_outputs(out: Path) -> dict:
    """results.json and index.html both present and every file valid UTF-8; returns the parsed results.json."""
    assert {"results.json", "index.html"} <= {p.name for p in out.iterdir()}
    for p in out.iterdir():
        p.read_bytes().decode("utf-8")  # strict: a lone surrogate or a stray byte raises
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_names_decoded_with_surrogates_are_written_as_the_typed_text(tmp_path) -> None:
    """--name and --out as an ASCII locale decodes them: exit 0 (was 3, after results.json without index.html)."""
    out = tmp_path / f"out {AS_DECODED_UNDER_C}"
    res = CliRunner().invoke(cli, [*ANALYZE, "--name", AS_DECODED_UNDER_C, "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    doc = _assert_utf8_outputs(out)
    assert doc["metadata"]["name"] == TYPED
    assert TYPED in (out / "index.html").read_text(encoding="utf-8")
    assert f"out {TYPED}" in res.stdout  # the paths it names are shown as typed, not as \udcc3 escapes


def test_ascii_locale_run_with_non_ascii_name_and_out(tmp_path) -> None:
    """The QA repro itself: a real process under PYTHONUTF8=0 LC_ALL=C (no UTF-8 mode, ASCII filesystem encoding)."""
    out = tmp_path / f"out {TYPED}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}
    env.pop("PYTHONIOENCODING", None)
    res = subprocess.run([sys.executable, "-m", "fp8probe", *ANALYZE, "--name", TYPED, "--out", str(out)],
                         capture_output=True, env=env, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr.decode("utf-8", "replace")
    assert _assert_utf8_outputs(out)["metadata"]["name"] == TYPED


def test_results_written_with_surrogate_escapes_still_render(tmp_path) -> None:
    """A results.json an earlier version wrote under an ASCII locale ("\\udcc3\\udca9" in its name and model) is read
    as the text it was: report and compare write valid UTF-8 (both exited 2 with 'malformed tables' before)."""
    doc = json.loads(RESULTS.read_text())
    doc["metadata"]["name"] = AS_DECODED_UNDER_C
    doc["metadata"]["model"] = f"state_dict from {AS_DECODED_UNDER_C}.pt"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc), encoding="utf-8")  # (json.dumps writes the surrogates as \udcc3 escapes)
    assert "\\udcc3" in old.read_text()
    res = CliRunner().invoke(cli, ["report", str(old), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert f"{TYPED}.pt" in (tmp_path / "r.html").read_bytes().decode("utf-8")
    md = tmp_path / "summary.md"
    res = CliRunner().invoke(cli, ["compare", str(RESULTS), str(old), "--out", str(tmp_path / "c"), "--markdown",
                                   str(md)])
    assert res.exit_code == 0, res.output
    for p in [md, *(tmp_path / "c").iterdir()]:
        p.read_bytes().decode("utf-8")


def test_as_utf8_text() -> None:
    assert files.as_utf8_text(AS_DECODED_UNDER_C) == TYPED
    assert files.as_utf8_text("plain ascii") == "plain ascii"
    assert files.as_utf8_text("ünïcødé 层 🏖") == "ünïcødé 层 🏖"  # real characters stay as they are
    # a byte that is not UTF-8 (a latin-1 file name) and a surrogate no decoder makes become U+FFFD
    assert files.as_utf8_text("caf\udce9 x\ud800") == "caf\ufffd x\ufffd"


def test_a_non_ascii_layers_pattern_under_an_ascii_locale_matches_the_layer_typed(tmp_path) -> None:
    """--layers 'schicht_ä' arrived as 'schicht_\\udcc3\\udca4' and matched nothing (exit 2), while --name and --out
    were already read as typed."""
    (tmp_path / "fac.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential()\n"
        "    m.add_module('schicht_ä', torch.nn.Linear(16, 16))\n"
        "    m.add_module('other', torch.nn.Linear(16, 4))\n"
        "    return m, [torch.randn(8, 16)]\n", encoding="utf-8")
    pattern = "schicht_ä".encode("utf-8").decode("ascii", "surrogateescape")
    for command, extra, table in (("analyze", ["--no-e2e"], "layers"), ("sweep-threshold", [], "threshold_sweep")):
        res = CliRunner().invoke(cli, [command, f"{tmp_path / 'fac.py'}:build", "--layers", pattern, *extra, "-q",
                                       "--out", str(tmp_path / command)])
        assert res.exit_code == 0, (command, res.output)
        doc = json.loads((tmp_path / command / "results.json").read_text(encoding="utf-8"))
        assert {r["layer"] for r in doc["tables"][table]} == {"schicht_ä"}, command


def test_a_write_that_cannot_start_names_the_output_not_its_temp_file(tmp_path, monkeypatch) -> None:
    """`report -o /proc/x.html` said "cannot access /proc/.x.html.lx8ktfh4.tmp" (QA): the temp file was created
    outside the error handling."""
    def refuse(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / ".x.html.abc.tmp"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "x.html", "<p>")
    assert info.value.filename == str(tmp_path / "x.html") and info.value.errno == 2
    assert not list(tmp_path.iterdir())
