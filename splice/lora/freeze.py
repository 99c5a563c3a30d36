"""Freezing by predicate on parameter paths, and a report of what trains."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from splice.core.rewrite import Around
from splice.lora.layers import LoraLayer

__all__ = ["TrainableSummary", "adapter_parameter_names", "freeze", "trainable_summary"]

ParamPredicate = Callable[[str], bool]


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Paths of every parameter owned by a LoRA module (found by module type, not by name)."""
    names: set[str] = set()
    for module_path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for param_name, _ in module.named_parameters():
                names.add(f"{module_path}.{param_name}" if module_path else param_name)
    return names


def freeze(model: nn.Module, *, trainable: ParamPredicate | str | None = None) -> TrainableSummary:
    """Set ``requires_grad`` on every parameter of ``model`` from its path.

    ``trainable`` is a predicate on the parameter path (``"model.layers.0.mlp.up_proj.weight"``) or
    a regex searched in it. Default: only adapter parameters (those of LoRA modules) train.
    Raises if nothing would train. Returns the :func:`trainable_summary`.
    """
    if trainable is None:
        adapter = adapter_parameter_names(model)
        should_train: ParamPredicate = adapter.__contains__
    elif isinstance(trainable, str):
        pattern = re.compile(trainable)
        should_train = lambda path: pattern.search(path) is not None  # noqa: E731
    else:
        should_train = trainable
    # remove_duplicate=False: a tied parameter trains if any of its paths says so.
    decisions: dict[int, bool] = {}
    params: dict[int, nn.Parameter] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        decisions[id(param)] = decisions.get(id(param), False) or bool(should_train(path))
        params[id(param)] = param
    if not any(decisions.values()):
        hint = (
            "the model has no LoRA modules: call splice.add_lora first"
            if trainable is None
            else "the predicate matched no parameter path; list them with model.named_parameters()"
        )
        raise ValueError(f"freeze would leave nothing trainable: {hint}")
    for key, param in params.items():
        param.requires_grad_(decisions[key])
    return trainable_summary(model)


@dataclass(frozen=True)
class TrainableSummary:
    """Counts of trainable parameters and which modules hold them."""

    trainable: int
    total: int
    modules: dict[str, int]  # module path -> trainable parameter count

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}",
        ]
        for count, text in _by_pattern(self.modules):
            lines.append(f"  {count:>12,}  {text}")
        return "\n".join(lines)


def _by_pattern(modules: dict[str, int]) -> list[tuple[int, str]]:
    """Module paths grouped by their numbered container: ``model.layers.{0..29}.self_attn.q_proj``
    and the rest become one "q_proj, k_proj, ... in 30 layers of model.layers (210 modules)";
    (trainable parameters, text) per group, then each path that has no number."""
    groups: dict[str, tuple[dict[str, int], set[str], list[str]]] = {}  # container -> ({rest: params}, indices, paths)
    single: list[tuple[int, str]] = []
    for path, count in modules.items():
        match = re.fullmatch(r"(?:(.*?)\.)?(\d+)\.(.+)", path)
        if match is None:
            single.append((count, path))
            continue
        container, index, rest = match.groups()
        names, indices, paths = groups.setdefault(container or "", ({}, set(), []))
        names[rest] = names.get(rest, 0) + count
        indices.add(index)
        paths.append(path)
    rows = []
    for container, (names, indices, paths) in groups.items():
        leaves = [rest.rsplit(".", 1)[-1] for rest in names]
        shown = leaves if len(set(leaves)) == len(leaves) else list(names)  # a leaf name twice: the full rest
        where = f"{len(indices)} layers" + (f" of {container}" if container else "")
        rows.append((sum(names.values()), f"{', '.join(shown)} in {where} ({len(paths)} modules)"))
    return rows + single


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Trainable and total parameter counts (tied parameters once) and the training modules.

    A parameter inside a rewrite (e.g. a LoRA adapter) is reported under the rewritten module's
    path (``model.layers.0.self_attn.q_proj``), found by module type.
    """
    wrappers = [name for name, module in model.named_modules() if isinstance(module, Around)]
    trainable = total = 0
    modules: dict[str, int] = {}
    for path, param in model.named_parameters():
        n = param.numel()
        total += n
        if param.requires_grad:
            trainable += n
            inside = [w for w in wrappers if path.startswith(w + ".")]
            owner = max(inside, key=len) if inside else path.rpartition(".")[0]
            modules[owner] = modules.get(owner, 0) + n
    return TrainableSummary(trainable=trainable, total=total, modules=modules)
