"""The paged K/V cache's entries: :func:`write_kv`, and 8-bit entries (int8, one fp32 scale per token and head).

Layout (:mod:`splice.kernels.paged_attention`): per decoder layer ``(NB, BS, Hkv, D)`` keys and values; the token
at flat slot ``block * BS + row`` is ``cache[block, row]``. An int8 value cache is that view of ``(NB, Hkv, D, BS)``
storage (:func:`kv_caches`): a block's codes of one (head, dim) lie side by side, so paged attention's ``p . v`` dot
loads 16 tokens' codes at once (8-bit operands read across the rows of a ``(BS, D)`` tile go one byte a load).

int8 math: a key or value vector ``x`` (``D`` values of one token and kv head) is stored as
``c = round(x / s)`` (int8, round half away from zero) with ``s = max(|x|) / 127`` (fp32), and read back as
``c * s``. Each entry's error is at most ``s / 2``: half a step of its own vector's range, so a head with small
values keeps its precision next to one with large values. A cache of ``(NB, BS, Hkv, D)`` int8 values has
``(NB, BS, Hkv)`` fp32 scales beside it: ``D + 4`` bytes a vector instead of ``2 D`` (52% of bf16 at
``D = 128``).

Why: at decode every sequence's step reads its whole context's K/V, so past a few hundred tokens of context
those bytes, not the weights, bound a large batch (128 KiB a token for a Llama-3-8B in bf16). The paged
attention kernel reads the int8 values, scales the scores by the keys' scales after the ``q . k`` dot and the
probabilities by the values' scales before the ``p . v`` dot, so the dots still run on the tensor cores in
``q``'s dtype (int8 values are exact in bf16 and fp16).

:func:`quantize_kv` / :func:`dequantize_kv` are the plain PyTorch definition (the CPU path, the tests'
reference); the Triton write is :func:`splice.kernels.rope_cache.rope_write_kv`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON

__all__ = ["KV_DTYPES", "QMAX", "check_kv_dtype", "check_scales", "dequantize_kv", "int8_tiles", "kv_cache_dtype",
           "kv_caches", "quantize_kv", "store_kv", "write_kv"]

QMAX = 127.0  # int8 codes span -127 .. 127 (symmetric: -128 is never written)
KV_DTYPES = ("auto", "int8")  # the engine's kv_dtype choices: the model's dtype, or 8-bit with scales


def check_kv_dtype(kv_dtype: str) -> None:
    """One line naming the choices when ``kv_dtype`` is not one of :data:`KV_DTYPES`."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r}: choose one of {', '.join(KV_DTYPES)} ('auto': the model's "
                         f"dtype; 'int8': 8-bit K/V with a scale per token and head, about half the bytes)")


def kv_cache_dtype(kv_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype for the engine option ``kv_dtype`` (:func:`check_kv_dtype`)."""
    check_kv_dtype(kv_dtype)
    return torch.int8 if kv_dtype == "int8" else model_dtype


def kv_caches(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """One layer's zeroed key and value caches, both ``(NB, BS, Hkv, D)`` = ``shape``; an int8 value cache a view of
    ``(NB, Hkv, D, BS)`` storage (module doc)."""
    keys = torch.zeros(shape, dtype=dtype, device=device)
    if dtype != torch.int8:
        return keys, torch.zeros(shape, dtype=dtype, device=device)
    blocks, size, heads, dim = shape
    return keys, torch.zeros(blocks, heads, dim, size, dtype=dtype, device=device).permute(0, 3, 1, 2)


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (..., D) -> (int8 codes (..., D), fp32 scales (...)) as the module docstring defines."""
    wide = x.float()
    scale = wide.abs().amax(dim=-1) / QMAX  # (...)
    scaled = wide / torch.where(scale > 0, scale, 1.0)[..., None]
    codes = (scaled + torch.where(scaled >= 0, 0.5, -0.5)).trunc().clamp_(-QMAX, QMAX)
    return codes.to(torch.int8), scale


def dequantize_kv(codes: Tensor, scale: Tensor) -> Tensor:
    """int8 ``codes`` (..., D) and fp32 ``scale`` (...) -> fp32 values (..., D)."""
    return codes.float() * scale[..., None]


def check_scales(where: str, cache: Tensor, scale: Tensor | None) -> None:
    """One line when an int8 ``cache`` (NB, BS, Hkv, D) lacks its fp32 (NB, BS, Hkv) ``scale`` or a 16/32-bit one
    has one."""
    if cache.dtype == torch.int8:
        if scale is None or scale.shape != cache.shape[:3] or scale.dtype != torch.float32 or not scale.is_contiguous():
            got = None if scale is None else (tuple(scale.shape), scale.dtype)
            raise ValueError(f"{where}: an int8 cache {tuple(cache.shape)} needs contiguous fp32 scales "
                             f"{tuple(cache.shape[:3])} (splice.kernels.kv_cache), got {got}")
    elif scale is not None:
        raise ValueError(f"{where}: scales go with int8 caches only, the cache is {cache.dtype}")


def store_kv(new: Tensor, cache: Tensor, scale: Tensor | None, slots: Tensor) -> None:
    """Write ``new`` (T, Hkv, D) at flat ``slots`` (T,) int64 of ``cache`` (NB, BS, Hkv, D), in place: cast to
    the cache's dtype, or for an int8 cache quantized with its scales written into ``scale`` (NB, BS, Hkv)."""
    if scale is None:
        codes = new.to(cache.dtype)
    else:
        codes, scales = quantize_kv(new)
        scale.view(-1, scale.shape[2]).index_copy_(0, slots, scales)
    if cache.is_contiguous():
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, codes)
    else:  # an int8 value cache's (NB, BS, Hkv, D) view of (NB, Hkv, D, BS) storage
        cache[slots // cache.shape[1], slots % cache.shape[1]] = codes


def write_kv(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor, *,
             key_scale: Tensor | None = None, value_scale: Tensor | None = None) -> None:
    """Store this step's ``key`` / ``value`` ``(T, Hkv, D)`` at flat slots ``slot_mapping`` ``(T,)``
    of the ``(NB, BS, Hkv, D)`` caches, in place (``index_copy_``: no host sync); int8 caches as codes with
    their scales in ``key_scale`` / ``value_scale``."""
    if key.shape != value.shape or key.dim() != 3 or key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(f"write_kv: key/value (T, Hkv, D) matching the cache's (NB, BS, Hkv, D) expected, got "
                         f"{tuple(key.shape)}, {tuple(value.shape)} and cache {tuple(key_cache.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"write_kv: slot_mapping ({key.shape[0]},) expected, got {tuple(slot_mapping.shape)}")
    check_scales("write_kv", key_cache, key_scale)
    check_scales("write_kv", value_cache, value_scale)
    slots = slot_mapping.to(torch.int64)
    store_kv(key, key_cache, key_scale, slots)
    store_kv(value, value_cache, value_scale, slots)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def int8_tiles(k_at, v_at, ks_at, vs_at, table, start, kpos, k_ok, block, key_end, dd, d_ok, stride_kb, stride_kt,
                   stride_vb, stride_vt, stride_vd, stride_sb, stride_st, BLOCK_N: tl.constexpr, BS: tl.constexpr,
                   V_RUN: tl.constexpr):
        """Paged attention's int8 step (``BLOCK_N`` keys at ``kpos`` of blocks ``block``): the keys' codes
        (BLOCK_N, D_PAD), the values' (D_PAD, BLOCK_N) and both scales (BLOCK_N,). Each tile is read along its
        contiguous axis (keys: dims; values: tokens, the layout's reason) and turned for its dot by the caller."""
        k = tl.load(k_at + block[:, None] * stride_kb + (kpos % BS)[:, None] * stride_kt + dd[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0)
        # values: runs of V_RUN tokens of one block, a (head, dim)'s run one load (keys past the end read their
        # block's codes, or block 0's: finite, and their p and scale are 0)
        runs = tl.multiple_of(start, BLOCK_N) + tl.arange(0, BLOCK_N // V_RUN) * V_RUN
        run_block = tl.load(table + runs // BS, mask=runs < key_end, other=0).to(tl.int64)
        rows = tl.multiple_of(runs % BS, V_RUN)[:, None, None] + tl.arange(0, V_RUN)[None, None, :]
        v = tl.load(v_at + run_block[:, None, None] * stride_vb + rows * stride_vt + dd[None, :, None] * stride_vd,
                    mask=d_ok[None, :, None], other=0)  # (runs, D_PAD, V_RUN)
        v = tl.reshape(tl.permute(v, (1, 0, 2)), (dd.shape[0], BLOCK_N))
        at = block * stride_sb + (kpos % BS) * stride_st
        return k, v, tl.load(ks_at + at, mask=k_ok, other=0.0), tl.load(vs_at + at, mask=k_ok, other=0.0)
