"""Validation loss: the training loss, without gradients, over held-out examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from splice.data.batching import batches
from splice.data.rows import IGNORE_INDEX, Example
from splice.training.loss import train_step_loss

__all__ = ["validation_loss"]


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
