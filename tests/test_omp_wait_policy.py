"""The command line asks OpenMP for passive waiting (no spinning thread pool on shared CPUs) unless the user chose."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import sys; sys.argv[0] = {argv0!r}; import fp8probe, os; "
         "print(os.environ.get('OMP_WAIT_POLICY', 'unset'))")


def _probe_output(code: str, argv0: str, var: str, preset: str | None) -> str:
    """stdout of ``code`` (formatted with argv0) in a fresh interpreter whose environment has ``var`` set to
    ``preset`` (None: removed)."""
    env = {k: v for k, v in os.environ.items() if k != var}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if preset is not None:
        env[var] = preset
    proc = subprocess.run([sys.executable, "-c", code.format(argv0=argv0)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return proc.stdout.strip()


def _policy_seen(argv0: str, preset: str | None) -> str:
    return _probe_output(PROBE, argv0, "OMP_WAIT_POLICY", preset)


@pytest.mark.parametrize(("argv0", "preset", "expected"), [
    ("/usr/local/bin/fp8probe", None, "PASSIVE"),   # the console script
    ("-m", None, "PASSIVE"),                        # python -m fp8probe, while the package is imported
    ("/usr/local/bin/fp8probe", "ACTIVE", "ACTIVE"),  # the user's choice wins
    ("-c", None, "unset"),                          # a library user's process is left alone
])
def test_cli_process_sets_passive_wait_policy(argv0: str, preset: str | None, expected: str) -> None:
    assert _policy_seen(argv0, preset) == expected


THP_PROBE = ("import sys; sys.argv[0] = {argv0!r}; import fp8probe, os, re, torch\n"
             "def huge(): return int(re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1))\n"
             "h = huge(); x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
             "print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'), (huge() - h) >> 10)")


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None where unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() is None, reason="no /sys/kernel/mm/transparent_hugepage or smaps_rollup (not Linux)")
@pytest.mark.parametrize(("argv0", "preset", "expected"), [
    ("/usr/local/bin/fp8probe", None, "1"),   # the console script
    ("/usr/local/bin/fp8probe", "0", "0"),    # the user's choice wins
    ("-c", None, "unset"),                    # a library user's process is left alone
])
def test_cli_process_asks_torch_for_huge_pages(argv0: str, preset: str | None, expected: str) -> None:
    """THP_MEM_ALLOC_ENABLE=1 reaches torch's allocator: where the kernel gives huge pages on request
    (mode "madvise"), a fresh 64 MiB tensor is backed by them only when it is set."""
    value, huge_mib = _probe_output(THP_PROBE, argv0, "THP_MEM_ALLOC_ENABLE", preset).split()
    assert value == expected
    if _thp_mode() == "madvise":
        assert (int(huge_mib) >= 32) == (expected == "1")


MALLOC_PROBE = (
    "import ctypes, sys, torch\n"
    "from fp8probe.analysis.capture import keep_freed_blocks\n"
    "class M(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
    "info = ctypes.CDLL(None).mallinfo2; info.restype = M\n"
    "applied = keep_freed_blocks() if {keep!r} else None\n"
    "before = info().hblkhd; x = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)\n"
    "print(applied, (info().hblkhd - before) >> 20)")


def _has_mallinfo2() -> bool:
    import ctypes

    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize(("keep", "expected"), [(False, "None 64"), (True, "True 0")])
def test_keep_freed_blocks_serves_large_tensors_from_the_heap(keep: bool, expected: str) -> None:
    """glibc maps a fresh 64 MiB tensor by default (64 MiB of mmapped blocks); after keep_freed_blocks it
    comes from the heap, where a freed one is reused without page faults (checked in a fresh interpreter:
    the setting is process-wide)."""
    assert _probe_output(MALLOC_PROBE.replace("{keep!r}", repr(keep)), "-c", "MALLOC_MMAP_THRESHOLD_", None) == expected


@pytest.mark.parametrize("is_cli", [True, False])
def test_the_replaying_commands_keep_freed_blocks(monkeypatch, tmp_path, is_cli: bool) -> None:
    """demo (and analyze, the sweeps: cli._replay_process) call capture.keep_freed_blocks and
    capture.freeze_loaded_objects in the command-line process; run in-process (a library user, click's
    CliRunner) they leave glibc's settings and the garbage collector alone."""
    from click.testing import CliRunner

    import fp8probe
    from fp8probe import cli
    from fp8probe.analysis import capture

    calls = []
    monkeypatch.setattr(capture, "keep_freed_blocks", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(capture, "freeze_loaded_objects", lambda: calls.append("gc"))
    monkeypatch.setattr(fp8probe, "_IS_CLI", is_cli)
    result = CliRunner().invoke(cli.cli, ["demo", "--small", "--out", str(tmp_path / "d"), "-q"])
    assert result.exit_code == 0, result.output
    assert calls == (["malloc", "gc"] if is_cli else [])


GC_PROBE = (
    "import gc, torch, fp8probe.analysis.pipeline\n"
    "from fp8probe.analysis.capture import freeze_loaded_objects\n"
    "tracked = len(gc.get_objects())\n"
    "freeze_loaded_objects()\n"
    "print(gc.get_freeze_count() >= tracked, len(gc.get_objects()) < tracked // 100)")


def test_freeze_loaded_objects_takes_the_imports_out_of_collections() -> None:
    """After freeze_loaded_objects the collector's generations no longer hold what was imported (torch,
    fp8probe's analysis): a full collection then walks none of it (fresh interpreter: the freeze is
    process-wide)."""
    assert _probe_output(GC_PROBE, "-c", "PYTHONDONTWRITEBYTECODE", None) == "True True"
