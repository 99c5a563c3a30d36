"""Scoring a model on a held-out data set: validation loss, perplexity and generation metrics,
for the base model and its adapter side by side.

:func:`compare_rows` also returns each scored row's prompt, reference and answers (base and
adapter), which ``splice eval --predictions FILE`` writes as JSON lines. The loss is passed in as a function (``loss(model, examples) -> mean token cross-entropy``): it is
the training loss, which lives above this package (``splice.training``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.data.rows import Example, Template, tokenize_rows
from splice.evaluation.scoring import Task, answer, text_task
from splice.lora.apply import adapters_disabled, lora_modules

__all__ = ["Comparison", "LossFn", "compare_rows", "compare_table", "perplexity"]

Row = dict[str, Any]
LossFn = Callable[[nn.Module, Sequence[Example]], float]


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean per-token cross-entropy (inf past float range)."""
    return math.exp(loss) if loss < 700 else math.inf


@dataclass
class Comparison:
    """Scores per model (``"base"``, ``"adapter"``) and, per row scored by generation, what each
    model answered: ``{"prompt", "reference", "base", "adapter"}``."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, str]] = field(default_factory=list)


def _scores(model: nn.Module, tokenizer: Any, rows: Sequence[Row], examples: Sequence[Example], *,
            task: Task, loss: LossFn | None, samples: int, max_new_tokens: int, batch_size: int,
            base: bool) -> tuple[dict[str, float], list[str]]:
    """(scores, the answer to each of the first ``samples`` rows)."""
    result: dict[str, float] = {}
    if loss is not None and examples:
        disabled = adapters_disabled(model) if base and lora_modules(model) else contextlib.nullcontext()
        with disabled:
            value = float(loss(model, examples))
        result.update(val_loss=value, perplexity=perplexity(value))
    answers: list[str] = []
    if samples:
        scored = rows[:samples]
        answers = answer(model, tokenizer, [task.prompt(row, tokenizer) for row in scored], base=base,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
        result.update(task.score(answers, [task.reference(row) for row in scored]))
    return result, answers


def compare_rows(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    template: Template,
    task: Task | None = None,
    loss: LossFn | None = None,
    max_length: int = 512,
    samples: int = 100,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    compare_base: bool = True,
) -> Comparison:
    """Scores of the base model and its adapter (only ``"base"`` when the model has no LoRA, or
    without ``compare_base`` only ``"adapter"``): ``val_loss`` and ``perplexity`` over every row
    (with ``loss``), and the ``task``'s generation metrics (default: exact match and word F1
    against the template's response) over the first ``samples`` rows, greedy; and those rows'
    answers (:class:`Comparison`)."""
    task = task or text_task(template)
    examples = tokenize_rows(rows, tokenizer, template=template, max_length=max_length).examples
    options: dict[str, Any] = dict(task=task, loss=loss, samples=samples, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    sides = ["base"] if not lora_modules(model) else (["base", "adapter"] if compare_base else ["adapter"])
    result = Comparison()
    answers: dict[str, list[str]] = {}
    for side in sides:
        result.scores[side], answers[side] = _scores(model, tokenizer, rows, examples, base=side == "base",
                                                     **options)
    for number, row in enumerate(rows[:samples]):
        result.predictions.append({"prompt": task.prompt(row, tokenizer), "reference": task.reference(row),
                                   **{side: answers[side][number] for side in sides}})
    return result


def compare_table(report: dict[str, dict[str, float]]) -> str:
    """The report as a table: a row per metric, a column per model, and the change."""
    names = list(report)
    metrics = list(dict.fromkeys(k for scores in report.values() for k in scores))
    header = f"{'metric':<14}" + "".join(f"{n:>12}" for n in names) + (f"{'change':>10}" if len(names) == 2 else "")
    lines = [header]
    for metric in metrics:
        values = [report[n].get(metric, math.nan) for n in names]
        line = f"{metric:<14}" + "".join(f"{v:>12.4f}" for v in values)
        if len(names) == 2:
            line += f"{values[1] - values[0]:>+10.4f}"
        lines.append(line)
    return "\n".join(lines)
