"""NF4 dequantization: the Triton kernel against the PyTorch reference; NF4 bases in the fused path."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.kernels.lora_linear import lora_linear
from splice.kernels.nf4 import dequantize_absmax_reference, dequantize_nf4, dequantize_nf4_reference
from splice.quant.nf4 import to_nf4
from tests import tiny
from tests.numerics import GPU, rel_err


def test_reference_is_the_formula() -> None:
    w = torch.randn(6, 20)
    t = to_nf4(w, block_size=8)
    codes = torch.stack(((t.packed >> 4) & 0xF, t.packed & 0xF), 1).reshape(-1)[:120]
    absmax = dequantize_absmax_reference(t.qabsmax, t.scale2, t.offset, t.code2)  # type: ignore[arg-type]
    expected = torch.tensor([t.code[c] * absmax[j // 8] for j, c in enumerate(codes.tolist())])
    assert torch.equal(t.dequantize(torch.float32).reshape(-1), expected)
    # and it is near the weight: within half the widest NF4 gap of each block's absmax
    assert ((t.dequantize(torch.float32) - w).abs().reshape(-1) <= absmax.repeat_interleave(8)[:120] * 0.17).all()


@GPU
@pytest.mark.parametrize("shape", [(4096, 4096), (37, 29), (5, 3), (1000, 1024), (14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_dequant_matches_reference(shape: tuple[int, int], dtype: torch.dtype, double_quant: bool) -> None:
    w = torch.randn(*shape, device="cuda") * 0.02
    t = to_nf4(w, double_quant=double_quant)
    ours = t.dequantize(dtype)
    ref = dequantize_nf4_reference(t.packed, t.fp32_absmax(), t.code, shape=shape, block_size=64, dtype=dtype)
    if double_quant:  # the kernel may fuse the absmax's multiply-add (one fp32 rounding less)
        torch.testing.assert_close(ours, ref, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=0)
    else:
        assert torch.equal(ours, ref)
    out = torch.empty(shape, dtype=dtype, device="cuda")
    assert dequantize_nf4(t.packed, t.code, shape=shape, block_size=64, dtype=dtype, absmax=t.absmax,
                          qabsmax=t.qabsmax, scale2=t.scale2, offset=t.offset, code2=t.code2, out=out) is out


@GPU
def test_fused_lora_over_nf4_matches_dequantized_base() -> None:
    torch.manual_seed(0)
    n, d_in, d_out, r = 4096, 1024, 768, 16  # >= LORA_KERNEL_MIN_TOKENS: the Triton LoRA path
    t = to_nf4(torch.randn(d_out, d_in, device="cuda") * 0.02, dtype=torch.bfloat16)
    a = (torch.randn(r, d_in, device="cuda") * 0.02).requires_grad_()
    b = (torch.randn(d_out, r, device="cuda") * 0.02).requires_grad_()
    x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = lora_linear(x, t, None, a, b, scale=2.0)
    y.float().square().mean().backward()
    grads = [x.grad, a.grad, b.grad]
    x.grad = a.grad = b.grad = None
    y2 = lora_linear(x, t.dequantize(), None, a, b, scale=2.0)
    y2.float().square().mean().backward()
    # the same bf16 GEMMs, maybe another cuBLAS algorithm (t + mm vs linear): bf16-level agreement
    assert rel_err(y, y2) < 1e-3
    for g, g2 in zip(grads, [x.grad, a.grad, b.grad]):
        assert rel_err(g, g2) < 1e-3


@GPU
@pytest.mark.parametrize("order", ["quantize_first", "lora_first"])
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_trains_on_gpu_through_the_fast_path(order: str, quantize: str) -> None:
    from splice.fused.apply import fuse
    from splice.memory.checkpointing import checkpoint_layers

    model = tiny.llama().to("cuda", torch.bfloat16)
    quant = splice.quantize_nf4 if quantize == "nf4" else splice.quantize_int8
    config = splice.LoraConfig(targets="all-linear", rank=4)
    if order == "quantize_first":
        quant(model)
        splice.add_lora(model, config)
    else:
        splice.add_lora(model, config)
        quant(model)
    splice.freeze(model)
    assert all(p.device.type == "cuda" for p in model.parameters() if p.requires_grad)
    fuse(model)
    checkpoint_layers(model, layers="all")
    ids = tiny.tokens(batch=4, length=16).cuda()
    losses = tiny.train_losses(model, ids, autocast=torch.bfloat16)
    assert losses[-1] < losses[0] - 0.2


@GPU
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1024), (3, 64), (257, 512)])
@pytest.mark.parametrize("block_size", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
def test_blocks_kernel_equals_flat_kernel(shape: tuple[int, int], block_size: int, double_quant: bool) -> None:
    # The whole-block kernel (one absmax lookup per block) computes the same fp32 products as the
    # flat one: bit for bit the same output, over program sizes that end inside and at the edge.
    torch.manual_seed(1)
    t = to_nf4(torch.randn(*shape, device="cuda") * 0.02, block_size=block_size, double_quant=double_quant)
    kw = dict(shape=shape, block_size=block_size, dtype=torch.bfloat16, absmax=None if double_quant else t.absmax,
              qabsmax=t.qabsmax, scale2=t.scale2, offset=t.offset, code2=t.code2)
    flat = dequantize_nf4(t.packed, t.code, kernel="flat", **kw)  # type: ignore[arg-type]
    for program_bytes, warps in [(128, 4), (1024, 4), (4096, 8)]:
        blocks = dequantize_nf4(t.packed, t.code, kernel="blocks", program_bytes=program_bytes,  # type: ignore[arg-type]
                                num_warps=warps, **kw)
        assert torch.equal(blocks, flat)


def test_unknown_dequant_kernel_is_refused() -> None:
    t = to_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="kernel='fast'"):
        dequantize_nf4(t.packed, t.code, shape=(4, 64), block_size=64, dtype=torch.float32, absmax=t.fp32_absmax(),
                       kernel="fast")
