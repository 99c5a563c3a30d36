"""Each rank's share of a global batch: disjoint, complete, deterministic; positions across sizes."""

from __future__ import annotations

import torch

from splice.data.batching import batches
from splice.data.rows import Example
from splice.distributed.shards import rank_share, rescale_position


def _examples(n: int = 11) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 3 + i % 5
        ids = torch.randint(5, 90, (length,), generator=g).tolist()
        out.append(Example(input_ids=ids, labels=[-100] + ids[1:]))
    return out


def test_shares_are_disjoint_and_make_up_the_global_batch() -> None:
    for pack in (False, True):
        for batch in batches(_examples(), batch_size=4, pad_id=0, seed=1, pack=pack, max_length=12):
            shares = [rank_share(batch, rank=r, world_size=3, pad_id=0) for r in range(3)]
            real = [s for s in shares if int(s["num_tokens"]) > 0 or (s["labels"] != -100).any()]
            for key in ("input_ids", "labels"):
                joined = torch.cat([s[key] for s in real])
                assert torch.equal(joined, batch[key]), key
            assert sum(int(s["num_tokens"]) for s in shares) == int(batch["num_tokens"])
            assert set(shares[0]) == set(batch)


def test_a_rank_without_rows_gets_padding_that_adds_no_targets() -> None:
    batch = batches(_examples(3), batch_size=1, pad_id=0, seed=0)[0]
    empty = rank_share(batch, rank=0, world_size=2, pad_id=0)  # 1 row, 2 ranks: rank 0 gets none
    assert torch.equal(rank_share(batch, rank=1, world_size=2, pad_id=0)["input_ids"], batch["input_ids"])
    assert empty["input_ids"].shape == (1, batch["input_ids"].shape[1])
    assert (empty["labels"] == -100).all() and int(empty["num_tokens"]) == 0
    assert set(empty) == set(batch)
    assert rank_share(batch, rank=0, world_size=1, pad_id=0) is batch


def test_positions_carry_over_by_rows_read() -> None:
    assert rescale_position(7, saved_world=2, world_size=2) == 7  # same size: exact
    assert rescale_position(3, saved_world=2, world_size=1) == 6  # 3 batches of 2 shares = 6 of 1
    assert rescale_position(3, saved_world=1, world_size=2) == 2  # 3 rows' worth, rounded up
