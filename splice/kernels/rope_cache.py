"""RoPE on q and k and the K/V cache write of a generation step, in one launch.

Math, per token ``t`` of a flat step (``D`` = head_dim, ``h = D/2``, ``x = [x1, x2]`` in halves,
``c``/``s`` the token's cos/sin rows of length ``D``, as :mod:`splice.kernels.rope`)::

    rope(x) = [x1 c1 - x2 s1,  x2 c2 + x1 s2]
    q_out[t] = rope(q[t])                        every query head
    key_cache.flat[slot[t]] = rope(k[t])         every kv head, at the token's flat cache slot
    value_cache.flat[slot[t]] = v[t]

Shapes: ``q`` (T, Hq, D), ``k``/``v`` (T, Hkv, D), any row and head strides (views of one packed
q/k/v projection output are fine; the last dim must be contiguous); ``cos``/``sin`` (T, 1, D) or
(T, D), as a Llama-style rotary embedding returns for positions shaped (T, 1); caches
(NB, BS, Hkv, D) with contiguous (BS, Hkv, D) blocks; ``slot_mapping`` (T,) int64. Returns
``q_out`` (T, Hq, D), contiguous, in q's dtype; the cache rows are written in place.

``kv_out``: two contiguous (T, Hkv, D) tensors in q's dtype that also receive ``rope(k)`` and ``v``, densely
(the step's own keys and values, for :mod:`splice.kernels.varlen_attention`: a fresh prompt attends to them
without a page table).

The Triton path runs one program per token: it loads the token's cos/sin once and rotates every
head of q and k (fp32 inside, one rounding), so a decode step's layer does one launch here instead
of four (rotate q, rotate k, copy k, copy v). :func:`rope_write_kv_reference` is the plain
PyTorch composition (Hugging Face's formula, then ``index_copy_``); it is also the CPU path.

int8 caches (:mod:`splice.kernels.kv_cache`): the rotated key (fp32, before any rounding) and the value are
written as int8 codes with a scale per (token, kv head) into ``key_scale`` / ``value_scale`` (NB, BS, Hkv).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON, use_triton
from .kv_cache import check_scales, store_kv

__all__ = ["rope_write_kv", "rope_write_kv_reference"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate(src, heads, c1, c2, s1, s2, d, src_head_stride, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # the two rotated halves (BLOCK_H, HALF) of every head's vector, fp32
        h = tl.arange(0, BLOCK_H)[:, None]
        inside = h < heads
        x1 = tl.load(src + h * src_head_stride + d, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(src + h * src_head_stride + HALF + d, mask=inside, other=0.0).to(tl.float32)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _codes(x, scale):
        # int8 codes of x (rows, D) with one scale a row: x / scale rounded half away from zero (kv_cache)
        y = x / tl.where(scale > 0, scale, 1.0)[:, None]
        return tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)

    @triton.jit
    def _rope_cache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, ko_ptr, vo_ptr,
        hq, hkv, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
        stride_slot, stride_ch, block_size, stride_cvb, stride_cvt, stride_cvh, stride_cvd,
        HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, QUANT: tl.constexpr,
        DENSE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]
        c1 = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + d).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_ct + d).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_ct + HALF + d).to(tl.float32)
        hq_rows = tl.arange(0, BLOCK_HQ)[:, None]
        q1, q2 = _rotate(q_ptr + t * stride_qt, hq, c1, c2, s1, s2, d, stride_qh, HALF, BLOCK_HQ)
        q_dst = q_out_ptr + t * hq * (2 * HALF) + hq_rows * (2 * HALF)
        tl.store(q_dst + d, q1.to(q_out_ptr.dtype.element_ty), mask=hq_rows < hq)
        tl.store(q_dst + HALF + d, q2.to(q_out_ptr.dtype.element_ty), mask=hq_rows < hq)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_HKV)[:, None]
        inside = h < hkv
        k1, k2 = _rotate(k_ptr + t * stride_kt, hkv, c1, c2, s1, s2, d, stride_kh, HALF, BLOCK_HKV)
        k_dst = kc_ptr + slot * stride_slot + h * stride_ch
        dd = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dd, mask=inside, other=0.0)
        if DENSE:  # rope(k) and v also at row t of the dense (T, Hkv, D) kv_out, rounded like the cache
            dense = t * hkv * (2 * HALF) + h * (2 * HALF)
            tl.store(ko_ptr + dense + d, k1.to(ko_ptr.dtype.element_ty), mask=inside)
            tl.store(ko_ptr + dense + HALF + d, k2.to(ko_ptr.dtype.element_ty), mask=inside)
            tl.store(vo_ptr + dense + dd, v.to(vo_ptr.dtype.element_ty), mask=inside)
        # the value cache by its (NB, BS, Hkv, D) strides: an int8 one is token-major (splice.kernels.kv_cache)
        v_dst = vc_ptr + (slot // block_size) * stride_cvb + (slot % block_size) * stride_cvt + h * stride_cvh \
            + dd * stride_cvd
        if QUANT:  # int8 codes and a scale per (token, kv head): splice.kernels.kv_cache
            heads = tl.arange(0, BLOCK_HKV)
            k_scale = tl.maximum(tl.max(tl.abs(k1), axis=1), tl.max(tl.abs(k2), axis=1)) / 127.0
            tl.store(k_dst + d, _codes(k1, k_scale), mask=inside)
            tl.store(k_dst + HALF + d, _codes(k2, k_scale), mask=inside)
            tl.store(ks_ptr + slot * hkv + heads, k_scale, mask=heads < hkv)
            v = v.to(tl.float32)
            v_scale = tl.max(tl.abs(v), axis=1) / 127.0
            tl.store(v_dst, _codes(v, v_scale), mask=inside)
            tl.store(vs_ptr + slot * hkv + heads, v_scale, mask=heads < hkv)
        else:
            tl.store(k_dst + d, k1.to(kc_ptr.dtype.element_ty), mask=inside)
            tl.store(k_dst + HALF + d, k2.to(kc_ptr.dtype.element_ty), mask=inside)
            tl.store(v_dst, v.to(vc_ptr.dtype.element_ty), mask=inside)


def rope_write_kv_reference(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
                            value_cache: Tensor, slot_mapping: Tensor, *, key_scale: Tensor | None = None,
                            value_scale: Tensor | None = None, kv_out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The module docstring's math in plain PyTorch (also the CPU path)."""
    c, s = (t.reshape(q.shape[0], 1, -1).float() for t in (cos, sin))  # (T, 1, D), fp32 like the kernel

    def rotate(x: Tensor) -> Tensor:  # fp32, rounded by the caller (int8 codes quantize the fp32 rotation)
        half = x.shape[-1] // 2
        wide = x.float()
        turned = torch.cat((-wide[..., half:], wide[..., :half]), dim=-1)
        return wide * c + turned * s

    slots = slot_mapping.to(torch.int64)
    key = rotate(k) if key_scale is not None else rotate(k).to(k.dtype)
    store_kv(key, key_cache, key_scale, slots)
    store_kv(v, value_cache, value_scale, slots)
    if kv_out is not None:
        kv_out[0].copy_(rotate(k))
        kv_out[1].copy_(v)
    return rotate(q).to(q.dtype).contiguous()


def _fits(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
          value_cache: Tensor, slot_mapping: Tensor) -> bool:
    tokens, _, dim = q.shape
    half = dim // 2
    return (
        use_triton(q, k, v, cos, sin, key_cache, value_cache, slot_mapping)
        and q.dtype in _DTYPES and k.dtype == v.dtype == q.dtype
        and key_cache.dtype == value_cache.dtype and key_cache.dtype in (q.dtype, torch.int8)
        and dim % 2 == 0 and half & (half - 1) == 0
        and all(x.stride(-1) == 1 for x in (q, k, v))
        and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.shape[-1] == dim and cos.stride(-1) == 1
        and cos.numel() == tokens * dim
        and key_cache.is_contiguous() and (value_cache.is_contiguous() or value_cache.dtype == torch.int8)
        and tokens > 0
    )


def rope_write_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
                  value_cache: Tensor, slot_mapping: Tensor, *, key_scale: Tensor | None = None,
                  value_scale: Tensor | None = None, kv_out: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """RoPE on ``q``/``k`` and the cache write of ``k``/``v`` (module docstring); returns rope(q).
    ``kv_out``: dense (T, Hkv, D) buffers in q's dtype that receive rope(k) and v as well (module docstring).
    int8 caches take their fp32 scales ``key_scale`` / ``value_scale`` (NB, BS, Hkv): the codes and a scale per
    token and head are written (:mod:`splice.kernels.kv_cache`). One Triton launch for CUDA tensors that fit; the
    reference otherwise."""
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or k.shape[1:] != key_cache.shape[2:] \
            or slot_mapping.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"rope_write_kv: q (T, Hq, D), k/v (T, Hkv, D) matching the cache's (NB, BS, Hkv, D) and "
                         f"slot_mapping (T,) expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"cache {tuple(key_cache.shape)}, slots {tuple(slot_mapping.shape)}")
    check_scales("rope_write_kv", key_cache, key_scale)
    check_scales("rope_write_kv", value_cache, value_scale)
    if kv_out is not None and any(o.shape != k.shape or o.dtype != q.dtype or not o.is_contiguous() for o in kv_out):
        raise ValueError(f"rope_write_kv: kv_out must be two contiguous {tuple(k.shape)} tensors of q's dtype "
                         f"{q.dtype}, got {[(tuple(o.shape), o.dtype) for o in kv_out]}")
    if not _fits(q, k, v, cos, sin, key_cache, value_cache, slot_mapping):
        return rope_write_kv_reference(q, k, v, cos, sin, key_cache, value_cache, slot_mapping, key_scale=key_scale,
                                       value_scale=value_scale, kv_out=kv_out)
    tokens, hq, dim = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(tokens, hq, dim, device=q.device, dtype=q.dtype)
    flat_c, flat_s = cos.reshape(tokens, dim), sin.reshape(tokens, dim)
    _rope_cache_kernel[(tokens,)](
        q, k, v, flat_c, flat_s, q_out, key_cache, value_cache,
        key_cache if key_scale is None else key_scale, value_cache if value_scale is None else value_scale,
        slot_mapping, *(kv_out or (q_out, q_out)), hq, hkv, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        flat_c.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.shape[1], *value_cache.stride(),
        HALF=dim // 2, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
        QUANT=key_scale is not None, DENSE=kv_out is not None, num_warps=4,
    )
    return q_out
