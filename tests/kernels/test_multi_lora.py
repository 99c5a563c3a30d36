"""splice.kernels.multi_lora: per-token adapters in two launches vs the plain per-token reference."""

from __future__ import annotations

import os

import pytest
import torch

from splice.kernels import multi_lora as module
from splice.kernels.multi_lora import (
    Shrunk,
    Tiles,
    multi_lora,
    multi_lora_expand,
    multi_lora_reference,
    multi_lora_shrink,
    pad_rank,
    plan_tiles,
    tiles_for,
)
from tests.numerics import DEVICES, HostSyncs

# (rows, tokens per row, K, N, padded rank, slots): odd sizes, masks on every edge; 300 and 600 tokens
# take several chunks of the slot count and slots of more than one tile; 600 takes the prefill tiles.
SHAPES = [(5, 1, 70, 33, 16, 3), (3, 1, 300, 200, 32, 4), (6, 7, 70, 33, 16, 3), (4, 19, 64, 130, 32, 2),
          (2, 40, 129, 65, 16, 5), (300, 1, 96, 48, 16, 7), (24, 25, 80, 72, 16, 5)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Launch shapes beyond the default: several K splits, tall tiles, wide/narrow N blocks, one token a tile.
TILES = [Tiles(block_m=16, k_split=32, block_k=32, block_n=32), Tiles(block_m=64, k_split=128, block_k=64,
         block_n=64, warps=8), Tiles(block_m=32, k_split=64, block_k=16, block_n=256),
         Tiles(block_m=16, k_split=64, block_k=32, block_n=64, per_token=True)]
INTERPRETED = module.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                             reason="the kernels need a GPU or the Triton interpreter (TRITON_INTERPRET=1)")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows: int, length: int, k: int, n: int, r: int, s: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(rows * 100 + length)
    x = torch.randn(rows * length, k, generator=g).to(device, dtype)
    y = torch.randn(rows * length, n, generator=g).to(device, dtype)
    a = (torch.randn(s, r, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(s, n, r, generator=g).to(device, dtype)
    b[0, :, r // 2 :] = 0  # slot 0 has a smaller true rank, zero-padded
    slots = torch.randint(-1, s, (rows,), generator=g).to(device, torch.int32)
    slots[0] = -1  # at least one base-model row
    return x, y, a, b, slots


def _close(got: torch.Tensor, want: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= TOLERANCE[want.dtype] * scale
    assert torch.equal(got[slots == -1], y[slots == -1])  # base rows untouched, bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_per_token_reference(shape, dtype: torch.dtype, device: str) -> None:
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("half-precision matmuls on CPU are not what is served")
    if device == "cpu" and INTERPRETED and shape[0] * shape[1] > 100:
        pytest.skip("long under the interpreter: test_launch_shapes covers many tiles there")
    x, y, a, b, slots = _case(*shape, dtype, device)
    per_token = slots.repeat_interleave(shape[1])
    want = multi_lora_reference(x, y, a, b, per_token)
    _close(multi_lora(x, y, a, b, slots, row_len=shape[1]), want, y, per_token)
    _close(multi_lora(x, y, a, b, per_token), want, y, per_token)  # the engine's per-token slots
    inplace = y.clone()
    assert multi_lora(x, inplace, a, b, per_token, inplace=True) is inplace
    _close(inplace, want, y, per_token)


@KERNELS
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"m{t.block_m}k{t.k_split}n{t.block_n}{'t' * t.per_token}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launch_shapes(tiles: Tiles, dtype: torch.dtype) -> None:
    device = KERNEL_DEVICE
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter checks the indexing; the GPU the half-precision dots")
    for shape in ((150, 1, 130, 70, 16, 5), (3, 50, 64, 33, 32, 2)):  # decode-like / prefill-like
        x, y, a, b, slots = _case(*shape, dtype, device)
        per_token = slots.repeat_interleave(shape[1])
        want = multi_lora_reference(x, y, a, b, per_token)
        _close(multi_lora(x, y, a, b, per_token, kernels=True, tiles=tiles), want, y, per_token)


@KERNELS
@pytest.mark.parametrize("tiles", [None, *TILES], ids=lambda t: "default" if t is None else
                         f"m{t.block_m}k{t.k_split}n{t.block_n}{'t' * t.per_token}")
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_plan_made_once_gives_the_shrinks_own(shape, tiles: Tiles | None) -> None:
    """plan_tiles (one launch a step) writes the plan every shrink program otherwise counts for itself: the same
    plan, the same partial sums bit for bit, so the expand adds the same deltas; the plan serves any projection
    (another input width, a group of members) of the same slots."""
    rows, length, k, n, r, s = shape
    x, y, a, b, slots = _case(rows, length, k, n, r, s, torch.float32, KERNEL_DEVICE)
    per_token = slots.repeat_interleave(length)
    tiles = tiles or tiles_for(per_token.numel(), k)
    plan = plan_tiles(per_token, capacity=s, tiles=tiles)
    counted = multi_lora_shrink(x, a, per_token, tiles=tiles)
    planned = multi_lora_shrink(x, a, per_token, tiles=tiles, plan=plan)
    assert planned.plan is plan and torch.equal(plan, counted.plan)
    assert _same_rows(planned, counted)
    got = y.clone()
    multi_lora_expand(planned, b, got)
    _close(got, multi_lora_reference(x, y, a, b, per_token), y, per_token)
    wider = torch.randn(x.shape[0], 2 * k, device=x.device)  # another projection of the step, 2 members
    stack = torch.randn(s, 2, r, 2 * k, device=x.device)
    assert _same_rows(multi_lora_shrink(wider, stack, per_token, tiles=tiles, plan=plan),
                      multi_lora_shrink(wider, stack, per_token, tiles=tiles))
    with pytest.raises(ValueError, match="a plan for"):
        multi_lora_shrink(x, a, per_token, tiles=tiles, plan=plan[1:])


def _same_rows(one: Shrunk, other: Shrunk) -> bool:
    """Equal partial sums on every row a tile holds (rows past a tile's count are never written)."""
    bm = one.tiles.block_m
    for p, (_, count, *_) in enumerate(one.plan.tolist()):
        if not torch.equal(one.u[:, p * bm: p * bm + count], other.u[:, p * bm: p * bm + count]):
            return False
    return True


@KERNELS
def test_a_group_of_projections_shrinks_once() -> None:
    """Three projections of one input: A stacked (S, 3, R, K), one shrink, one expand per member; a
    member's A as a strided view of the stack shrinks on its own to the same result."""
    device = KERNEL_DEVICE
    x, _, a, _, slots = _case(40, 1, 72, 8, 16, 4, torch.float32, device)
    g = torch.Generator().manual_seed(9)
    stack = torch.randn(4, 3, 16, 72, generator=g).to(device) / 72**0.5
    widths = (48, 16, 16)
    bs = [torch.randn(4, n, 16, generator=g).to(device) for n in widths]
    ys = [torch.randn(40, n, generator=g).to(device) for n in widths]
    tiles = Tiles(k_split=32, block_k=16)
    shrunk = multi_lora_shrink(x, stack, slots, tiles=tiles)
    assert shrunk.u.shape[0] == 3 and shrunk.u.shape[2] == 3  # 3 K splits, 3 members
    for member, (b, y) in enumerate(zip(bs, ys, strict=True)):
        want = multi_lora_reference(x, y, stack[:, member], b, slots)
        got = y.clone()
        multi_lora_expand(shrunk, b, got, member=member)
        _close(got, want, y, slots)
        alone = y.clone()
        multi_lora_expand(multi_lora_shrink(x, stack[:, member], slots, tiles=tiles), b, alone)
        torch.testing.assert_close(alone, got, rtol=0, atol=0)  # the same sums in the same order


@KERNELS
@pytest.mark.parametrize("widths", [(48, 16, 16), (40, 72), (33,)])
def test_a_group_expands_into_its_packed_output(widths: tuple[int, ...]) -> None:
    """One expand adds every member's delta on its own columns of ``[y_0 | y_1 | y_2]`` (members' B rows
    stacked the same way); boundaries inside a column block, 1 to 3 members."""
    device = KERNEL_DEVICE
    x, _, _, _, slots = _case(30, 1, 64, 8, 16, 3, torch.float32, device)
    g = torch.Generator().manual_seed(11)
    stack = torch.randn(3, len(widths), 16, 64, generator=g).to(device) / 8
    b = torch.randn(3, sum(widths), 16, generator=g).to(device)
    y = torch.randn(30, sum(widths), generator=g).to(device)
    got = y.clone()
    multi_lora_expand(multi_lora_shrink(x, stack, slots), b, got, widths=widths)
    start = 0
    for member, width in enumerate(widths):
        cols = slice(start, start + width)
        _close(got[:, cols], multi_lora_reference(x, y[:, cols], stack[:, member], b[:, cols], slots), y[:, cols],
               slots)
        start += width
    with pytest.raises(ValueError, match="must be the"):
        multi_lora_expand(multi_lora_shrink(x, stack, slots), b, got, widths=(*widths, 0))


@KERNELS
def test_base_rows_only_and_strided_rows() -> None:
    device = KERNEL_DEVICE
    x, y, a, b, slots = _case(20, 1, 64, 40, 16, 3, torch.float32, device)
    assert torch.equal(multi_lora(x, y, a, b, torch.full_like(slots, -1), kernels=True), y)
    wide = torch.randn(20, 100, device=device)  # y as a column slice: rows strided, columns unit
    want = multi_lora_reference(x, wide[:, 10:50], a, b, slots)
    multi_lora(x, wide[:, 10:50], a, b, slots, kernels=True, inplace=True)
    _close(wide[:, 10:50], want, want, slots)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_no_host_sync_and_cuda_graph_replays_new_slots() -> None:
    """Grids depend on shapes only and the slots stay on the device: a captured launch pair replays
    any later slots (here reversed, then every token on one adapter, then none)."""
    x, y, a, b, slots = _case(64, 1, 256, 96, 16, 6, torch.bfloat16, "cuda")
    with HostSyncs() as syncs:
        multi_lora(x, y, a, b, slots)
    assert syncs.synced == []
    static_slots, out = slots.clone(), y.clone()
    multi_lora(x, out, a, b, static_slots, inplace=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_lora(x, out, a, b, static_slots, inplace=True)
    for new in (slots.flip(0), torch.full_like(slots, 4), torch.full_like(slots, -1)):
        static_slots.copy_(new)
        out.copy_(y)
        graph.replay()
        _close(out, multi_lora_reference(x, y, a, b, new), y, new)


def test_pad_rank_tiles_and_bad_shapes() -> None:
    assert [pad_rank(r) for r in (1, 8, 16, 17, 64)] == [16, 16, 16, 32, 64]
    assert tiles_for(32, 4096).block_m == 16 and tiles_for(2048, 4096).block_m == 32
    assert (tiles_for(32, 4096).k_split, tiles_for(256, 4096).k_split, tiles_for(2048, 14336).k_split) == (512, 1024, 1024)
    assert all(tiles_for(t, k).k_split % tiles_for(t, k).block_k == 0 for t in (1, 4096) for k in (70, 14336))
    x, y, a, b, slots = _case(2, 3, 8, 8, 16, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="slots of 2 tokens"):
        multi_lora(x, y, a, b, slots, row_len=2)
    plan = Shrunk(torch.zeros(1, 16, 1, 16), torch.zeros(1, 18, dtype=torch.int32), Tiles(), True)
    with pytest.raises(ValueError, match="unit column stride"):
        multi_lora_expand(plan, b, y.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=KERNELS)])
def test_a_per_slot_affine_rescales_the_adapted_rows_only(kernels: bool, dtype: torch.dtype) -> None:
    """``factor`` / ``shift`` (S, N) fp32 (a bank's DoRA adapters): adapted rows become ``factor[s] * (y +
    delta) + shift[s]``, base rows stay bit for bit; decode-like and prefill-like slots, and a packed group's
    expand with its members' columns of one (S, N_1 + N_2) factor."""
    device = KERNEL_DEVICE if kernels else "cpu"
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("half-precision matmuls on CPU are not what is served")
    for shape in ((20, 1, 40, 33, 16, 3), (3, 9, 40, 33, 16, 3)):
        x, y, a, b, slots = _case(*shape, dtype, device)
        g = torch.Generator().manual_seed(7)
        factor = (0.5 + torch.rand(shape[5], shape[3], generator=g)).to(device)
        shift = torch.randn(shape[5], shape[3], generator=g).to(device)
        per_token = slots.repeat_interleave(shape[1])
        want = multi_lora_reference(x, y, a, b, per_token, factor=factor, shift=shift)
        assert (want - multi_lora_reference(x, y, a, b, per_token))[per_token >= 0].abs().max() > 0.1
        got = multi_lora(x, y, a, b, slots, row_len=shape[1], kernels=kernels, factor=factor, shift=shift)
        _close(got, want, y, per_token)
    if not kernels:
        return
    widths = (20, 13)
    stack = (torch.randn(3, 2, 16, 40, generator=g) / 8).to(device, dtype)
    packed, member = y.clone(), y[:, 20:].clone()
    shrunk = multi_lora_shrink(x, stack, per_token)
    multi_lora_expand(shrunk, b, packed, widths=widths, factor=factor, shift=shift)
    multi_lora_expand(shrunk, b[:, 20:], member, member=1, factor=factor[:, 20:], shift=shift[:, 20:])
    for i, cols in enumerate((slice(0, 20), slice(20, 33))):
        want = multi_lora_reference(x, y[:, cols], stack[:, i], b[:, cols], per_token, factor=factor[:, cols],
                                    shift=shift[:, cols])
        _close(packed[:, cols], want, y[:, cols], per_token)
    _close(member, want, y[:, 20:], per_token)
