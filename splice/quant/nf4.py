"""NF4 weights (QLoRA) as a tensor type: :class:`NF4Tensor` (the encoder is :mod:`splice.quant.nf4_encode`).

The numbers follow bitsandbytes ``quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True)`` exactly (layout and formulas in :mod:`splice.kernels.nf4`): the same
codes, the same 8-bit absmax, so a checkpoint moves between the two and a matmul over either
gives the same values.

:class:`NF4Tensor` is a wrapper tensor subclass (as torchao's ``NF4Tensor``): to PyTorch it is an
``(out, in)`` tensor of the compute dtype (``bfloat16`` by default), holding only the packed
codes and the compressed absmax. ``.to(device)`` / ``module.to(...)`` move the inner tensors;
changing the float dtype changes only the compute dtype; ``t()`` and ``mm``/``addmm`` (what
``F.linear`` becomes) dequantize through one Triton pass and call cuBLAS, so a plain
``nn.Linear`` whose weight is an NF4Tensor trains (gradients flow to the input, none to the
frozen weight) and autograd saves the 4-bit weight, never a dequantized copy. Any other op
dequantizes first (correct, not fast); in-place writes are refused.
``__tensor_flatten__``/``__tensor_unflatten__`` describe the inner tensors for tracing.

**FSDP2.** The tensor shards on dim 0 in its packed form; the sharding code is the last section
of this module.

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

So a shard needs ``out % world_size == 0`` and a whole number of blocks (:meth:`NF4Tensor.shard_problem`).
The all-gather moves ``(packed, qabsmax, scale2)`` or ``(packed, absmax)`` of each shard; FSDP2
concatenates them rank by rank, which is exactly the whole weight's inner tensors, and
:meth:`NF4Tensor.fsdp_post_all_gather` wraps them again (4.13 bits a weight on the wire, not 16).

The sharding ops are those FSDP2 applies while sharding (``chunk`` -> ``split``, ``new_zeros``,
``narrow`` -> ``slice``, ``copy_``, ``view(-1)``, ``as_strided``, pinning); each returns an
NF4Tensor aliasing the inner tensors where the op is a view, or ``NotImplemented`` for shapes
outside that layout (the caller then dequantizes: correct values, a float result).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from splice.kernels.nf4 import NF4_CODE, dequantize_absmax_reference, dequantize_nf4, dynamic_map
from splice.quant.nf4_encode import ABSMAX_BLOCK, quantize_absmax, quantize_nf4_codes

__all__ = ["ABSMAX_BLOCK", "NF4Tensor", "quantize_absmax", "quantize_nf4_codes", "to_nf4"]

_INNER = ("packed", "code", "absmax", "qabsmax", "scale2", "offset", "code2")


class NF4Tensor(Tensor):
    """An ``(out, in)`` weight stored as NF4 codes (see the module doc).

    Inner tensors: ``packed`` (uint8 codes), ``code`` (the 16 NF4 levels) and either ``absmax``
    (fp32 per block) or, double-quantized, ``qabsmax``/``scale2``/``offset``/``code2``. The
    tensor's own dtype is the compute dtype that :meth:`dequantize` returns by default.
    """

    packed: Tensor
    code: Tensor
    absmax: Tensor | None
    qabsmax: Tensor | None
    scale2: Tensor | None
    offset: Tensor | None
    code2: Tensor | None
    block_size: int
    transposed: bool
    flat: bool
    splice_quantized = True  # the fused LoRA linear dequantizes it directly (kernels.lora_linear)

    @staticmethod
    def __new__(cls, inner: dict[str, Tensor | None], *, shape: tuple[int, int], block_size: int,
                dtype: torch.dtype, transposed: bool = False, flat: bool = False) -> NF4Tensor:
        view: tuple[int, ...] = (shape[1], shape[0]) if transposed else shape
        if flat:  # FSDP2's view(-1) of a shard
            view = (shape[0] * shape[1],)
        packed = inner["packed"]
        assert packed is not None
        return Tensor._make_wrapper_subclass(cls, view, dtype=dtype, device=packed.device,
                                             requires_grad=False)

    def __init__(self, inner: dict[str, Tensor | None], *, shape: tuple[int, int], block_size: int,
                 dtype: torch.dtype, transposed: bool = False, flat: bool = False) -> None:
        for name in _INNER:
            setattr(self, name, inner.get(name))
        self.weight_shape = (int(shape[0]), int(shape[1]))  # (out, in) of the stored weight
        self.block_size = block_size
        self.transposed = transposed
        self.flat = flat

    # ---- construction and conversion --------------------------------------------------------
    @classmethod
    def from_float(cls, weight: Tensor, *, block_size: int = 64, double_quant: bool = True,
                   dtype: torch.dtype | None = None) -> NF4Tensor:
        """Quantize a float ``(out, in)`` weight (on its device) as bitsandbytes does."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Tensor holds a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        packed, absmax = quantize_nf4_codes(weight, block_size=block_size)
        device = weight.device
        inner: dict[str, Tensor | None] = {
            "packed": packed, "code": torch.tensor(NF4_CODE, dtype=torch.float32, device=device)}
        if double_quant:
            code2 = dynamic_map().to(device)
            q, scale2, offset = quantize_absmax(absmax, code2)
            inner.update(qabsmax=q, scale2=scale2, offset=offset, code2=code2)
        else:
            inner["absmax"] = absmax
        compute = dtype or (weight.dtype if weight.dtype.is_floating_point else torch.bfloat16)
        return cls(inner, shape=(weight.shape[0], weight.shape[1]), block_size=block_size, dtype=compute)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def inner_tensors(self) -> dict[str, Tensor]:
        return {name: t for name in _INNER if (t := getattr(self, name)) is not None}

    def fp32_absmax(self) -> Tensor:
        """The per-block absmax as fp32 (decompressed when double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        return dequantize_absmax_reference(self.qabsmax, self.scale2, self.offset, self.code2)  # type: ignore[arg-type]

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight, ``(out, in)`` (``(in, out)`` for a transposed view, flat for a flat one)."""
        w = dequantize_nf4(self.packed, self.code, shape=self.weight_shape, block_size=self.block_size,
                           dtype=dtype or self.dtype, absmax=self.absmax, qabsmax=self.qabsmax,
                           scale2=self.scale2, offset=self.offset, code2=self.code2)
        return w.t() if self.transposed else w.reshape(-1) if self.flat else w

    def _rebuild(self, *, fn: Any = None, dtype: torch.dtype | None = None,
                 transposed: bool | None = None, flat: bool | None = None) -> NF4Tensor:
        inner = {name: (None if t is None else (fn(t) if fn else t))
                 for name in _INNER for t in [getattr(self, name)]}
        return NF4Tensor(inner, shape=self.weight_shape, block_size=self.block_size,
                         dtype=dtype or self.dtype,
                         transposed=self.transposed if transposed is None else transposed,
                         flat=self.flat if flat is None else flat)

    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner_tensors().values())

    def __repr__(self) -> str:  # type: ignore[override]
        return (f"NF4Tensor(shape={tuple(self.shape)}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, dtype={self.dtype}, device={self.device})")

    # ---- tracing / FSDP2 protocol -----------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        names = [name for name in _INNER if getattr(self, name) is not None]
        return names, {"shape": self.weight_shape, "block_size": self.block_size, "dtype": self.dtype,
                       "transposed": self.transposed, "flat": self.flat}

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], meta: dict[str, Any], outer_size: Any,
                             outer_stride: Any) -> NF4Tensor:
        return NF4Tensor(dict(inner), shape=meta["shape"], block_size=meta["block_size"],
                         dtype=meta["dtype"], transposed=meta["transposed"], flat=meta["flat"])

    # ---- FSDP2 extension hooks (the sharding section below) -----------------------------------
    def shard_problem(self, world_size: int) -> str | None:
        """Why FSDP2 cannot shard this weight over ``world_size`` ranks in 4 bits (None: it can)."""
        return _shard_problem(self, world_size)

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any,
                            mp_policy: Any) -> tuple[tuple[Tensor, ...], Any]:
        """This shard's packed codes and statistics (all-gathered by FSDP2 as they are)."""
        return _pre_all_gather(self, (int(outer_size[0]), int(outer_size[1])),
                                        world_size=mesh.size())

    def fsdp_post_all_gather(self, outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype,
                             *, out: Tensor | None = None) -> tuple[NF4Tensor, tuple[Tensor, ...]] | None:
        """The whole weight over the gathered tensors (``out``: FSDP2 refilled them in place)."""
        if out is not None:
            assert isinstance(out, NF4Tensor), type(out)
            return None
        names, layout, shape, block_size, replicated = metadata
        inner = {**_unpack_gathered(names, layout, outputs), **replicated}
        return NF4Tensor(inner, shape=shape, block_size=block_size, dtype=param_dtype), tuple(outputs)

    # ---- dispatch ---------------------------------------------------------------------------
    # No __torch_function__ layer: ops reach __torch_dispatch__ directly (the hot path is t + mm).
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.mm.default:  # the hot path first: F.linear is t + mm / addmm
            a, b = args
            return func(_plain(a, b), _plain(b, a))
        if func is aten.addmm.default:
            bias, a, b = args[:3]
            return func(bias, _plain(a, b), _plain(b, a), **kwargs)
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._rebuild()
        if func is aten.clone.default:
            return args[0]._rebuild(fn=torch.clone)
        if func in (aten.t.default, aten.transpose.int, aten.permute.default):
            self = args[0]
            if func is aten.permute.default and list(args[1]) != [1, 0]:
                raise NotImplementedError("NF4Tensor: only a 2-D transpose is supported")
            return self._rebuild(transposed=not self.transposed)
        if func is aten._to_copy.default:
            self = args[0]
            device = kwargs.get("device")
            dtype = kwargs.get("dtype")
            if dtype is not None and not dtype.is_floating_point:
                raise TypeError(f"NF4Tensor: cannot convert to {dtype} (its values are floats)")
            move = (lambda t: t.to(device, non_blocking=kwargs.get("non_blocking", False))) if device else None
            return self._rebuild(fn=move, dtype=dtype)
        if func is aten.copy_.default and isinstance(args[0], NF4Tensor) and isinstance(args[1], NF4Tensor):
            return _copy_into(args[0], args[1])
        if func in (aten.is_same_size.default,):
            return args[0].shape == args[1].shape
        if func in _SHARDING_OPS:  # FSDP2's sharding ops; NotImplemented: dequantize
            result = _SHARDING_OPS[func](*args, **kwargs)
            if result is not NotImplemented:
                return result
        if func._schema.is_mutable or func.__name__.endswith("_"):
            raise TypeError(
                f"NF4Tensor does not support in-place {func.__name__}: the weight is stored in 4 "
                "bits. Dequantize it first (NF4Tensor.dequantize) and work on the float copy"
            )
        unpack = lambda t: t.dequantize() if isinstance(t, NF4Tensor) else t  # noqa: E731
        return func(*tree_map(unpack, args), **tree_map(unpack, kwargs))


def _plain(t: Any, other: Any) -> Any:
    """``t`` dequantized in the other matmul operand's dtype (the activations' dtype)."""
    if not isinstance(t, NF4Tensor):
        return t
    return t.dequantize(other.dtype if isinstance(other, Tensor) and other.dtype.is_floating_point else None)


def to_nf4(weight: Tensor, *, block_size: int = 64, double_quant: bool = True,
           dtype: torch.dtype | None = None) -> NF4Tensor:
    """``weight`` (out, in) as an :class:`NF4Tensor` (bitsandbytes' NF4, double-quantized by default)."""
    return NF4Tensor.from_float(weight, block_size=block_size, double_quant=double_quant, dtype=dtype)


# ---- FSDP2 sharding (see the module doc) -----------------------------------------------------

_REPLICATED = ("code", "offset", "code2")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _plain_2d(t: NF4Tensor) -> bool:
    return not t.transposed and not t.flat


def _keeps_double(t: NF4Tensor, rows: int) -> bool:
    """Whether a shard of ``rows`` rows keeps ``t``'s compressed statistics (module doc)."""
    if not t.double_quant:
        return False
    full, cols = t.weight_shape
    return rows == full or (rows * cols % t.block_size == 0 and rows * cols // t.block_size % ABSMAX_BLOCK == 0)


def _shard_problem(t: NF4Tensor, world_size: int) -> str | None:
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


def _rows_of(t: NF4Tensor, r0: int, r1: int) -> NF4Tensor | Any:
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
    return NF4Tensor(inner, shape=(r1 - r0, cols), block_size=block, dtype=t.dtype)


def _is_view(t: NF4Tensor, rows: int) -> bool:
    """Whether :func:`_rows_of` gives views (not decompressed statistics) for ``rows`` rows."""
    return not t.double_quant or _keeps_double(t, rows)


def _split(t: NF4Tensor, split_size: int, dim: int = 0) -> list[NF4Tensor] | Any:
    rows = t.weight_shape[0]  # torch.chunk's split: equal pieces, the last one shorter
    return _split_sizes(t, [min(split_size, rows - r) for r in range(0, rows, split_size)], dim)


def _split_sizes(t: NF4Tensor, sizes: list[int], dim: int = 0) -> list[NF4Tensor] | Any:
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
    if _keeps_double(t, rows):
        inner.update(qabsmax=zeros(blocks, dtype=torch.uint8), scale2=zeros(_ceil(blocks, ABSMAX_BLOCK)),
                     offset=zeros(), code2=zeros(256))
    else:
        inner["absmax"] = zeros(blocks)
    return NF4Tensor(inner, shape=(rows, cols), block_size=t.block_size, dtype=t.dtype)


def _slice(t: NF4Tensor, dim: int = 0, start: int | None = None, end: int | None = None,
           step: int = 1) -> NF4Tensor | Any:
    """``narrow``/``t[a:b]`` on rows, as a view (FSDP2 narrows a shard to its unpadded rows)."""
    rows = t.weight_shape[0]
    r0, r1 = max(0, start or 0), min(rows, rows if end is None else end)
    if dim != 0 or step != 1 or not _plain_2d(t) or not _is_view(t, r1 - r0):
        return NotImplemented
    return _rows_of(t, r0, r1)


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


def _copy_into(dst: NF4Tensor, src: NF4Tensor) -> NF4Tensor:
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


def _pre_all_gather(t: NF4Tensor, outer_shape: tuple[int, int], *,
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


_aten = torch.ops.aten
_SHARDING_OPS: dict[Any, Any] = {
    _aten.split.Tensor: _split,
    _aten.split_with_sizes.default: _split_sizes,
    _aten.new_zeros.default: _new_zeros,
    _aten.slice.Tensor: _slice,
    _aten.view.default: _view,
    _aten.as_strided.default: _as_strided,
    _aten.is_pinned.default: _is_pinned,
    _aten._pin_memory.default: _pin_memory,
}
