"""Tensor parallelism for serving: every rank holds a slice of each decoder layer's projections.

Megatron-LM's split of a transformer layer over the ``N`` ranks of a process group (rank ``r``):

* **column-parallel** q/k/v and gate/up keep the rows (output features) ``[r n/N, (r+1) n/N)``. For
  attention these are whole heads: q its query heads ``[r H/N, (r+1) H/N)``, k and v their KV heads
  ``[r H_kv/N, (r+1) H_kv/N)``; query head ``h`` reads KV head ``h // (H/H_kv)``, so a rank's query
  heads read exactly its own KV heads (hence ``H % N == H_kv % N == 0``). They stay plain
  ``nn.Linear`` s: :mod:`splice.fused.projections` packs them, the adapter bank wraps them, and the
  attention (local heads; its KV cache holds local KV heads only) and the SwiGLU between run with
  no communication.
* **row-parallel** o and down keep the columns (input features) ``[r k/N, (r+1) k/N)`` that match
  those rows: :class:`RowParallelLinear` runs its ``local`` slice (a plain linear at
  ``<path>.local``), sums the ranks' outputs with one all-reduce and adds the bias once.
* embeddings, norms, rotary tables and the output head are **replicated**: every rank holds them
  (``2 x vocab x hidden`` values, 4.2 GB in bf16 for Llama-3-70B's 128k vocabulary and untied head).
  A vocabulary-parallel head would save that for an all-gather of the logits every step.

So a layer costs two all-reduces of ``(tokens, hidden)`` and every rank ends it with the same hidden
states (a ring all-reduce hands every rank the same sum), hence the same logits and, sampled with
the same generators, the same tokens (:mod:`splice.distributed.lockstep`).

Why plain collectives and not DTensor: the engine runs Hugging Face's modules on plain tensors,
replays them in CUDA graphs and hands their activations to Triton kernels that take plain tensors
(paged attention, RoPE + cache write, multi-LoRA); projections are packed by storage. DTensor
parameters would make every activation a DTensor (sharding propagation on the host for every op of
every decode step, and ``to_local`` at each kernel's boundary) to express what two
``dist.all_reduce`` calls a layer do.

Adapters (:meth:`Sharding.adapter`): a host adapter's ``B`` (N, r) keeps the column-parallel
rows, its ``A`` (r, K) the row-parallel columns (moved to ``<path>.local``), so rank ``r`` adds
``B A_r x_r`` before the all-reduce and the sum over ranks is ``B A x``.

Quantized (``load_sharded(quantize="nf4" | "int8")``): each rank quantizes its own slices as they
stream in (:func:`splice.models.streaming.load_quantized`'s path, the same NF4Linear / Int8Linear
and the same targets: every linear but the output head), so the column linears and each
``<path>.local`` are quantized and a rank holds its quantized share plus one float slice at a time.
A slice's codes are not the full weight's codes sliced: NF4's double quantization centres the
absmax values on their mean over the (sliced) tensor, and int8's per-row scales of o/down are the
absmax of the rank's columns only; int8 q/k/v/gate/up rows are exactly the full weight's.
Pre-quantized checkpoints (bitsandbytes, FP8) do not split: refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from splice.core.errors import UsageError
from splice.core.rewrite import Node, Replace, innermost, rewrite
from splice.kernels.dora import dora_weight_norm
from splice.lora import adapter_file
from splice.lora.adapter_file import AdapterError, _float_weight, base_shape, dora_output
from splice.lora.bank import HostAdapter, read_bank_file
from splice.models.loading import _check_tokenizer_files, _finish_load, _resolve
from splice.models.streaming import (
    _check_quantize,
    _finish,
    _materialize,
    _safetensors,
    _set_tensor,
    skeleton,
)

__all__ = ["COLUMN", "ROW", "RowParallelLinear", "ShardAdapter", "Sharding", "Split", "check_shardable", "load_sharded",
           "shard", "sharding_of"]

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # each rank keeps rows (output features)
ROW = ("o_proj", "down_proj")  # each rank keeps columns (input features); outputs are summed
_ATTRIBUTE = "splice_sharding"  # where shard() leaves the Sharding on the model


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def check_shardable(config: Any, world: int) -> None:
    """One line (:class:`UsageError`) unless a model of ``config`` splits over ``world`` ranks: whole
    query and KV heads, an equal share of the MLP's intermediate features on every rank, and float
    weights in the checkpoint (no ``quantization_config``)."""
    text = _text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    fits = [n for n in range(1, heads + 1) if heads % n == 0 and kv_heads % n == 0]
    if heads % world or kv_heads % world:
        raise UsageError(f"tensor parallelism over {world} ranks (torchrun --nproc-per-node) gives each rank whole "
                         f"attention heads: this model has {heads} query and {kv_heads} key/value heads, so "
                         f"--nproc-per-node must divide both: use one of {', '.join(map(str, fits))}")
    scheme = getattr(config, "quantization_config", None)
    if scheme is not None:
        method = scheme.get("quant_method", "quantized") if isinstance(scheme, dict) else type(scheme).__name__
        raise UsageError(f"tensor parallelism splits float checkpoints and this one is pre-quantized ({method}): "
                         "pass its float (bf16) checkpoint, with --quantize nf4 or int8 to quantize each rank's share")
    intermediate = int(getattr(text, "intermediate_size", 0) or 0)
    if intermediate % world:
        raise UsageError(f"tensor parallelism over {world} ranks splits the MLP's {intermediate} intermediate "
                         "features evenly: choose a --nproc-per-node that divides it")


@dataclass(frozen=True)
class Split:
    """How one projection is split: ``kind`` "column" or "row", and the full (unsplit) shape."""

    kind: str
    in_features: int
    out_features: int


@dataclass(frozen=True, kw_only=True)
class ShardAdapter(HostAdapter):
    """A host adapter sliced for one rank, with the folder every rank reads it from. ``pending``: DoRA
    modules of row-parallel projections, whose factor needs every rank's columns: ``<path>.local -> (m (N,),
    this rank's ||W_r + s B A_r||^2 (N,))``, summed over the ranks by :meth:`Sharding.finish`."""

    source: str
    pending: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Sharding:
    """This rank's share of a model (see module docstring): ``splits`` maps each split projection's
    path (as in the checkpoint and in adapters) to its :class:`Split`."""

    rank: int
    world: int
    splits: dict[str, Split]
    group: Any = None  # the process group of the all-reduces (None: the default group)

    def part(self, size: int) -> slice:
        """This rank's share ``[r size/N, (r+1) size/N)`` of ``size`` features."""
        return slice(self.rank * size // self.world, (self.rank + 1) * size // self.world)

    def param(self, name: str, tensor: Tensor) -> tuple[str, Tensor]:
        """A checkpoint tensor (``<path>.weight`` / ``<path>.bias``) -> its name and value on this
        rank: a split projection's slice (its own copy, so the full tensor can be freed), else itself."""
        path, _, attr = name.rpartition(".")
        split = self.splits.get(path)
        if split is None:
            return name, tensor
        if split.kind == "column":
            return name, tensor[self.part(split.out_features)].clone()
        if attr == "bias":  # row-parallel: added once, after the sum
            return name, tensor
        return f"{path}.local.{attr}", tensor[:, self.part(split.in_features)].clone()

    def adapter(self, adapter: HostAdapter, *, source: str) -> ShardAdapter:
        """``adapter`` (full shapes) sliced for this rank (see module docstring)."""
        weights: dict[str, tuple[Tensor, Tensor]] = {}
        for path, (a, b) in adapter.weights.items():
            split = self.splits.get(path)
            if split is None:
                weights[path] = (a, b)
            elif split.kind == "column":  # A (r, K), B (N, r)
                weights[path] = (a, b[self.part(split.out_features)].contiguous())
            else:
                weights[f"{path}.local"] = (a[:, self.part(split.in_features)].contiguous(), b)
        return ShardAdapter(name=adapter.name, weights=weights, rank=adapter.rank, source=source)

    def read_adapter(self, directory: str | Path, *, name: str, model: nn.Module) -> ShardAdapter:
        """The PEFT adapter in ``directory`` for this rank of the sharded ``model``: read as the bank
        reads it (:func:`splice.lora.bank.read_adapter`), checked against the full shapes, sliced.

        DoRA: the factor ``g = m / ||W + s B A||`` is a norm over each output row of the served weight. A
        column-parallel projection holds whole rows, so this rank computes its rows' factors; a row-parallel
        one holds some columns of every row, so this rank's part of the squared norms waits in ``pending``
        for :meth:`finish` (a collective). The factor then scales this rank's partial output before the
        all-reduce, which is the same as scaling the sum; the bias is added after it."""
        file = read_bank_file(directory)
        if file.needs_residual_base:
            raise AdapterError(f"{file.directory}: init_lora_weights {file.init!r}: its A and B apply to the residual "
                               "base W - s B0 A0, which a rank cannot re-derive from its slice; save it converted, "
                               "splice.save_adapter(model, dir, convert_to_lora=True)")
        adapter = HostAdapter(name=name, rank=file.rank, weights=file.scaled())
        modules = dict(model.named_modules())
        for path, (a, b) in adapter.weights.items():
            split = self.splits.get(path)
            shape = (split.in_features, split.out_features) if split else (
                base_shape(modules[path]) if path in modules else None)
            if shape is None:
                raise AdapterError(f"{directory}: the adapter does not fit this model: module {path!r} is not a "
                                   "linear of the model")
            if (a.shape[1], b.shape[0]) != shape:
                raise AdapterError(f"{directory}: the adapter does not fit this model: {path} has in/out "
                                   f"{a.shape[1]}/{b.shape[0]}, the model {shape[0]}/{shape[1]}")
        sliced = self.adapter(adapter, source=str(directory))
        return replace(sliced, **self._dora(file, modules)) if file.config.use_dora else sliced

    def _dora(self, file: adapter_file.AdapterFile, modules: dict[str, nn.Module]) -> dict[str, Any]:
        """``dora`` (this rank's whole rows) and ``pending`` (row-parallel parts) of a DoRA ``file``."""
        done: dict[str, tuple[Tensor, Tensor]] = {}
        pending: dict[str, tuple[Tensor, Tensor]] = {}
        for path, m in file.modules.items():
            if m.magnitude is None:
                continue
            split = self.splits.get(path)
            a, b, magnitude = m.a.float(), m.b.float(), m.magnitude.float()
            if split is not None and split.kind == "row":
                local, a = f"{path}.local", a[:, self.part(split.in_features)]
            elif split is not None:
                local, rows = path, self.part(split.out_features)
                b, magnitude = b[rows], magnitude[rows]
            else:
                local = path
            weight = _float_weight(innermost(modules[local]))  # (N or N / world, K or K / world) fp32
            norm = dora_weight_norm(weight, a.to(weight.device), b.to(weight.device), m.scale)
            if local == path:
                done[path] = dora_output(magnitude.to(norm.device) / norm, modules[path])
            else:
                pending[local] = (magnitude.to(norm.device), norm.square())
        return {"dora": done, "pending": pending}

    def finish(self, adapter: ShardAdapter) -> ShardAdapter:
        """``adapter`` with the factors of its ``pending`` DoRA modules: squared norms summed over the ranks,
        one all-reduce a module in path order. A collective: every rank calls it for the same adapters in the
        same order (at start, and at the engine's boundaries: :class:`~splice.distributed.lockstep.LockstepEngine`)."""
        if not adapter.pending:
            return adapter
        dora = dict(adapter.dora)
        for path in sorted(adapter.pending):
            magnitude, squares = adapter.pending[path]
            total = squares.clone()
            if self.world > 1:
                dist.all_reduce(total, group=self.group)
            factor = (magnitude / total.sqrt()).float().cpu()
            dora[path] = (factor, torch.zeros_like(factor))  # .local has no bias: RowParallelLinear adds it after the sum
        return replace(adapter, dora=dora, pending={})


class RowParallelLinear(nn.Module):
    """A row-parallel projection: ``y = sum over ranks of local(x_r) + bias`` (one all-reduce).

    ``local``: this rank's columns of the weight, a plain linear (no bias) at ``<path>.local``, so
    what wraps a linear (the adapter bank) wraps it and adds its share before the sum; ``bias``:
    the full bias, on every rank."""

    def __init__(self, local: nn.Linear, bias: Tensor | None, group: Any = None) -> None:
        super().__init__()
        self.local = local
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        y = self.local(x)
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain linear holding ``weight`` (out, in) and ``bias`` (frozen, where they are: meta too)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def shard(model: nn.Module, *, group: Any = None) -> Sharding:
    """Split ``model``'s decoder projections over ``group``'s ranks in place (see module docstring;
    the full weights are freed) and return this rank's :class:`Sharding`, also kept on the model
    (:func:`sharding_of`). Works on a skeleton on the meta device as on loaded weights. Raises
    :class:`UsageError` for a model that does not split (heads, an unknown linear, a quantized one)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    check_shardable(model.config, world)
    head = _head(model)
    splits: dict[str, Split] = {}

    def rule(node: Node) -> Replace | None:
        leaf = node.name.rpartition(".")[2]
        if node.kind != "linear" or node.module is head:
            return None
        if leaf not in COLUMN + ROW:
            raise UsageError(f"tensor parallelism splits the projections {', '.join(COLUMN + ROW)}: {node.name} "
                             "is a linear it does not know how to split")
        if type(node.module) is not nn.Linear:
            raise UsageError(f"tensor parallelism splits plain linears, not {node.name} ({type(node.module).__name__}): "
                             "quantize or add LoRA after sharding, not before")
        weight, bias = node.module.weight.detach(), node.module.bias
        split = Split("column" if leaf in COLUMN else "row", weight.shape[1], weight.shape[0])
        splits.update(dict.fromkeys(node.paths, split))
        one = Sharding(rank, world, {node.name: split}, group)  # slices this node's tensors
        local_weight = one.param(f"{node.name}.weight", weight)[1]
        local_bias = None if bias is None else one.param(f"{node.name}.bias", bias.detach())[1]
        if split.kind == "column":
            return Replace(_linear(local_weight, local_bias), keep_original=False)
        return Replace(RowParallelLinear(_linear(local_weight, None), local_bias, group), keep_original=False)

    rewrite(model, rule)
    sharding = Sharding(rank, world, splits, group)
    model.__dict__[_ATTRIBUTE] = sharding
    return sharding


def sharding_of(model: nn.Module) -> Sharding | None:
    """The :class:`Sharding` :func:`shard` applied to ``model``, or None."""
    found = model.__dict__.get(_ATTRIBUTE)
    return found if isinstance(found, Sharding) else None


def load_sharded(source: str | Path | None, *, dtype: torch.dtype, device: torch.device, group: Any = None,
                 quantize: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of ``source`` (a local folder or GGUF as :func:`~splice.models.loading.load_model`
    takes it; None: the embedded SmolLM2) with this rank's share of its projections on ``device``.

    The model is built on the meta device and :func:`shard` ed there; then each checkpoint tensor is
    read (one at a time, on the host), sliced to this rank's share and moved to ``device``. A rank
    never holds more of the model than its share: a base too large for one card loads on N. Every
    rank of ``group`` calls it; rank 0 converts a GGUF first, the others then read the result.
    ``quantize`` (``"nf4"`` / ``"int8"``): each slice is quantized on ``device`` as it arrives (module
    docstring; ``dtype`` is then the compute dtype), so the ranks need room for the quantized model only."""
    from transformers import AutoConfig, AutoTokenizer

    rank = dist.get_rank(group)
    if rank != 0:
        dist.barrier(group)
    try:
        folder = _resolve(source, None)
    finally:
        if rank == 0:
            dist.barrier(group)
    if not Path(folder).is_dir():
        raise UsageError(f"--model {source}: tensor parallelism loads a local model folder (or GGUF); download "
                         "it first, e.g. hf download ORG/NAME --local-dir DIR")
    _check_tokenizer_files(folder)
    config = AutoConfig.from_pretrained(folder)
    check_shardable(config, dist.get_world_size(group))
    if quantize is not None:
        _check_quantize(quantize, device)
    model = skeleton(config, dtype=dtype)
    sharding = shard(model, group=group)
    shares = (sharding.param(name, tensor) for name, tensor in _safetensors(Path(folder)))
    if quantize is not None:  # the targets load_model(quantize=...) takes: every linear but the output head
        _materialize(model, shares, quantize=quantize, device=device, dtype=dtype, targets="all-linear",
                     block_size=64)
    else:
        for local, value in shares:
            _set_tensor(model, local, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype))
        _finish(model, device)
    model, tokenizer = _finish_load(model, AutoTokenizer.from_pretrained(folder))  # type: ignore[arg-type]
    return model.eval(), tokenizer
