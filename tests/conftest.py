"""Shared fixtures (the builders live in tests/tiny.py): a tiny offline tokenizer and tiny random-init models (fp32, CPU, seed 0).

``tiny_tokenizer`` is a real byte-level BPE (GPT-2 / SmolLM2 style) built in code: 3 special
tokens (ids 0-2 as in SmolLM2), the 256 byte symbols and a few merges, with SmolLM2's ChatML chat
template; eos = ``<|im_end|>``, pad = ``<|endoftext|>``. Any text encodes, nothing is downloaded.

Tests marked ``@pytest.mark.slow`` (the real SmolLM2 load) run only with ``pytest --runslow``.

Under Triton's interpreter (``TRITON_INTERPRET=1`` with Triton importable: ``make test-kernels-interpreted``)
the cases that hit one of its known limits are skipped here, and only here, with the reason from
``tests.numerics.INTERPRETER_LIMITS``: those marked ``@pytest.mark.interpreter_limit(name, ...)``, and those
that fail after the interpreter took a tl.dot of bf16 operands (``tests.numerics.Bf16Dots``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.numerics import INTERPRETED, INTERPRETER_LIMITS, Bf16Dots
from tests.tiny import build_tiny_llama, build_tiny_tokenizer, write_run_inputs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow test (e.g. loads the real SmolLM2); needs --runslow")
    config.addinivalue_line(
        "markers", "interpreter_limit(*names): skipped under Triton's interpreter, which computes this case unlike "
        f"a GPU; names from tests.numerics.INTERPRETER_LIMITS: {', '.join(INTERPRETER_LIMITS)}")
    if INTERPRETED:
        Bf16Dots.watch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("interpreter_limit"):
            unknown = [name for name in mark.args if name not in INTERPRETER_LIMITS]
            if unknown or not mark.args:
                raise pytest.UsageError(f"{item.nodeid}: interpreter_limit{mark.args}: name one or more of "
                                        f"{', '.join(INTERPRETER_LIMITS)}")
            if INTERPRETED:
                item.add_marker(pytest.mark.skip(reason="; ".join(INTERPRETER_LIMITS[n] for n in mark.args)))
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    Bf16Dots.count = 0


# The GPU runs pytest -n 8: eight processes share one card, and PyTorch's caching allocator keeps whatever a
# test freed reserved for its own process. A test that held tens of GiB (an engine's default KV cache takes 80%
# of the free memory; the >2**31-element varlen test ~25 GiB) would starve the other seven for the rest of the
# run, so such a reservation goes back to the driver after the test (dead engines can sit in reference cycles:
# collected first).
_HANDED_BACK_ABOVE = 4 << 30


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized() \
            and torch.cuda.memory_reserved() > _HANDED_BACK_ABOVE:
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    """Under Triton's interpreter, a test that fails after taking bf16 dots is reported as skipped."""
    report: pytest.TestReport = yield
    if INTERPRETED and report.when == "call" and report.failed and Bf16Dots.count:
        path, line, _ = item.location
        report.outcome = "skipped"
        report.longrepr = (path, (line or 0) + 1, f"Skipped: {INTERPRETER_LIMITS['bf16']} (failed after bf16 dots)")
    return report


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


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, data.jsonl): a tiny Llama with a sharpened head and 48 rows it learns fast."""
    return write_run_inputs(tmp_path_factory.mktemp("tiny"))
