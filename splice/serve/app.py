"""The OpenAI-compatible HTTP API over a :class:`~splice.serve.service.Service` (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``:
server-sent events ending in ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's names and bodies). ``model`` picks the base model or an
adapter by name. Every error, unknown routes and wrong methods included, uses OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 404 unknown model or route, 405 wrong method,
400 bad parameters, a broken adapter folder or a prompt longer than the context, 413 a body over
``max_request_bytes``, 429 when the queue is full, 503 when the engine is down or the server is
draining (``app.state.draining`` set). A streaming client that disconnects cancels its request,
which frees its batch slot; a stream the engine fails ends with an ``error`` event.

Limits, checked before any work: the body size (read in pieces, refused at the first byte over
the limit), then the prompt's characters (more than the context can hold as tokens is refused
before tokenizing), then its tokens. Tokenizing and adapter reads run on a worker thread, so the
event loop keeps answering while a long prompt is encoded. The bodies and the answers' shapes (``n``
choices, logprobs, stream chunks) are :mod:`splice.serve.openai_types`'. Sampling values the API
accepts are made safe for the engine, by the engine's own rules (:mod:`splice.engine.sampling`): temperatures
below ``GREEDY_BELOW`` are greedy (dividing logits by 1e-40 overflows), seeds outside 63 bits are
hashed into them (:func:`~splice.engine.sampling.bounded_seed`: a torch generator takes 64 bits),
a ``top_k`` larger than any vocabulary is off (torch takes it as an int64).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from safetensors import SafetensorError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splice.core.errors import one_line
from splice.engine.output import TokenTexts
from splice.serve.adapter_source import check_adapter_name, check_runtime_loading, resolve_adapter_path
from splice.serve.auth import refusal as key_refusal
from splice.serve.metrics import CONTENT_TYPE, ServeMetrics
from splice.serve.openai_types import (
    ChatBody,
    ChoiceState,
    CompletionBody,
    LoadBody,
    SamplingFields,
    Shapes,
    UnloadBody,
    error_response,
    message_text,
    sse,
)
from splice.serve.service import ServeError, Service
from splice.serve.structured import StructuredOutputError, constraint_for

__all__ = ["MAX_REQUEST_BYTES", "build_app"]

MAX_REQUEST_BYTES = 1 << 20  # 1 MiB: a 128k-token prompt of ordinary text fits, a 50 MB one does not
_T = TypeVar("_T")


class _Guard:
    """ASGI middleware in front of every route: 401 without one of ``keys`` (when there are keys;
    :mod:`splice.serve.auth`), 503 while draining (but ``/health``: the process is alive), 413 for
    a body over ``max_bytes`` (by its Content-Length, else counted as it arrives, so an oversized
    body is never held whole), then the body replayed to the app."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, draining: threading.Event, keys: frozenset[str]) -> None:
        self.app, self.max_bytes, self.draining, self.keys = app, max_bytes, draining, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        unauthorized = key_refusal(scope["path"], scope["headers"], self.keys)
        if unauthorized is not None:  # before the body is read: no key, no work
            response = error_response(unauthorized)
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        if self.draining.is_set() and scope["path"] != "/health":
            refusal = ServeError(503, "the server is shutting down: retry on another replica or after "
                                      "its restart", kind="server_error", code="shutting_down")
            return await error_response(refusal)(scope, receive, send)
        too_big = ServeError(413, f"the request body is larger than this server's limit of {self.max_bytes} "
                                  "bytes (splice serve --max-request-bytes): send a shorter prompt",
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(too_big)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await error_response(too_big)(scope, receive, send)
            more = message.get("more_body", False)
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:  # the body once, then the client's own messages (disconnects)
            return body.pop() if body else await receive()

        return await self.app(scope, replay, send)


def _char_limit(service: Service) -> int:
    """Characters beyond which a prompt cannot fit the context: ``max_len`` tokens of the longest
    vocabulary entry each (a token's text is at most that long for byte-level BPE and
    SentencePiece vocabularies), doubled for normalizers that drop characters."""
    vocab = getattr(service.tokenizer, "get_vocab", None)
    longest = max((len(token) for token in vocab()), default=1) if callable(vocab) else 64
    return service.max_len * max(longest, 1) * 2


def _check_chars(chars: int, limit: int, service: Service, param: str) -> None:
    if chars > limit:
        raise ServeError(400, f"This model's maximum context length is {service.max_len} tokens; the prompt "
                              f"has {chars} characters, more than that many tokens can hold: shorten the prompt",
                         param=param, code="context_length_exceeded")


def _engine_running(service: Service) -> bool:
    """Whether ``service``'s engine thread runs (started, not failed, not stopped)."""
    alive = getattr(service, "alive", None)  # the service's own answer, when it has one
    if alive is not None:
        return bool(alive() if callable(alive) else alive)
    thread = getattr(service, "_thread", None)
    return service.failure is None and thread is not None and thread.is_alive()


def _context_room(prompt: int, requested: int | None, max_len: int, *, param: str) -> int:
    """Tokens a completion of a ``prompt``-token prompt may have: all that fit when ``requested`` is
    None; OpenAI's 400 when the prompt plus ``requested`` (at least one token) exceed ``max_len``
    (the engine ends a request once its prompt plus output reach ``max_len``)."""
    wanted = 1 if requested is None else requested
    if prompt + wanted > max_len:
        raise ServeError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                              f"{prompt + wanted} tokens ({prompt} in the {param}, {wanted} in the completion). "
                              f"Please reduce the length of the {param} or completion.",
                         param=param if prompt >= max_len else "max_tokens", code="context_length_exceeded")
    return max_len - prompt


def _load(service: Service, name: str, path: str) -> None:
    """Register the adapter at ``path``; any way its files are broken is a 400 naming them."""
    try:
        service.load_adapter(name, path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        text = one_line(str(error.args[0] if isinstance(error, KeyError) and error.args else error))
        where = getattr(error, "filename", None) or path
        message = text if str(where) in text else f"{where}: {text}"
        raise ServeError(400, f"cannot load adapter {name!r}: {message}", param="lora_path") from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, error: ServeError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(ServeError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = (f"no route {request.url.path}: this server serves /v1/models, /v1/completions, "
                       "/v1/chat/completions, /v1/load_lora_adapter and /v1/unload_lora_adapter")
            return error_response(ServeError(404, message, code="not_found"))
        if error.status_code == 405:
            allowed = error.headers.get("Allow", "another method") if error.headers else "another method"
            return error_response(ServeError(405, f"{request.method} is not allowed on {request.url.path}: use {allowed}",
                                     code="method_not_allowed"))
        return error_response(ServeError(error.status_code, str(error.detail)))


def build_app(service: Service, *, default_max_tokens: int = 16, max_request_bytes: int = MAX_REQUEST_BYTES,
              api_keys: Collection[str] = (), allow_adapter_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app; it starts ``service``'s engine on startup and stops it on shutdown.
    ``app.state.draining`` (a ``threading.Event``): once set, every new request gets 503.
    ``api_keys``: Bearer keys every route but ``/health`` and ``/ready`` needs (none: open).
    ``allow_adapter_dir``: where runtime adapter loads may read (None: runtime load/unload is 403).
    ``app.state.metrics``: its :class:`~splice.serve.metrics.ServeMetrics` (``GET /metrics``)."""
    from contextlib import asynccontextmanager

    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes}: it must be >= 1 (default {MAX_REQUEST_BYTES})")
    # One worker: tokenizing and adapter reads leave the event loop, one at a time (a fast
    # tokenizer shared between threads may refuse a concurrent call).
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-serve-io")

    def off_loop(function: Callable[..., _T], *args: Any) -> Awaitable[_T]:
        return asyncio.get_running_loop().run_in_executor(worker, functools.partial(function, *args))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()
            worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="splice serve", lifespan=lifespan)
    app.state.draining = threading.Event()
    app.add_middleware(_Guard, max_bytes=max_request_bytes, draining=app.state.draining,
                       keys=frozenset(api_keys))
    _install_error_handlers(app)
    limit = _char_limit(service)
    allowed = None if allow_adapter_dir is None else Path(allow_adapter_dir)
    metrics = app.state.metrics = ServeMetrics(service)
    texts = TokenTexts(service.tokenizer)  # logprobs' token texts, cached for the server's life

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # the process answers; /ready says whether it serves

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        if not _engine_running(service):
            raise ServeError(503, "the generation engine is not running", kind="server_error", code="not_ready")
        return {"status": "ready", "model": service.model_name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "splice",
                 "root": service.model_name, "parent": None if name == service.model_name else service.model_name}
                for name in service.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody) -> dict[str, str]:
        folder = await off_loop(resolve_adapter_path, body.lora_path, allowed)  # 403 outside the allowed dir
        check_adapter_name(body.lora_name, base=service.model_name)
        await off_loop(_load, service, body.lora_name, str(folder))
        metrics.registrations.labels(action="load").inc()
        return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody) -> dict[str, str]:
        check_runtime_loading(allowed)
        service.unload_adapter(body.lora_name)
        metrics.registrations.labels(action="unload").inc()
        return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded"}

    async def generated_tokens(choice: ChoiceState) -> int:
        """Tokens a choice generated: the engine's count when its events carry one, else its text
        re-encoded (which can differ from what was sampled)."""
        if choice.completion_tokens is not None:
            return choice.completion_tokens
        text = choice.text
        return len(await off_loop(functools.partial(service.encode, special=False), text)) if text else 0

    async def run(body: SamplingFields, prompt_ids: list[int], *, chat: bool, received: float) -> Any:
        adapter = service.adapter_for(body.model)
        room = _context_room(len(prompt_ids), body.max_completion_tokens or body.max_tokens, service.max_len,
                             param="messages" if chat else "prompt")
        params = body.params(min(default_max_tokens, room))
        try:  # compiling a grammar can take a while: off the event loop
            constraint = await off_loop(constraint_for, body, service.engine.grammars)
        except StructuredOutputError as error:
            raise ServeError(400, str(error), param=error.param) from None
        params = replace(params, constraint=constraint)
        name = body.model or service.model_name
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": name}
        shapes = Shapes(chat=chat, head=head, logprobs=params.logprobs is not None, texts=texts)
        events = metrics.timed(service.stream(prompt_ids, params, adapter), received=received)
        first = await anext(events)  # errors (404/429/503/400) surface before any byte is sent
        choices = [ChoiceState(index=i) for i in range(params.n)]

        async def usage(choices: Sequence[ChoiceState]) -> dict[str, int]:
            count = sum([await generated_tokens(choice) for choice in choices])  # the prompt counts once
            metrics.finished(metrics.model(name), prompt_tokens=len(prompt_ids), generated_tokens=count)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                    "total_tokens": len(prompt_ids) + count}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(first, events, shapes, choices, usage=usage, include_usage=include),
                                     media_type="text/event-stream")
        choices[first.index].add(first)
        async for event in events:
            choices[event.index].add(event)
        return shapes.response(choices, await usage(choices))

    async def counted(model: str | None, answer: Awaitable[Any]) -> Any:
        """``answer``, its HTTP status counted in ``splice_requests_total`` under ``model``."""
        label = metrics.model(model)
        try:
            result = await answer
        except Exception as error:
            status = error.status if isinstance(error, ServeError) else 500
            metrics.requests.labels(model=label, status=str(status)).inc()
            raise
        metrics.requests.labels(model=label, status="200").inc()
        return result

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        received = time.perf_counter()

        async def answer() -> Any:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise ServeError(400, "give one prompt per request", param="prompt")
            _check_chars(len(prompts[0]), limit, service, "prompt")
            return await run(body, await off_loop(service.encode, prompts[0]), chat=False, received=received)

        return await counted(body.model, answer())

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        received = time.perf_counter()

        async def answer() -> Any:
            messages = [{"role": m.role, "content": message_text(m.content)} for m in body.messages]
            _check_chars(sum(len(m["content"]) for m in messages), limit, service, "messages")
            return await run(body, await off_loop(service.chat_prompt, messages), chat=True, received=received)

        return await counted(body.model, answer())

    return app

