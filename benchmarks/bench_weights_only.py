"""Peak memory and wall time of a weights-only ``fp8probe analyze`` on a synthetic sharded checkpoint of >= 8 GB.

Usage: ``python benchmarks/bench_weights_only.py [--gb 8] [--dir DIR] [--strategy global] [--threads N] [--keep]``.
Writes a Llama-7B-shaped checkpoint (hidden 4096, MLP 11008, vocab 32000; as many decoder layers as
``--gb`` needs) of seeded random bf16 in safetensors shards of at most 1 GiB plus
``model.safetensors.index.json`` into a temporary directory under ``--dir``, runs
``python -m fp8probe analyze DIR --no-html`` in a child process, and prints the checkpoint size, the
largest tensor, the child's peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: anonymous
and file-backed pages, so memory-mapped weights count) against the bound ``2 x largest + 500 MiB``,
and the wall time. The checkpoint is deleted afterwards unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20
HIDDEN, MLP, VOCAB = 4096, 11008, 32000
SHARD_BYTES = 2**30
BOUND_SLACK_MIB = 500


def layout(gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a Llama-style checkpoint with enough layers for ``gb`` GB of bf16."""
    head = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,)),
            ("lm_head.weight", (VOCAB, HIDDEN))]
    per_layer = [("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (HIDDEN, HIDDEN)),
                 ("self_attn.v_proj", (HIDDEN, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                 ("mlp.gate_proj", (MLP, HIDDEN)), ("mlp.up_proj", (MLP, HIDDEN)), ("mlp.down_proj", (HIDDEN, MLP)),
                 ("input_layernorm", (HIDDEN,)), ("post_attention_layernorm", (HIDDEN,))]
    out, size, i = list(head), sum(2 * torch.Size(s).numel() for _, s in head), 0
    while size < gb * 1e9:
        for name, shape in per_layer:
            out.append((f"model.layers.{i}.{name}.weight", shape))
            size += 2 * torch.Size(shape).numel()
        i += 1
    return out


def write_checkpoint(root: Path, gb: float, seed: int = 0) -> dict:
    """Write the shards and the index; returns {"bytes", "tensors", "largest_bytes", "shards"}."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    fill, total, largest = 0, 0, 0
    names = []
    for key, shape in layout(gb):
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * t.element_size()
        if fill and fill + nbytes > SHARD_BYTES:
            names.append(_save(root, len(names), shards[-1], save_file))
            shards[-1], fill = {}, 0
        shards[-1][key] = t
        fill += nbytes
        total += nbytes
        largest = max(largest, nbytes)
    names.append(_save(root, len(names), shards[-1], save_file))
    weight_map = {}
    for name in names:
        for key in json.loads((root / f"{name}.keys").read_text()):
            weight_map[key] = name
        (root / f"{name}.keys").unlink()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return {"bytes": total, "tensors": len(weight_map), "largest_bytes": largest, "shards": len(names)}


def _save(root: Path, i: int, tensors: dict, save_file) -> str:
    name = f"model-{i + 1:05d}.safetensors"
    save_file(tensors, str(root / name))
    (root / f"{name}.keys").write_text(json.dumps(list(tensors)))
    tensors.clear()
    return name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="checkpoint size in GB (1e9 bytes), at least")
    ap.add_argument("--dir", default=None, help="where to create the temporary checkpoint directory")
    ap.add_argument("--strategy", default="global")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the analysis (--threads)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the results")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fp8probe-weights-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        (root / "ckpt").mkdir()
        info = write_checkpoint(root / "ckpt", args.gb)
        write_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "fp8probe", "analyze", str(root / "ckpt"), "--strategy", args.strategy,
               "--no-html", "-q", "--out", str(root / "out"), "--format", "json"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        bound = 2 * info["largest_bytes"] + BOUND_SLACK_MIB * MIB
        summary = json.loads(proc.stdout)["weights_only"]
        row = {"checkpoint_gb": info["bytes"] / 1e9, "shards": info["shards"], "tensors": info["tensors"],
               "analysed": summary["analysed"], "largest_mib": info["largest_bytes"] / MIB,
               "peak_rss_mib": peak / MIB, "bound_mib": bound / MIB, "within_bound": peak <= bound,
               "write_s": write_s, "analyze_wall_s": wall, "strategy": args.strategy,
               "threads": args.threads or torch.get_num_threads()}
        for k, v in row.items():
            print(f"{k:>15}: {v:.2f}" if isinstance(v, float) else f"{k:>15}: {v}")
        print(json.dumps(row))
        return 0 if row["within_bound"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
