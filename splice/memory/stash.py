"""Work a checkpointed layer's forward hands to its recompute, so that the recompute skips it.

Activation checkpointing (:mod:`splice.memory.checkpointing`) runs a decoder layer without a graph and
runs it again in backward. Part of that second forward can be kept from the first for little
memory:

* every fused LoRA linear's down-projection ``U = dropout(x) A^T`` (N, r): r/in of its input,
  so the recompute runs no LoRA down-projection at all;
* with ``attention=True``, the attention core: the forward builds the graph of the attention
  function alone, on graph roots cut from q/k/v (:class:`_Roots`), and keeps what its backward saves (q, k, v, output,
  log-sum-exp: ~2.5x the layer input for Llama-3-8B's grouped heads), plus the output
  projection's result. The recompute then builds the backward of q/k/v/o without their GEMMs
  (``output=False``, see :func:`splice.kernels.lora_linear.lora_linear`) and splices the kept
  attention graph in: no q/k/v/o GEMMs, no RoPE values, no attention forward.

Kept tensors follow the checkpoint's ``offload`` setting (:class:`splice.memory.offload.Kept`): pinned
host memory, uploaded again ahead of the layer's backward. Views of one storage (attention
output and its transpose) are kept once.

A :class:`Stash` is a queue: the forward ``put``s in call order under :func:`recording`, the
recompute ``take``s in the same order under :func:`replaying` (a layer calls the same modules in
the same order both times). :mod:`splice.fused.modules`'s modules do the putting and taking.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from splice.core.context import scoped
from splice.memory.offload import Kept, OffloadPool

__all__ = ["Stash", "active", "is_mlp_output_unread", "mlp_output_unread", "record_attention", "recording",
           "replay_attention", "replaying", "substitute"]

# Smaller tensors stay where they are even when offloading: a copy's fixed cost outweighs them.
_MIN_OFFLOAD_BYTES = 1 << 20


class _Stored:
    """One storage's contents, kept once (as a flat tensor) and uploaded at most once."""

    def __init__(self, flat: Tensor, pool: OffloadPool) -> None:
        self.device = flat.device
        self.kept = Kept(flat, pool)
        self.value: Tensor | None = None

    def load(self) -> Tensor:
        if self.value is None:
            self.value = self.kept.load(self.device)
        return self.value


@dataclass
class _Ref:
    """A kept tensor: a view (shape, stride, offset) of a :class:`_Stored` storage."""

    stored: _Stored
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int

    def get(self) -> Tensor:
        return self.stored.load().as_strided(self.shape, self.stride, self.offset)


class Stash:
    """What one checkpointed layer call's forward keeps for its recompute (see module doc)."""

    def __init__(self, *, offload: bool, attention: bool, pool: OffloadPool | None = None) -> None:
        """``pool``: pinned buffers shared with the model's other layers (offload only)."""
        self.offload, self.attention = offload, attention
        self.pool = (pool or OffloadPool()) if offload else None
        self.items: list[Any] = []
        self.taken = 0
        self._stored: list[_Stored] = []
        # storage address -> (its copy, the tensor that registered it): an address is only
        # matched while that tensor (hence the storage) is alive, never after reuse.
        self._by_address: dict[int, tuple[_Stored, weakref.ref[Tensor]]] = {}

    def keep(self, t: Tensor) -> Any:
        """A handle for ``t`` (offloaded when the stash offloads and ``t`` is a large CUDA
        tensor); :func:`_unpack` gives the tensor back. Also the saved-tensor pack hook."""
        nbytes = t.numel() * t.element_size()
        if not (self.pool is not None and t.is_cuda and nbytes >= _MIN_OFFLOAD_BYTES):
            return t
        storage = t.untyped_storage()
        address = storage.data_ptr()
        known = self._by_address.get(address)
        if known is not None and known[1]() is not None:
            return _Ref(known[0], t.shape, t.stride(), int(t.storage_offset()))
        if storage.nbytes() <= nbytes + nbytes // 4:  # t covers (nearly) all its storage
            stored = _Stored(t.as_strided((storage.nbytes() // t.element_size(),), (1,), 0), self.pool)
            root = t._base if t._base is not None else t
            self._by_address[address] = (stored, weakref.ref(root))
            ref = _Ref(stored, t.shape, t.stride(), int(t.storage_offset()))
        else:  # a small view of a big buffer: keep a dense copy of just the view
            dense = t.contiguous()
            stored = _Stored(dense.view(-1), self.pool)
            ref = _Ref(stored, t.shape, dense.stride(), 0)
        self._stored.append(stored)
        return ref

    def put(self, value: Any) -> None:
        """Append ``value`` (tensors go through :meth:`keep`)."""
        self.items.append(self.keep(value) if isinstance(value, Tensor) else value)

    def take(self) -> Any:
        """The next value, in the order they were put."""
        if self.taken >= len(self.items):
            raise RuntimeError(
                "the recompute of a checkpointed layer asked for more kept values than its forward "
                "kept: the layer must call the same modules in the same order both times")
        item = self.items[self.taken]
        self.taken += 1
        return _unpack(item)

    def prefetch(self) -> None:
        """Start uploading every offloaded value (call when the layer's backward begins)."""
        for stored in self._stored:
            if stored.value is None:
                stored.kept.prefetch(stored.device)


def _unpack(item: Any) -> Any:
    return item.get() if isinstance(item, _Ref) else item


# (stash, replaying) while a checkpointed layer's forward records or its recompute replays.
_ACTIVE: ContextVar[tuple[Stash, bool] | None] = ContextVar("splice_stash", default=None)


def recording(stash: Stash | None) -> contextlib.AbstractContextManager[object]:
    """Within this, :mod:`splice.fused.modules`'s modules put what their recompute may reuse."""
    return scoped(_ACTIVE, None if stash is None else (stash, False))


def replaying(stash: Stash | None) -> contextlib.AbstractContextManager[object]:
    """Within this, :mod:`splice.fused.modules`'s modules take back what their forward put."""
    return scoped(_ACTIVE, None if stash is None else (stash, True))


def active(*, replay: bool) -> Stash | None:
    """The stash being recorded (``replay=False``) or replayed (``replay=True``), if any."""
    current = _ACTIVE.get()
    return current[0] if current is not None and current[1] == replay else None


# Set while a checkpoint recomputes a decoder layer whose MLP output only enters the residual
# sum: that sum's value is never read in the recompute (only its graph is), so the MLP's last
# projection builds its backward without computing its output.
_MLP_OUTPUT_UNREAD: ContextVar[bool] = ContextVar("splice_mlp_output_unread", default=False)


def mlp_output_unread(enabled: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Within this, the fused SwiGLU MLP skips computing ``down_proj``'s output (see above)."""
    return scoped(_MLP_OUTPUT_UNREAD, enabled)


def is_mlp_output_unread() -> bool:
    return _MLP_OUTPUT_UNREAD.get()


@dataclass
class _AttentionGraph:
    """The attention core's graph from the forward: output edge, q/k/v leaf edges."""

    output: GradientEdge
    inputs: tuple[GradientEdge, ...]
    shape: torch.Size


class _Roots(torch.autograd.Function):
    """Graph roots carrying given values, holding no reference to them: unlike leaves made with
    ``detach().requires_grad_()``, whose AccumulateGrad node would keep q/k/v on the GPU."""

    @staticmethod
    def forward(ctx: Any, anchor: Tensor, values: list[Tensor]) -> tuple[Tensor, ...]:
        return tuple(v.detach() for v in values)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, None]:
        return None, None  # never run: autograd.grad stops at these roots


def record_attention(stash: Stash, attend: Callable[..., tuple[Tensor, Any]],
                     *qkv: Tensor) -> tuple[Tensor, Any]:
    """``attend(*qkv) -> (out, extra)`` with its graph built on roots cut from ``qkv`` and
    kept (its saved tensors through :meth:`Stash.keep`) along with ``out``; returns the result,
    detached. :func:`replay_attention` takes both back."""
    anchor = torch.empty(0, device=qkv[0].device, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(stash.keep, _unpack):
        roots = _Roots.apply(anchor, list(qkv))
        out, extra = attend(*roots)
    stash.put(_AttentionGraph(get_gradient_edge(out), tuple(get_gradient_edge(t) for t in roots),
                              out.shape))
    stash.put(out)  # its storage is what the graph saved as the output: kept once
    return out.detach(), extra


class _ReplayAttention(torch.autograd.Function):
    """Returns the kept attention output; backward runs the kept attention graph."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, graph: _AttentionGraph,
                value: list[Tensor]) -> Tensor:
        ctx.graph = graph
        return value[0].detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        graph: _AttentionGraph = ctx.graph
        del ctx.graph
        dq, dk, dv = torch.autograd.grad([graph.output], list(graph.inputs),
                                         [grad.reshape(graph.shape)])
        return dq, dk, dv, None, None


def replay_attention(stash: Stash, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The attention output kept by :func:`record_attention`, with a backward into
    ``q``/``k``/``v`` (whose values are not read) through the kept graph."""
    graph = stash.take()
    value = stash.take()
    return _ReplayAttention.apply(q, k, v, graph, [value])


class _Substitute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, graph: Tensor, value: list[Tensor]) -> Tensor:
        return value[0].detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def substitute(graph: Tensor, value: Tensor) -> Tensor:
    """``value`` with ``graph``'s backward: for a recompute whose ``graph`` was built without
    computing its value (``output=False``) while the forward kept the value."""
    return _Substitute.apply(graph, [value])
