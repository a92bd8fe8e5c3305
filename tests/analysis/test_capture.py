"""Capture: names from module paths in eager and exported models, reused modules, gradients from the real backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fp8probe.analysis.capture import capture_batch, is_exported_graph
from fp8probe.analysis.loading import Batch
from fp8probe.analysis.pipeline import analyze


class Shared(nn.Module):
    """The same Linear applied twice, plus a Linear whose output never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.dead = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dead(x)
        return self.lin(torch.relu(self.lin(x)))


def _collect(model, batch: Batch) -> list:
    calls = []
    capture_batch(model, batch, calls.append)
    return calls


def test_gradients_match_autograd_and_reuse_is_named() -> None:
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 5, 8)
    calls = {c.name: c for c in _collect(model, Batch((x,), {}))}
    # Streaming: calls arrive as their gradients do (last first), then the one no gradient reached;
    # ``index`` keeps the forward order.
    assert list(calls) == ["lin#1", "lin", "dead"]
    assert sorted(calls, key=lambda n: calls[n].index) == ["dead", "lin", "lin#1"]
    assert calls["dead"].grad_output is None  # not on the path to the loss: fprop only
    # Surrogate loss mean(y²): dL/dy = 2y/numel for the second application.
    y = model(x)
    expected = (2 * y / y.numel()).reshape(-1, 8)
    torch.testing.assert_close(calls["lin#1"].grad_output, expected, rtol=1e-6, atol=1e-9)
    assert calls["lin"].activation.shape == (10, 8) and torch.equal(calls["lin"].activation, x.reshape(10, 8))
    # Parameters are left as they were: no .grad written, requires_grad flags restored.
    assert all(p.grad is None for p in model.parameters())
    res = analyze(model, Batch((x,), {}), "global")
    dead = res.tables["gemm"][res.tables["gemm"]["layer"] == "dead"]
    assert dead["gemm"].tolist() == ["fprop"]


def test_exported_names_equal_eager(tiny_model, tiny_batches) -> None:
    tokens, targets = tiny_batches[0]
    ep = torch.export.export(tiny_model, (tokens, targets))
    gm = ep.module()
    assert is_exported_graph(gm) and not is_exported_graph(tiny_model)
    eager = _collect(tiny_model, Batch((tokens, targets), {}))
    exported = _collect(gm, Batch((tokens,), {"targets": targets}))  # kwargs are bound to the signature
    assert [c.name for c in eager] == [c.name for c in exported]
    for a, b in zip(eager, exported):
        assert torch.equal(a.activation, b.activation) and torch.equal(a.grad_output, b.grad_output), a.name


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Checkpointed(nn.Module):
    """Two blocks under torch.utils.checkpoint (reentrant or not, or none), a head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = block(x) if self.mode == "none" else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_is_analysed_as_the_model_without_it(mode: str) -> None:
    """Reentrant checkpointing left its GEMMs without dgrad/wgrad rows (their first forward runs with autograd
    off), and the end-to-end passes stopped on non-reentrant checkpointing (CheckpointError: the recipes save
    other tensors than the model's ops)."""
    import torch.utils.checkpoint as ckpt

    torch.manual_seed(0)
    plain = _Checkpointed("none")
    model = _Checkpointed(mode)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 16)
    want = analyze(plain, [x], "global,int8")
    got = analyze(model, [x], "global,int8")
    for table in ("gemm", "e2e"):
        assert got.tables[table].drop(columns="seconds", errors="ignore").equals(
            want.tables[table].drop(columns="seconds", errors="ignore")), table
    # 5 GEMMs x 2 recipes x 3, less the first layer's dgrad (its input is the data: training computes none)
    assert len(got.tables["gemm"]) == 5 * 2 * 3 - 2
    assert not got.metadata["loss"].get("no_gradient")
    assert ckpt.CheckpointFunction.__name__ == "CheckpointFunction"  # put back after the analysis
    out = model(x.requires_grad_())
    out.sum().backward()  # and the model still checkpoints as before
    assert model.head.weight.grad is not None


class _MyMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class _CustomFn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_MyMatmul.apply(x, self.proj.weight))


def test_gemms_inside_a_custom_function_are_named_as_fprop_only() -> None:
    """Their dgrad/wgrad rows were missing with no word, and the coverage read 100 %."""
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match=r"1 GEMM\(s\) ran with autograd off .*: proj$"):
        res = analyze(_CustomFn(), [torch.randn(4, 16)], "global", e2e=False)
    assert "custom autograd.Function" in res.metadata["loss"]["no_gradient"]
    assert set(res.tables["gemm"].query("layer == 'proj'")["gemm"]) == {"fprop"}
    assert set(res.tables["gemm"].query("layer == 'head'")["gemm"]) == {"fprop", "dgrad", "wgrad"}


class PartlyFrozen(nn.Module):
    """A frozen stem, a trained adapter, frozen layers after it (nn.Linear, and a weight used through addmm as a
    view, weight.t()) and a trained head: LoRA-like, as fine-tuning leaves a model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.adapter = nn.Linear(16, 16)
        self.base = nn.Linear(16, 24)
        self.proj = nn.Parameter(torch.randn(24, 24) / 5)
        self.head = nn.Linear(24, 6)
        for frozen in (self.stem, self.base):
            frozen.requires_grad_(False)
        self.proj.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.base(self.adapter(torch.relu(self.stem(x)))))
        h = torch.addmm(torch.zeros(24), h.reshape(-1, 24), self.proj.t()).reshape(h.shape)
        return self.head(h)


def test_frozen_weights_have_no_wgrad_and_are_named(tmp_path) -> None:
    """Frozen parameters were made to require grad for the capture and analysed as if they trained: wgrad rows
    (and a frozen stem's dgrad) described GEMMs training never runs (a frozen backbone, LoRA's base weights).
    A frozen layer after a trained one keeps fprop and dgrad (the gradient flows through it to the adapter);
    one with nothing trained before it gets no gradient at all, as in training; a model frozen throughout
    trains all (a model saved for inference)."""
    import json

    from fp8probe.analysis.sweeps import sweep_blocksize
    from fp8probe.report.render import render_report

    torch.manual_seed(40)
    model = PartlyFrozen()
    x = torch.randn(2, 5, 16)
    calls = {c.name: c for c in _collect(model, Batch((x,), {}))}
    assert {n: c.frozen for n, c in calls.items()} == \
        {"stem": True, "adapter": False, "base": True, "proj": True, "head": False}
    assert calls["stem"].grad_output is None and calls["base"].grad_output is not None

    res = analyze(model, [x], strategy=["global", "int8"], e2e=False)
    rows = {(r["layer"], r["gemm"]) for r in res.tables["gemm"].to_dict("records") if r["strategy"] == "global"}
    # (the adapter's input comes from the frozen stem only: training computes no gradient for it, no dgrad)
    assert rows == {("stem", "fprop"), ("adapter", "fprop"), ("adapter", "wgrad"),
                    ("base", "fprop"), ("base", "dgrad"), ("proj", "fprop"), ("proj", "dgrad"),
                    ("head", "fprop"), ("head", "dgrad"), ("head", "wgrad")}
    assert dict(zip(res.tables["layers"]["layer"], res.tables["layers"]["frozen"])) == \
        {"stem": True, "adapter": False, "base": True, "proj": True, "head": False}
    assert res.metadata["frozen_layers"] == ["stem", "base", "proj"]
    assert res.metadata["no_dgrad_layers"] == ["adapter"] and res.metadata["no_wgrad_layers"] == []
    paths = res.save(tmp_path / "out")
    html = render_report(json.loads(paths["json"].read_text()), tmp_path / "r.html", draw=False).read_text()
    assert "No wgrad numbers for frozen weights: 3 layer(s) have frozen weights" in html and "stem, base, proj" in html
    # the heat map's wgrad cells of the 3 frozen layers and the stem's dgrad cells, for 2 strategies
    assert html.count(">frozen</td>") == 8
    assert html.count(">not run</td>") == 2 and "training runs no dgrad for 1 layer(s)" in html
    sweep = sweep_blocksize(model, [x], blocksizes=[64, 256], e2e=False)
    targets = sweep.tables["blocksize_sweep"].groupby("layer")["target"].agg(set)
    assert "wgrad" not in targets["base"] and "wgrad" in targets["head"] and "dgrad" in targets["base"]
    assert "dgrad" not in targets["stem"] and "dgrad" not in targets["adapter"] and "wgrad" in targets["adapter"]
    assert sweep.metadata["frozen_layers"] == ["stem", "base", "proj"]
    assert sweep.metadata["no_dgrad_layers"] == ["adapter"]

    model.requires_grad_(False)  # frozen throughout (saved for inference): training would update every weight
    calls = _collect(model, Batch((x,), {}))
    assert not any(c.frozen for c in calls) and all(c.grad_output is not None for c in calls)
    assert [c.name for c in calls if not c.runs("dgrad")] == ["stem"]  # (its input is the data)
    assert not any(p.requires_grad for p in model.parameters())


class _OnFeatures(nn.Module):
    """An MLP on input features (its first layer's input is the data) with a fixed mixing matrix, a buffer,
    applied by matmul: training computes no gradient for either, so no dgrad / wgrad GEMM runs for them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 5)
        self.register_buffer("mix", torch.randn(16, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) @ self.mix.t())


def test_gemms_training_does_not_run_are_not_analysed(tmp_path, monkeypatch) -> None:
    """The first layer's dgrad was analysed (and could decide the verdict) although training never computes the
    gradient of the input data; a buffer's "wgrad" likewise. Training's own autograd is the rule: the rows are
    exactly the GEMMs a backward pass runs, their float64 references are not computed, and the run names them."""
    import json

    from click.testing import CliRunner

    from fp8probe.analysis import strategies
    from fp8probe.analysis.sweeps import sweep_blocksize
    from fp8probe.cli import cli
    from fp8probe.report.render import render_report

    torch.manual_seed(41)
    model, x = _OnFeatures(), torch.randn(3, 7, 12)
    calls = {c.name: c for c in _collect(model, Batch((x,), {}))}
    assert {n: c.grads for n, c in calls.items()} == \
        {"fc1": (False, True), "#matmul": (True, False), "fc2": (True, True)}

    made = []
    real = strategies.reference_gemms
    monkeypatch.setattr("fp8probe.analysis.pipeline.reference_gemms",
                        lambda *a, **k: made.append(sorted(r := real(*a, **k))) or r)
    res = analyze(model, [x], strategy=["global", "mxfp8"], e2e=False)
    rows = {(r["layer"], r["gemm"]) for r in res.tables["gemm"].to_dict("records") if r["strategy"] == "mxfp8"}
    assert rows == {("fc1", "fprop"), ("fc1", "wgrad"), ("#matmul", "fprop"), ("#matmul", "dgrad"),
                    ("fc2", "fprop"), ("fc2", "dgrad"), ("fc2", "wgrad")}
    assert sorted(made) == [["dgrad", "fprop"], ["dgrad", "fprop", "wgrad"], ["fprop", "wgrad"]]
    assert res.metadata["no_dgrad_layers"] == ["fc1"] and res.metadata["no_wgrad_layers"] == ["#matmul"]
    assert res.metadata["frozen_layers"] == []
    layers = res.tables["layers"].set_index("layer")
    assert layers["no_dgrad"].to_dict() == {"fc1": True, "#matmul": False, "fc2": False}
    assert layers["no_wgrad"].to_dict() == {"fc1": False, "#matmul": True, "fc2": False}

    paths = res.save(tmp_path / "out")
    html = render_report(json.loads(paths["json"].read_text()), tmp_path / "r.html", draw=False).read_text()
    assert html.count(">not run</td>") == 4  # fc1's dgrad and #matmul's wgrad, 2 recipes
    assert "training runs no dgrad for 1 layer(s) whose input needs no gradient" in html
    assert "no wgrad for 1 GEMM(s) whose second operand needs no gradient" in html

    sweep = sweep_blocksize(model, [x], blocksizes=[64], e2e=False)
    targets = sweep.tables["blocksize_sweep"].groupby("layer")["target"].agg(set)
    assert "dgrad" not in targets["fc1"] and "wgrad" in targets["fc1"]
    assert "wgrad" not in targets["#matmul"] and "dgrad" in targets["#matmul"]
    assert sweep.metadata["no_dgrad_layers"] == ["fc1"] and sweep.metadata["no_wgrad_layers"] == ["#matmul"]

    torch.save(model, tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")
    out = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m.pt"), "--inputs", str(tmp_path / "x.pt"),
                                    "--trust-pickle", "--strategy", "global", "--no-e2e",
                                    "--out", str(tmp_path / "cli")])
    assert out.exit_code == 0, out.output
    assert "note: training runs no dgrad for 1 layer(s) whose input needs no gradient" in out.output
    assert ": fc1; and no wgrad for 1 GEMM(s)" in out.output


def test_batchnorm_at_its_initial_statistics_is_named(tmp_path) -> None:
    """Every loaded model runs in eval mode: a BatchNorm layer that never saw a batch (a freshly initialised model)
    then normalises nothing, and the GEMM after it saw activations ~7x larger than training's, with LLM.int8()
    outlier columns training never has, and nothing said so. The run names such layers (metadata, CLI, report);
    trained statistics, a BatchNorm without running statistics or one in train mode (the Python API) are fine."""
    import json

    from click.testing import CliRunner

    from fp8probe.cli import cli
    from fp8probe.report.render import render_report

    (tmp_path / "bnmodel.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build(trained=False):\n"
        "    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))\n"
        "    x = torch.randn(16, 32) * 5 + 20\n"
        "    if trained:\n"
        "        model.train()\n"
        "        with torch.no_grad():\n"
        "            for _ in range(20):\n"
        "                model(x)\n"
        "    return model, [x]\n\n"
        "def trained():\n"
        "    return build(True)\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["analyze", f"{tmp_path / 'bnmodel.py'}:build", "-s", "int8", "--no-e2e",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.stderr.splitlines() if "initial running statistics" in ln]
    assert len(warning) == 1 and warning[0].startswith("warning: 1 BatchNorm layer(s)") and ": 1." in warning[0]
    assert "eval mode" in warning[0]
    doc = json.loads((out / "results.json").read_text())
    assert doc["metadata"]["untrained_batchnorm"] == ["1"]
    assert "initial running statistics (mean 0, variance 1): 1." in (out / "index.html").read_text()
    render_report(doc, tmp_path / "again.html")  # (the report command, from the JSON)
    assert "initial running statistics" in (tmp_path / "again.html").read_text()
    res = CliRunner().invoke(cli, ["analyze", f"{tmp_path / 'bnmodel.py'}:trained", "-s", "int8", "--no-e2e",
                                   "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    assert "BatchNorm" not in res.stderr
    assert "untrained_batchnorm" not in json.loads((tmp_path / "o2" / "results.json").read_text())["metadata"]
    torch.manual_seed(1)
    no_stats = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 4)).eval()
    assert "untrained_batchnorm" not in analyze(no_stats, [torch.randn(4, 8)], "int8", e2e=False).metadata
    fresh = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    assert "untrained_batchnorm" not in analyze(fresh, [torch.randn(4, 8)], "int8", e2e=False).metadata  # train mode
    fresh = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()  # (that run updated them)
    assert analyze(fresh, [torch.randn(4, 8)], "int8", e2e=False).metadata["untrained_batchnorm"] == ["1"]
    # a program exported in eval mode: its batch-norm nodes' buffers
    from fp8probe.analysis.loading import from_exported_program

    x = torch.randn(4, 8)
    program = from_exported_program(torch.export.export(fresh, (x,)))
    assert analyze(program, [x], "int8", e2e=False).metadata["untrained_batchnorm"] == ["1"]
    trained = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    trained(torch.randn(6, 8))  # (train mode: the statistics move)
    program = from_exported_program(torch.export.export(trained.eval(), (x,)))
    assert "untrained_batchnorm" not in analyze(program, [x], "int8", e2e=False).metadata


def test_train_mode_runs_dropout_and_batch_statistics(tmp_path) -> None:
    """--train-mode (analyze and the sweeps): the loaded model runs in train(): dropout on, seeded batch by batch
    (two runs give the same numbers), BatchNorm on the batch's statistics (the GEMM after it sees normalised
    activations: no LLM.int8() outlier columns, where eval mode with initial statistics had most columns);
    metadata and report say so; a .pt2 program is refused, a weights-only run notes it had no effect."""
    import json

    from click.testing import CliRunner

    from fp8probe.cli import cli

    (tmp_path / "dropmodel.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Dropout(0.3), nn.Linear(64, 8))\n"
        "    return model, [torch.randn(16, 32) * 5 + 20, torch.randn(16, 32) * 5 + 20]\n")
    src = f"{tmp_path / 'dropmodel.py'}:build"

    def run(*extra: str, out: str) -> dict:
        res = CliRunner().invoke(cli, ["analyze", src, "-s", "int8", "--out", str(tmp_path / out), *extra])
        assert res.exit_code == 0, res.output
        return json.loads((tmp_path / out / "results.json").read_text())

    train, again, evald = run("--train-mode", out="t1"), run("--train-mode", out="t2"), run(out="e")
    assert train["metadata"]["train_mode"] is True and "train_mode" not in evald["metadata"]
    assert "untrained_batchnorm" not in train["metadata"] and evald["metadata"]["untrained_batchnorm"] == ["1"]
    assert train["tables"]["gemm"] == again["tables"]["gemm"] and train["tables"]["e2e"] == again["tables"]["e2e"]
    outliers = {r["layer"]: r["n_outlier_cols"] for r in train["tables"]["outliers"]}
    assert outliers["3"] == 0 and {r["layer"]: r["n_outlier_cols"] for r in evald["tables"]["outliers"]}["3"] > 32
    assert "<dt>model mode</dt><dd>train (dropout on" in (tmp_path / "t1" / "index.html").read_text()
    assert "eval (as for inference)" in (tmp_path / "e" / "index.html").read_text()
    res = CliRunner().invoke(cli, ["sweep-threshold", src, "--thresholds", "0,6", "--train-mode", "--no-e2e",
                                   "--out", str(tmp_path / "sw"), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model_mode"] == "train"
    sweep = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert sweep["metadata"]["train_mode"] is True
    # a report of one mode only, and a compare gate that names the mode change
    from fp8probe.report.compare import compare_results
    from fp8probe.report.merge import ResultsError, merge_results

    assert merge_results([train, sweep])["metadata"]["train_mode"] is True
    with pytest.raises(ResultsError, match="one model mode, got eval mode .* and train mode"):
        merge_results([evald, sweep])
    gate = compare_results(evald, train)
    assert not gate["passed"] and any("model mode eval → train" in v["detail"] for v in gate["violations"])
    assert compare_results(train, again)["passed"]
    # a .pt2 program runs as it was traced: --train-mode is refused, and a program exported from train() says so
    model = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(4, 8)
    torch.export.save(torch.export.export(model.eval(), (x,)), tmp_path / "m.pt2")
    torch.export.save(torch.export.export(model.train(), (x,)), tmp_path / "t.pt2")
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m.pt2"), "--train-mode", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "--train-mode" in res.stderr and "exported" in res.stderr
    for pt2, mode in (("m.pt2", None), ("t.pt2", True)):
        res = CliRunner().invoke(cli, ["analyze", str(tmp_path / pt2), "-s", "int8", "--no-e2e", "--out",
                                       str(tmp_path / f"o-{pt2}")])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / f"o-{pt2}" / "results.json").read_text())["metadata"].get("train_mode") is mode
    # BatchNorm in training mode needs more than one row per batch: said so, not only "check the inputs"
    torch.save(torch.randn(1, 32), tmp_path / "one.pt")
    res = CliRunner().invoke(cli, ["analyze", src, "--inputs", str(tmp_path / "one.pt"), "--train-mode", "--out",
                                   str(tmp_path / "b1")])
    assert res.exit_code == 2 and "use batches of more than one row, or run without --train-mode" in res.stderr
    # weights only: no model run
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "-s", "int8", "--train-mode",
                                   "--out", str(tmp_path / "w")])
    assert res.exit_code == 0 and "--train-mode" in res.stderr and "no model was run" in res.stderr
