"""Tensor-parallel serving's engine: every rank runs the same steps on the same requests.

Each rank holds a slice of the model (:mod:`splice.distributed.tensor_parallel`) and its own
:class:`~splice.engine.engine.Engine` state (scheduler, KV cache of its KV heads, sampling
generators). The forward's all-reduces hand every rank the same logits, so if every rank's engine
takes the same requests, cancellations and adapter changes before the same step, every scheduler
makes the same decisions and every sampler draws the same tokens. :class:`LockstepEngine` makes it so:

* only rank 0 takes requests (:meth:`~LockstepEngine.submit`, the HTTP layer's thread) and adapter
  commands (:meth:`~LockstepEngine.call`); they wait in rank 0's own queues, not the engine's;
* before every step each rank calls :meth:`~LockstepEngine.step` (or :meth:`~LockstepEngine.run`),
  and rank 0 broadcasts a :class:`Boundary`: the requests that arrived (prompt ids, sampling
  params, adapter), the adapter loads and unloads (the folder: each rank reads and slices its own
  share), the requests cancelled since, and whether the server is closing. Every rank applies it,
  then steps. The broadcast is pickled (``broadcast_object_list``): our own dataclasses between our
  own ranks, never a file or anything a client sent as bytes;
* a cancellation (a client that went away, a callback that raised) only *asks* (:class:`AtBoundary`):
  the engine sees it at the next boundary, on every rank at once. Rank 0's engine never sees
  anything the others do not;
* sampling: a seeded request seeds its generator from its seed on every rank. An unseeded sampled
  request takes ``base + i``, where ``base`` is drawn on rank 0 once and broadcast at start and
  ``i`` counts the unseeded choices so far (the same count on every rank: they take requests in
  the same order);
* the KV cache has the same number of blocks on every rank (the smallest any rank could hold), so
  preemption happens alike;
* each boundary also carries rank 0's computed-token count and a checksum of every token accepted
  so far: a rank whose engine drifted from rank 0 (a nondeterministic kernel, a bug) stops with a
  :class:`~splice.distributed.process.RankFailure` instead of hanging in a mismatched collective.

The boundary goes over a gloo group of its own (CPU, no GPU sync), whatever backend the model's
all-reduces use. Offline :meth:`~splice.engine.engine.Engine.generate` works on every rank alike
(each rank passes the same prompts); seeds apply as above.
"""

from __future__ import annotations

import queue
import random
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from splice.distributed.process import RankFailure
from splice.distributed.tensor_parallel import ShardAdapter, sharding_of
from splice.engine.engine import Engine, EngineFull, eval_mode
from splice.engine.output import TokenLogprob
from splice.engine.request import Request
from splice.engine.sampling import SamplingParams, bounded_seed
from splice.engine.scheduler import Sequence as Seq
from splice.lora.bank import HostAdapter

__all__ = ["AtBoundary", "Arrival", "Boundary", "LockstepEngine"]

_SEED_SPACE = 1 << 63


class AtBoundary(threading.Event):
    """A request's ``cancelled`` under lockstep: :meth:`set` (any thread) only records the wish; the
    event is set when every rank applies it (:meth:`apply`, at a step boundary)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = False

    def set(self) -> None:
        self.asked = True

    def apply(self) -> None:
        super().set()


@dataclass(frozen=True)
class Arrival:
    """A request as the other ranks rebuild it (``number``: rank 0's count of requests)."""

    number: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None


@dataclass(frozen=True)
class AdapterChange:
    """Serve adapter ``key`` from folder ``source`` (None: stop serving it)."""

    key: str
    source: str | None


@dataclass(frozen=True)
class Boundary:
    """What every rank applies before one step (see module docstring)."""

    arrivals: tuple[Arrival, ...] = ()
    changes: tuple[AdapterChange, ...] = ()
    cancels: tuple[int, ...] = ()
    closing: bool = False
    computed: int = 0  # rank 0's computed tokens and accepted-token checksum so far
    digest: int = 0


class LockstepEngine(Engine):
    """An :class:`Engine` whose steps run in lockstep on every rank of ``group`` (see module
    docstring); the other arguments are the engine's. ``group`` defaults to the default process
    group's ranks (a new gloo group is made for the boundaries). It extends the engine where requests
    enter (its inbox, filled only at a boundary), where a choice's generator is seeded (``_prepare``)
    and where a token is accepted (``_accept``, for the checksum); the step itself is the engine's."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, group: Any = None, **options: Any) -> None:
        super().__init__(model, tokenizer, **options)
        self.control = dist.new_group(ranks=dist.get_process_group_ranks(group) if group is not None else None,
                                      backend="gloo")
        self.rank, self.world = dist.get_rank(self.control), dist.get_world_size(self.control)
        self._arrivals: queue.Queue[Request] = queue.Queue()  # rank 0: submitted, not yet broadcast
        self._calls: queue.Queue[Callable[[], None]] = queue.Queue()  # rank 0: adapter commands
        self._changes: list[AdapterChange] = []
        self._read: dict[str, ShardAdapter] = {}  # rank 0: adapters of this boundary's changes, as read
        self._live: dict[int, Request] = {}  # requests that may still be cancelled, by number
        self._numbers = 0
        self._digest = 0
        self._unseeded = 0
        self._seed_base = int(self._broadcast(random.SystemRandom().randrange(_SEED_SPACE)))
        self._agree_on_blocks()

    # ---- start -----------------------------------------------------------------------------
    def _broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.control, 0), group=self.control)
        return box[0]

    def _agree_on_blocks(self) -> None:
        """Every rank's scheduler gets the smallest KV cache any rank allocated (the same pool)."""
        blocks = torch.tensor([self.runner.num_blocks])
        if self.world > 1:
            dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.control)
        if int(blocks) != self.runner.num_blocks:
            self.runner.num_blocks = int(blocks)
            self.pool, self.scheduler = self._new_scheduler()

    # ---- rank 0's thread-safe API ---------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request`` for the next boundary (rank 0 only); its ``cancelled`` becomes an
        :class:`AtBoundary` (for every choice)."""
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: under tensor parallelism only rank 0 takes requests")
        cancelled = AtBoundary()
        for choice in request.choices:
            choice.cancelled = cancelled
        with self._lock:
            if self._queued >= self.max_waiting:
                raise EngineFull(f"{self._queued} requests are waiting (max_waiting={self.max_waiting})")
            self._queued += 1
        self._arrivals.put(request)

    def call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on rank 0 at the next boundary; the adapter changes it makes
        (:meth:`add_adapter` / :meth:`drop_adapter`) reach every rank at that boundary."""
        self._calls.put(command)

    def add_adapter(self, adapter: HostAdapter) -> None:
        """Rank 0 (a command at a boundary): serve ``adapter`` from this boundary on, on every rank. It takes
        effect after the boundary's broadcast, on every rank at the same point (:meth:`_apply`): a DoRA
        adapter's factors are summed over the ranks there (:meth:`Sharding.finish`)."""
        if not isinstance(adapter, ShardAdapter):
            raise TypeError(f"adapter {adapter.name!r}: under tensor parallelism adapters are read by "
                            "Sharding.read_adapter (each rank reads its share of the folder)")
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: under tensor parallelism only rank 0 changes adapters")
        self._changes.append(AdapterChange(adapter.name, adapter.source))
        self._read[adapter.name] = adapter  # read already (by the HTTP layer): not read again

    def drop_adapter(self, name: str) -> None:
        if self.rank != 0:
            raise RuntimeError(f"rank {self.rank}: under tensor parallelism only rank 0 changes adapters")
        self._changes.append(AdapterChange(name, None))

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> bool:
        """One step after a boundary (every rank calls it the same number of times)."""
        if not self._boundary(closing=False):
            raise RankFailure(f"rank {self.rank}: rank 0 closed the engine while this rank was stepping")
        return super().step()

    def run(self, stop: threading.Event, *, idle_wait: float = 0.005) -> None:
        """Step until rank 0's ``stop`` is set (the other ranks' ``stop`` is ignored: they follow
        rank 0, so that a drain on rank 0 can finish its requests)."""
        with eval_mode(self.model):
            while self._boundary(closing=stop.is_set()):
                if not super().step() and self.rank == 0:
                    stop.wait(idle_wait)

    def _boundary(self, *, closing: bool) -> bool:
        """Apply rank 0's :class:`Boundary` on every rank; False once rank 0 is closing."""
        self._live = {n: r for n, r in self._live.items() if not all(c.finished for c in r.choices)}
        if self.rank == 0:
            boundary = self._broadcast(self._gather(closing))
        else:
            boundary = self._broadcast(None)
            self._check_agrees(boundary)
        for change in boundary.changes:  # in order, on every rank (a DoRA adapter's factors are a collective)
            self._apply(change)
        if self.rank == 0:
            taken = [self._live[a.number] for a in boundary.arrivals]
        else:
            taken = [self._rebuild(arrival) for arrival in boundary.arrivals]
            with self._lock:
                self._queued += len(taken)
        for request in taken:
            self._inbox.put(request)
        for number in boundary.cancels:
            cancelled = self._live[number].cancelled
            assert isinstance(cancelled, AtBoundary)
            cancelled.apply()
        return not boundary.closing

    def _gather(self, closing: bool) -> Boundary:
        """Rank 0: run the queued commands, take the arrivals and the cancellations asked for."""
        while not self._calls.empty():
            self._calls.get_nowait()()
        changes, self._changes = tuple(self._changes), []
        arrivals = []
        while not self._arrivals.empty():
            request = self._arrivals.get_nowait()
            self._live[self._numbers] = request
            arrivals.append(Arrival(self._numbers, list(request.prompt_ids), request.params, request.adapter))
            self._numbers += 1
        cancels = tuple(n for n, r in self._live.items()
                        if isinstance(r.cancelled, AtBoundary) and r.cancelled.asked and not r.cancelled.is_set())
        return Boundary(tuple(arrivals), changes, cancels, closing, self.computed_tokens, self._digest)

    def _check_agrees(self, boundary: Boundary) -> None:
        if (boundary.computed, boundary.digest) != (self.computed_tokens, self._digest):
            raise RankFailure(
                f"rank {self.rank} drifted from rank 0 under tensor parallelism: {self.computed_tokens} tokens "
                f"computed here, {boundary.computed} on rank 0, or different tokens accepted (checksum "
                f"{self._digest:#x} vs {boundary.digest:#x}); a nondeterministic kernel or a bug: please report it")

    def _rebuild(self, arrival: Arrival) -> Request:
        request = Request(prompt_ids=arrival.prompt_ids, params=arrival.params, adapter=arrival.adapter,
                          cancelled=AtBoundary())
        self._live[arrival.number] = request
        return request

    def _apply(self, change: AdapterChange) -> None:
        """Rank 0's adapter change on this rank: rank 0 has the adapter read, the others read their share of
        the folder; then every rank sums the DoRA factors' norms (:meth:`Sharding.finish`) and serves it."""
        if change.source is None:
            return super().drop_adapter(change.key)
        sharding = sharding_of(self.model)
        if sharding is None:
            raise RuntimeError("an adapter change reached an engine whose model is not sharded")
        adapter = self._read.pop(change.key, None) if self.rank == 0 else None
        if adapter is None:
            adapter = sharding.read_adapter(change.source, name=change.key, model=self.model)
        super().add_adapter(sharding.finish(adapter))

    # ---- what must agree across ranks ---------------------------------------------------------
    def _prepare(self, request: Request) -> None:
        super()._prepare(request)
        if request.generator is not None and request.params.seed is None:  # fresh entropy differs by rank
            request.generator.manual_seed(bounded_seed((self._seed_base + self._unseeded) % _SEED_SPACE))
            self._unseeded += 1

    def _accept(self, seq: Seq, token: int, logprob: TokenLogprob | None = None) -> None:
        self._digest = zlib.crc32(token.to_bytes(8, "little", signed=True), self._digest)
        super()._accept(seq, token, logprob)
