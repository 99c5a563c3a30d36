"""NF4 dequantization (QLoRA's 4-bit NormalFloat, in bitsandbytes' layout): Triton + reference.

Layout (bitsandbytes ``quantize_4bit(..., blocksize=64, quant_type="nf4")``): the weight, flattened
row-major to ``n`` values, is cut into blocks of ``block_size`` consecutive values (the last
block may be shorter); value ``j`` of the flat weight is::

    w[j] = NF4[c[j]] * absmax[j // block_size]

with ``c[j]`` a 4-bit code, two per byte, the even value in the high nibble:
``packed[i] = c[2i] << 4 | c[2i + 1]`` (``packed`` is ``(ceil(n / 2),)`` uint8). ``NF4`` is the
16-level codebook below (quantiles of N(0, 1) scaled to [-1, 1]).

Double quantization (bitsandbytes ``compress_statistics=True``, QLoRA's "DQ"): the fp32
``absmax`` (``(n_blocks,)``) is itself stored in 8 bits, blocks of 256 sharing an fp32 scale::

    absmax[b] = DYNAMIC[q[b]] * scale2[b // 256] + offset

``q`` is ``(n_blocks,)`` uint8, ``scale2`` ``(ceil(n_blocks / 256),)`` fp32, ``offset`` an fp32
scalar (the mean absmax), ``DYNAMIC`` bitsandbytes' signed 8-bit dynamic map (256 levels).

:func:`dequantize_nf4` writes ``w`` as an ``(out, in)`` matrix of the compute dtype in one pass
(Triton on CUDA: each program decodes whole blocks, looks each block's absmax up once through
its 8-bit code, and stores the two nibbles' values interleaved; a weight that does not divide into
power-of-two blocks goes through a flat kernel that looks the absmax up per byte), or runs
:func:`dequantize_nf4_reference` (plain PyTorch, int64 gathers) elsewhere. The matmul then goes to cuBLAS: at training token
counts one dequant pass (~2.5 bytes moved per weight) costs a few percent of the GEMM, and the
dequantized matrix lives only until that GEMM returns (the caching allocator hands the same
block to the next layer), so no dequantized copy stays alive across layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splice.kernels import HAS_TRITON, grid_1d, use_triton

__all__ = ["NF4_CODE", "dequantize_absmax_reference", "dequantize_nf4", "dequantize_nf4_reference",
           "dynamic_map"]

# bitsandbytes' NF4 table (``get_4bit_type("nf4")``), QLoRA's 16 levels, sorted.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dynamic_map(*, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``): 256 sorted
    fp32 levels in [-1, 1], a dynamic exponent and a shrinking fraction (Dettmers 2015)."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional > 0:  # (not reached for the 8-bit map: kept for the general formula)
        bounds = torch.linspace(0.1, 1, additional + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def dequantize_absmax_reference(qabsmax: Tensor, scale2: Tensor, offset: Tensor, code2: Tensor,
                                *, block: int = 256) -> Tensor:
    """fp32 ``(n_blocks,)`` absmax from its 8-bit double quantization (module doc)."""
    values = code2[qabsmax.long()]
    index = torch.arange(values.numel(), device=values.device) // block
    return values * scale2[index] + offset


def dequantize_nf4_reference(packed: Tensor, absmax: Tensor, code: Tensor, *, shape: tuple[int, ...],
                             block_size: int, dtype: torch.dtype) -> Tensor:
    """``w`` of ``shape`` in ``dtype`` from the codes, the fp32 per-block ``absmax`` and the
    ``(16,)`` fp32 ``code`` table (module doc)."""
    n = 1
    for d in shape:
        n *= d
    codes = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).reshape(-1)[:n]
    index = torch.arange(n, device=packed.device) // block_size
    return (code[codes.long()] * absmax[index]).to(dtype).reshape(shape)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _absmax(block, live, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code2_ptr, DOUBLE: tl.constexpr):
        # fp32 absmax of the blocks ``block`` (any shape): stored, or through its 8-bit code.
        if DOUBLE:
            q = tl.load(qabsmax_ptr + block, mask=live, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(scale2_ptr + block // 256, mask=live, other=0.0)
            absmax = scale + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=live, other=0.0)
        return absmax

    @triton.jit
    def _dequant_nf4_kernel(packed_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                            code2_ptr, out_ptr, n, n_bytes,
                            BLOCK_SIZE: tl.constexpr, DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
        # One program: BLOCK packed bytes -> 2 * BLOCK output values, stored contiguously.
        start = tl.program_id(0).to(tl.int64) * BLOCK
        byte = start + tl.arange(0, BLOCK)
        live = byte < n_bytes
        bits = tl.load(packed_ptr + byte, mask=live, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (bits >> 4))  # 16-entry table: stays in L1
        lo = tl.load(code_ptr + (bits & 0xF))
        block = (byte * 2) // BLOCK_SIZE  # both values of a byte share a block (even block size)
        absmax = _absmax(block, live, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code2_ptr, DOUBLE)
        pair = tl.interleave(hi * absmax, lo * absmax)  # (2 * BLOCK,): c[2i], c[2i + 1]
        index = start * 2 + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + index, pair.to(out_ptr.dtype.element_ty), mask=index < n)

    @triton.jit
    def _dequant_nf4_blocks_kernel(packed_ptr, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code_ptr,
                                   code2_ptr, out_ptr, n_blocks,
                                   HALF: tl.constexpr, GROUPS: tl.constexpr, DOUBLE: tl.constexpr):
        # One program: GROUPS whole blocks of HALF packed bytes -> (GROUPS, 2 * HALF) values. Each
        # block's absmax is looked up once (a (GROUPS,) load), not once per byte as in the flat
        # kernel; the values are the same fp32 products, so the output is bit for bit the same.
        block = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,)
        live = block < n_blocks
        byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (GROUPS, HALF)
        bits = tl.load(packed_ptr + byte, mask=live[:, None], other=0).to(tl.int32)
        absmax = _absmax(block, live, absmax_ptr, qabsmax_ptr, scale2_ptr, offset_ptr, code2_ptr, DOUBLE)
        hi = tl.load(code_ptr + (bits >> 4)) * absmax[:, None]
        lo = tl.load(code_ptr + (bits & 0xF)) * absmax[:, None]
        pair = tl.interleave(hi, lo)  # (GROUPS, 2 * HALF): c[2i], c[2i + 1] along each block
        index = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + index, pair.to(out_ptr.dtype.element_ty), mask=live[:, None])


_BYTES_PER_PROGRAM = 4096  # measured best of 512-4096 for the blocks kernel (docs/benchmarks.md)


def dequantize_nf4(
    packed: Tensor,
    code: Tensor,
    *,
    shape: tuple[int, ...],
    block_size: int,
    dtype: torch.dtype,
    absmax: Tensor | None = None,
    qabsmax: Tensor | None = None,
    scale2: Tensor | None = None,
    offset: Tensor | None = None,
    code2: Tensor | None = None,
    out: Tensor | None = None,
    program_bytes: int = _BYTES_PER_PROGRAM,
    kernel: str = "blocks",
    num_warps: int = 4,
) -> Tensor:
    """``w`` (``shape``, ``dtype``) from NF4 codes and the ``(16,)`` fp32 ``code`` table (on the
    codes' device: nothing is copied from the host, so the call can sit in a CUDA graph). Give
    ``absmax`` (fp32), or the double-quantized ``qabsmax``/``scale2``/``offset``/``code2``.
    ``out``: a buffer to write into. ``program_bytes``: packed bytes per Triton program (tuning).
    ``kernel``: ``"blocks"`` (whole blocks per program, one absmax lookup per block; needs a
    power-of-two block size dividing the weight) or ``"flat"`` (any layout, one lookup per byte);
    a weight the blocks kernel cannot cut runs the flat one. ``num_warps``: the blocks kernel's
    (tuning)."""
    if kernel not in ("blocks", "flat"):
        raise ValueError(f"dequantize_nf4: kernel={kernel!r}; use 'blocks' or 'flat'")
    double = absmax is None
    if double and (qabsmax is None or scale2 is None or offset is None or code2 is None):
        raise ValueError("dequantize_nf4: give absmax, or qabsmax, scale2, offset and code2")
    if not use_triton(packed) or block_size % 2:
        if double:
            absmax = dequantize_absmax_reference(qabsmax, scale2, offset, code2)  # type: ignore[arg-type]
        result = dequantize_nf4_reference(packed, absmax, code, shape=shape, block_size=block_size,  # type: ignore[arg-type]
                                          dtype=dtype)
        return result if out is None else out.copy_(result)
    n = 1
    for d in shape:
        n *= d
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    dummy = code  # unused pointer arguments of the branch not taken
    half = block_size // 2
    if kernel == "blocks" and n % block_size == 0 and half & (half - 1) == 0 and program_bytes >= half:
        n_blocks, groups = n // block_size, program_bytes // half
        _dequant_nf4_blocks_kernel[grid_1d(n_blocks, groups)](
            packed, dummy if double else absmax, qabsmax if double else packed,
            scale2 if double else dummy, offset if double else dummy, code,
            code2 if double else dummy, out, n_blocks,
            HALF=half, GROUPS=groups, DOUBLE=double, num_warps=num_warps,
        )
        return out
    _dequant_nf4_kernel[grid_1d(packed.numel(), program_bytes)](
        packed, dummy if double else absmax, qabsmax if double else packed,
        scale2 if double else dummy, offset if double else dummy, code,
        code2 if double else dummy, out, n, packed.numel(),
        BLOCK_SIZE=block_size, DOUBLE=double, BLOCK=program_bytes,
    )
    return out
