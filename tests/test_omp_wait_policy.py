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


def _policy_seen(argv0: str, preset: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv0=argv0)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize(("argv0", "preset", "expected"), [
    ("/usr/local/bin/fp8probe", None, "PASSIVE"),   # the console script
    ("-m", None, "PASSIVE"),                        # python -m fp8probe, while the package is imported
    ("/usr/local/bin/fp8probe", "ACTIVE", "ACTIVE"),  # the user's choice wins
    ("-c", None, "unset"),                          # a library user's process is left alone
])
def test_cli_process_sets_passive_wait_policy(argv0: str, preset: str | None, expected: str) -> None:
    assert _policy_seen(argv0, preset) == expected
