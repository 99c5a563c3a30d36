"""Quantize-on-load to FP8 (e4m3, per-output-channel scales) and FP8 checkpoints (per-channel and block scales)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from splice.models.streaming import load_quantized
from splice.quant.fp8 import FP8Linear, from_checkpoint, quantize_fp8, quantize_rows
from splice.quant.linear import Int8Linear
from tests import tiny
from tests.numerics import rel_err

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes as bytes: torch.equal has no FP8 kernel for larger CPU tensors."""
    return t.view(torch.uint8)


def _saved(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny.llama().to(torch.bfloat16).save_pretrained(folder)
    return folder


def _fp8_checkpoint(folder: Path, scheme: dict, quantize) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Rewrite ``folder`` as an FP8 checkpoint: every projection's weight through ``quantize(w)`` ->
    (codes, {suffix: scale}), plus a static input_scale; returns the original weights."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    originals = {}
    for name in list(tensors):
        if name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS:
            originals[name] = tensors[name].float()
            codes, scales = quantize(tensors[name].float())
            tensors[name] = codes
            for suffix, scale in scales.items():
                tensors[f"{name}_{suffix}"] = scale
            tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.01)
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = scheme
    (folder / "config.json").write_text(json.dumps(config))
    return originals


def test_streamed_fp8_equals_quantizing_the_loaded_model(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    streamed = load_quantized(folder, quantize="fp8", device="cpu", dtype=torch.bfloat16, allow_cpu=True)
    # The reference is what loading the folder gives (Hugging Face keeps the rotary table in fp32 there; a
    # model cast with .to(bfloat16) would round it, and every logit with it)
    loaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    quantize_fp8(loaded, allow_cpu=True)
    pairs = [(a, b) for a, b in zip(streamed.modules(), loaded.modules(), strict=True) if isinstance(a, FP8Linear)]
    assert len(pairs) == 14
    for a, b in pairs:
        assert torch.equal(_bits(a.qweight), _bits(b.qweight)) and torch.equal(a.scale, b.scale)
        assert a.compute_dtype == torch.bfloat16
    ids = tiny.tokens()
    assert torch.equal(streamed(ids).logits, loaded.eval()(ids).logits)


def test_fp8_on_the_cpu_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"need a CUDA GPU with FP8 tensor cores \(compute capability 8.9\+"):
        load_quantized(tmp_path / "not-read", quantize="fp8", device="cpu")


def _per_channel(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codes, rows = quantize_rows(w)
    return codes, {"scale": rows}  # (out, 1), as fbgemm_fp8 / compressed-tensors store it


def test_per_channel_checkpoint_keeps_its_codes(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _fp8_checkpoint(folder, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, _per_channel)
    stored = load_file(folder / "model.safetensors")
    model = load_quantized(folder, quantize="fp8", device="cpu", dtype=torch.bfloat16, allow_cpu=True)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, FP8Linear)
    assert torch.equal(_bits(layer.qweight), _bits(stored["model.layers.1.mlp.down_proj.weight"]))
    assert torch.equal(layer.scale, stored["model.layers.1.mlp.down_proj.weight_scale"][:, 0])
    # with another quantize the FP8 weight is dequantized first
    int8 = load_quantized(folder, quantize="int8", device="cpu", dtype=torch.bfloat16)
    other = int8.model.layers[1].mlp.down_proj
    assert isinstance(other, Int8Linear)
    assert rel_err(other.dequantize(torch.float32), layer.dequantize(torch.float32)) < 0.01


def _blocks(block: int):  # type: ignore[no-untyped-def]
    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, k = w.shape
        pad = torch.zeros(-(-n // block) * block, -(-k // block) * block)
        pad[:n, :k] = w
        tiles = pad.reshape(pad.shape[0] // block, block, pad.shape[1] // block, block)
        scale = tiles.abs().amax((1, 3)).clamp(min=1e-12) / 448.0  # (ceil(n / b), ceil(k / b))
        full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
        return (w / full).to(torch.float8_e4m3fn), {"scale_inv": scale}

    return quantize


def test_block_scaled_checkpoint_is_requantized_per_row(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    originals = _fp8_checkpoint(folder, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [16, 16]}, _blocks(16))
    model = load_quantized(folder, quantize="fp8", device="cpu", dtype=torch.bfloat16, allow_cpu=True)
    for name, weight in originals.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(layer, FP8Linear)
        # two e4m3 roundings (the checkpoint's, then ours per row): a few percent, not more
        assert rel_err(layer.dequantize(torch.float32), weight) < 0.05


def test_from_checkpoint_scale_layouts() -> None:
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    codes, rows = quantize_rows(w)
    for scale in (rows, rows[:, 0]):  # (out, 1) and (out,): the codes stay
        got = from_checkpoint(codes, scale)
        assert torch.equal(_bits(got[0]), _bits(codes)) and torch.equal(got[1], rows[:, 0])
    tensor_codes = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    got = from_checkpoint(tensor_codes, torch.tensor(0.01))  # per tensor: the codes stay, one scale a row
    assert torch.equal(_bits(got[0]), _bits(tensor_codes)) and torch.equal(got[1], torch.full((40,), 0.01))
    block_codes, scales = _blocks(16)(w)
    assert scales["scale_inv"].shape == (3, 2)  # 40 rows in blocks of 16: the last one partial
    got = from_checkpoint(block_codes, scales["scale_inv"], block=(16, 16))
    full = scales["scale_inv"].repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :24]
    assert rel_err(got[0].float() * got[1][:, None], block_codes.float() * full) < 0.05
    with pytest.raises(ValueError, match="does not fit blocks of 128 x 128"):
        from_checkpoint(block_codes, scales["scale_inv"], block=(128, 128))
    with pytest.raises(ValueError, match="a scale of shape"):
        from_checkpoint(codes, torch.ones(2, 2, 2))


def test_a_weight_without_its_scale_is_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _fp8_checkpoint(folder, {"quant_method": "fbgemm_fp8"}, _per_channel)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"FP8 weights \['model.layers.0.self_attn.q_proj'\] lack"):
        load_quantized(folder, quantize="fp8", device="cpu", dtype=torch.bfloat16, allow_cpu=True)
