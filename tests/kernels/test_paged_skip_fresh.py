"""The paged kernel's ``skip_fresh`` (splice.kernels.paged_attention), which leaves the rows of fresh prompts (no
cached prefix) to the engine's dense path for them: splice.kernels.varlen_attention over the step's own K/V. Together
against dense float64 attention over the un-paged sequences (tests/kernels/paged_cases.py), eager and replayed in a
CUDA graph with other lengths."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from splice.kernels import use_triton
from splice.kernels.paged_attention import KernelConfig, paged_attention, paged_attention_triton
from splice.kernels.varlen_attention import varlen_attention
from tests.kernels.paged_cases import BS, Case, check, make_case, run
from tests.numerics import DEVICES, GPU

# fresh prompts (seq_len == query rows; one of a single token) among decodes, chunks after a cached prefix and a
# sequence with no query this call
FRESH_MIXED = [(BS + 1, BS + 1), (1, 1), (40, 7), (33, 0), (130, 130), (1000, 1), (37, 37), (BS, BS - 1), (200, 200),
               (BS - 1, 1), (3, 3)]
ALL_FRESH = [(BS + 1, BS + 1), (64, 64), (1, 1), (200, 200), (5, 5)]


def step_kv(case: Case, device: str) -> tuple[Tensor, Tensor]:
    """The step's own keys and values, dense (T, Hkv, D): each sequence's last L_b (what rope_write_kv's kv_out
    holds in the engine)."""
    keys = torch.cat([k[n - length:] for (n, length), k in zip(case.lens, case.keys, strict=True)])
    values = torch.cat([v[n - length:] for (n, length), v in zip(case.lens, case.values, strict=True)])
    return keys.to(device), values.to(device)


def fresh_then_paged(case: Case, device: str, *, scale: float, config: KernelConfig | None = None) -> Tensor:
    k, v = step_kv(case, device)
    out = varlen_attention(case.q, k, v, cu_seqlens=case.query_start_loc,
                           max_seqlen=max(length for _, length in case.lens), scale=scale)
    if config is None:
        return run(paged_attention, case, scale=scale, out=out, skip_fresh=True)
    return run(paged_attention_triton, case, scale=scale, out=out, skip_fresh=True, config=config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("lens", "hq", "hkv", "d"), [(FRESH_MIXED, 8, 2, 64), (ALL_FRESH, 4, 4, 128),
                                                     (FRESH_MIXED, 32, 8, 128)])
def test_fresh_prompts_then_the_paged_kernel_give_dense_attention(lens: list[tuple[int, int]], hq: int, hkv: int,
                                                                  d: int, dtype: torch.dtype, device: str) -> None:
    if device == "cpu" and dtype != torch.float32 and use_triton(torch.empty(0)):
        pytest.skip("Triton's interpreter computes half-precision dots in its own way; fp32 there, all on GPU")
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device=device, seed=11)
    check(fresh_then_paged(case, device, scale=d**-0.5), case, dtype, scale=d**-0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_reduce_of_partitioned_chunks_skips_fresh_prompts_too(device: str) -> None:
    """Split-KV partitions (the reduce kernel writes the merged rows): fresh rows stay the fresh path's."""
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the Triton path needs a GPU, or TRITON_INTERPRET=1 set before pytest starts")
    case = make_case(FRESH_MIXED, hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=12)
    partitions = KernelConfig(block_q=2, block_n=32, num_warps=4, num_stages=2, min_partition=32, programs_per_sm=64)
    check(fresh_then_paged(case, device, scale=0.2, config=partitions), case, torch.float32, scale=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_skip_fresh_leaves_exactly_the_fresh_rows_as_they_were(device: str) -> None:
    case = make_case(FRESH_MIXED, hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=13)
    full = run(paged_attention, case, scale=0.2)
    out = torch.full_like(case.q, 7.0)
    run(paged_attention, case, scale=0.2, out=out, skip_fresh=True)
    fresh = torch.cat([torch.full((length,), n == length) for n, length in case.lens]).to(device)
    assert bool((out[fresh] == 7.0).all())
    torch.testing.assert_close(out[~fresh], full[~fresh], atol=1e-6, rtol=1e-6)


def test_bad_inputs_get_one_line() -> None:
    case = make_case(ALL_FRESH[:2], hq=8, hkv=2, d=32, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="skip_fresh"):
        run(paged_attention, case, scale=1.0, skip_fresh=True)


@GPU
def test_fresh_then_paged_replays_in_a_cuda_graph_with_other_lengths() -> None:
    """Captured once with upper bounds (as the engine's step graphs are), replayed for other sequences written into
    the same buffers: both kernels read the lengths from the device."""
    case = make_case(FRESH_MIXED, hq=8, hkv=2, d=128, dtype=torch.bfloat16, device="cuda", seed=16)
    other = make_case([(length, length) if i % 2 else (n, length) for i, (n, length) in enumerate(FRESH_MIXED[::-1])],
                      hq=8, hkv=2, d=128, dtype=torch.bfloat16, device="cuda", seed=17)
    assert other.q.shape == case.q.shape and other.key_cache.shape[1:] == case.key_cache.shape[1:]
    k, v = step_kv(case, "cuda")
    kw = dict(block_tables=case.block_tables, seq_lens=case.seq_lens, query_start_loc=case.query_start_loc,
              scale=128**-0.5, max_query_len=256, max_seq_len=1024)
    out = torch.empty(1)

    def step() -> None:
        nonlocal out
        out = varlen_attention(case.q, k, v, cu_seqlens=case.query_start_loc, max_seqlen=256, scale=128**-0.5)
        paged_attention(case.q, case.key_cache, case.value_cache, out=out, skip_fresh=True, **kw)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    blocks = min(case.key_cache.shape[0], other.key_cache.shape[0])
    case.key_cache[:blocks].copy_(other.key_cache[:blocks])
    case.value_cache[:blocks].copy_(other.value_cache[:blocks])
    width = min(case.block_tables.shape[1], other.block_tables.shape[1])
    case.block_tables.zero_()[:, :width].copy_(other.block_tables[:, :width])
    for name in ("q", "seq_lens", "query_start_loc"):
        getattr(case, name).copy_(getattr(other, name))
    k2, v2 = step_kv(other, "cuda")
    k.copy_(k2)
    v.copy_(v2)
    graph.replay()
    torch.cuda.synchronize()
    check(out, other, torch.bfloat16, scale=128**-0.5)
