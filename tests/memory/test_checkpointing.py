"""splice.memory.checkpointing: checkpointed (and CPU-offloaded) decoder layers compute the same loss and
gradients, replay dropout masks, keep LoRA visible, and undo cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from splice.fused.apply import fuse
from splice.lora.apply import add_lora, lora_modules
from splice.lora.freeze import freeze
from splice.memory.checkpointing import CheckpointedLayer, checkpoint_layers, uncheckpoint_layers
from tests.numerics import GPU, rel_err
from tests.tiny import assert_same, lora_llama, loss_and_grads, spy_causal_only


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("offload", [False, True, 2])
@pytest.mark.parametrize("layers", ["all", "auto"])
def test_same_loss_and_grads_with_dropout_replayed(fast: bool, offload: bool | int, layers: str) -> None:
    plain = lora_llama(dropout=0.2, layers=3)
    if fast:
        fuse(plain)
    ckpt = copy.deepcopy(plain)
    names = checkpoint_layers(ckpt, layers=layers, offload=offload)  # type: ignore[arg-type]
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    ids = torch.randint(0, 101, (2, 12))
    # same torch seed: the same dropout masks in forward, replayed in the recompute
    assert_same(loss_and_grads(plain, ids, seed=3), loss_and_grads(ckpt, ids, seed=3))


def test_selection_by_count_and_predicate() -> None:
    model = lora_llama(layers=3, dropout=0.1)
    checkpoint_layers(model, layers=1)
    flags = [m.select for m in model.modules() if isinstance(m, CheckpointedLayer)]
    assert flags == [False, False, True]
    model = lora_llama(layers=3, dropout=0.1)
    checkpoint_layers(model, layers=lambda name: name.endswith(".0"))
    flags = [m.select for m in model.modules() if isinstance(m, CheckpointedLayer)]
    assert flags == [True, False, False]
    ids = torch.randint(0, 101, (1, 7))
    loss_and_grads(model, ids)


def test_offload_of_the_last_n_layers_only() -> None:
    model = lora_llama(layers=3)
    checkpoint_layers(model, layers="all", offload=2)  # layer 0's input stays on the device
    assert [m.offload for m in model.modules() if isinstance(m, CheckpointedLayer)] == [False, True, True]
    with pytest.raises(ValueError, match="offload=4 layers, but the model has 3"):
        checkpoint_layers(lora_llama(layers=3), layers="all", offload=4)


def test_structure_lora_visibility_and_undo() -> None:
    model = lora_llama(layers=3, dropout=0.1)
    keys = list(model.state_dict())
    paths = [p for p, _, _ in lora_modules(model)]
    checkpoint_layers(model)
    assert isinstance(model.model.layers[1], CheckpointedLayer)
    assert list(model.state_dict()) == keys
    assert [p for p, _, _ in lora_modules(model)] == paths
    with pytest.raises(ValueError, match="no decoder layers"):
        checkpoint_layers(model)
    model.eval()
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids).logits  # eval / no grad: the plain path
    assert uncheckpoint_layers(model) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert not any(isinstance(m, CheckpointedLayer) for m in model.modules())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, out)


@GPU
@pytest.mark.parametrize("offload", [False, True, 2])
def test_gpu_checkpoint_saves_memory_and_matches(offload: bool | int) -> None:
    plain = lora_llama(device="cuda", dtype=torch.bfloat16, layers=4, hidden=256, dropout=0.1)
    fuse(plain)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=offload)
    ids = torch.randint(0, 101, (2, 1024), device="cuda")
    peaks = []
    results = []
    for model in (plain, ckpt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results.append(loss_and_grads(model, ids, seed=1))
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < 0.7 * peaks[0]
    # same kernels and masks; flash attention's backward accumulates in a varying order
    assert_same(results[0], results[1], tol=2e-2)


@GPU
def test_gpu_auto_keeps_short_sequences_uncheckpointed() -> None:
    model = lora_llama(device="cuda", dtype=torch.bfloat16, layers=3, dropout=0.1)
    fuse(model)
    checkpoint_layers(model, layers="auto")
    loss_and_grads(model, torch.randint(0, 101, (1, 64), device="cuda"))
    plan = model.model.layers[0].__dict__["_shared"].plan
    assert plan.keep == 3  # plenty of memory: nothing recomputed


def test_kv_cache_is_dropped_when_checkpointing() -> None:
    plain = lora_llama(dropout=0.0, layers=3)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=True)
    ids = torch.randint(0, 101, (1, 9))
    results = []
    for model in (plain, ckpt):
        model(input_ids=ids, labels=ids, use_cache=True).loss.backward()  # HF builds a cache
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in results[0]:
        assert rel_err(results[1][name], results[0][name]) < 1e-6, name


@pytest.mark.parametrize("offload", [False, True])
def test_two_forwards_before_one_backward(offload: bool) -> None:
    plain = lora_llama(dropout=0.0, layers=3)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=offload)
    a, b = torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 8))
    grads = []
    for model in (plain, ckpt):
        loss = model(input_ids=a, labels=a, use_cache=False).loss + model(input_ids=b, labels=b, use_cache=False).loss
        loss.backward()  # each layer's saved input is per call, not per layer
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-6, name


@pytest.mark.parametrize("lora_on_down", [True, False])
def test_recompute_skips_the_unread_down_projection(lora_on_down: bool) -> None:
    """The recompute builds down_proj's backward without its GEMM: the same gradients for exactly
    one (tokens x intermediate x hidden) matmul fewer per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from splice.lora.layers import LoraConfig as Cfg

    def build(skip: bool) -> nn.Module:
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                             attn_implementation="sdpa")
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        targets = "all-linear" if lora_on_down else ("q_proj", "v_proj", "gate_proj", "up_proj")
        add_lora(model, Cfg(rank=4, alpha=8, targets=targets))
        for _, _, layer in lora_modules(model):
            nn.init.normal_(layer.lora_B.weight, std=0.2)
        freeze(model)
        fuse(model)
        checkpoint_layers(model, layers="all", skip_unread=skip)
        return model

    ids = torch.randint(0, 101, (2, 12))
    results, flops = [], []
    for skip in (False, True):
        model = build(skip)
        loss = model(input_ids=ids, labels=ids).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops.append(counter.get_total_flops())
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    assert_same(results[0], results[1])
    assert flops[0] - flops[1] == 2 * (2 * 24 * 96 * 64)  # 2 layers x one (24 x 96) @ (96 x 64)


def test_recompute_runs_under_the_forwards_causal_only_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """model_hidden_states vouches for plain causal attention during the forward; the recompute
    in backward (outside that call) must see the same setting, or a graph recomputes with the
    explicit mask Hugging Face built while capturing."""
    from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states

    model = lora_llama(dropout=0.0, layers=3)
    fuse(model)
    checkpoint_layers(model, layers="all")
    seen = spy_causal_only(monkeypatch)
    ids = torch.randint(0, 101, (2, 12))
    weight, _ = lm_head_params(model)
    causal_lm_loss(model_hidden_states(model, input_ids=ids), weight, ids).backward()
    assert seen == [True] * 6  # 3 layers forward, 3 recomputed in backward


# ----------------------------------------------------------------------------- 8-bit offload

# The LoRA gradients (all of them, as one vector) of a step with 8-bit layer inputs move by a
# small multiple of the inputs' rounding: e4m3's ~2.5% and int8's ~0.6% on these Gaussian-like
# rows; less when fused (the stash keeps the exact LoRA down-projections, only the rest is
# recomputed from the rounded input). Measured (3 layers, 2 x 24 tokens, dropout 0.1), (format,
# fused): fp8 0.081 plain / 0.020 fused, int8 0.013 / 0.0048; the tolerances are 1.5x those.
_GRAD_TOL = {("fp8", False): 0.12, ("fp8", True): 0.03, ("int8", False): 0.02, ("int8", True): 0.0075}


def _compressed_step(compression: str, *, fast: bool, offload: bool | int = True
                     ) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss and LoRA gradients) without and with ``compression`` of the offloaded layer inputs."""
    plain = lora_llama(layers=3, dropout=0.1)
    if fast:
        fuse(plain)
    results = []
    for c in ("none", compression):
        model = copy.deepcopy(plain)
        checkpoint_layers(model, layers="all", offload=offload, offload_compression=c)  # type: ignore[arg-type]
        results.append(loss_and_grads(model, torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(0)),
                                      seed=4))
    return results[0], results[1]


def _all_grads(result: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in result[1].values()])


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_compressed_offload_same_loss_close_grads(compression: str, fast: bool) -> None:
    exact, compressed = _compressed_step(compression, fast=fast)
    assert torch.equal(compressed[0], exact[0])  # the forward runs on the exact input
    assert compressed[1].keys() == exact[1].keys() and len(exact[1]) == 3 * 7 * 2
    error = rel_err(_all_grads(compressed), _all_grads(exact))
    assert 1e-4 < error < _GRAD_TOL[compression, fast]  # compressed (not exact), and close


@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_compressed_offload_fails_without_the_row_scales(compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerance above catches a broken dequantization: codes read back without their scales."""
    from splice.memory import offload

    monkeypatch.setattr(offload, "dequantize_rows", lambda codes, scales, dtype, device: codes.to(device, dtype))
    exact, compressed = _compressed_step(compression, fast=True)
    assert torch.equal(compressed[0], exact[0])
    assert rel_err(_all_grads(compressed), _all_grads(exact)) > 10 * _GRAD_TOL[compression, True]


def test_compression_only_of_the_offloaded_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    from splice.memory import offload

    shapes: list[torch.Size] = []
    real = offload.quantize_rows_8bit
    monkeypatch.setattr(offload, "quantize_rows_8bit", lambda x, c, out: (shapes.append(x.shape), real(x, c, out=out))[1])
    exact, compressed = _compressed_step("fp8", fast=True, offload=2)  # layer 0 keeps its input on the device
    assert shapes == [torch.Size([2, 24, 64])] * 2  # the stash's kept values are never compressed
    assert torch.equal(compressed[0], exact[0])
    assert rel_err(_all_grads(compressed), _all_grads(exact)) < _GRAD_TOL["fp8", True]


def test_compression_needs_offload() -> None:
    with pytest.raises(ValueError, match="offload_compression='fp8' compresses the layer inputs kept in "
                                         "host memory: pass offload=True"):
        checkpoint_layers(lora_llama(layers=2), layers="all", offload_compression="fp8")
    with pytest.raises(ValueError, match="offload_compression must be one of none, fp8, int8, got 'fp4'"):
        checkpoint_layers(lora_llama(layers=2), layers="all", offload=True, offload_compression="fp4")  # type: ignore[arg-type]
