"""Checks of a run against its surroundings, before any model weights load.

:meth:`TrainConfig.validate` checks the options alone (types, ranges, combinations); this module
checks them against the world: the data files exist and are files, the device exists, and the
model's own config (read without its weights) admits ``max_length`` and ``targets``. The model's
config comes from ``config.json`` for a folder, and for a GGUF from its converted folder in the
cache or else (first use) from the GGUF's metadata through transformers, which reads no weights;
its context length from the header (:mod:`splice.models.gguf_header`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from splice.core.device import resolve_device
from splice.core.errors import UsageError, one_line
from splice.models.gguf_header import gguf_context_length
from splice.training.config import TrainConfig, flag

__all__ = ["check_targets", "model_config", "preflight"]

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_config(source: str | None) -> tuple[Any | None, int | None, str]:
    """(transformers config or None, context length or None, the model as named) for ``source``
    (as :func:`splice.models.loading.load_model` takes it), reading no weights.

    Raises UsageError for a path that is neither a model folder, a .gguf file nor a hub id.
    """
    from transformers import AutoConfig

    from splice.models.loading import default_model_path, gguf_cache_path

    path = default_model_path() if source is None else Path(source).expanduser()
    shown = str(source) if source is not None else path.name
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    folder: Path | None = None
    context: int | None = None
    gguf: dict[str, str] = {}
    if path.is_file() and path.suffix.lower() == ".gguf":
        cached = gguf_cache_path(path)
        context = gguf_context_length(path)
        if (cached / "config.json").is_file():
            folder = cached
        else:  # first use, not converted yet: the config from the GGUF's header (seconds, no weights)
            folder, gguf = path.parent, {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        folder = path
    if folder is None:
        return None, context, shown  # a hub id, or a path load_model will explain
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), **gguf)
    except Exception as exc:
        if gguf:  # a GGUF transformers cannot read: load_model gives the error
            return None, context, shown
        # a broken config.json: loading would fail the same way
        raise UsageError(f"model {shown}: cannot read {folder / 'config.json'} "
                         f"({one_line(str(exc))[:200]}); pass a Hugging Face model folder") from exc
    for key in _CONTEXT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return hf_config, value, shown
    return hf_config, context, shown


def check_targets(model: torch.nn.Module, config: TrainConfig) -> int:
    """Attach ``config``'s LoRA to ``model`` (a meta-device skeleton is enough); returns the
    number of adapted modules, or raises UsageError naming --targets."""
    from splice.lora.apply import add_lora
    from splice.lora.layers import LoraConfig

    try:
        return len(add_lora(model, LoraConfig(rank=config.rank, alpha=config.alpha,
                                              dropout=config.dropout, targets=config.target_spec(),
                                              rslora=config.rslora)))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"targets ({flag('targets')}) {config.targets!r}: "
                         f"{one_line(str(exc))}") from exc


def _data_file(name: str, value: Any) -> None:
    """A data path exists and is a file or a save_to_disk folder (rows from Python pass as they
    are; the reader names a line that is not UTF-8 when it reads the file)."""
    from splice.data.rows import is_saved_dataset

    if not isinstance(value, str | Path):
        return
    path = Path(value).expanduser()
    if path.is_dir() and not is_saved_dataset(path):
        raise UsageError(f"{name} ({flag(name)}) {path} is a directory, not a data file; pass a "
                         ".jsonl, .json, .csv or .parquet file")
    if not path.exists():
        raise UsageError(f"{name} ({flag(name)}) {path} does not exist; pass an existing .jsonl, "
                         ".json, .csv or .parquet file")


def _check_host_memory(config: TrainConfig, hf_config: Any, device: torch.device) -> None:
    """With offload_checkpoints, a full packed micro-batch's layer inputs (pinned: never swapped)
    fit this machine's memory; a lower bound (LoRA down-projections and the rest not counted)."""
    from splice.memory.offload import Compression, host_memory, offloaded_host_bytes

    hidden, layers = getattr(hf_config, "hidden_size", None), getattr(hf_config, "num_hidden_layers", None)
    have = host_memory()
    if not (isinstance(hidden, int) and isinstance(layers, int)) or have is None:
        return
    dtype = torch.bfloat16 if device.type == "cuda" and config.precision != "fp32" else torch.float32
    tokens = config.batch_size * config.max_length
    need, fp8 = (offloaded_host_bytes(tokens=tokens, hidden=hidden, layers=layers, dtype=dtype,
                                      compression=cast(Compression, c)) for c in (config.offload_compression, "fp8"))
    if need <= have:
        return
    fix = f"add {flag('offload_compression')} fp8 ({fp8 / 2**30:.0f} GiB) or " if fp8 < need and fp8 <= have else ""
    raise UsageError(f"offload_checkpoints ({flag('offload_checkpoints')}) keeps each of the model's {layers} layer "
                     f"inputs in pinned host memory: {tokens:,} tokens ({config.batch_size} x {config.max_length}) x "
                     f"{hidden} x {layers} layers = {need / 2**30:.0f} GiB, more than this machine's "
                     f"{have / 2**30:.0f} GiB; {fix}lower {flag('max_length')} or {flag('batch_size')}")


def preflight(config: TrainConfig) -> None:
    """Every check of ``config`` that needs no model weights; raises :class:`UsageError`."""
    config.validate()
    _data_file("data", config.data)
    _data_file("val_data", config.val_data)
    device = resolve_device(config.device)
    if config.quantize == "fp8":
        from splice.quant.fp8 import fp8_problem

        problem = fp8_problem(device)
        if problem is not None:
            raise UsageError(f"quantize ({flag('quantize')}) fp8: {problem}")
    hf_config, context, shown = model_config(config.model)
    if context is not None and config.max_length > context:
        raise UsageError(f"max_length ({flag('max_length')}) {config.max_length} is past the context "
                         f"of model {shown} ({context} tokens); use --max-length {context} or less")
    if hf_config is not None and config.offload_checkpoints and config.pack and config.method == "sft":
        _check_host_memory(config, hf_config, device)  # packed rows: every micro-batch is full
    if hf_config is not None:
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(hf_config)
        except Exception:  # not a causal LM transformers builds: load_model will say so
            return
        check_targets(skeleton, config)
