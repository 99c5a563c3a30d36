"""What training sees: the first rows rendered and tokenized, trained tokens marked.

Like axolotl's debug view: each row is shown as the text the model reads, with the tokens that
carry a loss marked, either in colour (a terminal) or between ``[[`` and ``]]``; with ``tokens``
every token is listed as ``id/label piece`` (label -100: not trained).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from splice.data.formats import detect_format
from splice.data.rows import IGNORE_INDEX, Example, Template, tokenize_rows

__all__ = ["preview_rows", "shape_name"]

_LABELS = {"alpaca": "Alpaca", "sharegpt": "ShareGPT"}  # shapes whose name is a proper name


def shape_name(columns: Collection[str], *, templated: bool = False, chat: bool = False) -> str:
    """The shape of rows with ``columns`` as a person reads it: "Alpaca (instruction/input/output)",
    "ShareGPT (conversations)", "prompt/completion"; ``templated``: the user's own templates;
    ``chat``: prompt/answer shapes rendered through the chat template."""
    through = ", through the chat template" if chat else ""
    if templated:
        return "--prompt-template/--response-template" + through
    shape = detect_format(columns)
    parts = list(shape.columns)
    if shape.name in ("alpaca", "instruction/response"):  # the optional column the template uses
        extra = next((c for c in ("input", "context") if c in columns), None)
        parts[1:1] = [extra] if extra else []
    label = _LABELS.get(shape.name, shape.name)
    named = label if label == "/".join(parts) else f"{label} ({'/'.join(parts)})"
    return named + ("" if shape.name in ("chat", "sharegpt") else through)

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
    shape: str | None = None,
) -> str:
    """The first ``count`` rows as training tokenizes them, one block per row, trained tokens
    marked (``color``: ANSI green, else ``[[...]]``; ``tokens``: also every ``id/label piece``).
    ``shape``: the rows' shape for the header (:func:`shape_name`; default: the template's kind)."""
    shown = list(rows[:count])
    data = tokenize_rows(shown, tokenizer, template=template, max_length=max_length,
                         train_on_prompt=train_on_prompt)
    marks = "green" if color else "[[ ]]"
    blocks = [f"{len(shown)} of {len(rows)} rows, {shape or type(template).__name__}; trained tokens in {marks}"
              + (f"; {data.dropped} dropped (prompt >= max_length {max_length})" if data.dropped else "")]
    for number, example in enumerate(data.examples, start=1):
        trained = sum(label != IGNORE_INDEX for label in example.labels)
        blocks.append(f"--- row {number}: {len(example.input_ids)} tokens, {trained} trained")
        blocks.append(_text_view(tokenizer, example, color=color))
        if tokens:
            blocks.append(_token_view(tokenizer, example))
    return "\n".join(blocks)
