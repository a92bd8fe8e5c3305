"""Hostile files: a pickle whose loading would create a file is never unpickled without --trust-pickle, on every loading path."""
from __future__ import annotations

import io
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


def _rewrite_zip(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    """Copy a zip archive, replacing the members whose name ends with a key of ``replace``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info, data)


@pytest.fixture()
def hostile(tmp_path: Path) -> dict[str, Path]:
    """Files whose loading would create tmp_path/'pwned-<kind>' if anything unpickled them."""
    x = torch.randn(3, IN_FEATURES, generator=torch.Generator().manual_seed(2))
    good_pt2 = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_model(), (x,)), good_pt2)
    files = {"good_pt2": good_pt2, "good_inputs": tmp_path / "inputs.pt"}
    torch.save([x], files["good_inputs"])
    for kind in ("model", "inputs", "pt2", "pt2_weight", "state_dict"):
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


def test_library_loaders_refuse_too(hostile) -> None:
    """load_model / load_inputs (the Python API) have the same default as the CLI."""
    for call, target in ((lambda: load_model(hostile["model"]), "target_model"),
                         (lambda: load_model(hostile["pt2"]), "target_pt2"),
                         (lambda: load_model(hostile["pt2_weight"]), "target_pt2_weight"),
                         (lambda: load_inputs(hostile["inputs"]), "target_inputs")):
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
    with zipfile.ZipFile(hostile["good_pt2"]) as z:
        root = z.namelist()[0].split("/", 1)[0]
    bad = tmp_path / "opaque.pt2"
    _rewrite_zip(hostile["good_pt2"], bad, {})
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr(f"{root}/data/constants/opaque_obj_0", payload)
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
