"""splice.quant.nf4_ops: NF4Tensor's one op table, and what happens to an op that is not in it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from splice.quant.nf4 import to_nf4
from splice.quant.nf4_ops import NF4_OPS, handler_for, implements, run_dequantized


def test_ops_without_a_handler_raise_naming_the_op() -> None:
    """One table: an op nobody registered raises (as torchao's NF4Tensor) instead of silently
    running on a dequantized float copy; in-place writes say so."""
    t = to_nf4(torch.randn(8, 64))
    with pytest.raises(NotImplementedError, match=r"no handler for aten\.sum\.default.*dequantize"):
        t.sum()
    with pytest.raises(NotImplementedError, match=r"aten\.gelu\.default"):
        F.gelu(t)
    with pytest.raises(TypeError, match="in-place add_"):
        t.add_(1.0)
    with pytest.raises(TypeError, match="in-place copy_ of float values"):
        t.copy_(torch.zeros(8, 64))


def test_the_op_table_holds_the_core_and_fsdp2_ops() -> None:
    """Importing splice.quant.nf4 registers its own handlers and FSDP2's (splice.quant.nf4_fsdp)."""
    aten = torch.ops.aten
    for op in (aten.mm.default, aten.addmm.default, aten.t.default, aten._to_copy.default, aten.detach.default,
               aten.copy_.default, aten.split.Tensor, aten.new_zeros.default, aten.slice.Tensor,
               aten.view.default, aten.as_strided.default, aten._pin_memory.default):
        assert op in NF4_OPS, op
    assert aten.sum.default not in NF4_OPS


def test_a_registered_handler_runs_and_can_choose_the_float_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("splice.quant.nf4_ops.NF4_OPS", dict(NF4_OPS))  # leave the real table as it was
    import splice.quant.nf4_ops as nf4_ops

    calls: list[Any] = []

    @implements([torch.ops.aten.sum.default])
    def _sum(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls.append(func)
        return run_dequantized(func, args, kwargs)

    assert nf4_ops.NF4_OPS[torch.ops.aten.sum.default] is _sum is handler_for(torch.ops.aten.sum.default)
    t = to_nf4(torch.randn(8, 64))
    assert torch.equal(t.sum(), t.dequantize().sum()) and calls == [torch.ops.aten.sum.default]
