"""A preallocated KV cache of ``slots`` sequences of at most ``max_len`` tokens (a memory bound).

Layout per layer: ``keys, values: (slots, kv_heads, max_len, head_dim)``, allocated once. A forward
is *bound* to a contiguous run of slots (``bind``): batch row ``b`` is slot ``first + b`` and writes
its new keys at its own positions ``positions[b, :]`` (rows have different lengths), then attends
over ``[0, width)`` of its slot under :func:`slot_mask`. Nothing is concatenated or reallocated, so
the decode step has fixed shapes (CUDA-graph friendly) and no host sync.

Duck-typed to what Hugging Face attention layers call: ``update(key, value, layer_idx, ...)``
returning the keys and values to attend over.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SlotKVCache", "slot_mask"]


def slot_mask(positions: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """Additive mask (B, 1, L, width): query at position ``p`` sees keys ``0..p`` of its own slot."""
    keys = torch.arange(width, device=positions.device)
    allowed = keys[None, None, None, :] <= positions[:, None, :, None]
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class SlotKVCache:
    """Preallocated keys/values for ``slots`` sequences (see module docstring)."""

    def __init__(self, *, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len
        self._first, self._count, self._width = 0, slots, max_len
        self._positions: Tensor | None = None  # (B, L) write positions of the bound forward

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, slots: int, max_len: int,
                  dtype: torch.dtype | None = None) -> SlotKVCache:
        config: Any = model.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        param = next(model.parameters())
        return cls(layers=int(config.num_hidden_layers), slots=slots, max_len=max_len, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=dtype or param.dtype, device=param.device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def bind(self, *, first: int, count: int, positions: Tensor, width: int) -> None:
        """The next forward runs slots ``first .. first+count-1``, writing at ``positions`` (count, L)
        and attending over ``[0, width)``."""
        if first < 0 or first + count > self.slots or width > self.max_len or width < 1:
            raise ValueError(f"slots {first}..{first + count} / width {width} outside the cache "
                             f"({self.slots} slots of {self.max_len})")
        self._first, self._count, self._width, self._positions = first, count, width, positions

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Write ``key``/``value`` (B, H, L, D) at the bound positions; the (B, H, width, D) views."""
        if self._positions is None:
            raise RuntimeError("SlotKVCache.bind must be called before a forward")
        rows = slice(self._first, self._first + self._count)
        keys, values = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        batch = torch.arange(self._count, device=key.device)[:, None]
        keys[batch, :, self._positions] = key.transpose(1, 2).to(keys.dtype)  # (B, L, H, D)
        values[batch, :, self._positions] = value.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self._width], values[:, :, : self._width]

    # What Hugging Face models may ask of a cache when positions and a 4D mask are given.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    def __len__(self) -> int:
        return len(self.keys)
