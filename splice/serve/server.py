"""``splice serve``: load a base model and adapters, then run the OpenAI-compatible API on uvicorn.

Shutdown: SIGTERM (or Ctrl+C) starts a drain: the listening socket closes, new requests get 503,
running requests may finish until ``drain_timeout``, when uvicorn cancels the rest; the process
then exits 0 (not by the signal: a supervisor sees a clean stop). A watchdog ends the process
:data:`_EXIT_GRACE_S` after the drain timeout whatever is still running. If the generation engine
dies, its waiting requests get 503, the server drains the same way and :func:`serve_service`
raises a :class:`~splice.core.errors.RunError`, so ``splice serve`` exits 1 with one line and a
supervisor restarts it, instead of lingering and answering 503.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import uvicorn

from splice.core.device import resolve_device
from splice.core.errors import RunError, one_line
from splice.kernels.kv_cache import check_kv_dtype
from splice.models.loading import load_model
from splice.serve.adapter_source import check_adapter_name
from splice.serve.app import MAX_REQUEST_BYTES, build_app
from splice.serve.service import ServeError, Service

__all__ = ["DRAIN_TIMEOUT_S", "frozen_heap", "parse_adapters", "running", "serve", "serve_service"]

DRAIN_TIMEOUT_S = 30.0  # seconds running requests get to finish after SIGTERM
_EXIT_GRACE_S = 3.0  # after the drain timeout, for the engine thread and lifespan to stop


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """``["name=path", ...]`` -> ``{name: path}``; a bad spec names the fix before anything loads."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: write NAME=PATH, e.g. --adapter sql=runs/sql/adapter")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice: give each adapter its own name")
        try:
            check_adapter_name(name, base="", option="--adapter")  # the base's own name: Service checks it
        except ServeError as error:
            raise ValueError(error.message) from None
        folder = Path(path)
        if not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {name}={path}: no adapter_config.json there (pass the "
                                    "adapter folder, e.g. <run dir>/adapter)")
        adapters[name] = folder
    return adapters


def _check_access(*, allow_adapter_dir: str | Path | None, quantize: str | None) -> None:
    if allow_adapter_dir is not None and not Path(allow_adapter_dir).is_dir():
        raise FileNotFoundError(f"--allow-adapter-dir {allow_adapter_dir}: no such folder; create it or name "
                                "the folder clients may load adapters from")
    if quantize not in (None, "nf4", "int8"):
        raise ValueError(f"--quantize {quantize}: choose nf4 or int8")


def _check_limits(*, max_request_bytes: int, drain_timeout: float) -> None:
    if max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes {max_request_bytes}: it must be >= 1 (default {MAX_REQUEST_BYTES})")
    if not drain_timeout >= 0:  # also refuses nan
        raise ValueError(f"--drain-timeout {drain_timeout}: it must be >= 0 seconds (default {DRAIN_TIMEOUT_S:g})")


def serve(model: str | None, *, adapters: dict[str, Path], host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", dtype: str = "auto", model_name: str | None = None, max_batch: int = 32,
          max_len: int = 1024, gpu_adapters: int = 8, max_lora_rank: int = 64,
          max_request_bytes: int = MAX_REQUEST_BYTES, drain_timeout: float = DRAIN_TIMEOUT_S,
          api_keys: Collection[str] = (), allow_adapter_dir: str | Path | None = None,
          quantize: str | None = None, kv_cache: str = "auto", kv_memory: float = 0.8) -> None:
    """``splice serve``. ``quantize`` (``"nf4"`` / ``"int8"``): the base's linears quantized as they
    load (:func:`~splice.models.loading.load_model`); ``kv_cache`` (``"auto"`` / ``"int8"``): the K/V cache's
    dtype (:class:`~splice.engine.runner.ModelRunner`), ``kv_memory`` the most of the free GPU memory it
    takes; ``api_keys`` / ``allow_adapter_dir``: see
    :func:`~splice.serve.app.build_app`."""
    _check_limits(max_request_bytes=max_request_bytes, drain_timeout=drain_timeout)  # before the model loads
    check_kv_dtype(kv_cache)  # a bad choice: one line before the model loads
    _check_access(allow_adapter_dir=allow_adapter_dir, quantize=quantize)
    resolved = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    base, tokenizer = load_model(model, dtype=torch_dtype, device=resolved, quantize=quantize)
    name = model_name or (Path(model).name if model else "smollm2-135m-instruct")
    service = Service(base, tokenizer, model_name=name, adapters=dict(adapters), max_batch=max_batch,
                      max_len=min(max_len, int(getattr(tokenizer, "model_max_length", max_len) or max_len)),
                      gpu_adapters=gpu_adapters, max_lora_rank=max_lora_rank, kv_dtype=kv_cache,
                      kv_memory=kv_memory)
    started = time.monotonic()
    graphs = service.engine.runner.warmup()  # every CUDA graph before the first request (no capture mid-load)
    if graphs:
        print(f"splice serve: {graphs} CUDA graphs captured in {time.monotonic() - started:.1f} s", flush=True)
    keys = "with API keys" if api_keys else "open (no --api-key)"
    print(f"splice serve: {name}{f' ({quantize})' if quantize else ''} with adapters {sorted(adapters) or 'none'} "
          f"on http://{host}:{port}/v1, {keys}", flush=True)
    serve_service(service, host=host, port=port, max_request_bytes=max_request_bytes, drain_timeout=drain_timeout,
                  api_keys=api_keys, allow_adapter_dir=allow_adapter_dir)


class _Server(uvicorn.Server):
    """uvicorn with splice's shutdown: a signal drains (see module docstring) and is not raised
    again afterwards (uvicorn re-raises it, which would end the process by the signal)."""

    def __init__(self, config: uvicorn.Config, *, draining: threading.Event, drain_timeout: float) -> None:
        super().__init__(config)
        self.draining, self.drain_timeout = draining, drain_timeout
        self.exit_deadline: float | None = None  # time.monotonic() by which the process must be gone

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting for requests
        self.drain()

    def drain(self) -> None:
        """Stop admitting (503) and shut down; running requests get ``drain_timeout`` seconds."""
        self.draining.set()
        if self.exit_deadline is None:
            self.exit_deadline = time.monotonic() + self.drain_timeout + _EXIT_GRACE_S
        self.should_exit = True


def _server(service: Service, *, host: str, port: int, max_request_bytes: int, drain_timeout: float,
            api_keys: Collection[str], allow_adapter_dir: str | Path | None) -> _Server:
    app = build_app(service, max_request_bytes=max_request_bytes, api_keys=api_keys,
                    allow_adapter_dir=allow_adapter_dir)
    # uvicorn types this option int in some releases and float in others; it is used as a float.
    graceful: dict[str, Any] = {"timeout_graceful_shutdown": drain_timeout}
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", **graceful)
    return _Server(config, draining=app.state.draining, drain_timeout=drain_timeout)


def _watch(server: _Server, service: Service, done: threading.Event) -> None:
    """Drain once the engine has died; end the process if shutdown outlives its deadline."""
    while not done.wait(0.2):
        if service.failure is not None and not server.should_exit:
            server.drain()
        if server.exit_deadline is not None and time.monotonic() > server.exit_deadline:
            print(f"splice serve: requests still running {server.drain_timeout:g} s after shutdown began "
                  "(--drain-timeout); exiting", file=sys.stderr, flush=True)
            os._exit(1 if service.failure is not None else 0)


_FREEZE_DEPTH: ContextVar[int] = ContextVar("splice_frozen_heap_depth", default=0)  # frozen_heap's nesting


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep what exists at start-up (torch, transformers, the model, the warm-up's objects: 380,000-
    495,000 tracked objects) out of Python's full collections while the block runs, then give it back.

    A full (oldest-generation) collection walks every tracked object with the GIL held (198 ms in a
    server process on the H100 machine's CPU, 177-205 on the 2-core CI machine; ``benchmarks/serve.py``
    times it), during which the engine thread cannot schedule a step, so the requests that arrive then
    wait that long for their first token. What lives at start-up lives as long as the server, so
    ``gc.freeze()`` moves it to the permanent generation the collector skips (vLLM does the same after
    its start-up); the collections that still run walk only what serving created. ``gc.unfreeze()`` when
    the outermost block of this context ends (a server inside a benchmark's block: the inner end unfreezes
    nothing), so a process that embeds the server (tests, notebooks, benchmarks) gets its collector back.
    The nesting is counted here, not read from ``gc.get_freeze_count()``: the device's Python starts with
    375 objects already frozen, and a block that took that for an outer one never unfroze (a test worker
    went on with 757,095 frozen objects). The permanent generation is the process's, so the outermost end
    gives back everything frozen, whoever froze it; two servers on two threads of one process each count
    their own blocks, and the first to stop unfreezes the other's heap too (its collections then walk it).
    """
    depth = _FREEZE_DEPTH.get()
    _FREEZE_DEPTH.set(depth + 1)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        _FREEZE_DEPTH.set(depth)  # (not reset(token): an exit from another context, an async fixture's, may not)
        if depth == 0:
            gc.unfreeze()


def serve_service(service: Service, *, host: str = "127.0.0.1", port: int = 8000,
                  max_request_bytes: int = MAX_REQUEST_BYTES, drain_timeout: float = DRAIN_TIMEOUT_S,
                  api_keys: Collection[str] = (), allow_adapter_dir: str | Path | None = None) -> None:
    """Serve ``service`` until SIGTERM/SIGINT (drained, then returns) or until its engine dies
    (drained, then a :class:`RunError`)."""
    _check_limits(max_request_bytes=max_request_bytes, drain_timeout=drain_timeout)
    server = _server(service, host=host, port=port, max_request_bytes=max_request_bytes,
                     drain_timeout=drain_timeout, api_keys=api_keys, allow_adapter_dir=allow_adapter_dir)
    done = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(server, service, done), name="splice-watchdog", daemon=True)
    watchdog.start()
    try:
        with frozen_heap():
            server.run()
    finally:
        done.set()
    if service.failure is not None:
        failure = service.failure
        raise RunError(f"the generation engine stopped ({type(failure).__name__}: {one_line(str(failure))}); "
                       "the server exits so that a supervisor can restart it")


@contextlib.contextmanager
def running(service: Service, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0,
            max_request_bytes: int = MAX_REQUEST_BYTES, drain_timeout: float = DRAIN_TIMEOUT_S,
            api_keys: Collection[str] = (), allow_adapter_dir: str | Path | None = None) -> Iterator[str]:
    """``service``'s OpenAI-compatible app on uvicorn in a background thread for the length of the
    block (tests, benchmarks, notebooks); yields the base URL ``http://host:port/v1``. ``port=0``
    takes a free port. Leaving the block drains as SIGTERM does. ``api_keys`` /
    ``allow_adapter_dir``: see :func:`~splice.serve.app.build_app`."""
    server = _server(service, host=host, port=port, max_request_bytes=max_request_bytes,
                     drain_timeout=drain_timeout, api_keys=api_keys, allow_adapter_dir=allow_adapter_dir)
    thread = threading.Thread(target=server.run, daemon=True)
    with frozen_heap():
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the server on {host}:{port} did not start within {timeout_s:.0f} s")
            time.sleep(0.025)
        bound = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://{host}:{bound}/v1"
        finally:
            server.drain()
            thread.join(timeout=drain_timeout + _EXIT_GRACE_S)
