"""The OpenAI-compatible HTTP API over a :class:`~splice.serve.service.Service` (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``:
server-sent events ending in ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's names and bodies). ``model`` picks the base model or an
adapter by name. Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
404 unknown model, 400 bad parameters or a prompt longer than the context, 429 when the queue is
full, 503 when the engine is down. A streaming client that disconnects cancels its request, which
frees its batch slot.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from splice.generation.engine import SamplingParams
from splice.serve.service import ServeError, Service

__all__ = ["build_app"]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1

    def params(self, default_max: int) -> SamplingParams:
        if self.n != 1:
            raise ServeError(400, "only n=1 is supported", param="n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise ServeError(400, "stop strings must be non-empty", param="stop")
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=max(self.top_k, 0),
                              top_p=self.top_p, seed=self.seed, stop=tuple(stop))


class CompletionBody(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def _error(error: ServeError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status)


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        if any(part.get("type") != "text" for part in content):
            raise ServeError(400, "only text content parts are supported", param="messages")
        return "".join(str(part.get("text", "")) for part in content)
    return content or ""


def build_app(service: Service, *, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app; it starts ``service``'s engine on startup and stops it on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="splice serve", lifespan=lifespan)

    @app.exception_handler(ServeError)
    async def serve_error(_: Request, error: ServeError) -> JSONResponse:
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(ServeError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "splice",
                 "root": service.model_name, "parent": None if name == service.model_name else service.model_name}
                for name in service.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/load_lora_adapter")
    async def load(body: LoadBody) -> dict[str, str]:
        service.load_adapter(body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: UnloadBody) -> dict[str, str]:
        service.unload_adapter(body.lora_name)
        return {"status": "ok", "message": f"adapter {body.lora_name!r} unloaded"}

    async def run(body: _Sampling, prompt_ids: list[int], *, chat: bool) -> Any:
        adapter = service.adapter_for(body.model)
        params = body.params(default_max_tokens)
        name = body.model or service.model_name
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        events = service.stream(prompt_ids, params, adapter)
        first = await anext(events)  # errors (404/429/503/400) surface before any byte is sent
        if body.stream:
            return StreamingResponse(_sse(first, events, rid, created, name, chat=chat),
                                     media_type="text/event-stream")
        text, reason, count = first.text, first.finish_reason, 0
        async for event in events:
            text += event.text
            reason = event.finish_reason
        count = len(service.encode(text, special=False)) if text else 0
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                 "total_tokens": len(prompt_ids) + count}
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ServeError(400, "give one prompt per request", param="prompt")
        return await run(body, service.encode(prompts[0]), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Any:
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        return await run(body, service.chat_prompt(messages), chat=True)

    return app


async def _sse(first: Any, events: AsyncIterator[Any], rid: str, created: int, model: str, *,
               chat: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; closing the generator cancels the request."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, reason: str | None, *, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else (
                {"content": text} if text else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk(first.text, first.finish_reason, role=True)
        if first.finish_reason is None:
            async for event in events:
                yield chunk(event.text, event.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # type: ignore[attr-defined]
