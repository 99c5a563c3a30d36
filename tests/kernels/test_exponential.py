"""Exp(1) noise keyed by (seed, draw) per row (splice.kernels.exponential): its distribution, that a row's
numbers depend on its own key only, and the generators' bookkeeping. The kernel runs on a GPU, or on the CPU
under TRITON_INTERPRET=1; the sampler's use of it is in tests/engine/test_sampling.py (on every device)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from splice.kernels import HAS_TRITON
from splice.kernels.exponential import exponential_noise, exponential_noise_reference, generator_keys

KERNEL_DEVICES = ["cuda"] if torch.cuda.is_available() else (
    ["cpu"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])
KERNEL = pytest.mark.skipif(not KERNEL_DEVICES, reason="needs a GPU or TRITON_INTERPRET=1")


def _noise(seeds: list[int], draws: list[int], vocab: int) -> torch.Tensor:
    device = KERNEL_DEVICES[0]
    return exponential_noise(vocab, seeds=torch.tensor(seeds, device=device),
                             draws=torch.tensor(draws, device=device)).cpu()


@KERNEL
def test_noise_is_exp1_in_every_row_and_column_block() -> None:
    """Mean and variance 1 (Exp(1)) within 4 standard errors, per row and per residue mod 4 (each Philox
    output lane), P(E > 1) = 1/e, all finite and positive; an odd width fills every column."""
    vocab = 20_001
    noise = _noise([3, 3, 11, 2**62 + 5], [0, 1, 0, 7], vocab)
    assert noise.shape == (4, vocab) and torch.isfinite(noise).all() and (noise > 0).all()
    n = noise.numel()
    assert abs(noise.mean().item() - 1) < 4 / math.sqrt(n)
    assert abs(noise.var().item() - 1) < 4 * math.sqrt(8 / n)  # Var of (E - 1)^2 is 8 for Exp(1)
    assert abs((noise > 1).float().mean().item() - math.exp(-1)) < 4 * math.sqrt(0.25 / n)
    for part in [*noise, *(noise[:, j::4] for j in range(4))]:
        m = part.numel()
        assert abs(part.mean().item() - 1) < 4 * math.sqrt(2 / m)


@KERNEL
def test_a_rows_numbers_depend_on_its_own_seed_and_draw_only() -> None:
    vocab = 4099
    alone = _noise([7], [3], vocab)[0]
    batch = _noise([1, 7, 2], [0, 3, 5], vocab)
    assert torch.equal(batch[1], alone)  # the same key in another batch
    for other in (_noise([7], [4], vocab)[0], _noise([8], [3], vocab)[0], batch[0]):
        assert (other == alone).float().mean() < 1e-3
        # independent streams: correlation within 5 standard errors of 0
        assert abs(torch.corrcoef(torch.stack([other, alone]))[0, 1].item()) < 5 / math.sqrt(vocab)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA generators")
def test_generator_keys_give_each_draw_its_own_key_and_advance_the_generator() -> None:
    first, second = (torch.Generator(device="cuda").manual_seed(s) for s in (5, 9))
    seeds, draws = generator_keys([first, second, first])
    assert seeds == [5, 9, 5] and draws == [0, 0, 1]
    assert generator_keys([first]) == ([5], [2])
    first.manual_seed(5)  # re-seeding restarts the draws, as a resumed run does
    assert generator_keys([first]) == ([5], [0])


def test_the_reference_draws_each_row_from_its_generator() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    noise = exponential_noise_reference(1000, gens, torch.device("cpu"))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert (noise > 0).all() and abs(noise.mean().item() - 1) < 0.1
    with pytest.raises(ValueError, match="seeds and draws of one shape"):
        exponential_noise(10, seeds=torch.zeros(3, dtype=torch.long), draws=torch.zeros(2, dtype=torch.long))
