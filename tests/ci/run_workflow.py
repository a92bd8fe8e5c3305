"""Run the steps of .github/workflows/numerics.yml on a scratch repository, offline: first run on the default
branch bootstraps the baseline, a pull request with the same model passes, a worsened model fails with exit 1.

    python tests/ci/run_workflow.py [--keep DIR]

fp8probe is installed the way the workflow does it (FP8PROBE_PIP), from a wheel built from this checkout,
into a virtual environment that sees this interpreter's packages (torch, pandas, ...) so nothing is
downloaded. `run:` blocks are executed verbatim with bash -eo pipefail (GitHub's default shell);
`uses:` steps are emulated (checkout, setup-python: nothing to do; cache restore/save: one local slot;
upload-artifact: the path must exist). A `${{ }}` expression or `if:` this runner does not know is an
error, so a workflow edit that it cannot follow fails the test instead of being skipped.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "numerics.yml"
DEFAULT_BRANCH = "main"

# The scratch repository's own model: a seeded 3-layer MLP and two batches. WORSE plants outlier
# input features (|x| up to 300 in three columns), which per-tensor FP8 loses ~10+ dB to.
MODEL_PY = '''"""A small model for the CI workflow test (factory: model, batches)."""
import torch
from torch import nn

WORSE = {worse}


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 64, generator=g) for _ in range(2)]
    if WORSE:
        for x in batches:
            x[:, [3, 17, 40]] *= 100.0
    return model, batches
'''


@dataclass
class JobResult:
    exit_code: int
    log: str
    summary: str
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)


def build_wheel(dist: Path) -> Path:
    """A wheel of this checkout (no build isolation: setuptools and wheel come from this interpreter), built
    from a copy so the checkout gets no build/ or egg-info directories."""
    src = dist.parent / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "reports", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".hypothesis", "*.so"))
    _reuse_built_extension(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, env=_clean_env())
    return next(dist.glob("fp8probe-*.whl"))


def _reuse_built_extension(src: Path) -> None:
    """The checkout's compiled C extension, if it is newer than its source, goes where setuptools' build_ext
    looks for an up-to-date build (build/lib.<platform>-<tag>/), so the wheel reuses it instead of spending
    ~1.5-3 minutes compiling the same file again; otherwise the wheel build compiles it as any user's would."""
    source = ROOT / "fp8probe" / "_fastpath.c"
    built = [p for p in (ROOT / "fp8probe").glob("_fastpath*" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
             if p.stat().st_mtime > source.stat().st_mtime]
    if built:
        lib = src / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "fp8probe"
        lib.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], lib / built[0].name)


def make_venv(where: Path) -> Path:
    """A venv that sees this interpreter's packages; without its own pip/setuptools, so the (newer) ones of
    this interpreter serve it and pip installs into the venv."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)], check=True)
    return where / "bin"


def _clean_env() -> dict[str, str]:
    """This environment minus PYTHONPATH: the workflow must run the fp8probe it installed, not a source tree."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def evaluate(text: str, inputs: dict[str, str], github: dict[str, str]) -> str:
    """The `${{ }}` forms the workflow uses: inputs.X || 'default', github.run_id, github.event...default_branch."""
    def one(m: re.Match) -> str:
        expr = m.group(1)
        alt = re.fullmatch(r"inputs\.(\w+)\s*\|\|\s*'([^']*)'", expr)
        if alt:
            return inputs.get(alt.group(1)) or alt.group(2)
        if expr == "github.run_id":
            return github["run_id"]
        if expr == "github.event.repository.default_branch":
            return DEFAULT_BRANCH
        raise ValueError(f"run_workflow.py does not know the expression ${{{{ {expr} }}}}")

    return _EXPR.sub(one, str(text))


def run_job(workdir: Path, venv_bin: Path, *, event: str, ref_name: str, inputs: dict[str, str], cache: Path,
            run_id: int, wheels: Path) -> JobResult:
    """Run the workflow's single job in ``workdir`` as GitHub would for ``event`` on ``ref_name``."""
    doc = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    (job,) = doc["jobs"].values()
    github = {"run_id": str(run_id)}
    tmp = Path(tempfile.mkdtemp(prefix="gh-"))
    summary, output_dir = tmp / "summary.md", tmp / "outputs"
    summary.touch()
    output_dir.mkdir()
    env = _clean_env()
    env.update({k: evaluate(v, inputs, github) for k, v in (doc.get("env") or {}).items()})
    env.update({"PATH": f"{venv_bin}{os.pathsep}{env['PATH']}", "VIRTUAL_ENV": str(venv_bin.parent),
                "GITHUB_EVENT_NAME": event, "GITHUB_REF_NAME": ref_name, "GITHUB_STEP_SUMMARY": str(summary),
                "GITHUB_RUN_ID": github["run_id"], "CI": "true",
                # offline: every requirement is satisfied by the venv's view of this interpreter's packages
                "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    log: list[str] = []
    outputs: dict[str, dict[str, str]] = {}
    failed = 0
    for step in job["steps"]:
        cond = step.get("if")
        if cond is None:
            run_it = not failed
        elif cond == "always()":
            run_it = True
        else:
            m = re.fullmatch(r"steps\.(\w+)\.outputs\.(\w+) == '([^']*)'", cond)
            if not m:
                raise ValueError(f"run_workflow.py does not know the condition if: {cond}")
            run_it = not failed and outputs.get(m.group(1), {}).get(m.group(2)) == m.group(3)
        if not run_it:
            continue
        name = step.get("name") or step.get("uses")
        log.append(f"## {name}")
        if "run" in step:
            out_file = output_dir / f"{step.get('id', 'step')}.txt"
            out_file.write_text("")
            step_env = {**env, **{k: evaluate(v, inputs, github) for k, v in (step.get("env") or {}).items()},
                        "GITHUB_OUTPUT": str(out_file)}
            proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=workdir,
                                  env=step_env, capture_output=True, text=True)
            log.append(proc.stdout + proc.stderr)
            if "id" in step:
                outputs[step["id"]] = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line)
            if proc.returncode and not failed:
                failed = proc.returncode
            continue
        uses, with_ = step["uses"].split("@")[0], {k: evaluate(v, inputs, github) for k, v in (step.get("with") or {}).items()}
        if uses in ("actions/checkout", "actions/setup-python"):
            continue  # the scratch repository is the working directory; the venv is the Python
        if uses == "actions/cache/restore":
            if (cache / with_["path"]).exists():
                shutil.copytree(cache / with_["path"], workdir / with_["path"], dirs_exist_ok=True)
                log.append(f"cache restored: {with_['path']}")
        elif uses == "actions/cache/save":
            shutil.rmtree(cache / with_["path"], ignore_errors=True)
            shutil.copytree(workdir / with_["path"], cache / with_["path"])
            log.append(f"cache saved: {with_['path']}")
        elif uses == "actions/upload-artifact":
            if not (workdir / with_["path"]).exists() and with_.get("if-no-files-found") == "error":
                log.append(f"upload-artifact: no files at {with_['path']}")
                failed = failed or 1
        else:
            raise ValueError(f"run_workflow.py does not know the action {uses}")
    return JobResult(failed, "\n".join(log), summary.read_text(encoding="utf-8"), outputs)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", *args], cwd=repo, check=True,
                   capture_output=True)


def scenario(base: Path) -> list[JobResult]:
    """Bootstrap on main, pass on a pull request, fail on a worsened model; returns the three job results."""
    wheel = build_wheel(base / "dist")
    venv_bin = make_venv(base / "venv")
    repo, cache = base / "repo", base / "cache"
    (repo / "models").mkdir(parents=True)
    cache.mkdir()
    (repo / "models" / "model.py").write_text(MODEL_PY.format(worse=False))
    git(repo, "init", "-q", "-b", DEFAULT_BRANCH)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "model")
    inputs = {"model": "models/model.py:build --strategy global,mxfp8", "fp8probe": str(wheel)}
    common = {"inputs": inputs, "cache": cache, "wheels": wheel.parent}
    first = run_job(repo, venv_bin, event="push", ref_name=DEFAULT_BRANCH, run_id=1, **common)
    second = run_job(repo, venv_bin, event="pull_request", ref_name="1/merge", run_id=2, **common)
    git(repo, "checkout", "-q", "-b", "worse")
    (repo / "models" / "model.py").write_text(MODEL_PY.format(worse=True))
    git(repo, "commit", "-q", "-am", "outlier features")
    third = run_job(repo, venv_bin, event="pull_request", ref_name="2/merge", run_id=3, **common)
    return [first, second, third]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    args = parser.parse_args(argv)
    base = args.keep or Path(tempfile.mkdtemp(prefix="fp8probe-ci-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        results = scenario(base)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    for label, r in zip(("bootstrap on main", "pull request, same model", "pull request, worse model"), results):
        print(f"=== {label}: exit {r.exit_code}\n{r.summary}")
    return 0 if [r.exit_code for r in results] == [0, 0, 1] else 1


if __name__ == "__main__":
    sys.exit(main())
