"""The serving core: one base model, many adapters, an engine thread, an asyncio bridge.

Adapters are registered by name from PEFT-format folders and kept in host memory
(:class:`~splice.lora.bank.HostAdapter`); ``gpu_adapters`` of them are resident in the device
:class:`~splice.lora.bank.LoraBank` at a time, moved in when a request needs one (least recently
used out). Every linear module but the output head carries a bank site, so an adapter loaded at
run time may target any of them. PiSSA/OLoRA adapters are read against the served model's own
weights and served converted (:func:`~splice.lora.bank.read_adapter` with ``base``). The
:class:`~splice.engine.engine.Engine` runs on its own thread; :meth:`Service.stream` turns its
callbacks into an async iterator for the HTTP layer.

Reloading: each load of a name gets its own engine key (``name``, then ``name#2``, ``name#3``, ...),
so an unload + load under the same name is atomic for running streams: requests already submitted
finish on the old weights (the engine frees them once unused), new requests get the new ones, and
the prefix cache, keyed by the adapter, never mixes the two versions' K/V.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from splice.core.rewrite import Around, kind_of
from splice.engine.engine import Engine, EngineFull, OnEvent, Request
from splice.engine.output import TokenLogprob
from splice.engine.sampling import SamplingParams
from splice.lora.bank import HostAdapter, LoraBank, add_bank_sites, read_adapter

__all__ = ["ServeError", "Service", "linear_paths"]


class ServeError(Exception):
    """A request the server refuses: ``status`` (HTTP), OpenAI error ``kind`` and ``param``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


@dataclass(frozen=True)
class Event:
    """What one choice (``index``) of a request streamed: ``text``, and the ``logprobs`` of the tokens
    generated since its last event (when asked); ``finish_reason`` once it ended."""

    text: str
    finish_reason: str | None
    completion_tokens: int | None = None  # on the final event: the tokens the choice generated
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


def _relay(choice: Request, put: Callable[[Event], None]) -> OnEvent:
    """``choice``'s engine events as :class:`Event` s to ``put`` (on the engine thread)."""
    sent = 0

    def on_event(text: str, reason: str | None) -> None:
        nonlocal sent
        logprobs = choice.logprobs or []
        new, sent = tuple(logprobs[sent:]), len(logprobs)
        put(Event(text, reason, None if reason is None else len(choice.generated), choice.index, new))

    return on_event


def _failed(reason: str, adapter: str | None) -> ServeError:
    """The error for a request the engine ended with ``reason`` ("error: ...")."""
    why = reason.removeprefix("error: ")
    if adapter is not None and ("unknown adapter" in why or "unloaded" in why):
        return ServeError(404, f"adapter {adapter.split('#')[0]!r} was unloaded", param="model",
                          code="model_not_found")
    return ServeError(500, f"the request failed: {why}", kind="server_error")


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every linear of ``model`` but the output head (where adapters may sit): ``nn.Linear``
    and the quantized linears (``kind_of`` says "linear": int8, NF4)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return [name for name, module in model.named_modules()
            if kind_of(module) == "linear" and not isinstance(module, Around) and module is not head]


class Service:
    """See module docstring. ``start()`` the engine thread, ``close()`` to stop it. Subclasses may pick
    the engine class and how an adapter folder is read (tensor parallelism: splice.serve.tensor_parallel)."""

    engine_class: ClassVar[type[Engine]] = Engine

    def __init__(self, model: nn.Module, tokenizer: Any, *, model_name: str,
                 adapters: dict[str, str | Path] | None = None, max_batch: int = 32, max_len: int = 1024,
                 max_waiting: int = 256, gpu_adapters: int = 8, max_lora_rank: int = 64,
                 kv_dtype: str = "auto", kv_memory: float = 0.8) -> None:
        self.model_name, self.tokenizer, self.max_len = model_name, tokenizer, max_len
        self.host: dict[str, HostAdapter] = {}  # client name -> its adapter (named by its engine key)
        self._loaded: set[str] = set()  # every name loaded so far: a reload's engine key is name#N
        self._loads = 0
        self._keys = threading.Lock()
        self.model = model
        for name, path in (adapters or {}).items():
            self._check_name(name)
            self.host[name] = self.read(path, name=self._engine_key(name))
        rank = max([max_lora_rank, *(a.rank for a in self.host.values())])
        self.sites = add_bank_sites(model, linear_paths(model))
        dtype = next(model.parameters()).dtype
        self.bank = LoraBank.for_sites(model, self.sites, capacity=gpu_adapters, rank=rank, dtype=dtype)
        for adapter in list(self.host.values())[:gpu_adapters]:  # resident before warmup(): the adapted paths
            self.bank.put(adapter)  # key the CUDA graphs (LoraBank.version), so a first request recaptures none
        self.engine = self.engine_class(model, tokenizer, max_seqs=max_batch, max_len=max_len,
                                        max_waiting=max_waiting, bank=self.bank, sites=list(self.sites.values()),
                                        adapters={a.name: a for a in self.host.values()}, kv_dtype=kv_dtype,
                                        kv_memory=kv_memory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="splice-engine", daemon=True)
        self.failure: BaseException | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self.engine.run(self._stop)
        except BaseException as error:  # 503 to every waiting and later request; splice serve exits
            self.failure = error

    # ---- adapters -----------------------------------------------------------------------
    def models(self) -> list[str]:
        return [self.model_name, *self.host]

    def _check_name(self, name: str) -> None:
        if not name or name == getattr(self, "model_name", None):
            raise ServeError(400, f"adapter name {name!r} is empty or the base model's name", param="lora_name")

    def _engine_key(self, name: str) -> str:
        """A key no earlier load used: ``name`` the first time, then ``name#N`` (``#`` is never in a name)."""
        with self._keys:
            self._loads += 1
            key = f"{name}#{self._loads}" if name in self._loaded else name
            self._loaded.add(name)
            return key

    def read(self, path: str | Path, *, name: str) -> HostAdapter:
        """The adapter in folder ``path`` for the served model, under engine key ``name``."""
        return read_adapter(path, name=name, base=self.model)

    def load_adapter(self, name: str, path: str | Path) -> None:
        self._check_name(name)
        if name in self.host:
            raise ServeError(400, f"adapter {name!r} is already loaded: unload it first", param="lora_name")
        key = self._engine_key(name)
        try:
            adapter = self.read(path, name=key)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise ServeError(400, str(error), param="lora_path") from error
        if adapter.rank > self.bank.rank:
            raise ServeError(400, f"adapter rank {adapter.rank} > the server's max rank {self.bank.rank} "
                                  "(restart with a larger --max-lora-rank)", param="lora_path")
        unknown = sorted(set(adapter.weights) - set(self.sites))
        if unknown:
            raise ServeError(400, f"the adapter targets modules this model lacks: {unknown[:3]}", param="lora_path")
        self.host[name] = adapter
        self.engine.call(lambda: self.engine.add_adapter(adapter))

    def unload_adapter(self, name: str) -> None:
        if name not in self.host:
            raise ServeError(404, f"adapter {name!r} is not loaded", param="lora_name", code="model_not_found")
        key = self.host.pop(name).name
        self.engine.call(lambda: self.engine.drop_adapter(key))

    # ---- requests -----------------------------------------------------------------------
    def adapter_for(self, model: str | None) -> str | None:
        """The engine key of the adapter the client names as ``model`` (None: the base model)."""
        if model is None or model == self.model_name:
            return None
        adapter = self.host.get(model)
        if adapter is None:
            raise ServeError(404, f"The model `{model}` does not exist: /v1/models lists "
                                  f"{', '.join(self.models())}", param="model", code="model_not_found")
        return adapter.name

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        if not ids:
            raise ServeError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ServeError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:
            raise ServeError(400, f"the messages do not fit the chat template: {error}", param="messages") from error
        return self.encode(text, special=False)

    def check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.max_len:
            raise ServeError(400, f"This model's maximum context length is {self.max_len} tokens; the prompt "
                                  f"has {len(prompt_ids)} and max_tokens is {max_tokens}: shorten the prompt "
                                  "or lower max_tokens", param="max_tokens", code="context_length_exceeded")

    async def stream(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None
                     ) -> AsyncIterator[Event]:
        """The request's text as it is generated, every choice's events as they come, until the last
        choice ends; cancelled (every slot freed) if the consumer stops."""
        if self.failure is not None or not self._thread.is_alive():
            raise ServeError(503, "the generation engine is not running", kind="server_error")
        self.check_length(prompt_ids, params.max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def put(event: Event) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        request = Request(prompt_ids=prompt_ids, params=params, adapter=adapter)
        for choice in request.choices:
            choice.on_event = _relay(choice, put)
        running = len(request.choices)
        try:
            self.engine.submit(request)
        except EngineFull as error:
            raise ServeError(429, f"the server is busy ({error}): retry later", kind="rate_limit_error") from error
        try:
            while True:
                try:  # woken now and then: if the engine died, no event will ever come
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if self.failure is not None or not self._thread.is_alive():
                        raise ServeError(503, "the generation engine stopped", kind="server_error") from None
                    continue
                if event.finish_reason is not None and event.finish_reason.startswith("error"):
                    raise _failed(event.finish_reason, adapter)
                yield event
                running -= event.finish_reason is not None
                if not running:
                    return
        finally:
            request.cancelled.set()  # a no-op once finished; otherwise the engine frees the slot

