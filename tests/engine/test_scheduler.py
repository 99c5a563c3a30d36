"""Scheduler: token budget, chunked prefill, admission, prefix caching, copy-on-write, preemption.

``Sim`` drives the scheduler as the engine does, over a fake KV cache that records, per slot, which
(adapter, prefix) the K/V there stand for. Every step checks that each chunk's sequence reads back exactly
its own K/V for every position up to the chunk's end, so a wrong block table, a missed copy-on-write, a
block freed while in use or a wrong prefix hit fails the test, not only the bookkeeping invariants."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.engine.blocks import BlockPool
from splice.engine.scheduler import Scheduler, Sequence, StepPlan, iter_positions


def _kv(seq: Sequence, position: int) -> tuple[str | None, tuple[int, ...]]:
    """What the K/V at ``position`` depend on: the adapter and every token up to it."""
    return seq.adapter, tuple(seq.tokens[:position + 1])


class Sim:
    def __init__(self, *, num_blocks: int, block_size: int, max_seqs: int = 8, token_budget: int = 64,
                 max_len: int | None = None, admit: Callable[[Sequence], bool] = lambda seq: True) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.sched = Scheduler(self.pool, max_seqs=max_seqs, token_budget=token_budget,
                               max_len=max_len or (num_blocks - 1) * block_size, admit=admit)
        self.cache: dict[int, tuple[str | None, tuple[int, ...]]] = {}
        self.done: dict[int, list[int]] = {}
        self.arrivals = 0

    def add(self, prompt: list[int], *, seq_id: int, adapter: str | None = None, max_tokens: int = 4) -> Sequence:
        seq = Sequence(seq_id=seq_id, tokens=list(prompt), prompt_len=len(prompt), adapter=adapter,
                       max_tokens=max_tokens, arrival=self.arrivals)
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def step(self, *, fork: Callable[[Sequence], int | None] = lambda seq: None) -> StepPlan:
        """One engine step; ``fork(seq)`` gives a new seq_id to fork a sampled sequence (n > 1)."""
        bs = self.pool.block_size
        plan = self.sched.schedule()
        assert plan.num_tokens <= self.sched.token_budget
        for src, dst in plan.copies:
            for offset in range(bs):
                if src * bs + offset in self.cache:
                    self.cache[dst * bs + offset] = self.cache[src * bs + offset]
        for chunk in plan.chunks:
            for position, slot in iter_positions(chunk, bs):
                assert slot >= bs, "block 0 is scratch"
                self.cache[slot] = _kv(chunk.seq, position)
        for chunk in plan.chunks:  # attention reads after every write of the step
            seq = chunk.seq
            for position in range(chunk.start + chunk.count):
                slot = seq.block_ids[position // bs] * bs + position % bs
                assert self.cache.get(slot) == _kv(seq, position), (seq.seq_id, position)
        self.sched.advance(plan)
        for chunk in plan.chunks:
            if chunk.sample:
                child_id = fork(chunk.seq)
                child = None if child_id is None else self.sched.fork(chunk.seq, child_id)
                self._sampled(chunk.seq)
                if child is not None:
                    self._sampled(child)
        check_invariants(self.sched)
        return plan

    def _sampled(self, seq: Sequence) -> None:
        self.sched.append(seq, (sum(seq.tokens) + seq.seq_id) % 5)  # deterministic, differs per fork
        if seq.num_generated >= seq.max_tokens or len(seq.tokens) >= self.sched.max_len:
            self.sched.finish(seq)
            self.done[seq.seq_id] = seq.tokens

    def drain(self, *, steps: int = 500) -> None:
        for _ in range(steps):
            if not self.sched.running and not self.sched.waiting:
                return
            self.step()
        raise AssertionError("the scheduler made no progress")


def check_invariants(sched: Scheduler) -> None:
    pool = sched.pool
    owners = Counter(block for seq in sched.running for block in seq.block_ids)
    assert 0 not in owners
    for seq in sched.running:
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        assert pool.blocks_for(seq.num_computed) <= len(seq.block_ids)
        assert seq.num_computed <= len(seq.tokens)
    for seq in sched.waiting:
        assert not seq.block_ids and seq.num_computed == 0
    assert all(pool.refcount(b) == owners[b] for b in range(1, pool.num_blocks))
    assert pool.num_free + len(owners) == pool.num_usable
    assert len(sched.running) <= sched.max_seqs


def _chunks(plan: StepPlan) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start, c.count, c.sample) for c in plan.chunks]


def test_a_prompt_is_prefilled_then_decoded() -> None:
    sim = Sim(num_blocks=8, block_size=4)
    seq = sim.add(list(range(10)), seq_id=1, max_tokens=3)
    assert _chunks(sim.step()) == [(1, 0, 10, True)]
    assert seq.block_ids == [1, 2, 3] and sim.pool.num_cached == 2  # the two full blocks are committed
    assert _chunks(sim.step()) == [(1, 10, 1, True)]
    sim.drain()
    assert len(sim.done[1]) == 13 and sim.pool.num_free == sim.pool.num_usable


def test_chunked_prefill_keeps_the_budget_and_decodes_go_first() -> None:
    sim = Sim(num_blocks=16, block_size=4, token_budget=8)
    sim.add([1, 2, 3], seq_id=1, max_tokens=10)
    sim.step()
    sim.add(list(range(20)), seq_id=2)
    plans = [_chunks(sim.step()) for _ in range(3)]
    assert plans == [[(1, 3, 1, True), (2, 0, 7, False)],
                     [(1, 4, 1, True), (2, 7, 7, False)],
                     [(1, 5, 1, True), (2, 14, 6, True)]]
    assert _chunks(sim.step()) == [(1, 6, 1, True), (2, 20, 1, True)]


def test_admissions_chunk_long_prompts_in_arrival_order() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_seqs=4, token_budget=6)
    for seq_id in (1, 2, 3):
        sim.add([seq_id] * 5, seq_id=seq_id)
    assert _chunks(sim.step()) == [(1, 0, 5, True), (2, 0, 1, False)]
    assert _chunks(sim.step()) == [(1, 5, 1, True), (2, 1, 4, True), (3, 0, 1, False)]


def test_admit_saying_no_does_not_block_the_queue() -> None:
    ready = {2, 3}
    sim = Sim(num_blocks=16, block_size=4, admit=lambda seq: seq.seq_id in ready)
    for seq_id in (1, 2, 3, 4):
        sim.add([seq_id, 0], seq_id=seq_id)
    ready.add(4)  # the gate is asked at admission time
    assert [c[0] for c in _chunks(sim.step())] == [2, 3, 4]
    assert [s.seq_id for s in sim.sched.waiting] == [1]
    ready.add(1)
    assert [c[0] for c in _chunks(sim.step())] == [2, 3, 4, 1]


def test_max_seqs_caps_the_running_set() -> None:
    sim = Sim(num_blocks=16, block_size=4, max_seqs=2)
    for seq_id in (1, 2, 3):
        sim.add([seq_id], seq_id=seq_id, max_tokens=2)
    assert [c[0] for c in _chunks(sim.step())] == [1, 2]
    sim.step()
    assert [s.seq_id for s in sim.sched.running] == [] and [c[0] for c in _chunks(sim.step())] == [3]


def test_requests_with_a_shared_prefix_share_its_blocks() -> None:
    system = list(range(8))
    sim = Sim(num_blocks=16, block_size=4)
    first = sim.add(system + [100, 101, 102], seq_id=1)
    sim.step()
    second = sim.add(system + [200, 201], seq_id=2)
    other_adapter = sim.add(system + [200, 201], seq_id=3, adapter="math")
    same_prompt = sim.add(list(first.tokens[:12]), seq_id=4)  # 3 full blocks, the last one recomputed
    plan = sim.step()
    assert _chunks(plan)[1:] == [(2, 8, 2, True), (3, 0, 10, True), (4, 8, 4, True)]
    assert second.block_ids[:2] == first.block_ids[:2] == same_prompt.block_ids[:2]
    assert sim.pool.refcount(first.block_ids[0]) == 3
    assert not set(other_adapter.block_ids) & set(first.block_ids)  # other adapter: other K/V
    sim.drain()


def test_a_finished_prefix_is_reused_until_evicted() -> None:
    sim = Sim(num_blocks=7, block_size=2, max_len=12)
    sim.add([1, 2, 3, 4, 5], seq_id=1, max_tokens=1)
    sim.step()
    assert 1 in sim.done and sim.pool.num_free == 6 and sim.pool.num_cached == 2
    again = sim.add([1, 2, 3, 4, 9], seq_id=2, max_tokens=2)
    assert _chunks(sim.step()) == [(2, 4, 1, True)]
    assert again.block_ids[:2] == [1, 2]
    sim.step()
    assert sim.pool.num_cached == 3
    sim.add([7] * 11, seq_id=3, max_tokens=1)  # needs all 6 blocks: evicts the cached prefix
    sim.step()
    assert sim.pool.num_cached == 5
    assert _chunks(sim.step()) == [] and not sim.sched.running
    sim.add([1, 2, 3, 4, 5], seq_id=4, max_tokens=1)
    assert _chunks(sim.step()) == [(4, 0, 5, True)]


def test_fork_shares_blocks_and_copies_on_the_first_write() -> None:
    sim = Sim(num_blocks=16, block_size=4)
    parent = sim.add([1, 2, 3, 4, 5, 6], seq_id=1, max_tokens=3)
    sim.step(fork=lambda seq: 2)
    child = next(s for s in sim.sched.running if s.seq_id == 2)
    assert child.block_ids == parent.block_ids and all(sim.pool.refcount(b) == 2 for b in parent.block_ids)
    assert child.tokens[:6] == parent.tokens[:6] and child.tokens[6] != parent.tokens[6]
    shared_full, shared_partial = parent.block_ids
    plan = sim.step()
    # the parent writes position 6 into the shared partial block: a copy keeps positions 4-5 for it;
    # the child is then the last holder of the original and writes in place
    assert len(plan.copies) == 1 and plan.copies[0][0] == shared_partial
    assert parent.block_ids == [shared_full, plan.copies[0][1]] and child.block_ids == [shared_full, shared_partial]
    assert sim.pool.refcount(shared_full) == 2 and sim.pool.refcount(shared_partial) == 1
    sim.drain()
    assert sim.done[1][:6] == sim.done[2][:6] and sim.done[1] != sim.done[2]


def test_a_copy_on_write_with_no_free_block_preempts() -> None:
    sim = Sim(num_blocks=3, block_size=4)  # 2 blocks, both held by parent and child after the fork
    parent = sim.add([1, 2, 3, 4, 5, 6], seq_id=1, max_tokens=2)
    sim.step(fork=lambda seq: 2)
    assert sim.pool.num_free == 0
    plan = sim.step()
    # the copy needs a block: the child (newest) goes, and the parent then writes in place
    assert [s.seq_id for s in plan.preempted] == [2] and plan.copies == [] and _chunks(plan) == [(1, 6, 1, True)]
    assert 1 in sim.done and parent.tokens == sim.done[1]
    sim.drain()
    assert sim.done[2][:6] == sim.done[1][:6] and len(sim.done[2]) == 8  # resumed by recompute


def test_fork_beyond_max_seqs_waits_and_recomputes() -> None:
    sim = Sim(num_blocks=16, block_size=2, max_seqs=1)
    sim.add([1, 2, 3, 4, 5], seq_id=1, max_tokens=2)
    sim.step(fork=lambda seq: 2 if seq.seq_id == 1 and not seq.num_generated else None)
    assert [s.seq_id for s in sim.sched.waiting] == [2] and not sim.sched.waiting[0].block_ids
    sim.drain()
    assert sim.done[1][:5] == sim.done[2][:5] and len(sim.done[2]) == 7


def test_preemption_frees_the_newest_and_resumes_it_by_recompute() -> None:
    prompts = {1: [1, 2, 3, 4], 2: [5, 6, 7, 8], 3: [1, 2, 9, 9]}
    roomy = Sim(num_blocks=32, block_size=2)
    for seq_id, prompt in prompts.items():
        roomy.add(prompt, seq_id=seq_id, max_tokens=6)
    roomy.drain()
    tight = Sim(num_blocks=12, block_size=2)  # 11 blocks; each sequence grows to 5
    for seq_id, prompt in prompts.items():
        tight.add(prompt, seq_id=seq_id, max_tokens=6)
    preempted = []
    for _ in range(100):
        if not tight.sched.running and not tight.sched.waiting:
            break
        plan = tight.step()
        preempted += [s.seq_id for s in plan.preempted]
        if plan.preempted:
            assert tight.sched.waiting[0] is plan.preempted[-1]
            assert all(s.num_computed == 0 and not s.block_ids for s in plan.preempted)
    assert preempted and preempted[0] == 3  # the most recently admitted goes first
    assert tight.done == roomy.done  # resumed sequences continue exactly where they were


def test_the_newest_running_sequence_is_preempted_for_an_older_one() -> None:
    sim = Sim(num_blocks=4, block_size=4)  # 3 blocks: one each after the prefills
    for seq_id, prompt in ((1, [1, 2, 3, 4]), (2, [5, 6]), (3, [7, 8])):
        sim.add(prompt, seq_id=seq_id, max_tokens=3)
    sim.step()
    plan = sim.step()  # sequence 1's next token starts a block and none is free
    assert [s.seq_id for s in plan.preempted] == [3] and _chunks(plan) == [(1, 4, 1, True), (2, 2, 1, True)]
    assert [s.seq_id for s in sim.sched.waiting] == [3]
    sim.drain()
    assert sorted(sim.done) == [1, 2, 3]


def test_a_freed_prefix_is_evicted_from_its_tail() -> None:
    sim = Sim(num_blocks=5, block_size=2)
    sim.add([1, 2, 3, 4, 5, 6, 7], seq_id=1, max_tokens=1)  # 3 full blocks committed, then freed
    sim.step()
    assert sim.pool.num_cached == 3
    sim.add([9], seq_id=2, max_tokens=1)  # takes the never-cached free block
    sim.add([8], seq_id=3, max_tokens=1)  # evicts one cached block: the prefix's last
    sim.step()
    assert sim.pool.num_cached == 2
    head = sim.add([1, 2, 3, 4, 0], seq_id=4)
    assert _chunks(sim.step()) == [(4, 4, 1, True)] and head.num_computed == 5


def test_requests_that_can_never_run_are_refused_up_front() -> None:
    sched = Scheduler(BlockPool(5, 4), max_seqs=4, token_budget=16, max_len=16)
    with pytest.raises(ValueError, match="17 tokens, more than max_len=16"):
        sched.add(Sequence(seq_id=1, tokens=[0] * 17, prompt_len=17, max_tokens=1, arrival=0))
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add(Sequence(seq_id=2, tokens=[], prompt_len=0, max_tokens=1, arrival=1))
    with pytest.raises(ValueError, match="max_len=17 needs 5 blocks of 4 but the pool has 4 usable"):
        Scheduler(BlockPool(5, 4), max_seqs=4, token_budget=16, max_len=17)
    with pytest.raises(ValueError, match="token_budget=0"):
        Scheduler(BlockPool(5, 4), max_seqs=4, token_budget=0, max_len=16)
    with pytest.raises(ValueError, match="token_budget=3 is below max_seqs=4"):
        Scheduler(BlockPool(5, 4), max_seqs=4, token_budget=3, max_len=16)
    assert not sched.waiting


def test_a_sequence_past_max_len_must_be_finished() -> None:
    sim = Sim(num_blocks=8, block_size=4, max_len=8)
    seq = sim.add(list(range(8)), seq_id=1)
    sim.sched.schedule()
    sim.sched.append(seq, 1)
    with pytest.raises(RuntimeError, match="finish a sequence once it reaches max_len"):
        sim.sched.schedule()


def test_cancelling_frees_blocks_and_advance_skips_it() -> None:
    sim = Sim(num_blocks=8, block_size=4)
    seq = sim.add(list(range(6)), seq_id=1)
    plan = sim.sched.schedule()
    sim.sched.finish(seq)
    sim.sched.advance(plan)
    assert sim.pool.num_free == sim.pool.num_usable and sim.pool.num_cached == 0
    sim.sched.finish(seq)  # twice is harmless
    waiting = sim.add([1], seq_id=2)
    sim.sched.finish(waiting)
    assert not sim.sched.waiting and not sim.sched.running


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_workloads_keep_the_cache_consistent(data: st.DataObject) -> None:
    block_size = data.draw(st.sampled_from([1, 2, 4]), label="block_size")
    max_len = data.draw(st.integers(4, 20), label="max_len")
    extra = data.draw(st.integers(0, 8), label="extra blocks")
    max_seqs = data.draw(st.integers(1, 4), label="max_seqs")
    sim = Sim(num_blocks=-(-max_len // block_size) + 1 + extra, block_size=block_size, max_seqs=max_seqs,
              token_budget=data.draw(st.integers(max_seqs, 12), label="token_budget"), max_len=max_len)
    ids = iter(range(1, 10_000))
    prompts = st.lists(st.integers(0, 2), min_size=1, max_size=max_len)  # a tiny vocabulary: shared prefixes
    for _ in range(data.draw(st.integers(1, 30), label="ops")):
        op = data.draw(st.sampled_from(["add", "step", "step", "fork", "cancel"]), label="op")
        if op == "add":
            sim.add(data.draw(prompts), seq_id=next(ids), adapter=data.draw(st.sampled_from([None, "a"])),
                    max_tokens=data.draw(st.integers(1, 6)))
        elif op == "step":
            sim.step()
        elif op == "fork":  # every sequence sampled in this step gets a sibling
            sim.step(fork=lambda seq: next(ids))
        else:
            everyone = list(sim.sched.running + sim.sched.waiting)
            if everyone:
                sim.sched.finish(data.draw(st.sampled_from(everyone)))
        check_invariants(sim.sched)
    sim.drain()
    assert sim.pool.num_free == sim.pool.num_usable
