"""Weight-only quantization as a replace rewrite: int8 per-channel and 4-bit NF4 (QLoRA).

Both replacements are linears to the rewriter (``kind_of`` gives ``"linear"``), so LoRA (an around
rewrite) composes on top of them, in either order: quantize then ``add_lora``, or ``add_lora``
then quantize (the base inside each LoRA wrapper is replaced, the adapter kept). Both expose
``device`` and ``compute_dtype``, which LoRA reads to put its adapters beside the base weight.

* :class:`NF4Linear` is an ``nn.Linear`` whose ``weight`` is a frozen
  :class:`~splice.quant.nf4.NF4Tensor` (bitsandbytes' NF4, double-quantized absmax). Its forward
  is ``nn.Linear``'s own: ``F.linear`` over the NF4Tensor dequantizes in one Triton pass and calls
  cuBLAS, and the fused LoRA kernels (:mod:`splice.fused.modules`) take it like a bf16 base.
* :class:`Int8Linear`: int8 per output channel, dequantized in PyTorch by a custom autograd
  function that saves only the int8 weight.

Neither keeps a full-precision weight alive after its matmul (forward or backward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.rewrite import Around, Node, Replace, nodes, rewrite
from splice.core.targets import Targets, target_matcher
from splice.quant.nf4 import NF4Tensor

__all__ = ["Int8Linear", "NF4Linear", "is_quantized", "quantize_int8", "quantize_nf4"]


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of this module's quantized linears."""
    return getattr(type(module), "splice_quantized", False)


def _float_weight(module: nn.Module) -> Tensor:
    """(out, in) float weight of a linear or GPT-2 Conv1D (stored (in, out))."""
    weight: Tensor = module.weight.detach()  # type: ignore[operator]
    return weight.T if type(module).__name__ == "Conv1D" else weight


def _bias(module: nn.Module) -> nn.Parameter | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


def _restore_linear(module: nn.Module, weight: Tensor) -> nn.Linear:
    """A float ``nn.Linear`` holding ``weight`` (out, in) and ``module``'s bias."""
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


class NF4Linear(nn.Linear):
    """``nn.Linear`` over a frozen 4-bit :class:`NF4Tensor` weight (QLoRA's base layer)."""

    splice_quantized = True

    def __init__(self, weight: NF4Tensor, bias: nn.Parameter | None) -> None:
        out_features, in_features = weight.weight_shape
        super().__init__(in_features, out_features, bias=False, device="meta")  # no float weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias  # type: ignore[assignment]

    @classmethod
    def from_linear(cls, module: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                    dtype: torch.dtype | None = None) -> NF4Linear:
        nf4 = NF4Tensor.from_float(_float_weight(module), block_size=block_size,
                                   double_quant=double_quant, dtype=dtype)
        return cls(nf4, _bias(module))

    @property
    def nf4(self) -> NF4Tensor:
        return self.weight  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float (out, in) weight (a new tensor)."""
        return self.nf4.dequantize(dtype)

    def restore(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (used by ``unrewrite``)."""
        return _restore_linear(self, self.dequantize())

    def extra_repr(self) -> str:
        w = self.nf4
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block_size={w.block_size}, double_quant={w.double_quant}")


class _Int8LinearFn(torch.autograd.Function):
    """y = x @ dequant(W)^T + b, saving only the int8 module (never the dequantized W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: Int8Linear, bias: Tensor | None) -> Tensor:
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        weight = ctx.module.dequantize(grad.dtype)  # (out, in)
        return grad @ weight, None, None


class Int8Linear(nn.Module):
    """Weight-only int8, symmetric per output channel: ``W ~ q * scale[:, None]``, q in [-127, 127]."""

    splice_kind = "linear"
    splice_quantized = True

    def __init__(self, weight: Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, module: nn.Module) -> Int8Linear:
        return cls(_float_weight(module), _bias(module))

    qweight: Tensor
    scale: Tensor

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.weight_dtype
        return self.qweight.to(dtype) * self.scale[:, None].to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Int8LinearFn.apply(x, self, bias)

    def restore(self) -> nn.Linear:
        return _restore_linear(self, self.dequantize())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _quantizable(module: nn.Module, min_numel: int) -> str | None:
    """Why ``module`` cannot be quantized (None: it can)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return "no 2-D weight"
    if not weight.is_floating_point():
        return f"weight is {weight.dtype}, not float"
    if weight.is_meta:
        return "weight is on the meta device (not loaded)"
    if weight.numel() < min_numel:
        return f"{weight.numel()} weights, fewer than one block of {min_numel}"
    return None


def _quantize(model: nn.Module, targets: Targets, build: Callable[[nn.Module], nn.Module],
              keep_original: bool, min_numel: int) -> list[str]:
    """Replace every targeted float linear by ``build(linear)``; a linear already wrapped by LoRA
    (or another around rewrite) has its innermost base replaced inside the wrapper."""
    matches = target_matcher(model, targets)
    skipped: list[str] = []
    seen: list[str] = []  # targeted nodes, quantized already or not

    def leaf(module: nn.Module, name: str) -> Replace | None:
        seen.append(name)
        if is_quantized(module):
            return None
        reason = _quantizable(module, min_numel)
        if reason is not None:
            skipped.append(f"{name} ({reason})")
            return None
        return Replace(build(module), keep_original=keep_original)

    def rule(node: Node) -> Replace | None:
        if not matches(node) or isinstance(node.module, Around):
            return None
        if node.module is not node.original:
            raise ValueError(
                f"{node.name!r} is already replaced by {type(node.module).__name__}: undo that "
                "rewrite (splice.unrewrite) before quantizing it"
            )
        return leaf(node.module, node.name)

    names = rewrite(model, rule, allow_empty=True)
    for node in list(_wrapped(model)):
        if not matches(node):
            continue
        wrapper = node.module
        while isinstance(wrapper.base, Around):  # stacked adapters: down to the innermost base
            wrapper = wrapper.base
        def inner(n: Node, w: nn.Module = wrapper, path: str = node.name) -> Replace | None:
            return leaf(n.module, path) if n.module is w.base else None

        replaced = rewrite(wrapper, inner, allow_empty=True)
        if replaced:
            names.append(node.name)
    if skipped:
        warnings.warn("left unquantized: " + "; ".join(skipped), stacklevel=3)
    if not seen:
        rewrite(model, lambda node: None)  # raises NothingMatchedError, listing the model's kinds
    return names


def _wrapped(model: nn.Module) -> list[Node]:
    return [node for node in nodes(model) if isinstance(node.module, Around)]


def quantize_int8(model: nn.Module, *, targets: Targets = "all-linear", keep_original: bool = False) -> list[str]:
    """Replace targeted linears with :class:`Int8Linear`; returns their names.

    ``keep_original`` keeps the float modules so ``unrewrite`` restores them exactly (at the cost
    of their memory); otherwise unrewrite puts back a dequantized ``nn.Linear``.
    """
    return _quantize(model, targets, Int8Linear.from_linear, keep_original, min_numel=1)


def quantize_nf4(
    model: nn.Module,
    *,
    targets: Targets = "all-linear",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    keep_original: bool = False,
) -> list[str]:
    """Replace targeted linears with 4-bit :class:`NF4Linear` (QLoRA's base); returns their names.

    bitsandbytes' NF4: blocks of ``block_size`` weights, absmax double-quantized (8-bit, blocks
    of 256) unless ``double_quant=False``. ``compute_dtype``: the dtype the weight dequantizes to
    (default: the float weight's own). Quantization runs where each weight is (quantize on the
    GPU: it is fast there). A linear with fewer weights than one block is left as it is, and a
    warning names it.
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"quantize_nf4: block_size must be a positive even number, got {block_size}")
    return _quantize(model, targets, lambda m: NF4Linear.from_linear(
        m, block_size=block_size, double_quant=double_quant, dtype=compute_dtype), keep_original,
        min_numel=block_size)
