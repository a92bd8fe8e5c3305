"""Data-parallel analysis under torchrun: batch i runs on rank i % world size, and every rank merges the per-batch states in batch order.

Why per-batch states and not one partial state per rank: float sums depend on their order. A
single process adds batch 0's sums, then batch 1's, ...; a rank holding batches 1, 3, 5 would add
those first and the final ``rank0 + rank1`` would round differently. So every batch is analysed
into a fresh (empty) accumulator, the per-batch states of a round of ``size`` batches are gathered
(``all_gather_object``), and every rank folds them into its totals in batch order. The one-process
path does exactly the same fold (``map_batches`` with size 1), so 1 rank and N ranks give
bit-identical tables. All ranks hold the same totals after each round, which the end-to-end mode
needs: its search decides the next run from the previous result, on every rank alike.

Errors: an exception on any rank inside a batch travels in that round's gather and is raised on
every rank (same class for LoadError/ValueError/TypeError, so the CLI exits 2 everywhere). A rank
that dies outside a collective is torchrun's to handle (it stops the other workers); the process
group timeout (``FP8PROBE_DIST_TIMEOUT`` seconds, default 1800) bounds any other wait. A collective that
fails because a peer died or did not answer in time raises PeerRankError on the ranks still running:
an environment problem (the CLI exits 2 naming it), not a bug of the rank that reports it.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .loading import LoadError, one_line

T = TypeVar("T")

ENV_TIMEOUT = "FP8PROBE_DIST_TIMEOUT"
# One round waits for the slowest rank's batch; a 70B model's layer replays can take minutes per
# batch, so the default is generous (torch's own default for gloo is 30 min as well).
DEFAULT_TIMEOUT_S = 1800
_RAISED_AS = {"LoadError": LoadError, "ValueError": ValueError, "TypeError": TypeError}
# How the backends word a collective that gave up waiting: gloo "Timed out waiting 30000ms for send operation to
# complete", NCCL "Watchdog caught collective operation timeout".
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# gloo prefixes its messages with the C++ source location: "[/__w/.../gloo/transport/tcp/pair.cc:553] ".
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*:\d+\]\s*")
# Characters of the backend's message quoted in a PeerRankError (the error stays one terminal-friendly line).
_MAX_CAUSE = 100


class PeerRankError(RuntimeError):
    """A collective failed on this rank because another rank died or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process' place among the ranks (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes outputs and talks to the user."""
        return self.rank == 0


def current() -> World:
    """The initialised default process group's rank and size, else the single-process World()."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer >= {minimum} in ${name}, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"expected an integer >= {minimum} in ${name}, got {value}")
    return value


def init_from_env(device: str = "cpu") -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), once per process.

    Backend: NCCL for ``device`` "cuda" (each rank on GPU LOCAL_RANK), gloo otherwise. Without
    torchrun's variables (or WORLD_SIZE 1) nothing is initialised and World() is returned.
    """
    size = _env_int("WORLD_SIZE", 1, 1)
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise ValueError(f"expected a torch build with torch.distributed for WORLD_SIZE={size}, got one without it")
    timeout = _env_int(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, 1)
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0, 0))
        backend = "nccl"
    dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout))
    atexit.register(_shutdown)
    return current()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(op: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run the collective ``op(*args, **kwargs)``; a backend failure (a peer's connection closed, the wait
    timed out: a RuntimeError from gloo or NCCL) becomes one PeerRankError line that says which and what to do."""
    try:
        op(*args, **kwargs)
    except RuntimeError as exc:
        rank = current().rank
        if _TIMED_OUT.search(str(exc)):
            timeout = _env_int(ENV_TIMEOUT, DEFAULT_TIMEOUT_S, 1)
            raise PeerRankError(f"a peer rank timed out: rank {rank} waited {ENV_TIMEOUT}={timeout} s for the other "
                                "ranks (one hung, or its batch takes longer): check that rank's output, or raise "
                                f"{ENV_TIMEOUT}") from exc
        # the first sentence without gloo's source location: "Connection closed by peer [127.0.0.1]:14764"
        cause = _SOURCE_LOCATION.sub("", (str(exc).strip().splitlines() or [""])[0]).split(". ")[0].rstrip(".")
        cause = cause if len(cause) <= _MAX_CAUSE else cause[:_MAX_CAUSE - 1] + "…"
        raise PeerRankError(f"a peer rank failed: rank {rank} lost its connection to the other ranks "
                            f"({cause or type(exc).__name__}); that rank's own output says why it stopped") from exc


def agree(value: T, world: World | None = None) -> T:
    """Rank 0's ``value`` on every rank: for decisions taken from timings (which differ between ranks)."""
    world = world or current()
    if world.size == 1:
        return value
    box = [value]
    _collective(dist.broadcast_object_list, box, src=0)
    return box[0]


def check_same_model(module: Any, world: World | None = None) -> None:
    """Raise LoadError unless every rank holds the same model: its parameters' names, shapes, dtypes and (for
    parameters with data) values, the last as a float64 sum and sum of squares compared to 1e-9 relative.

    Why: each rank captures its own batches and the per-batch states are folded on every rank, so a rank that
    loaded another model (another checkpoint, a factory that reads the rank) was merged into the tables
    silently. Not for FSDP2 (each rank holds a shard) or a non-module program's graph parameters alike."""
    world = world or current()
    if world.size == 1 or not isinstance(module, torch.nn.Module) or lockstep(module):
        return
    mine = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = (None if p.device.type == "meta" or not p.is_floating_point() else
                      (float(p.detach().double().sum()), float(p.detach().double().square().sum())))
            mine.append((name, tuple(p.shape), str(p.dtype), values))
    every: list = [None] * world.size
    _collective(dist.all_gather_object, every, mine)
    first = every[0]
    for rank, other in enumerate(every[1:], start=1):
        names0, names = [x[0] for x in first], [x[0] for x in other]
        if names != names0:
            extra = sorted(set(names) ^ set(names0))[:3]
            raise LoadError(f"rank {rank} loaded another model than rank 0 ({len(names)} vs {len(names0)} parameter "
                            f"tensors; not in both: {', '.join(extra) or 'the order differs'}): every rank must load "
                            "the same model")
        for (n, shape0, dtype0, v0), (_, shape, dtype, v) in zip(first, other):
            close = v0 is None or v is None or all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-30)
                                                    for a, b in zip(v0, v))
            if (shape, dtype) != (shape0, dtype0) or not close:
                what = (f"{list(shape)} {dtype} vs {list(shape0)} {dtype0}" if (shape, dtype) != (shape0, dtype0)
                        else "other values")
                raise LoadError(f"rank {rank} loaded another model than rank 0: parameter {n} has {what}; every "
                                "rank must load the same model (the same file, seed and factory)")


def lockstep(module: Any) -> bool:
    """True when every rank must run every forward/backward together: a model sharded with FSDP2
    (``fully_shard``), whose parameter all-gathers and gradient reduce-scatters are collectives."""
    if not (dist.is_available() and isinstance(module, torch.nn.Module)):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def map_batches(n: int, fn: Callable[[int], T], world: World | None = None,
                pad: bool = False) -> Iterator[tuple[int, T]]:
    """Yield ``(i, fn(i))`` for every batch i in 0..n-1, in batch order, on every rank.

    Batch i runs on rank ``i % size``; results travel by ``all_gather_object`` once per round of
    ``size`` batches, so a consumer that folds each result in before asking for the next sees the
    totals of every earlier round when the next round starts (fresh accumulators may read them).
    ``pad``: a rank without a batch in the last round runs ``fn`` on that round's first batch and
    discards the result (FSDP2 needs every rank in every forward: ``lockstep``), so ``fn``'s side
    effects must be harmless when repeated.
    With one process this is ``(i, fn(i)) for i in range(n)``, lazily, exceptions raised as they come.
    """
    world = world or current()
    if world.size == 1:
        for i in range(n):
            yield i, fn(i)
        return
    counts: list[Any] = [None] * world.size
    _collective(dist.all_gather_object, counts, n)  # (ranks with other batch lists failed inside the rounds with raw errors)
    if len(set(counts)) > 1:
        raise LoadError(f"the ranks have different numbers of batches ({', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}): "
                        "every rank must load the same inputs")
    for start in range(0, n, world.size):
        i = start + world.rank
        payload: tuple
        try:
            if i < n:
                payload = ("ok", i, fn(i))
            else:
                if pad:
                    fn(start)
                payload = ("none", i, None)
        except Exception as exc:  # noqa: BLE001 - carried to every rank, raised there as below
            # by the nearest class every rank raises alike: capture.InputsError (a LoadError) stays an input error
            kind = next((k for k, cls in _RAISED_AS.items() if isinstance(exc, cls)), type(exc).__name__)
            payload = ("error", i, (kind, one_line(exc), world.rank))
        parts: list[Any] = [None] * world.size
        _collective(dist.all_gather_object, parts, payload)
        for status, j, value in parts:
            if status == "error":
                name, msg, rank = value
                raise _RAISED_AS.get(name, RuntimeError)(f"{msg} (rank {rank}, batch {j})")
        for status, j, value in parts:
            if status == "ok":
                yield j, value
