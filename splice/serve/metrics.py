"""Prometheus metrics of one server (``GET /metrics``), through ``prometheus-client``.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (two servers in one process
count apart). Counted by the HTTP layer as requests go:

- ``splice_requests_total{model,status}``: generation requests by HTTP status (a stream counts its
  status when it starts); ``model`` is the base or a loaded adapter, else ``unknown`` (a client's
  made-up names cannot grow the label set);
- ``splice_prompt_tokens_total{model}``, ``splice_generation_tokens_total{model}``;
- ``splice_time_to_first_token_seconds`` (request received to first text) and
  ``splice_inter_token_latency_seconds`` (between streamed text pieces; a piece is one token but
  where the detokenizer holds back an incomplete character or a possible stop string);
- ``splice_adapter_registrations_total{action}``: runtime ``load`` / ``unload`` calls that succeeded.

Read from the engine at each scrape (:func:`engine_state`): ``splice_queue_depth`` (requests
waiting), ``splice_running_requests`` (the running batch), ``splice_kv_blocks_in_use`` /
``splice_kv_blocks_total``, ``splice_adapter_loads_total`` / ``splice_adapter_evictions_total``
(adapters copied into / pushed out of the device bank), ``splice_preemptions_total``. A value the
engine does not expose is left out rather than reported as 0.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "ServeMetrics", "engine_state"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 2.0)
# engine_state key -> (metric name, help, kind)
_ENGINE_METRICS = {
    "waiting": ("splice_queue_depth", "requests submitted and not yet running", "gauge"),
    "running": ("splice_running_requests", "requests in the running batch", "gauge"),
    "kv_blocks_in_use": ("splice_kv_blocks_in_use", "KV-cache blocks held by running requests", "gauge"),
    "kv_blocks_total": ("splice_kv_blocks_total", "KV-cache blocks that can be handed out", "gauge"),
    "adapter_loads": ("splice_adapter_loads", "adapters copied into the device bank", "counter"),
    "adapter_evictions": ("splice_adapter_evictions", "adapters pushed out of the device bank", "counter"),
    "preemptions": ("splice_preemptions", "requests sent back to waiting for want of KV blocks", "counter"),
}


def _count(read: Any) -> int | None:
    """``read()``'s length or value as an int; None when the engine lacks it or it changed mid-read
    (the engine thread owns these structures; a scrape never blocks it)."""
    try:
        value = read()
        return len(value) if isinstance(value, (tuple, list, dict, set)) else int(value)
    except (AttributeError, TypeError, RuntimeError, ValueError):
        return None


def engine_state(service: Any) -> dict[str, int]:
    """A read-only snapshot of ``service``'s engine for monitoring (see module docstring); keys of
    values the engine does not expose are absent. Safe from any thread."""
    stats = getattr(service, "stats", None)
    if callable(stats):  # the service's own snapshot, when it has one
        return {k: int(v) for k, v in stats().items() if k in _ENGINE_METRICS and v is not None}
    engine: Any = getattr(service, "engine", None)  # each read below may fail: see _count
    scheduler: Any = getattr(engine, "scheduler", None)
    pool: Any = getattr(engine, "pool", None)
    bank: Any = getattr(service, "bank", None) or getattr(engine, "bank", None)
    reads = {
        "waiting": lambda: engine.num_waiting if hasattr(engine, "num_waiting") else scheduler.waiting,
        "running": lambda: scheduler.running,
        "kv_blocks_in_use": lambda: pool.num_usable - pool.num_free,
        "kv_blocks_total": lambda: pool.num_usable,
        "adapter_loads": lambda: bank.loads,
        "adapter_evictions": lambda: bank.evictions,
        "preemptions": lambda: engine.preemptions,
    }
    values = {key: _count(read) for key, read in reads.items()}
    return {key: value for key, value in values.items() if value is not None}


class _EngineCollector(Collector):
    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        for key, value in engine_state(self.service).items():
            name, text, kind = _ENGINE_METRICS[key]
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, text, value=value)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # unknown until a scrape: registered without a name check


class ServeMetrics:
    """The metrics of one app over ``service`` (see module docstring)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("splice_requests", "generation requests by model and HTTP status",
                                ["model", "status"], registry=registry)
        self.prompt_tokens = Counter("splice_prompt_tokens", "prompt tokens of answered requests", ["model"],
                                     registry=registry)
        self.generation_tokens = Counter("splice_generation_tokens", "tokens generated", ["model"],
                                         registry=registry)
        self.ttft = Histogram("splice_time_to_first_token_seconds", "request received to its first text",
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("splice_inter_token_latency_seconds", "time between streamed text pieces",
                             buckets=_ITL_BUCKETS, registry=registry)
        self.registrations = Counter("splice_adapter_registrations", "runtime adapter loads and unloads",
                                     ["action"], registry=registry)
        registry.register(_EngineCollector(service))

    def model(self, name: str | None) -> str:
        """The ``model`` label of a request for ``name`` (bounded: see module docstring)."""
        known = self.service.models()
        name = name or known[0]
        return name if name in known else "unknown"

    def finished(self, model: str, *, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.generation_tokens.labels(model=model).inc(generated_tokens)

    async def timed(self, events: AsyncIterator[Any], *, received: float) -> AsyncIterator[Any]:
        """``events`` as they come, their times observed: the first text's since ``received``
        (``time.perf_counter()`` when the request arrived), then the gaps between texts."""
        last: float | None = None
        try:
            async for event in events:
                if event.text:
                    now = time.perf_counter()
                    (self.ttft if last is None else self.itl).observe(now - (received if last is None else last))
                    last = now
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
