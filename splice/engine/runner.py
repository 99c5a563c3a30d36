"""The model runner: one forward of a scheduler step over a flat batch of tokens.

A :class:`~splice.engine.scheduler.StepPlan` (decode chunks of one token, prefill chunks of many) is
flattened into ``T`` tokens: ids, positions, the flat cache slot of each token (``slot_mapping``),
one block-table row, ``seq_len`` and query offset per chunk, and the indices of the tokens whose
logits are sampled (the last token of each chunk with ``sample``). The runner then calls the model's
own parts: the input embedding (Gemma's scale lives inside it), every decoder layer on hidden states
shaped ``(T, 1, H)`` (each token is a batch row, so splice's per-row adapter routing is per token:
LoRA ``use_adapters`` rows, or :class:`~splice.lora.bank.LoraBank` slots with one token a row),
the final norm and the output head on the sampled tokens only. Attention is the
:class:`~splice.engine.attention.PagedAttention` rewrite, fed through a ContextVar.

The runner owns the KV cache: per layer ``(num_blocks, block_size, kv_heads, head_dim)`` keys and
values in the model's dtype, or with ``kv_dtype="int8"`` int8 codes and fp32 ``(num_blocks, block_size,
kv_heads)`` scales (:mod:`splice.kernels.kv_cache`: about half the bytes a decode reads, and twice the
tokens in the same memory); block 0 is scratch (padded tokens write there). Copy-on-write block copies
of the plan run before the forward. Decode-only steps on CUDA replay a CUDA graph captured per batch-size bucket
(1, 2, 4, ... up to ``max_seqs``), context bucket (128, 1,024, ``max_len``: the attention grid of a short
context needs no split and no merge) and bank version, padded to the bucket with scratch rows.

A step's inputs are written in place into persistent host buffers and sent in one copy
(:mod:`splice.engine.inputs`); the graphs read fixed device views of them. On CUDA the runner also
installs :func:`splice.fused.apply.fuse`'s RMSNorm and SwiGLU rewrites (Triton, one launch each
instead of Hugging Face's several; they run the same math with autograd too, so training the model
afterwards is unaffected) and packs q/k/v and gate/up weights into one buffer each
(:func:`splice.fused.projections.pack_projections`: one GEMM where there were three or two; only
where the projections are plain linears). RoPE and the K/V cache write are one launch a layer
inside ``PagedAttention``, and each residual add runs in the epilogue of the GEMM before it
(:func:`splice.engine.layer.run_layer`).

Steps with prefill chunks replay CUDA graphs too, captured per token-count bucket (16 ... 256, then
multiples of 256 to 4,096 and of 512 up to the token budget): the padding tokens form padding
sequences that read and write only the scratch block, and the remaining padded sequences are empty
(attention skips them).
:meth:`ModelRunner.warmup` captures every bucket up front.

``fresh_attention="dense"``: in steps with prefill chunks, prompts with no cached prefix attend over the step's own
K/V through a dense kernel (:mod:`splice.kernels.varlen_attention`, no page-table loads in its key loop) and the
paged kernel serves the rest; ``"paged"`` (the default): the paged kernel serves every sequence.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.device import to_device
from splice.engine.attention import PagedAttention, StepAttention, install_paged_attention, paged_step
from splice.engine.inputs import Staging, StepInputs
from splice.engine.layer import linear_out, run_layer
from splice.engine.scheduler import Chunk, StepPlan
from splice.fused.apply import fuse
from splice.fused.projections import pack_projections
from splice.kernels.kv_cache import kv_cache_dtype, kv_caches
from splice.lora.adapter_file import base_shape
from splice.lora.apply import lora_modules
from splice.lora.bank import BankSite, LoraBank, bank_holds
from splice.lora.routing import Route, current_routes, routed

__all__ = ["ModelRunner", "RowAdapters"]


@dataclass(frozen=True)
class _Parts:
    """The pieces of a decoder-only causal LM the runner calls in order."""

    embed: nn.Module
    rotary: Callable[[Tensor, Tensor, str], tuple[Tensor, Tensor]]  # (hidden, positions, layer type)
    layers: Sequence[nn.Module]
    layer_types: Sequence[str]  # RoPE may differ by layer type (Gemma3: local and global)
    norm: nn.Module
    head: nn.Module
    final_softcap: float


def _parts(causal_lm: nn.Module) -> _Parts:
    model: Any = causal_lm
    base: Any = getattr(model, "model", None)
    config = getattr(model, "config", None)
    names = ("embed_tokens", "rotary_emb", "layers", "norm")
    if base is None or not all(hasattr(base, n) for n in names) or config is None:
        raise ValueError(f"the generation engine runs decoder-only causal LMs shaped like Llama (model.embed_tokens, "
                         f"layers, norm, rotary_emb): {type(model).__name__} is not one")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings)")
    rotary: Any = base.rotary_emb
    local: Any = getattr(base, "rotary_emb_local", None)  # Gemma3 before transformers 5.2x
    typed = "layer_type" in inspect.signature(rotary.forward).parameters

    def rope(hidden: Tensor, positions: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        if typed:
            return rotary(hidden, positions, kind)
        module = local if local is not None and kind == "sliding_attention" else rotary
        return module(hidden, positions)

    layers = list(base.layers)
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * len(layers))
    return _Parts(embed=model.get_input_embeddings(), rotary=rope, layers=layers, layer_types=kinds,
                  norm=base.norm, head=head,
                  final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0))


def _kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(cache layers, kv heads, head dim) of ``model`` (after :func:`install_paged_attention`). The kv
    heads are those k_proj computes: a tensor-parallel rank's share (splice.distributed.tensor_parallel)."""
    paged = [m for m in model.modules() if isinstance(m, PagedAttention)]
    shape = base_shape(paged[0].k_proj)
    config: Any = model.config
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if shape is not None:
        kv_heads = shape[1] // paged[0].head_dim
    return max(m.layer_idx for m in paged) + 1, kv_heads, paged[0].head_dim


def _dtype(model: nn.Module) -> torch.dtype:
    """The compute dtype: the first floating-point parameter's (quantized weights are not)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


KV_ROOM = 4  # on CUDA the cache holds up to 4x the running batch's worst case: the rest caches prefixes


def _kv_blocks(model: nn.Module, *, block_size: int, max_seqs: int, max_len: int, kv_memory: float,
               device: torch.device, dtype: torch.dtype) -> int:
    """How many KV blocks (of cache ``dtype``) to allocate: enough for ``max_seqs`` sequences of ``max_len``
    tokens; on CUDA up to ``KV_ROOM`` times that for the prefix cache, within ``kv_memory`` (a fraction) of the
    free memory. +1 scratch block either way. (Capped by the need, a small model's server does not take 80% of
    a card that other processes share.)"""
    needed = max_seqs * -(-max_len // block_size)
    if device.type != "cuda":
        return needed + 1
    layers, kv_heads, head_dim = _kv_shape(model)
    per_vector = head_dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
    per_block = 2 * layers * block_size * kv_heads * per_vector
    free, _ = torch.cuda.mem_get_info(device)
    return min(int(free * kv_memory) // per_block, KV_ROOM * needed + 1)


@dataclass(frozen=True, eq=False)
class RowAdapters:
    """The model's own LoRA adapters routed per token for one offline call: every LoRA layer, and the
    linear ones (LoRA and DoRA) packed into a :class:`LoraBank` so a projection adds every token's adapter
    in one multi-LoRA pass instead of one pass (and one copy of the output) per adapter. Layers the bank
    does not hold (embeddings, convolutions) follow the per-token adapter names."""

    layers: list[nn.Module]
    bank: LoraBank | None
    known: list[str]  # the adapters on the model

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> RowAdapters:
        found = lora_modules(model)
        packable = names and any(bank_holds(layer) for _, _, layer in found)
        return cls([layer for _, _, layer in found], LoraBank.from_model(model, names) if packable else None,
                   list(dict.fromkeys(layer.name for _, _, layer in found)))

    def route(self, adapters: Sequence[str | None]) -> contextlib.AbstractContextManager[Any]:
        slots = self.bank.slots(adapters) if self.bank is not None else None
        return routed(self.layers, Route(rows=tuple(adapters), bank=self.bank, slots=slots))


def _buckets(max_seqs: int) -> list[int]:
    sizes = [1 << i for i in range(max(1, max_seqs).bit_length()) if 1 << i < max_seqs]
    return [*sizes, max_seqs]


def _context_buckets(max_len: int) -> list[int]:
    """Context bounds of the decode graphs: 128 keys (paged attention's shortest partition: one pass, no
    merge kernel), 1,024, then ``max_len``. A graph's attention grid is sized for its bound."""
    return [*(c for c in (128, 1024) if c < max_len), max_len]


def _token_buckets(max_tokens: int) -> list[int]:
    """Token counts of the graphs for steps with prefill chunks: powers of two from 16 to 256, multiples of
    256 to 4,096, then of 512 (at most 1/9 padding past 4,096), up to ``max_tokens``. (A step of 256 decodes
    and a 525-token prompt pads to 1,024 with 512-token steps: 24% of its GEMM rows for nothing; the
    offline run's mixed steps averaged 16% padding with them, 2026-12-06.)"""
    small = [16 << i for i in range(5) if 16 << i < max_tokens]
    large = [*range(512, min(max_tokens, 4097), 256), *range(4608, max_tokens, 512)]
    return [*small, *(t for t in large if t < max_tokens), max_tokens]


class ModelRunner:
    """Runs scheduler steps on ``model`` (see module docstring). The cache holds ``num_blocks`` blocks (default:
    ``max_seqs x max_len`` tokens; on CUDA up to ``KV_ROOM`` x that within ``kv_memory`` of the free memory). ``bank`` / ``sites``:
    serve's adapter bank, routed per token by slot; without one, a step may route the model's own LoRA
    layers by name. ``max_tokens``: the most tokens of a step (the scheduler's token budget; the input
    buffers grow past it if needed). ``kv_dtype``: ``"auto"`` (the model's dtype) or ``"int8"`` (module doc).
    ``fresh_attention``: ``"paged"`` or ``"dense"`` (module doc)."""

    def __init__(self, model: nn.Module, *, block_size: int, max_seqs: int, max_len: int,
                 num_blocks: int | None = None, kv_memory: float = 0.8, bank: LoraBank | None = None,
                 sites: Sequence[BankSite] = (), cuda_graphs: bool = True, max_tokens: int = 2048,
                 kv_dtype: str = "auto", fresh_attention: str = "paged") -> None:
        self.dtype = _dtype(model)  # the compute dtype
        cache_dtype = kv_cache_dtype(kv_dtype, self.dtype)  # (a bad choice fails before any work)
        if fresh_attention not in ("paged", "dense"):
            raise ValueError(f"fresh_attention={fresh_attention!r}: choose paged or dense")
        if fresh_attention == "dense" and cache_dtype == torch.int8:
            raise ValueError("fresh_attention='dense' attends over K/V in the model's dtype; with kv_dtype='int8' "
                             "keep fresh_attention='paged'")
        install_paged_attention(model)
        self.model, self.parts = model, _parts(model)
        self.block_size, self.max_seqs, self.max_len = block_size, max_seqs, max_len
        self.blocks_per_seq = -(-max_len // block_size)
        self.bank, self.sites = bank, list(sites)
        self.device = next(self.parts.layers[0].parameters()).device  # embeddings may sit on the host
        if self.device.type == "cuda":  # Triton RMSNorm and SwiGLU (a few launches less per layer) and one
            fuse(model, lora=False, rope=False)  # GEMM for q/k/v and for gate/up; the CPU keeps Hugging
            pack_projections(model)  # Face's modules and separate weights, the reference
        if num_blocks is None:
            num_blocks = _kv_blocks(model, block_size=block_size, max_seqs=max_seqs, max_len=max_len,
                                    kv_memory=kv_memory, device=self.device, dtype=cache_dtype)
        self.num_blocks = num_blocks
        layers, kv_heads, head_dim = _kv_shape(model)
        self.fresh = fresh_attention == "dense"
        shape = (num_blocks, block_size, kv_heads, head_dim)
        caches = [kv_caches(shape, cache_dtype, self.device) for _ in range(layers)]
        self.key_caches, self.value_caches = [k for k, _ in caches], [v for _, v in caches]
        scaled = cache_dtype == torch.int8  # int8 codes: a scale per (slot, kv head) beside each cache
        self.key_scales = [torch.zeros(shape[:3], device=self.device) for _ in range(layers if scaled else 0)]
        self.value_scales = [torch.zeros(shape[:3], device=self.device) for _ in range(layers if scaled else 0)]
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_failure: str | None = None
        self._graphs: dict[tuple[int, int, int, int], tuple[Any, Tensor]] = {}  # (*bucket, bank version)
        self._graph_routes = current_routes()  # the caller's routing the graphs were captured under (held)
        self._graph_pool: Any = None
        self._eager = self._staging(tokens=max(max_tokens, max_seqs), seqs=max_seqs)
        self.token_buckets = _token_buckets(max_tokens) if self.cuda_graphs else []
        self._graph_inputs: Staging | None = None  # the inputs every CUDA graph reads (fixed addresses)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.key_caches, *self.value_caches, *self.key_scales, *self.value_scales))

    # ---- the batch ------------------------------------------------------------------------
    def _staging(self, *, tokens: int, seqs: int) -> Staging:
        return Staging(tokens=tokens, seqs=seqs, width=self.blocks_per_seq, block_size=self.block_size,
                       device=self.device)

    def _bank_slot(self, chunks: Sequence[Chunk]) -> Callable[[str | None], int] | None:
        """Each chunk's adapter -> its bank slot (the step's adapters become the most recently used)."""
        if self.bank is None:
            return None
        resident = self.bank.resident
        for name in dict.fromkeys(c.seq.adapter for c in chunks if c.seq.adapter is not None):
            resident.move_to_end(name)  # recently used: evicted last
        return lambda name: -1 if name is None else resident[name]

    def _eager_inputs(self, chunks: Sequence[Chunk], feed: Sequence[int] = ()) -> StepInputs:
        tokens, seqs = sum(c.count for c in chunks), len(chunks)
        if not self._eager.fits(tokens, seqs):
            self._eager = self._staging(tokens=max(tokens, 2 * self._eager.tokens), seqs=max(seqs, self._eager.seqs))
        return self._eager.fill(chunks, bank_slot=self._bank_slot(chunks), feed=feed)

    # ---- the forward ----------------------------------------------------------------------
    def _route(self, adapters: Sequence[str | None] | None, slots: Tensor,
               rows: RowAdapters | None) -> contextlib.AbstractContextManager[Any]:
        """Per-token adapters: the bank's slots, the model's LoRA layers by name (``rows``), or none
        (every adapter on the model applies, or adapters_disabled of the caller)."""
        if self.bank is not None and self.sites:
            return routed(self.sites, Route(bank=self.bank, slots=slots))
        if adapters is not None and rows is not None:
            return rows.route(adapters)
        return contextlib.nullcontext()

    def _forward(self, t: StepInputs, *, adapters: list[str | None] | None = None,
                 head_adapters: list[str | None] | None = None, rows: RowAdapters | None = None) -> Tensor:
        """Logits (S, V) fp32 of the sampled tokens ``t.sample_at`` (see module docstring);
        ``adapters`` / ``head_adapters``: LoRA adapter names of every token / of the sampled ones,
        routed through ``rows``."""
        parts = self.parts
        step = StepAttention(key_caches=self.key_caches, value_caches=self.value_caches, slot_mapping=t.slots,
                             block_tables=t.tables, seq_lens=t.seq_lens, query_start_loc=t.starts,
                             max_query_len=t.max_query_len, max_seq_len=t.max_seq_len, key_scales=self.key_scales,
                             value_scales=self.value_scales, fresh=self.fresh and t.max_query_len > 1)
        positions = t.positions[:, None]  # (T, 1): one token a row
        with paged_step(step), self._route(adapters, t.bank_slots, rows):
            hidden = parts.embed(t.ids[:, None])  # (T, 1, H)
            kinds = {kind: parts.rotary(hidden, positions, kind) for kind in set(parts.layer_types)}
            for layer, kind in zip(parts.layers, parts.layer_types, strict=True):
                hidden = run_layer(layer, hidden, positions=positions, position_embeddings=kinds[kind])
        last = parts.norm(hidden.index_select(0, t.sample_at))  # (S, 1, H)
        with self._route(head_adapters, t.bank_slots.index_select(0, t.sample_at), rows):
            logits = linear_out(parts.head, last)[:, 0].float()
        if parts.final_softcap > 0:
            logits = torch.tanh(logits / parts.final_softcap) * parts.final_softcap
        return logits

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block ``dst`` of every layer gets block ``src``'s K/V."""
        if not copies:
            return
        src = to_device([s for s, _ in copies], torch.long, self.device)
        dst = to_device([d for _, d in copies], torch.long, self.device)
        for cache in (*self.key_caches, *self.value_caches, *self.key_scales, *self.value_scales):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def execute(self, plan: StepPlan, *, rows: RowAdapters | None = None, previous: Tensor | None = None,
                feed: Sequence[int] = ()) -> Tensor:
        """Run ``plan``'s forward; logits (S, V) fp32 of its sampling chunks, in chunk order.
        ``rows``: route the model's LoRA layers by each sequence's adapter name (None: base).
        ``previous`` / ``feed``: the previous step's sampled tokens, still on the device, and for each
        chunk the row among them that is its last input token (-1: none; see :meth:`Staging.fill`), so
        a step can be launched before the previous one's tokens reach the host.
        The logits may be a CUDA graph's static output: valid until the next step (sample them first)."""
        self.copy_blocks(plan.copies)
        chunks = plan.chunks
        if self.cuda_graphs and rows is None:
            logits = self._replay(chunks, previous=previous, feed=feed)
            if logits is not None:
                return logits
        inputs = self._eager_inputs(chunks, feed)
        inputs.feed_ids(previous)
        if rows is None:
            return self._forward(inputs)
        adapters = [c.seq.adapter for c in chunks for _ in range(c.count)]
        return self._forward(inputs, adapters=adapters, rows=rows,
                             head_adapters=[c.seq.adapter for c in chunks if c.sample])

    # ---- CUDA graphs ----------------------------------------------------------------------
    def _bucket(self, chunks: Sequence[Chunk]) -> tuple[int, int, int] | None:
        """The (tokens, sequences, context bound) graph bucket of a step, or None (too large: it runs eagerly).

        Decode-only steps pad to the batch-size bucket (one scratch token a padded sequence) and take the
        smallest context bucket holding their longest sequence. Steps with prefill chunks pad to the token
        bucket ``T``; their sequences to ``min(max_seqs, T)`` plus enough padding sequences to hold the
        padding tokens (each at most one block-table row long); their bound is ``max_len``."""
        tokens = sum(c.count for c in chunks)
        if tokens == len(chunks) and all(c.sample for c in chunks) and len(chunks) <= self.max_seqs:
            size = next(b for b in _buckets(self.max_seqs) if b >= len(chunks))
            longest = max((c.start + c.count for c in chunks), default=1)
            return size, size, next(c for c in _context_buckets(self.max_len) if c >= longest)
        if len(chunks) > self.max_seqs or tokens > self.token_buckets[-1]:
            return None
        size = next(b for b in self.token_buckets if b >= tokens)
        return size, self._mixed_seqs(size), self.max_len

    def _mixed_seqs(self, tokens: int) -> int:
        seqs = min(self.max_seqs, tokens) + -(-tokens // (self.blocks_per_seq * self.block_size))
        # never as many as its tokens: tokens == seqs marks a decode bucket (its graph gets the decode
        # attention tiles); one more empty padding sequence costs nothing (attention skips it)
        return seqs + (seqs == tokens)

    def _graph_staging(self) -> Staging:
        if self._graph_inputs is None:  # buffers for the largest bucket; every graph reads leading views
            most = self.token_buckets[-1] if self.token_buckets else 0
            self._graph_inputs = self._staging(tokens=max(self.max_seqs, most),
                                               seqs=max(self.max_seqs, self._mixed_seqs(most)))
        return self._graph_inputs

    def _replay(self, chunks: Sequence[Chunk], *, previous: Tensor | None, feed: Sequence[int]) -> Tensor | None:
        """Logits through the CUDA graph of the step's bucket (captured on first use); None when the step
        has no bucket or graphs failed (the step then runs eagerly; after a failure, later ones too)."""
        bucket = self._bucket(chunks)
        if bucket is None:
            return None
        inputs = self._graph_staging().fill(chunks, tokens_to=bucket[0], seqs_to=bucket[1],
                                            bank_slot=self._bank_slot(chunks), feed=feed)
        inputs.feed_ids(previous)  # into the buffer the graph reads
        entry = self._graph(bucket, inputs)
        if entry is None:
            return None
        graph, logits = entry
        graph.replay()
        return logits[: sum(c.sample for c in chunks)]

    def _graph(self, bucket: tuple[int, int, int], inputs: StepInputs) -> tuple[Any, Tensor] | None:
        """The graph of ``bucket`` (staged ``inputs``), captured now if new; None if capture failed."""
        version = self.bank.version if self.bank is not None else 0
        if any(key[-1] != version for key in self._graphs):
            self._drop_graphs()  # the bank's adapted paths changed: recapture
        if (routes := current_routes()) is not self._graph_routes:  # e.g. inside adapters_disabled now, or no
            self._drop_graphs()  # longer: the graphs would replay the other routing's kernels
            self._graph_routes = routes  # (held, so its id is never another mapping's)
        key = (*bucket, version)
        if key not in self._graphs:
            tokens, seqs, context = bucket
            # bounds for any later step of the bucket (they size the attention kernel's grid)
            captured = replace(inputs, max_query_len=1 if tokens == seqs else min(tokens, self.max_len),
                               max_seq_len=context)
            try:
                self._graphs[key] = self._capture(lambda: self._forward(captured))
            except Exception as error:  # e.g. a model that syncs inside its forward: run eagerly
                self.cuda_graphs, self.graph_failure = False, _failure(error)
                return None
        return self._graphs[key]

    def warmup(self) -> int:
        """Capture every bucket's CUDA graph now (decode batch sizes, then prefill token counts), so no
        request meets a capture or a Triton compile later; returns how many graphs exist."""
        if not self.cuda_graphs:
            return 0
        sizes = [(b, b, c) for b in _buckets(self.max_seqs) for c in _context_buckets(self.max_len)]
        sizes += [(t, self._mixed_seqs(t), self.max_len) for t in self.token_buckets]
        for bucket in sizes:
            with torch.inference_mode():
                if self._graph(bucket, self._graph_staging().fill([], tokens_to=bucket[0], seqs_to=bucket[1])) is None:
                    break
        return len(self._graphs)

    def _drop_graphs(self) -> None:
        # and their memory pool: once its last graph is gone the allocator frees the pool, and a capture into
        # the stale handle fails an internal assert (torch 2.11, CUDACachingAllocator use_count > 0)
        self._graphs.clear()
        self._graph_pool = None

    def _capture(self, forward: Callable[[], Tensor]) -> tuple[Any, Tensor]:
        # Warm-up on a side stream (Triton compiles, cuBLAS picks kernels); it writes the same K/V the
        # replay will, so running it is harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a server's HTTP threads may touch the GPU meanwhile (reading a DoRA or PiSSA adapter
        # computes on it); in the default global mode their allocations would invalidate this capture. The cyclic
        # GC waits: a dead engine's graphs destroyed mid-capture (cudaGraphExecDestroy) invalidate it too (seen on
        # an H100, 2026-12-06: a test's second engine, its first one collected during a capture)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                logits = forward()
        finally:
            if collecting:
                gc.enable()
        return graph, logits


def _failure(error: BaseException) -> str:
    """``error`` in one line with where it was raised: the innermost frame, then the three innermost in splice."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/splice/" in f.filename.replace("\\", "/")][-3:]
    where = dict.fromkeys(f"{f.filename.replace(chr(92), '/').rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
                          for f in reversed(frames[-1:] + ours))
    return f"{type(error).__name__}: {error}" + (f" at {' <- '.join(where)}" if where else "")
