"""splice.kernels.lora_swiglu: a gate/up pair's multi-LoRA expand fused with SwiGLU, against the per-token reference
(the expand's deltas, rounded as it stores them, then silu(g) * u) and against the unfused pair of launches."""

from __future__ import annotations

import os

import pytest
import torch

from splice.kernels import multi_lora as module
from splice.kernels.lora_swiglu import expand_swiglu_reference, multi_lora_expand_swiglu
from splice.kernels.multi_lora import Tiles, multi_lora_expand, multi_lora_shrink, plan_tiles, tiles_for
from splice.kernels.swiglu import swiglu_packed
from tests.numerics import GPU

INTERPRETED = module.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                             reason="the kernels need a GPU or the Triton interpreter (TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# default launch shapes of a decode batch and of a step with prompts, narrow tiles with K splits, one token a tile
TILES = [None, Tiles(block_m=32, k_split=1024, block_k=64, block_n=128),
         Tiles(block_m=16, k_split=32, block_k=32, block_n=32),
         Tiles(block_m=16, k_split=64, block_k=32, per_token=True)]


def _case(tokens: int, k: int, width: int, slots: int, dtype: torch.dtype, *, rank: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, 2 * width, generator=g).to(DEVICE, dtype)
    a = (torch.randn(slots, 2, rank, k, generator=g) / k**0.5).to(DEVICE, dtype)  # gate's A, up's A
    b = torch.randn(slots, 2 * width, rank, generator=g).to(DEVICE, dtype)  # gate's B rows, then up's
    chosen = torch.randint(-1, slots, (tokens,), generator=g)
    chosen[:3] = torch.tensor([-1, 0, -1])[: min(3, tokens)]  # base rows among adapted ones
    return x, y, a, b, chosen.to(DEVICE, torch.int32)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = max(want.float().abs().max().item(), 1.0)
    assert (got.float() - want.float()).abs().max().item() <= TOLERANCE[want.dtype] * scale


@KERNELS
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "default" if t is None else
                         f"m{t.block_m}k{t.k_split}n{t.block_n}{'t' * t.per_token}")
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=GPU),
                                   pytest.param(torch.float16, marks=GPU)])
@pytest.mark.parametrize(("tokens", "k", "width", "slots"), [(37, 64, 48, 3), (150, 96, 70, 5), (5, 32, 130, 2)])
def test_matches_the_reference_and_the_unfused_expand_then_swiglu(tokens: int, k: int, width: int, slots: int,
                                                                  dtype: torch.dtype, tiles: Tiles | None) -> None:
    x, y, a, b, chosen = _case(tokens, k, width, slots, dtype, seed=tokens)
    tiles = tiles or tiles_for(tokens, k)
    plan = plan_tiles(chosen, capacity=slots, tiles=tiles)
    shrunk = multi_lora_shrink(x, a, chosen, tiles=tiles, plan=plan)
    before = y.clone()
    got = multi_lora_expand_swiglu(shrunk, b, y, chosen)
    assert torch.equal(y, before)  # y is read, never written
    _close(got, expand_swiglu_reference(x, y, a, b, chosen))
    unfused = y.clone()
    multi_lora_expand(shrunk, b, unfused, widths=(width, width))
    _close(got, swiglu_packed(unfused))
    base = chosen == -1  # base rows: swiglu of y itself, the unfused kernel's result bit for bit
    assert torch.equal(got[base], swiglu_packed(y[base]))


@KERNELS
def test_only_base_rows_or_only_adapted_ones() -> None:
    x, y, a, b, chosen = _case(40, 64, 48, 4, torch.float32, seed=3)
    for picked in (torch.full_like(chosen, -1), chosen.clamp(min=0)):
        shrunk = multi_lora_shrink(x, a, picked)
        _close(multi_lora_expand_swiglu(shrunk, b, y, picked), expand_swiglu_reference(x, y, a, b, picked))


@KERNELS
def test_strided_rows_of_y_and_bad_shapes_get_one_line() -> None:
    x, _, a, b, chosen = _case(20, 64, 24, 3, torch.float32, seed=4)
    wide = torch.randn(20, 60, device=DEVICE)
    y = wide[:, 6:54]  # (20, 48): rows strided, columns unit
    shrunk = multi_lora_shrink(x, a, chosen)
    _close(multi_lora_expand_swiglu(shrunk, b, y, chosen), expand_swiglu_reference(x, y, a, b, chosen))
    with pytest.raises(ValueError, match="multi_lora_expand_swiglu: a gate/up shrink"):
        multi_lora_expand_swiglu(multi_lora_shrink(x, a[:, 0], chosen), b, y, chosen)  # one member
    with pytest.raises(ValueError, match="multi_lora_expand_swiglu: a gate/up shrink"):
        multi_lora_expand_swiglu(shrunk, b, y, chosen[:5])
