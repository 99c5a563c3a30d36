"""``fuse(model)``: swap splice's fused GPU kernels into a model, as rewrite rules.

Call it after ``add_lora``. Leaves (LoRA linears, norms) are rewritten before the containers
(MLP, attention) that hold them; each module class is recognised through
:mod:`splice.core.family` plus a structural check. ``unfuse(model)`` puts the originals back.
On CPU the fused modules run their PyTorch reference paths.
"""

from __future__ import annotations

from torch import nn

from splice.core.family import ATTENTION_CLASSES, MLP_CLASSES, RMSNORM_CLASSES
from splice.core.rewrite import Around, Node, Replace, rewrite, unrewrite
from splice.fused.modules import (
    FusedLoraLinear,
    FusedRMSNorm,
    FusedRopeAttention,
    FusedSwiGLUMLP,
    is_fast,
    project,
)
from splice.fused.varlen import VarlenAttention, varlen_candidate
from splice.lora.layers import LoraLinear

__all__ = ["fuse", "unfuse"]


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


def fuse(
    model: nn.Module,
    *,
    lora: bool = True,
    rmsnorm: bool = True,
    swiglu: bool = True,
    rope: bool = True,
    varlen: bool = True,
) -> list[str]:
    """Swap the fused kernels into ``model`` (call after ``add_lora``); returns rewritten names.

    Each option enables one rewrite; whatever a model does not have is skipped (no error). ``varlen``:
    the attention of the other families the engine knows (Mistral, Qwen2/3, Gemma) becomes
    :class:`~splice.fused.varlen.VarlenAttention`, so packed rows train without a mask there too
    (Llama's :class:`FusedRopeAttention` takes them already); unpacked batches run the module unchanged.
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
        if varlen and varlen_candidate(node.module):
            return Replace(VarlenAttention(node.module, project=project))
        return None

    names += rewrite(model, leaf_rule, allow_empty=True)
    names += rewrite(model, container_rule, allow_empty=True)
    return names


def unfuse(model: nn.Module) -> list[str]:
    """Put back every module :func:`fuse` replaced (LoRA wrappers stay); returns the paths."""
    return unrewrite(model, layer=is_fast)
