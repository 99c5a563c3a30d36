"""Batches for training: a fixed order per (seed, epoch), right padding, and packing.

Labels are not shifted (the loss shifts). Packed rows put several examples in one ``max_length``
row with ``position_ids`` restarting per example, no attention mask (Hugging Face models then
build a block-diagonal causal mask from the positions; splice's loss instead attends within each
segment through the varlen kernel, :mod:`splice.fused.varlen`), and the first label of each example
masked, so nothing is predicted across a boundary.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from splice.data.rows import IGNORE_INDEX, Example

__all__ = ["Batch", "batches"]

Batch = dict[str, torch.Tensor]


def _order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    if shuffle:  # a string seed is hashed (sha512) by random: stable across runs and platforms
        random.Random(f"splice.batches:{seed}:{epoch}").shuffle(order)
    return order


def _pad_rows(
    ids: list[list[int]], labels: list[list[int]], positions: list[list[int]] | None, pad_id: int,
    width: int | None = None,
) -> Batch:
    """Right-pad rows to ``width`` (default: the longest); pads get label -100 and (if given)
    positions from 0: a segment of their own."""
    width = width or max(len(r) for r in ids)
    batch: Batch = {
        "input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in ids], dtype=torch.long),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels], dtype=torch.long),
        # Real (non-pad) tokens: packed rows have no attention mask to count them from.
        "num_tokens": torch.tensor(sum(len(r) for r in ids)),
    }
    if positions is None:
        batch["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], dtype=torch.long)
    else:
        # Trailing pads are a segment of their own (positions from 0): real tokens never attend to them
        # (causal, later), and they attend to no real token, so they cost the varlen kernel only their own.
        batch["position_ids"] = torch.tensor([p + list(range(width - len(p))) for p in positions], dtype=torch.long)
    return batch


def _pack(examples: list[Example], max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedy packing in order: (ids, labels, position_ids) rows of at most max_length tokens."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    for example in examples:
        n = len(example.input_ids)
        if not rows or len(rows[-1][0]) + n > max_length:
            rows.append(([], [], []))
        ids, labels, positions = rows[-1]
        ids.extend(example.input_ids)
        # The segment's first token gets -100: nothing is predicted across examples.
        labels.extend([IGNORE_INDEX] + example.labels[1:])
        positions.extend(range(n))
    return rows


def batches(
    examples: Sequence[Example],
    *,
    batch_size: int,
    pad_id: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    pack: bool = False,
    max_length: int | None = None,
) -> list[Batch]:
    """All batches of one epoch, in an order fixed by (``seed``, ``epoch``) so training can resume
    at a batch index.

    Unpacked: ``input_ids``, ``attention_mask``, ``labels``, each (B, T) long, right-padded to the
    batch's longest example (pads: mask 0, label -100); ``max_length`` only checks lengths.

    ``pack=True`` concatenates (shuffled) examples greedily into rows of at most ``max_length``
    tokens; ``batch_size`` counts rows. Each segment restarts ``position_ids`` at 0 and its first
    label is -100; a row's trailing pads are one more segment (positions from 0, labels -100). Packed
    batches have NO ``attention_mask``: transformers (v5) then reads segment boundaries from
    ``position_ids`` and builds a block-diagonal causal mask (eager, sdpa, flex, flash); a 2-D mask
    would switch that off and let segments attend to each other. Call the model with
    ``model(**batch)`` or pass ``batch.get("attention_mask")``. The positions are the only record of the
    segments: :class:`splice.fused.varlen.Packing` reads ``cu_seqlens`` from them on the device (no host
    sync, a fixed shape per batch shape), so rank shares and CUDA graphs need nothing more.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be >= 1")
    if not examples:
        raise ValueError("no examples to batch; tokenize_rows returned none")
    if pack and max_length is None:
        raise ValueError("pack=True needs max_length (the packed row length), e.g. max_length=512")
    if max_length is not None:
        longest = max(len(e.input_ids) for e in examples)
        if longest > max_length:
            raise ValueError(
                f"an example has {longest} tokens > max_length={max_length}; tokenize with "
                f"tokenize_rows(..., max_length={max_length}) or raise max_length"
            )
    ordered = [examples[i] for i in _order(len(examples), shuffle=shuffle, seed=seed, epoch=epoch)]
    result: list[Batch] = []
    if pack:
        assert max_length is not None
        packed = _pack(ordered, max_length)
        for start in range(0, len(packed), batch_size):
            rows = packed[start : start + batch_size]
            # Always max_length wide: fixed shapes, so shape-specialised GPU kernels compile once.
            result.append(_pad_rows([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                    pad_id, width=max_length))
        return result
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        result.append(_pad_rows([e.input_ids for e in group], [e.labels for e in group], None, pad_id))
    return result
