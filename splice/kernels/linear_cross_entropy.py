"""Fused linear + cross-entropy over row chunks: the loss and its gradients without the (N, V) logits.

Math, with rows ``x_i`` (H,), the head ``W`` (V, H) and bias ``b`` (V,), targets ``y_i`` and row
weights ``s_i``::

    z_i  = x_i W^T + b                                   (V,)   logits of row i
    L    = sum_i s_i * (logsumexp(z_i) - z_i[y_i])              the loss (a scalar)
    g_i  = s_i * (softmax(z_i) - onehot(y_i))            (V,)   dL/dz_i
    dL/dx_i = g_i W        dL/dW = sum_i g_i^T x_i        dL/db = sum_i g_i

``s_i`` is ``row_weight * valid_i``: ``row_weight`` is 1/n for a mean over n targets (1 for a sum)
and ``valid_i`` (0 or 1) drops a row without removing it (so the shapes stay static).

Why fused: a causal LM's loss through ``model(...).logits`` holds the (N, V) logits, their fp32
upcast and their gradient: for 8k tokens and a 128k vocab, 4 GiB each. Here the rows go through in
chunks of ``chunk_size``; for each chunk the logits are computed, turned into ``g`` in place
(:func:`splice.kernels.cross_entropy.cross_entropy_grad_`, one Triton pass on a GPU), fed to the
two gradient GEMMs right away and dropped. Backward only scales the stored gradients. This is
Liger-Kernel's "fused linear cross entropy"; the peak extra memory is one (chunk, V) block.

Shapes and dtypes: ``rows`` (N, H) and ``weight`` (V, H) float; ``bias`` (V,) or None; ``targets``
(N,) int64 in [0, V) (ignored rows must already be removed, or carry any valid id and
``valid_i = 0``); ``valid`` (N,) or None. The matmuls run in the compute dtype (by default
``promote_types(rows.dtype, weight.dtype)``, or autocast's dtype when that is fp32 and autocast
is on); softmax, the loss and the weight/bias gradient sums in fp32 (fp64 for fp64 inputs). The
loss is fp32 (fp64); the gradients come back in their inputs' dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.cross_entropy import cross_entropy_grad_

__all__ = ["LinearCrossEntropy", "linear_cross_entropy", "linear_cross_entropy_reference"]


class LinearCrossEntropy(torch.autograd.Function):
    """``L`` of the module doc, with every gradient computed in forward (chunk by chunk)."""

    @staticmethod
    def forward(
        ctx: Any,
        rows: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        bias: Tensor | None,  # (V,)
        targets: Tensor,  # (N,) int64
        row_weight: float | Tensor,  # a float, or a 0-dim fp32 tensor (no host sync)
        valid: Tensor | None,  # (N,) 0/1 per row, or None (all rows count)
        chunk_size: int,
        compute: torch.dtype,
        need_rows: bool,
        need_weight: bool,
        need_bias: bool,
    ) -> Tensor:
        n_rows = rows.shape[0]
        acc = torch.promote_types(compute, torch.float32)  # softmax, loss and gradient sums
        w = weight.to(compute)
        b = bias.to(acc) if bias is not None else None
        total = torch.zeros((), dtype=acc, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Weight and bias gradients accumulate over chunks in fp32 whatever the parameter dtype.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        keep_all = valid.to(acc) if valid is not None else torch.ones(n_rows, dtype=acc, device=rows.device)
        scales = keep_all * row_weight  # (N,) s_i
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            x = rows[start:end].to(compute)  # (c, H)
            # The matmul runs in the compute dtype (bf16: fp32 products, bf16 out); a bias is
            # added in fp32.
            logits = x @ w.T  # (c, V)
            if b is not None:
                logits = logits.to(acc) + b
            # In place: the logits become g (c, V) in their dtype; softmax and the per-row losses
            # in fp32 (a Triton kernel on a GPU: two reads and one write, no fp32 copy).
            total += cross_entropy_grad_(logits, targets[start:end], scales[start:end]).dot(keep_all[start:end])
            grad = logits
            if grad_rows is not None:
                grad_rows[start:end] = (grad.to(compute) @ w).to(rows.dtype)
            if grad_w is not None:  # (V, c) @ (c, H), in the compute dtype, summed in fp32
                if grad.dtype == compute == acc:
                    grad_w.addmm_(grad.T, x)
                else:
                    grad_w += grad.to(compute).T @ x
            if grad_b is not None:
                grad_b += grad.to(acc).sum(0)
            del grad, logits  # before the next chunk's: one (c, V) block at a time
        ctx.save_for_backward(
            grad_rows,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None,
        )
        return total * row_weight

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_rows, grad_w, grad_b = ctx.saved_tensors
        # Always one multiply (no "is it 1?" test: that would be a host sync, fatal in a graph).
        scale = grad_output.float()

        def scaled(grad: Tensor | None) -> Tensor | None:
            return None if grad is None else grad * scale.to(grad.dtype)

        return scaled(grad_rows), scaled(grad_w), scaled(grad_b), *([None] * 8)


def linear_cross_entropy(
    rows: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    row_weight: float | Tensor = 1.0,
    valid: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """``L = sum_i row_weight * valid_i * CE(rows_i W^T + bias, targets_i)`` (module doc), chunked.

    Gradients flow to ``rows``, ``weight`` and ``bias`` where they require grad (a frozen head
    costs no weight-gradient GEMM). No host sync: a call can be captured in a CUDA graph.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    compute = torch.promote_types(rows.dtype, weight.dtype)
    device_type = rows.device.type
    if compute == torch.float32 and torch.is_autocast_enabled(device_type):
        compute = torch.get_autocast_dtype(device_type)  # what autocast would run the head in
    grad_on = torch.is_grad_enabled()
    with torch.autocast(device_type=device_type, enabled=False):  # dtypes are chosen above
        loss: Tensor = LinearCrossEntropy.apply(
            rows, weight, bias, targets, row_weight, valid, chunk_size, compute,
            grad_on and rows.requires_grad,
            grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad,
        )
    return loss


def linear_cross_entropy_reference(
    rows: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    row_weight: float | Tensor = 1.0,
    valid: Tensor | None = None,
) -> Tensor:
    """The same ``L`` through the full (N, V) logits and ``F.cross_entropy`` (fp32, or fp64 for
    fp64 inputs): what :func:`linear_cross_entropy` must match, autograd giving the gradients."""
    acc = torch.promote_types(torch.promote_types(rows.dtype, weight.dtype), torch.float32)
    logits = F.linear(rows.to(acc), weight.to(acc), None if bias is None else bias.to(acc))  # (N, V)
    losses = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    if valid is not None:
        losses = losses * valid.to(acc)
    return losses.sum() * row_weight
