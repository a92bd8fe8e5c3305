"""Every CLI command given bad input exits 2 with ONE stderr line and no traceback; bugs exit 3; --debug shows tracebacks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fp8probe.cli import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, cli

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "tests" / "report" / "data" / "results_small.json"
IN_FEATURES = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and bad files of every kind the commands are pointed at."""
    d = tmp_path_factory.mktemp("inputs")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, IN_FEATURES, generator=gen)
    f: dict[str, Path] = {
        "pt2": d / "model.pt2", "state_dict": d / "weights.pt", "inputs": d / "inputs.pt",
        "wrong_shape": d / "wrong_shape.pt", "png": d / "picture.png", "results": d / "results.json",
        "text_json": d / "other.json", "truncated_json": d / "truncated.json", "factory": d / "factory.py",
        "trunc_pt": d / "trunc.pt", "trunc_pt2": d / "trunc.pt2", "empty": d / "empty.pt", "a_file": d / "plain.txt",
        "malformed": d / "malformed.json", "loss": d / "losses.py", "deep_json": d / "deep.json",
    }
    model = _model()
    torch.export.save(torch.export.export(model, (x,)), f["pt2"])
    torch.save(model.state_dict(), f["state_dict"])
    torch.save([x, x * 2], f["inputs"])
    torch.save(torch.randn(3, IN_FEATURES + 5, generator=gen), f["wrong_shape"])  # 13 features for an 8-wide layer
    f["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    shutil.copy(RESULTS, f["results"])
    f["text_json"].write_text(json.dumps({"hello": [1, 2, 3]}))
    f["truncated_json"].write_text(RESULTS.read_text()[:500])
    f["factory"].write_text("import torch\nfrom torch import nn\n\ndef build():\n    torch.manual_seed(0)\n"
                            f"    return nn.Sequential(nn.Linear({IN_FEATURES}, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    f["trunc_pt"].write_bytes(f["state_dict"].read_bytes()[:200])
    f["trunc_pt2"].write_bytes(f["pt2"].read_bytes()[: f["pt2"].stat().st_size // 2])
    f["empty"].write_bytes(b"")
    f["a_file"].write_text("not a directory\n")
    doc = json.loads(RESULTS.read_text())
    doc["tables"]["layers"] = [{"name": "fc1"}]  # passes the schema check, but records lack their "layer" column
    f["malformed"].write_text(json.dumps(doc))
    f["loss"].write_text("def exploding(output, batch):\n    raise RuntimeError('loss exploded')\n")
    f["deep_json"].write_text("[" * 100_000)  # json.loads recursion: a hostile "results" file
    return f


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch) -> None:
    """FP8PROBE_DEBUG=1 in a developer's shell would (rightly) add tracebacks to every error here."""
    monkeypatch.delenv("FP8PROBE_DEBUG", raising=False)


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def _assert_one_line_usage_error(res, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line starting with 'Error:', no traceback; returns the line."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# (name, argv built from the files fixture and an output dir, substring(s) the one line must contain)
CASES = [
    ("formats-bad-format", lambda f, o: ["formats", "--format", "xml"], ["--format"]),
    ("unknown-command", lambda f, o: ["frobnicate"], ["No such command"]),
    # analyze: files of every wrong kind
    ("analyze-missing", lambda f, o: ["analyze", str(f["pt2"].with_name("nope.pt2")), "--out", o], ["does not exist"]),
    ("analyze-missing-arg", lambda f, o: ["analyze"], ["Missing argument"]),
    ("analyze-png", lambda f, o: ["analyze", str(f["png"]), "--out", o], ["PNG image", "not a model"]),
    ("analyze-results-json", lambda f, o: ["analyze", str(f["results"]), "--out", o], ["JSON", "not a model"]),
    ("analyze-empty-file", lambda f, o: ["analyze", str(f["empty"]), "--out", o], ["empty file"]),
    ("analyze-truncated-pt", lambda f, o: ["analyze", str(f["trunc_pt"]), "--factory", f"{f['factory']}:build",
                                           "--out", o], ["truncated"]),
    ("analyze-truncated-pt2", lambda f, o: ["analyze", str(f["trunc_pt2"]), "--out", o], ["truncated"]),
    ("analyze-directory", lambda f, o: ["analyze", str(f["pt2"].parent), "--out", o], ["config.json"]),
    # without --inputs a state_dict gets a weights-only analysis; with them the model must be built
    ("analyze-state-dict-no-factory", lambda f, o: ["analyze", str(f["state_dict"]), "--inputs", str(f["wrong_shape"]),
                                                    "--out", o], ["--factory"]),
    # inputs that do not fit
    ("analyze-inputs-missing", lambda f, o: ["analyze", str(f["pt2"]), "--inputs", str(f["png"].with_name("no.pt")),
                                             "--out", o], ["does not exist"]),
    ("analyze-inputs-png", lambda f, o: ["analyze", str(f["pt2"]), "--inputs", str(f["png"]), "--out", o],
     ["PNG image"]),
    ("analyze-inputs-truncated", lambda f, o: ["analyze", str(f["pt2"]), "--inputs", str(f["trunc_pt"]), "--out", o],
     ["truncated"]),
    ("analyze-inputs-shape-pt2", lambda f, o: ["analyze", str(f["pt2"]), "--inputs", str(f["wrong_shape"]),
                                               "--out", o, "-q"], ["do not match the exported program", "--inputs"]),
    ("analyze-inputs-shape-eager", lambda f, o: ["analyze", str(f["state_dict"]), "--factory", f"{f['factory']}:build",
                                                 "--inputs", str(f["wrong_shape"]), "--out", o, "-q"], ["model failed"]),
    # options
    ("analyze-unknown-strategy", lambda f, o: ["analyze", str(f["pt2"]), "--strategy", "fp4", "--out", o],
     ["strategy must be", "fp4"]),
    ("analyze-threshold-nan", lambda f, o: ["analyze", str(f["pt2"]), "--threshold", "nan", "--out", o],
     ["--threshold", "finite"]),
    ("analyze-threshold-negative", lambda f, o: ["analyze", str(f["pt2"]), "--threshold", "-1", "--out", o],
     ["--threshold"]),
    ("analyze-threshold-text", lambda f, o: ["analyze", str(f["pt2"]), "--threshold", "six", "--out", o],
     ["--threshold", "expected a number"]),
    ("analyze-batches-zero", lambda f, o: ["analyze", str(f["pt2"]), "--batches", "0", "--out", o], ["--batches"]),
    ("analyze-bad-regex", lambda f, o: ["analyze", str(f["pt2"]), "--layers", "([", "--out", o],
     ["regular expression"]),
    ("analyze-no-matching-layer", lambda f, o: ["analyze", str(f["pt2"]), "--layers", "^nothing$", "--out", o, "-q"],
     ["nothing"]),
    ("analyze-device", lambda f, o: ["analyze", str(f["pt2"]), "--device", "tpu", "--out", o], ["--device"]),
    ("analyze-seed", lambda f, o: ["analyze", str(f["pt2"]), "--seed", "-3", "--out", o], ["--seed"]),
    ("analyze-out-is-file", lambda f, o: ["analyze", str(f["pt2"]), "--out", str(f["a_file"])], ["--out", "is a file"]),
    ("analyze-bad-name", lambda f, o: ["analyze", str(f["pt2"]), "--name", "../escape"], ["--name"]),
    ("analyze-loss-raises", lambda f, o: ["analyze", str(f["pt2"]), "--loss", f"{f['loss']}:exploding", "--out", o,
                                          "-q"], ["--loss", "loss exploded"]),
    ("analyze-bad-factory", lambda f, o: ["analyze", str(f["state_dict"]), "--factory", "no_such_mod_zz:build",
                                          "--out", o], ["cannot import module"]),
    # sweeps
    ("sweep-blocksize-zero", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", "0", "--out", o],
     ["--blocksizes"]),
    ("sweep-blocksize-negative", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", "64,-32",
                                               "--out", o], ["--blocksizes", "-32"]),
    ("sweep-blocksize-fraction", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", "64,1.5",
                                               "--out", o], ["whole numbers", "1.5"]),
    ("sweep-blocksize-text", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", "big", "--out", o],
     ["--blocksizes"]),
    ("sweep-blocksize-empty", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", ",", "--out", o],
     ["item 1 of 2 is empty"]),
    ("sweep-blocksize-huge", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", str(2**40), "--out", o],
     ["--blocksizes"]),
    ("sweep-blocksize-png", lambda f, o: ["sweep-blocksize", str(f["png"]), "--out", o], ["PNG image"]),
    ("sweep-blocksize-missing", lambda f, o: ["sweep-blocksize", "gone.pt2", "--out", o], ["does not exist"]),
    ("sweep-threshold-nan", lambda f, o: ["sweep-threshold", str(f["pt2"]), "--thresholds", "0,nan", "--out", o],
     ["--thresholds", "nan"]),
    ("sweep-threshold-inf", lambda f, o: ["sweep-threshold", str(f["pt2"]), "--thresholds", "inf", "--out", o],
     ["--thresholds"]),
    ("sweep-threshold-negative", lambda f, o: ["sweep-threshold", str(f["pt2"]), "--thresholds", "-1", "--out", o],
     ["--thresholds"]),
    ("sweep-threshold-text", lambda f, o: ["sweep-threshold", str(f["pt2"]), "--thresholds", "low,high",
                                           "--out", o], ["--thresholds", "low"]),
    ("sweep-threshold-inputs-shape", lambda f, o: ["sweep-threshold", str(f["pt2"]), "--thresholds", "6",
                                                   "--inputs", str(f["wrong_shape"]), "--out", o], ["--inputs", "wrong_shape.pt"]),
    ("sweep-threshold-results-json", lambda f, o: ["sweep-threshold", str(f["results"]), "--out", o], ["JSON"]),
    # report
    ("report-missing", lambda f, o: ["report", str(f["png"].with_name("none.json")), "-o", f"{o}.html"],
     ["does not exist"]),
    ("report-model", lambda f, o: ["report", str(f["pt2"]), "-o", f"{o}.html"], ["PyTorch file", "analyze"]),
    ("report-png", lambda f, o: ["report", str(f["png"]), "-o", f"{o}.html"], ["binary file"]),
    ("report-empty-out", lambda f, o: ["report", str(f["results"]), "-o", ""], ["-o is empty"]),
    ("report-truncated-json", lambda f, o: ["report", str(f["truncated_json"]), "-o", f"{o}.html"], ["not JSON"]),
    ("report-other-json", lambda f, o: ["report", str(f["text_json"]), "-o", f"{o}.html"],
     ["not an fp8probe results file"]),
    ("report-deeply-nested-json", lambda f, o: ["report", str(f["deep_json"]), "-o", f"{o}.html"], ["recursion"]),
    ("report-malformed-tables", lambda f, o: ["report", str(f["malformed"]), "-o", f"{o}.html"], ["malformed"]),
    ("report-keep-nan", lambda f, o: ["report", str(f["results"]), "--keep-16bit-db", "nan", "-o", f"{o}.html"],
     ["--keep-16bit-db"]),
    ("report-onto-itself", lambda f, o: ["report", str(f["results"]), "-o", str(f["results"])], ["overwrite"]),
    # (said "cannot access plain.txt: File exists": mkdir(exist_ok=True)'s words for a file in the way)
    ("report-out-under-a-file", lambda f, o: ["report", str(f["results"]), "-o", str(f["a_file"] / "r.html")],
     ["plain.txt: Not a directory"]),
    # compare
    ("compare-missing", lambda f, o: ["compare", str(f["results"]), "missing.json", "--out", o], ["does not exist"]),
    ("compare-model", lambda f, o: ["compare", str(f["pt2"]), str(f["results"]), "--out", o], ["PyTorch file"]),
    ("compare-other-json", lambda f, o: ["compare", str(f["results"]), str(f["text_json"]), "--out", o],
     ["not an fp8probe results file"]),
    ("compare-gate-negative", lambda f, o: ["compare", str(f["results"]), str(f["results"]), "--max-sqnr-drop",
                                            "-1", "--out", o], ["--max-sqnr-drop"]),
    ("compare-gate-nan", lambda f, o: ["compare", str(f["results"]), str(f["results"]), "--max-underflow-increase",
                                       "nan", "--out", o], ["--max-underflow-increase"]),
    ("compare-gate-text", lambda f, o: ["compare", str(f["results"]), str(f["results"]), "--max-new-outlier-cols",
                                        "some", "--out", o], ["--max-new-outlier-cols"]),
    ("compare-out-under-file", lambda f, o: ["compare", str(f["results"]), str(f["results"]), "--out",
                                             str(f["a_file"] / "sub")], ["plain.txt"]),
    # demo: errors found before any work
    ("demo-out-is-file", lambda f, o: ["demo", "--out", str(f["a_file"])], ["--out", "is a file"]),
    ("demo-unknown-option", lambda f, o: ["demo", "--fast"], ["--fast"]),
]


@pytest.mark.parametrize("make_args, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(files, tmp_path, make_args, needles) -> None:
    out = tmp_path / "out"
    res = _invoke(make_args(files, str(out)))
    _assert_one_line_usage_error(res, *needles)
    # nothing half-done is left behind by a refused run
    assert not out.exists() or not any(out.iterdir())


# A list option with an empty item: a typo (64,,128), not a value to skip; refused before the model is loaded.
EMPTY_ITEMS = [
    (["sweep-blocksize", "--blocksizes", "64,,128"], ["--blocksizes: expected comma-separated whole numbers",
                                                      "got '64,,128' (item 2 of 3 is empty)"]),
    (["sweep-blocksize", "--blocksizes", "64,128,"], ["--blocksizes", "got '64,128,' (item 3 of 3 is empty)"]),
    (["sweep-threshold", "--thresholds", "0,,6"], ["--thresholds: expected comma-separated finite numbers >= 0",
                                                   "got '0,,6' (item 2 of 3 is empty)"]),
    (["analyze", "--strategy", "global,,int8"], ["--strategy: expected a strategy name",
                                                 "got 'global,,int8' (item 2 of 3 is empty)"]),
    (["analyze", "--gemms", ",linear"], ["--gemms: expected comma-separated GEMM kinds",
                                         "got ',linear' (item 1 of 2 is empty)"]),
    (["sweep-blocksize", "--gemms", "linear,,conv"], ["--gemms", "(item 2 of 3 is empty)"]),
]


@pytest.mark.parametrize("args, needles", EMPTY_ITEMS, ids=[" ".join(a[1:]) for a, _ in EMPTY_ITEMS])
def test_list_option_with_an_empty_item_is_refused(files, tmp_path, args, needles) -> None:
    res = _invoke([args[0], str(files["pt2"]), *args[1:], "--out", str(tmp_path / "o")])
    _assert_one_line_usage_error(res, *needles)
    assert not (tmp_path / "o").exists()


def test_inputs_that_do_not_fit_name_the_batch_the_file_and_the_first_layer(files, tmp_path) -> None:
    """torch's words alone ("mat1 and mat2 shapes cannot be multiplied (3x13 and 8x16)") named neither the batch nor
    which operand was the input; the second of two batches is the odd one here."""
    mixed = tmp_path / "mixed.pt"
    gen = torch.Generator().manual_seed(2)
    torch.save([torch.randn(3, IN_FEATURES, generator=gen), torch.randn(3, IN_FEATURES + 5, generator=gen)], mixed)
    for command in ("analyze", "sweep-threshold"):
        res = _invoke([command, str(files["state_dict"]), "--factory", f"{files['factory']}:build", "--inputs",
                       str(mixed), "--out", str(tmp_path / command), "-q", "--no-html"])
        _assert_one_line_usage_error(
            res, f"--inputs {mixed}: inputs batch 1 (counting from 0) of 2: the model failed on the inputs: RuntimeError: "
                 "mat1 and mat2 shapes cannot be multiplied (3x13 and 8x16)",
            "the batch holds arg0 3 x 13 float32 and the model's first layer 0 is Linear(in_features=8, "
            "out_features=16, bias=True): check the inputs' shape and dtype against it")
    res = _invoke(["analyze", str(files["pt2"]), "--inputs", str(mixed), "--out", str(tmp_path / "p"), "-q"])
    _assert_one_line_usage_error(res, f"--inputs {mixed}: inputs batch 1 (counting from 0) of 2: inputs do not match "
                                      "the exported program", "to be equal to 8, but got 13")


def test_a_bug_in_the_model_code_names_its_line_not_the_inputs_shapes(tmp_path) -> None:
    """An AttributeError in forward was told "check the inputs' shape and dtype against" the first layer."""
    factory = tmp_path / "buggy.py"
    factory.write_text("import torch\nfrom torch import nn\n\n\nclass M(nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        self.fc = nn.Linear(8, 4)\n\n"
                       "    def forward(self, x):\n        return self.fc(x) / self.scale\n\n\n"
                       "def build():\n    return M()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import buggy
        torch.save(buggy.build().state_dict(), tmp_path / "sd.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("buggy", None)
    torch.save(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), tmp_path / "x.pt")
    res = _invoke(["analyze", str(tmp_path / "sd.pt"), "--factory", f"{factory}:build", "--inputs",
                   str(tmp_path / "x.pt"), "--out", str(tmp_path / "o"), "-q", "--no-html"])
    _assert_one_line_usage_error(res, "the model failed on the inputs: AttributeError: 'M' object has no attribute "
                                      f"'scale'; raised in forward at {factory}:11")
    assert "first layer" not in res.output


@pytest.mark.parametrize(("where", "code"), [("factory", 0), ("forward", 0), ("loss", 1)])
def test_user_code_calling_sys_exit_is_a_usage_error_naming_its_line(tmp_path, where: str, code: int) -> None:
    """sys.exit(0) in a factory, a model's forward or a --loss function made analyze exit 0 with no output and no
    message (a CI job read it as success); sys.exit(1) read as "a compare gate failed" (QA)."""
    name = f"exiting_{where}"
    factory = tmp_path / f"{name}.py"
    factory.write_text("import sys\nimport torch\nfrom torch import nn\n\n\nclass M(nn.Module):\n"
                       "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 4)\n\n"
                       "    def forward(self, x):\n"
                       f"        {'sys.exit(0)' if where == 'forward' else 'pass'}\n        return self.fc(x)\n\n\n"
                       "def build():\n"
                       f"    {'sys.exit(0)' if where == 'factory' else 'pass'}\n    return M()\n\n\n"
                       "def loss(out, batch):\n"
                       f"    sys.exit({code})\n")
    g = torch.Generator().manual_seed(4)
    torch.save({"fc.weight": torch.randn(4, 8, generator=g), "fc.bias": torch.randn(4, generator=g)}, tmp_path / "sd.pt")
    torch.save(torch.randn(3, 8, generator=g), tmp_path / "x.pt")
    line = {"factory": 17, "forward": 12, "loss": 22}[where]
    args = ["analyze", str(tmp_path / "sd.pt"), "--factory", f"{factory}:build", "--inputs", str(tmp_path / "x.pt"),
            "--out", str(tmp_path / "o"), "-q", "--no-html"]
    if where == "loss":
        args += ["--loss", f"{factory}:loss"]
    res = _invoke(args)
    fn = {"factory": "build", "forward": "forward", "loss": "loss"}[where]
    _assert_one_line_usage_error(res, f"called sys.exit({code}) in {fn} at {factory}:{line}, so the run stopped "
                                      "unfinished")
    assert not (tmp_path / "o").exists()


def test_factory_batches_that_do_not_fit_say_so(tmp_path) -> None:
    factory = tmp_path / "odd.py"
    factory.write_text("import torch\ndef build():\n    torch.manual_seed(0)\n"
                       "    return torch.nn.Linear(4, 2), [torch.randn(2, 5)]\n")
    res = _invoke(["analyze", f"{factory}:build", "--out", str(tmp_path / "o"), "-q", "--no-html"])
    _assert_one_line_usage_error(res, "the model's own batches (its factory's or the program's example inputs): inputs "
                                      "batch 0 (counting from 0) of 1", "the batch holds arg0 2 x 5 float32 and the "
                                      "model's first layer Linear is Linear(in_features=4, out_features=2, bias=True)")


def test_blocksizes_doubling_range() -> None:
    from fp8probe.cli import _parse_blocksizes

    assert _parse_blocksizes("32,64,...,4096") == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert _parse_blocksizes("16, 32,64 , ... ,128") == [16, 32, 64, 128]
    assert _parse_blocksizes("100,200,...,800") == [100, 200, 400, 800]


@pytest.mark.parametrize("text, needle", [
    ("32,...,4096", "two sizes before it and one after it"),
    ("...,4096", "two sizes before it and one after it"),
    ("32,64,...", "two sizes before it and one after it"),
    ("32,64,...,1024,...,4096", "two sizes before it and one after it"),
    ("32,48,...,4096", "expected the two sizes before '...' to be start,2*start (like 32,64), got 32,48"),
    ("32,64,...,1000", "expected an end of 64 times a power of two (128, 256, ...), got 1000"),
    ("32,64,...,64", "got 64"),
])
def test_blocksizes_malformed_range(files, tmp_path, text, needle) -> None:
    res = _invoke(["sweep-blocksize", str(files["pt2"]), "--blocksizes", text, "--out", str(tmp_path / "o")])
    _assert_one_line_usage_error(res, "--blocksizes", needle)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs Linux's /dev/full (every write: ENOSPC)")
def test_markdown_append_that_fails_names_the_file(files, tmp_path) -> None:
    """compare --markdown on a full disk said "cannot access: No space left on device", without the path."""
    res = _invoke(["compare", str(files["results"]), str(files["results"]), "--out", str(tmp_path / "c"),
                   "--markdown", "/dev/full"])
    _assert_one_line_usage_error(res, "cannot access /dev/full: No space left on device")


def test_bare_command_prints_help() -> None:
    res = _invoke([])
    assert res.exit_code in (0, EXIT_USAGE) and "Usage:" in res.output and "Commands:" in res.output
    assert not res.output.startswith("Error")


def test_existing_outputs_need_overwrite(files, tmp_path) -> None:
    """A second run into the same --out is refused (exit 2, one line naming --overwrite) before any work."""
    out = tmp_path / "cmp"
    args = ["compare", str(files["results"]), str(files["results"]), "--out", str(out)]
    assert _invoke(args).exit_code == 0
    _assert_one_line_usage_error(_invoke(args), "--overwrite", "compare.html")
    assert _invoke([*args, "--overwrite"]).exit_code == 0


def test_every_command_reports_bad_input(files, tmp_path) -> None:
    """The table above exercises every command of the CLI (a new command must add its cases)."""
    covered = {c[1](files, "o")[0] for c in CASES}
    assert set(cli.commands) <= covered, set(cli.commands) - covered


# ------------------------------------------------------------------------------------------------
# main(): the console-script path (subprocess), internal errors, --debug
# ------------------------------------------------------------------------------------------------
def _run_python(code: str, *, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FP8PROBE_DEBUG"}  # a developer's own setting
    environ.update({"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120,
                          cwd=REPO)


def test_main_bad_input_one_line(tmp_path) -> None:
    """`python -m fp8probe` (main()) on a missing model: exit 2, one stderr line, no traceback."""
    proc = _run_python(f"import sys; sys.argv = ['fp8probe', 'analyze', {str(tmp_path / 'gone.pt2')!r}]\n"
                       "from fp8probe.cli import main; main()")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == EXIT_USAGE and len(lines) == 1 and "does not exist" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# A bug anywhere in a command: format_table raising an exception nobody expects.
_BOOM = ("import sys, fp8probe.formats as f\n"
         "def boom():\n    raise RuntimeError('boom: ' + 'x' * 3 + '\\nsecond line')\n"
         "f.format_table = boom\n"
         "sys.argv = ['fp8probe', *{argv!r}, 'formats']\n"
         "from fp8probe.cli import main; main()")


def test_main_internal_error_is_one_line_exit_3() -> None:
    proc = _run_python(_BOOM.format(argv=[]))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == EXIT_INTERNAL, proc.stderr
    assert lines == ["fp8probe: internal error: RuntimeError: boom: xxx second line "
                     "(re-run with --debug for the traceback)"], lines
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how) -> None:
    proc = _run_python(_BOOM.format(argv=["--debug"] if how == "flag" else []),
                       env={"FP8PROBE_DEBUG": "1"} if how == "env" else None)
    assert proc.returncode == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in proc.stderr and "def boom" not in proc.stderr
    assert "in boom" in proc.stderr and proc.stderr.rstrip().endswith("(re-run with --debug for the traceback)")


def test_debug_traceback_for_usage_errors(files) -> None:
    """--debug also shows where a usage error came from (the loader's exception), then the same line."""
    res = _invoke(["--debug", "analyze", str(files["png"])])
    assert res.exit_code == EXIT_USAGE and "Traceback" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("Error: cannot read")


def test_interrupt_exits_130(monkeypatch) -> None:
    import fp8probe.formats

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(fp8probe.formats, "format_table", interrupted)
    res = _invoke(["formats"])
    assert res.exit_code == EXIT_INTERRUPTED and "Traceback" not in res.output


def test_internal_error_in_process(monkeypatch) -> None:
    """CliRunner path: the group's main() handles the bug itself (exit 3), nothing escapes to the runner."""
    import fp8probe.formats

    monkeypatch.setattr(fp8probe.formats, "format_table", lambda: 1 / 0)
    res = _invoke(["formats"])
    assert res.exit_code == EXIT_INTERNAL and res.exception is None or isinstance(res.exception, SystemExit)
    assert res.stderr.startswith("fp8probe: internal error: ZeroDivisionError: division by zero")


def test_closed_stdout_exits_141_not_1() -> None:
    """`fp8probe formats | head -0`: click turned EPIPE into exit 1, which means "gate failed" (issue 11 item 12)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fp8probe", "formats"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=environ, cwd=REPO)
    proc.stdout.close()  # the reader is gone before anything is written
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_BROKEN_PIPE, err
    assert b"Traceback" not in err


# SIGINT delivered to the CLI process while `import fp8probe` is still importing its submodules (the
# seconds torch takes to import), made deterministic by an import hook that signals the process itself.
# (SIGINT's default handler first, as in a terminal: a parent that ignores SIGINT, such as a shell's `cmd &`
# without job control, hands SIG_IGN down and the signal would never arrive.)
_INTERRUPT_DURING_IMPORT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = [{argv0!r}, "formats"]

class InterruptOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == "fp8probe.functional":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, InterruptOnImport())
from fp8probe.cli import main
main()
"""


@pytest.mark.parametrize("argv0", ["fp8probe", "-m"], ids=["console-script", "python-m"])
def test_ctrl_c_while_importing_exits_130_without_traceback(argv0) -> None:
    proc = _run_python(_INTERRUPT_DURING_IMPORT.format(argv0=argv0))
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, proc.stderr[-500:])
    assert proc.stderr.strip() == "Aborted." and proc.stdout == ""


def test_library_import_keeps_keyboard_interrupt() -> None:
    """Only the CLI process exits quietly: a program importing fp8probe still gets KeyboardInterrupt."""
    proc = _run_python(_INTERRUPT_DURING_IMPORT.format(argv0="myscript.py").replace(
        "from fp8probe.cli import main\nmain()", "try:\n    import fp8probe\nexcept KeyboardInterrupt:\n    print('caught')"))
    assert proc.returncode == 0 and proc.stdout.strip() == "caught", proc.stderr[-500:]


OSC = "\x1b]0;owned\x07"  # an OSC sequence: retitles the terminal (and worse on some emulators)


def test_control_characters_in_names_and_paths_are_escaped(tmp_path, monkeypatch) -> None:
    """--name and path arguments reached the terminal raw (issue 11 item 14): printed escaped, like layer names."""
    monkeypatch.chdir(tmp_path)
    factory = f"{REPO / 'tests' / 'analysis' / 'tiny_factory.py'}:build"
    res = _invoke(["analyze", factory, "--name", f"run{OSC}", "--strategy", "global", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert "\\x1b]0;owned\\x07" in res.stdout
    res = _invoke(["report", str(tmp_path / f"gone{OSC}.json")])
    assert res.exit_code == EXIT_USAGE and "\x1b" not in res.output and "\\x1b" in res.stderr
    out = tmp_path / f"cmp{OSC}"
    data = REPO / "tests" / "report" / "data" / "results_small.json"
    res = _invoke(["compare", str(data), str(data), "--out", str(out)])
    assert res.exit_code == 0 and "\x1b" not in res.output and "\\x1b" in res.stdout, res.output


def test_a_corrupted_state_dict_is_one_line(files, tmp_path) -> None:
    """A bit flipped in a tensor's bytes (weights-only analysis: the weight was analysed as it read)."""
    import zipfile

    data = bytearray(files["state_dict"].read_bytes())
    with zipfile.ZipFile(files["state_dict"]) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    at = info.header_offset
    data[at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")] ^= 1
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    for args in (["analyze", str(bad)], ["sweep-blocksize", str(bad)],
                 ["analyze", str(bad), "--factory", f"{files['factory']}:build", "--inputs", str(files["inputs"])]):
        res = _invoke([*args, "--out", str(tmp_path / "o"), "-q"])
        _assert_one_line_usage_error(res, "flipped.pt is corrupted: member weights/data/0 CRC mismatch")


def test_an_empty_inputs_batch_is_one_line(files, tmp_path) -> None:
    """A batch of 0 rows ran, and the summary read "loss –" and nan beside a verdict about a non-finite loss."""
    empty = tmp_path / "with_empty.pt"
    torch.save([torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(3)), torch.randn(0, IN_FEATURES)],
               empty)
    for command in ("analyze", "sweep-blocksize", "sweep-threshold"):
        res = _invoke([command, str(files["state_dict"]), "--factory", f"{files['factory']}:build", "--inputs",
                       str(empty), "--out", str(tmp_path / command), "-q", "--no-html"])
        _assert_one_line_usage_error(res, f"--inputs {empty}: inputs batch 1 (counting from 0) of 2 has 0 rows (arg0 0 x "
                                          f"{IN_FEATURES}): expected at least one row in every batch")
