"""A step's sampled results to the host in one copy: the tokens, and the logprobs of the rows that ask.

:func:`pack` lays a step's results out in one tensor: the tokens alone (int64) when no row asks for
logprobs, else float64 (token ids are exact in it up to 2**53, fp32 log-probabilities exactly)::

    tokens (S) | chosen logprob (P) | top ids (P x k) | top logprobs (P x k)

for the ``P`` rows that ask, ``k`` the most any of them asks. :class:`ToHost` copies it into pinned
memory with one non-blocking copy and an event (on the CPU it keeps the tensor itself), so the step
has one host sync, in :meth:`ToHost.wait`; :func:`unpack` reads the values back per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from splice.engine.output import TokenLogprob
from splice.engine.scheduler import Chunk
from splice.engine.scheduler import Sequence as Seq

__all__ = ["PENDING", "Inflight", "ToHost", "pack", "unpack"]


def pack(tokens: Tensor, chosen: Tensor | None = None, top_values: Tensor | None = None,
         top_ids: Tensor | None = None) -> Tensor:
    """One tensor of a step's results (module docstring): ``tokens`` (S,); ``chosen`` (P,) and ``top_values``
    / ``top_ids`` (P, k) for the rows that ask for logprobs (None: no row asks)."""
    if chosen is None or top_values is None or top_ids is None:
        return tokens
    return torch.cat([tokens.double(), chosen.double(), top_ids.flatten().double(), top_values.flatten().double()])


def unpack(values: Sequence[float], rows: int, asked: Sequence[int], tops: Sequence[int]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """The tokens of ``rows`` rows and each row's :class:`TokenLogprob` (None for a row that did not ask),
    from :func:`pack` ed ``values``; rows ``asked[j]`` asked for the ``tops[j]`` most likely tokens."""
    tokens = [int(t) for t in values[:rows]]
    found: list[TokenLogprob | None] = [None] * rows
    width = max(tops, default=0)
    ids_at, values_at = rows + len(asked), rows + len(asked) * (1 + width)
    for j, (row, top) in enumerate(zip(asked, tops, strict=True)):
        ids = values[ids_at + j * width: ids_at + j * width + top]
        logprobs = values[values_at + j * width: values_at + j * width + top]
        found[row] = TokenLogprob(token=tokens[row], logprob=float(values[rows + j]),  # (a grammar's masked
                                  top=tuple((int(i), float(v)) for i, v in zip(ids, logprobs, strict=True)
                                            if v > float("-inf")))  # tokens are no alternatives)
    return tokens, found


class ToHost:
    """A step's results to the host: one non-blocking copy into pinned memory and an event (a plain
    ``tolist`` on the CPU). :meth:`start` after the sampler, :meth:`wait` when the values are needed.
    ``rows``: the int64 buffer's first size (it grows, as does a float64 one, when a step needs more)."""

    def __init__(self, *, rows: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host: dict[torch.dtype, Tensor] = {}
        if self.cuda:
            self._host[torch.int64] = torch.zeros(rows, dtype=torch.int64, pin_memory=True)
        self._event = torch.cuda.Event() if self.cuda else None
        self._pending: Tensor | None = None

    def start(self, values: Tensor) -> None:
        if self._event is None:
            self._pending = values
            return
        host = self._host.get(values.dtype)
        if host is None or host.shape[0] < values.shape[0]:
            host = self._host[values.dtype] = torch.zeros(values.shape[0], dtype=values.dtype, pin_memory=True)
        self._pending = host[: values.shape[0]]
        self._pending.copy_(values, non_blocking=True)
        self._event.record()

    def wait(self) -> list[float] | list[int]:
        assert self._pending is not None, "start() first"
        pending, self._pending = self._pending, None
        if self._event is not None:
            self._event.synchronize()
        values: list[float] | list[int] = pending.tolist()
        return values


PENDING = -1  # a sampled token still on its way to the host: its place in ``seq.tokens`` until settled


@dataclass(frozen=True, eq=False, kw_only=True)
class Inflight:
    """A launched step's sampled tokens: ``tokens`` (S,) on the device, for ``seqs`` in row order;
    ``asked`` / ``tops``: the rows that want logprobs (see :func:`~splice.engine.transfer.unpack`)."""

    seqs: list[Seq]
    tokens: Tensor
    asked: list[int]
    tops: list[int]
    rows: dict[Seq, int]

    def row_of(self, chunk: Chunk) -> int:
        """The row of ``chunk``'s last input token when that token is one of these (-1: it is not)."""
        return self.rows.get(chunk.seq, -1) if chunk.start + chunk.count == len(chunk.seq.tokens) else -1
