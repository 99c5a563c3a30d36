"""Multi-adapter serving benchmark: decode speed with many adapters, and the HTTP server under load.

Part 1 (decode): a Llama-3-8B-shaped model with random bf16 weights, ``--batch`` requests decoded
together by :class:`splice.generation.engine.Engine`: no adapter, then ``--adapters`` distinct r16
adapters (one per request; q/k/v/o and all-linear) through the multi-LoRA bank; then PEFT on the
same base with the same number of adapters in one mixed batch (``adapter_names=``, HF generate)
and PEFT with its adapters disabled. Decode tok/s counts generated tokens over the decode steps
only (prefill excluded; CUDA synchronised around the timed region).

Part 2 (HTTP): the same model behind ``splice.serve`` (uvicorn, in this process) and an open-loop
Poisson load of completion requests spread over 1, 8 and 64 adapters (64 > ``--gpu-adapters``:
adapters move in from host memory on demand). Reports p50/p99 latency and output tok/s.

Prints a table and writes JSON (``--json``). ``--tiny`` runs a 2-layer toy on the CPU (a smoke
test of the harness; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from splice.generation.engine import Engine, Request, SamplingParams
from splice.lora.bank import HostAdapter, LoraBank, add_bank_sites
from splice.serve.service import linear_paths

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = (*QKVO, "gate_proj", "up_proj", "down_proj")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(tiny: bool, layers: int, device: torch.device) -> LlamaForCausalLM:
    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
    else:  # Llama-3-8B shape
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=8192, rope_theta=500000.0)
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
    return model.eval()


def tokenizer_for(vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_map = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def random_adapter(model: torch.nn.Module, name: str, targets: tuple[str, ...], rank: int, seed: int, *,
                   device: torch.device, host: bool = False) -> HostAdapter:
    """Random r-``rank`` weights on ``targets`` (made on ``device``; moved to host memory if ``host``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = next(model.parameters()).dtype
    modules = dict(model.named_modules())
    weights = {}
    for path in linear_paths(model):
        if path.rsplit(".", 1)[-1] in targets:
            base = modules[path]
            while hasattr(base, "base"):
                base = base.base
            k, n = base.in_features, base.out_features
            a = torch.randn(rank, k, generator=g, device=device, dtype=dtype) / math.sqrt(k)
            b = torch.randn(n, rank, generator=g, device=device, dtype=dtype) * (0.02 / rank)
            weights[path] = (a.cpu().pin_memory() if host and device.type == "cuda" else a,
                             b.cpu().pin_memory() if host and device.type == "cuda" else b)
    return HostAdapter(name=name, weights=weights, rank=rank)


def decode_tok_s(engine: Engine, prompts: list[list[int]], adapters: list[str | None], new_tokens: int) -> float:
    """Generated tokens per second over the decode steps (all requests admitted first)."""
    done = []
    for ids, adapter in zip(prompts, adapters):
        engine.submit(Request(prompt_ids=ids, adapter=adapter, on_event=lambda t, r: done.append(r) if r else None,
                              params=SamplingParams(max_tokens=new_tokens)))
    with torch.inference_mode():
        engine._admit()  # prefill every request (not timed)
    _sync(engine.device)
    start, steps = time.perf_counter(), 0
    while engine.busy:
        engine.step()
        steps += 1
    _sync(engine.device)
    elapsed = time.perf_counter() - start
    assert len(done) == len(prompts), "every request finishes"
    return len(prompts) * new_tokens / elapsed


def peft_tok_s(model: torch.nn.Module, prompts: torch.Tensor, names: list[str] | None, new_tokens: int) -> float:
    """Decode tok/s of HF generate: (time of 1 + n tokens - time of 1 token) / n steps."""
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(prompts), "pad_token_id": 0, "do_sample": False}
    if names is not None:
        kwargs["adapter_names"] = names

    def timed(tokens: int) -> float:
        _sync(prompts.device)
        start = time.perf_counter()
        model.generate(prompts, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        _sync(prompts.device)
        return time.perf_counter() - start

    with torch.inference_mode():
        timed(2)  # warm-up
        prefill = min(timed(1) for _ in range(2))
        total = timed(new_tokens + 1)
    return prompts.shape[0] * new_tokens / max(total - prefill, 1e-9)


def part_decode(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> list[dict]:
    rows: list[dict] = []
    g = random.Random(0)
    prompts = [[g.randrange(3, model.config.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    sites = add_bank_sites(model, linear_paths(model))
    max_len = args.prompt_len + args.new_tokens + 8
    dtype = next(model.parameters()).dtype
    plain = Engine(model, tokenizer, max_batch=args.batch, max_len=max_len)  # no bank: the base model
    plain.eos = set()  # random weights: decode exactly new_tokens tokens
    decode_tok_s(plain, prompts, [None] * args.batch, args.new_tokens)  # warm-up (graphs captured)
    base = decode_tok_s(plain, prompts, [None] * args.batch, args.new_tokens)
    print(f"splice no adapter: {base:.0f} tok/s (graphs {plain.cuda_graphs}, {plain.graph_failure})", flush=True)
    del plain
    for targets, label in ((QKVO, "r16 q/k/v/o"), (ALL, "r16 all-linear")):
        host = {f"a{i}": random_adapter(model, f"a{i}", targets, 16, seed=i, device=device)
                for i in range(args.adapters)}
        bank = LoraBank.for_sites(model, sites, capacity=args.adapters, rank=16, dtype=dtype)
        engine = Engine(model, tokenizer, max_batch=args.batch, max_len=max_len, bank=bank,
                        sites=list(sites.values()), adapters=host)
        engine.eos = set()
        names = [f"a{i % args.adapters}" for i in range(args.batch)]
        decode_tok_s(engine, prompts, names, args.new_tokens)  # warm-up: kernels compile, graphs captured
        mixed = decode_tok_s(engine, prompts, names, args.new_tokens)
        rows.append({"part": "decode", "adapters": label, "framework": "splice", "none_tok_s": base,
                     "mixed_tok_s": mixed, "ratio": mixed / base, "distinct": args.adapters, "batch": args.batch,
                     "cuda_graphs": engine.cuda_graphs, "graph_failure": engine.graph_failure})
        print(f"splice {label}: none {base:.0f} tok/s, {args.adapters} mixed {mixed:.0f} tok/s ({mixed / base:.2f}x)",
              flush=True)
        del engine, bank, host
    return rows


def part_peft(args: argparse.Namespace, model: torch.nn.Module) -> list[dict]:
    """PEFT on the (un-rewritten) base: mixed adapters via adapter_names, and disabled adapters."""
    import peft

    rows: list[dict] = []
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).to(model.device)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(QKVO), init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config, adapter_name="a0")
    for i in range(1, args.adapters):
        wrapped.add_adapter(f"a{i}", config)
    wrapped.eval()
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    mixed = peft_tok_s(wrapped, prompts, names, args.peft_tokens)
    with wrapped.disable_adapter():
        base = peft_tok_s(wrapped, prompts, None, args.peft_tokens)
    rows.append({"part": "decode", "adapters": "r16 q/k/v/o", "framework": "peft", "none_tok_s": base,
                 "mixed_tok_s": mixed, "ratio": mixed / base, "distinct": args.adapters, "batch": args.batch})
    print(f"peft r16 q/k/v/o: none {base:.0f} tok/s, mixed {mixed:.0f} tok/s", flush=True)
    wrapped.unload()  # the plain base modules back, for the parts after this one
    return rows



async def _poisson_load(url: str, args: argparse.Namespace, count: int, prompt: str) -> tuple[list[float], float]:
    """Open-loop arrivals at ``args.rate``/s spread over ``count`` adapters; latencies and wall time."""
    import httpx

    rng = random.Random(count)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(i: int) -> float:
            start = time.perf_counter()
            reply = await client.post("/completions", json={
                "model": f"h{i % count}", "prompt": prompt, "max_tokens": args.http_tokens, "temperature": 0})
            reply.raise_for_status()
            return time.perf_counter() - start

        await one(0)  # warm-up
        tasks, start = [], time.perf_counter()
        for i in range(args.http_requests):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(rng.expovariate(args.rate))
        latencies = await asyncio.gather(*tasks)
        return list(latencies), time.perf_counter() - start


def _remove_sites(model: torch.nn.Module) -> None:
    from splice.core.rewrite import unrewrite
    from splice.lora.bank import BankSite

    unrewrite(model, layer=lambda m: isinstance(getattr(m, "rewriter", None), BankSite))


def http_run(args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any, count: int) -> dict:
    from splice.serve.server import running
    from splice.serve.service import Service

    service = Service(model, tokenizer, model_name="base", max_batch=args.batch, max_len=512,
                      gpu_adapters=args.gpu_adapters, max_lora_rank=16)
    device = next(model.parameters()).device
    for i in range(count):  # kept in host memory; moved to the device bank on demand
        adapter = random_adapter(model, f"h{i}", QKVO, 16, seed=100 + i, device=device, host=True)
        service.host[adapter.name] = adapter
        service.engine.adapters[adapter.name] = adapter
    service.engine.eos = set()
    words = " ".join(f"t{random.Random(count).randrange(3, 1000)}" for _ in range(args.prompt_len))
    try:
        with running(service) as url:
            latencies, wall = asyncio.run(_poisson_load(url, args, count, words))
    finally:
        _remove_sites(model)
    latencies.sort()
    row = {"part": "http", "adapters": count, "requests": args.http_requests, "rate_per_s": args.rate,
           "max_tokens": args.http_tokens, "p50_s": statistics.median(latencies),
           "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
           "out_tok_s": args.http_requests * args.http_tokens / wall,
           "cuda_graphs": service.engine.cuda_graphs, "graph_failure": service.engine.graph_failure}
    print(f"http {count} adapters: p50 {row['p50_s']:.3f}s p99 {row['p99_s']:.3f}s {row['out_tok_s']:.0f} tok/s",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer toy on the CPU (harness smoke test)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--peft-tokens", type=int, default=8)
    parser.add_argument("--parts", default="decode,peft,http")
    parser.add_argument("--http-adapters", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--http-requests", type=int, default=128)
    parser.add_argument("--http-tokens", type=int, default=32)
    parser.add_argument("--rate", type=float, default=32.0, help="Poisson arrivals per second")
    parser.add_argument("--gpu-adapters", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("serve_results.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = build_model(args.tiny, args.layers, device)
    tokenizer = tokenizer_for(model.config.vocab_size)
    parts = args.parts.split(",")
    rows: list[dict] = []
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    def save() -> None:  # after every part: a later failure keeps what was measured
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=2))

    if "decode" in parts:
        rows += part_decode(args, model, tokenizer, device)
        _remove_sites(model)
        save()
    if "peft" in parts:
        rows += part_peft(args, model)  # PEFT wraps the base in place; unloaded again after
        save()
    if "http" in parts:
        for count in args.http_adapters:
            rows.append(http_run(args, model, tokenizer, count))
            save()
    print(f"\n{info['device']}, {info['date']}")
    print("| part | adapters | framework | none tok/s | mixed tok/s | mixed/none |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "decode":
            print(f"| decode b{r['batch']} | {r['distinct']} x {r['adapters']} | {r['framework']} | "
                  f"{r['none_tok_s']:.0f} | {r['mixed_tok_s']:.0f} | {r['ratio']:.2f} |")
    print("\n| HTTP adapters | requests | rate/s | p50 s | p99 s | out tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "http":
            print(f"| {r['adapters']} | {r['requests']} | {r['rate_per_s']} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
                  f"{r['out_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
