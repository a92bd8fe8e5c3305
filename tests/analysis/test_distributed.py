"""torchrun with 2 CPU ranks (gloo): batches sharded i % 2, tables bit-identical to one process, rank 0 alone writes, errors reach every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from click.testing import CliRunner

from fp8probe.analysis import distributed
from fp8probe.cli import EXIT_USAGE, cli

HERE = Path(__file__).resolve().parent
FACTORY = f"{HERE / 'dist_factory.py'}:build"
FAILING = f"{HERE / 'dist_factory.py'}:build_failing"
ROOT = HERE.parents[1]
# Generous: a run takes ~10-20 s on the shared 2-core box; the point is "no hang", not speed.
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env(log: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if log is not None:
        env["FP8PROBE_TEST_FORWARD_LOG"] = str(log)
    return env


def _fp8probe(args: list[str], ranks: int, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m fp8probe ARGS`` in one process (ranks 0) or under torchrun with ``ranks`` CPU ranks."""
    launcher = [] if ranks == 0 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run([sys.executable, *launcher, "-m", "fp8probe", *args], capture_output=True, text=True,
                          env={**_env(log), **(env or {})}, cwd=ROOT, timeout=TIMEOUT_S)


def _tables(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["tables"]


def _forwards(log: Path) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in line.split()) for line in log.read_text().split("\n") if line]


def test_two_ranks_bit_identical_to_one_process(tmp_path) -> None:
    """analyze with the end-to-end mode, the training simulation and both sweeps (--sweeps), once."""
    # nvfp4-train: its stochastic rounding draws from (seed, index) only, so the ranks agree with one process too
    common = ["analyze", FACTORY, "-s", "global,int8,nvfp4-train", "--threads", "1", "--sensitivity", "estimated",
              "--batches", "3", "--steps", "1", "--sweeps", "--no-html", "-q"]
    one = _fp8probe([*common, "--out", str(tmp_path / "one")], ranks=0)
    assert one.returncode == 0, one.stderr
    log = tmp_path / "forwards.log"
    two = _fp8probe([*common, "--out", str(tmp_path / "two")], ranks=2, log=log)
    assert two.returncode == 0, two.stderr
    a, b = _tables(tmp_path / "one"), _tables(tmp_path / "two")
    assert {"gemm", "operands", "tensors", "histograms", "outliers", "coverage", "e2e", "sensitivity",
            "recommendation", "training", "blocksize_sweep", "threshold_sweep"} <= set(a)
    assert set(pd.DataFrame(a["recommendation"])["kind"]) == {"strategy", "blocksize", "threshold"}
    assert a.keys() == b.keys()
    for name in a:  # exact: the same float operations in the same order (NaN written as null)
        assert a[name] == b[name], name
    meta = json.loads((tmp_path / "two" / "results.json").read_text())["metadata"]
    assert meta["ranks"] == 2 and meta["batches"] == 3
    # "auto" sensitivity is decided from GEMM FLOPs folded from every batch (batch 1 ran on rank 1): the same count
    # as one process's, so both ranks choose as one process would (e2e._measure_cost).
    one_meta = json.loads((tmp_path / "one" / "results.json").read_text())["metadata"]
    assert meta["e2e"]["measure_cost"] == one_meta["e2e"]["measure_cost"] > 0
    # Sharded: every capture / end-to-end forward of batch i ran on rank i % 2 (the training
    # simulation, sequential by nature, runs on every rank and is left out: steps use batch 0 only).
    runs = _forwards(log)
    sharded = [(r, i) for r, i in runs if i != 0]
    assert sharded and all(r == i % 2 for r, i in sharded)
    assert {r for r, _ in runs} == {0, 1}
    # Rank 0 alone reports and writes.
    assert two.stdout.count("results: ") == 1


def test_error_on_one_rank_stops_every_rank(tmp_path) -> None:
    run = _fp8probe(["analyze", FAILING, "--threads", "1", "--no-e2e", "--no-html", "-q",
                     "--out", str(tmp_path / "out")], ranks=2)
    assert run.returncode != 0
    # Rank 1 raised on batch 1; rank 0 learnt it in the same round and stopped with the same line.
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 2, run.stderr
    assert all("planted failure on a 3-row batch" in ln and "(rank 1, batch 1)" in ln for ln in lines)
    # an input error on every rank (capture.InputsError crossed the ranks as a RuntimeError: "internal error", exit 3)
    assert "internal error" not in run.stderr and all("inputs batch 1 (counting from 0)" in ln for ln in lines)
    assert not (tmp_path / "out" / "results.json").exists()


def test_out_refused_on_rank0_stops_every_rank(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    run = _fp8probe(["analyze", FACTORY, "--no-e2e", "--no-html", "-q", "--out", str(out)], ranks=2)
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 2 and all("--overwrite" in ln for ln in lines), run.stderr


def test_map_batches_one_process_is_lazy_and_ordered() -> None:
    seen: list[int] = []

    def fn(i: int) -> int:
        seen.append(i)
        return 10 * i

    it = distributed.map_batches(3, fn, distributed.World())
    assert next(it) == (0, 0) and seen == [0]  # batch 1 runs only after batch 0 was folded in
    assert list(it) == [(1, 10), (2, 20)] and seen == [0, 1, 2]


def test_init_from_env_rejects_bad_world_size(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"expected an integer >= 1 in \$WORLD_SIZE, got 'two'"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() == distributed.World()


def test_ranks_with_other_models_are_refused(tmp_path) -> None:
    """A rank that built another model (another seed, checkpoint or shape) was folded into the tables, exit 0."""
    res = _fp8probe(["analyze", f"{HERE / 'dist_factory.py'}:build_per_rank", "-s", "global", "--threads", "1",
                     "--no-e2e", "--no-html", "-q", "--out", str(tmp_path / "o")], ranks=2)
    assert res.returncode != 0 and "rank 1 loaded another model than rank 0: parameter" in res.stderr
    assert "has other values" in res.stderr and not (tmp_path / "o" / "results.json").exists()


def test_ranks_with_other_batch_counts_are_refused(tmp_path) -> None:
    res = _fp8probe(["analyze", f"{HERE / 'dist_factory.py'}:build_per_rank_batches", "-s", "global", "--threads",
                     "1", "--no-e2e", "--no-html", "-q", "--out", str(tmp_path / "o")], ranks=2)
    assert res.returncode != 0  # (torchrun's own exit status)
    assert "Error: the ranks have different numbers of batches (rank 0: 5, rank 1: 3)" in res.stderr


# A peer rank that died or hung: what gloo raises at the collective of the rank still running (torch 2.13's words).
GLOO_PEER_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                    "[127.0.0.1]:14764. This is typically caused by a remote worker crashing. Check the logs of the "
                    "remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
GLOO_TIMED_OUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting "
                  "30000ms for send operation to complete")
PEER_LOST = {
    "died": (GLOO_PEER_CLOSED, "a peer rank failed: rank 0 lost its connection to the other ranks (Connection closed "
                               "by peer [127.0.0.1]:14764); that rank's own output says why it stopped"),
    "hung": (GLOO_TIMED_OUT, "a peer rank timed out: rank 0 waited FP8PROBE_DIST_TIMEOUT=30 s for the other ranks (one "
                             "hung, or its batch takes longer): check that rank's output, or raise FP8PROBE_DIST_TIMEOUT"),
}


def _collectives_fail(monkeypatch, message: str) -> None:
    def lost(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(distributed.dist, "all_gather_object", lost)
    monkeypatch.setattr(distributed.dist, "broadcast_object_list", lost)
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "30")


@pytest.mark.parametrize("peer", PEER_LOST, ids=list(PEER_LOST))
def test_lost_peer_at_a_collective_is_a_peer_rank_error(monkeypatch, peer) -> None:
    """Every collective (the batch rounds, agree, the model check) says a peer failed or timed out (was a raw
    RuntimeError, which the CLI reports as an internal error, exit 3)."""
    raised, expected = PEER_LOST[peer]
    _collectives_fail(monkeypatch, raised)
    two = distributed.World(0, 2)
    for call in (lambda: list(distributed.map_batches(3, lambda i: i, two)), lambda: distributed.agree(1, two),
                 lambda: distributed.check_same_model(torch.nn.Linear(2, 2), two)):
        with pytest.raises(distributed.PeerRankError) as info:
            call()
        assert str(info.value) == expected
        assert isinstance(info.value.__cause__, RuntimeError)  # (--debug shows the backend's own error)


@pytest.mark.parametrize("peer", PEER_LOST, ids=list(PEER_LOST))
def test_cli_lost_peer_exits_2_with_one_line(monkeypatch, tmp_path, peer) -> None:
    """Rank 0 of two, its peer lost at the first collective (agreeing on --out): exit 2, one line, no traceback."""
    raised, expected = PEER_LOST[peer]
    _collectives_fail(monkeypatch, raised)
    monkeypatch.setattr(distributed, "init_from_env", lambda device="cpu": distributed.World(0, 2))
    monkeypatch.delenv("FP8PROBE_DEBUG", raising=False)
    res = CliRunner().invoke(cli, ["analyze", FACTORY, "--no-e2e", "-q", "--out", str(tmp_path / "out")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == EXIT_USAGE and lines == [f"Error: {expected}"], (res.exit_code, res.output)
    assert not (tmp_path / "out").exists()  # the claim on --out is released and the directory it made removed


def test_hung_rank_stops_rank_0_after_the_timeout(tmp_path) -> None:
    """A real hung peer (rank 1 sleeps in its first forward): rank 0 gives up at the round's gather after
    FP8PROBE_DIST_TIMEOUT seconds with exit 2 and one line naming the variable (was exit 3, 'internal error')."""
    res = _fp8probe(["analyze", f"{HERE / 'dist_factory.py'}:build_hanging", "-s", "global", "--threads", "1",
                     "--no-e2e", "--no-html", "-q", "--out", str(tmp_path / "o")], ranks=2,
                    env={distributed.ENV_TIMEOUT: "10"})
    assert res.returncode != 0  # (torchrun's own exit status)
    assert "failed (exitcode: 2) local_rank: 0" in res.stderr, res.stderr[-3000:]
    assert "Error: a peer rank timed out: rank 0 waited FP8PROBE_DIST_TIMEOUT=10 s for the other ranks" in res.stderr
    assert "internal error" not in res.stderr and not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize("mode", ["stream", "weights-only"])
def test_checkpoint_note_printed_once_not_per_rank(tmp_path, mode) -> None:
    """A legacy (non-zip) torch.save checkpoint gets a note that it is read whole; under torchrun every rank printed the
    same line, with --stream and for a weights-only analysis (rank 0 alone reads and reports)."""
    sys.path.insert(0, str(HERE))
    from stream_factory import build as build_tower

    legacy = tmp_path / "legacy.pt"
    torch.save(build_tower().state_dict(), legacy, _use_new_zipfile_serialization=False)
    inputs = tmp_path / "x.pt"
    torch.save([torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)], inputs)
    model_run = ["--stream", "--factory", f"{HERE / 'stream_factory.py'}:build", "--inputs", str(inputs)]
    run = _fp8probe(["analyze", str(legacy), *(model_run if mode == "stream" else []), "--threads", "1",
                     "--no-html", "-q", "--out", str(tmp_path / "out")], ranks=2)
    assert run.returncode == 0, run.stderr
    notes = [ln for ln in run.stderr.splitlines() if "legacy (non-zip) torch.save format" in ln]
    assert len(notes) == 1, run.stderr
