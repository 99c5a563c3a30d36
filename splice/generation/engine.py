"""A continuous-batching decode engine: requests join and leave the running batch at every step.

Each request owns a slot of a preallocated :class:`~splice.generation.kv_cache.SlotKVCache` (the
memory bound: ``max_batch`` sequences of ``max_len`` tokens). One :meth:`Engine.step`:

1. admits waiting requests into free slots (their adapter moved into the :class:`LoraBank` if it
   is not resident), prefilling each prompt into its slot and drawing its first token;
2. runs one decode forward over slots ``0 .. hi-1`` (every row its own adapter, through the bank),
   fed by the previous step's tokens *on the device*;
3. reads the previous step's tokens on the host (copied without blocking while step 2 runs), so
   the host never waits for the step it just launched; finished or cancelled requests free their
   slot (a request may compute one token past its end, which is dropped).

Greedy rows share one ``argmax``; sampled rows draw with their own seeded generator (temperature,
top-k, top-p as in :func:`splice.generation.generate.sample_next`), so a seed gives the same text
whatever else is in the batch. Stop strings and EOS end a request; text is emitted incrementally
(held back while it could still become a stop string or is a partial UTF-8 character).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splice.generation.generate import (
    _check_sampling,
    _continuation,
    _cut_at_stop,
    _eos_ids,
    _forward_params,
    sample_next,
)
from splice.generation.kv_cache import SlotKVCache, slot_mask
from splice.lora.bank import BankSite, HostAdapter, LoraBank
from splice.lora.routing import Route, routed

__all__ = ["Engine", "EngineFull", "Request", "SamplingParams"]

_WIDTH_STEP = 64  # decode attends over a width rounded up to this: few distinct shapes


class EngineFull(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


# on_event(text_delta, finish_reason): finish_reason None while running, then "stop"/"length"/"cancelled"
OnEvent = Callable[[str, str | None], None]


@dataclass(eq=False, kw_only=True)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: OnEvent
    adapter: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    generator: torch.Generator | None = None
    finished: bool = False


class Engine:
    """Serves :class:`Request` s on ``model`` (see module docstring). Thread-safe :meth:`submit` /
    :meth:`cancel`; :meth:`step` or :meth:`run` on one engine thread."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 32, max_len: int = 512,
                 max_waiting: int = 256, bank: LoraBank | None = None,
                 sites: Sequence[BankSite] = (), adapters: dict[str, HostAdapter] | None = None,
                 cuda_graphs: bool = True) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_len, self.max_waiting = max_batch, max_len, max_waiting
        self.cache = SlotKVCache.for_model(model, slots=max_batch, max_len=max_len)
        self.device = self.cache.keys[0].device
        self.bank, self.sites = bank, list(sites)
        self.adapters: dict[str, HostAdapter] = adapters if adapters is not None else {}
        self.eos = _eos_ids(model, tokenizer)
        self.pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self.rows: list[Request | None] = [None] * max_batch  # slot -> request
        self.lengths = [0] * max_batch  # tokens in each slot's cache
        self.tokens = torch.full((max_batch,), self.pad, dtype=torch.long, device=self.device)
        self.slot_ids = torch.full((max_batch,), -1, dtype=torch.int32, device=self.device)
        self._host = torch.empty(max_batch, dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._held: Request | None = None  # admitted next, before the queue (kept order)
        self.mask_dtype = next(model.parameters()).dtype
        params = _forward_params(model)  # transformers renamed past_key_values to cache in 5.2x
        self._cache_arg = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
        self.finished: Counter[str] = Counter()  # finish reasons so far (for monitoring)
        # CUDA graphs of the decode step over all slots, one per attention width (and bank targets)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_failure: str | None = None
        self._graphs: dict[tuple[int, int], tuple[Any, Tensor]] = {}
        self._graph_pool: Any = None
        self._positions = torch.zeros((max_batch, 1), dtype=torch.long, device=self.device)

    # ---- thread-safe API -------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self.waiting.qsize() >= self.max_waiting:
            raise EngineFull(f"{self.waiting.qsize()} requests are waiting (max_waiting={self.max_waiting})")
        self.waiting.put(request)

    def call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the engine thread between two steps (e.g. register an adapter)."""
        self.commands.put(command)

    @property
    def busy(self) -> bool:
        return any(self.rows) or not self.waiting.empty() or self._held is not None

    def run(self, stop: threading.Event, *, idle_wait: float = 0.005) -> None:
        while not stop.is_set():
            if not self.step():
                stop.wait(idle_wait)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        while not self.commands.empty():
            self.commands.get_nowait()()
        with torch.inference_mode():
            admitted = self._admit()
            launched = self._decode()
        return admitted or launched

    def _route(self, slots: Tensor) -> Any:
        if self.bank is None or not self.sites:
            return contextlib.nullcontext()
        return routed(self.sites, Route(bank=self.bank, slots=slots))

    def _forward(self, ids: Tensor, positions: Tensor, *, first: int, width: int, slots: Tensor) -> Tensor:
        """Last-position logits (B, V) of ``ids`` (B, L) written into slots ``first..``."""
        self.cache.bind(first=first, count=ids.shape[0], positions=positions, width=width)
        with self._route(slots):
            out = self.model(input_ids=ids, attention_mask=slot_mask(positions, width, self.mask_dtype),
                             position_ids=positions, use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: self.cache})
        return out.logits[:, -1, :]

    def _next_waiting(self) -> Request | None:
        if self._held is not None:
            request, self._held = self._held, None
            return request
        try:
            return self.waiting.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> bool:
        admitted = False
        while None in self.rows:
            request = self._next_waiting()
            if request is None:
                break
            if request.cancelled.is_set():
                self.finished["cancelled"] += 1
                request.on_event("", "cancelled")
                continue
            slot_id = -1
            if request.adapter is not None:
                if self.bank is None or request.adapter not in self.adapters:
                    request.on_event("", "error: unknown adapter")
                    continue
                keep = {r.adapter for r in self.rows if r is not None and r.adapter is not None}
                try:
                    slot_id = self.bank.put(self.adapters[request.adapter], keep=keep)
                except RuntimeError:  # every bank slot serves a running request: wait
                    self._held = request
                    break
            slot = self.rows.index(None)
            self._prefill(slot, request, slot_id)
            admitted = True
        return admitted

    def _prefill(self, slot: int, request: Request, slot_id: int) -> None:
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        length = ids.shape[1]
        positions = torch.arange(length, device=self.device)[None]
        self.slot_ids[slot] = slot_id
        logits = self._forward(ids, positions, first=slot, width=length, slots=self.slot_ids[slot : slot + 1])
        if request.params.temperature > 0:
            seed = request.params.seed
            request.generator = torch.Generator(device=self.device)
            if seed is not None:
                request.generator.manual_seed(seed)
            else:
                request.generator.seed()
        self.tokens[slot] = self._sample(logits, [request])[0]
        self.rows[slot], self.lengths[slot] = request, length  # the token is read when it is fed

    def _sample(self, logits: Tensor, requests: Sequence[Request | None]) -> Tensor:
        """(B,) next tokens: one argmax for all rows, then each sampled row its own draw."""
        tokens = logits.argmax(dim=-1)
        for row, request in enumerate(requests):
            if request is not None and request.params.temperature > 0:
                p = request.params
                tokens[row] = sample_next(logits[row : row + 1], temperature=p.temperature, top_k=p.top_k,
                                          top_p=p.top_p, generator=request.generator)[0]
        return tokens

    def _decode(self) -> bool:
        """One decode step over slots 0..hi-1; then the tokens it was fed are handed out."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        if not live:
            return False
        hi = self.max_batch if self.cuda_graphs else max(live) + 1  # graphs: fixed shape
        snapshot = self.rows[:hi]
        # The fed tokens (drawn by the last step or a prefill, still on the device) go to the host
        # before the forward is queued: waiting for the copy does not wait for the forward.
        host = self._host[:hi]
        host.copy_(self.tokens[:hi], non_blocking=True)
        copied = torch.cuda.Event() if self.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        positions = torch.tensor([[min(self.lengths[s], self.max_len - 1)] for s in range(hi)])
        longest = max(self.lengths[s] for s in live) + 1
        width = min(self.max_len, -(-longest // _WIDTH_STEP) * _WIDTH_STEP)
        self._positions[:hi].copy_(positions, non_blocking=True)
        logits = self._decode_logits(hi, width)
        self.tokens[:hi] = self._sample(logits, snapshot)
        for s in live:
            self.lengths[s] += 1
        if copied is not None:
            copied.synchronize()
        for slot, request in enumerate(snapshot):
            if request is not None:
                self._accept(slot, request, int(host[slot]))
        return True

    def _decode_logits(self, hi: int, width: int) -> Tensor:
        """The decode forward over slots ``0..hi-1`` from the static token / position buffers:
        replayed from a CUDA graph when enabled (captured on first use of a width)."""
        def forward() -> Tensor:
            return self._forward(self.tokens[:hi, None], self._positions[:hi], first=0, width=width,
                                 slots=self.slot_ids[:hi])

        if not self.cuda_graphs:
            return forward()
        key = (width, self.bank.version if self.bank is not None else 0)
        if any(version != key[1] for _, version in self._graphs):
            self._graphs.clear()  # the bank's adapted paths changed: recapture
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(forward)
            except Exception as error:  # e.g. a model that syncs inside its forward: run eagerly
                self.cuda_graphs, self.graph_failure = False, f"{type(error).__name__}: {error}"
                return forward()
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, forward: Callable[[], Tensor]) -> tuple[Any, Tensor]:
        # Warm-up on a side stream (Triton compiles, cuBLAS picks kernels); it rewrites the same
        # keys/values the replay will, so running it is harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = forward()
        return graph, logits

    def _accept(self, slot: int, request: Request, token: int) -> None:
        if request.cancelled.is_set():
            return self._finish(slot, request, "cancelled")
        if token in self.eos:
            return self._finish(slot, request, "stop")
        request.generated.append(token)
        text = _continuation(self.tokenizer, request.prompt_ids, request.generated)
        text, hit = _cut_at_stop(text, request.params.stop)
        full = len(request.generated) >= request.params.max_tokens or self.lengths[slot] >= self.max_len
        # (lengths[slot] counts the token just accepted: the cache cannot take another one)
        if hit or full:
            self._emit(request, text)
            return self._finish(slot, request, "stop" if hit else "length")
        hold = max((len(s) - 1 for s in request.params.stop), default=0)
        safe = len(text) - hold
        while safe > request.emitted and text[safe - 1] == "\ufffd":  # an incomplete character
            safe -= 1
        if safe > request.emitted:
            self._emit(request, text[:safe])

    def _emit(self, request: Request, text: str) -> None:
        if len(text) > request.emitted:
            delta, request.emitted = text[request.emitted :], len(text)
            request.on_event(delta, None)

    def _finish(self, slot: int, request: Request, reason: str) -> None:
        request.finished = True
        self.finished[reason] += 1
        request.on_event("", reason)
        if self.rows[slot] is request:
            self.rows[slot] = None
            self.slot_ids[slot] = -1
            self.lengths[slot] = 0
