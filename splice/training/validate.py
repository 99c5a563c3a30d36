"""A run's held-out evaluation: validation loss (the training loss, without gradients) and
generation scores, written to the run's metrics log."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.data.batching import batches
from splice.data.rows import IGNORE_INDEX, Example, Row
from splice.evaluation.scoring import Task, evaluate_generation
from splice.training.loss import train_step_loss
from splice.training.report import MetricsLog

__all__ = ["Evaluator", "autocast", "validation_loss"]


def autocast(device: torch.device, precision: str, *, cache: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision`` "bf16", else nothing."""
    if precision == "bf16":
        # No weight-cast cache inside CUDA graphs: cached casts would outlive the capture.
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


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
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches(examples, batch_size=batch_size, pad_id=pad_id, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        total += float(train_step_loss(model, batch, device=device))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class Evaluator:
    """Validation loss and generation scores of one run, written to its metrics log."""

    model: nn.Module
    tokenizer: Any
    validation: Sequence[Example]
    eval_rows: Sequence[Row]  # held-out rows scored by generation
    task: Task
    device: torch.device
    precision: str
    metrics: MetricsLog
    say: Callable[[str], None]
    batch_size: int  # rows per validation batch
    eval_batches: int
    eval_batch_size: int  # prompts per generation batch
    max_new_tokens: int
    context: Any = contextlib.nullcontext  # entered around each evaluation (FSDP2: the root's weights)

    def generation(self, *, base: bool) -> dict[str, float]:
        """Greedy answers to the held-out rows, scored (``base``: with the adapters off)."""
        if not self.eval_rows:
            return {}
        t0 = time.perf_counter()
        with self.context():
            scores = evaluate_generation(self.model, self.tokenizer, self.eval_rows, task=self.task, base=base,
                                         max_new_tokens=self.max_new_tokens, batch_size=self.eval_batch_size)
        self.say(f"{'base model' if base else 'fine-tuned'} on {len(self.eval_rows)} held-out "
                 f"examples ({time.perf_counter() - t0:.0f}s): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        self.model.train()
        return scores

    def __call__(self, step: int) -> dict[str, Any]:
        """Validation loss and generation scores at ``step``, logged as one "eval" record."""
        result: dict[str, Any] = {}
        if self.validation:
            with autocast(self.device, self.precision), self.context():
                result["val_loss"] = validation_loss(
                    self.model, self.validation, batch_size=self.batch_size,
                    pad_id=self.tokenizer.pad_token_id, device=self.device, max_batches=self.eval_batches)
            self.say(f"step {step}: validation loss {result['val_loss']:.4f}")
        result.update(self.generation(base=False))
        self.metrics.write({"kind": "eval", "step": step, **result})
        self.model.train()
        return result
