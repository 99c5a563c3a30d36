"""Staging: a step's flat inputs written in place equal the plain-Python flattening of its chunks,
step after step with one set of buffers (block-table rows kept across steps, copy-on-write, forks,
preemption, padding to a CUDA-graph bucket)."""

from __future__ import annotations

import random

import pytest
import torch

from splice.engine.blocks import BlockPool
from splice.engine.inputs import Staging, StepInputs, TokensToHost
from splice.engine.scheduler import Chunk, Scheduler, Sequence, iter_positions

BS = 4


def _expect(inputs: StepInputs, chunks: list[Chunk], pad: int, slot_of: dict[str | None, int]) -> None:
    """``inputs`` against the chunks flattened token by token (the reference of the runner's layout)."""
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
    ids += [0] * pad
    positions += [0] * pad
    slots += [i % BS for i in range(pad)]
    lens += [1] * pad
    starts += list(range(real + 1, real + pad + 1))
    sample_at += list(range(real, real + pad))
    bank += [-1] * pad
    assert inputs.ids.tolist() == ids
    assert inputs.positions.tolist() == positions
    assert inputs.slots.tolist() == slots
    assert inputs.seq_lens.tolist() == lens
    assert inputs.starts.tolist() == starts
    assert inputs.sample_at.tolist() == sample_at
    assert inputs.bank_slots.tolist() == bank
    assert inputs.max_query_len == max(c.count for c in chunks)
    assert inputs.max_seq_len == max(lens)
    for row, chunk in enumerate(chunks):  # the blocks attention reads
        needed = -(-(chunk.start + chunk.count) // BS)
        assert inputs.tables[row, :needed].tolist() == chunk.seq.block_ids[:needed], row
    for row in range(len(chunks), len(chunks) + pad):
        assert inputs.tables[row, 0] == 0  # scratch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staged_steps_equal_the_flattened_chunks(seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(40, BS)
    max_len = 48
    sched = Scheduler(pool, max_seqs=6, token_budget=24, max_len=max_len)
    staging = Staging(tokens=24, seqs=8, width=-(-max_len // BS), block_size=BS, device=torch.device("cpu"))
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
        decode = all(c.count == 1 for c in plan.chunks)
        pad = rng.randrange(0, 8 - len(plan.chunks) + 1) if decode else 0
        inputs = staging.fill(plan.chunks, pad_to=len(plan.chunks) + pad, bank_slot=slot_of.__getitem__)
        _expect(inputs, plan.chunks, pad, slot_of)
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
    with pytest.raises(ValueError, match="6 tokens in 1 chunks exceeds the staging buffers"):
        staging.fill([Chunk(seq, 0, 6, True)])


def test_tokens_to_host_returns_the_step_tokens() -> None:
    out = TokensToHost(rows=2, device=torch.device("cpu"))
    out.start(torch.tensor([5, 7, 9]))
    assert out.wait() == [5, 7, 9]
