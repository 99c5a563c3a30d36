"""The OpenAI API's shapes: request bodies, and the answers written from the engine's events.

Bodies (pydantic; null means the default wherever OpenAI accepts it): :class:`CompletionBody` and
:class:`ChatBody` share :class:`SamplingFields`, whose :meth:`~SamplingFields.params` makes the
engine's :class:`~splice.engine.sampling.SamplingParams`. A value out of range is a 400 naming the
parameter, before any work.

Answers: :class:`ChoiceState` gathers one choice from its :class:`~splice.serve.service.Event` s
(``index`` 0 .. n - 1); :class:`Shapes` writes choices, stream chunks and logprobs in OpenAI's formats:

- chat: ``"logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}, ...]}, ...], "refusal": null}``;
- completions: ``"logprobs": {"tokens", "token_logprobs", "top_logprobs": [{text: logprob}, ...],
  "text_offset"}``, each ``top_logprobs`` entry holding the chosen token too (as vLLM does), and
  ``text_offset`` the characters of the choice's token texts before each token.

Log-probabilities are the raw model's (:mod:`splice.engine.sampling`); ``-inf`` is written as
``-9999.0`` (JSON has no infinity; OpenAI and vLLM write the same).
:func:`sse` streams the chunks as server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from splice.core.errors import one_line
from splice.engine.output import TokenLogprob, TokenTexts
from splice.engine.sampling import (
    GREEDY_BELOW,
    MAX_LOGPROBS,
    MAX_N,
    PENALTY_LIMIT,
    SamplingParams,
    bounded_seed,
)
from splice.serve.service import Event, ServeError
from splice.serve.structured import StructuredFields

__all__ = ["ChatBody", "ChatMessage", "ChoiceState", "CompletionBody", "LoadBody", "SamplingFields", "Shapes",
           "StreamOptions", "UnloadBody", "error_response", "message_text", "sse"]

_TOP_K_OFF = 1 << 31  # top_k from here on keeps every token (torch takes it as an int64)
_LOWEST_LOGPROB = -9999.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class SamplingFields(StructuredFields):  # + response_format, guided_* (structured.py)
    """The sampling fields both routes take (see module docstring)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    frequency_penalty: float | None = Field(default=None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)

    @field_validator("temperature")
    @classmethod
    def _greedy_floor(cls, value: float | None) -> float | None:
        return 0.0 if value is not None and value < GREEDY_BELOW else value

    @field_validator("seed")
    @classmethod
    def _bounded_seed(cls, value: int | None) -> int | None:
        return None if value is None else bounded_seed(value)

    @field_validator("top_k")
    @classmethod
    def _bounded_top_k(cls, value: int | None) -> int | None:
        return 0 if value is not None and value >= _TOP_K_OFF else value  # more than any vocabulary: off

    def logprobs_asked(self) -> int | None:
        """How many most likely tokens each generated token's logprobs list (None: no logprobs)."""
        return None

    def params(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise ServeError(400, "stop strings must be non-empty", param="stop")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max
        temperature = 1.0 if self.temperature is None else self.temperature
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(self.top_k or 0, 0),
                                  top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                                  stop=tuple(stop), n=self.n or 1, presence_penalty=self.presence_penalty or 0.0,
                                  frequency_penalty=self.frequency_penalty or 0.0, logprobs=self.logprobs_asked())
        except ValueError as error:  # the engine's own checks: still this request's fault
            raise ServeError(400, one_line(str(error))) from error


class CompletionBody(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprobs_asked(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def error_response(error: ServeError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status)


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        if any(part.get("type") != "text" for part in content):
            raise ServeError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in content)
    return content or ""


@dataclass
class ChoiceState:
    """One choice's answer so far: its text, why it ended, its tokens' count and logprobs, and the
    characters of its token texts (completions' ``text_offset``)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the final event
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0
    chunks: int = 0  # stream chunks sent (chat: the first carries the role)

    def add(self, event: Event) -> None:
        self.text += event.text
        self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason, self.completion_tokens = event.finish_reason, event.completion_tokens


def _logprob(value: float) -> float:
    return max(value, _LOWEST_LOGPROB)


class Shapes:
    """OpenAI's JSON for one request's answer, chat or completions; ``head``: its id, created and model;
    ``logprobs``: whether the request asked for them; ``texts``: token texts (module docstring)."""

    def __init__(self, *, chat: bool, head: dict[str, Any], logprobs: bool, texts: TokenTexts) -> None:
        self.chat, self.head, self.asked, self.texts = chat, head, logprobs, texts
        self.kind = "chat.completion" if chat else "text_completion"

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text, data = self.texts(token)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(data)}

    def logprobs(self, entries: Sequence[TokenLogprob], state: ChoiceState) -> dict[str, Any] | None:
        """The logprobs of ``entries``, the next tokens of ``state``'s choice (None unless asked)."""
        if not self.asked:
            return None
        if self.chat:
            content = [{**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, v) for t, v in e.top]}
                       for e in entries]
            return {"content": content, "refusal": None}
        tokens, offsets = [], []
        for entry in entries:
            offsets.append(state.offset)
            tokens.append(self.texts(entry.token)[0])
            state.offset += len(tokens[-1])
        tops = [{self.texts(t)[0]: _logprob(v) for t, v in ((e.token, e.logprob), *e.top)} for e in entries]
        return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def response(self, choices: Sequence[ChoiceState], usage: dict[str, int]) -> dict[str, Any]:
        """The whole answer (not streamed)."""
        out = []
        for state in choices:
            answer: dict[str, Any] = ({"message": {"role": "assistant", "content": state.text}} if self.chat
                                      else {"text": state.text})
            out.append({"index": state.index, **answer, "finish_reason": state.finish_reason,
                        "logprobs": self.logprobs(state.logprobs, state)})
        return {**self.head, "object": self.kind, "choices": out, "usage": usage}

    def chunk(self, event: Event, state: ChoiceState, *, usage_field: bool) -> str:
        """One server-sent event for ``event`` of ``state``'s choice (chat: the role in its first chunk)."""
        logprobs = self.logprobs(event.logprobs, state)
        if self.chat:
            delta: dict[str, Any] = ({"role": "assistant", "content": event.text} if state.chunks == 0
                                     else {"content": event.text} if event.text else {})
            choice: dict[str, Any] = {"index": state.index, "delta": delta}
        else:
            choice = {"index": state.index, "text": event.text}
        state.chunks += 1
        choice |= {"finish_reason": event.finish_reason, "logprobs": logprobs}
        extra: dict[str, Any] = {"usage": None} if usage_field else {}
        return _data({**self.head, "object": f"{self.kind}.chunk" if self.chat else self.kind,
                      "choices": [choice], **extra})

    def usage_chunk(self, usage: dict[str, int]) -> str:
        return _data({**self.head, "object": f"{self.kind}.chunk" if self.chat else self.kind, "choices": [],
                      "usage": usage})


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def sse(first: Event, events: AsyncIterator[Event], shapes: Shapes, choices: Sequence[ChoiceState], *,
              usage: Callable[[Sequence[ChoiceState]], Awaitable[dict[str, int]]],
              include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, every choice's chunks as they come (each with its
    ``index``); closing the generator cancels the request. With ``include_usage`` (``stream_options``)
    every chunk has ``"usage": null`` and a last chunk with no choices carries the usage, before
    ``[DONE]``. A failure after the first chunk (the engine stopped) is sent as an ``error`` event,
    without ``[DONE]``, so the client sees an error rather than a complete answer."""
    try:
        event: Event | None = first
        while event is not None:
            choices[event.index].add(event)
            yield shapes.chunk(event, choices[event.index], usage_field=include_usage)
            event = await anext(events, None)
        counts = await usage(choices)
        if include_usage:
            yield shapes.usage_chunk(counts)
        yield "data: [DONE]\n\n"
    except ServeError as error:
        yield f"data: {bytes(error_response(error).body).decode()}\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
