"""Quantize-on-load: the streamed model equals quantizing the loaded one; bitsandbytes' format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import splice
from splice.lora.peft_io import load_adapter, save_adapter
from splice.models.streaming import bnb_state_dict, load_quantized, random_quantized
from splice.quant.linear import Int8Linear, NF4Linear
from tests import tiny
from tests.numerics import GPU


def _saved(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny.llama().save_pretrained(folder)
    return folder


def _same_codes(a: torch.nn.Module, b: torch.nn.Module) -> int:
    count = 0
    for (name_a, ma), (name_b, mb) in zip(a.named_modules(), b.named_modules(), strict=True):
        assert name_a == name_b and type(ma) is type(mb)
        if isinstance(ma, NF4Linear):
            for key, t in ma.nf4.inner_tensors().items():
                assert torch.equal(t, getattr(mb.nf4, key)), (name_a, key)
            count += 1
        elif isinstance(ma, Int8Linear):
            assert torch.equal(ma.qweight, mb.qweight) and torch.equal(ma.scale, mb.scale)
            count += 1
    return count


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_streamed_model_equals_quantizing_the_loaded_one(tmp_path: Path, quantize: str) -> None:
    folder = _saved(tmp_path)
    streamed = load_quantized(folder, quantize=quantize, device="cpu", dtype=torch.float32)
    reference = tiny.llama()
    (splice.quantize_nf4 if quantize == "nf4" else splice.quantize_int8)(reference)
    assert _same_codes(streamed, reference) == 14
    ids = tiny.tokens()
    assert torch.equal(streamed(ids).logits, reference(ids).logits)
    assert not any(p.is_meta for p in streamed.parameters())


@GPU
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_on_the_gpu_kept_on_the_cpu(tmp_path: Path, quantize: str) -> None:
    # FSDP2's multi-GPU load: each weight quantized on the GPU, then held on the CPU. The codes
    # are the GPU's (its float rounding differs from the CPU's in the last bit of a scale).
    folder = _saved(tmp_path)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    moved = load_quantized(folder, quantize=quantize, device="cpu", dtype=torch.float32, quantize_device="cuda")
    peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    assert peak > before, (before, peak)  # it ran there
    assert after == before, (before, after)  # and left nothing there
    assert all(p.device.type == "cpu" for p in moved.parameters())
    assert all(t.device.type == "cpu" for m in moved.modules() if isinstance(m, NF4Linear)
               for t in m.nf4.inner_tensors().values())
    on_gpu = load_quantized(folder, quantize=quantize, device="cuda", dtype=torch.float32).to("cpu")
    assert _same_codes(moved, on_gpu) == 14


def test_load_model_quantize_option(tmp_path: Path, tiny_tokenizer, make_tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from splice.models.loading import load_model

    folder = tmp_path / "model"
    make_tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, tokenizer = load_model(folder, quantize="nf4")
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    assert tokenizer.pad_token_id is not None and model.config.use_cache is False
    float_model, _ = load_model(folder)
    ids = tiny.tokens()
    quantized_ref = float_model
    splice.quantize_nf4(quantized_ref)
    assert torch.equal(model(ids).logits, quantized_ref(ids).logits)


def test_bitsandbytes_checkpoint_round_trip(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    model = load_quantized(folder, quantize="nf4", device="cpu", dtype=torch.float32)
    state = bnb_state_dict(model)
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in state
    out = tmp_path / "bnb"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    again = load_quantized(out, device="cpu", dtype=torch.float32)
    assert _same_codes(again, model) == 14


def test_bitsandbytes_parts_match_its_own_serialization() -> None:
    try:
        import bitsandbytes.functional as bnb_f
    except Exception:
        pytest.skip("bitsandbytes does not import here")
    model = tiny.llama()
    splice.quantize_nf4(model)
    layer = model.model.layers[0].mlp.down_proj
    w = tiny.llama().model.layers[0].mlp.down_proj.weight.detach()
    packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    theirs = qs.as_dict(packed=True)
    ours = bnb_state_dict(layer)
    assert torch.equal(ours["weight"], packed)
    for key in ("quant_map", "nested_absmax", "nested_quant_map"):
        assert torch.equal(ours[f"weight.{key}"], theirs[key]), key


def test_random_builder_matches_float_builder() -> None:
    config = tiny.llama().config
    q = random_quantized(config, quantize="nf4", device="cpu", dtype=torch.float32)
    f = random_quantized(config, quantize=None, device="cpu", dtype=torch.float32)
    splice.quantize_nf4(f)
    assert _same_codes(q, f) == 14


def test_adapter_moves_between_4bit_and_float_bases(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    quantized = load_quantized(folder, device="cpu", dtype=torch.float32)
    splice.add_lora(quantized, splice.LoraConfig(targets="all-linear", rank=4))
    tiny.randomize_lora(quantized)
    save_adapter(quantized, tmp_path / "adapter")
    float_model = tiny.llama()
    assert len(load_adapter(float_model, tmp_path / "adapter")) == 14
    a = splice.lora_modules(quantized)[0][2].lora_A.weight
    torch.testing.assert_close(splice.lora_modules(float_model)[0][2].lora_A.weight, a)
    back = load_quantized(folder, device="cpu", dtype=torch.float32)
    save_adapter(float_model, tmp_path / "adapter2")
    assert len(load_adapter(back, tmp_path / "adapter2")) == 14
    ids = tiny.tokens()
    assert torch.equal(back(ids).logits, quantized(ids).logits)


def test_missing_weights_are_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no weight for 1 linear.*layers\.1\.mlp\.up_proj"):
        load_quantized(folder, device="cpu")
