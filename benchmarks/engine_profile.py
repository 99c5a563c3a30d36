"""Where an engine decode step's time goes (issue 26): full step vs graph replay vs host, and kernels.

For each ``--batches`` size at a short context (``--prompt`` tokens) it builds the Llama-3-8B-shaped
random bf16 model of ``benchmarks/serve.py`` (``--tiny``: its 2-layer CPU toy, a smoke test), runs an
:class:`~splice.engine.engine.Engine` (CUDA graphs on) until every request decodes, then reports:

- ``step_ms``: ``engine.step()`` in a loop (scheduling, inputs, forward, sampling, output processing);
- ``replay_ms``: the batch's CUDA graph replayed alone (CUDA events), i.e. the GPU time of the forward;
- ``host_ms``: ``step_ms - replay_ms``, the part of a step the GPU waits for the host;
- ``schedule_ms`` / ``execute_ms`` / ``sample_ms`` / ``output_ms``: host wall time inside the step's
  parts (``execute``: inputs + launch, no sync; ``sample``: the sampler plus the wait for the tokens;
  ``output``: detokenization, stop checks, callbacks);
- ``roofline_ms`` / ``fraction``: weights + KV bytes / ``--bandwidth`` over ``step_ms``.

Then a ``torch.profiler`` table of the top 15 kernels of one batch-32 (or the middle batch) decode step,
graph replay and eager, and the kernel count per step; one mixed step (decodes + a ``--mixed-prefill``
token prefill chunk, eager); and with ``--adapters N`` the batch-32 step with N bank adapters
(round-robin over the rows). Prints a table and writes ``--json``.

    python benchmarks/engine_profile.py --json engine_profile.json      # H200, < 90 s
    python benchmarks/engine_profile.py --tiny                          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from serve import (  # noqa: E402
    BLOCK,
    adapter_paths,
    build_model,
    kv_bytes_per_token,
    random_adapter,
    random_ids,
    remove_sites,
    tokenizer_for,
    weight_bytes,
)
from torch import nn  # noqa: E402

from splice.engine.engine import Engine, Request  # noqa: E402
from splice.engine.sampling import SamplingParams  # noqa: E402

PARTS = ("schedule", "execute", "sample", "output")


class Timers:
    """Host wall time of the engine's step parts, by wrapping the bound methods of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.total = dict.fromkeys(PARTS, 0.0)
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "execute", "execute")
        self._wrap(engine, "_sample", "sample")
        self._wrap(engine, "_accept", "output")

    def _wrap(self, owner: Any, method: str, part: str) -> None:
        inner: Callable[..., Any] | None = getattr(owner, method, None)
        if inner is None:  # an engine without that part: not timed
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total[part] += time.perf_counter() - start

        setattr(owner, method, timed)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {f"{part}_ms": value / steps * 1e3 for part, value in self.total.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_decoding(engine: Engine, prompts: list[list[int]], adapters: Sequence[str | None]) -> list[Request]:
    """Submit ``prompts``, step until every one has a token, then 2 more steps (the graph is captured)."""
    params = SamplingParams(max_tokens=engine.max_len)
    requests = [Request(prompt_ids=p, params=params, adapter=a) for p, a in zip(prompts, adapters, strict=True)]
    for request in requests:
        engine.submit(request)
    while not all(r.generated or r.finished for r in requests):
        engine.step()
    for _ in range(2):
        engine.step()
    failed = [r.finish_reason for r in requests if r.finished]
    if failed:
        raise RuntimeError(f"a request ended before the timed steps: {failed[0]}")
    return requests


def drain(engine: Engine, requests: Sequence[Request]) -> None:
    for request in requests:
        engine.cancel(request)
    while engine.busy:
        engine.step()


def replay_ms(engine: Engine, batch: int, repeats: int) -> float | None:
    """GPU ms of the batch's CUDA graph replayed alone (None: no graph, e.g. on the CPU)."""
    runner: Any = engine.runner
    graphs = getattr(runner, "_graphs", {})
    sizes = [key for key in graphs if key[0] >= batch]
    if not sizes:
        return None
    graph = graphs[min(sizes)][0]  # the batch's bucket
    graph.replay()  # the replays rewrite the last step's K/V slots with the same values: harmless
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return float(begin.elapsed_time(end)) / repeats


def profile_steps(engine: Engine, *, steps: int = 1) -> dict[str, Any]:
    """Top-15 kernels (GPU time) of ``steps`` engine steps and the kernel count per step."""
    from torch.profiler import ProfilerActivity, profile

    device = engine.runner.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        key = "device_time_total" if hasattr(kernels[0] if kernels else None, "device_time_total") else "cuda_time_total"
    else:
        kernels = [e for e in events if e.key.startswith("aten::")]
        key = "cpu_time_total"
    kernels.sort(key=lambda e: getattr(e, key, 0.0), reverse=True)
    total_us = sum(getattr(e, key, 0.0) for e in kernels)
    count = sum(e.count for e in kernels)
    top = [{"name": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": getattr(e, key, 0.0) / steps,
            "share": getattr(e, key, 0.0) / total_us if total_us else 0.0} for e in kernels[:15]]
    return {"kernels_per_step": count / steps, "busy_us_per_step": total_us / steps, "top": top}


def decode_row(engine: Engine, *, batch: int, prompt: int, steps: int, repeats: int, bandwidth: float,
               adapters: Sequence[str | None] = (None,)) -> dict[str, Any]:
    model, device = engine.model, engine.runner.device
    vocab = int(model.config.vocab_size)  # type: ignore[union-attr]
    names = [adapters[i % len(adapters)] for i in range(batch)]
    requests = start_decoding(engine, random_ids(batch, prompt, vocab, seed=batch), names)
    try:
        timers = Timers(engine)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync(device)
        step = (time.perf_counter() - start) / steps * 1e3
        replay = replay_ms(engine, batch, repeats) if device.type == "cuda" else None
        context = sum(len(s.tokens) for s in engine.scheduler.running)
        roofline = (weight_bytes(model) + context * kv_bytes_per_token(model)) / bandwidth * 1e3
        row = {"batch": batch, "adapters": len([a for a in adapters if a]), "context": prompt, "step_ms": step,
               "replay_ms": replay, "host_ms": None if replay is None else step - replay,
               **timers.per_step_ms(steps), "roofline_ms": roofline, "fraction": roofline / step,
               "tok_s": batch / step * 1e3, "cuda_graphs": engine.runner.cuda_graphs,
               "graph_failure": engine.graph_failure}
    finally:
        drain(engine, requests)
    return row


def kernel_tables(engine: Engine, *, batch: int, prompt: int, mixed_prefill: int) -> dict[str, Any]:
    """The profiler tables of one decode step (graph and eager) and the time of one mixed step."""
    device = engine.runner.device
    vocab = int(engine.model.config.vocab_size)  # type: ignore[union-attr]
    requests = start_decoding(engine, random_ids(batch, prompt, vocab, seed=7), [None] * batch)
    out: dict[str, Any] = {"batch": batch}
    try:
        out["graph"] = profile_steps(engine)
        graphs = engine.runner.cuda_graphs
        engine.runner.cuda_graphs = False
        engine.step()  # warm the eager path
        out["eager"] = profile_steps(engine)
        engine.runner.cuda_graphs = graphs
        long = Request(prompt_ids=random_ids(1, mixed_prefill, vocab, seed=8)[0],
                       params=SamplingParams(max_tokens=4))
        engine.submit(long)
        requests.append(long)
        sync(device)
        start = time.perf_counter()
        engine.step()  # the decodes and the prefill chunk, eagerly
        sync(device)
        out["mixed_step_ms"] = (time.perf_counter() - start) * 1e3
        out["mixed_prefill_tokens"] = mixed_prefill
    finally:
        drain(engine, requests)
    return out


def adapter_engine(model: nn.Module, tokenizer: Any, *, count: int, batch: int, max_len: int,
                   device: torch.device) -> tuple[Engine, list[str]]:
    from splice.lora.bank import LoraBank, add_bank_sites

    sites = add_bank_sites(model, adapter_paths(model))
    dtype = model.get_input_embeddings().weight.dtype
    bank = LoraBank.for_sites(model, sites, capacity=count, rank=16, dtype=dtype)
    names = [f"a{i}" for i in range(count)]
    adapters = {n: random_adapter(model, n, rank=16, seed=i, device=device) for i, n in enumerate(names)}
    engine = Engine(model, tokenizer, max_seqs=batch, max_len=max_len, kv_blocks=batch * -(-max_len // BLOCK) + 1,
                    block_size=BLOCK, bank=bank, sites=list(sites.values()), adapters=adapters)
    return engine, names


def print_report(report: dict[str, Any]) -> None:
    cols = ("batch", "adapters", "step_ms", "replay_ms", "host_ms", "schedule_ms", "execute_ms", "sample_ms",
            "output_ms", "roofline_ms", "fraction")
    print("| " + " | ".join(cols) + " |")
    for row in report["rows"]:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    tables = report.get("kernels", {})
    for mode in ("graph", "eager"):
        if mode in tables:
            t = tables[mode]
            print(f"\n{mode} decode step, batch {tables['batch']}: {t['kernels_per_step']:.0f} kernels, "
                  f"{t['busy_us_per_step']:.0f} us busy")
            for k in t["top"]:
                print(f"  {k['us_per_step']:9.1f} us  {k['calls_per_step']:6.0f}x  {k['share']:6.1%}  {k['name']}")
    if "mixed_step_ms" in tables:
        print(f"\nmixed step (batch {tables['batch']} decodes + {tables['mixed_prefill_tokens']}-token prefill, "
              f"eager): {tables['mixed_step_ms']:.2f} ms")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the 2-layer toy on the CPU (a smoke test)")
    parser.add_argument("--batches", default=None, help="comma-separated decode batches (default 1,32,128)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per batch")
    parser.add_argument("--repeats", type=int, default=50, help="graph replays timed per batch")
    parser.add_argument("--adapters", type=int, default=None, help="bank adapters for the batch-32 row (0: none)")
    parser.add_argument("--mixed-prefill", type=int, default=None, help="prefill tokens of the mixed step")
    parser.add_argument("--bandwidth", type=float, default=4.24e12, help="copy bandwidth, bytes/s (H200: 4.24e12)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("engine_profile.json"))
    args = parser.parse_args(argv)
    tiny = args.tiny
    for key, full, small in (("batches", "1,32,128", "1,4,8"), ("steps", 30, 3), ("adapters", 8, 2),
                             ("mixed_prefill", 512, 24), ("layers", 32, 2)):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    start = time.perf_counter()
    model = build_model(tiny=args.tiny, layers=args.layers, device=device)
    tokenizer = tokenizer_for(int(model.config.vocab_size))
    batches = [int(b) for b in args.batches.split(",")]
    max_len = args.prompt + args.steps + 64
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "model_build_s": time.perf_counter() - start, "rows": []}
    print(f"model built in {report['model_build_s']:.1f} s on {device}", flush=True)
    for batch in batches:
        engine = Engine(model, tokenizer, max_seqs=batch, max_len=max_len, block_size=BLOCK,
                        kv_blocks=batch * -(-max_len // BLOCK) + 1)
        report["rows"].append(decode_row(engine, batch=batch, prompt=args.prompt, steps=args.steps,
                                         repeats=args.repeats, bandwidth=args.bandwidth))
        print(report["rows"][-1], flush=True)
        del engine
    middle = 32 if 32 in batches else batches[len(batches) // 2]
    engine = Engine(model, tokenizer, max_seqs=middle + 1, max_len=max(max_len, args.mixed_prefill + 8),
                    block_size=BLOCK, token_budget=middle + args.mixed_prefill,
                    kv_blocks=(middle + 1) * -(-max(max_len, args.mixed_prefill + 8) // BLOCK) + 1)
    report["kernels"] = kernel_tables(engine, batch=middle, prompt=args.prompt, mixed_prefill=args.mixed_prefill)
    del engine
    if args.adapters:
        engine, names = adapter_engine(model, tokenizer, count=args.adapters, batch=middle, max_len=max_len,
                                       device=device)
        try:
            report["rows"].append(decode_row(engine, batch=middle, prompt=args.prompt, steps=args.steps,
                                             repeats=args.repeats, bandwidth=args.bandwidth, adapters=names))
        finally:
            del engine
            remove_sites(model)
    report["total_s"] = time.perf_counter() - start
    args.json.write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
