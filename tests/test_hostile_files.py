"""Hostile files: a pickle whose loading would create a file is never unpickled without --trust-pickle, on every loading path."""
from __future__ import annotations

import contextlib
import io
import os
import json
import pathlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fp8probe.analysis.loading import LoadError, load_inputs, load_model
from fp8probe.cli import EXIT_USAGE, cli

IN_FEATURES = 8


class Planted:
    """Unpickling this object calls pathlib.Path.touch(target): the file's existence proves code ran.

    Only the *reduction* names this test class; the pickle stream itself names pathlib.Path.touch, so
    the unpickler needs nothing from this module (just as a real attacker's file would)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.ReLU(), nn.Linear(16, 4))


def _planted_pickle(target: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": Planted(target)}, buf)
    return buf.getvalue()


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None,
                 compress_type: int = zipfile.ZIP_STORED) -> None:
    """Copy a zip archive, replacing the members whose name ends with a key of ``replace`` and adding
    the members of ``add`` (paths below the archive's root folder, stored with ``compress_type``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info, data)
        for name, data in (add or {}).items():
            zout.writestr(f"{root}/{name}", data, compress_type=compress_type)


@pytest.fixture()
def hostile(tmp_path: Path) -> dict[str, Path]:
    """Files whose loading would create tmp_path/'pwned-<kind>' if anything unpickled them."""
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(2))
    good_pt2 = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_model(), (x,)), good_pt2)
    files = {"good_pt2": good_pt2, "good_inputs": tmp_path / "inputs.pt"}
    torch.save([x], files["good_inputs"])
    for kind in ("model", "inputs", "pt2", "pt2_weight", "state_dict", "plain_model", "plain_inputs"):
        files[f"target_{kind}"] = tmp_path / f"pwned-{kind}"
    # 1. a pickle saved as model.pt (what `torch.save(model)` files look like to the loader)
    files["model"] = tmp_path / "model.pt"
    files["model"].write_bytes(_planted_pickle(files["target_model"]))
    # 2. the same as an inputs file
    files["inputs"] = tmp_path / "evil_inputs.pt"
    files["inputs"].write_bytes(_planted_pickle(files["target_inputs"]))
    # 3. a real .pt2 whose example inputs are the planted pickle: torch.export.load tries the
    #    weights-only unpickler first and falls back to the full one (torch/_export/serde/serialize.py)
    files["pt2"] = tmp_path / "evil.pt2"
    _rewrite_zip(good_pt2, files["pt2"], {"/data/sample_inputs/model.pt": _planted_pickle(files["target_pt2"])})
    # 4. a .pt2 whose first weight is flagged use_pickle, which torch loads with weights_only=False
    files["pt2_weight"] = tmp_path / "evil_weight.pt2"
    with zipfile.ZipFile(good_pt2) as z:
        cfg_name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        cfg = json.loads(z.read(cfg_name))
    first = next(iter(cfg["config"].values()))
    first["use_pickle"] = True
    _rewrite_zip(good_pt2, files["pt2_weight"], {cfg_name: json.dumps(cfg).encode(),
                                                 f"/data/weights/{first['path_name']}":
                                                     _planted_pickle(files["target_pt2_weight"])})
    # 5. a "state_dict" for the --factory path
    files["state_dict"] = tmp_path / "weights.pt"
    files["state_dict"].write_bytes(_planted_pickle(files["target_state_dict"]))
    # 6. plain pickle.dump streams (not torch.save's format: torch.load cannot read them), as a model and as inputs
    for kind, protocol in (("plain_model", 4), ("plain_inputs", 2)):
        files[kind] = tmp_path / f"{kind}.pt"
        files[kind].write_bytes(pickle.dumps({"weight": Planted(files[f"target_{kind}"])}, protocol=protocol))
    files["factory"] = tmp_path / "factory.py"
    files["factory"].write_text("from torch import nn\n\ndef build():\n"
                                f"    return nn.Sequential(nn.Linear({IN_FEATURES}, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    return files


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


# (label, argv from the fixture and an out dir, the target that must not appear)
PATHS = [
    ("analyze-model", lambda f, o: ["analyze", str(f["model"]), "--inputs", str(f["good_inputs"]), "--out", o],
     "target_model"),
    ("sweep-blocksize-model", lambda f, o: ["sweep-blocksize", str(f["model"]), "--inputs", str(f["good_inputs"]),
                                            "--blocksizes", "64", "--out", o], "target_model"),
    ("sweep-threshold-model", lambda f, o: ["sweep-threshold", str(f["model"]), "--inputs", str(f["good_inputs"]),
                                            "--thresholds", "6", "--out", o], "target_model"),
    ("analyze-inputs", lambda f, o: ["analyze", str(f["good_pt2"]), "--inputs", str(f["inputs"]), "--out", o],
     "target_inputs"),
    ("sweep-threshold-inputs", lambda f, o: ["sweep-threshold", str(f["good_pt2"]), "--inputs", str(f["inputs"]),
                                             "--thresholds", "6", "--out", o], "target_inputs"),
    ("analyze-pt2-example-inputs", lambda f, o: ["analyze", str(f["pt2"]), "--out", o], "target_pt2"),
    ("sweep-blocksize-pt2", lambda f, o: ["sweep-blocksize", str(f["pt2"]), "--blocksizes", "64", "--out", o],
     "target_pt2"),
    ("analyze-pt2-pickled-weight", lambda f, o: ["analyze", str(f["pt2_weight"]), "--out", o], "target_pt2_weight"),
    ("analyze-plain-pickle", lambda f, o: ["analyze", str(f["plain_model"]), "--inputs", str(f["good_inputs"]),
                                           "--out", o], "target_plain_model"),
    ("analyze-plain-pickle-factory", lambda f, o: ["analyze", str(f["plain_model"]), "--factory",
                                                   f"{f['factory']}:build", "--inputs", str(f["good_inputs"]),
                                                   "--out", o], "target_plain_model"),
    ("analyze-plain-pickle-inputs", lambda f, o: ["analyze", str(f["good_pt2"]), "--inputs", str(f["plain_inputs"]),
                                                  "--out", o], "target_plain_inputs"),
    ("analyze-state-dict", lambda f, o: ["analyze", str(f["state_dict"]), "--factory", f"{f['factory']}:build",
                                         "--inputs", str(f["good_inputs"]), "--out", o], "target_state_dict"),
]


@pytest.mark.parametrize("make_args, target", [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_planted_pickle_is_not_run_without_trust(hostile, tmp_path, make_args, target) -> None:
    res = _cli(*make_args(hostile, str(tmp_path / "out")))
    assert not hostile[target].exists(), "the planted pickle ran"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE and len(lines) == 1, (res.exit_code, res.output)
    assert "--trust-pickle" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make_args, target", [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_planted_pickle_runs_with_trust(hostile, tmp_path, make_args, target) -> None:
    """The control: with --trust-pickle the same file does create its target, so the test above can fail."""
    _cli(*make_args(hostile, str(tmp_path / "out")), "--trust-pickle")
    assert hostile[target].exists()


def _side(target: str) -> str:
    """The side of the command line the planted file is on: --inputs, or MODEL (a .pt2's example inputs too)."""
    return "inputs" if target in ("target_inputs", "target_plain_inputs") else "model"


@pytest.mark.parametrize("label, make_args, target", PATHS, ids=[p[0] for p in PATHS])
def test_trusting_one_side_leaves_the_other_refused(hostile, tmp_path, label, make_args, target) -> None:
    """--trust-pickle trusted every file at once: a user trusting their own model had to trust a downloaded
    inputs file too (or the other way round). --trust-pickle-model / --trust-pickle-inputs trust one side;
    a refusal names the flag of its own side."""
    side = _side(target)
    other = "inputs" if side == "model" else "model"
    res = _cli(*make_args(hostile, str(tmp_path / "out")), f"--trust-pickle-{other}")
    assert not hostile[target].exists(), "the planted pickle ran"
    assert res.exit_code == EXIT_USAGE and f"--trust-pickle-{side}" in res.stderr, res.output
    _cli(*make_args(hostile, str(tmp_path / "out2")), f"--trust-pickle-{side}")
    assert hostile[target].exists()


def test_library_loaders_refuse_too(hostile) -> None:
    """load_model / load_inputs (the Python API) have the same default as the CLI."""
    for call, target in ((lambda: load_model(hostile["model"]), "target_model"),
                         (lambda: load_model(hostile["pt2"]), "target_pt2"),
                         (lambda: load_model(hostile["pt2_weight"]), "target_pt2_weight"),
                         (lambda: load_inputs(hostile["inputs"]), "target_inputs"),
                         (lambda: load_model(hostile["plain_model"]), "target_plain_model"),
                         (lambda: load_inputs(hostile["plain_inputs"]), "target_plain_inputs")):
        with pytest.raises(LoadError, match="--trust-pickle"):
            call()
        assert not hostile[target].exists()


def test_weights_only_forcing_is_undone(hostile) -> None:
    """Loading a .pt2 forces torch.load to weights-only only while it runs: the environment is restored."""
    import os

    before = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    assert load_model(hostile["good_pt2"]).kind == "export"
    with pytest.raises(LoadError):
        load_model(hostile["pt2"])
    assert {k: os.environ.get(k) for k in before} == before


def test_benign_dynamic_shape_program_loads(tmp_path) -> None:
    """The symbolic-shape check accepts what torch.export writes for a dynamic batch dimension."""
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(4))
    ep = torch.export.export(_model(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    torch.export.save(ep, tmp_path / "dyn.pt2")
    with zipfile.ZipFile(tmp_path / "dyn.pt2") as z:
        assert any(b"expr_str" in z.read(n) for n in z.namelist() if n.endswith(".json"))
    loaded = load_model(tmp_path / "dyn.pt2")
    assert loaded.kind == "export" and loaded.batches is not None


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big, self.small = nn.Linear(IN_FEATURES, 16), nn.Linear(IN_FEATURES, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) if x.shape[0] >= 8 else self.small(x)


@pytest.mark.parametrize("trust", [False, True])
def test_pt2_inputs_are_checked_against_what_it_was_exported_for(tmp_path, trust) -> None:
    """fp8probe runs the graph itself, past the module's input pre-hook: an untrusted program (no guard function)
    ran on 4 rows the graph traced at 8 (the other branch's layer, measured as if it ran), or on a 1-D input.
    Batches outside a dynamic dimension's range are refused as well."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    torch.export.save(torch.export.export(_Branchy(), (torch.randn(8, IN_FEATURES, generator=gen),)),
                      tmp_path / "branch.pt2")
    ep = torch.export.export(_model(), (torch.randn(3, IN_FEATURES, generator=gen),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=6)},))
    torch.export.save(ep, tmp_path / "dyn.pt2")
    flags = ["--trust-pickle"] if trust else []
    cases = [("branch.pt2", (4, IN_FEATURES), "equal to 8"), ("branch.pt2", (IN_FEATURES,), "dimensions"),
             ("dyn.pt2", (9, IN_FEATURES), "<= 6"), ("branch.pt2", (8, IN_FEATURES), None),
             ("dyn.pt2", (5, IN_FEATURES), None)]
    for i, (program, shape, error) in enumerate(cases):
        torch.save(torch.randn(*shape, generator=gen), tmp_path / f"x{i}.pt")
        res = CliRunner().invoke(cli, ["analyze", str(tmp_path / program), "--inputs", str(tmp_path / f"x{i}.pt"),
                                       "--out", str(tmp_path / f"o{i}"), "-q", "--no-e2e", "-s", "int8", *flags])
        if error is None:
            assert res.exit_code == 0, res.output
        else:
            assert res.exit_code == EXIT_USAGE, res.output
            # (trusted: the program's own guard function fails first, with its own message)
            assert trust or error in res.output, res.output
            assert not (tmp_path / f"o{i}" / "results.json").exists()


@pytest.mark.parametrize("expr", ["__import__('os').getcwd()", "s0.__class__", "open('x')", "Symbol('s0').subs",
                                  "lambda: 1", "eval('1')"])
def test_unexpected_shape_expressions_are_refused(tmp_path, expr) -> None:
    """torch.export.load hands expr_str to sympy.sympify (eval): anything but plain shape arithmetic
    is refused before torch sees it."""
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(4))
    ep = torch.export.export(_model(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    torch.export.save(ep, tmp_path / "dyn.pt2")
    with zipfile.ZipFile(tmp_path / "dyn.pt2") as z:
        name = next(n for n in z.namelist() if "/models/" in n and n.endswith(".json"))
        doc = z.read(name).decode()
    edited = doc.replace('"expr_str": "', '"expr_str": ' + json.dumps(expr)[:-1] + " + ", 1)
    assert edited != doc
    _rewrite_zip(tmp_path / "dyn.pt2", tmp_path / "bad.pt2", {name: edited.encode()})
    with pytest.raises(LoadError, match="symbolic shape expression.*--trust-pickle"):
        load_model(tmp_path / "bad.pt2")


def test_opaque_object_constant_is_refused(hostile, tmp_path) -> None:
    """Constants torch.export.load would pass to pickle.loads are refused by name, before loading."""
    payload = pickle.dumps(Planted(hostile["target_pt2"]))
    bad = tmp_path / "opaque.pt2"
    _rewrite_zip(hostile["good_pt2"], bad, {}, add={"data/constants/opaque_obj_0": payload})
    with pytest.raises(LoadError, match="pickled Python object constant.*--trust-pickle"):
        load_model(bad)
    assert not hostile["target_pt2"].exists()


def test_results_loader_survives_hostile_json(tmp_path) -> None:
    """Results.load (the Python API) turns a recursion bomb or a binary file into ResultsError, one line."""
    from fp8probe.analysis.results import Results
    from fp8probe.report.schema import ResultsError

    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    for name in ("deep.json", "binary.json"):
        with pytest.raises(ResultsError) as info:
            Results.load(tmp_path / name)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# .pt2 fields from which torch builds and runs Python source (issue 11, items 1, 2, 4, 5)
# --------------------------------------------------------------------------------------------
def _edit_json(src: Path, dst: Path, suffix: str, edit) -> None:
    """Copy a .pt2, passing the JSON member ending with ``suffix`` through ``edit(doc) -> doc``."""
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        doc = json.loads(z.read(name))
    _rewrite_zip(src, dst, {name: json.dumps(edit(doc)).encode()})


def _replace_string(old: str, new: str):
    """An edit replacing every JSON string equal to ``old`` (a name) by ``new``."""
    return lambda doc: json.loads(json.dumps(doc).replace(json.dumps(old), json.dumps(new)))


def _exported(tmp_path: Path, name: str = "good.pt2") -> Path:
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(2))
    path = tmp_path / name
    torch.export.save(torch.export.export(_model(), (x,)), path)
    return path


def _load_and_run(path: Path, trust: bool) -> None:
    loaded = load_model(path, trust_pickle=trust)
    batch = loaded.batches[0]
    loaded.module(*batch.args, **batch.kwargs)


# Each case plants code that creates ./pwned (the test runs in tmp_path) when torch builds or runs
# the module; the control run with trust_pickle=True shows the plant is live (torch does run it).
TOUCH = "__import__('pathlib').Path('pwned').touch()"
NO_DOT_TOUCH = 'getattr(getattr(__import__("pathlib"),"Path")("pwned"),"touch")()'
CODE_CASES = {
    # ep.module() pastes guards_code into a function it exec's
    "guards_code": ("models/model.json", lambda d: {**d, "guards_code": [TOUCH + " is None"]}, "guard code"),
    # parameter FQNs are pasted into getattr(self, "<segment>") in the generated forward
    "parameter_fqn": (None, None, "module path"),
}


@pytest.mark.parametrize("case", sorted(CODE_CASES))
@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted-control"])
def test_pt2_source_injection(tmp_path, monkeypatch, case, trust) -> None:
    monkeypatch.chdir(tmp_path)
    good = _exported(tmp_path)
    bad = tmp_path / "bad.pt2"
    if case == "parameter_fqn":
        evil = f'2"),{NO_DOT_TOUCH},getattr(self,"2'
        _edit_json(good, tmp_path / "half.pt2", "models/model.json", _replace_string("2.bias", evil))
        _edit_json(tmp_path / "half.pt2", bad, "model_weights_config.json", _replace_string("2.bias", evil))
    else:
        member, edit, _ = CODE_CASES[case]
        _edit_json(good, bad, member, edit)
    if trust:
        with contextlib.suppress(Exception):
            _load_and_run(bad, trust=True)
        assert (tmp_path / "pwned").exists(), "control: the planted code should run when trusted"
        return
    with pytest.raises(LoadError, match=f"{CODE_CASES[case][2]}.*--trust-pickle"):
        _load_and_run(bad, trust=False)
    assert not (tmp_path / "pwned").exists()


def test_pt2_nested_dict_key_never_reaches_guard_source(tmp_path, monkeypatch) -> None:
    """A key of a nested dict input ends up in the guard function's error-message string; an untrusted
    program is built without the generated guard function (check_guards=False)."""
    monkeypatch.chdir(tmp_path)
    key = '"+str(__import__("pathlib").Path("pwned").touch())+"'

    class DictInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(IN_FEATURES, 4)

        def forward(self, x):
            return self.linear(x[key])

    path = tmp_path / "dict.pt2"
    torch.export.save(torch.export.export(DictInput(), ({key: torch.randn(3, IN_FEATURES)},)), path)
    _load_and_run(path, trust=False)
    assert not (tmp_path / "pwned").exists()
    _load_and_run(path, trust=True)  # control: torch's guard function runs it
    assert (tmp_path / "pwned").exists()


@pytest.mark.parametrize("field, evil, match", [
    ("placeholder", "input=" + TOUCH, "not a Python identifier"),
    ("node_name", "linear=" + TOUCH, "not a Python identifier"),
    ("forward_arg", "input=" + TOUCH, "not a Python identifier"),
    ("target", "builtins.exec", "call target"),
    ("stack_trace", 'File "x", line 1, in f\n  y\r' + TOUCH, "control characters"),
    ("as_string", "tanh'+" + TOUCH + "+'", "quotes"),
])
def test_pt2_names_must_be_what_torch_writes(tmp_path, monkeypatch, field, evil, match) -> None:
    """Every name torch.fx pastes into generated source must be an identifier / plain module path."""
    monkeypatch.chdir(tmp_path)
    good = _exported(tmp_path)

    def edit(doc):
        graph = doc["graph_module"]["graph"]
        if field == "placeholder":
            return _replace_string("p_0_weight", evil)(doc)
        if field == "node_name":
            graph["nodes"][0]["name"] = evil
        elif field == "forward_arg":
            doc["graph_module"]["signature"]["forward_arg_names"] = [evil]
        elif field == "target":
            graph["nodes"][1]["target"] = evil
        elif field == "stack_trace":
            graph["nodes"][0]["metadata"]["stack_trace"] = evil
        elif field == "as_string":
            graph["nodes"][1]["inputs"].append({"name": "approximate", "arg": {"as_string": evil}, "kind": 1})
        return doc

    _edit_json(good, tmp_path / "bad.pt2", "models/model.json", edit)
    with pytest.raises(LoadError, match=f"{match}.*--trust-pickle"):
        load_model(tmp_path / "bad.pt2")
    assert not (tmp_path / "pwned").exists()


def test_pt2_aotinductor_member_is_refused(tmp_path) -> None:
    """torch.export.load dlopens data/aotinductor/<model>/*.so: compiled code is refused untrusted."""
    bad = tmp_path / "aoti.pt2"
    _rewrite_zip(_exported(tmp_path), bad, {}, add={"data/aotinductor/model/model.so": b"\x7fELF" + bytes(60)})
    with pytest.raises(LoadError, match="AOTInductor.*--trust-pickle"):
        load_model(bad)


def test_opaque_object_constant_under_a_sub_path_is_refused(hostile, tmp_path) -> None:
    """torch decides by path_name.startswith("opaque_obj") (then pickle.loads), not by the member's
    last path component: "opaque_obj_d/blob" must be refused too (issue 11 item 2)."""
    target = hostile["target_pt2"]
    good = hostile["good_pt2"]
    bad = tmp_path / "opaque_sub.pt2"
    config = {"config": {"evil": {"path_name": "opaque_obj_d/blob", "is_param": False, "use_pickle": True,
                                  "tensor_meta": None}}}
    _rewrite_zip(good, bad, {"model_constants_config.json": json.dumps(config).encode()},
                 add={"data/constants/opaque_obj_d/blob": pickle.dumps(Planted(target))})
    with pytest.raises(LoadError, match="pickled Python object constant.*--trust-pickle"):
        load_model(bad)
    assert not target.exists()
    with contextlib.suppress(Exception):  # control: torch itself unpickles it
        load_model(bad, trust_pickle=True)
    assert target.exists()


def _with_expr(tmp_path: Path, expr: str) -> Path:
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(4))
    ep = torch.export.export(_model(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=64)},))
    torch.export.save(ep, tmp_path / "dyn.pt2")
    with zipfile.ZipFile(tmp_path / "dyn.pt2") as z:
        name = next(n for n in z.namelist() if "/models/" in n and n.endswith(".json"))
        doc = z.read(name).decode()
    edited = doc.replace('"expr_str": "', '"expr_str": ' + json.dumps(expr)[:-1] + " + ", 1)
    assert edited != doc
    _rewrite_zip(tmp_path / "dyn.pt2", tmp_path / "bad.pt2", {name: edited.encode()})
    return tmp_path / "bad.pt2"


@pytest.mark.parametrize("expr", ["9**9**9**9", "Pow(9, Pow(9, Pow(9, 9)))", "9^9^9^9", "(2**64)**64**64",
                                  "Integer(" + "9" * 5000 + ")", "1" + "+1" * 400, "LShift(1, 10**12)"])
def test_shape_expression_bombs_are_refused_quickly(tmp_path, expr) -> None:
    """sympy.sympify evaluates integer powers eagerly: 9**9**9**9 never returns (issue 11 item 4), and a
    C-level bigint power cannot be interrupted, so the CLI runs in a subprocess with a time limit."""
    import subprocess
    import sys

    bad = _with_expr(tmp_path, expr)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        res = subprocess.run([sys.executable, "-m", "fp8probe", "analyze", str(bad), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a .pt2 with expr_str {expr[:40]!r} did not return within 120 s")
    assert res.returncode == EXIT_USAGE, res.stderr
    assert "symbolic shape expression" in res.stderr and "--trust-pickle" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_benign_programs_with_guards_and_powers_load(tmp_path) -> None:
    """What torch.export writes for equal dynamic dims (guards_code "L['x'].size()[1] == L['x'].size()[0]",
    expr_str "Pow(Symbol('s27', ...), Integer(2))") and for attention, conv and string kwargs loads and runs."""

    class Square(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x.reshape(-1, 4)).sum() + x.reshape(-1).sum()

    dim = torch.export.Dim("b", min=2, max=64)
    ep = torch.export.export(Square(), (torch.randn(4, 4, 4),), dynamic_shapes=({0: dim, 1: dim},))
    torch.export.save(ep, tmp_path / "square.pt2")
    with zipfile.ZipFile(tmp_path / "square.pt2") as z:
        text = next(z.read(n).decode() for n in z.namelist() if n.endswith("models/model.json"))
    assert '"guards_code": ["' in text and "Pow(" in text
    loaded = load_model(tmp_path / "square.pt2")
    assert torch.isfinite(loaded.module(torch.randn(3, 3, 4)))
    with pytest.raises(Exception, match="equal"):  # the input check still holds without the guard function
        loaded.module(torch.randn(3, 2, 4))

    class Rich(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.blocks = nn.ModuleDict({"conv-1": nn.Linear(8, 8)})

        def forward(self, h, *, mode: str = "tanh"):
            h, _ = self.att(h, h, h)
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            return torch.nn.functional.gelu(self.blocks["conv-1"](h), approximate=mode)

    torch.export.save(torch.export.export(Rich(), (torch.randn(2, 5, 8),), {"mode": "tanh"}), tmp_path / "rich.pt2")
    loaded = load_model(tmp_path / "rich.pt2")
    assert loaded.module(*loaded.batches[0].args, **loaded.batches[0].kwargs).shape == (2, 5, 8)


def test_zip_bomb_is_refused_before_inflating(tmp_path) -> None:
    """A model.json that inflates 1000x is refused from the zip directory alone (issue 11 item 5)."""
    good = _exported(tmp_path)
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                data = data[:-1] + b" " * (32 * 2**20) + b"}"  # still valid JSON, 32 MiB of spaces
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                zout.writestr(info, data)
    assert bomb.stat().st_size < 2**20
    for trust in (False, True):
        with pytest.raises(LoadError, match="zip bomb"):
            load_model(bomb, trust_pickle=trust)


def test_json_size_cap_applies_to_untrusted_files_only(tmp_path, monkeypatch) -> None:
    from fp8probe.analysis import export_archive

    good = _exported(tmp_path)
    monkeypatch.setattr(export_archive, "MAX_JSON_BYTES", 1000)
    with pytest.raises(LoadError, match="allowed for JSON.*--trust-pickle"):
        load_model(good)
    assert load_model(good, trust_pickle=True).kind == "export"


def test_deeply_nested_json_is_one_line_error(tmp_path) -> None:
    good = _exported(tmp_path)
    bad = tmp_path / "deep.pt2"
    _rewrite_zip(good, bad, {"models/model.json": b"[" * 200_000 + b"]" * 200_000})
    res = _cli("analyze", str(bad), "--out", str(tmp_path / "out"))
    assert res.exit_code == EXIT_USAGE and "Traceback" not in res.output
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1


def test_huggingface_pickled_weights_refusal_names_trust_pickle(tmp_path) -> None:
    """A Hugging Face directory whose pytorch_model.bin needs the full unpickler: refused with a pointer to
    --trust-pickle (the message used to be torch's, with ANSI escapes and no flag; issue 11 item 14)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "hf")
    for weights in (tmp_path / "hf").glob("*.safetensors"):
        weights.unlink()
    state = model.state_dict()
    state["lm_head.weight"] = Planted(tmp_path / "pwned-hf")
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    res = _cli("analyze", str(tmp_path / "hf"), "--out", str(tmp_path / "out"))
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == EXIT_USAGE and len(lines) == 1, res.output
    assert "--trust-pickle" in lines[0] and "\x1b" not in res.stderr
    assert not (tmp_path / "pwned-hf").exists()


def test_many_small_bombs_are_refused_by_the_total(tmp_path) -> None:
    """100 JSON members each inflating to just under the per-member cap: the archive total is capped too."""
    bomb = tmp_path / "many.pt2"
    member = b"[" + b" " * (2**20 - 10) + b"]"
    _rewrite_zip(_exported(tmp_path), bomb, {}, add={f"extra/x{i}.json": member for i in range(100)},
                 compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(LoadError, match="in total.*zip bomb"):
        load_model(bomb)
