"""Which modules a rule targets: names, a regex, "all-linear" or a predicate (LoRA, quantization)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from splice.core.family import is_conv1d, is_output_head
from splice.core.rewrite import Node

__all__ = ["Targets", "target_matcher"]

Targets = str | Sequence[str] | Callable[[Node], bool]


def _is_output_head(model: nn.Module, node: Node) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and (node.original is head or node.module is head):
        return True
    return is_output_head(node.name)


def _linear_like(node: Node) -> bool:
    return node.kind == "linear" or is_conv1d(node.original)


def target_matcher(model: nn.Module, targets: Targets) -> Callable[[Node], bool]:
    """The predicate on nodes that ``targets`` means for ``model``.

    ``targets``: module names (exact path or dotted suffix, e.g. ``"q_proj"``), a regex string
    (matched in full against the path, as PEFT does), ``"all-linear"`` (every linear and GPT-2
    ``Conv1D`` but the output head), or a predicate on the :class:`~splice.core.rewrite.Node`.
    """
    if callable(targets):
        return targets
    if isinstance(targets, str):
        if targets == "all-linear":
            return lambda n: _linear_like(n) and not _is_output_head(model, n)
        pattern = re.compile(targets)
        return lambda n: pattern.fullmatch(n.name) is not None
    names = tuple(targets)
    if not names or not all(isinstance(t, str) for t in names):
        raise TypeError("targets must be module names, a regex, 'all-linear' or a predicate")
    return lambda n: any(n.name == t or n.name.endswith("." + t) for t in names)
