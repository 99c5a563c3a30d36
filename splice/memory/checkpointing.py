"""Activation checkpointing of decoder layers as a rewrite, with optional CPU offload.

``checkpoint_layers(model)`` replaces each decoder layer with a :class:`CheckpointedLayer` that
shares the layer's parameters and children (same paths, same ``state_dict``) and, when training,
runs it without building a graph, keeping only the layer's input; backward recomputes the layer
with gradients on and backpropagates through it (reentrant-style: parameter gradients accumulate
in ``.grad``, so train with ``loss.backward()``, not ``torch.autograd.grad`` on parameters).
Compared with ``torch.utils.checkpoint``'s non-reentrant mode this skips the per-saved-tensor
Python hooks and the forward graph, which matters when the step is short and CPU-bound. With
``offload=True`` the kept input goes to pinned CPU memory (copied on a side stream while the GPU
computes) and comes back for the recompute, so the GPU holds no per-layer activations at all:
the longest sequences fit. Host memory then bounds the length (one ``T x H`` input per layer:
Llama-3-8B at 600k tokens, 157 GB in bf16): ``offload_compression="fp8"`` (or ``"int8"``)
stores each offloaded input as 8-bit codes with a scale per token, half the host memory and
half the PCIe traffic (:mod:`splice.memory.offload`); the forward is unchanged, the recompute
runs on the dequantized input.

``layers="auto"`` checkpoints only as many layers as memory requires: in each training forward,
the first layer runs un-checkpointed while the memory it keeps is measured; from that, the free
GPU memory and a reserve for the backward pass, the first ``k`` layers run without recompute and
the rest are checkpointed (all of them on CPU, where nothing is measured). Short sequences then
pay no recompute at all, long ones checkpoint everything.

Like :mod:`splice.fused.modules`'s containers, the wrapper shares its children, which later walks enter (LoRA inside
stays visible to ``lora_modules``/``save_adapter``); :func:`uncheckpoint_layers` undoes it.
Dropout masks are replayed in the recompute: the keys splice's fused LoRA dropout drew in the
forward are recorded and handed back in order (:func:`~splice.kernels.dropout.recording_keys`),
and torch's CPU and CUDA generator states are restored for any other random op. Inside a CUDA
graph capture (:mod:`splice.training.graphs`) the CUDA generator cannot be saved and restored, so there a
layer holding any other active dropout (``nn.Dropout``, attention dropout) refuses to be captured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.core.context import causal_only, is_causal_only
from splice.core.family import LAYER_PATH, RESIDUAL_MLP_LAYERS
from splice.core.rewrite import Around, Node, Replace, nodes, rewrite, share_state, unrewrite
from splice.kernels.dropout import KeyTape, recording_keys, replaying_keys
from splice.memory.offload import COMPRESSIONS, Compression, Kept, OffloadPool
from splice.memory.stash import Stash, mlp_output_unread, recording, replaying

__all__ = ["CheckpointedLayer", "checkpoint_layers", "release_pinned_memory", "uncheckpoint_layers"]

LayerSelect = Literal["auto", "all"] | int | Callable[[str], bool]
_GIB = 1 << 30


@dataclass
class _AutoPlan:
    """Shared by the layers of one model: how many leading layers skip checkpointing this step."""

    n_layers: int
    reserve_gib: float
    keep: int = 0

    def decide(self, kept_bytes: int, input_bytes: int, device: torch.device) -> None:
        """After layer 0 kept ``kept_bytes``: choose how many layers in all run un-checkpointed."""
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        # Backward needs one layer's recompute + its gradients on top of what is kept.
        budget = free - 3 * kept_bytes - self.reserve_gib * _GIB
        rest = self.n_layers - 1
        extra = int((budget - rest * input_bytes) // max(kept_bytes - input_bytes, 1))
        self.keep = 1 + max(0, min(rest, extra))


@dataclass
class _Shared:
    """What the checkpointed layers of one model share: the "auto" plan, the pinned buffers,
    and the previous layer's saved input in this forward (index, saved), so that its upload
    starts while the layer above recomputes in backward (a backward runs on autograd's thread,
    so this chain is held here, not in a context variable)."""

    plan: _AutoPlan | None
    pool: OffloadPool
    compression: Compression = "none"  # of the offloaded layer inputs (not of the stash)
    last_saved: tuple[int, Kept] | None = None


class _Checkpoint(torch.autograd.Function):
    """Reentrant-style checkpoint of ``run(hidden)`` keeping only ``hidden`` (see :class:`Kept`).

    Parameter gradients accumulate through the inner ``torch.autograd.backward`` (so use
    ``loss.backward()``, not ``torch.autograd.grad`` on parameters); ``anchor`` is a dummy that
    requires grad, so backward runs even when the layer input (e.g. frozen embeddings) does not.
    """

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, hidden: Tensor, run: Callable[[Tensor], Any], offload: bool,
                unread_mlp: bool, index: int, keep_attention: bool, shared: _Shared) -> Any:
        ctx.run, ctx.device, ctx.unread_mlp, ctx.shared = run, hidden.device, unread_mlp, shared
        ctx.causal_only = is_causal_only()  # the recompute runs under the forward's setting
        ctx.needs_hidden = hidden.requires_grad
        ctx.cpu_rng = torch.get_rng_state()
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda and not capturing else None
        ctx.saved = Kept(hidden, shared.pool if offload else None, compression=shared.compression)
        last = shared.last_saved
        ctx.below = last[1] if last is not None and last[0] == index - 1 else None
        shared.last_saved = (index, ctx.saved)
        ctx.tape = KeyTape()
        ctx.stash = Stash(offload=offload, attention=keep_attention, pool=shared.pool)
        with recording_keys(ctx.tape), recording(ctx.stash):
            return run(hidden)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        shared: _Shared = ctx.shared
        last = shared.last_saved
        if last is not None and last[1] is ctx.saved:  # the top layer: drop the forward's chain
            shared.last_saved = None
        hidden = ctx.saved.load(ctx.device).detach().requires_grad_(ctx.needs_hidden)
        del ctx.saved
        ctx.stash.prefetch()  # what the recompute reuses comes back while the MLP recomputes
        if ctx.below is not None:  # the next layer down: its upload overlaps this recompute
            ctx.below.prefetch(ctx.device)
            ctx.below = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), replaying_keys(ctx.tape), replaying(ctx.stash), \
                mlp_output_unread(ctx.unread_mlp), causal_only(ctx.causal_only):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad():
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        del ctx.stash  # frees whatever came back for the recompute
        return None, hidden.grad if ctx.needs_hidden else None, None, None, None, None, None, None


def _unreplayable_dropout(layer: nn.Module) -> str | None:
    """Path of an active dropout in ``layer`` that draws from torch's generator (not splice's
    keys), which a recompute inside a CUDA graph could not replay; None if there is none."""
    # Modules inside splice's fused LoRA linears draw their dropout from replayable keys.
    fused = {id(m) for f in layer.modules() if isinstance(f, Around) and getattr(type(f), "splice_fast", False)
             for m in f.fn.modules()}
    for name, m in layer.named_modules():
        if id(m) in fused or not m.training:
            continue
        if (isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0:
            return name or type(m).__name__
    return None


class CheckpointedLayer(nn.Module):
    """A decoder layer run under activation checkpointing while training (see module doc)."""

    def __init__(self, layer: nn.Module, *, index: int, shared: _Shared, select: bool,
                 offload: bool, skip_unread: bool = True, keep_attention: bool = False) -> None:
        super().__init__()
        share_state(self, layer)
        self.__dict__["_layer"] = layer  # the original, unregistered (its children are ours)
        self.index, self.select, self.offload = index, select, offload
        self.skip_unread, self.keep_attention = skip_unread, keep_attention
        self.__dict__["_shared"] = shared

    def _run_plain(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.__dict__["_layer"]
        layer.training = self.training
        return layer(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not (self.training and torch.is_grad_enabled() and isinstance(hidden, Tensor)):
            return self._run_plain(*args, **kwargs)
        shared: _Shared = self.__dict__["_shared"]
        plan = shared.plan
        if plan is not None and hidden.is_cuda:
            if self.index == 0 and torch.cuda.is_current_stream_capturing():
                return self._run_plain(*args, **kwargs)  # a graph keeps the warm-up's decision
            if self.index == 0:  # measure what one un-checkpointed layer keeps
                before = torch.cuda.memory_allocated(hidden.device)
                out = self._run_plain(*args, **kwargs)
                kept = torch.cuda.memory_allocated(hidden.device) - before
                plan.decide(kept, hidden.numel() * hidden.element_size(), hidden.device)
                return out
            if self.index < plan.keep:
                return self._run_plain(*args, **kwargs)
        elif plan is None and not self.select:
            return self._run_plain(*args, **kwargs)
        # A KV cache would be appended to twice (forward, then recompute): drop it, as Hugging
        # Face's own gradient checkpointing does; training never reads it.
        for key in ("cache", "past_key_values", "past_key_value"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            bad = _unreplayable_dropout(self.__dict__["_layer"])
            if bad is not None:
                raise RuntimeError(
                    f"cannot capture a CUDA graph through checkpointed layer {self.index}: its "
                    f"dropout {bad!r} draws from torch's generator, which the recompute could not "
                    "replay inside a graph; use splice.fuse (its LoRA dropout replays), "
                    "dropout 0, or train without CUDA graphs")
        rest = args[1:]
        kwargs.pop("hidden_states", None)
        run = lambda h: self._run_plain(h, *rest, **kwargs)  # noqa: E731
        anchor = torch.empty(0, device=hidden.device, requires_grad=True)
        layer = self.__dict__["_layer"]
        unread = self.skip_unread and type(layer).__name__ in RESIDUAL_MLP_LAYERS
        return _Checkpoint.apply(anchor, hidden, run, self.offload, unread, self.index, self.keep_attention,
                                 shared)


def _decoder_layer_nodes(model: nn.Module) -> list[Node]:
    return [
        n for n in nodes(model)
        if LAYER_PATH.search(n.name)
        and not isinstance(n.module, CheckpointedLayer)
        and n.kind.endswith(("decoderlayer", "block", "layer"))
    ]


def checkpoint_layers(
    model: nn.Module,
    *,
    layers: LayerSelect = "auto",
    offload: bool | int = False,
    reserve_gib: float = 2.0,
    skip_unread: bool = True,
    keep_attention: bool = False,
    offload_compression: Compression = "none",
) -> list[str]:
    """Wrap the decoder layers of ``model`` for activation checkpointing; returns their names.

    ``layers``: ``"auto"`` (checkpoint only what GPU memory requires, decided each step),
    ``"all"``, an int ``n`` (the last ``n`` layers), or a predicate on the layer's path.
    ``offload``: keep the checkpointed inputs in pinned CPU memory; an int ``n``: only the last
    ``n`` layers' (the first keep theirs on the GPU: when host memory, not the GPU, is what
    bounds the sequence length). ``reserve_gib``: GPU memory
    "auto" leaves free for the loss and optimizer. ``skip_unread``: in the recompute of a
    Llama-family layer (:data:`RESIDUAL_MLP_LAYERS`) with :mod:`splice.fused.modules`'s MLP, skip the
    ``down_proj`` GEMM whose value nobody reads (about a quarter of the recompute's FLOPs).
    ``keep_attention``: the forward also keeps :mod:`splice.fused.modules`'s attention internals (q, k,
    v, attention output and log-sum-exp, output projection: ~3.5x the layer input for
    Llama-3-8B, in pinned host memory with ``offload``) so that the recompute runs no q/k/v/o
    GEMM and no attention forward (see :mod:`splice.memory.stash`): with ``offload``, speed for host
    memory. The LoRA down-projections are always kept (r/in of their inputs).
    ``offload_compression``: ``"fp8"`` (recommended) or ``"int8"`` stores each offloaded layer
    input as 8-bit codes plus a scale per token (half the host memory; the gradients move by
    about the inputs' rounding, see :mod:`splice.memory.offload`); layers kept on the GPU and
    the ``keep_attention`` internals are not compressed. Raises if the model has no decoder
    layers, or for a compression without offload.
    """
    found = _decoder_layer_nodes(model)
    if not found:
        raise ValueError(
            "checkpoint_layers found no decoder layers (modules at '...layers.<i>' whose class "
            "ends in DecoderLayer/Block/Layer); is the model already checkpointed?"
        )
    total = len(found)
    plan = _AutoPlan(n_layers=total, reserve_gib=reserve_gib) if layers == "auto" else None
    shared = _Shared(plan=plan, pool=OffloadPool(), compression=offload_compression)
    index = {n.name: i for i, n in enumerate(found)}
    if not isinstance(offload, bool) and not 0 <= offload <= total:
        raise ValueError(f"checkpoint_layers: offload={offload} layers, but the model has {total}")
    if offload_compression not in COMPRESSIONS:
        raise ValueError(f"checkpoint_layers: offload_compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"got {offload_compression!r}")
    if offload_compression != "none" and not offload:
        raise ValueError(f"checkpoint_layers: offload_compression={offload_compression!r} compresses the "
                         "layer inputs kept in host memory: pass offload=True (or a layer count)")

    def selected(name: str) -> bool:
        if layers in ("auto", "all"):
            return True
        if isinstance(layers, int) and not isinstance(layers, bool):
            return index[name] >= total - layers
        if callable(layers):
            return bool(layers(name))
        raise TypeError(f"layers must be 'auto', 'all', an int or a predicate, got {layers!r}")

    def rule(node: Node) -> Replace | None:
        if node.name not in index:
            return None
        return Replace(CheckpointedLayer(node.module, index=index[node.name], shared=shared,
                                         select=selected(node.name),
                                         offload=offload if isinstance(offload, bool)
                                         else index[node.name] >= total - offload,
                                         skip_unread=skip_unread,
                                         keep_attention=keep_attention))

    return rewrite(model, rule)


def release_pinned_memory(model: nn.Module) -> None:
    """Free the pinned host buffers ``model``'s offloaded checkpoints keep (only once no CUDA
    graph captured through them will be replayed again)."""
    for module in model.modules():
        if isinstance(module, CheckpointedLayer):
            module.__dict__["_shared"].pool.clear()


def uncheckpoint_layers(model: nn.Module) -> list[str]:
    """Undo :func:`checkpoint_layers` (the layers' contents, rewritten or not, are kept)."""
    return unrewrite(model, layer=lambda m: isinstance(m, CheckpointedLayer))
