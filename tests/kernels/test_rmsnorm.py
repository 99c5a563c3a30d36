"""Fused RMSNorm (splice.kernels.rmsnorm) against float64 and against Hugging Face's module."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.rmsnorm import rms_norm, rms_norm_reference
from tests.numerics import DEVICES, rel_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 33), (7, 4096), (1, 257), (2, 3, 1000)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_forward_and_grads(device: str, dtype: torch.dtype, shape: tuple[int, ...], train_weight: bool) -> None:
    eps = 1e-5
    x = (3 * torch.randn(shape, device=device) + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_(train_weight)
    y = rms_norm(x, w, eps)
    assert y.dtype == dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_(train_weight)
    ref = rms_norm_reference(x64, w64, eps)
    ref.backward(dy.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    if train_weight:
        assert rel_err(w.grad, w64.grad) < tol
    else:
        assert w.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_matches_hugging_face_in_bf16(device: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(300, eps=1e-6).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(300))
    x = torch.randn(11, 300, device=device, dtype=torch.bfloat16)
    # same formula and roundings; the kernel's fp32 sum order differs (bf16 noise at most)
    assert rel_err(rms_norm(x, norm.weight, 1e-6), norm(x)) < 1e-2


def test_fp32_weight_promotes_like_hf() -> None:
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.ones(8)
    assert rms_norm(x, w, 1e-6).dtype == torch.float32
