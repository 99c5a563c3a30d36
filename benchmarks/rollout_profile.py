"""Where a GRPO rollout's decode step goes (issue 27): the engine over a training model's live LoRA adapter.

The shape of ``benchmarks/preference.py``'s GRPO step: the Llama-3-8B-shaped random bf16 model of
``benchmarks/serve.py`` with r16 adapters on all seven projections (float32 masters, as training keeps them),
fused as ``splice train`` fuses it, and an :class:`~splice.engine.engine.Engine` sized as GRPO sizes it
(``--seqs`` sequences, CUDA graphs on). Each row is one :meth:`~splice.engine.engine.Engine.generate` of
``--seqs`` prompts of ``--prompt`` tokens, ``--tokens`` new tokens each (no EOS in a random model), after a
warm-up call of the same kind; ms a step = the call's wall time / ``--tokens``:

- ``sampled, seeded``: temperature 1 with a seed per request (GRPO's rollouts: one torch.Generator a row);
- ``sampled, unseeded``: temperature 1, no seeds;
- ``greedy``: argmax (no sampling kernels);
- ``greedy, casts per call``: the adapters' factors cast from the fp32 masters in every forward, as before
  the engine's 16-bit copies (``splice.lora.casts``);
- ``greedy, adapters off``: the same engine with the adapters disabled (each LoRA linear runs its base only).

    python benchmarks/rollout_profile.py --json rollout_profile.json   # H100/H200, ~60 s
    python benchmarks/rollout_profile.py --tiny                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from serve import build_model, random_ids, sync, tokenizer_for  # noqa: E402

from splice.engine.engine import Engine  # noqa: E402
from splice.engine.sampling import SamplingParams  # noqa: E402
from splice.fused.apply import fuse  # noqa: E402
from splice.lora.apply import adapters_disabled, add_lora  # noqa: E402
from splice.lora.casts import AdapterCasts  # noqa: E402
from splice.lora.freeze import freeze  # noqa: E402
from splice.lora.layers import LoraConfig  # noqa: E402


def kernels_per_step(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_len: int,
                     top: int = 14) -> dict[str, Any]:
    """CUDA kernels a greedy decode step launches and their GPU time, with the adapters' copies (the engine's
    path now) and with the adapters off, eagerly and replaying CUDA graphs: the difference is what the live
    adapter costs; the GPU time per kernel name (top ``top``) is where a step's time goes on the device."""
    out: dict[str, Any] = {}
    variants = [(f"{name}{', graphs' if graphs else ', eager'}", context, graphs)
                for graphs in (False, True) for name, context in (("adapters", None), ("adapters off", "off"))]
    for name, context, graphs in variants:
        engine = Engine(model, tokenizer, max_seqs=len(prompts), max_len=max_len, token_budget=max_len + len(prompts),
                        block_size=16, kv_blocks=len(prompts) * -(-max_len // 16) + 1, cuda_graphs=graphs)
        with adapters_disabled(model) if context else contextlib.nullcontext():
            engine.generate(prompts, SamplingParams(max_tokens=8))  # warm-up (and graph captures)
            counts, times = [], []
            for steps in (3, 7):  # the difference cancels the prefill
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    engine.generate(prompts, SamplingParams(max_tokens=steps))
                    torch.cuda.synchronize()
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                counts.append(len(kernels))
                by_name: dict[str, list[float]] = {}
                for e in kernels:
                    entry = by_name.setdefault(e.name, [0.0, 0.0])
                    entry[0] += 1
                    entry[1] += float(e.time_range.elapsed_us())
                times.append(by_name)
        step = {k: [(v[i] - times[0].get(k, [0.0, 0.0])[i]) / 4 for i in (0, 1)] for k, v in times[1].items()}
        ranked = sorted(step.items(), key=lambda kv: -kv[1][1])
        out[name] = {"kernels": (counts[1] - counts[0]) / 4, "gpu_us": round(sum(v[1] for v in step.values()), 1),
                     "graph_failure": engine.graph_failure,
                     "top_us": {k[:90]: round(v[1], 1) for k, v in ranked[:top]},
                     # every kernel of a step: (launches, us), most launched first (where the small ones hide)
                     "all": {k[:120]: [v[0], round(v[1], 1)] for k, v in sorted(step.items(), key=lambda kv: -kv[1][0])
                             if v[0] > 0}}
        del engine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="serve.py's 2-layer toy on the CPU (a smoke test)")
    parser.add_argument("--seqs", type=int, default=64, help="sequences a call (GRPO: prompts x generations)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens a sequence")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("rollout_profile.json"))
    parser.add_argument("--profile-only", action="store_true", help="skip the timed rows: only the kernel profile")
    parser.add_argument("--all-kernels", action="store_true", help="print every kernel of a step by launches")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    layers = args.layers or (2 if args.tiny else 32)
    model = build_model(tiny=args.tiny, layers=layers, device=device)
    add_lora(model, LoraConfig(rank=16, alpha=32, targets="all-linear"))
    with torch.no_grad():  # B != 0: the adapters change the output, as after a few steps of training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    freeze(model)
    fuse(model)
    vocab = model.config.vocab_size
    tokenizer = tokenizer_for(vocab)
    prompts = random_ids(args.seqs, args.prompt, vocab, seed=1)
    max_len = args.prompt + args.tokens + 1

    def make_engine() -> Engine:
        return Engine(model, tokenizer, max_seqs=args.seqs, max_len=max_len, token_budget=max_len + args.seqs,
                      block_size=16, kv_blocks=args.seqs * -(-max_len // 16) + 1)

    rows: list[dict[str, Any]] = []

    def timed(engine: Engine, label: str, params: list[SamplingParams], context: Any = None) -> None:
        with context if context is not None else contextlib.nullcontext():
            engine.generate(prompts, params)  # warm-up: graphs, compiles
            sync(device)
            started = time.perf_counter()
            done = engine.generate(prompts, params)
            sync(device)
        seconds = time.perf_counter() - started
        tokens = sum(len(r.generated) for r in done)
        rows.append({"row": label, "seconds": round(seconds, 4), "ms_per_step": round(1e3 * seconds / args.tokens, 3),
                     "tok_per_s": round(tokens / seconds, 1), "graph_failure": engine.graph_failure})
        print(f"| {label} | {seconds:.3f} | {1e3 * seconds / args.tokens:.2f} | {tokens / seconds:,.0f} |"
              + (f" graphs failed: {engine.graph_failure}" if engine.graph_failure else ""), flush=True)

    print(f"{'cuda ' + torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}: {args.seqs} x "
          f"({args.prompt} prompt + {args.tokens} new) tokens, r16 all-linear, fp32 masters\n")
    print("| row | seconds | ms/step | tok/s |\n|---|---|---|---|")
    n = args.tokens
    if not args.profile_only:
        engine = make_engine()
        timed(engine, "sampled, seeded", [SamplingParams(max_tokens=n, temperature=1.0, seed=i)
                                          for i in range(args.seqs)])
        timed(engine, "sampled, unseeded", [SamplingParams(max_tokens=n, temperature=1.0) for _ in range(args.seqs)])
        timed(engine, "greedy", [SamplingParams(max_tokens=n) for _ in range(args.seqs)])
        timed(engine, "greedy, adapters off", [SamplingParams(max_tokens=n) for _ in range(args.seqs)],
              adapters_disabled(model))
        engine = make_engine()  # its own graphs, captured over the per-call casts
        engine._casts = AdapterCasts(model, dtype=torch.float32)  # makes no copies
        timed(engine, "greedy, casts per call", [SamplingParams(max_tokens=n) for _ in range(args.seqs)])
        del engine
    kernels: dict[str, Any] = {}
    if device.type == "cuda":
        try:
            kernels = kernels_per_step(model, tokenizer, prompts, max_len=max_len)
        except Exception as error:  # a profiler problem must not lose the timings
            kernels = {"error": repr(error)}
    for name, found in kernels.items():
        if not isinstance(found, dict):
            print(f"kernels: {found}")
            continue
        print(f"\ndecode step ({name}, {args.seqs} sequences): {found['kernels']} kernels, {found['gpu_us']} us of "
              f"GPU time" + (f"; graphs failed: {found['graph_failure']}" if found["graph_failure"] else ""))
        for kernel, us in found["top_us"].items():
            print(f"  {us:8.1f} us  {kernel}")
        if args.all_kernels:
            print("  by launches a step:")
            for kernel, (count, us) in found["all"].items():
                print(f"  {count:6.1f} x {us:8.1f} us  {kernel}")
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seqs": args.seqs,
              "prompt": args.prompt, "tokens": args.tokens, "layers": layers,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
              "kernels_per_decode_step": kernels}
    args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
