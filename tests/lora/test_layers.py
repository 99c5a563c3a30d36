"""LoRA: the math, targets, dropout, merge/unmerge, and agreement with the real peft package."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from torch import nn

import splice
from splice.core.rewrite import nodes
from splice.core.targets import target_matcher
from splice.lora.apply import lora_modules
from splice.lora.layers import LoraEmbedding, LoraLinear
from tests import tiny


def test_forward_is_base_plus_scaled_low_rank() -> None:
    model = nn.Sequential(nn.Linear(8, 6))
    base = copy.deepcopy(model[0])
    splice.add_lora(model, splice.LoraConfig(rank=2, alpha=6, targets=["0"]))
    layer = model[0].fn
    assert isinstance(layer, LoraLinear) and layer.scale == 3.0
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    expected = base(x) + 3.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(model(x), expected)


def test_init_matches_peft_conventions() -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    splice.add_lora(model, splice.LoraConfig(rank=4, targets=["0"]))
    a, b = model[0].fn.lora_A.weight, model[0].fn.lora_B.weight
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_rslora_scale() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    splice.add_lora(model, splice.LoraConfig(rank=16, alpha=8, rslora=True, targets=["0"]))
    assert model[0].fn.scale == pytest.approx(8 / 4)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        (("q_proj", "v_proj"), 4),
        ("all-linear", 14),
        (r"model\.layers\.1\.mlp\..*_proj", 3),
        (lambda n: n.kind == "embedding", 1),
        (["model.layers.0.self_attn.o_proj"], 1),
    ],
)
def test_target_forms(targets, expected: int) -> None:
    model = tiny.llama()
    names = splice.add_lora(model, splice.LoraConfig(targets=targets))
    assert len(names) == expected
    assert "lm_head" not in names


def test_all_linear_excludes_tied_output_head_and_includes_conv1d() -> None:
    names = splice.add_lora(tiny.gpt2(), splice.LoraConfig(targets="all-linear"))
    assert len(names) == 8 and not any("lm_head" in n for n in names)


def test_no_match_error_names_what_exists() -> None:
    with pytest.raises(splice.NothingMatchedError, match=r"linear x15 \(e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        splice.add_lora(tiny.llama(), splice.LoraConfig(targets=["query", "value"]))


def test_unsupported_kind_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="supported are linear"):
        splice.add_lora(tiny.mlp(), splice.LoraConfig(targets=lambda n: n.kind == "relu"))


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="rank"):
        splice.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        splice.LoraConfig(dropout=1.0)


def test_dropout_applies_in_training_only() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    splice.add_lora(model, splice.LoraConfig(rank=4, dropout=0.5, targets=["0"]))
    nn.init.normal_(model[0].fn.lora_B.weight)
    x = torch.randn(8, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    first, second = model(x), model(x)
    assert not torch.allclose(first, second)  # a fresh dropout mask each call
    model.eval()
    base = model[0].base(x)
    layer = model[0].fn
    torch.testing.assert_close(model(x), base + layer.scale * layer.lora_B(layer.lora_A(x)))


@pytest.mark.parametrize("make", [tiny.llama, tiny.gpt2])
def test_merge_unmerge(make) -> None:
    model = make()
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=4))
    # Not GPT-2's wte: it is tied to the output head (see the tied-weight test).
    untied = lambda n: n.kind == "embedding" and n.name != "transformer.wte"  # noqa: E731
    splice.add_lora(model, splice.LoraConfig(targets=untied, rank=2))
    tiny.randomize_lora(model)
    ids = tiny.tokens()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    adapted = model(ids).logits
    splice.merge(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    splice.merge(model)  # twice is a no-op
    for key, value in model.state_dict().items():
        assert torch.equal(value, merged_state[key]), key
    splice.unmerge(model)
    for key, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_merge_refuses_tied_weights() -> None:
    model = tiny.gpt2()
    splice.add_lora(model, splice.LoraConfig(targets=["wte", "c_attn"]))
    tiny.randomize_lora(model)
    before = model.lm_head.weight.clone()
    with pytest.raises(ValueError, match="transformer.wte: the weight is tied"):
        splice.merge(model)
    assert torch.equal(model.lm_head.weight, before)
    assert not any(layer.merged for _, _, layer in lora_modules(model))


def test_merge_unload_gives_a_plain_hf_model(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model = tiny.llama()
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    tiny.randomize_lora(model)
    ids = tiny.tokens()
    adapted = model(ids).logits
    splice.merge(model, unload=True)
    assert not lora_modules(model) and not any("lora" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_unrewrite_of_merged_lora_unmerges() -> None:
    model = tiny.llama()
    ids = tiny.tokens()
    base = model(ids).logits
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    tiny.randomize_lora(model)
    splice.merge(model)
    splice.unrewrite(model)
    torch.testing.assert_close(model(ids).logits, base, rtol=1e-5, atol=1e-5)


def test_conv2d_and_embedding_lora_merge() -> None:
    model = tiny.conv_net()
    splice.add_lora(model, splice.LoraConfig(targets=lambda n: n.kind == "conv2d", rank=2))
    tiny.randomize_lora(model)
    x = torch.randn(2, 3, 9, 9)
    adapted = model(x)
    splice.merge(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    emb = nn.Sequential(nn.Embedding(10, 6))
    splice.add_lora(emb, splice.LoraConfig(targets=["0"], rank=3))
    assert isinstance(emb[0].fn, LoraEmbedding)


def _peft_model(model: nn.Module, **kwargs) -> peft.PeftModel:
    return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def _copy_lora_into_peft(model: nn.Module, peft_model: peft.PeftModel) -> None:
    root = peft_model.base_model.model
    with torch.no_grad():
        for path, _, layer in lora_modules(model):
            target = root.get_submodule(path)
            if isinstance(layer, LoraEmbedding):
                target.lora_embedding_A["default"].copy_(layer.lora_embedding_A)
                target.lora_embedding_B["default"].copy_(layer.lora_embedding_B)
            else:
                target.lora_A["default"].weight.copy_(layer.lora_A.weight)
                target.lora_B["default"].weight.copy_(layer.lora_B.weight)


CASES = [
    (tiny.llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    (tiny.llama, dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    (tiny.llama, dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "down_proj"])),
    (tiny.llama, dict(r=2, lora_alpha=8, target_modules=r".*\.1\.self_attn\.(k|o)_proj")),
    (tiny.gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
]


@pytest.mark.parametrize(("make", "peft_kwargs"), CASES)
def test_same_logits_and_trainable_count_as_peft(make, peft_kwargs: dict) -> None:
    model = make()
    reference = _peft_model(copy.deepcopy(model), **peft_kwargs)
    targets = peft_kwargs["target_modules"]
    splice.add_lora(model, splice.LoraConfig(
        rank=peft_kwargs["r"], alpha=peft_kwargs["lora_alpha"],
        rslora=peft_kwargs.get("use_rslora", False),
        targets=targets if isinstance(targets, str) else tuple(targets),
    ))
    peft_paths = sorted(n for n, m in reference.base_model.model.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(p for p, _, _ in lora_modules(model)) == peft_paths
    tiny.randomize_lora(model)
    _copy_lora_into_peft(model, reference)
    ids = tiny.tokens()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    summary = splice.freeze(model)
    assert summary.trainable == reference.get_nb_trainable_parameters()[0]
    assert summary.total == reference.get_nb_trainable_parameters()[1]


def test_target_matcher_suffix_semantics() -> None:
    model = tiny.llama()
    match = target_matcher(model, ("proj",))
    assert not any(match(n) for n in nodes(model))  # "proj" is no dotted suffix of "q_proj"
