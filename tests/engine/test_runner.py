"""splice.engine.runner: flat batches of mixed chunks, copy-on-write, per-token adapters, CUDA graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.engine.runner import ModelRunner, RowAdapters, _buckets, _context_buckets, _token_buckets
from splice.engine.scheduler import Chunk, Sequence, StepPlan
from splice.fused.modules import FusedRMSNorm, FusedSwiGLUMLP, is_fast
from splice.lora.apply import add_lora, use_adapters
from splice.lora.layers import LoraConfig
from tests import tiny
from tests.numerics import GPU, rel_err


def _seq(tokens: list[int], blocks: list[int], seq_id: int = 0, adapter: str | None = None) -> Sequence:
    return Sequence(seq_id=seq_id, tokens=tokens, prompt_len=len(tokens), max_tokens=1, arrival=seq_id,
                    block_ids=blocks, adapter=adapter)


def _last_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens], device=next(model.parameters()).device)).logits[0, -1].float()


def _runner(model: nn.Module, **options: object) -> ModelRunner:
    defaults: dict[str, object] = dict(block_size=4, max_seqs=4, max_len=64, num_blocks=24, cuda_graphs=False)
    defaults.update(options)
    return ModelRunner(model, **defaults)  # type: ignore[arg-type]


def test_one_step_mixes_decodes_and_prefill_chunks_of_several_sequences() -> None:
    model = tiny.llama()
    runner = _runner(model)
    a, b, c = (tiny.tokens(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 11), (2, 9), (3, 14)))
    sa, sb, sc = _seq(a, [1, 2, 3], 0), _seq(b, [4, 5, 6], 1), _seq(c, [7, 8, 9, 10], 2)
    runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=0, count=10, sample=False),
                                    Chunk(seq=sc, start=0, count=5, sample=False)]))
    heads: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: heads.append(args[0].shape[0]))
    logits = runner.execute(StepPlan(chunks=[
        Chunk(seq=sa, start=10, count=1, sample=True),  # a decode
        Chunk(seq=sb, start=0, count=9, sample=True),  # a whole prompt
        Chunk(seq=sc, start=5, count=6, sample=False),  # a middle chunk: no logits
    ]))
    hook.remove()
    assert heads == [2]  # the head runs on the sampled tokens only
    assert logits.shape == (2, tiny.VOCAB) and logits.dtype == torch.float32
    assert rel_err(logits[0], _last_logits(model, a)) < 1e-5
    assert rel_err(logits[1], _last_logits(model, b)) < 1e-5
    last = runner.execute(StepPlan(chunks=[Chunk(seq=sc, start=11, count=3, sample=True)]))
    assert rel_err(last[0], _last_logits(model, c)) < 1e-5


def test_copy_on_write_blocks_are_copied_before_the_forward() -> None:
    model = tiny.llama()
    runner = _runner(model)
    shared = tiny.tokens(seed=4, batch=1, length=10)[0].tolist()
    parent = _seq(shared, [1, 2, 3])
    runner.execute(StepPlan(chunks=[Chunk(seq=parent, start=0, count=10, sample=True)]))
    child_tokens = [*shared, 5, 6, 7]  # positions 8, 9 sit in the shared partial block 3
    child = _seq(child_tokens, [1, 2, 4, 5], seq_id=1)
    logits = runner.execute(StepPlan(chunks=[Chunk(seq=child, start=10, count=3, sample=True)], copies=[(3, 4)]))
    assert rel_err(logits[0], _last_logits(model, child_tokens)) < 1e-5
    for cache in (*runner.key_caches, *runner.value_caches):
        assert torch.equal(cache[4, :2], cache[3, :2])
    # Without the copy the child reads zeros at positions 8, 9: the test sees the difference.
    orphan = _seq(child_tokens, [1, 2, 6, 7], seq_id=2)
    wrong = runner.execute(StepPlan(chunks=[Chunk(seq=orphan, start=10, count=3, sample=True)]))
    assert rel_err(wrong[0], _last_logits(model, child_tokens)) > 1e-3


def test_int8_kv_cache_steps_stay_close_to_the_model_and_copy_their_scales() -> None:
    """kv_dtype="int8": the cache holds codes and a scale per (token, head) (splice.kernels.kv_cache); a mixed
    step's logits stay within the 8-bit rounding of the full-precision model's, copy-on-write copies the scales
    too, and the cache takes (D + 4) / (4 D) of fp32's bytes."""
    model = tiny.llama()
    runner = _runner(model, kv_dtype="int8")
    assert runner.key_caches[0].dtype == torch.int8 and runner.key_scales[0].shape == runner.key_caches[0].shape[:3]
    assert runner.nbytes == 2 * 2 * 24 * 4 * 2 * (8 + 4)  # layers x (k, v) x blocks x bs x heads x (codes + scale)
    a, b = (tiny.tokens(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 11), (2, 9)))
    sa, sb = _seq(a, [1, 2, 3], 0), _seq(b, [4, 5, 6], 1)
    runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=0, count=10, sample=False)]))
    logits = runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=10, count=1, sample=True),
                                             Chunk(seq=sb, start=0, count=9, sample=True)]))
    for row, tokens in enumerate((a, b)):
        err = rel_err(logits[row], _last_logits(model, tokens))
        assert 1e-7 < err < 2e-2, err  # rounded, and only by the 8-bit codes
    runner.copy_blocks([(3, 7)])
    assert torch.equal(runner.key_scales[1][7], runner.key_scales[1][3]) and runner.key_scales[1][3].any()
    with pytest.raises(ValueError, match="kv_dtype='fp8': choose one of auto, int8"):
        _runner(model, kv_dtype="fp8")


def test_tokens_route_to_their_sequences_lora_adapter() -> None:
    model = tiny.llama()
    for name in ("a", "b"):
        add_lora(model, LoraConfig(name=name, rank=4, targets="all-linear"))
    tiny.randomize_lora(model, seed=5)
    runner = _runner(model)
    prompts = [tiny.tokens(seed=s, batch=1, length=7 + s)[0].tolist() for s in range(3)]
    names = ["a", None, "b"]
    seqs = [_seq(p, [1 + 3 * i, 2 + 3 * i, 3 + 3 * i], i, adapter=n) for i, (p, n) in enumerate(zip(prompts, names))]
    plan = StepPlan(chunks=[Chunk(seq=s, start=0, count=len(s.tokens), sample=True) for s in seqs])
    logits = runner.execute(plan, rows=RowAdapters.of(model, ["a", "b"]))
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        with use_adapters(model, [name]):
            want = _last_logits(model, prompt)
        assert rel_err(logits[row], want) < 1e-5, name
    with use_adapters(model, ["a"]):
        assert rel_err(logits[1], _last_logits(model, prompts[1])) > 1e-3  # adapters do change the output


def test_cache_size_and_buckets() -> None:
    runner = ModelRunner(tiny.llama(), block_size=16, max_seqs=3, max_len=40, cuda_graphs=False)
    assert runner.num_blocks == 3 * 3 + 1  # max_seqs x ceil(max_len / block_size) + the scratch block
    assert runner.key_caches[0].shape == (10, 16, 2, 8)
    assert runner.nbytes == 2 * 2 * 10 * 16 * 2 * 8 * 4  # layers x (k, v) x blocks x bs x heads x dim x fp32
    assert _buckets(1) == [1] and _buckets(8) == [1, 2, 4, 8] and _buckets(20) == [1, 2, 4, 8, 16, 20]
    # steps with prefill chunks: powers of two to 256, multiples of 256 to 4,096, then of 512, the budget last
    assert _token_buckets(40) == [16, 32, 40] and _token_buckets(1000) == [16, 32, 64, 128, 256, 512, 768, 1000]
    assert _token_buckets(5000)[-6:] == [3328, 3584, 3840, 4096, 4608, 5000]


def test_decode_steps_take_the_smallest_context_bucket_of_their_longest_sequence() -> None:
    runner = ModelRunner(tiny.llama(), block_size=16, max_seqs=4, max_len=2000, num_blocks=8, cuda_graphs=False)
    assert _context_buckets(2000) == [128, 1024, 2000] and _context_buckets(64) == [64]

    def decode(*lengths: int) -> tuple[int, int, int] | None:  # sequences with `lengths` tokens, this one included
        return runner._bucket([Chunk(seq=_seq([1] * n, [1]), start=n - 1, count=1, sample=True) for n in lengths])

    assert decode(5) == (1, 1, 128) and decode(128, 3) == (2, 2, 128) and decode(129) == (1, 1, 1024)
    assert decode(7, 1024, 9) == (4, 4, 1024) and decode(1025) == (1, 1, 2000) and decode(2000) == (1, 1, 2000)


def test_only_decode_buckets_have_one_token_a_sequence() -> None:
    """A mixed step's bucket never has tokens == sequences: that shape marks a decode graph (decode tiles)."""
    runner = ModelRunner(tiny.llama(), block_size=4, max_seqs=15, max_len=64, cuda_graphs=False)
    mixed = [(t, runner._mixed_seqs(t)) for t in (1, 2, 15, 16, 17, 32, 64, 512)]
    assert (16, 15 + 1 + 1) in mixed  # 15 sequences + 1 padding sequence would equal its 16 tokens
    assert all(seqs != tokens for tokens, seqs in mixed)


def test_padding_a_step_to_a_graph_bucket_leaves_its_logits_unchanged() -> None:
    model = tiny.llama()
    runner = _runner(model)
    a, b = (tiny.tokens(seed=s, batch=1, length=n)[0].tolist() for s, n in ((5, 9), (6, 7)))
    sa, sb = _seq(a, [1, 2, 3], 0), _seq(b, [4, 5], 1)
    runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=0, count=8, sample=False)]))
    chunks = [Chunk(seq=sa, start=8, count=1, sample=True), Chunk(seq=sb, start=0, count=7, sample=True)]
    eager = runner._forward(runner._eager_inputs(chunks))
    staging = runner._staging(tokens=90, seqs=6)
    for tokens, seqs in ((8, 2), (16, 6), (90, 4)):  # no padding; 8 padding tokens as 1-token sequences
        # and 2 empty ones; 82 padding tokens over 2 sequences (41 each: 11 blocks of the scratch block)
        padded = runner._forward(staging.fill(chunks, tokens_to=tokens, seqs_to=seqs))
        assert padded.shape[0] == (seqs if seqs > 2 else 2)
        assert rel_err(padded[:2], eager) < 1e-6, (tokens, seqs)  # (matmuls of another M may round apart)
    assert rel_err(eager[1], _last_logits(model, b)) < 1e-5
    assert all(not cache[10:].any() for cache in runner.key_caches)  # padding touched no other block


def _graph_run(model: nn.Module, *, graphs: bool) -> torch.Tensor:
    """Logits of every step of a fixed schedule: prefills in chunks mixed with decodes, then decodes
    (3 sequences: a bucket of 4 padded by one), with fixed next tokens so both runs see the same
    sequences whatever the near-ties of the random model."""
    runner = _runner(model, cuda_graphs=graphs, max_seqs=4, num_blocks=40, max_tokens=32)
    prompts = [tiny.tokens(seed=s, batch=1, length=5 + 7 * s)[0].tolist() for s in range(3)]
    seqs = [_seq(p, list(range(1 + 8 * i, 9 + 8 * i)), i) for i, p in enumerate(prompts)]
    # (a replayed graph's logits live in its static output until the next step: copy them at once)
    steps = [runner.execute(StepPlan(chunks=[Chunk(seq=seqs[0], start=0, count=5, sample=True),
                                             Chunk(seq=seqs[1], start=0, count=6, sample=False)])).clone()]
    seqs[0].tokens.append(3)
    steps.append(runner.execute(StepPlan(chunks=[Chunk(seq=seqs[0], start=5, count=1, sample=True),
                                                 Chunk(seq=seqs[1], start=6, count=6, sample=True),
                                                 Chunk(seq=seqs[2], start=0, count=19, sample=True)])).clone())
    for step in range(6):
        for row, s in enumerate(seqs):
            s.tokens.append(7 + 5 * row + 3 * step)
        chunks = [Chunk(seq=s, start=len(s.tokens) - 1, count=1, sample=True) for s in seqs]
        steps.append(runner.execute(StepPlan(chunks=chunks)).clone())
    assert runner.graph_failure is None
    if graphs:  # two token buckets (16 and 32 tokens) and the decode bucket of 4
        assert sorted(key[:2] for key in runner._graphs) == [(4, 4), (16, 5), (32, 5)]
    logits = torch.cat(steps)
    for row, s in enumerate(seqs):  # the last step's logits are those of the sequence without its new token
        assert rel_err(_last_logits(model, s.tokens).cuda(), steps[-1][row]) < 1e-4
    return logits


@GPU
def test_cuda_graphs_of_prefill_and_decode_steps_match_eager() -> None:
    model = tiny.llama().cuda()
    twin = copy.deepcopy(model)
    with torch.inference_mode():
        eager, graphed = _graph_run(model, graphs=False), _graph_run(twin, graphs=True)
    assert rel_err(graphed, eager) < 1e-5


@GPU
def test_decode_graphs_of_each_context_bucket_match_eager() -> None:
    """Two sequences decoding from 120 to 136 tokens cross the 128-key bucket: the graph captured for
    128 keys (attention in one pass) and the one for max_len (split and merged) both match eager steps."""
    model = tiny.llama(positions=256).cuda()
    runs = []
    for graphs in (False, True):
        runner = _runner(model, cuda_graphs=graphs, max_len=256, num_blocks=80)
        seqs = [_seq(tiny.tokens(seed=s, batch=1, length=120)[0].tolist(), list(range(1 + 38 * s, 39 + 38 * s)), s)
                for s in range(2)]
        with torch.inference_mode():
            steps = [runner.execute(StepPlan(chunks=[Chunk(seq=s, start=0, count=120, sample=True) for s in seqs])).clone()]
            for step in range(16):
                for row, s in enumerate(seqs):
                    s.tokens.append(3 + 5 * row + step)
                chunks = [Chunk(seq=s, start=len(s.tokens) - 1, count=1, sample=True) for s in seqs]
                steps.append(runner.execute(StepPlan(chunks=chunks)).clone())
        if graphs:
            assert runner.graph_failure is None
            assert sorted(k[:3] for k in runner._graphs if k[0] == k[1]) == [(2, 2, 128), (2, 2, 256)]
        runs.append(torch.cat(steps))
    assert rel_err(runs[1], runs[0]) < 1e-5


@GPU
def test_warmup_captures_every_bucket_before_any_request() -> None:
    runner = _runner(tiny.llama().cuda(), cuda_graphs=True, max_seqs=5, num_blocks=40, max_tokens=40)
    assert runner.token_buckets == [16, 32, 40]
    assert runner.warmup() == len(_buckets(5)) + 3
    assert all(not cache[1:].any() for cache in runner.key_caches)  # padding wrote the scratch block only


@pytest.mark.parametrize("bad", ["gpt2"])
def test_models_the_runner_cannot_run_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        _runner(tiny.gpt2())


def test_the_cpu_runner_keeps_hugging_faces_norms_and_mlp() -> None:
    model = tiny.llama()
    _runner(model)
    assert not any(is_fast(m) for m in model.modules())  # the CPU path is the reference


@GPU
def test_fused_bf16_steps_match_the_unfused_model() -> None:
    model = tiny.llama().to(device="cuda", dtype=torch.bfloat16)  # (llama()'s keywords are config fields)
    reference = copy.deepcopy(model)
    runner = _runner(model, cuda_graphs=True)
    assert any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert any(isinstance(m, FusedSwiGLUMLP) for m in model.modules())
    seq = _seq(tiny.tokens(seed=3, batch=1, length=11)[0].tolist(), list(range(1, 17)))
    prefill = runner.execute(StepPlan(chunks=[Chunk(seq=seq, start=0, count=11, sample=True)]))
    seq.tokens.append(int(prefill.argmax()))
    decode = runner.execute(StepPlan(chunks=[Chunk(seq=seq, start=11, count=1, sample=True)]))  # a graph
    assert runner.graph_failure is None and len(runner._graphs) == 2  # a token bucket and a decode bucket
    with torch.no_grad():
        expected = reference(torch.tensor([seq.tokens], device="cuda")).logits[0, -2:].float()
    assert rel_err(prefill[0], expected[0]) < 2e-2
    assert rel_err(decode[0], expected[1]) < 2e-2


def _mixed_steps(runner: ModelRunner, device: str = "cpu") -> torch.Tensor:
    """Logits of two steps: three fresh prompts (one of a single token) and a first chunk, then a decode, the
    chunk's rest (after its cached prefix) and a fresh prompt together."""
    a, b, c, d = (tiny.tokens(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 11), (2, 9), (3, 14), (4, 1)))
    sa, sb, sc, sd = _seq(a, [1, 2, 3], 0), _seq(b, [4, 5, 6], 1), _seq(c, [7, 8, 9, 10], 2), _seq(d, [11], 3)
    first = runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=0, count=10, sample=True),
                                            Chunk(seq=sc, start=0, count=5, sample=False),
                                            Chunk(seq=sd, start=0, count=1, sample=True)])).clone()
    second = runner.execute(StepPlan(chunks=[Chunk(seq=sa, start=10, count=1, sample=True),
                                             Chunk(seq=sc, start=5, count=9, sample=True),
                                             Chunk(seq=sb, start=0, count=9, sample=True)])).clone()
    for row, tokens in enumerate((a, c, b)):
        assert rel_err(second[row], _last_logits(runner.model, tokens).to(device)) < (1e-5 if device == "cpu" else 2e-2)
    return torch.cat([first, second])


def test_fresh_prompts_through_dense_attention_give_the_paged_steps_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """fresh_attention="dense": prompts with no cached prefix attend over the step's own K/V (splice's varlen
    attention: its reference off the GPU), the paged kernel serves the rest; the same logits as
    fresh_attention="paged"."""
    import splice.engine.attention as attention

    calls: list[int] = []
    real = attention.varlen_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    model = tiny.llama()
    paged = _mixed_steps(_runner(model))
    monkeypatch.setattr(attention, "varlen_attention", counted)
    assert not calls
    dense = _mixed_steps(_runner(copy.deepcopy(model), fresh_attention="dense"))
    assert len(calls) == 2 * 2  # two steps with prompts x two layers
    assert rel_err(dense, paged) < 1e-6


def test_a_bad_fresh_attention_choice_gets_one_line() -> None:
    with pytest.raises(ValueError, match="fresh_attention='flash': choose paged or dense"):
        _runner(tiny.llama(), fresh_attention="flash")
    with pytest.raises(ValueError, match="with kv_dtype='int8' keep fresh_attention='paged'"):
        _runner(tiny.llama(), fresh_attention="dense", kv_dtype="int8")


@GPU
def test_fresh_prompts_through_varlen_match_the_paged_kernel_in_cuda_graphs() -> None:
    """On a GPU, bf16 heads of 64: the varlen kernel for fresh prompts, eager and in the prefill graphs."""
    model = tiny.llama(hidden=256, intermediate=512).to(device="cuda", dtype=torch.bfloat16)
    paged = _mixed_steps(_runner(copy.deepcopy(model), cuda_graphs=True), "cuda")
    for graphs in (False, True):
        runner = _runner(copy.deepcopy(model), cuda_graphs=graphs, fresh_attention="dense")
        assert runner.fresh and runner.graph_failure is None
        assert rel_err(_mixed_steps(runner, "cuda"), paged) < 1e-2
