"""Paged attention inside the model: a rewrite rule for the family's attention module.

:class:`PagedAttention` replaces a Llama / Mistral / Qwen2 / Qwen3 / Gemma-style attention module
(``splice.core.family.PAGED_ATTENTION_CLASSES``, or splice's ``FusedRopeAttention`` standing in for
Llama's). It keeps the module's own q/k/v/o projections (LoRA, bank or quantized wrappers
included), its per-head ``q_norm`` / ``k_norm`` (Qwen3, Gemma3), ``scaling``, sliding window and
attention logit softcap, and applies RoPE from the ``position_embeddings`` the decoder layer passes.

The engine's runner calls the decoder layers on a flat batch of ``T`` tokens shaped ``(T, 1, H)``
(each token a batch row) inside :func:`paged_step`, which binds the step's :class:`StepAttention`
(caches and block tables) in a ContextVar. The module then computes, per token,
``q, k, v = q_proj(x), k_proj(x), v_proj(x)`` (one GEMM when the three are packed plain linears,
:mod:`splice.fused.projections`), rotates q and k and writes ``k, v`` into the paged cache in one
launch (:func:`~splice.kernels.rope_cache.rope_write_kv`) and attends over the sequence's cached
keys (:func:`~splice.kernels.paged_attention.paged_attention`). With no step bound it runs the module it
replaced, unchanged, so the rewrite is harmless to training and to ordinary forwards.

A step with ``fresh`` set sends its fresh sequences (prompts with no cached prefix) to a dense attention over the
step's own K/V (:mod:`splice.kernels.varlen_attention`, the training kernel: causal within each sequence, no page
table), and the paged kernel serves the others into the same output (``skip_fresh``). Layers with a sliding window
or a logit softcap, and int8 caches, keep the paged kernel for every sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.family import PAGED_ATTENTION_CLASSES
from splice.core.rewrite import Node, Replace, innermost, rewrite, share_state
from splice.fused.modules import FusedRopeAttention, packed_lora, project
from splice.fused.projections import nf4_group_output, packed
from splice.fused.varlen import VarlenAttention, window_and_softcap
from splice.kernels.gemv import decode_linear
from splice.kernels.paged_attention import paged_attention
from splice.kernels.rope_cache import rope_write_kv
from splice.kernels.varlen_attention import varlen_attention
from splice.lora.adapter_file import base_shape
from splice.lora.bank import add_packed_delta

__all__ = ["PagedAttention", "StepAttention", "install_paged_attention", "paged_step"]


@dataclass(frozen=True, kw_only=True, eq=False)
class StepAttention:
    """What every attention layer of one forward needs (layout: splice.kernels.paged_attention).

    ``key_caches[i]`` / ``value_caches[i]``: layer ``i``'s (NB, BS, Hkv, D) cache; ``slot_mapping``
    (T,) int64 flat cache slot of each token; ``block_tables`` (B, max_blocks) int32;
    ``seq_lens`` (B,) int32 tokens in cache incl. this step's; ``query_start_loc`` (B+1,) int32;
    ``max_query_len`` / ``max_seq_len``: host upper bounds. ``key_scales[i]`` / ``value_scales[i]``: layer ``i``'s
    fp32 (NB, BS, Hkv) scales when its caches are int8 (:mod:`splice.kernels.kv_cache`), else empty. ``fresh``:
    fresh sequences attend over the step's own K/V (module doc).
    """

    key_caches: Sequence[Tensor]
    value_caches: Sequence[Tensor]
    slot_mapping: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query_start_loc: Tensor
    max_query_len: int
    max_seq_len: int
    key_scales: Sequence[Tensor] = ()
    value_scales: Sequence[Tensor] = ()
    fresh: bool = False


_STEP: ContextVar[StepAttention | None] = ContextVar("splice_paged_step", default=None)


@contextmanager
def paged_step(step: StepAttention) -> Iterator[StepAttention]:
    """Inside the block, every :class:`PagedAttention` of this thread / task attends through ``step``."""
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


class PagedAttention(nn.Module):
    """The paged replacement of one attention module (see module docstring)."""

    q_proj: nn.Module  # the replaced module's projections (shared children, same paths)
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        share_state(self, attn)
        original = innermost(attn)
        original = original.__dict__.get("_attn", original)  # FusedRopeAttention keeps the HF module
        self.__dict__["_replaced"] = attn  # unregistered: its children are ours
        self.layer_idx = int(original.layer_idx)
        self.head_dim = int(original.head_dim)
        self.scaling = float(original.scaling)
        self.window, self.softcap = window_and_softcap(original)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        step = _STEP.get()
        if step is None:
            replaced = self.__dict__["_replaced"]
            replaced.training = self.training
            return replaced(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        return self.o_proj(self.attend(hidden_states, position_embeddings)), None

    def attend(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None) -> Tensor:
        """The attention output before ``o_proj``, (T, 1, Hq * D), for ``hidden_states`` (T, 1, H) inside
        a step: q/k/v, their norms, RoPE and the cache write, then paged attention."""
        step = _STEP.get()
        if step is None:
            raise RuntimeError("PagedAttention.attend runs inside paged_step(...)")
        if position_embeddings is None:
            raise ValueError("PagedAttention needs the position_embeddings (cos, sin) of the decoder layer")
        tokens = hidden_states.shape[0]  # hidden (T, 1, H): one token per row
        q, k, v = self._project(hidden_states)  # (T, H*, D) each
        norms = self._modules
        if norms.get("q_norm") is not None:  # Qwen3, Gemma3: RMSNorm over each head's vector
            q, k = norms["q_norm"](q), norms["k_norm"](k)  # type: ignore[misc]
        layer = self.layer_idx
        key_cache, value_cache = step.key_caches[layer], step.value_caches[layer]
        scales = {"key_scale": step.key_scales[layer], "value_scale": step.value_scales[layer]} \
            if step.key_scales else {}
        fresh = step.fresh and not scales and self.window == 0 and self.softcap == 0
        kv_out = (torch.empty(k.shape, dtype=q.dtype, device=q.device),
                  torch.empty(v.shape, dtype=q.dtype, device=q.device)) if fresh else None
        q = rope_write_kv(q, k, v, *position_embeddings, key_cache, value_cache, step.slot_mapping, kv_out=kv_out,
                          **scales)
        out = None  # (T, Hq, D): the fresh sequences' rows first, when they have their own path
        if kv_out is not None:  # every sequence as if fresh (cheap for decodes); the paged kernel then
            # overwrites the rows of the others
            out = varlen_attention(q, *kv_out, cu_seqlens=step.query_start_loc, max_seqlen=step.max_query_len,
                                   scale=self.scaling)
        out = paged_attention(
            q, key_cache, value_cache, block_tables=step.block_tables, seq_lens=step.seq_lens,
            query_start_loc=step.query_start_loc, scale=self.scaling, max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len, window=self.window, softcap=self.softcap, out=out,
            skip_fresh=kv_out is not None, **scales,
        )
        return out.reshape(tokens, 1, -1)

    def _project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (T, heads, D) of ``hidden`` (T, 1, H): one GEMM when the three projections are packed
        plain linears (:mod:`splice.fused.projections`, outside autograd); for fused LoRA linears (a training
        model's rollouts) three GEMMs over packed bases and an engine call's group copies
        (:func:`~splice.fused.modules.packed_lora`), else one LoRA node
        (:func:`~splice.fused.modules.project`); else one each."""
        tokens, d = hidden.shape[0], self.head_dim
        projections = [self.q_proj, self.k_proj, self.v_proj]
        pair = None if torch.is_grad_enabled() else packed(projections)
        flat = hidden.reshape(tokens, -1)
        if pair is not None:
            qkv = add_packed_delta(projections, flat, lambda: decode_linear(flat, *pair))  # (T, Nq+Nk+Nv)
        elif (grouped := nf4_group_output(projections, flat)) is not None:  # 4-bit bases, one token
            qkv = add_packed_delta(projections, flat, grouped)
        elif (qkv := packed_lora(projections, flat)) is None:  # type: ignore[assignment]  # not a LoRA model's rollouts
            q, k, v = project(projections, hidden)
            return q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
        nq, nk = (base_shape(m)[1] for m in (self.q_proj, self.k_proj))  # type: ignore[index]
        return (qkv[:, :nq].view(tokens, -1, d), qkv[:, nq: nq + nk].view(tokens, -1, d),
                qkv[:, nq + nk:].view(tokens, -1, d))


def _is_paged_candidate(module: nn.Module) -> bool:
    # splice's training replacements keep the Hugging Face module (``_attn``): its attributes decide
    original = module.__dict__.get("_attn", module) if isinstance(module, FusedRopeAttention | VarlenAttention) \
        else module
    return type(original).__name__ in PAGED_ATTENTION_CLASSES and all(
        hasattr(original, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim", "scaling"))


def _rule(node: Node) -> Replace | None:
    if _is_paged_candidate(node.module):
        return Replace(PagedAttention(node.module))
    return None


def install_paged_attention(model: nn.Module) -> list[str]:
    """Replace every attention module the engine knows by :class:`PagedAttention` (a no-op where it
    is installed already); returns the paths rewritten now. Raises when the model has none at all."""
    names = rewrite(model, _rule, allow_empty=True)
    if not names and not any(isinstance(m, PagedAttention) for m in model.modules()):
        raise ValueError(
            f"the generation engine runs Llama, Mistral, Qwen2/3 and Gemma-style models: {type(model).__name__} "
            f"has none of their attention modules ({', '.join(sorted(PAGED_ATTENTION_CLASSES))})"
        )
    return names
