"""PEFT-format adapters: splice <-> PEFT round trips with identical logits; bad adapters."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import splice
from splice.lora.peft_io import AdapterError
from tests import tiny


def _adapted(make=tiny.llama, **config):
    model = make()
    splice.add_lora(model, splice.LoraConfig(**config))
    tiny.randomize_lora(model)
    return model


def test_file_format_matches_peft(tmp_path) -> None:
    model = _adapted(targets=("q_proj", "v_proj", "embed_tokens"), rank=4, alpha=8, dropout=0.05)
    splice.save_adapter(model, tmp_path, base_model="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.05
    assert config["target_modules"] == ["embed_tokens", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "tiny-llama" and config["use_rslora"] is False
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert len(keys) == 2 * 5
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("make", "config"),
    [
        (tiny.llama, dict(targets=("q_proj", "v_proj"), rank=4, alpha=8)),
        (tiny.llama, dict(targets="all-linear", rank=8, alpha=4, rslora=True)),
        (tiny.llama, dict(targets=["model.layers.1.mlp.up_proj"], rank=2, alpha=2)),
        (tiny.gpt2, dict(targets=("c_attn", "c_proj"), rank=4, alpha=16)),
    ],
)
def test_splice_adapter_loads_in_peft_and_back(tmp_path, make, config: dict) -> None:
    model = _adapted(make, **config)
    ids = tiny.tokens()
    expected = model(ids).logits
    splice.save_adapter(model, tmp_path)
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(in_peft(ids).logits, expected, rtol=1e-5, atol=1e-5)
    in_splice = make()
    splice.load_adapter(in_splice, tmp_path)
    torch.testing.assert_close(in_splice(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True,
             rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 3.0}),
        dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
        # keys are regexes matched against the path or a dotted suffix of it, first match wins
        dict(r=4, lora_alpha=8, target_modules="all-linear",
             rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 2, "down_proj": 6, "proj": 1},
             alpha_pattern={r"self_attn\.(k|v)_proj": 3.0, "model.layers.0.mlp.up_proj": 32.0, "up_proj": 1.0}),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian", use_rslora=True,
             alpha_pattern={"v_proj": 2.0}),
    ],
)
def test_peft_adapter_loads_in_splice(tmp_path, peft_kwargs: dict) -> None:
    base = tiny.llama()
    reference = tiny.peft_lora(copy.deepcopy(base), **peft_kwargs)
    reference.save_pretrained(tmp_path)
    ids = tiny.tokens()
    names = splice.load_adapter(base, tmp_path)
    assert len(names) > 0
    torch.testing.assert_close(base(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_wrong_adapter_is_rejected_and_model_unchanged(tmp_path) -> None:
    splice.save_adapter(_adapted(targets=("q_proj",)), tmp_path / "llama", base_model="tiny-llama")
    gpt2 = tiny.gpt2()
    before = [n for n, _ in gpt2.named_modules()]
    with pytest.raises(AdapterError, match=r"is not in the model.*base model it was trained on \(tiny-llama\)"):
        splice.load_adapter(gpt2, tmp_path / "llama")
    assert [n for n, _ in gpt2.named_modules()] == before

    # A shape mismatch: an adapter from a wider model.
    wide = tiny.llama()
    tensors = load_file(tmp_path / "llama" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(8, 48)
    save_file(tensors, tmp_path / "llama" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"lora_A \(8, 48\).*do not fit in=32"):
        splice.load_adapter(wide, tmp_path / "llama")
    assert not splice.lora_modules(wide)


def test_missing_files_and_double_load(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        splice.load_adapter(tiny.llama(), tmp_path)
    splice.save_adapter(_adapted(), tmp_path)
    model = tiny.llama()
    splice.load_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="already has a LoRA adapter"):
        splice.load_adapter(model, tmp_path)


def test_save_without_lora_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no LoRA modules"):
        splice.save_adapter(tiny.llama(), tmp_path)


def test_two_named_adapters_stack_and_save_separately(tmp_path) -> None:
    first = _adapted(targets=("q_proj",), name="first")
    second = tiny.llama()
    splice.add_lora(second, splice.LoraConfig(targets=("v_proj",), name="second"))
    tiny.randomize_lora(second, seed=9)
    splice.save_adapter(first, tmp_path / "first")
    splice.save_adapter(second, tmp_path / "second")
    model = tiny.llama()
    splice.load_adapter(model, tmp_path / "first", name="first")
    splice.load_adapter(model, tmp_path / "second", name="second")
    ids = tiny.tokens()
    from splice.lora.apply import use_adapters

    with use_adapters(model, ["first", "second"]):
        routed = model(ids).logits
    torch.testing.assert_close(routed[0], first(ids).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], second(ids).logits[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass name="):
        splice.save_adapter(model, tmp_path / "both")
    splice.save_adapter(model, tmp_path / "again", name="second")
    again = tiny.llama()
    splice.load_adapter(again, tmp_path / "again")
    torch.testing.assert_close(again(ids).logits, second(ids).logits, rtol=0, atol=0)
