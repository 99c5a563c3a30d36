"""The one reader of PEFT-format adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`read_adapter` checks the folder and returns an :class:`AdapterFile`: per module path the
A and B tensors (and a DoRA magnitude), each module's rank, alpha and scale by PEFT's rules, the
initialisation, the targets and the base model's name. :func:`splice.lora.peft_io.load_adapter`,
the serving bank (:mod:`splice.lora.bank`) and the GGUF LoRA export all read adapters through it.

The rules, as PEFT applies them (``peft.tuners.lora.model.LoraModel._create_and_replace``):

- a module's rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` by
  :meth:`LoraConfig.rank_for` / :meth:`LoraConfig.alpha_for` (the first key that, as a regex,
  matches the module path or a dotted suffix of it), else ``r`` / ``lora_alpha``;
- ``scale = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``;
- ``init_lora_weights`` "pissa", "pissa_niter_N" or "olora": A and B apply to the *residual* base
  ``W - scale B0 A0`` (B0, A0 derived from the original ``W``), not to ``W``.
  :func:`on_original_base` re-derives ``A0``/``B0`` from a model's weights and returns the
  equivalent plain LoRA of the original base (rank 2r, ``A' = [A; A0]``, ``B' = [B, -B0]``),
  which is what PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes.

Nothing here unpickles: JSON and safetensors only.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from splice.core.errors import UsageError, one_line
from splice.core.family import is_conv1d
from splice.core.rewrite import innermost, weight_of
from splice.lora.dora import weight_norm
from splice.lora.init import from_weight, init_factors, init_name
from splice.lora.layers import LoraConfig

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "AdapterError", "AdapterFile", "AdapterModule", "base_shape",
    "check_adapter_fits", "dora_output", "dora_outputs", "on_original_base", "read_adapter", "require_linear",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT keys, with or without an adapter name (".default") as some versions wrote.
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.weight)?$"
)
# adapter_config.json keys splice reads, and the JSON types they must have
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": (bool,),
    "rank_pattern": (dict,), "alpha_pattern": (dict,), "peft_type": (str,), "use_dora": (bool,),
    "bias": (str,), "init_lora_weights": (bool, str), "target_modules": (list, str),
    "base_model_name_or_path": (str,),
}
# PEFT initialisations that leave the base weight as it is: the adapter is a plain LoRA of it
_PLAIN_INITS = ("false", "eva", "orthogonal", "mica")
# ... and those that change the base in ways splice cannot rebuild (data or a quantized base)
_UNSUPPORTED_INITS = ("loftq", "corda", "lora_ga")


class AdapterError(UsageError):
    """An adapter folder that cannot be used as it is (the model is left unchanged)."""


@dataclass(frozen=True, kw_only=True)
class AdapterModule:
    """One adapted module as the file holds it.

    ``a``: lora_A (r, in) (conv: (r, in, kh, kw)) or lora_embedding_A (r, num);
    ``b``: lora_B (out, r) (conv: (out, r, 1, 1)) or lora_embedding_B (dim, r);
    ``magnitude``: DoRA's (out,) vector or None. The delta is ``scale * B @ A``.
    """

    a: Tensor
    b: Tensor
    rank: int
    alpha: float
    scale: float
    embedding: bool = False
    magnitude: Tensor | None = None

    def parts(self) -> dict[str, Tensor]:
        """The tensors by the LoRA layer attribute (and PEFT key part) that holds them."""
        names = ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A", "lora_B")
        parts = dict(zip(names, (self.a, self.b), strict=True))
        if self.magnitude is not None:
            parts["lora_magnitude_vector"] = self.magnitude
        return parts


@dataclass(frozen=True, kw_only=True)
class AdapterFile:
    """A checked adapter folder (see module doc). ``config`` carries ``r``, ``lora_alpha``,
    ``lora_dropout``, ``use_rslora``, the patterns, ``use_dora`` and the init as a
    :class:`LoraConfig`, whose ``rank_for``/``alpha_for`` gave each module's values."""

    directory: Path
    modules: dict[str, AdapterModule]
    config: LoraConfig
    target_modules: list[str] | str | None
    base_model: str | None

    @property
    def init(self) -> str:
        """``"default"`` (the base is unchanged), ``"gaussian"``, ``"pissa"``, ``"pissa_niter_N"``, ``"olora"``."""
        return str(self.config.init)

    @property
    def needs_residual_base(self) -> bool:
        """Whether A and B apply to the residual ``W - scale B0 A0`` (PiSSA/OLoRA) rather than ``W``."""
        return from_weight(self.init)

    @property
    def rank(self) -> int:
        """The largest module rank."""
        return max(m.rank for m in self.modules.values())

    def scaled(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``path -> (A (r, K), B (N, r) * scale)`` fp32: each module's factors with its scale folded into B."""
        return {path: (m.a.float(), m.b.float() * m.scale) for path, m in self.modules.items()}


def scale_of(alpha: float, rank: int, *, rslora: bool) -> float:
    """LoRA's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def read_adapter(directory: str | Path) -> AdapterFile:
    """The adapter in ``directory`` (written by splice or PEFT), checked.

    Raises FileNotFoundError for a missing file and :class:`AdapterError` for anything else wrong
    (a config that is not a JSON object, a truncated or empty safetensors file, a lora_A without
    its lora_B, a rank that disagrees with the config, ...), one line naming the file.
    """
    folder = Path(directory)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    _check_files(folder)
    raw = _read_config(config_file)
    config = _lora_config(raw, config_file)
    tensors = _read_tensors(weights_file)
    modules = _modules(tensors, config, weights_file)
    targets = raw.get("target_modules")
    return AdapterFile(directory=folder, modules=modules, config=config,
                       target_modules=list(targets) if isinstance(targets, list) else targets,
                       base_model=raw.get("base_model_name_or_path"))


def _check_files(folder: Path) -> None:
    if folder.is_file():
        raise AdapterError(f"adapter {folder} is a file; pass the adapter directory (holding "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        pickled = " (adapter_model.bin is a pickle, which splice never loads: re-save it with PEFT's " \
                  "safe_serialization=True)" if (folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(
            f"{folder} is not an adapter directory: missing {', '.join(missing)} (expected {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}, as splice.save_adapter or PEFT write){pickled}"
        )


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
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config['peft_type']!r} is not LORA")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise AdapterError(f"{config_file}: bias training / modules_to_save are not supported")
    # fan_in_fan_out needs no handling: splice knows GPT-2's Conv1D layout from the module type.
    return config


def _init(value: object, config_file: Path) -> str:
    """``init_lora_weights`` as splice names it ("default" for every init that leaves the base as is)."""
    if isinstance(value, str) and value.lower() in _UNSUPPORTED_INITS:
        raise AdapterError(f"{config_file}: init_lora_weights {value!r} is not supported by splice (it needs "
                           "data or a quantized base to rebuild); use a plain, PiSSA or OLoRA adapter")
    if value is False or (isinstance(value, str) and value.lower() in _PLAIN_INITS):
        return "default"
    try:
        return init_name(cast(str | bool, value))
    except ValueError as exc:
        raise AdapterError(f"{config_file}: init_lora_weights {value!r} is not one PEFT writes "
                           "(true, gaussian, pissa, pissa_niter_N, olora, ...)") from exc


def _patterns(raw: dict, key: str, kind: type, config_file: Path) -> dict:
    pattern = raw.get(key) or {}
    for name, value in pattern.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and not isinstance(value, int)):
            raise AdapterError(f"{config_file}: {key}[{name!r}] is {value!r}; it must be a number"
                               f"{' (an integer rank)' if kind is int else ''}")
        try:
            re.compile(rf"(.*\.)?({name})$")
        except re.error as exc:
            raise AdapterError(f"{config_file}: {key} key {name!r} is not a valid regular expression "
                               f"({exc}); PEFT matches these keys as regexes against module paths") from exc
    return {name: kind(value) for name, value in pattern.items()}


def _lora_config(raw: dict, config_file: Path) -> LoraConfig:
    rank, dropout = raw.get("r", 8), raw.get("lora_dropout", 0.0) or 0.0
    if rank < 1 or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{config_file}: r {rank} / lora_dropout {dropout}: r must be >= 1 and "
                           "lora_dropout in [0, 1)")
    return LoraConfig(
        rank=rank, alpha=float(raw.get("lora_alpha", 8)), dropout=float(dropout),
        rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
        rank_pattern=_patterns(raw, "rank_pattern", int, config_file),
        alpha_pattern=_patterns(raw, "alpha_pattern", float, config_file),
        init=_init(raw.get("init_lora_weights", True), config_file), targets=(),
    )


def _read_tensors(weights_file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        size = weights_file.stat().st_size
        raise AdapterError(f"{weights_file} is not a readable safetensors file ({size} bytes: "
                           f"{one_line(str(exc))}); it may be truncated or empty: re-save or "
                           "re-download the adapter") from exc


def _modules(tensors: dict[str, Tensor], config: LoraConfig, weights_file: Path) -> dict[str, AdapterModule]:
    """Group the tensors by module path and check each module; raise listing every problem."""
    by_path: dict[str, dict[str, Tensor]] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        if key.endswith(".base_layer.weight"):
            continue  # PEFT also stores full embedding weights; they are the base model's own
        match = _KEY.match(key)
        if match is None:
            problems.append(f"unsupported tensor {key!r}")
        else:
            by_path.setdefault(match["path"], {})[match["part"]] = value
    modules: dict[str, AdapterModule] = {}
    for path, parts in by_path.items():
        module = _module(path, parts, config)
        if isinstance(module, str):
            problems.append(module)
        else:
            modules[path] = module
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise AdapterError(f"{weights_file}: {shown}. Re-save the adapter with splice.save_adapter or PEFT")
    if not modules:
        raise AdapterError(f"{weights_file} holds no LoRA tensors")
    return modules


def _module(path: str, parts: dict[str, Tensor], config: LoraConfig) -> AdapterModule | str:
    """The checked module at ``path``, or what is wrong with it."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    a, b, magnitude = parts.get(a_name), parts.get(b_name), parts.get("lora_magnitude_vector")
    if a is None or b is None:
        have, lack = (a_name, b_name) if b is None else (b_name, a_name)
        return f"{path} has {have if have in parts else 'only a magnitude'} but no {lack}"
    if a.dim() < 2 or b.dim() < 2 or a.shape[0] != b.shape[1]:
        return f"{path}: {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} disagree on the rank"
    rank = int(a.shape[0])
    if rank != config.rank_for(path):
        return (f"{path} has rank {rank} but the config gives it {config.rank_for(path)} "
                "(r / rank_pattern in adapter_config.json)")
    if (magnitude is not None) != config.use_dora:
        return f"use_dora is {config.use_dora} but {path} {'lacks' if config.use_dora else 'has'} a lora_magnitude_vector"
    alpha = config.alpha_for(path)
    return AdapterModule(a=a, b=b, rank=rank, alpha=alpha, scale=scale_of(alpha, rank, rslora=config.rslora),
                         embedding=embedding, magnitude=magnitude)


def require_linear(adapter: AdapterFile, *, holder: str, instead: str, dora: bool = False) -> None:
    """Raise unless every module is a plain linear A/B (no embedding or conv; no DoRA unless
    ``dora``): what ``holder`` (a serving bank, a GGUF LoRA) can hold; ``instead`` says what to do."""
    if adapter.config.use_dora and not dora:
        raise AdapterError(f"{adapter.directory} is a DoRA adapter: {holder} cannot hold one (the magnitude "
                           f"rescales the whole weight); {instead}")
    unfit = next((p for p, m in adapter.modules.items() if m.embedding or m.a.dim() != 2), None)
    if unfit is not None:
        raise AdapterError(f"{adapter.directory}: {unfit} is an embedding or conv adapter: {holder} holds "
                           f"linear LoRA only; {instead}")


def base_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of the linear-like module under any rewrite wrappers ((num, dim) of an
    embedding, channels of a conv2d), or None."""
    module = innermost(module)
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


def check_adapter_fits(adapter: AdapterFile, model: nn.Module) -> None:
    """Refuse ``adapter`` unless every module it adapts is in ``model`` with the shapes its tensors
    were made for: an :class:`AdapterError`, one line naming the first module that does not fit
    and the base the adapter was trained on. Nothing is changed.

    Shapes decide. A different base *name* alone (``base_model_name_or_path`` against the model's
    ``config._name_or_path``, compared by their last path component) is a warning, not a refusal:
    names are not identities (a hub id and a local copy or GGUF of it, a renamed folder), and an
    adapter trained on a base is routinely applied to its instruct or fine-tuned variants.
    """
    modules = dict(model.named_modules())
    found: list[str] = []
    for path, parts in adapter.modules.items():
        module = modules.get(path)
        found.extend([f"module {path!r} is not in the model"] if module is None else _shape_problems(path, module, parts))
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        trained_on = f" ({adapter.base_model})" if adapter.base_model else ""
        raise AdapterError(
            f"{adapter.directory}: the adapter does not fit this model: {found[0]}{more}. Load it into the base "
            f"model it was trained on{trained_on}, as base_model_name_or_path in {CONFIG_NAME} says; "
            "the model is unchanged")
    model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if adapter.base_model and model_name and _name_key(adapter.base_model) != _name_key(model_name):
        warnings.warn(f"{adapter.directory} was trained on {adapter.base_model}, not {model_name}; its shapes "
                      "fit, so it is loaded", stacklevel=2)


def _name_key(name: str) -> str:
    """A model name as compared by :func:`check_adapter_fits`: the last path component, lower case,
    without a ``.gguf`` suffix or a GGUF type tag (``SmolLM2-135M.Q4_1.gguf`` -> ``smollm2-135m``)."""
    stem = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower().removesuffix(".gguf")
    return re.sub(r"[.-](?:i?q\d\w*|f16|f32|bf16)$", "", stem)


def _shape_problems(path: str, module: nn.Module, parts: AdapterModule) -> list[str]:
    shape = base_shape(module)
    if shape is None:
        return [f"module {path!r} ({type(innermost(module)).__name__}) cannot carry LoRA"]
    n_in, n_out = shape
    if parts.magnitude is not None and parts.magnitude.numel() != n_out:
        return [f"{path}: lora_magnitude_vector {tuple(parts.magnitude.shape)} does not fit out={n_out}"]
    a, b = parts.a, parts.b
    if a.shape[1] != n_in or b.shape[0] != n_out:
        what = ("embedding A", "B", "num", "dim") if parts.embedding else ("lora_A", "lora_B", "in", "out")
        return [f"{path}: {what[0]} {tuple(a.shape)} / {what[1]} {tuple(b.shape)} do not fit "
                f"{what[2]}={n_in} {what[3]}={n_out}"]
    return []


def _float_weight(module: nn.Module) -> Tensor:
    """The (out, in) weight of a linear, GPT-2 Conv1D or quantized linear (dequantized) in fp32."""
    dequantize = getattr(module, "dequantize", None)
    weight = dequantize(torch.float32) if callable(dequantize) else weight_of(module)
    weight = weight.T if is_conv1d(module) else weight
    return weight.detach().to(torch.float32)


def dora_output(factor: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
    """A frozen DoRA module as an affine map of its base output ``y = W x + bias``: the module gives
    ``g * (y + s B A x) + (1 - g) * bias``; returns ``g`` (``factor``) and ``(1 - g) * bias`` (zeros
    without a bias; ``module``: the adapted linear, under any wrappers), (out,) fp32 on the host."""
    factor = factor.detach().float().cpu()
    bias = getattr(innermost(module), "bias", None)
    shift = (1 - factor) * bias.detach().float().cpu() if isinstance(bias, Tensor) else torch.zeros_like(factor)
    return factor, shift


def dora_outputs(adapter: AdapterFile, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`dora_output` of each module of a DoRA ``adapter`` (linear, fitting ``model``:
    :func:`check_adapter_fits`) on ``model``'s weights: ``g = m / ||W + s B A||`` with ``W`` the module's
    weight as (out, in) fp32 and the norm over ``in`` for each output row (PEFT's,
    :func:`splice.lora.dora.weight_norm`), a constant once the weights are frozen. {} for plain LoRA."""
    found = dict(model.named_modules())
    outputs: dict[str, tuple[Tensor, Tensor]] = {}
    for path, module in adapter.modules.items():
        if module.magnitude is None:
            continue
        weight = _float_weight(innermost(found[path]))
        a, b = (t.to(weight.device, torch.float32) for t in (module.a, module.b))
        norm = weight_norm(weight, lora_a=a, lora_b=b, scale=module.scale)
        outputs[path] = dora_output(module.magnitude.to(norm.device, torch.float32) / norm, found[path])
    return outputs


def on_original_base(adapter: AdapterFile, model: nn.Module) -> AdapterFile:
    """A PiSSA/OLoRA ``adapter`` as the plain LoRA of ``model``'s (original, unchanged) weights.

    ``A0``/``B0`` are derived from each module's weight as at training (and as PEFT does when it
    loads such an adapter); the result holds ``A' = [A; A0]`` (2r, in) and ``B' = [B, -B0]``
    (out, 2r) at the same scale, so ``W + s B' A' = (W - s B0 A0) + s B A``. A plain adapter is
    returned as it is. ``pissa_niter_N`` is refused: its randomised SVD cannot be re-derived.
    """
    if not adapter.needs_residual_base:
        return adapter
    source = f"{adapter.directory} (init_lora_weights {adapter.init!r})"
    if adapter.init != "pissa" and adapter.init != "olora":
        raise AdapterError(f"{source}: its initial A0/B0 came from a randomised SVD that cannot be "
                           "re-derived exactly; save it converted (splice.save_adapter(model, dir, "
                           "convert_to_lora=True)) or train with init pissa")
    found = dict(model.named_modules())
    doubling = math.sqrt(2) if adapter.config.rslora else 2  # rank 2r at the same scale, as PEFT writes it
    modules: dict[str, AdapterModule] = {}
    for path, module in adapter.modules.items():
        base = innermost(found[path]) if path in found else None
        if base is None or module.embedding or module.a.dim() != 2 or module.magnitude is not None:
            raise AdapterError(f"{source}: {path} is not a LoRA linear of this model; only linear "
                               "LoRA (no DoRA) converts to a plain LoRA of the original weights")
        weight = _float_weight(base)
        if tuple(weight.shape) != (module.b.shape[0], module.a.shape[1]):
            raise AdapterError(f"{source}: {path} is {tuple(weight.shape)} in the model but the adapter's "
                               f"A/B are {tuple(module.a.shape)}/{tuple(module.b.shape)}")
        a0, b0, _ = init_factors(weight, rank=module.rank, scale=module.scale, method=adapter.init)
        device = module.a.device
        a = torch.cat([module.a.float(), a0.to(device)], dim=0)
        b = torch.cat([module.b.float(), -b0.to(device)], dim=1)
        modules[path] = replace(module, a=a, b=b, rank=2 * module.rank, alpha=module.alpha * doubling)
    config = replace(adapter.config, init="default", rank=2 * adapter.config.rank,
                     alpha=adapter.config.alpha * doubling,
                     rank_pattern={k: 2 * v for k, v in adapter.config.rank_pattern.items()},
                     alpha_pattern={k: v * doubling for k, v in adapter.config.alpha_pattern.items()})
    return replace(adapter, modules=modules, config=config)
