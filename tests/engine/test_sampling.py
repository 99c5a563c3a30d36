"""splice.engine.sampling: options and their checks, the per-row filters, the step sampler."""

from __future__ import annotations

import pytest
import torch

from splice.engine.sampling import (
    GREEDY_BELOW,
    SamplingParams,
    TokenCounts,
    apply_penalties,
    bounded_seed,
    filter_rows,
    row_generator,
    sample_next,
    sample_step,
    token_logprobs,
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
        (dict(n=0), r"n must be an integer in \[1, 16\], got 0"),
        (dict(n=17), r"n must be an integer in \[1, 16\], got 17"),
        (dict(n=2.0), "n must be an integer"),
        (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\], got 2.5"),
        (dict(frequency_penalty=-2.01), r"frequency_penalty must be a number in \[-2, 2\]"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty must be a number"),
        (dict(presence_penalty=True), "presence_penalty must be a number"),
        (dict(logprobs=21), r"logprobs must be None or an integer in \[0, 20\]"),
        (dict(logprobs=-1), r"logprobs must be None or an integer in \[0, 20\]"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)  # type: ignore[arg-type]
    assert SamplingParams(seed=2**70, stop=("a", "bc")).seed == 2**70
    edge = SamplingParams(n=16, presence_penalty=-2, frequency_penalty=2.0, logprobs=20)
    assert edge.penalized and not SamplingParams(logprobs=0).penalized


def test_each_choice_samples_alone_with_the_seed_plus_its_index() -> None:
    params = SamplingParams(n=3, seed=7, temperature=0.5, presence_penalty=1.0, logprobs=2)
    assert [params.choice(i).seed for i in range(3)] == [7, 8, 9]
    assert params.choice(2) == SamplingParams(seed=9, temperature=0.5, presence_penalty=1.0, logprobs=2)
    assert SamplingParams(n=2).choice(1).seed is None  # unseeded choices draw fresh entropy each


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
    params = [SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=1, presence_penalty=0.5),
              SamplingParams(temperature=1.0, seed=2, logprobs=3)]
    generators = [None, row_generator(1, logits.device), row_generator(2, logits.device)]
    counts = TokenCounts(logits.device)
    slots = torch.tensor([counts.take(20)])
    with HostSyncs() as syncs:
        tokens = sample_step(logits, params, generators, counts=counts.rows(slots),
                             masks=torch.ones(3, 20, dtype=torch.bool))
        counts.add(slots, tokens[1:2])
        token_logprobs(logits, tokens, 3)
    assert syncs.synced == []


def _penalized_reference(logits: torch.Tensor, generated: list[list[int]], presence: list[float],
                         frequency: list[float]) -> torch.Tensor:
    """OpenAI's formula token by token: logit_j - frequency * count_j - presence * (count_j > 0)."""
    out = logits.clone()
    for row, ids in enumerate(generated):
        for token in set(ids):
            count = ids.count(token)
            out[row, token] -= frequency[row] * count + presence[row] * (count > 0)
    return out


def test_penalties_follow_the_formula_and_change_the_tokens() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]] * 5)
    generated = [[0], [0, 0], [0], [1, 1, 1], [3]]
    presence, frequency = [1.0, 0.0, 0.0, -2.0, 0.0], [0.0, 0.3, 0.3, 0.0, -2.0]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in zip(presence, frequency)]
    counts = torch.zeros(5, 4)
    for row, ids in enumerate(generated):
        for token in ids:
            counts[row, token] += 1
    want = _penalized_reference(logits, generated, presence, frequency)
    got = apply_penalties(logits, counts, torch.tensor(presence), torch.tensor(frequency))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    tokens = sample_step(logits, params, [None] * 5, counts=counts)
    # presence 1 (3 -> 2 < 2.5); frequency 0.3 twice (2.4) but once (2.7); -2 presence lifts token 1
    # to 4.5; -2 frequency lifts token 3 to 1: still below 3
    assert tokens.tolist() == [1, 1, 0, 1, 0] == want.argmax(-1).tolist()


def test_penalized_rows_sample_the_penalized_distribution_among_other_rows() -> None:
    logits = _logits(6, 30)
    best = logits.argmax(-1).tolist()
    low = logits.argmin(-1).tolist()
    generated = [[], [low[1], low[1], 9], [], [1, best[3], best[3]], [], [best[5]] * 3]
    presence = [0.0, 0.5, 0.0, 1.0, 0.0, 1.5]
    frequency = [0.0, -2.0, 0.0, 2.0, 0.0, 0.7]
    temperature = [0.0, 0.9, 1.2, 0.0, 0.7, 1.0]
    params = [SamplingParams(temperature=t, presence_penalty=p, frequency_penalty=f, seed=i, top_k=12)
              for i, (t, p, f) in enumerate(zip(temperature, presence, frequency))]
    rows = [i for i, p in enumerate(params) if p.penalized]
    counts = torch.zeros(len(rows), 30)
    for j, row in enumerate(rows):
        for token in generated[row]:
            counts[j, token] += 1
    plain = [SamplingParams(temperature=t, seed=i, top_k=12) for i, t in enumerate(temperature)]

    def generators() -> list[torch.Generator | None]:
        return [row_generator(i, logits.device) if t else None for i, t in enumerate(temperature)]

    want = sample_step(_penalized_reference(logits, generated, presence, frequency), plain, generators())
    assert torch.equal(sample_step(logits, params, generators(), counts=counts), want)
    assert not torch.equal(sample_step(logits, plain, generators()), want)  # the penalties did change tokens
    with pytest.raises(ValueError, match="3 rows have a penalty: give their token counts"):
        sample_step(logits, params, generators())


def test_masks_rule_tokens_out_before_penalties_and_greedy() -> None:
    logits = _logits(2, 10)
    masks = torch.zeros(2, 10, dtype=torch.bool)
    masks[:, [3, 7]] = True
    params = [SamplingParams(frequency_penalty=2.0), SamplingParams(temperature=1.0, seed=1)]
    counts = torch.zeros(1, 10)
    counts[0, 3 if logits[0, 3] > logits[0, 7] else 7] = 5  # the better allowed token is penalized away
    tokens = sample_step(logits, params, [None, row_generator(1, logits.device)], counts=counts, masks=masks)
    assert tokens[0].item() == (7 if logits[0, 3] > logits[0, 7] else 3)
    assert tokens[1].item() in (3, 7)


def test_token_counts_count_each_slots_sampled_tokens() -> None:
    counts = TokenCounts(torch.device("cpu"))
    slots = [counts.take(6) for _ in range(5)]  # past the first four rows: the table grows, rows kept
    assert sorted(slots) == [0, 1, 2, 3, 4]
    index = torch.tensor(slots[:3])
    counts.add(index, torch.tensor([1, 1, 5]))
    counts.add(torch.tensor(slots[:1]), torch.tensor([1]))
    counts.add(torch.tensor(slots[3:]), torch.tensor([0, 2]))
    want = torch.zeros(5, 6)
    want[0, 1], want[1, 1], want[2, 5], want[3, 0], want[4, 2] = 2, 1, 1, 1, 1
    assert torch.equal(counts.rows(torch.tensor(slots)), want)
    counts.give(slots[0])
    again = counts.take(6)
    assert again == slots[0] and counts.rows(torch.tensor([again])).sum() == 0  # a reused slot starts at zero


def test_token_logprobs_are_the_raw_log_softmax() -> None:
    logits = _logits(3, 40)
    tokens = torch.tensor([5, int(logits[1].argmax()), 39])
    chosen, values, ids = token_logprobs(logits, tokens, 4)
    want = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(chosen.double(), want.gather(-1, tokens[:, None])[:, 0], rtol=0, atol=1e-6)
    assert torch.equal(ids, logits.topk(4, dim=-1).indices)
    torch.testing.assert_close(values.double(), want.gather(-1, ids), rtol=0, atol=1e-6)
    assert (values[:, :-1] >= values[:, 1:]).all() and (values.exp().sum(-1) <= 1).all()
    assert chosen[1] == values[1, 0]
    empty = token_logprobs(logits, tokens, 0)
    assert empty[1].shape == (3, 0) and empty[2].shape == (3, 0)
