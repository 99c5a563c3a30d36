"""Per-call context: facts about the forward pass now running, held in ContextVars.

Each value is set for the length of a ``with`` block and read by modules deep inside the model,
so nothing is stored on modules or in module globals: two threads (or two asyncio tasks) running
the same model each see their own values. Autograd runs a backward on its own thread, so code
that needs a value there (a checkpoint's recompute) captures it in the forward and sets it again
around the recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["causal_only", "is_causal_only", "scoped"]

T = TypeVar("T")


@contextlib.contextmanager
def scoped(var: ContextVar[T], value: T) -> Iterator[T]:
    """Set ``var`` to ``value`` inside the block and restore the previous value after it."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


# Set by splice.training.loss.model_hidden_states when a call has no attention mask and no
# position ids: the attention is then plain causal. Hugging Face cannot tell inside a CUDA-graph
# capture (it may not inspect tensors there) and builds an explicit (T, T) mask, which costs sdpa
# its causal kernels (measured ~3x slower attention in the graph); the fused attention drops it.
_CAUSAL_ONLY: ContextVar[bool] = ContextVar("splice_causal_only", default=False)


def causal_only(enabled: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Within this, splice's fused attention treats every (non-cached) call as plain causal
    self-attention: only for inputs without padding or packing (see above)."""
    return scoped(_CAUSAL_ONLY, enabled)


def is_causal_only() -> bool:
    return _CAUSAL_ONLY.get()
