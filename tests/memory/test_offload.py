"""splice.memory.offload: pinned buffers of exactly the asked size (large ones registered with CUDA
rather than rounded up to a power of two by torch's pinned allocator) carry offloaded checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from splice.fused.apply import fuse
from splice.memory import offload
from splice.memory.checkpointing import checkpoint_layers, release_pinned_memory
from tests.numerics import GPU, rel_err
from tests.tiny import assert_same, lora_llama, loss_and_grads


@GPU
def test_gpu_large_buffer_is_pinned_at_its_exact_size() -> None:
    shape = (5, 1024, 8192)  # 80 MiB of fp16: over the threshold, not a power of two
    buffer = offload.pinned_empty(shape, torch.float16)
    assert buffer.shape == shape and buffer.is_pinned()
    assert buffer.untyped_storage().nbytes() == 5 * 1024 * 8192 * 2
    source = torch.randn(shape, device="cuda", dtype=torch.float16)
    buffer.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buffer.to("cuda"), source)


@GPU
def test_gpu_offloaded_checkpoints_through_registered_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "_EXACT_PIN_BYTES", 0)  # every buffer takes the register path
    plain = lora_llama(device="cuda", dtype=torch.bfloat16, layers=3, hidden=256, dropout=0.1)
    fuse(plain)
    ckpt = copy.deepcopy(plain)
    checkpoint_layers(ckpt, layers="all", offload=True)
    ids = torch.randint(0, 101, (2, 512), device="cuda")
    expected = loss_and_grads(plain, ids, seed=1)
    for _ in range(2):  # the second step reuses the pooled buffers
        assert_same(expected, loss_and_grads(ckpt, ids, seed=1), tol=2e-2)
    release_pinned_memory(ckpt)  # unregistered after the pending copies finish


# ----------------------------------------------------------------------------- 8-bit compression

_FP8_REL = 2.0**-4  # e4m3: 3 mantissa bits, round to nearest: half an ulp is 2^-4 of the value
_FP8_SUB = 2.0**-10  # below e4m3's smallest normal (2^-6), steps of 2^-9: half of one, in units of s


def _bound(x: torch.Tensor, compression: str) -> torch.Tensor:
    """The largest error a value of ``x`` may come back with (module doc of splice.memory.offload),
    plus one rounding of the input's dtype (bf16's multiplier and dequantized output)."""
    amax = x.float().abs().amax(-1, keepdim=True)
    eps = torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 0.0
    if compression == "fp8":
        return (_FP8_REL + 2 * eps) * x.float().abs() + _FP8_SUB * amax / 448 + 1e-30
    return amax / 127 / 2 * (1 + 1e-5) + eps * x.float().abs() + 1e-30


def _outlier_rows(rows: int, width: int, *, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a residual stream's outliers: 2 channels ~300x the rest, one row of 0s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, [3, width // 2]] *= 300.0
    x[1] = 0.0
    return x


@pytest.mark.parametrize("compression", [pytest.param("fp8", marks=pytest.mark.interpreter_limit("fp8")), "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 256), (3, 5, 7), (1, 1), (5,), (0, 16), (2, 1, 33)])
def test_round_trip_within_the_rounding_bound(compression: str, dtype: torch.dtype,
                                              shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])).to(dtype)  # 6 decades a row
    codes, scales = offload.quantize_rows_8bit(x, compression)  # type: ignore[arg-type]
    assert codes.shape == x.shape and codes.element_size() == 1 and scales.shape == (*shape[:-1], 1)
    assert codes.dtype == (torch.float8_e4m3fn if compression == "fp8" else torch.int8)
    back = offload.dequantize_rows(codes, scales, dtype)
    assert back.dtype == dtype and back.shape == x.shape
    assert ((back.float() - x.float()).abs() <= _bound(x, compression)).all()


@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_zero_rows_come_back_zero_and_the_largest_value_exactly(compression: str) -> None:
    x = _outlier_rows(6, 64)
    x[4] = -0.0
    codes, scales = offload.quantize_rows_8bit(x, compression)  # type: ignore[arg-type]
    back = offload.dequantize_rows(codes, scales, torch.float32)
    assert torch.isfinite(scales).all() and (back[1] == 0).all() and (back[4] == 0).all()
    top = x.abs().argmax(-1, keepdim=True)  # the row's amax is a code's largest value: 448 or 127
    torch.testing.assert_close(back.gather(-1, top), x.gather(-1, top), rtol=1e-6, atol=0)


@pytest.mark.interpreter_limit("fp8")
def test_fp8_keeps_the_ordinary_channels_of_outlier_rows_int8_the_gaussian_rows() -> None:
    """Why fp8 is the recommended format: beside 300x outlier channels int8's step rounds the
    ordinary channels away; on rows without outliers its 7 bits beat e4m3's 3-bit mantissa."""
    def errors(x: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
        out = {}
        for compression in ("fp8", "int8"):
            back = offload.dequantize_rows(*offload.quantize_rows_8bit(x, compression), torch.float32)  # type: ignore[arg-type]
            out[compression] = rel_err(back[:, keep], x[:, keep])
        return out

    x = _outlier_rows(64, 512)
    ordinary = torch.ones(512, dtype=torch.bool)
    ordinary[[3, 256]] = False
    outliers = errors(x, ordinary)
    assert outliers["fp8"] < 0.03 and outliers["int8"] > 0.25  # measured: 0.027, 0.67
    gaussian = errors(torch.randn(64, 512, generator=torch.Generator().manual_seed(2)), ordinary | ~ordinary)
    assert gaussian["int8"] < 0.012 < 0.02 < gaussian["fp8"] < 0.03  # measured: 0.0074, 0.026


@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_blocks_of_rows_give_the_same_codes(compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _outlier_rows(37, 48).to(torch.bfloat16)
    whole = offload.quantize_rows_8bit(x, compression)  # type: ignore[arg-type]
    monkeypatch.setattr(offload, "_CHUNK_ELEMENTS", 5 * 48)  # blocks of 5 rows, the last of 2
    blocks = offload.quantize_rows_8bit(x, compression)  # type: ignore[arg-type]
    assert torch.equal(whole[0].view(torch.uint8), blocks[0].view(torch.uint8))
    assert torch.equal(whole[1], blocks[1])
    assert torch.equal(offload.dequantize_rows(*whole, torch.bfloat16), offload.dequantize_rows(*blocks, torch.bfloat16))


def test_kept_on_the_cpu_stores_codes_and_scales() -> None:
    x = _outlier_rows(4, 32).to(torch.bfloat16).view(2, 2, 32)
    kept = offload.Kept(x, offload.OffloadPool(), compression="int8")
    assert [p.dtype for p in kept.parts] == [torch.int8, torch.float32]
    back = kept.load(torch.device("cpu"))
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert torch.equal(back, offload.dequantize_rows(*offload.quantize_rows_8bit(x, "int8"), torch.bfloat16))
    # not offloaded (no pool): the tensor itself, never compressed
    assert offload.Kept(x, None, compression="fp8").load(torch.device("cpu")) is not None
    assert offload.Kept(x, None, compression="fp8").parts[0].data_ptr() == x.data_ptr()


def test_host_bytes_of_a_kept_tensor() -> None:
    shape = (600_000, 4096)  # Llama-3-8B's layer input at 600k tokens
    assert offload.kept_nbytes(shape, torch.bfloat16) == 600_000 * 4096 * 2
    assert offload.kept_nbytes(shape, torch.bfloat16, "fp8") == 600_000 * (4096 + 4)
    assert offload.kept_nbytes((3, 5, 7), torch.float32, "int8") == 105 + 4 * 15


@GPU
@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_gpu_round_trip_as_on_the_cpu(compression: str) -> None:
    x = _outlier_rows(300, 4096).to(torch.bfloat16)
    codes, scales = offload.quantize_rows_8bit(x.cuda(), compression)  # type: ignore[arg-type]
    back = offload.dequantize_rows(codes, scales, torch.bfloat16).cpu()
    assert ((back.float() - x.float()).abs() <= _bound(x, compression)).all()
    expected = offload.dequantize_rows(*offload.quantize_rows_8bit(x, compression), torch.bfloat16)  # type: ignore[arg-type]
    assert (back == expected).float().mean() > 0.999  # the same codes (an ulp apart at most elsewhere)


@GPU
@pytest.mark.parametrize("compression", ["fp8", "int8"])
def test_gpu_compressed_offload_through_pooled_one_byte_buffers(compression: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "_EXACT_PIN_BYTES", 0)  # the codes take the register path too
    plain = lora_llama(device="cuda", dtype=torch.bfloat16, layers=3, hidden=256, dropout=0.1)
    fuse(plain)
    exact, small = copy.deepcopy(plain), copy.deepcopy(plain)
    checkpoint_layers(exact, layers="all", offload=True)
    checkpoint_layers(small, layers="all", offload=True, offload_compression=compression)  # type: ignore[arg-type]
    ids = torch.randint(0, 101, (2, 512), device="cuda")
    expected = loss_and_grads(exact, ids, seed=1)
    flat = lambda result: torch.cat([g.flatten() for g in result[1].values()])  # noqa: E731
    for _ in range(2):  # the second step reuses the pooled codes and scales
        got = loss_and_grads(small, ids, seed=1)
        assert rel_err(got[0], expected[0]) < 1e-6  # the forward is the uncompressed one
        assert 1e-4 < rel_err(flat(got), flat(expected)) < {"fp8": 0.1, "int8": 0.05}[compression]
    torch.cuda.synchronize()
    pool = small.model.layers[0].__dict__["_shared"].pool
    codes = torch.float8_e4m3fn if compression == "fp8" else torch.int8
    assert {key: len(buffers) for key, buffers in pool.free.items()} == {
        ((2, 512, 256), codes): 3, ((2, 512, 1), torch.float32): 3}  # one input a layer, 1 byte a value
    release_pinned_memory(small)


@GPU
def test_gpu_graph_replays_the_compressed_offload() -> None:
    from splice.training.graphs import GraphedStep
    from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states

    model = lora_llama(device="cuda", dtype=torch.bfloat16, layers=3, dropout=0.0)
    fuse(model)
    checkpoint_layers(model, layers="all", offload=True, offload_compression="fp8")
    weight, _ = lm_head_params(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model_hidden_states(model, input_ids=batch["ids"])
        loss = causal_lm_loss(hidden, weight, batch["ids"], static_shapes=True)
        loss.backward()
        return loss.detach()

    def grads() -> torch.Tensor:
        out = torch.cat([p.grad.flatten().clone() for p in params])  # type: ignore[union-attr]
        for p in params:
            p.grad.zero_()  # type: ignore[union-attr]
        return out

    ids = torch.randint(0, 101, (2, 64), device="cuda")
    graphed = GraphedStep(step, params)
    graphed({"ids": ids})  # warm-up (pools the pinned codes and scales) + capture + first replay
    assert graphed.captured == 1
    grads()
    replayed = (graphed({"ids": ids}).clone(), grads())
    eager = (step({"ids": ids}), grads())
    assert rel_err(replayed[0], eager[0]) < 1e-2 and rel_err(replayed[1], eager[1]) < 1e-2
