"""splice.serve.structured: response_format and guided_* through a real server on 127.0.0.1 (CPU, the tiny
Llama with random weights: only the grammar makes the answers valid) and the real ``openai`` client."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from splice.serve.server import running
from splice.serve.service import Service
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

pytest.importorskip("llguidance")

SCHEMA = {  # short on every path, so random weights finish it
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "rank": {"type": "integer", "minimum": 1, "maximum": 9},
                   "open": {"type": "boolean"}},
    "required": ["city", "rank", "open"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
CODE = r"[A-Z]{2}-[0-9]{3}"
COLOURS = ["red", "green", "light blue"]
QUESTION = [{"role": "user", "content": "Where?"}]


def check_place(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "rank", "open"}, text
    assert isinstance(value["city"], str) and len(value["city"]) <= 5
    assert type(value["rank"]) is int and 1 <= value["rank"] <= 9 and type(value["open"]) is bool


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    tokenizer = build_tiny_tokenizer()
    service = Service(build_tiny_llama(len(tokenizer), seed=7), tokenizer, model_name="tiny", max_batch=8,
                      max_len=256)
    with running(service) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_response_format_json_schema_is_valid(client: openai.OpenAI, temperature: float) -> None:
    answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=150, temperature=temperature,
                                            seed=3, response_format=FORMAT)  # type: ignore[arg-type]
    assert answer.choices[0].finish_reason == "stop"
    check_place(answer.choices[0].message.content or "")
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_streamed_json_schema_is_valid(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=150, temperature=1.0, seed=5,
                                            response_format=FORMAT, stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    check_place("".join(c.choices[0].delta.content or "" for c in chunks))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_is_a_json_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=160, temperature=0,
                                            response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": CODE}, lambda text: re.fullmatch(CODE, text)),
    ({"guided_choice": COLOURS}, lambda text: text in COLOURS),
    ({"guided_json": json.dumps(SCHEMA)}, check_place),  # vLLM takes the schema as JSON text too
    ({"guided_json": SCHEMA}, check_place),
])
def test_vllm_guided_extensions(client: openai.OpenAI, extra: dict[str, Any], check: Any) -> None:
    for seed in range(3):
        answer = client.completions.create(model="tiny", prompt="pick one:", max_tokens=200, temperature=1.0,
                                           seed=seed, extra_body=extra)
        assert answer.choices[0].finish_reason == "stop"
        assert check(answer.choices[0].text) is not False


def test_constrained_and_plain_requests_share_the_batch(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=20, temperature=0)
    answers: dict[int, Any] = {}

    def ask(i: int) -> None:
        if i % 2:
            answers[i] = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=20, temperature=0)
        else:
            answers[i] = client.completions.create(model="tiny", prompt=f"place {i}", max_tokens=200,
                                                   temperature=1.0, seed=i, extra_body={"guided_json": SCHEMA})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, answer in answers.items():
        if i % 2:
            assert answer.choices[0].text == plain.choices[0].text  # untouched by its constrained neighbours
        else:
            assert answer.choices[0].finish_reason == "stop"
            check_place(answer.choices[0].text)


def test_max_tokens_before_the_grammar_completes_is_length(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0,
                                       extra_body={"guided_json": SCHEMA})
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].text.startswith("{")  # a prefix of valid output, not valid output
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.choices[0].text)


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "nope"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_choice": []}, "guided_choice", "non-empty list"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": {"properties": {"a": {"$ref": "#/nowhere"}}}}, "guided_json", "/nowhere"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "response_format and"),
])
def test_a_bad_spec_is_a_400_naming_the_parameter(client: openai.OpenAI, body: dict[str, Any], param: str,
                                                  words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, extra_body=body)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"] and "\n" not in error["message"]


def test_response_format_text_is_unconstrained(client: openai.OpenAI) -> None:
    free = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    text = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == free.choices[0].message.content
