"""splice.kernels.multi_lora: per-row adapters in one launch vs the plain per-token reference."""

from __future__ import annotations

import os

import pytest
import torch

from splice.kernels import multi_lora as module
from splice.kernels.multi_lora import multi_lora, multi_lora_reference, pad_rank
from tests.numerics import DEVICES

# (rows, tokens per row, K, N, padded rank, slots): odd sizes, masks on every edge
SHAPES = [(5, 1, 70, 33, 16, 3), (3, 1, 300, 200, 32, 4), (6, 7, 70, 33, 16, 3), (4, 19, 64, 130, 32, 2),
          (2, 40, 129, 65, 16, 5)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _case(rows: int, length: int, k: int, n: int, r: int, s: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(rows * 100 + length)
    x = torch.randn(rows * length, k, generator=g).to(device, dtype)
    y = torch.randn(rows * length, n, generator=g).to(device, dtype)
    a = (torch.randn(s, r, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(s, n, r, generator=g).to(device, dtype)
    b[0, :, r // 2 :] = 0  # slot 0 has a smaller true rank, zero-padded
    slots = torch.randint(-1, s, (rows,), generator=g).to(device)
    slots[0] = -1  # at least one base-model row
    return x, y, a, b, slots


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_per_token_reference(shape, dtype: torch.dtype, device: str) -> None:
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("half-precision matmuls on CPU are not what is served")
    x, y, a, b, slots = _case(*shape, dtype, device)
    length = shape[1]
    want = multi_lora_reference(x, y, a, b, slots.repeat_interleave(length))
    got = multi_lora(x, y, a, b, slots, row_len=length)
    assert got.dtype == y.dtype and got.shape == y.shape
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= TOLERANCE[dtype] * scale
    base_rows = (slots.repeat_interleave(length) == -1)
    assert torch.equal(got[base_rows], y[base_rows])  # base rows untouched, bit for bit


@pytest.mark.skipif(module.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter runs the kernels on CPU (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_kernels_under_the_triton_interpreter(shape) -> None:
    x, y, a, b, slots = _case(*shape, torch.float32, "cpu")
    want = multi_lora_reference(x, y, a, b, slots.repeat_interleave(shape[1]))
    got = multi_lora(x, y, a, b, slots, row_len=shape[1], kernels=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_pad_rank_and_bad_shapes() -> None:
    assert [pad_rank(r) for r in (1, 8, 16, 17, 64)] == [16, 16, 16, 32, 64]
    x, y, a, b, slots = _case(2, 3, 8, 8, 16, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="slots of 2 tokens"):
        multi_lora(x, y, a, b, slots, row_len=2)
