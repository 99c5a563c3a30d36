"""Activations parked in pinned CPU memory between a forward and its backward.

:class:`Kept` holds one tensor for a later pass: as is, or (``offload=True``) as a pinned host
copy written on a side stream while the GPU goes on computing, and uploaded again (ahead of
time with :meth:`Kept.prefetch`, so the copy overlaps compute) when the backward needs it.
Pinned buffers are pooled by shape (pinning is slow), and the buffers a captured CUDA graph
copies through are kept for as long as it may be replayed. Used by :mod:`splice.memory.checkpointing`
for layer inputs and by :mod:`splice.memory.stash` for the tensors a recompute reuses.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Kept", "release_pinned_memory"]


class _PinnedPool:
    """Reusable pinned host buffers (pinning is slow: allocate once, reuse every step)."""

    def __init__(self) -> None:
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[Tensor, torch.cuda.Event]]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, *, capturing: bool = False) -> Tensor:
        items = self.free.get((tuple(shape), dtype))
        if items:
            buffer, done = items.pop()
            if not capturing:  # (a capture starts with the device synchronized: all done)
                done.synchronize()  # its last upload to the GPU has finished
            return buffer
        if capturing:
            raise RuntimeError(
                "offloaded checkpoints inside a CUDA graph need their pinned buffers from an eager "
                "warm-up step of the same shape (splice.training.graphs.GraphedStep runs one)")
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give(self, buffer: Tensor, done: torch.cuda.Event) -> None:
        self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append((buffer, done))

    def clear(self) -> None:
        self.free.clear()


_POOL = _PinnedPool()
_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# Buffers a captured CUDA graph copies through: its replays reuse their addresses, so they never
# go back to the pool (nor to torch's pinned allocator) while the process may replay the graph.
_GRAPH_BUFFERS: list[Tensor] = []


def release_pinned_memory() -> None:
    """Free the pinned host buffers kept for ``offload=True`` checkpoints (only once no CUDA
    graph captured through offloaded checkpoints will be replayed again)."""
    _POOL.clear()
    _GRAPH_BUFFERS.clear()


class Kept:
    """One kept activation: the tensor itself, or (``offload``) a pinned CPU copy written on a
    side stream while the GPU computes, uploaded again on demand (:meth:`load`, once) or ahead
    of time (:meth:`prefetch`: it comes back while the GPU still computes something else)."""

    def __init__(self, t: Tensor, offload: bool) -> None:
        self.event: torch.cuda.Event | None = None
        self.uploaded: tuple[Tensor, torch.cuda.Event] | None = None
        if not offload:
            self.tensor = t.detach()  # no copy: the input simply stays alive
            return
        if not t.is_cuda:  # CPU tensors (tests): a plain copy
            self.tensor = t.detach().clone()
            return
        self.capturing = torch.cuda.is_current_stream_capturing()
        self.tensor = _POOL.take(t.shape, t.dtype, capturing=self.capturing)
        stream = _copy_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.tensor.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # the allocator must not reuse t before the copy ends
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def prefetch(self, device: torch.device) -> None:
        """Start the upload on the copy stream (after the download; it overlaps compute)."""
        if self.event is None or self.uploaded is not None:
            return
        stream = _copy_stream(device)
        with torch.cuda.stream(stream):  # the download ran on this stream: already ordered
            out = self.tensor.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        self.uploaded = (out, done)

    def load(self, device: torch.device) -> Tensor:
        if self.event is None:
            return self.tensor if self.tensor.device == device else self.tensor.to(device)
        current = torch.cuda.current_stream(device)
        self.prefetch(device)
        assert self.uploaded is not None
        out, done = self.uploaded
        current.wait_event(done)
        out.record_stream(current)  # made on the copy stream, used (and freed) on this one
        self.uploaded = None
        if self.capturing:
            _GRAPH_BUFFERS.append(self.tensor)
        else:
            _POOL.give(self.tensor, done)  # reusable once the upload finished
        return out


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]
