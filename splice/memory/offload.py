"""Activations parked in pinned CPU memory between a forward and its backward.

:class:`Kept` holds one tensor for a later pass: as is, or (``offload=True``) as a pinned host
copy written on a side stream while the GPU goes on computing, and uploaded again (ahead of
time with :meth:`Kept.prefetch`, so the copy overlaps compute) when the backward needs it.
Pinned buffers are pooled by shape (pinning is slow), and the buffers a captured CUDA graph
copies through are kept for as long as it may be replayed. Used by :mod:`splice.memory.checkpointing`
for layer inputs and by :mod:`splice.memory.stash` for the tensors a recompute reuses.

Compression (``compression="fp8" | "int8"``, layer inputs only): the offloaded tensor ``x``
(..., H) is stored as 1-byte codes ``q`` (..., H) and one fp32 scale per row (token) ``s`` (..., 1),
``x ~ q * s``: fp8 e4m3 with ``s = amax(|x_row|) / 448`` (round to nearest even, by
:func:`splice.quant.fp8.quantize_rows`), or int8 with ``s = amax(|x_row|) / 127``, ``q =
round(x / s)`` (half to even) in [-127, 127]. An all-zero row gets a tiny scale and zero codes:
it comes back exactly zero. Quantizing runs on the GPU, on the copy stream, before the
device-to-host copy (so the PCIe copy halves too), a block of rows (~32M values) at a time, each
block's codes copied down as soon as they are made; in backward the codes go up block by block,
dequantized on the copy stream into the layer input: beyond the input itself the GPU holds one
block. Host memory per token and layer: ``H + 4`` bytes instead of ``2H`` (bf16).

Which format: a residual stream's rows carry a few outlier channels far above the rest (the
real SmolLM2-135M's layer inputs: amax up to 24x a row's RMS, 12x in the median token, and a
few tokens far larger than the rest). int8's uniform step ``amax / 127`` then rounds the
ordinary channels to a few levels, while e4m3 keeps ~2^-4 relative precision at every
magnitude, so fp8 is the recommended value; on rows without outliers (Gaussian-like, the random
tiny test models) int8 is the more accurate (0.6% against 2.5%). Measured on SmolLM2-135M
(``benchmarks/offload_compression.py``: the default job's model and r16 all-linear LoRA, fp32 on
the CPU, 4 x 160 tokens of its task, three LoRA inits), fp8 / int8: layer-input error 0.6% /
5.2% (median layer; per token 2.3% / 2.7%, the ordinary channels 2.7% / 28%); the first step's
LoRA gradients 9.5-11.2% (mean 10.2%) / 10.4-14.6% (mean 12.8%) from the uncompressed ones,
where the same model in bf16 is 58-152% from fp32; the loss after 4 AdamW steps moves by
0.002-0.12 / 0.01-0.06, as much as bf16 moves it (0.08-0.11).
The forward is unchanged (it runs on the exact input); only the backward's recompute sees the
dequantized input, so the loss is bit-identical and the gradients move by a small multiple of
the layer inputs' error (the recompute of each layer above adds its own).
"""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from splice.quant.fp8 import FP8_DTYPE, quantize_rows

__all__ = ["COMPRESSIONS", "Compression", "Kept", "OffloadPool", "dequantize_rows", "kept_nbytes",
           "host_memory", "offloaded_host_bytes", "pinned_empty", "quantize_rows_8bit"]

# torch's pinned allocator rounds every block up to a power of two: a 2.75 GiB layer input
# (352k tokens x 4,096 bf16) takes 4 GiB, and 32 of them exhaust a 128 GiB host. Buffers from
# this size up are allocated pageable and registered with CUDA at their exact size instead.
_EXACT_PIN_BYTES = 64 << 20

Compression = Literal["none", "fp8", "int8"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "fp8", "int8")
_CODES = {"fp8": FP8_DTYPE, "int8": torch.int8}
_INT8_MAX = 127.0
_TINY = 1e-12  # an all-zero row's amax floor (as splice.quant.fp8): its codes are 0, it comes back 0
# Rows (de)quantized at a time: at most this many elements, so the fp32 temporaries of a
# 600k-token layer input stay ~128 MiB instead of twice the input.
_CHUNK_ELEMENTS = 1 << 25


def _row_blocks(rows: int, width: int) -> list[slice]:
    """Slices of at most ``_CHUNK_ELEMENTS`` elements covering ``rows`` rows of ``width``."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int8 (M, H), scales fp32 (M, 1)) of ``x`` (M, H): ``round(x / s)``, ``s = amax / 127``."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float()
    scale = amax.clamp(min=_TINY) / _INT8_MAX
    # x / s <= 127 up to fp32 rounding; the clamp keeps a 127.00001 (and nothing else) in range
    return torch.round(x.float() / scale).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8), scale


def quantize_rows_8bit(x: Tensor, compression: Compression, *,
                       out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (..., H) as 1-byte codes (..., H) and fp32 row scales (..., 1), ``x ~ codes * scales``
    (module doc); ``compression`` "fp8" or "int8". Runs on ``x``'s device a block of rows at a
    time; ``out``: (codes, scales) to fill, e.g. pinned host buffers, each block copied there as
    soon as it is quantized (non-blocking: the device holds one block of codes at a time)."""
    if compression not in _CODES:
        raise ValueError(f"compression must be fp8 or int8, got {compression!r}")
    if out is None:
        out = (torch.empty(x.shape, dtype=_CODES[compression], device=x.device),
               torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))
    flat, codes, scales = x.reshape(-1, x.shape[-1]), out[0].view(-1, x.shape[-1]), out[1].view(-1, 1)
    for rows in _row_blocks(*flat.shape):
        q, s = quantize_rows(flat[rows]) if compression == "fp8" else _int8_rows(flat[rows])
        codes[rows].copy_(q, non_blocking=True)
        scales[rows].copy_(s, non_blocking=True)
    return out


def dequantize_rows(codes: Tensor, scales: Tensor, dtype: torch.dtype, *,
                    device: torch.device | None = None) -> Tensor:
    """``codes * scales`` (the inverse of :func:`quantize_rows_8bit`) in ``dtype`` on ``device``
    (default: the codes'), computed in fp32 (one rounding, to ``dtype``) a block of rows at a
    time: codes in (pinned) host memory go up a block at a time, so the device holds the output
    and one block."""
    device = codes.device if device is None else device
    out = torch.empty(codes.shape, dtype=dtype, device=device)
    flat, flat_out, flat_scales = codes.reshape(-1, codes.shape[-1]), out.view(-1, codes.shape[-1]), scales.reshape(-1, 1)
    for rows in _row_blocks(*flat.shape):
        up = flat[rows].to(device, non_blocking=True), flat_scales[rows].to(device, non_blocking=True)
        flat_out[rows] = up[0].float() * up[1]
    return out


def _layout(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
            compression: Compression) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of what a kept tensor is stored as: itself, or its codes and row scales."""
    if compression == "none":
        return [(tuple(shape), dtype)]
    return [(tuple(shape), _CODES[compression]), ((*shape[:-1], 1), torch.float32)]


def _store(t: Tensor, parts: tuple[Tensor, ...], compression: Compression) -> None:
    """Write ``t`` into ``parts`` (laid out by :func:`_layout`), non-blocking."""
    if compression == "none":
        parts[0].copy_(t, non_blocking=True)
    else:
        quantize_rows_8bit(t, compression, out=(parts[0], parts[1]))


def _load(parts: tuple[Tensor, ...], compression: Compression, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The kept tensor on ``device`` from its ``parts`` (non-blocking uploads)."""
    if compression == "none":
        return parts[0].to(device, non_blocking=True)
    return dequantize_rows(parts[0], parts[1], dtype, device=device)


def kept_nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, compression: Compression = "none") -> int:
    """Host bytes one offloaded tensor of ``shape`` and ``dtype`` takes: ``numel * itemsize``, or
    compressed, 1 byte an element plus a 4-byte scale a row (``H + 4`` bytes a token)."""
    return sum(math.prod(s) * d.itemsize for s, d in _layout(shape, dtype, compression))


def offloaded_host_bytes(*, tokens: int, hidden: int, layers: int, dtype: torch.dtype,
                         compression: Compression = "none", lora_ranks: int = 0) -> int:
    """Pinned host memory the offloaded checkpoints of ``layers`` decoder layers hold for one
    micro-batch of ``tokens`` tokens: each layer's input (tokens, hidden) as :func:`kept_nbytes`
    stores it, plus the LoRA down-projections the stash keeps (``lora_ranks``: the sum of the
    ranks of one layer's adapted linears, 7 x 16 for r16 all-linear Llama; tokens x rank in
    ``dtype``, never compressed; an upper bound, as those under 1 MiB stay on the device). The
    attention internals ``keep_attention`` adds are not counted. With r16 all-linear LoRA in
    bf16: Llama-3-8B (hidden 4,096, 32 layers) at 600k tokens 150 GiB, 77 GiB with fp8;
    Llama-3-70B (8,192, 80 layers) at 128k tokens 158 GiB, 80 GiB with fp8."""
    per_layer = kept_nbytes((tokens, hidden), dtype, compression) + tokens * lora_ranks * dtype.itemsize
    return layers * per_layer


def host_memory(*, available: bool = False) -> int | None:
    """This machine's physical memory in bytes (pinned buffers cannot exceed it), or with
    ``available`` what new allocations can have now (Linux's MemAvailable); None where the OS
    does not say."""
    try:
        if available:
            text = Path("/proc/meminfo").read_text()
            return int(text.split("MemAvailable:")[1].split()[0]) * 1024  # "MemAvailable:  123 kB"
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, IndexError, ValueError, OSError):
        return None


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
    of time (:meth:`prefetch`: it comes back while the GPU still computes something else).
    An offloaded copy may be compressed to 8 bits a value (module doc)."""

    def __init__(self, t: Tensor, pool: OffloadPool | None, *, compression: Compression = "none") -> None:
        """``pool``: where the pinned copy comes from; None keeps ``t`` itself (no offload, and
        no compression). ``compression``: "none", or "fp8" / "int8" codes with row scales."""
        self.event: torch.cuda.Event | None = None
        self.uploaded: tuple[Tensor, torch.cuda.Event] | None = None
        self.pool = pool
        self.dtype = t.dtype
        self.compression: Compression = compression if pool is not None else "none"
        if pool is None:
            self.parts: tuple[Tensor, ...] = (t.detach(),)  # no copy: the input simply stays alive
            return
        layout = _layout(t.shape, t.dtype, self.compression)
        if not t.is_cuda:  # CPU tensors (tests): a plain copy, or compressed as on a GPU
            self.parts = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in layout)
            _store(t.detach(), self.parts, self.compression)
            return
        self.capturing = torch.cuda.is_current_stream_capturing()
        self.parts = tuple(pool.take(torch.Size(shape), dtype, capturing=self.capturing) for shape, dtype in layout)
        stream = pool.stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            # Quantized on the copy stream (it overlaps compute), a block of rows at a time, each
            # block's codes copied down as soon as they are made (made, copied and freed on this
            # stream: their memory is reused only after the copy).
            _store(t.detach(), self.parts, self.compression)
        t.record_stream(stream)  # the allocator must not reuse t before the copy ends
        self.event = torch.cuda.Event()
        self.event.record(stream)

    def prefetch(self, device: torch.device) -> None:
        """Start the upload on the copy stream (after the download; it overlaps compute), and
        the dequantization after it."""
        if self.event is None or self.uploaded is not None or self.pool is None:
            return
        stream = self.pool.stream(device)
        with torch.cuda.stream(stream):  # the download ran on this stream: already ordered
            out = _load(self.parts, self.compression, self.dtype, device)  # dequantized as it comes up
        done = torch.cuda.Event()
        done.record(stream)
        self.uploaded = (out, done)

    def load(self, device: torch.device) -> Tensor:
        if self.event is None:
            return _load(self.parts, self.compression, self.dtype, device)
        current = torch.cuda.current_stream(device)
        self.prefetch(device)
        assert self.uploaded is not None
        out, done = self.uploaded
        current.wait_event(done)
        out.record_stream(current)  # made on the copy stream, used (and freed) on this one
        self.uploaded = None
        assert self.pool is not None
        for buffer in self.parts:
            if self.capturing:
                self.pool.keep_for_graph(buffer)
            else:
                self.pool.give(buffer, done)  # reusable once the upload finished
        return out
