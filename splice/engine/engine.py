"""The engine: requests in, streamed text out, one scheduler step at a time.

One :meth:`Engine.step` (vLLM v1's loop, gpt-fast's plainness):

1. new requests join the scheduler (a bad one ends at once with an error event);
2. ``scheduler.schedule()`` picks the step's chunks under the token budget: running decodes, then
   prefill chunks, then waiting requests admitted through the adapter gate (a request whose adapter
   cannot get a bank slot now waits without holding up the others);
3. ``runner.execute(plan)`` runs one forward over the flat token batch;
4. :func:`~splice.engine.sampling.sample_step` draws every sampled row's next token on the device
   (penalties from :class:`~splice.engine.sampling.TokenCounts`, logprobs for the rows that ask);
   one host copy brings the step's results back (:mod:`splice.engine.transfer`); rows with a
   grammar (``SamplingParams.constraint``) can only pick what it allows (:mod:`splice.engine.constraints`);
5. output processing: EOS, ``max_tokens``, the context limit, stop strings and a completed grammar
   end a request; incremental text deltas go to ``on_event(text_delta, finish_reason)``.

``n > 1`` (``SamplingParams.n``): a request has ``n`` :attr:`Request.choices`, itself first. Only it is
scheduled; when its prompt's last token is computed, the other choices are forked from its sequence
(:meth:`~splice.engine.scheduler.Scheduler.fork`: the prompt's blocks shared, copy-on-write) and
each samples its first token from the same logits row with its own generator, so the prompt is
computed once. From then on every choice is a request of its own, with its own events.

:meth:`submit`, :meth:`cancel` and :meth:`call` are thread-safe; :meth:`step` / :meth:`run` run on one
engine thread. A failure of one request (unknown adapter, an adapter that does not fit, a callback
that raises) ends that request only. :meth:`generate` (the offline entry point) steps in the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.device import to_device
from splice.engine.blocks import BlockPool
from splice.engine.constraints import Grammars
from splice.engine.output import TextOutput, TokenLogprob, eos_ids
from splice.engine.request import OnEvent, Request, finisher
from splice.engine.runner import ModelRunner, RowAdapters
from splice.engine.sampling import SamplingParams, TokenCounts, row_generator, sample_step, token_logprobs
from splice.engine.scheduler import Scheduler
from splice.engine.scheduler import Sequence as Seq
from splice.engine.transfer import PENDING, Inflight, ToHost, pack, unpack
from splice.fused.modules import packed_lora_groups
from splice.lora.bank import BankSite, HostAdapter, LoraBank
from splice.lora.casts import AdapterCasts

__all__ = ["Engine", "EngineFull", "OnEvent", "Request", "SamplingParams", "eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside; every submodule's own training flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class EngineFull(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


class Engine:
    """Serves :class:`Request` s on ``model`` (see module docstring).

    ``max_seqs`` sequences run at once, each at most ``max_len`` tokens (prompt + output); a step computes
    at most ``token_budget`` tokens. The KV cache holds ``kv_blocks`` blocks of ``block_size`` tokens
    (default: ``max_seqs x max_len`` tokens, on CUDA up to 4x that within ``kv_memory`` of the free memory).
    ``bank`` / ``sites`` / ``adapters``: serve's adapter bank, its sites and the adapters it may load.
    ``overlap``: launch each step before the previous one's tokens reach the host (:meth:`step`;
    default: on CUDA). ``kv_dtype="int8"``: K/V as 8-bit codes with scales, about half the bytes (ModelRunner).
    ``fresh_attention="dense"``: prompts with no cached prefix attend through a dense kernel (ModelRunner).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_seqs: int = 32, max_len: int = 1024,
                 token_budget: int = 2048, block_size: int = 16, kv_blocks: int | None = None,
                 kv_memory: float = 0.8, prefix_caching: bool = True, max_waiting: int = 256,
                 bank: LoraBank | None = None, sites: Sequence[BankSite] = (),
                 adapters: dict[str, HostAdapter] | None = None, cuda_graphs: bool = True,
                 overlap: bool | None = None, kv_dtype: str = "auto", fresh_attention: str = "paged") -> None:
        for name, value in (("max_seqs", max_seqs), ("max_len", max_len), ("token_budget", token_budget),
                            ("block_size", block_size), ("max_waiting", max_waiting)):
            if value < 1:
                raise ValueError(f"Engine: {name}={value}; it must be at least 1")
        if not 0.0 < kv_memory <= 1.0:
            raise ValueError(f"Engine: kv_memory={kv_memory}; give the fraction of free GPU memory, in (0, 1]")
        self.model, self.tokenizer, self.max_len, self.max_waiting = model, tokenizer, max_len, max_waiting
        self.bank, self.adapters = bank, adapters if adapters is not None else {}
        self.runner = ModelRunner(model, block_size=block_size, max_seqs=max_seqs, max_len=max_len,
                                  num_blocks=kv_blocks, kv_memory=kv_memory, bank=bank, sites=sites,
                                  cuda_graphs=cuda_graphs, max_tokens=token_budget, kv_dtype=kv_dtype,
                                  fresh_attention=fresh_attention)
        self._limits = dict(max_seqs=max_seqs, token_budget=token_budget, max_len=max_len)
        self.prefix_caching = prefix_caching
        self.pool, self.scheduler = self._new_scheduler()
        self.eos = eos_ids(model, tokenizer)
        self.grammars = Grammars(tokenizer, eos=self.eos)  # structured output; llguidance loads on first use
        self.finished: Counter[str] = Counter()  # finish reasons so far (for monitoring)
        self.computed_tokens = 0  # tokens run through the model so far (prefix-cache hits are not)
        self.preemptions = 0  # sequences sent back to waiting for want of KV blocks (recomputed later)
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._queued = 0  # submitted, not yet running or finished (bounded by max_waiting)
        self._lock = threading.Lock()
        self._next_id = 0
        self._rejected: list[tuple[Seq, str]] = []  # refused by the adapter gate with an error
        self._retired: set[str] = set()  # dropped adapters some request still holds (drop_adapter)
        self._rows: RowAdapters | None = None  # the model's own LoRA layers, routed by request (generate)
        self._to_host = ToHost(rows=max_seqs, device=self.runner.device)
        self._counts = TokenCounts(self.runner.device)
        self._unforked: dict[Request, list[Request]] = {}  # n > 1: choices waiting for their prompt
        self._inflight: Inflight | None = None  # the launched step's sampled tokens, not yet on the host
        self.overlap = self.runner.device.type == "cuda" if overlap is None else overlap
        self._casts = AdapterCasts(model, dtype=self.runner.dtype, groups=packed_lora_groups)

    def _new_scheduler(self) -> tuple[BlockPool, Scheduler]:
        pool = BlockPool(self.runner.num_blocks, self.runner.block_size)
        return pool, Scheduler(pool, admit=self._admit, prefix_caching=self.prefix_caching, **self._limits)

    def forget_prefixes(self) -> None:
        """Drop the prefix cache (engine thread, idle engine): the weights changed, so cached K/V are stale."""
        if self.busy:
            raise RuntimeError("the prefix cache can only be dropped while no request runs or waits")
        self.pool, self.scheduler = self._new_scheduler()

    # ---- thread-safe API -------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        with self._lock:
            if self._queued >= self.max_waiting:
                raise EngineFull(f"{self._queued} requests are waiting (max_waiting={self.max_waiting})")
            self._queued += 1
        self._inbox.put(request)

    def _started(self, request: Request) -> None:
        """``request`` no longer waits (first scheduled, or ended before): it leaves the waiting count."""
        if not request.started:
            request.started = True
            with self._lock:
                self._queued -= 1

    def cancel(self, request: Request) -> None:
        """End ``request`` (its blocks are freed at the next step); a no-op once it finished."""
        request.cancelled.set()

    def call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the engine thread between two steps (e.g. register an adapter)."""
        self._commands.put(command)

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or not self._inbox.empty()
                    or self._inflight is not None)

    @property
    def graph_failure(self) -> str | None:
        return self.runner.graph_failure

    def adapter_in_use(self, name: str) -> bool:
        """Whether a running sequence uses adapter ``name`` (engine thread only)."""
        return any(seq.adapter == name for seq in self.scheduler.running)

    def add_adapter(self, adapter: HostAdapter) -> None:
        """Serve ``adapter`` under its name from now on (engine thread: e.g. through :meth:`call`)."""
        self._retired.discard(adapter.name)
        self.adapters[adapter.name] = adapter

    def drop_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` (engine thread): requests that already hold it (running or waiting)
        finish on its weights; then its host copy and bank slot are freed. Later requests for it fail."""
        self._retired.add(name)
        self._free_retired()

    def _free_retired(self) -> None:
        for name in list(self._retired):
            if not self.adapter_in_use(name) and not any(s.adapter == name for s in self.scheduler.waiting):
                self._retired.discard(name)
                if self.bank is not None:  # first: a thread that sees the name gone from adapters sees it
                    self.bank.drop(name)  # gone from the bank too (the service's monitoring, its tests)
                self.adapters.pop(name, None)

    def run(self, stop: threading.Event, *, idle_wait: float = 0.005) -> None:
        """Step until ``stop`` is set (the serving thread), the model in eval mode meanwhile."""
        self._casts.refresh()
        with eval_mode(self.model):
            while not stop.is_set():
                if not self.step():
                    stop.wait(idle_wait)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do. The model runs in the mode it is in
        (:meth:`run` and :meth:`generate` put it in eval mode).

        The step's forward is launched before the previous step's sampled tokens reach the host: decodes
        read those tokens on the device (the runner's ``feed``), and the previous step's output
        processing (:meth:`_settle`) runs on the host while the GPU computes. A request that the settled
        token ends (EOS, a stop string, a grammar) has its row of this step dropped unsampled. Without
        ``overlap`` (the default on the CPU, where nothing runs meanwhile) each step settles at once."""
        while not self._commands.empty():
            self._commands.get_nowait()()
        with torch.inference_mode(), self._casts.active():
            changed = self._take_new() | self._drop_cancelled()
            plan = self.scheduler.schedule()
            self.preemptions += len(plan.preempted)
            changed |= self._fail_rejected()
            if not plan.chunks:
                return self._settle() or changed
            for chunk in plan.chunks:
                self._started(chunk.seq.payload)
            pending = self._inflight
            try:
                logits = self.runner.execute(plan, rows=self._rows, previous=pending.tokens if pending else None,
                                             feed=[pending.row_of(c) for c in plan.chunks] if pending else ())
            except Exception as error:  # e.g. an adapter that fails in the forward: end this step's requests
                self._settle()
                for chunk in plan.chunks:
                    self._end(chunk.seq, f"error: {type(error).__name__}: {error}")
                return True
            self._settle()
            self.computed_tokens += plan.num_tokens
            self.scheduler.advance(plan)  # (after _settle: every input token of the step is known now)
            self._launch(logits, [chunk.seq for chunk in plan.chunks if chunk.sample])
            if not self.overlap:
                self._settle()
        return True

    def _launch(self, logits: Tensor, sampled: list[Seq]) -> None:
        """Sample the rows of ``sampled`` still running (forking waiting choices) on the device and start
        their trip to the host; each sequence holds :data:`PENDING` for its token until :meth:`_settle`.
        A sequence whose token is its last is finished in the scheduler now (never scheduled again)."""
        index = [row for row, seq in enumerate(sampled) if not seq.payload.finished]
        kept = [sampled[row] for row in index]
        rows = self._fork(kept)
        picks = [index[row] for row in rows] if rows is not None else index
        if not kept:
            return
        if picks != list(range(len(sampled))):
            logits = logits.index_select(0, to_device(picks, torch.long, logits.device))
        tokens, values, asked, tops = self._sample(logits, [seq.payload for seq in kept])
        self._to_host.start(values)
        self._inflight = Inflight(seqs=kept, tokens=tokens, asked=asked, tops=tops,
                                   rows={seq: row for row, seq in enumerate(kept)})
        for seq in kept:
            self.scheduler.append(seq, PENDING)
            if len(seq.payload.generated) + 1 >= seq.payload.params.max_tokens or len(seq.tokens) >= self.max_len:
                self.scheduler.finish(seq)

    def _settle(self) -> bool:
        """Wait for the launched step's tokens and process them (:meth:`_accept`); False if none was out."""
        pending, self._inflight = self._inflight, None
        if pending is None:
            return False
        tokens, logprobs = unpack(self._to_host.wait(), len(pending.seqs), pending.asked, pending.tops)
        for seq, token, logprob in zip(pending.seqs, tokens, logprobs, strict=True):
            if not seq.payload.finished:  # (cancelled meanwhile: already ended)
                self._accept(seq, token, logprob)
        return True

    def _fork(self, sampled: list[Seq]) -> list[int] | None:
        """Fork the waiting choices of every request in ``sampled`` whose prompt was just computed; the
        forks join ``sampled``. The logits row each sampled sequence reads (None: its own, in order)."""
        rows = None
        for row, seq in enumerate(list(sampled)):
            choices = self._unforked.pop(seq.payload, None)
            if not choices:
                continue
            rows = rows or list(range(len(sampled)))
            for choice in choices:
                child = self.scheduler.fork(seq, self._next_id)
                self._next_id += 1
                child.payload = choice
                sampled.append(child)
                rows.append(row)
        return rows

    def _sample(self, logits: Tensor, requests: list[Request]) -> tuple[Tensor, Tensor, list[int], list[int]]:
        """The next token of each sampled row on the device, and the values to bring to the host (the
        tokens, and the logprobs of the rows that ask: :func:`~splice.engine.transfer.pack`, ``asked``
        rows with ``tops`` alternatives each)."""
        params = [r.params for r in requests]
        device = logits.device
        penalized = [i for i, p in enumerate(params) if p.penalized]
        slots = counts = None
        if penalized:
            slots = to_device([self._counts_slot(requests[i], logits.shape[-1]) for i in penalized], torch.long,
                              device)
            counts = self._counts.rows(slots)
        # computed on the host while the device still runs the forward (see splice.engine.constraints)
        masks = self.grammars.masks([r.matcher for r in requests], vocab=logits.shape[-1], device=device)
        tokens = sample_step(logits, params, [r.generator for r in requests], counts=counts, masks=masks)
        if slots is not None:
            self._counts.add(slots, tokens.index_select(0, to_device(penalized, torch.long, device)))
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        tops = [params[i].logprobs or 0 for i in asked]
        if not asked:
            return tokens, pack(tokens), asked, tops
        at = to_device(asked, torch.long, device)
        rows = logits.index_select(0, at)  # raw, but a grammar's mask applies (as vLLM: it masks first)
        rows = rows if masks is None else rows.masked_fill(~masks.index_select(0, at), float("-inf"))
        return tokens, pack(tokens, *token_logprobs(rows, tokens.index_select(0, at), max(tops))), asked, tops

    def _counts_slot(self, request: Request, vocab: int) -> int:
        """``request``'s row of the token counts (penalties), taken at its first sampled token."""
        if request.counts_slot is None:
            request.counts_slot = self._counts.take(vocab)
        return request.counts_slot

    def _take_new(self) -> bool:
        taken = False
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return taken
            taken = True
            seq = Seq(seq_id=self._next_id, tokens=list(request.prompt_ids), prompt_len=len(request.prompt_ids),
                      adapter=request.adapter, max_tokens=request.params.max_tokens, payload=request,
                      arrival=self._next_id)
            self._next_id += 1
            if len(request.choices) > 1:
                self._unforked[request] = request.choices[1:]
            problem = self._check(request)
            if problem is not None:
                self._end(seq, f"error: {problem}")
                continue
            for choice in request.choices:
                self._prepare(choice)
            self.scheduler.add(seq)

    def _prepare(self, request: Request) -> None:
        """A choice's output state, before its first token."""
        request.output = TextOutput(self.tokenizer, request.prompt_ids, request.params.stop)
        if not request.params.greedy:
            request.generator = row_generator(request.params.seed, self.runner.device)
        if request.params.logprobs is not None:
            request.logprobs = []
        if request.params.constraint is not None:
            request.matcher = self.grammars.matcher(request.params.constraint)

    def _check(self, request: Request) -> str | None:
        """Why ``request`` cannot run (one line), or None."""
        if not request.prompt_ids:
            return "the prompt has no tokens"
        if len(request.prompt_ids) >= self.max_len:
            return (f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.max_len} "
                    "(prompt + output): shorten it")
        if request.params.constraint is not None:
            try:  # compiled once per spec; each choice copies it in _prepare
                self.grammars.compile(request.params.constraint)
            except (ValueError, ImportError) as error:
                return str(error)
        name = request.adapter
        if name is None:
            return None
        if self.bank is not None:
            return None if name in self.adapters and name not in self._retired else f"unknown adapter {name!r}"
        if self._rows is None:
            return f"adapter {name!r}: this engine has no adapter bank (give bank=, sites=, adapters=)"
        known = self._rows.known
        return None if name in known else f"unknown adapter {name!r}: the model has {known}"

    def _admit(self, seq: Seq) -> bool:
        """The scheduler's adapter gate: make the adapter resident in the bank, keeping the running ones."""
        if seq.adapter is None or self.bank is None:
            return True
        keep = {s.adapter for s in self.scheduler.running if s.adapter is not None}
        adapter = self.adapters.get(seq.adapter)
        try:
            if adapter is None:
                raise ValueError(f"adapter {seq.adapter!r} was unloaded")
            self.bank.put(adapter, keep=keep)
        except RuntimeError:  # every bank slot serves a running sequence: wait, others go ahead
            return False
        except ValueError as error:
            self._rejected.append((seq, str(error)))
            return False
        return True

    def _fail_rejected(self) -> bool:
        rejected, self._rejected = self._rejected, []
        for seq, why in rejected:
            self._end(seq, f"error: {why}")
        return bool(rejected)

    def _drop_cancelled(self) -> bool:
        gone = [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.payload.cancelled.is_set()]
        for seq in gone:
            self._end(seq, "cancelled")
        return bool(gone)

    # ---- output processing -------------------------------------------------------------------
    def _accept(self, seq: Seq, token: int, logprob: TokenLogprob | None = None) -> None:
        request: Request = seq.payload
        if request.cancelled.is_set():
            return self._end(seq, "cancelled")
        if request.matcher is not None and (broken := request.matcher.advance(token)) is not None:
            return self._end(seq, f"error: {broken}")
        if token in self.eos:
            return self._end(seq, "stop")
        seq.tokens[-1] = token  # in place of PENDING
        request.generated.append(token)
        if request.logprobs is not None and logprob is not None:
            request.logprobs.append(logprob)
        assert request.output is not None
        delta, hit = request.output.push(token)
        if hit:
            return self._end(seq, "stop", delta, flush=False)
        if request.matcher is not None and request.matcher.done:  # the grammar is complete
            return self._end(seq, "stop", delta)
        if len(request.generated) >= request.params.max_tokens or len(seq.tokens) >= self.max_len:
            return self._end(seq, "length", delta)
        if delta:
            self._emit(request, delta, None)

    def _end(self, seq: Seq, reason: str, delta: str = "", *, flush: bool = True) -> None:
        """Finish ``seq``: free its blocks, then :meth:`_finish` its request."""
        self.scheduler.finish(seq)
        if self._retired and seq.adapter in self._retired:
            self._free_retired()
        self._finish(seq.payload, reason, delta, flush=flush)

    def _finish(self, request: Request, reason: str, delta: str = "", *, flush: bool = True) -> None:
        """Stream ``delta`` and the text held back (with ``flush``; not after a stop string, which cut the
        text already), then the final event; choices never forked end the same way."""
        self._started(request)
        if request.counts_slot is not None:
            self._counts.give(request.counts_slot)
            request.counts_slot = None
        if flush and request.output is not None and reason in ("stop", "length"):
            rest, _ = request.output.finish()
            delta += rest
        request.finished, request.finish_reason = True, reason
        self.finished[reason.split(":")[0]] += 1
        if delta:
            self._emit(request, delta, None)
        self._emit(request, "", reason)
        for choice in self._unforked.pop(request, []):
            self._finish(choice, reason)

    def _emit(self, request: Request, delta: str, reason: str | None) -> None:
        """Send one event; a callback that raises cancels its own request (every choice of it) only."""
        request.text += delta
        try:
            request.on_event(delta, reason)
        except Exception:
            request.cancelled.set()

    # ---- offline -------------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, adapters: Sequence[str | None] | None = None,
                 on_finish: Callable[[Request], None] | None = None) -> list[Request]:
        """Run ``prompt_ids`` to completion in this thread (so context like ``adapters_disabled`` applies);
        the finished requests in order. ``adapters``: the model's own LoRA adapter per prompt (None: the base
        model); without it every adapter on the model applies. ``on_finish(request)`` is called as each one
        ends (e.g. a progress bar). Raises ValueError for a request that failed."""
        if self.busy:
            raise RuntimeError("Engine.generate needs an idle engine: it is serving other requests")
        many = params if isinstance(params, Sequence) else [params] * len(prompt_ids)
        if len(many) != len(prompt_ids) or (adapters is not None and len(adapters) != len(prompt_ids)):
            raise ValueError(f"{len(prompt_ids)} prompts need as many sampling params and adapters, got "
                             f"{len(many)} and {len(adapters) if adapters is not None else 'none'}")
        requests = [Request(prompt_ids=list(ids), params=p, adapter=None if adapters is None else adapters[i])
                    for i, (ids, p) in enumerate(zip(prompt_ids, many, strict=True))]
        if on_finish is not None:
            for request in requests:
                for choice in request.choices:
                    choice.on_event = finisher(request, on_finish)
        self.forget_prefixes()  # training may have moved the weights, or the caller disabled the adapters
        if adapters is not None and self.bank is None:
            self._rows = RowAdapters.of(self.model, [a for a in dict.fromkeys(adapters) if a is not None])
        try:
            for request in requests:  # past max_waiting: the caller waits for these anyway
                with self._lock:
                    self._queued += 1
                self._inbox.put(request)
            self._casts.refresh()
            with eval_mode(self.model):
                while self.busy:
                    self.step()
        finally:
            self._rows = None
        failed = [(i, r.finish_reason) for i, r in enumerate(requests) if (r.finish_reason or "").startswith("error")]
        if failed:
            raise ValueError(f"prompt {failed[0][0]}: {failed[0][1]}")
        return requests
