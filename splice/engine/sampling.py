"""Sampling: the options of a request, their checks, and the samplers (one row, or a whole step).

A request samples ``x ~ softmax(top_k_top_p_filter(logits / temperature))`` in fp32, or takes
``argmax(logits)`` when greedy. Temperatures below :data:`GREEDY_BELOW` count as greedy: dividing
by 1e-40 overflows fp32 to inf and the softmax to nan, while any temperature that small already
puts all the mass on the argmax. Seeds of any size are folded into 63 bits (:func:`bounded_seed`)
so ``torch.Generator.manual_seed`` never overflows.

:func:`sample_step` draws the next token of every row of an engine step on the device without a
host sync: one ``argmax`` for the greedy rows, and for the sampled rows per-row temperature /
top-k / top-p tensors, then an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn from
the row's own ``torch.Generator`` (``P(argmax = j) = p_j``). A row's draws come from its own
generator only, so a seed gives the same tokens whatever else is in the batch. On a GPU every row's
noise comes from one launch keyed by its generator's seed and offset (:mod:`splice.kernels.exponential`:
the same distribution as ``exponential_``, other numbers); on a CPU, from ``exponential_`` row by row.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from splice.core.device import to_device
from splice.engine.constraints import Constraint
from splice.kernels import use_triton
from splice.kernels.exponential import exponential_noise, exponential_noise_reference, generator_keys

__all__ = [
    "GREEDY_BELOW",
    "MAX_LOGPROBS",
    "MAX_N",
    "PENALTY_LIMIT",
    "SamplingParams",
    "TokenCounts",
    "apply_penalties",
    "bounded_seed",
    "check_sampling",
    "filter_rows",
    "row_generator",
    "sample_next",
    "sample_step",
    "token_logprobs",
    "top_k_top_p_filter",
]

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (see module docstring)
MAX_N = 16  # choices of one request (n)
MAX_LOGPROBS = 20  # most likely tokens a request may ask the logprobs of (OpenAI's top_logprobs limit)
PENALTY_LIMIT = 2.0  # presence / frequency penalties lie in [-2, 2] (OpenAI)
_SEED_LIMIT = 1 << 63  # torch.Generator.manual_seed takes a signed or unsigned 64-bit value


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """One clear line for a temperature, top-k or top-p outside its range."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def bounded_seed(seed: int) -> int:
    """``seed`` itself when in ``[0, 2**63)``, else a stable 63-bit hash of it (any int works)."""
    if 0 <= seed < _SEED_LIMIT:
        return seed
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_LIMIT


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``bounded_seed(seed)``, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(bounded_seed(seed))
    return generator


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and when it ends (``stop``: strings that end it, cut from the text).

    ``n``: choices of the one prompt (computed once), choice ``i`` sampling as :meth:`choice` ``(i)``.
    ``presence_penalty`` / ``frequency_penalty`` in [-2, 2]: see the module docstring. ``logprobs``:
    None, or ``k`` in [0, 20]: each generated token's raw log-probability and the ``k`` most likely."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured output (splice.engine.constraints), enforced by the engine

    def __post_init__(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not abs(float(value)) <= PENALTY_LIMIT:
                raise ValueError(f"{name} must be a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {value!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (the most likely tokens "
                             f"to report), got {self.logprobs!r}")
        if self.constraint is not None and not isinstance(self.constraint, Constraint):
            raise ValueError(f"constraint must be made by splice.engine.constraints (json_schema, json_object, "
                             f"regex, choice), got {self.constraint!r}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    def choice(self, index: int) -> SamplingParams:
        """How choice ``index`` of the ``n`` samples: on its own (``n = 1``), seeded ``seed + index``
        when seeded (vLLM's rule), so each choice is reproducible and the choices differ."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)


def filter_rows(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """``logits`` (B, V) with each row's tokens outside its top-k / nucleus set at ``-inf``.

    ``top_k`` (B,) int (0: off), ``top_p`` (B,) float (1: off), on ``logits``' device. Top-k keeps
    logits ``>=`` the row's k-th largest (ties at the boundary stay). Top-p then keeps, in order of
    decreasing ``softmax`` of the top-k-filtered row, token ``j`` iff the mass ranked before it is
    ``< top_p`` (the most likely token always stays). Kept logits are unchanged. No host sync.
    """
    vocab = logits.shape[-1]
    ranked, order = logits.sort(dim=-1, descending=True, stable=True)  # (B, V)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
    kth = ranked.gather(-1, (k - 1)[:, None])  # (B, 1): the k-th largest logit
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))  # the top-k set, still sorted
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of better-ranked tokens
    drop_ranked = (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop_ranked |= ranked == float("-inf")
    drop = drop_ranked.scatter(-1, order, drop_ranked)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def top_k_top_p_filter(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """``logits`` (B, V) with every token outside the top-k / nucleus set set to ``-inf``: one
    ``top_k`` / ``top_p`` for all rows (see :func:`filter_rows`); ``top_k = 0`` and ``top_p = 1``
    disable the filters."""
    check_sampling(0.0, top_k, top_p)
    if top_k == 0 and top_p == 1.0:
        return logits
    rows = logits.shape[0]
    ks = torch.full((rows,), top_k, dtype=torch.long, device=logits.device)
    ps = torch.full((rows,), float(top_p), dtype=torch.float32, device=logits.device)
    return filter_rows(logits, ks, ps)


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token per row, (B,) int64, from next-token ``logits`` (B, V).

    Greedy (``argmax(logits)``) when ``temperature < GREEDY_BELOW``. Otherwise
    ``torch.multinomial(softmax(top_k_top_p_filter(logits / temperature)))`` in fp32, using
    ``generator`` (the global RNG when None) so a seeded generator reproduces the same tokens.
    """
    check_sampling(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, vocab), got shape {tuple(logits.shape)}")
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    probs = top_k_top_p_filter(scaled, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """``logits - frequency * counts - presence * (counts > 0)`` (the module docstring's rule): ``logits``
    and ``counts`` (P, V) fp32, ``presence`` and ``frequency`` (P,)."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Raw log-probabilities of rows ``logits`` (P, V) whose chosen tokens are ``tokens`` (P,): theirs (P,)
    fp32, and the ``top`` largest with their ids, (P, top) each, best first. No host sync."""
    logp = logits.float().log_softmax(dim=-1)
    values, ids = logp.topk(top, dim=-1)
    return logp.gather(-1, tokens[:, None])[:, 0], values, ids


class TokenCounts:
    """How often each token is among a request's generated tokens, on ``device``: a (rows, V) fp32 table,
    a row (slot) per penalized request, grown as needed. :meth:`take` a zeroed slot, :meth:`rows` the counts
    of some slots, :meth:`add` their sampled tokens, :meth:`give` a slot back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._table: Tensor | None = None
        self._free: list[int] = []

    def take(self, vocab: int) -> int:
        if not self._free:
            size = 0 if self._table is None else self._table.shape[0]
            grown = torch.zeros(max(4, 2 * size), vocab, device=self.device)
            if self._table is not None:
                grown[:size] = self._table
            self._table = grown
            self._free.extend(range(grown.shape[0] - 1, size - 1, -1))
        slot = self._free.pop()
        assert self._table is not None
        self._table[slot].zero_()
        return slot

    def give(self, slot: int) -> None:
        self._free.append(slot)

    def rows(self, slots: Tensor) -> Tensor:
        """(P, V) counts of ``slots`` (P,) int64."""
        assert self._table is not None, "take a slot first"
        return self._table.index_select(0, slots)

    def add(self, slots: Tensor, tokens: Tensor) -> None:
        """Count ``tokens[i]`` once more in slot ``slots[i]`` (P,) each, on the device."""
        assert self._table is not None, "take a slot first"
        self._table.index_put_((slots, tokens), torch.ones_like(tokens, dtype=self._table.dtype), accumulate=True)


def sample_step(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                *, counts: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
    """(S,) int64 next tokens of a step's ``logits`` (S, V): row ``i`` samples with ``params[i]``
    and draws from ``generators[i]`` (needed for the non-greedy rows). ``masks`` (S, V) bool, True =
    allowed (structured output): every other token is ruled out before anything else. ``counts``
    (P, V): the generated-token counts of the P rows with a penalty, in row order. See module docstring."""
    if len(params) != logits.shape[0] or len(generators) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(params)} sampling params "
                         f"and {len(generators)} generators")
    if masks is not None:
        logits = logits.masked_fill(~masks, float("-inf"))
    device = logits.device
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if penalized:
        if counts is None or counts.shape[0] != len(penalized):
            raise ValueError(f"{len(penalized)} rows have a penalty: give their token counts, "
                             f"got {None if counts is None else tuple(counts.shape)}")
        index = to_device(penalized, torch.long, device)
        rows = apply_penalties(logits.index_select(0, index).float(), counts,
                               to_device([params[i].presence_penalty for i in penalized], torch.float32, device),
                               to_device([params[i].frequency_penalty for i in penalized], torch.float32, device))
        logits = logits.index_copy(0, index, rows.to(logits.dtype))
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    index = to_device(sampled, torch.long, device)
    chosen = [params[i] for i in sampled]
    rows = logits.index_select(0, index).float() / to_device([p.temperature for p in chosen], torch.float32,
                                                             device)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in chosen):
        rows = filter_rows(rows, to_device([p.top_k for p in chosen], torch.long, device),
                           to_device([float(p.top_p) for p in chosen], torch.float32, device))
    probs = rows.softmax(dim=-1)
    drawing: list[torch.Generator] = []
    for i in sampled:
        if (generator := generators[i]) is None:
            raise ValueError(f"row {i} samples (temperature {params[i].temperature}) but has no generator")
        drawing.append(generator)
    # Exp(1) noise, floored so a filtered token (p = 0) never gives 0/0: on a GPU one launch for all rows, each
    # row keyed by its generator's seed and offset (splice.kernels.exponential), else row by row
    if use_triton(probs) and all(g.device.type == "cuda" for g in drawing):
        seeds, draws = generator_keys(drawing)
        noise = exponential_noise(probs.shape[1], seeds=to_device(seeds, torch.long, device),
                                  draws=to_device(draws, torch.long, device))
    else:
        noise = exponential_noise_reference(probs.shape[1], drawing, device)
    return tokens.index_copy(0, index, (probs / noise).argmax(dim=-1))
