"""Errors in the order a user needs them, each one line saying what to do: what was typed (strategy, factory)
before --out; unimportable module:function, __main__ pickles, --layers matching nothing, state_dict mismatches;
a factory's (args, kwargs) batches accepted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fp8probe.cli import cli

HERE = Path(__file__).resolve().parent
TINY = f"{HERE / 'analysis' / 'tiny_factory.py'}:build"
ROOT = HERE.parent


def _run(args: list[str], cwd: Path | None = None) -> tuple[int, str]:
    old = os.getcwd()
    threads = torch.get_num_threads()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return res.exit_code, res.stderr


def _one_line(code: int, stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture()
def used_out(tmp_path: Path) -> Path:
    """An --out directory that already holds fp8probe outputs (so without --overwrite it is refused)."""
    out = tmp_path / "used"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "gemm.csv").write_text("layer\n")
    return out


@pytest.mark.parametrize("command", ["analyze", "sweep-blocksize"])
def test_unknown_factory_reported_before_out(command: str, used_out: Path, tmp_path: Path) -> None:
    state = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, state)
    line = _one_line(*_run([command, str(state), "--factory", "no_such_mod_zz:build", "--out", str(used_out)]))
    assert "cannot import module 'no_such_mod_zz'" in line and "--overwrite" not in line


def test_unknown_strategy_reported_before_out(used_out: Path) -> None:
    line = _one_line(*_run(["analyze", TINY, "--strategy", "fp9", "--out", str(used_out)]))
    assert "strategy must be 'all' or one of" in line and "'fp9'" in line and "--overwrite" not in line
    # with a valid strategy the directory is the problem, and says how to proceed
    line = _one_line(*_run(["analyze", TINY, "--strategy", "int8", "--out", str(used_out)]))
    assert "--overwrite" in line


def test_module_function_not_on_import_path_suggests_the_file(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text("def build():\n    raise SystemExit('not reached')\n")
    line = _one_line(*_run(["analyze", "mymodels:build", "--out", str(tmp_path / "o")], cwd=tmp_path))
    assert "not on the Python import path" in line and "the current directory" in line
    assert "mymodels.py exists: pass mymodels.py:build" in line
    line = _one_line(*_run(["analyze", "pkg_zz.models:build", "--out", str(tmp_path / "o")], cwd=tmp_path))
    assert "pass path/to/file.py:build" in line
    # a module that IS importable but whose own import fails keeps the real reason
    (tmp_path / "broken_zz.py").write_text("import not_installed_dependency_zz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        line = _one_line(*_run(["analyze", "broken_zz:build", "--out", str(tmp_path / "o")]))
    finally:
        sys.path.remove(str(tmp_path))
    assert "No module named 'not_installed_dependency_zz'" in line and "import path" not in line


def test_pickle_of_a_main_class_says_so(tmp_path: Path) -> None:
    model = tmp_path / "net.pt"
    script = ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
              "        self.fc = torch.nn.Linear(4, 4)\n    def forward(self, x):\n        return self.fc(x)\n"
              f"torch.save(Net(), {str(model)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    line = _one_line(*_run(["analyze", str(model), "--trust-pickle", "--out", str(tmp_path / "o")]))
    assert "its class Net was defined in the script that saved it (module __main__)" in line
    assert "--factory path/to/file.py:function" in line


def test_layers_matching_nothing_lists_the_layers(tmp_path: Path) -> None:
    line = _one_line(*_run(["analyze", TINY, "--layers", "^nothing$", "--out", str(tmp_path / "o"), "-q"]))
    assert "matching --layers '^nothing$'; the model's GEMMs are: blocks.0.attn.qkv, " in line
    assert "(13 in all)" in line  # 9 linear layers + 4 attention matmuls, the first 12 named


def test_state_dict_mismatch_names_the_first_keys(tmp_path: Path) -> None:
    factory = tmp_path / "f.py"
    factory.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),"
                       " torch.nn.Linear(8, 2))\n")
    wrapped = {f"module.{k}": v for k, v in nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict().items()}
    state = tmp_path / "w.pt"
    torch.save(wrapped, state)
    line = _one_line(*_run(["analyze", str(state), "--factory", f"{factory}:build", "--out", str(tmp_path / "o")]))
    assert "4 missing key(s): 0.weight, 0.bias, 2.weight, 2.bias" in line
    assert "4 unexpected key(s): module.0.weight, module.0.bias, module.2.weight, module.2.bias" in line
    assert "extra prefix" in line
    torch.save({"0.weight": torch.ones(8, 5), "0.bias": torch.ones(8), "2.weight": torch.ones(2, 8),
                "2.bias": torch.ones(2)}, state)
    line = _one_line(*_run(["analyze", str(state), "--factory", f"{factory}:build", "--out", str(tmp_path / "o")]))
    assert "1 shape mismatch(es): 0.weight [8, 5] in the file, [8, 4] in the model" in line


def test_factory_batches_with_args_and_kwargs(tmp_path: Path) -> None:
    factory = tmp_path / "masked.py"
    factory.write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x, mask=None):\n        return self.fc(x) * mask.unsqueeze(-1)\n"
        "def build():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, m = torch.randn(2, 5, 8, generator=g), torch.ones(2, 5)\n"
        "    return M(), [((x,), {'mask': m})]\n")
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(cli, ["analyze", f"{factory}:build", "--out", str(tmp_path / "o"), "-q", "--no-html",
                                       "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    # (what the batch held, positional and keyword tensors by name: no token ids here)
    assert "1 GEMM site(s) (1 GEMM call(s) in 1 batch(es)), inputs: 1 batch(es) of arg0 2 x 5 x 8, mask 2 x 5" in res.stdout
