"""`fp8probe analyze` end to end: .pt2, trusted pickle and state_dict + factory give identical results; errors exit 2 with one line."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from fp8probe.cli import cli

HERE = Path(__file__).resolve().parent
FACTORY = f"{HERE / 'tiny_factory.py'}:build_model_only"
STRATEGY = "global,ocp-blockwise"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The tiny encoder saved four ways, plus its batches as an inputs file."""
    import sys

    sys.path.insert(0, str(HERE))
    from tiny_factory import build

    model, batches = build()
    d = tmp_path_factory.mktemp("models")
    paths = {"pt2": d / "model.pt2", "pickle": d / "model.pt", "state_dict": d / "weights.pt",
             "inputs": d / "inputs.pt", "torchscript": d / "scripted.pt", "bad_inputs": d / "ints.pt"}
    torch.save([1, 2], paths["bad_inputs"])
    paths["float_inputs"] = d / "floats.pt"
    torch.save(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), paths["float_inputs"])
    torch.export.save(torch.export.export(model, batches[0]), paths["pt2"])
    torch.save(model, paths["pickle"])
    torch.save(model.state_dict(), paths["state_dict"])
    torch.save(batches, paths["inputs"])
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; we only need an archive to refuse
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 4)), paths["torchscript"])
    return paths


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["analyze", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    doc = json.loads((out / "results.json").read_text())
    return {k: pd.DataFrame(v) for k, v in doc["tables"].items()}


def test_three_formats_give_identical_results(saved, tmp_path) -> None:
    runs = {
        "pt2": [str(saved["pt2"])],
        "pickle": [str(saved["pickle"]), "--trust-pickle"],
        "state_dict": [str(saved["state_dict"]), "--factory", FACTORY],
    }
    tables = {}
    for kind, args in runs.items():
        out = tmp_path / kind
        # One run renders the HTML report (slow: matplotlib); the others skip it.
        html = [] if kind == "pt2" else ["--no-html"]
        code, stdout, stderr = _run(*args, "--inputs", str(saved["inputs"]), "--strategy", STRATEGY,
                                    "--out", str(out), "--quiet", *html)
        assert code == 0, stderr
        assert "results:" in stdout and (out / "gemm.csv").is_file()
        assert (out / "index.html").is_file() == (kind == "pt2")
        tables[kind] = _tables(out)
    base = tables["pt2"]
    # 9 linear layers plus QKᵀ and PV (plain matmuls of two activations) of each of the 2 blocks
    assert len(base["layers"]) == 13 and set(base["gemm"]["strategy"]) == set(STRATEGY.split(","))
    assert base["layers"]["kind"].value_counts().to_dict() == {"linear": 9, "matmul": 4}
    n_batches = len(torch.load(saved["inputs"], weights_only=True))
    assert base["coverage"]["captured"].sum() == 13 * n_batches and base["coverage"]["skipped"].sum() == 0
    for kind in ("pickle", "state_dict"):
        for name in ("layers", "gemm", "operands", "tensors", "outliers", "histograms", "coverage"):
            pd.testing.assert_frame_equal(tables[kind][name], base[name], check_exact=True, obj=f"{kind}/{name}")


def test_pickle_refused_without_trust(saved, tmp_path) -> None:
    code, stdout, stderr = _run(str(saved["pickle"]), "--inputs", str(saved["inputs"]), "--out", str(tmp_path / "x"))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "arbitrary code" in lines[0] and "--trust-pickle" in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("make_args, message", [
    (lambda s, t: [str(t / "missing.pt2")], "does not exist"),
    (lambda s, t: [str(s["torchscript"])], "TorchScript"),
    (lambda s, t: [str(s["state_dict"]), "--inputs", str(s["inputs"])], "--factory"),
    (lambda s, t: [str(s["state_dict"]), "--factory", "no_such_module_xyz:build"], "cannot import module"),
    (lambda s, t: [str(s["pt2"]), "--inputs", str(t / "nope.pt")], "does not exist"),
    (lambda s, t: [str(s["pt2"]), "--inputs", str(s["state_dict"])], "signature"),
    (lambda s, t: [str(s["pt2"]), "--inputs", str(s["bad_inputs"])], "a batch must be"),
    (lambda s, t: [str(s["pt2"]), "--strategy", "fp4"], "strategy must be"),
    (lambda s, t: [str(s["pt2"]), "--layers", "("], "regular expression"),
    (lambda s, t: [str(s["pt2"]), "--gemms", "linear,fp4"], "--gemms: expected GEMM kinds"),
    (lambda s, t: [str(s["pt2"]), "--inputs", str(s["inputs"]), "--layers", "#qk"], "no GEMM was captured matching"),
    (lambda s, t: [str(s["pickle"]), "--trust-pickle"], "no inputs"),
    (lambda s, t: [str(s["pickle"]), "--trust-pickle", "--inputs", str(s["float_inputs"])], "the model failed"),
])
def test_bad_usage_exits_2_with_one_line(saved, tmp_path, make_args, message) -> None:
    code, stdout, stderr = _run(*make_args(saved, tmp_path), "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in stderr


@pytest.mark.parametrize("make_args, what", [
    (lambda s: [str(s["pt2"])], "model.pt2 is a torch.export program, which holds its own model"),
    (lambda s: [str(s["pickle"]), "--trust-pickle"], "model.pt is a pickled DemoEncoder (a whole module), which holds"),
    (lambda s: [f"{HERE / 'tiny_factory.py'}:build"], "tiny_factory.py:build is a module:function building the model, "
                                                       f"and --factory {FACTORY} names another"),
])
@pytest.mark.parametrize("command", ["analyze", "sweep-blocksize"])
def test_factory_with_a_model_that_holds_its_own_is_refused(saved, tmp_path, make_args, what, command) -> None:
    """The factory was silently ignored: the run analysed the file's model, not the one --factory builds."""
    result = CliRunner().invoke(cli, [command, *make_args(saved), "--factory", FACTORY, "--inputs", str(saved["inputs"]),
                                      "--out", str(tmp_path / "o"), "-q", "--no-html"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and what in lines[0], result.output
    assert "ignored" in lines[0] or "pass one of them" in lines[0]
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize("kind", ["pt2", "huggingface"])
def test_a_refused_factory_is_never_imported(saved, tmp_path, kind) -> None:
    """A --factory refused because the model holds its own (.pt2, a Hugging Face directory) was imported first,
    running the file's top-level code (user test: a builder script rewrote the model directory, then the error
    named the wrong problem)."""
    marker = tmp_path / "imported"
    factory = tmp_path / "side_effects.py"
    factory.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef build():\n    raise SystemExit(9)\n")
    if kind == "pt2":
        model = saved["pt2"]
    else:
        model = tmp_path / "hf"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
    result = CliRunner().invoke(cli, ["analyze", str(model), "--factory", f"{factory}:build", "--out",
                                      str(tmp_path / "o"), "-q"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "would be ignored" in lines[0], result.output
    assert not marker.exists(), "the refused factory's module was imported"


def test_factory_spec_as_model_json_output(tmp_path) -> None:
    threads = torch.get_num_threads()
    try:
        code, stdout, stderr = _run(f"{HERE / 'tiny_factory.py'}:build", "--strategy", "int8", "--batches", "1",
                                    "--layers", "fc1", "--format", "json", "--out", str(tmp_path / "f"),
                                    "--no-html", "--threads", "1")
    finally:
        torch.set_num_threads(threads)  # CliRunner runs in this process
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["loss"]["kind"] == "model"
    assert {r["layer"] for r in doc["worst_fprop"]} == {"blocks.0.fc1", "blocks.1.fc1"}
    tables = _tables(tmp_path / "f")
    assert tables["layers"]["tokens"].tolist() == [4 * 16, 4 * 16]  # --batches 1 of 4 x 16 tokens


def test_custom_loss_option(saved, tmp_path) -> None:
    tokens_only = tmp_path / "tokens.pt"
    torch.save([b[0] for b in torch.load(saved["inputs"], weights_only=True)], tokens_only)
    code, stdout, stderr = _run(str(saved["pt2"]), "--inputs", str(tokens_only), "--layers", "head",
                                "--loss", f"{HERE / 'tiny_factory.py'}:logits_loss", "--out", str(tmp_path / "l"), "-q")
    # The program was exported with (tokens, targets): one positional input is a signature mismatch.
    assert code == 2 and "signature" in stderr
    code, stdout, stderr = _run(f"{HERE / 'tiny_factory.py'}:build_model_only", "--inputs", str(tokens_only),
                                "--layers", "head", "--loss", f"{HERE / 'tiny_factory.py'}:logits_loss",
                                "--out", str(tmp_path / "l"), "-q", "--no-html")
    assert code == 0, stderr
    assert "loss: custom" in stdout


def test_huggingface_directory(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 50, (2, 8))
    torch.save({"input_ids": ids, "labels": ids}, tmp_path / "in.pt")
    code, stdout, stderr = _run(str(tmp_path / "hf"), "--inputs", str(tmp_path / "in.pt"), "--out",
                                str(tmp_path / "o"), "-q", "--no-html")
    assert code == 0, stderr
    assert "loss: model" in stdout
    # 4 Conv1D (addmm) + QKᵀ + PV + the tied lm_head, none skipped
    assert "7 GEMM site(s)" in stdout and "captured 7 of 7 GEMMs = 100.0 % of GEMM FLOPs; skipped: none" in stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["architectures"] = ["GPT2ForSequenceClassification"]  # a head the saved weights do not have
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    code, stdout, stderr = _run(str(tmp_path / "hf"), "--inputs", str(tmp_path / "in.pt"), "--out",
                                str(tmp_path / "o2"), "-q", "--no-html")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "do not fit GPT2ForSequenceClassification" in lines[0], stderr
    assert "1 missing weight(s) (score.weight)" in lines[0]


def test_gemms_option_selects_kinds_and_prints_coverage(tmp_path) -> None:
    code, stdout, stderr = _run(f"{HERE / 'tiny_factory.py'}:build", "--strategy", "global", "--batches", "1",
                                "--gemms", "matmul", "--out", str(tmp_path / "m"), "--no-html", "-q")
    assert code == 0, stderr
    assert "4 GEMM site(s)" in stdout
    assert "captured 4 of 13 GEMMs = " in stdout and "skipped: 9 × linear: not selected (--gemms)" in stdout
    tables = _tables(tmp_path / "m")
    assert set(tables["layers"]["layer"]) == {f"blocks.{i}.attn#matmul{s}" for i in (0, 1) for s in ("", "#1")}
    cov = tables["coverage"].set_index("kind")
    assert cov.loc["linear", "skipped"] == 9 and cov.loc["matmul", "captured"] == 4


NO_GRAD_FACTORY = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        if self.kind == "detached":
            return {"loss": y.square().mean().detach(), "logits": y.detach()}
        return {"loss": y.argmax(-1).sum()}  # an integer loss: no gradient can flow


def build(kind):
    torch.manual_seed(0)
    return Model(kind), [torch.randn(5, 8)]


def detached():
    return build("detached")


def integer():
    return build("integer")
"""


@pytest.mark.parametrize("kind", ["detached", "integer"])
def test_loss_without_gradient_warns_and_report_says_why(tmp_path, kind) -> None:
    """A loss that does not depend on the weights used to give fprop-only results, exit 0 and no word
    (issue 11 item 10): now one warning line, the reason in results.json and a callout in the report."""
    (tmp_path / "nograd.py").write_text(NO_GRAD_FACTORY)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["analyze", f"{tmp_path / 'nograd.py'}:{kind}", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "dgrad and wgrad are not analysed" in warning[0] and "--loss" in warning[0]
    doc = json.loads((out / "results.json").read_text())
    assert "does not depend on the weights" in doc["metadata"]["loss"]["no_gradient"]
    assert {r["gemm"] for r in doc["tables"]["gemm"]} == {"fprop"}
    assert "No dgrad / wgrad numbers" in (out / "index.html").read_text()


ZERO_FACTORY = """
import warnings
import torch
from torch import nn

warnings.simplefilter("ignore")  # torch warns that initialising a zero-element weight is a no-op


def in0():
    return nn.Sequential(nn.Linear(0, 4)), [torch.randn(5, 0)]


def out0():
    return nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4)), [torch.randn(5, 8)]
"""


@pytest.mark.parametrize("which", ["in0", "out0"])
def test_zero_feature_linear_is_one_line_exit_2(tmp_path, which) -> None:
    """Linear(0, n) / Linear(n, 0) used to crash in a reshape (exit 3, issue 11 item 13)."""
    (tmp_path / "zero.py").write_text(ZERO_FACTORY)
    res = CliRunner().invoke(cli, ["analyze", f"{tmp_path / 'zero.py'}:{which}", "--out", str(tmp_path / "o")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "layer 0 has a weight of shape" in lines[0] and "--layers" in lines[0]
    assert not (tmp_path / "o").exists()


def test_options_no_recipe_uses_are_named_and_an_unused_optimizer_is_still_checked(tmp_path) -> None:
    """--accum-bits with int8 only, --margin without delayed, --lr without --steps ran silently; --optimizer
    nonexist:foo without --steps was not even checked."""
    (tmp_path / "fac.py").write_text("import torch\ndef build():\n    torch.manual_seed(0)\n"
                                     "    return torch.nn.Linear(8, 4), [torch.randn(3, 8)]\n")
    model = f"{tmp_path / 'fac.py'}:build"
    runner = CliRunner()
    res = runner.invoke(cli, ["analyze", model, "-s", "int8", "--accum-bits", "10", "--margin", "3", "--lr", "0.1",
                              "--no-e2e", "-q", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "note: --margin, --accum-bits, --lr had no effect here" in res.output
    used = runner.invoke(cli, ["analyze", model, "-s", "delayed", "--margin", "3", "--no-e2e", "-q",
                               "--out", str(tmp_path / "b")])
    assert used.exit_code == 0 and "no effect" not in used.output
    bad = runner.invoke(cli, ["analyze", model, "-s", "int8", "--optimizer", "nonexist:foo", "--no-e2e", "-q",
                              "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "--optimizer" in bad.output and not (tmp_path / "c" / "results.json").exists()
    # --budget and --sensitivity set up the end-to-end runs, which --no-e2e skips
    e2e = runner.invoke(cli, ["analyze", model, "-s", "int8", "--budget", "2%", "--sensitivity", "measured", "--no-e2e",
                              "-q", "--out", str(tmp_path / "d")])
    assert e2e.exit_code == 0, e2e.output
    assert ("note: --budget, --sensitivity had no effect here: --no-e2e skips the end-to-end runs that they set up"
            in e2e.output)
    plain = runner.invoke(cli, ["analyze", model, "-s", "int8", "--budget", "2%", "-q", "--out", str(tmp_path / "e")])
    assert plain.exit_code == 0 and "no effect" not in plain.output, plain.output
