"""splice.fused.modules: fused kernels swapped in by rewrites give the same model (CPU reference paths;
the Triton paths on a GPU when one is present)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from splice.core.context import causal_only
from splice.fused.apply import fuse, unfuse
from splice.fused.modules import (
    FusedLoraLinear,
    FusedRMSNorm,
    FusedRopeAttention,
    FusedSwiGLUMLP,
    project,
)
from splice.lora.apply import lora_modules, merge
from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states
from tests.numerics import GPU, rel_err
from tests.tiny import lora_llama, loss_and_grads, spy_causal_only


def compare(plain: nn.Module, fast: nn.Module, ids: torch.Tensor, tol_loss: float, tol_grad: float) -> None:
    loss0, grads0 = loss_and_grads(plain, ids)
    loss1, grads1 = loss_and_grads(fast, ids)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    assert rel_err(loss1, loss0) < tol_loss
    for name in grads0:
        assert rel_err(grads1[name], grads0[name]) < tol_grad, name


def test_fuse_matches_plain_fp32() -> None:
    plain = lora_llama()
    fast = copy.deepcopy(plain)
    names = fuse(fast)
    assert "model.layers.0.self_attn.q_proj" in names and "model.norm" in names
    assert "model.layers.1.mlp" in names and "model.layers.1.self_attn" in names
    ids = torch.randint(0, 101, (2, 13))
    compare(plain, fast, ids, 1e-6, 1e-5)


def compare_bf16(plain: nn.Module, fast: nn.Module, ids: torch.Tensor) -> None:
    """The fast bf16 model is no further from a float64 copy than the plain bf16 model is."""
    exact = copy.deepcopy(plain).double()
    (_, g0), (l1, g1) = loss_and_grads(plain, ids), loss_and_grads(fast, ids)
    l64, g64 = loss_and_grads(exact, ids)
    assert rel_err(l1, l64) < 1e-3
    for name in g64:
        e_plain, e_fast = rel_err(g0[name], g64[name]), rel_err(g1[name], g64[name])
        assert e_fast < 2 * e_plain + 5e-3 and e_fast < 0.1, (name, e_fast, e_plain)


def test_fuse_bf16_base_fp32_adapters() -> None:
    plain = lora_llama(dtype=torch.bfloat16)
    for _, _, layer in lora_modules(plain):
        layer.float()  # PEFT's default: fp32 adapter weights over a bf16 model
    fast = copy.deepcopy(plain)
    fuse(fast)
    compare_bf16(plain, fast, torch.randint(0, 101, (2, 16)))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sibling_projections_run_as_one_node_each_adapter_with_its_own_mask(dropout: float) -> None:
    """q/k/v and gate/up: one lora_group node each, in training with dropout too (each adapter keeps its
    own mask: the keys drawn in the same order give each projection's values and gradients called alone);
    in eval (no mask) equal to each projection called alone."""
    model = lora_llama(dropout=dropout)
    fuse(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    model.train()
    for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        x = torch.randn(2, 5, 64, requires_grad=True)
        params = [p for m in group for p in m.parameters() if p.requires_grad]
        torch.manual_seed(7)
        outs = project(group, x)
        assert {type(t.grad_fn).__name__ for t in outs} == {"_LoraGroupFnBackward"}
        dys = [torch.randn_like(t) for t in outs]
        grads = torch.autograd.grad(outs, [x, *params], dys)
        torch.manual_seed(7)
        singles = [module(x) for module in group]
        assert {type(t.grad_fn).__name__ for t in singles} == {"_LoraLinearFnBackward"}
        for out, single in zip(outs, singles):
            torch.testing.assert_close(out, single, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, torch.autograd.grad(singles, [x, *params], dys)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model.eval()  # no mask in eval: grouped, and equal to each projection called alone
    x = torch.randn(2, 5, 64, requires_grad=True)
    for group in ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]):
        outs = project(group, x)
        assert {type(t.grad_fn).__name__ for t in outs} == {"_LoraGroupFnBackward"}
        for module, out in zip(group, outs):
            torch.testing.assert_close(out, module(x), rtol=1e-6, atol=1e-6)


def test_structure_is_preserved_and_undoable() -> None:
    model = lora_llama()
    keys = list(model.state_dict())
    paths = [p for p, _, _ in lora_modules(model)]
    ids = torch.randint(0, 101, (1, 9))
    model.eval()
    before = model(input_ids=ids).logits
    fuse(model)
    assert list(model.state_dict()) == keys
    assert [p for p, _, _ in lora_modules(model)] == paths  # found inside fused containers too
    assert isinstance(model.model.layers[0].self_attn, FusedRopeAttention)
    assert isinstance(model.model.layers[0].mlp, FusedSwiGLUMLP)
    assert isinstance(model.model.layers[0].mlp.down_proj, FusedLoraLinear)
    assert isinstance(model.model.norm, FusedRMSNorm)
    assert fuse(model) == []  # idempotent
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    restored = unfuse(model)
    assert "model.layers.0.mlp" in restored and "model.layers.0.mlp.gate_proj" in restored
    assert not any(getattr(type(m), "splice_fast", False) for m in model.modules())
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_options_select_rewrites_and_qv_targets() -> None:
    model = lora_llama(targets=("q_proj", "v_proj"))
    names = fuse(model, rmsnorm=False, rope=False)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.mlp" in names
    assert not any(isinstance(m, (FusedRMSNorm, FusedRopeAttention)) for m in model.modules())
    assert not isinstance(model.model.layers[0].self_attn.k_proj, FusedLoraLinear)


def test_merge_and_adapter_save_after_fuse(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from splice.lora.peft_io import save_adapter

    plain = lora_llama()
    fast = copy.deepcopy(plain)
    fuse(fast)
    save_adapter(plain, tmp_path / "plain")
    save_adapter(fast, tmp_path / "fast")
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fast" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fast.eval()
    ids = torch.randint(0, 101, (1, 8))
    before = fast(input_ids=ids).logits
    merge(fast)
    torch.testing.assert_close(fast(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_dropout_is_seeded_and_off_in_eval() -> None:
    plain = lora_llama(dropout=0.3)
    fast = copy.deepcopy(plain)
    fuse(fast)
    ids = torch.randint(0, 101, (2, 11))
    l1, g1 = loss_and_grads(fast, ids, seed=5)
    l2, g2 = loss_and_grads(fast, ids, seed=5)
    assert torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    l3, _ = loss_and_grads(fast, ids, seed=6)
    assert not torch.equal(l1, l3)
    plain.eval()
    fast.eval()
    torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fused_loss_and_generation_through_fast_model() -> None:
    model = lora_llama()
    fuse(model)
    ids = torch.randint(0, 101, (2, 10))
    weight, bias = lm_head_params(model)
    fused = causal_lm_loss(model_hidden_states(model, input_ids=ids), weight, ids, lm_head_bias=bias)
    torch.testing.assert_close(fused, model(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    model.eval()
    plain = copy.deepcopy(model)
    unfuse(plain)
    out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)  # KV cache: fallback path
    assert torch.equal(out, plain.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))


@GPU
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gpu_bf16_matches_plain(dropout: float, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import splice.kernels.lora_linear as lora_module

    monkeypatch.setattr(lora_module, "LORA_KERNEL_MIN_TOKENS", 0)  # the fp32-accurate kernels
    plain = lora_llama(dtype=torch.bfloat16, device="cuda", layers=3, dropout=dropout)
    for _, _, layer in lora_modules(plain):
        layer.float()
    fast = copy.deepcopy(plain)
    fuse(fast)
    ids = torch.randint(0, 101, (2, 64), device="cuda")
    if dropout == 0.0:
        compare_bf16(plain, fast, ids)
    else:  # different masks in training: compare the eval outputs with a float64 copy
        exact = copy.deepcopy(plain).double()
        for model in (plain, fast, exact):
            model.eval()
        ref = exact(input_ids=ids).logits
        e_plain = rel_err(plain(input_ids=ids).logits, ref)
        assert rel_err(fast(input_ids=ids).logits, ref) < 2 * e_plain + 2e-3


def test_rope_is_fused_without_cache_and_falls_back_with_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import splice.fused.modules as fast_module

    calls = []
    real = fast_module.rope
    monkeypatch.setattr(fast_module, "rope", lambda *a: calls.append(1) or real(*a))
    model = lora_llama()
    fuse(model)
    ids = torch.randint(0, 101, (1, 5))
    model(input_ids=ids, use_cache=False)
    assert len(calls) == 2  # one per layer
    model(input_ids=ids, use_cache=True)  # a KV cache: the original attention forward
    assert len(calls) == 2


def test_fused_lora_respects_disabled_and_routed_adapters() -> None:
    from splice.lora.apply import adapters_disabled, use_adapters

    plain = lora_llama()
    fast = copy.deepcopy(plain)
    fuse(fast)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapters_disabled(plain):
            base = plain(ids).logits
        with adapters_disabled(fast):
            torch.testing.assert_close(fast(ids).logits, base, rtol=1e-5, atol=1e-5)
        adapted = plain(ids).logits
        with use_adapters(fast, ["default", None]):
            routed = fast(ids).logits
    torch.testing.assert_close(routed[0], adapted[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-4, atol=1e-4)


def test_unrewrite_removes_fast_modules_and_lora() -> None:
    model = lora_llama()
    originals = {n: type(m) for n, m in model.named_modules()}
    fuse(model)
    assert any(isinstance(m, FusedSwiGLUMLP) for m in model.modules())
    assert len(lora_modules(model)) == 14  # the adapters inside fused containers stay visible
    unfuse(model)
    assert {n: type(m) for n, m in model.named_modules()} == originals


def test_causal_only_drops_the_mask_and_is_only_used_without_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Under causal_only the fused attention ignores the (causal) mask Hugging Face built, with
    identical results; model_hidden_states turns it on only for calls without mask and positions."""
    model = lora_llama()
    fuse(model)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = model.model(input_ids=ids).last_hidden_state
        with causal_only():
            got = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    seen = spy_causal_only(monkeypatch)
    with torch.no_grad():
        model_hidden_states(model, input_ids=ids)
        model_hidden_states(model, input_ids=ids, attention_mask=torch.ones_like(ids))
        model_hidden_states(model, input_ids=ids, position_ids=torch.arange(9).repeat(2, 1))
    assert seen == [True, True, False, False, False, False]  # 2 layers per call
