"""Preference pairs for DPO: rows ``{"prompt", "chosen", "rejected"}``, in TRL's conventions.

Two shapes (every row of a file the same):

* text: the three columns are strings; the answers get the eos token (unless they end with it);
* conversational: ``prompt`` is a list of ``{"role", "content"}`` messages ending with a user turn,
  ``chosen`` and ``rejected`` lists of assistant messages; rendered with the tokenizer's chat
  template (``prompt`` with the generation prompt, ``prompt + chosen`` as a whole conversation).

Tokenized as TRL's ``DPOTrainer`` (1.x): the prompt alone, prompt + chosen and prompt + rejected,
each tokenized whole; the answers start where the tokenized prompt and prompt + answer first
differ (tokens may merge across the boundary). Rows with an answer past ``max_length`` are cut
there (``truncated``); rows whose prompt alone takes ``max_length`` tokens are dropped.

A batch of ``b`` pairs holds ``2b`` rows, the chosen answers then the rejected ones (TRL's order):
``input_ids``, ``attention_mask``, ``labels`` (2b, T) right-padded (labels -100 except on answer
tokens, unshifted); ``pair_weight`` (b,) 1.0, or 0.0 for a placeholder pair (a rank whose share of
the last global batch is empty); ``ref_logps`` (2b,) when the reference log-probs are known;
``num_tokens`` the real tokens.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splice.data.rows import IGNORE_INDEX, ChatTemplate, PromptTemplate, Row, Template, row_error

__all__ = ["PAIR_COLUMNS", "Pair", "TokenizedPairs", "check_pairs", "pair_batch", "pair_batches", "pair_template",
           "tokenize_pairs", "wrong_shape"]

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
_EXAMPLE = ('{"prompt": "2+2=", "chosen": "4", "rejected": "5"}, or chat messages: {"prompt": [{"role": "user", '
            '"content": "2+2="}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [...]}')


@dataclass(frozen=True)
class Pair:
    """One tokenized pair; ``ref``: the reference model's (chosen, rejected) log-probs, once known."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None


@dataclass(frozen=True)
class TokenizedPairs:
    pairs: list[Pair]
    truncated: int  # pairs with an answer cut at max_length
    dropped: int  # pairs whose prompt alone took max_length tokens


def wrong_shape(columns: set[str], where: str) -> str | None:
    """Why rows with ``columns`` are not preference pairs (a line naming ``where`` and the fix), or None."""
    missing = [c for c in PAIR_COLUMNS if c not in columns]
    if not missing:
        return None
    hint = ""
    if {"chosen", "rejected"} <= columns:
        hint = " (rows holding whole conversations in chosen/rejected: move the shared turns to a prompt column)"
    elif columns & {"completion", "response", "output", "messages", "conversations"}:
        hint = "; these rows are supervised examples: train them with --method sft"
    return (f"{where}: --method dpo needs prompt, chosen and rejected columns; the data has "
            f"{', '.join(sorted(columns)) or 'no columns'} (missing {', '.join(missing)}){hint}. A row: {_EXAMPLE}")


def _messages(value: Any, column: str, roles: set[str]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise TypeError(f"{column!r} holds {type(value).__name__}; with chat-message rows it must be a "
                        "non-empty list of {'role', 'content'} messages")
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise TypeError(f"{column}[{index}] is {message!r:.60}; each message must be an object with a "
                            "'role' and a string 'content'")
        if message.get("role") not in roles:
            raise ValueError(f"{column}[{index}] has role {message.get('role')!r}; {column} messages take "
                             f"the roles {', '.join(sorted(roles))}")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


def is_chat(row: Row) -> bool:
    return isinstance(row.get("prompt"), list)


def _check_pair(row: Row) -> None:
    if not isinstance(row, Mapping):
        raise TypeError(f"the row is a {type(row).__name__}; it must be an object with prompt, chosen, rejected")
    missing = [c for c in PAIR_COLUMNS if c not in row]
    if missing:
        raise KeyError(f"the row has no {', '.join(missing)} (columns: {', '.join(sorted(row))}); every row "
                       "needs prompt, chosen and rejected")
    if not is_chat(row):
        for column in PAIR_COLUMNS:
            if not isinstance(row[column], str):
                raise TypeError(f"{column!r} holds {type(row[column]).__name__}; with a text prompt chosen "
                                "and rejected are strings too (or give every column as chat messages)")
        return
    prompt = _messages(row["prompt"], "prompt", {"system", "user", "assistant"})
    if prompt[-1]["role"] != "user":
        raise ValueError(f"the prompt ends with a {prompt[-1]['role']!r} message; end it with the user "
                         "turn the answers reply to")
    for column in ("chosen", "rejected"):
        _messages(row[column], column, {"assistant"})


def check_pairs(rows: Sequence[Row], *, where: str) -> None:
    """Every row is a pair of one shape (module doc); a ValueError naming ``where``, the row and the fix."""
    first_chat: bool | None = None
    for number, row in enumerate(rows, start=1):
        try:
            _check_pair(row)
            if first_chat is None:
                first_chat = is_chat(row)
            elif is_chat(row) != first_chat:
                raise TypeError("its prompt is " + ("chat messages" if is_chat(row) else "text") + " but row 1's "
                                "is " + ("chat messages" if first_chat else "text") + ": give every row one shape")
        except (TypeError, ValueError, KeyError) as error:
            raise row_error(error, number, where) from error


def pair_template(rows: Sequence[Row]) -> Template:
    """Renders a pair's prompt and its chosen answer (the reference of generation scoring)."""
    if rows and is_chat(rows[0]):
        return ChatTemplate(lambda row: [*row["prompt"], *row["chosen"]], last_turn_only=True)
    return PromptTemplate("{prompt}", "{chosen}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=True)["input_ids"]
    return list(ids)


def _pair_ids(tokenizer: Any, row: Row) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of one row, split as TRL does (module doc)."""
    if is_chat(row):
        prompt = _chat_ids(tokenizer, row["prompt"], generation_prompt=True)
        full = [_chat_ids(tokenizer, row["prompt"] + row[c], generation_prompt=False) for c in ("chosen", "rejected")]
    else:
        eos = tokenizer.eos_token

        def text(answer: str) -> str:
            return row["prompt"] + (answer if answer.endswith(eos) else answer + eos)

        prompt = list(tokenizer(row["prompt"])["input_ids"])
        full = [list(tokenizer(text(row[c]))["input_ids"]) for c in ("chosen", "rejected")]
    cut = min(_common_prefix(prompt, ids) for ids in full)
    return prompt[:cut], full[0][cut:], full[1][cut:]


def tokenize_pairs(rows: Sequence[Row], tokenizer: Any, *, max_length: int) -> TokenizedPairs:
    """Rows -> :class:`Pair` token ids (module doc); a row that fails names its (1-based) number."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token so answers can end")
    if rows and is_chat(rows[0]) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat-message pairs need a tokenizer with a chat template, and this one has none; "
                         "give the pairs as text or set tokenizer.chat_template")
    pairs: list[Pair] = []
    truncated = dropped = 0
    for number, row in enumerate(rows, start=1):
        try:
            prompt, chosen, rejected = _pair_ids(tokenizer, row)
        except (TypeError, ValueError, KeyError) as error:
            raise row_error(error, number, "data") from error
        if len(prompt) >= max_length:
            dropped += 1
            continue
        room = max_length - len(prompt)
        truncated += len(chosen) > room or len(rejected) > room
        pairs.append(Pair(prompt=prompt, chosen=chosen[:room], rejected=rejected[:room]))
    if not pairs:
        raise ValueError(f"all {len(rows)} pairs were dropped: every prompt has >= max_length={max_length} "
                         "tokens; raise max_length or shorten the prompts")
    return TokenizedPairs(pairs=pairs, truncated=truncated, dropped=dropped)


def pair_batch(pairs: Sequence[Pair], *, pad_id: int, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One batch of ``pairs`` (module doc); ``weight`` 0: placeholder pairs that count for nothing."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        labels[i, len(prompt):n] = torch.tensor(answer)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "pair_weight": torch.full((len(pairs),), weight),
             "num_tokens": mask.sum() if weight else torch.tensor(0)}
    refs = [p.ref for p in pairs]
    if all(r is not None for r in refs):
        batch["ref_logps"] = torch.tensor([r[0] for r in refs if r] + [r[1] for r in refs if r], dtype=torch.float32)
    return batch


def pair_batches(pairs: Sequence[Pair], *, batch_size: int, pad_id: int, seed: int, epoch: int, rank: int = 0,
                 world: int = 1, shuffle: bool = True) -> list[dict[str, torch.Tensor]]:
    """Rank ``rank``'s batches of one epoch: global batches of ``batch_size * world`` pairs in an
    order fixed by (seed, epoch), rank ``r`` of ``N`` taking pairs ``[r*n//N, (r+1)*n//N)`` of each
    (an empty share: the batch's first pair as a placeholder of weight 0, so every rank steps)."""
    if not pairs:
        raise ValueError("no pairs to batch")
    order = list(range(len(pairs)))
    if shuffle:
        random.Random(f"splice.pairs:{seed}:{epoch}").shuffle(order)
    size = batch_size * world
    result = []
    for start in range(0, len(order), size):
        group = [pairs[i] for i in order[start:start + size]]
        share = group[rank * len(group) // world:(rank + 1) * len(group) // world]
        result.append(pair_batch(share, pad_id=pad_id) if share else pair_batch(group[:1], pad_id=pad_id, weight=0.0))
    return result
