"""A step's flat inputs, written in place into one host buffer and sent with one copy.

:class:`Staging` owns a host buffer (pinned on CUDA) and a device buffer of the same layout:
fixed sections for up to ``tokens`` tokens and ``seqs`` sequences of ``width`` blocks each::

    int64: ids (tokens) | positions (tokens) | slots (tokens) | sample_at (seqs)
    int32: bank_slots (tokens) | seq_lens (seqs) | starts (seqs + 1) | tables (seqs x width)

:meth:`Staging.fill` writes a plan's chunks into the host sections (numpy views, no per-step tensors)
and copies the used part to the device in one ``copy_`` (on the CPU the device buffer *is* the host
buffer). The returned :class:`StepInputs` are views of the device buffer at fixed offsets, so a CUDA
graph captured on them reads every later step's inputs. Block-table rows are rewritten only where
they may have changed: the scheduler replaces a sequence's ``block_ids`` list (admission,
preemption, fork) or changes entries in place only at or after the block of the chunk it schedules
(copy-on-write), so each row remembers the list it holds and how much of it was written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from splice.engine.scheduler import Chunk

__all__ = ["StepInputs", "Staging"]

_I64 = ("ids", "positions", "slots", "sample_at", "feed_to", "feed_from")
_I32 = ("bank_slots", "seq_lens", "starts", "tables")


@dataclass(frozen=True, eq=False)
class StepInputs:
    """A step's device inputs (see module docstring): ``T`` tokens of ``B`` chunks, ``S`` sampled."""

    ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    slots: Tensor  # (T,) int64 flat cache slot per token
    sample_at: Tensor  # (S,) int64 rows whose logits are sampled
    bank_slots: Tensor  # (T,) int32 adapter bank slot per token, -1: none
    seq_lens: Tensor  # (B,) int32 tokens in cache incl. this step's
    starts: Tensor  # (B + 1,) int32 query_start_loc
    tables: Tensor  # (B, width) int32 block tables
    max_query_len: int
    max_seq_len: int
    feed_to: Tensor | None = None  # (F,) int64 rows of ``ids`` that take a token sampled on the device by
    feed_from: Tensor | None = None  # the previous step: ids[feed_to] = previous[feed_from] (feed_ids)

    def feed_ids(self, previous: Tensor | None) -> None:
        """Write the previous step's sampled tokens (still on the device) into this step's ``ids``."""
        if self.feed_to is not None and self.feed_from is not None and self.feed_to.numel():
            if previous is None:
                raise ValueError("this step's inputs take tokens of the previous step: pass them (previous=)")
            self.ids.index_copy_(0, self.feed_to, previous.index_select(0, self.feed_from))


def _sizes(tokens: int, seqs: int, width: int) -> dict[str, int]:
    return {"ids": tokens, "positions": tokens, "slots": tokens, "sample_at": seqs, "feed_to": seqs,
            "feed_from": seqs, "bank_slots": tokens, "seq_lens": seqs, "starts": seqs + 1, "tables": seqs * width}


class Staging:
    """Host and device buffers for steps of up to ``tokens`` tokens in ``seqs`` chunks (module docstring)."""

    def __init__(self, *, tokens: int, seqs: int, width: int, block_size: int, device: torch.device) -> None:
        self.tokens, self.seqs, self.width, self.block_size, self.device = tokens, seqs, width, block_size, device
        sizes = _sizes(tokens, seqs, width)
        self._offsets: dict[str, int] = {}  # byte offset of each section
        offset = 0
        for name in (*_I64, *_I32):
            self._offsets[name] = offset
            offset += sizes[name] * (8 if name in _I64 else 4)
        self.nbytes = offset
        cuda = device.type == "cuda"
        self._host = torch.zeros(offset, dtype=torch.uint8, pin_memory=cuda)
        self._device = torch.zeros(offset, dtype=torch.uint8, device=device) if cuda else self._host
        self._copied = torch.cuda.Event() if cuda else None  # the last copy out of the host buffer
        raw = self._host.numpy()
        self._np = {name: raw[self._offsets[name]: self._offsets[name] + sizes[name] * (8 if name in _I64 else 4)]
                    .view(np.int64 if name in _I64 else np.int32) for name in sizes}
        self._tables = self._np["tables"].reshape(seqs, width)
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * seqs  # (block_ids held, entries written)

    def fits(self, tokens: int, seqs: int) -> bool:
        return tokens <= self.tokens and seqs <= self.seqs

    def _view(self, name: str, count: int) -> Tensor:
        start = self._offsets[name]
        size = 8 if name in _I64 else 4
        return self._device[start: start + count * size].view(torch.int64 if name in _I64 else torch.int32)

    def _table_rows(self, chunks: Sequence[Chunk], pad_counts: np.ndarray) -> None:
        """Row ``b`` of the tables gets chunk ``b``'s block ids (only what may have changed); padded rows
        read the scratch block 0 for each of their tokens."""
        rows, table = self._rows, self._tables
        for b, chunk in enumerate(chunks):
            ids = chunk.seq.block_ids
            held, written = rows[b]
            first = min(written, chunk.start // self.block_size) if held is ids else 0
            if first < len(ids):
                table[b, first: len(ids)] = ids[first:]
            rows[b] = (ids, len(ids))
        n, pad = len(chunks), len(pad_counts)
        table[n: n + pad, 0] = 0  # (one vectorized write: a mixed step pads up to ~max_seqs sequences)
        rows[n: n + pad] = [(None, 0)] * pad
        for j in np.flatnonzero(pad_counts > self.block_size).tolist():  # the few longer than one block
            table[n + j, : -(-int(pad_counts[j]) // self.block_size)] = 0

    def _pad_counts(self, pad_tokens: int, pad_seqs: int) -> np.ndarray:
        """Tokens of each padding sequence: ``pad_tokens`` spread over ``pad_seqs`` sequences, one each
        while they last (a decode bucket), else evenly; each fits in one block-table row."""
        if pad_tokens <= pad_seqs:
            return (np.arange(pad_seqs) < pad_tokens).astype(np.int64)
        base, extra = divmod(pad_tokens, pad_seqs)
        if base + (extra > 0) > self.width * self.block_size:
            raise ValueError(f"{pad_tokens} padding tokens do not fit in {pad_seqs} padding sequences of "
                             f"{self.width * self.block_size} tokens")
        return base + (np.arange(pad_seqs) < extra).astype(np.int64)

    def fill(self, chunks: Sequence[Chunk], *, tokens_to: int = 0, seqs_to: int = 0,
             bank_slot: Callable[[str | None], int] | None = None, feed: Sequence[int] = ()) -> StepInputs:
        """Stage ``chunks`` and copy them to the device; ``bank_slot(adapter)``: each chunk's adapter bank
        slot (None: -1 for every token). ``feed[i]`` (one per chunk when given; -1: none): the row of the
        previous step's sampled tokens that is chunk ``i``'s last input token, not yet on the host (its
        place in ``seq.tokens`` holds anything); :meth:`StepInputs.feed_ids` writes them on the device.

        Padding to a CUDA-graph bucket of ``tokens_to`` tokens in ``seqs_to`` sequences (0: none): the
        extra tokens form padding sequences (positions from 0, every block-table entry the scratch block
        0, so they write and read only scratch slots), and the rest of the ``seqs_to`` are empty (no
        query tokens: attention skips them). ``sample_at`` then has ``seqs_to`` rows: the sampled
        chunks' last tokens first, the rest any valid row (their logits are not used)."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
        n = len(chunks)
        counts = np.fromiter((c.count for c in chunks), dtype=np.int64, count=n)
        real = int(counts.sum())
        tokens, seqs = max(tokens_to, real), max(seqs_to, n)
        if (tokens > real and seqs == n) or not self.fits(tokens, seqs):
            raise ValueError(f"a step of {tokens} tokens in {seqs} chunks does not fit the staging buffers "
                             f"({self.tokens} tokens, {self.seqs} sequences)")
        pad_counts = self._pad_counts(tokens - real, seqs - n) if seqs > n else np.zeros(0, dtype=np.int64)
        counts = np.concatenate([counts, pad_counts])
        firsts = np.concatenate([np.fromiter((c.start for c in chunks), dtype=np.int64, count=n),
                                 np.zeros(seqs - n, dtype=np.int64)])
        a = self._np
        starts = a["starts"]
        starts[0] = 0
        np.cumsum(counts, out=starts[1: seqs + 1])
        a["seq_lens"][:seqs] = firsts + counts
        self._table_rows(chunks, pad_counts)
        row = np.repeat(np.arange(seqs), counts)  # sequence of each token
        positions = a["positions"]
        positions[:tokens] = firsts[row] + np.arange(tokens) - starts[:seqs].astype(np.int64)[row]
        ids = a["ids"]
        if real == n:  # decodes only: one token a chunk
            ids[:n] = [c.seq.tokens[c.start] for c in chunks]
        else:
            ids[:real] = [t for c in chunks for t in c.seq.tokens[c.start: c.start + c.count]]
        ids[real:tokens] = 0
        bs = self.block_size
        pos = positions[:tokens]
        a["slots"][:tokens] = self._tables[row, pos // bs].astype(np.int64) * bs + pos % bs
        sampled = [i for i, c in enumerate(chunks) if c.sample]
        rows_out = seqs if seqs_to else len(sampled)
        a["sample_at"][: len(sampled)] = starts[1:][sampled] - 1
        a["sample_at"][len(sampled): rows_out] = np.minimum(np.arange(real, real + rows_out - len(sampled)),
                                                            tokens - 1)
        fed = [(int(starts[i + 1]) - 1, row) for i, row in enumerate(feed) if row >= 0]
        a["feed_to"][: len(fed)] = [to for to, _ in fed]
        a["feed_from"][: len(fed)] = [row for _, row in fed]
        if bank_slot is None:
            a["bank_slots"][:tokens] = -1
        else:
            a["bank_slots"][:real] = np.repeat(np.fromiter((bank_slot(c.seq.adapter) for c in chunks),
                                                           dtype=np.int32, count=n), counts[:n])
            a["bank_slots"][real:tokens] = -1
        if self._copied is not None:
            end = self._offsets["tables"] + seqs * self.width * 4
            self._device[:end].copy_(self._host[:end], non_blocking=True)
            self._copied.record()
        return StepInputs(
            ids=self._view("ids", tokens), positions=self._view("positions", tokens),
            slots=self._view("slots", tokens), sample_at=self._view("sample_at", rows_out),
            bank_slots=self._view("bank_slots", tokens), seq_lens=self._view("seq_lens", seqs),
            starts=self._view("starts", seqs + 1), tables=self._view("tables", seqs * self.width).view(seqs, self.width),
            max_query_len=int(counts.max()) if seqs else 1, max_seq_len=int(a["seq_lens"][:seqs].max()) if seqs else 1,
            feed_to=self._view("feed_to", len(fed)) if fed else None,
            feed_from=self._view("feed_from", len(fed)) if fed else None,
        )
