"""The paged KV cache's block pool: which cache blocks are free, who holds each one, and which full blocks
are remembered for prefix caching. Plain Python; the runner owns the tensors.

A block holds the K/V of ``block_size`` consecutive positions of one sequence. Block 0 is never handed
out: the runner points padded tokens and padded sequences at it as scratch.

Each block has a reference count (how many sequence block tables list it). A full block whose K/V are
computed is *committed* under its hash ``hash_block(parent's hash, its tokens, adapter)``; the chain of
parent hashes makes the hash stand for the whole prefix up to the block's end, and the adapter is in it
because the same tokens give different K/V under different adapters. When the last reference to a
committed block goes, the block becomes *evictable*: free to be reused, but a later request with the same
prefix can still take it back (``lookup`` + ``share``) until an allocation evicts it, least recently
freed first. Blocks never committed go straight back to the free list, which is used before any eviction.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
"""sha256 of (parent hash, the block's tokens, adapter): 32 bytes, equal only for equal prefixes."""

_ROOT = bytes(32)  # the parent hash of a sequence's first block


def hash_block(parent: BlockHash | None, tokens: Sequence[int], adapter: str | None) -> BlockHash:
    """The prefix-cache key of a full block: ``parent`` is the previous block's hash (None for the first
    block). A cryptographic hash, so that two different prefixes never share K/V by accident."""
    digest = hashlib.sha256(parent if parent is not None else _ROOT)
    name = b"" if adapter is None else b"\x01" + adapter.encode()  # None and "" differ
    digest.update(len(name).to_bytes(4, "little") + name)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockPool:
    """``num_blocks`` cache blocks of ``block_size`` positions each; block 0 is reserved as scratch, so
    ``num_blocks - 1`` can be handed out.

    Every operation is O(1) (``lookup`` is O(blocks looked up))."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"BlockPool: num_blocks={num_blocks}; it needs at least 2 (block 0 is scratch)")
        if block_size < 1:
            raise ValueError(f"BlockPool: block_size={block_size}; it must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # uncached free blocks; pop() hands out 1, 2, ...
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0; oldest first
        self._cached: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_usable(self) -> int:
        """Blocks that can ever be handed out (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        """Committed blocks (in use or evictable) that a prefix lookup can find."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self) -> int:
        """A block with refcount 1 and no cached contents: a free one, else the least recently freed
        evictable one (forgetting its prefix). Raises RuntimeError when none is left (check ``num_free``)."""
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        else:
            raise RuntimeError("BlockPool.allocate: no free block (the scheduler checks num_free first)")
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more block table holds ``block`` (a prefix-cache hit or a fork); an evictable block is in
        use again and can no longer be evicted."""
        if self._refs[block] == 0:
            if block not in self._evictable:
                raise ValueError(f"BlockPool.share: block {block} is free and holds no cached prefix")
            del self._evictable[block]
        self._refs[block] += 1

    def free(self, block: int) -> None:
        """One block table lets go of ``block``. With no holder left, a committed block becomes evictable
        (most recently freed last), any other goes back to the free list."""
        if self._refs[block] <= 0:
            raise ValueError(f"BlockPool.free: block {block} is not allocated")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def commit(self, block: int, block_hash: BlockHash) -> None:
        """Remember that ``block`` (held, full, computed) holds the prefix ``block_hash``. If another block
        already holds that prefix (two requests computed it at once), the first one stays the cached one."""
        if self._refs[block] <= 0:
            raise ValueError(f"BlockPool.commit: block {block} is not allocated")
        if block in self._hash_of or block_hash in self._cached:
            return
        self._cached[block_hash] = block
        self._hash_of[block] = block_hash

    def lookup(self, hashes: Iterable[BlockHash]) -> list[int]:
        """The cached blocks of the longest leading run of ``hashes`` (a sequence's block hashes in order).
        Read-only: the caller ``share``s the blocks it keeps."""
        found = []
        for block_hash in hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found
