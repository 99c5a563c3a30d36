"""NF4 weights (QLoRA) as a tensor type: :class:`NF4Tensor`, and the quantizer that makes them.

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

FSDP2 shards it on dim 0 in its packed form (:mod:`splice.quant.nf4_shard` has the layout): the
ops FSDP2 applies while sharding (``split``, ``new_zeros``, ``narrow``, ``copy_``, ``view(-1)``,
``as_strided``) keep it 4-bit, and ``fsdp_pre_all_gather``/``fsdp_post_all_gather`` all-gather
the packed codes and statistics, never a dequantized weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from splice.kernels.nf4 import NF4_CODE, dequantize_absmax_reference, dequantize_nf4, dynamic_map
from splice.quant import nf4_shard

__all__ = ["ABSMAX_BLOCK", "NF4Tensor", "quantize_absmax", "quantize_nf4_codes", "to_nf4"]

ABSMAX_BLOCK = 256  # double quantization: absmax values per fp32 scale (bitsandbytes' choice)
_CHUNK = 1 << 24  # values quantized at once (bounds the fp32 temporaries of a 70B layer)


def _nf4_bounds(device: torch.device) -> Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2  # decision thresholds: nearest level, ties to the lower


def _blockwise(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(values scaled into [-1, 1], fp32 absmax per block) as bitsandbytes computes them (the
    last block may be short; an all-zero block stores absmax 0 and divides by 1e-38)."""
    n = flat.numel()
    full = n - n % block
    head = flat[:full].reshape(-1, block)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max[None]])
        # times the reciprocal, as bitsandbytes' CUDA kernel (a division can round differently)
        scaled = torch.cat([scaled, torch.clamp(flat[full:] * (1.0 / tail_max.clamp(min=1e-38)), -1, 1)])
    return scaled, absmax


def quantize_nf4_codes(weight: Tensor, *, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """``(packed (ceil(n/2),) uint8, absmax (n_blocks,) fp32)`` of ``weight`` flattened row-major.

    Runs where ``weight`` is, ``_CHUNK`` values at a time (a whole number of blocks), so the
    fp32 temporaries stay small whatever the layer.
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be a positive even number, got {block_size}")
    flat = weight.reshape(-1)
    bounds = _nf4_bounds(weight.device)
    step = max(block_size, _CHUNK - _CHUNK % block_size)
    packed, absmax = [], []
    for start in range(0, flat.numel(), step):
        scaled, amax = _blockwise(flat[start:start + step].float(), block_size)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        packed.append((codes[0::2] << 4) | codes[1::2])
        absmax.append(amax)
    return torch.cat(packed), torch.cat(absmax)


def quantize_absmax(absmax: Tensor, code2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: ``(q (n_blocks,) uint8, scale2 (ceil(n_blocks/256),) fp32, offset ())``
    with ``absmax ~ code2[q] * scale2[b // 256] + offset`` (bitsandbytes' nested statistics)."""
    offset = absmax.mean()
    scaled, scale2 = _blockwise(absmax - offset, ABSMAX_BLOCK)
    return _search_code(scaled, code2), scale2, offset


def _search_code(x: Tensor, code: Tensor) -> Tensor:
    """bitsandbytes' 8-bit encoder (``dQuantize<0>``, CUDA and CPU), vectorized: a 7-step binary
    search over the 256 sorted levels, then the nearer of the last pivot and the bracketing value
    the search saw. Not always the nearest level (the bracket can be a far earlier pivot), which
    is why this is not a ``bucketize``: the codes must equal bitsandbytes' own."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(right, up, down).to(torch.uint8)


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

    # ---- FSDP2 extension hooks (layout: splice.quant.nf4_shard) --------------------------------
    def shard_problem(self, world_size: int) -> str | None:
        """Why FSDP2 cannot shard this weight over ``world_size`` ranks in 4 bits (None: it can)."""
        return nf4_shard.shard_problem(self, world_size)

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any,
                            mp_policy: Any) -> tuple[tuple[Tensor, ...], Any]:
        """This shard's packed codes and statistics (all-gathered by FSDP2 as they are)."""
        return nf4_shard.pre_all_gather(self, (int(outer_size[0]), int(outer_size[1])),
                                        world_size=mesh.size())

    def fsdp_post_all_gather(self, outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype,
                             *, out: Tensor | None = None) -> tuple[NF4Tensor, tuple[Tensor, ...]] | None:
        """The whole weight over the gathered tensors (``out``: FSDP2 refilled them in place)."""
        if out is not None:
            assert isinstance(out, NF4Tensor), type(out)
            return None
        names, layout, shape, block_size, replicated = metadata
        inner = {**nf4_shard.unpack_gathered(names, layout, outputs), **replicated}
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
            return nf4_shard.copy_into(args[0], args[1])
        if func in (aten.is_same_size.default,):
            return args[0].shape == args[1].shape
        if func in nf4_shard.SHARDING_OPS:  # FSDP2's sharding ops; NotImplemented: dequantize
            result = nf4_shard.SHARDING_OPS[func](*args, **kwargs)
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
