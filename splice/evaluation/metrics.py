"""Scores of generated text against references: exact match and word-level F1."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["text_metrics", "word_f1", "words"]


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of ``text``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def word_f1(predicted: Sequence[str], target: Sequence[str]) -> float:
    """F1 between word multisets (a repeated word counts as often as it occurs in both)."""
    common = sum((Counter(predicted) & Counter(target)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(target)
    return 2 * precision * recall / (precision + recall)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping) and mean word-level F1 of predictions vs references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "word_f1": 0.0}
    exact = f1 = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        exact += float(pred.strip() == ref.strip())
        f1 += word_f1(words(pred), words(ref))
    n = len(predictions)
    return {"exact_match": exact / n, "word_f1": f1 / n}
