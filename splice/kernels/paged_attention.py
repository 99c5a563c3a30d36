"""Paged attention for the generation engine: decode, chunked prefill and mixed batches in one call.

KV layout (per decoder layer): ``key_cache`` / ``value_cache`` are ``(NB, BS, Hkv, D)``; the token
at position ``p`` of sequence ``b`` lives in block ``block_tables[b, p // BS]`` at row ``p % BS``
(flat slot ``block * BS + p % BS``, written by :func:`write_kv`).

Queries are flat: ``q`` is ``(T, Hq, D)`` holding the queries of ``B`` sequences back to back;
sequence ``b`` owns rows ``qsl[b] : qsl[b + 1]`` (``qsl = query_start_loc``, ``L_b`` rows) at
positions ``n_b - L_b .. n_b - 1`` where ``n_b = seq_lens[b]`` counts the tokens in the cache,
this step's included. A decode is ``L_b = 1``, a prefill chunk ``L_b > 1``. For the query of head
``h`` at position ``p`` (GQA: ``G = Hq // Hkv``, kv head ``h // G``)::

    s_k = scale * q . K[k]                         for keys k <= p (and k > p - window if window > 0)
    s_k = softcap * tanh(s_k / softcap)            if softcap > 0
    out = sum_k softmax(s)_k V[k]                  softmax in fp32, out in q's dtype

The Triton path (CUDA tensors) is flash-decoding over pages: one program per (query tile, kv
head, partition of the context) loads each K/V tile once and serves every query head of its kv
head (a tile is ``BLOCK_Q`` query tokens x ``G`` heads, so ``tl.dot`` runs on >= 16 rows even for a
decode), with an online softmax in fp32. When too few tiles exist to fill the GPU (small-batch
decode at long context) the context is split into partitions whose partial results (running max,
sum, unnormalized output) a second small kernel merges. Programs find their sequence by a binary
search over ``qsl`` on the device; the grid depends only on host ints (``T``, ``B``,
``max_query_len``, ``max_seq_len``), and programs past a sequence's length exit at once, so the call
never syncs with the host and a CUDA graph can capture it with upper bounds.

:func:`paged_attention_reference` is plain PyTorch, one sequence at a time (each sequence's K/V
gathered once, one masked fp32 attention per sequence); it is also the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["paged_attention", "paged_attention_reference", "write_kv"]


def write_kv(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store this step's ``key`` / ``value`` ``(T, Hkv, D)`` at flat slots ``slot_mapping`` ``(T,)``
    of the ``(NB, BS, Hkv, D)`` caches, in place (``index_copy_``: no host sync)."""
    if key.shape != value.shape or key.dim() != 3 or key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(f"write_kv: key/value (T, Hkv, D) matching the cache's (NB, BS, Hkv, D) expected, got "
                         f"{tuple(key.shape)}, {tuple(value.shape)} and cache {tuple(key_cache.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"write_kv: slot_mapping ({key.shape[0]},) expected, got {tuple(slot_mapping.shape)}")
    slots = slot_mapping.to(torch.int64)
    for new, cache in ((key, key_cache), (value, value_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new.to(cache.dtype))


def _check(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           query_start_loc: Tensor) -> None:
    """One clear line for inputs that do not fit the layout (module doc), before any work."""
    if q.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"paged_attention: q (T, Hq, D) and caches (NB, BS, Hkv, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    hq, d = q.shape[1:]
    hkv = key_cache.shape[2]
    if key_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"paged_attention: q heads {hq} must be a multiple of kv heads {hkv} and head dims "
                         f"must agree ({d} vs {key_cache.shape[3]})")
    b = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != b or query_start_loc.shape != (b + 1,):
        raise ValueError(f"paged_attention: block_tables (B, max_blocks), seq_lens (B,), query_start_loc (B+1,) "
                         f"expected, got {tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, "
                         f"{tuple(query_start_loc.shape)}")


def _attend(q: Tensor, k: Tensor, v: Tensor, *, first_pos: int, key_start: int, scale: float, window: int,
            softcap: float) -> Tensor:
    """One sequence: ``q`` (L, Hq, D) at positions ``first_pos ..``, ``k``/``v`` (N, Hkv, D) the keys at
    positions ``key_start ..``; returns (L, Hq, D) fp32."""
    length, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qg = q.float().view(length, hkv, group, d).permute(1, 2, 0, 3).reshape(hkv, group * length, d)
    kt = k.float().permute(1, 2, 0)  # (Hkv, D, N)
    s = torch.bmm(qg, kt).mul_(scale).view(hkv, group, length, -1)  # (Hkv, G, L, N)
    if softcap > 0:
        s = torch.tanh(s / softcap).mul_(softcap)
    q_pos = torch.arange(first_pos, first_pos + length, device=q.device)[:, None]
    k_pos = torch.arange(key_start, key_start + k.shape[0], device=q.device)[None, :]
    masked = k_pos > q_pos
    if window > 0:
        masked |= k_pos <= q_pos - window
    s.masked_fill_(masked, float("-inf"))
    p = torch.softmax(s, dim=-1).view(hkv, group * length, -1)
    o = torch.bmm(p, v.float().transpose(0, 1))  # (Hkv, G * L, D)
    return o.view(hkv, group, length, d).permute(2, 0, 1, 3).reshape(length, hq, d)


def paged_attention_reference(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
    softcap: float = 0.0, out: Tensor | None = None,
) -> Tensor:
    """Attention of every sequence's queries over its paged K/V (module doc), in plain PyTorch.

    One sequence at a time: its blocks are gathered once (only the ones a window can reach), then
    one masked fp32 attention serves all its queries and heads. ``max_query_len`` / ``max_seq_len``
    are unused here (they size the Triton grid). Rows of ``q`` past ``query_start_loc[B]`` give 0.
    """
    _check(q, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    result = torch.zeros_like(q) if out is None else out
    block_size = key_cache.shape[1]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, n in enumerate(lens):
        first, last = starts[b], starts[b + 1]
        if last == first:
            continue
        first_pos = n - (last - first)
        key_start = max(0, first_pos - window + 1) if window > 0 else 0
        lo_block = key_start // block_size
        ids = block_tables[b, lo_block : (n + block_size - 1) // block_size].long()
        key_start = lo_block * block_size
        k = key_cache[ids].flatten(0, 1)[: n - key_start]
        v = value_cache[ids].flatten(0, 1)[: n - key_start]
        o = _attend(q[first:last], k, v, first_pos=first_pos, key_start=key_start, scale=scale,
                    window=window, softcap=softcap)
        result[first:last] = o.to(result.dtype)
    return result


def paged_attention(
    q: Tensor, key_cache: Tensor, value_cache: Tensor, *, block_tables: Tensor, seq_lens: Tensor,
    query_start_loc: Tensor, scale: float, max_query_len: int, max_seq_len: int, window: int = 0,
    softcap: float = 0.0, out: Tensor | None = None,
) -> Tensor:
    """Paged attention (module doc): the Triton kernels for CUDA tensors, the reference elsewhere.

    ``max_query_len`` / ``max_seq_len`` are host upper bounds on ``L_b`` / ``n_b`` that size the
    grid (any upper bound is correct). Returns ``(T, Hq, D)`` in q's dtype (``out`` when given).
    """
    kw = dict(block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc, scale=scale,
              max_query_len=max_query_len, max_seq_len=max_seq_len, window=window, softcap=softcap, out=out)
    return paged_attention_reference(q, key_cache, value_cache, **kw)  # type: ignore[arg-type]
