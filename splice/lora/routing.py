"""Per-call adapter routing: which adapter each batch row runs with is data passed with the call.

A :class:`Route` says, for one call, how a model's LoRA layers behave: ``rows[i]`` names the
adapter batch row ``i`` runs with (``None``: the base model), or ``disabled`` runs every row as
the base model. Routes live in a :class:`~contextvars.ContextVar` keyed by the LoRA layer, set by
:func:`routed` for the duration of a block (``splice.lora.apply.use_adapters`` and
``adapters_disabled`` are built on it), so two threads (or two asyncio tasks) calling one model at
once each see their own routing, and nothing is stored on the modules.

A route may also carry a *bank* (see :mod:`splice.lora.bank`): the adapters of each adapted module
packed into one tensor per module plus a per-row slot index, so one kernel launch applies every
row's own adapter (:mod:`splice.kernels.multi_lora`) instead of one pass per adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

_T = TypeVar("_T")

__all__ = ["Route", "current_route", "current_routes", "routed"]


@dataclass(frozen=True, eq=False, kw_only=True)
class Route:
    """The routing of one call. ``rows``: per-row adapter name (``None`` entries: base model);
    ``rows=None`` with ``disabled=False`` means every adapter applies to every row.

    ``bank`` and ``slots`` (optional): a packed adapter bank (an object with
    ``apply(layer, x, y, slots) -> Tensor``) and the (B,) int32 slot of each row (-1: base), used
    instead of per-adapter passes where the bank covers the layer.
    """

    rows: tuple[str | None, ...] | None = None
    disabled: bool = False
    bank: Any = None
    slots: Tensor | None = None
    # Per-call caches (row indices per (adapter, device); what memo() keeps); live and die with this route.
    _index: dict[tuple[str, torch.device], Tensor] = field(default_factory=dict, repr=False)
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: Hashable, make: Callable[[], _T]) -> _T:
        """``make()``, computed once for ``key`` in this route's call: what every layer of the call would
        otherwise derive again from the same routing (the bank's tile plan of ``slots``)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def row_index(self, name: str, device: torch.device) -> Tensor | None:
        """(n,) int64 indices of the rows running adapter ``name``; None when that is every row."""
        if self.rows is None:
            return None
        key = (name, device)
        if key not in self._index:
            picked = [i for i, row in enumerate(self.rows) if row == name]
            self._index[key] = torch.tensor(picked, dtype=torch.long, device=device)
        index = self._index[key]
        return None if index.numel() == len(self.rows) else index


# id(LoRA layer) -> its route for the current call. Immutable mappings: a nested block builds a
# new one, so an outer block (or another thread's context) never sees the change.
_ROUTES: ContextVar[Mapping[int, Route]] = ContextVar("splice_lora_routes", default=MappingProxyType({}))


def current_route(layer: nn.Module) -> Route | None:
    """The route of ``layer`` in the current call, or None (the layer applies to every row)."""
    return _ROUTES.get().get(id(layer))


def current_routes() -> Mapping[int, Route]:
    """Every route of the current call (one immutable mapping for the whole of a :func:`routed` block): a
    CUDA graph captured under one such mapping computes what it did then, whatever the routes are later."""
    return _ROUTES.get()


@contextmanager
def routed(layers: Iterable[nn.Module], route: Route) -> Iterator[Route]:
    """Inside the block, ``layers`` follow ``route`` (in this thread / task only)."""
    routes = dict(_ROUTES.get())
    for layer in layers:
        routes[id(layer)] = route
    token = _ROUTES.set(MappingProxyType(routes))
    try:
        yield route
    finally:
        _ROUTES.reset(token)


def check_rows(route: Route, batch: int, *, where: str) -> None:
    """Fail clearly when a call's batch size differs from the number of routed rows."""
    if route.rows is not None and batch != len(route.rows):
        raise ValueError(
            f"{where}: the batch has {batch} rows but the adapter routing names {len(route.rows)}: "
            "give use_adapters one adapter name per batch row"
        )

