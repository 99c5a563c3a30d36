"""The shapes of training data splice recognises by their columns, and the template each gets.

Detected in this order (the first whose columns a row has wins):

==============================  ==================================================================
shape                           columns of one row
==============================  ==================================================================
chat                            ``messages``: ``[{"role": "user"|"assistant"|"system", "content"}]``
ShareGPT                        ``conversations``: ``[{"from": "human"|"gpt"|"system", "value"}]``
Alpaca                          ``instruction``, ``output``, optional ``input``
instruction/response            ``instruction``, ``response``, optional ``context`` or ``input``
prompt/completion               ``prompt``, ``completion``
prompt/response                 ``prompt``, ``response``
input/output                    ``input``, ``output``
==============================  ==================================================================

Any other columns need ``prompt_template`` and ``response_template`` (plain ``{column}`` fields
only: no attribute access, indexing, conversions or format specs). Conversations train on every
assistant turn (``last_turn_only`` for the last one only). Alpaca-style rows render through the
Alpaca prompt (``### Instruction:`` / ``### Input:`` / ``### Response:``), the input section only
when the row has a non-empty input; with ``chat`` the instruction and input become the user turn.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from splice.data.rows import ChatTemplate, PromptTemplate, Template, format_row, template_fields

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "DataFormat", "accepted_shapes", "choose_template",
           "columns_of", "detect_format"]

Row = dict[str, Any]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# ShareGPT speakers -> chat roles (the names seen in ShareGPT, Vicuna and OpenHermes exports).
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system"}


@dataclass(frozen=True)
class DataFormat:
    """One recognised shape: its name, the columns that identify it, and a one-row example."""

    name: str
    columns: tuple[str, ...]
    example: str


FORMATS = (
    DataFormat("chat", ("messages",),
               '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'),
    DataFormat("sharegpt", ("conversations",),
               '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}'),
    DataFormat("alpaca", ("instruction", "output"),
               '{"instruction": "Translate to French", "input": "cat", "output": "chat"}'),
    DataFormat("instruction/response", ("instruction", "response"),
               '{"instruction": "Name a prime", "response": "7"}'),
    DataFormat("prompt/completion", ("prompt", "completion"), '{"prompt": "2+2=", "completion": "4"}'),
    DataFormat("prompt/response", ("prompt", "response"), '{"prompt": "2+2=", "response": "4"}'),
    DataFormat("input/output", ("input", "output"), '{"input": "2+2=", "output": "4"}'),
)


def accepted_shapes() -> str:
    """Every accepted shape in one line, for error messages."""
    shapes = "; ".join(f"{f.name} {{{', '.join(f.columns)}}}" for f in FORMATS)
    return (f"accepted shapes: {shapes} (alpaca may add 'input', instruction/response 'context'); "
            "or any columns with --prompt-template and --response-template, e.g. 'Q: {question}\\nA: ' "
            "and '{answer}'")


def columns_of(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every column any row has (optional ones like Alpaca's ``input`` may start late)."""
    return set().union(*(row.keys() for row in rows))


def detect_format(columns: Collection[str]) -> DataFormat:
    """The first format of :data:`FORMATS` whose columns are all in ``columns``."""
    for shape in FORMATS:
        if set(shape.columns) <= set(columns):
            return shape
    raise ValueError(f"cannot tell prompt from answer in columns {sorted(columns)}: {accepted_shapes()}")


def _column(row: Row, name: str) -> Any:
    if name not in row:
        raise KeyError(f"the row has no {name!r} column (columns: {sorted(row)}); every row needs it")
    return row[name]


def _turns(row: Row, column: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    """``row[column]`` as ``[{"role", "content"}]``, speakers mapped for ShareGPT."""
    value = _column(row, column)
    if not isinstance(value, list) or not value:
        raise TypeError(f"column {column!r} holds a {type(value).__name__}; it must be a non-empty "
                        f"list of {{{role_key!r}, {text_key!r}}} objects")
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, Mapping) or not isinstance(turn.get(text_key), str):
            raise TypeError(f"{column}[{index}] is {turn!r:.60}; each turn must be an object with a "
                            f"{role_key!r} and a string {text_key!r}")
        role = turn.get(role_key)
        if role_key == "from":
            if role not in _SHAREGPT_ROLES:
                raise ValueError(f"{column}[{index}] has 'from' {role!r}; use one of "
                                 f"{', '.join(sorted(_SHAREGPT_ROLES))}")
            role = _SHAREGPT_ROLES[role]
        messages.append({"role": str(role), "content": turn[text_key]})
    return messages


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _alpaca_prompt(input_column: str | None) -> Callable[[Row], str]:
    """The Alpaca prompt of a row: with the input section when the row has a non-empty input."""

    def prompt(row: Row) -> str:
        value = row.get(input_column) if input_column is not None else None
        if value not in (None, ""):
            view = {"instruction": _column(row, "instruction"), "input": value}
            return format_row(ALPACA_PROMPT, view, "prompt")
        return format_row(ALPACA_PROMPT_NO_INPUT, {"instruction": _column(row, "instruction")}, "prompt")

    return prompt


def _alpaca_user(input_column: str | None) -> Callable[[Row], str]:
    """The user turn of an Alpaca row in chat mode: the instruction, then the input if any."""

    def user(row: Row) -> str:
        has_input = input_column is not None and row.get(input_column) not in (None, "")
        template = "{instruction}\n\n{input}" if has_input else "{instruction}"
        view = {"instruction": _column(row, "instruction"), "input": row.get(input_column or "")}
        return format_row(template, view, "prompt")

    return user


def _plain(prompt: str | Callable[[Row], str], response: str, *, chat: bool, system: str | None,
           last_turn_only: bool) -> Template:
    """A prompt/answer pair as text, or (``chat``) as a user and an assistant turn."""
    if not chat:
        return PromptTemplate(prompt, response)

    def messages(row: Row) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": format_row(prompt, row, "prompt")},
                 {"role": "assistant", "content": format_row(response, row, "response")}]
        return _with_system(turns, system)

    return ChatTemplate(messages, last_turn_only=last_turn_only)


def choose_template(
    columns: Collection[str],
    *,
    prompt_template: str | None = None,
    response_template: str | None = None,
    chat: bool = False,
    system_prompt: str | None = None,
    last_turn_only: bool = False,
) -> Template:
    """The template for rows with ``columns``: from the given templates, else by
    :func:`detect_format`. ``chat`` renders prompt/answer shapes through the tokenizer's chat
    template (conversations always are); ``system_prompt`` leads every conversation that has no
    system turn of its own."""
    if (prompt_template is None) != (response_template is None):
        raise ValueError("give both --prompt-template and --response-template (or neither)")
    if prompt_template is not None and response_template is not None:
        template_fields(prompt_template, "prompt")  # plain {column} fields only, refused before any row
        template_fields(response_template, "response")
        return _plain(prompt_template, response_template, chat=chat, system=system_prompt,
                      last_turn_only=last_turn_only)
    shape = detect_format(columns)
    if shape.name == "chat":
        return ChatTemplate(lambda row: _with_system(_turns(row, "messages", "role", "content"), system_prompt),
                            last_turn_only=last_turn_only)
    if shape.name == "sharegpt":
        return ChatTemplate(lambda row: _with_system(_turns(row, "conversations", "from", "value"), system_prompt),
                            last_turn_only=last_turn_only)
    if shape.name in ("alpaca", "instruction/response"):
        answer = "{output}" if shape.name == "alpaca" else "{response}"
        extra = next((c for c in ("input", "context") if c in columns), None)
        prompt = _alpaca_user(extra) if chat else _alpaca_prompt(extra)
        return _plain(prompt, answer, chat=chat, system=system_prompt, last_turn_only=last_turn_only)
    first, second = shape.columns
    return _plain("{" + first + "}", "{" + second + "}", chat=chat, system=system_prompt,
                  last_turn_only=last_turn_only)
