"""Adapter-only save/load in PEFT's file format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``; DoRA adds ``.lora_magnitude_vector`` and
``"use_dora": true``), so adapters move both ways between splice, PEFT and vLLM. A PiSSA/OLoRA
adapter is saved with its ``init_lora_weights`` (loading it re-derives the residual base, as
PEFT does) or, with ``convert_to_lora``, as the plain rank-2r LoRA of the original base
(:func:`splice.lora.init.to_plain_lora`). Reading is :func:`splice.lora.adapter_file.read_adapter`
(re-exported here); nothing unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from splice.core.io import atomic_file
from splice.core.rewrite import Around, unrewrite, weight_of
from splice.lora.adapter_file import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    AdapterFile,
    check_adapter_fits,
    read_adapter,
)
from splice.lora.apply import adapter_names, add_lora, lora_modules
from splice.lora.dora_layers import DoraConv2d, DoraLinear
from splice.lora.init import from_weight, to_plain_lora
from splice.lora.layers import LoraEmbedding, LoraLayer, is_lora_wrapper

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterError", "load_adapter", "read_adapter", "save_adapter"]

_PREFIX = "base_model.model."


def _tensors(path: str, layer: LoraLayer, *, convert: bool = False) -> dict[str, Tensor]:
    if isinstance(layer, LoraEmbedding):
        return {
            f"{_PREFIX}{path}.lora_embedding_A": layer.lora_embedding_A,
            f"{_PREFIX}{path}.lora_embedding_B": layer.lora_embedding_B,
        }
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if convert:
        initial_a, initial_b = layer.initial_A, layer.initial_B
        assert isinstance(initial_a, Tensor) and isinstance(initial_b, Tensor)
        a, b = to_plain_lora(a.detach(), b.detach(), initial_a, initial_b)
    tensors = {f"{_PREFIX}{path}.lora_A.weight": a, f"{_PREFIX}{path}.lora_B.weight": b}
    if isinstance(layer, (DoraLinear, DoraConv2d)):
        tensors[f"{_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return tensors


def _variant_fields(layers: list[LoraLayer], *, convert: bool) -> dict:
    """``use_dora`` and ``init_lora_weights`` of the saved adapter (one value for all layers)."""
    dora = {isinstance(layer, (DoraLinear, DoraConv2d)) for layer in layers}
    inits = {getattr(layer, "init", "default") for layer in layers}
    if len(dora) > 1 or len(inits) > 1:
        raise ValueError("an adapter mixing DoRA and LoRA layers, or initialisations, cannot be saved in one file")
    init = inits.pop()
    if convert and not from_weight(init):
        raise ValueError(f"convert_to_lora applies to PiSSA/OLoRA adapters; this one was initialised {init!r}")
    if convert and True in dora:
        raise ValueError("convert_to_lora: a DoRA adapter's magnitude depends on the base weight, so a "
                         "PiSSA/OLoRA DoRA adapter has no exact plain-LoRA form; save it unconverted")
    return {"use_dora": dora.pop(), "init_lora_weights": True if convert or init == "default" else init}


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (``q_proj``) when they pick out exactly ``paths`` in PEFT's suffix matching;
    otherwise the full module paths (which PEFT and vLLM match too)."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    chosen = set(paths)
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in suffixes and name not in chosen:
            # e.g. only some layers were adapted, or a wrapper's inner ".base"
            if not any(name.startswith(p + ".") for p in chosen):
                return sorted(chosen)
    return suffixes


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model: str | None = None,
    task_type: str = "CAUSAL_LM",
    name: str | None = None,
    convert_to_lora: bool = False,
) -> Path:
    """Write the model's LoRA adapter (only) to ``directory`` in PEFT's format; returns the path.

    Each file is written to a temporary name and renamed, so a crash never leaves a torn file.
    A model with several adapters saves the one called ``name``. ``convert_to_lora``: a
    PiSSA/OLoRA adapter is written as the plain LoRA (rank 2r) of the *original* base weight,
    as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` does.
    """
    names = adapter_names(model)
    if name is None and len(names) > 1:
        raise ValueError(f"the model has adapters {names}: pass name= to choose the one to save")
    found = lora_modules(model, name=name)
    if not found:
        raise ValueError(f"the model has no LoRA modules{f' named {name!r}' if name else ''} to "
                         "save: call splice.add_lora first")
    paths = [p for p, _, _ in found]
    if len(set(paths)) != len(paths):
        raise ValueError("a module carries several LoRA adapters of one name; save them one at a time")
    layers = [layer for _, _, layer in found]
    ranks = Counter(layer.rank for layer in layers)
    alphas = Counter(layer.alpha for layer in layers)
    rank = ranks.most_common(1)[0][0]
    alpha = alphas.most_common(1)[0][0]
    rslora = {layer.rslora for layer in layers}
    if len(rslora) > 1:
        raise ValueError("adapters mixing rsLoRA and plain scaling cannot be saved in one file")
    variant = _variant_fields(layers, convert=convert_to_lora)
    tensors: dict[str, Tensor] = {}
    for path, _, layer in found:
        tensors.update(_tensors(path, layer, convert=convert_to_lora))
    dropouts = Counter(layer.dropout_p for layer in layers)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": _target_modules(model, paths),
        "use_rslora": rslora.pop(),
        "rank_pattern": {p: layer.rank for p, _, layer in found if layer.rank != rank},
        "alpha_pattern": {p: layer.alpha for p, _, layer in found if layer.alpha != alpha},
        "bias": "none",
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers),
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    config.update(variant)
    if convert_to_lora:  # PEFT's doubling: rank 2r at the same scale
        config["r"] *= 2
        config["lora_alpha"] *= 2 ** 0.5 if config["use_rslora"] else 2
        config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
        config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(directory / WEIGHTS_NAME) as tmp:
        save_file(contiguous, str(tmp), metadata={"format": "pt"})
    with atomic_file(directory / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _check_fits(model: nn.Module, adapter: AdapterFile, name: str) -> None:
    """Raise AdapterError unless ``adapter`` fits ``model`` (:func:`check_adapter_fits`) and none of
    its modules already carries an adapter called ``name``."""
    adapted = {p for p, _, _ in lora_modules(model, name=name)}
    taken = next((p for p in adapter.modules if p in adapted), None)
    if taken is not None:
        raise AdapterError(f"{adapter.directory}: module {taken!r} already has a LoRA adapter named {name!r}; "
                           "load this one under another name=")
    check_adapter_fits(adapter, model)


def load_adapter(
    model: nn.Module, directory: str | Path, *, name: str = "default", dtype: torch.dtype | None = None
) -> list[str]:
    """Attach the adapter in ``directory`` (written by splice or PEFT) to ``model`` as ``name``.

    Adapters of other names already on the model stay (they stack; see ``splice.lora.apply.use_adapters``).
    Every tensor is checked against the model before anything changes; a wrong adapter raises
    :class:`AdapterError` and leaves the model as it was. Returns the adapted module names.
    """
    adapter = read_adapter(directory)
    _check_fits(model, adapter, name)
    lora_config = replace(
        adapter.config,
        targets=lambda node: node.name in adapter.modules,
        dtype=dtype or torch.float32,
        name=name,
        # PiSSA/OLoRA: the base becomes the residual again before the trained A, B are copied in
        init=adapter.init if adapter.needs_residual_base else "default",
    )
    names = add_lora(model, lora_config)
    try:
        for path, _, layer in lora_modules(model, name=name):
            if path not in adapter.modules:
                continue
            with torch.no_grad():
                for part, value in adapter.modules[path].parts().items():
                    param = getattr(layer, part)
                    param = weight_of(param) if isinstance(param, nn.Module) else param
                    param.copy_(value.to(param.dtype).reshape(param.shape))
    except Exception:
        loaded = set(names)
        unrewrite(model, select=lambda n: n.name in loaded,
                  layer=lambda m: is_lora_wrapper(m) and getattr(cast(Around, m).rewriter, "name", None) == name)
        raise
    return names
