"""Fused LoRA linear (splice.kernels.lora_linear) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

import splice.kernels.lora_linear as lora_module
from splice.kernels.dropout import dropout
from splice.kernels.lora_linear import delta_then_base, lora_linear, lora_linear_reference, uses_lora_kernels
from tests.numerics import DEVICES, rel_err

# (x shape, out features, rank)
SHAPES = [((3, 5, 33), 17, 3), ((64, 128), 96, 8), ((2, 7, 96), 257, 16)]


def _tol(dtype: torch.dtype) -> float:
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,out_features,rank", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_forward_and_grads(device: str, dtype: torch.dtype, shape: tuple[int, ...], out_features: int,
                           rank: int, p: float, bias: bool, kernels: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # kernels=True: the Triton LoRA kernels take every size (where Triton applies at all)
    monkeypatch.setattr(lora_module, "LORA_KERNEL_MIN_TOKENS", 0 if kernels else 1 << 62)
    in_features = shape[-1]
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = (torch.randn(out_features, in_features, device=device) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, device=device).to(dtype) if bias else None
    # fp32 master adapter weights; B non-zero so every gradient path is exercised
    a = (torch.randn(rank, in_features, device=device) / in_features**0.5).requires_grad_()
    bb = torch.randn(out_features, rank, device=device).requires_grad_()
    scale, seed = 1.7, 1234
    y = lora_linear(x, w, b, a, bb, scale=scale, dropout_p=p, keys=seed)
    assert y.dtype == dtype and y.shape == (*shape[:-1], out_features)
    dy = torch.randn_like(y)
    y.backward(dy)

    keep = None if p == 0 else dropout(torch.ones(shape, device=device), p, seed).reshape(shape) != 0
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = bb.detach().double().requires_grad_()
    ref = lora_linear_reference(x64, w.double(), None if b is None else b.double(), a64, b64,
                                scale=scale, keep=keep, dropout_p=p)
    ref.backward(dy.double())
    tol = _tol(dtype)
    assert rel_err(y, ref) < tol
    assert rel_err(x.grad, x64.grad) < tol
    # The Triton path keeps the adapter math fp32-accurate (hi/lo split operands): its weight
    # gradients must be far better than 16-bit rounding, like PEFT's fp32 adapter branch.
    fused = uses_lora_kernels(x.reshape(-1, in_features))
    tol_ab = 2e-4 if fused else tol
    assert rel_err(a.grad, a64.grad) < tol_ab
    assert rel_err(bb.grad, b64.grad) < tol_ab
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_base_weight_and_bias_grads_when_trainable(device: str) -> None:
    x = torch.randn(9, 40, device=device, requires_grad=True)
    w = torch.randn(24, 40, device=device, requires_grad=True)
    b = torch.randn(24, device=device, requires_grad=True)
    a = torch.randn(4, 40, device=device, requires_grad=True)
    bb = torch.randn(24, 4, device=device, requires_grad=True)
    lora_linear(x, w, b, a, bb, scale=0.5).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b, a, bb)]
    for t in (x, w, b, a, bb):
        t.grad = None
    lora_linear_reference(x, w, b, a, bb, scale=0.5).sum().backward()
    for got, t in zip(grads, (x, w, b, a, bb)):
        assert rel_err(got, t.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_adapter_and_no_input_grad(device: str) -> None:
    x = torch.randn(4, 16, device=device)  # no grad wanted for x
    w = torch.randn(8, 16, device=device)
    a = torch.randn(2, 16, device=device, requires_grad=True)
    bb = torch.zeros(8, 2, device=device)  # frozen B (PEFT's init)
    y = lora_linear(x, w, None, a, bb, scale=2.0, dropout_p=0.1, keys=5)
    torch.testing.assert_close(y, x @ w.T)  # B = 0: exactly the base output
    y.sum().backward()
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0


def test_dtype_mismatch_raises() -> None:
    with pytest.raises(TypeError):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None,
                    torch.randn(1, 4), torch.randn(3, 1), scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_the_delta_first_order_computes_the_same_output(dtype: torch.dtype, bias: bool) -> None:
    """delta_then_base (the GPU path's forward: s U B^T written first, the base GEMM adding into it) is
    x W^T + b + s U B^T, to the rounding of the output's dtype, whatever the order."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 72, generator=g).to(dtype)
    w = (torch.randn(50, 72, generator=g) / 72**0.5).to(dtype)
    b = torch.randn(50, generator=g).to(dtype) if bias else None
    u, lora_b = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)  # fp32, as the kernels give U
    want = x.double() @ w.double().T + 1.5 * u.double() @ lora_b.double().T
    if b is not None:
        want = want + b.double()
    got = delta_then_base(x, w, b, u, lora_b, 1.5)
    assert got.dtype == dtype and got.shape == (37, 50)
    assert rel_err(got, want) < _tol(dtype)
