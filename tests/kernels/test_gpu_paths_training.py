"""GPU-only check of the varlen attention kernel (training's packed rows) past 2**31 elements: a packed
batch of 2**19 tokens x 32 heads x 128, whose pointer offsets overflow int32 (skipped without a GPU).
"""

from __future__ import annotations

import torch

from splice.kernels.varlen_attention import varlen_attention, varlen_attention_reference
from tests.numerics import GPU, rel_err


@GPU
def test_varlen_attention_past_two_to_the_31_elements() -> None:
    """q is 2**19 x 32 x 128 (2**31 elements, 4 GiB in bf16): the last segments' outputs and gradients
    match the reference computed on those segments alone (an int32 offset would read another row)."""
    torch.manual_seed(0)
    seg, tokens, hq, hkv, d = 512, 1 << 19, 32, 8, 128
    q = torch.randn(tokens, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.arange(0, tokens + 1, seg, device="cuda", dtype=torch.int32)
    out = varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=seg, scale=d**-0.5)
    grad = torch.zeros_like(out)
    tail = slice(tokens - 2 * seg, tokens)
    grad[tail] = torch.randn(2 * seg, hq, d, device="cuda", dtype=torch.bfloat16)
    out.backward(grad)
    parts = [x.detach()[tail].float().requires_grad_() for x in (q, k, v)]
    want = varlen_attention_reference(*parts, cu_seqlens=cu[-3:] - cu[-3], max_seqlen=seg, scale=d**-0.5)
    want.backward(grad[tail].float())
    assert rel_err(out.detach()[tail].float(), want) < 2e-2
    for got, ref in zip((q, k, v), parts, strict=True):
        assert got.grad is not None and ref.grad is not None
        assert rel_err(got.grad[tail].float(), ref.grad) < 3e-2
