"""What a checkpointed layer's forward keeps for its recompute (splice.memory.stash): same gradients,
less recompute work."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from splice.fused.apply import fuse
from splice.kernels import lora_group as lora_group_module
from splice.kernels import lora_linear as lora_linear_module
from splice.memory import stash
from splice.memory.checkpointing import checkpoint_layers
from tests.numerics import GPU
from tests.tiny import assert_same, lora_llama, loss_and_grads

HIDDEN, LAYERS, TOKENS = 64, 3, 2 * 12


@pytest.mark.parametrize("keep_attention", [False, True])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])  # 0: q/k/v and gate/up as one node each (lora_group)
def test_same_loss_and_grads_as_without_checkpointing(keep_attention: bool, offload: bool, dropout: float) -> None:
    plain = lora_llama(dropout=dropout, layers=3)
    fuse(plain)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=offload, keep_attention=keep_attention)
    ids = torch.randint(0, 101, (2, 12))
    assert_same(loss_and_grads(plain, ids, seed=3), loss_and_grads(ckpt, ids, seed=3))


def _backward_work(keep_attention: bool, monkeypatch: pytest.MonkeyPatch
                   ) -> tuple[int, int, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(matmul FLOPs, attention calls) of the backward, and the loss and gradients."""
    model = lora_llama(dropout=0.0, layers=LAYERS, hidden=HIDDEN)
    fuse(model)
    checkpoint_layers(model, layers="all", keep_attention=keep_attention, skip_unread=True)
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch, FlopCounterMode(display=False) as counter:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return counter.get_total_flops(), len(calls), (loss.detach(), grads)


def test_kept_attention_skips_the_projections_and_the_attention_forward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly the q/k/v/o GEMMs and the attention forward leave the backward."""
    flops_recompute, calls_recompute, result_recompute = _backward_work(False, monkeypatch)
    flops_kept, calls_kept, result_kept = _backward_work(True, monkeypatch)
    assert_same(result_recompute, result_kept)
    heads, kv_heads, head_dim = 4, 2, HIDDEN // 4
    projections = 2 * TOKENS * HIDDEN * (heads + 2 * kv_heads + heads) * head_dim
    assert flops_recompute - flops_kept == LAYERS * projections
    assert (calls_recompute, calls_kept) == (LAYERS, 0)


def _down_ranks(monkeypatch: pytest.MonkeyPatch, module: object) -> list[int]:
    """The rank (rows of A) of every down-projection ``module._down`` computes from now on."""
    calls: list[int] = []
    original = module._down  # type: ignore[attr-defined]

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[1].shape[0])  # type: ignore[attr-defined]
        return original(*args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(module, "_down", spy)
    return calls


def _checkpointed_loss(dropout: float) -> torch.Tensor:
    model = lora_llama(dropout=dropout, layers=3)
    fuse(model)
    checkpoint_layers(model, layers="all")
    ids = torch.randint(0, 101, (2, 12))
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_reuses_the_stacked_down_projections_of_sibling_groups(monkeypatch: pytest.MonkeyPatch,
                                                                         dropout: float) -> None:
    """q/k/v and gate/up each compute one stacked U = [D_1(x) A_1^T ..] in the forward (x read once; with
    dropout each adapter its own mask), o and down their own; the recompute computes none."""
    single = _down_ranks(monkeypatch, lora_linear_module)
    stacked = _down_ranks(monkeypatch, lora_group_module)
    loss = _checkpointed_loss(dropout)
    assert (single, stacked) == ([4] * 2 * 3, [3 * 4, 2 * 4] * 3)  # o and down; q/k/v and gate/up at rank 4
    loss.backward()
    assert (len(single), len(stacked)) == (2 * 3, 2 * 3)


def test_take_past_the_end_names_the_problem() -> None:
    kept = stash.Stash(offload=False, attention=False)
    kept.put(torch.ones(2))
    assert torch.equal(kept.take(), torch.ones(2))
    with pytest.raises(RuntimeError, match="same modules in the same order"):
        kept.take()


def test_substitute_passes_the_gradient_to_the_graph() -> None:
    x = torch.randn(3, requires_grad=True)
    graph = x * 2  # its value is never read
    value = torch.randn(3)
    out = stash.substitute(graph, value)
    assert torch.equal(out, value)
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))  # type: ignore[arg-type]


@GPU
def test_gpu_offloaded_views_of_one_storage_are_kept_once() -> None:
    kept = stash.Stash(offload=True, attention=True)
    out = torch.randn(2, 64, 64, 128, device="cuda", dtype=torch.bfloat16)  # (B, S, H, D): 2 MiB
    view = out.transpose(1, 2)  # (B, H, S, D) view of the same storage
    kept.put(out)
    kept.put(view)
    kept.put(torch.randn(2, 64, 64, 128, device="cuda", dtype=torch.bfloat16))
    assert len(kept._stored) == 2
    kept.prefetch()
    a, b, c = kept.take(), kept.take(), kept.take()
    assert a.is_cuda and torch.equal(a, out) and torch.equal(b, view)
    assert b.data_ptr() == a.data_ptr() and c.data_ptr() != a.data_ptr()


@GPU
@pytest.mark.parametrize("offload", [False, True])
def test_gpu_kept_attention_same_grads_bf16(offload: bool) -> None:
    plain = lora_llama(dropout=0.1, device="cuda", dtype=torch.bfloat16, hidden=256, layers=3)
    fuse(plain)
    kept = copy.deepcopy(plain)
    checkpoint_layers(kept, layers="all", offload=offload, keep_attention=True)
    ids = torch.randint(0, 101, (2, 1100), device="cuda")  # >= 2048 tokens: the Triton LoRA path
    assert_same(loss_and_grads(plain, ids, seed=3), loss_and_grads(kept, ids, seed=3), tol=1e-2)


@GPU
def test_gpu_kept_attention_holds_no_gpu_copies_when_offloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """With offload, what the attention keeps lives in host memory: after the forward the GPU
    holds what the attention-recomputing setting holds (q/k/v would be 2 MiB a layer)."""
    monkeypatch.setattr(stash, "_MIN_OFFLOAD_BYTES", 0)  # offload even these small tensors
    held = []
    for keep in (False, True):
        model = lora_llama(dropout=0.0, device="cuda", dtype=torch.bfloat16, hidden=256, layers=4)
        fuse(model)
        checkpoint_layers(model, layers="all", offload=True, keep_attention=keep)
        ids = torch.randint(0, 101, (2, 1024), device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)
        loss.backward()
        del model, loss
    assert held[1] - held[0] < 1 << 20, held
