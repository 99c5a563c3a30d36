"""splice.fused.varlen: packed rows through the varlen kernel give the masked path's loss and LoRA gradients
(plain Hugging Face attention swapped by install_varlen_attention, splice.fuse's attention, activation
checkpointing with and without the kept attention, the other families), with no mask built.

On a CPU the varlen kernel is its PyTorch reference; with ``TRITON_INTERPRET=1`` set before pytest starts
the same tests run the Triton kernels in the interpreter.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import splice.fused.varlen as varlen_module
from splice.core.rewrite import unrewrite
from splice.data.batching import batches
from splice.data.rows import IGNORE_INDEX, Example
from splice.fused import modules as fused_modules
from splice.fused.apply import fuse, unfuse
from splice.fused.modules import FusedRopeAttention
from splice.fused.varlen import Packing, VarlenAttention, install_varlen_attention, varlen_unsupported
from splice.lora.apply import add_lora, lora_modules
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.memory.checkpointing import checkpoint_layers
from splice.training.loss import model_hidden_states, train_step_loss
from tests.numerics import HostSyncs, rel_err
from tests.tiny import FAMILY_CONFIGS, family_lm, lora_llama, randomize_lora

LENGTHS = [5, 1, 17, 9, 3, 11, 7, 2, 13]  # 3 rows of 24: odd lengths, a 1-token example, trailing pads


def packed_batch(vocab: int = 101, *, width: int = 24, rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """One packed batch of ``rows`` rows of ``width`` tokens (trailing pads in some rows)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in LENGTHS:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:]))  # the first token is a prompt
    (batch,) = batches(examples, batch_size=rows, pad_id=0, shuffle=False, pack=True, max_length=width)
    return batch


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = train_step_loss(model, batch, device=torch.device("cpu"), packed_attention=mode)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same_as_masked(model: nn.Module, batch: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    want_loss, want = loss_and_grads(model, batch, "mask")
    got_loss, got = loss_and_grads(model, batch, "varlen")
    assert rel_err(got_loss, want_loss) < tol
    assert got.keys() == want.keys() and len(got) == len(lora_modules(model)) * 2 > 0
    for name in want:
        assert rel_err(got[name], want[name]) < tol, name


def spy_attention(monkeypatch: pytest.MonkeyPatch, cls: type[nn.Module]) -> list[tuple[bool, bool]]:
    """(a Packing arrived, a mask arrived) for each call of ``cls.forward``, in call order."""
    seen: list[tuple[bool, bool]] = []
    real = cls.forward

    def spy(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append((isinstance(kwargs.get("splice_packing"), Packing), kwargs.get("attention_mask") is not None))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", spy)
    return seen


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The token count of each varlen_attention call made through splice.fused.varlen."""
    calls: list[int] = []
    real = varlen_module.varlen_attention

    def spy(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(varlen_module, "varlen_attention", spy)
    return calls


def test_plain_model_with_varlen_attention_matches_the_masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_llama()
    names = install_varlen_attention(model)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    batch = packed_batch()
    assert_same_as_masked(model, batch)
    seen, calls = spy_attention(monkeypatch, VarlenAttention), count_kernel_calls(monkeypatch)
    loss_and_grads(model, batch, "varlen")
    assert seen == [(True, False)] * 2 and calls == [72, 72]  # packing, no mask; all 3 x 24 tokens at once
    seen.clear()
    loss_and_grads(model, batch, "mask")
    assert seen == [(False, True)] * 2 and calls == [72, 72]  # the block mask Hugging Face built, no kernel


def test_fused_model_matches_the_masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = lora_llama()
    fuse(model)
    assert install_varlen_attention(model) == []  # splice.fuse's attention takes packed rows already
    batch = packed_batch()
    assert_same_as_masked(model, batch)
    seen = spy_attention(monkeypatch, FusedRopeAttention)
    loss_and_grads(model, batch, "varlen")
    assert seen == [(True, False)] * 2


@pytest.mark.parametrize("keep_attention", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_checkpointed_layers_recompute_through_the_kernel(fused: bool, keep_attention: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The recompute (autograd's thread) gets the packing with the layer's other arguments; kept attention
    (fused only) replays the forward's varlen graph."""
    model = lora_llama()
    if fused:
        fuse(model)
    else:
        install_varlen_attention(model)
    batch = packed_batch()
    want = loss_and_grads(model, batch, "mask")
    checkpoint_layers(model, layers="all", keep_attention=keep_attention)
    model.train()
    calls = count_kernel_calls(monkeypatch)
    got_loss, got = loss_and_grads(model, batch, "varlen")
    assert rel_err(got_loss, want[0]) < 1e-5
    for name in want[1]:
        assert rel_err(got[name], want[1][name]) < 1e-5, name
    # forward + recompute per layer; with kept attention the recompute reuses the forward's
    assert len(calls) == (2 if keep_attention and fused else 4)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_families_match_the_masked_path(family: str) -> None:
    """Mistral's and Qwen2's windows, Qwen3's and Gemma3's q/k norms, Gemma2's softcap and scalar."""
    model = family_lm(family, vocab=101, max_position_embeddings=64)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    randomize_lora(model)
    freeze(model)
    assert len(install_varlen_attention(model)) == 2
    batch = packed_batch()
    ids, pos = batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        want = model_hidden_states(model, input_ids=ids, position_ids=pos, packed_attention="mask")
        got = model_hidden_states(model, input_ids=ids, position_ids=pos, packed_attention="varlen")
    assert rel_err(got, want) < 1e-5
    if family != "Gemma2":  # final logit softcapping: splice's fused loss refuses it
        assert_same_as_masked(model, batch)


def test_auto_takes_the_kernel_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto": the mask on a CPU (the kernel's reference is no faster there), the kernel under Triton."""
    model = lora_llama()
    fuse(model)
    batch = packed_batch()
    calls = count_kernel_calls(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    loss_and_grads(model, batch, "auto")
    assert calls == []
    monkeypatch.setattr("splice.training.loss.use_triton", lambda *tensors: True)
    loss_and_grads(model, batch, "auto")
    assert calls == [72, 72]


def test_models_that_cannot_take_packed_rows_keep_the_mask() -> None:
    plain = lora_llama()
    assert "model.layers.0.self_attn (LlamaAttention) cannot take packed rows" in str(varlen_unsupported(plain))
    batch = packed_batch()
    with pytest.raises(ValueError, match="packed_attention='varlen' cannot run: .*LlamaAttention"):
        train_step_loss(plain, batch, device=torch.device("cpu"), packed_attention="varlen")
    with pytest.raises(ValueError, match="packed_attention must be one of auto, varlen, mask"):
        train_step_loss(plain, batch, device=torch.device("cpu"), packed_attention="flash")
    ids = batch["input_ids"]
    with pytest.raises(ValueError, match="takes packed rows: position_ids and no attention_mask"):
        model_hidden_states(plain, input_ids=ids, attention_mask=torch.ones_like(ids), packed_attention="varlen")
    dropping = lora_llama()
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.1
    fuse(dropping)
    dropping.train()
    assert "drops attention weights" in str(varlen_unsupported(dropping))
    dropping.eval()
    assert varlen_unsupported(dropping) is None


@pytest.mark.parametrize("family", ["Mistral", "Qwen2"])
def test_fuse_gives_other_families_varlen_attention_and_unfuse_takes_it_back(family: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed rows of a fused model: q/k/v of every layer as one lora_group node (adapters without dropout)."""
    groups: list[int] = []
    real = fused_modules.lora_group

    def counted(x: torch.Tensor, weights: list[torch.Tensor], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        groups.append(len(weights))
        return real(x, weights, *args, **kwargs)

    monkeypatch.setattr(fused_modules, "lora_group", counted)
    model = family_lm(family, vocab=101, max_position_embeddings=64)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")))
    randomize_lora(model)
    freeze(model)
    reference = copy.deepcopy(model)
    fuse(model)
    assert sum(isinstance(m, VarlenAttention) for m in model.modules()) == 2
    assert fuse(copy.deepcopy(model)) == []  # applying it twice changes nothing
    batch = packed_batch()
    with torch.no_grad():
        want = model_hidden_states(reference, input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        got = model_hidden_states(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  packed_attention="varlen")
    assert rel_err(got, want) < 1e-5
    assert groups == [3, 3]  # each of the 2 layers' q/k/v in one node
    assert_same_as_masked(model, batch)
    unfuse(model)
    assert not any(isinstance(m, VarlenAttention) for m in model.modules())
    fuse(model, varlen=False)
    assert not any(isinstance(m, VarlenAttention) for m in model.modules())


def test_unrewrite_puts_the_original_attention_back() -> None:
    model = lora_llama()
    reference = copy.deepcopy(model)
    install_varlen_attention(model)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():  # without a packing the swapped module is the original
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    unrewrite(model, layer=lambda m: isinstance(m, VarlenAttention))
    assert not any(isinstance(m, VarlenAttention) for m in model.modules())


def test_packing_reads_segments_as_hugging_face_does() -> None:
    """A segment starts at each row start and wherever a position is not its predecessor's + 1; positions
    become indices within the segment; no host sync."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 3, 4, 9, 10, 11]])
    with HostSyncs() as syncs:
        packing = Packing.from_position_ids(position_ids)
    assert syncs.synced == []
    assert packing.cu_seqlens.dtype == torch.int32 and packing.max_seqlen == 8
    assert packing.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 11, 13] + [16] * 10  # then empty segments
    assert packing.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 0, 1, 0, 1, 2]]
    cos, sin = torch.arange(8.0)[None, :, None].expand(1, 8, 4), -torch.arange(8.0)[None, :, None].expand(1, 8, 4)
    got_cos, got_sin = packing.rotary(cos, sin)
    assert got_cos.shape == (2, 8, 4) and torch.equal(got_cos[..., 0], packing.positions.float())
    assert torch.equal(got_sin, -got_cos)


def test_offset_positions_attend_the_same() -> None:
    """RoPE is relative: a segment whose positions start past 0 gives what Hugging Face's mask gives."""
    model = lora_llama()
    fuse(model)
    ids = torch.randint(3, 101, (2, 12))
    pos = torch.tensor([[3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25]])
    with torch.no_grad():
        want = model_hidden_states(model, input_ids=ids, position_ids=pos, packed_attention="mask")
        got = model_hidden_states(model, input_ids=ids, position_ids=pos, packed_attention="varlen")
    assert rel_err(got, want) < 1e-5
