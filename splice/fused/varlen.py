"""Padding-free packed rows: attention over each row's segments through the varlen kernel, no mask built.

A packed batch (:func:`splice.data.batching.batches` with ``pack=True``) is ``(B, T)`` rows of several
examples, each restarting ``position_ids`` at 0. Hugging Face turns those positions into a block-diagonal
``(B, 1, T, T)`` mask and attends over every row in full. Here
:func:`splice.training.loss.model_hidden_states` instead reads the segments once into a :class:`Packing`,
calls the decoder with neither mask nor positions (so Hugging Face takes its plain causal path and builds
no mask) and passes the packing down as the decoder keyword ``splice_packing``: Hugging Face hands its
keyword arguments to every decoder layer and on to its attention module, and a checkpointed layer's
recompute gets the same arguments again (a context variable would not reach a recompute, which runs on
autograd's thread). An attention module that takes packed rows (``splice_varlen``: splice's
:class:`~splice.fused.modules.FusedRopeAttention`, or :class:`VarlenAttention`) then

* rotates q and k with each token's position in its segment: the decoder's ``cos`` / ``sin`` cover
  positions ``0 .. T - 1`` (it was called without positions), and every in-segment position is below
  ``T``, so gathering them is exact;
* runs :func:`~splice.kernels.varlen_attention.varlen_attention` over the ``B * T`` flattened tokens.

Segments are what Hugging Face reads from the positions: a new one starts at each row start and wherever
a position is not its predecessor's + 1. RoPE is relative, so a segment whose positions start elsewhere
than 0 attends the same. Modules that cannot take packed rows (the ones Hugging Face ships, splice's
engine's) never see a packing: :func:`varlen_unsupported` names them and the loss keeps the masked path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.family import PAGED_ATTENTION_CLASSES
from splice.core.rewrite import Node, Replace, rewrite, share_state
from splice.kernels.rope import rope
from splice.kernels.varlen_attention import varlen_attention

__all__ = ["PACKING_KWARG", "Packing", "VarlenAttention", "attend_packed", "check_no_dropout", "varlen_candidate",
           "install_varlen_attention", "varlen_unsupported", "window_and_softcap"]

PACKING_KWARG = "splice_packing"  # the decoder keyword that carries a Packing to the attention modules


@dataclass(frozen=True, eq=False)
class Packing:
    """The segments of ``(B, T)`` packed rows (one per decoder call; module doc).

    ``cu_seqlens`` ``(B*T + 1,)`` int32: the segment starts in the flattened rows, then ``B*T`` repeated
    (empty segments), so its shape is fixed by the batch's; ``positions`` ``(B, T)`` long: each token's
    index within its segment; ``max_seqlen``: a host upper bound on the segment lengths (``T``).
    """

    cu_seqlens: Tensor
    positions: Tensor
    max_seqlen: int

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> Packing:
        """The segments of ``position_ids`` ``(B, T)``, computed on their device without a host sync."""
        batch, width = position_ids.shape
        tokens = batch * width
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        index = torch.arange(tokens, device=position_ids.device)
        segment = starts.view(-1).cumsum(0) - 1  # (B*T,) each token's segment
        cu = torch.full((tokens + 1,), tokens, dtype=torch.long, device=position_ids.device)
        cu.scatter_reduce_(0, segment, index, reduce="amin")  # each segment's first token
        positions = (index - cu[segment]).view(batch, width)
        return cls(cu_seqlens=cu.to(torch.int32), positions=positions, max_seqlen=width)

    def rotary(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder's ``cos`` / ``sin`` ``(1 or B, T, D)`` for positions ``0 .. T-1`` gathered at each
        token's in-segment position: ``(B, T, D)``."""
        batch, width = self.positions.shape
        index = self.positions[..., None].expand(-1, -1, cos.shape[-1])
        return tuple(x.expand(batch, width, -1).gather(1, index) for x in (cos, sin))  # type: ignore[return-value]


def attend_packed(q: Tensor, k: Tensor, v: Tensor, packing: Packing, *, scale: float, window: int = 0,
                  softcap: float = 0.0) -> Tensor:
    """Causal attention of rotated ``q`` ``(B, T, Hq, D)`` over ``k`` / ``v`` ``(B, T, Hkv, D)`` within each
    segment of ``packing``: ``(B*T, Hq, D)``."""
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    return varlen_attention(*flat, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen, scale=scale,
                            window=window, softcap=softcap)


def window_and_softcap(attn: nn.Module) -> tuple[int, float]:
    """The module's sliding window (0: none) and attention logit softcap (0: none). Mistral keeps
    its window on the config only; Qwen2/3 and Gemma set the module's (None on full layers)."""
    config = getattr(attn, "config", None)
    if "sliding_window" in vars(attn):
        window = vars(attn)["sliding_window"]
    else:
        window = getattr(config, "sliding_window", None)
    softcap = getattr(attn, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    return int(window or 0), float(softcap or 0.0)


def _dropout(module: nn.Module) -> float:
    """The attention dropout ``module`` applies now (0 in eval mode)."""
    return float(getattr(module, "attention_dropout", 0.0) or 0.0) if module.training else 0.0


def check_no_dropout(module: nn.Module) -> None:
    """Packed rows attend without dropout: refuse a module that would drop attention weights."""
    if _dropout(module) > 0:
        raise ValueError(f"{type(module).__name__}: attention dropout {_dropout(module)} while training is not "
                         "supported on packed rows; set the config's attention_dropout to 0 or use "
                         "packed_attention='mask'")


def varlen_unsupported(model: nn.Module) -> str | None:
    """None when every attention module of ``model`` takes packed rows (and one does), else why not."""
    found = False
    for name, module in model.named_modules():
        kind = type(module)
        if getattr(kind, "splice_varlen", False):
            if _dropout(module) > 0:
                return f"{name} drops attention weights (attention_dropout {_dropout(module)})"
            found = True
        elif kind.__name__.endswith("Attention"):
            return (f"{name} ({kind.__name__}) cannot take packed rows: apply splice.fuse (Llama) or "
                    "splice.fused.varlen.install_varlen_attention first")
    return None if found else f"{type(model).__name__} has no attention module that takes packed rows"


Project = Callable[[Sequence[nn.Module], Tensor], list[Tensor]]  # (modules, x) -> [m(x) for m in modules]


def _one_each(modules: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    return [m(x) for m in modules]


class VarlenAttention(nn.Module):
    """An attention module (Llama, Mistral, Qwen2/3, Gemma 1/2/3) taking packed rows (module doc): q/k/v/o,
    per-head ``q_norm`` / ``k_norm``, ``scaling``, sliding window and logit softcap are the replaced module's.
    Called without a packing it runs the module it replaced, unchanged."""

    splice_varlen = True
    splice_fast = True  # one of fuse()'s replacements: unfuse() puts the original back

    def __init__(self, attn: nn.Module, *, project: Project | None = None) -> None:
        """``project``: how q/k/v are computed from one input (``fuse`` passes
        :func:`splice.fused.modules.project`: fused LoRA linears as one node); default one call each."""
        super().__init__()
        share_state(self, attn)  # q/k/v/o_proj (and norms) are the replaced module's children, same paths
        self.__dict__["_attn"] = attn  # the original, unregistered (its children are ours)
        self.__dict__["_project"] = project or _one_each
        self.head_dim, self.scaling = int(getattr(attn, "head_dim")), float(getattr(attn, "scaling"))  # noqa: B009
        self.attention_dropout = float(getattr(attn, "attention_dropout", 0.0) or 0.0)
        self.window, self.softcap = window_and_softcap(attn)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        packing: Packing | None = kwargs.pop(PACKING_KWARG, None)
        if packing is None:
            original = self.__dict__["_attn"]
            original.training = self.training
            return original(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        if position_embeddings is None or kwargs.get("cache", kwargs.get("past_key_values")) is not None:
            raise ValueError("packed rows need the decoder layer's position_embeddings and no KV cache")
        check_no_dropout(self)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)  # (B, T, heads, D)
        children: dict[str, Any] = self._modules
        qkv = self.__dict__["_project"]([children[p] for p in ("q_proj", "k_proj", "v_proj")], hidden_states)
        q, k, v = (t.view(shape) for t in qkv)
        if children.get("q_norm") is not None:  # Qwen3, Gemma3: RMSNorm over each head's vector
            q, k = children["q_norm"](q), children["k_norm"](k)
        q, k = rope(q, k, *packing.rotary(*position_embeddings))
        out = attend_packed(q, k, v, packing, scale=self.scaling, window=self.window, softcap=self.softcap)
        return children["o_proj"](out.view(*hidden_states.shape[:-1], -1)), None


def varlen_candidate(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module :class:`VarlenAttention` can replace."""
    return type(module).__name__ in PAGED_ATTENTION_CLASSES and all(
        hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def _rule(node: Node) -> Replace | None:
    return Replace(VarlenAttention(node.module)) if varlen_candidate(node.module) else None


def install_varlen_attention(model: nn.Module) -> list[str]:
    """Replace every Llama / Mistral / Qwen2/3 / Gemma-style attention module that cannot take packed rows
    yet by :class:`VarlenAttention` (splice.fuse's Llama attention takes them already); returns the paths.
    Undo with ``splice.core.rewrite.unrewrite(model, layer=lambda m: isinstance(m, VarlenAttention))``."""
    return rewrite(model, _rule, allow_empty=True)
