"""How FSDP2 shards an :class:`~splice.quant.nf4.NF4Tensor`: row blocks of the packed form.

FSDP2 (``fully_shard``) splits every parameter on dim 0 into ``world_size`` equal row ranges and
all-gathers them per layer. For an ``(out, in)`` NF4 weight, rows ``[r0, r1)`` are the flat
weights ``[r0 * in, r1 * in)``, so a shard is a slice of each inner tensor:

* ``packed`` (two 4-bit codes a byte): bytes ``[r0 * in / 2, r1 * in / 2)``;
* per-block statistics (``block_size`` weights a block): blocks ``[b0, b1) = [r0 * in, r1 * in) /
  block_size``. Double-quantized statistics (``qabsmax`` in groups of 256 blocks, one fp32
  ``scale2`` a group) stay compressed when a shard holds whole groups (``b0``, ``b1`` multiples
  of 256: every Llama projection over 2..8 ranks); otherwise the shard holds the fp32 ``absmax``
  of its blocks, decompressed (the same values: ``code2[q] * scale2 + offset``), since a group
  cut by a shard boundary has no owner for its ``scale2``;
* ``code``, ``offset``, ``code2`` (16 levels, one scalar, 256 levels) are copied to every shard.

So a shard needs ``out % world_size == 0`` and a whole number of blocks (:func:`shard_problem`).
The all-gather moves ``(packed, qabsmax, scale2)`` or ``(packed, absmax)`` of each shard; FSDP2
concatenates them rank by rank, which is exactly the whole weight's inner tensors, and
:meth:`NF4Tensor.fsdp_post_all_gather` wraps them again (4.13 bits a weight on the wire, not 16).

The ops here are those FSDP2 applies while sharding (``chunk`` -> ``split``, ``new_zeros``,
``narrow`` -> ``slice``, ``copy_``, ``view(-1)``, ``as_strided``, pinning); each returns an
NF4Tensor aliasing the inner tensors where the op is a view, or ``NotImplemented`` for shapes
outside that layout (the caller then dequantizes: correct values, a float result).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from splice.quant.nf4 import NF4Tensor

__all__ = ["SHARDING_OPS", "copy_into", "pre_all_gather", "shard_problem", "unpack_gathered"]

GROUP = 256  # absmax values per scale2 (double quantization; bitsandbytes' choice)
_REPLICATED = ("code", "offset", "code2")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _plain_2d(t: NF4Tensor) -> bool:
    return not t.transposed and not t.flat


def keeps_double(t: NF4Tensor, rows: int) -> bool:
    """Whether a shard of ``rows`` rows keeps ``t``'s compressed statistics (module doc)."""
    if not t.double_quant:
        return False
    full, cols = t.weight_shape
    return rows == full or (rows * cols % t.block_size == 0 and rows * cols // t.block_size % GROUP == 0)


def shard_problem(t: NF4Tensor, world_size: int) -> str | None:
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


def rows_of(t: NF4Tensor, r0: int, r1: int) -> NF4Tensor | Any:
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
    elif keeps_double(t, r1 - r0) and b0 % GROUP == 0:
        inner.update(qabsmax=t.qabsmax[b0:b1], scale2=t.scale2[b0 // GROUP:_ceil(b1, GROUP)],  # type: ignore[index]
                     offset=t.offset, code2=t.code2)
    else:
        inner["absmax"] = t.fp32_absmax()[b0:b1]
    return type(t)(inner, shape=(r1 - r0, cols), block_size=block, dtype=t.dtype)


def _is_view(t: NF4Tensor, rows: int) -> bool:
    """Whether :func:`rows_of` gives views (not decompressed statistics) for ``rows`` rows."""
    return not t.double_quant or keeps_double(t, rows)


def _split(t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor] | Any:
    return _split_sizes(t, [split_size] * _ceil(t.weight_shape[0], split_size), dim, clip=True)


def _split_sizes(t: NF4Tensor, sizes: list[int], dim: int = 0, *, clip: bool = False) -> list[NF4Tensor] | Any:
    if dim != 0 or not _plain_2d(t):
        return NotImplemented
    rows = t.weight_shape[0]
    chunks, start = [], 0
    for size in sizes:
        end = min(start + size, rows) if clip else start + size
        chunk = rows_of(t, start, end)
        if chunk is NotImplemented:
            return NotImplemented
        chunks.append(chunk)
        start = end
    return chunks if start == rows else NotImplemented


def _new_zeros(t: NF4Tensor, size: list[int], *, dtype: torch.dtype | None = None, layout: Any = None,
               device: torch.device | None = None, pin_memory: bool | None = None) -> NF4Tensor | Any:
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
    if keeps_double(t, rows):
        inner.update(qabsmax=zeros(blocks, dtype=torch.uint8), scale2=zeros(_ceil(blocks, GROUP)),
                     offset=zeros(), code2=zeros(256))
    else:
        inner["absmax"] = zeros(blocks)
    return type(t)(inner, shape=(rows, cols), block_size=t.block_size, dtype=t.dtype)


def _slice(t: NF4Tensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> NF4Tensor | Any:
    """``narrow``/``t[a:b]`` on rows, as a view (FSDP2 narrows a shard to its unpadded rows)."""
    rows = t.weight_shape[0]
    r0, r1 = max(0, start or 0), min(rows, rows if end is None else end)
    if dim != 0 or step != 1 or not _plain_2d(t) or not _is_view(t, r1 - r0):
        return NotImplemented
    return rows_of(t, r0, r1)


def _view(t: NF4Tensor, size: list[int]) -> NF4Tensor | Any:
    """``view(-1)`` (FSDP2 keeps each shard flat) and views that keep the shape."""
    size = list(size)
    if not t.transposed and size in ([-1], [t.numel()]):
        return t._rebuild(flat=True)
    if t.flat and tuple(size) == t.weight_shape:
        return t._rebuild(flat=False)
    if tuple(size) == tuple(t.shape):
        return t._rebuild()
    return NotImplemented


def _as_strided(t: NF4Tensor, size: list[int], stride: list[int], storage_offset: int | None = None) -> NF4Tensor | Any:
    """The identity ``as_strided`` FSDP2 applies to an all-gathered weight (same shape, dense)."""
    if tuple(size) == tuple(t.shape) and tuple(stride) == tuple(t.stride()) and not storage_offset:
        return t._rebuild()
    return NotImplemented


def _is_pinned(t: NF4Tensor, device: Any = None) -> bool:
    return all(x.is_pinned() for x in t.inner_tensors().values())


def _pin_memory(t: NF4Tensor, device: Any = None) -> NF4Tensor:
    return t._rebuild(fn=lambda x: x.pin_memory())


def copy_into(dst: NF4Tensor, src: NF4Tensor) -> NF4Tensor:
    """``dst.copy_(src)`` for two NF4 tensors of one layout (FSDP2 copies a shard into its buffer)."""
    ours, theirs = dst.inner_tensors(), src.inner_tensors()
    if (dst.weight_shape, dst.block_size, ours.keys()) != (src.weight_shape, src.block_size, theirs.keys()):
        raise TypeError(
            f"NF4Tensor.copy_: the source ({src.weight_shape}, block {src.block_size}, {sorted(theirs)}) "
            f"is not laid out as the destination ({dst.weight_shape}, block {dst.block_size}, "
            f"{sorted(ours)}); dequantize both to copy values")
    for name, t in ours.items():
        t.copy_(theirs[name])
    return dst


def pre_all_gather(t: NF4Tensor, outer_shape: tuple[int, int], *,
                   world_size: int) -> tuple[tuple[Tensor, ...], Any]:
    """(this shard's tensors to all-gather, what :meth:`NF4Tensor.fsdp_post_all_gather` needs).

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


def unpack_gathered(names: tuple[str, ...], layout: tuple[tuple[str, int, torch.dtype], ...] | None,
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


_aten = torch.ops.aten
SHARDING_OPS: dict[Any, Any] = {
    _aten.split.Tensor: _split,
    _aten.split_with_sizes.default: _split_sizes,
    _aten.new_zeros.default: _new_zeros,
    _aten.slice.Tensor: _slice,
    _aten.view.default: _view,
    _aten.as_strided.default: _as_strided,
    _aten.is_pinned.default: _is_pinned,
    _aten._pin_memory.default: _pin_memory,
}
