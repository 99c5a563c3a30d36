"""BlockPool: allocation, reference counts, the prefix cache and its LRU eviction."""

from __future__ import annotations

import pytest

from splice.engine.blocks import BlockPool, hash_block


def _committed(pool: BlockPool, tokens: list[int], adapter: str | None = None) -> tuple[int, bytes]:
    """A fresh block committed under the first-block hash of ``tokens``."""
    block, key = pool.allocate(), hash_block(None, tokens, adapter)
    pool.commit(block, key)
    return block, key


def test_hash_block_keys_the_whole_prefix_and_the_adapter() -> None:
    root = hash_block(None, [1, 2], None)
    assert root == hash_block(None, [1, 2], None) and len(root) == 32
    different = [hash_block(None, [2, 1], None), hash_block(None, [1, 2], ""), hash_block(None, [1, 2], "a"),
                 hash_block(root, [1, 2], None), hash_block(None, [1, 2, 0], None)]
    assert len({root, *different}) == 6
    # the same block after different parents differs: the hash stands for the prefix, not the block
    assert hash_block(hash_block(None, [1], None), [5], None) != hash_block(hash_block(None, [2], None), [5], None)


def test_allocate_hands_out_every_block_but_the_scratch_one() -> None:
    pool = BlockPool(5, 4)
    assert (pool.num_free, pool.num_usable) == (4, 4)
    blocks = [pool.allocate() for _ in range(4)]
    assert blocks == [1, 2, 3, 4] and pool.num_free == 0
    assert all(pool.refcount(b) == 1 for b in blocks)
    with pytest.raises(RuntimeError, match="no free block"):
        pool.allocate()
    pool.free(3)
    assert pool.num_free == 1 and pool.refcount(3) == 0 and pool.allocate() == 3


def test_refcounts_share_and_free() -> None:
    pool = BlockPool(3, 2)
    block = pool.allocate()
    pool.share(block)
    assert pool.refcount(block) == 2
    pool.free(block)
    assert pool.refcount(block) == 1 and pool.num_free == 1
    pool.free(block)
    assert pool.num_free == 2
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(block)
    with pytest.raises(ValueError, match="holds no cached prefix"):
        pool.share(block)  # a free, uncached block cannot be taken back


def test_a_freed_committed_block_stays_findable_until_evicted() -> None:
    pool = BlockPool(3, 2)
    block, key = _committed(pool, [7, 8])
    assert pool.lookup([key]) == [block] and pool.num_cached == 1
    pool.free(block)
    assert pool.num_free == 2  # evictable blocks count as free
    assert pool.lookup([key]) == [block]
    pool.share(block)  # a prefix hit takes it back
    assert pool.refcount(block) == 1 and pool.num_free == 1
    pool.free(block)
    other = pool.allocate()  # the uncached free block goes first
    assert other != block and pool.lookup([key]) == [block]
    assert pool.allocate() == block  # then the evictable one, forgetting its prefix
    assert pool.lookup([key]) == [] and pool.num_cached == 0 and pool.refcount(block) == 1


def test_eviction_is_least_recently_freed_first() -> None:
    pool = BlockPool(4, 1)
    (a, ka), (b, kb), (c, kc) = (_committed(pool, [t]) for t in (1, 2, 3))
    for block in (b, a, c):
        pool.free(block)
    pool.share(a)  # a hit makes a the most recently used once freed again
    pool.free(a)
    assert pool.allocate() == b
    assert pool.lookup([kb]) == [] and pool.lookup([ka]) == [a] and pool.lookup([kc]) == [c]
    assert pool.allocate() == c
    assert pool.allocate() == a
    assert pool.num_cached == 0 and pool.num_free == 0


def test_lookup_returns_the_leading_run_of_hits() -> None:
    pool = BlockPool(6, 2)
    first = hash_block(None, [1, 2], None)
    second = hash_block(first, [3, 4], None)
    third = hash_block(second, [5, 6], None)
    b1, b2 = pool.allocate(), pool.allocate()
    pool.commit(b1, first)
    pool.commit(b2, second)
    assert pool.lookup([first, second, third]) == [b1, b2]
    assert pool.lookup([first, third, second]) == [b1]
    assert pool.lookup([second]) == [b2]  # the caller decides where a chain starts
    assert pool.lookup([hash_block(None, [1, 2], "a")]) == []  # another adapter's K/V


def test_a_second_block_with_the_same_prefix_is_not_cached() -> None:
    pool = BlockPool(4, 2)
    block, key = _committed(pool, [1, 1])
    twin = pool.allocate()
    pool.commit(twin, key)  # computed at the same time by another request: the first stays the cached one
    pool.commit(block, key)  # committing twice is a no-op
    assert pool.lookup([key]) == [block] and pool.num_cached == 1
    pool.free(twin)
    pool.free(block)
    assert pool.allocate() == twin  # the twin went back to the free list, not the evictable one
    with pytest.raises(ValueError, match="not allocated"):
        pool.commit(3, key)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="num_blocks=1"):
        BlockPool(1, 4)
    with pytest.raises(ValueError, match="block_size=0"):
        BlockPool(4, 0)
    assert BlockPool(4, 16).blocks_for(33) == 3 and BlockPool(4, 16).blocks_for(0) == 0
