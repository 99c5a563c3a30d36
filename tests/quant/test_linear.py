"""Weight-only quantization as a rewrite: accuracy floors, LoRA on top, training through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import splice
from splice.quant.linear import Int8Linear, NF4Linear
from splice.quant.nf4 import NF4Tensor
from tests import tiny


def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.detach(), approx.detach()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.pow(2).mean() / noise))


def test_int8_every_linear_keeps_the_signal() -> None:
    model = tiny.llama()
    ids = tiny.tokens()
    reference = model(ids).logits
    names = splice.quantize_int8(model)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    assert _sqnr_db(reference, model(ids).logits) > 35.0


def test_int8_weight_error_bound() -> None:
    linear = nn.Linear(64, 16)
    q = Int8Linear.from_linear(linear)
    err = (q.dequantize(torch.float32) - linear.weight).abs()
    # Rounding to the nearest of 255 levels: at most half a step per row.
    assert torch.all(err <= q.scale[:, None] / 2 + 1e-7)
    assert q.qweight.dtype == torch.int8


def test_nf4_keeps_the_signal_and_packs_two_per_byte() -> None:
    model = tiny.llama()
    ids = tiny.tokens()
    reference = model(ids).logits
    splice.quantize_nf4(model, block_size=32)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, NF4Linear) and isinstance(layer.weight, NF4Tensor)
    assert layer.nf4.packed.numel() == 64 * 32 // 2 and layer.nf4.double_quant
    assert _sqnr_db(reference, model(ids).logits) > 15.0


@pytest.mark.parametrize("quantize", [splice.quantize_int8, splice.quantize_nf4])
def test_lora_trains_on_a_quantized_base(quantize) -> None:
    model = tiny.llama()
    quantize(model)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=4))
    splice.freeze(model)
    ids = tiny.tokens(batch=4, length=16)
    losses = tiny.train_losses(model, ids)
    assert losses[-1] < losses[0] - 0.2
    assert all(not b.requires_grad for b in model.buffers())


def test_quantized_grad_matches_dequantized_linear() -> None:
    linear = nn.Linear(12, 7)
    q = NF4Linear.from_linear(linear, block_size=4)
    x = torch.randn(3, 12, requires_grad=True)
    q(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    nn.functional.linear(x2, q.dequantize(torch.float32), linear.bias).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert q.weight.grad is None


@pytest.mark.parametrize("quantize", [splice.quantize_int8, splice.quantize_nf4])
def test_lora_then_quantize_equals_quantize_then_lora(quantize) -> None:
    ids = tiny.tokens()
    first = tiny.llama()
    quantize(first)
    splice.add_lora(first, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(first)
    second = tiny.llama()
    splice.add_lora(second, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(second)
    names = quantize(second)
    assert len(names) == 14
    assert isinstance(splice.lora_modules(second)[0][1].base, (Int8Linear, NF4Linear))
    torch.testing.assert_close(first(ids).logits, second(ids).logits)


@pytest.mark.parametrize("quantize", [splice.quantize_int8, splice.quantize_nf4])
def test_adapters_take_the_quantized_base_dtype_and_device(quantize) -> None:
    model = tiny.llama().to(torch.bfloat16)
    quantize(model)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=4, dtype=None))
    _, _, layer = splice.lora_modules(model)[0]
    assert layer.lora_A.weight.dtype == torch.bfloat16
    model.to("meta")  # a device move reaches the quantized weights and the adapters
    base = splice.lora_modules(model)[0][1].base
    assert base.device.type == "meta" and layer.lora_A.weight.device.type == "meta"


def test_quantize_twice_changes_nothing_and_tiny_layers_are_reported() -> None:
    model = tiny.mlp()  # the last linear has 16 x 4 = 64 weights: half a block of 128
    with pytest.warns(UserWarning, match=r"left unquantized: 4 \(64 weights, fewer than one block of 128\)"):
        names = splice.quantize_nf4(model, block_size=128)
    assert names == ["0", "2"]
    assert splice.quantize_nf4(model, block_size=128, targets=["2"]) == []


def test_merge_into_a_quantized_base_is_refused_clearly() -> None:
    model = tiny.mlp()
    splice.quantize_nf4(model, block_size=8)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    with pytest.raises(TypeError, match="merge into a float copy"):
        splice.merge(model)


def test_unrewrite_restores_float_linears() -> None:
    model = tiny.mlp()
    first = model[0]
    splice.quantize_int8(model, keep_original=True)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear"))
    splice.unrewrite(model)
    assert model[0] is first
    # Without keep_original, unrewrite gives a dequantized float linear back.
    model = tiny.mlp()
    splice.quantize_int8(model)
    splice.unrewrite(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model[0].weight, first.weight, atol=float(first.weight.abs().max()) / 127, rtol=0)
    model = tiny.mlp()
    splice.quantize_nf4(model, block_size=8)
    splice.unrewrite(model)
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model[0].weight, first.weight, atol=0.1, rtol=0)
