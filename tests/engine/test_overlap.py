"""Engine(overlap=True): each step is launched before the previous step's tokens reach the host (the
default on CUDA). Every request must come out exactly as with overlap off: tokens, text, finish
reasons, logprobs, across sampling options, stop strings, n > 1, grammars, requests joining late and
preemption; a request that ends on a token costs at most one step more."""

from __future__ import annotations

from typing import Any

import torch

from splice.engine.constraints import regex
from splice.engine.engine import Engine, Request
from splice.engine.sampling import SamplingParams
from tests import tiny

PROMPTS = ["hello world", "the cat sat on the mat", "a", "xyz 123 abc", "once upon a time there was", "zz top"]
OPTIONS: list[dict[str, Any]] = [
    dict(max_tokens=12),
    dict(max_tokens=9, temperature=0.9, seed=5, logprobs=3),
    dict(max_tokens=14, temperature=1.2, top_k=20, seed=7, n=2),
    dict(max_tokens=10, presence_penalty=1.5, frequency_penalty=0.5),
    dict(max_tokens=16, temperature=0.8, seed=11, stop=("e",)),
    dict(max_tokens=12, constraint=regex("[a-c]{3,6}")),
]


def _run(tokenizer: Any, *, overlap: bool, kv_blocks: int) -> tuple[list[tuple[Any, ...]], int, int]:
    model = tiny.build_tiny_llama(len(tokenizer), seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # some EOS among the greedy rows
    engine = Engine(model, tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=kv_blocks, overlap=overlap)
    requests = [Request(prompt_ids=list(tokenizer(p)["input_ids"]), params=SamplingParams(**o))
                for p, o in zip(PROMPTS, OPTIONS, strict=True)]
    steps = 0
    for request in requests[:3]:
        engine.submit(request)
    while engine.busy or steps < 3:
        if steps == 2:  # the rest join while the first run
            for request in requests[3:]:
                engine.submit(request)
        engine.step()
        steps += 1
    outcomes = [(c.generated, c.text, c.finish_reason, [(lp.token, round(lp.logprob, 5)) for lp in c.logprobs or []])
                for r in requests for c in r.choices]
    return outcomes, steps, engine.preemptions


def test_overlapped_steps_give_every_request_the_same_output(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    for kv_blocks in (80, 17):  # room for all, and a pool small enough to preempt
        plain, plain_steps, preempted = _run(tiny_tokenizer, overlap=False, kv_blocks=kv_blocks)
        overlapped, steps, _ = _run(tiny_tokenizer, overlap=True, kv_blocks=kv_blocks)
        assert (preempted > 0) == (kv_blocks < 80)
        assert overlapped == plain
        assert plain_steps <= steps <= plain_steps + len(plain)  # at most one more step per ending
        assert {outcome[2] for outcome in plain} >= {"stop", "length"}
