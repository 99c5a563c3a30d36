"""bitsandbytes' NF4 encoder: 4-bit codes and per-block absmax of a float weight, and the 8-bit
double quantization of that absmax (``quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True)``; layout and formulas in :mod:`splice.kernels.nf4`).
:class:`~splice.quant.nf4.NF4Tensor` holds what these return."""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels.nf4 import NF4_CODE

__all__ = ["ABSMAX_BLOCK", "quantize_absmax", "quantize_nf4_codes"]

ABSMAX_BLOCK = 256  # double quantization: absmax values per fp32 scale (bitsandbytes' choice)
_CHUNK = 1 << 24  # values quantized at once (bounds the fp32 temporaries of a 70B layer)


def _nf4_bounds(device: torch.device) -> Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2  # decision thresholds: nearest level, ties to the lower


def _blockwise(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(values scaled into [-1, 1], fp32 absmax per block) as bitsandbytes computes them (the
    last block may be short; an all-zero block stores absmax 0 and divides by 1e-38)."""
    n = flat.numel()
    full = n - n % block
    head = flat[:full].reshape(-1, block)
    absmax = head.abs().amax(dim=1)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax()
        absmax = torch.cat([absmax, tail_max[None]])
        # times the reciprocal, as bitsandbytes' CUDA kernel (a division can round differently)
        scaled = torch.cat([scaled, torch.clamp(flat[full:] * (1.0 / tail_max.clamp(min=1e-38)), -1, 1)])
    return scaled, absmax


def quantize_nf4_codes(weight: Tensor, *, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """``(packed (ceil(n/2),) uint8, absmax (n_blocks,) fp32)`` of ``weight`` flattened row-major.

    Runs where ``weight`` is, ``_CHUNK`` values at a time (a whole number of blocks), so the
    fp32 temporaries stay small whatever the layer.
    """
    if block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be a positive even number, got {block_size}")
    flat = weight.reshape(-1)
    bounds = _nf4_bounds(weight.device)
    step = max(block_size, _CHUNK - _CHUNK % block_size)
    packed, absmax = [], []
    for start in range(0, flat.numel(), step):
        scaled, amax = _blockwise(flat[start:start + step].float(), block_size)
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        packed.append((codes[0::2] << 4) | codes[1::2])
        absmax.append(amax)
    return torch.cat(packed), torch.cat(absmax)


def quantize_absmax(absmax: Tensor, code2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: ``(q (n_blocks,) uint8, scale2 (ceil(n_blocks/256),) fp32, offset ())``
    with ``absmax ~ code2[q] * scale2[b // 256] + offset`` (bitsandbytes' nested statistics)."""
    offset = absmax.mean()
    scaled, scale2 = _blockwise(absmax - offset, ABSMAX_BLOCK)
    return _search_code(scaled, code2), scale2, offset


def _search_code(x: Tensor, code: Tensor) -> Tensor:
    """bitsandbytes' 8-bit encoder (``dQuantize<0>``, CUDA and CPU), vectorized: a 7-step binary
    search over the 256 sorted levels, then the nearer of the last pivot and the bracketing value
    the search saw. Not always the nearest level (the bracket can be a far earlier pivot), which
    is why this is not a ``bucketize``: the codes must equal bitsandbytes' own."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(right, up, down).to(torch.uint8)
