"""DoRA against the real peft package: adapters both ways, merged weights, gradients, generation."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import splice
from splice.lora.apply import add_lora, lora_modules, merge, unmerge
from splice.lora.dora_layers import DoraConv2d, DoraLinear
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import AdapterError, load_adapter, save_adapter
from tests import tiny
from tests.numerics import DEVICES, rel_err

CASES = [  # (model, splice targets, PEFT target_modules, input)
    (tiny.llama, ("q_proj", "v_proj", "down_proj"), ["q_proj", "v_proj", "down_proj"], tiny.tokens),
    (tiny.gpt2, ("c_attn", "c_proj"), ["c_attn", "c_proj"], tiny.tokens),
    (tiny.conv_net, ["0", "2"], ["0", "2"], lambda: torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(4))),
]


def _out(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _randomize(params: list[tuple[str, torch.nn.Parameter]], seed: int = 3) -> None:
    """Non-zero B and a magnitude away from the norm, so every DoRA term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            noise = torch.randn(p.shape, generator=g).to(p.device)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(noise * 0.2)


def _splice_dora(make, targets, **config):  # type: ignore[no-untyped-def]
    model = make()
    add_lora(model, LoraConfig(targets=targets, rank=4, alpha=8, use_dora=True, **config))
    _randomize([(n, p) for n, p in model.named_parameters() if "lora_" in n])
    return model


def _peft_dora(base, targets, **config):  # type: ignore[no-untyped-def]
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, **config))
    _randomize([(n, p) for n, p in model.named_parameters() if "lora_" in n])
    return model


def test_fresh_dora_is_a_no_op_with_peft_magnitudes() -> None:
    base = tiny.llama()
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(targets=("q_proj", "v_proj"), rank=4, alpha=8, use_dora=True))
    ids = tiny.tokens()
    torch.testing.assert_close(_out(ours, ids), _out(base, ids), rtol=0, atol=1e-6)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"], use_dora=True))
    want = {n.split("base_model.model.")[1].replace(".lora_magnitude_vector.default.weight", ""): p
            for n, p in theirs.named_parameters() if "magnitude" in n}
    got = {path: layer.lora_magnitude_vector for path, _, layer in lora_modules(ours)}
    assert got.keys() == want.keys()
    for path in got:
        torch.testing.assert_close(got[path], want[path], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("make", "targets", "peft_targets", "inputs"), CASES)
def test_splice_dora_loads_in_peft_and_back(tmp_path, make, targets, peft_targets, inputs) -> None:  # type: ignore[no-untyped-def]
    model = _splice_dora(make, targets)
    assert all(isinstance(layer, (DoraLinear, DoraConv2d)) for _, _, layer in lora_modules(model))
    x = inputs()
    expected = _out(model, x)
    save_adapter(model, tmp_path, task_type="CAUSAL_LM" if make is not tiny.conv_net else None)  # type: ignore[arg-type]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(lora_modules(model))
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(_out(in_peft, x), expected, rtol=1e-5, atol=1e-5)
    in_splice = make()
    load_adapter(in_splice, tmp_path)
    torch.testing.assert_close(_out(in_splice, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "targets", "peft_targets", "inputs"), CASES)
def test_peft_dora_loads_in_splice(tmp_path, make, targets, peft_targets, inputs) -> None:  # type: ignore[no-untyped-def]
    base = make()
    reference = _peft_dora(base, peft_targets).eval()
    reference.save_pretrained(tmp_path)
    x = inputs()
    load_adapter(base, tmp_path)
    torch.testing.assert_close(_out(base, x), _out(reference, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("make", "targets", "peft_targets", "inputs"), CASES)
def test_merged_weights_match_peft(tmp_path, make, targets, peft_targets, inputs) -> None:  # type: ignore[no-untyped-def]
    base = make()
    reference = _peft_dora(base, peft_targets).eval()
    reference.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    x = inputs()
    unmerged = _out(ours, x)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    merge(ours)
    torch.testing.assert_close(_out(ours, x), unmerged, rtol=1e-5, atol=1e-5)
    merged_peft = reference.merge_and_unload()
    ours_merged = {n.replace(".base.", "."): p for n, p in ours.named_parameters() if "lora_" not in n}
    for name, param in merged_peft.named_parameters():
        torch.testing.assert_close(ours_merged[name], param, rtol=1e-5, atol=1e-6)
    unmerge(ours)
    for name, param in ours.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, before[name], rtol=1e-5, atol=1e-6)
    merge(ours, unload=True)
    assert not lora_modules(ours)
    torch.testing.assert_close(_out(ours, x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(("make", "targets", "peft_targets", "inputs"), CASES)
def test_gradients_match_peft(tmp_path, make, targets, peft_targets, inputs, frozen: bool) -> None:  # type: ignore[no-untyped-def]
    """Same loss gradients for A, B and the magnitude; ``frozen`` runs the fused dora_linear."""
    base = make()
    reference = _peft_dora(base, peft_targets).eval()
    reference.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    if frozen:
        freeze(ours)
    x = inputs()
    _out(reference, x).square().mean().backward()
    _out(ours, x).square().mean().backward()
    want = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
            for n, p in reference.named_parameters() if "lora_" in n}
    got = {n.replace(".fn.", ".").replace(".lora_magnitude_vector", ".lora_magnitude_vector.weight"): p.grad
           for n, p in ours.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_dropout_training_matches_peft(tmp_path) -> None:
    base = tiny.llama()
    reference = _peft_dora(base, ["q_proj", "v_proj"], lora_dropout=0.3)
    reference.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    ours.train()
    reference.train()
    ids = tiny.tokens()
    torch.manual_seed(11)
    want = _out(reference, ids)
    torch.manual_seed(11)
    got = _out(ours, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generation_merged_equals_unmerged() -> None:
    model = _splice_dora(tiny.llama, ("q_proj", "v_proj", "o_proj"))
    ids = tiny.tokens(batch=1, length=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    unmerged = model.generate(ids, **kwargs)
    merge(model)
    torch.testing.assert_close(model.generate(ids, **kwargs), unmerged)


def test_dora_refuses_embeddings_and_damaged_adapters(tmp_path) -> None:
    with pytest.raises(TypeError, match="DoRA cannot adapt.*embedding"):
        add_lora(tiny.llama(), LoraConfig(targets=("embed_tokens",), use_dora=True))
    model = _splice_dora(tiny.llama, ("q_proj",))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = tiny.llama()
    with pytest.raises(AdapterError, match="use_dora is False but .* has a lora_magnitude_vector"):
        load_adapter(fresh, tmp_path)
    assert not lora_modules(fresh)


def test_facade_add_lora_builds_dora() -> None:
    model = tiny.llama()
    splice.add_lora(model, splice.LoraConfig(targets=("q_proj",), use_dora=True))
    assert all(isinstance(layer, DoraLinear) for _, _, layer in splice.lora_modules(model))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_equals_peft_formula_path(device: str) -> None:
    """A frozen bf16 linear takes splice.kernels.dora (Triton on a GPU, at >= 2048 tokens); the
    same layer with a trainable base takes PEFT's formula: same output and adapter gradients."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 80)).to(device=device, dtype=dtype)
    add_lora(model, LoraConfig(targets=["0"], rank=8, alpha=16, use_dora=True))
    _randomize([(n, p) for n, p in model.named_parameters() if "lora_" in n])
    x = torch.randn(4, 600, 96, device=device, dtype=dtype)
    layer = lora_modules(model)[0][2]
    results = []
    for frozen in (True, False):
        for p in model[0].base.parameters():
            p.requires_grad_(not frozen)
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.float().square().mean().backward()
        grads = [p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)]
        results.append((out.detach().float(), xi.grad.float(), grads))
        model.zero_grad()
    (out_f, dx_f, g_f), (out_p, dx_p, g_p) = results
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(out_f, out_p) < tol and rel_err(dx_f, dx_p) < tol
    for got, want in zip(g_f, g_p, strict=True):
        assert rel_err(got, want) < tol
