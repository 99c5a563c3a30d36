"""Exp(1) noise for many sampled rows in one launch, each row from its own seed and draw counter.

The engine samples a step's rows by an exponential race, ``argmax_v p[r, v] / E[r, v]`` with ``E ~ Exp(1)``
(:mod:`splice.engine.sampling`). Drawing ``E`` from each row's own ``torch.Generator`` costs one launch a
row (and a Python loop) every step: 64 rows of a GRPO rollout took 0.5 ms a step more than greedy decoding
(H100, ``benchmarks/rollout_profile.py``). Here every row's noise comes from one counter-based generator
launch, keyed by the row::

    (r0, r1, r2, r3) = Philox4x32-10(key = seed[r], counter = (i, draw[r] lo, draw[r] hi, 0))
    U[r, 4 i + j]    = rj mapped to [0, 1)                 (Triton's uint_to_uniform_float)
    E[r, 4 i + j]    = max(-log(1 - U), 1.2e-38)           (Exp(1); the floor keeps p / E finite)

so a row's noise depends only on its ``(seed, draw)``, never on the other rows of the batch, and a row
that draws again with ``draw + 1`` gets fresh numbers. :func:`generator_keys` reads both from a CUDA
``torch.Generator`` (its seed and Philox offset: host values, no device sync) and advances the offset,
so the generator stays the row's whole random state (seeding, ``manual_seed``, a resumed run). The
numbers are not those of ``Tensor.exponential_`` on the same generator, only the same distribution.

:func:`exponential_noise_reference` draws the rows one by one from generators (the CPU path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton

__all__ = ["exponential_noise", "exponential_noise_reference", "generator_keys"]

_TINY = torch.finfo(torch.float32).tiny
_BLOCK = 1024  # Philox counters a program (4 values each)
_SEED_MASK = (1 << 63) - 1  # int64 seeds: Philox keys on the low 63 bits of a generator's 64-bit seed

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _exponential_kernel(out_ptr, seeds_ptr, draws_ptr, V, stride, TINY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seeds_ptr + row)
        draw = tl.load(draws_ptr + row)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) counters, 4 columns each
        zero = i.to(tl.uint32) * 0
        lo = zero + (draw & 0xFFFFFFFF).to(tl.uint32)
        hi = zero + (draw >> 32).to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, i.to(tl.uint32), lo, hi, zero)
        base = out_ptr + row.to(tl.int64) * stride
        col = 4 * i
        tl.store(base + col, tl.maximum(-tl.log(1.0 - tl.uint_to_uniform_float(r0)), TINY), mask=col < V)
        tl.store(base + col + 1, tl.maximum(-tl.log(1.0 - tl.uint_to_uniform_float(r1)), TINY), mask=col + 1 < V)
        tl.store(base + col + 2, tl.maximum(-tl.log(1.0 - tl.uint_to_uniform_float(r2)), TINY), mask=col + 2 < V)
        tl.store(base + col + 3, tl.maximum(-tl.log(1.0 - tl.uint_to_uniform_float(r3)), TINY), mask=col + 3 < V)


def generator_keys(generators: Sequence[torch.Generator]) -> tuple[list[int], list[int]]:
    """Each CUDA generator's (seed, draw) for one row's noise (module doc), advancing its offset by one draw
    (4: Philox offsets are multiples of 4), in order: a generator listed twice gives two different draws."""
    seeds, draws = [], []
    for generator in generators:
        offset = generator.get_offset()
        seeds.append(generator.initial_seed() & _SEED_MASK)
        draws.append(offset // 4)
        generator.set_offset(offset + 4)
    return seeds, draws


def exponential_noise(vocab: int, *, seeds: Tensor, draws: Tensor) -> Tensor:
    """(rows, vocab) fp32 Exp(1) noise, row ``r`` from ``(seeds[r], draws[r])`` (int64 (rows,) tensors on the
    GPU): one Triton launch (module doc)."""
    rows = seeds.shape[0]
    if seeds.dim() != 1 or draws.shape != seeds.shape:
        raise ValueError(f"exponential_noise: seeds and draws of one shape (rows,), got {tuple(seeds.shape)} and "
                         f"{tuple(draws.shape)}")
    if not use_triton(seeds, draws):
        raise ValueError("exponential_noise runs on a GPU (or under TRITON_INTERPRET=1): draw the rows from their "
                         "generators instead (exponential_noise_reference)")
    out = torch.empty((rows, vocab), dtype=torch.float32, device=seeds.device)
    if rows and vocab:
        grid = (rows, triton.cdiv(triton.cdiv(vocab, 4), _BLOCK))
        _exponential_kernel[grid](out, seeds.long(), draws.long(), vocab, out.stride(0), TINY=_TINY, BLOCK=_BLOCK)
    return out


def exponential_noise_reference(vocab: int, generators: Sequence[torch.Generator], device: torch.device) -> Tensor:
    """(len(generators), vocab): the same distribution row by row, ``exponential_`` from each row's generator,
    floored at 1.2e-38."""
    noise = torch.empty((len(generators), vocab), dtype=torch.float32, device=device)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return noise.clamp_min_(_TINY)
