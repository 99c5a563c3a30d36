"""Generation benchmark of :mod:`splice.engine` on one card (issue 26, item 7): one run, a table, JSON.

A Llama-3-8B-shaped model with random bf16 weights is built on the GPU once and reused by every
part; its EOS ids are emptied (the tokenizer has none, ``generation_config.eos_token_id`` is None),
so every request generates exactly ``max_tokens``. Parts (``--parts``), in this order, each under
its own time limit (``--limit-PART`` seconds: a part that runs out keeps the rows it measured):

- ``bandwidth``: the card's device-to-device copy bandwidth, bytes read + written / time: the roofline.
- ``hf``: Hugging Face ``generate`` (greedy, ``cache_implementation="static"`` where it works) at the
  decode batches and contexts of ``--hf-*``; decode time per step = (time of 1 + n tokens - time of
  1 token) / n.
- ``peft``: PEFT with ``--peft-adapters`` r16 all-linear adapters in one mixed batch
  (``adapter_names=``) vs the same PEFT model with its adapters disabled.
- ``decode``: the engine (CUDA graphs on) at every ``--decode-batches`` x ``--decode-contexts``,
  plus the first batch-32-like row with ``--decode-adapters`` adapters through the LoRA bank. Only
  decode steps are timed (every request prefilled first, CUDA synchronised around the timed steps):
  tok/s, ms per step, bytes read per step (weights + KV of the live contexts + the LoRA slots in use)
  and the fraction of the roofline (bytes / bandwidth over the measured step time). One engine per
  context with its KV pool sized explicitly (``kv_blocks``); a batch whose KV cannot fit is skipped
  with a note. ``--decode-cublas-batches 1,8`` repeats those batches at the first context with the
  few-row decode GEMM (:mod:`splice.kernels.gemv`) switched off in this process: cuBLAS's rows beside.
- ``offline``: a ShareGPT-like synthetic workload (fixed seed; prompt and output lengths uniform in
  ``--offline-prompt`` / ``--offline-output``) submitted at once, with 0 and each of
  ``--offline-adapters`` distinct r16 all-linear adapters (requests round-robin over them, all
  resident in a :class:`~splice.lora.bank.LoraBank`): output tok/s and the ratio to 0 adapters. A run
  that reaches its share of the time limit stops there (``truncated``) and counts what it generated.
  ``--offline-fresh paged,dense``: the runs with the first engine ``fresh_attention`` (prompts with no cached prefix
  through the paged kernel, or cuDNN's dense kernel over the step's own K/V), then a 0-adapter run with each other.
  ``--offline-overlap-shrink off,on``: each adapter count with the bank's shrinks on the GEMM's stream, then on a
  side stream beside the GEMM (:attr:`~splice.lora.bank.LoraBank.overlap_shrink`).
- ``http``: ``splice.serve`` (Service + uvicorn, in this process) under open-loop Poisson load at
  rising ``--http-rates``, streamed over SSE by httpx in a separate client process (so the client
  does not share the server's GIL); offered vs delivered tok/s, TTFT and inter-token latency
  (gaps between streamed chunks) p50 / p99. It stops after the first rate the server does not hold
  (not every request complete, or delivered < 85% of offered): the saturation rate.
  ``--http-json-fraction F`` makes that share of the requests JSON-schema constrained
  (``response_format``, :data:`BENCH_SCHEMA`; the tokenizer then also has the printable ASCII
  characters as tokens, so JSON can be spelt, and an EOS id past the model's logits) and reports
  their TTFT / ITL and the others' apart (a constrained request that completes its JSON early
  counts as complete). ``--http-api-key KEY`` serves behind a key (the client sends it);
  ``--http-scrape-s S`` has the client scrape ``/metrics`` every S seconds under load, as Prometheus would.
  The server process's garbage-collector pauses under load are listed by generation (``gc`` in the
  part's record: count, total and longest ms); ``--http-gc-freeze 0`` undoes the server's
  :func:`~splice.serve.server.frozen_heap` inside the block, to measure what the full collections cost without it.
- ``nf4``: the engine at ``--nf4-batches`` (short context) in bf16, then the same after
  :func:`splice.quant.linear.quantize_nf4` (in place: this part runs last).

``--tiny`` runs a 2-layer toy on the CPU with small sizes (a smoke test of the harness; its
figures mean nothing). ``benchmarks/serve_device.sh`` is the device run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PARTS = ("bandwidth", "hf", "peft", "decode", "offline", "http", "nf4")  # run order (nf4 quantizes in place)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 16  # KV block size (the engine's default)
GIB = 1 << 30

# Sizes of a full run (H200, ~8 minutes in all) and of --tiny (CPU smoke test); options override.
FULL: dict[str, Any] = dict(
    layers=32, bandwidth_gb=4.0, token_budget=8192,
    decode_batches="1,32,128", decode_contexts="16,1024,4096", decode_steps=32, decode_adapters="8",
    decode_cublas_batches="", decode_int8_kv_contexts="",
    offline_requests=1000, offline_prompt="50,1000", offline_output="50,500", offline_adapters="8,64",
    offline_max_seqs=256, offline_fresh="paged", offline_overlap_shrink="off",
    http_rates="8,16,32,64,128", http_seconds=8.0, http_prompt="50,500", http_output="32,128", http_max_seqs=128,
    http_json_fraction=0.0, http_api_key="", http_scrape_s=0.0, http_gc_freeze=1,
    hf_batches="1,32", hf_contexts="16,1024", hf_steps=16, hf_cache="static",
    peft_adapters=8, peft_batch=32, peft_context=16, peft_steps=8,
    nf4_batches="1,32", nf4_context=16,
    limit_bandwidth=10, limit_hf=45, limit_peft=35, limit_decode=110, limit_offline=120, limit_http=90,
    limit_nf4=45,
)
TINY: dict[str, Any] = dict(
    FULL, layers=2, bandwidth_gb=0.064, token_budget=64,
    decode_batches="1,4,8", decode_contexts="16,48,96", decode_steps=3, decode_adapters="2",
    offline_requests=12, offline_prompt="10,60", offline_output="4,12", offline_adapters="2,4", offline_max_seqs=8,
    http_rates="20,40", http_seconds=0.5, http_prompt="8,24", http_output="4,8", http_max_seqs=8,
    hf_batches="1,4", hf_contexts="16,48", hf_steps=2, peft_adapters=2, peft_batch=4, peft_steps=2,
    nf4_batches="1,4", **{f"limit_{p}": 300 for p in PARTS},
)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfTime(Exception):
    """A part reached its time limit (the rows measured so far stay)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, where: str) -> None:
        if self.left() <= 0:
            raise OutOfTime(where)


# ---- the model and what a step reads --------------------------------------------------------------
def build_model(*, tiny: bool, layers: int, device: torch.device) -> LlamaForCausalLM:
    """Random N(0, 0.02) weights, bf16 on the GPU (fp32 for --tiny); no EOS ever fires."""
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    else:  # Llama-3-8B shape
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=8192, rope_theta=500000.0)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    config._attn_implementation = "sdpa"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def tokenizer_for(vocab: int) -> PreTrainedTokenizerFast:
    """Word ``tN`` is token N; no special tokens (nothing is skipped when decoding, no EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


# JSON the constrained HTTP requests must produce (random weights: mostly a long "name" string, then length)
BENCH_SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number"}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "tags", "score", "ok"], "additionalProperties": False}
JSON_CHARS = 94  # tokens 0..93 of json_tokenizer_for: the printable ASCII characters but space


def json_tokenizer_for(vocab: int) -> PreTrainedTokenizerFast:
    """Tokens 0..93 are the characters ``!`` .. ``~`` (JSON can be spelt), token N >= 94 is the word `` tN``
    (one token a word of the prompts, as in :func:`tokenizer_for`); EOS is an extra id ``vocab`` that the
    model never samples (structured output needs one), so unconstrained requests still run to max_tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    words = {chr(33 + i): i for i in range(JSON_CHARS)} | {f"Ġt{i}": i for i in range(JSON_CHARS, vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token=f"Ġt{JSON_CHARS}"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # " t95" -> "Ġt95"; any other character alone
        pre_tokenizers.Split(Regex(r" ?t[0-9]+|[\s\S]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|eos|>"})
    return tokenizer


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (NF4) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter but the input embedding table (a step
    gathers only its rows), unless the output head shares it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (p is embed and p is not head):
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
    return total


def kv_bytes_per_token(model: nn.Module, kv_dtype: str = "auto") -> int:
    """K/V bytes a token holds in the cache: the model's dtype, or int8 codes + an fp32 scale per head."""
    config: Any = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vector = head_dim + 4 if kv_dtype == "int8" else head_dim * model.get_input_embeddings().weight.element_size()
    return 2 * config.num_hidden_layers * (config.num_key_value_heads or heads) * vector


def random_ids(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=g).tolist()


def adapter_paths(model: nn.Module) -> list[str]:
    """The all-linear targets: every q/k/v/o/gate/up/down projection (under any wrapper)."""
    from splice.lora.adapter_file import base_shape

    return [path for path, module in model.named_modules()
            if path.rsplit(".", 1)[-1] in ALL_LINEAR and base_shape(module) is not None]


def random_adapter(model: nn.Module, name: str, *, rank: int, seed: int, device: torch.device,
                   host: bool = False) -> Any:
    """A random r-``rank`` all-linear adapter (A ~ N(0, 1/K), B small), drawn on ``device``; with ``host`` its
    weights then live in pinned host memory, as a server's loaded adapters do (64 8B-shaped r16 adapters are
    5.4 GB: on the device as well as in the bank they pushed an 80 GB card out of memory)."""
    from splice.lora.adapter_file import base_shape
    from splice.lora.bank import HostAdapter

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = model.get_input_embeddings().weight.dtype
    modules = dict(model.named_modules())
    weights = {}
    for path in adapter_paths(model):
        k, n = base_shape(modules[path]) or (0, 0)
        a = torch.randn(rank, k, generator=g, device=device, dtype=dtype) / math.sqrt(k)
        b = torch.randn(n, rank, generator=g, device=device, dtype=dtype) * (0.02 / rank)
        weights[path] = (a.cpu().pin_memory(), b.cpu().pin_memory()) if host and device.type == "cuda" else (a, b)
    return HostAdapter(name=name, weights=weights, rank=rank)


def remove_sites(model: nn.Module) -> None:
    """Take the bank sites off the model again (the other parts run the plain base)."""
    from splice.core.rewrite import unrewrite
    from splice.lora.bank import BankSite

    unrewrite(model, layer=lambda m: isinstance(getattr(m, "rewriter", None), BankSite))


@dataclass
class Bench:
    args: argparse.Namespace
    model: nn.Module
    tokenizer: Any
    device: torch.device
    bandwidth: float | None = None  # bytes / s, once measured
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)

    def kv_fits(self, nbytes: int) -> bool:
        """Whether a KV pool of ``nbytes`` fits next to what is allocated (a margin kept for activations)."""
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes + 8 * GIB < free


# ---- bandwidth -----------------------------------------------------------------------------------
def part_bandwidth(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    nbytes = int(bench.args.bandwidth_gb * 1e9)
    src = torch.empty(nbytes, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        sync(bench.device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(bench.device)
        times.append(time.perf_counter() - start)
        deadline.check("copies")
    best, median = 2 * nbytes / min(times), 2 * nbytes / statistics.median(times)
    bench.bandwidth = best
    record["rows"].append({"bytes_copied": nbytes, "best_gb_s": best / 1e9, "median_gb_s": median / 1e9})
    print(f"copy bandwidth: {best / 1e9:.0f} GB/s best, {median / 1e9:.0f} GB/s median ({nbytes / 1e9:.1f} GB)",
          flush=True)


def roofline(bench: Bench, row: dict[str, Any], *, weights: int, kv_tokens: float, lora: int = 0,
             kv_dtype: str = "auto") -> None:
    """Adds bytes per step and the fraction of the copy roofline to ``row`` (with ``step_ms``)."""
    kv = int(kv_tokens * kv_bytes_per_token(bench.model, kv_dtype))
    row.update(weights_bytes=weights, kv_bytes=kv, lora_bytes=lora, bytes_per_step=weights + kv + lora)
    if bench.bandwidth:
        row["roofline_ms"] = row["bytes_per_step"] / bench.bandwidth * 1e3
        row["roofline_fraction"] = row["roofline_ms"] / row["step_ms"]


# ---- engine decode --------------------------------------------------------------------------------
def fitting_blocks(bench: Bench, *, kv_dtype: str = "auto", share: float = 0.8) -> int:
    """KV blocks in ``share`` of the device's free memory: a worst-case cache (every sequence at ``max_len``)
    may not fit beside the weights and a bank on an 80 GB card; the scheduler preempts if it must."""
    if bench.device.type != "cuda":
        return 1 << 62
    free_memory()
    free = torch.cuda.mem_get_info(bench.device)[0]
    return int(free * share) // (BLOCK * kv_bytes_per_token(bench.model, kv_dtype))


def make_engine(bench: Bench, *, max_seqs: int, max_len: int, bank: Any = None, sites: Any = (),
                adapters: Any = None, max_waiting: int = 256, kv_dtype: str = "auto",
                fresh_attention: str = "paged") -> Any:
    from splice.engine.engine import Engine

    kv_blocks = min(max_seqs * -(-max_len // BLOCK), fitting_blocks(bench, kv_dtype=kv_dtype)) + 1
    return Engine(bench.model, bench.tokenizer, max_seqs=max_seqs, max_len=max_len,
                  token_budget=max(bench.args.token_budget, max_seqs), block_size=BLOCK, kv_blocks=kv_blocks,
                  cuda_graphs=True, max_waiting=max(max_waiting, max_seqs), bank=bank, sites=sites,
                  adapters=adapters, kv_dtype=kv_dtype, fresh_attention=fresh_attention)


def drain(engine: Any, requests: Sequence[Any]) -> None:
    for request in requests:
        engine.cancel(request)
    while engine.busy:
        engine.step()


def time_decode(engine: Any, prompts: list[list[int]], adapters: Sequence[str | None], *, steps: int,
                deadline: Deadline) -> dict[str, Any]:
    """Prefill ``prompts`` (not timed), 2 warm-up decode steps, then ``steps`` timed decode steps."""
    from splice.engine.engine import Request
    from splice.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=engine.max_len)
    requests = [Request(prompt_ids=p, params=params, adapter=a) for p, a in zip(prompts, adapters, strict=True)]
    for request in requests:
        engine.submit(request)
    try:
        while not all(r.generated or r.finished for r in requests):
            engine.step()
            deadline.check("prefill")
        for _ in range(2):  # the batch's CUDA graph is captured here
            engine.step()
        ended = [r.finish_reason for r in requests if r.finished]
        if ended:
            raise RuntimeError(f"a request ended before the timed steps: {ended[0]}")
        context = sum(len(s.tokens) for s in engine.scheduler.running)
        sync(engine.runner.device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(engine.runner.device)
        elapsed = time.perf_counter() - start
        if any(r.finished for r in requests):
            raise RuntimeError("a request ended inside the timed steps: raise max_len")
    finally:
        drain(engine, requests)
    return {"step_ms": elapsed / steps * 1e3, "tok_s": len(prompts) * steps / elapsed,
            "kv_tokens": context + len(prompts) * (steps - 1) / 2,  # mean over the timed steps
            "cuda_graphs": engine.runner.cuda_graphs, "graph_failure": engine.graph_failure}


def decode_rows(bench: Bench, deadline: Deadline, record: dict[str, Any], *, context: int,
                batches: Sequence[int], label: str, kv_dtype: str = "auto") -> None:
    """Rows for ``batches`` at ``context`` from one engine whose KV pool fits the largest batch that fits."""
    args = bench.args
    slack = -(-max(batches) * context // max(args.token_budget, 1)) + args.decode_steps + 16
    max_len = context + slack  # prefill steps also decode the sequences admitted first
    per_token = kv_bytes_per_token(bench.model, kv_dtype)
    fitting = [b for b in batches if bench.kv_fits(b * -(-max_len // BLOCK) * BLOCK * per_token)]
    for b in sorted(set(batches) - set(fitting)):
        record["rows"].append({"label": label, "batch": b, "context": context,
                               "skipped": "its KV pool does not fit the free memory"})
        print(f"decode {label} b{b} ctx {context}: skipped (KV does not fit)", flush=True)
    if not fitting:
        return
    engine = make_engine(bench, max_seqs=max(fitting), max_len=max_len, kv_dtype=kv_dtype)
    weights = weight_bytes(bench.model)
    prompts = random_ids(max(fitting), context, bench.vocab, seed=context)
    try:
        for batch in fitting:
            deadline.check(f"{label} b{batch} ctx {context}")
            timing = time_decode(engine, prompts[:batch], [None] * batch, steps=args.decode_steps, deadline=deadline)
            row = {"label": label, "batch": batch, "context": context, **timing}
            roofline(bench, row, weights=weights, kv_tokens=timing.pop("kv_tokens"), kv_dtype=kv_dtype)
            record["rows"].append(row)
            print(f"decode {label} b{batch} ctx {context}: {row['tok_s']:.0f} tok/s, {row['step_ms']:.2f} ms/step, "
                  f"roofline {row.get('roofline_fraction', 0):.2f}", flush=True)
    finally:
        del engine
        free_memory()


def adapter_decode_row(bench: Bench, deadline: Deadline, record: dict[str, Any], *, count: int, batch: int,
                       context: int) -> None:
    """Decode at ``batch`` with ``count`` distinct r16 all-linear adapters (round-robin) through the bank."""
    from splice.lora.bank import LoraBank, add_bank_sites

    model, args = bench.model, bench.args
    sites = add_bank_sites(model, adapter_paths(model))
    try:
        dtype = model.get_input_embeddings().weight.dtype
        bank = LoraBank.for_sites(model, sites, capacity=count, rank=16, dtype=dtype)
        host = {f"a{i}": random_adapter(model, f"a{i}", rank=16, seed=i, device=bench.device) for i in range(count)}
        max_len = context + args.decode_steps + 32
        engine = make_engine(bench, max_seqs=batch, max_len=max_len, bank=bank, sites=list(sites.values()),
                             adapters=host)
        names = [f"a{i % count}" for i in range(batch)]
        timing = time_decode(engine, random_ids(batch, context, bench.vocab, seed=7), names,
                             steps=args.decode_steps, deadline=deadline)
        used = min(count, batch)
        row = {"label": f"bf16 + {count} adapters", "batch": batch, "context": context, "adapters": count, **timing}
        roofline(bench, row, weights=weight_bytes(model), kv_tokens=timing.pop("kv_tokens"),
                 lora=bank.nbytes * used // count)
        record["rows"].append(row)
        print(f"decode {count} adapters b{batch}: {row['tok_s']:.0f} tok/s, {row['step_ms']:.2f} ms/step", flush=True)
    finally:
        remove_sites(model)
        free_memory()


def part_decode(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    args = bench.args
    contexts, batches = ints(args.decode_contexts), ints(args.decode_batches)
    middle = batches[len(batches) // 2]  # batch 32 of 1 / 32 / 128
    for i, context in enumerate(contexts):  # the longest (slowest to prefill) last
        decode_rows(bench, deadline, record, context=context, batches=batches, label="bf16")
        for count in ints(args.decode_adapters) if i == 0 else []:
            deadline.check(f"{count} adapters")
            adapter_decode_row(bench, deadline, record, count=count, batch=middle, context=context)
    if args.decode_cublas_batches:  # the same rows with the few-row decode GEMM switched off: cuBLAS's
        import splice.kernels.gemv as gemv_module

        applies = gemv_module.gemv_applies
        gemv_module.gemv_applies = lambda *a, **k: False  # this process only, restored below
        try:
            decode_rows(bench, deadline, record, context=contexts[0], batches=ints(args.decode_cublas_batches),
                        label="bf16, cuBLAS decode GEMMs")
        finally:
            gemv_module.gemv_applies = applies
    for context in ints(args.decode_int8_kv_contexts):  # the K/V cache as int8 codes + scales (half the bytes)
        deadline.check(f"int8 KV ctx {context}")
        decode_rows(bench, deadline, record, context=context, batches=batches, label="bf16, int8 KV", kv_dtype="int8")
    short = {r["batch"]: r["tok_s"] for r in record["rows"]
             if r["label"] == "bf16" and r["context"] == contexts[0] and "tok_s" in r}
    for row in record["rows"]:
        if "tok_s" in row and row["batch"] in short:
            key = "vs_no_adapters" if "adapters" in row else "vs_short_context"
            row[key] = row["tok_s"] / short[row["batch"]]


# ---- offline throughput ---------------------------------------------------------------------------
def warm(engine: Any, vocab: int, names: Sequence[str | None]) -> None:
    """Captures every CUDA-graph bucket (the engine's warm-up), then runs decode batches of every bucket
    (request i stops after about 12 - log2(i) tokens), before anything is timed."""
    from splice.engine.sampling import SamplingParams

    started = time.perf_counter()
    graphs = engine.runner.warmup() if hasattr(engine.runner, "warmup") else 0
    print(f"warm-up: {graphs} CUDA graphs captured in {time.perf_counter() - started:.1f} s", flush=True)

    count = engine.runner.max_seqs
    params = [SamplingParams(max_tokens=max(2, 3 + count.bit_length() - (i + 1).bit_length())) for i in range(count)]
    rows = [names[i % len(names)] for i in range(count)] if any(names) else None  # None: graphs (no row routing)
    engine.generate(random_ids(count, 8, vocab, seed=99), params, adapters=rows)


def sharegpt_like(bench: Bench) -> tuple[list[list[int]], list[int]]:
    """``--offline-requests`` prompts and output lengths, uniform in the ranges, fixed seed."""
    args = bench.args
    (p_lo, p_hi), (o_lo, o_hi) = ints(args.offline_prompt), ints(args.offline_output)
    rng = random.Random(2024)
    lengths = [rng.randint(p_lo, p_hi) for _ in range(args.offline_requests)]
    outputs = [rng.randint(o_lo, o_hi) for _ in range(args.offline_requests)]
    g = torch.Generator().manual_seed(2024)
    prompts = [torch.randint(3, bench.vocab, (n,), generator=g).tolist() for n in lengths]
    return prompts, outputs


def adapter_bank(bench: Bench, count: int) -> tuple[list[str | None], dict[str, Any]]:
    """``count`` random r16 all-linear adapters held on the host as a server holds them, and an empty bank of
    ``count`` slots over bank sites added to the model (undo with :func:`remove_sites`): the request adapter names
    to cycle through (``[None]`` for 0) and the Engine keywords (bank, sites, adapters; none for 0)."""
    from splice.lora.bank import LoraBank, add_bank_sites

    model = bench.model
    names: list[str | None] = [f"a{i}" for i in range(count)] or [None]
    if not count:
        return names, {}
    sites = add_bank_sites(model, adapter_paths(model))
    dtype = model.get_input_embeddings().weight.dtype
    return names, {"bank": LoraBank.for_sites(model, sites, capacity=count, rank=16, dtype=dtype),
                   "sites": list(sites.values()),
                   "adapters": {n: random_adapter(model, n, rank=16, seed=i, device=bench.device, host=True)
                                for i, n in enumerate(names) if n is not None}}


def offline_run(bench: Bench, deadline: Deadline, *, count: int, seconds: float, fresh: str = "paged",
                overlap_shrink: bool = False) -> dict[str, Any]:
    """The workload through one engine with ``count`` adapters (0: no bank, else the bank's ``overlap_shrink``)
    and ``fresh_attention=fresh``; stops after ``seconds``."""
    from splice.engine.engine import Request
    from splice.engine.sampling import SamplingParams

    model, args = bench.model, bench.args
    prompts, outputs = sharegpt_like(bench)
    max_len = max(map(len, prompts)) + max(outputs) + 1
    names, extra = adapter_bank(bench, count)
    if count:
        extra["bank"].overlap_shrink = overlap_shrink
    engine = make_engine(bench, max_seqs=args.offline_max_seqs, max_len=max_len, max_waiting=len(prompts),
                         fresh_attention=fresh, **extra)
    try:
        warm(engine, bench.vocab, names)
        requests = [Request(prompt_ids=p, params=SamplingParams(max_tokens=o), adapter=names[i % len(names)])
                    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]
        stop = Deadline(seconds)
        sync(bench.device)
        start = time.perf_counter()
        for request in requests:
            engine.submit(request)
        steps: list[tuple[int, float]] = []  # (tokens computed, wall s) a step: where the time goes
        while engine.busy and stop.left() > 0:
            before, began = engine.computed_tokens, time.perf_counter()
            engine.step()
            steps.append((engine.computed_tokens - before, time.perf_counter() - began))
        sync(bench.device)
        elapsed = time.perf_counter() - start
        truncated = engine.busy
        drain(engine, requests)
        generated = sum(len(r.generated) for r in requests)
        errors = [r.finish_reason for r in requests if (r.finish_reason or "").startswith("error")]
        if errors:  # a failed step ends its requests: say why rather than report a rate of nothing
            print(f"offline {count} adapters: {len(errors)} requests failed, first: {errors[0][:300]}", flush=True)
        # linear-layer FLOPs of every computed token (2 a weight; attention's excluded): the compute bound
        linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        small = [s for t, s in steps if 0 < t <= args.offline_max_seqs]  # decode-only or nearly: bandwidth-bound
        mix = {"steps": len(steps), "tokens_per_step": sum(t for t, _ in steps) / max(1, len(steps)),
               "small_steps": len(small), "small_steps_s": sum(small),
               "linear_tflop_s": 2 * linear_params * sum(t for t, _ in steps) / elapsed / 1e12}
        return {**mix, "adapters": count, "fresh_attention": fresh, "overlap_shrink": overlap_shrink,
                "requests": len(requests), "finished": sum(r.finish_reason == "length" for r in requests),
                "output_tokens": generated, "seconds": elapsed, "output_tok_s": generated / elapsed,
                "total_tok_s": (generated + sum(map(len, prompts))) / elapsed if not truncated else None,
                "truncated": truncated, "preemptions": engine.preemptions, "max_seqs": args.offline_max_seqs,
                "errors": len(errors), "first_error": errors[0] if errors else None}
    finally:
        del engine
        if count:
            remove_sites(model)
        free_memory()


def part_offline(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    first, *others = bench.args.offline_fresh.split(",")
    overlaps = [o == "on" for o in bench.args.offline_overlap_shrink.split(",")]  # checked by parse_args
    runs = [(first, 0, False)] + [(first, count, o) for count in ints(bench.args.offline_adapters) for o in overlaps] \
        + [(fresh, 0, False) for fresh in others]
    for i, (fresh, count, overlap) in enumerate(runs):
        deadline.check(f"{count} adapters, fresh_attention={fresh}, overlap_shrink={overlap}")
        row = offline_run(bench, deadline, count=count, seconds=max(1.0, deadline.left() / (len(runs) - i) - 8),
                          fresh=fresh, overlap_shrink=overlap)
        base = next((r["output_tok_s"] for r in record["rows"] if r["adapters"] == 0), row["output_tok_s"])
        row["ratio_to_0"] = row["output_tok_s"] / base  # (to the first fresh_attention's 0-adapter run)
        record["rows"].append(row)
        print(f"offline {count} adapters, fresh_attention={fresh}, overlap_shrink={overlap}: "
              f"{row['output_tok_s']:.0f} output tok/s "
              f"({row['ratio_to_0']:.2f}x), {row['finished']}/{row['requests']} finished in {row['seconds']:.1f} s",
              flush=True)


# ---- HTTP ---------------------------------------------------------------------------------------
def make_service(bench: Bench, *, max_seqs: int, max_len: int, tokenizer: Any = None) -> Any:
    """serve's Service on the model (and ``tokenizer``, default the bench's), sized by whichever option
    names its constructor takes."""
    import inspect

    from splice.serve.service import Service

    options = inspect.signature(Service).parameters
    wanted = {"max_seqs": max_seqs, "max_batch": max_seqs, "max_len": max_len, "max_waiting": 8192,
              "gpu_adapters": 1, "max_lora_rank": 16, "token_budget": max(bench.args.token_budget, max_seqs),
              "kv_blocks": max_seqs * -(-max_len // BLOCK) + 1}
    return Service(bench.model, tokenizer or bench.tokenizer, model_name="base",
                   **{k: v for k, v in wanted.items() if k in options})


def full_collection_ms(repeats: int = 3) -> dict[str, float]:
    """What one full collection (``gc.collect()``) takes here, median ms: with the heap frozen as it is now, then
    after ``gc.unfreeze()`` (the server's start-up objects walked too); the process is left unfrozen."""
    def median() -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    frozen = median()
    gc.unfreeze()
    return {"frozen": frozen, "unfrozen": median(), "tracked_objects": float(len(gc.get_objects()))}


class GcPauses:
    """The garbage collector's pauses in this process while the block runs (``gc.callbacks``), by
    generation: a collection holds the GIL, so the engine thread waits it out."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ms: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":  # collections do not nest: one start at a time
            self.started = time.perf_counter()
        else:
            self.ms[info["generation"]].append((time.perf_counter() - self.started) * 1e3)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self) -> dict[str, dict[str, float]]:
        return {str(g): {"count": len(ms), "total_ms": sum(ms), "max_ms": max(ms, default=0.0)}
                for g, ms in self.ms.items()}


def part_http(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    from splice.serve.server import frozen_heap, running

    args = bench.args
    prompt, output = ints(args.http_prompt), ints(args.http_output)
    share = args.http_json_fraction
    service = make_service(bench, max_seqs=args.http_max_seqs, max_len=prompt[1] + output[1] + 1,
                           tokenizer=json_tokenizer_for(bench.vocab) if share > 0 else None)
    pauses = GcPauses()
    try:
        warm(service.engine, bench.vocab, [None])  # before the engine thread starts
        with frozen_heap():  # as the server freezes it
            record["gc_full_collection_ms"] = full_collection_ms()
        with running(service, api_keys=[args.http_api_key] if args.http_api_key else ()) as url, pauses:
            if not args.http_gc_freeze:
                gc.unfreeze()  # measured without splice.serve.server.frozen_heap (it unfreezes on leaving anyway)
            spec = {"url": url, "rates": [float(r) for r in args.http_rates.split(",")], "seconds": args.http_seconds,
                    "prompt": prompt, "output": output, "vocab": bench.vocab, "all": args.http_all,
                    "budget": deadline.left() - 15, "json_fraction": share, "api_key": args.http_api_key,
                    "scrape_s": args.http_scrape_s, "first_word": JSON_CHARS if share > 0 else 3}
            proc = subprocess.run([sys.executable, __file__, "--client", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=max(deadline.left() - 5, 10), check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the load client failed: {proc.stderr[-2000:]}")
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        del service
        remove_sites(bench.model)
        free_memory()
    record["rows"].extend(rows)
    record["gc"] = pauses.summary()
    full = record["gc_full_collection_ms"]
    print(f"a full collection in the server process: {full['frozen']:.1f} ms with its start-up heap frozen, "
          f"{full['unfrozen']:.1f} ms without ({full['tracked_objects']:.0f} tracked objects)", flush=True)
    print(f"gc pauses in the server process under load (heap frozen: {bool(args.http_gc_freeze)}): "
          + ", ".join(f"generation {g}: {p['count']} taking {p['total_ms']:.0f} ms, longest {p['max_ms']:.1f}"
                      for g, p in record["gc"].items()), flush=True)
    held = [r["rate_per_s"] for r in rows if r["held"]]
    record["max_held_rate_per_s"] = max(held) if held else None
    record["saturation_rate_per_s"] = next((r["rate_per_s"] for r in rows if not r["held"]), None)
    for r in rows:
        print(f"http {r['rate_per_s']:g} req/s: offered {r['offered_tok_s']:.0f} delivered {r['delivered_tok_s']:.0f} "
              f"tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} p99 {r['ttft_p99_ms']:.0f} ms, ITL p50 {r['itl_p50_ms']:.1f} "
              f"p99 {r['itl_p99_ms']:.1f} ms, {r['completed']}/{r['requests']} complete", flush=True)
        if "ttft_slowest" in r:
            print(f"  TTFT p99 after the first quarter {r['ttft_p99_after_first_quarter_ms']:.0f} ms; slowest "
                  f"(s into the window, prompt words, ms): {r['ttft_slowest']}", flush=True)
        if r.get("json_requests"):
            print(f"  {r['json_requests']} JSON-schema requests: TTFT p50 {r['json_ttft_p50_ms']:.0f} ms, "
                  f"ITL p50 {r['json_itl_p50_ms']:.1f} p99 {r['json_itl_p99_ms']:.1f} ms; the others: TTFT p50 "
                  f"{r['plain_ttft_p50_ms']:.0f} ms, ITL p50 {r['plain_itl_p50_ms']:.1f} "
                  f"p99 {r['plain_itl_p99_ms']:.1f} ms; /metrics scraped {r['scrapes']} times", flush=True)


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _one_stream(client: Any, words: str, max_tokens: int, *, constrained: bool = False) -> dict[str, Any]:
    """One streamed completion (``constrained``: JSON matching BENCH_SCHEMA): its send time, (time, tokens)
    of every chunk with text, its finish reason and error."""
    start, chunks, error, finish = time.perf_counter(), [], None, None
    body: dict[str, Any] = {"model": "base", "prompt": words, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}
    try:
        async with client.stream("POST", "/completions", json=body) as reply:
            if reply.status_code != 200:
                error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
            else:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = str(chunk["error"])[:200]
                        break
                    text = chunk["choices"][0]["text"]
                    finish = chunk["choices"][0].get("finish_reason") or finish
                    if text:
                        chunks.append((time.perf_counter(), len(text.split())))  # word tN is one token
    except Exception as failure:  # a failed request is counted, the load goes on
        error = f"{type(failure).__name__}: {failure}"
    return {"start": start, "chunks": chunks, "max_tokens": max_tokens, "error": error, "finish": finish,
            "json": constrained, "prompt_words": len(words.split())}


async def _scrape(client: Any, url: str, every: float, counts: dict[str, int]) -> None:
    """GET ``url`` (/metrics) every ``every`` seconds until cancelled, counting answers by ok / failed."""
    while True:
        try:
            ok = (await client.get(url)).status_code == 200
        except Exception:  # counted; the load goes on
            ok = False
        counts["ok" if ok else "failed"] += 1
        await asyncio.sleep(every)


async def load_at_rate(spec: dict[str, Any], rate: float, budget: float) -> dict[str, Any]:
    """Open-loop Poisson arrivals at ``rate``/s for ``spec["seconds"]``; waits up to ``budget`` s in all."""
    import httpx

    rng = random.Random(int(rate * 1000))
    count = max(2, round(rate * spec["seconds"]))
    first = spec["first_word"]  # word tN is token N (json_tokenizer_for: from JSON_CHARS)
    jobs = [(" ".join(f"t{rng.randrange(first, spec['vocab'])}" for _ in range(rng.randint(*spec["prompt"]))),
             rng.randint(*spec["output"])) for _ in range(count)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    share = spec["json_fraction"]
    constrained = [rng.random() < share for _ in jobs] if share > 0 else [False] * count
    headers = {"Authorization": f"Bearer {spec['api_key']}"} if spec["api_key"] else None
    scrapes = {"ok": 0, "failed": 0}
    async with httpx.AsyncClient(base_url=spec["url"], timeout=httpx.Timeout(None), limits=limits,
                                 headers=headers) as client:
        await _one_stream(client, jobs[0][0], 4, constrained=share > 0)  # a connection and the path warmed
        scraper = asyncio.create_task(_scrape(client, spec["url"].removesuffix("/v1") + "/metrics",
                                              spec["scrape_s"], scrapes)) if spec["scrape_s"] > 0 else None
        tasks, start, at = [], time.perf_counter(), 0.0
        for (words, max_tokens), json_body in zip(jobs, constrained):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one_stream(client, words, max_tokens, constrained=json_body)))
            at += rng.expovariate(rate)
        span = time.perf_counter() - start
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, budget - span))
        for task in [*pending, *([scraper] if scraper is not None else [])]:
            task.cancel()
        results = [t.result() for t in done]
    row = load_stats(results, rate=rate, count=count, span=span, start=start, requested=sum(m for _, m in jobs))
    return {**row, "scrapes": scrapes["ok"], "scrapes_failed": scrapes["failed"]}


def load_stats(results: list[dict[str, Any]], *, rate: float, count: int, span: float, start: float,
               requested: int) -> dict[str, Any]:
    """One rate's row. ``delivered_tok_s``: tokens streamed in the last 3/4 of the arrival window per
    second (the first quarter is ramp-up), against ``offered_tok_s`` = tokens asked for per second of
    arrivals; the rate is held when every request completed and delivered >= 85% of offered.
    ``throughput_tok_s``: every token over the whole run (first send to last token)."""
    times = [[t for t, _ in r["chunks"]] for r in results]
    last = max((ts[-1] for ts in times if ts), default=start + span)
    steady = start + span / 4
    in_window = sum(n for r in results for t, n in r["chunks"] if steady <= t <= start + span)
    tokens = sum(n for r in results for _, n in r["chunks"])
    got = [sum(n for _, n in r["chunks"]) for r in results]
    # a JSON request that completes its JSON early ("stop") is complete, and asked for no more than it got
    requested -= sum(r["max_tokens"] - n for r, n in zip(results, got) if r["finish"] == "stop")
    complete = sum(r["error"] is None and (n == r["max_tokens"] or r["finish"] == "stop")
                   for r, n in zip(results, got))
    offered, delivered = requested / max(span, 1e-9), in_window / max(span * 3 / 4, 1e-9)
    errors = [r["error"] for r in results if r["error"] is not None]
    return {"rate_per_s": rate, "requests": count, "completed": complete, "errors": len(errors) + count - len(results),
            "first_error": errors[0] if errors else None, "arrival_span_s": span, "offered_tok_s": offered,
            "delivered_tok_s": delivered, "throughput_tok_s": tokens / max(last - start, 1e-9),
            "held": complete == count and delivered >= 0.85 * offered,
            **latency(results), **split_latency(results), **ttft_tail(results, start=start, span=span)}


def ttft_tail(results: list[dict[str, Any]], *, start: float, span: float) -> dict[str, Any]:
    """Where the slow first tokens are: TTFT p99 of the requests sent after the first quarter of the window, and
    the five slowest as (seconds into the window, prompt words, TTFT ms): a warm-up cost shows as early ones."""
    firsts = [(r["start"] - start, r["prompt_words"], (r["chunks"][0][0] - r["start"]) * 1e3)
              for r in results if r["chunks"]]
    late = [ms for at, _, ms in firsts if at >= span / 4]
    worst = sorted(firsts, key=lambda f: -f[2])[:5]
    return {"ttft_p99_after_first_quarter_ms": quantile(late, 0.99),
            "ttft_slowest": [[round(at, 2), words, round(ms, 1)] for at, words, ms in worst]}


def latency(results: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """TTFT (send to first text) and ITL (gaps between text chunks), p50 / p99 in ms, under keys that start
    with ``prefix``."""
    times = [[t for t, _ in r["chunks"]] for r in results]
    ttft = [(ts[0] - r["start"]) * 1e3 for r, ts in zip(results, times) if ts]
    itl = [(b - a) * 1e3 for ts in times for a, b in zip(ts, ts[1:])]
    return {f"{prefix}ttft_p50_ms": quantile(ttft, 0.5), f"{prefix}ttft_p99_ms": quantile(ttft, 0.99),
            f"{prefix}itl_p50_ms": quantile(itl, 0.5), f"{prefix}itl_p99_ms": quantile(itl, 0.99)}


def split_latency(results: list[dict[str, Any]]) -> dict[str, Any]:
    """With JSON-schema requests in the load: their latency (``json_``) and the others' (``plain_``) apart."""
    constrained = [r for r in results if r["json"]]
    if not constrained:
        return {}
    return {"json_requests": len(constrained), "json_stopped": sum(r["finish"] == "stop" for r in constrained),
            **latency(constrained, "json_"), **latency([r for r in results if not r["json"]], "plain_")}


def client_main(spec: dict[str, Any]) -> None:
    """The load client process: every rate in turn until one is not held; one JSON line of rows."""
    rows: list[dict[str, Any]] = []
    stop = Deadline(spec["budget"])
    for rate in spec["rates"]:
        if stop.left() <= 2:
            break
        row = asyncio.run(load_at_rate(spec, rate, stop.left()))
        rows.append(row)
        print(f"rate {rate}: {row}", file=sys.stderr, flush=True)
        if not row["held"] and not spec["all"]:
            break
    print(json.dumps(rows))


# ---- peers: Hugging Face generate, PEFT -----------------------------------------------------------
def hf_step_s(model: nn.Module, ids: Tensor, *, steps: int, cache: str, **extra: Any) -> float:
    """Seconds per decode step of ``generate`` (greedy): (time of 1 + steps tokens - time of 1) / steps."""
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0, **extra}
    if cache == "static":
        kwargs.update(cache_implementation="static", disable_compile=True)

    def timed(tokens: int) -> float:
        sync(ids.device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        sync(ids.device)
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)  # warm-up
        first = min(timed(1) for _ in range(2))
        total = timed(steps + 1)
    return max(total - first, 1e-9) / steps


def hf_timing(model: nn.Module, ids: Tensor, *, steps: int, cache: str, notes: list[str],
              **extra: Any) -> tuple[float, str]:
    """:func:`hf_step_s` with ``cache``, falling back to the dynamic cache where static fails."""
    if cache == "static":
        try:
            return hf_step_s(model, ids, steps=steps, cache="static", **extra), "static"
        except Exception as error:  # e.g. a transformers version without it
            notes.append(f"static cache failed ({type(error).__name__}: {str(error)[:200]}); dynamic used")
    return hf_step_s(model, ids, steps=steps, cache="dynamic", **extra), "dynamic"


def part_hf(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    args, model = bench.args, bench.model
    weights = weight_bytes(model)
    for context in ints(args.hf_contexts):
        for batch in ints(args.hf_batches):
            deadline.check(f"b{batch} ctx {context}")
            ids = torch.tensor(random_ids(batch, context, bench.vocab, seed=context), device=bench.device)
            step, cache = hf_timing(model, ids, steps=args.hf_steps, cache=args.hf_cache, notes=record["notes"])
            row = {"framework": "hf generate", "cache": cache, "batch": batch, "context": context,
                   "step_ms": step * 1e3, "tok_s": batch / step}
            roofline(bench, row, weights=weights, kv_tokens=batch * (context + args.hf_steps / 2))
            record["rows"].append(row)
            print(f"hf generate ({cache}) b{batch} ctx {context}: {row['tok_s']:.0f} tok/s, "
                  f"{row['step_ms']:.2f} ms/step", flush=True)
            free_memory()


def part_peft(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    """PEFT on the base: ``--peft-adapters`` adapters mixed in one batch, then the adapters disabled."""
    import inspect

    import peft

    args, count = bench.args, bench.args.peft_adapters
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR), init_lora_weights=False)
    options = {"autocast_adapter_dtype": False} if "autocast_adapter_dtype" in inspect.signature(
        peft.get_peft_model).parameters else {}  # bf16 adapters like the base (PEFT's default casts to fp32)
    wrapped = peft.get_peft_model(bench.model, config, adapter_name="a0", **options)
    try:
        for i in range(1, count):
            wrapped.add_adapter(f"a{i}", config)
        wrapped.eval()
        ids = torch.tensor(random_ids(args.peft_batch, args.peft_context, bench.vocab, seed=5), device=bench.device)
        names = [f"a{i % count}" for i in range(args.peft_batch)]
        mixed, cache = hf_timing(wrapped, ids, steps=args.peft_steps, cache=args.hf_cache, notes=record["notes"],
                                 adapter_names=names)
        deadline.check("mixed adapters")
        with wrapped.disable_adapter():
            base, _ = hf_timing(wrapped, ids, steps=args.peft_steps, cache=cache, notes=record["notes"])
    finally:
        wrapped.unload()  # the plain base modules back, for the parts after this one
        free_memory()
    row = {"framework": "peft", "cache": cache, "adapters": count, "batch": args.peft_batch,
           "context": args.peft_context, "mixed_tok_s": args.peft_batch / mixed, "none_tok_s": args.peft_batch / base,
           "ratio": base / mixed}
    record["rows"].append(row)
    print(f"peft {count} adapters mixed b{args.peft_batch}: {row['mixed_tok_s']:.0f} tok/s vs disabled "
          f"{row['none_tok_s']:.0f} ({row['ratio']:.2f}x)", flush=True)


# ---- NF4 ----------------------------------------------------------------------------------------
def part_nf4(bench: Bench, deadline: Deadline, record: dict[str, Any]) -> None:
    """bf16 rows, then the base quantized to NF4 in place (this part runs last) and the same rows."""
    from splice.quant.linear import quantize_nf4

    args = bench.args
    batches = ints(args.nf4_batches)
    decode_rows(bench, deadline, record, context=args.nf4_context, batches=batches, label="bf16")
    deadline.check("quantize")
    with torch.no_grad():
        quantize_nf4(bench.model)
    free_memory()
    decode_rows(bench, deadline, record, context=args.nf4_context, batches=batches, label="nf4")
    bf16 = {r["batch"]: r for r in record["rows"] if r["label"] == "bf16" and "tok_s" in r}
    for row in record["rows"]:
        if row["label"] == "nf4" and "tok_s" in row and row["batch"] in bf16:
            row["vs_bf16"] = row["tok_s"] / bf16[row["batch"]]["tok_s"]


# ---- the run ------------------------------------------------------------------------------------
def run_part(bench: Bench, name: str, fn: Callable[[Bench, Deadline, dict[str, Any]], None],
             save: Callable[[], None]) -> None:
    limit = float(getattr(bench.args, f"limit_{name}"))
    record: dict[str, Any] = {"status": "ok", "limit_s": limit, "rows": [], "notes": []}
    bench.report["parts"][name] = record
    start = time.perf_counter()
    print(f"\n== {name} (limit {limit:.0f} s)", flush=True)
    try:
        fn(bench, Deadline(limit), record)
    except OutOfTime as where:
        record["status"] = "partial"
        record["notes"].append(f"the time limit of {limit:.0f} s was reached at {where}")
        print(f"{name}: time limit reached at {where}", flush=True)
    except Exception as error:  # one part failing leaves the others to run
        record["status"] = "error"
        record["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        record["seconds"] = time.perf_counter() - start
        free_memory()
        save()


def _fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


TABLES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {  # part -> (title, [(header, key, format)])
    "bandwidth": ("copy bandwidth", [("best GB/s", "best_gb_s", ".0f"), ("median GB/s", "median_gb_s", ".0f")]),
    "decode": ("engine decode (CUDA graphs)", [
        ("weights", "label", ""), ("batch", "batch", "d"), ("context", "context", "d"), ("tok/s", "tok_s", ".0f"),
        ("ms/step", "step_ms", ".2f"), ("GB/step", "gb_per_step", ".2f"), ("roofline ms", "roofline_ms", ".2f"),
        ("of roofline", "roofline_fraction", ".2f"), ("vs short ctx", "vs_short_context", ".2f"),
        ("vs no adapters", "vs_no_adapters", ".2f"), ("note", "skipped", "")]),
    "offline": ("offline, ShareGPT-like", [
        ("adapters", "adapters", "d"), ("fresh prompts", "fresh_attention", ""), ("shrink aside", "overlap_shrink", ""),
        ("requests", "requests", "d"), ("finished", "finished", "d"), ("output tok/s", "output_tok_s", ".0f"), ("vs 0 adapters", "ratio_to_0", ".2f"),
        ("seconds", "seconds", ".1f"), ("truncated", "truncated", ""), ("steps", "steps", "d"),
        ("tokens/step", "tokens_per_step", ".0f"), ("steps <= max_seqs tokens", "small_steps", "d"),
        ("their s", "small_steps_s", ".1f"), ("linear TFLOP/s", "linear_tflop_s", ".0f")]),
    "http": ("HTTP, Poisson arrivals (streamed)", [
        ("req/s", "rate_per_s", "g"), ("offered tok/s", "offered_tok_s", ".0f"),
        ("delivered tok/s", "delivered_tok_s", ".0f"), ("throughput tok/s", "throughput_tok_s", ".0f"),
        ("complete", "completed", "d"), ("requests", "requests", "d"),
        ("TTFT p50 ms", "ttft_p50_ms", ".0f"), ("TTFT p99 ms", "ttft_p99_ms", ".0f"),
        ("ITL p50 ms", "itl_p50_ms", ".1f"), ("ITL p99 ms", "itl_p99_ms", ".1f"), ("held", "held", ""),
        ("JSON reqs", "json_requests", "d"), ("JSON TTFT p50", "json_ttft_p50_ms", ".0f"),
        ("JSON ITL p50", "json_itl_p50_ms", ".1f"), ("plain TTFT p50", "plain_ttft_p50_ms", ".0f"),
        ("plain ITL p50", "plain_itl_p50_ms", ".1f")]),
    "nf4": ("NF4 vs bf16 decode", [
        ("weights", "label", ""), ("batch", "batch", "d"), ("tok/s", "tok_s", ".0f"), ("ms/step", "step_ms", ".2f"),
        ("of roofline", "roofline_fraction", ".2f"), ("vs bf16", "vs_bf16", ".2f")]),
    "hf": ("Hugging Face generate", [
        ("cache", "cache", ""), ("batch", "batch", "d"), ("context", "context", "d"), ("tok/s", "tok_s", ".0f"),
        ("ms/step", "step_ms", ".2f"), ("of roofline", "roofline_fraction", ".2f")]),
    "peft": ("PEFT, mixed adapters in one batch", [
        ("adapters", "adapters", "d"), ("batch", "batch", "d"), ("mixed tok/s", "mixed_tok_s", ".0f"),
        ("disabled tok/s", "none_tok_s", ".0f"), ("mixed/disabled", "ratio", ".2f")]),
}


def print_tables(report: dict[str, Any]) -> None:
    info = report["info"]
    print(f"\n{info['device']}, {info['date']}, torch {info['torch']}")
    for name in PARTS:
        record = report["parts"].get(name)
        if record is None:
            continue
        title, columns = TABLES[name]
        print(f"\n{title} ({record['status']}, {record['seconds']:.0f} s)")
        print("| " + " | ".join(h for h, _, _ in columns) + " |")
        print("|" + "---|" * len(columns))
        for row in record["rows"]:
            row = {**row, "gb_per_step": row["bytes_per_step"] / 1e9 if "bytes_per_step" in row else None}
            print("| " + " | ".join(_fmt(row.get(key), spec) for _, key, spec in columns) + " |")
        for note in [*record["notes"], *([record["error"]] if "error" in record else [])]:
            print(f"note: {note}")
        if name == "http":
            print(f"saturation: held up to {record.get('max_held_rate_per_s')} req/s, not held at "
                  f"{record.get('saturation_rate_per_s')} req/s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer toy on the CPU (harness smoke test)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--json", type=Path, default=Path("serve_results.json"))
    parser.add_argument("--http-all", action="store_true", help="every rate, past saturation too")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the HTTP load process
    for key, value in FULL.items():  # sizes; --tiny changes the defaults
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if bad := set(args.offline_overlap_shrink.split(",")) - {"off", "on"}:
        parser.error(f"--offline-overlap-shrink {args.offline_overlap_shrink}: {sorted(bad)} unknown; give off, on "
                     "or off,on")
    if not 0.0 <= args.http_json_fraction <= 1.0:
        parser.error(f"--http-json-fraction {args.http_json_fraction}: give the share of JSON requests, in [0, 1]")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main() -> None:
    args = parse_args()
    if args.client:
        return client_main(json.loads(args.client))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    wanted = set(args.parts.split(","))
    if wanted & {"decode", "nf4", "hf"}:
        wanted.add("bandwidth")  # the roofline
    start = time.perf_counter()
    model = build_model(tiny=args.tiny, layers=args.layers, device=device)
    import transformers

    report: dict[str, Any] = {"info": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "transformers": transformers.__version__, "model_build_s": time.perf_counter() - start,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "client"}},
        "parts": {}}
    bench = Bench(args=args, model=model, tokenizer=tokenizer_for(model.config.vocab_size), device=device,
                  report=report)
    print(f"model built in {report['info']['model_build_s']:.1f} s on {device}", flush=True)

    def save() -> None:  # after every part: a later failure keeps what was measured
        args.json.write_text(json.dumps(report, indent=2))

    parts = {"bandwidth": part_bandwidth, "hf": part_hf, "peft": part_peft, "decode": part_decode,
             "offline": part_offline, "http": part_http, "nf4": part_nf4}
    for name in PARTS:
        if name in wanted:
            run_part(bench, name, parts[name], save)
    report["info"]["total_s"] = time.perf_counter() - start
    save()
    print_tables(report)


if __name__ == "__main__":
    main()
