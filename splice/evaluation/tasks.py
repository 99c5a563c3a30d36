"""The embedded default task: name a function from its code, answering ``{"name": "..."}``.

The data set (the running interpreter's standard library, split and cached) is
:mod:`splice.data.function_names`; this module holds what scores a model on it: the generation
prompt, the JSON answer's parsing and the metrics (:func:`function_names_task`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from splice.data.function_names import function_name_messages
from splice.data.rows import render_chat
from splice.evaluation.metrics import word_f1
from splice.evaluation.scoring import Task

__all__ = [
    "function_names_task",
    "function_name_prompt",
    "name_metrics",
    "name_words",
    "parse_name",
]


def function_name_prompt(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat-rendered prompt, ending with the generation prompt, to generate a name from."""
    return render_chat(tokenizer, function_name_messages(row)[:-1], generation_prompt=True)


# ----------------------------------------------------------------------------- metrics


def parse_name(text: str) -> str | None:
    """The ``"name"`` string of the first JSON object in ``text`` that has one, else None."""
    decoder = json.JSONDecoder()
    for start in (i for i, char in enumerate(text) if char == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return value["name"]
    return None


def name_words(name: str) -> list[str]:
    """The lowercase words of a snake_case (or camelCase / spaced) name: ``"getHTTP_url"`` ->
    ``["get", "http", "url"]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def name_metrics(predictions: list[str], targets: list[str]) -> dict[str, float]:
    """``json_valid`` (fraction of raw outputs :func:`parse_name` accepts), ``exact_match`` and
    ``word_f1`` (mean multiset F1 of the name words), invalid outputs scoring 0.

    ``predictions`` are raw model outputs; ``targets`` are names (``"read_file"``).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets; pass one per target")
    if not targets:
        raise ValueError("no predictions to score; pass at least one")
    valid = exact = f1 = 0.0
    for output, target in zip(predictions, targets, strict=True):
        name = parse_name(output)
        if name is None:
            continue
        valid += 1
        exact += float(name == target)
        f1 += word_f1(name_words(name), name_words(target))
    n = len(targets)
    return {"json_valid": valid / n, "exact_match": exact / n, "word_f1": f1 / n}


def function_names_task() -> Task:
    """The embedded default task: name a function from its code, answering JSON."""
    return Task(name="function-names", prompt=function_name_prompt,
                reference=lambda row: row["name"], score=name_metrics)
