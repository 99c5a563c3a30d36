"""Attention of fresh prompts over a step's own keys: cuDNN's ragged SDPA on CUDA, plain PyTorch elsewhere.

A *fresh* sequence of a generation step has no cached prefix: its ``L_b`` queries (positions ``0 .. L_b - 1``) are
the whole sequence so far, so they attend causally to exactly the ``L_b`` keys this step computed for it
(``seq_lens[b] == L_b`` in the layout of :mod:`splice.kernels.paged_attention`). That attention needs no page
table: the step's rotated keys and values, dense (:func:`~splice.kernels.rope_cache.rope_write_kv` with
``kv_out``), are enough, and a dense kernel can run it. Shapes: ``q`` (T, Hq, D), ``k`` / ``v`` (T, Hkv, D), all
contiguous, ``Hq`` a multiple of ``Hkv`` (GQA); sequence ``b`` owns rows ``qsl[b] : qsl[b + 1]`` of each
(``qsl = query_start_loc``, (B + 1,) int32)::

    out[t, h] = sum_{j <= i} softmax_j(scale * q[s + i, h] . k[s + j, h // G]) v[s + j, h // G]
                for t = s + i, s = qsl[b], 0 <= i < L_b              softmax in fp32, out in q's dtype

This is :mod:`splice.kernels.varlen_attention`'s math (causal attention within packed segments, the training
kernel) with ``cu_seqlens = qsl``, so ``qsl[B]`` must be ``T``. Every sequence of the call is treated as fresh: the
caller keeps the rows of the others (decodes, chunks after a cached prefix) from the paged kernel, run afterwards
into the same output with ``skip_fresh=True``.

On CUDA this is ``torch.ops.aten._cudnn_attention_forward`` with cumulative sequence lengths (cuDNN's ragged
"THD" layout; the op torch's nested-tensor SDPA calls), a dense kernel with no page-table loads in its key loop:
on an H100 torch's dense SDPA ran a fresh 2,048-token prompt 2.2x faster than the paged kernel (83 against 185 us,
2026-12-06, ``benchmarks/paged_attention.py``). :func:`cudnn_unusable` names what rules it out on a machine (an
older torch, no cuDNN, fp32, odd head dims); everywhere else the varlen kernel (Triton on CUDA) or its reference
runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels.varlen_attention import varlen_attention, varlen_attention_reference

__all__ = ["cudnn_unusable", "fresh_attention"]


def _check(q: Tensor, k: Tensor, v: Tensor, query_start_loc: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] \
            or q.shape[1] % k.shape[1] or query_start_loc.dim() != 1:
        raise ValueError(f"fresh_attention: q (T, Hq, D), k/v (T, Hkv, D) with Hq a multiple of Hkv and "
                         f"query_start_loc (B+1,) expected, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(query_start_loc.shape)}")


def _static_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    # what rules cuDNN out before any call (fresh_attention's dispatch)
    if device.type != "cuda":
        return f"cuDNN attention runs on CUDA tensors, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN attention takes fp16 or bf16, not {dtype}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN attention takes head dims that are multiples of 8 up to 256, not {head_dim}"
    if not torch.backends.cudnn.is_available() or not hasattr(torch.ops.aten, "_cudnn_attention_forward"):
        return "this torch has no cuDNN attention (aten::_cudnn_attention_forward)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "cuDNN's fused attention needs an sm_80 or newer GPU"
    return None


def cudnn_unusable(*, device: torch.device, dtype: torch.dtype, heads: tuple[int, int], head_dim: int) -> str | None:
    """Why cuDNN's ragged attention cannot serve ``heads`` = (Hq, Hkv) x ``head_dim`` in ``dtype`` here (one line), or
    None when it can: the static checks, then one small call against the reference (an older torch's op, or a
    cuDNN without GQA, shows only when called)."""
    if (reason := _static_reason(device, dtype, head_dim)) is not None:
        return reason
    hq, hkv = heads
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(9, h, head_dim, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv))
    qsl = torch.tensor([0, 4, 9], device=device, dtype=torch.int32)
    try:
        got = fresh_attention(q, k, v, query_start_loc=qsl, max_query_len=5, scale=head_dim**-0.5)
    except Exception as error:  # (any failure of the op is the answer)
        return f"cuDNN attention failed: {str(error).splitlines()[0][:200]}"
    want = varlen_attention_reference(q, k, v, cu_seqlens=qsl, max_seqlen=5, scale=head_dim**-0.5)
    if not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2):
        return f"cuDNN attention differs from the reference by {float((got.float() - want.float()).abs().max()):.3g}"
    return None


def fresh_attention(q: Tensor, k: Tensor, v: Tensor, *, query_start_loc: Tensor, max_query_len: int,
                    scale: float) -> Tensor:
    """Causal attention of every sequence over its own rows (module doc): (T, Hq, D) in q's dtype, a new tensor.
    ``max_query_len``: a host upper bound on ``L_b`` (it sizes cuDNN's grid). cuDNN on CUDA (:func:`cudnn_unusable`
    says when not), the varlen kernel or its reference elsewhere."""
    _check(q, k, v, query_start_loc)
    if _static_reason(q.device, q.dtype, q.shape[2]) is not None:
        return varlen_attention(q, k, v, cu_seqlens=query_start_loc, max_seqlen=max_query_len, scale=scale)
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))  # (offsets count whole rows)
    qsl = query_start_loc.to(torch.int32)
    # by keyword: a private op whose argument list has grown between releases; its output (T, Hq, D) comes first
    return torch.ops.aten._cudnn_attention_forward(
        q, k, v, attn_bias=None, cum_seq_q=qsl, cum_seq_k=qsl, max_q=max_query_len, max_k=max_query_len,
        compute_log_sumexp=False, dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scale)[0]
