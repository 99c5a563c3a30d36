"""Each rank's share of a global batch, and the position in the data across world sizes.

Every rank builds the same list of *global* micro-batches (``batch_size * world_size`` rows, in the
order fixed by seed and epoch; packed rows are packed before they are grouped, so the rows do not
depend on the world size) and keeps rows ``[r * n // N, (r + 1) * n // N)`` of each: rank ``r``
of ``N`` reads a deterministic, disjoint share, and the N shares together are exactly the batch
one process would read with ``batch_size * N``. The loss of a step is the sum of all ranks'
target-token losses over the *global* target count (an all-reduce of the count before backward),
so N ranks compute the same loss and gradients as that one process, up to float summation order.

A share can be empty (the last batch of an epoch may have fewer rows than ranks); that rank then
gets one row of padding with no targets, which adds nothing to the loss or the gradients but still
takes part in every collective of the step.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rank_share", "rescale_position"]

Batch = dict[str, torch.Tensor]
_IGNORE = -100


def rank_share(batch: Batch, *, rank: int, world_size: int, pad_id: int) -> Batch:
    """Rank ``rank``'s rows of a global ``batch`` (tensors (B, T); ``num_tokens`` recounted)."""
    if world_size == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    start, end = rank * rows // world_size, (rank + 1) * rows // world_size
    if start == end:
        return _empty_like(batch, pad_id=pad_id)
    share = {k: v[start:end] for k, v in batch.items() if v.dim() == 2}
    if "attention_mask" in share:
        share["num_tokens"] = share["attention_mask"].sum()
    else:
        share["num_tokens"] = _packed_tokens(share["input_ids"], share["labels"], pad_id=pad_id)
    return share


def _packed_tokens(ids: torch.Tensor, labels: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """Real tokens of packed (B, T) rows: all but each row's trailing run of padding (pad id with
    no target; a row's real last token is an answer token, which has one)."""
    real = (ids != pad_id) | (labels != _IGNORE)  # (B, T)
    width = ids.shape[1]
    # index of the last real token + 1 per row (0 for an all-pad row)
    last = torch.where(real, torch.arange(1, width + 1), torch.zeros((), dtype=torch.long))
    return last.max(dim=1).values.sum()


def _empty_like(batch: Batch, *, pad_id: int) -> Batch:
    """One row of padding, no targets: the same keys and width as ``batch``."""
    width = batch["input_ids"].shape[1]
    empty: Batch = {
        "input_ids": torch.full((1, width), pad_id, dtype=torch.long),
        "labels": torch.full((1, width), _IGNORE, dtype=torch.long),
        "num_tokens": torch.tensor(0),
    }
    if "attention_mask" in batch:
        empty["attention_mask"] = torch.ones((1, width), dtype=torch.long)
    if "position_ids" in batch:
        empty["position_ids"] = torch.arange(width, dtype=torch.long)[None]
    return empty


def rescale_position(batch_index: int, *, saved_world: int, world_size: int) -> int:
    """The global micro-batch index on ``world_size`` ranks that continues a run stopped at
    ``batch_index`` on ``saved_world`` ranks: the rows read so far, rounded up to whole new global
    batches (so within the epoch no row is read twice; up to one batch of rows is skipped).
    The same world size gives the same index: that resume is exact."""
    if saved_world == world_size:
        return batch_index
    return math.ceil(batch_index * saved_world / world_size)
