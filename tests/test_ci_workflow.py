"""The CI workflow (.github/workflows/numerics.yml) run step by step on a scratch repository with its own model
(tests/ci/run_workflow.py): the first run on the default branch creates the baseline and passes with a notice,
a pull request with the same model passes, a worsened model fails with exit 1. Offline: fp8probe is installed
from a wheel built from this checkout."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("git") is None or shutil.which("bash") is None, reason="needs git and bash")]

SCRIPT = Path(__file__).resolve().parent / "ci" / "run_workflow.py"


def _load():
    spec = importlib.util.spec_from_file_location("run_workflow", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_workflow"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_workflow_bootstraps_passes_and_fails_a_regression(tmp_path: Path) -> None:
    wf = _load()
    first, second, third = wf.scenario(tmp_path)
    # the workflow ran the fp8probe it installed from the wheel, not this source tree
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", "import fp8probe; print(fp8probe.__file__)"],
                           capture_output=True, text=True, env=env, check=True, cwd=tmp_path / "repo").stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), where

    assert first.exit_code == 0, first.log
    assert "::notice title=fp8probe::no numerics baseline yet" in first.log
    assert "### fp8probe verdict" in first.summary and "### fp8probe: baseline created" in first.summary
    assert first.outputs["gate"] == {"save_baseline": "true"}
    assert (tmp_path / "cache" / ".fp8probe-baseline" / "results.json").is_file()

    assert second.exit_code == 0, second.log
    assert "gating against .fp8probe-baseline/results.json" in second.log
    assert "fp8probe compare: ✅ **PASS**" in second.summary
    assert second.outputs["gate"] == {}  # a pull request never moves the baseline

    assert third.exit_code == 1, third.log
    assert "fp8probe compare: ❌ **FAIL**" in third.summary and "max-new-outlier-cols" in third.summary
    assert "FAIL:" in third.log and "## Upload the HTML report" in third.log  # the report is uploaded anyway
    assert (tmp_path / "repo" / "reports" / "ci" / "index.html").is_file()


def test_runner_refuses_what_it_cannot_follow() -> None:
    wf = _load()
    with pytest.raises(ValueError, match="does not know the expression"):
        wf.evaluate("${{ secrets.TOKEN }}", {}, {"run_id": "1"})
    assert wf.evaluate("${{ inputs.model || 'm.py:build' }}", {}, {"run_id": "1"}) == "m.py:build"
    assert wf.evaluate("${{ inputs.model || 'm.py:build' }}", {"model": "x.pt2"}, {"run_id": "1"}) == "x.pt2"


@pytest.mark.parametrize("own_repo", [True, False])
def test_install_step_checks_fp8probe_itself_out_in_its_own_repository(tmp_path: Path, own_repo: bool) -> None:
    """In fp8probe's repository the workflow installed the pinned release from GitHub, so its gate checked an old
    fp8probe instead of the commit being pushed; in any other repository it must install FP8PROBE_PIP."""
    import yaml
    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / ".github" / "workflows" / "numerics.yml").read_text())
    (job,) = doc["jobs"].values()
    step = next(s for s in job["steps"] if str(s.get("name", "")).startswith("Install torch"))
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    for tool in ("python", "fp8probe"):  # record the commands instead of installing anything
        (fake / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        (fake / tool).chmod(0o755)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text('[project]\nname = "fp8probe"\n' if own_repo else '[project]\nname = "mymodel"\n')
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "TORCH_PIP": "torch==2.13.0",
           "FP8PROBE_PIP": "fp8probe @ git+https://example.invalid/fp8probe@v0.1.0"}
    subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=repo, env=env,
                   check=True)
    installs = [line for line in calls.read_text().splitlines() if line.startswith("python -m pip install ")]
    assert installs[-1] == ("python -m pip install ." if own_repo else
                            "python -m pip install fp8probe @ git+https://example.invalid/fp8probe@v0.1.0")
