"""GGUF block quantization for ``splice export --quantize``: Q8_0 (the ``gguf`` package's, bit-exact
with ggml) and Q4_K (here: the ``gguf`` package reads Q4_K but does not write it).

Q8_0, per block of 32 values ``x``: ``d = max|x| / 127`` (f16), ``q = round(x / d)`` (int8);
``x ~ d q``, error <= d / 2.

Q4_K, per super-block of 256 values = 8 sub-blocks ``j`` of 32 (ggml's ``block_q4_K``, 144 bytes:
``d`` f16, ``dmin`` f16, 12 bytes of 6-bit ``sc[j]``/``m[j]``, 128 bytes of 4-bit ``q``)::

    x ~ d * sc[j] * q - dmin * m[j]        q in [0, 15], sc[j], m[j] in [0, 63]

Chosen in closed form (ggml's reference searches scales iteratively; this one is a little less
accurate but every value is covered, none clipped): ``m[j] = ceil(-min(0, min x_j) / dmin)`` with
``dmin = max_j(-min(0, min x_j)) / 63`` rounded up to f16, so ``-dmin m[j] <= min x_j``; then the
step ``s_j = (max x_j + dmin m[j]) / 15`` and ``sc[j] = ceil(s_j / d)`` with ``d = max_j s_j / 63``
rounded up to f16, so ``15 d sc[j] - dmin m[j] >= max x_j``; ``q = round((x + dmin m[j]) / (d sc[j]))``.
Error per value <= ``d sc[j] / 2 <= (s_j + d) / 2``.
"""

from __future__ import annotations

import gguf
import numpy as np

__all__ = ["QUANT_TYPES", "block_size", "quantize", "quantize_q4_k"]

QUANT_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K}
_SUPER, _SUB = 256, 32  # Q4_K: values per super-block and per sub-block


def block_size(kind: gguf.GGMLQuantizationType) -> int:
    """Values per block of ``kind``: a row's length must be a multiple of it."""
    return int(gguf.GGML_QUANT_SIZES[kind][0])


def quantize(array: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """``array`` (rows, cols), cols a multiple of :func:`block_size`, as the bytes of ``kind``
    blocks: (rows, cols / block * bytes per block) uint8, as ``GGUFWriter.add_tensor`` takes them."""
    if kind == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(array)
    return gguf.quants.quantize(array, kind)


def _f16_up(values: np.ndarray) -> np.ndarray:
    """``values`` (>= 0) rounded up to the next float16, as float32."""
    rounded = values.astype(np.float16)
    low = rounded.astype(np.float32) < values
    rounded[low] = np.nextafter(rounded[low], np.float16(np.inf))
    return rounded.astype(np.float32)


def _divide_up(top: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``ceil(top / step)`` clipped to 6 bits, 0 where ``step`` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(step > 0, np.clip(np.ceil(top / step), 0, 63), 0).astype(np.uint8)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """``array`` (rows, cols), cols a multiple of 256, as Q4_K blocks (see module doc)."""
    rows, cols = array.shape
    x = np.asarray(array, dtype=np.float32).reshape(-1, _SUPER // _SUB, _SUB)  # (blocks, 8, 32)
    low = -np.minimum(x.min(axis=-1), 0)  # (blocks, 8), >= 0
    dmin = _f16_up(low.max(axis=-1) / 63)  # (blocks,)
    m = _divide_up(low, dmin[:, None])
    offset = dmin[:, None] * m  # (blocks, 8) >= low
    step = np.maximum(x.max(axis=-1) + offset, 0) / 15
    d = _f16_up(step.max(axis=-1) / 63)
    sc = _divide_up(step, d[:, None])
    scale = (d[:, None] * sc)[..., None]  # (blocks, 8, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, np.clip(np.round((x + offset[..., None]) / scale), 0, 15), 0).astype(np.uint8)
    # 12 scale bytes, as ggml packs them: sc/m of sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7;
    # sub-blocks 4-7 in the nibbles of bytes 8-11 (sc low, m high) and the top 2 bits of bytes 0-7.
    scales = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4),
    ], axis=1).astype(np.uint8)
    # 128 bytes of q: byte g * 32 + i holds sub-block 2g's value i (low nibble) and 2g+1's (high)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, _SUPER // 2)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                             dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(rows, cols // _SUPER * blocks.shape[1])
