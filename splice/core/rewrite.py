"""The model rewriter: walk any ``nn.Module``, match nodes, rewrite them.

This is the one mechanism LoRA, quantization, activation swaps and the fused kernels are built on
(after Axon's ``rewrite_nodes``). A *rule* looks at each :class:`Node` and returns ``None`` to skip
it or a rewriter:

* an **around** rewriter: a callable or ``nn.Module`` ``f(x, y)`` that receives the node's input
  ``x`` and its original output ``y`` and returns the new output (``y`` becomes ``f(x, y)``). The
  walker installs an :class:`Around` module that keeps the original as ``base``.
* a **replace** rewriter, :class:`Replace`: a module that takes the node's inputs and replaces it
  outright; the original no longer runs.

Only :func:`rewrite` and :func:`unrewrite` mutate the model; rules and the rewriters they build are
pure. A module reachable at several paths (tied/shared modules) is matched and rewritten once, and
the same new module is installed at every path. A wrapped node is a leaf of later walks, seen with
the kind of the module it wraps, so rewrites compose (LoRA around an int8 linear); a replacement's
own children are walked like any module's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "Around",
    "Node",
    "NothingMatchedError",
    "Replace",
    "Rule",
    "kind_of",
    "nodes",
    "param_uses",
    "rewrite",
    "innermost",
    "rewritten_nodes",
    "share_state",
    "unrewrite",
    "weight_of",
]

def kind_of(module: nn.Module) -> str:
    """The node kind of ``module``: ``"linear"``, ``"embedding"``, ``"conv2d"``, ``"relu"``, ...

    A class may declare ``splice_kind`` (quantized linears say ``"linear"``); rewrite wrappers
    report the kind of the module they wrap; otherwise it is the lower-cased class name, with
    every ``nn.Linear`` subclass a ``"linear"``. Hugging Face's GPT-2 ``Conv1D`` (a linear with
    a transposed weight, not a convolution) is ``"conv1d"``.
    """
    if isinstance(module, Around):
        return kind_of(module.base)
    declared = getattr(type(module), "splice_kind", None)
    if isinstance(declared, str):
        return declared
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__.lower()


@dataclass(frozen=True)
class Node:
    """One module of the model as a rule sees it.

    ``name`` is the qualified path (``"model.layers.0.self_attn.q_proj"``); ``module`` is what sits
    at that path now (an :class:`Around` or a replacement, if already rewritten); ``kind`` is
    :func:`kind_of` of it; ``paths`` lists every path of a shared module (``name`` is the first).
    """

    name: str
    module: nn.Module
    kind: str
    paths: tuple[str, ...]

    @property
    def original(self) -> nn.Module:
        """The innermost module before any rewrite (through :class:`Around` wrappers)."""
        return innermost(self.module)


@dataclass(frozen=True)
class Replace:
    """A replace rewriter: ``module`` takes the node's inputs and its place.

    With ``keep_original`` the walker remembers the original so :func:`unrewrite` restores it
    exactly; quantizers pass ``False`` to free the float weights, and unrewrite then asks the
    replacement for ``restore()`` (e.g. a dequantized linear).
    """

    module: nn.Module
    keep_original: bool = True


class Around(nn.Module):
    """Runs ``base`` and passes its input and output through ``fn``: ``y -> fn(x, y)``.

    ``x`` is the single positional input, or the tuple of positional inputs when there are several.
    """

    base: nn.Module

    def __init__(self, base: nn.Module, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.base = base
        if isinstance(fn, nn.Module):
            self.fn = fn
        else:
            self._plain_fn = fn  # a plain callable holds no parameters

    @property
    def rewriter(self) -> Callable[[Any, Any], Any]:
        return self.fn if "fn" in self._modules else self._plain_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        y = self.base(*args, **kwargs)
        x = args[0] if len(args) == 1 else args
        return self.rewriter(x, y)

    def extra_repr(self) -> str:
        return "" if "fn" in self._modules else f"fn={self._plain_fn!r}"


def weight_of(module: nn.Module) -> Tensor:
    """``module.weight`` as a tensor (typed: ``nn.Module.__getattr__`` could return a module)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor")
    return weight


def param_uses(model: nn.Module) -> dict[int, int]:
    """``id(parameter) -> how many module attributes hold it``: above 1, the weight is tied
    (e.g. an output head sharing the input embedding)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    return uses


def innermost(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`Around` wrapper peeled off."""
    while isinstance(module, Around):
        module = module.base
    return module


def share_state(new: nn.Module, original: nn.Module) -> None:
    """Make ``new`` hold ``original``'s parameters, buffers and children (the same dicts).

    Paths and ``state_dict`` keys stay identical, a rewrite of a child made through either module
    is seen by both, and ``.to()``/``.train()`` on ``new`` update what ``original`` holds.
    """
    new._parameters = original._parameters
    new._buffers = original._buffers
    new._non_persistent_buffers_set = original._non_persistent_buffers_set
    new._modules = original._modules
    new.training = original.training



Rewriter = Callable[[Any, Any], Any] | nn.Module | Replace
Rule = Callable[[Node], Rewriter | None]

# Attribute (not a registered submodule, so it is not in state_dict nor moved by .to())
# where a replacement remembers the module it replaced.
_ORIGINAL = "_splice_replaced"


class NothingMatchedError(ValueError):
    """Raised by :func:`rewrite` when the rule matched no node."""


@dataclass(frozen=True)
class _Site:
    parent: nn.Module
    attr: str
    path: str


def _is_rewritten(module: nn.Module) -> bool:
    return isinstance(module, Around) or _ORIGINAL in module.__dict__


def _walk(model: nn.Module) -> dict[int, list[_Site]]:
    """Every (parent, attribute) site of every module below ``model``, grouped by module id.

    An :class:`Around` is a leaf: its ``base`` is the node itself and its ``fn`` (e.g. a LoRA
    layer's own linears) is the rewrite's inside, neither a node of the model. A replacement is an
    ordinary module: the walk enters its children (a fused MLP that shares the original's
    projections keeps them visible at the same paths). Order is depth-first, like
    ``named_modules``.
    """
    sites: dict[int, list[_Site]] = {}
    seen_parents: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        if id(parent) in seen_parents:  # a shared container: its children are sited already
            return
        seen_parents.add(id(parent))
        for attr, child in parent._modules.items():
            if child is None:
                continue
            path = f"{prefix}.{attr}" if prefix else attr
            sites.setdefault(id(child), []).append(_Site(parent, attr, path))
            if not isinstance(child, Around):
                visit(child, path)

    visit(model, "")
    return sites


def _module_at(site: _Site) -> nn.Module:
    return site.parent._modules[site.attr]  # type: ignore[return-value]


def nodes(model: nn.Module) -> Iterator[Node]:
    """Every node of ``model`` once (shared modules once, with all their paths)."""
    for group in _walk(model).values():
        module = _module_at(group[0])
        yield Node(
            name=group[0].path,
            module=module,
            kind=kind_of(module),
            paths=tuple(s.path for s in group),
        )


def _nothing_matched(model: nn.Module) -> NothingMatchedError:
    kinds: dict[str, list[str]] = {}
    for node in nodes(model):
        kinds.setdefault(node.kind, []).append(node.name)
    seen = "; ".join(
        f"{kind} x{len(names)} (e.g. {', '.join(names[:2])})" for kind, names in sorted(kinds.items())
    )
    return NothingMatchedError(
        "the rewrite rule matched no module. The model has: "
        + (seen or "no submodules")
        + ". Check the rule's names/kinds against these, or pass allow_empty=True."
    )


def rewrite(model: nn.Module, rule: Rule, *, allow_empty: bool = False) -> list[str]:
    """Apply ``rule`` to every node of ``model``; returns the names of the rewritten nodes.

    The rule runs on all nodes first, and only then does the walker install the rewriters, so a
    rule never sees a half-rewritten model. Raises :class:`NothingMatchedError` (listing the kinds
    and names it saw) when nothing matched, unless ``allow_empty``.
    """
    plan: list[tuple[Node, list[_Site], Rewriter]] = []
    for group in _walk(model).values():
        module = _module_at(group[0])
        node = Node(group[0].path, module, kind_of(module), tuple(s.path for s in group))
        rewriter = rule(node)
        if rewriter is not None:
            plan.append((node, group, rewriter))
    if not plan and not allow_empty:
        raise _nothing_matched(model)

    for node, group, rewriter in plan:
        if isinstance(rewriter, Replace):
            new = rewriter.module
            if rewriter.keep_original:
                new.__dict__[_ORIGINAL] = node.module
            else:
                new.__dict__[_ORIGINAL] = None
        elif callable(rewriter):
            new = Around(node.module, rewriter)
        else:
            raise TypeError(
                f"rule returned {type(rewriter).__name__} for {node.name!r}: return None to skip, "
                "a callable/module f(x, y) to rewrite around the node, or splice.Replace(module)"
            )
        for site in group:
            site.parent._modules[site.attr] = new
    return [node.name for node, _, _ in plan]


def rewritten_nodes(model: nn.Module) -> Iterator[Node]:
    """Every node of ``model`` that a rewrite installed (wrappers and replacements)."""
    for node in nodes(model):
        if _is_rewritten(node.module):
            yield node


def _restore_one(module: nn.Module) -> nn.Module:
    """The module that ``module`` (a wrapper or a replacement) was installed over."""
    if _ORIGINAL not in module.__dict__:  # an Around installed by the walker
        assert isinstance(module, Around)
        restore = getattr(module.rewriter, "restore", None)
        if callable(restore):  # e.g. a merged LoRA unmerges itself from base
            restore(module.base)
        return module.base
    original = module.__dict__[_ORIGINAL]
    if original is None:
        restore = getattr(module, "restore", None)
        if not callable(restore):
            raise ValueError(
                f"{type(module).__name__} was installed with keep_original=False and has no "
                "restore(): it cannot be undone"
            )
        return restore()
    return original


def unrewrite(
    model: nn.Module,
    *,
    select: Callable[[Node], bool] | str | None = None,
    layer: Callable[[nn.Module], bool] | None = None,
) -> list[str]:
    """Undo rewrites, restoring the original modules; returns the names restored.

    ``select`` limits which rewritten nodes are undone (a predicate on the node, or a regex searched
    in its name). Composed rewrites are peeled from the outside in; ``layer`` (a predicate on each
    wrapper or replacement) stops the peeling at the first layer it rejects (default: peel all).
    """
    if isinstance(select, str):
        pattern = re.compile(select)
        select_fn: Callable[[Node], bool] = lambda n: pattern.search(n.name) is not None  # noqa: E731
    else:
        select_fn = select or (lambda n: True)
    peel = layer or (lambda m: True)
    restored: list[str] = []
    for group in _walk(model).values():
        module = _module_at(group[0])
        node = Node(group[0].path, module, kind_of(module), tuple(s.path for s in group))
        if not _is_rewritten(module) or not select_fn(node):
            continue
        while _is_rewritten(module) and peel(module):
            module = _restore_one(module)
        if module is node.module:
            continue
        for site in group:
            site.parent._modules[site.attr] = module
        restored.append(node.name)
    return restored
