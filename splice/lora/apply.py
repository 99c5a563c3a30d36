"""Attaching LoRA to a model and managing its adapters: ``add_lora`` (the rewrite rule),
``merge``/``unmerge``, ``lora_modules``, and per-call routing of batch rows to adapters
(``use_adapters``, ``adapters_disabled``; see :mod:`splice.lora.routing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

from splice.core.family import is_conv1d
from splice.core.progress import progress
from splice.core.rewrite import (
    Around,
    Node,
    innermost,
    param_uses,
    rewrite,
    rewritten_nodes,
    unrewrite,
    weight_of,
)
from splice.core.targets import target_matcher
from splice.lora.dora_layers import DoraConv2d, DoraLinear, _DoraLayer
from splice.lora.init import from_weight, init_factors, init_name
from splice.lora.layers import LoraConfig, LoraConv2d, LoraEmbedding, LoraLayer, LoraLinear, is_lora_wrapper
from splice.lora.routing import Route, routed

__all__ = ["adapter_names", "adapters_disabled", "add_lora", "lora_modules", "merge", "unmerge", "use_adapters"]


def _build(node: Node, config: LoraConfig) -> LoraLayer:
    base = node.original
    weight = getattr(base, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else None
    dtype = config.dtype or (weight.dtype if isinstance(weight, Tensor) else None)
    # Quantized bases (splice.quant) may hold no float weight: they name their device and dtype.
    device = getattr(base, "device", None) if device is None else device
    dtype = dtype or getattr(base, "compute_dtype", None)
    module = node.module
    while isinstance(module, Around):
        if isinstance(module.rewriter, LoraLayer) and module.rewriter.name == config.name:
            raise ValueError(
                f"{node.name!r} already has a LoRA adapter named {config.name!r}: give the new "
                "adapter another LoraConfig.name, or remove the old one (splice.unrewrite)"
            )
        module = module.base
    hyper: dict[str, Any] = dict(rank=config.rank_for(node.name), alpha=config.alpha_for(node.name),
                 rslora=config.rslora, dtype=dtype, name=config.name)
    if from_weight(init_name(config.init)) and not (node.kind == "linear" or is_conv1d(base)):
        raise TypeError(
            f"LoraConfig.init={config.init!r} applies to linear layers only, not {node.name!r} "
            f"({type(base).__name__}), as in PEFT: narrow LoraConfig.targets or use init='default'"
        )
    if config.use_dora:
        return _build_dora(node, config, hyper, device)
    if is_conv1d(base):  # GPT-2: weight is (in, out)
        n_in, n_out = weight_of(base).shape
        return LoraLinear(n_in, n_out, dropout=config.dropout, fan_in_fan_out=True,
                          device=device, **hyper)
    if node.kind == "linear":
        return LoraLinear(cast(nn.Linear, base).in_features, cast(nn.Linear, base).out_features, dropout=config.dropout,
                          device=device, **hyper)
    if node.kind == "embedding":
        return LoraEmbedding(cast(nn.Embedding, base), **hyper)
    if node.kind == "conv2d":
        return LoraConv2d(cast(nn.Conv2d, base), dropout=config.dropout, **hyper)
    raise TypeError(
        f"LoRA cannot adapt {node.name!r} of kind {node.kind!r} ({type(base).__name__}): "
        "supported are linear, GPT-2 Conv1D, embedding and conv2d; narrow LoraConfig.targets"
    )


def add_lora(model: nn.Module, config: LoraConfig | None = None) -> list[str]:
    """Wrap every targeted module of ``model`` with LoRA; returns the adapted module names.

    Raises when ``config.targets`` matches nothing, naming the kinds and modules the model has.
    With ``config.init`` PiSSA/OLoRA the targeted base weights are replaced by their residuals.
    """
    config = config or LoraConfig()
    matches = target_matcher(model, config.targets)
    names = rewrite(model, lambda node: _build(node, config) if matches(node) else None)
    method = init_name(config.init)
    if method != "default":
        _initialize(model, config.name, method, set(names))
    return names


def lora_modules(model: nn.Module, *, name: str | None = None) -> list[tuple[str, Around, LoraLayer]]:
    """(path, wrapper, LoRA layer) for every LoRA rewrite in ``model`` (of adapter ``name``, if
    given), found by type. Stacked adapters on one module give one entry each, outermost first.
    """
    found = []
    for node in rewritten_nodes(model):
        module = node.module
        while isinstance(module, Around):
            layer = module.rewriter
            if isinstance(layer, LoraLayer) and (name is None or layer.name == name):
                found.append((node.name, module, layer))
            module = module.base
    return found


def _require_lora(model: nn.Module) -> list[tuple[str, Around, LoraLayer]]:
    found = lora_modules(model)
    if not found:
        raise ValueError("the model has no LoRA modules: call splice.add_lora or load_adapter first")
    return found


def merge(model: nn.Module, *, unload: bool = False) -> list[str]:
    """Fold every LoRA delta into its base weight (merging twice changes nothing).

    With ``unload`` the LoRA wrappers are then removed, leaving plain modules holding the merged
    weights (ready for ``save_pretrained``). Returns the merged module names.
    """
    found = _require_lora(model)
    uses = param_uses(model)
    tied = [name for name, wrapper, layer in found
            if not layer.merged and uses.get(id(getattr(innermost(wrapper), "weight", None)), 0) > 1]
    if tied:
        raise ValueError(
            f"cannot merge LoRA into {', '.join(tied)}: the weight is tied to another module "
            "(e.g. the output head shares the input embedding), which would change too. Keep "
            "that adapter unmerged, or untie the weights first"
        )
    for _, wrapper, layer in progress(found, desc="merging", unit="module"):
        layer.merge_into(innermost(wrapper))
    if unload:
        for _, _, layer in found:
            layer.merged = False  # the fold is now the base's own weight: nothing to undo
            for initial in ("initial_A", "initial_B"):  # PiSSA/OLoRA: W_res + s B A is the merged weight
                layer._buffers.pop(initial, None)  # (restore would add s B0 A0 back)
        unrewrite(model, layer=is_lora_wrapper)
    return list(dict.fromkeys(name for name, _, _ in found))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block (e.g. to compare base vs adapter).

    Only this thread's (or asyncio task's) calls are affected: see :mod:`splice.lora.routing`.
    """
    found = _require_lora(model)
    if any(layer.merged for _, _, layer in found):
        raise ValueError("adapters are merged into the weights: unmerge before disabling them")
    with routed((layer for _, _, layer in found), Route(disabled=True)):
        yield


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order first found."""
    return list(dict.fromkeys(layer.name for _, _, layer in lora_modules(model)))


@contextmanager
def use_adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, batch row ``i`` runs with adapter ``rows[i]`` only (``None``: the base
    model), so one batch can mix several adapters (e.g. in :func:`splice.generation.generate.generate`).

    The routing is data of this call (a ContextVar, see :mod:`splice.lora.routing`): other threads
    using the same model at the same time keep their own. Each adapter computes only its rows.
    """
    found = _require_lora(model)
    known = {layer.name for _, _, layer in found}
    unknown = sorted({r for r in rows if r is not None} - known)
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}: the model has {sorted(known)}")
    if any(layer.merged for _, _, layer in found):
        raise ValueError("adapters are merged into the weights: unmerge before routing rows")
    with routed((layer for _, _, layer in found), Route(rows=tuple(rows))):
        yield


def unmerge(model: nn.Module) -> list[str]:
    """Subtract every merged LoRA delta from its base weight again."""
    found = _require_lora(model)
    for _, wrapper, layer in found:
        layer.unmerge_from(wrapper.base)
    return [name for name, _, _ in found]


def _build_dora(node: Node, config: LoraConfig, hyper: dict[str, Any], device: torch.device | None) -> LoraLayer:
    base = node.original
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"DoRA needs a float base weight at {node.name!r} ({type(base).__name__}): add the adapter "
            "before quantizing, or use plain LoRA (use_dora=False) on a quantized model"
        )
    if is_conv1d(base):  # GPT-2: weight is (in, out)
        n_in, n_out = weight.shape
        return DoraLinear(base, n_in, n_out, dropout=config.dropout, fan_in_fan_out=True, device=device, **hyper)
    if node.kind == "linear":
        return DoraLinear(base, cast(nn.Linear, base).in_features, cast(nn.Linear, base).out_features, dropout=config.dropout, device=device, **hyper)
    if node.kind == "conv2d":
        return DoraConv2d(cast(nn.Conv2d, base), dropout=config.dropout, **hyper)
    raise TypeError(
        f"DoRA cannot adapt {node.name!r} of kind {node.kind!r} ({type(base).__name__}): supported are "
        "linear, GPT-2 Conv1D and conv2d; narrow LoraConfig.targets or set use_dora=False"
    )


def _initialize(model: nn.Module, name: str, method: str, paths: set[str]) -> None:
    """Re-initialise the new adapters ``name`` at ``paths`` by ``method`` (not "default").

    PiSSA/OLoRA set A and B from the base weight, replace it by the residual and keep ``A0``/``B0``
    as buffers ``initial_A``/``initial_B`` (for :func:`splice.lora.init.to_plain_lora` on save);
    a DoRA magnitude is then recomputed from the new weight (PEFT's order).
    """
    for path, wrapper, layer in lora_modules(model, name=name):
        if path not in paths:
            continue
        a_weight, b_weight = layer.lora_A.weight, layer.lora_B.weight
        with torch.no_grad():
            if method == "gaussian":
                nn.init.normal_(a_weight, std=1 / layer.rank)
                nn.init.zeros_(b_weight)
            else:
                base = innermost(wrapper)
                transposed = getattr(layer, "fan_in_fan_out", False)
                weight = weight_of(base).T if transposed else weight_of(base)
                a, b, residual = init_factors(weight, rank=layer.rank, scale=layer.scale, method=method)
                a_weight.copy_(a)
                b_weight.copy_(b)
                weight.copy_(residual)
                layer.register_buffer("initial_A", a_weight.detach().clone(), persistent=False)
                layer.register_buffer("initial_B", b_weight.detach().clone(), persistent=False)
        layer.init = method
        if isinstance(layer, _DoraLayer):
            layer.reset_magnitude()
