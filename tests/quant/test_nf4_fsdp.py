"""splice.quant.nf4_fsdp: NF4Tensor under FSDP2's sharding ops and all-gather hooks (no process group:
the ops FSDP2 applies are replayed here; tests/distributed runs the real thing on 2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from splice.quant.nf4 import NF4Tensor, to_nf4
from tests.numerics import DEVICES

# (shape, double_quant, world size, whether a shard keeps the 8-bit absmax)
CASES = [
    ((256, 256), True, 2, True),  # 1024 blocks: 2 whole 256-block groups a shard
    ((32, 32), True, 2, False),  # 16 blocks: a shard cuts the only group -> fp32 absmax
    ((16, 32), False, 2, False),  # plain fp32 absmax, sliced
    ((64, 128), True, 4, False),
    ((1024, 512), True, 8, True),
    ((37, 29), True, 1, True),  # one rank: the whole weight, short tail block and all
]


def _fsdp2_shards(t: NF4Tensor, world: int) -> list[NF4Tensor]:
    """Each rank's local shard, made by the ops ``FSDPParam._init_sharded_param`` applies."""
    chunks = list(torch.chunk(t, world, dim=0))
    shards = []
    for chunk in chunks:
        padded = t.new_zeros(chunks[0].size())
        padded.narrow(dim=0, start=0, length=chunk.size(0)).copy_(chunk)
        flat = padded.view(-1)  # FSDP2 keeps this as the shard's 1-D data
        assert isinstance(flat, NF4Tensor) and flat.shape == (padded.numel(),)
        assert flat.packed.data_ptr() == padded.packed.data_ptr()  # a view, not a copy
        shards.append(padded.narrow(dim=0, start=0, length=chunk.size(0)))
    return shards


def _all_gather(shards: list[NF4Tensor], world: int) -> NF4Tensor:
    """What FSDP2 does with the hooks: gather each input rank by rank, then post-process."""
    pieces, meta = zip(*(s.fsdp_pre_all_gather(_Mesh(world), torch.Size((0, 0)), (0, 1), None, None)
                         for s in shards), strict=True)
    gathered = tuple(torch.cat([p[i] for p in pieces]) for i in range(len(pieces[0])))
    outer = (sum(s.shape[0] for s in shards), shards[0].shape[1])
    names, layout, _, block, replicated = meta[0]
    full, inner = shards[0].fsdp_post_all_gather(gathered, (names, layout, outer, block, replicated),
                                                 torch.bfloat16)
    assert all(any(x.data_ptr() == g.data_ptr() for g in gathered) for x in inner)
    return torch.as_strided(full, full.size(), full.stride(), storage_offset=0)


class _Mesh:
    def __init__(self, world: int) -> None:
        self.world = world

    def size(self) -> int:
        return self.world


@pytest.mark.interpreter_limit("bf16")  # its last check: a bf16 linear over the gathered NF4 weight
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "double", "world", "keeps"), CASES)
def test_fsdp2_shards_and_all_gather_round_trip(device: str, shape: tuple[int, int], double: bool,
                                                world: int, keeps: bool) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device) * 0.02
    t = to_nf4(w, double_quant=double)
    ref = t.dequantize(torch.float32)
    assert t.shard_problem(world) is None
    shards = _fsdp2_shards(t, world)
    rows = shape[0] // world
    for rank, shard in enumerate(shards):
        assert isinstance(shard, NF4Tensor) and shard.shape == (rows, shape[1])
        assert shard.double_quant is keeps
        own = sum(x.nbytes for n, x in shard.inner_tensors().items() if n not in ("code", "offset", "code2"))
        blocks = -(-shard.numel() // 64)  # 4-bit codes + 8-bit (or fp32) absmax + fp32 scale2
        assert own == -(-shard.numel() // 2) + blocks * (1 if keeps else 4) + (-(-blocks // 256) * 4 if keeps else 0)
        # each shard holds exactly its rows (decompressed statistics are the same numbers)
        torch.testing.assert_close(shard.dequantize(torch.float32), ref[rank * rows:(rank + 1) * rows],
                                   rtol=1e-6 if device == "cuda" else 0, atol=0)
    full = _all_gather(shards, world)
    assert isinstance(full, NF4Tensor) and full.shape == shape and full.dtype == torch.bfloat16
    if keeps:  # the gathered inner tensors are the original's, bit for bit
        for name in ("packed", "qabsmax", "scale2", "offset", "code2"):
            assert torch.equal(getattr(full, name), getattr(t, name)), name
    else:
        assert torch.equal(full.packed, t.packed)
    torch.testing.assert_close(full.dequantize(torch.float32), ref, rtol=1e-6 if device == "cuda" else 0, atol=0)
    x = torch.randn(3, shape[1], device=device, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.nn.functional.linear(x, full), x @ ref.to(torch.bfloat16).t())


def test_one_rank_gathers_one_buffer_and_refills_in_place() -> None:
    # torch's world-size-1 path copies a single all-gather input: the hooks send one uint8 buffer
    t = to_nf4(torch.randn(37, 29))
    (one,), meta = t.fsdp_pre_all_gather(_Mesh(1), t.size(), t.stride(), None, None)
    assert one.dtype == torch.uint8 and one.numel() == t.nbytes_stored() - 16 * 4 - 4 - 256 * 4
    out = one.clone()
    full, inner = t.fsdp_post_all_gather((out,), meta, torch.float32)
    assert inner == (out,) and torch.equal(full.dequantize(), t.dequantize(torch.float32))
    assert full.scale2.data_ptr() == out.data_ptr()  # fp32 pieces first: aligned views into it
    assert t.fsdp_post_all_gather((out,), meta, torch.float32, out=full) is None  # refilled: nothing to do


def test_what_cannot_be_sharded_says_why() -> None:
    t = to_nf4(torch.randn(32, 32))
    assert t.shard_problem(3) == "its 32 rows do not split evenly over 3 ranks"
    assert to_nf4(torch.randn(6, 48)).shard_problem(2) == (
        "a shard of 3 x 48 weights is not a whole number of 64-weight NF4 blocks")
    assert t.t().shard_problem(2) == "a transposed or flattened view of a weight"


def test_ops_off_the_shard_grid_dequantize_or_refuse() -> None:
    t = to_nf4(torch.randn(32, 32))
    ref = t.dequantize()
    part = t[1:3]  # not on a block boundary: a plain float slice, the right values
    assert type(part) is torch.Tensor and torch.equal(part, ref[1:3])
    assert type(t.view(16, 64)) is torch.Tensor and torch.equal(t.view(16, 64), ref.view(16, 64))
    zeros = t.new_zeros((4, 7))
    assert type(zeros) is torch.Tensor and not zeros.any()
    whole = t.new_zeros((32, 32))  # an NF4 buffer of zeros, as FSDP2 allocates it
    assert isinstance(whole, NF4Tensor) and not whole.dequantize().any()
    with pytest.raises(TypeError, match="not laid out as the destination"):
        whole.copy_(to_nf4(torch.randn(32, 32), double_quant=False))
    assert torch.equal(whole.copy_(t).dequantize(), ref)
