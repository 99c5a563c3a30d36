"""splice.lora.casts: an engine call's 16-bit copies of fp32 LoRA masters are what a fused projection's
inference forward reads, hold the masters' values as of the last refresh, and never reach training."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.fused.apply import fuse
from splice.fused.modules import FusedLoraLinear
from splice.fused.projections import pack_projections
from splice.lora.apply import add_lora, lora_modules
from splice.lora.casts import AdapterCasts, adapter_cast
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from tests import tiny

PROMPTS = ["hello world", "the cat sat on the mat", "once upon a time there was", "zz top"]


def _bf16_model_fp32_adapters(tokenizer: Any) -> torch.nn.Module:
    """A fused bf16 Llama whose r4 adapters on every linear keep float32 masters (as training does)."""
    model = tiny.build_tiny_llama(len(tokenizer), seed=3).to(torch.bfloat16)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    tiny.randomize_lora(model, seed=5)
    freeze(model)
    fuse(model)
    return model


def test_a_fused_projection_reads_the_copies_only_inside_active_and_without_autograd(tiny_tokenizer: Any) -> None:
    model = _bf16_model_fp32_adapters(tiny_tokenizer)
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert fused and all(m.fn.lora_A.weight.dtype == torch.float32 for m in fused)
    casts = AdapterCasts(model, dtype=torch.bfloat16)
    assert adapter_cast(fused[0].fn) is None
    casts.refresh()
    assert len(casts.copies) == len(fused)
    for module in fused:
        a, b = casts.copies[id(module.fn)]
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, module.fn.lora_A.weight.to(torch.bfloat16))
        assert torch.equal(b, module.fn.lora_B.weight.to(torch.bfloat16))
    module = fused[0]
    x = torch.randn(3, module.base.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        full, base = module(x), module.base(x)
    assert not torch.equal(full, base)  # the adapter adds something
    with casts.active(), torch.no_grad():
        assert torch.equal(module(x), full)  # the copies round as the per-call casts do: the same output
    casts.copies[id(module.fn)][1].zero_()  # B's copy zeroed: the copy, not the master, is read
    with casts.active():
        with torch.no_grad():
            assert adapter_cast(module.fn) is not None
            assert torch.equal(module(x), base)
        assert torch.equal(module(x).detach(), full)  # with autograd on (training): the masters
    with torch.no_grad():
        assert torch.equal(module(x), full)  # outside the block: the masters
    casts.refresh()  # from the masters again, into the same storage
    assert torch.equal(casts.copies[id(module.fn)][1], module.fn.lora_B.weight.to(torch.bfloat16))


def _tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [r.generated for r in engine.generate(prompts, SamplingParams(max_tokens=6))]


@pytest.mark.parametrize("packed", [False, True])
def test_generate_refreshes_the_copies_from_the_live_adapter_each_call(tiny_tokenizer: Any, packed: bool) -> None:
    """Greedy tokens through the copies are those of the same engine casting the masters in every forward
    (no copies: an fp32 "compute dtype" makes none), and an in-place update of the masters (an optimizer
    step) shows in the same engine's next call. ``packed``: q/k/v and gate/up bases packed (as the engine
    packs them on a GPU), so each group runs over its group copy (splice.fused.modules.packed_lora)."""
    model = _bf16_model_fp32_adapters(tiny_tokenizer)
    if packed:
        pack_projections(model)
    prompts = [list(tiny_tokenizer(p)["input_ids"]) for p in PROMPTS]

    def engine(*, copies: bool) -> Engine:
        made = Engine(model, tiny_tokenizer, max_seqs=4, max_len=64, block_size=4, kv_blocks=80, token_budget=64)
        if not copies:
            made._casts = AdapterCasts(model, dtype=torch.float32)
        return made

    fast, plain = engine(copies=True), engine(copies=False)
    before = _tokens(fast, prompts)
    assert len(fast._casts.copies) == len(lora_modules(model)) and not plain._casts.copies
    assert len(fast._casts.group_copies) == (2 * len(model.model.layers) if packed else 0)
    assert before == _tokens(plain, prompts)
    with torch.no_grad():
        for _, _, layer in lora_modules(model):
            layer.lora_B.weight.mul_(-3.0)
    after = _tokens(fast, prompts)
    assert after != before and sum(map(len, after)) > len(after)
    assert after == _tokens(plain, prompts)


def test_a_layer_whose_masters_are_now_in_the_compute_dtype_reads_them_not_its_old_copy(tiny_tokenizer: Any) -> None:
    model = _bf16_model_fp32_adapters(tiny_tokenizer)
    module = next(m for m in model.modules() if isinstance(m, FusedLoraLinear))
    casts = AdapterCasts(model, dtype=torch.bfloat16)
    casts.refresh()
    with casts.active():
        assert adapter_cast(module.fn) is not None
    module.fn.to(torch.bfloat16)  # this layer's adapter now in bf16: no copy needed, the stale one not used
    casts.refresh()
    with casts.active():
        assert adapter_cast(module.fn) is None
        assert adapter_cast(next(m for m in model.modules() if isinstance(m, FusedLoraLinear) and m is not module).fn)
