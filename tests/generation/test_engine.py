"""splice.generation.engine: continuous batching over a slot KV cache vs splice.generate alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splice.generation.engine import Engine, EngineFull, Request, SamplingParams
from splice.generation.generate import generate
from splice.lora.apply import add_lora
from splice.lora.bank import LoraBank, add_bank_sites, read_adapter
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from tests import tiny
from tests.numerics import GPU

PROMPTS = ["hello world", "the cat sat", "a", "xyz 123 abc", "once upon a time"]


class Collector:
    def __init__(self) -> None:
        self.text, self.reason = "", None

    def __call__(self, delta: str, reason: str | None) -> None:
        assert self.reason is None, "no event after the finish"
        self.text += delta
        self.reason = reason


def _request(tokenizer: Any, prompt: str, adapter: str | None = None, **params: Any) -> tuple[Request, Collector]:
    out = Collector()
    ids = list(tokenizer(prompt)["input_ids"])
    return Request(prompt_ids=ids, params=SamplingParams(**params), on_event=out, adapter=adapter), out


def _drain(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def test_greedy_requests_joining_at_different_steps_match_generate_alone(tiny_llama, tiny_tokenizer) -> None:
    engine = Engine(tiny_llama, tiny_tokenizer, max_batch=3, max_len=64)
    outs = []
    for i, prompt in enumerate(PROMPTS):  # 5 requests through 3 slots, joining over time
        request, out = _request(tiny_tokenizer, prompt, max_tokens=4 + 3 * i)
        engine.submit(request)
        outs.append(out)
        engine.step()
    _drain(engine)
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        want = generate(tiny_llama, tiny_tokenizer, prompt, max_new_tokens=4 + 3 * i)[0]
        assert (out.text, out.reason) == (want, "length")
    assert engine.rows == [None] * 3


def test_adapters_from_host_memory_through_a_small_bank(tmp_path: Path, make_tiny_llama, tiny_tokenizer) -> None:
    for name, targets, seed in (("a", ("q_proj", "v_proj"), 1), ("b", "all-linear", 2), ("c", ("o_proj",), 3)):
        trained = make_tiny_llama()
        add_lora(trained, LoraConfig(name=name, targets=targets, rank=4 if name != "b" else 8))
        tiny.randomize_lora(trained, seed=seed)
        save_adapter(trained, tmp_path / name, name=name)
    host = {n: read_adapter(tmp_path / n, name=n) for n in "abc"}
    model = make_tiny_llama()
    sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
    bank = LoraBank.for_sites(model, sites, capacity=2, rank=8, dtype=torch.float32)
    engine = Engine(model, tiny_tokenizer, max_batch=4, max_len=64, bank=bank, sites=list(sites.values()),
                    adapters=host)
    plan = [("a", PROMPTS[0]), ("b", PROMPTS[1]), (None, PROMPTS[2]), ("c", PROMPTS[3]), ("a", PROMPTS[4])]
    outs = []
    for adapter, prompt in plan:
        request, out = _request(tiny_tokenizer, prompt, adapter, max_tokens=8)
        engine.submit(request)
        outs.append(out)
    _drain(engine)
    for (adapter, prompt), out in zip(plan, outs):
        alone = make_tiny_llama()
        if adapter is not None:
            load_adapter(alone, tmp_path / adapter, name=adapter)
        assert out.text == generate(alone, tiny_tokenizer, prompt, max_new_tokens=8)[0], adapter
    assert len(bank.resident) == 2


def test_seeded_sampling_does_not_depend_on_batch_mates(tiny_llama, tiny_tokenizer) -> None:
    def run(mates: int) -> str:
        engine = Engine(tiny_llama, tiny_tokenizer, max_batch=4, max_len=64)
        request, out = _request(tiny_tokenizer, "hello", max_tokens=10, temperature=1.0, top_k=20,
                                top_p=0.9, seed=7)
        for i in range(mates):
            engine.submit(_request(tiny_tokenizer, PROMPTS[i], max_tokens=10, temperature=1.0)[0])
        engine.submit(request)
        _drain(engine)
        return out.text

    alone = run(0)
    assert run(3) == alone and len(alone) > 0


def test_stop_strings_eos_cancel_and_limits(tiny_llama, tiny_tokenizer) -> None:
    free = generate(tiny_llama, tiny_tokenizer, "hello world", max_new_tokens=12)[0]
    stop = free[3:5]
    engine = Engine(tiny_llama, tiny_tokenizer, max_batch=2, max_len=64, max_waiting=2)
    stopped, out = _request(tiny_tokenizer, "hello world", max_tokens=12, stop=(stop,))
    cancelled, gone = _request(tiny_tokenizer, "the cat", max_tokens=50)
    engine.submit(stopped)
    engine.submit(cancelled)
    engine.step()
    cancelled.cancelled.set()
    with pytest.raises(EngineFull):
        for _ in range(3):
            engine.submit(_request(tiny_tokenizer, "a", max_tokens=2)[0])
    _drain(engine)
    assert (out.text, out.reason) == (free[: free.find(stop)], "stop")
    assert gone.reason == "cancelled" and engine.rows == [None, None]
    assert engine.cache.nbytes == 2 * 2 * 2 * 2 * 64 * 8 * 4  # layers x (k, v) x slots x heads x len x dim x fp32
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


@GPU
def test_cuda_graph_decode_matches_eager_and_generate(make_tiny_llama, tiny_tokenizer) -> None:
    model = make_tiny_llama().cuda()
    texts = {}
    for graphs in (True, False):
        engine = Engine(model, tiny_tokenizer, max_batch=4, max_len=160, cuda_graphs=graphs)
        outs = []
        for prompt in PROMPTS[:3]:
            request, out = _request(tiny_tokenizer, prompt, max_tokens=70)  # crosses a width bucket
            engine.submit(request)
            outs.append(out)
        _drain(engine)
        assert engine.graph_failure is None and engine.cuda_graphs == graphs
        texts[graphs] = [o.text for o in outs]
    assert texts[True] == texts[False]
    assert texts[False] == generate(model, tiny_tokenizer, PROMPTS[:3], max_new_tokens=70)


@GPU
def test_cuda_graph_decode_with_bank_adapters_matches_eager(tmp_path: Path, make_tiny_llama, tiny_tokenizer) -> None:
    for name, targets, seed in (("a", ("q_proj", "v_proj"), 1), ("b", "all-linear", 2)):
        trained = make_tiny_llama()
        add_lora(trained, LoraConfig(name=name, targets=targets, rank=4))
        tiny.randomize_lora(trained, seed=seed)
        save_adapter(trained, tmp_path / name, name=name)
    host = {n: read_adapter(tmp_path / n, name=n) for n in "ab"}
    model = make_tiny_llama().cuda()
    sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
    texts = {}
    for graphs in (True, False):
        bank = LoraBank.for_sites(model, sites, capacity=2, rank=4, dtype=torch.float32)
        engine = Engine(model, tiny_tokenizer, max_batch=4, max_len=96, bank=bank, sites=list(sites.values()),
                        adapters=host, cuda_graphs=graphs)
        outs = []
        for adapter, prompt in zip(["a", None, "b"], PROMPTS):
            request, out = _request(tiny_tokenizer, prompt, adapter, max_tokens=20)
            engine.submit(request)
            outs.append(out)
        _drain(engine)
        assert engine.graph_failure is None and engine.cuda_graphs == graphs
        texts[graphs] = [o.text for o in outs]
    assert texts[True] == texts[False]
