"""splice.kernels.gemv: the few-row decode GEMM against its fp32 reference (the Triton path on a GPU, or under
TRITON_INTERPRET=1 for fp16; the reference on a plain CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.kernels import use_triton
from splice.kernels.gemv import (
    DECODE_ROWS,
    MAX_ROWS,
    GemvConfig,
    decode_linear,
    decode_rows,
    gemv,
    gemv_applies,
    gemv_reference,
)
from tests.numerics import DEVICES, GPU

# (M, N, K): one row, a few, the most; output widths and inner sizes off the tiles
SHAPES = [(1, 64, 256), (3, 37, 300), (8, 100, 40), (16, 129, 520), (33, 50, 96), (MAX_ROWS, 70, 200)]
CONFIGS = [None, GemvConfig(block_n=32, block_k=128, num_warps=2, num_stages=2),
           GemvConfig(block_n=64, block_k=64, num_warps=4, num_stages=3),
           GemvConfig(block_n=32, block_k=32, num_warps=4, num_stages=2, split_k=3)]  # K ranges summed after


def _dtypes(device: str) -> list[torch.dtype]:
    # Triton's interpreter computes bf16 dots inexactly (its casts truncate): fp16 there, both on a GPU
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_the_fp32_reference_with_and_without_the_add(device: str, shape: tuple[int, int, int],
                                                            config: GemvConfig | None) -> None:
    m, n, k = shape
    torch.manual_seed(0)
    for dtype in _dtypes(device):
        x = torch.randn(m, k, device=device).to(dtype)
        w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
        add = torch.randn(m, n, device=device).to(dtype)
        exact = x.double() @ w.double().t()
        got = gemv(x, w, config=config)
        assert got.shape == (m, n) and got.dtype == dtype
        tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(got.double(), exact, atol=tol, rtol=tol)
        torch.testing.assert_close(gemv(x, w, add_to=add, config=config), gemv_reference(x, w, add_to=add),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [None, GemvConfig(block_n=16, block_k=64, split_k=4)])
def test_out_may_be_the_stream_it_adds_to(device: str, config: GemvConfig | None) -> None:
    """The engine's use: the residual stream updated in place, ``out=add_to`` (with K split too: the partials
    summed and the stream added once)."""
    x = torch.randn(5, 300, device=device).half()
    w = (torch.randn(40, 300, device=device) / 17).half()
    stream = torch.randn(5, 40, device=device).half()
    want = gemv_reference(x, w, add_to=stream)
    got = gemv(x, w, add_to=stream, out=stream, config=config)
    assert got.data_ptr() == stream.data_ptr()
    torch.testing.assert_close(stream, want, atol=2e-3, rtol=2e-3)


def test_the_kernel_runs_only_where_it_applies() -> None:
    cpu = torch.randn(1, 8).half()
    assert gemv_applies(cpu, torch.randn(4, 8).half()) == use_triton(cpu)
    assert not gemv_applies(torch.randn(MAX_ROWS + 1, 8).half(), torch.randn(4, 8).half())  # cuBLAS's rows
    x, w, stream = torch.randn(DECODE_ROWS + 1, 8).half(), torch.randn(4, 8).half(), torch.zeros(DECODE_ROWS + 1, 4).half()
    torch.testing.assert_close(decode_linear(x, w, accumulate=stream), (x.float() @ w.float().t()).half())
    assert not gemv_applies(torch.randn(1, 8), torch.randn(4, 8))  # fp32: the reference
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(gemv(x, w), F.linear(x, w))


def test_large_weights_take_the_kernel_for_more_rows() -> None:
    # the head (128,256 x 4,096), gate/up and down of a Llama-3-8B: 32 rows; q/k/v and o: DECODE_ROWS
    for shape, rows in (((128256, 4096), 32), ((28672, 4096), 32), ((4096, 14336), 32), ((6144, 4096), DECODE_ROWS),
                        ((4096, 4096), DECODE_ROWS)):
        assert decode_rows(torch.empty(shape, device="meta")) == rows


def test_bad_shapes_name_the_argument() -> None:
    x, w = torch.randn(2, 8).half(), torch.randn(4, 8).half()
    with pytest.raises(ValueError, match="add_to must be a row-major \\(2, 4\\)"):
        gemv(x, w, add_to=torch.zeros(4, 2).half())
    with pytest.raises(ValueError, match="out must be a row-major \\(2, 4\\)"):
        gemv(x, w, out=torch.zeros(4, 2).half().t())
    if gemv_applies(x, w):  # the kernel's own option
        with pytest.raises(ValueError, match="split_k must be at least 1"):
            gemv(x, w, config=GemvConfig(split_k=0))


@GPU
def test_gpu_llama_8b_projections_at_one_row() -> None:
    """The shapes it is for (bf16, M = 1 and 8): q/k/v packed, o, gate/up packed, down."""
    torch.manual_seed(1)
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            add = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(gemv(x, w, add_to=add), gemv_reference(x, w, add_to=add), atol=2e-2, rtol=1e-2)
