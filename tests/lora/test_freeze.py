"""Freezing by predicate; one optimizer step changes only what trains."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.lora.freeze import adapter_parameter_names
from tests import tiny


def _step(model, ids) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()


def test_one_step_changes_only_adapter_parameters() -> None:
    model = tiny.llama()
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    summary = splice.freeze(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, tiny.tokens())
    adapter = adapter_parameter_names(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= adapter
    # lora_B starts at zero (so A gets no gradient yet); every B must have moved.
    assert changed == {k for k in adapter if k.endswith("lora_B.weight")}
    assert summary.trainable == sum(p.numel() for n, p in model.named_parameters() if n in adapter)


def test_adapters_found_by_type_not_by_name() -> None:
    model = tiny.llama()
    # A base parameter whose name contains "lora" must not be taken for an adapter.
    model.model.register_parameter("lora_lookalike", torch.nn.Parameter(torch.zeros(3)))
    splice.add_lora(model)
    splice.freeze(model)
    assert not model.model.lora_lookalike.requires_grad
    assert all("lora_lookalike" not in n for n in adapter_parameter_names(model))


def test_predicate_and_regex() -> None:
    model = tiny.llama()
    summary = splice.freeze(model, trainable=lambda path: path.endswith("norm.weight"))
    assert summary.trainable == 5 * 32
    assert set(summary.modules) == {
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm",
    }
    summary = splice.freeze(model, trainable=r"^lm_head\.")
    assert summary.trainable == 97 * 32
    assert "trainable params: 3,104" in str(summary)


def test_nothing_trainable_is_an_error() -> None:
    with pytest.raises(ValueError, match="call splice.add_lora first"):
        splice.freeze(tiny.llama())
    with pytest.raises(ValueError, match="matched no parameter path"):
        splice.freeze(tiny.llama(), trainable=lambda p: False)


def test_tied_parameter_counted_once() -> None:
    model = tiny.gpt2()
    summary = splice.freeze(model, trainable=r"lm_head")  # lm_head.weight is wte.weight
    assert summary.trainable == 97 * 32 and model.transformer.wte.weight.requires_grad
    assert summary.total == sum(p.numel() for p in model.parameters())


def test_summary_groups_modules_by_name_pattern() -> None:
    model = tiny.llama()  # 2 decoder layers
    splice.add_lora(model, splice.LoraConfig(rank=4, targets="all-linear"))
    lines = str(splice.freeze(model)).splitlines()
    # one line for the 14 LoRA linears of the decoder layers (not one line each, cut at 12)
    assert len(lines) == 2 and "more" not in lines[1]
    assert lines[1].split(None, 1)[1] == ("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in 2 "
                                          "layers of model.layers (14 modules)")
    summary = splice.freeze(model, trainable=lambda path: path.endswith("norm.weight"))
    assert str(summary).splitlines()[1:] == [f"  {128:>12,}  input_layernorm, post_attention_layernorm in 2 layers "
                                             "of model.layers (4 modules)", f"  {32:>12,}  model.norm"]
