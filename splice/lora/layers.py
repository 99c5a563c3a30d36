"""LoRA as a rewrite rule: ``y = base(x) + scale * B(A(dropout(x)))``.

Each LoRA module here is an *around* rewriter ``f(x, y)``: the rewriter keeps the original module
as ``base`` and calls ``f`` with its input and output. Supported bases: ``nn.Linear`` (and
quantized linears that declare ``splice_kind = "linear"``), Hugging Face GPT-2 ``Conv1D``,
``nn.Embedding`` and ``nn.Conv2d``. Parameter layout and initialisation follow PEFT so adapters
move between the two: ``lora_A`` is Kaiming-uniform (a=sqrt(5)), ``lora_B`` zeros; embeddings use
``lora_embedding_A`` (zeros) and ``lora_embedding_B`` (normal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.family import is_conv1d
from splice.core.progress import progress
from splice.core.rewrite import Around, Node, innermost, rewrite, rewritten_nodes, unrewrite
from splice.core.targets import Targets, target_matcher
from splice.lora.routing import Route, check_rows, current_route, routed
from splice.kernels.dora import dora_linear
from splice.lora.dora import conv_delta, dora_extra, merged_weight, unmerged_weight, weight_norm
from splice.lora.init import from_weight, init_factors, init_name

__all__ = [
    "DoraConv2d",
    "DoraLinear",
    "LoraConfig",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "adapter_names",
    "adapters_disabled",
    "add_lora",
    "lora_modules",
    "merge",
    "unmerge",
    "use_adapters",
]


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
    # PEFT semantics: a key matches a module whose path ends with it (or equals it).
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


class LoraLayer(nn.Module):
    """Base of every LoRA rewriter: its hyper-parameters and whether it is merged into ``base``."""

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
            return route.bank.apply(self, x, y, route.slots)
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
            weight = base.weight.T if getattr(self, "fan_in_fan_out", False) else base.weight
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self._init_ab()

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
        device = base.weight.device
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding,
            dilation=base.dilation, bias=False, dtype=dtype, device=device,
        )
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=dtype, device=device)
        self._init_ab()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ab_forward(x, y)

    def delta_weight(self) -> Tensor:
        # (out, r, 1, 1) o (r, in, kh, kw) -> (out, in, kh, kw)
        b = self.lora_B.weight.flatten(1)
        return self.scale * torch.einsum("or,rikl->oikl", b, self.lora_A.weight)


def _build(node: Node, config: LoraConfig) -> LoraLayer:
    base = node.original
    weight = getattr(base, "weight", None)
    device = weight.device if isinstance(weight, Tensor) else None
    dtype = config.dtype or (weight.dtype if isinstance(weight, Tensor) else None)
    # Quantized bases (splice.quant) may hold no float weight: they name their device and dtype.
    device = getattr(base, "device", None) if device is None else device
    dtype = dtype or getattr(base, "compute_dtype", None)
    module = node.module
    while isinstance(module, Around):
        if isinstance(module.rewriter, LoraLayer) and module.rewriter.name == config.name:
            raise ValueError(
                f"{node.name!r} already has a LoRA adapter named {config.name!r}: give the new "
                "adapter another LoraConfig.name, or remove the old one (splice.unrewrite)"
            )
        module = module.base
    hyper = dict(rank=config.rank_for(node.name), alpha=config.alpha_for(node.name),
                 rslora=config.rslora, dtype=dtype, name=config.name)
    if from_weight(init_name(config.init)) and not (node.kind == "linear" or is_conv1d(base)):
        raise TypeError(
            f"LoraConfig.init={config.init!r} applies to linear layers only, not {node.name!r} "
            f"({type(base).__name__}), as in PEFT: narrow LoraConfig.targets or use init='default'"
        )
    if config.use_dora:
        return _build_dora(node, config, hyper, device)
    if is_conv1d(base):  # GPT-2: weight is (in, out)
        n_in, n_out = base.weight.shape
        return LoraLinear(n_in, n_out, dropout=config.dropout, fan_in_fan_out=True,
                          device=device, **hyper)
    if node.kind == "linear":
        return LoraLinear(base.in_features, base.out_features, dropout=config.dropout,
                          device=device, **hyper)
    if node.kind == "embedding":
        return LoraEmbedding(base, **hyper)
    if node.kind == "conv2d":
        return LoraConv2d(base, dropout=config.dropout, **hyper)
    raise TypeError(
        f"LoRA cannot adapt {node.name!r} of kind {node.kind!r} ({type(base).__name__}): "
        "supported are linear, GPT-2 Conv1D, embedding and conv2d; narrow LoraConfig.targets"
    )


def add_lora(model: nn.Module, config: LoraConfig | None = None) -> list[str]:
    """Wrap every targeted module of ``model`` with LoRA; returns the adapted module names.

    Raises when ``config.targets`` matches nothing, naming the kinds and modules the model has.
    With ``config.init`` PiSSA/OLoRA the targeted base weights are replaced by their residuals.
    """
    config = config or LoraConfig()
    matches = target_matcher(model, config.targets)
    names = rewrite(model, lambda node: _build(node, config) if matches(node) else None)
    method = init_name(config.init)
    if method != "default":
        _initialize(model, config.name, method, set(names))
    return names


def lora_modules(model: nn.Module, *, name: str | None = None) -> list[tuple[str, Around, LoraLayer]]:
    """(path, wrapper, LoRA layer) for every LoRA rewrite in ``model`` (of adapter ``name``, if
    given), found by type. Stacked adapters on one module give one entry each, outermost first.
    """
    found = []
    for node in rewritten_nodes(model):
        module = node.module
        while isinstance(module, Around):
            layer = module.rewriter
            if isinstance(layer, LoraLayer) and (name is None or layer.name == name):
                found.append((node.name, module, layer))
            module = module.base
    return found


def _require_lora(model: nn.Module) -> list[tuple[str, Around, LoraLayer]]:
    found = lora_modules(model)
    if not found:
        raise ValueError("the model has no LoRA modules: call splice.add_lora or load_adapter first")
    return found


def merge(model: nn.Module, *, unload: bool = False) -> list[str]:
    """Fold every LoRA delta into its base weight (merging twice changes nothing).

    With ``unload`` the LoRA wrappers are then removed, leaving plain modules holding the merged
    weights (ready for ``save_pretrained``). Returns the merged module names.
    """
    found = _require_lora(model)
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    tied = [name for name, wrapper, layer in found
            if not layer.merged and uses.get(id(getattr(innermost(wrapper), "weight", None)), 0) > 1]
    if tied:
        raise ValueError(
            f"cannot merge LoRA into {', '.join(tied)}: the weight is tied to another module "
            "(e.g. the output head shares the input embedding), which would change too. Keep "
            "that adapter unmerged, or untie the weights first"
        )
    for _, wrapper, layer in progress(found, desc="merging", unit="module"):
        layer.merge_into(innermost(wrapper))
    if unload:
        for _, _, layer in found:
            layer.merged = False  # the fold is now the base's own weight: nothing to undo
        unrewrite(model, layer=is_lora_wrapper)
    return list(dict.fromkeys(name for name, _, _ in found))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model inside the block (e.g. to compare base vs adapter).

    Only this thread's (or asyncio task's) calls are affected: see :mod:`splice.lora.routing`.
    """
    found = _require_lora(model)
    if any(layer.merged for _, _, layer in found):
        raise ValueError("adapters are merged into the weights: unmerge before disabling them")
    with routed((layer for _, _, layer in found), Route(disabled=True)):
        yield


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order first found."""
    return list(dict.fromkeys(layer.name for _, _, layer in lora_modules(model)))


@contextmanager
def use_adapters(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, batch row ``i`` runs with adapter ``rows[i]`` only (``None``: the base
    model), so one batch can mix several adapters (e.g. in :func:`splice.generation.generate.generate`).

    The routing is data of this call (a ContextVar, see :mod:`splice.lora.routing`): other threads
    using the same model at the same time keep their own. Each adapter computes only its rows.
    """
    found = _require_lora(model)
    known = {layer.name for _, _, layer in found}
    unknown = sorted({r for r in rows if r is not None} - known)
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}: the model has {sorted(known)}")
    if any(layer.merged for _, _, layer in found):
        raise ValueError("adapters are merged into the weights: unmerge before routing rows")
    with routed((layer for _, _, layer in found), Route(rows=tuple(rows))):
        yield


def is_lora_wrapper(module: nn.Module) -> bool:
    return isinstance(module, Around) and isinstance(module.rewriter, LoraLayer)


def unmerge(model: nn.Module) -> list[str]:
    """Subtract every merged LoRA delta from its base weight again."""
    found = _require_lora(model)
    for _, wrapper, layer in found:
        layer.unmerge_from(wrapper.base)
    return [name for name, _, _ in found]


# --- Variants (issue 18): DoRA layers and the initialisations from the base weight. -------------


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
        return self.__dict__["base_layer"].weight  # type: ignore[no-any-return]

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
            base.weight.copy_(merged_weight(base.weight, self.delta_weight(), self.factor(norm)))
        self.merged_norm = norm
        self.merged = True
        return True

    def unmerge_from(self, base: nn.Module) -> bool:
        if not self.merged or self.merged_norm is None:
            return False
        with torch.no_grad():
            base.weight.copy_(unmerged_weight(base.weight, self.delta_weight(), self.factor(self.merged_norm)))
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self._init_ab()
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                dilation=base.dilation, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, dtype=dtype, device=device)
        self._init_ab()
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


def _build_dora(node: Node, config: LoraConfig, hyper: dict, device: torch.device | None) -> LoraLayer:
    base = node.original
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(
            f"DoRA needs a float base weight at {node.name!r} ({type(base).__name__}): add the adapter "
            "before quantizing, or use plain LoRA (use_dora=False) on a quantized model"
        )
    if type(base).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        n_in, n_out = weight.shape
        return DoraLinear(base, n_in, n_out, dropout=config.dropout, fan_in_fan_out=True, device=device, **hyper)
    if node.kind == "linear":
        return DoraLinear(base, base.in_features, base.out_features, dropout=config.dropout, device=device, **hyper)
    if node.kind == "conv2d":
        return DoraConv2d(base, dropout=config.dropout, **hyper)
    raise TypeError(
        f"DoRA cannot adapt {node.name!r} of kind {node.kind!r} ({type(base).__name__}): supported are "
        "linear, GPT-2 Conv1D and conv2d; narrow LoraConfig.targets or set use_dora=False"
    )


def _initialize(model: nn.Module, name: str, method: str, paths: set[str]) -> None:
    """Re-initialise the new adapters ``name`` at ``paths`` by ``method`` (not "default").

    PiSSA/OLoRA set A and B from the base weight, replace it by the residual and keep ``A0``/``B0``
    as buffers ``initial_A``/``initial_B`` (for :func:`splice.lora.init.to_plain_lora` on save);
    a DoRA magnitude is then recomputed from the new weight (PEFT's order).
    """
    for path, wrapper, layer in lora_modules(model, name=name):
        if path not in paths:
            continue
        a_weight, b_weight = layer.lora_A.weight, layer.lora_B.weight
        with torch.no_grad():
            if method == "gaussian":
                nn.init.normal_(a_weight, std=1 / layer.rank)
                nn.init.zeros_(b_weight)
            else:
                base = innermost(wrapper)
                transposed = getattr(layer, "fan_in_fan_out", False)
                weight = base.weight.T if transposed else base.weight
                a, b, residual = init_factors(weight, rank=layer.rank, scale=layer.scale, method=method)
                a_weight.copy_(a)
                b_weight.copy_(b)
                weight.copy_(residual)
                layer.register_buffer("initial_A", a_weight.detach().clone(), persistent=False)
                layer.register_buffer("initial_B", b_weight.detach().clone(), persistent=False)
        layer.init = method
        if isinstance(layer, _DoraLayer):
            layer.reset_magnitude()
