"""A generation request: its prompt, sampling options, callback, and the state the engine fills in.

A request with ``params.n > 1`` has ``n`` :attr:`Request.choices` (see :class:`Request`); the engine
schedules the first and forks the others from it once the prompt is computed
(:mod:`splice.engine.engine`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from splice.engine.constraints import Matcher
from splice.engine.output import TextOutput, TokenLogprob
from splice.engine.sampling import SamplingParams

__all__ = ["OnEvent", "Request", "finisher"]


# on_event(text_delta, finish_reason): finish_reason None while running, then "stop" / "length" /
# "cancelled" / "error: <why>"
OnEvent = Callable[[str, str | None], None]


def _ignore(text: str, reason: str | None) -> None:
    return None


def finisher(request: Request, on_finish: Callable[[Request], None]) -> OnEvent:
    """An ``on_event`` that calls ``on_finish(request)`` at the final event of the last of its choices."""

    def on_event(text: str, reason: str | None) -> None:
        if reason is not None and all(choice.finished for choice in request.choices):
            on_finish(request)

    return on_event


@dataclass(eq=False, kw_only=True)
class Request:
    """One generation request. After it finishes, ``generated`` holds its token ids (EOS excluded),
    ``text`` the text streamed, ``finish_reason`` why it ended and ``logprobs`` (when its params ask)
    one :class:`~splice.engine.output.TokenLogprob` per generated token.

    ``choices``: its ``params.n`` choices, itself first (index 0); the others are made here, each
    a request of its own (``index`` i, params ``params.choice(i)``, the same prompt, adapter and
    ``cancelled``, ``on_event`` this one's until the caller sets its own). Submit only this one."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: OnEvent = _ignore
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    finished: bool = False
    started: bool = False  # scheduled once (or ended before): no longer counts as waiting
    output: TextOutput | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
    counts_slot: int | None = None  # its row of the engine's TokenCounts (penalties)
    matcher: Matcher | None = field(default=None, repr=False)  # its grammar state (params.constraint)
    index: int = 0  # which of the n choices
    choices: list[Request] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.choices:
            self.choices = [self, *(
                Request(prompt_ids=self.prompt_ids, params=self.params.choice(i), on_event=self.on_event,
                        adapter=self.adapter, cancelled=self.cancelled, started=True, index=i)
                for i in range(1, self.params.n))]
