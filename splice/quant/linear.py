"""Weight-only quantization as a replace rewrite: int8 per-channel and 4-bit NF4 (QLoRA).

Both replacements declare ``splice_kind = "linear"``, so LoRA (an around rewrite) composes on top
of them, and gradients flow through them to the input (QLoRA). Their custom autograd function
saves only the compact weight and dequantizes again in backward, so no full-precision copy of
the weight outlives the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.family import is_conv1d
from splice.core.rewrite import Node, Replace, rewrite
from splice.core.targets import Targets, target_matcher

__all__ = ["Int8Linear", "NF4Linear", "quantize_int8", "quantize_nf4"]

# The 16 NF4 levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W)^T + b, saving only the quantized module (not the dequantized W)."""

    @staticmethod
    def forward(ctx, x: Tensor, module: _QuantLinear, bias: Tensor | None) -> Tensor:
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.module.dequantize(grad.dtype)  # (out, in)
        return grad @ weight, None, None


class _QuantLinear(nn.Module):
    splice_kind = "linear"
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def dequantize(self, dtype: torch.dtype) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantLinear.apply(x, self, bias)

    def restore(self) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (used by ``unrewrite``)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.bias.device if self.bias is not None else None)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _float_weight(module: nn.Module) -> Tensor:
    """(out, in) float weight of a linear or GPT-2 Conv1D (stored (in, out))."""
    weight = module.weight.detach()
    return weight.T if is_conv1d(module) else weight


def _bias(module: nn.Module) -> nn.Parameter | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)


class Int8Linear(_QuantLinear):
    """Weight-only int8, symmetric per output channel: ``W ~ q * scale[:, None]``, q in [-127, 127]."""

    def __init__(self, weight: Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = bias

    @classmethod
    def from_linear(cls, module: nn.Module) -> Int8Linear:
        return cls(_float_weight(module), _bias(module))

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return (self.qweight.to(dtype) * self.scale[:, None].to(dtype))


class NF4Linear(_QuantLinear):
    """4-bit NormalFloat (QLoRA): blocks of ``block_size`` weights share an absmax scale; each
    weight is the nearest of 16 levels, two 4-bit codes packed per byte.
    """

    def __init__(self, weight: Tensor, bias: nn.Parameter | None, *, block_size: int = 64) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        if block_size < 2 or block_size % 2:
            raise ValueError(f"NF4 block_size must be a positive even number, got {block_size}")
        flat = weight.float().reshape(-1)
        flat = F.pad(flat, (0, (-flat.numel()) % block_size))  # whole blocks (an even length)
        blocks = flat.reshape(-1, block_size)
        absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)  # (n_blocks,)
        levels = NF4_LEVELS.to(weight.device)
        normed = (blocks / absmax[:, None]).reshape(-1)
        codes = (normed[:, None] - levels[None, :]).abs().argmin(dim=1).to(torch.uint8)
        self.register_buffer("packed", (codes[0::2] << 4) | codes[1::2])  # (n/2,) uint8
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", levels)
        self.bias = bias

    @classmethod
    def from_linear(cls, module: nn.Module, *, block_size: int = 64) -> NF4Linear:
        return cls(_float_weight(module), _bias(module), block_size=block_size)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        codes = torch.stack(((self.packed >> 4) & 0xF, self.packed & 0xF), dim=1).reshape(-1)
        values = self.levels[codes.long()].reshape(-1, self.block_size) * self.absmax[:, None]
        n = self.out_features * self.in_features
        return values.reshape(-1)[:n].reshape(self.out_features, self.in_features).to(dtype)


def _quantize(model: nn.Module, targets: Targets, build, keep_original: bool) -> list[str]:  # type: ignore[no-untyped-def]
    matches = target_matcher(model, targets)

    def rule(node: Node) -> Replace | None:
        if not matches(node) or isinstance(node.module, _QuantLinear):
            return None
        if node.module is not node.original:
            raise ValueError(
                f"{node.name!r} is already rewritten ({type(node.module).__name__}): quantize "
                "before adding LoRA or other rewrites"
            )
        return Replace(build(node.module), keep_original=keep_original)

    return rewrite(model, rule)


def quantize_int8(model: nn.Module, *, targets: Targets = "all-linear", keep_original: bool = False) -> list[str]:
    """Replace targeted linears with :class:`Int8Linear`; returns their names.

    ``keep_original`` keeps the float modules so ``unrewrite`` restores them exactly (at the cost
    of their memory); otherwise unrewrite puts back a dequantized ``nn.Linear``.
    """
    return _quantize(model, targets, Int8Linear.from_linear, keep_original)


def quantize_nf4(
    model: nn.Module, *, targets: Targets = "all-linear", block_size: int = 64, keep_original: bool = False
) -> list[str]:
    """Replace targeted linears with 4-bit :class:`NF4Linear` (QLoRA's base); returns their names."""
    return _quantize(model, targets, lambda m: NF4Linear.from_linear(m, block_size=block_size),
                     keep_original)
