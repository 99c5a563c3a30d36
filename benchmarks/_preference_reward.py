"""The GRPO reward of ``benchmarks/preference.py``, for both frameworks: splice imports it by path
(``--reward FILE.py:FUNCTION``), TRL gets the function. A file of its own: splice imports a reward
file as a fresh module, which the benchmark script itself (a dataclass module) cannot be."""

from __future__ import annotations

import re
from typing import Any

EVEN = re.compile(r"\bt\d*[02468]\b")  # a word of the benchmark's tokenizer with an even token id


def even_words(completions: list[Any], **_: Any) -> list[float]:
    """The share of each completion's words that are even token ids (a random model scores about 0.5,
    with some spread, so a group's advantages are not all zero)."""
    texts = [c if isinstance(c, str) else str(c[-1]["content"]) for c in completions]
    return [len(EVEN.findall(text)) / max(1, len(text.split())) for text in texts]
