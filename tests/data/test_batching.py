"""splice.data.batching: packed rows' segments as the varlen attention reads them (position_ids are their
only record), trailing pads a segment of their own."""

from __future__ import annotations

import pytest
import torch

from splice.data.batching import batches
from splice.data.rows import IGNORE_INDEX, Example
from splice.fused.varlen import Packing


def examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in lengths]


@pytest.mark.parametrize(("lengths", "width", "rows"), [
    ([4, 3, 5, 1, 6], 8, 2),  # rows [4+3 | 1 pad], [5+1 | 2 pads], [6 | 2 pads]
    ([8, 8, 8], 8, 3),  # full rows: no pad segment
    ([1, 1, 1, 2, 3, 17, 30], 32, 4),
])
def test_packed_segments_are_the_examples_then_the_pads(lengths: list[int], width: int, rows: int) -> None:
    got = batches(examples(lengths), batch_size=rows, pad_id=0, shuffle=False, pack=True, max_length=width)
    packed: list[list[int]] = []  # greedy in order: each row's example lengths
    for n in lengths:
        if not packed or sum(packed[-1]) + n > width:
            packed.append([])
        packed[-1].append(n)
    assert [b["input_ids"].shape for b in got] == [(len(packed[i : i + rows]), width)
                                                    for i in range(0, len(packed), rows)]
    for i, batch in enumerate(got):
        packing = Packing.from_position_ids(batch["position_ids"])
        n = batch["input_ids"].numel()
        assert packing.cu_seqlens.shape == (n + 1,) and packing.max_seqlen == width
        want = []  # segment starts in the flattened batch: each row's examples, then its pads
        for r, row in enumerate(packed[i * rows : (i + 1) * rows]):
            starts = torch.tensor([0, *row]).cumsum(0)
            want += (r * width + starts[:-1]).tolist()
            used = int(starts[-1])
            if used < width:
                want.append(r * width + used)
                assert batch["labels"][r, used:].eq(IGNORE_INDEX).all() and batch["input_ids"][r, used:].eq(0).all()
        assert packing.cu_seqlens.tolist() == want + [n] * (n + 1 - len(want))
        assert torch.equal(packing.positions, batch["position_ids"])  # every segment from 0, the pads' too


def test_unpacked_batches_keep_their_attention_mask() -> None:
    (batch,) = batches(examples([3, 5]), batch_size=2, pad_id=0, shuffle=False)
    assert "position_ids" not in batch
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
