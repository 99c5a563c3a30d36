"""An adapter bank: many LoRA adapters packed per module into device slots, applied per row.

For each adapted linear module (``path``, input ``K``, output ``N``) the bank holds
``A: (S, R, K)`` and ``B: (S, N, R)`` (ranks zero-padded to ``R``, ``scale`` folded into B), one
slot per resident adapter. A call routed with ``Route(bank=bank, slots=...)`` (see
:mod:`splice.lora.routing`) adds ``B[slot] A[slot] x`` per batch row or token through
:mod:`splice.kernels.multi_lora`: a shrink and an expand launch per projection whatever the mix of
adapters, ranks and targets (an adapter that does not target a module has zeros in its slot).
Sibling projections of one input (q/k/v, gate/up: :data:`SHARED_INPUT`) keep their A side by side, (S, G,
R, K) (:mod:`splice.lora.bank_groups`): the first one called shrinks for all, its siblings only expand. A caller
that runs the group's bases as one GEMM adds their deltas with :func:`add_packed_delta` (one shrink, one expand;
B in the same order); handed the GEMM not yet run, it queues the shrink first (with ``overlap_shrink`` on a side
stream, beside the GEMM).

DoRA too: with frozen weights DoRA's factor ``g = m / ||W + s B A||`` (N,) (PEFT's fp32 row norms) is a
constant, computed once from the served weights; the module gives ``g (y + delta) + (1 - g) bias`` (``y =
W x + bias``). A group a resident DoRA adapter adapts gets a factor and a shift (S, N_1 + .. + N_G) fp32
(ones and zeros in other slots) that the expand applies in its pass over ``y``: a bank without DoRA runs
as before, and a mixed batch (DoRA, LoRA of any rank, base rows) is one shrink and one expand a projection.

Two ways in: :meth:`LoraBank.from_model` packs the linear LoRA and DoRA layers already on a model
(what ``splice.generate`` uses for mixed batches), and :func:`add_bank_sites` + :meth:`put` serve
adapters kept in host memory (:class:`HostAdapter`), moved into a slot on demand with the least
recently used resident adapter evicted (what ``splice serve`` uses).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from splice.core.device import to_device
from splice.core.rewrite import Around, rewrite
from splice.kernels import use_triton
from splice.kernels.lora_swiglu import multi_lora_expand_swiglu
from splice.kernels.multi_lora import (
    Shrunk,
    Tiles,
    multi_lora,
    multi_lora_expand,
    multi_lora_shrink,
    pad_rank,
    plan_tiles,
    tiles_for,
)
from splice.kernels.swiglu import swiglu_packed
from splice.lora import adapter_file
from splice.lora.adapter_file import base_shape
from splice.lora.apply import lora_modules, use_adapters
from splice.lora.bank_groups import SHARED_INPUT, Group, shared_input_groups
from splice.lora.dora_layers import DoraLinear
from splice.lora.host_adapter import HostAdapter, read_adapter, read_bank_file
from splice.lora.layers import LoraLinear
from splice.lora.routing import Route, current_route, routed

__all__ = ["SHARED_INPUT", "BankSite", "HostAdapter", "LoraBank", "add_bank_sites", "add_packed_delta", "bank_holds",
           "bank_site", "read_adapter", "read_bank_file", "rescales_output", "shared_input_groups", "use_adapter_bank"]


class BankSite(nn.Module):
    """An around-rewriter ``y -> y + bank delta`` on a module the bank covers (see module doc)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        route = current_route(self)
        if route is None or route.bank is None or not route.bank.covers(self):
            return y
        return route.bank.apply(self, x, y, route.slots, memo=route.memo)


def bank_site(module: nn.Module) -> BankSite | None:
    """The :class:`BankSite` that :func:`add_bank_sites` put around ``module`` (``Around(linear, site)``)."""
    rewriter = module.rewriter if isinstance(module, Around) else None
    return rewriter if isinstance(rewriter, BankSite) else None


def add_packed_delta(modules: Sequence[nn.Module], x: Tensor, y: Tensor | Callable[[], Tensor], *,
                     swiglu: bool = False) -> Tensor:
    """For a caller that ran the linears under ``modules`` as one GEMM over ``x`` (``y``: their outputs
    side by side, in this order): adds in place what each module's :class:`BankSite` would have added
    under the current route (one shrink and one expand for a bank group; see
    :meth:`LoraBank.apply_packed`). Modules without a site add nothing. ``swiglu`` (a gate/up pair): returns
    ``silu(gate) * up`` of the sum instead, the expand fused into it where the kernels run. ``y`` may be the GEMM
    not yet run (a function): the shrink, which reads ``x`` alone, is then queued first (see ``overlap_shrink``)."""
    sites = [bank_site(m) for m in modules]
    first = next((site for site in sites if site is not None), None)
    route = current_route(first) if first is not None else None
    if route is None or route.bank is None:
        out = y() if callable(y) else y
        return swiglu_packed(out) if swiglu else out
    appliers = [m if site is None else site for m, site in zip(modules, sites, strict=True)]
    return route.bank.apply_packed(appliers, x, y, route.slots, widths=[_linear_shape(m)[1] for m in modules],
                                   memo=route.memo, swiglu=swiglu)


def rescales_output(module: nn.Module) -> bool:
    """Whether the routed bank scales ``module``'s whole output by a DoRA factor (a caller then adds
    nothing, a residual included, to that output before :func:`add_packed_delta`)."""
    route = current_route(site) if (site := bank_site(module)) is not None else None
    return route is not None and route.bank is not None and site.path in route.bank._rescaled  # type: ignore[union-attr]


def add_bank_sites(model: nn.Module, paths: Collection[str]) -> dict[str, BankSite]:
    """Wrap the linear modules at ``paths`` with :class:`BankSite`; returns them by path."""
    wanted = set(paths)
    missing = wanted - {name for name, _ in model.named_modules()}
    if missing:
        raise ValueError(f"the adapter names modules the model does not have: {sorted(missing)[:4]}")
    sites: dict[str, BankSite] = {}

    def rule(node):  # type: ignore[no-untyped-def]
        if node.name in wanted and node.kind == "linear":
            sites[node.name] = BankSite(node.name)
            return sites[node.name]
        return None

    rewrite(model, rule)
    return sites


@dataclass(frozen=True, eq=False)
class _LastShrink:
    """The last group shrink of this context (thread / task), made by the group's first member (which
    always shrinks anew). A later member reuses it when it sees the same input and slots objects,
    unchanged (their version counters, outside inference mode)."""

    group: Group
    x: weakref.ReferenceType[Tensor]
    slots: weakref.ReferenceType[Tensor]
    versions: tuple[int, int, bool]
    shrunk: Shrunk

    def fits(self, group: Group, x: Tensor, slots: Tensor) -> bool:
        return (self.group is group and self.x() is x and self.slots() is slots
                and self.versions == _versions(x, slots))


def _versions(x: Tensor, slots: Tensor) -> tuple[int, int, bool]:
    # Inference tensors keep no version counter: there the objects alone identify the input. A shrink
    # made outside a CUDA graph capture is not reused inside one (the graph would miss its launch).
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    return (-1 if x.is_inference() else x._version, -1 if slots.is_inference() else slots._version, capturing)


_LAST_SHRINK: ContextVar[_LastShrink | None] = ContextVar("splice_bank_last_shrink", default=None)

Memo = Callable[[Hashable, Callable[[], tuple[Tensor, Tensor]]], tuple[Tensor, Tensor]]  # a call's Route.memo (slots, plan)


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    """(K, N) of the linear under ``module``'s wrappers."""
    shape = base_shape(module)
    if shape is None:
        raise TypeError(f"{type(module).__name__} is not a linear module: an adapter bank holds linear LoRA only")
    return shape


class LoraBank:
    """Device slots for up to ``capacity`` adapters over the linear modules ``shapes`` (path ->
    (K, N)), rank padded to ``pad_rank(rank)``. ``appliers``: module -> path, the one module per
    path whose forward adds the delta; ``skippers``: other LoRA layers on those paths (their delta
    is already in the bank). DoRA factors and shifts: see the module doc."""

    def __init__(self, shapes: dict[str, tuple[int, int]], *, capacity: int, rank: int,
                 device: torch.device, dtype: torch.dtype,
                 appliers: dict[nn.Module, str], skippers: Iterable[nn.Module] = ()) -> None:
        if capacity < 1:
            raise ValueError(f"an adapter bank needs capacity >= 1, got {capacity}")
        self.capacity, self.rank, self.device, self.dtype = capacity, pad_rank(rank), device, dtype
        # path -> (its group's storage, its index there): every path is in a group, alone or with siblings
        self._groups: dict[str, tuple[Group, int]] = {}
        grouped = shared_input_groups(shapes)
        singles = [(p,) for p in shapes if not any(p in g for g in grouped)]
        for paths in (*grouped, *singles):
            group = Group.zeros(paths, shapes, capacity=capacity, rank=self.rank, device=device, dtype=dtype)
            self._groups.update({path: (group, i) for i, path in enumerate(paths)})
        self.a = {p: self._groups[p][0].a_of(self._groups[p][1]) for p in shapes}  # (S, R, K) views
        self.b = {p: self._groups[p][0].b_of(self._groups[p][1]) for p in shapes}  # (S, N, R) views
        self.kernels: bool | None = None  # the Triton kernels: None = on for CUDA (or the Triton interpreter)
        # A group's shrink, queued before a GEMM handed over unrun, on a side stream beside it: off until a GPU
        # run has timed it (benchmarks/serve.py --offline-overlap-shrink off,on)
        self.overlap_shrink = False
        self._apply = {id(m): p for m, p in appliers.items()}
        self._skip = {id(m) for m in skippers}
        # DoRA: group -> (factor, shift) (S, N_1 + .. + N_G) fp32, made when a DoRA adapter first adapts the group
        self._affine: dict[Group, tuple[Tensor, Tensor]] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self._targets: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # resident -> its paths, DoRA ones
        self._live: set[str] = set()  # paths some resident adapter adapts (others are skipped)
        self._rescaled: set[str] = set()  # paths some resident adapter adapts with DoRA (others: no affine)
        self.version = 0  # bumped when _live/_rescaled change: a captured CUDA graph knows what runs
        self.loads = self.evictions = 0  # adapters copied in / pushed out so far (monitoring)

    @property
    def nbytes(self) -> int:  # views: each slice counted once
        return sum(t.nbytes for t in (*self.a.values(), *self.b.values(), *(t for p in self._affine.values() for t in p)))

    def covers(self, module: nn.Module) -> bool:
        return id(module) in self._apply or id(module) in self._skip

    def put(self, adapter: HostAdapter, *, keep: Collection[str] = ()) -> int:
        """Make ``adapter`` resident (a no-op if it is); evicts the least recently used adapter
        not in ``keep``. Returns its slot. Raises when every slot is kept or the rank is too big."""
        if adapter.name in self.resident:
            self.resident.move_to_end(adapter.name)
            return self.resident[adapter.name]
        self._check_fits(adapter)
        if len(self.resident) < self.capacity:
            slot = min(set(range(self.capacity)) - set(self.resident.values()))
        else:
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                raise RuntimeError("every adapter slot is in use by the running batch")
            slot = self.resident.pop(victim)
            self.evictions += 1
            self._set_targets(victim, None)
        with torch.no_grad():
            for path in self.a:
                self.a[path][slot].zero_()
                self.b[path][slot].zero_()
            for factor, shift in self._affine.values():  # a DoRA adapter's factors leave with it
                factor[slot].fill_(1)
                shift[slot].zero_()
            for path, (a, b) in adapter.weights.items():
                self.a[path][slot, : a.shape[0]].copy_(a)
                self.b[path][slot, :, : b.shape[1]].copy_(b)
            for path, values in adapter.dora.items():
                for store, value in zip(self._affine_of(path, create=True), values, strict=True):
                    store[slot].copy_(value)
        self.resident[adapter.name] = slot
        self.loads += 1
        self._set_targets(adapter.name, adapter)
        return slot

    def _check_fits(self, adapter: HostAdapter) -> None:
        """Raise (before anything is evicted) unless ``adapter`` fits the bank's rank and modules."""
        if adapter.rank > self.rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > the bank's {self.rank}")
        unknown = sorted(set(adapter.weights) - set(self.a))
        if unknown:
            raise ValueError(f"adapter {adapter.name!r} targets modules the bank lacks: {unknown[:4]}")
        for path, (a, b) in adapter.weights.items():
            k, n = self.a[path].shape[2], self.b[path].shape[1]
            if a.shape[1] != k or b.shape[0] != n:
                raise ValueError(f"adapter {adapter.name!r}: {path} has in/out {a.shape[1]}/{b.shape[0]}, the model {k}/{n}")
        for path, (g, c) in adapter.dora.items():
            if path not in adapter.weights or g.shape != c.shape or g.shape != (self.b[path].shape[1],):
                raise ValueError(f"adapter {adapter.name!r}: DoRA factor/shift of {path} {tuple(g.shape)}/"
                                 f"{tuple(c.shape)} do not fit its A/B (out {self.b[path].shape[1]})")

    def _affine_of(self, path: str, *, create: bool = False) -> tuple[Tensor, Tensor]:
        """``path``'s (S, N) views of its group's DoRA factor and shift (made, ones and zeros, with ``create``)."""
        group, member = self._groups[path]
        if group not in self._affine and create:
            factor = torch.ones(self.capacity, group.b.shape[1], device=self.device, dtype=torch.float32)
            self._affine[group] = (factor, torch.zeros_like(factor))
        factor, shift = self._affine[group]
        return factor[:, group.columns(member)], shift[:, group.columns(member)]

    def _set_targets(self, name: str, adapter: HostAdapter | None) -> None:
        self._targets.pop(name, None)
        if adapter is not None:
            self._targets[name] = (frozenset(adapter.weights), frozenset(adapter.dora))
        live = set().union(*(paths for paths, _ in self._targets.values()))
        rescaled = set().union(*(paths for _, paths in self._targets.values()))
        if (live, rescaled) != (self._live, self._rescaled):
            self._live, self._rescaled, self.version = live, rescaled, self.version + 1

    def drop(self, name: str) -> None:
        """Forget a resident adapter (its slot is free for the next :meth:`put`)."""
        self.resident.pop(name, None)
        self._set_targets(name, None)

    def slots(self, rows: Sequence[str | None]) -> Tensor:
        """(B,) int32 slot per row (-1: base model) on the bank's device; rows must be resident."""
        for name in dict.fromkeys(r for r in rows if r is not None):
            self.resident.move_to_end(name)
        ids = [-1 if r is None else self.resident[r] for r in rows]
        return to_device(ids, torch.int32, self.device)

    def apply(self, module: nn.Module, x: Tensor, y: Tensor, slots: Tensor | None, *, memo: Memo | None = None
              ) -> Tensor:
        """``y`` plus each row's or token's adapter delta at ``module``'s path.

        ``x``: (B, ..., K); ``slots``: one per token (``x.reshape(-1, K).shape[0]`` of them, e.g. a
        flat batch of T tokens as (T, 1, K) or (1, T, K)), else one per row (B of them). ``memo``: the call's
        :meth:`~splice.lora.routing.Route.memo`, which keeps the kernels' tile plan of ``slots`` for the call's
        other projections (:func:`~splice.kernels.multi_lora.plan_tiles`: made once, not in every shrink).
        """
        if id(module) not in self._apply or slots is None:
            return y
        path = self._apply[id(module)]
        if path not in self._live:
            return y
        k = x.shape[-1]
        flat_x, flat_y = x.reshape(-1, k), y.reshape(-1, y.shape[-1])
        tokens = flat_x.shape[0]
        if slots.numel() == tokens:
            row_len = 1
        elif slots.numel() == x.shape[0]:
            row_len = tokens // slots.numel()
        else:
            raise ValueError(f"{path}: {slots.numel()} routed slots fit neither the batch's {x.shape[0]} "
                             f"rows nor its {tokens} tokens")
        # Serving runs without autograd: the delta is added into the base output itself.
        inplace = not torch.is_grad_enabled() and y.is_contiguous()
        factor, shift = self._affine_of(path) if path in self._rescaled else (None, None)
        if not (use_triton(flat_x) if self.kernels is None else self.kernels):
            out = multi_lora(flat_x, flat_y, self.a[path], self.b[path], slots, row_len=row_len, inplace=inplace,
                             kernels=False, factor=factor, shift=shift)
            return out.view(y.shape)
        shrunk, member = self._shrink(path, x, slots, row_len, memo)
        out = flat_y if inplace else flat_y.clone(memory_format=torch.contiguous_format)
        multi_lora_expand(shrunk, self.b[path], out, member=member, factor=factor, shift=shift)
        return out.view(y.shape)

    def _planned(self, slots: Tensor, row_len: int, tokens: int, memo: Memo | None) -> tuple[Tensor, Tiles, Tensor | None]:
        """The per-token slots of a call's ``tokens``, the kernels' launch shape for them, and their tile plan
        from ``memo`` (made by the call's first shrink, None without a memo)."""
        tiles = tiles_for(tokens, 0)  # the shape depends on the token count alone
        if memo is None:
            return (slots if row_len == 1 else slots.repeat_interleave(row_len)), tiles, None

        def make() -> tuple[Tensor, Tensor]:  # once a call: every projection of every layer reads them
            per_token = slots if row_len == 1 else slots.repeat_interleave(row_len)
            return per_token, plan_tiles(per_token, capacity=self.capacity, tiles=tiles)

        per_token, plan = memo(("multi-LoRA tile plan", row_len, tokens, tiles, self.capacity), make)
        return per_token, tiles, plan

    def _shrink(self, path: str, x: Tensor, slots: Tensor, row_len: int, memo: Memo | None) -> tuple[Shrunk, int]:
        """``path``'s shrink and its member index there: the group's shrink of this ``x`` when an earlier
        member made it, else a new one (for the whole group when ``path`` is its first member)."""
        group, member = self._groups[path]
        last = _LAST_SHRINK.get()
        if member > 0 and last is not None and last.fits(group, x, slots):
            return last.shrunk, member
        flat_x = x.reshape(-1, x.shape[-1])
        per_token, tiles, plan = self._planned(slots, row_len, flat_x.shape[0], memo)
        if member > 0:  # called out of order or on another input: this member alone
            return multi_lora_shrink(flat_x, self.a[path], per_token, tiles=tiles, plan=plan), 0
        shrunk = multi_lora_shrink(flat_x, group.a, per_token, tiles=tiles, plan=plan)
        if len(group.paths) > 1:
            _LAST_SHRINK.set(_LastShrink(group, weakref.ref(x), weakref.ref(slots), _versions(x, slots), shrunk))
        return shrunk, member

    def apply_packed(self, modules: Sequence[nn.Module], x: Tensor, y: Tensor | Callable[[], Tensor],
                     slots: Tensor | None, *, widths: Sequence[int], memo: Memo | None = None,
                     swiglu: bool = False) -> Tensor:
        """``y`` (..., sum(widths)), the packed output of ``modules``' one GEMM over ``x`` (their weights concatenated
        in this order, module ``i`` ``widths[i]`` columns wide), plus each module's delta on its own columns, added
        in place (no autograd; ``y`` viewable as rows). When ``modules`` are one of the bank's groups, in order, and
        the kernels run: one shrink and one expand for all of them; else one :meth:`apply` per module (modules the
        bank does not cover add nothing). ``swiglu``: return ``silu(gate) * up`` of the result instead (a gate/up
        pair; without DoRA the expand and SwiGLU are one pass, :mod:`splice.kernels.lora_swiglu`, ``y`` left as it
        was). ``y`` as a function (the GEMM, not yet run): the shrink goes first, with :attr:`overlap_shrink` on CUDA
        on a side stream, beside the GEMM."""
        flat_x = x.reshape(-1, x.shape[-1])
        live = slots is not None and any(self._apply.get(id(m)) in self._live for m in modules)
        paths = [self._apply.get(id(m)) for m in modules]
        group = self._groups[paths[0]][0] if live and paths[0] is not None else None
        kernels = use_triton(flat_x) if self.kernels is None else self.kernels
        shrunk = None
        if slots is not None and group is not None and kernels and tuple(paths) == group.paths:
            row_len = 1 if slots.numel() == flat_x.shape[0] else flat_x.shape[0] // slots.numel()
            per_token, tiles, plan = self._planned(slots, row_len, flat_x.shape[0], memo)
            # Queued before a GEMM not yet run, the shrink (it reads x alone) may run beside it: a pool stream per
            # call (nothing kept here; a captured step's graph gets a parallel branch).
            aside = self.overlap_shrink and callable(y) and flat_x.is_cuda
            side = torch.cuda.Stream(flat_x.device) if aside else None
            shrunk = multi_lora_shrink(flat_x, group.a, per_token, tiles=tiles, plan=plan, side=side)
        try:
            y = y() if callable(y) else y
        finally:  # what follows on this stream (or frees the shrink's buffer) waits; the GEMM is queued already
            if shrunk is not None:
                shrunk.wait()
        flat_y = y.view(-1, y.shape[-1])
        if shrunk is not None and group is not None and flat_y.stride(1) == 1:
            rescaled = bool(self._rescaled.intersection(group.paths))
            if swiglu and not rescaled and len(group.widths) == 2 and group.widths[0] == group.widths[1]:
                return multi_lora_expand_swiglu(shrunk, group.b, flat_y, per_token).view(*y.shape[:-1], -1)
            factor, shift = self._affine[group] if rescaled else (None, None)
            multi_lora_expand(shrunk, group.b, flat_y, widths=group.widths, factor=factor, shift=shift)
        elif live:
            start = 0
            for module, width in zip(modules, widths, strict=True):
                part = y[..., start: start + width]
                done = self.apply(module, x, part, slots, memo=memo)
                if done.data_ptr() != part.data_ptr():  # added into a copy (the slice is not contiguous)
                    part.copy_(done)
                start += width
        return swiglu_packed(y) if swiglu else y

    @classmethod
    def for_sites(cls, model: nn.Module, sites: dict[str, BankSite], *, capacity: int, rank: int,
                  dtype: torch.dtype) -> LoraBank:
        """An empty bank over the :func:`add_bank_sites` sites of ``model`` (on its device)."""
        modules = dict(model.named_modules())
        shapes = {path: _linear_shape(modules[path]) for path in sites}
        device = next(model.parameters()).device
        return cls(shapes, capacity=capacity, rank=rank, device=device, dtype=dtype,
                   appliers={site: path for path, site in sites.items()})

    @classmethod
    def from_model(cls, model: nn.Module, names: Sequence[str], *, dtype: torch.dtype | None = None) -> LoraBank:
        """A bank of the adapters ``names`` already on ``model`` (their linear LoRA and DoRA layers:
        :func:`bank_holds`; a DoRA layer's factor from the model's weights now)."""
        found = [(p, w, layer) for p, w, layer in lora_modules(model) if bank_holds(layer)]
        shapes: dict[str, tuple[int, int]] = {}
        appliers: dict[nn.Module, str] = {}
        skippers: list[nn.Module] = []
        for path, wrapper, layer in found:
            if path not in shapes:
                shapes[path] = _linear_shape(wrapper)
                appliers[layer] = path
            else:
                skippers.append(layer)
        # name -> its (A, B * scale) and DoRA (factor, shift) by path
        host: dict[str, tuple[dict[str, tuple[Tensor, Tensor]], dict[str, tuple[Tensor, Tensor]]]] = {
            n: ({}, {}) for n in names}
        for path, wrapper, layer in found:
            if layer.name in host:
                weights, dora = host[layer.name]
                weights[path] = (layer.lora_A.weight.detach(), (layer.lora_B.weight * layer.scale).detach())
                if isinstance(layer, DoraLinear):
                    dora[path] = adapter_file.dora_output(layer.lora_magnitude_vector / layer.weight_norm(), wrapper)
        first = found[0][2].lora_A.weight
        bank = cls(shapes, capacity=max(1, len(names)),
                   rank=max([layer.rank for _, _, layer in found if layer.name in host] or [1]),
                   device=first.device, dtype=dtype or first.dtype, appliers=appliers, skippers=skippers)
        for name, (weights, dora) in host.items():
            rank = max((a.shape[0] for a, _ in weights.values()), default=1)
            bank.put(HostAdapter(name=name, weights=weights, rank=rank, dora=dora))
        return bank


def bank_holds(layer: nn.Module) -> bool:
    """Whether a bank can hold ``layer`` (a LoRA layer on a model): linear LoRA and DoRA, no embedding or conv."""
    return isinstance(layer, (LoraLinear, DoraLinear))


@contextmanager
def use_adapter_bank(model: nn.Module, rows: Sequence[str | None], *, dtype: torch.dtype | None = None
                     ) -> Iterator[LoraBank]:
    """Like :func:`splice.lora.apply.use_adapters`, but the linear adapters (LoRA and DoRA) named in
    ``rows`` are packed into a :class:`LoraBank` for the call, so each projection is one multi-LoRA launch."""
    names = list(dict.fromkeys(r for r in rows if r is not None))
    with use_adapters(model, rows):  # validates the names and routes non-linear layers by row
        bank = LoraBank.from_model(model, names, dtype=dtype)
        layers = [layer for _, _, layer in lora_modules(model)]
        with routed(layers, Route(rows=tuple(rows), bank=bank, slots=bank.slots(rows))):
            yield bank
