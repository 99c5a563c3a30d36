"""Staging: a step's flat inputs written in place equal the plain-Python flattening of its chunks,
step after step with one set of buffers (block-table rows kept across steps, copy-on-write, forks,
preemption, padding to a CUDA-graph bucket)."""

from __future__ import annotations

import random

import pytest
import torch

from splice.engine.blocks import BlockPool
from splice.engine.inputs import Staging, StepInputs
from splice.engine.scheduler import Chunk, Scheduler, Sequence, iter_positions

BS = 4


def _pad_counts(pad_tokens: int, pad_seqs: int) -> list[int]:
    """The padding sequences' token counts: one each while they last, else spread evenly."""
    if pad_tokens <= pad_seqs:
        return [1] * pad_tokens + [0] * (pad_seqs - pad_tokens)
    base, extra = divmod(pad_tokens, pad_seqs)
    return [base + (j < extra) for j in range(pad_seqs)]


def _expect(inputs: StepInputs, chunks: list[Chunk], pad_tokens: int, pad_seqs: int,
            slot_of: dict[str | None, int]) -> None:
    """``inputs`` against the chunks flattened token by token (the reference of the runner's layout),
    padded with ``pad_tokens`` scratch tokens in ``pad_seqs`` padding sequences."""
    ids, positions, slots, lens, starts, sample_at, bank = [], [], [], [], [0], [], []
    for chunk in chunks:
        end = chunk.start + chunk.count
        ids += chunk.seq.tokens[chunk.start:end]
        for position, slot in iter_positions(chunk, BS):
            positions.append(position)
            slots.append(slot)
        lens.append(end)
        starts.append(starts[-1] + chunk.count)
        bank += [slot_of[chunk.seq.adapter]] * chunk.count
        if chunk.sample:
            sample_at.append(starts[-1] - 1)
    real = starts[-1]
    for count in _pad_counts(pad_tokens, pad_seqs):  # positions from 0 in the scratch block 0
        ids += [0] * count
        positions += list(range(count))
        slots += [p % BS for p in range(count)]
        lens.append(count)
        starts.append(starts[-1] + count)
        bank += [-1] * count
    total = real + pad_tokens
    if pad_seqs:
        sample_at += [min(real + i, total - 1) for i in range(len(chunks) + pad_seqs - len(sample_at))]
    assert inputs.ids.tolist() == ids
    assert inputs.positions.tolist() == positions
    assert inputs.slots.tolist() == slots
    assert inputs.seq_lens.tolist() == lens
    assert inputs.starts.tolist() == starts
    assert inputs.sample_at.tolist() == sample_at
    assert inputs.bank_slots.tolist() == bank
    assert inputs.max_query_len == max(b - a for a, b in zip(starts, starts[1:], strict=False))
    assert inputs.max_seq_len == max(lens)
    for row, chunk in enumerate(chunks):  # the blocks attention reads
        needed = -(-(chunk.start + chunk.count) // BS)
        assert inputs.tables[row, :needed].tolist() == chunk.seq.block_ids[:needed], row
    for row, count in enumerate(_pad_counts(pad_tokens, pad_seqs), start=len(chunks)):
        assert inputs.tables[row, : max(1, -(-count // BS))].tolist() == [0] * max(1, -(-count // BS))  # scratch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_steps_equal_the_flattened_chunks(seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(40, BS)
    max_len = 48
    sched = Scheduler(pool, max_seqs=6, token_budget=24, max_len=max_len)
    staging = Staging(tokens=40, seqs=12, width=-(-max_len // BS), block_size=BS, device=torch.device("cpu"))
    slot_of = {None: -1, "a": 0, "b": 1}
    shared = [rng.randrange(3, 50) for _ in range(9)]  # a common prefix: prefix-cache hits, shared blocks
    next_id = 0
    for step in range(60):
        if step < 30 and rng.random() < 0.5:
            prompt = shared + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 12))]
            sched.add(Sequence(seq_id=next_id, tokens=prompt, prompt_len=len(prompt), max_tokens=8,
                               adapter=rng.choice([None, "a", "b"]), arrival=next_id))
            next_id += 1
        plan = sched.schedule()
        if not plan.chunks:
            continue
        tokens = sum(c.count for c in plan.chunks)
        pad_tokens = rng.choice([0, 0, rng.randrange(0, 40 - tokens + 1)])  # none, or a graph bucket's
        pad_seqs = rng.randrange(-(-pad_tokens // max_len) if pad_tokens else 0, 12 - len(plan.chunks) + 1)
        inputs = staging.fill(plan.chunks, tokens_to=tokens + pad_tokens, seqs_to=len(plan.chunks) + pad_seqs,
                              bank_slot=slot_of.__getitem__)
        _expect(inputs, plan.chunks, pad_tokens, pad_seqs, slot_of)
        sched.advance(plan)
        for chunk in plan.chunks:
            if not chunk.sample:
                continue
            seq = chunk.seq
            if rng.random() < 0.15 and len(sched.running) < 6:  # n > 1: the child shares every block
                sched.fork(seq, next_id)
                next_id += 1
            sched.append(seq, rng.randrange(3, 50))
            if len(seq.tokens) >= max_len or seq.num_generated >= seq.max_tokens:
                sched.finish(seq)


def test_a_step_too_large_for_the_buffers_is_refused() -> None:
    staging = Staging(tokens=4, seqs=2, width=2, block_size=BS, device=torch.device("cpu"))
    seq = Sequence(seq_id=0, tokens=list(range(3, 9)), prompt_len=6, max_tokens=2, arrival=0, block_ids=[1, 2])
    with pytest.raises(ValueError, match="6 tokens in 1 chunks does not fit the staging buffers"):
        staging.fill([Chunk(seq, 0, 6, True)])
    with pytest.raises(ValueError, match="3 tokens in 1 chunks does not fit"):  # padding tokens, no sequence
        staging.fill([Chunk(seq, 0, 2, True)], tokens_to=3)


def test_tokens_sampled_on_the_device_feed_the_next_step() -> None:
    staging = Staging(tokens=16, seqs=4, width=4, block_size=BS, device=torch.device("cpu"))
    a = Sequence(seq_id=0, tokens=[3, 4, 5, -1], prompt_len=3, max_tokens=4, arrival=0, block_ids=[1])
    b = Sequence(seq_id=1, tokens=[6, 7, -1], prompt_len=2, max_tokens=4, arrival=1, block_ids=[2])
    c = Sequence(seq_id=2, tokens=[8, 9, 10], prompt_len=3, max_tokens=4, arrival=2, block_ids=[3])
    chunks = [Chunk(a, 3, 1, True), Chunk(c, 0, 3, True), Chunk(b, 2, 1, True)]  # a and b wait for tokens
    inputs = staging.fill(chunks, tokens_to=8, seqs_to=4, feed=[1, -1, 0])
    previous = torch.tensor([41, 42])  # the previous step's sampled tokens: b's, then a's
    inputs.feed_ids(previous)
    assert inputs.ids.tolist()[:5] == [42, 8, 9, 10, 41]
    with pytest.raises(ValueError, match="pass them"):
        staging.fill(chunks, feed=[1, -1, 0]).feed_ids(None)
    assert staging.fill(chunks).feed_to is None  # nothing to feed
