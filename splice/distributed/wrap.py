"""Data parallelism from torch.distributed: DDP (a full model per rank) or FSDP2 (sharded).

The training loss lives outside ``model.forward`` (decoder hidden states + the head's weight into a
fused linear cross-entropy), so the step is wrapped as a module, :class:`LossModule`, whose
``forward(batch)`` returns the micro-batch's summed loss; DDP or FSDP2 wraps *that*, so their
forward/backward hooks see the whole step:

* DDP (``kind="ddp"``): gradients of the trainable (LoRA) parameters are averaged over ranks in
  backward; frozen weights are replicated and never communicated.
* FSDP2 (``kind="fsdp2"``): ``torch.distributed.fsdp.fully_shard`` on every decoder layer, then on
  the :class:`LossModule` (the root: embeddings, final norm, head). Each parameter, frozen or not,
  is a DTensor sharded on dim 0 over the ranks, all-gathered per layer for its forward and
  backward; gradients are reduce-scattered. On a GPU the policy is bf16 compute, fp32 reduction
  (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``).

Sharding works on any parameter FSDP2 can split on dim 0, tensor subclasses included: a quantized
weight class that implements FSDP2's extension hooks ``fsdp_pre_all_gather`` /
``fsdp_post_all_gather`` (splice's :class:`~splice.quant.nf4.NF4Tensor`, as torchao's) is sharded
in its packed form and all-gathered packed (see :mod:`splice.quant.nf4_fsdp`), so a QLoRA model
spreads over the ranks in 4 bits. :func:`unshardable_params` names any weight that cannot be
(a subclass without the hooks, or one whose ``shard_problem(world_size)`` gives a reason: NF4
rows that do not split into whole blocks), and the wrap then falls back to DDP with that reason.

Outside the step, :meth:`Wrapped.evaluation` runs the bare model with every rank in step (each
layer gathers itself in its forward), and :meth:`Wrapped.whole_weights` gathers the whole model
once so each rank may run forwards of its own (GRPO's rollouts).

Both kinds average gradients over ranks, so the loop scales each rank's summed loss by
``world_size / global target count`` (see :mod:`splice.distributed.shards`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splice.distributed.process import DistEnv

__all__ = ["LossModule", "Wrapped", "clip_grad_norm", "decoder_layers", "shard_reason",
           "unshardable_params", "wrap_model"]

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]
_FITS_SHARE = 0.5  # a model whose weights take more of one GPU than this is sharded by default


class LossModule(nn.Module):
    """``forward(batch) = loss(model, batch)``: the training step as one module (see module doc)."""

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self._loss(self.model, batch)


@dataclass
class Wrapped:
    """The wrapped step: call it on a micro-batch for the summed loss, then ``backward``."""

    kind: str  # "ddp" | "fsdp2"
    step: nn.Module
    root: LossModule
    notes: list[str] = field(default_factory=list)  # what was decided, and why (for the log)

    def __call__(self, batch: dict[str, Tensor]) -> Tensor:
        return self.step(batch)

    @contextlib.contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        """Gradient accumulation: communicate gradients only in the last micro-batch's backward."""
        if self.kind == "ddp":
            assert isinstance(self.step, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if enabled else self.step.no_sync():
                yield
            return
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(self.root, FSDPModule)
        self.root.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Lets the bare model run outside the step (validation loss, generation): under FSDP2 the
        root's own weights (embeddings, norm, head) are gathered for the block; each decoder layer
        still gathers its own in its forward. Every rank must enter it (collectives)."""
        if self.kind != "fsdp2":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(self.root, FSDPModule)
        # torch has no public lazy init; without it a layer run first would make itself a root.
        self.root._get_fsdp_state()._lazy_init()
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[None]:
        """The whole model on this rank for the block, with no collective inside it, so each rank
        may run a number of forwards of its own (GRPO: the engine's rollouts of this rank's prompts).
        Under FSDP2 the root and every decoder layer are all-gathered once on entry and stay gathered
        through their forwards (no reshard after forward), then are resharded on exit. Memory: the
        whole model on every rank for the block, as DDP holds it all the time (NF4 weights gathered
        packed, in 4 bits; with the GPU's mixed precision, in bf16), freed on exit. DDP: nothing to
        do. Every rank must enter it (the gathers are collectives). FSDP2 still records the block's
        forwards in the order it prefetches backward gathers by, so the next backward gathers the
        last decoder layer once for nothing (every rank alike, so none waits; as after evaluation())."""
        if self.kind != "fsdp2":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        layers = [m for m in self.root.modules() if isinstance(m, FSDPModule) and m is not self.root]
        with self.evaluation():  # the root: lazily initialized, gathered
            try:
                for layer in layers:
                    layer.set_reshard_after_forward(False, recurse=False)
                    layer.unshard()
                yield
            finally:
                for layer in layers:  # as _fully_shard made them: non-root modules reshard after forward
                    layer.set_reshard_after_forward(True, recurse=False)
                    layer.reshard()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder's layers: the children of the longest ``nn.ModuleList`` of modules of one class
    (``model.layers``, GPT-2's ``h`` ...); [] when there is none."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def unshardable_params(model: nn.Module, *, world_size: int) -> list[str]:
    """Parameters FSDP2 cannot shard over ``world_size`` ranks: tensor subclasses without its
    all-gather hooks, or whose ``shard_problem(world_size)`` names a reason."""
    bad = []
    for name, param in model.named_parameters():
        data = param.data if isinstance(param, nn.Parameter) else param
        if type(data) is Tensor:
            continue
        if not hasattr(data, "fsdp_pre_all_gather"):
            bad.append(f"{name} ({type(data).__name__}: no fsdp_pre_all_gather hooks)")
        elif callable(problem := getattr(data, "shard_problem", None)) and (why := problem(world_size)):
            bad.append(f"{name} ({type(data).__name__}: {why})")
    return bad


def _stored_bytes(param: Tensor) -> int:
    """Bytes a weight takes on its device (a packed subclass reports its own)."""
    stored = getattr(param, "nbytes_stored", None)
    return int(stored()) if callable(stored) else param.numel() * param.element_size()


def shard_reason(model: nn.Module, *, shard: bool, device: torch.device) -> str | None:
    """Why this run should be sharded with FSDP2 (None: DDP): asked for, or the weights would
    take more than half of one GPU (activations, LoRA state and the step need the rest)."""
    if shard:
        return "--shard"
    if device.type != "cuda":
        return None
    weights = sum(_stored_bytes(p) for p in model.parameters())
    total = torch.cuda.get_device_properties(device).total_memory
    if weights > _FITS_SHARE * total:
        return (f"the weights ({weights / 2**30:.1f} GiB) take over {_FITS_SHARE:.0%} of one GPU "
                f"({total / 2**30:.1f} GiB)")
    return None


def wrap_model(model: nn.Module, *, loss: LossFn, env: DistEnv, device: torch.device,
               shard_why: str | None, mixed_precision: bool) -> Wrapped:
    """Wrap ``model``'s training step for data parallelism over the default process group: FSDP2
    when ``shard_why`` gives a reason, else DDP. Parameters are replaced in place under FSDP2
    (build the optimizer afterwards, from ``model.parameters()``), and moved to ``device`` (FSDP2
    moves each layer's shards as it wraps it: a model loaded on the CPU never sits whole on a GPU)."""
    root = LossModule(model, loss)
    notes: list[str] = []
    if shard_why is not None:
        bad = unshardable_params(model, world_size=env.world_size)
        layers = decoder_layers(model)
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            notes.append(f"FSDP2 asked for ({shard_why}) but cannot shard {'; '.join(bad[:3])}{more}; "
                         "falling back to DDP")
        elif not layers:
            notes.append(f"FSDP2 asked for ({shard_why}) but the model has no list of decoder "
                         "layers to shard one by one; falling back to DDP")
        else:
            _fully_shard(root, layers, env=env, device=device, mixed_precision=mixed_precision)
            precision = "bf16 compute, fp32 gradient reduction" if mixed_precision else "fp32"
            notes.append(f"FSDP2 ({shard_why}): {len(layers)} decoder layers + root sharded over "
                         f"{env.world_size} rank(s), {precision}")
            return Wrapped(kind="fsdp2", step=root, root=root, notes=notes)
    if env.world_size == 1 and shard_why is None:
        notes.append("world size 1: DDP adds nothing but is kept so the path is the same")
    root.to(device)  # a no-op unless the weights were loaded elsewhere for FSDP2 (a fallback)
    # DDP broadcasts rank 0's parameters at start; frozen FP8 codes and scales are the same on every rank
    # (loaded from one checkpoint), and gloo cannot send float8: leave them out of that broadcast
    alone = [f"{path}.{name}" for path, m in root.named_modules() if getattr(type(m), "splice_shard_alone", False)
             for name, p in m.named_parameters(recurse=False) if not p.requires_grad]
    if alone:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, alone)
    ddp = nn.parallel.DistributedDataParallel(
        root, device_ids=[device.index if device.index is not None else env.local_rank]
        if device.type == "cuda" else None,
        **_no_buffer_sync(),
    )
    notes.append(f"DDP over {env.world_size} rank(s): LoRA gradients averaged in backward")
    return Wrapped(kind="ddp", step=ddp, root=root, notes=notes)


def _no_buffer_sync() -> dict[str, Any]:  # Any: splatted into DDP, whose options differ in type
    """DDP's option not to broadcast buffers before each forward: the buffers (RoPE tables) are
    equal on every rank and never trained. torch 2.13 names it ``forward_sync_buffers`` (and
    deprecates ``broadcast_buffers``); earlier releases (2.11 on the GPU image) know only the old name."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}


def _fully_shard(root: LossModule, layers: list[nn.Module], *, env: DistEnv, device: torch.device,
                 mixed_precision: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    for module in [m for m in root.modules() if getattr(type(m), "splice_shard_alone", False)]:
        # its own unit, never cast: FP8 codes and scales all-gathered as they are (splice.quant.fp8)
        fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also returns a plain float for sharded (DTensor)
    gradients: the norm over every rank's shards."""
    norm: Any = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)
