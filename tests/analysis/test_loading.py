"""Model and input loading: batch normalisation, factories, refusals with one-line messages."""
from __future__ import annotations

import pytest
import torch

from fp8probe.analysis.loading import (Batch, LoadError, load_inputs, load_model, resolve_callable, to_batch,
                                       to_batches)


def test_to_batch_forms() -> None:
    t = torch.arange(3)
    assert to_batch(t) == Batch((t,), {})
    assert to_batch((t, t)).args == (t, t)
    assert to_batch({"input_ids": t}).kwargs == {"input_ids": t}
    assert len(to_batches([t, (t,), {"x": t}])) == 3
    assert len(to_batches((t, t))) == 1  # a tuple is one batch of positional args
    with pytest.raises(LoadError, match="empty"):
        to_batches([])
    with pytest.raises(LoadError, match="string keys"):
        to_batch({1: t})


def test_load_inputs(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=gen)
    torch.save([x, x + 1], tmp_path / "in.pt")
    batches = load_inputs(tmp_path / "in.pt")
    assert len(batches) == 2 and torch.equal(batches[1].args[0], x + 1)

    torch.save(torch.nn.ReLU(), tmp_path / "obj.pt")  # a pickled module is not plain data
    with pytest.raises(LoadError, match="objects other than tensors"):
        load_inputs(tmp_path / "obj.pt")
    torch.save([], tmp_path / "empty.pt")
    with pytest.raises(LoadError, match=r"inputs file .*empty.pt holds an empty list: expected at least one batch"):
        load_inputs(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(LoadError, match="cannot read inputs file"):
        load_inputs(tmp_path / "junk.pt")


def test_resolve_callable(tmp_path) -> None:
    assert resolve_callable("fp8probe.analysis.demo_model:build_demo").__name__ == "build_demo"
    f = tmp_path / "fac.py"
    f.write_text("def make():\n    return 42\n")
    assert resolve_callable(f"{f}:make")() == 42
    for spec, message in [("nocolon", "expected module:function"), (f"{f}:nope", "no callable"),
                          (f"{tmp_path / 'gone.py'}:f", "does not exist"), ("no_such_mod_q:f", "cannot import")]:
        with pytest.raises(LoadError, match=message):
            resolve_callable(spec)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(LoadError, match="importing .* failed: RuntimeError: boom"):
        resolve_callable(f"{bad}:f")


def test_factory_results(tmp_path) -> None:
    f = tmp_path / "fac.py"
    f.write_text("import torch\n"
                 "def pair():\n    return torch.nn.Linear(3, 2), [torch.ones(1, 3)]\n"
                 "def number():\n    return 7\n"
                 "def broken():\n    raise KeyError('x')\n"
                 "def other():\n    return torch.nn.Linear(4, 2)\n")
    loaded = load_model(f"{f}:pair")
    assert loaded.kind == "factory" and len(loaded.batches) == 1
    with pytest.raises(LoadError, match="must return an nn.Module"):
        load_model(f"{f}:number")
    with pytest.raises(LoadError, match="factory .* failed: KeyError"):
        load_model(f"{f}:broken")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")
    assert load_model(tmp_path / "sd.pt", factory=f"{f}:pair").kind == "state_dict"
    with pytest.raises(LoadError, match="does not fit the model"):
        load_model(tmp_path / "sd.pt", factory=f"{f}:other")


def test_pickle_needs_trust(tmp_path) -> None:
    torch.save(torch.nn.Linear(3, 2), tmp_path / "m.pt")
    with pytest.raises(LoadError) as info:
        load_model(tmp_path / "m.pt")
    msg = str(info.value)
    assert "\n" not in msg and "arbitrary code" in msg and "--trust-pickle" in msg and "torch.export" in msg
    assert load_model(tmp_path / "m.pt", trust_pickle=True).kind == "pickle"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_plain_pickle_is_told_from_torch_save_and_loads_only_when_trusted(tmp_path, protocol) -> None:
    """pickle.dump's stream is not torch.save's (torch.load cannot read it: it expects torch's magic number
    first): sniff names it, the loaders refuse it without trust in one line, and with trust pickle.load reads
    it, the same model as from torch.save's legacy format of the same protocol."""
    import pickle

    from fp8probe.analysis.loading import PLAIN_PICKLE, sniff

    f = tmp_path / "fac.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n")
    torch.manual_seed(protocol)
    sd = torch.nn.Linear(3, 2).state_dict()
    legacy, plain = tmp_path / "legacy.pt", tmp_path / "plain.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with open(plain, "wb") as fh:
        pickle.dump(sd, fh, protocol=protocol)
    assert sniff(legacy) == "pickle" and sniff(plain) == PLAIN_PICKLE
    for load in (lambda **k: load_model(plain, factory=f"{f}:build", **k), lambda **k: load_inputs(plain, **k)):
        with pytest.raises(LoadError) as info:
            load()
        msg = str(info.value)
        assert "\n" not in msg and "plain Python pickle" in msg and "--trust-pickle" in msg
    framed = protocol >= 4  # torch's weights-only unpickler lacks protocol 4's FRAME opcode
    if framed:
        for load in (lambda: load_model(legacy, factory=f"{f}:build"), lambda: load_inputs(legacy)):
            with pytest.raises(LoadError, match=r"legacy torch.save file \(pickle_protocol 4 .*--trust-pickle"):
                load()
    a = load_model(legacy, factory=f"{f}:build", trust_pickle=framed).module
    b = load_model(plain, factory=f"{f}:build", trust_pickle=True).module
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    batches = load_inputs(plain, trust_pickle=True)  # (a dict of tensors is one batch of keyword arguments)
    assert len(batches) == 1 and torch.equal(batches[0].kwargs["weight"], sd["weight"])


def test_directories(tmp_path) -> None:
    with pytest.raises(LoadError, match="without config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(LoadError, match="transformers is not installed"):
            load_model(tmp_path)
    else:
        with pytest.raises(LoadError, match="cannot load Hugging Face model"):
            load_model(tmp_path)


def test_corrupt_model_file(tmp_path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"definitely not a model")
    with pytest.raises(LoadError, match="cannot read"):
        load_model(tmp_path / "junk.pt", trust_pickle=True)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_training_checkpoint_with_a_nested_state_dict(tmp_path, key) -> None:
    """{'model': state_dict, 'epoch': 3} read 'holds a dict, expected ... a state_dict' (a state_dict is a dict)."""
    f = tmp_path / "fac.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n")
    torch.manual_seed(1)
    sd = torch.nn.Linear(3, 2).state_dict()
    torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", factory=f"{f}:build")
    assert loaded.kind == "state_dict" and f"ckpt.pt[{key!r}]" in loaded.description
    assert torch.equal(loaded.module.weight, sd["weight"])
    from fp8probe.analysis.weights_only import open_checkpoint  # the weights-only reader unwraps it too
    assert [e.key for e in open_checkpoint(tmp_path / "ckpt.pt").entries] == ["bias", "weight"]
    torch.save({"weights_x": sd, "epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(LoadError, match=r"holds a dict that is not a state_dict .*'weights_x': OrderedDict, 'epoch': int"):
        load_model(tmp_path / "other.pt", factory=f"{f}:build")


def test_a_loss_function_reads_the_batch_as_it_was_saved() -> None:
    """A --loss written for the saved dict (batch['input_ids']) failed: 'Batch' object is not subscriptable."""
    x, y = torch.ones(2, 3), torch.zeros(2)
    b = Batch((x,), {"labels": y})
    assert b[0] is x and b["labels"] is y and b.args[0] is x
    with pytest.raises(KeyError, match="no keyword input 'input_ids' \\(it has: 'labels'; and 1 positional\\)"):
        b["input_ids"]
    with pytest.raises(IndexError):
        b[1]


def test_a_safetensors_file_with_a_factory_runs_the_model(tmp_path) -> None:
    """model.safetensors --factory f:build --inputs x.pt was refused ('holds weights only ... without --factory and
    --inputs it analyses the weights alone', with both given)."""
    safetensors = pytest.importorskip("safetensors.torch")
    f = tmp_path / "fac.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(3, 2)\n"
                 "def other():\n    return torch.nn.Linear(4, 2)\n")
    torch.manual_seed(2)
    sd = torch.nn.Linear(3, 2).state_dict()
    safetensors.save_file(dict(sd), str(tmp_path / "m.safetensors"))
    loaded = load_model(tmp_path / "m.safetensors", factory=f"{f}:build")
    assert loaded.kind == "state_dict" and torch.equal(loaded.module.weight, sd["weight"])
    with pytest.raises(LoadError, match="does not fit the model"):
        load_model(tmp_path / "m.safetensors", factory=f"{f}:other")


def test_a_factory_file_imports_the_modules_beside_it_and_a_pickle_names_its_missing_module(tmp_path,
                                                                                            monkeypatch) -> None:
    """`from model import Net` in a factory file failed (No module named 'model'), as did unpickling a model whose
    module sits in the current directory, with no hint."""
    import sys
    import textwrap

    pkg = tmp_path / "proj"
    pkg.mkdir()
    (pkg / "qa_sibling_net.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 2)
            def forward(self, x):
                return self.fc(x)
    """))
    (pkg / "factory.py").write_text("from qa_sibling_net import Net\n\ndef build():\n    return Net()\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(pkg))])
    monkeypatch.delitem(sys.modules, "qa_sibling_net", raising=False)
    loaded = load_model(f"{pkg / 'factory.py'}:build")
    torch.save(loaded.module, tmp_path / "whole.pt")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])
    monkeypatch.delitem(sys.modules, "qa_sibling_net")
    with pytest.raises(LoadError, match="No module named 'qa_sibling_net': the module 'qa_sibling_net' .* set "
                                        "PYTHONPATH to the directory that holds it"):
        load_model(tmp_path / "whole.pt", trust_pickle=True)


def test_an_empty_or_renamed_safetensors_file_is_named_for_what_it_is(tmp_path) -> None:
    from safetensors.torch import save_file

    from fp8probe.analysis.weights_only import open_checkpoint

    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match="is not a safetensors file: it is an empty file"):
        open_checkpoint(tmp_path / "empty.safetensors")
    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "st.pt"))
    with pytest.raises(LoadError, match=r"it is a safetensors file \(give it the .safetensors suffix\)"):
        load_model(tmp_path / "st.pt")


_TIED_FACTORY = """import torch
class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # nanoGPT's weight tying
    def forward(self, ids):
        return self.head(self.embed(ids))
def build():
    torch.manual_seed(0)
    return TiedLM()
"""


def test_a_tied_model_loads_from_either_checkpoint_layout(tmp_path) -> None:
    """safetensors' save_model keeps one name of a tied weight, and loading it was refused ('1 missing key(s):
    embed.weight'); torch.save(model.state_dict()) holds both names. Both load; two different tensors under the two
    names, or neither name, are refused."""
    from safetensors.torch import save_file, save_model

    f = tmp_path / "fac.py"
    f.write_text(_TIED_FACTORY)
    torch.manual_seed(5)
    weight = torch.randn(16, 8)
    source = load_model(f"{f}:build").module
    with torch.no_grad():
        source.embed.weight.copy_(weight)
    torch.save(source.state_dict(), tmp_path / "both.pt")
    save_model(source, str(tmp_path / "one.safetensors"))
    for name in ("both.pt", "one.safetensors"):
        model = load_model(tmp_path / name, factory=f"{f}:build").module
        assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, weight)
    save_file({"embed.weight": weight, "head.weight": weight + 1}, str(tmp_path / "two.safetensors"))
    with pytest.raises(LoadError, match="holds different tensors under embed.weight and head.weight, which TiedLM "
                                        r"ties \(one Parameter\)"):
        load_model(tmp_path / "two.safetensors", factory=f"{f}:build")
    torch.save({"other.weight": weight}, tmp_path / "neither.pt")
    with pytest.raises(LoadError, match=r"2 missing key\(s\): embed.weight, head.weight; 1 unexpected key\(s\): "
                                        "other.weight"):
        load_model(tmp_path / "neither.pt", factory=f"{f}:build")


def _flip_member_byte(src, dst, member_suffix: str) -> None:
    """Copy the zip archive ``src`` to ``dst`` with one bit of ``member_suffix``'s stored data flipped (its CRC-32
    in the directory no longer matches; torch.load does not notice)."""
    import zipfile

    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    at = info.header_offset
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    data[start + 5] ^= 0x40
    dst.write_bytes(bytes(data))


def test_a_corrupted_archive_is_refused_on_every_loading_path(tmp_path) -> None:
    """Each file had one flipped bit in a tensor's bytes and loaded without a word: the analysis ran on a wrong
    weight or input."""
    import json

    from fp8probe.analysis.streaming import load_streamed
    from fp8probe.analysis.weights_only import open_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save([x], tmp_path / "in.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    (tmp_path / "f.py").write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 16), "
                                   "torch.nn.ReLU(), torch.nn.Linear(16, 4))\n")
    factory = f"{tmp_path / 'f.py'}:build"
    _flip_member_byte(tmp_path / "sd.pt", tmp_path / "sd_bad.pt", "/data/0")
    _flip_member_byte(tmp_path / "in.pt", tmp_path / "in_bad.pt", "/data/0")
    _flip_member_byte(tmp_path / "m.pt2", tmp_path / "m_bad.pt2", "weights/weight_0")
    # the good files load (and the bad ones really do load without the check: torch reads the flipped bytes)
    assert load_model(tmp_path / "sd.pt", factory=factory).kind == "state_dict" and load_inputs(tmp_path / "in.pt")
    assert torch.load(tmp_path / "sd_bad.pt", weights_only=True)["0.weight"].shape == (16, 8)

    def refused(call, name: str, member: str) -> None:
        with pytest.raises(LoadError, match=f"{name} is corrupted: member {member} CRC mismatch"):
            call()

    refused(lambda: load_inputs(tmp_path / "in_bad.pt"), "in_bad.pt", "in/data/0")
    refused(lambda: load_model(tmp_path / "sd_bad.pt", factory=factory), "sd_bad.pt", "sd/data/0")
    refused(lambda: load_model(tmp_path / "m_bad.pt2"), "m_bad.pt2", "m/data/weights/weight_0")
    refused(lambda: open_checkpoint(tmp_path / "sd_bad.pt"), "sd_bad.pt", "sd/data/0")  # (weights only)
    refused(lambda: load_streamed(tmp_path / "sd_bad.pt", factory=factory), "sd_bad.pt", "sd/data/0")
    # a sharded checkpoint of two .bin shards, the second corrupted
    shards = tmp_path / "shards"
    shards.mkdir()
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("0.")}, shards / "a.bin")
    torch.save({k: v for k, v in sd.items() if k.startswith("2.")}, tmp_path / "b.bin")
    _flip_member_byte(tmp_path / "b.bin", shards / "b.bin", "/data/0")
    (shards / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: "a.bin" if k.startswith("0.") else "b.bin" for k in sd}}))
    refused(lambda: open_checkpoint(shards / "pytorch_model.bin.index.json"), "b.bin", "b/data/0")


def test_an_exported_model_or_a_cut_zip_passed_as_inputs_is_named_for_what_it_is(tmp_path) -> None:
    """A .pt2 given to --inputs used to fail as torch.load's "failed locating file data.pkl ... is it truncated?",
    and a torch.save file cut inside its data as "OSError: [Errno 22] Invalid argument"."""
    model = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    with pytest.raises(LoadError, match=r"m\.pt2 is a torch\.export program \(a \.pt2 model\), not inputs"):
        load_inputs(tmp_path / "m.pt2")
    torch.save([torch.randn(4, 64) for _ in range(3)], tmp_path / "x.pt")
    data = (tmp_path / "x.pt").read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(LoadError, match=r"cut\.pt: the zip archive is truncated or corrupt") as err:
            load_inputs(tmp_path / "cut.pt")
        assert "Errno" not in str(err.value)
    assert len(load_inputs(tmp_path / "x.pt")) == 3


def test_a_state_dict_in_another_dtype_than_the_factory_model_says_what_load_state_dict_did(tmp_path) -> None:
    """A bfloat16 checkpoint loaded into a float32 factory model was upcast silently: the report said float32
    and nothing about the checkpoint's own dtype."""
    f = tmp_path / "fac.py"
    f.write_text("import torch\ndef build():\n    return torch.nn.Linear(6, 3)\n"
                 "def build_bf16():\n    return torch.nn.Linear(6, 3).to(torch.bfloat16)\n")
    layer = torch.nn.Linear(6, 3)
    torch.save(layer.state_dict(), tmp_path / "fp32.pt")
    torch.save({k: v.bfloat16() for k, v in layer.state_dict().items()}, tmp_path / "bf16.pt")
    assert load_model(tmp_path / "fp32.pt", factory=f"{f}:build").description.endswith(":build")
    up = load_model(tmp_path / "bf16.pt", factory=f"{f}:build")
    assert up.description.endswith("(its bfloat16 weights cast to the model's float32: exact; build the model in "
                                   "the checkpoint's dtype to analyse that)")
    assert torch.equal(up.module.weight, layer.weight.bfloat16().float())
    down = load_model(tmp_path / "fp32.pt", factory=f"{f}:build_bf16")
    assert "(its float32 weights cast to the model's bfloat16: rounded;" in down.description
    assert load_model(tmp_path / "bf16.pt", factory=f"{f}:build_bf16").description.endswith(":build_bf16")
