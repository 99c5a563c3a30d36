"""One decoder layer of an engine step, with each residual add inside the GEMM before it.

A Llama-style decoder layer (Llama, Mistral, Qwen2, Qwen3: ``splice.core.family.RESIDUAL_MLP_LAYERS``)
computes, on hidden states ``x`` (T, 1, H)::

    x = x + o_proj(attention(input_layernorm(x)))
    x = x + down_proj(act(gate_proj(h)) * up_proj(h))        with h = post_attention_layernorm(x)

At decode batch sizes every kernel of a layer costs a few microseconds whatever its size, and the
two residual adds are two of the dozen a layer launches. :func:`run_layer` computes the same sums
with the add in the GEMM's epilogue, in place on the residual stream (:func:`~splice.kernels.gemv.decode_linear`:
the one-launch few-row kernel up to 16 rows, else ``x.addmm_(a, W^T)``, cuBLAS's ``beta = 1``; the out-of-place
``torch.addmm`` first copies ``x`` into its result, a copy kernel per call: two a layer, as the 64 copy kernels a
step of the H200 decode profile of 2026-12-06), where
``o_proj`` / ``down_proj`` are plain linears without bias (an adapter bank's site over one included:
its delta is added after, :func:`~splice.lora.bank.add_packed_delta`). Any other projection (LoRA,
quantized, biased, or one a DoRA adapter in the bank rescales) runs its own forward, then the add; any
other layer (another family, autograd on) runs its own forward, unchanged. (Hooks on such a layer
module itself do not run when the engine calls its parts.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from splice.core.family import RESIDUAL_MLP_LAYERS
from splice.engine.attention import PagedAttention
from splice.fused.modules import FusedLoraLinear, FusedSwiGLUMLP
from splice.fused.projections import packed
from splice.kernels.gemv import decode_linear
from splice.lora.bank import add_packed_delta, rescales_output

__all__ = ["linear_out", "linear_residual", "run_layer"]


def linear_residual(module: nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """``residual + module(x)`` for ``x`` (T, 1, K) and ``residual`` (T, 1, N): one GEMM accumulating into
    ``residual`` itself (:func:`~splice.kernels.gemv.decode_linear`; the layer's input stream, read by no one
    after) when ``module`` is a plain
    bias-free linear in the residual's dtype (its bank delta added after), two for a fused LoRA linear
    over one (:meth:`~splice.fused.modules.FusedLoraLinear.add_into`), else the module's own forward and
    an add (``residual`` left as it was)."""
    if isinstance(module, FusedLoraLinear) and module.add_into(x, residual):
        return residual  # a training model's LoRA projection (GRPO's rollouts), accumulated in place
    pair = packed([module])
    if (pair is None or pair[1] is not None or pair[0].dtype != residual.dtype or not residual.is_contiguous()
            or rescales_output(module)):  # a DoRA factor scales W x + delta, not the residual
        return residual + module(x)
    tokens = x.shape[0]
    flat = x.reshape(tokens, -1)
    # (T, N) = residual + x W^T, in place; the bank's shrink, if any, queued first (beside it with overlap_shrink)
    y = add_packed_delta([module], flat, lambda: decode_linear(flat, pair[0], accumulate=residual.view(tokens, -1)))
    return y.view_as(residual)


def linear_out(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for ``x`` (..., K) (the output head on the sampled rows): through
    :func:`~splice.kernels.gemv.decode_linear` (its bank delta added after) when ``module`` is a plain linear
    in inference that no DoRA adapter rescales, else the module's own forward."""
    pair = None if torch.is_grad_enabled() else packed([module])
    if pair is None or rescales_output(module):
        return cast(Tensor, module(x))
    flat = x.reshape(-1, x.shape[-1])
    y = add_packed_delta([module], flat, lambda: decode_linear(flat, *pair))  # (rows, N)
    return y.view(*x.shape[:-1], y.shape[-1])


def _mlp_hidden(mlp: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """What ``mlp`` computes before its down projection, or None for an MLP of another shape."""
    if isinstance(mlp, FusedSwiGLUMLP):
        return mlp.activation
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "act_fn", "down_proj")]
    if any(not callable(p) for p in parts):
        return None
    gate, up, act = (cast(Callable[[Tensor], Tensor], p) for p in parts[:3])
    return lambda h: act(gate(h)) * up(h)


def run_layer(layer: nn.Module, hidden: Tensor, *, positions: Tensor,
              position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """``layer``'s output for ``hidden`` (T, 1, H) inside an engine step (module docstring)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    mlp_hidden = _mlp_hidden(mlp) if mlp is not None else None
    if (torch.is_grad_enabled() or type(layer).__name__ not in RESIDUAL_MLP_LAYERS
            or not isinstance(attn, PagedAttention) or mlp is None or mlp_hidden is None):
        out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out
    attended = attn.attend(layer.get_submodule("input_layernorm")(hidden), position_embeddings)  # (T, 1, Hq * D)
    hidden = linear_residual(attn.o_proj, attended, hidden)
    normed = layer.get_submodule("post_attention_layernorm")(hidden)
    return linear_residual(mlp.get_submodule("down_proj"), mlp_hidden(normed), hidden)
