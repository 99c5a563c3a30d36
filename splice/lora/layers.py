"""LoRA layers: ``y = base(x) + scale * B(A(dropout(x)))``, each an *around* rewriter ``f(x, y)``.

The rewriter keeps the original module as ``base`` and calls the layer with its input and output.
Supported bases: ``nn.Linear`` (and quantized linears that declare ``splice_kind = "linear"``),
Hugging Face GPT-2 ``Conv1D``, ``nn.Embedding`` and ``nn.Conv2d``. Parameter layout and
initialisation follow PEFT so adapters move between the two: ``lora_A`` is Kaiming-uniform
(a=sqrt(5)), ``lora_B`` zeros; embeddings use ``lora_embedding_A`` (zeros) and
``lora_embedding_B`` (normal). Which batch rows a layer applies to is per call
(:mod:`splice.lora.routing`); :mod:`splice.lora.apply` attaches, merges and routes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.rewrite import Around, weight_of
from splice.core.targets import Targets
from splice.lora.init import init_name
from splice.lora.routing import check_rows, current_route

__all__ = ["LoraConfig", "LoraConv2d", "LoraEmbedding", "LoraLayer", "LoraLinear", "is_lora_wrapper"]


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """What to adapt and how.

    ``targets``: a list of module names (exact path or dotted suffix, e.g. ``"q_proj"``), a regex
    string (matched in full against the path, as PEFT does), ``"all-linear"`` (every linear but
    the output head), or a predicate on the :class:`~splice.core.rewrite.Node`.
    ``scale = alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora``.
    ``dtype``: the adapter weights' dtype (PEFT keeps them in float32 whatever the base).
    ``name``: several adapters may sit on one model (stacked on the same modules); each has a
    name, used to save, load and route rows to adapters (:func:`use_adapters`).
    ``use_dora``: DoRA (a learned magnitude per output channel, :mod:`splice.lora.dora`).
    ``init``: ``"default"`` (A Kaiming-uniform, B zeros), ``"gaussian"``, ``"pissa"``,
    ``"pissa_niter_N"`` or ``"olora"`` (from the base weight, which keeps the residual:
    :mod:`splice.lora.init`); PEFT's ``init_lora_weights`` values are accepted too.
    """

    name: str = "default"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Targets = ("q_proj", "v_proj")
    rslora: bool = False
    dtype: torch.dtype | None = torch.float32
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Variants (issue 18): DoRA and the initialisations (PEFT: use_dora, init_lora_weights).
    use_dora: bool = False
    init: str | bool = "default"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        init_name(self.init)  # raises on an unknown initialisation, naming the valid ones

    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.rank)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.alpha)


def _pattern_value(pattern: dict, name: str, default):  # type: ignore[no-untyped-def]
    # PEFT's rule (peft.utils.other.get_pattern_key): the first key that, as a regex, matches the
    # whole path or a dotted suffix of it ("q_proj", r"layers\.0\..*_proj", a full path).
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pair(value: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's (h, w) parameter, typed as the constructor takes it."""
    return (value[0], value[1])


def _padding(value: str | tuple[int, ...]) -> str | tuple[int, int]:
    return value if isinstance(value, str) else _pair(value)


class LoraLayer(nn.Module):
    """Base of every LoRA rewriter: its hyper-parameters and whether it is merged into ``base``."""

    # Set by the layer kinds that have them: linears (nn.Linear) and convolutions (nn.Conv2d).
    lora_A: nn.Linear | nn.Conv2d
    lora_B: nn.Linear | nn.Conv2d
    dropout: nn.Module
    init: str  # the initialisation the adapter started from (default, pissa, olora, ...)

    def __init__(self, *, rank: int, alpha: float, rslora: bool, dropout: float,
                 name: str = "default") -> None:
        super().__init__()
        self.name = name
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.dropout_p = dropout
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False

    def _linear_factors(self, in_features: int, out_features: int, *, dtype: torch.dtype | None,
                        device: torch.device | None) -> None:
        """``lora_A`` (r, in), ``lora_B`` (out, r) and the dropout of a linear adapter, PEFT-initialised."""
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, self.rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(self.rank, out_features, bias=False, dtype=dtype, device=device)
        self._init_ab()

    def _conv_factors(self, base: nn.Conv2d, *, dtype: torch.dtype | None) -> None:
        """A conv ``lora_A`` with the base's kernel, a 1x1 ``lora_B`` (PEFT's layout), the dropout."""
        device = base.weight.device
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.lora_A = nn.Conv2d(base.in_channels, self.rank, _pair(base.kernel_size), _pair(base.stride),
                                _padding(base.padding), dilation=_pair(base.dilation), bias=False,
                                dtype=dtype, device=device)
        self.lora_B = nn.Conv2d(self.rank, base.out_channels, 1, bias=False, dtype=dtype, device=device)
        self._init_ab()

    def _init_ab(self) -> None:
        """PEFT's init: A Kaiming-uniform (a=sqrt(5)), B zeros, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _ab_forward(self, x: Tensor, y: Tensor) -> Tensor:
        """``y + scale * B(A(dropout(x)))`` for the layers whose A and B are modules."""
        return self._routed(x, y, self._ab_delta)

    def _ab_delta(self, x: Tensor, y: Tensor) -> Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def _routed(self, x: Tensor, y: Tensor, delta: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``y + delta(x, y)`` on the batch rows this call routes to this adapter (all rows when the
        call has no routing; see :mod:`splice.lora.routing`), ``y`` on the others."""
        if self.merged:
            return y
        route = current_route(self)
        if route is None:
            return y + delta(x, y).to(y.dtype)
        if route.disabled:
            return y
        if route.bank is not None and route.bank.covers(self):
            return route.bank.apply(self, x, y, route.slots, memo=route.memo)
        check_rows(route, x.shape[0], where=f"LoRA adapter {self.name!r}")
        index = route.row_index(self.name, y.device)
        if index is None:
            return y + delta(x, y).to(y.dtype)
        if index.numel() == 0:
            return y
        rows = delta(x.index_select(0, index), y.index_select(0, index))
        return y.index_add(0, index, rows.to(y.dtype))

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fold(self, base: nn.Module, sign: float) -> None:
        weight = base.weight
        if (not isinstance(weight, Tensor) or not weight.is_floating_point()
                or getattr(type(base), "splice_quantized", False)):
            raise TypeError(
                f"cannot merge LoRA into a {type(base).__name__} (its weight is not a float "
                "tensor, e.g. quantized): merge into a float copy of the base model instead"
            )
        with torch.no_grad():
            weight.add_(self.delta_weight().to(weight.dtype), alpha=sign)

    def merge_into(self, base: nn.Module) -> bool:
        """Fold ``scale * B @ A`` into ``base.weight``; False (a no-op) if already merged."""
        if self.merged:
            return False
        self._fold(base, 1.0)
        self.merged = True
        return True

    def unmerge_from(self, base: nn.Module) -> bool:
        if not self.merged:
            return False
        self._fold(base, -1.0)
        self.merged = False
        return True

    def restore(self, base: nn.Module) -> None:
        """Called by ``unrewrite``: leave the base exactly as it was before LoRA."""
        self.unmerge_from(base)
        initial_a, initial_b = getattr(self, "initial_A", None), getattr(self, "initial_B", None)
        if isinstance(initial_a, Tensor) and isinstance(initial_b, Tensor):  # PiSSA/OLoRA: W = W_res + s B0 A0
            initial = self.scale * (initial_b.float() @ initial_a.float())
            weight = weight_of(base).T if getattr(self, "fan_in_fan_out", False) else weight_of(base)
            with torch.no_grad():
                weight.copy_((weight.float() + initial).to(weight.dtype))


class LoraLinear(LoraLayer):
    """LoRA for ``nn.Linear`` and GPT-2 ``Conv1D`` (``fan_in_fan_out``: weight stored (in, out))."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        name: str = "default",
    ) -> None:
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, name=name)
        self.fan_in_fan_out = fan_in_fan_out
        self._linear_factors(in_features, out_features, dtype=dtype, device=device)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        # base(x) + scale * B(A(dropout(x))), with y = base(x) computed by the Around wrapper
        return self._ab_forward(x, y)

    def delta_weight(self) -> Tensor:
        delta = self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta


class LoraEmbedding(LoraLayer):
    """LoRA for ``nn.Embedding``: ``y + scale * onehot(x) @ A^T @ B^T`` (PEFT's layout)."""

    def __init__(
        self,
        base: nn.Embedding,
        *,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
        name: str = "default",
    ) -> None:
        # PEFT applies no dropout to embedding adapters.
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=0.0, name=name)
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        device = base.weight.device
        # (rank, num_embeddings) and (embedding_dim, rank), as PEFT stores them.
        self.lora_embedding_A = nn.Parameter(
            torch.zeros(rank, base.num_embeddings, dtype=dtype, device=device)
        )
        self.lora_embedding_B = nn.Parameter(
            torch.randn(base.embedding_dim, rank, dtype=dtype, device=device)
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._routed(x, y, self._embedding_delta)

    def _embedding_delta(self, x: Tensor, y: Tensor) -> Tensor:
        after_a = F.embedding(x, self.lora_embedding_A.T, padding_idx=self.padding_idx)
        return self.scale * (after_a @ self.lora_embedding_B.T)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_embedding_B @ self.lora_embedding_A).T  # (num, dim)


class LoraConv2d(LoraLayer):
    """LoRA for ``nn.Conv2d``: A is a conv with the base's kernel, B a 1x1 conv (PEFT's layout)."""

    def __init__(
        self,
        base: nn.Conv2d,
        *,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        name: str = "default",
    ) -> None:
        if base.groups != 1:
            raise ValueError("LoRA on a grouped Conv2d is not supported (groups must be 1)")
        super().__init__(rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, name=name)
        self._conv_factors(base, dtype=dtype)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ab_forward(x, y)

    def delta_weight(self) -> Tensor:
        # (out, r, 1, 1) o (r, in, kh, kw) -> (out, in, kh, kw)
        b = self.lora_B.weight.flatten(1)
        return self.scale * torch.einsum("or,rikl->oikl", b, self.lora_A.weight)


def is_lora_wrapper(module: nn.Module) -> bool:
    return isinstance(module, Around) and isinstance(module.rewriter, LoraLayer)
