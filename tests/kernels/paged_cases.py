"""Paged attention test cases shared by tests/kernels/test_paged_attention.py and test_fresh_attention.py:
random sequences written into a shuffled paged cache, and dense float64 attention over the un-paged sequences
(torch SDPA, an independent computation) to check against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.kv_cache import write_kv

BS = 16  # block size
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}  # atol, rtol


@dataclass
class Case:
    q: Tensor  # (T, Hq, D)
    keys: list[Tensor]  # per sequence (n, Hkv, D), un-paged
    values: list[Tensor]
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    lens: list[tuple[int, int]]


def make_case(lens: list[tuple[int, int]], *, hq: int = 8, hkv: int = 2, d: int = 64, dtype: torch.dtype,
              device: str, seed: int = 0) -> Case:
    """Random sequences written into a cache through ``write_kv`` at shuffled, non-contiguous blocks;
    unused cache rows hold NaN, so a read outside a sequence shows."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + BS - 1) // BS for n, _ in lens]
    num_blocks = sum(need) + 5
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0: scratch, never handed out
    tables = torch.zeros(len(lens), max(need) + 2, dtype=torch.int32)
    keys, values, slots = [], [], []
    for b, (n, _) in enumerate(lens):
        ids = [order.pop() for _ in range(need[b])]
        tables[b, : need[b]] = torch.tensor(ids, dtype=torch.int32)
        keys.append(torch.randn(n, hkv, d, generator=g).to(dtype))
        values.append(torch.randn(n, hkv, d, generator=g).to(dtype))
        slots.append(torch.tensor([ids[p // BS] * BS + p % BS for p in range(n)]))
    cache = [torch.full((num_blocks, BS, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    write_kv(torch.cat(keys).to(device), torch.cat(values).to(device), *cache, torch.cat(slots).to(device))
    q = torch.randn(sum(length for _, length in lens), hq, d, generator=g).to(dtype)
    starts = torch.tensor([0] + [length for _, length in lens]).cumsum(0).to(torch.int32)
    return Case(q.to(device), keys, values, *cache, tables.to(device),
                torch.tensor([n for n, _ in lens], dtype=torch.int32, device=device), starts.to(device), lens)


def dense(case: Case, *, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Each sequence's queries over its un-paged keys, float64: SDPA with a boolean causal/window mask
    (softcap: the same attention written out, since SDPA has no softcap)."""
    outs, start = [], 0
    for (n, length), k, v in zip(case.lens, case.keys, case.values, strict=True):
        q = case.q[start : start + length].double().cpu().transpose(0, 1)  # (Hq, L, D)
        start += length
        group = q.shape[0] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, n, D)
        v = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(n - length, n)[:, None]
        k_pos = torch.arange(n)[None, :]
        allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window > 0 else True)
        if softcap > 0:
            s = torch.tanh(q @ k.transpose(1, 2) * scale / softcap) * softcap
            o = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def run(fn, case: Case, **kw) -> Tensor:  # type: ignore[no-untyped-def]
    n_max = max(n for n, _ in case.lens)
    l_max = max(length for _, length in case.lens)
    return fn(case.q, case.key_cache, case.value_cache, block_tables=case.block_tables, seq_lens=case.seq_lens,
              query_start_loc=case.query_start_loc, max_query_len=l_max, max_seq_len=n_max, **kw)


def check(got: Tensor, case: Case, dtype: torch.dtype, **kw) -> None:  # type: ignore[no-untyped-def]
    assert got.dtype == dtype and got.shape == case.q.shape
    want = dense(case, **kw)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
