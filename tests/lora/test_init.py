"""PiSSA / OLoRA initialisation against the real peft package: the initial A, B and residual
base, outputs after loading both ways, and the adapter converted back to plain LoRA on save."""

from __future__ import annotations

import copy
import json

import peft
import peft.tuners.lora.layer as peft_layer
import pytest
import torch
from safetensors.torch import load_file

from splice.core.rewrite import unrewrite
from splice.lora.apply import add_lora, lora_modules
from splice.lora.init import init_name
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter, save_adapter
from tests import tiny

METHODS = ["pissa", "pissa_niter_2", "olora"]
MODELS = [(tiny.llama, ["q_proj", "v_proj", "up_proj"]), (tiny.gpt2, ["c_proj"])]


@pytest.fixture(autouse=True)
def _seeded_svd_lowrank(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The randomised SVD draws from the global RNG, which PEFT and splice consume in different
    orders while building layers; seeding every call makes both see the same draws."""
    original = torch.svd_lowrank

    def seeded(a, q=6, niter=2, M=None):  # type: ignore[no-untyped-def]
        torch.manual_seed(1234)
        return original(a, q=q, niter=niter, M=M)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    if hasattr(peft_layer, "svd_lowrank"):  # PEFT < 0.22 imported it by name; 0.22 calls torch.svd_lowrank
        monkeypatch.setattr(peft_layer, "svd_lowrank", seeded)


def _both(make, targets, method: str, **extra):  # type: ignore[no-untyped-def]
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=method, **extra))
    ours = copy.deepcopy(base)
    add_lora(ours, LoraConfig(targets=tuple(targets), rank=4, alpha=8, init=method,
                              use_dora=extra.get("use_dora", False)))
    return base, ours, theirs


def _peft_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", "").replace(".default", "").replace(".base_layer", ""): p
            for n, p in model.named_parameters()}


def _splice_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".fn.", ".").replace(".base.", "."): p for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("make", "targets"), MODELS)
def test_initial_adapter_and_residual_match_peft(make, targets, method: str) -> None:  # type: ignore[no-untyped-def]
    if method == "olora" and make is tiny.gpt2:
        pytest.skip("PEFT's OLoRA factors GPT-2's stored (in, out) Conv1D weight; splice factors (out, in)")
    base, ours, theirs = _both(make, targets, method)
    got, want = _splice_params(ours), _peft_params(theirs)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
    ids = tiny.tokens()
    torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    assert all(getattr(layer, "init", None) == method for _, _, layer in lora_modules(ours))


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_dora_on_a_residual_matches_peft(method: str) -> None:
    _, ours, theirs = _both(tiny.llama, ["q_proj", "v_proj"], method, use_dora=True)
    got, want = _splice_params(ours), _peft_params(theirs)
    for name in want:
        key = name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")
        torch.testing.assert_close(got[key], want[name], rtol=1e-5, atol=1e-5)


def _train(model: torch.nn.Module, seed: int = 7) -> None:
    """Stand-in for training: move every adapter weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method", METHODS)
def test_unconverted_adapter_loads_on_the_original_base(tmp_path, method: str) -> None:
    base, ours, _ = _both(tiny.llama, ["q_proj", "v_proj"], method)
    _train(ours)
    ids = tiny.tokens()
    expected = ours(ids).logits
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == method
    # both re-derive the residual from the original base, then take the trained A and B
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(in_peft(ids).logits, expected, rtol=1e-4, atol=1e-4)
    in_splice = copy.deepcopy(base)
    load_adapter(in_splice, tmp_path)
    torch.testing.assert_close(in_splice(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_converted_adapter_matches_peft(tmp_path, method: str, rslora: bool) -> None:
    base, ours, theirs = _both(tiny.llama, ["q_proj", "v_proj"], method, use_rslora=rslora) if rslora else \
        _both(tiny.llama, ["q_proj", "v_proj"], method)
    if rslora:  # _both builds splice's without rslora: rebuild it with
        ours = copy.deepcopy(base)
        add_lora(ours, LoraConfig(targets=("q_proj", "v_proj"), rank=4, alpha=8, init=method, rslora=True))
    # PEFT's recipe: save the initial adapter marked as plain, train, save converted against it
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = method
    _train(ours)
    _train(theirs)
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    save_adapter(ours, tmp_path / "splice", convert_to_lora=True)

    want_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    got_cfg = json.loads((tmp_path / "splice" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "use_dora"):
        assert got_cfg[key] == pytest.approx(want_cfg[key]), key
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "splice" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)

    ids = tiny.tokens()
    expected = ours(ids).logits
    plain = copy.deepcopy(base)  # the converted adapter is a plain LoRA of the original weights
    load_adapter(plain, tmp_path / "splice")
    torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-4)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "splice").eval()
    torch.testing.assert_close(in_peft(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_unrewrite_gives_the_original_base_back() -> None:
    base, ours, _ = _both(tiny.llama, ["q_proj", "v_proj"], "pissa")
    unrewrite(ours)
    for (name, got), want in zip(ours.named_parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_gaussian_init() -> None:
    model = tiny.llama()
    add_lora(model, LoraConfig(targets=("q_proj",), rank=4, init="gaussian"))
    for _, _, layer in lora_modules(model):
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert 0.1 < layer.lora_A.weight.std().item() < 0.5  # std 1/r = 0.25, as PEFT


def test_bad_init_is_one_clear_error() -> None:
    assert init_name(True) == "default" and init_name("PiSSA_niter_16") == "pissa_niter_16"
    with pytest.raises(ValueError, match="unknown LoRA initialisation 'pissa_niter_0'.*pissa_niter_N"):
        LoraConfig(init="pissa_niter_0")
    with pytest.raises(TypeError, match="applies to linear layers only.*embed_tokens"):
        add_lora(tiny.llama(), LoraConfig(targets=("embed_tokens",), init="olora"))
    model = tiny.llama()
    add_lora(model, LoraConfig(targets=("q_proj",)))
    with pytest.raises(ValueError, match="convert_to_lora applies to PiSSA/OLoRA"):
        save_adapter(model, "/nonexistent", convert_to_lora=True)
