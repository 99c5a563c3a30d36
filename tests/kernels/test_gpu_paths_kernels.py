"""GPU-only checks of the serving kernels at the sizes they meet in use (skipped without a GPU).

The interpreter tests run small shapes; these run a prefill-sized multi-LoRA group with DoRA factors and
the 64-token tiles, and NF4 decode GEMVs with split K at Llama-3-8B widths, each against a plain PyTorch
reference. (The training kernels' large sizes: test_gpu_paths_training.py.)
"""

from __future__ import annotations

import pytest
import torch

from splice.kernels.multi_lora import multi_lora_expand, multi_lora_shrink, tiles_for
from splice.kernels.nf4_gemv import nf4_linear
from splice.quant.nf4 import to_nf4
from tests.numerics import GPU, rel_err


def _group_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                 widths: tuple[int, ...]) -> torch.Tensor:
    """Member g's columns of token t get B[s, cols_g] A[s, g] x[t] (s = slots[t]; -1: none), in fp32."""
    out = torch.zeros(x.shape[0], b.shape[1], device=x.device)
    for s in range(a.shape[0]):
        rows = (slots == s).nonzero().squeeze(-1)
        start = 0
        for g, width in enumerate(widths):
            u = x[rows].float() @ a[s, g].float().T  # (n, R)
            out[rows, start:start + width] = u @ b[s, start:start + width].float().T
            start += width
    return out


@GPU
@pytest.mark.parametrize("tokens", [32, 8192])
def test_multi_lora_group_with_dora_factors_at_llama_widths(tokens: int) -> None:
    """q/k/v of Llama-3-8B as one group (widths 4096/1024/1024), rank 64, 8 slots, base rows among them:
    one shrink and one expand add every token's delta and apply its slot's factor and shift."""
    torch.manual_seed(0)
    slots_n, rank, k, widths = 8, 64, 4096, (4096, 1024, 1024)
    n = sum(widths)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(slots_n, 3, rank, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(slots_n, n, rank, device="cuda", dtype=torch.bfloat16) * rank**-0.5
    slots = torch.randint(-1, slots_n, (tokens,), device="cuda", dtype=torch.int32)
    factor = 1 + 0.1 * torch.randn(slots_n, n, device="cuda")
    shift = 0.1 * torch.randn(slots_n, n, device="cuda")
    y = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    want = y.float() + _group_delta(x, a, b, slots, widths)
    adapted = slots >= 0
    picked = slots.clamp(min=0).long()
    want[adapted] = (want * factor[picked] + shift[picked])[adapted]
    got = y.clone()
    shrunk = multi_lora_shrink(x, a, slots)
    assert shrunk.tiles == tiles_for(tokens, k) and shrunk.tiles.block_m == (16 if tokens <= 512 else 32)
    multi_lora_expand(shrunk, b, got, widths=widths, factor=factor, shift=shift)
    assert rel_err(got.float(), want) < 1e-2


@GPU
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (128256, 4096)])
def test_nf4_decode_gemv_at_llama_widths(shape: tuple[int, int]) -> None:
    """One decode row through the default NF4 config (split K on 132 SMs, the split epilogue) against the
    dequantized weight's product."""
    torch.manual_seed(0)
    t = to_nf4((torch.randn(*shape) * 0.02).cuda(), double_quant=True)
    x = torch.randn(1, shape[1], device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(shape[0], device="cuda", dtype=torch.bfloat16)
    got = nf4_linear(x, t.packed, t.code, shape=t.weight_shape, block_size=t.block_size, qabsmax=t.qabsmax,
                     scale2=t.scale2, offset=t.offset, code2=t.code2, bias=bias)
    want = x.double() @ t.dequantize(torch.float32).double().T + bias.double()
    assert rel_err(got.double(), want) < 6e-3
