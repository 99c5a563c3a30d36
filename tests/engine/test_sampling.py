"""splice.engine.sampling: options and their checks, the per-row filters, the step sampler."""

from __future__ import annotations

import pytest
import torch

from splice.engine.sampling import (
    GREEDY_BELOW,
    SamplingParams,
    bounded_seed,
    filter_rows,
    row_generator,
    sample_next,
    sample_step,
    top_k_top_p_filter,
)
from tests.numerics import HostSyncs


def _logits(rows: int = 5, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_tiny_temperatures_are_greedy_and_finite() -> None:
    logits = _logits()
    for temperature in (1e-40, 1e-300, 5e-324, GREEDY_BELOW / 2):
        params = SamplingParams(temperature=temperature)
        assert params.greedy
        assert torch.equal(sample_next(logits, temperature=temperature), logits.argmax(-1))
        tokens = sample_step(logits, [params] * 5, [None] * 5)
        assert torch.equal(tokens, logits.argmax(-1))
    assert not SamplingParams(temperature=GREEDY_BELOW).greedy
    # Just above the floor every row is still a valid token (no inf / nan in the softmax).
    params = [SamplingParams(temperature=GREEDY_BELOW * 1.01, seed=i) for i in range(5)]
    tokens = sample_step(logits, params, [row_generator(i, logits.device) for i in range(5)])
    assert torch.equal(tokens, logits.argmax(-1))


def test_seeds_of_any_size_are_bounded_and_stable() -> None:
    assert bounded_seed(7) == 7 and bounded_seed(2**63 - 1) == 2**63 - 1
    big = [bounded_seed(s) for s in (2**70, 2**70 + 1, -1, -(2**80), 2**63)]
    assert all(0 <= s < 2**63 for s in big) and len(set(big)) == len(big)
    assert bounded_seed(2**70) == 6989999255055404655  # a hash of the value itself: the same in every process
    logits = _logits(1)
    params = SamplingParams(temperature=1.0, seed=2**70)
    draws = [sample_step(logits, [params], [row_generator(params.seed, logits.device)]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_sampling_params_checks_name_the_option() -> None:
    for bad, match in (
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(stop="x"), "stop must be a tuple of non-empty strings"),
        (dict(stop=("",)), "stop must be a tuple of non-empty strings"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)  # type: ignore[arg-type]
    assert SamplingParams(seed=2**70, stop=("a", "bc")).seed == 2**70


def test_filter_rows_is_the_single_row_filter_on_every_row() -> None:
    logits = _logits(6, 30)
    logits[2, :6] = 20.0  # six tied best tokens: top-5 keeps all six (ties at the boundary stay)
    options = [(0, 1.0), (3, 1.0), (5, 1.0), (0, 0.5), (4, 0.3), (30, 0.999)]
    got = filter_rows(logits, torch.tensor([k for k, _ in options]), torch.tensor([p for _, p in options]))
    for row, (k, p) in enumerate(options):
        want = top_k_top_p_filter(logits[row : row + 1], top_k=k, top_p=p)
        assert torch.equal(got[row : row + 1], want), (k, p)
    assert torch.isfinite(got[0]).all()  # both filters off: nothing dropped
    assert torch.isfinite(got[2]).sum() == 6
    assert torch.isfinite(got[4]).sum() <= 4


def test_step_sampler_mixes_greedy_and_seeded_rows_independently_of_companions() -> None:
    logits = _logits(4, 50)
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=10, seed=1),
              SamplingParams(temperature=1.3, top_p=0.9, seed=2), SamplingParams(temperature=1.0, seed=3)]

    def run(rows: list[int], steps: int = 6) -> list[list[int]]:
        generators = [row_generator(params[r].seed, logits.device) for r in rows]
        picked = [params[r] for r in rows]
        return [sample_step(logits[rows], picked, generators).tolist() for _ in range(steps)]

    together = run([0, 1, 2, 3])
    assert all(step[0] == int(logits[0].argmax()) for step in together)
    for i in (1, 2, 3):
        alone = run([i])
        assert [step[i] for step in together] == [step[0] for step in alone]
    assert len({tuple(step) for step in together}) > 1  # sampled rows do vary from step to step
    with pytest.raises(ValueError, match="has no generator"):
        sample_step(logits[:2], params[:2], [None, None])


def test_exponential_race_draws_the_filtered_distribution() -> None:
    order = torch.tensor([2, 0, 3, 1])
    logits = torch.empty(1, 4)
    logits[0, order] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 4000
    generator = row_generator(5, logits.device)  # every row draws from it in turn: independent draws
    tokens = sample_step(logits.expand(n, 4), [SamplingParams(temperature=1.0, top_p=0.79)] * n, [generator] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert freq[1] == 0 and freq[3] == 0  # outside the nucleus {2, 0}
    assert abs(freq[2].item() - 0.5 / 0.8) < 0.03
    tokens = sample_step(logits.expand(n, 4), [SamplingParams(temperature=2.0)] * n, [generator] * n)
    want = (logits[0] / 2.0).softmax(-1)
    torch.testing.assert_close(torch.bincount(tokens, minlength=4).float() / n, want, rtol=0, atol=0.03)


def test_step_sampler_reads_nothing_back_from_the_device() -> None:
    logits = _logits(3, 20)
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=1),
              SamplingParams(temperature=1.0, seed=2)]
    generators = [None, row_generator(1, logits.device), row_generator(2, logits.device)]
    with HostSyncs() as syncs:
        sample_step(logits, params, generators)
    assert syncs.synced == []
