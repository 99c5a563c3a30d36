"""splice.kernels.nf4_gemv (and its gemv2 kernel, splice.kernels.nf4_gemv2): the fused NF4 GEMV / small-M
GEMM against a float64 product of the dequantized weight (and the dequantize + matmul reference), exactly
placed weights, its lookups and fallbacks, and its wiring into NF4Tensor's matmuls.

The kernel tests need a GPU, or ``TRITON_INTERPRET=1`` set before pytest starts (then they run on
CPU tensors in Triton's interpreter, with the plain lookups; they skip where Triton is not installed).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.kernels import use_triton
from splice.kernels.nf4_gemv import (
    GemvConfig,
    default_config,
    gemv2_config,
    k_splits,
    nf4_linear,
    nf4_linear_group,
    nf4_linear_reference,
)
from splice.quant.linear import NF4Linear
from splice.quant.nf4 import FUSED_MAX_ROWS, NF4Tensor, to_nf4
from tests.numerics import DEVICES, GPU, HostSyncs, rel_err

# norm-relative error allowed against the float64 truth: the output's rounding and the weight's (the
# reference rounds level x absmax to x's dtype, one-block dot steps round the level): ~2^-9 (bf16),
# ~2^-11 (fp16) of each; a wrong nibble, word, block or row is ~0.1-1
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 6e-3}
GEMV = GemvConfig(kernel="gemv", block_n=16, block_k=128)  # two blocks a step, a partial row tile
DOT1 = GemvConfig(kernel="dot", block_n=16, block_k=64)  # one block a step: absmax after the dot
DOT2 = GemvConfig(kernel="dot", block_n=32, block_k=128)  # two blocks a step: absmax per weight
GEMV2 = GemvConfig(kernel="gemv2", block_n=8, block_k=128, num_warps=1)  # two blocks a step, rows of x by 4
GEMV2_P = replace(GEMV2, num_stages=2)  # the same, the next step's codes loaded during this one's arithmetic
GEMV2_1 = GemvConfig(kernel="gemv2", block_n=16, block_k=64, num_warps=1)  # one block a step
GEMV2_W = GemvConfig(kernel="gemv2", block_n=4, block_k=512, num_warps=1)  # K in one step, lanes past it
# (M, N, K, dtype, double-quantized, config): odd N; K a multiple of the 64-value block but not always
# of block_k (a tail step); M from one row to a full 64-row dot tile; each kernel path in each dtype
CASES = [
    (1, 37, 192, torch.bfloat16, True, GEMV), (1, 37, 192, torch.float32, False, GEMV),
    (2, 19, 64, torch.float16, True, GEMV), (7, 21, 320, torch.bfloat16, False, GEMV),
    (1, 21, 128, torch.bfloat16, True, DOT1), (2, 33, 320, torch.float16, False, DOT1),
    (7, 21, 128, torch.float32, True, DOT1), (32, 35, 256, torch.bfloat16, True, DOT1),
    (64, 40, 192, torch.bfloat16, False, DOT1), (7, 33, 320, torch.bfloat16, True, DOT2),
    (32, 19, 448, torch.float16, True, DOT2), (64, 37, 256, torch.float32, False, DOT2),
    (2, 35, 192, torch.bfloat16, False, DOT2),
    (1, 37, 192, torch.bfloat16, True, GEMV2), (1, 37, 192, torch.float32, False, GEMV2),
    (2, 19, 64, torch.float16, True, GEMV2), (3, 21, 320, torch.bfloat16, False, GEMV2),
    (7, 33, 448, torch.bfloat16, True, GEMV2), (1, 37, 448, torch.bfloat16, True, GEMV2_P),
    (3, 21, 320, torch.float16, False, GEMV2_P), (1, 19, 192, torch.float32, True, GEMV2_P),
    (4, 35, 256, torch.float16, False, GEMV2_1),
    (1, 40, 320, torch.float32, True, GEMV2_1), (1, 19, 448, torch.bfloat16, True, GEMV2_W),
    (2, 21, 512, torch.float16, False, GEMV2_W),
]


def _weight(n: int, k: int, *, double_quant: bool, device: str, seed: int = 0) -> NF4Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_nf4((torch.randn(n, k, generator=g) * 0.05).to(device), double_quant=double_quant)


def _stats(t: NF4Tensor) -> dict[str, object]:
    return dict(shape=t.weight_shape, block_size=t.block_size, absmax=t.absmax, qabsmax=t.qabsmax,
                scale2=t.scale2, offset=t.offset, code2=t.code2)


def _truth(x: Tensor, t: NF4Tensor, bias: Tensor | None = None) -> Tensor:
    y = x.double() @ t.dequantize(torch.float32).double().T
    return y if bias is None else y + bias.double()


def _kernel_or_skip(device: str) -> None:
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the Triton path needs a GPU, or TRITON_INTERPRET=1 set before pytest starts")


def _case_id(case: tuple[object, ...]) -> str:
    m, n, k, dtype, dq, config = case
    assert isinstance(config, GemvConfig)
    return (f"{m}x{n}x{k}-{str(dtype)[6:]}-{'dq' if dq else 'fp32absmax'}-{config.kernel}{config.block_k}"
            f"s{config.num_stages}")


def test_reference_is_dequantize_then_matmul() -> None:
    t = _weight(37, 192, double_quant=True, device="cpu")
    x, bias = torch.randn(3, 192), torch.randn(37)
    got = nf4_linear_reference(x, t.packed, t.code, bias=bias, **_stats(t))  # type: ignore[arg-type]
    assert rel_err(got, _truth(x, t, bias)) < 1e-6
    # the 4-bit values, not some other weight: far from the float weight it came from
    assert rel_err(got, F.linear(x, _weight(37, 192, double_quant=False, device="cpu", seed=1).dequantize())) > 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference(case: tuple[int, int, int, torch.dtype, bool, GemvConfig], device: str) -> None:
    m, n, k, dtype, double_quant, config = case
    _kernel_or_skip(device)
    t = _weight(n, k, double_quant=double_quant, device=device)
    x = torch.randn(m, k, device=device).to(dtype)
    got = nf4_linear(x, t.packed, t.code, config=config, **_stats(t))  # type: ignore[arg-type]
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, _truth(x, t)) < TOL[dtype]
    ref = nf4_linear_reference(x, t.packed, t.code, **_stats(t))  # type: ignore[arg-type]
    assert rel_err(got, ref) < 2 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [GEMV, DOT1, DOT2, GEMV2], ids=lambda c: f"{c.kernel}{c.block_k}")
def test_every_weight_lands_in_its_place(config: GemvConfig, device: str) -> None:
    """x = the identity: row j of the output is column j of W, each a single product level x absmax
    (exact in fp32): a swapped nibble, word, block or absmax shows as a wrong element, not as noise."""
    _kernel_or_skip(device)
    t = _weight(19, 128, double_quant=True, device=device)
    eye = torch.eye(128, device=device)  # 128 rows: two 64-row dot tiles
    got = nf4_linear(eye, t.packed, t.code, config=config, **_stats(t))  # type: ignore[arg-type]
    # (rtol: the double-quantized absmax's multiply-add may be fused in one kernel and not the other)
    torch.testing.assert_close(got, t.dequantize(torch.float32).T, rtol=2e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["gemv", "dot", "gemv2"])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_bias_split_k_and_leading_dims(kernel: str, split_k: int, device: str) -> None:
    _kernel_or_skip(device)
    t = _weight(21, 320, double_quant=True, device=device)
    x, bias = torch.randn(2, 1, 320, device=device), torch.randn(21, device=device)  # the engine's (T, 1, H)
    config = GemvConfig(kernel=kernel, block_n=16, block_k=64, split_k=split_k)
    got = nf4_linear(x, t.packed, t.code, bias=bias, config=config, **_stats(t))  # type: ignore[arg-type]
    assert got.shape == (2, 1, 21)
    assert rel_err(got, _truth(x, t, bias)) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [32, 128])
def test_gemv2_block_sizes(block_size: int, device: str) -> None:
    """Blocks of 32 values (4 words a block) run gemv2; asked for blocks it does not take (128), one clear line."""
    _kernel_or_skip(device)
    g = torch.Generator().manual_seed(0)
    t = to_nf4((torch.randn(21, 256, generator=g) * 0.05).to(device), block_size=block_size)
    x = torch.randn(3, 256, device=device).to(torch.bfloat16)
    config = GemvConfig(kernel="gemv2", block_n=8, block_k=2 * block_size, num_warps=1)
    if block_size == 128:
        with pytest.raises(ValueError, match="gemv2 takes blocks of 32 or 64 values .* use kernel 'gemv'"):
            nf4_linear(x, t.packed, t.code, config=config, **_stats(t))  # type: ignore[arg-type]
        return
    got = nf4_linear(x, t.packed, t.code, config=config, **_stats(t))  # type: ignore[arg-type]
    assert rel_err(got, _truth(x, t)) < TOL[torch.bfloat16]


def test_gemv2_config() -> None:
    """gemv2's tiles at the Llama-3-8B shapes, the sweep's best (H200): one 64-value block a lane over 2 warps
    (4,096 columns a step), 8 rows a program where M x N x K >= 2^25 or N >= 4,096, else 4; no K split."""
    def tiles(m: int, n: int, k: int) -> tuple[object, ...]:
        c = gemv2_config(m, n, k, block_size=64)
        return c.kernel, c.block_n, c.block_k, c.num_warps, c.split_k, c.lut, c.num_stages
    assert tiles(1, 14336, 4096) == ("gemv2", 8, 4096, 2, 1, "shfl", 1)  # gate/up: 20.0 us
    assert tiles(1, 4096, 14336) == ("gemv2", 8, 4096, 2, 1, "shfl", 2)  # down: 20.8 (4 steps, 2 in flight)
    assert tiles(1, 4096, 4096) == ("gemv2", 8, 4096, 2, 1, "shfl", 1)  # q/o: 8.05 (4 rows: 8.4)
    assert tiles(1, 6144, 4096) == ("gemv2", 8, 4096, 2, 1, "shfl", 1)  # q/k/v in one launch: 10.3 (4 rows: 11.5)
    assert tiles(1, 1024, 4096) == ("gemv2", 4, 4096, 2, 1, "shfl", 1)  # k/v: 4.1
    assert tiles(4, 4096, 4096) == ("gemv2", 8, 4096, 2, 1, "shfl", 1)  # q/o at M = 4: 13.6
    assert gemv2_config(1, 64, 64, block_size=32).block_k == 2048


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 5])
def test_default_config(m: int, device: str) -> None:
    _kernel_or_skip(device)
    t = _weight(40, 256, double_quant=True, device=device)
    x = torch.randn(m, 256, device=device)
    got = nf4_linear(x, t.packed, t.code, **_stats(t))  # type: ignore[arg-type]
    assert rel_err(got, _truth(x, t)) < TOL[torch.float32]


def test_default_config_fills_the_gpu() -> None:
    """Llama-3-8B shapes on 132 SMs, the sweep's best tiles (H200, 2026-12-06). One row: the gemv2 kernel
    (gemv2_config) for 64- and 32-value blocks; for others (128) the gemv kernel, 16-row tiles (4 for k/v's 1024
    rows), 1,024 columns a step over 8 warps up to 4,096 rows, else 512 over 4, K split only until the grid has ~2
    programs an SM. More rows: the dot kernel, 128-row tiles for the MLP's large weights, else 64, one 64-value
    block a step. Always the shuffle lookup."""
    for n, k in ((14336, 4096), (4096, 4096), (1024, 4096), (4096, 14336)):
        for block in (32, 64):
            assert default_config(1, n, k, block_size=block, sms=132) == gemv2_config(1, n, k, block_size=block)
    gate = default_config(1, 14336, 4096, block_size=128, sms=132)
    assert (gate.kernel, gate.block_n, gate.block_k, gate.split_k, gate.num_warps) == ("gemv", 16, 512, 1, 4)
    q = default_config(1, 4096, 4096, block_size=128, sms=132)
    assert (q.block_n, q.block_k, q.split_k, q.num_warps) == (16, 1024, 1, 8)  # 256 tiles, 4 K steps
    kv = default_config(1, 1024, 4096, block_size=128, sms=132)
    assert (kv.block_n, kv.block_k, kv.split_k) == (4, 512, 2)  # 256 tiles x 2: K steps stay >= 4
    assert {c.lut for c in (gate, q, kv)} == {"shfl"}
    rows = default_config(32, 14336, 4096, block_size=64, sms=132)
    assert (rows.kernel, rows.block_n, rows.block_k, rows.split_k, rows.num_stages) == ("dot", 128, 64, 4, 2)
    o = default_config(32, 4096, 4096, block_size=64, sms=132)
    assert (o.block_n, o.split_k, o.num_stages, o.lut) == (64, 8, 1, "shfl")  # 64 tiles x 8 = 512 programs
    assert default_config(32, 1024, 4096, block_size=64, sms=132).split_k == 16
    assert default_config(8, 4096, 14336, block_size=64, sms=132).split_k == 16  # down: 32 tiles x 16
    assert k_splits(300, 64, sms=132) == 1 and k_splits(8, 64, sms=132) == 16  # >= 4 steps a split


def test_bad_statistics_and_configs_are_named() -> None:
    t = _weight(8, 64, double_quant=True, device="cpu")
    with pytest.raises(ValueError, match="give absmax, or qabsmax"):
        nf4_linear(torch.randn(1, 64), t.packed, t.code, shape=(8, 64), block_size=64, qabsmax=t.qabsmax)
    if use_triton(torch.empty(0)):
        with pytest.raises(ValueError, match="lut 'shfl', 'ldg' or 'plain'"):
            nf4_linear(torch.randn(1, 64), t.packed, t.code, config=GemvConfig(kernel="dot", block_n=16,
                                                                               block_k=64, lut="smem"),
                       **_stats(t))  # type: ignore[arg-type]
        for bad in (GemvConfig(kernel="gemv2", block_n=8, block_k=64, lut="ldg"),
                    GemvConfig(kernel="gemv2", block_n=8, block_k=192),
                    GemvConfig(kernel="gemv2", block_n=8, block_k=64, num_stages=3)):
            with pytest.raises(ValueError, match="gemv2 takes lut 'shfl' or 'plain'"):
                nf4_linear(torch.randn(1, 256), t.packed, t.code, config=bad, **{**_stats(t), "shape": (2, 256)})  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_and_grad_paths_keep_the_dequantized_product(bias: bool) -> None:
    """On the CPU (even with the interpreter on) and wherever a gradient is needed, F.linear over an
    NF4 weight is the dequantized weight's F.linear, bit for bit."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(128, 48, bias=bias))
    x = torch.randn(2, 1, 128)
    expected = F.linear(x, layer.dequantize(torch.float32), layer.bias)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    xg = x.clone().requires_grad_()
    y = layer(xg)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantize(torch.float32).sum(0).expand(2, 1, 128), rtol=1e-5,
                               atol=1e-5)


# ---- GPU: the inline-PTX lookups, real shapes, the wiring, CUDA graphs ---------------------------------------


def _offset_by_one(t: Tensor) -> Tensor:
    """``t``'s values at a storage offset of one element (no longer 256- or 4-byte aligned)."""
    return torch.cat([t.new_zeros(1), t])[1:]


@GPU
@pytest.mark.parametrize("lut", ["shfl", "ldg", "plain"])
@pytest.mark.parametrize("kernel", ["gemv", "dot", "gemv2"])
def test_lookups_agree(kernel: str, lut: str) -> None:
    """The three level lookups give the same weights (exactly, in fp32 through the identity), also
    with a table that is not 256-byte aligned (``ldg`` then runs ``shfl``)."""
    if kernel == "gemv2" and lut == "ldg":
        pytest.skip("gemv2 has no ldg lookup")
    t = _weight(37, 128, double_quant=True, device="cuda")
    config = GemvConfig(kernel=kernel, block_n=16, block_k=64, lut=lut)
    eye = torch.eye(128, device="cuda")
    want = t.dequantize(torch.float32).T
    for code in (t.code, _offset_by_one(t.code)):
        stats = {**_stats(t), "shape": t.weight_shape}
        got = nf4_linear(eye, t.packed, code, config=config, **stats)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=2e-7, atol=0)


@GPU
def test_unaligned_codes_take_the_dequantize_path() -> None:
    t = _weight(21, 128, double_quant=False, device="cuda")
    x = torch.randn(3, 128, device="cuda")
    packed = _offset_by_one(t.packed)  # not 4-byte aligned: the kernels read int32 words
    got = nf4_linear(x, packed, t.code, **_stats(t))  # type: ignore[arg-type]
    assert torch.equal(got, F.linear(x, t.dequantize(torch.float32)))


@GPU
@pytest.mark.parametrize("shape", [(1, 1024, 4096), (1, 4096, 14336), (3, 14336, 4096), (32, 1024, 4096),
                                   (64, 4096, 4160)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel", ["default", "gemv2"])
def test_llama_shapes_on_the_gpu(shape: tuple[int, int, int], kernel: str) -> None:
    m, n, k = shape
    t = _weight(n, k, double_quant=True, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    config = gemv2_config(m, n, k, block_size=64) if kernel == "gemv2" else None
    got = nf4_linear(x, t.packed, t.code, config=config, **_stats(t))  # type: ignore[arg-type]
    assert rel_err(got, _truth(x, t)) < TOL[torch.bfloat16]


def _gpu_layer(bias: bool, dtype: torch.dtype = torch.float32) -> NF4Linear:
    torch.manual_seed(0)
    return NF4Linear.from_linear(nn.Linear(512, 96, bias=bias, device="cuda", dtype=dtype))


def _direct(layer: NF4Linear, x: Tensor) -> Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return nf4_linear(x, layer.nf4.packed, layer.nf4.code, bias=bias, **_stats(layer.nf4))  # type: ignore[arg-type]


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", sorted({1, FUSED_MAX_ROWS}))
def test_inference_takes_the_fused_path(rows: int, bias: bool, dtype: torch.dtype) -> None:
    """Under inference_mode (aten.linear) and no_grad (t + mm / addmm) a small batch runs the fused
    kernel (bit for bit its direct call), which agrees with the dequantize + matmul path."""
    layer = _gpu_layer(bias, dtype)
    x = torch.randn(rows, 1, 512, device="cuda", dtype=dtype)  # the engine's (T, 1, H)
    fused = _direct(layer, x)
    dequantized = F.linear(x, layer.dequantize(), layer.bias)
    assert rel_err(fused, dequantized) < (1e-3 if dtype == torch.float32 else TOL[dtype])  # 1e-3: TF32 if on
    if dtype == torch.float32:  # fp32 sums in another order: the equalities below tell the paths apart
        assert not torch.equal(fused, dequantized)
    with torch.inference_mode():
        assert torch.equal(layer(x), fused)
    with torch.no_grad():
        assert torch.equal(layer(x), fused)


@GPU
def test_large_batches_and_gradients_keep_the_dequant_path() -> None:
    layer = _gpu_layer(True)
    x = torch.randn(FUSED_MAX_ROWS + 1, 512, device="cuda")
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.dequantize(), layer.bias))
    xg = x[:1].clone().requires_grad_()
    y = layer(xg)
    assert rel_err(y, F.linear(x[:1], layer.dequantize(), layer.bias)) < 1e-6
    y.sum().backward()
    torch.testing.assert_close(xg.grad, layer.dequantize().sum(0, keepdim=True))


@GPU
@pytest.mark.parametrize("config", [None, GemvConfig(kernel="dot", block_n=64, block_k=64, split_k=4)],
                         ids=["default", "split-k"])
def test_no_host_sync_and_cuda_graph_capture(config: GemvConfig | None) -> None:
    layer = _gpu_layer(True, torch.bfloat16)
    x = torch.randn(FUSED_MAX_ROWS, 1, 512, device="cuda", dtype=torch.bfloat16)  # the fused path
    t, bias = layer.nf4, layer.bias

    def run() -> Tensor:
        if config is None:
            return layer(x)
        return nf4_linear(x, t.packed, t.code, bias=bias, config=config, **_stats(t))  # type: ignore[arg-type]

    with torch.inference_mode():
        with HostSyncs() as mode:
            eager = run()
        assert mode.synced == []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
        new = torch.randn_like(x)
        x.copy_(new)
        graph.replay()
        assert torch.equal(captured, run())
        assert not torch.equal(captured, eager)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("rows", "k", "dtype", "double"), [((16, 8, 8), 192, torch.bfloat16, True),
                                                           ((24, 40), 320, torch.float32, False),
                                                           ((8, 4, 12), 128, torch.float16, True)])
def test_sibling_weights_in_one_launch_give_each_weights_product(rows: tuple[int, ...], k: int, dtype: torch.dtype,
                                                                 double: bool, device: str) -> None:
    """nf4_linear_group: q/k/v- or gate/up-like weights (separate tensors, each with its own statistics) in one
    gemv2 launch equal the concatenation of each weight's own product; a boundary off the launch's row tiles,
    more than one row of x, unlike K or a single weight: None (the caller runs them one by one)."""
    _kernel_or_skip(device)
    weights = [_weight(n, k, double_quant=double, device=device, seed=i) for i, n in enumerate(rows)]
    x = torch.randn(1, k, device=device).to(dtype)
    got = nf4_linear_group(x, weights)
    assert got is not None and got.shape == (1, sum(rows)) and got.dtype == dtype
    starts = [sum(rows[:i]) for i in range(len(rows))]
    for start, n, w in zip(starts, rows, weights, strict=True):  # each weight's columns are its own (a wrong
        assert rel_err(got[:, start: start + n], _truth(x, w)) < TOL[dtype]  # member's pointer is ~1 off)
    assert nf4_linear_group(x.expand(2, -1), weights) is None
    assert nf4_linear_group(x, weights[:1]) is None
    assert nf4_linear_group(x, [weights[0], _weight(6, k, double_quant=double, device=device), weights[0]]) is None
    assert nf4_linear_group(x[:, :64], [weights[0], _weight(8, 64, double_quant=double, device=device)]) is None
