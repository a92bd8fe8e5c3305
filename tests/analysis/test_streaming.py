"""Forward-only capture (--no-grad) and block streaming from checkpoints (--stream): same numbers as in memory, bounded memory, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fp8probe.analysis.capture import FORWARD_ONLY
from fp8probe.analysis.loading import Batch, LoadError, load_model
from fp8probe.analysis.pipeline import E2E_OFF_NO_GRAD, analyze
from fp8probe.analysis.streaming import E2E_OFF, is_streamed, load_streamed
from fp8probe.analysis.streaming import FORWARD_ONLY as STREAM_FORWARD_ONLY
from fp8probe.cli import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FACTORY = f"{HERE / 'stream_factory.py'}:build"
sys.path.insert(0, str(HERE))
from stream_factory import SIZE_ENV, Tower, build  # noqa: E402

# The memory test's model: 40 blocks of width 256 (2.0 MiB each) = 80 MiB of float32 weights, and
# twice the budget its streamed analysis gets. One block's analysis (its weights, the float64 copies
# of the largest layer, 1024 x 256, and the quantised operands) peaked between 24 and 32 MiB.
MEM_SIZE = "256,40"


def _tables(results) -> dict:
    return results.to_json()["tables"]


def _batches(width: int, n: int = 2) -> list[torch.Tensor]:
    return [torch.randn(2, 8, width, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.fixture()
def tower(tmp_path) -> tuple[Tower, Path]:
    model = build()
    path = tmp_path / "tower.safetensors"
    save_file(model.state_dict(), path)
    return model, path


def test_no_grad_captures_fprop_only_and_says_why(tower) -> None:
    model, _ = tower
    res = analyze(model, _batches(32), "global,int8", grad=False)
    gemm = res.tables["gemm"]
    assert set(gemm["gemm"]) == {"fprop"} and len(gemm) == 7 * 2
    assert set(res.tables["tensors"]["tensor"]) == {"activation", "weight"}
    assert res.metadata["loss"]["kind"] == FORWARD_ONLY.kind and "--no-grad" in res.metadata["loss"]["no_gradient"]
    assert res.metadata["e2e_off"] == E2E_OFF_NO_GRAD and "e2e" not in res.tables
    # fprop numbers are those of the forward + backward run: the same operands, the same replay
    full = analyze(model, _batches(32), "global,int8", e2e=False)
    fprop = full.tables["gemm"][full.tables["gemm"]["gemm"] == "fprop"].reset_index(drop=True)
    assert gemm.drop(columns="quantized").equals(fprop.drop(columns="quantized"))
    with pytest.raises(ValueError, match="expected steps 0 with a forward-only run"):
        analyze(model, _batches(32), "global", grad=False, steps=1)


def test_no_grad_holds_one_layer_at_a_time(tower) -> None:
    """Each GEMM is handed over while the forward runs (not held until a backward that never comes)."""
    from fp8probe.analysis.capture import capture_batch

    model, _ = tower
    live = []

    def sink(call) -> None:
        assert call.grad_output is None
        live.append(call.name)

    def probe(module, args) -> None:  # the calls of earlier blocks are already delivered when a block starts
        live.append(f"enter {module.fc1.in_features}")

    model.blocks[1].register_forward_pre_hook(probe)
    info = capture_batch(model, Batch((_batches(32)[0],), {}), sink, grad=False)
    assert info == FORWARD_ONLY
    assert live.index("enter 32") == 2 and live[:2] == ["blocks.0.fc1", "blocks.0.fc2"]


def test_streamed_factory_checkpoint_equals_in_memory(tower) -> None:
    model, path = tower
    loaded = load_streamed(path, factory=FACTORY)
    assert is_streamed(loaded) and all(p.device.type == "meta" for p in loaded.module.parameters())
    res = analyze(loaded, _batches(32), "global,int8,ocp-blockwise")
    ref = analyze(model, _batches(32), "global,int8,ocp-blockwise", grad=False)
    assert _tables(res) == _tables(ref)
    assert res.metadata["e2e_off"] == E2E_OFF
    meta = res.metadata["streaming"]
    assert meta["units"] == 4 and meta["unit_loads"] == 8  # 3 blocks + the head, twice (2 batches)
    assert meta["peak_unit_bytes"] == sum(p.numel() * 4 for p in model.blocks[0].parameters())
    assert all(p.device.type == "meta" for p in loaded.module.parameters())  # nothing left loaded


def test_streamed_hugging_face_directory_equals_in_memory(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    ids = [{"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    res = analyze(load_streamed(tmp_path / "llama"), ids, "global")
    ref = analyze(load_model(tmp_path / "llama"), ids, "global", grad=False)
    assert _tables(res) == _tables(ref)
    names = res.tables["layers"]["layer"].tolist()
    # rotary frequencies (a non-persistent buffer) survived; the tied LM head loaded from the embedding
    assert "model.layers.1.self_attn#qk" in names and names[-1] == "lm_head"


def test_streamed_checkpoint_that_does_not_fit_is_one_error(tower, tmp_path) -> None:
    model, _ = tower
    state = model.state_dict()
    state.pop("head.bias")
    state["blocks.0.fc1.weight"] = state["blocks.0.fc1.weight"][:, :16].contiguous()
    state["extra"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(LoadError, match=r"do not fit Tower: 1 missing weight\(s\) \(head.bias\); 1 weight\(s\) of "
                                        r"another shape .*blocks.0.fc1.weight \[128, 16\].*; 1 unexpected weight\(s\) "
                                        r"\(extra\)"):
        load_streamed(bad, factory=FACTORY)
    with pytest.raises(LoadError, match="needs --factory"):
        load_streamed(bad)


def _token_batches(vocab: int = 48, n: int = 2) -> list[torch.Tensor]:
    return [torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_a_tied_model_streams_from_either_checkpoint_layout(tmp_path) -> None:
    """nanoGPT-style tying: torch.save(model.state_dict()) holds both names of the tied weight, and --stream refused
    it ('1 unexpected weight(s) (head.weight)'); safetensors' save_model keeps one name (that streamed). Both stream,
    with the in-memory tables; two different tensors under the two names are refused."""
    from safetensors.torch import save_model

    from stream_factory import build_tied

    model = build_tied()
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    save_model(model, str(tmp_path / "tied.safetensors"))
    ref = _tables(analyze(model, _token_batches(), "global,int8", grad=False))
    factory = f"{HERE / 'stream_factory.py'}:build_tied"
    for name in ("tied.pt", "tied.safetensors"):
        assert _tables(analyze(load_streamed(tmp_path / name, factory=factory), _token_batches(), "global,int8")) == ref
    state = dict(model.state_dict())
    state["head.weight"] = state["embed.weight"] + 1  # a copy that is not the tied weight
    save_file(state, tmp_path / "untied.safetensors")
    with pytest.raises(LoadError, match="holds different tensors under embed.weight and head.weight, which TiedLM "
                                        r"ties \(one Parameter\)"):
        load_streamed(tmp_path / "untied.safetensors", factory=factory)
    state.pop("head.weight")
    state.pop("embed.weight")  # neither name: a genuinely missing weight
    save_file(state, tmp_path / "none.safetensors")
    with pytest.raises(LoadError, match=r"1 missing weight\(s\) \(embed.weight\)"):
        load_streamed(tmp_path / "none.safetensors", factory=factory)


def test_a_legacy_torch_save_state_dict_streams_and_says_it_is_read_whole(tower, tmp_path) -> None:
    """--stream refused torch.save(sd, _use_new_zipfile_serialization=False) ('holds no checkpoint --stream can read:
    expected ... a torch.save'd state_dict'). torch cannot map that format, so it is read whole (weights-only
    unpickler), with the in-memory tables, and the CLI says what that costs."""
    model, _ = tower
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    ref = _tables(analyze(model, _batches(32), "global", grad=False))
    assert _tables(analyze(load_streamed(legacy, factory=FACTORY), _batches(32), "global")) == ref
    inputs = tmp_path / "x.pt"
    torch.save(_batches(32), inputs)
    run = CliRunner().invoke(cli, ["analyze", str(legacy), "--stream", "--factory", FACTORY, "--inputs", str(inputs),
                                   "--out", str(tmp_path / "s"), "--no-html", "-q"])
    assert run.exit_code == 0, run.output
    assert "legacy.pt is in the legacy (non-zip) torch.save format, which cannot be memory-mapped" in run.stderr


def test_a_parameter_used_outside_its_unit_is_named_not_blamed_on_the_inputs(tmp_path) -> None:
    """The output projection reads blocks.0.fc2.weight outside block 0's forward, where --stream holds it on the
    meta device: the run failed with 'the model failed on the inputs: NotImplementedError: ... Meta tensors'. Now one
    line names the parameter and its unit and says to run without --stream (which works)."""
    from stream_factory import build_cross_use

    model = build_cross_use()
    save_file(model.state_dict(), tmp_path / "cross.safetensors")
    factory = f"{HERE / 'stream_factory.py'}:build_cross_use"
    message = (r"--stream cannot run CrossUse: blocks.0.fc2.weight, a parameter of unit blocks.0, was used outside "
               r"that unit's forward \(by t\), .* run without --stream")
    with pytest.raises(LoadError, match=message):
        analyze(load_streamed(tmp_path / "cross.safetensors", factory=factory), _batches(32), "global")
    assert len(analyze(model, _batches(32), "global", grad=False).tables["layers"]) == 5
    inputs = tmp_path / "x.pt"
    torch.save(_batches(32), inputs)
    run = CliRunner().invoke(cli, ["analyze", str(tmp_path / "cross.safetensors"), "--stream", "--factory", factory,
                                   "--inputs", str(inputs), "--out", str(tmp_path / "s"), "-q"])
    assert run.exit_code == 2 and len(run.stderr.strip().splitlines()) == 1, run.output
    assert "a parameter of unit blocks.0, was used outside that unit's forward" in run.stderr
    assert "failed on the inputs" not in run.stderr and "--inputs" not in run.stderr


def test_cli_stream_and_no_grad(tower, tmp_path) -> None:
    _, path = tower
    inputs = tmp_path / "x.pt"
    torch.save(_batches(32), inputs)
    run = CliRunner().invoke(cli, ["analyze", str(path), "--stream", "--factory", FACTORY, "--inputs", str(inputs),
                                   "--out", str(tmp_path / "s"), "--no-html", "-q"], catch_exceptions=False)
    assert run.exit_code == 0, run.stderr
    assert "note: end-to-end mode off: the model was streamed" in run.stdout
    assert "loss: none (forward only (--stream)" in run.stdout
    # the advice speaks of the --stream the user typed: "run without --no-grad" could not be followed
    assert "warning: forward-only run (--stream): only fprop GEMMs" in run.stderr and "--no-grad" not in run.output
    doc = json.loads((tmp_path / "s" / "results.json").read_text())
    assert doc["metadata"]["streaming"]["units"] == 4
    assert doc["metadata"]["loss"] == {"kind": STREAM_FORWARD_ONLY.kind, "detail": STREAM_FORWARD_ONLY.detail,
                                       "no_gradient": STREAM_FORWARD_ONLY.no_gradient}
    for args, message in ((["--stream", "--steps", "2"], "expected --steps 0 with --stream"),
                          (["--no-grad", "--steps", "2"], "expected --steps 0 with --no-grad"),
                          (["--stream", "--sweeps"], "--sweeps captures the whole model")):
        run = CliRunner().invoke(cli, ["analyze", str(path), "--factory", FACTORY, "--inputs", str(inputs), *args,
                                       "--out", str(tmp_path / "x")])
        assert run.exit_code == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1


LOSS = f"{HERE / 'tiny_factory.py'}:logits_loss"


@pytest.mark.parametrize("args, env, message", [
    (["--stream", "--loss", LOSS], {}, f"expected no --loss with --stream, got --loss {LOSS}"),
    (["--no-grad", "--loss", LOSS], {}, "expected no --loss with --no-grad"),
    (["--stream", "--sensitivity", "measured"], {}, "expected no --sensitivity with --stream, got --sensitivity measured"),
    (["--no-grad", "--sensitivity", "auto"], {}, "got --sensitivity auto"),  # typed: refused, though the default
    (["--stream", "--budget", "2%"], {}, "expected no --budget with --stream, got --budget 2%"),
], ids=["stream-loss", "no-grad-loss", "stream-sensitivity", "no-grad-sensitivity-auto", "stream-budget"])
def test_cli_forward_only_refuses_options_it_would_ignore(tower, tmp_path, args, env, message) -> None:
    """--loss and --sensitivity were accepted with --stream / --no-grad and silently ignored (as --steps and --sweeps
    are refused). A default is not a choice: test_cli_stream_and_no_grad runs --stream with the default
    --sensitivity auto."""
    _, path = tower
    inputs = tmp_path / "x.pt"
    torch.save(_batches(32), inputs)
    run = CliRunner().invoke(cli, ["analyze", str(path), "--factory", FACTORY, "--inputs", str(inputs), *args,
                                   "--out", str(tmp_path / "x")], env=env)
    lines = run.stderr.strip().splitlines()
    assert run.exit_code == 2 and len(lines) == 1 and message in lines[0], run.output
    assert not (tmp_path / "x").exists()  # refused before --out is claimed


def test_cli_forward_only_notes_options_set_in_the_environment(tower, tmp_path) -> None:
    """A variable set for a whole CI job (FP8PROBE_ANALYZE_LOSS) must not fail its forward-only runs, nor be ignored
    silently: one note names it, and the run goes on."""
    _, path = tower
    inputs = tmp_path / "x.pt"
    torch.save(_batches(32), inputs)
    run = CliRunner().invoke(cli, ["analyze", str(path), "--factory", FACTORY, "--inputs", str(inputs), "--no-grad",
                                   "-q", "--no-html", "--out", str(tmp_path / "x")],
                             env={"FP8PROBE_ANALYZE_LOSS": LOSS, "FP8PROBE_ANALYZE_BUDGET": "2%"})
    assert run.exit_code == 0, run.output
    notes = [x for x in run.stderr.splitlines() if "from the environment had no effect" in x]
    assert notes == ["note: FP8PROBE_ANALYZE_LOSS (--loss), FP8PROBE_ANALYZE_BUDGET (--budget) from the environment "
                     "had no effect here: --no-grad runs forward only (no loss, no backward, no end-to-end runs)"]
    # not imported or parsed either: a loss module that imports only where the job's training steps run, or a budget
    # another command of the job reads, must not fail the forward-only run (QA F7)
    for env in ({"FP8PROBE_ANALYZE_LOSS": "not_a_module_here:ce"}, {"FP8PROBE_ANALYZE_BUDGET": "2pct"}):
        run = CliRunner().invoke(cli, ["analyze", str(path), "--factory", FACTORY, "--inputs", str(inputs),
                                       "--no-grad", "-q", "--no-html", "--out", str(tmp_path / "y"), "--overwrite"],
                                 env=env)
        assert run.exit_code == 0 and "had no effect here" in run.stderr, (env, run.output)


def _child(mode: str, ckpt: Path, inputs: Path, out: Path, budget_mib: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), SIZE_ENV: MEM_SIZE, "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # why: stream_child.py docstring
    run = subprocess.run([sys.executable, str(HERE / "stream_child.py"), mode, str(ckpt), str(inputs), str(out),
                          str(budget_mib)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA accounting and /proc are Linux's")
def test_streaming_analyses_a_model_twice_the_memory_limit(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(SIZE_ENV, MEM_SIZE)
    model = build()
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ckpt = tmp_path / "tower.safetensors"
    save_file(model.state_dict(), ckpt)
    del model
    inputs = tmp_path / "x.pt"
    torch.save(_batches(256, 1), inputs)
    budget = model_mib / 2
    streamed = _child("stream", ckpt, inputs, tmp_path / "streamed.json", budget)
    assert streamed["status"] == "ok"
    in_memory = _child("memory", ckpt, inputs, tmp_path / "limited.json", budget)
    assert in_memory["status"] == "oom"  # the limit bites: the model alone does not fit
    reference = _child("memory", ckpt, inputs, tmp_path / "reference.json", 0)
    assert reference["status"] == "ok"
    assert json.loads((tmp_path / "streamed.json").read_text()) == json.loads((tmp_path / "reference.json").read_text())
