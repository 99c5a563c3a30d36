"""Text generation for a list of prompts: an offline run of the generation engine.

:func:`generate` builds an :class:`~splice.engine.engine.Engine` for the call (a paged KV cache sized
for ``batch_size`` sequences of the longest prompt plus ``max_new_tokens``) and runs it in the
calling thread, so context such as :func:`splice.lora.apply.adapters_disabled` applies. The engine
keeps up to ``batch_size`` prompts running at once (continuous batching: a finished row's place
goes to the next prompt), each row computing exactly what it would alone. Rows finish at an EOS
token, at a stop string (the text is cut before it) or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from splice.core.progress import progress
from splice.engine.engine import Engine, Request
from splice.engine.sampling import SamplingParams, check_sampling
from splice.kernels.kv_cache import check_kv_dtype
from splice.lora.apply import adapter_names

__all__ = ["generate"]

_BLOCK = 16  # KV block size (tokens) of the call's engine
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads one seed over the rows (the golden-ratio constant)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    encoded = []
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise ValueError(
                    f"prompt {i} ({text!r}) encodes to no tokens and the tokenizer has no BOS "
                    "token: give every prompt some text"
                )
            ids = [bos]
        encoded.append(ids)
    return encoded


def _check_context(model: nn.Module, encoded: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse, before any work, a prompt whose tokens and ``max_new_tokens`` exceed the model's context
    (the server's limit, applied to the Python API too)."""
    context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 0)
    if not context or not encoded:
        return
    row = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if len(encoded[row]) + max_new_tokens > context:
        raise ValueError(f"prompt {row} has {len(encoded[row])} tokens; with max_new_tokens={max_new_tokens} "
                         f"that is over the model's context of {context} tokens: shorten the prompt or lower "
                         "max_new_tokens")


def _check_adapters(model: nn.Module, adapters: Sequence[str | None] | None, prompts: int) -> None:
    if adapters is None:
        return
    if len(adapters) != prompts:
        raise ValueError(f"{len(adapters)} adapter names for {prompts} prompts: give one per prompt")
    known = adapter_names(model)
    unknown = sorted({a for a in adapters if a is not None} - set(known))
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}: the model has {known}")


def _row_seed(seed: int | None, row: int) -> int | None:
    """Row ``row``'s own seed, derived from the call's ``seed`` (None: fresh entropy per row)."""
    return None if seed is None else (seed + row * _SEED_MIX) % (1 << 63)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    batch_size: int = 8,
    adapters: Sequence[str | None] | None = None,
    kv_cache: str = "auto",
) -> list[str]:
    """The generated continuation of each prompt (prompt excluded), one string per prompt.

    ``adapters`` names the LoRA adapter each prompt runs with (``None``: the base model), so one
    call serves several adapters at once, each row equal to its adapter alone; by default every
    adapter on the model applies.

    Greedy (``argmax``) when ``temperature`` is 0 (or below
    :data:`~splice.engine.sampling.GREEDY_BELOW`); otherwise sampling from
    ``softmax(logits / temperature)`` restricted to the top-k tokens and the top-p nucleus, each
    row from its own generator seeded from ``seed`` (same seed, same output, whatever the batch).
    At most ``batch_size`` prompts run at once. A row stops at an EOS token (the tokenizer's and
    ``model.generation_config``'s, int or list) or when its text contains one of ``stop`` (the text
    is cut before it). A single string prompt still gives a list. Runs in eval mode without
    autograd; the model's training flags are restored afterwards. ``kv_cache="int8"``: the K/V cache as
    8-bit codes with a scale per token and head (:mod:`splice.kernels.kv_cache`: half the bytes a long
    context's decode reads, outputs within its rounding of ``"auto"``'s, the model's dtype).
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("prompts must be a string or a sequence of strings")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_kv_dtype(kv_cache)  # a bad choice: one line before any work
    encoded = _encode(tokenizer, texts)
    _check_context(model, encoded, max_new_tokens)
    _check_adapters(model, adapters, len(texts))
    if not texts or max_new_tokens == 0:
        return [""] * len(texts)

    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=_row_seed(seed, row), stop=stops) for row in range(len(texts))]
    max_len = max(map(len, encoded)) + max_new_tokens
    engine = Engine(model, tokenizer, max_seqs=batch_size, max_len=max_len, token_budget=max(2048, batch_size),
                    block_size=_BLOCK, kv_blocks=batch_size * -(-max_len // _BLOCK) + 1, kv_dtype=kv_cache)
    with progress(desc="generating", total=len(texts), unit="prompt") as bar:

        def done(request: Request) -> None:
            bar.update(1)

        finished = engine.generate(encoded, params, adapters=adapters, on_finish=done)
    return [request.text for request in finished]
