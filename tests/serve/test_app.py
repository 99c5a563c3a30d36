"""splice.serve: a real uvicorn server on 127.0.0.1 (CPU, tiny Llama, two adapters) driven by the
real ``openai`` client: answers equal ``splice.generate`` with the adapter alone, streaming and
not, concurrent adapters, 32 clients, load/unload at run time, errors, disconnects."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from splice.engine.sampling import SamplingParams
from splice.generation.generate import generate
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from splice.serve.server import running
from splice.serve.service import Service
from tests import tiny
from tests.tiny import build_tiny_llama, build_tiny_tokenizer

ADAPTERS = {"alpha": (("q_proj", "v_proj"), 4, 11), "beta": ("all-linear", 8, 12), "gamma": (("o_proj",), 4, 13)}
PROMPT = "the cat sat on"


def _base() -> Any:
    return build_tiny_llama(len(build_tiny_tokenizer()))


class Server:
    """The tiny model with adapters alpha and beta, served at ``url`` (see :func:`running`)."""

    def __init__(self, folder: Path, url: str, service: Service) -> None:
        self.folder, self.url, self.service = folder, url, service
        self.tokenizer = service.tokenizer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0)

    def expected(self, adapter: str | None, prompt: str, max_tokens: int) -> str:
        model = _base()
        if adapter is not None:
            load_adapter(model, self.folder / adapter, name=adapter)
        return generate(model, self.tokenizer, prompt, max_new_tokens=max_tokens)[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    for name, (targets, rank, seed) in ADAPTERS.items():
        model = _base()
        add_lora(model, LoraConfig(name=name, targets=targets, rank=rank))
        tiny.randomize_lora(model, seed=seed)
        save_adapter(model, folder / name, name=name)
    service = Service(_base(), build_tiny_tokenizer(), model_name="tiny",
                      adapters={n: folder / n for n in ("alpha", "beta")},
                      max_batch=8, max_len=256, gpu_adapters=2, max_waiting=64)
    with running(service, allow_adapter_dir=folder) as url:  # run-time loads read from folder only
        yield Server(folder, url, service)


def test_models_lists_the_base_and_the_adapters(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == ["tiny", "alpha", "beta"]


@pytest.mark.parametrize("model", ["tiny", "alpha", "beta"])
def test_greedy_completion_equals_generate_with_that_adapter_alone(server: Server, model: str) -> None:
    client = server.client()
    want = server.expected(None if model == "tiny" else model, PROMPT, 12)
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want and got.model == model
    assert got.usage is not None and got.usage.prompt_tokens == len(server.tokenizer(PROMPT)["input_ids"])
    chunks = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert set(server.expected(n, PROMPT, 12) for n in (None, "alpha", "beta")).__len__() == 3


def test_chat_streaming_and_not_follow_the_chat_template(server: Server) -> None:
    client = server.client()
    messages: Any = [{"role": "user", "content": "hello there"}]
    text = server.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model = _base()
    load_adapter(model, server.folder / "beta", name="beta")
    ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
    want = generate(model, server.tokenizer, server.tokenizer.decode(ids), max_new_tokens=10)[0]
    got = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == want
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_for_different_adapters_each_get_their_own(server: Server) -> None:
    names = ["alpha", "beta", "tiny", "beta", "alpha", "tiny"]
    prompts = [f"{PROMPT} {i}" for i in range(len(names))]
    want = [server.expected(None if n == "tiny" else n, p, 10) for n, p in zip(names, prompts)]
    got: list[str | None] = [None] * len(names)
    barrier = threading.Barrier(len(names))

    def ask(i: int) -> None:
        barrier.wait()
        reply = server.client().completions.create(model=names[i], prompt=prompts[i], max_tokens=10, temperature=0)
        got[i] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_32_concurrent_clients_are_all_answered(server: Server) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        names = ["tiny", "alpha", "beta", "alpha"]

        async def one(i: int) -> str:
            reply = await client.completions.create(model=names[i % 4], prompt=f"client {i}", max_tokens=6,
                                                    temperature=0.8, seed=i)
            return reply.choices[0].text

        return await asyncio.gather(*(one(i) for i in range(32)))

    answers = asyncio.run(main())
    assert len(answers) == 32 and all(isinstance(a, str) for a in answers)
    assert _idle(server.service.engine)


def _eventually(condition: Callable[[], bool]) -> bool:
    """Whether ``condition()`` holds within 10 s (the engine thread acts between its steps)."""
    for _ in range(400):
        if condition():
            return True
        time.sleep(0.025)
    return False


def _idle(engine: Any) -> bool:
    """Whether ``engine`` soon runs and holds nothing (its scheduler empty, every KV block free or cached)."""
    return _eventually(lambda: not engine.scheduler.running and not engine.scheduler.waiting
                       and engine.pool.num_free == engine.pool.num_usable)


def test_usage_counts_the_generated_tokens(server: Server) -> None:
    got = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 2  # not the text re-encoded


def _slow_tokens(engine: Any, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each sampled token takes ``seconds`` longer, so a request outlives what the test does meanwhile."""
    accept = engine._accept

    def slow_accept(*args: Any) -> None:
        time.sleep(seconds)
        accept(*args)

    monkeypatch.setattr(engine, "_accept", slow_accept)


def test_seeded_sampling_repeats(server: Server) -> None:
    client = server.client()
    kwargs: Any = dict(model="alpha", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text


def test_load_and_unload_an_adapter_at_run_time(server: Server) -> None:
    client = server.client()
    with httpx.Client(base_url=server.url) as http:
        reply = http.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(server.folder / "gamma")})
        assert reply.status_code == 200, reply.text
        again = http.post("/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(server.folder / "gamma")})
        assert again.status_code == 400
        missing = http.post("/load_lora_adapter", json={"lora_name": "delta", "lora_path": str(server.folder / "nope")})
        assert missing.status_code == 400 and "adapter_config.json" in missing.json()["error"]["message"]
        # three adapters through two device slots: each answer is still its own adapter's
        for name in ("gamma", "alpha", "beta", "gamma"):
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
            assert got.choices[0].text == server.expected(name, PROMPT, 8), name
        assert http.post("/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 200
        assert http.post("/unload_lora_adapter", json={"lora_name": "gamma"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPT, max_tokens=4)


def test_errors_use_the_openai_format(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="tiny", prompt="x " * 300, max_tokens=4)
    assert long.value.code == "context_length_exceeded"
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 17}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=PROMPT, **bad)  # type: ignore[call-overload]
    with httpx.Client(base_url=server.url) as http:
        body = http.post("/chat/completions", json={"model": "tiny", "messages": []}).json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    before = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    engine = server.service.engine
    engine.max_waiting = 0  # a full queue: overload is 429, not a crash
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
    finally:
        engine.max_waiting = 64
    # The server still serves, and serves the same greedy answer as before the overload.
    after = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert after.choices[0].text == before.choices[0].text
    assert after.choices[0].finish_reason == before.choices[0].finish_reason


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.service.engine
    # The request must outlive the hang-up, or it ends as "stop"/"length" and proves nothing: no
    # EOS, and each token a little slower, so a loaded machine's late disconnect is still early.
    monkeypatch.setattr(engine, "eos", set())
    _slow_tokens(engine, monkeypatch, 0.02)
    before = engine.finished["cancelled"]
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 240, "temperature": 1.0, "stream": True,
            "stop": None}
    with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/completions", json=body) as reply:
        assert reply.status_code == 200
        next(reply.iter_lines())  # one chunk, then hang up
    assert _eventually(lambda: engine.finished["cancelled"] > before) and _idle(engine)


def test_reloading_a_name_keeps_running_streams_on_the_old_weights(
        server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_tokens(server.service.engine, monkeypatch, 0.1)
    client = server.client()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        load = {"lora_name": "swap", "lora_path": str(server.folder / "gamma")}
        assert http.post("/load_lora_adapter", json=load).status_code == 200
        stream = client.completions.create(model="swap", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        chunks = iter(stream)
        text = next(chunks).choices[0].text  # running on gamma's weights
        assert http.post("/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
        reload = {"lora_name": "swap", "lora_path": str(server.folder / "beta")}
        assert http.post("/load_lora_adapter", json=reload).status_code == 200
        rest = [c.choices[0].text for c in chunks]
        assert rest, "the stream ended before the reload: nothing was tested"
        assert text + "".join(rest) == server.expected("gamma", PROMPT, 12)
        # A new request gets the new weights (and no K/V the old version cached for this prompt).
        got = client.completions.create(model="swap", prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text == server.expected("beta", PROMPT, 12)
        assert http.post("/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
    engine = server.service.engine
    assert _idle(engine) and _eventually(lambda: not any(k.startswith("swap") for k in engine.adapters))
    assert not any(k.startswith("swap") for k in server.service.bank.resident)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_served_on_the_original_weights(tmp_path: Path, method: str) -> None:
    """Such adapters trained A, B on the residual base W - s B0 A0: at start and at run time the service
    reads them against the served weights (converted as PEFT does), so each answer is the trained model's."""

    def sharp() -> Any:  # clear argmax margins, as after training
        model = _base()
        with torch.no_grad():
            model.lm_head.weight.mul_(25)
        return model

    trained = sharp()
    add_lora(trained, LoraConfig(targets=("q_proj", "v_proj", "up_proj"), rank=4, alpha=8, init=method))
    tiny.randomize_lora(trained, seed=6)
    save_adapter(trained, tmp_path / "saved", name="default")
    tokenizer = build_tiny_tokenizer()
    service = Service(sharp(), tokenizer, model_name="tiny", adapters={"at-start": tmp_path / "saved"},
                      max_batch=2, max_len=64, gpu_adapters=2)
    service.load_adapter("at-run-time", tmp_path / "saved")  # applied by the engine's next step
    ids = list(tokenizer(PROMPT)["input_ids"])
    want = tiny.greedy_loop(trained, ids, 10)
    assert want != tiny.greedy_loop(sharp(), ids, 10)  # the adapter changes the answer
    for name in ("at-start", "at-run-time"):
        [done] = service.engine.generate([ids], SamplingParams(max_tokens=10), adapters=[service.adapter_for(name)])
        assert done.generated == want, name


def test_an_adapter_made_for_another_base_is_refused_when_it_is_loaded(server: Server, tmp_path: Path) -> None:
    """Its shapes are checked against the served model at load time, at start and at run time (it was
    accepted, then failed on first use): one line naming the first module that does not fit."""
    other = tiny.llama(vocab=len(build_tiny_tokenizer()), intermediate=40)  # MLP 40 wide, the served one 64
    add_lora(other, LoraConfig(name="other", targets=("up_proj",), rank=4))
    folder = server.folder / "other-base"  # inside the allowed adapter folder
    save_adapter(other, folder, name="other")
    with httpx.Client(base_url=server.url) as http:
        reply = http.post("/load_lora_adapter", json={"lora_name": "other", "lora_path": str(folder)})
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert "does not fit" in message and "up_proj" in message and "out=64" in message and "\n" not in message
    assert "other" not in {m.id for m in server.client().models.list().data}
    with pytest.raises(ValueError, match=r"does not fit this model: .*up_proj"):
        Service(_base(), build_tiny_tokenizer(), model_name="tiny", adapters={"other": folder}, max_batch=2,
                max_len=64)
    got = server.client().completions.create(model="alpha", prompt=PROMPT, max_tokens=4, temperature=0)
    assert got.choices[0].text == server.expected("alpha", PROMPT, 4)  # still serving
