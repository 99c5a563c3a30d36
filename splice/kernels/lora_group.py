"""Sibling LoRA linears that read one input (q/k/v, gate/up) as one autograd node.

Members ``j = 1..G`` share ``x`` (N, K): ``y_j = x W_j^T + b_j + s_j (x A_j^T) B_j^T`` with ``W_j``
(out_j, K), ``A_j`` = ``lora_A.weight`` (r_j, K), ``B_j`` = ``lora_B.weight`` (out_j, r_j). Stack the
down-projections, ``A = [A_1; ..; A_G]`` (R, K) with ``R = r_1 + .. + r_G``: then ``U = x A^T`` (N, R) is
one down-projection that reads ``x`` once, and ``U_j`` is its column block. Backward, ``G_j = dY_j``::

    T_j = s_j G_j B_j            (N, r_j);   T = [T_1 .. T_G]  (N, R)
    dx  = sum_j G_j W_j + T A    (accumulating GEMMs, then one LoRA input-gradient pass)
    dA  = T^T x                  (R, K): one reduction over the tokens, x read once
    dB_j = s_j G_j^T U_j         (out_j, r_j)

Against :func:`~splice.kernels.lora_linear.lora_linear` member by member this reads ``x`` once instead of
G times in the down-projection and in ``dA``, adds the LoRA part of ``dx`` in one pass instead of G, and
sums the base input gradients in the GEMMs' accumulator instead of G - 1 separate adds (autograd's sum of
the gradients of a tensor used G times).

Dropout (``p > 0``, members of one rank ``r``): each member keeps its own mask ``D_j`` of ``x`` (keys row
``j``, the mask :func:`~splice.kernels.lora_linear.lora_linear` draws for those keys), so ``U_j = D_j(x)
A_j^T``, ``dA_j = T_j^T D_j(x)`` and ``dx``'s LoRA part is ``sum_j D_j(T_j A_j)``: the kernels take the
members as blocks (:mod:`splice.kernels.lora_kernels`, ``members``: the members' programs of one ``x`` tile
side by side, ``dx`` written once); off the kernels, one masked matmul a member.
Frozen bases that run their own GEMMs (``bases``: FP8 weights, :mod:`splice.quant.fp8`) compute ``x W_j^T``
from one quantization of ``x`` shared by the members (``prepare``), and ``dx``'s base part as the sum of the
members' own input-gradient GEMMs (an FP8 GEMM does not accumulate into an existing ``dx``).
Precision and paths as :mod:`splice.kernels.lora_linear`: the Triton LoRA kernels (fp32-accurate adapter
math) from :data:`~splice.kernels.lora_linear.LORA_KERNEL_MIN_TOKENS` tokens on a GPU, else plain
PyTorch matmuls in the activations' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import dropout, dropout_add_
from .lora_kernels import lora_b_grads, lora_down, lora_dx_add_, tn_reduce
from .lora_linear import FrozenBase, _dense, _mm_f32, delta_then_base, uses_lora_kernels

__all__ = ["lora_group", "lora_group_u"]


def _stacked(lora_as: Sequence[Tensor], dtype: torch.dtype, triton: bool) -> Tensor:
    """``A = [A_1; ..; A_G]`` (R, K): fp32 for the Triton kernels, else the activations' dtype."""
    return torch.cat([a.float() if triton else a.to(dtype) for a in lora_as]).contiguous()


def _down(x2: Tensor, a: Tensor, triton: bool, p: float, keys: Tensor | None, members: int) -> Tensor:
    """``U = [D_1(x) A_1^T .. D_G(x) A_G^T]`` (N, R) (``x A^T`` without dropout): fp32 from the Triton
    kernel, else in x's dtype."""
    if p == 0:
        return lora_down(x2, a) if triton else x2 @ a.T
    assert keys is not None
    if triton:
        return lora_down(x2, a, p, keys, members=members)
    return torch.cat([dropout(x2, p, keys[j]) @ aj.T for j, aj in enumerate(a.chunk(members))], dim=1)


def _check_dropout(p: float, keys: Tensor | None, ranks: Sequence[int]) -> None:
    if p > 0 and (keys is None or keys.shape != (len(ranks), 2) or len(set(ranks)) > 1):
        raise ValueError(f"lora_group: dropout {p} takes members of one rank and ({len(ranks)}, 2) keys, one row a "
                         f"member; got ranks {list(ranks)} and keys {None if keys is None else tuple(keys.shape)}")


def lora_group_u(x: Tensor, lora_as: Sequence[Tensor], *, dropout_p: float = 0.0,
                 keys: Tensor | None = None) -> Tensor:
    """``U`` (N, R) exactly as :func:`lora_group` computes it for the same ``keys``: for passing back as its ``u``."""
    _check_dropout(dropout_p, keys, [a.shape[0] for a in lora_as])
    x2 = x.reshape(-1, x.shape[-1])
    triton = uses_lora_kernels(x2)
    return _down(x2.contiguous() if triton else x2, _stacked(lora_as, x2.dtype, triton), triton, dropout_p, keys,
                 len(lora_as))


class _LoraGroupFn(torch.autograd.Function):
    """Tensors in: ``x``, then the G weights, G biases (or None), G ``A``s and G ``B``s."""

    @staticmethod
    def forward(ctx: Any, scales: tuple[float, ...], output: bool, given_u: Tensor | None,
                bases: tuple[FrozenBase, ...] | None, p: float, keys: Tensor | None, x: Tensor,
                *tensors: Tensor | None) -> tuple[Tensor, ...]:
        g = len(scales)
        weights, biases = tensors[:g], tensors[g:2 * g]
        lora_as, lora_bs = tensors[2 * g:3 * g], tensors[3 * g:]
        x2 = x.reshape(-1, x.shape[-1])  # (N, K)
        ctx.triton = uses_lora_kernels(x2)
        if ctx.triton:
            x2 = x2.contiguous()
        a = _stacked(lora_as, x2.dtype, ctx.triton)  # type: ignore[arg-type]
        u = given_u if given_u is not None else _down(x2, a, ctx.triton, p, keys, g)
        # frozen bases (FP8) share what their GEMMs make of x (its quantization): the first that makes any
        prepared = next((p for p in (base.prepare(x2) for base in bases) if p is not None), None) \
            if bases is not None and output else None
        outs = []
        start = 0
        for j, (w, bias, b, scale) in enumerate(zip(weights, biases, lora_bs, scales, strict=True)):
            assert w is not None and b is not None
            rank = b.shape[1]
            if output and bases is not None:
                y = bases[j].matmul(x2, prepared)
                if bias is not None:
                    y.add_(bias.to(y.dtype))
                y.addmm_(u[:, start:start + rank].to(x2.dtype), b.to(x2.dtype).T, alpha=scale)
            elif output and ctx.triton:
                y = delta_then_base(x2, w, bias, u[:, start:start + rank], b, scale)  # (N, out_j)
            elif output:
                y = F.linear(x2, _dense(w, x2.dtype), bias)  # (N, out_j)
                y.addmm_(u[:, start:start + rank].to(x2.dtype), b.to(x2.dtype).T, alpha=scale)
            else:  # nobody reads the values (a checkpoint recompute): only the backward is built
                y = x2.new_empty(x2.shape[0], w.shape[0])
            outs.append(y.view(*x.shape[:-1], w.shape[0]))
            start += rank
        # the A parameters, not their stacked copy: re-stacked in the backward (R x K, cheap), so a saved
        # layer holds no copy of its adapters (checkpointing keeps many layers' saved tensors)
        ctx.save_for_backward(x2, u, *weights, *lora_as, *lora_bs)
        ctx.scales, ctx.bases, ctx.p, ctx.keys = scales, bases, p, keys
        ctx.biased = tuple(bias is not None for bias in biases)
        ctx.x_shape = x.shape
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        scales = ctx.scales
        g = len(scales)
        x2, u, *rest = ctx.saved_tensors
        weights, lora_as, lora_bs = rest[:g], rest[g:2 * g], rest[2 * g:]
        need = ctx.needs_input_grad
        need_x = need[6]  # (scales, output, given_u, bases, p, keys, x, then the tensors)
        need_w, need_bias = need[7:7 + g], need[7 + g:7 + 2 * g]
        need_a, need_b = any(need[7 + 2 * g:7 + 3 * g]), need[7 + 3 * g:]
        p, keys = ctx.p, ctx.keys
        members = g if p > 0 else 1  # without dropout, the stacked A is one block
        gs = [gr.reshape(-1, gr.shape[-1]).to(x2.dtype) for gr in grads]  # (N, out_j) each
        if ctx.triton:
            gs = [gr.contiguous() for gr in gs]
        ranks = [b.shape[1] for b in lora_bs]
        dbs: list[Tensor | None] = [None] * g
        if ctx.triton:  # T_j = s_j G_j B_j, fp32; with dB_j (= s_j G_j^T U_j) from the same read of G_j
            ts, start = [], 0
            for j, (gr, b, s) in enumerate(zip(gs, lora_bs, scales)):
                b_t = b.float().t().contiguous()
                if need_b[j]:
                    tj, db_t = lora_b_grads(gr, b_t, u[:, start:start + ranks[j]].contiguous(), alpha=s)
                    dbs[j] = db_t.t().to(b.dtype)
                else:
                    tj = lora_down(gr, b_t, alpha=s)
                ts.append(tj)
                start += ranks[j]
        else:
            ts = [(gr @ b.to(x2.dtype)).mul_(s) for gr, b, s in zip(gs, lora_bs, scales)]
        t = torch.cat(ts, dim=1) if g > 1 else ts[0]  # (N, R)
        a = _stacked(lora_as, x2.dtype, ctx.triton)
        dx = None
        if need_x and ctx.bases is not None:  # frozen bases' input-gradient GEMMs (FP8: no accumulate), summed
            dx = ctx.bases[0].matmul_t(gs[0])
            for gr, base in zip(gs[1:], ctx.bases[1:]):
                dx.add_(base.matmul_t(gr))
        elif need_x:
            dx = gs[0] @ _dense(weights[0], x2.dtype)  # (N, K), then the others accumulated in the GEMMs
            for gr, w in zip(gs[1:], weights[1:]):
                dx.addmm_(gr, _dense(w, x2.dtype))
        if need_x:
            assert dx is not None
            if ctx.triton:
                lora_dx_add_(dx, t, a, p, 0 if keys is None else keys, members=members)
            elif p > 0:
                for j, (tj, aj) in enumerate(zip(t.split(ranks, dim=1), a.split(ranks))):
                    dropout_add_(dx, tj @ aj, p, keys[j])
            else:
                dx.addmm_(t, a)
            dx = dx.view(ctx.x_shape)
        das: list[Tensor | None] = [None] * g
        if need_a:
            if ctx.triton:
                da = tn_reduce(t, x2, p, 0 if keys is None else keys, members=members)  # (R, K) fp32
            elif p > 0:
                da = torch.cat([_mm_f32(tj.T, dropout(x2, p, keys[j])) for j, tj in enumerate(t.split(ranks, dim=1))])
            else:
                da = _mm_f32(t.T, x2)
            das = [part.to(la.dtype) for part, la in zip(da.split(ranks), lora_as)]
        dws: list[Tensor | None] = [None] * g
        dbiases: list[Tensor | None] = [None] * g
        start = 0
        for j, (gr, b, w, s) in enumerate(zip(gs, lora_bs, weights, scales)):
            uj = u[:, start:start + ranks[j]]
            start += ranks[j]
            if need_b[j] and not ctx.triton:  # (the GPU's came with T above)
                dbs[j] = _mm_f32(gr.T, uj).mul_(s).to(b.dtype)
            if need_w[j]:
                dws[j] = _mm_f32(gr.T, x2).to(w.dtype)
            if need_bias[j] and ctx.biased[j]:
                dbiases[j] = gr.float().sum(0).to(w.dtype)
        return None, None, None, None, None, None, dx, *dws, *dbiases, *das, *dbs


def lora_group(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    *,
    scales: Sequence[float],
    output: bool = True,
    u: Tensor | None = None,
    bases: Sequence[FrozenBase] | None = None,
    dropout_p: float = 0.0,
    keys: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """``(y_1, .., y_G)``, ``y_j = x W_j^T + b_j + s_j (x A_j^T) B_j^T``, as one autograd node (module doc).

    ``x`` and the weights share a dtype; ``lora_as``/``lora_bs`` may be fp32 master weights. ``output=False``
    builds the same backward without computing the values (uninitialised tensors of their shapes come back:
    an activation-checkpoint recompute). ``u``: the stacked down-projection from :func:`lora_group_u`
    (a recompute reuses the forward's). ``bases``: frozen bases that run their own GEMMs, one per member
    (:class:`~splice.kernels.lora_linear.FrozenBase`, e.g. FP8 weights: ``x`` is quantized once for all of
    them); ``weights`` are then their stored weights, which give only the output widths. ``dropout_p`` /
    ``keys`` ((G, 2) int32, member ``j``'s mask from row ``j``; members of one rank): module doc."""
    g = len(weights)
    if not (len(biases) == len(lora_as) == len(lora_bs) == len(scales) == g) or g == 0:
        raise ValueError(f"lora_group: {g} weights, {len(biases)} biases, {len(lora_as)} A, {len(lora_bs)} B "
                         f"and {len(scales)} scales: give one of each per member")
    if bases is not None and len(bases) != g:
        raise ValueError(f"lora_group: {g} weights and {len(bases)} frozen bases: give one base per member")
    if bases is None and any(w.dtype != x.dtype for w in weights):
        raise TypeError(f"lora_group: x ({x.dtype}) and every weight ({[w.dtype for w in weights]}) must share a dtype")
    _check_dropout(dropout_p, keys, [a.shape[0] for a in lora_as])
    outs: tuple[Tensor, ...] = _LoraGroupFn.apply(tuple(float(s) for s in scales), bool(output), u,
                                                  None if bases is None else tuple(bases), float(dropout_p),
                                                  keys if dropout_p > 0 else None, x, *weights,
                                                  *biases, *lora_as, *lora_bs)
    return outs
