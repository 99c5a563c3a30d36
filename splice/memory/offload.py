"""Activations parked in pinned CPU memory between a forward and its backward.

:class:`Kept` holds one tensor for a later pass: as is, or (``offload=True``) as a pinned host
copy written on a side stream while the GPU goes on computing, and uploaded again (ahead of
time with :meth:`Kept.prefetch`, so the copy overlaps compute) when the backward needs it.
Pinned buffers are pooled by shape (pinning is slow), and the buffers a captured CUDA graph
copies through are kept for as long as it may be replayed. Used by :mod:`splice.memory.checkpointing`
for layer inputs and by :mod:`splice.memory.stash` for the tensors a recompute reuses.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

__all__ = ["Kept", "OffloadPool", "pinned_empty"]

# torch's pinned allocator rounds every block up to a power of two: a 2.75 GiB layer input
# (352k tokens x 4,096 bf16) takes 4 GiB, and 32 of them exhaust a 128 GiB host. Buffers from
# this size up are allocated pageable and registered with CUDA at their exact size instead.
_EXACT_PIN_BYTES = 64 << 20


def pinned_empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialized page-locked host tensor of exactly ``shape`` (see ``_EXACT_PIN_BYTES``)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _EXACT_PIN_BYTES:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    buffer = torch.empty(shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buffer.data_ptr(), nbytes, 0)) != 0:  # e.g. a locked-memory limit
        cudart.cudaGetLastError()  # or the next kernel launch check reports this failure as its own
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # unregistered when the tensor goes (the pool holds its buffers until clear() or the model goes)
    weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr())
    return buffer


class OffloadPool:
    """Reusable pinned host buffers and the copy streams that fill them, for one model.

    Pinning is slow: buffers are allocated once and reused every step. Buffers a captured CUDA
    graph copies through are kept apart: its replays reuse their addresses, so they never go
    back to the pool (nor to torch's pinned allocator) while the graph may be replayed.
    """

    def __init__(self) -> None:
        self.free: dict[tuple[tuple[int, ...], torch.dtype], list[tuple[Tensor, torch.cuda.Event]]] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.graph_buffers: list[Tensor] = []

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
        return pinned_empty(shape, dtype)

    def give(self, buffer: Tensor, done: torch.cuda.Event) -> None:
        self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append((buffer, done))

    def keep_for_graph(self, buffer: Tensor) -> None:
        self.graph_buffers.append(buffer)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def clear(self) -> None:
        """Free every pinned buffer (only once no graph captured through them is replayed)."""
        if self.free and torch.cuda.is_available():
            torch.cuda.synchronize()  # no copy into a buffer is still in flight when it is unpinned
        self.free.clear()
        self.graph_buffers.clear()


class Kept:
    """One kept activation: the tensor itself, or (``offload``) a pinned CPU copy written on a
    side stream while the GPU computes, uploaded again on demand (:meth:`load`, once) or ahead
    of time (:meth:`prefetch`: it comes back while the GPU still computes something else)."""

    def __init__(self, t: Tensor, pool: OffloadPool | None) -> None:
        """``pool``: where the pinned copy comes from; None keeps ``t`` itself (no offload)."""
        self.event: torch.cuda.Event | None = None
        self.uploaded: tuple[Tensor, torch.cuda.Event] | None = None
        self.pool = pool
        if pool is None:
            self.tensor = t.detach()  # no copy: the input simply stays alive
            return
        if not t.is_cuda:  # CPU tensors (tests): a plain copy
            self.tensor = t.detach().clone()
            return
        self.capturing = torch.cuda.is_current_stream_capturing()
        self.tensor = pool.take(t.shape, t.dtype, capturing=self.capturing)
        stream = pool.stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            self.tensor.copy_(t.detach(), non_blocking=True)
        t.record_stream(stream)  # the allocator must not reuse t before the copy ends
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def prefetch(self, device: torch.device) -> None:
        """Start the upload on the copy stream (after the download; it overlaps compute)."""
        if self.event is None or self.uploaded is not None or self.pool is None:
            return
        stream = self.pool.stream(device)
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
        assert self.pool is not None
        if self.capturing:
            self.pool.keep_for_graph(self.tensor)
        else:
            self.pool.give(self.tensor, done)  # reusable once the upload finished
        return out
