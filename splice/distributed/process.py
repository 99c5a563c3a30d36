"""One training process among many: the process group from torchrun's environment, and its rules.

``torchrun`` starts one process per GPU (or per CPU worker) and tells each its place through the
environment: ``RANK`` (0..WORLD_SIZE-1, over all nodes), ``LOCAL_RANK`` (its GPU on this node),
``WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT`` (the rendezvous). :func:`start` reads those,
picks the backend (NCCL on CUDA, gloo on CPU), pins the process to ``cuda:LOCAL_RANK`` and opens
the default process group with a collective ``timeout``: a rank that dies or stalls makes every
other rank's next collective fail within that time (gloo notices a closed peer at once), and
:func:`collective_errors` turns that failure into one :class:`RankFailure` line instead of a hang
or a backend traceback.

A single process asked for FSDP2 (``--shard``, no torchrun) gets a world of one on an in-memory
store, so the sharded code path runs (and is tested) on one GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from splice.core.errors import RunError

__all__ = ["DistEnv", "RankFailure", "all_reduce_sum", "barrier", "collective_errors", "launched",
           "main_first", "start", "stop"]

# torchrun sets these in every worker; all three mean "this process is one of a group".
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailure(RunError):
    """A collective failed: another rank died, stalled past the timeout, or lost its network
    (a run-time error: the command line reports it as one line, exit code 1)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the default process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "gloo"
    timeout_s: float
    owned: bool = True  # this code opened the group (and closes it in :func:`stop`)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes metrics and writes the adapter."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.backend})"


def launched() -> bool:
    """True inside a process started by torchrun (or with its environment set by hand)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def start(*, device_type: str, timeout_s: float = 600.0, single: bool = False) -> DistEnv | None:
    """Open the default process group from torchrun's environment; returns None when this is not
    a torchrun worker and ``single`` is off. ``single``: without torchrun, a world of one (for
    FSDP2 on one device). A group opened by the caller is adopted as it is (``owned=False``)."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                       backend=str(dist.get_backend()), timeout_s=timeout_s, owned=False)
    if not launched() and not single:
        return None
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: install a torch wheel with it")
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "pass torchrun --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
    timeout = timedelta(seconds=timeout_s)
    if launched():
        device_id = torch.device("cuda", local_rank) if device_type == "cuda" else None
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:  # one process, no rendezvous: an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   backend=backend, timeout_s=timeout_s)


def stop(env: DistEnv | None) -> None:
    """Close the group this code opened (a caller's own group is left open)."""
    if env is not None and env.owned and dist.is_initialized():
        # FSDP2 modules are freed only by the garbage collector; freed after the group is gone, a rank
        # can abort at exit ("terminate called without an active exception", ~1 run in 15 on gloo)
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(env: DistEnv | None) -> Iterator[None]:
    """Re-raise a failed collective as one clear :class:`RankFailure` naming this rank."""
    if env is None or env.world_size == 1:
        yield
        return
    try:
        yield
    except RankFailure:
        raise
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        lowered = text.lower()
        if not isinstance(exc, dist.DistError) and not any(
                word in lowered for word in ("gloo", "nccl", "connection", "timed out", "timeout",
                                             "peer", "socket", "store")):
            raise  # an ordinary error of this rank: its own traceback says more
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise RankFailure(
            f"{env.describe()}: a collective failed, so another rank died, stalled for over "
            f"{env.timeout_s:.0f}s or lost its connection (look at the other ranks' output for the "
            f"cause; raise --dist-timeout for slow steps): {first[:300]}") from exc


def barrier(env: DistEnv | None) -> None:
    if env is not None and env.world_size > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first(env: DistEnv | None) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a download or conversion cache), then the rest."""
    if env is not None and not env.is_main:
        barrier(env)
    yield
    if env is not None and env.is_main:
        barrier(env)


def all_reduce_sum(values: Sequence[float], env: DistEnv | None, *,
                   device: torch.device) -> list[float]:
    """Elementwise sum over ranks of a few numbers, in one float64 collective (one host sync)."""
    if env is None or env.world_size == 1:
        return [float(v) for v in values]
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    where = device if env.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=where)
    dist.all_reduce(tensor)
    return tensor.tolist()

