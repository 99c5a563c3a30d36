"""splice.generation.generate: prompts through the engine against the slow full-recompute loop
(tests/tiny.greedy_loop) and transformers' own generate; LoRA rows, stops, EOS, sampling seeds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from splice.generation.generate import generate
from splice.lora.apply import adapters_disabled, add_lora, lora_modules, merge
from splice.lora.layers import LoraConfig
from tests import tiny

VOCAB = 128
PROMPTS = ["Hello there", "A", "The quick brown fox", "xyz 123"]


def _tokenizer() -> PreTrainedTokenizerFast:
    """Char-level: 3 specials, printable ASCII, 30 Latin-1 chars = 128 ids, decode = concatenation."""
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 191)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level with SentencePiece-style "▁" word starts: decode(ids) alone drops a leading space."""
    words = ["▁hello", "▁world", "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: "€" is 3 tokens, so a character can straddle tokens."""
    vocab = {"<pad>": 0, "<eos>": 1}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


TOKENIZER = _tokenizer()


def _llama(vocab_size: int = VOCAB) -> LlamaForCausalLM:
    return tiny.llama(vocab=vocab_size, bos_token_id=None, eos_token_id=1, pad_token_id=0,
                      initializer_range=0.2)


def _ids(texts: list[str]) -> list[list[int]]:
    return [TOKENIZER(t)["input_ids"] for t in texts]


def _reference(model: nn.Module, texts: list[str], n: int, eos: tuple[int, ...] = (1,)) -> list[list[int]]:
    return [tiny.greedy_loop(model, ids, n, eos) for ids in _ids(texts)]


def _text(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def _hf_greedy(model: nn.Module, prompt_ids: list[list[int]], n: int, eos: int) -> list[list[int]]:
    """transformers' own greedy generate on left-padded prompts, cut at the first EOS."""
    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
        eos_token_id=eos, pad_token_id=0,
    )
    rows = [row[width:].tolist() for row in out]
    return [row[: row.index(eos)] if eos in row else row for row in rows]


class StepCounter:
    """Counts model steps (calls of the input embedding: one per engine step or HF forward) and
    records the first decoder layer's mode (its input norm's: the engine calls the layer's parts) and the
    inference-mode state in each."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.seen: list[tuple[bool, bool]] = []
        model.get_input_embeddings().register_forward_pre_hook(self._count)
        model.model.layers[0].input_layernorm.register_forward_pre_hook(self._record)

    def _count(self, module: nn.Module, args: Any) -> None:
        self.calls += 1

    def _record(self, module: nn.Module, args: Any) -> None:
        self.seen.append((module.training, torch.is_inference_mode_enabled()))


# ---- greedy decoding --------------------------------------------------------------------------


def test_greedy_matches_the_recompute_loop_and_transformers_generate() -> None:
    model = _llama()
    reference = _reference(model, PROMPTS, 20)
    assert reference == _hf_greedy(model, _ids(PROMPTS), 20, eos=1)
    assert all(len(row) >= 5 for row in reference)  # the comparison covers real continuations
    texts = generate(model, TOKENIZER, PROMPTS, max_new_tokens=20)
    assert texts == [_text(row) for row in reference]


def test_batch_size_does_not_change_the_output() -> None:
    model = _llama()
    single = [generate(model, TOKENIZER, p, max_new_tokens=16)[0] for p in PROMPTS]
    assert single == [_text(row) for row in _reference(model, PROMPTS, 16)]
    for batch_size in (4, 3, 1):
        assert generate(model, TOKENIZER, PROMPTS, max_new_tokens=16, batch_size=batch_size) == single


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_lora_model_generates_like_the_merged_model(targets: Any) -> None:
    model = _llama()
    base_out = generate(model, TOKENIZER, PROMPTS, max_new_tokens=16)
    add_lora(model, LoraConfig(rank=4, targets=targets))
    g = torch.Generator().manual_seed(5)
    for _, _, layer in lora_modules(model):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
    lora_out = generate(model, TOKENIZER, PROMPTS, max_new_tokens=16)
    merged = copy.deepcopy(model)
    merge(merged, unload=True)
    assert lora_out == generate(merged, TOKENIZER, PROMPTS, max_new_tokens=16)
    assert lora_out == [_text(row) for row in _reference(merged, PROMPTS, 16)]
    assert lora_out != base_out  # the adapters are live during generation
    with adapters_disabled(model):  # the caller's context applies inside generate
        assert generate(model, TOKENIZER, PROMPTS, max_new_tokens=16) == base_out


@pytest.mark.parametrize(
    ("make_tokenizer", "prompts"),
    [
        (_tokenizer, PROMPTS),
        (_metaspace_tokenizer, ["hello world", "the cat sat"]),
        (_byte_tokenizer, ["héllo €", "wörld"]),
    ],
    ids=["chars", "metaspace", "bytes"],
)
def test_continuation_text_joins_the_prompt_exactly(
    make_tokenizer: Callable[[], Any], prompts: list[str]
) -> None:
    tokenizer = make_tokenizer()
    model = _llama(len(tokenizer))
    model.generation_config.eos_token_id = None
    texts = generate(model, tokenizer, prompts, max_new_tokens=12)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        new = tiny.greedy_loop(model, ids, 12, eos=(tokenizer.eos_token_id,))
        assert tokenizer.decode(ids) == prompt and len(new) == 12
        assert prompt + text == tokenizer.decode(ids + new, skip_special_tokens=True)
    if make_tokenizer is _metaspace_tokenizer:  # decoding the new ids alone would lose this space
        assert all(text.startswith(" ") for text in texts)


# ---- ends of rows ---------------------------------------------------------------------------


def test_stop_strings_cut_the_text_and_end_the_row() -> None:
    model = _llama()
    full = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24)
    stop = full[0][5:7]
    assert len(full[0]) == 24 and full[0].index(stop) <= 5
    counter = StepCounter(model)
    cut = generate(model, TOKENIZER, PROMPTS[:1], max_new_tokens=24, stop=[stop, "never-seen"])
    assert cut == [full[0][: full[0].index(stop)]]
    assert counter.calls == full[0].index(stop) + len(stop)  # stopped right after the stop string
    # In a batch, only the rows that hit the stop string end early.
    batch = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24, stop=stop)
    assert batch == [text[: text.index(stop)] if stop in text else text for text in full]


def test_eos_from_generation_config_list_ends_rows_early() -> None:
    model = _llama()
    full = _reference(model, PROMPTS, 24)
    eos = full[0][4]  # a token the first row produces at step 4
    model.generation_config.eos_token_id = [1, eos]
    counter = StepCounter(model)
    texts = generate(model, TOKENIZER, PROMPTS[:1], max_new_tokens=24)
    first = full[0].index(eos)
    assert texts == [_text(full[0][:first])]
    assert counter.calls == first + 1
    batched = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24)
    assert batched == [_text(row[: row.index(eos)] if eos in row else row) for row in full]


# ---- sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_whatever_the_batch() -> None:
    model = _llama()
    kw: dict[str, Any] = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = generate(model, TOKENIZER, PROMPTS, seed=123, **kw)
    assert generate(model, TOKENIZER, PROMPTS, seed=123, **kw) == first
    assert generate(model, TOKENIZER, PROMPTS, seed=123, batch_size=1, **kw) == first
    assert generate(model, TOKENIZER, PROMPTS, seed=124, **kw) != first
    assert first != generate(model, TOKENIZER, PROMPTS, max_new_tokens=10)  # not greedy
    assert len(set(generate(model, TOKENIZER, ["A"] * 4, seed=123, **kw))) > 1  # rows draw their own
    greedy = generate(model, TOKENIZER, PROMPTS, max_new_tokens=10)
    assert generate(model, TOKENIZER, PROMPTS, max_new_tokens=10, temperature=1e-40, seed=2**70) == greedy


def test_runs_in_eval_and_inference_mode_and_restores_training() -> None:
    model = _llama().train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    counter = StepCounter(model)
    generate(model, TOKENIZER, "Hi", max_new_tokens=3)
    assert counter.seen == [(False, True)] * 3
    assert model.training and model.lm_head.training and not model.model.layers[1].training
    assert model.model.layers[0].training


def test_zero_new_tokens_and_bad_inputs_fail_before_any_step() -> None:
    model = _llama()
    add_lora(model, LoraConfig(rank=4, name="a"))
    counter = StepCounter(model)
    assert generate(model, TOKENIZER, ["a", "b"], max_new_tokens=0) == ["", ""]
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate(model, TOKENIZER, ["ok", ""])
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, TOKENIZER, "a", stop=[""])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(model, TOKENIZER, "a", batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, TOKENIZER, "a", max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        generate(model, TOKENIZER, "a", temperature=-1.0)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['c'\]: the model has \['a'\]"):
        generate(model, TOKENIZER, ["a", "b"], adapters=["a", "c"])
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, TOKENIZER, ["a", "b"], adapters=["a"])
    with pytest.raises(ValueError, match="kv_dtype='fp8': choose one of auto, int8"):
        generate(model, TOKENIZER, "a", kv_cache="fp8")
    assert counter.calls == 0


def test_an_int8_kv_cache_keeps_the_greedy_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """kv_cache="int8" (codes + a scale per token and head): the engine's caches are int8, and the tiny model's
    greedy rows come out as with its own dtype's cache (each K/V entry within half a step of its vector's range
    moves no argmax here)."""
    import splice.generation.generate as module

    caches: list[torch.dtype] = []

    class Recording(module.Engine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            caches.append(self.runner.key_caches[0].dtype)

    monkeypatch.setattr(module, "Engine", Recording)
    model = _llama()
    assert generate(model, TOKENIZER, PROMPTS, max_new_tokens=20, kv_cache="int8") == [
        _text(row) for row in _reference(model, PROMPTS, 20)]
    generate(model, TOKENIZER, PROMPTS[:1], max_new_tokens=2)
    assert caches == [torch.int8, torch.float32]


def test_models_the_engine_cannot_run_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel has none of their attention modules"):
        generate(tiny.gpt2(vocab=VOCAB), TOKENIZER, "a", max_new_tokens=2)


# ---- several adapters -------------------------------------------------------------------------


def _with_adapter(model: nn.Module, name: str, seed: int) -> None:
    add_lora(model, LoraConfig(rank=4, targets="all-linear", name=name))
    g = torch.Generator().manual_seed(seed)
    for _, _, layer in lora_modules(model, name=name):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)


def test_one_batch_serves_several_adapters() -> None:
    prompts = PROMPTS[:3]
    solo_a, solo_b = _llama(), _llama()
    _with_adapter(solo_a, "a", seed=1)
    _with_adapter(solo_b, "b", seed=2)
    both = _llama()
    _with_adapter(both, "a", seed=1)
    _with_adapter(both, "b", seed=2)
    expected = [_text(row) for row in (
        _reference(solo_a, prompts[:1], 12)[0], _reference(solo_b, prompts[1:2], 12)[0],
        _reference(_llama(), prompts[2:], 12)[0])]
    mixed = generate(both, TOKENIZER, prompts, max_new_tokens=12, adapters=["a", "b", None])
    assert mixed == expected
    assert len(set(expected)) == 3  # the three rows really differ
    assert generate(both, TOKENIZER, prompts, max_new_tokens=12, adapters=["a", "b", None], batch_size=1) == mixed


def test_a_prompt_over_the_context_is_refused_before_any_work(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The server's context limit holds in the Python API too: one line naming the prompt and the fix."""
    model = tiny.llama(vocab=len(tiny_tokenizer), positions=64)
    fits, long = "ab " * 5, "ab " * 80
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens; with max_new_tokens=8 that is over the "
                                         r"model's context of 64 tokens"):
        generate(model, tiny_tokenizer, [fits, long], max_new_tokens=8)
    assert len(generate(model, tiny_tokenizer, [fits], max_new_tokens=8)) == 1
