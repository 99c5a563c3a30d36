"""DoRA layers (weight-decomposed LoRA): LoRA's ``B A`` plus a learned magnitude per output
channel, ``y = m * (W + s B A) x / ||W + s B A||`` (PEFT's ``lora_magnitude_vector``; the norm is
detached, as in PEFT). The maths lives in :mod:`splice.lora.dora`, the fused GPU node in
:mod:`splice.kernels.dora`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.rewrite import weight_of
from splice.kernels.dora import dora_linear
from splice.lora.dora import conv_delta, dora_extra, merged_weight, unmerged_weight, weight_norm
from splice.lora.layers import LoraLayer
from splice.lora.routing import current_route

__all__ = ["DoraConv2d", "DoraLinear"]


class _DoraLayer(LoraLayer):
    """What DoRA adds to a LoRA layer: ``lora_magnitude_vector`` and a (non-registered) reference
    to the base it wraps, whose weight the magnitude's normalisation reads (see splice.lora.dora)."""

    lora_magnitude_vector: nn.Parameter

    def _attach(self, base: nn.Module, shape: tuple[int, ...], dtype: torch.dtype | None,
                device: torch.device | None) -> None:
        self.__dict__["base_layer"] = base  # not a submodule: its parameters are the model's own
        self.lora_magnitude_vector = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        self.merged_norm: Tensor | None = None  # the norm a merge divided by, for unmerge
        self.reset_magnitude()

    @property
    def base_weight(self) -> Tensor:
        return self.__dict__["base_layer"].weight

    def weight_norm(self) -> Tensor:  # pragma: no cover - per layer kind
        raise NotImplementedError

    def factor(self, norm: Tensor) -> Tensor:
        """``g = m / norm``, shaped to broadcast over the stored weight."""
        raise NotImplementedError  # pragma: no cover

    def reset_magnitude(self) -> None:
        """``m = ||W + s B A||``: the adapter is a no-op until ``m``, ``A`` or ``B`` train (PEFT)."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def _dropping(self) -> bool:
        drop = self.dropout
        return isinstance(drop, nn.Dropout) and drop.training and drop.p > 0

    def merge_into(self, base: nn.Module) -> bool:
        """``W <- g (W + s B A)`` with ``g = m / ||W + s B A||``; the norm is kept for unmerge."""
        if self.merged:
            return False
        self._check_float(base)
        norm = self.weight_norm()
        with torch.no_grad():
            weight_of(base).copy_(merged_weight(weight_of(base), self.delta_weight(), self.factor(norm)))
        self.merged_norm = norm
        self.merged = True
        return True

    def unmerge_from(self, base: nn.Module) -> bool:
        if not self.merged or self.merged_norm is None:
            return False
        with torch.no_grad():
            weight_of(base).copy_(unmerged_weight(weight_of(base), self.delta_weight(),
                                                  self.factor(self.merged_norm)))
        self.merged_norm = None
        self.merged = False
        return True

    def _check_float(self, base: nn.Module) -> None:
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"cannot merge DoRA into a {type(base).__name__} (its weight is not a float tensor)")


class DoraLinear(_DoraLayer):
    """DoRA for ``nn.Linear`` and GPT-2 ``Conv1D``: LoRA's ``lora_A``/``lora_B`` plus
    ``lora_magnitude_vector`` (out,), PEFT's names. On a frozen float linear with matching
    dtypes (and no dropout in training) it runs the fused :func:`splice.kernels.dora.dora_linear`."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, *, rank: int, alpha: float,
                 rslora: bool = False, dropout: float = 0.0, fan_in_fan_out: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | None = None,
                 name: str = "default") -> None:
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, name=name)
        self.fan_in_fan_out = fan_in_fan_out
        self._linear_factors(in_features, out_features, dtype=dtype, device=device)
        self._attach(base, (out_features,), dtype, device)

    def _weight(self) -> Tensor:
        """The base weight as (out, in)."""
        return self.base_weight.T if self.fan_in_fan_out else self.base_weight

    def weight_norm(self) -> Tensor:
        return weight_norm(self._weight(), lora_a=self.lora_A.weight, lora_b=self.lora_B.weight, scale=self.scale)

    def factor(self, norm: Tensor) -> Tensor:
        g = self.lora_magnitude_vector.detach().float() / norm
        return g.view(1, -1) if self.fan_in_fan_out else g.view(-1, 1)

    def delta_weight(self) -> Tensor:
        delta = self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _fusable(self, x: Tensor, y: Tensor) -> bool:
        base = self.__dict__["base_layer"]
        weight, bias = self.base_weight, getattr(base, "bias", None)
        return (
            isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward
            and isinstance(x, Tensor) and isinstance(y, Tensor)
            and x.dtype == y.dtype == weight.dtype and weight.dtype.is_floating_point
            # the fused node gives the base no gradient: a frozen base, or no autograd at all
            and (not torch.is_grad_enabled() or not (weight.requires_grad or (bias is not None and bias.requires_grad)))
            and not self._dropping()
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        base = self.__dict__["base_layer"]
        if not self.merged and current_route(self) is None and self._fusable(x, y):
            return dora_linear(x, y, self.base_weight, base.bias, self.lora_A.weight, self.lora_B.weight,
                               self.lora_magnitude_vector, scale=self.scale)
        return self._routed(x, y, self._dora_delta)

    def _dora_delta(self, x: Tensor, y: Tensor) -> Tensor:
        """What DoRA adds to the base output ``y`` of ``x`` (PEFT's formula, unfused)."""
        base = self.__dict__["base_layer"]
        xa = x.to(self.lora_A.weight.dtype)
        factor = self.lora_magnitude_vector / self.weight_norm()
        if self._dropping():  # PEFT: the base part is taken on the dropped-out input too
            xa = self.dropout(xa)
            base_out = F.linear(xa, self._weight().to(xa.dtype))
        else:
            bias = getattr(base, "bias", None)
            base_out = y.to(xa.dtype) if bias is None else y.to(xa.dtype) - bias.to(xa.dtype)
        return dora_extra(base_out, self.lora_B(self.lora_A(xa)), factor, self.scale)


class DoraConv2d(_DoraLayer):
    """DoRA for ``nn.Conv2d``: LoRA's conv ``lora_A`` and 1x1 ``lora_B`` plus
    ``lora_magnitude_vector`` (1, out, 1, 1), PEFT's layout."""

    def __init__(self, base: nn.Conv2d, *, rank: int, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 dtype: torch.dtype | None = None, name: str = "default") -> None:
        if base.groups != 1:
            raise ValueError("DoRA on a grouped Conv2d is not supported (groups must be 1)")
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, name=name)
        device = base.weight.device
        self._conv_factors(base, dtype=dtype)
        self._attach(base, (1, base.out_channels, 1, 1), dtype, device)

    def delta_weight(self) -> Tensor:
        return self.scale * conv_delta(self.lora_A.weight, self.lora_B.weight, self.base_weight.shape)

    def weight_norm(self) -> Tensor:
        return weight_norm(self.base_weight, self.delta_weight().detach())

    def factor(self, norm: Tensor) -> Tensor:
        return (self.lora_magnitude_vector.detach().float() / norm).view(-1, 1, 1, 1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._routed(x, y, self._dora_delta)

    def _dora_delta(self, x: Tensor, y: Tensor) -> Tensor:
        """What DoRA adds to the base output ``y`` of ``x`` (PEFT's formula)."""
        base: nn.Conv2d = self.__dict__["base_layer"]
        xa = x.to(self.lora_A.weight.dtype)
        factor = self.lora_magnitude_vector / self.weight_norm()  # (1, out, 1, 1)
        if self._dropping():
            xa = self.dropout(xa)
            base_out = F.conv2d(xa, base.weight.to(xa.dtype), None, base.stride, base.padding, base.dilation)
        else:
            base_out = y.to(xa.dtype)
            if base.bias is not None:
                base_out = base_out - base.bias.to(xa.dtype).view(1, -1, 1, 1)
        return dora_extra(base_out, self.lora_B(self.lora_A(xa)), factor, self.scale)
