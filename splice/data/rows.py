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

from splice.core.io import MAX_LINE_BYTES, check_line_lengths, read_utf8
from splice.core.progress import progress

__all__ = [
    "is_saved_dataset",
    "IGNORE_INDEX",
    "ChatTemplate",
    "Example",
    "PromptTemplate",
    "Template",
    "TokenizedData",
    "chat_segments",
    "check_template",
    "describe_source",
    "format_row",
    "read_rows",
    "render_chat",
    "row_error",
    "split_rows",
    "template_fields",
    "tokenize_rows",
]

IGNORE_INDEX = -100  # label value the cross-entropy loss skips
Row = dict[str, Any]

_READERS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
_ACCEPTED = "parquet (.parquet/.pq), JSON lines (.jsonl/.json), CSV (.csv)"


# ----------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, max_line_bytes: int) -> list[Row]:
    with path.open("rb") as f:  # a .json list is one document: its lines may be any length
        if not f.read(4096).lstrip().startswith(b"["):
            check_line_lengths(path, max_line_bytes=max_line_bytes)
    _, text = read_utf8(path)
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


def _read_file(path: Path, max_line_bytes: int) -> list[Row]:
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot read {path}: unknown extension {path.suffix!r}. Accepted: {_ACCEPTED}.")
    if kind == "jsonl":
        return _read_jsonl(path, max_line_bytes)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    check_line_lengths(path, max_line_bytes=max_line_bytes)
    data, _ = read_utf8(path)  # checked here: pyarrow's own decoding error names no line
    # Every CSV column stays text: type inference would turn "007" into 7 and lose data.
    # One block for the whole (already read) file: a row longer than a block (1 MB by default)
    # would fail as "straddling object straddles two block boundaries".
    blocks = pa_csv.ReadOptions(block_size=min(len(data) + 1, 2**31 - 1))
    names = pa_csv.open_csv(pa.BufferReader(data), read_options=blocks).schema.names
    options = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    return pa_csv.read_csv(pa.BufferReader(data), read_options=blocks, convert_options=options).to_pylist()


_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _read_saved_dataset(path: Path) -> list[Row]:
    """The rows of a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict: its
    "train" split)."""
    if not is_saved_dataset(path):
        raise ValueError(
            f"{path} is a folder, not a data file, and not one written by datasets' save_to_disk "
            f"(no {' or '.join(_SAVED_MARKERS)}); pass a {_ACCEPTED} file or a save_to_disk folder"
        )
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"{path} was written by datasets' save_to_disk; reading it needs the datasets "
                         "library: pip install 'splice[datasets]'") from error
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path} holds splits {sorted(loaded)} and no 'train'; pass the split's "
                             f"own folder, e.g. {path / sorted(loaded)[0]}")
        loaded = loaded["train"]
    return list(loaded.to_list())


def describe_source(source: Any) -> str:
    """A short name for a data source: its path, or e.g. ``"list of 48 rows"`` for objects (a
    log or a run_config.json never holds a whole in-memory data set)."""
    if source is None or isinstance(source, (str, Path)):
        return str(source)
    size = len(source) if hasattr(source, "__len__") else None
    return f"{type(source).__name__} of {size} rows" if size is not None else type(source).__name__


def read_rows(source: str | Path | Any, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[dict[str, Any]]:
    """Rows (dicts of column -> value) from a file or an in-memory dataset.

    ``source``: a parquet, JSON-lines or CSV path; a folder written by ``datasets``'
    ``Dataset.save_to_disk`` (needs the ``datasets`` extra); an object with ``to_list()`` (a
    Hugging Face ``datasets.Dataset``) or ``to_pylist()`` (a ``pyarrow.Table``); or an iterable
    of dicts. A JSON-lines or CSV line over ``max_line_bytes`` is refused (file and line named)
    before the file is read whole.
    """
    rows: list[Any]
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
        rows, where = _read_saved_dataset(path), str(path)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist; pass an existing {_ACCEPTED} file")
        rows, where = (_read_file(path, max_line_bytes) if path.stat().st_size else []), str(path)
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


def format_row(template: str | Callable[[Row], str], row: Row, what: str) -> str:
    """``template`` (a ``str.format`` string over the columns, or a function) filled from ``row``;
    ``what`` names it in errors ("prompt", "response")."""
    if callable(template):
        text = template(row)
        if not isinstance(text, str):
            raise TypeError(f"the {what} function returned a {type(text).__name__}; it must return a str")
        return text
    for column in template_fields(template, what):
        if column not in row:
            raise KeyError(
                f"the {what} template uses column {column!r}, but the data has columns "
                f"{sorted(row)}; rename the field in the template or the column in the data"
            )
        _check_value(row[column], column)
    return template.format_map(row)


def template_fields(template: str, what: str) -> list[str]:
    """The columns ``template`` names. Only plain ``{column}`` fields are allowed: attribute access,
    indexing, conversions and format specs (``{q.__class__}``, ``{q[0]}``, ``{q!r}``, ``{q:>9}``)
    would let a template reach into Python objects, so each is one ValueError naming the field."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"the {what} template {template!r} is not a format string ({error}); write "
                         "literal braces as {{ and }}") from None
    columns = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(f"the {what} template {template!r} has a positional field {{{field}}}; name a "
                             "column instead, e.g. {question} (write literal braces as {{ and }})")
        if spec or conversion or any(c in field for c in ".["):
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"the {what} template {template!r} has the field {{{shown}}}; only plain "
                             "{column} fields are allowed (no attributes, indexing, conversions or format "
                             "specs): format the column in the data, or pass a template function")
        columns.append(field)
    return columns


def _check_value(value: Any, column: str) -> None:
    """Template columns hold text; numbers are written as text on purpose (``str.format``).
    Anything else (null, bool, list, dict) would be trained on as its Python repr."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise TypeError(
        f"column {column!r} holds {shown} ({type(value).__name__}); template columns must be "
        "strings or numbers: fix the value, drop the row, or pass a template function"
    )


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
        return format_row(self.prompt, row, "prompt"), format_row(self.response, row, "response")


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation per row, rendered with the tokenizer's chat template.

    ``messages(row)`` returns ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``;
    the LAST message must be an assistant turn. Every assistant turn is trained on (its content
    and end-of-turn token); with ``last_turn_only`` only the last one, the earlier turns being
    context like the user's.
    """

    messages: Callable[[Row], list[dict[str, str]]]
    last_turn_only: bool = False

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


def _assistant_turn(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], index: int,
                    full_text: str) -> tuple[int, int]:
    """(start, end) characters of assistant turn ``index`` in the rendered conversation: from the
    end of the generation prompt that precedes it to the end of the turn."""
    if index == 0:
        raise ValueError("the conversation starts with an assistant turn; put a user turn before it")
    prompt_text = render_chat(tokenizer, messages[:index], generation_prompt=True)
    last = index == len(messages) - 1  # the whole conversation: no second render
    turn_text = full_text if last else render_chat(tokenizer, messages[: index + 1], generation_prompt=False)
    if not (full_text.startswith(prompt_text) and turn_text.startswith(prompt_text)
            and full_text.startswith(turn_text)):
        raise ValueError(
            "the tokenizer's chat template renders the prompt (with generation prompt) so that it is "
            "not a prefix of the full conversation, so the answer cannot be located; use a template "
            "without per-turn rewriting (or train the last turn only). Prompt ends "
            f"{prompt_text[-60:]!r}, conversation has "
            f"{full_text[len(prompt_text) - 60:len(prompt_text)]!r} there."
        )
    return len(prompt_text), len(turn_text)


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *,
                  last_turn_only: bool = False) -> list[tuple[list[int], bool]]:
    """A conversation as token segments ``(ids, trained)``: context, then each trained assistant
    turn (its content through the end-of-turn eos), in order. Concatenated they are the rendered
    conversation (what follows the final eos, e.g. ChatML's newline, is dropped)."""
    full_text = render_chat(tokenizer, messages, generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if last_turn_only:
        turns = turns[-1:]
    eos = tokenizer.eos_token_id
    segments: list[tuple[list[int], bool]] = []
    done = 0  # characters of full_text already in segments
    for index in turns:
        start, end = _assistant_turn(tokenizer, messages, index, full_text)
        if start < done:
            raise ValueError("the chat template renders an assistant turn inside an earlier one; "
                             "train the last turn only")
        # Each answer is tokenized apart from its prompt: generation sees exactly the prompt's
        # tokens and continues from them, so tokens merged across the boundary would never be
        # produced. The rendered text already holds any BOS the template wants.
        context = _ids(tokenizer, full_text[done:start], special=False)
        answer = _ids(tokenizer, full_text[start:end], special=False)
        after: list[int] = []
        if eos in answer:  # the turn ends at its eos; what follows (ChatML's "\n") is context
            cut = len(answer) - answer[::-1].index(eos)
            answer, after = answer[:cut], answer[cut:]
        else:
            answer.append(eos)
        segments += [(context, False), (answer, True)]
        if after:
            segments.append((after, False))
        done = end
    if segments and not segments[-1][1]:
        segments.pop()  # the last turn's trailing text: nothing is trained after the final eos
    return segments


def row_error(error: Exception, number: int, where: str) -> ValueError:
    """``error`` from rendering row ``number`` (1-based) as one ValueError naming the row."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return ValueError(f"{where}, row {number}: {text}")


def check_template(rows: Sequence[Row], template: Template, *, where: str = "data") -> None:
    """Render every row (no tokenizer needed), so a bad row is named before any model loads."""
    for number, row in enumerate(rows, start=1):
        try:
            template.render(row)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise row_error(error, number, where) from error


def _segments(tokenizer: PreTrainedTokenizerBase, template: Template, row: Row) -> list[tuple[list[int], bool]]:
    """One row as ``(ids, trained)`` segments: prompt then answer, or a conversation's turns."""
    if isinstance(template, ChatTemplate):
        return chat_segments(tokenizer, template.render(row), last_turn_only=template.last_turn_only)
    prompt_text, answer_text = template.render(row)
    answer = _ids(tokenizer, answer_text, special=False) + [tokenizer.eos_token_id]
    return [(_ids(tokenizer, prompt_text, special=True), False), (answer, True)]


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
    unless ``train_on_prompt``; a conversation trains every assistant turn (see
    :class:`ChatTemplate`). A row that cannot be rendered is a ValueError naming its (1-based) row. A row whose answer does not fit is cut at ``max_length``
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
    if not isinstance(template, (ChatTemplate, PromptTemplate)):
        raise TypeError(f"template is a {type(template).__name__}; pass a PromptTemplate or ChatTemplate")
    for number, row in enumerate(progress(rows, desc="tokenizing", unit="row"), start=1):
        try:
            segments = _segments(tokenizer, template, row)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise row_error(error, number, "data") from error
        prompt_length = len(segments[0][0]) if not segments[0][1] else 0
        longest_prompt = max(longest_prompt, prompt_length)
        if prompt_length >= max_length:
            dropped += 1
            continue
        ids = [t for part, _ in segments for t in part]
        labels = [t if trained or train_on_prompt else IGNORE_INDEX for part, trained in segments for t in part]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        examples.append(Example(input_ids=ids, labels=labels))
    if not examples:
        raise ValueError(
            f"all {len(rows)} rows were dropped: every prompt has >= max_length={max_length} tokens "
            f"(longest prompt: {longest_prompt}); raise max_length or shorten the prompts"
        )
    return TokenizedData(examples=examples, truncated=truncated, dropped=dropped)
