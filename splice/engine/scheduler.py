"""The token-budget scheduler: which sequences compute which tokens in the next forward, and where their
K/V go in the paged cache (``BlockPool``). Plain Python, no torch.

One step (``schedule``) spends at most ``token_budget`` tokens: every running decode first (one token
each), then the next chunk of each running prefill, then new sequences from ``waiting`` in arrival order
(their prompts chunked to fit). So a long prompt is prefilled a chunk at a time between decode steps and
never stalls the sequences already generating. After the forward the engine calls ``advance(plan)``, then
``append`` for each sampled token and ``finish`` for the sequences that are done.

Rules worth knowing:

- Admission asks ``admit(seq)`` (the engine's adapter gate) right before a sequence would join ``running``;
  False leaves it waiting without holding up the sequences behind it (no head-of-line blocking). A sequence
  that does not fit the free blocks does stop admissions for that step, so a long prompt is not starved by
  short ones.
- Prefix caching: at admission the sequence's leading full blocks are looked up by hash (tokens + adapter);
  hits are shared, not recomputed. The last token is always computed (its logits give the next token), so
  the hits stop at ``len(tokens) - 1``.
- When a running sequence needs a block and none is free, the most recently admitted running sequence not
  yet given work this step is preempted: its blocks are freed, ``num_computed = 0`` and it goes back to the
  front of ``waiting``; its generated tokens stay in ``tokens`` and are recomputed (mostly as prefix hits)
  when it is admitted again. No admissions happen in a step that preempted.
- ``fork`` (n > 1 sampling) shares every block, the partial last one too; the first write into a block
  held by more than one sequence goes to a fresh copy: ``plan.copies`` lists (src, dst) blocks the runner
  copies before the forward.
- Lengths: positions 0 .. max_len - 1 are computed at most. As in vLLM the engine finishes a sequence once
  ``len(tokens) >= max_len`` (``schedule`` raises for one past max_len). The pool must hold ``max_len``
  positions, so every admitted sequence can always run on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from splice.engine.blocks import BlockHash, BlockPool, hash_block


@dataclass(eq=False, kw_only=True)
class Sequence:
    """One generation stream. Identity (not value) equality: the scheduler keys its sets by the object."""

    seq_id: int
    tokens: list[int]  # prompt + generated so far
    prompt_len: int
    adapter: str | None = None  # K/V differ per adapter: the prefix-cache keys include it
    max_tokens: int  # cap on generated tokens (the engine finishes the sequence; informational here)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)  # block table: position p is in block_ids[p // bs]
    payload: Any = None  # the engine's request object
    arrival: int  # order of submission (FCFS)
    block_hashes: list[BlockHash] = field(default_factory=list)  # prefix-cache keys of its full blocks
    num_cached_blocks: int = 0  # leading blocks committed to the prefix cache

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class Chunk:
    """``seq.tokens[start:start + count]`` are computed in this step (their K/V written at positions
    start .. start + count - 1). ``sample``: the chunk ends at the last token, so the step yields the
    sequence's next token."""

    seq: Sequence
    start: int
    count: int
    sample: bool


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)  # decodes first, then prefill chunks
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    preempted: list[Sequence] = field(default_factory=list)  # moved back to waiting in this step

    @property
    def num_tokens(self) -> int:
        return sum(chunk.count for chunk in self.chunks)


def _admit_all(seq: Sequence) -> bool:
    return True


class Scheduler:
    """Decides each step's chunks over ``pool``; at most ``max_seqs`` running sequences and
    ``token_budget`` tokens a step. ``prefix_caching=False``: no prefix-cache lookups or commits (every
    prompt is computed in full). Not thread-safe: the engine's loop is its only caller."""

    def __init__(self, pool: BlockPool, *, max_seqs: int, token_budget: int, max_len: int,
                 admit: Callable[[Sequence], bool] = _admit_all, prefix_caching: bool = True) -> None:
        for name, value in (("max_seqs", max_seqs), ("token_budget", token_budget), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"Scheduler: {name}={value}; it must be at least 1")
        if token_budget < max_seqs:
            raise ValueError(f"Scheduler: token_budget={token_budget} is below max_seqs={max_seqs}; every running "
                             f"sequence decodes one token a step, so raise token_budget or lower max_seqs")
        if pool.blocks_for(max_len) > pool.num_usable:
            raise ValueError(
                f"Scheduler: max_len={max_len} needs {pool.blocks_for(max_len)} blocks of {pool.block_size} "
                f"but the pool has {pool.num_usable} usable (+1 scratch); raise num_blocks or lower max_len")
        self.pool = pool
        self.max_seqs = max_seqs
        self.token_budget = token_budget
        self.max_len = max_len
        self._admit = admit
        self.prefix_caching = prefix_caching
        self._waiting: deque[Sequence] = deque()
        self._running: dict[Sequence, None] = {}  # admission order (an ordered set)

    @property
    def waiting(self) -> tuple[Sequence, ...]:
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Sequence, ...]:
        return tuple(self._running)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError, before any work, for one that can never run."""
        if not seq.tokens:
            raise ValueError(f"sequence {seq.seq_id}: the prompt is empty; give at least one token")
        if len(seq.tokens) > self.max_len:
            raise ValueError(f"sequence {seq.seq_id}: the prompt has {len(seq.tokens)} tokens, more than "
                             f"max_len={self.max_len}; shorten it or raise max_len")
        if seq.num_computed or seq.block_ids:
            raise ValueError(f"sequence {seq.seq_id}: it already holds cache blocks; add a fresh Sequence")
        self._waiting.append(seq)

    def schedule(self) -> StepPlan:
        """The next step's chunks, with their blocks allocated (see the module docstring)."""
        plan = StepPlan()
        budget = self.token_budget
        scheduled: set[Sequence] = set()
        for seq in self._running:
            self._check_len(seq)
        todo = [s for s in self._running if s.num_computed < len(s.tokens)]  # else waits for append()
        decodes = [s for s in todo if len(s.tokens) - s.num_computed == 1]
        prefills = [s for s in todo if len(s.tokens) - s.num_computed > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq in self._running:  # not preempted for an earlier one
                count = self._grow(seq, budget, scheduled, plan)
                budget -= count
        if not plan.preempted:  # memory is short in a step that preempted: admitting would thrash
            self._admit_waiting(budget, plan)
        return plan

    def advance(self, plan: StepPlan) -> None:
        """After the forward: the chunks' K/V are in the cache. Full blocks join the prefix cache."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq not in self._running:  # finished (cancelled) since schedule()
                continue
            if seq.num_computed != chunk.start:
                raise ValueError(f"advance: sequence {seq.seq_id} is at {seq.num_computed} tokens, the chunk "
                                 f"starts at {chunk.start}; call advance once per plan, in order")
            seq.num_computed += chunk.count
            if not self.prefix_caching:
                continue
            for i in range(seq.num_cached_blocks, seq.num_computed // self.pool.block_size):
                self.pool.commit(seq.block_ids[i], self._block_hash(seq, i))
            seq.num_cached_blocks = max(seq.num_cached_blocks, seq.num_computed // self.pool.block_size)

    def append(self, seq: Sequence, token: int) -> None:
        """A sampled token joins ``seq.tokens`` (computed in a later step, unless ``seq`` now has more than
        ``max_len`` tokens: then the engine must finish it before the next ``schedule``)."""
        seq.tokens.append(token)

    def finish(self, seq: Sequence) -> None:
        """Done or cancelled: drop ``seq`` and free its blocks (committed ones stay findable until evicted).
        Finishing a sequence the scheduler does not hold is a no-op."""
        if seq in self._running:
            del self._running[seq]
            self._release(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)

    def fork(self, seq: Sequence, seq_id: int) -> Sequence:
        """A copy of ``seq`` (n > 1 sampling) that shares all its blocks; writes into shared blocks are
        copy-on-write. With ``max_seqs`` already running, the copy waits (and is recomputed, its full
        blocks as prefix hits)."""
        if seq not in self._running and seq not in self._waiting:
            raise ValueError(f"fork: sequence {seq.seq_id} is not scheduled (finished or never added)")
        child = Sequence(seq_id=seq_id, tokens=list(seq.tokens), prompt_len=seq.prompt_len, adapter=seq.adapter,
                         max_tokens=seq.max_tokens, payload=seq.payload, arrival=seq.arrival,
                         block_hashes=list(seq.block_hashes))
        if seq in self._running and len(self._running) < self.max_seqs:
            for block in seq.block_ids:
                self.pool.share(block)
            child.block_ids = list(seq.block_ids)
            child.num_computed = seq.num_computed
            child.num_cached_blocks = seq.num_cached_blocks
            self._running[child] = None
        else:
            self._waiting.appendleft(child)
        return child

    # -- internals --

    def _grow(self, seq: Sequence, budget: int, scheduled: set[Sequence], plan: StepPlan) -> int:
        """Schedule the next chunk of running ``seq`` (at most ``budget`` tokens), preempting for blocks
        if needed; returns the tokens scheduled (0 when ``seq`` itself was preempted)."""
        start = seq.num_computed
        want = min(len(seq.tokens) - start, budget)
        while (count := self._fit(seq, start, want)) == 0:
            # the newest running sequence without work this step; seq itself qualifies, so one exists
            victim = next(s for s in reversed(self._running) if s not in scheduled)
            self._preempt(victim, plan)
            if victim is seq:
                return 0
        self._reserve(seq, start, count, plan)
        plan.chunks.append(Chunk(seq=seq, start=start, count=count, sample=start + count == len(seq.tokens)))
        scheduled.add(seq)
        return count

    def _admit_waiting(self, budget: int, plan: StepPlan) -> None:
        """Move waiting sequences to running while the budget, ``max_seqs`` and the free blocks allow."""
        bs = self.pool.block_size
        skipped: list[Sequence] = []
        while self._waiting and budget > 0 and len(self._running) < self.max_seqs:
            seq = self._waiting[0]
            self._check_len(seq)
            hits = (self.pool.lookup(self._block_hash(seq, i) for i in range((len(seq.tokens) - 1) // bs))
                    if self.prefix_caching else [])
            revived = sum(1 for block in hits if self.pool.refcount(block) == 0)  # leave the evictable list
            start = len(hits) * bs
            count = min(len(seq.tokens) - start, budget, (self.pool.num_free - revived) * bs)
            if count <= 0:
                break  # out of blocks: the sequences behind wait too, so this one is not starved
            if not self._admit(seq):
                skipped.append(self._waiting.popleft())
                continue
            self._waiting.popleft()
            for block in hits:
                self.pool.share(block)
            seq.block_ids, seq.num_computed, seq.num_cached_blocks = hits, start, len(hits)
            self._reserve(seq, start, count, plan)
            plan.chunks.append(Chunk(seq=seq, start=start, count=count, sample=start + count == len(seq.tokens)))
            self._running[seq] = None
            budget -= count
        self._waiting.extendleft(reversed(skipped))

    def _fit(self, seq: Sequence, start: int, want: int) -> int:
        """The most tokens (<= ``want``) from ``start`` whose new and copy-on-write blocks are free now."""
        bs = self.pool.block_size
        first, held = start // bs, len(seq.block_ids)
        touched = seq.block_ids[first:self.pool.blocks_for(start + want)]
        spare = self.pool.num_free - sum(1 for block in touched if self.pool.refcount(block) > 1)
        if spare < 0:
            return 0
        return max(0, min(want, (held + spare) * bs - start))

    def _reserve(self, seq: Sequence, start: int, count: int, plan: StepPlan) -> None:
        """Give ``seq`` writable blocks for positions start .. start + count - 1 (``_fit`` said they fit):
        shared blocks among them are replaced by copies, missing ones allocated."""
        bs = self.pool.block_size
        end = self.pool.blocks_for(start + count)
        for i in range(start // bs, min(len(seq.block_ids), end)):
            shared = seq.block_ids[i]
            if self.pool.refcount(shared) > 1:
                seq.block_ids[i] = self.pool.allocate()
                if i * bs < start:  # positions before start hold K/V this sequence still reads
                    plan.copies.append((shared, seq.block_ids[i]))
                self.pool.free(shared)
        while len(seq.block_ids) < end:
            seq.block_ids.append(self.pool.allocate())

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        del self._running[seq]
        self._release(seq)
        self._waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _release(self, seq: Sequence) -> None:
        # last block first: a freed prefix is evicted from its tail, so its head stays findable longest
        for block in reversed(seq.block_ids):
            self.pool.free(block)
        seq.block_ids, seq.num_computed, seq.num_cached_blocks = [], 0, 0

    def _check_len(self, seq: Sequence) -> None:
        if len(seq.tokens) > self.max_len:
            raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.tokens)} tokens, more than max_len="
                               f"{self.max_len}: the engine must finish a sequence once it reaches max_len")

    def _block_hash(self, seq: Sequence, index: int) -> BlockHash:
        """The prefix-cache key of ``seq``'s full block ``index``, computed once and kept on ``seq``."""
        bs, hashes = self.pool.block_size, seq.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if i else None, seq.tokens[i * bs:(i + 1) * bs], seq.adapter))
        return hashes[index]


def iter_positions(chunk: Chunk, block_size: int) -> Iterator[tuple[int, int]]:
    """(position, cache slot) of each token ``chunk`` computes: slot = block * block_size + offset."""
    table = chunk.seq.block_ids
    for p in range(chunk.start, chunk.start + chunk.count):
        yield p, table[p // block_size] * block_size + p % block_size
