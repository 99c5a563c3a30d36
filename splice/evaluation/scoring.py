"""Generation scored against references, for the adapter or the base model (a :class:`Task`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from splice.data.rows import ChatTemplate, PromptTemplate, Row
from splice.evaluation.metrics import text_metrics
from splice.generation.generate import generate
from splice.lora.apply import adapters_disabled, lora_modules

__all__ = ["Task", "answer", "evaluate_generation", "text_task"]


@dataclass(frozen=True)
class Task:
    """How to prompt for a row, what the right answer is, and how answers are scored."""

    name: str
    prompt: Callable[[Row, Any], str]  # (row, tokenizer) -> generation prompt text
    reference: Callable[[Row], str]
    score: Callable[[list[str], list[str]], dict[str, float]]


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
    outputs = answer(model, tokenizer, prompts, base=base, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return task.score(outputs, [task.reference(row) for row in rows])


def answer(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, base: bool = False,
           max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """The greedy answer to each prompt (``base``: with the adapters disabled)."""
    disabled = adapters_disabled(model) if base and lora_modules(model) else contextlib.nullcontext()
    with disabled:
        return generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                        temperature=0.0, batch_size=batch_size)
