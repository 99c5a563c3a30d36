"""GPU out-of-memory during a training step, as one line that says what to change.

torch's own message is several lines about the allocator; a user needs the step and batch that
failed, how full the card was, and the options of this run that would lower the peak, most
effective first (only those not already on). When much of the reserved memory is unused, the
cause is fragmentation, and expandable segments are the fix (:mod:`splice.core.allocator`),
named first unless they are already on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from splice.core.allocator import EXPANDABLE, expandable_segments_on
from splice.core.errors import RunError
from splice.training.config import TrainConfig

__all__ = ["CardMemory", "card_memory", "out_of_memory"]

_GIB = 2**30
# Reserved but unallocated memory above this share of the card points at fragmentation.
_FRAGMENTED = 0.10


@dataclass(frozen=True)
class CardMemory:
    """The card's state when the allocation failed, in bytes."""

    allocated: int
    reserved: int
    total: int


def card_memory(device: torch.device) -> CardMemory:
    """What the caching allocator holds on ``device`` now (zeros off CUDA)."""
    if device.type != "cuda":
        return CardMemory(allocated=0, reserved=0, total=0)
    return CardMemory(allocated=torch.cuda.memory_allocated(device), reserved=torch.cuda.memory_reserved(device),
                      total=torch.cuda.get_device_properties(device).total_memory)


def _remedies(config: TrainConfig) -> list[str]:
    """The options that lower a step's peak, most effective first, skipping those already on."""
    fixes = []
    if not config.gradient_checkpointing:
        fixes.append("--gradient-checkpointing")
    if not config.offload_checkpoints:
        fixes.append("--offload-checkpoints")
    if not config.quantize:
        fixes.append("--quantize nf4")
    fixes.append(f"a smaller --batch-size (now {config.batch_size}) with more --grad-accum")
    fixes.append(f"a smaller --max-length (now {config.max_length})")
    return fixes


def out_of_memory(error: BaseException, *, step: int, rows: int, tokens: int, device: str,
                  memory: CardMemory, config: TrainConfig) -> RunError:
    """The error to raise for ``error`` (a ``torch.OutOfMemoryError``) in training step ``step``
    on a micro-batch of ``rows`` x ``tokens`` of the run ``config``."""
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]iB)", str(error))
    wanted = f" allocating {asked.group(1)}" if asked else ""
    unused = memory.reserved - memory.allocated
    state = (f"{memory.allocated / _GIB:.1f} GiB in use, {memory.reserved / _GIB:.1f} GiB reserved of "
             f"{memory.total / _GIB:.1f} GiB")
    fixes = _remedies(config)
    if memory.total and unused > _FRAGMENTED * memory.total and not expandable_segments_on():
        fixes.insert(0, f"start with PYTORCH_CUDA_ALLOC_CONF={EXPANDABLE} "
                        f"({unused / _GIB:.1f} GiB was reserved but unused: fragmentation)")
    return RunError(f"out of GPU memory on {device} in step {step}{wanted} (micro-batch {rows} x {tokens} "
                    f"tokens; {state}). Lower the peak with: {'; '.join(fixes)}")
