"""CPU: ``splice.generate`` of 16 prompts with 16 different adapters (one per row) against the same
call on the base model alone (issue 26's CPU target: at least 0.8x). Embedded SmolLM2-135M, EOS off so
both calls generate the same number of tokens; runs interleaved, the best of each compared (a shared
machine's noise only slows a run). Prints a table and writes JSON (``--json``).

    python benchmarks/generate_adapters_cpu.py --tokens 32 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from splice.generation.generate import generate
from splice.lora.apply import add_lora, lora_modules
from splice.lora.layers import LoraConfig
from splice.models.loading import load_model


class _NoEos:
    """The tokenizer with no EOS id: every row runs all its tokens in both calls."""

    eos_token_id = None

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _clock(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model, hf_tokenizer = load_model(None)
    model.generation_config.eos_token_id = None
    tokenizer = _NoEos(hf_tokenizer)
    prompts = [f"Question {i}: what is the capital of country number {i}? Answer:" for i in range(16)]
    base = copy.deepcopy(model)
    names = [f"a{i}" for i in range(16)]
    targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    for name in names:
        add_lora(model, LoraConfig(name=name, targets=targets, rank=args.rank))
    torch.manual_seed(1)
    with torch.no_grad():  # random B as well as A: every adapter changes its rows
        for _, _, layer in lora_modules(model):
            for param in layer.parameters():
                param.normal_(0, 0.02)
    generate(base, tokenizer, prompts[:2], max_new_tokens=2)  # warm-up
    generate(model, tokenizer, prompts[:2], max_new_tokens=2, adapters=names[:2])

    runs: dict[str, list[tuple[float, float]]] = {"base": [], "mixed": []}
    for _ in range(args.repeats):
        runs["base"].append(_clock(lambda: generate(base, tokenizer, prompts, max_new_tokens=args.tokens,
                                                    batch_size=16)))
        runs["mixed"].append(_clock(lambda: generate(model, tokenizer, prompts, max_new_tokens=args.tokens,
                                                     batch_size=16, adapters=names)))
    rows = []
    for i, kind in enumerate(("wall", "cpu")):
        b, m = min(r[i] for r in runs["base"]), min(r[i] for r in runs["mixed"])
        rows.append({"clock": kind, "base_s": b, "mixed_s": m, "ratio": b / m})
    print(f"| clock | base s | 16 adapters s | base / mixed |  ({args.tokens} tokens, targets {args.targets}, "
          f"r{args.rank}, best of {args.repeats}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['clock']} | {row['base_s']:.2f} | {row['mixed_s']:.2f} | {row['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "targets": args.targets, "rank": args.rank, "rows": rows,
                       "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
