"""Recipes of one GEMM site replayed in parallel (pipeline.replay_workers): the same tables, errors and
warnings as the serial replay, one intra-op thread per worker, and the cases that stay serial."""
from __future__ import annotations

import dataclasses
import threading
import warnings

import pandas as pd
import pytest
import torch

from fp8probe.analysis import pipeline as P
from fp8probe.analysis import strategies as S
from fp8probe.analysis.pipeline import analyze, replay_workers
from fp8probe.backends import cpu as _cpu

needs_c = pytest.mark.skipif(not _cpu.enabled(), reason="compares with a serial replay at two threads: the C metrics' "
                                                          "sums are the same at any thread count")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pool_calls(monkeypatch):
    """How many sites ran through the worker pool."""
    calls = []
    real = P._pool

    def counting(workers):
        calls.append(workers)
        return real(workers)

    monkeypatch.setattr(P, "_pool", counting)
    return calls


def _run(monkeypatch, workers: str, *args, **kwargs):
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", workers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = analyze(*args, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _assert_same_tables(a, b) -> None:
    assert list(a.tables) == list(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], check_exact=True, obj=name)


@needs_c
def test_parallel_tables_equal_the_serial_ones(monkeypatch, two_threads, pool_calls, tiny_model, tiny_batches) -> None:
    """Every strategy (stateful delayed scaling included), two batches, the end-to-end sensitivity estimate
    fed from the replay: the parallel run's tables are the serial run's to the bit, rows in the same order."""
    serial, _ = _run(monkeypatch, "1", tiny_model, tiny_batches, "all", e2e=True, budget="loss:5%")
    assert pool_calls == []
    parallel, _ = _run(monkeypatch, "2", tiny_model, tiny_batches, "all", e2e=True, budget="loss:5%")
    assert pool_calls and set(pool_calls) == {2}  # every site of the tiny model went through the pool
    _assert_same_tables(serial, parallel)
    untimed = [{k: v for k, v in r.metadata["e2e"].items() if not k.endswith("seconds")} for r in (serial, parallel)]
    assert untimed[0] == untimed[1]


@needs_c
@pytest.mark.parametrize("strategy", ["global", "int8", "ocp-blockwise", "delayed"])
def test_one_recipe_in_the_pool_gives_the_serial_tables(monkeypatch, two_threads, pool_calls, tiny_model, tiny_batches,
                                                        strategy) -> None:
    """A single recipe replays in the pool too (beside the site's reference and statistics): the same tables to the
    bit, stateful delayed scaling included."""
    serial, _ = _run(monkeypatch, "1", tiny_model, tiny_batches, strategy, e2e=False)
    assert pool_calls == []
    parallel, _ = _run(monkeypatch, "2", tiny_model, tiny_batches, strategy, e2e=False)
    assert pool_calls and set(pool_calls) == {2}
    _assert_same_tables(serial, parallel)


@pytest.mark.parametrize("strategy", ["all", "global"])
def test_torch_metrics_in_the_pool_give_the_one_thread_serial_tables(monkeypatch, two_threads, pool_calls, tiny_model,
                                                                     tiny_batches, strategy) -> None:
    """The torch metrics (no C extension, FP8PROBE_BACKEND=reference) replay in the pool too. Their float64
    reductions split by intra-op thread, and a worker runs one: the tables are the serial replay's at one thread
    to the bit (every strategy, stateful delayed scaling included)."""
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")
    torch.set_num_threads(1)
    serial, _ = _run(monkeypatch, "1", tiny_model, tiny_batches, strategy, e2e=False)
    torch.set_num_threads(2)
    assert pool_calls == []
    parallel, _ = _run(monkeypatch, "2", tiny_model, tiny_batches, strategy, e2e=False)
    assert pool_calls and set(pool_calls) == {2}
    _assert_same_tables(serial, parallel)


def test_a_pooled_site_fits_one_chunk_of_the_torch_metrics() -> None:
    from fp8probe.analysis import metrics as M

    assert P.PARALLEL_MAX_ELEMENTS <= M.CHUNK


@needs_c
def test_a_failing_recipe_is_reported_the_same_way(monkeypatch, two_threads, pool_calls, tiny_model,
                                                   tiny_batches) -> None:
    """A recipe that raises on some layers: the same errors table and the same warnings, in the same order."""
    base = S.STRATEGIES["ocp-rowwise"]

    def flaky(A, W, G, threshold, b_is_weight=True):
        if W.shape[-2] == W.shape[-1]:  # square weights only (attention projections)
            raise ValueError("expected a non-square weight, got a square one")
        return base.run(A, W, G, threshold, b_is_weight)

    monkeypatch.setitem(S.STRATEGIES, "flaky", dataclasses.replace(base, name="flaky", run=flaky, batched=False))
    serial, warned_serial = _run(monkeypatch, "1", tiny_model, tiny_batches, "global,flaky,int8", e2e=False)
    parallel, warned_parallel = _run(monkeypatch, "2", tiny_model, tiny_batches, "global,flaky,int8", e2e=False)
    assert pool_calls
    assert "errors" in serial.tables and len(serial.tables["errors"])
    _assert_same_tables(serial, parallel)
    assert warned_serial == warned_parallel and any("flaky" in w for w in warned_parallel)


def test_workers_run_one_intra_op_thread_and_the_caller_keeps_its_own(monkeypatch, two_threads, tiny_model,
                                                                      tiny_batches) -> None:
    base = S.STRATEGIES["global"]
    seen: list[tuple[bool, int]] = []

    def spy(A, W, G, threshold, b_is_weight=True):
        seen.append((threading.current_thread().name.startswith("fp8probe-replay"), torch.get_num_threads()))
        return base.run(A, W, G, threshold, b_is_weight)

    monkeypatch.setitem(S.STRATEGIES, "spy", dataclasses.replace(base, name="spy", run=spy))
    res, _ = _run(monkeypatch, "2", tiny_model, tiny_batches, "spy,ocp-rowwise", e2e=False)
    assert "errors" not in res.tables
    # every site of the tiny model runs in the pool (also while earlier sites are still there and the
    # caller runs with one thread), each recipe with one intra-op thread
    assert seen and set(seen) == {(True, 1)}
    assert torch.get_num_threads() == 2


def _site(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(16, n, generator=g), torch.randn(n // 2, n, generator=g), torch.randn(16, n // 2, generator=g))


def test_replay_workers_decides_when_to_go_parallel(monkeypatch, two_threads) -> None:
    monkeypatch.delenv("FP8PROBE_REPLAY_WORKERS", raising=False)
    A, W, G = _site()
    assert replay_workers(A, W, G, 8) == 2
    assert replay_workers(A, W, None, 8) == 2
    assert replay_workers(A, W, G, 1) == 2                      # one recipe: beside the reference and stats
    assert replay_workers(A, W, G, 0) == 1                      # none: the statistics alone
    monkeypatch.setattr(P, "PARALLEL_MAX_ELEMENTS", A.numel() + W.numel() + G.numel() - 1)
    assert replay_workers(A, W, G, 8) == 1                      # a large site: one recipe at a time
    monkeypatch.setattr(P, "PARALLEL_MAX_ELEMENTS", 1 << 22)
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", "1")
    assert replay_workers(A, W, G, 8) == 1
    monkeypatch.setenv("FP8PROBE_BACKEND", "reference")        # torch metrics: the pool too
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", "4")
    assert replay_workers(A, W, G, 8) == 2                      # capped by torch's thread count
    monkeypatch.delenv("FP8PROBE_BACKEND")
    torch.set_num_threads(1)
    assert replay_workers(A, W, G, 8) == 1                      # --threads 1: one thread in all


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_worker_cap_is_a_clear_error(monkeypatch, bad) -> None:
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", bad)
    A, W, G = _site()
    with pytest.raises(ValueError, match="FP8PROBE_REPLAY_WORKERS must be a positive integer"):
        replay_workers(A, W, G, 8)


def test_an_unexpected_error_in_a_worker_reaches_the_caller_and_threads_are_restored(monkeypatch, two_threads,
                                                                                    tiny_model, tiny_batches) -> None:
    """A recipe error that is not a recorded failure (a bug) propagates from the pool; the caller's intra-op
    threads come back and nothing is left running."""
    base = S.STRATEGIES["global"]

    def broken(A, W, G, threshold, b_is_weight=True):
        raise KeyError("a bug in a recipe")

    monkeypatch.setitem(S.STRATEGIES, "broken", dataclasses.replace(base, name="broken", run=broken))
    monkeypatch.setenv("FP8PROBE_REPLAY_WORKERS", "2")
    with pytest.raises(KeyError, match="a bug in a recipe"):
        analyze(tiny_model, tiny_batches, "global,broken", e2e=False)
    assert torch.get_num_threads() == 2
    res = analyze(tiny_model, tiny_batches, "global,int8", e2e=False)  # the pool is free for the next run
    assert set(res.tables["gemm"]["strategy"]) == {"global", "int8"}
