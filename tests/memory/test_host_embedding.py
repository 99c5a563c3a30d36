"""splice.memory.host_embedding: a frozen input embedding in host memory gives the same loss and
gradients, frees its GPU table, survives .to(), refuses tied or trainable tables, and undoes."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.core.rewrite import unrewrite
from splice.memory.host_embedding import HostEmbedding, embeddings_to_host
from tests.numerics import DEVICES, GPU
from tests.tiny import llama, lora_llama, loss_and_grads


@pytest.mark.parametrize("device", DEVICES)
def test_same_loss_and_grads_table_on_the_host(device: str) -> None:
    plain = lora_llama(device=device, layers=2)
    moved = copy.deepcopy(plain)
    assert embeddings_to_host(moved) == ["model.embed_tokens"]
    table = moved.model.embed_tokens
    assert isinstance(table, HostEmbedding) and table.weight.device.type == "cpu"
    moved.to(device)  # the table stays on the host
    assert table.weight.device.type == "cpu" and next(moved.parameters()).device.type == device
    ids = torch.randint(0, 101, (2, 9), device=device)
    loss, grads = loss_and_grads(plain, ids)
    moved_loss, moved_grads = loss_and_grads(moved, ids)
    assert torch.equal(loss, moved_loss) and grads.keys() == moved_grads.keys() and grads
    for name in grads:  # the same rows reach the same kernels: bit-identical
        assert torch.equal(grads[name], moved_grads[name]), name


def test_state_dict_is_unchanged_and_unrewrite_puts_the_table_back() -> None:
    model = lora_llama(layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embeddings_to_host(model)
    after = model.state_dict()
    assert after.keys() == before.keys()  # a saved model still has its embedding
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert unrewrite(model, layer=lambda m: isinstance(m, HostEmbedding)) == ["model.embed_tokens"]
    restored = model.model.embed_tokens
    assert type(restored) is torch.nn.Embedding and not restored.weight.requires_grad
    assert torch.equal(restored.weight, before["model.embed_tokens.weight"])


def test_tied_or_trainable_tables_are_refused_and_nothing_changes() -> None:
    tied = llama(tie_word_embeddings=True)
    for p in tied.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="tied to another module"):
        embeddings_to_host(tied)
    assert type(tied.model.embed_tokens) is torch.nn.Embedding
    trainable = llama()
    with pytest.raises(ValueError, match="input embedding is trainable: freeze it"):
        embeddings_to_host(trainable)
    assert type(trainable.model.embed_tokens) is torch.nn.Embedding
    renormed = lora_llama(layers=1)
    renormed.model.embed_tokens.max_norm = 1.0
    with pytest.raises(ValueError, match="max_norm set"):
        embeddings_to_host(renormed)
    assert type(renormed.model.embed_tokens) is torch.nn.Embedding


@GPU
def test_gpu_table_memory_is_freed() -> None:
    model = lora_llama(device="cuda", dtype=torch.bfloat16, layers=1, hidden=256)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    embeddings_to_host(model)
    torch.cuda.synchronize()
    table_bytes = 101 * 256 * 2
    # the caching allocator rounds blocks up to 512 bytes
    assert before - torch.cuda.memory_allocated() >= table_bytes
