"""Adapter-only save/load in PEFT's file format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (embeddings:
``.lora_embedding_A`` / ``.lora_embedding_B``; DoRA adds ``.lora_magnitude_vector`` and
``"use_dora": true``), so adapters move both ways between splice, PEFT and vLLM. A PiSSA/OLoRA
adapter is saved with its ``init_lora_weights`` (loading it re-derives the residual base, as
PEFT does) or, with ``convert_to_lora``, as the plain rank-2r LoRA of the original base
(:func:`splice.lora.init.to_plain_lora`). Nothing here unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from splice.core.errors import UsageError, one_line
from splice.core.family import is_conv1d
from splice.core.io import atomic_file
from splice.core.rewrite import Around, unrewrite, weight_of
from splice.lora.apply import adapter_names, add_lora, lora_modules
from splice.lora.dora_layers import DoraConv2d, DoraLinear
from splice.lora.init import from_weight, to_plain_lora
from splice.lora.layers import LoraConfig, LoraEmbedding, LoraLayer, is_lora_wrapper

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "AdapterError", "load_adapter", "read_adapter", "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT keys, with or without an adapter name (".default") as some versions wrote.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.weight)?$"
)


class AdapterError(UsageError):
    """An adapter that does not fit the model (the model is left unchanged)."""


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


# adapter_config.json keys splice reads, and the JSON types they must have
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": (bool,),
    "alpha_pattern": (dict,), "peft_type": (str,), "use_dora": (bool,), "bias": (str,),
}


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} is not valid JSON ({one_line(str(exc))}); re-save the "
                           "adapter with splice.save_adapter or PEFT") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} holds a JSON {type(config).__name__}; it must be a JSON "
                           "object (as splice.save_adapter or PEFT write)")
    for key, kinds in _CONFIG_TYPES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise AdapterError(f"{config_file}: {key} is {value!r}; it must be a "
                               f"{' or '.join(k.__name__ for k in kinds)}")
    return config


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json as a dict, the tensors) of an adapter directory, checked.

    Raises :class:`AdapterError` (or FileNotFoundError for a missing file) naming the file and
    what is wrong with it: truncated or empty safetensors, a config that is not a JSON object.
    """
    return _read(Path(directory))


def _read(directory: Path) -> tuple[dict, dict[str, Tensor]]:
    if directory.is_file():
        raise AdapterError(f"adapter {directory} is a file; pass the adapter directory (holding "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    missing = [f.name for f in (config_file, weights_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not an adapter directory: missing {', '.join(missing)} "
            f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}, as splice.save_adapter or PEFT write)"
        )
    config = _read_config(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory}: peft_type {config['peft_type']!r} is not LORA")
    # fan_in_fan_out needs no handling: splice knows GPT-2's Conv1D layout from the module type.
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in ("loftq", "corda", "lora_ga"):
        raise AdapterError(f"{directory}: init_lora_weights {init!r} is not supported by splice (it needs "
                           "data or a quantized base to rebuild); use a plain, PiSSA or OLoRA adapter")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"{directory}: bias training / modules_to_save are not supported")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        size = weights_file.stat().st_size
        raise AdapterError(f"{weights_file} is not a readable safetensors file ({size} bytes: "
                           f"{one_line(str(exc))}); it may be truncated or empty: re-save or "
                           "re-download the adapter") from exc
    return config, tensors


def _plan(model: nn.Module, tensors: dict[str, Tensor], name: str) -> dict[str, dict[str, Tensor]]:
    """Group tensors by module path; raise AdapterError listing every problem found."""
    by_path: dict[str, dict[str, Tensor]] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT also stores full embedding weights; they are the base model's own
        match = _KEY.match(key)
        if match is None:
            problems.append(f"unsupported tensor {key!r}")
            continue
        by_path.setdefault(match["path"], {})[match["part"]] = value
    modules = dict(model.named_modules())
    adapted = {p for p, _, _ in lora_modules(model, name=name)}
    for path, parts in by_path.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"module {path!r} is not in the model")
            continue
        if path in adapted:
            problems.append(f"module {path!r} already has a LoRA adapter named {name!r} (load "
                            "this one under another name=)")
            continue
        problems.extend(_shape_problems(path, module, parts))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise AdapterError(
            f"the adapter does not fit this model ({shown}). Load it into the base model it was "
            "trained on (see base_model_name_or_path in adapter_config.json); the model is unchanged"
        )
    return by_path


def _base_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like base, or None."""
    while hasattr(module, "base") and isinstance(module.base, nn.Module):
        module = module.base  # through rewrite wrappers
    if is_conv1d(module):
        n_in, n_out = weight_of(module).shape
        return int(n_in), int(n_out)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(cast(nn.Linear, module).in_features), int(cast(nn.Linear, module).out_features)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def _shape_problems(path: str, module: nn.Module, parts: dict[str, Tensor]) -> list[str]:
    shape = _base_shape(module)
    if shape is None:
        return [f"module {path!r} ({type(module).__name__}) cannot carry LoRA"]
    n_in, n_out = shape
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is not None and magnitude.numel() != n_out:
        return [f"{path}: lora_magnitude_vector {tuple(magnitude.shape)} does not fit out={n_out}"]
    if "lora_A" in parts:
        a, b = parts["lora_A"], parts.get("lora_B")
        if b is None:
            return [f"{path}: lora_B is missing"]
        if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            return [f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"in={n_in} out={n_out}"]
        return []
    emb_a, emb_b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
    if emb_a is None or emb_b is None:
        return [f"{path}: lora_embedding_A/B incomplete"]
    if emb_a.shape[1] != n_in or emb_b.shape[0] != n_out or emb_a.shape[0] != emb_b.shape[1]:
        return [f"{path}: embedding A {tuple(emb_a.shape)} / B {tuple(emb_b.shape)} do not fit "
                f"num={n_in} dim={n_out}"]
    return []


def load_adapter(
    model: nn.Module, directory: str | Path, *, name: str = "default", dtype: torch.dtype | None = None
) -> list[str]:
    """Attach the adapter in ``directory`` (written by splice or PEFT) to ``model`` as ``name``.

    Adapters of other names already on the model stay (they stack; see ``splice.lora.apply.use_adapters``).
    Every tensor is checked against the model before anything changes; a wrong adapter raises
    :class:`AdapterError` and leaves the model as it was. Returns the adapted module names.
    """
    config, tensors = _read(Path(directory))
    by_path = _plan(model, tensors, name)
    if not by_path:
        raise AdapterError(f"{directory}: the adapter holds no LoRA tensors")
    use_dora = bool(config.get("use_dora", False))
    unfit = sorted(p for p, t in by_path.items() if ("lora_magnitude_vector" in t) != use_dora)
    if unfit:
        raise AdapterError(f"{directory}: use_dora is {use_dora} but {unfit[0]} "
                           f"{'lacks' if use_dora else 'has'} a lora_magnitude_vector: a damaged adapter")
    init = config.get("init_lora_weights", True)
    ranks = {p: (t["lora_A"] if "lora_A" in t else t["lora_embedding_A"]).shape[0] for p, t in by_path.items()}
    alpha_pattern = config.get("alpha_pattern") or {}
    lora_config = LoraConfig(
        rank=int(config.get("r", 8)),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        targets=lambda node: node.name in by_path,
        rank_pattern=ranks,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        dtype=dtype or torch.float32,
        name=name,
        use_dora=use_dora,
        # PiSSA/OLoRA: the base becomes the residual again before the trained A, B are copied in
        init=init if isinstance(init, str) and from_weight(init.lower()) else "default",
    )
    names = add_lora(model, lora_config)
    try:
        for path, _, layer in lora_modules(model, name=name):
            if path not in by_path:
                continue
            parts = by_path[path]
            with torch.no_grad():
                for part, value in parts.items():
                    param = getattr(layer, part)
                    param = weight_of(param) if isinstance(param, nn.Module) else param
                    param.copy_(value.to(param.dtype).reshape(param.shape))
    except Exception:
        loaded = set(names)
        unrewrite(model, select=lambda n: n.name in loaded,
                  layer=lambda m: is_lora_wrapper(m) and getattr(cast(Around, m).rewriter, "name", None) == name)
        raise
    return names
