"""splice.kernels.linear_cross_entropy: the chunked fused linear + cross-entropy against its full-logits
reference (in float64), forward and gradients, over dtypes, odd shapes, chunk sizes, biases and row
masks. (Its use as a causal LM loss is tested in tests/training/test_loss.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from splice.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tests.numerics import DEVICES, rel_err

# (rows N, hidden H, vocab V, chunk): one of everything, chunks that do not divide N, one chunk
# for all, an odd vocabulary wider than a Triton block.
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 2), (17, 13, 301, 4), (33, 16, 37, 1024), (9, 8, 4099, 5)]
# Loss and gradients against float64, per input dtype: fp32 to rounding; bf16/fp16 logits carry
# the 16-bit rounding of the matmul's output (about 2**-8 / 2**-11 relative).
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _problem(n: int, h: int, v: int, dtype: torch.dtype, device: str, *,
             seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    targets[0] = v - 1  # the last column
    valid = (torch.rand(n, generator=g) > 0.3).to(device)
    return rows, weight, bias, targets, valid


def _loss_and_grads(fn: object, *tensors: Tensor) -> tuple[Tensor, list[Tensor]]:
    for t in tensors:
        t.grad = None
    loss = fn()  # type: ignore[operator]
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in tensors]  # type: ignore[union-attr]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("n", "h", "v", "chunk"), SHAPES)
def test_matches_the_reference_forward_and_backward(n: int, h: int, v: int, chunk: int,
                                                    dtype: torch.dtype, device: str) -> None:
    rows, weight, bias, targets, valid = _problem(n, h, v, dtype, device, seed=n * v)
    kw = {"bias": bias, "row_weight": 1.0 / n, "valid": valid}
    loss, got = _loss_and_grads(lambda: linear_cross_entropy(rows, weight, targets, chunk_size=chunk, **kw),
                                rows, weight, bias)
    # float64 copies of the same (already rounded) inputs: the exact answer
    exact = [t.detach().double().requires_grad_() for t in (rows, weight, bias)]
    ref, want = _loss_and_grads(lambda: linear_cross_entropy_reference(
        exact[0], exact[1], targets, bias=exact[2], row_weight=1.0 / n, valid=valid), *exact)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert [g.dtype for g in got] == [dtype] * 3  # gradients in their inputs' dtypes
    assert abs(loss.item() - ref.item()) <= LOSS_TOL[dtype] * max(1.0, abs(ref.item()))
    for name, g, r in zip(("rows", "weight", "bias"), got, want, strict=True):
        if r.abs().max() == 0:  # V = 1: the loss is 0 whatever the inputs
            assert not g.any(), name
        else:
            assert rel_err(g, r) < GRAD_TOL[dtype], (name, rel_err(g, r))


def test_masked_rows_count_nothing_and_get_no_gradient() -> None:
    rows, weight, bias, targets, valid = _problem(12, 8, 23, torch.float32, "cpu", seed=3)
    loss, (grad_rows,) = _loss_and_grads(
        lambda: linear_cross_entropy(rows, weight, targets, bias=bias, valid=valid, chunk_size=5), rows)
    kept = valid.nonzero().squeeze(1)
    only = linear_cross_entropy(rows.detach()[kept], weight.detach(), targets[kept], bias=bias.detach())
    torch.testing.assert_close(loss, only, rtol=1e-6, atol=0)
    assert torch.all(grad_rows[~valid] == 0) and torch.all(grad_rows[valid].abs().sum(-1) > 0)


def test_row_weight_as_a_tensor_and_upstream_gradient_scale_everything() -> None:
    rows, weight, bias, targets, _ = _problem(7, 6, 19, torch.float32, "cpu", seed=4)
    plain, grads = _loss_and_grads(lambda: linear_cross_entropy(rows, weight, targets, chunk_size=3),
                                   rows, weight)
    scaled, scaled_grads = _loss_and_grads(lambda: 3.0 * linear_cross_entropy(
        rows, weight, targets, row_weight=torch.tensor(0.25), chunk_size=3), rows, weight)
    torch.testing.assert_close(scaled, 0.75 * plain, rtol=1e-6, atol=0)
    for g, s in zip(grads, scaled_grads, strict=True):
        torch.testing.assert_close(s, 0.75 * g, rtol=1e-6, atol=1e-9)


def test_frozen_inputs_get_no_gradient_and_no_rows_give_zero() -> None:
    rows, weight, _, targets, _ = _problem(6, 4, 11, torch.float32, "cpu", seed=5)
    weight.requires_grad_(False)
    linear_cross_entropy(rows, weight, targets, chunk_size=4).backward()
    assert weight.grad is None and rows.grad is not None
    empty = linear_cross_entropy(rows[:0], weight, targets[:0])
    assert empty.item() == 0.0
    empty.backward()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        linear_cross_entropy(rows, weight, targets, chunk_size=0)


def test_pinned_value() -> None:
    """A fixed problem's loss, pinned (catches a changed definition, not only a changed path)."""
    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    targets = torch.tensor([0, 4, 2, 2])
    loss = linear_cross_entropy(rows, weight, targets, row_weight=0.25, chunk_size=3)
    assert loss.item() == pytest.approx(PINNED, rel=1e-6)


PINNED = 2.1568879822827456  # linear_cross_entropy_reference in float64
