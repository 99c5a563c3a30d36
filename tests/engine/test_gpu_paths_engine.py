"""GPU-only paths of the engine that the CPU tests cannot reach (skipped without a GPU).

On CUDA the engine overlaps its steps (each one launched before the previous step's tokens reach the
host: pinned buffers, events, tokens fed on the device) and replays CUDA graphs for decode and mixed
(prefill) steps. Here every request must come out exactly as from the plain engine (no overlap, no
graphs): a staging buffer reused before its copy finished, a token fed from the wrong row or a graph
reading stale inputs changes tokens. The options mix sampling, logprobs, penalties, n > 1, stop
strings, a grammar, late joins (prefill chunks beside fed decodes in one graph) and preemption.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splice.engine.constraints import regex
from splice.engine.engine import Engine, Request
from splice.engine.runner import KV_ROOM, _buckets
from splice.engine.sampling import SamplingParams
from tests import tiny
from tests.numerics import GPU

PROMPTS = ["hello world", "the cat sat on the mat", "a", "xyz 123 abc", "once upon a time there was", "zz top",
           "the the the the the the the the the the the the the the the the the the"]
OPTIONS: list[dict[str, Any]] = [
    dict(max_tokens=10, logprobs=2),
    dict(max_tokens=11, temperature=0.9, seed=15, logprobs=4),
    dict(max_tokens=13, temperature=1.1, top_k=12, seed=17, n=3),
    dict(max_tokens=9, presence_penalty=-1.0, frequency_penalty=1.5, temperature=0.6, seed=2),
    dict(max_tokens=15, temperature=0.8, seed=21, stop=("a",)),
    dict(max_tokens=12, constraint=regex("[a-c]{2,7}")),
    dict(max_tokens=20, temperature=0.7, top_p=0.9, seed=3),
]


def _run(tokenizer: Any, *, fast: bool, kv_blocks: int,
         kv_dtype: str = "auto") -> tuple[list[tuple[Any, ...]], list[float], Engine]:
    """Every choice's (tokens, text, finish reason, logprob tokens), every logprob; ``fast``: overlap and CUDA graphs (with a
    token budget small enough that prefill chunks replay the 16/32/64-token graphs)."""
    model = tiny.build_tiny_llama(len(tokenizer), seed=3).cuda()
    with torch.no_grad():
        model.lm_head.weight.mul_(6)  # some EOS among the greedy rows
    engine = Engine(model, tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=kv_blocks, token_budget=64,
                    overlap=fast, cuda_graphs=fast, kv_dtype=kv_dtype)
    requests = []
    for number, (prompt, options) in enumerate(zip(PROMPTS, OPTIONS, strict=True)):
        requests.append(Request(prompt_ids=list(tokenizer(prompt)["input_ids"]), params=SamplingParams(**options)))
        engine.submit(requests[-1])
        if number in (2, 4):  # the others join while the first ones decode
            engine.step()
            engine.step()
    while engine.busy:
        engine.step()
    choices = [c for r in requests for c in r.choices]
    outcomes = [(c.generated, c.text, c.finish_reason, [lp.token for lp in c.logprobs or []])
                for c in choices]
    return outcomes, [lp.logprob for c in choices for lp in c.logprobs or []], engine


@GPU
@pytest.mark.parametrize("kv_blocks", [80, 17])  # room for all; a pool small enough to preempt
def test_overlapped_graph_steps_give_every_request_the_plain_engines_output(tiny_tokenizer, kv_blocks: int) -> None:  # type: ignore[no-untyped-def]
    plain, plain_logprobs, _ = _run(tiny_tokenizer, fast=False, kv_blocks=kv_blocks)
    fast, logprobs, engine = _run(tiny_tokenizer, fast=True, kv_blocks=kv_blocks)
    assert engine.overlap and engine.graph_failure is None
    mixed = [key for key in engine.runner._graphs if key[:2] not in {(b, b) for b in _buckets(4)}]
    assert mixed, "no prefill chunk replayed a token-bucket graph"
    assert (engine.preemptions > 0) == (kv_blocks < 80)
    assert fast == plain
    assert logprobs == pytest.approx(plain_logprobs, abs=1e-4)  # (matmuls of a padded M may round apart)
    assert {outcome[2] for outcome in plain} >= {"stop", "length"}


@GPU
def test_an_int8_kv_cache_replays_graphs_with_the_plain_engines_output(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """kv_dtype="int8" on CUDA: the fused RoPE + int8 cache write and paged attention over the codes, in
    overlapped graph steps (decode and mixed), give the plain engine's output over the same int8 cache."""
    plain, plain_logprobs, _ = _run(tiny_tokenizer, fast=False, kv_blocks=80, kv_dtype="int8")
    fast, logprobs, engine = _run(tiny_tokenizer, fast=True, kv_blocks=80, kv_dtype="int8")
    assert engine.runner.key_caches[0].dtype == torch.int8 and engine.graph_failure is None
    assert fast == plain
    assert logprobs == pytest.approx(plain_logprobs, abs=1e-4)


@GPU
def test_warmed_up_graphs_serve_the_first_requests_without_a_capture(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """warmup() captures every bucket: the requests that follow (decodes fed on the device, prefill chunks)
    replay them and capture none."""
    model = tiny.build_tiny_llama(len(tiny_tokenizer), seed=3).cuda()
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80, token_budget=64)
    captured = engine.runner.warmup()
    graphs = dict(engine.runner._graphs)
    assert captured == len(graphs) == len(_buckets(4)) + len(engine.runner.token_buckets)
    prompts = [list(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS]
    done = engine.generate(prompts, SamplingParams(max_tokens=8))
    assert all(r.finish_reason in ("stop", "length") for r in done)
    assert engine.graph_failure is None
    assert all(engine.runner._graphs[key] is entry for key, entry in graphs.items())  # none captured again


def _lora_rollouts(tokenizer: Any, *, fast: bool, device: str = "cuda",
                   dtype: torch.dtype = torch.float32) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy rollouts of a fused LoRA training model (r4 on every linear, as GRPO's) before and after an in-place
    change of the live adapter (an optimizer step); ``fast``: overlap and graphs. ``dtype``: the base's (the
    adapters keep fp32 masters). fp32: q/k/v and gate/up through lora_group over separate bases; bf16: through the
    engine's 16-bit copies, each group as three GEMMs over its packed bases (splice.fused.modules.packed_lora)."""
    from splice.fused.apply import fuse
    from splice.lora.apply import add_lora, lora_modules
    from splice.lora.freeze import freeze
    from splice.lora.layers import LoraConfig

    model = tiny.build_tiny_llama(len(tokenizer), seed=3).to(dtype)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    tiny.randomize_lora(model, seed=5)
    freeze(model)
    model = model.to(device)
    fuse(model)
    engine = Engine(model, tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80, token_budget=64,
                    overlap=fast, cuda_graphs=fast)
    prompts = [list(tokenizer(p)["input_ids"]) for p in PROMPTS[:4]]
    before = [r.generated for r in engine.generate(prompts, SamplingParams(max_tokens=8))]
    with torch.no_grad():
        for _, _, layer in lora_modules(model):
            layer.lora_B.weight.mul_(-3.0)  # the optimizer updates the adapter where it is
    after = [r.generated for r in engine.generate(prompts, SamplingParams(max_tokens=8))]
    assert engine.graph_failure is None
    groups = 2 * len(model.model.layers) if dtype in (torch.bfloat16, torch.float16) else 0
    assert len(engine._casts.group_copies) == groups  # the engine packed the bases: bf16 runs packed_lora
    return before, after


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollouts_of_a_fused_lora_model_replay_graphs_over_the_live_adapter(tiny_tokenizer, dtype) -> None:  # type: ignore[no-untyped-def]
    """GRPO's rollouts under overlap and CUDA graphs: the grouped LoRA projections give the plain engine's tokens,
    and an in-place adapter update shows in the next replays (no copy but the engine call's own 16-bit one,
    refreshed in place each call, which the captured graphs read)."""
    plain = _lora_rollouts(tiny_tokenizer, fast=False, dtype=dtype)
    fast = _lora_rollouts(tiny_tokenizer, fast=True, dtype=dtype)
    assert fast == plain
    assert plain[0] != plain[1]  # the update changes the greedy tokens


@GPU
def test_batch_one_decode_over_an_nf4_base_takes_the_fused_kernel_and_the_models_greedy_tokens(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """An NF4 base whose widths are whole 64-value blocks: a lone request decodes through the fused single-row
    kernel (inside the decode graph) and each token it picks is the eager NF4 model's argmax up to rounding:
    its eager log-prob within 2e-2 of the best one (the kernel sums in another order: a near-tie may flip; a
    wrong level, absmax or row gives tokens several nats below). The tokens are not all one repeated id."""
    from splice.engine.output import eos_ids
    from splice.kernels.nf4_gemv import gemv_applies
    from splice.quant.linear import NF4Linear, quantize_nf4

    model = tiny.llama(seed=5, vocab=len(tiny_tokenizer), hidden=128, intermediate=256).cuda()
    with torch.no_grad():  # EOS never the greedy pick: twelve tokens to check
        model.lm_head.weight[sorted(eos_ids(model, tiny_tokenizer))] = 0.0
    quantize_nf4(model)
    linears = [m for m in model.model.modules() if isinstance(m, NF4Linear)]
    assert len(linears) == 14
    assert all(gemv_applies(torch.ones(1, m.in_features, device="cuda"), shape=m.weight.weight_shape,
                            block_size=m.weight.block_size) for m in linears)
    prompt = list(tiny_tokenizer("once upon a time there was")["input_ids"])
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80)
    done = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
    assert engine.runner.cuda_graphs and len(done.generated) == 12 and len(set(done.generated)) > 1
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(torch.tensor([prompt[-1:]], device="cuda"))  # one token: one activation row a linear, as the engine's
    assert any("_nf4_gemv2_kernel" in event.name for event in prof.events())  # (one row: gemv2, by default)
    ids = list(prompt)
    with torch.no_grad():
        for token in done.generated:
            logp = torch.log_softmax(model(torch.tensor([ids], device="cuda")).logits[0, -1].float(), dim=-1)
            assert float(logp.max() - logp[token]) < 2e-2, (ids, token)
            ids.append(token)


@GPU
def test_graphs_captured_under_one_routing_never_replay_under_another(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """One engine (GRPO's, a server's) called inside ``adapters_disabled`` and out of it again: each call gives the
    tokens of an engine without graphs under the same routing (the graphs of the other routing are not replayed)."""
    from splice.fused.apply import fuse
    from splice.lora.apply import adapters_disabled, add_lora
    from splice.lora.freeze import freeze
    from splice.lora.layers import LoraConfig

    model = tiny.build_tiny_llama(len(tiny_tokenizer), seed=3)
    add_lora(model, LoraConfig(rank=4, alpha=8))
    tiny.randomize_lora(model, seed=5)
    freeze(model)
    model = model.cuda()
    fuse(model)
    prompts = [list(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS[:4]]

    def tokens(engine: Engine) -> list[list[int]]:
        return [r.generated for r in engine.generate(prompts, SamplingParams(max_tokens=8))]

    def engine(graphs: bool) -> Engine:
        return Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80, token_budget=64,
                      cuda_graphs=graphs)

    fast, plain = engine(True), engine(False)
    adapted = tokens(fast)
    with adapters_disabled(model):
        base = tokens(fast)
        assert base == tokens(plain)
    assert base != adapted
    assert tokens(fast) == adapted == tokens(plain)
    assert fast.runner.cuda_graphs and fast.graph_failure is None, fast.graph_failure


@GPU
def test_decode_gemms_of_few_rows_run_the_gemv_kernel_and_give_cublas_tokens(tiny_tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """bf16 decode (at most 16 rows): packed q/k/v, o, packed gate/up, down and the head run splice.kernels.gemv
    (captured in the CUDA graphs), and the greedy tokens equal those of the cuBLAS path (gemv switched off)."""
    import splice.kernels.gemv as gemv_module

    shapes: set[tuple[int, ...]] = set()
    original = gemv_module.gemv

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.add(tuple(args[1].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(gemv_module, "gemv", spy)
    prompts = [list(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS[:4]]

    def greedy() -> list[list[int]]:
        model = tiny.build_tiny_llama(len(tiny_tokenizer), seed=3).to(torch.bfloat16).cuda()
        engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80, token_budget=64)
        tokens = [list(r.generated) for r in engine.generate(prompts, SamplingParams(max_tokens=8))]
        assert engine.graph_failure is None
        return tokens

    with_gemv = greedy()
    assert len(shapes) == 5, shapes  # q/k/v, o, gate/up, down, the head: one weight shape each
    monkeypatch.setattr(gemv_module, "gemv_applies", lambda *args, **kwargs: False)
    assert greedy() == with_gemv


@GPU
def test_the_default_kv_cache_is_sized_by_need_not_by_the_free_memory(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Without kv_blocks a small model's cache holds KV_ROOM x (max_seqs x max_len) tokens (+1 scratch block), not
    kv_memory of the card (a server beside other processes once took 80% of it); a small kv_memory caps it lower
    (1e-6 of 2-257 GB free: 2-257 of these 1 KiB blocks)."""
    model = tiny.build_tiny_llama(len(tiny_tokenizer), seed=3).cuda()
    engine = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, cuda_graphs=False)
    assert engine.runner.num_blocks == KV_ROOM * 4 * 16 + 1
    tight = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, cuda_graphs=False, kv_memory=1e-6)
    assert tight.runner.num_blocks < KV_ROOM * 4 * 16 + 1
