"""NF4Tensor: bitsandbytes' numbers (cross-checked where bitsandbytes imports), tensor behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splice.kernels.nf4 import NF4_CODE, dynamic_map
from splice.quant.nf4 import NF4Tensor, quantize_absmax, quantize_nf4_codes, to_nf4
from tests.numerics import DEVICES

SHAPES = [(128, 96), (37, 29), (300, 768), (5, 3), (1024, 4096)]


def _bnb():  # type: ignore[no-untyped-def]
    try:
        import bitsandbytes.functional as bnb_f
    except Exception:
        pytest.skip("bitsandbytes does not import here")
    return bnb_f


def test_codebook_and_dynamic_map_are_bitsandbytes() -> None:
    bnb_f = _bnb()
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(torch.tensor(NF4_CODE), bnb_f.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codes_match_bitsandbytes(shape: tuple[int, int], device: str) -> None:
    bnb_f = _bnb()
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = to_nf4(w)
    assert torch.equal(packed.reshape(-1), t.packed)
    assert torch.equal(state.state2.absmax, t.scale2) and torch.equal(state.offset, t.offset)
    ours, theirs = t.qabsmax.long(), state.absmax.long()  # type: ignore[union-attr]
    if device == "cuda":  # our encoder is CUDA's dQuantize: identical codes
        # except where a group of 256 absmax values is all equal (one block: absmax - mean = 0):
        # bitsandbytes' CUDA kernel then encodes 0 * (1/0) = NaN as code 0, we encode 0 as the
        # level nearest 0; the scale is 0, so both decode to the offset exactly
        live = (t.scale2 != 0).repeat_interleave(256)[: ours.numel()]  # type: ignore[union-attr]
        assert live.all() or ours.numel() == 1  # only a one-block weight has such a group
        assert torch.equal(ours[live], theirs[live])
        # fp32: the Triton kernel may fuse the absmax's multiply-add (1 ulp); bf16: identical
        theirs_w = bnb_f.dequantize_4bit(packed, state)
        torch.testing.assert_close(t.dequantize(torch.float32), theirs_w, rtol=1e-6, atol=0)
        assert torch.equal(t.dequantize(torch.bfloat16), theirs_w.to(torch.bfloat16))
    else:  # bitsandbytes' CPU encoder rounds through a lookup table: a few near-ties differ by 1
        theirs_absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
        torch.testing.assert_close(t.fp32_absmax(), theirs_absmax, rtol=0.02, atol=1e-6)
        assert (ours != theirs).sum() <= max(1, 0.01 * ours.numel())
        plain = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        t1 = to_nf4(w, double_quant=False)
        assert torch.equal(plain[0].reshape(-1), t1.packed) and torch.equal(plain[1].absmax, t1.absmax)
        # The values from bitsandbytes' own codes, table and absmax. (Not its CPU dequantize_4bit:
        # in 0.50.2 on an AVX-512 host it reads the wrong block's absmax, e.g. values 128-191 of
        # a 128 x 96 weight decode with block 1's; on CUDA it is compared above.)
        codes = torch.stack(((plain[0] >> 4) & 0xF, plain[0] & 0xF), 1).reshape(-1)[: w.numel()]
        theirs_w = (plain[1].code[codes.long()] * plain[1].absmax.repeat_interleave(64)[: w.numel()]).reshape(shape)
        assert torch.equal(t1.dequantize(torch.float32), theirs_w)


def test_bnb_encoder_is_not_plain_nearest() -> None:
    # The 8-bit search (bitsandbytes' dQuantize) brackets with the last pivots it saw: pin a
    # value where that differs from the nearest level, so a bucketize "simplification" fails.
    code = dynamic_map()
    x = torch.linspace(-1, 1, 20001)
    q, _, _ = quantize_absmax(x.abs() + 1, code)  # any input: exercise the encoder
    assert q.dtype == torch.uint8
    scaled = torch.tensor([-0.06062611937522888])
    from splice.quant.nf4_encode import _search_code

    assert int(_search_code(scaled, code)) == 77  # bitsandbytes' CUDA answer (its CPU one: 78)


def test_padding_and_tail_block() -> None:
    # 15 values: one short block, an odd count (half a byte of padding); seeded (an unseeded draw
    # could put a value in NF4's widest gap and fail the bound below at random)
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantize_nf4_codes(w, block_size=4)
    assert packed.numel() == 8 and absmax.numel() == 4
    assert torch.equal(absmax[-1], w.reshape(-1)[12:].abs().max())
    t = to_nf4(w, block_size=4, double_quant=False)
    assert (t.dequantize() - w).abs().max() <= absmax.max() * 0.1
    # each value within half NF4's widest level gap ((1 - 0.696) / 2 of its own block's absmax)
    err = (t.dequantize() - w).abs().reshape(-1)
    assert (err <= 0.152 * absmax[torch.arange(15) // 4]).all()


def test_all_zero_block_dequantizes_to_zero() -> None:
    w = torch.zeros(4, 64)
    w[0] = 1.0
    assert torch.equal(to_nf4(w).dequantize(torch.float32)[1:], torch.zeros(3, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_behaves_as_its_compute_dtype(dtype: torch.dtype) -> None:
    w = torch.randn(48, 64)
    t = to_nf4(w, dtype=dtype)
    assert isinstance(t, NF4Tensor) and t.dtype == dtype and t.shape == (48, 64)
    assert t.t().shape == (64, 48) and torch.equal(t.t().dequantize(), t.dequantize().t())
    x = torch.randn(3, 64, dtype=dtype)
    torch.testing.assert_close(F.linear(x, t), x @ t.dequantize().t())
    torch.testing.assert_close(x @ t.t(), x @ t.dequantize().t())
    moved = t.to(torch.float32)
    assert isinstance(moved, NF4Tensor) and moved.dtype == torch.float32 and moved.packed is t.packed
    assert moved.nbytes_stored() < w.numel()  # about 4.13 bits a weight


def test_values_copy_into_a_float_tensor() -> None:
    t = to_nf4(torch.randn(8, 64), dtype=torch.float32)
    out = torch.empty(8, 64, dtype=torch.bfloat16)
    out.copy_(t)
    assert torch.equal(out, t.dequantize(torch.bfloat16))


def test_parameter_state_and_flatten() -> None:
    t = to_nf4(torch.randn(8, 64))
    p = torch.nn.Parameter(t, requires_grad=False)
    assert isinstance(p, NF4Tensor) and not p.requires_grad
    names, meta = t.__tensor_flatten__()
    rebuilt = NF4Tensor.__tensor_unflatten__({n: getattr(t, n) for n in names}, meta, t.shape, t.stride())
    assert torch.equal(rebuilt.dequantize(), t.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_weights_only_load_reads_nf4_state(tmp_path, double_quant: bool) -> None:  # type: ignore[no-untyped-def]
    """NF4Tensor is in torch's safe globals: torch.load(weights_only=True) rebuilds it, views too."""
    t = to_nf4(torch.randn(37, 29), double_quant=double_quant, dtype=torch.bfloat16)
    torch.save({"w": t, "wt": t.t(), "plain": torch.ones(2)}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert isinstance(state["w"], NF4Tensor) and state["w"].dtype == torch.bfloat16
    assert state["w"].double_quant is double_quant and state["w"].shape == (37, 29)
    assert torch.equal(state["w"].dequantize(), t.dequantize())
    assert state["wt"].shape == (29, 37) and torch.equal(state["wt"].dequantize(), t.dequantize().t())


def test_a_quantized_model_state_dict_round_trips_weights_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from splice.quant.linear import quantize_nf4

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))

    source, target = model(), model()
    for layer in (source[0], source[2]):
        layer.weight.data.mul_(3.0)  # different weights than the target's
    quantize_nf4(source, targets="all-linear")
    quantize_nf4(target, targets="all-linear")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    target.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x = torch.randn(3, 64)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_under_inference_mode(bias: bool) -> None:
    """Under ``torch.inference_mode`` (the generation engine) F.linear reaches the tensor as
    ``aten.linear`` whole, not as t + mm: it must compute the dequantized product, not raise."""
    torch.manual_seed(0)
    w, x, b = torch.randn(64, 128), torch.randn(3, 128), torch.randn(64) if bias else None
    q = NF4Tensor.from_float(w)
    expected = F.linear(x, q.dequantize(torch.float32), b)
    with torch.inference_mode():
        got = F.linear(x, q, b)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-3  # the 4-bit values, not the original weight
