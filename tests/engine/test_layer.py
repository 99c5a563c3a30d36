"""splice.engine.layer: a decoder layer with its residual adds in the GEMMs, against the layer's own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from splice.engine.attention import StepAttention, install_paged_attention, paged_step
from splice.engine.layer import linear_residual, run_layer
from splice.lora.apply import add_lora
from splice.lora.layers import LoraConfig
from tests import tiny
from tests.numerics import rel_err


class _Count(TorchDispatchMode):
    """The aten ops a block runs, by name (real dispatch, nothing replaced)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _layer_outputs(model: nn.Module, *, fused: bool) -> tuple[torch.Tensor, list[str]]:
    """Layer 0's output for a 6-token prompt written into a fresh paged cache, and the ops it ran."""
    config = model.config
    kv, d = config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    caches = [torch.zeros(4, 4, kv, d) for _ in range(config.num_hidden_layers)]
    step = StepAttention(key_caches=caches, value_caches=[c.clone() for c in caches],
                         slot_mapping=torch.arange(4, 10), block_tables=torch.tensor([[1, 2, 3]], dtype=torch.int32),
                         seq_lens=torch.tensor([6], dtype=torch.int32), query_start_loc=torch.tensor([0, 6], dtype=torch.int32),
                         max_query_len=6, max_seq_len=6)
    base = model.model
    ids = tiny.tokens(seed=4, batch=1, length=6)[0][:, None]  # (T, 1): one token a row
    positions = torch.arange(6)[:, None]
    layer = base.layers[0]
    with torch.no_grad(), paged_step(step):
        hidden = base.embed_tokens(ids)
        rope = base.rotary_emb(hidden, positions)
        with _Count() as count:
            if fused:
                out = run_layer(layer, hidden, positions=positions, position_embeddings=rope)
            else:
                out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
    return (out[0] if isinstance(out, tuple) else out), count.ops


@pytest.mark.parametrize("family", ["Llama", "Qwen3", "Mistral"])
def test_residual_adds_run_inside_the_gemms_with_the_same_result(family: str) -> None:
    model = tiny.llama() if family == "Llama" else tiny.family_lm(family)
    install_paged_attention(model)
    want, plain_ops = _layer_outputs(model, fused=False)
    got, fused_ops = _layer_outputs(model, fused=True)
    assert rel_err(got, want) < 1e-6
    # o_proj and down_proj, in place on the residual stream (the out-of-place addmm copies it first)
    assert fused_ops.count("addmm_") == 2 and "addmm" not in fused_ops and "addmm_" not in plain_ops
    assert fused_ops.count("add") == plain_ops.count("add") - 2  # the two residual adds are gone


def test_layers_whose_projections_are_not_plain_linears_run_their_own_forward() -> None:
    model = tiny.llama()
    add_lora(model, LoraConfig(name="a", rank=4, targets="all-linear"))
    tiny.randomize_lora(model, seed=2)
    install_paged_attention(model)
    want, _ = _layer_outputs(model, fused=False)
    got, ops = _layer_outputs(model, fused=True)
    assert rel_err(got, want) < 1e-6 and "addmm" not in ops and "addmm_" not in ops


def test_linear_residual_keeps_the_bias_and_dtype_of_other_linears() -> None:
    torch.manual_seed(0)
    x, residual = torch.randn(5, 1, 8), torch.randn(5, 1, 6)
    for linear in (nn.Linear(8, 6, bias=False), nn.Linear(8, 6), nn.Linear(8, 6, bias=False).double()):
        stream = residual.clone()
        with torch.no_grad():
            got = linear_residual(linear, x.to(linear.weight.dtype), stream)
            want = residual + linear(x.to(linear.weight.dtype)).to(residual.dtype)
        assert got.shape == residual.shape and rel_err(got, want) < 1e-6
        # the plain bias-free linear of the stream's dtype adds into the stream itself; the others leave it
        in_place = linear.bias is None and linear.weight.dtype == residual.dtype
        assert (got.data_ptr() == stream.data_ptr()) == in_place
        assert torch.equal(stream, got if in_place else residual)


def test_linear_residual_accumulates_a_fused_lora_projection_in_place_only_in_inference() -> None:
    """A training model's fused LoRA linear (GRPO's rollouts): ``residual + base(x) + s (x A^T) B^T`` added
    into the stream itself, fp32 masters or an engine call's copies alike; with autograd on, with dropout
    in training mode, or over a biased base, the module's own forward and an add (the stream untouched)."""
    from splice.fused.apply import fuse
    from splice.fused.modules import FusedLoraLinear
    from splice.lora.casts import AdapterCasts

    torch.manual_seed(0)
    for bias, dropout in ((False, 0.0), (True, 0.0), (False, 0.5)):
        model = nn.Sequential(nn.Linear(16, 12, bias=bias))
        add_lora(model, LoraConfig(rank=4, alpha=8, dropout=dropout, targets=("0",)))
        tiny.randomize_lora(model, seed=2)
        fuse(model)
        module = model[0]
        assert isinstance(module, FusedLoraLinear)
        x, residual = torch.randn(5, 1, 16), torch.randn(5, 1, 12)
        model.eval()
        with torch.no_grad():
            want = residual + module(x)
        for training in (False, True):
            model.train(training)
            applies = not bias and not (training and dropout > 0)
            stream = residual.clone()
            with torch.no_grad():
                got = linear_residual(module, x, stream)
            assert (got.data_ptr() == stream.data_ptr()) == applies
            assert torch.equal(stream, got if applies else residual)
            if not training or dropout == 0:
                assert rel_err(got, want) < 1e-6
        model.eval()
        stream = residual.clone().requires_grad_(False)
        got = linear_residual(module, x.requires_grad_(True), stream)  # autograd on: the module's own forward
        assert got.data_ptr() != stream.data_ptr() and torch.equal(stream, residual)
        x.requires_grad_(False)
    half = nn.Sequential(nn.Linear(16, 12, bias=False)).to(torch.bfloat16)  # fp32 masters over a bf16 base
    add_lora(half, LoraConfig(rank=4, alpha=8, targets=("0",)))
    tiny.randomize_lora(half, seed=2)
    fuse(half)
    casts = AdapterCasts(half, dtype=torch.bfloat16)
    casts.refresh()
    x, residual = torch.randn(5, 1, 16).to(torch.bfloat16), torch.randn(5, 1, 12).to(torch.bfloat16)
    with torch.no_grad():
        plain = linear_residual(half[0], x, residual.clone())
        with casts.active():
            assert torch.equal(linear_residual(half[0], x, residual.clone()), plain)
        assert rel_err(plain, residual + half[0](x)) < 1e-2  # bf16: one rounding order against another
