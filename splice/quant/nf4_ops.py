"""The NF4 tensor's op table: ``{aten op: handler}``, filled by ``@implements([...])`` (as torchao's).

:meth:`splice.quant.nf4.NF4Tensor.__torch_dispatch__` looks every op up here and calls
``handler(func, args, kwargs)``. The handlers are :mod:`splice.quant.nf4`'s (matmuls, views,
moves, copies) and :mod:`splice.quant.nf4_fsdp`'s (FSDP2's sharding ops); importing
``splice.quant.nf4`` imports both, so the table is complete wherever an NF4Tensor exists. It is
filled once, at import, and only read afterwards.

An op without a handler raises, naming the op (torchao's NF4Tensor does the same): running it on
a silently dequantized copy would hide a full-size float weight behind a 4-bit one, and an
in-place write would be lost. A handler may still choose to compute on the dequantized weight
(:func:`run_dequantized`), for ops whose result is a new float tensor anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch._ops import OpOverload
from torch.utils._pytree import tree_map

__all__ = ["Handler", "NF4_OPS", "handler_for", "implements", "run_dequantized"]

Handler = Callable[[OpOverload, tuple[Any, ...], dict[str, Any]], Any]

NF4_OPS: dict[OpOverload, Handler] = {}


def implements(ops: Sequence[OpOverload]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(func, args, kwargs)`` runs ``ops`` whenever an NF4Tensor is an argument."""

    def register(handler: Handler) -> Handler:
        for op in ops:
            NF4_OPS[op] = handler
        return handler

    return register


def handler_for(func: OpOverload) -> Handler:
    """The handler of ``func``; raises, naming the op and the way out, when it has none."""
    handler = NF4_OPS.get(func)
    if handler is not None:
        return handler
    if func._schema.is_mutable or func.__name__.endswith("_"):
        raise TypeError(
            f"NF4Tensor does not support in-place {func.__name__}: the weight is stored in 4 bits. "
            "Dequantize it first (NF4Tensor.dequantize) and work on the float copy"
        )
    raise NotImplementedError(
        f"NF4Tensor has no handler for {func}: run it on the float weight (NF4Tensor.dequantize()), "
        "or register one with splice.quant.nf4_ops.implements"
    )


def _dequantized(x: Any) -> Any:
    return x.dequantize() if getattr(type(x), "splice_quantized", False) else x


def run_dequantized(func: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func`` over the arguments with every NF4Tensor dequantized (a float result)."""
    return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs))
