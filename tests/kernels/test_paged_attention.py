"""splice.kernels.paged_attention: paged K/V attention against dense causal attention over the
un-paged sequences (torch SDPA in float64, an independent computation), for mixed batches.

The Triton tests need a GPU, or ``TRITON_INTERPRET=1`` set before pytest starts (then the kernels
run on CPU tensors in Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from splice.kernels import use_triton
from splice.kernels.kv_cache import dequantize_kv, kv_caches, quantize_kv, write_kv
from splice.kernels.paged_attention import (
    KernelConfig,
    default_config,
    paged_attention,
    paged_attention_reference,
    paged_attention_triton,
)
from tests.kernels.paged_cases import BS, TOL, Case, check, dense, make_case, run
from tests.numerics import DEVICES, GPU, HostSyncs

# (seq_len, query rows) per sequence: decodes, chunked prefills, a full prefill; odd lengths
MIXED = [(1, 1), (BS - 1, 1), (BS + 1, 1), (1000, 1), (BS + 1, BS + 1), (40, 7), (1000, 37), (BS, BS - 1),
         (129, 3)]
DECODES = [(n, 1) for n in (1, 5, BS, 33, 300, 1000)]
DECODE_GAPS = [(5, 1), (33, 0), (300, 1), (BS, 0), (1000, 1)]  # a decode call where some sequences have no query
PREFILL = [(130, 130), (70, 23), (200, 74)]  # chunks at positions 126 + 32 i: tiles ending just below a 64-key edge

# (lens, Hq, Hkv, D, window, softcap): GQA 1 / 4 / 8, window, softcap, head dims
CASES = [
    (MIXED, 8, 2, 64, 0, 0.0),
    (MIXED, 4, 4, 32, 0, 0.0),
    (MIXED, 16, 2, 64, 0, 0.0),
    (MIXED, 8, 2, 64, 24, 0.0),
    (MIXED, 8, 2, 64, 0, 30.0),
    (DECODES, 8, 1, 128, 100, 5.0),
    (PREFILL, 4, 1, 16, 0, 0.0),
    (PREFILL + DECODES[:2], 8, 2, 80, 0, 0.0),
    (DECODE_GAPS, 8, 2, 64, 0, 0.0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", CASES)
def test_reference_matches_dense_attention(spec, dtype: torch.dtype, device: str) -> None:
    lens, hq, hkv, d, window, softcap = spec
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device=device)
    scale = d**-0.5
    got = run(paged_attention_reference, case, scale=scale, window=window, softcap=softcap)
    check(got, case, dtype, scale=scale, window=window, softcap=softcap)


def _kernel_or_skip(device: str, dtype: torch.dtype) -> None:
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the Triton path needs a GPU, or TRITON_INTERPRET=1 set before pytest starts")
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("Triton's interpreter computes half-precision dots in its own way; fp32 there, all on GPU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", CASES)
def test_kernel_matches_dense_attention(spec, dtype: torch.dtype, device: str) -> None:
    _kernel_or_skip(device, dtype)
    lens, hq, hkv, d, window, softcap = spec
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device=device, seed=1)
    scale = d**-0.5
    got = run(paged_attention, case, scale=scale, window=window, softcap=softcap)
    check(got, case, dtype, scale=scale, window=window, softcap=softcap)


# split-KV into many partitions (the reduce kernel), tiles of one query token, 128-key steps, unmasked
# steps below the causal edge (alone and with partitions)
CONFIGS = [KernelConfig(block_q=2, block_n=32, num_warps=4, num_stages=2, min_partition=32, programs_per_sm=64),
           KernelConfig(block_q=1, block_n=128, num_warps=4, num_stages=1, min_partition=128, programs_per_sm=64),
           KernelConfig(block_q=16, block_n=16, num_warps=4, num_stages=1, unmasked_steps=True),
           KernelConfig(block_q=4, block_n=32, num_warps=4, num_stages=1, unmasked_steps=True, min_partition=64,
                        programs_per_sm=64),
           # both key loops software-pipelined (tl.range num_stages), with partitions
           KernelConfig(block_q=4, block_n=32, num_warps=4, num_stages=1, unmasked_steps=True, min_partition=64,
                        programs_per_sm=64, loop_stages=3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("config", CONFIGS)
def test_kernel_tilings_and_partitions(config: KernelConfig, window: int, device: str) -> None:
    _kernel_or_skip(device, torch.float32)
    case = make_case(MIXED, hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=5)
    got = run(paged_attention_triton, case, scale=0.2, window=window, config=config)
    check(got, case, torch.float32, scale=0.2, window=window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lens", [DECODES, DECODE_GAPS])
def test_decode_calls_find_their_sequences_directly_as_the_search_does(lens: list[tuple[int, int]],
                                                                        device: str) -> None:
    """A decode call's tile b is sequence b (direct_decode, the default): the same output as the binary search."""
    _kernel_or_skip(device, torch.float32)
    case = make_case(lens, hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=4)
    searched = KernelConfig(block_q=4, block_n=64, num_warps=4, num_stages=3, direct_decode=False)
    direct = run(paged_attention_triton, case, scale=0.2)
    torch.testing.assert_close(direct, run(paged_attention_triton, case, scale=0.2, config=searched))
    check(direct, case, torch.float32, scale=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_decodes_of_a_mixed_call_in_a_launch_of_their_own_give_the_same_output(device: str) -> None:
    """split_decodes (the default): a call with prefill chunks runs its one-query sequences with the decode tiles
    in a second launch (and the reduce of partitioned chunks skips them): the output of one launch for all."""
    _kernel_or_skip(device, torch.float32)
    case = make_case(MIXED + DECODES[:3], hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=6)
    for config in (default_config(decode=False, group=4, head_dim=32), CONFIGS[0]):  # (CONFIGS[0]: partitions)
        split = run(paged_attention_triton, case, scale=0.2, config=config)
        whole = run(paged_attention_triton, case, scale=0.2, config=replace(config, split_decodes=False))
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-6)
    check(split, case, torch.float32, scale=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_with_loose_bounds_and_an_out_buffer(device: str) -> None:
    """Grid bounds far above the real lengths (a CUDA graph's) give the same result, into ``out``."""
    _kernel_or_skip(device, torch.float32)
    case = make_case(MIXED[:4] + [(40, 7)], hq=8, hkv=2, d=32, dtype=torch.float32, device=device, seed=2)
    want = run(paged_attention_reference, case, scale=0.2)
    out = torch.empty_like(case.q)
    got = paged_attention(case.q, case.key_cache, case.value_cache, block_tables=case.block_tables,
                          seq_lens=case.seq_lens, query_start_loc=case.query_start_loc, scale=0.2,
                          max_query_len=64, max_seq_len=4096, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_round_trip(device: str) -> None:
    case = make_case([(5, 5), (BS + 3, 1)], dtype=torch.bfloat16, device=device)
    for b, (n, _) in enumerate(case.lens):
        ids = case.block_tables[b, : (n + BS - 1) // BS].long()
        assert torch.equal(case.key_cache[ids].flatten(0, 1)[:n].cpu(), case.keys[b])
        assert torch.equal(case.value_cache[ids].flatten(0, 1)[:n].cpu(), case.values[b])
    assert int((~case.key_cache.isnan()).sum()) == sum(k.numel() for k in case.keys)  # nothing else written
    fp32 = torch.zeros(3, BS, 2, 64, device=device)
    write_kv(case.keys[0][:2].to(device), case.values[0][:2].to(device), fp32, fp32.clone(),
             torch.tensor([BS, 2 * BS + 1], device=device))
    assert torch.equal(fp32[1, 0].cpu(), case.keys[0][0].float()) and torch.equal(fp32[2, 1].cpu(),
                                                                                 case.keys[0][1].float())


def test_bad_inputs_name_the_problem() -> None:
    case = make_case([(3, 1)], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        run(paged_attention, Case(**{**case.__dict__, "q": torch.zeros(1, 3, 64)}), scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        run(paged_attention, Case(**{**case.__dict__, "query_start_loc": torch.zeros(1, dtype=torch.int32)}),
            scale=1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(case.keys[0], case.values[0], case.key_cache, case.value_cache, torch.zeros(2, dtype=torch.long))


@GPU
def test_no_host_sync_and_cuda_graph_replay() -> None:
    """The CUDA path reads no tensor value on the host, so a graph captured once with upper bounds
    replays for other lengths written into the same buffers."""
    case = make_case(MIXED, dtype=torch.bfloat16, device="cuda", seed=3)
    kw = dict(block_tables=case.block_tables, seq_lens=case.seq_lens, query_start_loc=case.query_start_loc,
              scale=0.125, max_query_len=64, max_seq_len=1024)
    with HostSyncs() as syncs:
        paged_attention(case.q, case.key_cache, case.value_cache, **kw)
    assert syncs.synced == []
    out = torch.empty_like(case.q)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        paged_attention(case.q, case.key_cache, case.value_cache, out=out, **kw)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(case.q, case.key_cache, case.value_cache, out=out, **kw)
    other = make_case(MIXED[::-1], dtype=torch.bfloat16, device="cuda", seed=4)
    for name in ("q", "key_cache", "value_cache", "block_tables", "seq_lens", "query_start_loc"):
        getattr(case, name).copy_(getattr(other, name))
    graph.replay()
    torch.cuda.synchronize()
    check(out, other, torch.bfloat16, scale=0.125)


@pytest.mark.parametrize(("window", "softcap"), [(0, 0.0), (7, 0.0), (0, 30.0)])
def test_cpu_decode_steps_take_one_batched_attention_equal_to_the_reference(window: int, softcap: float) -> None:
    case = make_case(DECODES, dtype=torch.float32, device="cpu", seed=3)
    want = run(paged_attention_reference, case, scale=0.125, window=window, softcap=softcap)
    got = run(paged_attention, case, scale=0.125, window=window, softcap=softcap)  # the batched decode path
    assert torch.isfinite(got).all()  # NaN rows of the cache past each sequence stay masked out
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, dense(case, scale=0.125, window=window, softcap=softcap).float(), atol=1e-5,
                               rtol=1e-5)


# ---- int8 caches (splice.kernels.kv_cache): codes + a scale per (token, kv head) -------------------------------
INT8_CASES = [(MIXED, 8, 2, 64, 0, 0.0), (MIXED, 8, 2, 64, 24, 0.0), (DECODES, 8, 1, 128, 0, 5.0),
              (PREFILL, 4, 1, 16, 0, 0.0), (PREFILL + DECODES[:2], 8, 2, 80, 0, 0.0)]


def int8_case(case: Case, device: str) -> tuple[Case, Tensor, Tensor]:
    """``case``'s sequences in int8 caches (NaN scales where nothing is written): (the case with the caches and
    its keys / values dequantized, key scales, value scales)."""
    shape = case.key_cache.shape
    caches = kv_caches(shape, torch.int8, device)  # (the values token-major)
    scales = [torch.full(shape[:3], float("nan"), device=device) for _ in range(2)]
    slots = []
    for b, (n, _) in enumerate(case.lens):
        table = case.block_tables[b].cpu()
        slots.append(torch.tensor([int(table[p // BS]) * BS + p % BS for p in range(n)]))
    write_kv(torch.cat(case.keys).to(device), torch.cat(case.values).to(device), *caches,
             torch.cat(slots).to(device), key_scale=scales[0], value_scale=scales[1])
    keys = [dequantize_kv(*quantize_kv(k)) for k in case.keys]
    values = [dequantize_kv(*quantize_kv(v)) for v in case.values]
    quant = Case(**{**case.__dict__, "key_cache": caches[0], "value_cache": caches[1], "keys": keys,
                    "values": values})
    return quant, scales[0], scales[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["reference", "dispatch"])
@pytest.mark.parametrize("spec", INT8_CASES)
def test_int8_caches_attend_over_the_dequantized_keys(spec, path: str, device: str) -> None:
    """The reference and the dispatcher (Triton on CUDA / under the interpreter, the batched decode on a plain
    CPU) over int8 caches equal dense attention over the dequantized K/V; within a few percent of bf16's."""
    lens, hq, hkv, d, window, softcap = spec
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device=device, seed=7)
    quant, key_scale, value_scale = int8_case(case, device)
    fn = paged_attention_reference if path == "reference" else paged_attention
    got = run(fn, quant, scale=d**-0.5, window=window, softcap=softcap, key_scale=key_scale, value_scale=value_scale)
    want = dense(quant, scale=d**-0.5, window=window, softcap=softcap)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
    exact = dense(case, scale=d**-0.5, window=window, softcap=softcap)  # what 16-bit K/V would give
    assert (got.double().cpu() - exact).abs().max() < 0.05


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [None, CONFIGS[0], CONFIGS[3], CONFIGS[4],
                                    KernelConfig(block_q=4, block_n=16, num_warps=4, num_stages=2, unmasked_steps=True)])
def test_the_triton_path_over_int8_matches_the_reference(config: KernelConfig | None, dtype: torch.dtype,
                                                          device: str) -> None:
    """Default tiles; 32-key steps over partitions (two runs of a 16-token block's values a step); unmasked steps;
    16-key steps (one run)."""
    _kernel_or_skip(device, dtype)
    case = make_case(MIXED + PREFILL, hq=8, hkv=2, d=64, dtype=dtype, device=device, seed=9)
    quant, key_scale, value_scale = int8_case(case, device)
    scales = {"key_scale": key_scale, "value_scale": value_scale}
    got = run(paged_attention_triton, quant, scale=0.125, config=config, **scales)
    want = run(paged_attention_reference, quant, scale=0.125, **scales)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_an_int8_cache_without_scales_gets_one_line() -> None:
    case = make_case([(3, 1)], dtype=torch.float32, device="cpu")
    cache = torch.zeros(case.key_cache.shape, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"write_kv: an int8 cache .* needs contiguous fp32 scales"):
        write_kv(case.keys[0], case.values[0], cache, cache.clone(), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="paged_attention: scales go with int8 caches only"):
        run(paged_attention, case, scale=1.0, key_scale=torch.zeros(case.key_cache.shape[:3]))
