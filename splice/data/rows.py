"""Training data: reading rows, rendering them through a template, tokenizing.

Pipeline: ``read_rows`` -> ``split_rows`` -> ``tokenize_rows`` (template -> prompt + answer
tokens, labels -100 on the prompt) -> :func:`splice.data.batching.batches` (padded or packed tensors,
deterministic for a seed and epoch). Labels are NOT shifted: position ``t`` holds token ``t``; the loss shifts.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplate",
    "Example",
    "PromptTemplate",
    "Template",
    "TokenizedData",
    "read_rows",
    "render_chat",
    "split_rows",
    "tokenize_rows",
]

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
Row = dict[str, Any]

_READERS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_ACCEPTED = "parquet (.parquet/.pq), JSON lines (.jsonl/.json), CSV (.csv)"


# ----------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # a .json file holding one list of objects
        try:
            return list(json.loads(text))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix the file or write JSON lines") from error
    rows = []
    # split("\n"), not splitlines(): U+2028 and friends may sit unescaped inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one JSON object"
                ) from error
    return rows


def _read_file(path: Path) -> list[Row]:
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot read {path}: unknown extension {path.suffix!r}. Accepted: {_ACCEPTED}.")
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    # Every CSV column stays text: type inference would turn "007" into 7 and lose data.
    names = pa_csv.open_csv(path).schema.names
    options = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    return pa_csv.read_csv(path, convert_options=options).to_pylist()


def read_rows(source: str | Path | Any) -> list[dict[str, Any]]:
    """Rows (dicts of column -> value) from a file or an in-memory dataset.

    ``source``: a parquet, JSON-lines or CSV path; an object with ``to_list()`` (a Hugging Face
    ``datasets.Dataset``) or ``to_pylist()`` (a ``pyarrow.Table``); or an iterable of dicts.
    """
    rows: list[Any]
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist; pass an existing {_ACCEPTED} file")
        rows, where = (_read_file(path) if path.stat().st_size else []), str(path)
    elif callable(getattr(source, "to_list", None)):
        rows, where = list(source.to_list()), type(source).__name__
    elif callable(getattr(source, "to_pylist", None)):
        rows, where = list(source.to_pylist()), type(source).__name__
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        rows, where = list(source), type(source).__name__
    else:
        raise TypeError(
            f"cannot read rows from a {type(source).__name__}; pass a file path ({_ACCEPTED}), "
            "a datasets.Dataset, a pyarrow.Table or a list of dicts"
        )
    if not rows:
        raise ValueError(f"{where} holds no rows; pass a data set with at least one row")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"{where}: row {index} is a {type(row).__name__}, not a dict of column -> value; "
                "every row must be one object/record"
            )
    return [dict(row) for row in rows]


def split_rows(rows: Sequence[Row], *, val_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split ``rows`` into (train, validation) at random but deterministically for ``seed``.

    Validation gets ``round(len(rows) * val_fraction)`` rows (at least one when the fraction is
    positive); both parts keep the rows' original order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is outside [0, 1); pass e.g. 0.1 for 10%")
    n = len(rows)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} rows leaves no training rows; lower it or add rows"
        )
    order = list(range(n))
    random.Random(f"splice.split:{seed}").shuffle(order)
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


# ----------------------------------------------------------------------------- templates


def _format(template: str | Callable[[Row], str], row: Row, what: str) -> str:
    if callable(template):
        text = template(row)
        if not isinstance(text, str):
            raise TypeError(f"the {what} function returned a {type(text).__name__}; it must return a str")
        return text
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        column = field.split(".")[0].split("[")[0]
        if column == "" or column.isdigit():
            raise ValueError(
                f"the {what} template {template!r} has a positional field {{{field}}}; name a column "
                "instead, e.g. {question} (write literal braces as {{ and }})"
            )
        if column not in row:
            raise KeyError(
                f"the {what} template uses column {column!r}, but the data has columns "
                f"{sorted(row)}; rename the field in the template or the column in the data"
            )
    return template.format_map(row)


@dataclass(frozen=True)
class PromptTemplate:
    """Plain-text prompt and response, each a ``str.format`` template over a row's columns
    (``"Q: {question}\\nA:"``; literal braces as ``{{``/``}}``) or a function of the row.

    The response is tokenized on its own and followed by the eos token.
    """

    prompt: str | Callable[[Row], str]
    response: str | Callable[[Row], str]

    def render(self, row: Row) -> tuple[str, str]:
        """(prompt text, response text) for one row."""
        return _format(self.prompt, row, "prompt"), _format(self.response, row, "response")


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation per row, rendered with the tokenizer's chat template.

    ``messages(row)`` returns ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``;
    the LAST message must be the assistant's answer, and only it is trained on.
    """

    messages: Callable[[Row], list[dict[str, str]]]

    def render(self, row: Row) -> list[dict[str, str]]:
        """The row's validated conversation."""
        messages = self.messages(row)
        if not isinstance(messages, list) or not messages:
            raise TypeError("ChatTemplate.messages must return a non-empty list of {'role', 'content'} dicts")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise TypeError(
                    f"message {index} is {message!r}; each message must be a dict with a 'role' and "
                    "a str 'content'"
                )
        if messages[-1].get("role") != "assistant":
            raise ValueError(
                f"the last message has role {messages[-1].get('role')!r}; it must be the 'assistant' "
                "answer the model is trained to produce"
            )
        return [dict(m) for m in messages]


Template = PromptTemplate | ChatTemplate


# ----------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Example:
    """One tokenized row: ``labels[t] == input_ids[t]`` where trained on, else -100 (unshifted)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")


@dataclass(frozen=True)
class TokenizedData:
    """Tokenized rows; ``truncated`` rows lost answer tokens to max_length, ``dropped`` rows had
    prompts of max_length tokens or more and are not in ``examples``."""

    examples: list[Example]
    truncated: int
    dropped: int


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    """``messages`` rendered as text by the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned a {type(text).__name__}, not text; check the tokenizer")
    return text


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids ending with the generation prompt, answer ids) for one conversation."""
    prompt_text = render_chat(tokenizer, messages[:-1], generation_prompt=True)
    full_text = render_chat(tokenizer, messages, generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the tokenizer's chat template renders the prompt (with generation prompt) so that it is "
            "not a prefix of the full conversation, so the answer cannot be located; use a template "
            f"without per-turn rewriting. Prompt ends {prompt_text[-60:]!r}, conversation has "
            f"{full_text[len(prompt_text) - 60:len(prompt_text)]!r} there."
        )
    # The answer is tokenized apart from the prompt: generation sees exactly the prompt's tokens and
    # continues from them, so tokens merged across the boundary would never be produced.
    # The rendered text already holds any BOS the template wants: no special tokens added.
    prompt = _ids(tokenizer, prompt_text, special=False)
    answer = _ids(tokenizer, full_text[len(prompt_text):], special=False)
    eos = tokenizer.eos_token_id
    if eos in answer:  # end at the turn's eos; drop what follows (ChatML's "\n")
        answer = answer[: len(answer) - answer[::-1].index(eos)]
    else:
        answer.append(eos)
    return prompt, answer


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: Template,
    max_length: int,
    train_on_prompt: bool = False,
) -> TokenizedData:
    """Tokenize rows into prompt + answer examples of at most ``max_length`` tokens.

    The answer ends with the eos token so the model learns to stop. Prompt tokens get label -100
    unless ``train_on_prompt``. A row whose answer does not fit is cut at ``max_length``
    (``truncated``); a row whose prompt alone takes ``max_length`` tokens has no answer token left
    and is dropped (``dropped``).
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r}; it must be an int >= 2 (prompt + answer tokens)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token so answers can end")
    if not rows:
        raise ValueError("no rows to tokenize; pass at least one row")
    if isinstance(template, ChatTemplate) and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "ChatTemplate needs a tokenizer with a chat template, and this one has none; use a "
            "PromptTemplate, or set tokenizer.chat_template to a Jinja template"
        )
    examples: list[Example] = []
    truncated = dropped = 0
    longest_prompt = 0
    for row in rows:
        if isinstance(template, ChatTemplate):
            prompt, answer = _chat_ids(tokenizer, template.render(row))
        elif isinstance(template, PromptTemplate):
            prompt_text, answer_text = template.render(row)
            prompt = _ids(tokenizer, prompt_text, special=True)
            answer = _ids(tokenizer, answer_text, special=False) + [tokenizer.eos_token_id]
        else:
            raise TypeError(f"template is a {type(template).__name__}; pass a PromptTemplate or ChatTemplate")
        longest_prompt = max(longest_prompt, len(prompt))
        if len(prompt) >= max_length:
            dropped += 1
            continue
        ids = prompt + answer
        if len(ids) > max_length:
            ids = ids[:max_length]
            truncated += 1
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        examples.append(Example(input_ids=ids, labels=labels))
    if not examples:
        raise ValueError(
            f"all {len(rows)} rows were dropped: every prompt has >= max_length={max_length} tokens "
            f"(longest prompt: {longest_prompt}); raise max_length or shorten the prompts"
        )
    return TokenizedData(examples=examples, truncated=truncated, dropped=dropped)
