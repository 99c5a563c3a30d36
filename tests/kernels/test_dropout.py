"""Seeded dropout (splice.kernels.dropout): determinism, keep rate, scaling, dropout_add_."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.kernels import use_triton
from splice.kernels.dropout import (
    KeyTape,
    dropout,
    dropout_add_,
    hash_keys,
    new_keys,
    recording_keys,
    replaying_keys,
    threshold,
)
from tests.numerics import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_seed_same_mask_and_scaling(device: str, dtype: torch.dtype) -> None:
    x = torch.randn(37, 129, device=device).to(dtype)  # odd sizes: tails of every block
    p = 0.3
    a, b = dropout(x, p, 1234), dropout(x, p, 1234)
    assert torch.equal(a, b)
    keep = a != 0
    # kept entries are x / (1 - p) rounded to dtype (within one ulp: Triton's interpreter
    # truncates where the GPU rounds to nearest)
    expected = (x.float() * (1.0 / (1 - p))).to(dtype)
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-23
    torch.testing.assert_close(a[keep], expected[keep], rtol=ulp, atol=0)
    assert not torch.equal(keep, dropout(x, p, 4321) != 0)


@pytest.mark.parametrize("device", DEVICES)
def test_keep_rate(device: str) -> None:
    n, p = 200_003, 0.05
    kept = (dropout(torch.ones(n, device=device), p, 7) != 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_add_uses_the_same_mask(device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 77, generator=gen).to(device, dtype)
    acc = torch.randn(5, 3, 77, generator=gen).to(device, dtype)
    expected = (acc.float() + dropout(x, 0.2, 99).float()).to(dtype)
    out = dropout_add_(acc.clone(), x, 0.2, 99)
    # bf16: expected rounds dropout(x) before the add, the kernel once after it (a bf16 ulp of |x| / 0.8 <= 5)
    torch.testing.assert_close(out, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=4e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(dropout_add_(torch.zeros_like(x), x, 0.2, 99), dropout(x, 0.2, 99))  # onto zeros: exact


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


_M32 = np.uint64(0xFFFFFFFF)


def _documented_mask(rows: int, cols: int, keys: tuple[int, int], p: float) -> np.ndarray:
    """The Triton path's keep-mask as splice.kernels.dropout's docstring states it, in numpy."""
    r = np.arange(rows, dtype=np.uint64)
    pairs = np.arange((cols + 1) // 2, dtype=np.uint64)
    row_keys = _fmix32(((r * np.uint64(0x9E3779B1)) & _M32) ^ np.uint64(keys[0]))
    pair_keys = _fmix32(((pairs * np.uint64(0x85EBCA77)) & _M32) ^ np.uint64(keys[1]))
    h = _fmix32(row_keys[:, None] + pair_keys[None, :])
    bits = np.stack([h & np.uint64(0xFFFF), h >> np.uint64(16)], axis=-1).reshape(rows, -1)[:, :cols]
    return bits >= threshold(p)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_mask_is_the_documented_hash(device: str) -> None:
    x = torch.ones(3, 37, 301, device=device)  # odd last dim: a lone last column; rows span programs
    if not use_triton(x):
        pytest.skip("the reference path draws from torch.rand")
    keys = hash_keys(2024)
    kept = (dropout(x, 0.3, 2024) != 0).cpu().numpy().reshape(-1, 301)
    np.testing.assert_array_equal(kept, _documented_mask(3 * 37, 301, keys, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_mask_has_no_structure(device: str) -> None:
    # p = 0.5: each kept bit a fair coin. Neighbours (the two halves of one hash, the next pair, the next
    # row) uncorrelated, and the parity of 2x2 squares (which an additive row key + column key leaves at
    # 0.32 without the final mix) a fair coin: every statistic within 5 standard errors.
    kept = (dropout(torch.ones(512, 1024, device=device), 0.5, 77) != 0).cpu().double()
    n = kept.numel()
    assert abs(kept.mean().item() - 0.5) < 5 * 0.5 / n**0.5
    k = 2 * kept - 1  # +-1 coins: correlation = mean of products
    for a, b in ((k[:, 0::2], k[:, 1::2]), (k[:, 1:-1:2], k[:, 2::2]), (k[:-1], k[1:])):
        assert abs((a * b).mean().item()) < 5 / a.numel()**0.5
    squares = k[0::2, 0::2] * k[1::2, 0::2] * k[0::2, 1::2] * k[1::2, 1::2]
    squares_apart = k[0::2, 0:-2:4] * k[1::2, 0:-2:4] * k[0::2, 2::4] * k[1::2, 2::4]
    for q in (squares, squares_apart):
        assert abs(q.mean().item()) < 5 / q.numel()**0.5


@pytest.mark.parametrize("device", DEVICES)
def test_new_keys_follow_torch_seed(device: str) -> None:
    torch.manual_seed(3)
    a = [new_keys(device) for _ in range(3)]
    assert all(k.dtype == torch.int32 and k.shape == (2,) and k.device.type == device for k in a)
    assert len({tuple(k.tolist()) for k in a}) == 3
    torch.manual_seed(3)
    assert all(torch.equal(k, new_keys(device)) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_int_seed_and_its_keys_give_one_mask(device: str) -> None:
    from splice.kernels.dropout import as_keys

    x = torch.randn(9, 70, device=device)
    assert torch.equal(dropout(x, 0.4, 11), dropout(x, 0.4, as_keys(11, torch.device(device))))
    with pytest.raises(ValueError, match="int32 tensor of shape"):
        dropout(x, 0.4, torch.zeros(3, dtype=torch.int32, device=device))


def test_key_tape_replays_in_order() -> None:
    tape = KeyTape()
    with recording_keys(tape):
        drawn = [new_keys("cpu") for _ in range(3)]
    fresh = new_keys("cpu")  # outside the tape: a new draw
    assert not any(torch.equal(fresh, k) for k in drawn)
    with replaying_keys(tape):
        assert all(new_keys("cpu") is k for k in drawn)
        with pytest.raises(RuntimeError, match="more dropout keys"):
            new_keys("cpu")
