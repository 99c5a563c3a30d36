"""The LoRA branch's Triton kernels (splice.kernels.lora_kernels) against plain PyTorch, over launch shapes.

lora_linear's tests run the kernels at their default launch shapes; here every kernel also runs at the other
shapes the tuning benchmark may pick (x_major for tn_reduce included), with dropout and sibling members, on
ragged sizes, and must give the reference's result (fp32 accumulation: close to float64).
"""

from __future__ import annotations

import pytest
import torch

from splice.kernels import use_triton
from splice.kernels.dropout import dropout
from splice.kernels.lora_kernels import TILES, Tiles, lora_b_grads, lora_down, lora_dx_add_, tn_reduce
from tests.numerics import DEVICES

SHAPES = {
    "down": [TILES["down"], Tiles(32, 64, 4, 4, 6), Tiles(64, 128, 8, 3, 3)],
    "reduce": [TILES["reduce"], Tiles(64, 128, 4, 3, 4), Tiles(64, 128, 4, 3, 4, x_major=True),
               Tiles(32, 64, 4, 4, 4, x_major=True)],
    "dx": [TILES["dx"], Tiles(32, 256, 4, 1), Tiles(64, 64, 8, 1)],
    "b_grads": [TILES["b_grads"], Tiles(64, 128, 4, 3, 4), Tiles(32, 64, 4, 2, 8)],
}


def _inputs(device: str, members: int) -> tuple[torch.Tensor, ...]:
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("Triton path only (CUDA, or TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(members)
    n, k, r = 70, 200, 5  # ragged: tails of every tile; rank 5 pads to 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter has no bf16 rounding
    x = torch.randn(n, k, generator=gen).to(device, dtype)
    a = (torch.randn(members * r, k, generator=gen) / k**0.5).to(device)
    t = torch.randn(n, members * r, generator=gen).to(device)
    keys = torch.randint(0, 2**31 - 1, (members, 2), generator=gen, dtype=torch.int32).to(device)
    return x, a, t, keys


def _member_keys(keys: torch.Tensor, members: int) -> torch.Tensor:
    return keys if members > 1 else keys[0]


def _dropped(v: torch.Tensor, p: float, keys: torch.Tensor) -> torch.Tensor:
    """``v`` (float64) through the Triton path's mask for ``keys``, unrounded (dropout() rounds to v's dtype)."""
    if p == 0:
        return v.double()
    keep = dropout(torch.ones(v.shape, device=v.device), p, keys) != 0
    return v.double() * keep / (1 - p)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _down(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, p: float, members: int,
          tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor, float]:
    got = lora_down(x, a, p, _member_keys(keys, members), alpha=1.5, tiles=tiles, members=members if p > 0 else 1)
    want = torch.cat([_dropped(x, p, keys[g]) @ ag.double().T for g, ag in enumerate(a.chunk(members))], dim=1)
    return got, 1.5 * want, _split_tol(x)


def _split_tol(x: torch.Tensor) -> float:
    """fp32 operands enter as two 16-bit halves: ~22 bits with fp16 halves, ~16 with bf16 (2**-17 a product)."""
    return 1e-5 if x.dtype == torch.float16 else 3e-5


def _reduce(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, p: float, members: int,
            tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor, float]:
    got = tn_reduce(t, x, p, _member_keys(keys, members), alpha=0.5, tiles=tiles, members=members if p > 0 else 1)
    want = torch.cat([tg.double().T @ _dropped(x, p, keys[g]) for g, tg in enumerate(t.chunk(members, dim=1))])
    return got, 0.5 * want, _split_tol(x)


def _dx(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, p: float, members: int,
        tiles: Tiles) -> tuple[torch.Tensor, torch.Tensor, float]:
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x.device, x.dtype)
    got = lora_dx_add_(dx.clone(), t, a, p, _member_keys(keys, members), tiles=tiles, members=members if p > 0 else 1)
    want = dx.double()
    for g, (tg, ag) in enumerate(zip(t.chunk(members, dim=1), a.chunk(members))):
        # the kernel multiplies 16-bit copies of t and a (enough for a 16-bit gradient): so does the reference
        want = want + _dropped(tg.to(x.dtype).double() @ ag.to(x.dtype).double(), p, keys[g])
    return got, want, 2e-3  # dx is rounded once to 16 bits


KERNELS = {"down": _down, "reduce": _reduce, "dx": _dx}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(("kernel", "tiles"), [(k, t) for k, shapes in SHAPES.items() if k in KERNELS for t in shapes])
def test_kernel_matches_reference_at_every_launch_shape(device: str, members: int, p: float, kernel: str,
                                                        tiles: Tiles) -> None:
    x, a, t, keys = _inputs(device, members)
    got, want, tol = KERNELS[kernel](x, a, t, keys, p, members, tiles)
    assert _rel(got, want) < tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [5, 16])
@pytest.mark.parametrize("tiles", SHAPES["b_grads"])
def test_b_grads_give_lora_downs_t_and_tn_reduces_db_from_one_read(device: str, rank: int, tiles: Tiles) -> None:
    # G (70, 200): ragged against every tile (rows and columns); rank 5 pads to 16
    g16, _, _, _ = _inputs(device, 1)
    gen = torch.Generator().manual_seed(rank)
    b_t = (torch.randn(rank, g16.shape[1], generator=gen) / 4).to(device)
    u = torch.randn(g16.shape[0], rank, generator=gen).to(device)
    t, db_t = lora_b_grads(g16, b_t, u, alpha=0.75, tiles=tiles)
    assert t.shape == (g16.shape[0], rank) and db_t.shape == (rank, g16.shape[1])
    assert _rel(t, 0.75 * g16.double() @ b_t.double().T) < _split_tol(g16)
    assert _rel(db_t, 0.75 * u.double().T @ g16.double()) < _split_tol(g16)
    # the two kernels it stands for, at their defaults: equal but for the order of fp32 sums
    assert _rel(t, lora_down(g16, b_t, alpha=0.75).double()) < 1e-6
    assert _rel(db_t, tn_reduce(u, g16, alpha=0.75).double()) < 1e-6


def test_b_grads_refuse_mismatched_shapes_in_one_line() -> None:
    # checked before any launch: runs without Triton too
    g16 = torch.zeros(70, 200, dtype=torch.float16)
    with pytest.raises(ValueError, match="lora_b_grads: g .N, O., b_t .R, O. and u .N, R. expected"):
        lora_b_grads(g16, torch.zeros(4, 3), torch.zeros(70, 4))  # b_t 3 columns, not 200
    with pytest.raises(ValueError, match="lora_b_grads: g .N, O., b_t .R, O. and u .N, R. expected"):
        lora_b_grads(g16, torch.zeros(4, 200), torch.zeros(69, 4))  # u 69 rows, not 70
