"""splice.lora.routing: per-call adapter routing is data of the call, not state on the modules."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from splice.generation.generate import generate
from splice.lora.apply import adapters_disabled, add_lora, lora_modules, use_adapters
from splice.lora.layers import LoraConfig
from splice.lora.routing import Route, current_route, routed
from tests import tiny

PROMPTS = ["hello world", "the cat", "a b c d e", "xyz"]


def _two_adapter_model(model: torch.nn.Module | None = None) -> torch.nn.Module:
    model = model if model is not None else tiny.llama()
    add_lora(model, LoraConfig(name="first", targets=("q_proj", "v_proj")))
    add_lora(model, LoraConfig(name="second", targets=("v_proj", "down_proj"), rank=4))
    tiny.randomize_lora(model, seed=5)
    return model


def _run_together(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` in threads released at once by a barrier; their results in order."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = jobs[i]()
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.interpreter_limit("threads")
def test_two_threads_generating_with_different_adapters_match_each_alone(
    tiny_tokenizer: Any, tiny_llama: torch.nn.Module
) -> None:
    model = _two_adapter_model(tiny_llama)
    kwargs: dict[str, Any] = dict(max_new_tokens=12, batch_size=2)

    def run(name: str | None) -> list[str]:
        return generate(model, tiny_tokenizer, PROMPTS, adapters=[name] * len(PROMPTS), **kwargs)

    alone = {name: run(name) for name in ("first", "second", None)}
    assert alone["first"] != alone["second"] != alone[None]  # the adapters do change the answer
    for _ in range(3):
        together = _run_together([lambda: run("first"), lambda: run("second"), lambda: run(None)])
        assert together == [alone["first"], alone["second"], alone[None]]


def test_disabling_in_one_thread_leaves_another_thread_adapted() -> None:
    model = _two_adapter_model()
    ids = tiny.tokens(batch=2)
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_disabled(model):
            base = model(ids).logits
    entered, release = threading.Event(), threading.Event()

    def disabled() -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(model):
            entered.set()
            release.wait(10)
            return model(ids).logits

    def plain() -> torch.Tensor:
        entered.wait(10)
        with torch.no_grad():
            out = model(ids).logits  # while the other thread is inside adapters_disabled
        release.set()
        return out

    got_base, got_adapted = _run_together([disabled, plain])
    torch.testing.assert_close(got_base, base, rtol=0, atol=0)
    torch.testing.assert_close(got_adapted, adapted, rtol=0, atol=0)
    assert not torch.equal(base, adapted)


def test_routing_is_scoped_to_the_block_and_nests() -> None:
    model = _two_adapter_model()
    layers = [layer for _, _, layer in lora_modules(model)]
    assert all(current_route(layer) is None for layer in layers)
    with use_adapters(model, ["first", None]):
        outer = current_route(layers[0])
        assert outer is not None and outer.rows == ("first", None)
        with adapters_disabled(model):
            inner = current_route(layers[0])
            assert inner is not None and inner.disabled
        assert current_route(layers[0]) is outer
    assert all(current_route(layer) is None for layer in layers)
    assert not any(hasattr(layer, "row_mask") or hasattr(layer, "enabled") for layer in layers)


def test_each_row_matches_a_model_with_only_its_adapter() -> None:
    model = _two_adapter_model()
    ids = tiny.tokens(batch=3)
    rows = ["second", None, "first"]
    with torch.no_grad(), use_adapters(model, rows):
        mixed = model(ids).logits
    for i, name in enumerate(rows):
        with torch.no_grad(), use_adapters(model, [name] * 3):
            alone = model(ids).logits
        torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)


def test_a_batch_of_the_wrong_size_names_the_fix() -> None:
    model = _two_adapter_model()
    layers = [layer for _, _, layer in lora_modules(model)]
    with routed(layers, Route(rows=("first",))), pytest.raises(ValueError, match="one adapter name per batch row"):
        model(tiny.tokens(batch=2))
