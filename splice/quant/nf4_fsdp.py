"""FSDP2 over NF4 weights: the sharding ops and the all-gather hooks of :class:`~splice.quant.nf4.NF4Tensor`.

FSDP2 (``fully_shard``) splits every parameter on dim 0 into ``world_size`` equal row ranges and
all-gathers them per layer. For an ``(out, in)`` NF4 weight, rows ``[r0, r1)`` are the flat
weights ``[r0 * in, r1 * in)``, so a shard is a slice of each inner tensor:

* ``packed`` (two 4-bit codes a byte): bytes ``[r0 * in / 2, r1 * in / 2)``;
* per-block statistics (``block_size`` weights a block): blocks ``[b0, b1) = [r0 * in, r1 * in) /
  block_size``. Double-quantized statistics (``qabsmax`` in groups of 256 blocks, one fp32
  ``scale2`` a group) stay compressed when a shard holds whole groups (``b0``, ``b1`` multiples
  of 256: every Llama-3 8B and 70B projection over 2 to 8 ranks); otherwise the shard holds
  the fp32 ``absmax`` of its blocks, decompressed (the same values: ``code2[q] * scale2 +
  offset``), since a group cut by a shard boundary has no owner for its ``scale2``;
* ``code``, ``offset``, ``code2`` (16 levels, one scalar, 256 levels) are copied to every shard.

So a shard needs ``out % world_size == 0`` and a whole number of blocks (:func:`shard_problem`).
The all-gather moves ``(packed, qabsmax, scale2)`` or ``(packed, absmax)`` of each shard; FSDP2
concatenates them rank by rank, which is exactly the whole weight's inner tensors, and
:func:`post_all_gather` wraps them again (4.13 bits a weight on the wire, not 16).

The sharding ops are those FSDP2 applies while sharding (``chunk`` -> ``split``, ``new_zeros``,
``narrow`` -> ``slice``, ``view(-1)``, ``as_strided``, pinning; ``copy_`` is the tensor's own);
each is registered in the one op table (:mod:`splice.quant.nf4_ops`) and returns an NF4Tensor
aliasing the inner tensors where the op is a view. Shapes off that layout (a slice inside a
block, a reshape) run on the dequantized weight: the right values, as a float tensor.

This module sits below :mod:`splice.quant.nf4` (which imports it for the hooks), so it sees the
tensor through :class:`NF4Like` and builds new ones with ``t.like(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Self

import torch
from torch import Tensor
from torch._ops import OpOverload

from splice.quant.nf4_encode import ABSMAX_BLOCK
from splice.quant.nf4_ops import implements, run_dequantized

__all__ = ["NF4Like", "post_all_gather", "pre_all_gather", "shard_problem"]

_REPLICATED = ("code", "offset", "code2")
aten = torch.ops.aten


class NF4Like(Protocol):
    """What this module uses of an :class:`~splice.quant.nf4.NF4Tensor`."""

    packed: Tensor
    code: Tensor
    absmax: Tensor | None
    qabsmax: Tensor | None
    scale2: Tensor | None
    offset: Tensor | None
    code2: Tensor | None
    weight_shape: tuple[int, int]
    block_size: int
    transposed: bool
    flat: bool

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def shape(self) -> torch.Size: ...
    @property
    def double_quant(self) -> bool: ...
    def numel(self) -> int: ...
    def stride(self) -> tuple[int, ...]: ...
    def inner_tensors(self) -> dict[str, Tensor]: ...
    def fp32_absmax(self) -> Tensor: ...
    def like(self, inner: dict[str, Tensor | None], *, shape: tuple[int, int],
             dtype: torch.dtype | None = None) -> Self: ...
    def rebuild(self, *, fn: Callable[[Tensor], Tensor] | None = None, dtype: torch.dtype | None = None,
                transposed: bool | None = None, flat: bool | None = None) -> Self: ...


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _plain_2d(t: NF4Like) -> bool:
    return not t.transposed and not t.flat


def _keeps_double(t: NF4Like, rows: int) -> bool:
    """Whether a shard of ``rows`` rows keeps ``t``'s compressed statistics (module doc)."""
    if not t.double_quant:
        return False
    full, cols = t.weight_shape
    return rows == full or (rows * cols % t.block_size == 0 and rows * cols // t.block_size % ABSMAX_BLOCK == 0)


def shard_problem(t: NF4Like, world_size: int) -> str | None:
    """Why FSDP2 cannot shard ``t`` over ``world_size`` ranks in its packed form (None: it can)."""
    if not _plain_2d(t):
        return "a transposed or flattened view of a weight"
    if world_size == 1:
        return None
    rows, cols = t.weight_shape
    if rows % world_size:
        return f"its {rows} rows do not split evenly over {world_size} ranks"
    if rows // world_size * cols % t.block_size:
        return (f"a shard of {rows // world_size} x {cols} weights is not a whole number of "
                f"{t.block_size}-weight NF4 blocks")
    return None


def _rows_of(t: NF4Like, r0: int, r1: int) -> Any:
    """Rows ``[r0, r1)`` of ``t`` as an NF4Tensor (views of its inner tensors unless the
    statistics had to be decompressed), or ``NotImplemented`` off the block grid."""
    rows, cols = t.weight_shape
    block = t.block_size
    e0, e1 = r0 * cols, r1 * cols
    if not _plain_2d(t) or not 0 <= r0 <= r1 <= rows or e0 % block or (e1 % block and r1 != rows):
        return NotImplemented
    b0, b1 = e0 // block, _ceil(e1, block)
    inner: dict[str, Tensor | None] = {"packed": t.packed[e0 // 2:_ceil(e1, 2)], "code": t.code}
    if not t.double_quant:
        inner["absmax"] = t.absmax[b0:b1]  # type: ignore[index]
    elif _keeps_double(t, r1 - r0) and b0 % ABSMAX_BLOCK == 0:
        inner.update(qabsmax=t.qabsmax[b0:b1], scale2=t.scale2[b0 // ABSMAX_BLOCK:_ceil(b1, ABSMAX_BLOCK)],  # type: ignore[index]
                     offset=t.offset, code2=t.code2)
    else:
        inner["absmax"] = t.fp32_absmax()[b0:b1]
    return t.like(inner, shape=(r1 - r0, cols))


def _is_view(t: NF4Like, rows: int) -> bool:
    """Whether :func:`_rows_of` gives views (not decompressed statistics) for ``rows`` rows."""
    return not t.double_quant or _keeps_double(t, rows)


def _sharding_op(ops: Sequence[OpOverload]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(*args, **kwargs)`` as the handler of ``ops``; where it returns
    ``NotImplemented`` (a shape off the shard layout) the op runs on the dequantized weight."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @implements(ops)
        def handler(func: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            result = fn(*args, **kwargs)
            return run_dequantized(func, args, kwargs) if result is NotImplemented else result

        return fn

    return register


@_sharding_op([aten.split.Tensor])
def _split(t: NF4Like, split_size: int, dim: int = 0) -> Any:
    rows = t.weight_shape[0]  # torch.chunk's split: equal pieces, the last one shorter
    return _split_sizes(t, [min(split_size, rows - r) for r in range(0, rows, split_size)], dim)


@_sharding_op([aten.split_with_sizes.default])
def _split_sizes(t: NF4Like, sizes: list[int], dim: int = 0) -> Any:
    if dim != 0 or not _plain_2d(t) or sum(sizes) != t.weight_shape[0]:
        return NotImplemented
    chunks, start = [], 0
    for size in sizes:
        chunk = _rows_of(t, start, start + size)
        if chunk is NotImplemented:
            return NotImplemented
        chunks.append(chunk)
        start += size
    return chunks


@_sharding_op([aten.new_zeros.default])
def _new_zeros(t: NF4Like, size: list[int], *, dtype: torch.dtype | None = None, layout: Any = None,
               device: torch.device | None = None, pin_memory: bool | None = None) -> Any:
    """An NF4Tensor of zeros (zero levels, zero scales) laid out as a shard of ``size[0]`` rows:
    what FSDP2 allocates to copy a shard into."""
    rows, cols = (list(size) + [0, 0])[:2]
    if len(size) != 2 or cols != t.weight_shape[1] or not _plain_2d(t) or dtype not in (None, t.dtype):
        return NotImplemented
    n = rows * cols
    if n % t.block_size and rows != t.weight_shape[0]:
        return NotImplemented
    where = device or t.device
    blocks = _ceil(n, t.block_size)

    def zeros(*size: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(size, dtype=dtype, device=where)

    inner: dict[str, Tensor | None] = {"packed": zeros(_ceil(n, 2), dtype=torch.uint8), "code": zeros(16)}
    if _keeps_double(t, rows):
        inner.update(qabsmax=zeros(blocks, dtype=torch.uint8), scale2=zeros(_ceil(blocks, ABSMAX_BLOCK)),
                     offset=zeros(), code2=zeros(256))
    else:
        inner["absmax"] = zeros(blocks)
    return t.like(inner, shape=(rows, cols))


@_sharding_op([aten.slice.Tensor])
def _slice(t: NF4Like, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> Any:
    """``narrow``/``t[a:b]`` on rows, as a view (FSDP2 narrows a shard to its unpadded rows)."""
    rows = t.weight_shape[0]
    r0, r1 = max(0, start or 0), min(rows, rows if end is None else end)
    if dim != 0 or step != 1 or not _plain_2d(t) or not _is_view(t, r1 - r0):
        return NotImplemented
    return _rows_of(t, r0, r1)


@_sharding_op([aten.view.default])
def _view(t: NF4Like, size: list[int]) -> Any:
    """``view(-1)`` (FSDP2 keeps each shard flat) and views that keep the shape."""
    size = list(size)
    if not t.transposed and size in ([-1], [t.numel()]):
        return t.rebuild(flat=True)
    if t.flat and tuple(size) == t.weight_shape:
        return t.rebuild(flat=False)
    if tuple(size) == tuple(t.shape):
        return t.rebuild()
    return NotImplemented


@_sharding_op([aten.as_strided.default])
def _as_strided(t: NF4Like, size: list[int], stride: list[int], storage_offset: int | None = None) -> Any:
    """The identity ``as_strided`` FSDP2 applies to an all-gathered weight (same shape, dense)."""
    if tuple(size) == tuple(t.shape) and tuple(stride) == tuple(t.stride()) and not storage_offset:
        return t.rebuild()
    return NotImplemented


@_sharding_op([aten.is_pinned.default])
def _is_pinned(t: NF4Like, device: Any = None) -> bool:
    return all(x.is_pinned() for x in t.inner_tensors().values())


@_sharding_op([aten._pin_memory.default])
def _pin_memory(t: NF4Like, device: Any = None) -> Any:
    return t.rebuild(fn=lambda x: x.pin_memory())


def pre_all_gather(t: NF4Like, outer_shape: tuple[int, int], *, world_size: int) -> tuple[tuple[Tensor, ...], Any]:
    """(this shard's tensors to all-gather, what :func:`post_all_gather` needs).

    Over one rank the tensors go as one uint8 buffer (fp32 ones first, so their views stay
    4-byte aligned): torch's world-size-1 shortcut copies a single all-gather input only."""
    names = ("packed", "qabsmax", "scale2") if t.double_quant else ("packed", "absmax")
    replicated = {name: x for name in _REPLICATED if (x := getattr(t, name)) is not None}
    tensors = [getattr(t, name) for name in names]
    if world_size > 1:
        return tuple(tensors), (names, None, outer_shape, t.block_size, replicated)
    order = sorted(range(len(names)), key=lambda i: -tensors[i].element_size())
    layout = tuple((names[i], tensors[i].numel(), tensors[i].dtype) for i in order)
    one = torch.cat([tensors[i].reshape(-1).view(torch.uint8) for i in order])
    return (one,), (names, layout, outer_shape, t.block_size, replicated)


def _unpack_gathered(names: tuple[str, ...], layout: tuple[tuple[str, int, torch.dtype], ...] | None,
                     outputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The whole weight's inner tensors from FSDP2's all-gather outputs (views, no copies).
    ``layout``: (name, numel, dtype) of each piece of a one-rank buffer; None: one output a name."""
    if layout is None:
        return dict(zip(names, outputs, strict=True))
    (one,), inner, start = outputs, {}, 0
    for name, numel, dtype in layout:
        size = numel * dtype.itemsize
        inner[name] = one[start:start + size].view(dtype)
        start += size
    return inner


def post_all_gather(t: NF4Like, outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype, *,
                    out: Tensor | None = None) -> tuple[Any, tuple[Tensor, ...]] | None:
    """The whole weight over the gathered tensors (``out``: FSDP2 refilled them in place)."""
    if out is not None:
        assert type(out) is type(t), type(out)
        return None
    names, layout, shape, block_size, replicated = metadata
    assert block_size == t.block_size, (block_size, t.block_size)
    inner: dict[str, Tensor | None] = {**_unpack_gathered(names, layout, outputs), **replicated}
    return t.like(inner, shape=shape, dtype=param_dtype), tuple(outputs)
