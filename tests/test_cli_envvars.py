"""Options read FP8PROBE_<COMMAND>_<OPTION> named after the flag (README), also where the Python parameter behind
the flag has another name (--out: out_dir, --format: output_format, --budget, --loss): those were ignored."""
from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from fp8probe.cli import _FlagEnvOption, cli


def test_every_option_takes_its_flag_named_environment_variable() -> None:
    commands = [cli, *cli.commands.values()]
    assert len(commands) > 5
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("version", "help"):
                assert isinstance(param, _FlagEnvOption), f"{command.name} {param.opts}: use cli._option"


def test_format_from_the_environment() -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["formats"], env={"FP8PROBE_FORMATS_FORMAT": "json"})
    assert out.exit_code == 0, out.output
    assert {row["name"] for row in json.loads(out.output)} >= {"e4m3", "bnb-e4m3"}
    bad = runner.invoke(cli, ["formats"], env={"FP8PROBE_FORMATS_FORMAT": "bogus"})
    assert bad.exit_code == 2 and "bogus" in bad.output
    # the parameter's own name, which click derived before, still works; the command line wins over both
    assert runner.invoke(cli, ["formats"], env={"FP8PROBE_FORMATS_OUTPUT_FORMAT": "json"}).output.startswith("[")
    assert not runner.invoke(cli, ["formats", "--format", "table"],
                             env={"FP8PROBE_FORMATS_FORMAT": "json"}).output.startswith("[")


def test_out_budget_loss_from_the_environment(monkeypatch, tmp_path) -> None:
    """Parsed as the command line would be (make_context: no model is run)."""
    monkeypatch.setenv("FP8PROBE_SWEEP_BLOCKSIZE_OUT", str(tmp_path / "env_out"))
    monkeypatch.setenv("FP8PROBE_SWEEP_BLOCKSIZE_BUDGET", "kl:0.05")
    monkeypatch.setenv("FP8PROBE_SWEEP_BLOCKSIZE_LOSS", "losses:ce")
    ctx = cli.commands["sweep-blocksize"].make_context("sweep-blocksize", ["model.pt"],
                                                       auto_envvar_prefix="FP8PROBE_SWEEP_BLOCKSIZE")
    assert ctx.params["out_dir"] == str(tmp_path / "env_out")
    assert ctx.params["budget_spec"] == "kl:0.05" and ctx.params["loss_spec"] == "losses:ce"


def test_a_bad_value_from_the_environment_names_the_variable() -> None:
    res = CliRunner().invoke(cli, ["formats"], env={"FP8PROBE_FORMATS_FORMAT": "bogus"})
    assert res.exit_code == 2 and "(from the environment variable FP8PROBE_FORMATS_FORMAT)" in res.output
    typed = CliRunner().invoke(cli, ["formats", "--format", "bogus"])
    assert typed.exit_code == 2 and "environment" not in typed.output



# Values checked in the command body (not by click's parameter types) name their environment variable too: these
# said "strategy must be ..." with nothing pointing at the FP8PROBE_ANALYZE_STRATEGY set for a whole CI job.
BODY_CHECKED = [
    ("analyze", "STRATEGY", "fp9", "--strategy: strategy must be"),
    ("analyze", "STRATEGY", "global,,int8", "--strategy: expected a strategy name"),
    ("analyze", "GEMMS", "lin", "--gemms: expected GEMM kinds"),
    ("analyze", "LAYERS", "(", "--layers must be a valid regular expression"),
    ("analyze", "BUDGET", "lots", "--budget: expected a budget"),
    ("analyze", "FACTORY", "no_such_module_zz:build", "--factory: cannot import module"),
    ("analyze", "LOSS", "no_such_module_zz:loss", "--loss: cannot import module"),
    ("analyze", "OPTIMIZER", "no_such_module_zz:opt", "--optimizer: cannot import module"),
    ("sweep-blocksize", "BLOCKSIZES", "64,,128", "--blocksizes: expected comma-separated whole numbers"),
    ("sweep-blocksize", "BLOCKSIZES", "32,48,...,4096", "--blocksizes: a range doubles"),
    ("sweep-threshold", "THRESHOLDS", "0,low", "--thresholds: expected comma-separated finite numbers"),
]


@pytest.mark.parametrize("command, option, value, message", BODY_CHECKED,
                         ids=[f"{c}-{o}-{v}" for c, o, v, _ in BODY_CHECKED])
def test_a_bad_value_from_the_environment_checked_in_the_command_names_the_variable(tmp_path, command, option, value,
                                                                                    message) -> None:
    var = f"FP8PROBE_{command.upper().replace('-', '_')}_{option}"
    model = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}, model)
    res = CliRunner().invoke(cli, [command, str(model), "--out", str(tmp_path / "o")], env={var: value})
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert message in lines[0] and lines[0].endswith(f"(from the environment variable {var})"), lines[0]
    typed = CliRunner().invoke(cli, [command, str(model), "--out", str(tmp_path / "o"),
                                     f"--{option.lower()}", value])
    assert typed.exit_code == 2 and message in typed.stderr and "environment" not in typed.stderr, typed.output


@pytest.mark.parametrize("value", ["referense", "Reference", "cuda"])
def test_an_unknown_backend_is_refused_not_ignored(value: str) -> None:
    """The backends only test FP8PROBE_BACKEND == "reference": a typo ran the kernels the user meant to rule out."""
    res = CliRunner().invoke(cli, ["formats"], env={"FP8PROBE_BACKEND": value})
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "FP8PROBE_BACKEND must be 'reference'" in lines[0] and repr(value) in lines[0]
    for ok in ("reference", ""):
        assert CliRunner().invoke(cli, ["formats"], env={"FP8PROBE_BACKEND": ok}).exit_code == 0
