"""splice.serve under hostile input (issue 28): no request stops the server. A real uvicorn server
on 127.0.0.1 with the tiny Llama: body and prompt limits, tokenizing off the event loop, OpenAI's
error shape for every refusal, broken adapters at run time, sampling values at the edges of the
schema, hypothesis-generated bodies; and ``splice serve`` processes for SIGTERM's drain and for an
engine that dies (a fault injected into the model's forward)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.engine.sampling import bounded_seed
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.serve.app import build_app
from splice.serve.server import running
from splice.serve.service import Service
from tests import tiny
from tests.tiny import build_tiny_llama, build_tiny_tokenizer, free_port

MAX_BYTES = 64 << 10
PROMPT = "the cat sat on"
ERROR_KEYS = {"message", "type", "param", "code"}


class Server:
    def __init__(self, url: str, service: Service, folder: Path) -> None:
        self.url, self.service, self.folder = url, service, folder

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def greedy(self, http: httpx.Client, **extra: Any) -> dict[str, Any]:
        reply = http.post("/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 6,
                                                "temperature": 0, **extra})
        assert reply.status_code == 200, reply.text
        return dict(reply.json())


def _service(**options: Any) -> Service:
    tokenizer = build_tiny_tokenizer()
    return Service(build_tiny_llama(len(tokenizer)), tokenizer, model_name="tiny", max_len=256, **options)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("adapters")
    model = build_tiny_llama(len(build_tiny_tokenizer()))
    add_lora(model, LoraConfig(name="alpha", targets=("q_proj", "v_proj"), rank=4))
    tiny.randomize_lora(model, seed=11)
    save_adapter(model, folder / "alpha", name="alpha")
    service = _service(adapters={"alpha": folder / "alpha"}, max_batch=4, gpu_adapters=2)
    # run-time loads may read any of this session's temporary folders (tmp_path lies under them)
    with running(service, max_request_bytes=MAX_BYTES,
                 allow_adapter_dir=tmp_path_factory.getbasetemp()) as url:
        yield Server(url, service, folder)


def _assert_error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
    return dict(error)


# ----------------------------------------------------------------------------- size limits


def test_a_body_over_the_limit_is_413_before_it_is_parsed(server: Server) -> None:
    junk = b"{" + b"x" * MAX_BYTES  # not JSON either: the size is refused before any parse
    with server.http() as http:
        error = _assert_error(http.post("/completions", content=junk), 413)
        assert str(MAX_BYTES) in error["message"] and error["code"] == "request_too_large"

        def pieces() -> Iterator[bytes]:  # chunked: no Content-Length, counted as it arrives
            yield b'{"prompt": "'
            for _ in range(MAX_BYTES // 1024 + 1):
                yield b"y" * 1024

        _assert_error(http.post("/completions", content=pieces()), 413)
        server.greedy(http)  # still serving


def test_a_huge_prompt_is_refused_by_its_characters_before_tokenizing(server: Server) -> None:
    with server.http() as http:
        error = _assert_error(http.post("/completions", json={"prompt": "ab" * 25_000, "max_tokens": 2}), 400)
        assert error["code"] == "context_length_exceeded" and "50000 characters" in error["message"]
        chat = {"messages": [{"role": "user", "content": "ab " * 10_000}], "max_tokens": 2}
        assert _assert_error(http.post("/chat/completions", json=chat), 400)["code"] == "context_length_exceeded"
        # within the character bound but over the context in tokens: refused after tokenizing
        error = _assert_error(http.post("/completions", json={"prompt": "x " * 300, "max_tokens": 2}), 400)
        assert error["code"] == "context_length_exceeded" and "characters" not in error["message"]


def test_tokenizing_runs_off_the_event_loop(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()
    encode = server.service.encode

    def slow_encode(text: str, *, special: bool = True) -> list[int]:
        if "SLOW" in text:  # holds its thread until /v1/models has answered
            started.set()
            release.wait(60)
        return encode(text, special=special)

    monkeypatch.setattr(server.service, "encode", slow_encode)
    replies: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: replies.append(
        httpx.post(f"{server.url}/completions", json={"prompt": "SLOW " + PROMPT, "max_tokens": 2}, timeout=60)))
    asking.start()
    try:
        assert started.wait(60)
        models = httpx.get(f"{server.url}/models", timeout=20)  # would wait behind the encode on the loop
        assert [m["id"] for m in models.json()["data"]] == ["tiny", "alpha"]
    finally:
        release.set()
        asking.join(60)
    assert replies[0].status_code == 200


# ----------------------------------------------------------------------------- error shape


def test_unknown_routes_wrong_methods_and_bad_bodies_use_the_openai_shape(server: Server) -> None:
    with server.http() as http:
        assert "/v1/completions" in _assert_error(http.get("/nope"), 404)["message"]
        assert _assert_error(http.post("/models"), 405)["message"].startswith("POST is not allowed on /v1/models")
        _assert_error(http.get("/completions"), 405)
        _assert_error(http.post("/completions", content=b"{not json"), 400)
        _assert_error(http.post("/completions", json=[1, 2]), 400)
        assert _assert_error(http.post("/completions", json={"prompt": PROMPT, "top_p": "x"}), 400)["param"] == "top_p"


def test_draining_answers_503_in_the_openai_shape() -> None:
    app = build_app(_service(max_batch=1))  # its engine never starts: no request reaches it

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://splice") as client:
            assert (await client.get("/v1/models")).status_code == 200
            app.state.draining.set()
            return await client.get("/v1/models")

    assert _assert_error(asyncio.run(ask()), 503)["code"] == "shutting_down"
    with pytest.raises(ValueError, match="max_request_bytes=0"):
        build_app(_service(max_batch=1), max_request_bytes=0)


def _broken_adapters(good: Path, root: Path) -> dict[str, Path]:
    """Copies of the adapter folder ``good``, each broken one way."""
    weights = (good / "adapter_model.safetensors").read_bytes()
    breaks = {
        "truncated": lambda f: (f / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2]),
        "empty": lambda f: (f / "adapter_model.safetensors").write_bytes(b""),
        "config-list": lambda f: (f / "adapter_config.json").write_text("[1, 2]"),
        "config-not-json": lambda f: (f / "adapter_config.json").write_text("{"),
        "no-weights": lambda f: (f / "adapter_model.safetensors").unlink(),
        "no-folder": lambda f: shutil.rmtree(f),
    }
    folders = {}
    for name, damage in breaks.items():
        folder = root / name
        shutil.copytree(good, folder)
        damage(folder)
        folders[name] = folder
    return folders


def test_broken_adapters_at_run_time_are_a_400_naming_them(server: Server, tmp_path: Path) -> None:
    with server.http() as http:
        for name, folder in _broken_adapters(server.folder / "alpha", tmp_path).items():
            reply = http.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            error = _assert_error(reply, 400)
            assert str(folder) in error["message"] and error["param"] == "lora_path", (name, error)
            assert "\n" not in error["message"]
        assert [m["id"] for m in http.get("/models").json()["data"]] == ["tiny", "alpha"]
        server.greedy(http, model="alpha")


# ----------------------------------------------------------------------------- sampling values


def test_sampling_values_at_the_edges_of_the_schema_leave_the_engine_running(server: Server) -> None:
    with server.http() as http:
        greedy = server.greedy(http)["choices"][0]["text"]
        for tiny_temperature in (1e-40, 1e-300, 5e-324):  # greedy below the floor, not inf / nan
            assert server.greedy(http, temperature=tiny_temperature)["choices"][0]["text"] == greedy
        for seed in (2**70, -(2**70), 2**63 - 1):
            sampled = {"temperature": 1.0, "seed": seed, "top_k": 2**70}
            assert server.greedy(http, **sampled)["choices"][0]["text"] == server.greedy(
                http, **sampled)["choices"][0]["text"]
        seeds = (2**63 + 5, bounded_seed(2**63 + 5))  # folded into 63 bits as the engine does
        seeded = [server.greedy(http, seed=s, temperature=1.0)["choices"][0]["text"] for s in seeds]
        assert seeded[0] == seeded[1]
        for null in ("temperature", "top_p", "seed", "n", "stop", "max_tokens"):
            assert server.greedy(http, **{null: None})["choices"]
        nan = json.dumps({"prompt": PROMPT, "temperature": float("nan")})  # Python's JSON reads NaN
        _assert_error(http.post("/completions", content=nan), 400)
    assert server.service.failure is None


# ----------------------------------------------------------------------------- hypothesis

SCALARS = (st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
EDGE_FLOATS = st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-5, 0.7, 1.0, 2.0, -1.0, 2.5])
SAMPLING = st.fixed_dictionaries({}, optional={
    "temperature": EDGE_FLOATS | st.floats(0, 2) | VALUES,
    "top_p": EDGE_FLOATS | st.floats(0, 1) | VALUES,
    "top_k": st.integers(-2, 200) | st.just(2**70) | VALUES,
    "seed": st.integers(-(2**80), 2**80) | VALUES,
    "max_tokens": st.integers(-1, 6) | st.just(2**70) | VALUES,
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | VALUES,
    "n": st.integers(0, 2) | VALUES,
    "stream": st.booleans() | VALUES,
    "model": st.sampled_from(["tiny", "alpha", "nope"]) | VALUES,
})
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "robot"]),
    "content": st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                                               max_size=2) | VALUES}), max_size=3)
REQUESTS = st.one_of(
    st.tuples(st.just("/completions"),
              st.builds(lambda s, p: {**s, "prompt": p}, SAMPLING, st.text(min_size=1, max_size=40) | VALUES)),
    st.tuples(st.just("/chat/completions"), st.builds(lambda s, m: {**s, "messages": m}, SAMPLING, MESSAGES | VALUES)),
    st.tuples(st.sampled_from(["/completions", "/chat/completions", "/unload_lora_adapter", "/models", "/x"]), VALUES),
)


def _check_answer(reply: httpx.Response) -> None:
    """OpenAI's shape: 2xx with choices (or SSE chunks ending in [DONE]), or 4xx with the error body."""
    if reply.status_code >= 400:
        assert reply.status_code < 500, reply.text
        assert set(reply.json()["error"]) == ERROR_KEYS
    elif reply.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
        assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1]), reply.text
    else:
        assert "choices" in reply.json() or "data" in reply.json()


@given(request=REQUESTS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
def test_every_request_gets_an_openai_shaped_answer_and_the_server_keeps_serving(
        server: Server, request: tuple[str, Any]) -> None:
    route, body = request
    with server.http() as http:
        _check_answer(http.post(route, content=json.dumps(body)))
        assert server.service.failure is None
        server.greedy(http)


# ----------------------------------------------------------------------------- the process

# The engine's forward slowed, no special token ever drawn (so streams run to max_tokens), and a
# fault: scheduling a prompt holding "<|im_start|>" (id 1) raises in the engine thread.
_SCRIPT = """
import sys, time
from splice.engine.runner import ModelRunner
from splice.engine.scheduler import Scheduler
execute, schedule = ModelRunner.execute, Scheduler.schedule
def slow_execute(self, *args, **kwargs):  # (every step, eager or a CUDA graph's replay)
    time.sleep(float(sys.argv[1]))
    logits = execute(self, *args, **kwargs)
    logits[..., :3] = float("-inf")
    return logits
def faulty_schedule(self):
    if any(1 in seq.tokens for seq in self.waiting):
        raise RuntimeError("injected fault")
    return schedule(self)
ModelRunner.execute, Scheduler.schedule = slow_execute, faulty_schedule
from splice.cli import main
sys.exit(main(["serve", *sys.argv[2:]]))
"""


def _splice_serve(tmp_path: Path, model_dir: Path, *flags: str, delay: float) -> tuple[subprocess.Popen[str], str]:
    script = tmp_path / "serve_with_fault.py"
    script.write_text(_SCRIPT)
    port = free_port()
    env = tiny.subprocess_env()
    process = subprocess.Popen([sys.executable, str(script), str(delay), "--model", str(model_dir), "--port",
                                str(port), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(480):
        try:
            httpx.get(f"{url}/models", timeout=5)
            return process, url
        except httpx.TransportError:
            if process.poll() is not None:
                raise AssertionError(process.communicate()[1]) from None
            threading.Event().wait(0.25)
    process.kill()
    raise AssertionError("splice serve did not start")


def _first_line(stream: Iterator[str]) -> str:
    return next(line for line in stream if line)


def test_sigterm_drains_finishes_short_requests_cancels_long_ones_and_exits_0(tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    process, url = _splice_serve(tmp_path, tiny_model_dir, "--drain-timeout", "8", delay=0.1)
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            bodies = [{"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True} for tokens in (200, 8)]
            with http.stream("POST", "/completions", json=bodies[0]) as long, \
                    http.stream("POST", "/completions", json=bodies[1]) as short:
                long_lines, short_lines = long.iter_lines(), short.iter_lines()
                _first_line(long_lines), _first_line(short_lines)
                process.send_signal(signal.SIGTERM)
                assert [line for line in short_lines if line][-1] == "data: [DONE]"  # finished within the drain
                try:
                    rest = [line for line in long_lines if line]
                except httpx.TransportError:
                    rest = []
                assert "data: [DONE]" not in rest and len(rest) < 199  # cancelled at the drain timeout
        try:  # no new request is admitted: refused at the socket, or 503
            _assert_error(httpx.get(f"{url}/models", timeout=5), 503)
        except httpx.TransportError:
            pass
        assert process.wait(timeout=60) == 0, process.communicate()[1]
    finally:
        process.kill()
        process.communicate()


def test_a_dead_engine_answers_its_request_then_the_process_exits_1_with_one_line(tmp_path: Path,
                                                                                 tiny_model_dir: Path) -> None:
    process, url = _splice_serve(tmp_path, tiny_model_dir, delay=0.0)
    try:
        reply = httpx.post(f"{url}/completions", json={"prompt": "<|im_start|>" + PROMPT, "max_tokens": 4}, timeout=60)
        assert _assert_error(reply, 503)["type"] == "server_error"
        assert process.wait(timeout=60) == 1
        errors = [line for line in process.communicate()[1].splitlines() if line.strip()]
        assert errors[-1].startswith("splice serve: error: the generation engine stopped (RuntimeError: injected fault)")
        assert not any("Traceback" in line for line in errors), errors
    finally:
        process.kill()
        process.communicate()
