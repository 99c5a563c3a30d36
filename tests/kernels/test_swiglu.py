"""Fused SwiGLU (splice.kernels.swiglu) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.swiglu import swiglu, swiglu_reference
from tests.numerics import DEVICES, rel_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 4099), (1, 1), (4, 14336)])
def test_forward_and_grads(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    u = torch.randn(shape, device=device).to(dtype).requires_grad_()
    h = swiglu(g, u)
    assert h.dtype == dtype and h.shape == g.shape
    dh = torch.randn_like(h)
    h.backward(dh)
    g64 = g.detach().double().requires_grad_()
    u64 = u.detach().double().requires_grad_()
    ref = swiglu_reference(g64, u64)
    ref.backward(dh.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(h, ref) < tol
    assert rel_err(g.grad, g64.grad) < tol
    assert rel_err(u.grad, u64.grad) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward_on_intermediates(device: str) -> None:
    x = torch.randn(6, 50, device=device, requires_grad=True)
    wg = torch.randn(70, 50, device=device)
    wu = torch.randn(70, 50, device=device)
    grads = []
    for inplace in (False, True):
        x.grad = None
        swiglu(x @ wg.T, x @ wu.T, inplace_backward=inplace).pow(2).sum().backward()
        grads.append(x.grad.clone())
    assert rel_err(grads[1], grads[0]) < 1e-6
