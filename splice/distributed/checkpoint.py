"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), and the adapter written once.

A checkpoint ``step-000123/`` of a distributed run holds:

* the DCP files (``.metadata`` + one ``__<rank>_0.distcp`` per writing rank) with the trainable
  (LoRA) parameters ``model.<name>`` and their optimizer state ``optim.<name>.<field>``: each
  rank writes its own shards (FSDP2 DTensors) and replicated tensors (DDP) are written once;
  frozen base weights are not saved (they come from the base model);
* ``trainer_state.json`` (rank 0): the trainer position, the world size, optimizer scalars and
  param groups, the scheduler; ``rng-rank<r>.safetensors`` (each rank): its RNG states;
* the adapter in PEFT format (rank 0, from the gathered parameters), usable as it is.

DCP reshards on load, so a checkpoint written by N ranks resumes on M ranks or in one plain
process; the data position is carried over by rows read (:func:`~splice.distributed.shards.rescale_position`)
and the RNG states only to the same world size, so only a same-size resume is exact. A
checkpoint is built in ``.tmp-step-XXXXXX`` and renamed by rank 0 once every rank has written:
a crash never leaves a half checkpoint. Nothing is unpickled: DCP's tensor files, safetensors and
JSON (DCP's metadata file is read by DCP itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from splice.distributed.process import DistEnv, barrier
from splice.distributed.shards import rescale_position
from splice.lora.peft_io import save_adapter

__all__ = ["gathered_trainable", "is_sharded_checkpoint", "load_sharded", "save_adapter_once",
           "save_sharded"]

STATE_NAME = "trainer_state.json"  # the name splice.training.state looks for


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint directory written by :func:`save_sharded` (it has DCP metadata)."""
    return (Path(path) / ".metadata").is_file()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _is_sharded(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)  # FSDP2's parameters and their optimizer state


def gathered_trainable(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable parameter in full, on the CPU. Under FSDP2 each is all-gathered (a
    collective: call on every rank, in the same order, which ``named_parameters`` gives)."""
    full: dict[str, Tensor] = {}
    for name, param in _trainable(model).items():
        value = param.detach()
        value = value.full_tensor() if isinstance(value, DTensor) else value
        full[name] = value.cpu()
    return full


@contextlib.contextmanager
def _full_parameters(model: nn.Module, full: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily put the gathered tensors in place of the (sharded) parameters."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for name, value in full.items():
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


def save_adapter_once(model: nn.Module, directory: str | Path, *, env: DistEnv | None,
                      base_model: str | None) -> None:
    """The adapter in PEFT format, written by rank 0 from the gathered parameters (every rank
    must call it: gathering is a collective)."""
    sharded = any(_is_sharded(p) for p in _trainable(model).values())
    full = gathered_trainable(model) if sharded else {}
    if env is None or env.is_main:
        with _full_parameters(model, full):
            save_adapter(model, directory, base_model=base_model)
    barrier(env)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DCP tensors, JSON scalars): parameters and optimizer state, keyed by parameter name."""
    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for name, param in _trainable(model).items():
        tensors[f"model.{name}"] = param.detach()
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, scalars


def _write_rng(path: Path) -> None:
    version, internal, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "python": torch.tensor([version, *internal])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path), metadata={"gauss": json.dumps(gauss)})


def _read_rng(path: Path) -> None:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        gauss = json.loads((f.metadata() or {}).get("gauss", "null"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, *internal = tensors["python"].tolist()
    random.setstate((version, tuple(internal), gauss))


def save_sharded(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, trainer: dict[str, Any],
                 env: DistEnv, base_model: str | None = None, keep: int = 2) -> Path:
    """Write ``directory/step-XXXXXX`` (see module doc) from every rank; prune all but the newest
    ``keep``. ``trainer``: the trainer position (its ``step`` names the directory)."""
    root = Path(directory)
    step = int(trainer["step"])
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    tensors, scalars = _state(model, optimizer)
    dcp.save(tensors, checkpoint_id=str(tmp))
    _write_rng(tmp / f"rng-rank{env.rank}.safetensors")
    save_adapter_once(model, tmp, env=env, base_model=base_model)  # ends with a barrier
    if env.is_main:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        payload = {"trainer": trainer, "world_size": env.world_size, "scheduler": scheduler.state_dict(),
                   "optimizer": {"scalars": scalars, "param_groups": groups}, "format": "dcp"}
        (tmp / STATE_NAME).write_text(json.dumps(payload, indent=1))
        if final.exists():  # re-saving one step (a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def load_sharded(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler,
                 env: DistEnv | None) -> tuple[dict[str, Any], list[str]]:
    """Restore a :func:`save_sharded` checkpoint into this run, whatever its world size (one plain
    process included: ``env=None``). Returns (the trainer position, notes for the log)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    payload = json.loads((path / STATE_NAME).read_text())
    saved_world, world = int(payload["world_size"]), env.world_size if env else 1
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params = _trainable(model)
    missing = sorted(n for n in params if f"model.{n}" not in stored)
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing[0]!r} (and {len(missing) - 1} more): "
                         "resume with the same model and LoRA settings as the run")
    # Destinations DCP loads into, in place: the parameters themselves, and optimizer state made
    # like them (DTensors of the same sharding) or, for scalars such as Adam's step, 0-dim.
    tensors: dict[str, Any] = {f"model.{n}": p.detach() for n, p in params.items()}
    optim: dict[str, dict[str, Any]] = {}
    for key, meta in stored.items():
        if not key.startswith("optim.") or not isinstance(meta, TensorStorageMetadata):
            continue
        name, _, field = key.removeprefix("optim.").rpartition(".")
        param = params[name]
        if tuple(meta.size) == tuple(param.shape):
            value = torch.zeros_like(param.detach(), dtype=meta.properties.dtype)
        else:
            value = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype)
        optim.setdefault(name, {})[field] = tensors[key] = value
    dcp.load(tensors, checkpoint_id=str(path))
    for key, value in payload["optimizer"]["scalars"].items():
        name, _, field = key.rpartition("::")
        optim.setdefault(name, {})[field] = value
    for name, fields in optim.items():
        optimizer.state[params[name]] = fields
    for group, saved in zip(optimizer.param_groups, payload["optimizer"]["param_groups"], strict=True):
        group.update(saved)
    scheduler.load_state_dict(payload["scheduler"])
    trainer = dict(payload["trainer"])
    notes = []
    rank = env.rank if env else 0
    rng = path / f"rng-rank{rank}.safetensors"
    if saved_world == world and rng.is_file():
        _read_rng(rng)
    else:
        trainer["batch_index"] = rescale_position(int(trainer["batch_index"]), saved_world=saved_world,
                                                  world_size=world)
        notes.append(f"checkpoint written by {saved_world} rank(s), resumed on {world}: "
                     f"parameters and optimizer resharded; data position carried over by rows "
                     f"read; random states start fresh (exact resume needs the same world size)")
    return trainer, notes
