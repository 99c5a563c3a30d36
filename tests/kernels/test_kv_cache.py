"""splice.kernels.kv_cache: int8 K/V with a scale per (token, head), and the fused RoPE + cache write of them
(the Triton case on a GPU, or under ``TRITON_INTERPRET=1`` in fp32). Paged attention over int8 caches:
tests/kernels/test_paged_attention.py."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.kv_cache import QMAX, dequantize_kv, kv_cache_dtype, kv_caches, quantize_kv
from splice.kernels.rope_cache import rope_write_kv, rope_write_kv_reference
from tests.numerics import DEVICES

BS = 16  # block size


def test_codes_round_half_away_from_zero_within_half_a_step() -> None:
    x = torch.randn(50, 3, 64) * torch.logspace(-3, 2, 50)[:, None, None]  # every magnitude
    x[0, 0] = 0.0  # an all-zero vector: scale 0, codes 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.shape == (50, 3) and int(codes.abs().max()) == QMAX
    back = dequantize_kv(codes, scale)
    assert (back - x).abs().le(scale[..., None] / 2 * (1 + 1e-6)).all()
    assert not back[0, 0].any() and float(scale[0, 0]) == 0.0
    ties = torch.tensor([[2.5, -2.5, 127.0]])  # scale 1: 2.5 -> 3, -2.5 -> -3
    assert quantize_kv(ties)[0].tolist() == [[3, -3, 127]]


def test_the_engine_option_names_its_choices() -> None:
    assert kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16 and kv_cache_dtype("int8", torch.half) == torch.int8
    with pytest.raises(ValueError, match="kv_dtype='fp8': choose one of auto, int8"):
        kv_cache_dtype("fp8", torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_writes_int8_codes_and_scales(dtype: torch.dtype, device: str) -> None:
    """The fused RoPE + cache write (Triton where it runs) and its reference write the same codes (off by at
    most one step where a division lands on a half) and scales; both decode to the rotated fp32 keys."""
    if device == "cpu" and dtype != torch.float32:
        pytest.skip("fp32 under the interpreter")
    g = torch.Generator().manual_seed(3)
    tokens, hq, hkv, dim, blocks = 9, 8, 2, 64, 5
    q, k, v = (torch.randn(tokens, h, dim, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv))
    angles = torch.rand(tokens, 1, dim // 2, generator=g) * 6.0
    cos, sin = (torch.cat((f(angles), f(angles)), -1).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))
    slots = torch.randperm(blocks * BS, generator=g)[:tokens].to(device)
    outs = []
    for fn in (rope_write_kv, rope_write_kv_reference):
        caches = kv_caches((blocks, BS, hkv, dim), torch.int8, device)
        scales = [torch.zeros(blocks, BS, hkv, device=device) for _ in range(2)]
        q_out = fn(q, k, v, cos, sin, *caches, slots, key_scale=scales[0], value_scale=scales[1])
        outs.append((q_out, caches, scales))
    (q1, c1, s1), (q2, c2, s2) = outs
    torch.testing.assert_close(q1, q2)
    for a, b, sa, sb in zip(c1, c2, s1, s2, strict=True):
        assert (a.int() - b.int()).abs().max() <= 1
        torch.testing.assert_close(sa, sb, rtol=1e-6, atol=0.0)
    keys = dequantize_kv(c2[0], s2[0]).flatten(0, 1)[slots]  # (T, Hkv, D)
    half = dim // 2
    kf, c, s = k.float(), cos.float(), sin.float()
    rotated = kf * c + torch.cat((-kf[..., half:], kf[..., :half]), -1) * s
    assert (keys - rotated).abs().le(s2[0].flatten(0, 1)[slots][..., None] / 2 + 1e-6).all()
    values = dequantize_kv(c2[1], s2[1]).flatten(0, 1)[slots]
    assert (values - v.float()).abs().le(s2[1].flatten(0, 1)[slots][..., None] / 2 + 1e-6).all()
