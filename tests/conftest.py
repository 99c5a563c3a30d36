"""Shared fixtures: a tiny offline tokenizer and tiny random-init models (fp32, CPU, seed 0).

``tiny_tokenizer`` is a real byte-level BPE (GPT-2 / SmolLM2 style) built in code: 3 special
tokens (ids 0-2 as in SmolLM2), the 256 byte symbols and a few merges, with SmolLM2's ChatML chat
template; eos = ``<|im_end|>``, pad = ``<|endoftext|>``. Any text encodes, nothing is downloaded.

Tests marked ``@pytest.mark.slow`` (the real SmolLM2 load) run only with ``pytest --runslow``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges in order; each result is also a vocab entry. "Ġ" is the byte-level symbol for a space.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("r", "e"), ("d", "e"), ("de", "f"),
    ("re", "t"), ("u", "r"), ("ret", "ur"), ("retur", "n"), ("Ġ", "return"),
    ("a", "m"), ("n", "am"), ("nam", "e"), ("Ċ", "Ġ"), ("ĊĠ", "Ġ"),
]
CHAT_TEMPLATE = (  # SmolLM2-Instruct's template (ChatML with a default system message)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow test (e.g. loads the real SmolLM2); needs --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level BPE tokenizer described in the module docstring (deterministic)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    vocab_size: int, *, attn_implementation: str = "sdpa", seed: int = 0, tie_word_embeddings: bool = False
) -> LlamaForCausalLM:
    """Random-init Llama: hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64, fp32, train mode off."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
    )
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).to(torch.float32).eval()


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tiny byte-level BPE tokenizer with a chat template (see module docstring)."""
    return build_tiny_tokenizer()


@pytest.fixture
def make_tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> Callable[..., LlamaForCausalLM]:
    """Factory: ``make_tiny_llama(attn_implementation="eager", seed=1)``; vocab = the tokenizer's."""

    def make(
        *, attn_implementation: str = "sdpa", seed: int = 0, tie_word_embeddings: bool = False
    ) -> LlamaForCausalLM:
        return build_tiny_llama(
            len(tiny_tokenizer), attn_implementation=attn_implementation, seed=seed,
            tie_word_embeddings=tie_word_embeddings,
        )

    return make


@pytest.fixture
def tiny_llama(make_tiny_llama: Callable[..., LlamaForCausalLM]) -> LlamaForCausalLM:
    """A fresh random-init tiny Llama (sdpa, seed 0, eval mode) matching ``tiny_tokenizer``."""
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2(tiny_tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A fresh random-init tiny GPT-2 (n_embd 32, 2 layers, 4 heads, seed 0) matching ``tiny_tokenizer``."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(config).to(torch.float32).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """``tiny_llama`` + ``tiny_tokenizer`` saved as a Hugging Face folder (safetensors)."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
