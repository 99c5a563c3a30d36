"""Row-wise e4m3 quantization and the 1-byte transpose (splice.kernels.fp8_rows): the Triton kernels give the
PyTorch reference's bits. GPU tests need FP8 (compute capability 8.9+); the transpose also runs under
TRITON_INTERPRET=1 on a CPU (1-byte integer moves only: the interpreter's e4m3 casts are not the GPU's)."""

from __future__ import annotations

import os

import pytest
import torch

from splice.kernels import HAS_TRITON
from splice.kernels.fp8_rows import E4M3, quantize_rows, quantize_rows_reference, transpose

FP8_GPU = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
TRANSPOSE_DEVICES = ["cuda"] if torch.cuda.is_available() else (["cpu"] if INTERPRETED else [])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@FP8_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16), (7, 4096), (33, 14336), (5, 2049), (3, 1)])
@pytest.mark.parametrize("with_column_scale", [False, True])
def test_quantize_rows_kernel_gives_the_references_bits(dtype: torch.dtype, shape: tuple[int, int],
                                                        with_column_scale: bool) -> None:
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    t = (torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)
    t[0, : min(3, shape[1])] = torch.tensor([300.0, -1e-3, 0.0])[: min(3, shape[1])].to(dtype)  # a large spike
    if shape[0] > 2:
        t[2] = 0  # an all-zero row: codes 0, scale 1e-12 / 448
    c = torch.rand(shape[1], generator=gen) * 4 + 0.01 if with_column_scale else None
    t, c = t.cuda(), None if c is None else c.cuda()
    codes, scales = quantize_rows(t, column_scale=c)
    ref_codes, ref_scales = quantize_rows_reference(t, column_scale=c)
    assert codes.dtype == E4M3 and codes.shape == shape and codes.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (shape[0], 1)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(_bits(codes), _bits(ref_codes))


@FP8_GPU
def test_quantize_rows_reads_strided_rows() -> None:
    """A column slice (rows strided, as a packed projection's output) quantizes as its contiguous copy."""
    wide = torch.randn(9, 300, device="cuda", dtype=torch.bfloat16)
    part = wide[:, 40:250]
    codes, scales = quantize_rows(part)
    ref_codes, ref_scales = quantize_rows_reference(part.contiguous())
    assert torch.equal(_bits(codes), _bits(ref_codes)) and torch.equal(scales, ref_scales)


@pytest.mark.skipif(not TRANSPOSE_DEVICES, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", [(1, 1), (64, 64), (65, 130), (200, 7), (3, 4099)])
def test_transpose_kernel_moves_every_byte(shape: tuple[int, int]) -> None:
    device = TRANSPOSE_DEVICES[0]
    w = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    out = transpose(w)
    assert out.shape == (shape[1], shape[0]) and out.is_contiguous()
    assert torch.equal(out, w.t().contiguous())
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        codes = w.view(E4M3)
        assert torch.equal(_bits(transpose(codes)), _bits(codes.t().contiguous()))


def test_the_reference_quantizes_within_e4m3s_rounding() -> None:
    """The reference's codes times its scales give back t * c to e4m3's relative precision (2^-4), and the
    largest value of each row maps to 448."""
    t = torch.randn(6, 257, dtype=torch.bfloat16) * 10
    c = torch.rand(257) + 0.5
    codes, scales = quantize_rows_reference(t, column_scale=c)
    target = (t * c.to(t.dtype)).float()
    back = codes.float() * scales
    assert torch.all((back - target).abs() <= target.abs() * 2**-4 + 1e-6)
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((6,), 448.0))
