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
frozen weight) and autograd saves the 4-bit weight, never a dequantized copy. In-place writes
are refused (except ``copy_`` between two NF4 tensors of one layout).
``__tensor_flatten__``/``__tensor_unflatten__`` describe the inner tensors for tracing.

Every op reaches ``__torch_dispatch__`` and goes through one table (:mod:`splice.quant.nf4_ops`,
filled by ``@implements([...])`` as in torchao): the handlers here (matmuls, views, moves,
copies) and FSDP2's sharding ops and all-gather hooks (:mod:`splice.quant.nf4_fsdp`: the tensor
shards on dim 0 in its packed form). An op with no handler raises, naming it, instead of running
on a silently dequantized copy. The class is registered with ``torch.serialization.add_safe_globals``,
so ``torch.load(..., weights_only=True)`` reads NF4 state back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._ops import OpOverload

from splice.kernels.nf4 import NF4_CODE, dequantize_absmax_reference, dequantize_nf4, dynamic_map
from splice.kernels.nf4_gemv import gemv_applies, nf4_linear
from splice.quant import nf4_fsdp
from splice.quant.nf4_encode import ABSMAX_BLOCK, quantize_absmax, quantize_nf4_codes
from splice.quant.nf4_ops import handler_for, implements

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
    weight_shape: tuple[int, int]  # (out, in) of the stored weight, whatever the view
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
        self.weight_shape = (int(shape[0]), int(shape[1]))
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

    def rebuild(self, *, fn: Callable[[Tensor], Tensor] | None = None, dtype: torch.dtype | None = None,
                transposed: bool | None = None, flat: bool | None = None) -> NF4Tensor:
        """The same weight over ``fn`` of each inner tensor (default: the same tensors), as
        another view (``transposed``, ``flat``) or compute ``dtype``."""
        inner = {name: (None if t is None else (fn(t) if fn else t))
                 for name in _INNER for t in [getattr(self, name)]}
        return NF4Tensor(inner, shape=self.weight_shape, block_size=self.block_size,
                         dtype=dtype or self.dtype,
                         transposed=self.transposed if transposed is None else transposed,
                         flat=self.flat if flat is None else flat)

    def like(self, inner: dict[str, Tensor | None], *, shape: tuple[int, int],
             dtype: torch.dtype | None = None) -> NF4Tensor:
        """Another ``shape`` (out, in) weight over ``inner``, with this one's block size and (by
        default) compute dtype: a shard, or a gathered whole."""
        return NF4Tensor(inner, shape=shape, block_size=self.block_size, dtype=dtype or self.dtype)

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

    # ---- FSDP2 extension hooks (splice.quant.nf4_fsdp) ----------------------------------------
    def shard_problem(self, world_size: int) -> str | None:
        """Why FSDP2 cannot shard this weight over ``world_size`` ranks in 4 bits (None: it can)."""
        return nf4_fsdp.shard_problem(self, world_size)

    def fsdp_pre_all_gather(self, mesh: Any, outer_size: Any, outer_stride: Any, module: Any,
                            mp_policy: Any) -> tuple[tuple[Tensor, ...], Any]:
        """This shard's packed codes and statistics (all-gathered by FSDP2 as they are)."""
        return nf4_fsdp.pre_all_gather(self, (int(outer_size[0]), int(outer_size[1])), world_size=mesh.size())

    def fsdp_post_all_gather(self, outputs: tuple[Tensor, ...], metadata: Any, param_dtype: torch.dtype,
                             *, out: Tensor | None = None) -> tuple[NF4Tensor, tuple[Tensor, ...]] | None:
        """The whole weight over the gathered tensors (``out``: FSDP2 refilled them in place)."""
        return nf4_fsdp.post_all_gather(self, outputs, metadata, param_dtype, out=out)

    # ---- dispatch: every op through the one table (splice.quant.nf4_ops) -----------------------
    # No __torch_function__ layer: ops reach __torch_dispatch__ directly (the hot path is t + mm).
    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        return handler_for(func)(func, tuple(args), kwargs or {})


torch.serialization.add_safe_globals([NF4Tensor])  # torch.load(weights_only=True) may rebuild it

aten = torch.ops.aten
_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]


# Activations of up to this many rows take the fused kernels (splice.kernels.nf4_gemv), more rows the
# dequantize + cuBLAS path. Measured on the H200 (benchmarks/nf4_gemv.py, Llama-3-8B shapes, 2026-12-04):
# the M = 1 GEMV reads the 4-bit weight once and ran at 0.9-1.4x the bf16 GEMV (dequantize + mm: ~0.45x);
# the M = 8 / 32 tl.dot path ran at ~0.05x bf16 (11-22x slower than dequantize + mm), so only M = 1 is
# fused until that path is tuned.
FUSED_MAX_ROWS = 1


def _fused(x: Any, weight: Any, bias: Any = None, *, view_t: bool = False) -> Tensor | None:
    """``x @ W^T (+ bias)`` for the NF4 ``weight`` W (``view_t``: ``weight`` is the view ``W.t()``, as
    mm/addmm get it) through the fused kernel, or None where it does not apply: only CUDA
    activations of at most ``FUSED_MAX_ROWS`` rows that need no gradient (inference; training keeps
    the dequantize + cuBLAS path), and a 1-D bias."""
    if not isinstance(weight, NF4Tensor) or weight.flat or weight.transposed != view_t:
        return None
    if not isinstance(x, Tensor) or isinstance(x, NF4Tensor) or not x.is_cuda or x.dim() == 0:
        return None
    if x.numel() > FUSED_MAX_ROWS * x.shape[-1]:
        return None
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.weight_shape[0],)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if not gemv_applies(x, shape=weight.weight_shape, block_size=weight.block_size):
        return None
    return nf4_linear(x, weight.packed, weight.code, shape=weight.weight_shape, block_size=weight.block_size,
                      absmax=weight.absmax, qabsmax=weight.qabsmax, scale2=weight.scale2, offset=weight.offset,
                      code2=weight.code2, bias=None if bias is None else bias.to(x.dtype))


def _plain(t: Any, other: Any) -> Any:
    """``t`` dequantized in the other matmul operand's dtype (the activations' dtype)."""
    if not isinstance(t, NF4Tensor):
        return t
    return t.dequantize(other.dtype if isinstance(other, Tensor) and other.dtype.is_floating_point else None)


@implements([aten.mm.default])  # the hot path: F.linear is t + mm / addmm
def _mm(func: OpOverload, args: _Args, kwargs: _Kwargs) -> Tensor:
    a, b = args
    fused = _fused(a, b, view_t=True)  # x @ W.t(): F.linear's t + mm
    if fused is not None:
        return fused
    return func(_plain(a, b), _plain(b, a))


@implements([aten.linear.default])  # F.linear reaches here whole under torch.inference_mode (the engine)
def _linear(func: OpOverload, args: _Args, kwargs: _Kwargs) -> Tensor:
    x, weight, *bias = args
    fused = _fused(x, weight, *bias)
    if fused is not None:
        return fused
    return func(_plain(x, weight), _plain(weight, x), *bias, **kwargs)


@implements([aten.addmm.default])
def _addmm(func: OpOverload, args: _Args, kwargs: _Kwargs) -> Tensor:
    bias, a, b = args
    if kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
        fused = _fused(a, b, bias, view_t=True)  # bias + x @ W.t(): F.linear's t + addmm
        if fused is not None:
            return fused
    return func(bias, _plain(a, b), _plain(b, a), **kwargs)


@implements([aten.detach.default, aten.alias.default])
def _alias(func: OpOverload, args: _Args, kwargs: _Kwargs) -> NF4Tensor:
    return args[0].rebuild()


@implements([aten.clone.default])
def _clone(func: OpOverload, args: _Args, kwargs: _Kwargs) -> NF4Tensor:
    return args[0].rebuild(fn=torch.clone)


@implements([aten.t.default, aten.transpose.int, aten.permute.default])
def _transpose(func: OpOverload, args: _Args, kwargs: _Kwargs) -> NF4Tensor:
    self: NF4Tensor = args[0]
    if func is aten.permute.default and list(args[1]) != [1, 0]:
        raise NotImplementedError("NF4Tensor: only a 2-D transpose is supported")
    return self.rebuild(transposed=not self.transposed)


@implements([aten._to_copy.default])
def _to_copy(func: OpOverload, args: _Args, kwargs: _Kwargs) -> NF4Tensor:
    """``.to(device)`` moves the inner tensors; ``.to(float dtype)`` changes the compute dtype."""
    self: NF4Tensor = args[0]
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"NF4Tensor: cannot convert to {dtype} (its values are floats)")
    non_blocking = kwargs.get("non_blocking", False)
    move = (lambda t: t.to(device, non_blocking=non_blocking)) if device else None
    return self.rebuild(fn=move, dtype=dtype)


@implements([aten.copy_.default])
def _copy_(func: OpOverload, args: _Args, kwargs: _Kwargs) -> Tensor:
    """``dst.copy_(src)``: between two NF4 tensors of one layout (FSDP2 copies a shard into its
    buffer), or an NF4 weight's values into a float tensor."""
    dst, src = args[:2]
    if not isinstance(dst, NF4Tensor):
        return func(dst, src.dequantize(dst.dtype if dst.dtype.is_floating_point else None), **kwargs)
    if not isinstance(src, NF4Tensor):
        raise TypeError(
            "NF4Tensor does not support in-place copy_ of float values: the weight is stored in 4 bits. "
            "Quantize the source first (to_nf4), or dequantize the destination and work on the float copy")
    ours, theirs = dst.inner_tensors(), src.inner_tensors()
    if (dst.weight_shape, dst.block_size, ours.keys()) != (src.weight_shape, src.block_size, theirs.keys()):
        raise TypeError(
            f"NF4Tensor.copy_: the source ({src.weight_shape}, block {src.block_size}, {sorted(theirs)}) "
            f"is not laid out as the destination ({dst.weight_shape}, block {dst.block_size}, "
            f"{sorted(ours)}); dequantize both to copy values")
    for name, t in ours.items():
        t.copy_(theirs[name])
    return dst


@implements([aten.is_same_size.default])
def _is_same_size(func: OpOverload, args: _Args, kwargs: _Kwargs) -> bool:
    return bool(args[0].shape == args[1].shape)


def to_nf4(weight: Tensor, *, block_size: int = 64, double_quant: bool = True,
           dtype: torch.dtype | None = None) -> NF4Tensor:
    """``weight`` (out, in) as an :class:`NF4Tensor` (bitsandbytes' NF4, double-quantized by default)."""
    return NF4Tensor.from_float(weight, block_size=block_size, double_quant=double_quant, dtype=dtype)
