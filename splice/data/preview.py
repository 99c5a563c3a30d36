"""What training sees: the first rows rendered and tokenized, trained tokens marked.

Like axolotl's debug view: each row is shown as the text the model reads, with the tokens that
carry a loss marked, either in colour (a terminal) or between ``[[`` and ``]]``; with ``tokens``
every token is listed as ``id/label piece`` (label -100: not trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from splice.data.rows import IGNORE_INDEX, Example, Template, tokenize_rows

__all__ = ["preview_rows"]

_GREEN, _RESET = "\x1b[42;30m", "\x1b[0m"  # trained tokens: black on green


def _runs(example: Example) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they are trained."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(token)
        else:
            runs.append(([token], trained))
    return runs


def _text_view(tokenizer: Any, example: Example, *, color: bool) -> str:
    opened, closed = (_GREEN, _RESET) if color else ("[[", "]]")
    parts = []
    for ids, trained in _runs(example):
        text = tokenizer.decode(ids)
        parts.append(f"{opened}{text}{closed}" if trained else text)
    return "".join(parts)


def _token_view(tokenizer: Any, example: Example) -> str:
    return " ".join(f"{token}/{label}{tokenizer.convert_ids_to_tokens(token)!r}"
                    for token, label in zip(example.input_ids, example.labels, strict=True))


def preview_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    template: Template,
    max_length: int,
    train_on_prompt: bool = False,
    count: int = 3,
    color: bool = False,
    tokens: bool = False,
) -> str:
    """The first ``count`` rows as training tokenizes them, one block per row, trained tokens
    marked (``color``: ANSI green, else ``[[...]]``; ``tokens``: also every ``id/label piece``)."""
    shown = list(rows[:count])
    data = tokenize_rows(shown, tokenizer, template=template, max_length=max_length,
                         train_on_prompt=train_on_prompt)
    marks = "green" if color else "[[ ]]"
    blocks = [f"{len(shown)} of {len(rows)} rows ({type(template).__name__}); trained tokens in {marks}"
              + (f"; {data.dropped} dropped (prompt >= max_length {max_length})" if data.dropped else "")]
    for number, example in enumerate(data.examples, start=1):
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        blocks.append(f"--- row {number}: {len(example.input_ids)} tokens, {trained} trained")
        blocks.append(_text_view(tokenizer, example, color=color))
        if tokens:
            blocks.append(_token_view(tokenizer, example))
    return "\n".join(blocks)
