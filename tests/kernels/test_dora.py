"""Fused DoRA linear (splice.kernels.dora) against PEFT's formula in float64, every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.kernels.dora import (
    dora_linear,
    dora_linear_reference,
    dora_weight_norm,
    dora_weight_norm_reference,
)
from tests.numerics import DEVICES, rel_err

# (x shape, out features, rank): odd widths, a rank above 16, a 3-D batch
SHAPES = [((3, 5, 33), 17, 3), ((64, 128), 96, 8), ((2, 7, 96), 257, 20)]


def _tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-5)


def _operands(device: str, dtype: torch.dtype, shape: tuple[int, ...], out_features: int, rank: int,
              bias: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(0)
    n_in = shape[-1]
    x = torch.randn(shape, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(out_features, n_in, device=device, generator=g) / n_in**0.5).to(dtype)
    b = torch.randn(out_features, device=device, generator=g).to(dtype) if bias else None
    a = (torch.randn(rank, n_in, device=device, generator=g) / n_in**0.5).requires_grad_()
    bb = (torch.randn(out_features, rank, device=device, generator=g) * 0.3).requires_grad_()
    m = (torch.rand(out_features, device=device, generator=g) + 0.5).requires_grad_()
    return x, w, b, a, bb, m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,out_features,rank", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_forward_and_grads(device: str, dtype: torch.dtype, shape: tuple[int, ...], out_features: int,
                           rank: int, bias: bool, kernels: bool) -> None:
    x, w, b, a, bb, m = _operands(device, dtype, shape, out_features, rank, bias)
    scale = 1.7
    y = F.linear(x, w, b)
    out = dora_linear(x, y, w, b, a, bb, m, scale=scale, min_tokens=0 if kernels else 1 << 62)
    assert out.dtype == dtype and out.shape == (*shape[:-1], out_features)
    d_out = torch.randn_like(out)
    out.backward(d_out)

    x64, a64, b64, m64 = (t.detach().double().requires_grad_() for t in (x, a, bb, m))
    ref = dora_linear_reference(x64, w.double(), None if b is None else b.double(), a64, b64, m64, scale=scale)
    ref.backward(d_out.double())
    tol = _tol(dtype)
    assert rel_err(out, ref) < tol
    for got, want in ((x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, b64.grad), (m.grad, m64.grad)):
        assert rel_err(got, want) < tol
    assert a.grad.dtype == bb.grad.dtype == m.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features,rank", [(17, 33, 3), (96, 300, 8), (257, 64, 20)])
def test_weight_norm(device: str, dtype: torch.dtype, out_features: int, in_features: int, rank: int) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(out_features, in_features, device=device, generator=g).to(dtype)
    a = torch.randn(rank, in_features, device=device, generator=g)
    b = torch.randn(out_features, rank, device=device, generator=g)
    norm = dora_weight_norm(w, a, b, 0.5)
    want = torch.linalg.norm(w.double() + 0.5 * (b.double() @ a.double()), dim=1)
    assert norm.dtype == torch.float32 and not norm.requires_grad
    assert rel_err(norm, want) < 1e-5
    assert rel_err(dora_weight_norm_reference(w, a, b, 0.5), want) < 1e-5


def test_reference_is_peft_dora() -> None:
    """The reference is PEFT's DoraLinearLayer.forward added to the base output."""
    from peft.tuners.lora.dora import DoraLinearLayer

    x, w, b, a, bb, m = _operands("cpu", torch.float32, (4, 6, 12), 10, 4, True)
    base = torch.nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    lora_a, lora_b = torch.nn.Linear(12, 4, bias=False), torch.nn.Linear(4, 10, bias=False)
    with torch.no_grad():
        lora_a.weight.copy_(a)
        lora_b.weight.copy_(bb)
    layer = DoraLinearLayer(fan_in_fan_out=False)
    layer.weight = torch.nn.Parameter(m.detach().clone())
    y = base(x)
    want = y + layer(x, lora_A=lora_a, lora_B=lora_b, scaling=0.7, base_layer=base, base_result=y)
    got = dora_linear_reference(x, w, b, a, bb, m, scale=0.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_needs_a_frozen_base() -> None:
    x, w, b, a, bb, m = _operands("cpu", torch.float32, (2, 8), 4, 2, False)
    with pytest.raises(ValueError, match="frozen base"):
        dora_linear(x, F.linear(x, w), w.requires_grad_(), None, a, bb, m, scale=1.0)
