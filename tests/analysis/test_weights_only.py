"""Weights-only analysis of checkpoints without a model: same weight numbers as a full analyze, skipped tensors, chunking, bounded memory."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fp8probe.analysis.pipeline import analyze
from fp8probe.analysis.results import Results
from fp8probe.analysis.strategies import STRATEGIES, WEIGHT_QUANTIZERS
from fp8probe.analysis.weights_only import (WEIGHTS_ONLY_NOTE, _chunks, _finite_absmax, _quantize_chunk,
                                            analyse_weight, analyze_weights, open_checkpoint,
                                            sweep_blocksize_weights)
from fp8probe.analysis.sweeps import sweep_blocksize
from fp8probe.cli import cli

save_file = pytest.importorskip("safetensors.torch").save_file
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ALL = "all"


def _records(results: Results, table: str) -> dict[tuple, dict]:
    """JSON records of a table keyed by (layer, strategy|tensor|blocksize...), NaN written as null."""
    rows = results.to_json()["tables"].get(table, [])
    keyf = {"operands": ("layer", "strategy", "operand"), "tensors": ("layer", "tensor"),
            "histograms": ("layer", "tensor"), "blocksize_sweep": ("layer", "blocksize", "target")}[table]
    return {tuple(r[k] for k in keyf): r for r in rows}


def _weight_rows(results: Results, table: str) -> dict[tuple, dict]:
    recs = _records(results, table)
    return {k: v for k, v in recs.items() if "weight" in k}


@pytest.fixture(scope="module")
def tiny() -> dict:
    """The tiny encoder, its batches and a full analysis with every strategy (float32, bfloat16, float64)."""
    sys.path.insert(0, str(HERE))
    from tiny_factory import build

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        model, batches = build()
        model = model.to(dtype)
        out[dtype] = {"model": model, "full": analyze(model, batches, ALL)}
    return out


def _write(model: torch.nn.Module, kind: str, root: Path) -> Path:
    """Save ``model``'s state_dict as ``kind`` under ``root``; returns what to pass as MODEL."""
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    if kind in ("pt", "legacy"):
        torch.save(sd, root / "weights.pt", _use_new_zipfile_serialization=kind == "pt")
        return root / "weights.pt"
    if kind == "safetensors":
        save_file(sd, str(root / "model.safetensors"))
        return root / "model.safetensors"
    keys = list(sd)
    shards = {"model-00001-of-00003.safetensors": keys[0::3], "model-00002-of-00003.safetensors": keys[1::3],
              "model-00003-of-00003.safetensors": keys[2::3]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(root / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root / "model.safetensors.index.json" if kind == "sharded" else root


@pytest.mark.parametrize("kind,dtype", [("pt", torch.float32), ("pt", torch.bfloat16), ("legacy", torch.float32),
                                        ("safetensors", torch.float32), ("sharded", torch.bfloat16),
                                        ("directory", torch.float32), ("pt", torch.float64),
                                        ("safetensors", torch.float64)])
def test_weight_rows_equal_a_full_analysis(tiny, tmp_path, kind: str, dtype: torch.dtype) -> None:
    """Operand, tensor-statistics and histogram rows of the weight are those of a full analyze of the same
    model, number for number, under the same layer names. A float64 checkpoint's weights go into every recipe
    as float32, as a float64 model's do (int8 and switchback refused float64 weights)."""
    full = tiny[dtype]["full"]
    path = _write(tiny[dtype]["model"], kind, tmp_path / kind)
    wo = analyze_weights(path, ALL)
    assert wo.metadata["weights_only"]["note"] == WEIGHTS_ONLY_NOTE and wo.kind == "analyze"
    layers = full.tables["layers"]
    full_layers = set(layers[layers["b_is_weight"]]["layer"])  # attention matmuls have no weight
    assert full_layers <= set(wo.tables["layers"]["layer"])  # tok/pos embeddings of the tiny model are extra
    for table in ("operands", "tensors", "histograms"):
        got = _weight_rows(wo, table)
        want = {k: v for k, v in _weight_rows(full, table).items() if k[0] in full_layers}
        assert len(want) == len(full_layers) * (len(STRATEGIES) if table == "operands" else 1)
        for key, row in want.items():
            assert got[key] == row, (table, key)


def test_cli_weights_only_on_a_state_dict(tiny, tmp_path) -> None:
    """A state_dict without --factory and --inputs is analysed, not refused; banner on stderr."""
    path = _write(tiny[torch.float32]["model"], "pt", tmp_path)
    res = CliRunner().invoke(cli, ["analyze", str(path), "-s", "global,int8", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "weights-only analysis: 11 weight(s)" in res.stderr and "activations and gradients were not seen" in res.stderr
    assert "weight SQNR dB" in res.stdout and "blocks.1.fc1" in res.stdout
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["metadata"]["weights_only"]["analysed"] == 11
    assert {r["operand"] for r in doc["tables"]["operands"]} == {"weight"}
    html = (tmp_path / "out" / "index.html").read_text()
    assert "activations and gradients were not seen" in html
    assert "<dt>model mode</dt><dd>none (weights only: no model run)" in html  # (it read "eval (as for inference)")
    # with --inputs the model must be run: the state_dict still needs its factory
    torch.save(torch.zeros(1, 16, dtype=torch.long), tmp_path / "x.pt")
    res = CliRunner().invoke(cli, ["analyze", str(path), "--inputs", str(tmp_path / "x.pt"), "--out",
                                   str(tmp_path / "o2")])
    assert res.exit_code == 2 and "--factory" in res.stderr
    res = CliRunner().invoke(cli, ["sweep-threshold", str(path), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "activation" in res.stderr and len(res.stderr.strip().splitlines()) == 1


class _OpensAFile:
    """Unpickling it calls open(path, "w"): a stand-in for code a hostile pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_legacy_torch_save_state_dict_is_read_whole_and_says_so(tiny, tmp_path) -> None:
    """torch.save(sd, _use_new_zipfile_serialization=False) was refused ('holds a state_dict: pass --factory'). It is
    read with the weights-only unpickler, whole (torch cannot memory-map the legacy format), and the CLI says so;
    one holding other objects still goes to the model loader, which refuses the pickle without running it."""
    model = tiny[torch.float32]["model"]
    legacy = _write(model, "legacy", tmp_path / "legacy")
    zipped = _write(model, "pt", tmp_path / "zip")
    assert open_checkpoint(legacy).read_whole == [legacy] and "legacy (non-zip)" in open_checkpoint(legacy).note
    assert open_checkpoint(zipped).read_whole == [] and open_checkpoint(zipped).note == ""
    res = CliRunner().invoke(cli, ["analyze", str(legacy), "-s", "global", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert "weights.pt is in the legacy (non-zip) torch.save format, which cannot be memory-mapped: each such file " \
           "is read whole into memory" in res.stderr
    ref = analyze_weights(zipped, "global").to_json()["tables"]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tables"]["operands"] == ref["operands"]
    marker = tmp_path / "ran"
    torch.save({"a.weight": torch.ones(2, 2), "hook": _OpensAFile(marker)}, tmp_path / "hostile.pt",
               _use_new_zipfile_serialization=False)
    assert open_checkpoint(tmp_path / "hostile.pt") is None
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "hostile.pt"), "--out", str(tmp_path / "h")])
    assert res.exit_code == 2 and "loading a pickle runs arbitrary code" in res.stderr and not marker.exists()


def test_huggingface_directory_without_inputs(tmp_path) -> None:
    """A Hugging Face directory without --inputs: weights-only, layer names and weight numbers equal to
    the full analysis of the model transformers builds from the same directory."""
    transformers = pytest.importorskip("transformers")
    from fp8probe.analysis.loading import load_model

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "hf"), "-s", "int8,ocp-blockwise", "--out",
                                   str(tmp_path / "out"), "--no-html"])
    assert res.exit_code == 0, res.output
    wo = Results.load(tmp_path / "out")
    loaded = load_model(tmp_path / "hf")
    full = analyze(loaded, torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),
                   "int8,ocp-blockwise")
    layers = full.tables["layers"]
    full_layers = set(layers[layers["b_is_weight"]]["layer"])  # QKᵀ / PV have no weight
    assert "model.layers.1.mlp.down_proj" in full_layers and "lm_head" in full_layers
    assert set(wo.tables["layers"]["layer"]) == full_layers  # embed_tokens skipped as an embedding
    skipped = wo.tables["skipped"].set_index("key")
    assert skipped.loc["model.embed_tokens.weight", "reason"].startswith("embedding")
    got = _weight_rows(wo, "operands")
    want = {k: v for k, v in _weight_rows(full, "operands").items() if k[0] in full_layers}
    assert got.keys() == want.keys()
    for key in want:
        for col in ("sqnr_db", "underflow_frac", "saturation_frac", "note"):
            assert got[key][col] == want[key][col], (key, col)


def test_skipped_tensors_and_their_share(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    sd = {"embed_tokens.weight": torch.randn(50, 16, generator=gen), "layers.0.norm.weight": torch.ones(16),
          "layers.0.proj.weight": torch.randn(24, 16, generator=gen), "layers.0.proj.bias": torch.zeros(24),
          "layers.0.conv.weight": torch.randn(8, 4, 3, 3, generator=gen), "position_ids": torch.arange(16),
          "layers.0.proj.weight_scale": torch.ones(2, 2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    total = sum(v.numel() for v in sd.values())
    res = analyze_weights(tmp_path / "m.safetensors", "ocp-rowwise")
    layers = res.tables["layers"].set_index("layer")
    assert list(layers.index) == ["layers.0.conv", "layers.0.proj"]
    assert layers.loc["layers.0.conv", "kind"] == "conv" and layers.loc["layers.0.conv", "in_features"] == 36
    assert layers.loc["layers.0.proj", "has_bias"] and not layers.loc["layers.0.conv", "has_bias"]
    skipped = res.tables["skipped"].set_index("key")
    assert set(skipped.index) == {"embed_tokens.weight", "layers.0.norm.weight", "layers.0.proj.bias", "position_ids",
                                  "layers.0.proj.weight_scale"}
    assert skipped.loc["embed_tokens.weight", "param_share"] == pytest.approx(800 / total)
    assert "--include-embeddings" in skipped.loc["embed_tokens.weight", "reason"]
    assert "not floating point" in skipped.loc["position_ids", "reason"]
    meta = res.metadata["weights_only"]
    assert meta["param_share_analysed"] == pytest.approx((24 * 16 + 8 * 36) / total)
    with_emb = analyze_weights(tmp_path / "m.safetensors", "ocp-rowwise", include_embeddings=True)
    assert with_emb.tables["layers"].set_index("layer").loc["embed_tokens", "kind"] == "embedding"
    only = analyze_weights(tmp_path / "m.safetensors", "global", layers=r"proj$")
    assert list(only.tables["layers"]["layer"]) == ["layers.0.proj"]


@pytest.mark.parametrize("odd", ["sparse_coo", "sparse_csr", "meta"])
def test_sparse_and_meta_tensors_are_skipped_not_a_crash(tmp_path, odd: str) -> None:
    """They crashed the analysis with exit 3 (no storage to map; bincount on a meta tensor)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=gen)
    odd_w = {"sparse_coo": w.to_sparse(), "sparse_csr": w.to_sparse_csr(), "meta": w.to("meta")}[odd]
    torch.save({"a.weight": odd_w, "b.weight": torch.randn(8, 16, generator=gen)}, tmp_path / "sd.pt")
    res = analyze_weights(tmp_path / "sd.pt", "global")
    assert list(res.tables["layers"]["layer"]) == ["b"]
    reason = res.tables["skipped"].set_index("key").loc["a.weight", "reason"]
    assert ("meta tensor" if odd == "meta" else f"{odd} layout") in reason
    torch.save({"a.weight": odd_w}, tmp_path / "only.pt")
    out = CliRunner().invoke(cli, ["analyze", str(tmp_path / "only.pt"), "--out", str(tmp_path / "o"), "-q"])
    assert out.exit_code == 2 and "every tensor was skipped: " in out.output and reason in out.output


def test_float8_checkpoint_is_upcast_exactly(tmp_path) -> None:
    w32 = (torch.randn(40, 64, generator=torch.Generator().manual_seed(2)) * 30).to(torch.float8_e4m3fn).float()
    save_file({"a.weight": w32.to(torch.float8_e4m3fn)}, str(tmp_path / "fp8.safetensors"))
    save_file({"a.weight": w32}, str(tmp_path / "fp32.safetensors"))
    fp8 = analyze_weights(tmp_path / "fp8.safetensors", ALL)
    fp32 = analyze_weights(tmp_path / "fp32.safetensors", ALL)
    assert fp8.tables["layers"]["dtype"].tolist() == ["float8_e4m3fn"]  # (torch's name, as a .pt checkpoint's rows: it read F8_E4M3)
    assert _weight_rows(fp8, "operands") == _weight_rows(fp32, "operands")
    assert _weight_rows(fp8, "tensors") == _weight_rows(fp32, "tensors")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_chunks_quantise_exactly_like_the_whole_tensor(name: str) -> None:
    """Row chunks (tensor-scaled recipes pinned to the tensor's absmax) give the whole tensor's codes bit for bit."""
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(300, 256, generator=gen) * 0.02).to(torch.bfloat16)
    W[217, 9] = 1.5  # the tensor's absmax sits in a late chunk
    W[5, 5] = float("nan")
    wq = WEIGHT_QUANTIZERS[name]
    q_whole, _ = wq.quantize(W)
    multiple = wq.block[0] if wq.scaling == "block" else 1
    pin = None
    if wq.scaling == "tensor" or wq.tensor_scale:
        pin = torch.zeros(1, 256, dtype=W.dtype)
        pin[0, 0] = _finite_absmax(W, 4096)
    align = wq.block[0] if wq.tensor_scale else 1
    parts = [_quantize_chunk(wq.quantize, x, pin, align)[0] for _, x in _chunks(W, multiple, 128 * 64)]
    assert len(parts) > 1
    assert torch.equal(torch.cat(parts).nan_to_num(nan=7.0), q_whole.nan_to_num(nan=7.0))


def test_chunked_analysis_equals_one_chunk() -> None:
    gen = torch.Generator().manual_seed(4)
    W = (torch.randn(384, 200, generator=gen) * 0.02).to(torch.bfloat16)
    W[300, 7] = 0.9
    W[:, 11] *= 20  # an outlier input column
    strategies = [STRATEGIES[n] for n in STRATEGIES]
    whole, chunked = analyse_weight(W, strategies), analyse_weight(W, strategies, chunk_elements=128 * 200)
    for name in STRATEGIES:
        a, b = whole["operands"][name].result(), chunked["operands"][name].result()
        assert a["sqnr_db"] == pytest.approx(b["sqnr_db"], rel=1e-9), name
        assert (a["underflow_frac"], a["saturation_frac"]) == (b["underflow_frac"], b["saturation_frac"]), name
    for name in whole["blocks"]:
        assert whole["blocks"][name].result(0.9) == chunked["blocks"][name].result(0.9), name
    assert torch.equal(whole["row_amax"], chunked["row_amax"]) and torch.equal(whole["col_amax"], chunked["col_amax"])
    ts_a, ts_b = whole["stats"].result(), chunked["stats"].result()
    for k, v in ts_a.items():
        assert ts_b[k] == pytest.approx(v, rel=1e-9), k


def test_outliers_and_block_statistics(tmp_path) -> None:
    W = torch.randn(256, 128, generator=torch.Generator().manual_seed(5)) * 0.02
    W[:, 17] *= 40  # input feature 17 is an outlier column
    W[3] *= 30      # output channel 3 an outlier row
    save_file({"mlp.up.weight": W}, str(tmp_path / "m.safetensors"))
    res = analyze_weights(tmp_path / "m.safetensors", "ocp-blockwise,mxfp8,global")
    out = res.tables["weight_outliers"].iloc[0]
    assert out["n_outlier_cols"] == 1 and out["top_cols"][0][0] == 17
    assert out["n_outlier_rows"] == 1 and out["top_rows"][0][0] == 3
    blocks = res.tables["weight_blocks"].set_index("strategy")
    assert set(blocks.index) == {"ocp-blockwise", "mxfp8"}  # global has one tensor-wide scale
    assert blocks.loc["ocp-blockwise", "block"] == "128x128" and blocks.loc["ocp-blockwise", "n_blocks"] == 2
    assert blocks.loc["mxfp8", "n_blocks"] == 256 * 4
    assert blocks.loc["mxfp8", "absmax_max"] == pytest.approx(float(W.abs().max()))
    # E8M0 power-of-two scales clip some blocks (amax above 448 × scale); amax/fmt_max scales never do
    assert blocks.loc["mxfp8", "clipped_block_frac"] > 0 and blocks.loc["ocp-blockwise", "clipped_block_frac"] == 0


def test_weight_blocksize_sweep_equals_the_full_sweep(tiny, tmp_path) -> None:
    model = tiny[torch.float32]["model"]
    sys.path.insert(0, str(HERE))
    from tiny_factory import build

    _, batches = build()
    sizes = [32, 64, 128, 256]
    full = sweep_blocksize(model, batches, sizes)
    path = _write(model, "safetensors", tmp_path)
    wo = sweep_blocksize_weights(path, sizes, chunk_elements=64 * 32)  # forces several chunks per weight
    assert wo.kind == "sweep-blocksize"
    got = _records(wo, "blocksize_sweep")
    weight_layers = set(wo.tables["layers"]["layer"])
    want = {k: v for k, v in _weight_rows(full, "blocksize_sweep").items() if k[0] in weight_layers}
    # every weight of the full sweep (its attention matmuls have none; tok/pos embeddings only here)
    assert {k[0] for k in want} == weight_layers - {"tok", "pos"}
    for key, row in want.items():
        assert got[key]["sqnr_db"] == pytest.approx(row["sqnr_db"], rel=1e-9), key
        assert got[key]["auto"] == row["auto"]
    assert sum(r["recommended"] for r in got.values()) == len(wo.tables["layers"])
    res = CliRunner().invoke(cli, ["sweep-blocksize", str(path), "--blocksizes", "64,128", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "weights-only analysis" in res.stderr


def test_broken_checkpoints_are_one_line_errors(tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(64, 64)}, str(good))
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-100])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    (tmp_path / "abs").mkdir()
    (tmp_path / "abs" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": str(good)}}))
    (tmp_path / "ints.safetensors").write_bytes(data)  # fine file, but nothing to analyse after --layers
    for path, needle in ((tmp_path / "trunc.safetensors", "truncated"), (tmp_path / "junk.safetensors", "not a safetensors"),
                         (tmp_path / "idx", "missing"), (tmp_path / "abs", "same directory")):
        res = CliRunner().invoke(cli, ["analyze", str(path), "--out", str(tmp_path / "o")])
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], (path, res.stderr)
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "ints.safetensors"), "--layers", "^nothing$",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no weight matches --layers '^nothing$'" in res.stderr
    res = CliRunner().invoke(cli, ["analyze", str(good), "--factory", f"{HERE / 'tiny_factory.py'}:build", "--out", str(tmp_path / "o")])
    # (with --factory the file's weights are loaded into the factory's model: these do not fit it)
    assert res.exit_code == 2 and "does not fit the model from" in res.stderr
    assert open_checkpoint(tmp_path / "nothing-here.pt") is None
    import fp8probe

    assert fp8probe.analyze_weights is analyze_weights


# The child process: warm up on a small tensor, then (1) analyse a state_dict .pt (memory-mapped by
# torch.load) and report the peak resident set over the warmed-up one (VmHWM reset through
# /proc/self/clear_refs; file-backed pages count), (2) lower the soft address-space limit to what is
# mapped now plus the budget and analyse the safetensors shards under it.
_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from fp8probe.analysis.weights_only import analyze_weights
    torch.set_num_threads(1)
    pt, shards, budget, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    analyze_weights(shards, "global", layers=r"^layers\\.0\\.", chunk_elements=chunk)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    n_pt = len(analyze_weights(pt, "global", chunk_elements=chunk).tables["layers"])
    pt_peak = status("VmHWM") - base
    limit = status("VmSize") + budget
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    n_st = len(analyze_weights(shards, "global", chunk_elements=chunk).tables["layers"])
    st_peak = status("VmHWM") - base
    print(json.dumps({"pt_peak": pt_peak, "st_peak": st_peak, "n_pt": n_pt, "n_st": n_st, "budget": budget}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc/self/status")
def test_memory_stays_bounded_by_the_largest_tensor(tmp_path) -> None:
    """30 weights of 4 MiB (bf16 1024 x 2048) in 3 shards and in one .pt: 120 MiB, more than the budget of
    2 x the largest tensor + 100 MiB (one 256K-element row chunk's float64 working set is ~40-60 MiB).
    The .pt path (torch.load mmap=True) must give each weight's pages back (peak resident growth within
    the budget; without the release it grew by the whole file: 149 MiB > 108 MiB); the safetensors path
    must do the same with the address space itself limited to what is mapped after warm-up plus the
    budget (mapping or loading the whole checkpoint would not fit)."""
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(1024, 2048, generator=gen) * 0.02).to(torch.bfloat16)
    sd = {f"layers.{i}.proj.weight": base * (1 + i / 30) for i in range(30)}
    largest, chunk = 1024 * 2048 * 2, 2**18
    budget = 2 * largest + 100 * 2**20
    assert sum(v.numel() * 2 for v in sd.values()) > budget
    torch.save(sd, tmp_path / "big.pt")
    keys = list(sd)
    for s in range(3):
        save_file({k: sd[k] for k in keys[s::3]}, str(tmp_path / f"model-{s}.safetensors"))
    index = {"weight_map": {k: f"model-{i % 3}.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    del sd, base
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "big.pt"),
                          str(tmp_path / "model.safetensors.index.json"), str(budget), str(chunk)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n_pt"] == 30 and got["n_st"] == 30
    assert got["pt_peak"] <= budget and got["st_peak"] <= budget, got


def test_compare_lines_up_weight_rows_with_a_full_analysis(tiny, tmp_path) -> None:
    from fp8probe.report.compare import Gates, compare_results

    full = tiny[torch.float32]["full"].to_json()
    wo = analyze_weights(_write(tiny[torch.float32]["model"], "pt", tmp_path), "global,int8").to_json()
    # a weights-only run has no GEMM rows: comparing it with a full analysis must allow them missing
    assert not compare_results(full, wo)["passed"]
    gates = Gates(allow_missing=True)
    cmp = compare_results(full, wo, gates)
    weight_rows = [r for r in cmp["sqnr"] if r["what"] == "weight"]
    n_weights = sum(1 for r in full["tables"]["layers"] if r["b_is_weight"])  # QKᵀ/PV have no weight row
    assert len(weight_rows) == 2 * n_weights and cmp["passed"]
    assert all(r["delta_db"] == 0 for r in weight_rows)
    worse = json.loads(json.dumps(wo))
    row = next(r for r in worse["tables"]["operands"] if r["layer"] == "blocks.0.fc1" and r["strategy"] == "int8")
    row["sqnr_db"] -= 3.0
    cmp = compare_results(full, worse, gates)
    assert not cmp["passed"] and cmp["failed_layers"] == ["blocks.0.fc1"]


def test_gpt2_conv1d_weights_are_analysed_in_their_gemm_orientation(tmp_path) -> None:
    """HF Conv1D stores c_attn/c_proj/c_fc as [in, out]: the weights-only rows equal a full analysis' (which sees
    W.t() in addmm) for row-wise recipes too, detected from config.json and, without it, from GPT-2's key names."""
    transformers = pytest.importorskip("transformers")
    from fp8probe.analysis.loading import load_model

    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=16, n_inner=96,
                                  use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # an outlier input feature, so a wrong scaling axis shows in row-wise SQNR
        model.transformer.h[0].mlp.c_fc.weight[5] *= 30
    model.save_pretrained(tmp_path / "hf")
    strategies = "ocp-rowwise,ocp-blockwise,mxfp8,int8"
    wo = analyze_weights(tmp_path / "hf", strategies)
    full = analyze(load_model(tmp_path / "hf"), torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)),
                   strategies, e2e=False)
    layers = full.tables["layers"]
    full_layers = set(layers[layers["b_is_weight"]]["layer"])
    assert "transformer.h.0.mlp.c_fc" in full_layers
    conv1d = {n for n in full_layers if n != "lm_head"}
    assert set(wo.metadata["weights_only"]["transposed"]) == conv1d
    rows = wo.tables["layers"].set_index("layer")
    assert rows.loc["transformer.h.0.mlp.c_fc", ["in_features", "out_features", "layout"]].tolist() == [64, 96, "in,out"]
    got = _weight_rows(wo, "operands")
    want = {k: v for k, v in _weight_rows(full, "operands").items() if k[0] in full_layers - {"lm_head"}}
    assert want and set(want) <= set(got)
    for key in want:
        # the full analysis reduces over W.t() (a strided view), this one over a contiguous copy: the float64
        # sums may differ in the last bit; the codes (underflow, saturation counts) are identical
        assert got[key]["sqnr_db"] == pytest.approx(want[key]["sqnr_db"], rel=1e-12), key
        for col in ("underflow_frac", "saturation_frac"):
            assert got[key][col] == want[key][col], (key, col)
    # the same weights without config.json: GPT-2 key names; an explicit regex that matches nothing turns it off
    sd = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    bare = analyze_weights(tmp_path / "bare.safetensors", strategies)
    assert set(bare.metadata["weights_only"]["transposed"]) == {n.removeprefix("transformer.") for n in conv1d}
    off = analyze_weights(tmp_path / "bare.safetensors", strategies, transposed="$^")
    assert off.metadata["weights_only"]["transposed"] == []
    k = ("h.0.mlp.c_fc", "ocp-rowwise", "weight")
    assert _weight_rows(off, "operands")[k]["sqnr_db"] != _weight_rows(bare, "operands")[k]["sqnr_db"]
    sweep = sweep_blocksize_weights(tmp_path / "hf", [64, 128])
    assert sweep.tables["layers"].set_index("layer").loc["transformer.h.0.attn.c_attn", "in_features"] == 64


@pytest.mark.parametrize("layout", ["out,in", "in,out"])
@pytest.mark.parametrize("with_config", [True, False])
def test_fused_expert_tensors_are_quantised_expert_by_expert(tmp_path, layout: str, with_config: bool) -> None:
    """A 3-D MoE parameter (experts.gate_up_proj / down_proj) is E weights: each expert gets its own scales
    (expert 1 is 50x larger, so one shared scale would underflow expert 0), the rows equal quantising the
    experts one by one, and the [E, in, out] layout of Llama 4 / gpt-oss is read from the hidden size."""
    gen = torch.Generator().manual_seed(7)
    E, hidden, inter = 3, 64, 96
    gate_up = torch.randn(E, 2 * inter, hidden, generator=gen) * 0.02  # [E, out, in]
    down = torch.randn(E, hidden, inter, generator=gen) * 0.02
    gate_up[1] *= 50
    gate_up[2, :, 9] *= 500  # an outlier input feature of expert 2 (above expert 1's 50x columns too)
    store = (lambda t: t.transpose(1, 2).contiguous()) if layout == "in,out" else (lambda t: t)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": store(gate_up),
               "model.layers.0.mlp.experts.down_proj": store(down),
               "model.layers.0.mlp.router.weight": torch.randn(E, hidden, generator=gen)},
              str(tmp_path / "model.safetensors"))
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4_text", "hidden_size": hidden}))
    strategies = "global,ocp-tensorwise,ocp-rowwise,mxfp8"
    res = analyze_weights(tmp_path, strategies)
    rows = res.tables["layers"].set_index("layer")
    gu = rows.loc["model.layers.0.mlp.experts.gate_up_proj"]
    assert (gu["kind"], gu["experts"], gu["in_features"], gu["out_features"], gu["layout"]) == \
        ("experts", E, hidden, 2 * inter, layout)
    assert rows.loc["model.layers.0.mlp.experts.down_proj", "in_features"] == inter
    got = _weight_rows(res, "operands")
    for name in strategies.split(","):
        wq = WEIGHT_QUANTIZERS[name]
        ref2 = err2 = 0.0
        for e in range(E):
            q, _ = wq.quantize(gate_up[e])
            ref2 += float(gate_up[e].double().square().sum())
            err2 += float((gate_up[e].double() - q.double()).square().sum())
        want = 10 * math.log10(ref2 / err2)
        assert got[("model.layers.0.mlp.experts.gate_up_proj", name, "weight")]["sqnr_db"] == pytest.approx(want, rel=1e-9)
    outl = res.tables["weight_outliers"].set_index("layer").loc["model.layers.0.mlp.experts.gate_up_proj"]
    assert outl["top_cols"][0][0] == 9
    sweep = sweep_blocksize_weights(tmp_path, [64, 128])
    assert set(sweep.tables["blocksize_sweep"]["layer"]) == {"model.layers.0.mlp.experts.gate_up_proj",
                                                             "model.layers.0.mlp.experts.down_proj",
                                                             "model.layers.0.mlp.router"}


def test_analyze_sweeps_on_weights_only_runs_the_weight_sweep_and_names_unused_options(tmp_path) -> None:
    """--sweeps ran nothing on a checkpoint, and --steps / --threshold were dropped without a word."""
    gen = torch.Generator().manual_seed(9)
    torch.save({"a.weight": torch.randn(32, 64, generator=gen), "b.weight": torch.randn(16, 32, generator=gen)},
               tmp_path / "sd.pt")
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "--sweeps", "--steps", "2", "--threshold", "3",
                                   "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    sweep = doc["tables"]["blocksize_sweep"]
    assert {r["layer"] for r in sweep} == {"a", "b"} and {r["target"] for r in sweep} == {"weight"}
    assert "outlier-threshold sweep needs activations" in res.output
    assert "--threshold, --steps act on a model run and had no effect" in res.output
    plain = CliRunner().invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "--out", str(tmp_path / "p"), "-q"])
    assert plain.exit_code == 0 and "had no effect" not in plain.output and "--sweeps" not in plain.output


def test_weights_only_names_lr_without_steps_in_one_note(tmp_path) -> None:
    """--lr without --steps on a checkpoint was named twice: by the recipe-option note ("no --steps") and by the
    weights-only one."""
    gen = torch.Generator().manual_seed(10)
    torch.save({"a.weight": torch.randn(32, 64, generator=gen)}, tmp_path / "sd.pt")
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "--lr", "0.1", "--strategy", "global",
                                   "--margin", "1", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("--lr") == 1 and "--lr acts on a model run and had no effect" in res.output
    assert "note: --margin had no effect here" in res.output and "no --steps" not in res.output


def test_weights_only_sweep_prints_json_and_names_unused_options(tmp_path) -> None:
    """sweep-blocksize on a checkpoint printed its table under --format json (a script's json.loads failed), and
    --seed / --batches / --no-e2e were dropped without a word (only --train-mode was named)."""
    gen = torch.Generator().manual_seed(11)
    torch.save({"a.weight": torch.randn(32, 64, generator=gen), "b.weight": torch.randn(16, 32, generator=gen) * 50},
               tmp_path / "sd.pt")
    res = CliRunner().invoke(cli, ["sweep-blocksize", str(tmp_path / "sd.pt"), "--blocksizes", "32,64,128",
                                   "--format", "json", "--seed", "3", "--batches", "2", "--no-e2e", "--train-mode",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # stdout is the JSON alone; the notes are on stderr
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    want = {r["layer"]: r for r in doc["tables"]["blocksize_sweep"] if r["recommended"]}
    assert out["mode"] == "weights-only" and out["model_mode"] is None and out["results"] == str(tmp_path / "o" /
                                                                                                 "results.json")
    assert out["rule"] == doc["metadata"]["recommendations"]["blocksize_sweep"]
    assert out["weights_only"]["analysed"] == 2
    assert {r["layer"]: (r["blocksize"], r["weight_sqnr_db"]) for r in out["recommended"]} == {
        layer: (r["blocksize"], r["sqnr_db"]) for layer, r in want.items()}
    assert ("note: --batches, --seed, --no-e2e, --train-mode act on a model run and had no effect: no model was run"
            in res.stderr)
    table = CliRunner().invoke(cli, ["sweep-blocksize", str(tmp_path / "sd.pt"), "--blocksizes", "32,64,128",
                                     "--out", str(tmp_path / "t")])
    assert table.exit_code == 0 and "had no effect" not in table.output
    assert table.stdout.splitlines()[0].split() == ["layer", "recommended", "weight", "SQNR", "dB"]


def test_weights_only_run_warns_of_nan_and_inf_in_the_terminal(tmp_path) -> None:
    """The HTML report had the warning, the terminal (the CI log) did not."""
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(64, 32, generator=gen)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    save_file({"a.weight": w, "b.weight": torch.randn(8, 32, generator=gen)}, str(tmp_path / "m.safetensors"))
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert "warning: 1 NaN and 2 Inf values in the weights of 1 layer(s): a" in res.output
    clean = CliRunner().invoke(cli, ["analyze", str(tmp_path / "m.safetensors"), "--layers", "^b$", "--out",
                                     str(tmp_path / "p"), "-q"])
    assert clean.exit_code == 0 and "NaN" not in clean.output


@pytest.mark.parametrize("config", [{"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True},
                                    {"architectures": ["LlamaForCausalLM"]},
                                    {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
                                    {"architectures": ["LlamaModel"]}])
def test_a_tied_input_embedding_is_analysed_as_the_lm_head(tmp_path, config) -> None:
    """A tied LM head (stored once, as the input embedding) was skipped as "a table lookup, not a GEMM operand":
    the model's largest GEMM had no row, where a full analysis has lm_head."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(12)
    save_file({"model.embed_tokens.weight": torch.randn(96, 32, generator=gen),
               "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=gen)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path), "-s", "global", "--out", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    layers = [r["layer"] for r in doc["tables"]["layers"]]
    tied = config.get("tie_word_embeddings", True) and config["architectures"] == ["LlamaForCausalLM"]
    if tied:
        assert sorted(layers) == ["lm_head", "model.layers.0.mlp.up_proj"]
        assert doc["metadata"]["weights_only"]["tied"] == {"lm_head": "model.embed_tokens.weight"}
        assert "model.embed_tokens.weight is also the lm_head weight" in res.output
        head = next(r for r in doc["tables"]["layers"] if r["layer"] == "lm_head")
        assert (head["out_features"], head["in_features"]) == (96, 32)
    else:
        assert layers == ["model.layers.0.mlp.up_proj"] and not doc["metadata"]["weights_only"]["tied"]
        assert [r["key"] for r in doc["tables"]["skipped"]] == ["model.embed_tokens.weight"]


def test_a_gpt2_state_dict_without_config_ties_wte_to_lm_head_unless_it_has_its_own(tmp_path) -> None:
    from fp8probe.analysis.weights_only import open_checkpoint, tied_lm_head

    gen = torch.Generator().manual_seed(13)
    sd = {"transformer.wte.weight": torch.randn(50, 16, generator=gen),
          "transformer.h.0.mlp.c_fc.weight": torch.randn(16, 64, generator=gen)}
    torch.save(sd, tmp_path / "a.pt")
    assert tied_lm_head(open_checkpoint(tmp_path / "a.pt")) == "transformer.wte.weight"
    torch.save({**sd, "lm_head.weight": sd["transformer.wte.weight"].clone()}, tmp_path / "b.pt")
    assert tied_lm_head(open_checkpoint(tmp_path / "b.pt")) is None


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_a_torch_saved_tied_pair_is_one_tensor_counted_and_analysed_once(tmp_path, include_embeddings) -> None:
    """torch.save(model.state_dict()) of a tied model keeps both names of the shared weight: the parameter
    share counted it twice (the analysed share of a tied Llama's .pt came out low) and, with
    --include-embeddings, the one tensor was analysed twice, as an embedding and as lm_head."""

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = torch.nn.Embedding(96, 32)
            self.up_proj = torch.nn.Linear(32, 64, bias=False)
            self.lm_head = torch.nn.Linear(32, 96, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    torch.manual_seed(15)
    torch.save(Tied().state_dict(), tmp_path / "tied.pt")
    # An equal copy is a tensor of its own (two parameters that happen to hold the same values): both count.
    sd = Tied().state_dict()
    torch.save({**sd, "lm_head.weight": sd["lm_head.weight"].clone()}, tmp_path / "copy.pt")
    args = ["-s", "global", "-q"] + (["--include-embeddings"] if include_embeddings else [])
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "tied.pt"), "--out", str(tmp_path / "t"), *args])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "t" / "results.json").read_text())["metadata"]["weights_only"]
    doc = json.loads((tmp_path / "t" / "results.json").read_text())
    assert sorted(r["layer"] for r in doc["tables"]["layers"]) == ["lm_head", "up_proj"]
    assert info["param_share_analysed"] == 1.0 and info["same_tensor"] == {"embed_tokens.weight": "lm_head.weight"}
    assert info["skipped_share_by_reason"] == {}
    (row,) = doc["tables"]["skipped"]
    assert row["key"] == "embed_tokens.weight" and row["param_share"] == 0.0 and "lm_head.weight" in row["reason"]
    assert "embed_tokens.weight is the same tensor as lm_head.weight" in res.output

    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "copy.pt"), "--out", str(tmp_path / "c"), *args])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c" / "results.json").read_text())
    info = doc["metadata"]["weights_only"]
    assert not info["same_tensor"] and "same tensor" not in res.output
    if include_embeddings:
        assert sorted(r["layer"] for r in doc["tables"]["layers"]) == ["embed_tokens", "lm_head", "up_proj"]
    else:
        assert info["param_share_analysed"] == pytest.approx((64 * 32 + 96 * 32) / (64 * 32 + 2 * 96 * 32))


def test_a_tensor_in_two_shards_is_refused_and_weights_only_tables_are_known_outputs(tmp_path) -> None:
    """Both copies were analysed as two layers; --overwrite left a weights-only run's skipped.csv,
    weight_blocks.csv and weight_outliers.csv behind."""
    from safetensors.torch import save_file

    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.weights_only import open_checkpoint
    from fp8probe.report.files import KNOWN_TABLES

    gen = torch.Generator().manual_seed(14)
    (tmp_path / "ck").mkdir()
    save_file({"a.weight": torch.randn(8, 8, generator=gen)}, str(tmp_path / "ck" / "one.safetensors"))
    save_file({"a.weight": torch.randn(8, 8, generator=gen)}, str(tmp_path / "ck" / "two.safetensors"))
    with pytest.raises(LoadError, match=r"tensor a.weight is in two files \(one.safetensors and two.safetensors\)"):
        open_checkpoint(tmp_path / "ck")
    assert {"skipped", "weight_blocks", "weight_outliers"} <= set(KNOWN_TABLES)


def test_threads_beyond_any_machine_are_refused() -> None:
    res = CliRunner().invoke(cli, ["analyze", "x.pt", "--threads", "100000"])
    assert res.exit_code == 2 and "1<=x<=1024" in res.output


@pytest.mark.parametrize("name", ["emb", "tok_emb", "transformer.pos_emb"])
def test_short_embedding_names_are_embeddings(tmp_path, name) -> None:
    """minGPT's tok_emb/pos_emb and a plain "emb" were analysed as linear weights (user test)."""
    gen = torch.Generator().manual_seed(1)
    sd = {f"{name}.weight": torch.randn(40, 16, generator=gen), "head.weight": torch.randn(40, 16, generator=gen)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = analyze_weights(tmp_path / "m.safetensors", "global")
    assert list(res.tables["layers"]["layer"]) == ["head"]
    assert res.tables["skipped"].set_index("key").loc[f"{name}.weight", "reason"].startswith("embedding")


def test_a_layers_pattern_matching_no_weight_is_refused_as_analyze_refuses_it(tmp_path) -> None:
    """analyze_weights(layers=...) matching nothing returned an empty result and report (a CI regex typo passed)."""
    from fp8probe.analysis.loading import LoadError
    from fp8probe.analysis.weights_only import analyze_weights, sweep_blocksize_weights

    gen = torch.Generator().manual_seed(12)
    torch.save({"enc.weight": torch.randn(16, 32, generator=gen), "dec.weight": torch.randn(8, 16, generator=gen)},
               tmp_path / "sd.pt")
    for call in (lambda: analyze_weights(tmp_path / "sd.pt", layers="zzz"),
                 lambda: sweep_blocksize_weights(tmp_path / "sd.pt", [64], layers="zzz")):
        with pytest.raises(LoadError, match="no weight matches --layers 'zzz'; the checkpoint's weights are: dec, enc"):
            call()
    assert list(analyze_weights(tmp_path / "sd.pt", layers="^dec").tables["layers"]["layer"]) == ["dec"]
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "sd.pt"), "--layers", "zzz", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no weight matches --layers 'zzz'" in res.stderr and not (tmp_path / "o").exists()
