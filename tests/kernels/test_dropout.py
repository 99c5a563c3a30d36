"""Seeded dropout (splice.kernels.dropout): determinism, keep rate, scaling, dropout_add_."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.dropout import KeyTape, dropout, dropout_add_, new_keys, recording_keys, replaying_keys
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
    x = torch.randn(5, 3, 77, device=device).to(dtype)
    acc = torch.randn(5, 3, 77, device=device).to(dtype)
    expected = (acc.float() + dropout(x, 0.2, 99).float()).to(dtype)
    out = dropout_add_(acc.clone(), x, 0.2, 99)
    torch.testing.assert_close(out, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-2)


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
