"""Evaluation: validation loss, and generation scored against references (base vs adapter)."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.data.batching import batches
from splice.data.rows import ChatTemplate, Example, PromptTemplate
from splice.generation.generate import generate
from splice.lora.layers import adapters_disabled, lora_modules

__all__ = ["Task", "evaluate_generation", "text_metrics", "text_task", "validation_loss"]

Row = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """How to prompt for a row, what the right answer is, and how answers are scored."""

    name: str
    prompt: Callable[[Row, Any], str]  # (row, tokenizer) -> generation prompt text
    reference: Callable[[Row], str]
    score: Callable[[list[str], list[str]], dict[str, float]]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping) and mean word-level F1 of predictions vs references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "word_f1": 0.0}
    exact = f1 = 0.0
    for pred, ref in zip(predictions, references):
        exact += float(pred.strip() == ref.strip())
        p, r = Counter(_words(pred)), Counter(_words(ref))
        common = sum((p & r).values())
        if common:
            precision, recall = common / sum(p.values()), common / sum(r.values())
            f1 += 2 * precision * recall / (precision + recall)
    n = len(predictions)
    return {"exact_match": exact / n, "word_f1": f1 / n}


def text_task(template: PromptTemplate | ChatTemplate) -> Task:
    """A task for custom data: prompt from the template, the response as reference text."""

    def prompt(row: Row, tokenizer: Any) -> str:
        if isinstance(template, ChatTemplate):
            messages = template.render(row)[:-1]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return template.render(row)[0]

    def reference(row: Row) -> str:
        if isinstance(template, ChatTemplate):
            return template.render(row)[-1]["content"]
        return template.render(row)[1]

    return Task(name="text", prompt=prompt, reference=reference, score=text_metrics)


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    max_batches: int | None = None,
) -> float:
    """Mean cross-entropy per target token over (the first ``max_batches`` of) ``examples``."""
    from splice.training.loop import train_step_loss  # the same loss as training

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches(examples, batch_size=batch_size, pad_id=pad_id, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        total += float(train_step_loss(model, batch, device=device))
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    *,
    task: Task,
    base: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy-generate an answer for each row and score it; ``base`` disables the adapters."""
    prompts = [task.prompt(row, tokenizer) for row in rows]
    references = [task.reference(row) for row in rows]
    disabled = adapters_disabled(model) if base and lora_modules(model) else contextlib.nullcontext()
    with disabled:
        outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           temperature=0.0, batch_size=batch_size)
    return task.score(outputs, references)
