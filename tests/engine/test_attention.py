"""splice.engine.attention: the PagedAttention rewrite of each family's attention, against the model itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.engine.attention import PagedAttention, install_paged_attention
from splice.engine.runner import ModelRunner
from splice.engine.scheduler import Chunk, Sequence, StepPlan
from splice.fused import modules as fused_modules
from splice.fused.apply import fuse
from splice.fused.modules import FusedRopeAttention
from splice.fused.varlen import VarlenAttention
from tests import tiny
from tests.numerics import rel_err

FAMILIES = ["Llama", *tiny.FAMILY_CONFIGS]


def _model(family: str) -> nn.Module:
    return tiny.llama(attn_implementation="eager") if family == "Llama" else tiny.family_lm(family)


def _ids(length: int = 19, seed: int = 1) -> list[int]:
    return tiny.tokens(seed=seed, batch=1, length=length)[0].tolist()


def stepwise_logits(model: nn.Module, ids: list[int], *, prefill: int = 7) -> torch.Tensor:
    """Logits at positions prefill-1 .. len-1 from the runner: one prefill chunk, then one token a step,
    over blocks of 4 placed out of order in the cache."""
    runner = ModelRunner(model, block_size=4, max_seqs=2, max_len=64, num_blocks=16, cuda_graphs=False)
    blocks = [9, 2, 14, 5, 11, 3, 7]
    seq = Sequence(seq_id=0, tokens=ids, prompt_len=len(ids), max_tokens=1, arrival=0, block_ids=blocks)
    steps = [(0, prefill), *((p, 1) for p in range(prefill, len(ids)))]
    logits = [runner.execute(StepPlan(chunks=[Chunk(seq=seq, start=s, count=c, sample=True)])) for s, c in steps]
    return torch.cat(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_steps_give_the_models_own_logits(family: str) -> None:
    model = _model(family)
    ids = _ids()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 6:].float()
    got = stepwise_logits(model, ids)
    assert sum(isinstance(m, PagedAttention) for m in model.modules()) == 2
    assert rel_err(got, want) < 1e-5, family
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_windows_and_softcaps_are_read_from_module_or_config() -> None:
    seen = {}
    for family in ("Mistral", "Qwen2", "Gemma2", "Gemma3", "Llama"):
        model = _model(family)
        install_paged_attention(model)
        seen[family] = [(m.window, m.softcap) for m in model.modules() if isinstance(m, PagedAttention)]
    assert seen == {"Mistral": [(5, 0.0), (5, 0.0)], "Qwen2": [(0, 0.0), (5, 0.0)],
                    "Gemma2": [(5, 5.0), (0, 5.0)], "Gemma3": [(5, 0.0), (0, 0.0)], "Llama": [(0, 0.0), (0, 0.0)]}


def test_unbound_it_is_the_original_module_for_inference_and_training() -> None:
    model = tiny.llama()
    ids = tiny.tokens(batch=2, length=9)
    before = tiny.loss_and_grads(model, ids)
    with torch.no_grad():
        logits = model(ids).logits
    names = install_paged_attention(model)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert install_paged_attention(model) == []  # installed once
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
    tiny.assert_same(tiny.loss_and_grads(model, ids), before, tol=1e-6)
    assert set(dict(model.named_parameters())) == {n for n, _ in tiny.llama().named_parameters()}


def test_fused_rope_attention_is_replaced_and_kept_for_unbound_calls() -> None:
    model = tiny.llama()
    ids = _ids()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 6:]
    fuse(model)
    assert isinstance(model.model.layers[0].self_attn, FusedRopeAttention)
    got = stepwise_logits(model, ids)
    paged = model.model.layers[0].self_attn
    assert isinstance(paged, PagedAttention) and isinstance(paged.__dict__["_replaced"], FusedRopeAttention)
    assert rel_err(got, want) < 1e-5
    with torch.no_grad():
        assert rel_err(model(torch.tensor([ids])).logits[0, 6:], want) < 1e-6


def test_a_fused_lora_training_model_runs_its_sibling_projections_as_one_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPO's rollouts run the engine on the model being trained (fused on a GPU): q/k/v and gate/up go through
    one lora_group call each per layer and step, with the same logits as the model's own forward."""
    model = tiny.lora_llama(hidden=64).eval()
    ids = [int(i) % 101 for i in _ids()]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 6:]
    fuse(model)
    groups: list[int] = []
    real = fused_modules.lora_group

    def counted(x: torch.Tensor, weights: list[torch.Tensor], *args: object, **kwargs: object) -> tuple[torch.Tensor, ...]:
        groups.append(len(weights))
        return real(x, weights, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fused_modules, "lora_group", counted)
    got = stepwise_logits(model, ids)
    steps, layers = len(ids) - 7 + 1, len(model.model.layers)
    assert groups == [3, 2] * layers * steps  # q/k/v, then gate/up, in every layer of every step
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family", ["Qwen3", "Gemma2"])
def test_fused_varlen_attention_of_other_families_is_replaced_too(family: str) -> None:
    """splice.fuse gives Mistral/Qwen/Gemma VarlenAttention (packed training rows): the engine still runs them,
    with the window, softcap and q/k norms read from the Hugging Face module it keeps."""
    model = _model(family)
    ids = _ids()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 6:].float()
    fuse(model)
    assert isinstance(model.model.layers[0].self_attn, VarlenAttention)
    got = stepwise_logits(model, ids)
    paged = [m for m in model.modules() if isinstance(m, PagedAttention)]
    assert len(paged) == 2 and all(isinstance(m.__dict__["_replaced"], VarlenAttention) for m in paged)
    assert [(m.window, m.softcap) for m in paged] == {"Qwen3": [(0, 0.0), (0, 0.0)], "Gemma2": [(5, 5.0), (0, 5.0)]}[family]
    assert rel_err(got, want) < 1e-5


def test_a_model_without_known_attention_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="runs Llama, Mistral, Qwen2/3 and Gemma-style models: GPT2LMHeadModel"):
        install_paged_attention(tiny.gpt2())
