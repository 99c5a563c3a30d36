"""Fused RoPE (splice.kernels.rope) against float64 and Hugging Face's apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.rope import rope, rope_reference
from tests.numerics import DEVICES, rel_err

# (batch, seq, q heads, kv heads, head_dim, cos batch)
CASES = [(2, 7, 3, 1, 64, 1), (1, 33, 32, 8, 128, 1), (3, 5, 4, 4, 16, 3), (2, 4, 2, 2, 80, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads(device: str, dtype: torch.dtype, case: tuple[int, ...]) -> None:
    b, s, hq, hk, d, cb = case
    q = torch.randn(b, s, hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, s, hk, d, device=device).to(dtype).requires_grad_()
    # arbitrary cos/sin (the kernel must not assume equal halves)
    cos = torch.randn(cb, s, d, device=device).to(dtype)
    sin = torch.randn(cb, s, d, device=device).to(dtype)
    qo, ko = rope(q, k, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    rq, rk = rope_reference(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((rq, rk), (dq.double(), dk.double()))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(qo, rq) < tol and rel_err(ko, rk) < tol
    assert rel_err(q.grad, q64.grad) < tol and rel_err(k.grad, k64.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_matches_hugging_face(device: str) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    rotary = LlamaRotaryEmbedding(config).to(device)
    q = torch.randn(2, 9, 4, 64, device=device)
    k = torch.randn(2, 9, 2, 64, device=device)
    pos = torch.arange(9, device=device)[None].expand(2, 9)
    cos, sin = rotary(q, pos)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, S, D)
    oq, ok = rope(q, k, cos, sin)
    assert rel_err(oq.transpose(1, 2), hq) < 1e-5 and rel_err(ok.transpose(1, 2), hk) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_unread_output_has_the_same_backward(device: str) -> None:
    """``output=False`` (a recompute that never reads the values): identical input gradients."""
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 16, device=device, requires_grad=True)
    k = torch.randn(2, 5, 2, 16, device=device, requires_grad=True)
    cos, sin = torch.randn(1, 5, 16, device=device), torch.randn(1, 5, 16, device=device)
    dq, dk = torch.randn(2, 5, 4, 16, device=device), torch.randn(2, 5, 2, 16, device=device)
    grads = []
    for output in (True, False):
        oq, ok = rope(q, k, cos, sin, output=output)
        assert oq.shape == q.shape and ok.shape == k.shape
        grads.append(torch.autograd.grad((oq, ok), (q, k), (dq, dk)))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
