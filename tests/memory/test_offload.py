"""splice.memory.offload: pinned buffers of exactly the asked size (large ones registered with CUDA
rather than rounded up to a power of two by torch's pinned allocator) carry offloaded checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.fused.apply import fuse
from splice.memory import offload
from splice.memory.checkpointing import checkpoint_layers, release_pinned_memory
from tests.numerics import GPU
from tests.tiny import assert_same, lora_llama, loss_and_grads


@GPU
def test_gpu_large_buffer_is_pinned_at_its_exact_size() -> None:
    shape = (5, 1024, 8192)  # 80 MiB of fp16: over the threshold, not a power of two
    buffer = offload.pinned_empty(shape, torch.float16)
    assert buffer.shape == shape and buffer.is_pinned()
    assert buffer.untyped_storage().nbytes() == 5 * 1024 * 8192 * 2
    source = torch.randn(shape, device="cuda", dtype=torch.float16)
    buffer.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buffer.to("cuda"), source)


@GPU
def test_gpu_offloaded_checkpoints_through_registered_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "_EXACT_PIN_BYTES", 0)  # every buffer takes the register path
    plain = lora_llama(device="cuda", dtype=torch.bfloat16, layers=3, hidden=256, dropout=0.1)
    fuse(plain)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=True)
    ids = torch.randint(0, 101, (2, 512), device="cuda")
    expected = loss_and_grads(plain, ids, seed=1)
    for _ in range(2):  # the second step reuses the pooled buffers
        assert_same(expected, loss_and_grads(ckpt, ids, seed=1), tol=2e-2)
    release_pinned_memory(ckpt)  # unregistered after the pending copies finish
