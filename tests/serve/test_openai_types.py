"""splice.serve.openai_types through a real server (CPU, tiny Llama) and the real ``openai`` client:
n choices (streamed and not, seeded per choice, the prompt computed once), logprobs in the chat and
completions formats against the model's own log-softmax, penalties, and a 400 naming each bad value."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import torch

from splice.engine.engine import Engine
from splice.engine.output import TokenTexts
from splice.engine.sampling import SamplingParams
from splice.serve.server import running
from splice.serve.service import Service
from tests import tiny
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

PROMPT = "the cat sat on"


class Server:
    def __init__(self, url: str, service: Service) -> None:
        self.url, self.service, self.tokenizer = url, service, service.tokenizer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0)

    def ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def token_ids(self, texts: list[str]) -> list[int]:
        """The ids of tokens named by their logprobs text (each text is one token's in the tiny vocabulary)."""
        names = TokenTexts(self.tokenizer)
        by_text = {names(i)[0]: i for i in range(len(self.tokenizer))}
        return [by_text[t] for t in texts]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    service = Service(build_tiny_llama(len(build_tiny_tokenizer())), build_tiny_tokenizer(), model_name="tiny",
                      max_batch=8, max_len=128)
    with running(service) as url:
        yield Server(url, service)


def _log_softmax(ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float64 log-probabilities of the served model's next tokens, by a plain forward."""
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _fed(choice_tokens: int, reason: str | None) -> int:
    """Tokens of a choice the model computed after the prompt: all but the last, unless EOS came after it."""
    return choice_tokens if reason == "stop" else choice_tokens - 1


def test_n_choices_are_seeded_per_choice_and_share_one_prompt(server: Server) -> None:
    client, engine = server.client(), server.service.engine
    prompt = "n choices share this prompt"
    kwargs: Any = dict(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=21)
    before = engine.computed_tokens
    got = client.completions.create(n=3, logprobs=0, **kwargs)  # logprobs: each choice's tokens
    assert [c.index for c in got.choices] == [0, 1, 2] and len({c.text for c in got.choices}) == 3
    assert got.usage is not None and got.usage.prompt_tokens == len(server.ids(prompt))
    tokens = [len(c.logprobs.tokens or []) if c.logprobs else 0 for c in got.choices]
    assert got.usage.completion_tokens == sum(tokens)  # every choice's tokens, the prompt once
    fed = sum(_fed(t, c.finish_reason) for t, c in zip(tokens, got.choices))
    assert engine.computed_tokens - before == len(server.ids(prompt)) + fed  # the prompt was computed once
    # Each choice is reproducible: choice i is what a single answer seeded seed + i gives.
    alone = [client.completions.create(**{**kwargs, "seed": 21 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in got.choices] == alone
    assert [c.text for c in client.completions.create(n=3, **kwargs).choices] == alone
    # Streamed: the chunks of every index add up to its choice; the usage chunk counts them all.
    texts: dict[int, str] = defaultdict(str)
    reasons: dict[int, str | None] = {}
    chunks = list(client.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kwargs))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert [texts[i] for i in range(3)] == alone and all(reasons[i] in ("stop", "length") for i in range(3))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_chat_choices_stream_each_with_its_role(server: Server) -> None:
    client = server.client()
    messages: Any = [{"role": "user", "content": "hello there"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=2, temperature=0)
    assert [c.message.content for c in got.choices][0] == got.choices[1].message.content  # greedy: the same
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, n=2, temperature=0,
                                            stream=True)
    roles, texts = defaultdict(list), defaultdict(str)
    for chunk in stream:
        (choice,) = chunk.choices
        roles[choice.index].append(choice.delta.role)
        texts[choice.index] += choice.delta.content or ""
    assert {i: r[0] for i, r in roles.items()} == {0: "assistant", 1: "assistant"}
    assert all(role is None for r in roles.values() for role in r[1:])
    assert dict(texts) == {0: got.choices[0].message.content, 1: got.choices[1].message.content}


def test_chat_logprobs_are_the_models_own_log_softmax(server: Server) -> None:
    client = server.client()
    messages: Any = [{"role": "user", "content": "what is a cat?"}]
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=3)
    choice = got.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert got.usage is not None and len(content) == got.usage.completion_tokens > 0
    assert b"".join(bytes(e.bytes or []) for e in content).decode(errors="replace") == choice.message.content
    prompt = server.service.chat_prompt([{"role": "user", "content": "what is a cat?"}])
    generated = server.token_ids([e.token for e in content])
    logp = _log_softmax(prompt + generated)
    for i, entry in enumerate(content):
        row = logp[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[generated[i]].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert server.token_ids([t.token for t in entry.top_logprobs]) == row.topk(3).indices.tolist()
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely token was chosen
    # Streamed, the chunks' logprobs add up to the same list.
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True)
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs and c.logprobs.content
                for e in c.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs_use_the_legacy_format(server: Server) -> None:
    got = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=3,
                                             logprobs=2)
    logprobs = got.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert got.usage is not None and len(logprobs.tokens) == got.usage.completion_tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    ids = server.ids(PROMPT)
    generated = server.token_ids(logprobs.tokens)
    logp = _log_softmax(ids + generated)
    for i, (token, value, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)):
        row = logp[len(ids) - 1 + i]
        assert value == pytest.approx(row[generated[i]].item(), abs=1e-4)  # raw: before the temperature
        assert top[token] == value and len(top) in (2, 3)  # the two most likely, and the chosen one
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)
        assert math.fsum(math.exp(v) for v in top.values()) <= 1 + 1e-6
    plain = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_stop_strings_end_every_choice_and_streamed_logprobs_continue_their_offsets(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    stop = full[4:6]
    kwargs: Any = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, n=2, stop=[stop], logprobs=1)
    got = client.completions.create(**kwargs)
    assert [(c.text, c.finish_reason) for c in got.choices] == [(full[: full.index(stop)], "stop")] * 2
    tokens: dict[int, list[str]] = defaultdict(list)
    offsets: dict[int, list[int]] = defaultdict(list)
    for chunk in client.completions.create(stream=True, **kwargs):
        (choice,) = chunk.choices
        if choice.logprobs is not None:
            tokens[choice.index] += choice.logprobs.tokens or []
            offsets[choice.index] += choice.logprobs.text_offset or []
    for c in got.choices:
        assert c.logprobs is not None
        assert (tokens[c.index], offsets[c.index]) == (c.logprobs.tokens, c.logprobs.text_offset)


def test_penalties_change_the_answer_as_the_engine_computes_them(server: Server) -> None:
    ids = server.ids(PROMPT)
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    want = tiny.penalized_loop(model, ids, 8, presence=-2.0, frequency=-0.5)
    assert want != tiny.greedy_loop(model, ids, 8)
    got = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                             presence_penalty=-2.0, frequency_penalty=-0.5)
    assert got.choices[0].text == server.tokenizer.decode(want)


@pytest.mark.parametrize(("route", "bad", "param"), [
    ("/completions", {"n": 0}, "n"),
    ("/completions", {"n": 17}, "n"),
    ("/chat/completions", {"n": 40}, "n"),
    ("/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/chat/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/completions", {"logprobs": 21}, "logprobs"),
    ("/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
])
def test_each_bad_value_is_a_400_naming_its_parameter(server: Server, route: str, bad: dict[str, Any],
                                                       param: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 2, **bad}
    body |= {"prompt": PROMPT} if route == "/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    engine = server.service.engine
    before = sum(engine.finished.values())
    with httpx.Client(base_url=server.url) as http:
        reply = http.post(route, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param in error["message"] and "\n" not in error["message"]
    assert sum(engine.finished.values()) == before and not engine.busy  # refused before any work


def test_engine_generate_returns_the_choices_and_logprobs(server: Server) -> None:
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    engine = Engine(model, server.tokenizer, max_seqs=4, max_len=64)
    [request] = engine.generate([server.ids(PROMPT)], SamplingParams(max_tokens=5, n=2, logprobs=1))
    assert [c.generated for c in request.choices] == [tiny.greedy_loop(model, server.ids(PROMPT), 5)] * 2
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.generated) for c in request.choices)
