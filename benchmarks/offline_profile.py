"""Where the offline ShareGPT-like run's time goes (issue 26), against the workload's own floor.

Runs ``benchmarks/serve.py``'s offline workload (prompts 50-1,000 and outputs 50-500 tokens, uniform, seed
2024, the Llama-3-8B-shaped random bf16 model) through one :class:`~splice.engine.engine.Engine` per
``--variants`` entry (``SEQSxBUDGET``: ``max_seqs`` and the token budget of a step) and records every step:
its decodes, prefill tokens, the CUDA-graph bucket it padded to, the K/V tokens its attention reads and its
GPU time (CUDA events recorded between steps: with the engine's overlap, the span from one step's launch to
the next is the GPU time of the first, idle gaps included). Steps are split into decode-only and mixed.

The floor is arithmetic over the recorded steps, with the card's copy bandwidth and bf16 GEMM peak measured
in the same run: each step costs at least ``max(weight bytes / bandwidth, linear FLOPs / peak)`` for its
GEMMs (computed tokens only, padding excluded) plus ``K/V bytes read / bandwidth`` for attention. The
measured time over that floor says how far from the card each kind of step runs.

With ``--profile-steps N`` a ``torch.profiler`` window of N steps in the middle of the first variant's run
gives GPU time by kernel kind (GEMM, few-row GEMM, attention, multi-LoRA, norms, ...) and the top kernels
(``--profile-all``: of every variant). A variant's ``:aN`` serves ``N`` random r16 adapters from a bank (requests
round-robin over them, as ``serve.py``'s offline part), ``:dense`` the engine's ``fresh_attention="dense"``.

    python benchmarks/offline_profile.py --json offline_profile.json          # H100/H200, ~3 min
    python benchmarks/offline_profile.py --tiny                               # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from serve import (  # noqa: E402
    BLOCK,
    Bench,
    Deadline,
    adapter_bank,
    build_model,
    free_memory,
    kv_bytes_per_token,
    part_bandwidth,
    remove_sites,
    sharegpt_like,
    sync,
    tokenizer_for,
    warm,
    weight_bytes,
)
from serve import parse_args as serve_args  # noqa: E402
from torch import nn  # noqa: E402

from splice.engine.engine import Engine, Request  # noqa: E402
from splice.engine.sampling import SamplingParams  # noqa: E402
from splice.engine.scheduler import StepPlan  # noqa: E402

# kernel kinds by name (first match wins): cuBLAS / CUTLASS GEMMs, splice's few-row GEMM, paged attention, ...
KINDS = (("gemv", ("_gemv",)), ("attention", ("_attention_kernel", "_reduce_kernel", "sdpa", "fmha", "flash")),
         ("multi-LoRA", ("_shrink", "_expand", "_plan")),
         ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "cublas")), ("rmsnorm", ("rmsnorm", "_rms")),
         ("swiglu", ("swiglu",)), ("rope+cache", ("rope", "write_kv", "cache")),
         ("sampling", ("sample", "exponential", "softmax", "argmax", "topk", "sort")),
         ("copy", ("memcpy", "memset", "copy", "fill")))


def gemm_peak(device: torch.device) -> float | None:
    """bf16 8192^3 matmul FLOP/s (best of 5), the compute bound of the floor; None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(6):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / best


def event() -> Any:
    """A timing CUDA event recorded on the current stream now."""
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark


def linear_params(model: nn.Module) -> int:
    """Weights a computed token multiplies (every linear; the head only for sampled tokens, counted apart)."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)


class Recorder:
    """Each step's plan (by wrapping one scheduler's bound ``schedule``) and its GPU time."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.plan = engine, StepPlan()
        inner = engine.scheduler.schedule

        def schedule() -> StepPlan:
            self.plan = inner()
            return self.plan

        engine.scheduler.schedule = schedule  # type: ignore[method-assign]

    def step_info(self) -> dict[str, int]:
        chunks = self.plan.chunks
        decodes = [c for c in chunks if c.count == 1 and c.start > 0 and c.sample]
        runner: Any = self.engine.runner
        bucket = runner._bucket(chunks) if chunks and runner.cuda_graphs else None
        tokens = sum(c.count for c in chunks)
        return {"tokens": tokens, "decodes": len(decodes), "prefill": tokens - len(decodes),
                "sampled": sum(c.sample for c in chunks), "padded": bucket[0] if bucket else tokens,
                # keys each query row reads: a decode its whole context; a chunk's K/V tile loads are shared
                # by its queries, so a chunk reads its context once
                "kv_tokens": sum(c.start + c.count for c in chunks)}


def run_variant(bench: Bench, *, max_seqs: int, budget: int, kv_dtype: str, kv_gib: float, seconds: float,
                profile_steps: int, adapters: int = 0, fresh: str = "paged") -> dict[str, Any]:
    model, device = bench.model, bench.device
    prompts, outputs = sharegpt_like(bench)
    max_len = max(map(len, prompts)) + max(outputs) + 1
    per_block = BLOCK * kv_bytes_per_token(model, kv_dtype)
    blocks = max_seqs * -(-max_len // BLOCK) + 1
    if device.type == "cuda":
        blocks = min(blocks, int(kv_gib * (1 << 30)) // per_block)
    names, extra = adapter_bank(bench, adapters)
    engine = Engine(model, bench.tokenizer, max_seqs=max_seqs, max_len=max_len, token_budget=max(budget, max_seqs),
                    block_size=BLOCK, kv_blocks=blocks, cuda_graphs=True, max_waiting=len(prompts), kv_dtype=kv_dtype,
                    fresh_attention=fresh, **extra)
    recorder: Recorder | None = None
    try:
        warm(engine, bench.vocab, names)
        recorder = Recorder(engine)
        requests = [Request(prompt_ids=p, params=SamplingParams(max_tokens=o), adapter=names[i % len(names)])
                    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]
        stop = Deadline(seconds)
        cuda = device.type == "cuda"
        sync(device)
        start = time.perf_counter()
        for request in requests:
            engine.submit(request)
        steps: list[dict[str, Any]] = []
        marks: list[Any] = []  # a CUDA event before each step's launch (CUDA)
        cuts: dict[int, Any] = {}  # step index -> the event that ends its span instead of the next mark
        profile: dict[str, Any] | None = None
        while engine.busy and stop.left() > 0:
            if profile_steps and profile is None and len(steps) >= 400:
                if cuda:
                    cuts[len(steps) - 1] = event()
                profile = profile_window(engine, profile_steps)  # its steps are not in the table
                continue
            if cuda:
                marks.append(event())
            began = time.perf_counter()
            engine.step()
            steps.append({**recorder.step_info(), "host_s": time.perf_counter() - began})
        sync(device)
        elapsed = time.perf_counter() - start
        if cuda:  # GPU span of step i: from its mark to the next one (or its cut, or the final mark)
            marks.append(event())
            marks[-1].synchronize()
            for i, step in enumerate(steps):
                step["gpu_s"] = marks[i].elapsed_time(cuts.get(i, marks[i + 1])) / 1e3
        else:
            for step in steps:
                step["gpu_s"] = step["host_s"]
        generated = sum(len(r.generated) for r in requests)
        truncated = engine.busy
        for request in requests:
            engine.cancel(request)
        while engine.busy:
            engine.step()
    finally:
        del engine
        recorder = None  # (it holds the engine: its caches and graphs are freed only now)
        if adapters:
            remove_sites(model)
        free_memory()
    return {"max_seqs": max_seqs, "token_budget": budget, "kv_dtype": kv_dtype, "kv_blocks": blocks,
            "adapters": adapters, "fresh_attention": fresh, "requests": len(requests),
            "finished": sum(r.finish_reason == "length" for r in requests), "truncated": truncated,
            "seconds": elapsed, "output_tokens": generated, "output_tok_s": generated / elapsed,
            "steps": steps, "profile": profile}


def profile_window(engine: Engine, steps: int) -> dict[str, Any]:
    """GPU time by kernel kind over ``steps`` engine steps, and the top 12 kernels."""
    from torch.profiler import ProfilerActivity, profile

    device = engine.runner.device
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    kinds: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        kind = next((k for k, keys in KINDS if any(s in name for s in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.device_time_total / 1e3
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    top = [{"name": e.key[:80], "calls": e.count, "ms": e.device_time_total / 1e3} for e in kernels[:12]]
    return {"steps": steps, "busy_ms": sum(kinds.values()), "kinds_ms": kinds, "top": top}


def summarize(bench: Bench, run: dict[str, Any], *, peak: float | None) -> dict[str, Any]:
    """Per kind of step (decode-only / mixed): count, GPU seconds, tokens, and the floor (module doc)."""
    model = bench.model
    weights, per_token = weight_bytes(model), kv_bytes_per_token(model, run["kv_dtype"])
    flops_token = 2 * linear_params(model)
    head = model.get_output_embeddings().weight.numel() * 2
    bandwidth = bench.bandwidth or 1.0
    rows = {}
    for kind in ("decode", "mixed"):
        steps = [s for s in run["steps"] if (s["prefill"] == 0) == (kind == "decode")]
        gpu = sum(s["gpu_s"] for s in steps)
        gemm_floor = attention_floor = 0.0
        for s in steps:
            flops = flops_token * s["tokens"] + head * s["sampled"]
            gemm_floor += max(weights / bandwidth, flops / peak) if peak else weights / bandwidth
            attention_floor += s["kv_tokens"] * per_token / bandwidth
        tokens = sum(s["tokens"] for s in steps)
        rows[kind] = {
            "steps": len(steps), "gpu_s": gpu, "host_s": sum(s["host_s"] for s in steps),
            "tokens_per_step": tokens / max(1, len(steps)),
            "decodes_per_step": sum(s["decodes"] for s in steps) / max(1, len(steps)),
            "padding": 1 - tokens / max(1, sum(s["padded"] for s in steps)),
            "gemm_floor_s": gemm_floor, "attention_floor_s": attention_floor,
            "of_floor": (gemm_floor + attention_floor) / gpu if gpu else None,
            "linear_tflop_s": flops_token * tokens / gpu / 1e12 if gpu else None}
    floor = sum(r["gemm_floor_s"] + r["attention_floor_s"] for r in rows.values())
    return {"kinds": rows, "floor_s": floor, "floor_tok_s": run["output_tokens"] / floor if floor else None,
            "of_floor": floor / run["seconds"] if run["seconds"] else None}


def print_variant(run: dict[str, Any], summary: dict[str, Any]) -> None:
    split = "" if run.get("split_decodes", True) else ", decodes in the prefill tiles"
    split += f", {run['adapters']} adapters" if run.get("adapters") else ""
    split += f", fresh_attention={run['fresh_attention']}" if run.get("fresh_attention", "paged") != "paged" else ""
    print(f"\n{run['max_seqs']} sequences x {run['token_budget']} tokens a step, {run['kv_dtype']} K/V{split}: "
          f"{run['output_tok_s']:,.0f} output tok/s, "
          f"{run['finished']}/{run['requests']} finished in {run['seconds']:.1f} s; floor {summary['floor_s']:.1f} s "
          f"({summary['floor_tok_s'] or 0:,.0f} tok/s), measured at {summary['of_floor'] or 0:.2f} of it")
    print("| steps | count | GPU s | host s | tokens/step | decodes/step | padding | GEMM floor s | attention floor s "
          "| of floor | linear TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in summary["kinds"].items():
        print(f"| {kind} | {r['steps']} | {r['gpu_s']:.2f} | {r['host_s']:.2f} | {r['tokens_per_step']:.0f} "
              f"| {r['decodes_per_step']:.0f} | {r['padding']:.2f} | {r['gemm_floor_s']:.2f} "
              f"| {r['attention_floor_s']:.2f} | {r['of_floor'] or 0:.2f} | {r['linear_tflop_s'] or 0:.0f} |")
    profile = run.get("profile")
    if profile and "kinds_ms" in profile:
        busy = profile["busy_ms"]
        print(f"profile of {profile['steps']} steps: {busy:.1f} ms of kernels; "
              + ", ".join(f"{k} {v:.1f} ({v / busy:.0%})" for k, v in sorted(profile["kinds_ms"].items(),
                                                                           key=lambda kv: -kv[1])))
        for k in profile["top"]:
            print(f"  {k['ms']:8.2f} ms {k['calls']:6d}x  {k['name']}")


@contextlib.contextmanager
def split_decodes(on: bool) -> Iterator[None]:
    """With ``on`` False, paged attention's default tiles keep a mixed call's decodes in the prefill tiles (one
    launch, as before ``KernelConfig.split_decodes``): this process only, for the A/B of one run."""
    import splice.kernels.paged_attention as module

    original = module.default_config
    if not on:
        module.default_config = lambda **kw: replace(original(**kw), split_decodes=False)  # type: ignore[assignment]
    try:
        yield
    finally:
        module.default_config = original


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="serve.py's 2-layer toy on the CPU (a smoke test)")
    parser.add_argument("--variants", default=None,
                        help="SEQSxBUDGET[:int8][:nosplit][:aN][:dense],... (default 256x8192,256x8192:int8; ':int8': "
                             "an int8 K/V cache; ':nosplit': mixed steps' decodes in the prefill tiles, as before "
                             "split_decodes; ':aN': N adapters; ':dense': fresh_attention='dense')")
    parser.add_argument("--requests", type=int, default=None, help="requests of the workload (default 1,000)")
    parser.add_argument("--kv-gib", type=float, default=48.0, help="K/V cache cap, GiB (CUDA)")
    parser.add_argument("--seconds", type=float, default=80.0, help="time limit of each variant's run")
    parser.add_argument("--profile-steps", type=int, default=0, help="profiler window of the first variant")
    parser.add_argument("--profile-all", action="store_true", help="the profiler window in every variant")
    parser.add_argument("--json", type=Path, default=Path("offline_profile.json"))
    args = parser.parse_args(argv)
    args.variants = args.variants or ("8x64,4x16:int8" if args.tiny else "256x8192,256x8192:int8")
    try:
        args.pairs = []
        for variant in args.variants.lower().split(","):
            sizes, *flags = variant.split(":")
            seqs, budget = (int(x) for x in sizes.split("x"))
            counts = [int(f[1:]) for f in flags if f.startswith("a")]
            if min(seqs, budget, *counts) < 1 or len(counts) > 1 \
                    or not {f for f in flags if not f.startswith("a")} <= {"int8", "nosplit", "dense"}:
                raise ValueError
            args.pairs.append((seqs, budget, "int8" if "int8" in flags else "auto", "nosplit" not in flags,
                               counts[0] if counts else 0, "dense" if "dense" in flags else "paged"))
    except ValueError:
        parser.error(f"--variants {args.variants!r}: give SEQSxBUDGET[:int8][:nosplit][:aN][:dense] with positive "
                     f"ints, e.g. 256x8192,256x8192:int8,256x8192:a8")
    return args


def main() -> None:
    args = parse_args()
    sargs = serve_args(["--tiny"] if args.tiny else [])
    if args.requests:
        sargs.offline_requests = args.requests
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    model = build_model(tiny=args.tiny, layers=sargs.layers, device=device)
    bench = Bench(args=sargs, model=model, tokenizer=tokenizer_for(model.config.vocab_size), device=device)
    record: dict[str, Any] = {"rows": []}
    part_bandwidth(bench, Deadline(60), record)
    peak = gemm_peak(device)
    if peak:
        print(f"bf16 GEMM peak (8192^3): {peak / 1e12:.0f} TFLOP/s", flush=True)
    report: dict[str, Any] = {"info": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "bandwidth_gb_s": (bench.bandwidth or 0) / 1e9,
                                       "gemm_peak_tflop_s": (peak or 0) / 1e12, "requests": sargs.offline_requests},
                              "variants": []}
    for i, (seqs, budget, kv_dtype, split, adapters, fresh) in enumerate(args.pairs):
        with split_decodes(split):
            run = run_variant(bench, max_seqs=seqs, budget=budget, kv_dtype=kv_dtype, kv_gib=args.kv_gib,
                              seconds=args.seconds, profile_steps=args.profile_steps if i == 0 or args.profile_all
                              else 0, adapters=adapters, fresh=fresh)
        run["split_decodes"] = split
        summary = summarize(bench, run, peak=peak)
        print_variant(run, summary)
        report["variants"].append({**{k: v for k, v in run.items() if k != "steps"}, **summary})
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
