"""splice.training.loss: the chunked fused linear + cross-entropy against the full-logits reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from splice.lora.apply import add_lora, lora_modules
from splice.lora.layers import LoraConfig
from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states, naive_causal_lm_loss
from tests import tiny
from tests.numerics import HostSyncs

aten = torch.ops.aten
_MATMULS = {aten.mm.default, aten.addmm.default, aten.addmm_.default}


class OpRecorder(TorchDispatchMode):
    """Records the largest tensor any aten op produced and how many matmuls ran."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.matmuls += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _problem(
    b: int, t: int, h: int, v: int, *,
    seed: int = 0, dtype: torch.dtype = torch.float32, p_ignore: float = 0.25,
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < p_ignore] = -100
    return hidden, weight, labels


def _grads(fn: Callable[[], Tensor], *tensors: Tensor) -> tuple[Tensor, list[Tensor]]:
    for x in tensors:
        x.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), [x.grad.clone() for x in tensors]


def _naive(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, **kw: Any) -> Tensor:
    return naive_causal_lm_loss(F.linear(hidden, weight, bias), labels, **kw)


@pytest.mark.parametrize(
    ("b", "t", "chunk"),
    [(2, 7, 1024), (3, 5, 1), (3, 17, 4), (1, 2, 3), (3, 33, 7)],
)
def test_matches_naive_loss_and_grads_fp32(b: int, t: int, chunk: int) -> None:
    hidden, weight, labels = _problem(b, t, 16, 37, seed=b * 100 + t)
    fused, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=chunk), hidden, weight)
    ref, (rh, rw) = _grads(lambda: _naive(hidden, weight, labels), hidden, weight)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("p_ignore", [0.0, 0.6, 1.0])
def test_static_shapes_gives_the_same_loss_and_grads(reduction: str, p_ignore: float) -> None:
    hidden, weight, labels = _problem(3, 11, 16, 29, seed=21, p_ignore=p_ignore)
    bias = torch.randn(29, generator=torch.Generator().manual_seed(5)).requires_grad_()

    def run(static: bool) -> tuple[Tensor, list[Tensor]]:
        return _grads(lambda: causal_lm_loss(hidden, weight, labels, lm_head_bias=bias, chunk_size=4,
                                             reduction=reduction, static_shapes=static), hidden, weight, bias)

    (ref, want), (got_loss, got) = run(False), run(True)
    torch.testing.assert_close(got_loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_static_shapes_runs_without_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """static_shapes reads no tensor value on the host (no .item()/nonzero), forward or backward,
    apart from the label range check, which only CPU labels get (GPU labels skip it)."""
    import splice.training.loss as loss_module

    hidden, weight, labels = _problem(2, 9, 8, 13, seed=22)
    with HostSyncs() as default:
        causal_lm_loss(hidden, weight, labels, chunk_size=4)
    assert any("nonzero" in s for s in default.synced)  # the default path selects rows on the host
    monkeypatch.setattr(loss_module, "check_labels", lambda *a, **k: None)  # as for GPU labels
    with HostSyncs() as static:
        loss = causal_lm_loss(hidden, weight, labels, static_shapes=True, chunk_size=4)
        loss.backward()
    assert static.synced == []


def test_float64_stays_float64() -> None:
    hidden, weight, labels = _problem(2, 9, 8, 15, seed=16, dtype=torch.float64)
    fused, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=4), hidden, weight)
    ref, (rh, rw) = _grads(lambda: _naive(hidden, weight, labels), hidden, weight)
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_bias_is_included_with_its_gradient() -> None:
    hidden, weight, labels = _problem(2, 9, 8, 21, seed=3)
    bias = torch.randn(21, generator=torch.Generator().manual_seed(4)).requires_grad_()
    fused, got = _grads(
        lambda: causal_lm_loss(hidden, weight, labels, lm_head_bias=bias, chunk_size=5), hidden, weight, bias
    )
    ref, want = _grads(lambda: _naive(hidden, weight, labels, bias), hidden, weight, bias)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_ignored_targets_get_no_gradient_and_do_not_count() -> None:
    hidden, weight, labels = _problem(2, 6, 8, 11, seed=5, p_ignore=0.0)
    labels[0, 1:4] = 7  # position t predicts labels[t + 1]: ignoring labels[0, 2] frees hidden[0, 1]
    labels[0, 2] = -1
    loss, (gh,) = _grads(lambda: causal_lm_loss(hidden, weight, labels, ignore_index=-1, chunk_size=2), hidden)
    ref = _naive(hidden, weight, labels, ignore_index=-1)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    assert torch.all(gh[0, 1] == 0) and torch.all(gh[:, -1] == 0)  # ignored target, and the last position
    assert torch.all(gh[0, 0] != 0) and torch.all(gh[0, 2] != 0)
    # Changing the value of an ignored label changes nothing; the mean is over the 9 real targets.
    labels_other = labels.clone()
    labels_other[0, 0] = 3  # labels[:, 0] is never a target
    assert causal_lm_loss(hidden, weight, labels_other, ignore_index=-1, chunk_size=2).item() == loss.item()
    total = causal_lm_loss(hidden, weight, labels, ignore_index=-1, reduction="sum")
    torch.testing.assert_close(total / 9, loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction: str) -> None:
    hidden, weight, labels = _problem(2, 4, 8, 11, seed=6)
    labels[:, 1:] = -100
    loss, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, reduction=reduction), hidden, weight)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert naive_causal_lm_loss(torch.randn(2, 4, 11), labels, reduction=reduction).item() == 0.0


def test_sum_reduction_matches_naive_sum_and_scales_the_mean() -> None:
    hidden, weight, labels = _problem(3, 10, 8, 19, seed=7)
    n = int((labels[:, 1:] != -100).sum())
    total, (gh, gw) = _grads(
        lambda: causal_lm_loss(hidden, weight, labels, reduction="sum", chunk_size=4), hidden, weight
    )
    ref, (rh, rw) = _grads(lambda: _naive(hidden, weight, labels, reduction="sum"), hidden, weight)
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    mean, (mh, _) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=4), hidden, weight)
    torch.testing.assert_close(mean * n, total, rtol=1e-6, atol=0)
    torch.testing.assert_close(mh * n, gh, rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales_the_stored_gradients() -> None:
    hidden, weight, labels = _problem(2, 8, 8, 13, seed=8)
    _, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=3), hidden, weight)
    _, (sh, sw) = _grads(lambda: 2.5 * causal_lm_loss(hidden, weight, labels, chunk_size=3), hidden, weight)
    torch.testing.assert_close(sh, 2.5 * gh, rtol=1e-6, atol=0)
    torch.testing.assert_close(sw, 2.5 * gw, rtol=1e-6, atol=0)


def test_bf16_inputs_accumulate_in_fp32() -> None:
    # 128 target rows in chunks of 1: a bf16 running sum of the weight gradient would be off by
    # ~1.4e-2 relative; the fp32 accumulator leaves only the final rounding to bf16 (2^-8).
    hidden, weight, labels = _problem(2, 65, 16, 32, seed=9, dtype=torch.bfloat16, p_ignore=0.0)
    loss, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=1), hidden, weight)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and loss.dtype == torch.float32
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref, (rh, rw) = _grads(lambda: _naive(h64, w64, labels), h64, w64)
    # Logits from a bf16 matmul (accumulated in fp32, rounded to bf16): ~2^-9 relative per logit.
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=0)
    # Elementwise: bf16 rounding (2^-8 relative) plus cancellation, judged against the largest entry.
    torch.testing.assert_close(gh.double(), rh, rtol=1e-2, atol=6e-3 * rh.abs().max().item())
    torch.testing.assert_close(gw.double(), rw, rtol=1e-2, atol=6e-3 * rw.abs().max().item())
    rel_err = ((gw.double() - rw).norm() / rw.norm()).item()
    assert rel_err < 5e-3, rel_err  # a bf16 running sum gives 1.4e-2 here


def test_autocast_runs_the_matmuls_in_bf16_and_keeps_input_dtypes() -> None:
    hidden, weight, labels = _problem(2, 9, 16, 24, seed=15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, (gh, gw) = _grads(lambda: causal_lm_loss(hidden, weight, labels, chunk_size=4), hidden, weight)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    # The same as casting the inputs to bf16 ourselves (autocast's lm_head): bit for bit.
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    ref, (rh, rw) = _grads(lambda: causal_lm_loss(h16, w16, labels, chunk_size=4), h16, w16)
    assert torch.equal(loss, ref) and torch.equal(gh, rh.float())
    torch.testing.assert_close(gw, rw.float(), rtol=2**-8, atol=0)  # only the final bf16 rounding
    assert not torch.equal(loss, causal_lm_loss(hidden, weight, labels, chunk_size=4))


def test_frozen_weight_skips_its_matmul() -> None:
    hidden, weight, labels = _problem(2, 11, 8, 17, seed=10, p_ignore=0.0)  # 20 targets
    frozen = weight.detach()
    with OpRecorder() as frozen_ops:
        loss, (gh,) = _grads(lambda: causal_lm_loss(hidden, frozen, labels, chunk_size=5), hidden)
    with OpRecorder() as full_ops:
        causal_lm_loss(hidden, weight, labels, chunk_size=5).backward()
    ref, (rh,) = _grads(lambda: _naive(hidden, frozen, labels), hidden)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    assert frozen.grad is None
    assert frozen_ops.matmuls == 2 * 4 and full_ops.matmuls == 3 * 4  # 4 chunks of 5 rows


def test_hidden_without_grad_and_no_grad_mode() -> None:
    hidden, weight, labels = _problem(2, 6, 8, 9, seed=11)
    fixed = hidden.detach()
    _, (gw,) = _grads(lambda: causal_lm_loss(fixed, weight, labels), weight)
    _, (rw,) = _grads(lambda: _naive(fixed, weight, labels), weight)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), OpRecorder() as ops:
        loss = causal_lm_loss(hidden, weight, labels, chunk_size=3)
    assert not loss.requires_grad and ops.matmuls == 3  # logits only: 8 targets in 3 chunks
    torch.testing.assert_close(loss, _naive(fixed, weight, labels), rtol=1e-6, atol=1e-6)


def test_never_materialises_tokens_by_vocab(monkeypatch: pytest.MonkeyPatch) -> None:
    # N = 2 * 1024 = 2048 targets, V = 50_000: full logits would be 1e8 floats (400 MB).
    monkeypatch.setenv("SPLICE_NO_TRITON", "1")  # Triton's interpreter makes its own big copies
    b, t, h, v, chunk = 2, 1025, 16, 50_000, 128
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g) / 4
    labels = torch.randint(0, v, (b, t), generator=g)
    with OpRecorder() as ops:
        loss = causal_lm_loss(hidden, weight, labels, chunk_size=chunk)
        loss.backward()
    assert ops.largest <= chunk * v < (b * (t - 1) * v) // 10
    assert torch.isfinite(loss) and hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # Spot-check: the loss of the first chunk's rows alone, via the reference.
    small = labels.clone()
    small[0, chunk + 1 :] = -100
    small[1] = -100
    with torch.no_grad():
        ref = naive_causal_lm_loss(hidden[:, : chunk + 1] @ weight.T, small[:, : chunk + 1])
        got = causal_lm_loss(hidden, weight, small, chunk_size=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # The recorder does see the full logits of the naive path.
    with OpRecorder() as naive_ops, torch.no_grad():
        naive_causal_lm_loss(hidden[:, :65] @ weight.T, labels[:, :65])
    assert naive_ops.largest >= 2 * 65 * v


def _llama() -> LlamaForCausalLM:
    return tiny.llama(vocab=128, positions=64)


def _gpt2() -> GPT2LMHeadModel:
    return tiny.gpt2(vocab=128)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_model_hidden_states_reproduce_hf_logits_and_loss(make: Callable[[], Any]) -> None:
    model = make()
    g = torch.Generator().manual_seed(13)
    input_ids = torch.randint(0, 128, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    hidden = model_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
    weight, bias = lm_head_params(model)
    assert bias is None and weight is model.get_output_embeddings().weight
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(hidden @ weight.T, out.logits, rtol=1e-5, atol=1e-5)
    loss = causal_lm_loss(hidden, weight, labels, chunk_size=8)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_lora_gradients_match_the_full_logits_path() -> None:
    model = _llama()
    add_lora(model, LoraConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    for _, _, layer in lora_modules(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(14)
    input_ids = torch.randint(0, 128, (2, 10), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt

    def fused() -> Tensor:
        weight, _ = lm_head_params(model)
        hidden = model_hidden_states(model, input_ids=input_ids)
        return causal_lm_loss(hidden, weight, labels, chunk_size=5)

    loss, got = _grads(fused, *params)
    ref, want = _grads(lambda: naive_causal_lm_loss(model(input_ids=input_ids).logits, labels), *params)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert len(got) == 12 and all(p.grad is not None for p in params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model.lm_head.weight.grad is None


def test_lm_head_params_refuses_a_rewritten_head() -> None:
    model = _gpt2()
    add_lora(model, LoraConfig(targets=["lm_head"]))
    with pytest.raises(ValueError, match="output head is wrapped by a splice rewrite"):
        lm_head_params(model)


def test_lm_head_params_refuses_softcapped_logits() -> None:
    model = _llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_params(model)


def test_bad_inputs_are_named() -> None:
    hidden, weight, labels = _problem(2, 5, 8, 11)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        causal_lm_loss(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        causal_lm_loss(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) must equal"):
        causal_lm_loss(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match=r"hidden must be \(batch, seq, hidden\)"):
        causal_lm_loss(hidden[0], weight, labels)
    with pytest.raises(ValueError, match=r"lm_head_weight must be \(vocab, hidden=8\)"):
        causal_lm_loss(hidden, weight.T, labels)
    with pytest.raises(ValueError, match=r"labels contain ids outside \[0, 11\)"):
        causal_lm_loss(hidden, weight, labels.clamp(min=0) + 11)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        causal_lm_loss(hidden, weight, labels.float())
