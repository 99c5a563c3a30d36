"""Training checkpoints that survive crashes: safetensors + JSON, written atomically.

A checkpoint is a directory ``step-000123/`` holding the adapter (PEFT format), the optimizer
state (``optimizer.safetensors`` + its scalars in ``trainer_state.json``), the scheduler state,
the RNG states (``rng.safetensors``) and the data position. It is built in a temporary directory
and renamed into place, so a crash mid-write never leaves a half checkpoint; the last ``keep`` are
kept. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from splice.core.errors import RunError, one_line
from splice.core.io import follow_umask
from splice.core.rewrite import weight_of
from splice.lora.apply import lora_modules
from splice.lora.peft_io import save_adapter

__all__ = ["TrainerState", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_NAME = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training is: the optimizer step done, and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # next micro-batch within the epoch's batch list
    tokens_seen: int = 0
    bad_steps: int = 0  # consecutive non-finite losses


def _trainable_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state keyed by parameter *name* (robust to parameter order), split into tensors
    (for safetensors) and JSON scalars."""
    names = _trainable_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}::{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars[f"{name}::{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    py_state = random.getstate()
    return tensors, {"python": [py_state[0], list(py_state[1]), py_state[2]]}


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    base_model: str | None = None,
    keep: int = 2,
) -> Path:
    """Write ``directory/step-XXXXXX`` atomically; prune all but the newest ``keep``.

    A failed write (disk full, read-only) removes its temporary folder and raises
    :class:`RunError` naming the checkpoint; the previous checkpoints are untouched.
    """
    root = Path(directory)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write(tmp, final, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
               base_model=base_model)
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"the last complete checkpoint is {previous}" if previous else "no checkpoint is complete"
        raise RunError(f"could not write checkpoint {final} ({getattr(exc, 'strerror', None) or one_line(str(exc))}); "
                       f"{kept}. Free disk space or choose a writable --output-dir") from exc
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, final: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainerState,
           base_model: str | None) -> None:
    save_adapter(model, tmp, base_model=base_model)
    opt_tensors, opt_json = _optimizer_tensors(model, optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_json = _rng_tensors()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    sched = scheduler.state_dict()  # plain numbers (our lr lambda is a function: saved as None)
    payload = {"trainer": asdict(state), "optimizer": opt_json, "scheduler": sched, "rng": rng_json}
    (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1))
    if final.exists():  # re-saving the same step (e.g. on a signal right after a save)
        shutil.rmtree(final)
    follow_umask(tmp)  # safetensors writes private (0600) files
    os.replace(tmp, final)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (temporary ones are ignored)."""
    root = Path(directory)
    found = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG states; returns the trainer state.

    The model must already carry the same LoRA modules (the trainer adds them from its config).
    A checkpoint whose files are damaged raises :class:`RunError` naming it.
    """
    try:
        return _load(Path(path), model=model, optimizer=optimizer, scheduler=scheduler)
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as exc:
        if isinstance(exc, RunError) or "which this model has no LoRA on" in str(exc):
            raise
        raise RunError(f"checkpoint {path} is damaged ({one_line(str(exc))[:200]}); move it "
                       "aside to resume from the one before it") from exc


def _load(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainerState:
    payload = json.loads((path / STATE_NAME).read_text())
    adapter = load_file(str(path / "adapter_model.safetensors"))
    by_path = {name: layer for name, _, layer in lora_modules(model)}
    with torch.no_grad():
        for key, value in adapter.items():
            module_path, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            part = "lora_" + part.removesuffix(".weight")
            layer = by_path.get(module_path)
            if layer is None:
                raise ValueError(
                    f"checkpoint {path} has an adapter for {module_path!r}, which this model has "
                    "no LoRA on: resume with the same model and LoRA settings as the run"
                )
            target = getattr(layer, part)
            target = weight_of(target) if isinstance(target, nn.Module) else target
            target.copy_(value)
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_file(str(path / "optimizer.safetensors"))
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition("::")
        per_param.setdefault(name, {})[field] = value
    for key, value in payload["optimizer"]["scalars"].items():
        name, _, field = key.rpartition("::")
        per_param.setdefault(name, {})[field] = value
    for name, fields in per_param.items():
        param = names[name]
        optimizer.state[param] = {
            k: (v.to(param.device) if isinstance(v, torch.Tensor) and k != "step" else v)
            for k, v in fields.items()
        }
    for group, saved in zip(optimizer.param_groups, payload["optimizer"]["param_groups"]):
        group.update(saved)
    scheduler.load_state_dict(payload["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("cuda")])
    version, internal, gauss = payload["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    return TrainerState(**payload["trainer"])
