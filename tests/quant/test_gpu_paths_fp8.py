"""GPU-only paths of splice.quant.fp8 (skipped without FP8 tensor cores, compute capability 8.9+).

The CPU runs torch._scaled_mm's emulation, which takes any dtype and layout; cuBLASLt / CUTLASS on the
GPU have rules of their own (the row-wise kernel's output dtypes, the first operand row-major, the
second column-major). Each case here checks the FP8 GEMMs, forward and input gradient, against the
emulated references (same codes and scales, fp32 sums; 1e-2 allows the GPU's accumulation order and
bf16/fp16 output): fp16 and fp32 activations, a kept transpose, 3-D inputs and a transposed (column-major)
2-D input, and LoRA on an FP8 tiny Llama against the same model in bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import splice
from splice.quant.fp8 import FP8Linear, fp8_linear_reference, quantize_fp8, quantize_rows
from tests import tiny
from tests.numerics import rel_err

FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")


def _emulated(x: torch.Tensor, g: torch.Tensor, q: FP8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 layer's output and input gradient with its roundings, in fp32 sums."""
    y = fp8_linear_reference(x, q.qweight, q.scale, None if q.bias is None else q.bias.detach(), quantize_input=True)
    g2 = g.reshape(-1, g.shape[-1])
    codes, rows = quantize_rows(g2 * q.scale.to(g2.dtype))
    dx = ((codes.float() * rows) @ q.qweight.float()).reshape(*g.shape[:-1], q.in_features)
    return y, dx


@FP8_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("keep_transpose", [False, True])
@pytest.mark.parametrize("shape", [(37,), (2, 19), "transposed"])
def test_fp8_gemms_on_the_gpu(dtype: torch.dtype, keep_transpose: bool, shape: tuple[int, ...] | str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=True)
    q = FP8Linear.from_linear(linear, dtype=dtype, keep_transpose=keep_transpose).cuda()
    assert q.fast
    if shape == "transposed":  # (37, 512) column-major: the kernels want the first operand row-major
        x = torch.randn(512, 37, device="cuda", dtype=dtype).t()
    else:
        x = torch.randn(*shape, 512, device="cuda", dtype=dtype)
    g = torch.randn(*x.shape[:-1], 256, device="cuda", dtype=dtype)
    leaf = x.detach().requires_grad_()
    y = q(leaf)
    y.backward(g)
    assert y.dtype == dtype and leaf.grad is not None and leaf.grad.dtype == dtype
    want_y, want_dx = _emulated(x, g, q)
    assert rel_err(y, want_y) < 1e-2
    assert rel_err(leaf.grad, want_dx) < 1e-2


@FP8_GPU
def test_lora_on_an_fp8_tiny_llama_follows_bf16() -> None:
    """Loss and LoRA gradients of the FP8 base within the FP8 roundings of the bf16 base's (every
    projection of the tiny Llama takes the FP8 GEMMs: its widths are multiples of 16)."""
    model = tiny.llama(hidden=64, intermediate=128).to(device="cuda", dtype=torch.bfloat16)
    splice.add_lora(model, splice.LoraConfig(targets="all-linear", rank=8))
    tiny.randomize_lora(model)
    fp8 = copy.deepcopy(model)
    quantized = quantize_fp8(fp8)
    assert quantized and all(m.fast for m in fp8.modules() if isinstance(m, FP8Linear))
    ids = tiny.tokens().cuda()
    grads = []
    for m in (model, fp8):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if "lora" in n and p.grad is not None}))
    (loss, want), (got_loss, got) = grads
    assert torch.isfinite(got_loss) and rel_err(got_loss, loss) < 5e-2
    assert got.keys() == want.keys() and want
    assert max(rel_err(got[n], want[n]) for n in want) < 0.2
