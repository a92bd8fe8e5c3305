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
