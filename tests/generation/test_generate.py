"""splice.generation.generate: our KV-cached decoding loop against transformers' generate, LoRA and sampling."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from splice.generation.generate import generate, generate_ids, sample_next, top_k_top_p_filter
from splice.lora.apply import add_lora, lora_modules, merge
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


def _gpt2() -> GPT2LMHeadModel:
    return tiny.gpt2(vocab=VOCAB, positions=128, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                     initializer_range=0.2)


MODELS = pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])


def _ids(texts: list[str]) -> list[list[int]]:
    return [TOKENIZER(t)["input_ids"] for t in texts]


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


class ForwardCounter:
    """Counts forward calls of a model and records its mode and inference-mode state."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.seen: list[tuple[bool, bool]] = []
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.calls += 1
        self.seen.append((module.training, torch.is_inference_mode_enabled()))


# ---- sampling -------------------------------------------------------------------------------


def test_top_k_one_and_temperature_zero_are_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    for temperature in (0.3, 1.0, 5.0):
        assert torch.equal(sample_next(logits, temperature=temperature, top_k=1, generator=g), want)
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=7, top_p=0.2), want)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # Probabilities 0.5, 0.3, 0.15, 0.05, scattered over the vocabulary.
    order = torch.tensor([2, 0, 3, 1])
    logits = torch.empty(1, 4)
    logits[0, order] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def kept(**kw: Any) -> list[int]:
        return sorted(torch.isfinite(top_k_top_p_filter(logits, **kw))[0].nonzero().flatten().tolist())

    assert kept(top_p=0.4) == [2]  # the top token alone already reaches 0.4
    assert kept(top_p=0.79) == [0, 2]
    assert kept(top_p=0.81) == [0, 2, 3]
    assert kept(top_p=0.96) == [0, 1, 2, 3] == kept(top_p=1.0)
    assert kept(top_k=3) == [0, 2, 3]
    assert kept(top_k=3, top_p=0.6) == [0, 2]  # top-p on the top-k set: 0.5 < 0.6 <= 0.8
    filtered = top_k_top_p_filter(logits, top_p=0.79)
    assert torch.equal(filtered[0, [2, 0]], logits[0, [2, 0]])  # kept logits are untouched
    g = torch.Generator().manual_seed(2)
    draws = sample_next(logits.expand(4000, 4), temperature=1.0, top_p=0.79, generator=g)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[1] == 0 and counts[3] == 0
    assert abs(counts[2].item() - 0.5 / 0.8) < 0.03


def test_temperature_scales_the_logits() -> None:
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(3))
    for temperature in (0.5, 2.0):
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        got = sample_next(logits.expand(20000, 6), temperature=temperature, generator=g1)
        probs = (logits / temperature).softmax(-1)[0]
        want = torch.multinomial(probs.expand(20000, 6), 1, generator=g2).squeeze(-1)
        assert torch.equal(got, want)  # exactly torch.multinomial(softmax(logits / T))
        freq = torch.bincount(got, minlength=6).float() / 20000
        torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)


def test_bad_sampling_options_are_named() -> None:
    logits = torch.zeros(1, 4)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            sample_next(logits, temperature=temperature)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sample_next(logits, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        sample_next(logits, temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match=r"logits must be \(batch, vocab\)"):
        sample_next(logits[0], temperature=1.0)


# ---- decoding loop --------------------------------------------------------------------------


@MODELS
def test_greedy_matches_transformers_generate(make: Callable[[], nn.Module]) -> None:
    model = make()
    prompt_ids = _ids(PROMPTS)
    ours = generate_ids(model, prompt_ids, max_new_tokens=20, eos_token_ids=[1])
    assert ours == _hf_greedy(model, prompt_ids, 20, eos=1)
    assert all(len(row) >= 5 for row in ours)  # the comparison covers real continuations
    texts = generate(model, TOKENIZER, PROMPTS, max_new_tokens=20)
    assert texts == [TOKENIZER.decode(row) for row in ours]


@MODELS
def test_batched_left_padding_equals_one_by_one(make: Callable[[], nn.Module]) -> None:
    model = make()
    batched = generate(model, TOKENIZER, PROMPTS, max_new_tokens=16, batch_size=4)
    single = [generate(model, TOKENIZER, p, max_new_tokens=16)[0] for p in PROMPTS]
    assert batched == single
    assert generate(model, TOKENIZER, PROMPTS, max_new_tokens=16, batch_size=3) == single


@MODELS
def test_kv_cache_equals_recomputing(make: Callable[[], nn.Module]) -> None:
    model = make()
    prompt_ids = _ids(PROMPTS)
    cached = generate_ids(model, prompt_ids, max_new_tokens=16)
    recomputed = generate_ids(model, prompt_ids, max_new_tokens=16, use_cache=False)
    assert cached == recomputed and all(len(row) == 16 for row in cached)


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
    assert lora_out != base_out  # the adapters are live during generation


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
    model.generation_config.eos_token_id = None  # run all 12 steps: the ids below are those of generate()
    texts = generate(model, tokenizer, prompts, max_new_tokens=12)
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    new_ids = generate_ids(model, prompt_ids, max_new_tokens=12)
    for prompt, ids, new, text in zip(prompts, prompt_ids, new_ids, texts, strict=True):
        assert tokenizer.decode(ids) == prompt and len(new) == 12
        assert prompt + text == tokenizer.decode(ids + new, skip_special_tokens=True)
    if make_tokenizer is _metaspace_tokenizer:  # decoding the new ids alone would lose this space
        assert all(text.startswith(" ") for text in texts)


def test_stop_strings_cut_the_text_and_end_the_row() -> None:
    model = _llama()
    full = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24)
    stop = full[0][5:7]
    assert len(full[0]) == 24 and full[0].index(stop) <= 5
    counter = ForwardCounter(model)
    cut = generate(model, TOKENIZER, PROMPTS[:1], max_new_tokens=24, stop=[stop, "never-seen"])
    assert cut == [full[0][: full[0].index(stop)]]
    assert counter.calls == full[0].index(stop) + len(stop)  # stopped right after the stop string
    # In a batch, only the rows that hit the stop string end early.
    batch = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24, stop=stop)
    assert batch == [text[: text.index(stop)] if stop in text else text for text in full]


def test_eos_from_generation_config_list_ends_rows_early() -> None:
    model = _llama()
    full = generate_ids(model, _ids(PROMPTS), max_new_tokens=24)
    eos = full[0][4]  # a token the first row produces at step 4
    model.generation_config.eos_token_id = [1, eos]
    counter = ForwardCounter(model)
    texts = generate(model, TOKENIZER, PROMPTS[:1], max_new_tokens=24)
    first = full[0].index(eos)
    assert texts == [TOKENIZER.decode(full[0][:first])]
    assert counter.calls == first + 1
    batched = generate(model, TOKENIZER, PROMPTS, max_new_tokens=24)
    assert batched == [TOKENIZER.decode(row[: row.index(eos)] if eos in row else row) for row in full]


def test_seeded_sampling_is_reproducible() -> None:
    model = _gpt2()
    kw: dict[str, Any] = {"max_new_tokens": 10, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    first = generate(model, TOKENIZER, PROMPTS, seed=123, **kw)
    assert generate(model, TOKENIZER, PROMPTS, seed=123, **kw) == first
    assert generate(model, TOKENIZER, PROMPTS, seed=124, **kw) != first
    assert first != generate(model, TOKENIZER, PROMPTS, max_new_tokens=10)  # not greedy


def test_runs_in_eval_and_inference_mode_and_restores_training() -> None:
    model = _gpt2().train()
    model.transformer.h[0].eval()  # a mixed state must come back as it was
    counter = ForwardCounter(model)
    generate(model, TOKENIZER, "Hi", max_new_tokens=3)
    assert counter.seen == [(False, True)] * 3
    assert model.training and model.lm_head.training and not model.transformer.h[0].training
    assert model.transformer.h[1].training


def test_zero_new_tokens_and_bad_inputs() -> None:
    model = _llama()
    counter = ForwardCounter(model)
    assert generate(model, TOKENIZER, ["a", "b"], max_new_tokens=0) == ["", ""]
    assert counter.calls == 0
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate(model, TOKENIZER, ["ok", ""])
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        generate(model, TOKENIZER, "a", stop=[""])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        generate(model, TOKENIZER, "a", batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, TOKENIZER, "a", max_new_tokens=-1)


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
    expected = [
        generate(solo_a, TOKENIZER, prompts[:1], max_new_tokens=12)[0],
        generate(solo_b, TOKENIZER, prompts[1:2], max_new_tokens=12)[0],
        generate(_llama(), TOKENIZER, prompts[2:], max_new_tokens=12)[0],
    ]
    mixed = generate(both, TOKENIZER, prompts, max_new_tokens=12, adapters=["a", "b", None])
    assert mixed == expected
    assert len(set(expected)) == 3  # the three rows really differ
    with pytest.raises(ValueError, match="unknown adapter"):
        generate(both, TOKENIZER, prompts[:1], adapters=["c"])
    with pytest.raises(ValueError, match="one per prompt"):
        generate(both, TOKENIZER, prompts, adapters=["a"])
