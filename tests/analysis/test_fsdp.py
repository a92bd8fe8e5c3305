"""FSDP2 (fully_shard) models: capture sees the all-gathered weights under their own names, once, and the tables equal an unsharded run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from fsdp_child import reference  # noqa: E402

TIMEOUT_S = 300
GRAD_COLUMNS = ("grad_sqnr_db_min", "grad_sqnr_db_median", "note")


# A rank of the gloo run sometimes died with SIGABRT, "terminate called without an active exception" and no
# Python traceback (2 of 4 full-suite runs on 2026-11-29, never in 16 runs of this file alone, with or without
# competing load): a C++ abort inside torch's FSDP2/gloo machinery, not an fp8probe error (those raise with the
# rank and batch). The child now meets at a barrier before tearing the group down; a run that still dies that
# way is retried once, and its stderr printed, so the tables are always checked.
ABORT = "terminate called without an active exception"


def _run_child(device: str, ranks: int, out: Path, n_batches: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for attempt in (1, 2):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={ranks}", str(HERE / "fsdp_child.py"), device, str(out), str(n_batches)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT_S)
        if run.returncode == 0 or ABORT not in run.stderr or attempt == 2:
            break
        print(f"torchrun attempt {attempt} aborted in C++ ({ABORT!r}); retrying once:\n{run.stderr[-2000:]}")
    assert run.returncode == 0, run.stderr[-3000:]


def _check(sharded: dict, unsharded: dict) -> None:
    assert sharded.keys() == unsharded.keys()
    layers = {r["layer"]: r for r in sharded["layers"]}
    # Named after the parameters (the all-gathered ones are not the tensors the model was built with).
    assert list(layers) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    assert all(r["kind"] == "linear" and r["b_is_weight"] for r in layers.values())
    weights = {r["layer"]: r["numel"] for r in sharded["tensors"] if r["tensor"] == "weight"}
    assert weights == {"blocks.0.fc1": 4096, "blocks.0.fc2": 4096, "blocks.1.fc1": 4096, "blocks.1.fc2": 4096,
                       "head": 512}  # whole weights (not a shard), counted once
    for name in sharded:
        if name != "e2e":
            assert sharded[name] == unsharded[name], name
    for a, b in zip(sharded["e2e"], unsharded["e2e"]):
        assert {k: v for k, v in a.items() if k not in GRAD_COLUMNS} == \
            {k: v for k, v in b.items() if k not in GRAD_COLUMNS}
        assert a["grad_sqnr_db_min"] is None and "FSDP2 shards the parameters" in a["note"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp2_on_two_cpu_ranks_equals_unsharded(tmp_path) -> None:
    """3 batches on 2 ranks: rank 1 pads the last round (FSDP2's all-gathers need every rank in every pass)."""
    _run_child("cpu", 2, tmp_path / "fsdp.json", 3)
    torch.set_num_threads(1)
    _check(json.loads((tmp_path / "fsdp.json").read_text()), reference("cpu", 3).to_json()["tables"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_fsdp2_on_gpu_equals_unsharded(tmp_path) -> None:
    """One rank per GPU (NCCL); with one GPU FSDP2 still all-gathers through its own machinery."""
    ranks = torch.cuda.device_count()
    _run_child("cuda", ranks, tmp_path / "fsdp.json", 3)
    _check(json.loads((tmp_path / "fsdp.json").read_text()), reference("cuda", 3).to_json()["tables"])
