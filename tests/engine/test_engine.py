"""splice.engine.engine: whole requests through scheduler, runner, sampler and output processing,
against a plain greedy loop that recomputes the whole sequence every token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from splice.engine.engine import Engine, EngineFull, Request
from splice.engine.sampling import SamplingParams
from splice.lora.apply import adapters_disabled, add_lora, use_adapters
from splice.lora.bank import LoraBank, add_bank_sites, read_adapter
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from tests import tiny
from tests.numerics import GPU

PROMPTS = ["hello world", "the cat sat on the mat", "a", "xyz 123 abc", "once upon a time there was"]


def sharp_llama(seed: int = 0) -> nn.Module:
    """The tiny Llama with a sharper head (clear argmax margins, as after training)."""
    model = tiny.build_tiny_llama(len(tiny.build_tiny_tokenizer()), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    return model


class Collector:
    def __init__(self) -> None:
        self.text, self.reason = "", None

    def __call__(self, delta: str, reason: str | None) -> None:
        assert self.reason is None, "no event after the finish"
        self.text += delta
        self.reason = reason


def _encode(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def _request(tokenizer: Any, prompt: str, adapter: str | None = None, **params: Any) -> tuple[Request, Collector]:
    out = Collector()
    ids = list(tokenizer(prompt)["input_ids"])
    return Request(prompt_ids=ids, params=SamplingParams(**params), on_event=out, adapter=adapter), out


def _drain(engine: Engine, limit: int = 1000) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("budget", [64, 3])
def test_greedy_equals_the_recompute_loop_for_mixed_prompts(tiny_tokenizer, budget: int) -> None:
    model = sharp_llama()
    prompts = _encode(tiny_tokenizer, PROMPTS)
    engine = Engine(model, tiny_tokenizer, max_seqs=3, max_len=64, token_budget=budget)
    done = engine.generate(prompts, SamplingParams(max_tokens=10))
    for prompt, request in zip(prompts, done):
        assert request.generated == tiny.greedy_loop(model, prompt, 10)
        assert request.text == tiny_tokenizer.decode(request.generated)
        assert request.finish_reason == "length"
    assert engine.computed_tokens == sum(len(p) + 9 for p in prompts)  # the last token is never fed
    assert engine.pool.num_free == engine.pool.num_usable  # every block back
    assert engine.finished == {"length": 5}


def test_requests_joining_at_different_steps_equal_the_recompute_loop(tiny_tokenizer) -> None:
    model = sharp_llama()
    engine = Engine(model, tiny_tokenizer, max_seqs=3, max_len=64)
    requests = []
    for i, prompt in enumerate(PROMPTS):  # 5 requests through 3 running places, joining over time
        request, _ = _request(tiny_tokenizer, prompt, max_tokens=4 + 3 * i)
        engine.submit(request)
        requests.append(request)
        engine.step()
    _drain(engine)
    for i, request in enumerate(requests):
        assert request.generated == tiny.greedy_loop(model, request.prompt_ids, 4 + 3 * i)
        assert request.finish_reason == "length"


def test_prefix_cache_hits_skip_the_shared_prompt(tiny_tokenizer) -> None:
    model = sharp_llama()
    system = "you are a helpful assistant; answer in one word. " * 2
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=128, block_size=4)
    first, _ = _request(tiny_tokenizer, system + "hello", max_tokens=4)
    engine.submit(first)
    _drain(engine)
    before = engine.computed_tokens
    second, _ = _request(tiny_tokenizer, system + "goodbye", max_tokens=4)
    engine.submit(second)
    _drain(engine)
    shared = len(tiny_tokenizer(system)["input_ids"]) // 4 * 4
    assert engine.computed_tokens - before <= len(second.prompt_ids) - shared + 3
    assert second.generated == tiny.greedy_loop(model, second.prompt_ids, 4)


def test_without_prefix_caching_every_prompt_is_computed_in_full(tiny_tokenizer) -> None:
    model = sharp_llama()
    system = "you are a helpful assistant; answer in one word. " * 2
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=128, block_size=4, prefix_caching=False)
    assert not engine.scheduler.prefix_caching
    for ending in ("hello", "goodbye"):
        request, _ = _request(tiny_tokenizer, system + ending, max_tokens=4)
        before = engine.computed_tokens
        engine.submit(request)
        _drain(engine)
        assert engine.computed_tokens - before == len(request.prompt_ids) + 3  # no block came from the cache
        assert request.generated == tiny.greedy_loop(model, request.prompt_ids, 4)
    assert engine.pool.num_cached == 0
    engine.forget_prefixes()  # a rebuilt scheduler keeps the option
    assert not engine.scheduler.prefix_caching


def test_preemption_under_a_tiny_kv_pool_gives_the_same_output(tiny_tokenizer) -> None:
    model = sharp_llama()
    prompts = _encode(tiny_tokenizer, PROMPTS[1:])
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=48, block_size=4, kv_blocks=14)
    done = engine.generate(prompts, SamplingParams(max_tokens=16))
    assert engine.preemptions > 0
    for prompt, request in zip(prompts, done):
        assert request.generated == tiny.greedy_loop(model, prompt, 16)


def test_each_row_runs_its_own_lora_adapter(tiny_tokenizer) -> None:
    model = sharp_llama()
    for name in ("a", "b"):
        add_lora(model, LoraConfig(name=name, rank=4, targets="all-linear"))
    tiny.randomize_lora(model, seed=3)
    prompts = _encode(tiny_tokenizer, PROMPTS[:4])
    rows = ["a", None, "b", "a"]
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=8), adapters=rows)
    outputs = set()
    for prompt, name, request in zip(prompts, rows, done):
        with use_adapters(model, [name]):
            assert request.generated == tiny.greedy_loop(model, prompt, 8), name
        outputs.add(tuple(request.generated))
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        engine.generate(prompts[:1], SamplingParams(max_tokens=2), adapters=["c"])


def test_generate_runs_in_eval_mode_and_in_the_callers_context(tiny_tokenizer) -> None:
    model = sharp_llama()
    add_lora(model, LoraConfig(name="a", rank=4, targets="all-linear", dropout=0.5))
    tiny.randomize_lora(model, seed=4)
    prompts = _encode(tiny_tokenizer, PROMPTS[:2])
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64)
    model.train()  # LoRA dropout on: a forward in this mode would differ
    done = engine.generate(prompts, SamplingParams(max_tokens=6))
    with adapters_disabled(model):
        base = engine.generate(prompts, SamplingParams(max_tokens=6))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert [r.generated for r in done] == [tiny.greedy_loop(model, p, 6) for p in prompts]
    with adapters_disabled(model):
        assert [r.generated for r in base] == [tiny.greedy_loop(model, p, 6) for p in prompts]
    assert base[0].generated != done[0].generated


def test_bank_adapters_wait_for_a_slot_without_blocking_others(tmp_path: Path, tiny_tokenizer) -> None:
    for name, seed in (("a", 1), ("b", 2)):
        trained = sharp_llama()
        add_lora(trained, LoraConfig(name=name, targets=("q_proj", "v_proj", "down_proj"), rank=4))
        tiny.randomize_lora(trained, seed=seed)
        save_adapter(trained, tmp_path / name, name=name)
    host = {n: read_adapter(tmp_path / n, name=n) for n in "ab"}
    model = sharp_llama()
    sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
    bank = LoraBank.for_sites(model, sites, capacity=1, rank=4, dtype=torch.float32)
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, bank=bank, sites=list(sites.values()),
                    adapters=host)
    plan = [("a", PROMPTS[0]), ("b", PROMPTS[1]), (None, PROMPTS[2])]
    outs = []
    for adapter, prompt in plan:
        request, out = _request(tiny_tokenizer, prompt, adapter, max_tokens=6)
        engine.submit(request)
        outs.append((request, out))
    engine.step()
    running = {seq.payload.adapter for seq in engine.scheduler.running}
    assert running == {"a", None}  # b waits for the one slot; the base request behind it runs
    _drain(engine)
    for (adapter, _), (request, out) in zip(plan, outs):
        alone = sharp_llama()
        if adapter is not None:
            load_adapter(alone, tmp_path / adapter, name=adapter)
        assert request.generated == tiny.greedy_loop(alone, request.prompt_ids, 6), adapter
        assert out.reason == "length" and out.text == request.text


def _bank_engine(tmp_path: Path, plan: list[tuple[str, Any, int]], *, capacity: int, cuda: bool = False,
                 **options: Any) -> Engine:
    """An engine serving the adapters ``plan`` (name, targets, rank) saved under ``tmp_path`` through a bank."""
    for seed, (name, targets, rank) in enumerate(plan, start=1):
        trained = sharp_llama()
        add_lora(trained, LoraConfig(name=name, targets=targets, rank=rank))
        tiny.randomize_lora(trained, seed=seed)
        save_adapter(trained, tmp_path / name, name=name)
    host = {name: read_adapter(tmp_path / name, name=name) for name, _, _ in plan}
    model = sharp_llama().cuda() if cuda else sharp_llama()
    sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
    bank = LoraBank.for_sites(model, sites, capacity=capacity, rank=max(r for _, _, r in plan), dtype=torch.float32)
    return Engine(model, tiny.build_tiny_tokenizer(), max_seqs=4, max_len=64, bank=bank, sites=list(sites.values()),
                  adapters=host, **options)


@pytest.mark.parametrize(("cuda", "aside"), [(False, False), pytest.param(True, False, marks=GPU),
                                              pytest.param(True, True, marks=GPU)])
def test_bank_adapters_of_mixed_ranks_and_targets_equal_each_alone(tmp_path: Path, tiny_tokenizer, cuda: bool,
                                                                   aside: bool) -> None:
    """Each request's tokens are its adapter's alone (the model on the CPU); on a GPU through the engine's kernels:
    packed GEMMs, the bank's shrink / expand and the gate/up expand fused into SwiGLU, graphs; ``aside``: the
    shrinks on a side stream beside their GEMMs (``LoraBank.overlap_shrink``)."""
    plan = [("a", ("q_proj", "v_proj"), 4), ("b", "all-linear", 8), ("c", ("o_proj",), 4)]
    engine = _bank_engine(tmp_path, plan, capacity=2, cuda=cuda)
    assert engine.bank is not None
    engine.bank.overlap_shrink = aside
    order = ["a", "b", None, "c", "a"]
    requests = []
    for adapter, prompt in zip(order, PROMPTS):
        request, _ = _request(tiny_tokenizer, prompt, adapter, max_tokens=8)
        engine.submit(request)
        requests.append(request)
    _drain(engine)
    for adapter, request in zip(order, requests):
        alone = sharp_llama()
        if adapter is not None:
            load_adapter(alone, tmp_path / adapter, name=adapter)
        assert request.generated == tiny.greedy_loop(alone, request.prompt_ids, 8), adapter
    assert engine.bank is not None and len(engine.bank.resident) == 2


def test_seeded_sampling_does_not_depend_on_batch_companions(tiny_tokenizer) -> None:
    model = sharp_llama()

    def run(companions: int) -> list[int]:
        engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, token_budget=8)
        request, _ = _request(tiny_tokenizer, "hello", max_tokens=10, temperature=1.0, top_k=20, top_p=0.9,
                              seed=2**70)
        for i in range(companions):
            engine.submit(_request(tiny_tokenizer, PROMPTS[i], max_tokens=10, temperature=1.5)[0])
        engine.submit(request)
        _drain(engine)
        return request.generated

    alone = run(0)
    assert run(3) == alone and len(alone) == 10
    assert alone != tiny.greedy_loop(model, list(tiny_tokenizer("hello")["input_ids"]), 10)


def test_tiny_temperature_is_greedy(tiny_tokenizer) -> None:
    model = sharp_llama()
    prompts = _encode(tiny_tokenizer, PROMPTS[:2])
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=1e-40, seed=2**70))
    assert [r.generated for r in done] == [tiny.greedy_loop(model, p, 6) for p in prompts]


def test_stop_strings_eos_and_limits(tiny_tokenizer) -> None:
    model = sharp_llama()
    prompt = list(tiny_tokenizer("hello world")["input_ids"])
    free = tiny.greedy_loop(model, prompt, 12)
    text = tiny_tokenizer.decode(free)
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64)
    stop = text[4:6]
    [stopped] = engine.generate([prompt], SamplingParams(max_tokens=12, stop=(stop,)))
    assert (stopped.text, stopped.finish_reason) == (text[: text.find(stop)], "stop")
    # An EOS id from the generation config ends the request without its text.
    eos = free[5]
    model.generation_config.eos_token_id = [2, eos]
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64)
    [ended] = engine.generate([prompt], SamplingParams(max_tokens=12))
    assert ended.generated == free[: free.index(eos)] and ended.finish_reason == "stop"
    model.generation_config.eos_token_id = 2
    # The context: prompt + output never pass max_len.
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=len(prompt) + 3)
    [full] = engine.generate([prompt], SamplingParams(max_tokens=12))
    assert full.generated == free[:3] and full.finish_reason == "length"


def test_cancel_frees_the_blocks_and_a_full_queue_refuses(tiny_tokenizer) -> None:
    model = sharp_llama()
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64, max_waiting=2)
    kept, kept_out = _request(tiny_tokenizer, "hello world", max_tokens=8)
    gone, gone_out = _request(tiny_tokenizer, "the cat", max_tokens=50)
    engine.submit(kept)
    engine.submit(gone)
    with pytest.raises(EngineFull, match="max_waiting=2"):
        engine.submit(_request(tiny_tokenizer, "a", max_tokens=2)[0])
    engine.step()
    engine.cancel(gone)
    engine.step()
    assert gone_out.reason == "cancelled" and len(engine.scheduler.running) == 1
    _drain(engine)
    assert kept_out.reason == "length" and kept.generated == tiny.greedy_loop(model, kept.prompt_ids, 8)
    assert engine.pool.num_free == engine.pool.num_usable
    assert engine.finished == {"cancelled": 1, "length": 1}


def test_a_failing_request_does_not_stop_the_others(tiny_tokenizer) -> None:
    model = sharp_llama()
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=32)
    good, good_out = _request(tiny_tokenizer, "hello world", max_tokens=6)
    unknown, unknown_out = _request(tiny_tokenizer, "hi", adapter="nope", max_tokens=4)
    long, long_out = _request(tiny_tokenizer, "word " * 40, max_tokens=4)
    raising, _ = _request(tiny_tokenizer, "the cat", max_tokens=6)

    def broken(delta: str, reason: str | None) -> None:
        raise RuntimeError("the client went away")

    raising.on_event = broken
    for request in (unknown, raising, long, good):
        engine.submit(request)
    _drain(engine)
    assert unknown_out.reason is not None and unknown_out.reason.startswith("error: adapter 'nope'")
    assert long_out.reason is not None and "the context holds 32" in long_out.reason
    assert raising.finish_reason == "cancelled"  # its own callback failed: only it ends
    assert good_out.reason == "length" and good.generated == tiny.greedy_loop(model, good.prompt_ids, 6)
    assert engine.pool.num_free == engine.pool.num_usable


@GPU
def test_cuda_graph_decode_matches_eager(tiny_tokenizer) -> None:
    model = sharp_llama().cuda()
    prompts = _encode(tiny_tokenizer, PROMPTS)
    outputs = {}
    for graphs in (True, False):
        engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=96, cuda_graphs=graphs, kv_blocks=64)
        outputs[graphs] = [r.generated for r in engine.generate(prompts, SamplingParams(max_tokens=40))]
        assert engine.graph_failure is None and engine.runner.cuda_graphs == graphs
    assert outputs[True] == outputs[False]
    assert outputs[False][0] == tiny.greedy_loop(model, prompts[0], 40)


@GPU
def test_cuda_graph_decode_with_bank_adapters_matches_eager(tmp_path: Path, tiny_tokenizer) -> None:
    plan = [("a", ("q_proj", "v_proj"), 4), ("b", "all-linear", 4)]
    outputs = {}
    for graphs in (True, False):
        engine = _bank_engine(tmp_path / str(graphs), plan, capacity=2, cuda=True, cuda_graphs=graphs, kv_blocks=64)
        requests = []
        for adapter, prompt in zip(["a", None, "b"], PROMPTS):
            request, _ = _request(tiny_tokenizer, prompt, adapter, max_tokens=20)
            engine.submit(request)
            requests.append(request)
        _drain(engine)
        assert engine.graph_failure is None and engine.runner.cuda_graphs == graphs
        outputs[graphs] = [r.generated for r in requests]
    assert outputs[True] == outputs[False]


def test_n_choices_compute_the_prompt_once_and_each_samples_as_its_seed(tiny_llama, tiny_tokenizer) -> None:
    prompt = _encode(tiny_tokenizer, ["once upon a time there was"])[0]
    assert len(prompt) % 4  # the prompt's last block is partial: the choices copy it on their first write

    def run(params: list[SamplingParams]) -> tuple[Engine, list[Request]]:
        engine = Engine(tiny_llama, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4)
        engine.eos = set()  # every choice runs to max_tokens: the token count below is exact
        return engine, engine.generate([prompt] * len(params), params)

    engine, [request] = run([SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11)])
    assert engine.computed_tokens == len(prompt) + 3 * 7  # the prompt once, then one token per choice a step
    choices = request.choices
    assert [c.index for c in choices] == [0, 1, 2] and choices[0] is request
    assert all(c.finish_reason == "length" and c.text == tiny_tokenizer.decode(c.generated, skip_special_tokens=True)
               for c in choices)
    assert len({tuple(c.generated) for c in choices}) == 3
    assert engine.pool.num_free == engine.pool.num_usable and engine.finished == {"length": 3}
    # choice i samples exactly as a request of its own seeded seed + i, and again the same
    _, alone = run([SamplingParams(max_tokens=8, temperature=1.0, seed=11 + i) for i in range(3)])
    assert [c.generated for c in choices] == [r.generated for r in alone]
    _, [again] = run([SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11)])
    assert [c.generated for c in again.choices] == [c.generated for c in choices]


def test_greedy_choices_with_penalties_follow_the_formula_past_max_seqs(make_tiny_llama, tiny_tokenizer) -> None:
    model = make_tiny_llama(tie_word_embeddings=True)  # tied: it repeats its last token, until penalized
    prompts = _encode(tiny_tokenizer, PROMPTS[:2])
    engine = Engine(model, tiny_tokenizer, max_seqs=2, max_len=64, block_size=4)  # 3 choices, 2 places
    params = SamplingParams(n=3, max_tokens=10, presence_penalty=0.5, frequency_penalty=1.5)
    done = engine.generate(prompts, params)
    for prompt, request in zip(prompts, done):
        want = tiny.penalized_loop(model, prompt, 10, presence=0.5, frequency=1.5)
        assert [c.generated for c in request.choices] == [want] * 3
        assert len(set(want)) > 1 and len(set(tiny.greedy_loop(model, prompt, 10))) == 1
    assert engine.pool.num_free == engine.pool.num_usable
    # Negative penalties make the untied model, which never repeats a token, repeat its first one.
    untied = make_tiny_llama()
    engine = Engine(untied, tiny_tokenizer, max_seqs=2, max_len=64)
    [lifted] = engine.generate(prompts[:1], SamplingParams(max_tokens=10, presence_penalty=-2, frequency_penalty=-1))
    assert lifted.generated == tiny.penalized_loop(untied, prompts[0], 10, presence=-2, frequency=-1)
    assert len(set(lifted.generated)) == 1 and len(set(tiny.greedy_loop(untied, prompts[0], 10))) == 10


def test_every_choice_ends_with_a_request_that_fails_or_is_cancelled(tiny_tokenizer) -> None:
    engine = Engine(sharp_llama(), tiny_tokenizer, max_seqs=4, max_len=64)
    failed, _ = _request(tiny_tokenizer, "hi", adapter="nope", n=3, max_tokens=4)
    cancelled, _ = _request(tiny_tokenizer, "hello", n=2, max_tokens=4)
    outs = {}
    for request in (failed, cancelled):
        for choice in request.choices:
            choice.on_event = outs[choice] = Collector()
        engine.submit(request)
    engine.cancel(cancelled)
    _drain(engine)
    assert all((outs[c].reason or "").startswith("error: adapter 'nope'") for c in failed.choices)
    assert [outs[c].reason for c in cancelled.choices] == ["cancelled"] * 2
    assert engine.finished == {"error": 3, "cancelled": 2} and not engine.busy
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        engine.generate([failed.prompt_ids], SamplingParams(n=2), adapters=["c"])


def test_logprobs_are_the_models_own_log_softmax(tiny_llama, tiny_tokenizer) -> None:
    prompts = _encode(tiny_tokenizer, PROMPTS[:3])
    engine = Engine(tiny_llama, tiny_tokenizer, max_seqs=3, max_len=64)
    params = [SamplingParams(max_tokens=6, logprobs=5), SamplingParams(max_tokens=6),
              SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=20, frequency_penalty=2.0)]
    done = engine.generate(prompts, params)
    assert done[1].logprobs is None
    for request in (done[0], done[2]):
        assert request.logprobs is not None and len(request.logprobs) == len(request.generated) > 0
        ids = request.prompt_ids + request.generated
        with torch.no_grad():  # raw: before the penalty and the temperature
            logp = tiny_llama(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        for i, (token, entry) in enumerate(zip(request.generated, request.logprobs)):
            row = logp[len(request.prompt_ids) - 1 + i]
            assert entry.token == token and entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert [t for t, _ in entry.top] == row.topk(request.params.logprobs or 0).indices.tolist()
            assert [v for _, v in entry.top] == pytest.approx(row.topk(len(entry.top)).values.tolist(), abs=1e-4)
    greedy = done[0].logprobs
    assert greedy is not None and all(e.top[0] == (e.token, e.logprob) for e in greedy)


def test_generate_packs_dora_rows_with_lora_rows_of_other_ranks(tiny_tokenizer) -> None:
    """splice.generate / Engine.generate rows on a DoRA adapter, LoRA r4 and r8 adapters and the base
    model in one batch: the DoRA layers join the step's bank (one multi-LoRA pass a projection) and each
    row's tokens and logprobs are its adapter's alone (a plain forward through the model's own layers)."""
    from splice.engine.runner import RowAdapters
    from splice.generation.generate import generate

    model = sharp_llama()
    add_lora(model, LoraConfig(name="d", rank=4, targets="all-linear", use_dora=True))
    add_lora(model, LoraConfig(name="a", rank=4, targets=("q_proj", "v_proj")))
    add_lora(model, LoraConfig(name="b", rank=8, targets="all-linear"))
    tiny.randomize_lora(model, seed=5)
    tiny.spread_dora_magnitudes(model)
    bank = RowAdapters.of(model, ["d", "a"]).bank
    assert bank is not None and set(bank.resident) == {"d", "a"} and len(bank._rescaled) == 14
    prompts = _encode(tiny_tokenizer, PROMPTS)
    rows = ["d", "a", None, "b", "d"]
    engine = Engine(model, tiny_tokenizer, max_seqs=5, max_len=64)
    done = engine.generate(prompts, SamplingParams(max_tokens=8, logprobs=1), adapters=rows)
    for prompt, name, request in zip(prompts, rows, done):
        with use_adapters(model, [name]):
            assert request.generated == tiny.greedy_loop(model, prompt, 8), name
            with torch.no_grad():
                logp = model(torch.tensor([prompt + request.generated])).logits[0].double().log_softmax(-1)
        assert request.logprobs is not None
        for i, entry in enumerate(request.logprobs):
            assert entry.logprob == pytest.approx(logp[len(prompt) - 1 + i, entry.token].item(), abs=1e-4), name
    with use_adapters(model, [None]):
        assert done[0].generated != tiny.greedy_loop(model, prompts[0], 8)  # the DoRA adapter matters
    texts = [PROMPTS[i] for i in range(5)]
    assert generate(model, tiny_tokenizer, texts, max_new_tokens=8, adapters=rows) == [r.text for r in done]


def test_bank_serves_a_dora_adapter_with_lora_ones(tmp_path: Path, tiny_tokenizer) -> None:
    """splice serve's way: a DoRA adapter read against the served weights (read_adapter(base=)), LoRA
    adapters of ranks 4 and 8, two bank slots for three adapters: each request equals its adapter alone."""
    trained = sharp_llama()
    add_lora(trained, LoraConfig(name="d", rank=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"), use_dora=True))
    tiny.randomize_lora(trained, seed=6)
    tiny.spread_dora_magnitudes(trained)
    save_adapter(trained, tmp_path / "d", name="d")
    for name, rank, seed in (("a", 4, 1), ("b", 8, 2)):
        lora = sharp_llama()
        add_lora(lora, LoraConfig(name=name, rank=rank, targets="all-linear"))
        tiny.randomize_lora(lora, seed=seed)
        save_adapter(lora, tmp_path / name, name=name)
    model = sharp_llama()
    host = {n: read_adapter(tmp_path / n, name=n, base=model) for n in "dab"}
    sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
    bank = LoraBank.for_sites(model, sites, capacity=2, rank=8, dtype=torch.float32)
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, bank=bank, sites=list(sites.values()),
                    adapters=host)
    order = ["d", "a", None, "b", "d"]
    requests = [_request(tiny_tokenizer, prompt, adapter, max_tokens=8)[0] for adapter, prompt in zip(order, PROMPTS)]
    for request in requests:
        engine.submit(request)
    _drain(engine)
    alone = {name: sharp_llama() for name in order}
    for name in "dab":
        load_adapter(alone[name], tmp_path / name, name=name)
    want = [tiny.greedy_loop(alone[name], request.prompt_ids, 8) for name, request in zip(order, requests)]
    assert [request.generated for request in requests] == want
    assert bank.loads == 3 and bank.evictions == 1  # b waited for a slot


@GPU
def test_cuda_graph_steps_serve_a_dora_adapter_as_eager_steps_and_alone(tmp_path: Path, tiny_tokenizer) -> None:
    """On the GPU (packed q/k/v and gate/up, the expand applying DoRA's factors, CUDA graphs captured with
    a DoRA adapter resident) each request equals the eager steps' and its adapter alone on the CPU."""
    trained = sharp_llama()
    add_lora(trained, LoraConfig(name="d", rank=4, targets="all-linear", use_dora=True))
    add_lora(trained, LoraConfig(name="a", rank=8, targets=("q_proj", "v_proj", "up_proj")))
    tiny.randomize_lora(trained, seed=7)
    tiny.spread_dora_magnitudes(trained)
    for name in "da":
        save_adapter(trained, tmp_path / name, name=name)
    order = ["d", None, "a", "d"]
    outputs = {}
    for graphs in (True, False):
        model = sharp_llama().cuda()
        host = {n: read_adapter(tmp_path / n, name=n, base=model) for n in "da"}
        sites = add_bank_sites(model, sorted({p for h in host.values() for p in h.weights}))
        bank = LoraBank.for_sites(model, sites, capacity=2, rank=8, dtype=torch.float32)
        engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, bank=bank, sites=list(sites.values()),
                        adapters=host, cuda_graphs=graphs, kv_blocks=64)
        done = [_request(tiny_tokenizer, prompt, name, max_tokens=16)[0] for name, prompt in zip(order, PROMPTS)]
        for request in done:
            engine.submit(request)
        _drain(engine)
        assert engine.graph_failure is None and engine.runner.cuda_graphs == graphs
        outputs[graphs] = [r.generated for r in done]
    assert outputs[True] == outputs[False]
    for name, request, generated in zip(order, done, outputs[True]):
        with use_adapters(trained, [name]):
            assert generated == tiny.greedy_loop(trained, request.prompt_ids, 16), name
