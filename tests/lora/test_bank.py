"""splice.lora.bank: adapters packed per module into slots match the per-adapter path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splice.lora.apply import add_lora, use_adapters
from splice.lora.bank import HostAdapter, LoraBank, add_bank_sites, read_adapter, use_adapter_bank
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.lora.routing import Route, routed
from tests import tiny
from tests.numerics import GPU


def _model() -> torch.nn.Module:
    model = tiny.llama()
    add_lora(model, LoraConfig(name="first", targets=("q_proj", "v_proj"), rank=4))
    add_lora(model, LoraConfig(name="second", targets="all-linear", rank=8, alpha=4.0))
    add_lora(model, LoraConfig(name="emb", targets=("embed_tokens",), rank=2))
    tiny.randomize_lora(model, seed=4)
    return model


@pytest.mark.parametrize("length", [1, 5])
def test_bank_matches_per_adapter_routing_over_ranks_targets_and_base_rows(length: int) -> None:
    model = _model()
    ids = tiny.tokens(batch=5, length=length)
    rows = ["second", None, "first", "emb", "second"]
    with torch.no_grad():
        with use_adapters(model, rows):
            want = model(ids).logits
        with use_adapter_bank(model, rows) as bank:
            got = model(ids).logits
    assert bank.rank == 16 and set(bank.resident) == {"first", "second", "emb"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_host_adapters_served_through_bank_sites_with_lru(tmp_path: Path) -> None:
    trained = {}
    for name, targets, seed in (("a", ("q_proj",), 1), ("b", ("v_proj", "o_proj"), 2), ("c", ("q_proj",), 3)):
        model = tiny.llama()
        add_lora(model, LoraConfig(name=name, targets=targets, rank=4))
        tiny.randomize_lora(model, seed=seed)
        save_adapter(model, tmp_path / name, name=name)
        trained[name] = model
    host = {n: read_adapter(tmp_path / n, name=n) for n in trained}
    assert isinstance(host["a"], HostAdapter) and host["a"].nbytes > 0
    served = tiny.llama()
    paths = sorted({p for h in host.values() for p in h.weights})
    sites = add_bank_sites(served, paths)
    bank = LoraBank.for_sites(served, sites, capacity=2, rank=4, dtype=torch.float32)
    ids = tiny.tokens(batch=2)
    for pair in (("a", "b"), ("c", "a"), ("b", "c")):  # 3 adapters through 2 slots
        for name in pair:
            bank.put(host[name], keep=pair)
        with torch.no_grad(), routed(sites.values(), Route(rows=pair, bank=bank, slots=bank.slots(pair))):
            got = served(ids).logits
        assert set(bank.resident) == set(pair)
        for row, name in enumerate(pair):
            with torch.no_grad():
                want = trained[name](ids).logits[row]
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="in use"):
        bank.put(host["a"], keep=("b", "c"))


@GPU
def test_generate_on_gpu_routes_mixed_batches_through_the_bank(tiny_tokenizer, make_tiny_llama) -> None:
    from splice.generation.generate import generate

    model = make_tiny_llama()
    add_lora(model, LoraConfig(name="first", targets=("q_proj", "v_proj"), rank=4))
    add_lora(model, LoraConfig(name="second", targets="all-linear", rank=8))
    tiny.randomize_lora(model, seed=4)
    prompts = ["hello world", "the cat", "a b c", "xyz"]
    rows = ["first", None, "second", "first"]
    want = [generate(model, tiny_tokenizer, p, max_new_tokens=10, adapters=[r])[0] for p, r in zip(prompts, rows)]
    model.cuda()
    assert generate(model, tiny_tokenizer, prompts, max_new_tokens=10, adapters=rows) == want
