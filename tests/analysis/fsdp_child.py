"""Run under torchrun by tests/analysis/test_fsdp.py: the Tower sharded with FSDP2 (fully_shard per block + root), analysed.

argv: device ("cpu" → gloo, "cuda" → NCCL on GPU LOCAL_RANK), out.json (rank 0 writes the tables),
batches. The model and batches are those of ``reference()``, which the test runs without FSDP.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from fp8probe.analysis.pipeline import analyze

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_factory import Tower  # noqa: E402

STRATEGY = "global,int8"


def model_and_batches(n_batches: int) -> tuple[Tower, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Tower(32, 2), [torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]


def reference(device: str, n_batches: int):
    model, batches = model_and_batches(n_batches)
    return analyze(model, batches, STRATEGY, device=device, sensitivity="measured")


def main() -> None:
    device, out, n_batches = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    model, batches = model_and_batches(n_batches)
    model = model.to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    results = analyze(model, batches, STRATEGY, device=device, sensitivity="measured")
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results.to_json()["tables"]))
    dist.barrier()  # both ranks done with every collective before either tears the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
