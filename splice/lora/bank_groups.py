"""The storage of an adapter bank (:mod:`splice.lora.bank`), one group of projections at a time.

Sibling projections that read one input (q/k/v, gate/up: :data:`SHARED_INPUT`) keep their A side by side,
(S, G, R, K), so that one shrink serves them all; B of the members one after the other, (S, N_1 + .. + N_G, R),
the order of a packed GEMM's output. Every other projection is a group of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SHARED_INPUT", "Group", "shared_input_groups"]


# Sibling projections that read one input: a bank stores their A side by side, and the first one called
# shrinks for all (one launch instead of three for q/k/v, two for gate/up).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_input_groups(shapes: dict[str, tuple[int, int]]) -> list[tuple[str, ...]]:
    """The groups of ``shapes``' paths (path -> (K, N)) that are siblings named in :data:`SHARED_INPUT`
    with one input width, in call order (two or more members each)."""
    groups = []
    for parent in dict.fromkeys(path.rpartition(".")[0] for path in shapes):
        for names in SHARED_INPUT:
            members = [f"{parent}.{n}" if parent else n for n in names]
            present = [m for m in members if m in shapes]
            same = tuple(m for m in present if shapes[m][0] == shapes[present[0]][0]) if present else ()
            if len(same) > 1:
                groups.append(same)
    return groups


@dataclass(frozen=True, eq=False)
class Group:
    """The bank storage of projections that read one input (or of one projection): A (S, G, R, K) and
    B (S, N_1 + .. + N_G, R), each member's B rows after the previous member's (a packed GEMM's order)."""

    paths: tuple[str, ...]
    a: Tensor
    b: Tensor
    widths: tuple[int, ...]

    @classmethod
    def zeros(cls, paths: tuple[str, ...], shapes: dict[str, tuple[int, int]], *, capacity: int, rank: int,
              device: torch.device, dtype: torch.dtype) -> Group:
        widths = tuple(shapes[p][1] for p in paths)
        a = torch.zeros(capacity, len(paths), rank, shapes[paths[0]][0], device=device, dtype=dtype)
        return cls(paths, a, torch.zeros(capacity, sum(widths), rank, device=device, dtype=dtype), widths)

    def a_of(self, member: int) -> Tensor:
        return self.a[:, member]

    def columns(self, member: int) -> slice:  # member's columns of the packed output (and rows of B)
        start = sum(self.widths[:member])
        return slice(start, start + self.widths[member])

    def b_of(self, member: int) -> Tensor:
        return self.b[:, self.columns(member)]
