"""Output processing: token ids to streamed text, with stop strings, per request.

:class:`Detokenizer` decodes incrementally, as vLLM and Hugging Face's streamers do: it keeps two
offsets into the token list, ``prefix_offset`` (the start of a short window decoded again for
context: a SentencePiece leading space, a character split over several byte tokens) and
``read_offset`` (where the text already handed out ends). Each new token decodes the window
``ids[prefix_offset:read_offset]`` and ``ids[prefix_offset:]`` and hands out the difference, so a
step costs two short decodes however long the output grows. The window starts inside the prompt,
so the first generated token gets its leading space right. Text ending in ``\\ufffd`` (an
incomplete UTF-8 character) waits for the next token.

:class:`TextOutput` adds stop strings: the text is cut before the earliest stop string, and the
tail that could still grow into one (a suffix equal to a stop string's proper prefix) is held back
until it no longer can, so no streamed delta ever has to be taken back.

:class:`TokenLogprob` is one generated token's log-probabilities; :class:`TokenTexts` gives a token
id's text and bytes as OpenAI's logprobs report them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

__all__ = ["Detokenizer", "TextOutput", "TokenLogprob", "TokenTexts", "eos_ids", "stop_hold"]

# Prompt tokens decoded with the first output tokens (vLLM's initial incremental offset).
_CONTEXT = 5


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """EOS ids from the model's generation config (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, Sequence):
            ids.update(int(i) for i in source)
    return ids


class Detokenizer:
    """Incremental decoding of one request's output (see module docstring)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> str:
        """The complete text ``token`` adds (may be empty: a partial character waits)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever text is still held (an incomplete character included)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextOutput:
    """One request's text: :meth:`push` a token, get the delta safe to stream and whether a stop
    string ended it; :meth:`finish` at the end for the held-back rest. ``text`` is the output so far
    (cut before a stop string)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.detokenizer = Detokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.text, self.emitted = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        return self._add(self.detokenizer.push(token), final=False)

    def finish(self) -> tuple[str, bool]:
        """The text not yet streamed (a stop string in it still cuts it), and whether one did."""
        return self._add(self.detokenizer.flush(), final=True)

    def _add(self, new: str, *, final: bool) -> tuple[str, bool]:
        start = max(0, len(self.text) - self.longest_stop + 1)  # a stop may begin in older text
        self.text += new
        if self.stop and new:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._take(len(self.text)), True
        safe = len(self.text) if final else len(self.text) - stop_hold(self.text, self.stop)
        return self._take(safe), False

    def _take(self, upto: int) -> str:
        delta = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return delta


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's raw log-probability, and the ``top`` most likely tokens' (id, logprob), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _byte_alphabet() -> Mapping[str, int]:
    """GPT-2's byte-level alphabet reversed: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return MappingProxyType({**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}})


_BYTE_OF = _byte_alphabet()  # a constant (read-only)


def _byte_level(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (a fast one) decodes through the byte-level alphabet (GPT-2, Llama 3, Qwen)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    state = decoder.__getstate__() if decoder is not None else None  # the decoder's JSON
    return isinstance(state, bytes | str) and '"type":"ByteLevel"' in (
        state.decode() if isinstance(state, bytes) else state)


class TokenTexts:
    """Each token id's ``(text, bytes)`` as OpenAI's logprobs report them (cached). The bytes are those
    the token stands for: a byte-level symbol mapped back through the byte alphabet, a SentencePiece
    piece with ``▁`` as a space or its ``<0xHH>`` byte, else the token decoded alone. The text is
    their UTF-8 decoding, or ``bytes:\\xHH...`` when they are part of a character (OpenAI's form)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._byte_level = _byte_level(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        found = self._cache.get(token)
        if found is None:
            data = self._bytes(token)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            found = self._cache[token] = (text, data)
        return found

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str):
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if fallback is not None:
                return bytes([int(fallback.group(1), 16)])
            if not self._byte_level and "\u2581" in piece:
                return piece.replace("\u2581", " ").encode()
        return str(self.tokenizer.decode([token])).encode()
