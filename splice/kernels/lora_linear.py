"""Fused LoRA linear: one autograd node for ``y = x W^T + b + s * (D(x) A^T) B^T``.

Shapes: ``x`` (..., in), ``W`` (out, in), ``b`` (out,), ``A`` = ``lora_A.weight`` (r, in),
``B`` = ``lora_B.weight`` (out, r), ``s`` the LoRA scale, ``D`` dropout with probability ``p``
and keep-mask ``M`` (``D(x) = x * M / (1 - p)``, see :mod:`splice.kernels.dropout`).

Precision (GPU, 16-bit activations): the base GEMMs are cuBLAS in the activations' dtype with
fp32 accumulation. The adapter branch runs through :mod:`splice.kernels.lora_kernels`: the fp32
adapter weights (the optimizer's master copy) and the fp32 (N, r) intermediates enter bf16
tensor-core dots split into hi + lo halves, so ``U``, ``T``, ``dA`` and ``dB`` are fp32-accurate
(as in PEFT, which upcasts ``x`` to fp32 in memory instead) while ``x`` and ``dY`` are read once
in bf16; only the final ``s * U B^T`` added into the bf16 output and the bf16 ``dx`` are rounded.
Reference path (CPU or no Triton): plain PyTorch matmuls in the activations' dtype.

Backward, with ``G = dY`` (N, out) and ``U = D(x) A^T`` (N, r, saved)::

    T   = s * G B              (N, r)
    dx  = G W + D(T A)         (the same mask M: D is linear)
    dA  = T^T D(x)             (r, in)
    dB  = s * G^T U            (out, r)

Saved for backward: ``x`` (which the base linear needs anyway, and which q/k/v share), ``U``
and the dropout keys; neither the dropped-out copy of ``x`` nor its mask is stored: ``D(x)`` is
regenerated from the keys. With ``p == 0`` the dropout passes vanish and ``dx`` is one GEMM plus
an accumulating GEMM (``addmm_``). On the GPU ``T`` and ``dB`` come from one read of ``G``
(:func:`~splice.kernels.lora_kernels.lora_b_grads`).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from . import use_triton
from .dropout import as_keys, dropout, dropout_add_
from .lora_kernels import lora_b_grads, lora_down, lora_dx_add_, tn_reduce

__all__ = ["LORA_KERNEL_MIN_TOKENS", "FrozenBase", "lora_linear", "lora_linear_reference", "lora_u", "uses_lora_kernels"]

# Below this many tokens a step is launch-bound and Triton's per-launch Python cost outweighs
# the fused kernels' savings (measured on an H100: config A, 1,024 tokens, ran 25% slower through
# the kernels); such calls take the PyTorch path (bf16 matmuls, hashed-dropout kernel).
LORA_KERNEL_MIN_TOKENS = 2048


@functools.cache
def _mm_out_dtype_works(device: torch.device) -> bool:
    """Whether this torch build's ``torch.mm(..., out_dtype=float32)`` runs on ``device``
    (a fact of the installation, probed once per device)."""
    a = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def uses_lora_kernels(x2: Tensor) -> bool:
    """Whether :func:`lora_linear` on these (N, in) activations runs the Triton LoRA kernels."""
    return (use_triton(x2) and x2.dtype in (torch.bfloat16, torch.float16)
            and x2.shape[0] >= LORA_KERNEL_MIN_TOKENS)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` accumulated and returned in fp32 (no bf16 rounding of a long token reduction)."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda and _mm_out_dtype_works(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _dense(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight`` as a plain tensor: a packed (quantized) weight class, flagged
    ``splice_quantized``, is dequantized once here, without the two subclass dispatches
    (``t``, ``mm``) that ``F.linear`` over it would make on every call."""
    if getattr(type(weight), "splice_quantized", False):
        dense: Tensor = weight.dequantize(dtype)  # type: ignore[call-arg]  # the subclass's signature
        return dense
    return weight


class FrozenBase(Protocol):
    """A frozen base layer that runs its own GEMMs (an FP8 weight's scaled GEMMs): ``matmul(x2)`` is
    ``x2 W^T`` (N, out) for ``x2`` (N, in), ``matmul_t(g2)`` is ``g2 W`` (N, in), each in its argument's
    dtype, neither recording autograd. ``prepare(x2)``: what ``matmul`` computes of ``x2`` before its GEMM
    (FP8: the row-quantized codes), or None; siblings that read one ``x2`` (q/k/v) pass it to each
    ``matmul(x2, prepared)`` to compute it once (:func:`~splice.kernels.lora_group.lora_group`)."""

    def prepare(self, x2: Tensor) -> Any: ...

    def matmul(self, x2: Tensor, prepared: Any = None) -> Tensor: ...

    def matmul_t(self, g2: Tensor) -> Tensor: ...


def _base_out(x2: Tensor, weight: Tensor, bias: Tensor | None, base: FrozenBase | None) -> Tensor:
    """``x2 W^T + b`` (N, out): cuBLAS over the (dequantized) weight, or the frozen base's own GEMM."""
    if base is None:
        return F.linear(x2, _dense(weight, x2.dtype), bias)  # a dequantized W dies here
    y = base.matmul(x2)
    return y if bias is None else y.add_(bias.to(y.dtype))


def _base_dx(g: Tensor, weight: Tensor, base: FrozenBase | None) -> Tensor:
    """``G W`` (N, in), the base's share of ``dx``."""
    return g @ _dense(weight, g.dtype).to(g.dtype) if base is None else base.matmul_t(g)


def delta_then_base(x2: Tensor, weight: Tensor, bias: Tensor | None, u: Tensor, lora_b: Tensor,
                    scale: float) -> Tensor:
    """``y = x W^T + b + s U B^T`` (N, out) on the GPU path, the small product first: ``y = (s U) B^T + b``
    (a rank-r GEMM that only writes ``y``), then the base GEMM adds ``x W^T`` into it (cuBLAS's ``beta = 1``,
    ``y`` read in its epilogue). The other order, the base GEMM then ``y += s U B^T``, reads and writes the
    whole ``y`` once more. At 4,096 tokens on an H100 (``benchmarks/lora_epilogue.py``, 2026-12-06, us) this
    order took q / o 226.5 against 233.7, gate / up 790.5 against 808.6, down 728.6 against 732.2 and k / v
    60.3 against 58.2 (the bare GEMMs: 196.0, 721.2, 684.5, 50.5). For ``dx`` the same trick (the LoRA part
    written first) was no faster, so the backward keeps its order. ``s U`` is rounded to ``x``'s dtype, as the
    other order rounds ``U``."""
    dtype = x2.dtype
    us, bs = (u * scale).to(dtype), lora_b.to(dtype)
    y = torch.mm(us, bs.T) if bias is None else torch.addmm(bias.to(dtype), us, bs.T)
    return y.addmm_(x2, _dense(weight, dtype).T)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        p: float,
        keys: Tensor | int,
        output: bool,
        given_u: Tensor | None,
        base: FrozenBase | None,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in); a view for contiguous x
        if p > 0:
            keys = as_keys(keys, x.device)  # once: forward and backward use the same mask
        ctx.triton = uses_lora_kernels(x2)
        if ctx.triton:
            x2 = x2.contiguous()
        u = given_u if given_u is not None else _down(x2, lora_a, p, keys, ctx.triton)
        if output and ctx.triton and base is None:
            y = delta_then_base(x2, weight, bias, u, lora_b, scale)  # (N, out)
        elif output:
            y = _base_out(x2, weight, bias, base)  # (N, out)
            y.addmm_(u.to(x.dtype), lora_b.to(x.dtype).T, alpha=scale)  # one GEMM, beta=1: y += s U B^T
        else:  # the caller never reads y (see ``output`` in lora_linear): only the graph is built
            y = x2.new_empty(x2.shape[0], weight.shape[0])
        ctx.save_for_backward(x2, weight, lora_a, lora_b, u)
        ctx.scale, ctx.p, ctx.keys, ctx.base = scale, p, keys, base
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, lora_a, lora_b, u = ctx.saved_tensors
        scale, p, keys = ctx.scale, ctx.p, ctx.keys
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1])  # (N, out)
        if g.dtype != x2.dtype:
            g = g.to(x2.dtype)
        if ctx.triton:
            return _backward_triton(ctx, g.contiguous(), x2, weight, lora_a, lora_b, u)
        a = lora_a.to(x2.dtype)
        b = lora_b.to(x2.dtype)
        t = (g @ b).mul_(scale) if (need_x or need_a) else None  # (N, r)
        dx = dw = dbias = da = db = None
        if need_x:
            assert t is not None
            dx = _base_dx(g, weight, ctx.base)  # (N, in)
            if p > 0:
                dropout_add_(dx, t @ a, p, keys)
            else:
                dx.addmm_(t, a)
            dx = dx.view(ctx.x_shape)
        if need_a:
            xd = dropout(x2, p, keys) if p > 0 else x2
            da = _mm_f32(t.T, xd).to(lora_a.dtype)  # type: ignore[union-attr]
            del xd
        if need_b:
            db = _mm_f32(g.T, u).mul_(scale).to(lora_b.dtype)
        if need_w:
            dw = _mm_f32(g.T, x2).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = g.float().sum(0).to(weight.dtype)
        return dx, dw, dbias, da, db, None, None, None, None, None, None


def _down(x2: Tensor, lora_a: Tensor, p: float, keys: Tensor | int, triton: bool) -> Tensor:
    """``U = D(x) A^T`` (N, r): fp32 from the Triton kernel, else in x's dtype."""
    if triton:
        return lora_down(x2.contiguous(), lora_a.float().contiguous(), p, keys)  # dropout fused
    xd = dropout(x2, p, keys) if p > 0 else x2
    return xd @ lora_a.to(x2.dtype).T


def lora_u(x: Tensor, lora_a: Tensor, *, dropout_p: float = 0.0, keys: Tensor | int = 0) -> Tensor:
    """``U = dropout(x) A^T`` (N, r) exactly as :func:`lora_linear` computes it for the same
    ``keys`` (fp32 on the Triton path, x's dtype otherwise): for passing back as its ``u``."""
    x2 = x.reshape(-1, x.shape[-1])
    keys = as_keys(keys, x.device) if dropout_p > 0 else keys
    return _down(x2, lora_a, float(dropout_p), keys, uses_lora_kernels(x2))


def _backward_triton(ctx: Any, g: Tensor, x2: Tensor, weight: Tensor, lora_a: Tensor,
                     lora_b: Tensor, u: Tensor) -> tuple[Tensor | None, ...]:
    """The GPU backward (see the module doc): 1 cuBLAS GEMM for dx plus three Triton launches."""
    scale, p, keys = ctx.scale, ctx.p, ctx.keys
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    a32 = lora_a.float().contiguous()
    b_t = lora_b.float().t().contiguous()
    dx = dw = dbias = da = db = None
    if need_b:  # T = s * G B (N, r) and s * U^T G = dB^T (r, out), fp32, from one read of G
        t, db_t = lora_b_grads(g, b_t, u.contiguous(), alpha=scale)
        db = db_t.t().to(lora_b.dtype)
    else:
        t = lora_down(g, b_t, alpha=scale)
    if need_x:
        dx = _base_dx(g, weight, ctx.base)  # (N, in)
        lora_dx_add_(dx, t, a32, p, keys)
        dx = dx.view(ctx.x_shape)
    if need_a:
        da = tn_reduce(t, x2, p, keys).to(lora_a.dtype)  # (r, in)
    if need_w:
        dw = _mm_f32(g.T, x2).to(weight.dtype)
    if need_bias and ctx.has_bias:
        dbias = g.float().sum(0).to(weight.dtype)
    return dx, dw, dbias, da, db, None, None, None, None, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scale: float,
    dropout_p: float = 0.0,
    keys: Tensor | int = 0,
    output: bool = True,
    u: Tensor | None = None,
    base: FrozenBase | None = None,
) -> Tensor:
    """``x W^T + b + scale * (dropout(x) A^T) B^T`` as one autograd node (see the module doc).

    ``x`` and ``weight`` share a dtype (the compute dtype); ``lora_a``/``lora_b`` may be fp32
    master weights. ``keys`` (see :func:`splice.kernels.dropout.new_keys`; an int seed also works)
    pick the dropout mask (ignored when ``dropout_p == 0``). ``output=False`` skips computing
    the result (an uninitialised tensor of its shape comes back) but builds the same backward:
    for an activation-checkpoint recompute, where a layer's last projection only feeds the
    residual sum whose value nobody reads (its gradient is all that matters). ``u``: the
    down-projection ``dropout(x) A^T`` from :func:`lora_u` with the same keys (a checkpoint
    recompute reuses the forward's), so it is not computed again. ``base``: a frozen base that runs its
    own GEMMs for ``x W^T`` and ``G W`` (:class:`FrozenBase`, e.g. an FP8 weight's scaled GEMMs);
    ``weight`` is then its stored weight, which only gives the output width.
    """
    if base is None and x.dtype != weight.dtype:
        raise TypeError(f"lora_linear: x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    return _LoraLinearFn.apply(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), keys, bool(output), u,
                               base)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scale: float,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Plain autograd: ``F.linear(x, W, b) + scale * B(A(x * keep / (1 - p)))``, all in x's dtype."""
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout_p)
    delta = F.linear(F.linear(xd, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return F.linear(x, weight, bias) + scale * delta
