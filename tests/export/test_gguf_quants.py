"""splice.export.gguf_quants: Q4_K blocks read back by the gguf package's own dequantizer (an independent
reading of ggml's layout) within half a step of every value, for signs, zeros and wide ranges; Q8_0 is the
gguf package's, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from splice.export.gguf_quants import block_size, quantize, quantize_q4_k

Q4_K, Q8_0 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0


def _rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, 512)).astype(np.float32)
    rows[1] += 3  # all positive: no offset (m = 0)
    rows[2] = -np.abs(rows[2]) - 1  # all negative
    rows[3, :256] = 0  # an all-zero super-block: d = dmin = 0
    rows[4, 40:72] *= 1e-3  # a quiet sub-block beside loud ones: its step is at least d
    rows[5] *= 1e-4  # small values: d and dmin among f16's subnormals (steps of 2**-24)
    rows[6, 300] = 50.0  # one outlier
    return rows


def test_q4_k_reads_back_within_half_a_step() -> None:
    rows = _rows()
    blocks = quantize_q4_k(rows)
    assert blocks.shape == (8, 2 * 144) and blocks.dtype == np.uint8  # 144 bytes per 256 values
    back = gguf.quants.dequantize(blocks, Q4_K)
    sub = rows.reshape(-1, 32)
    low = -np.minimum(sub.min(axis=1), 0)
    dmin = np.repeat(low.reshape(-1, 8).max(axis=1), 8) / 63  # offsets come in steps of dmin
    step = (np.maximum(sub.max(axis=1), 0) + low + dmin) / 15  # the range a sub-block's 16 levels span
    d = np.repeat(step.reshape(-1, 8).max(axis=1), 8) / 63  # a sub-block's step is a whole number of d
    bound = 0.5 * (step + d + 2**-24) * 1.002  # d and dmin rounded up to f16
    error = np.abs(back - rows).reshape(-1, 32)
    assert (error <= bound[:, None]).all(), np.argwhere(error > bound[:, None])[:5]
    assert (back[3, :256] == 0).all()
    assert np.abs(back[6, 300] - 50.0) <= 50.0 / 15 / 2 * 1.01


def test_q8_0_is_the_gguf_package_s() -> None:
    rows = _rows()
    assert np.array_equal(quantize(rows, Q8_0), gguf.quants.quantize(rows, Q8_0))
    assert (block_size(Q8_0), block_size(Q4_K)) == (32, 256)
    with pytest.raises(ValueError):
        quantize_q4_k(rows[:, :100])
