"""Fused kernels swapped into a model as rewrites: ``accelerate(model)`` after ``add_lora``.

Nothing is patched globally and no model class is forked: each swap is a rewrite rule
(:func:`splice.core.rewrite.rewrite`) installing a module that *shares* the original's parameters,
buffers and submodules (same dicts, so ``state_dict`` keys, ``named_parameters`` paths and any
LoRA wrappers inside are unchanged), with a ``forward`` that calls a kernel from
:mod:`splice.kernels`:

* LoRA linears: :class:`FusedLoraLinear`, a subclass of :class:`~splice.core.rewrite.Around` over the
  same ``base`` and the same :class:`~splice.lora.layers.LoraLinear` (so ``lora_modules``, ``merge``
  and adapter save/load still find it), computing base + adapter in one autograd node in the
  activations' dtype (bf16), with a fused, seeded dropout (:mod:`splice.kernels.lora_linear`);
* Llama-family RMSNorm -> :class:`FusedRMSNorm` (Triton, one pass each way);
* Llama-family MLP -> :class:`FusedSwiGLUMLP`: the gate/up/down projections (LoRA-wrapped or
  not) are still called; only ``silu(g) * u`` is fused;
* Llama attention -> :class:`FusedRopeAttention`: q/k/v/o are still called, RoPE is one Triton
  launch for q and k, attention goes through the model's configured backend (sdpa, flash, ...).

On CPU the same modules run the PyTorch reference paths. ``decelerate(model)`` puts the original
modules back.

Containers (MLP, attention, and :mod:`splice.memory.checkpointing`'s layers) share their children with the
original, and the rewrite walker enters a replacement's children, so LoRA wrappers inside stay
visible to ``lora_modules``/``merge``/``save_adapter`` at their usual paths; ``unrewrite`` and
``decelerate`` put the originals back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.rewrite import Around, Node, Replace, rewrite, unrewrite
from splice.kernels.dropout import new_keys
from splice.kernels.lora_linear import lora_linear, lora_u
from splice.kernels.rmsnorm import rms_norm
from splice.kernels.rope import rope
from splice.kernels.swiglu import swiglu
from splice.lora.layers import LoraLinear
from splice.lora.routing import current_route
from splice.memory import stash

__all__ = [
    "ATTENTION_CLASSES",
    "MLP_CLASSES",
    "RMSNORM_CLASSES",
    "FusedLoraLinear",
    "FusedRMSNorm",
    "FusedRopeAttention",
    "FusedSwiGLUMLP",
    "accelerate",
    "causal_only",
    "decelerate",
    "is_fast",
    "mlp_output_unread",
    "share_state",
]

# Classes whose forward is exactly Hugging Face Llama's (checked by name and structure).
RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
ATTENTION_CLASSES = frozenset({"LlamaAttention"})
_FUSED_ATTENTION_BACKENDS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


# Set while splice.memory.checkpointing recomputes a decoder layer whose MLP output only enters the
# residual sum: that sum's value is never read in the recompute (only its graph is), so the
# MLP's last projection builds its backward without computing its output.
_MLP_OUTPUT_UNREAD = [False]


@contextlib.contextmanager
def mlp_output_unread(enabled: bool = True) -> Iterator[None]:
    """Within this, :class:`FusedSwiGLUMLP` skips computing ``down_proj``'s output (see above)."""
    previous = _MLP_OUTPUT_UNREAD[0]
    _MLP_OUTPUT_UNREAD[0] = enabled
    try:
        yield
    finally:
        _MLP_OUTPUT_UNREAD[0] = previous


# Set by splice.training.loss.model_hidden_states when a call has no attention mask and no position ids:
# the attention is then plain causal. Hugging Face cannot tell inside a CUDA-graph capture (it
# may not inspect tensors there) and builds an explicit (T, T) mask, which costs sdpa its causal
# kernels (measured ~3x slower attention in the graph); FusedRopeAttention drops that mask.
_CAUSAL_ONLY = [False]


@contextlib.contextmanager
def causal_only(enabled: bool = True) -> Iterator[None]:
    """Within this, :class:`FusedRopeAttention` treats every (non-cached) call as plain causal
    self-attention: only for inputs without padding or packing (see above)."""
    previous = _CAUSAL_ONLY[0]
    _CAUSAL_ONLY[0] = enabled
    try:
        yield
    finally:
        _CAUSAL_ONLY[0] = previous


class _UnreadLinear(torch.autograd.Function):
    """``x W^T`` for a frozen ``W`` whose value nobody reads: no GEMM forward, ``dx = g W``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad.to(weight.dtype) @ weight, None


def _unread_projection(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``'s backward without its forward value, where that is possible."""
    if isinstance(module, FusedLoraLinear) and module._fusable(x):
        return module(x, output=False)
    weight = getattr(module, "weight", None)
    if (type(module) is nn.Linear and module.bias is None and isinstance(weight, Tensor)
            and not weight.requires_grad and weight.dtype == x.dtype):
        return _UnreadLinear.apply(x, weight)
    return module(x)


def share_state(new: nn.Module, original: nn.Module) -> None:
    """Make ``new`` hold ``original``'s parameters, buffers and children (the same dicts).

    Paths and ``state_dict`` keys stay identical, a rewrite of a child made through either module
    is seen by both, and ``.to()``/``.train()`` on ``new`` update what ``original`` holds.
    """
    new._parameters = original._parameters
    new._buffers = original._buffers
    new._non_persistent_buffers_set = original._non_persistent_buffers_set
    new._modules = original._modules
    new.training = original.training


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` is one of the replacements :func:`accelerate` installs."""
    return getattr(type(module), "splice_fast", False)


class FusedLoraLinear(Around):
    """A LoRA linear run as one fused autograd node (see :mod:`splice.kernels.lora_linear`).

    Same ``base`` and ``fn`` (the :class:`LoraLinear`) as the wrapper it replaces. Falls back to
    the plain ``base(x) + fn(x, y)`` when fusing does not apply: merged adapter, GPT-2 ``Conv1D``,
    a base that is not a float ``nn.Linear`` (quantized), dtype mismatch, or fp32 activations
    under autocast.
    """

    splice_fast = True

    def __init__(self, wrapper: Around) -> None:
        if not isinstance(wrapper.rewriter, LoraLinear):
            raise TypeError(f"FusedLoraLinear wraps a LoraLinear, got {type(wrapper.rewriter).__name__}")
        super().__init__(wrapper.base, wrapper.rewriter)

    def _fusable(self, x: Tensor) -> bool:
        lora, base = self.fn, self.base
        weight = getattr(base, "weight", None)
        return (
            isinstance(base, nn.Linear)
            and type(base).forward is nn.Linear.forward
            and isinstance(weight, Tensor)
            and weight.dtype == x.dtype
            and x.dtype.is_floating_point
            and not lora.merged
            and current_route(lora) is None  # routed rows / disabled adapters: the plain path
            and not lora.fan_in_fan_out
            # under autocast only 16-bit activations: fp32 ones would be cast by autocast
            and (x.dtype in (torch.bfloat16, torch.float16) or not torch.is_autocast_enabled(x.device.type))
        )

    def forward(self, *args: Any, output: bool = True, **kwargs: Any) -> Any:
        """``output=False``: the value is not computed (see :func:`lora_linear`)."""
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor) or not self._fusable(args[0]):
            return super().forward(*args, **kwargs)
        lora: LoraLinear = self.fn  # type: ignore[assignment]
        drop = lora.dropout
        p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
        x = args[0]
        keys = new_keys(x.device) if p > 0 else 0
        # Autocast off inside: x and W already share the 16-bit dtype, and the fused function
        # keeps the fp32 adapter weights exact (autocast would round them to bf16).
        with torch.autocast(x.device.type, enabled=False):
            u = None  # inside a checkpointed layer: the forward keeps U, its recompute reuses it
            if (replay := stash.active(replay=True)) is not None:
                u = replay.take()
            elif (record := stash.active(replay=False)) is not None:
                u = lora_u(x, lora.lora_A.weight, dropout_p=p, keys=keys)
                record.put(u)
            return lora_linear(
                x, self.base.weight, self.base.bias, lora.lora_A.weight, lora.lora_B.weight,
                scale=lora.scale, dropout_p=p, keys=keys, output=output, u=u,
            )


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm through :func:`splice.kernels.rmsnorm.rms_norm` (shares the weight)."""

    splice_fast = True

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        share_state(self, norm)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class FusedSwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with the product fused; the projections are shared."""

    splice_fast = True

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        share_state(self, mlp)

    def forward(self, x: Tensor) -> Tensor:
        h = swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=True)
        if _MLP_OUTPUT_UNREAD[0]:
            return _unread_projection(self.down_proj, h)
        return self.down_proj(h)


class FusedRopeAttention(nn.Module):
    """Llama attention with RoPE fused into one Triton launch; q/k/v/o are the shared modules.

    Runs the original forward when a KV cache is passed or the backend is not one of
    :data:`_FUSED_ATTENTION_BACKENDS` (eager attention returns weights we do not reproduce).
    """

    splice_fast = True

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        share_state(self, attn)
        for key, value in vars(attn).items():  # config, head_dim, scaling, is_causal, ...
            if not key.startswith("_") and key != "training":
                self.__dict__[key] = value
        self.__dict__["_attn"] = attn  # the original, unregistered (its children are ours)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        backend = getattr(self.config, "_attn_implementation", "eager")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None or position_embeddings is None or backend not in _FUSED_ATTENTION_BACKENDS:
            original = self.__dict__["_attn"]
            original.training = self.training
            return original(hidden_states, position_embeddings=position_embeddings,
                            attention_mask=attention_mask, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)  # (B, S, heads, D)
        replay = stash.active(replay=True)
        if replay is not None and replay.attention:  # a recompute reusing the forward's attention
            return self._replay(replay, hidden_states, position_embeddings), None
        record = stash.active(replay=False)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = rope(q, k, cos, sin)
        if _CAUSAL_ONLY[0] and getattr(self, "is_causal", True):
            attention_mask = None  # the caller vouches: plain causal, so sdpa's is_causal path

        def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
            return ALL_ATTENTION_FUNCTIONS[backend](  # type: ignore[no-any-return]
                self, q.transpose(1, 2), k.transpose(1, 2), v, attention_mask,
                dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                **kwargs,
            )

        if record is not None and record.attention:
            attn_output, attn_weights = stash.record_attention(record, attend, q, k, v)
        else:
            attn_output, attn_weights = attend(q, k, v)
        out = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        if record is not None and record.attention:
            record.put(out)
        return out, attn_weights

    def _replay(self, replay: stash.Stash, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The recompute's attention from what the forward kept: q/k/v/o build their backward
        without their GEMMs, the kept attention graph and output projection result are reused."""
        input_shape = hidden.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = _unread_projection(self.q_proj, hidden).view(shape)
        k = _unread_projection(self.k_proj, hidden).view(shape)
        v = _unread_projection(self.v_proj, hidden).view(shape).transpose(1, 2)
        q, k = rope(q, k, *position_embeddings, output=False)  # only the backward matters
        attn_output = stash.replay_attention(replay, q, k, v)
        o = _unread_projection(self.o_proj, attn_output.reshape(*input_shape, -1).contiguous())
        return stash.substitute(o, replay.take())


def _class_name(node: Node) -> str:
    return type(node.module).__name__


def _is_lora_linear_wrapper(node: Node) -> bool:
    module = node.module
    return (
        isinstance(module, Around)
        and not isinstance(module, FusedLoraLinear)
        and isinstance(module.rewriter, LoraLinear)
    )


def _is_swiglu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    act_name = type(act).__name__
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    return (
        type(module).__name__ in MLP_CLASSES
        and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and (act_name in ("SiLU", "SiLUActivation") or hidden_act in ("silu", "swish"))
    )


def _is_rope_attention(module: nn.Module) -> bool:
    return (
        type(module).__name__ in ATTENTION_CLASSES
        and all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
        and hasattr(module, "config")
    )


def accelerate(
    model: nn.Module,
    *,
    lora: bool = True,
    rmsnorm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
) -> list[str]:
    """Swap the fused kernels into ``model`` (call after ``add_lora``); returns rewritten names.

    Each option enables one rewrite; whatever a model does not have is skipped (no error).
    Leaves (LoRA linears, norms) are rewritten before the containers (MLP, attention) that hold
    them. Applying it twice changes nothing.
    """
    names: list[str] = []

    def leaf_rule(node: Node) -> Replace | None:
        if lora and _is_lora_linear_wrapper(node):
            return Replace(FusedLoraLinear(node.module))  # type: ignore[arg-type]
        if rmsnorm and _class_name(node) in RMSNORM_CLASSES and hasattr(node.module, "weight"):
            return Replace(FusedRMSNorm(node.module))
        return None

    def container_rule(node: Node) -> Replace | None:
        if swiglu and _is_swiglu_mlp(node.module):
            return Replace(FusedSwiGLUMLP(node.module))
        if rope and _is_rope_attention(node.module):
            return Replace(FusedRopeAttention(node.module))
        return None

    names += rewrite(model, leaf_rule, allow_empty=True)
    names += rewrite(model, container_rule, allow_empty=True)
    return names


def decelerate(model: nn.Module) -> list[str]:
    """Put back every module :func:`accelerate` replaced (LoRA wrappers stay); returns the paths."""
    return unrewrite(model, layer=is_fast)
