"""Text generation with (LoRA-)rewritten Hugging Face causal LMs: our own KV-cached decoding loop.

Prompts are batched with *left* padding so every row's last prompt token sits in the last column:
one forward over the padded prompts fills the KV cache, then each step feeds one token per row.
Pad positions get ``attention_mask = 0`` and real tokens positions ``0, 1, ...`` counted from each
row's first real token, so a padded row computes what it would alone. Rows finish at an EOS token,
when their decoded text contains a stop string, or after ``max_new_tokens``; the loop ends when all
rows are done. splice rewrites (LoRA wrappers, quantized layers) are ordinary modules here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.progress import progress
from splice.engine.output import eos_ids as _eos_ids
from splice.engine.sampling import check_sampling as _check_sampling
from splice.engine.sampling import sample_next, top_k_top_p_filter
from splice.lora.apply import use_adapters
from splice.lora.bank import use_adapter_bank

__all__ = ["generate", "generate_ids", "sample_next", "top_k_top_p_filter"]

# Decoding a continuation together with this many preceding prompt tokens gives it the right
# leading space (SentencePiece) and completes characters split across the boundary (byte BPE).
_DECODE_CONTEXT = 8


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside; every submodule's own training flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _forward_params(model: nn.Module) -> Collection[str]:
    try:
        return inspect.signature(model.forward).parameters.keys()
    except (TypeError, ValueError):  # builtins / odd wrappers: assume the current HF names
        return ()


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache  # the library's one import of transformers' cache

    config = getattr(model, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


def _left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(B, L) input ids and attention mask, each prompt right-aligned (padding on the left)."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(
                f"prompt {row} has no tokens: give it some text (or a tokenizer that adds BOS)"
            )
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_ids: Collection[int] = (),
    pad_token_id: int = 0,
    use_cache: bool = True,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (one batch, left-padded), EOS excluded.

    Each step draws ``x_t ~ sample_next(model(x_<t)[-1])`` for the unfinished rows. A row finishes
    when it draws a token in ``eos_token_ids`` (not appended), when ``should_stop(row, ids)`` says
    so after a token was appended, or after ``max_new_tokens`` tokens. With ``use_cache`` the
    prompt fills a KV cache and each step feeds one token; without it every step reruns the whole
    sequence (slow, the reference). Runs in eval mode under ``torch.inference_mode()``.
    """
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    generated: list[list[int]] = [[] for _ in prompt_ids]
    if not prompt_ids or max_new_tokens == 0:
        return generated
    device = _device(model)
    input_ids, attention_mask = _left_pad(prompt_ids, pad_token_id, device)
    # Positions count real tokens only; pads get 1 (masked anyway), as transformers does.
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    params = _forward_params(model)
    cache_arg = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
    extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    eos = set(eos_token_ids)
    done = [False] * len(prompt_ids)

    with _eval_mode(model), torch.inference_mode():
        cache = _new_cache(model) if use_cache else None
        step_ids, step_positions = input_ids, position_ids
        for step in range(max_new_tokens):
            if use_cache:
                extra[cache_arg] = cache
            out = model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                use_cache=use_cache,
                **extra,
            )
            next_tokens = sample_next(  # (B,)
                out.logits[:, -1, :],
                temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
            )
            for row, token in enumerate(next_tokens.tolist()):  # host sync: stop checks need ids
                if done[row]:
                    continue
                if token in eos:
                    done[row] = True
                    continue
                generated[row].append(token)
                if should_stop is not None and should_stop(row, generated[row]):
                    done[row] = True
            if all(done) or step == max_new_tokens - 1:
                break
            # Finished rows keep decoding a pad token: cheaper than reshaping the cache.
            fed = next_tokens.masked_fill(torch.tensor(done, device=device), pad_token_id)[:, None]
            new_positions = position_ids[:, -1:] + 1  # (B, 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(fed)], dim=-1)
            input_ids = torch.cat([input_ids, fed], dim=-1)
            position_ids = torch.cat([position_ids, new_positions], dim=-1)
            step_ids, step_positions = (fed, new_positions) if use_cache else (input_ids, position_ids)
    return generated


def _continuation(tokenizer: Any, prompt_ids: Sequence[int], new_ids: list[int]) -> str:
    """The text ``new_ids`` add after the prompt, decoded with a little prompt context."""
    context = list(prompt_ids[-_DECODE_CONTEXT:])
    head = tokenizer.decode(context, skip_special_tokens=True)
    full = tokenizer.decode(context + new_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (excluding) the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


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
    stop: Sequence[str] = (),
    batch_size: int = 8,
    adapters: Sequence[str | None] | None = None,
) -> list[str]:
    """The generated continuation of each prompt (prompt excluded), one string per prompt.

    ``adapters`` names the LoRA adapter each prompt runs with (``None``: the base model), so one
    call serves several adapters at once (see :func:`splice.lora.apply.use_adapters`); by default every
    adapter on the model applies.

    Greedy (``argmax``) when ``temperature == 0``; otherwise sampling from
    ``softmax(logits / temperature)`` restricted to the top-k tokens and the top-p nucleus (see
    :func:`sample_next`), with a ``torch.Generator`` seeded by ``seed`` (same seed, same output).
    Prompts run ``batch_size`` at a time with left padding and a KV cache. A row stops at an EOS
    token (the tokenizer's and ``model.generation_config``'s, int or list) or when its text contains
    one of ``stop`` (the text is cut before it). A single string prompt still gives a list.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("prompts must be a string or a sequence of strings")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")

    eos = _eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:  # padded positions are masked out, so any id will do
        pad = min(eos) if eos else 0
    encoded = _encode(tokenizer, texts)
    if adapters is not None and len(adapters) != len(texts):
        raise ValueError(f"{len(adapters)} adapter names for {len(texts)} prompts: give one per prompt")
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=_device(model)).manual_seed(seed)

    results: list[str] = []
    starts = range(0, len(encoded), batch_size)
    for start in progress(starts, desc="generating", unit="batch", total=len(starts)):
        batch = encoded[start : start + batch_size]

        def hits_stop(row: int, ids: list[int], batch: list[list[int]] = batch) -> bool:
            return _cut_at_stop(_continuation(tokenizer, batch[row], ids), stops)[1]

        # On a GPU a mixed batch runs every row's adapter in one multi-LoRA launch per projection.
        route = use_adapter_bank if _device(model).type == "cuda" else use_adapters
        routing = (route(model, adapters[start : start + batch_size]) if adapters is not None
                   else contextlib.nullcontext())
        with routing:
            new_ids = generate_ids(
                model,
                batch,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                eos_token_ids=eos,
                pad_token_id=pad,
                should_stop=hits_stop if stops else None,
            )
        for prompt_ids, ids in zip(batch, new_ids, strict=True):
            results.append(_cut_at_stop(_continuation(tokenizer, prompt_ids, ids), stops)[0])
    return results
