"""splice.kernels.rope_cache: RoPE on q/k and the K/V cache write in one launch, against the plain
composition (Hugging Face's rotation, then index_copy_ into the flat cache)."""

from __future__ import annotations

import pytest
import torch

from splice.kernels.kv_cache import write_kv
from splice.kernels.rope import rope_reference
from splice.kernels.rope_cache import rope_write_kv, rope_write_kv_reference
from tests.numerics import DEVICES, GPU, INTERPRETED, rel_err

NB, BS = 7, 4


def _rotary(tokens: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (T, 1, D) of random positions, as a Llama rotary embedding returns for positions (T, 1)."""
    positions = torch.randint(0, 500, (tokens, 1), generator=torch.Generator().manual_seed(tokens)).float()
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[..., None] * inv  # (T, 1, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def _case(tokens: int, hq: int, hkv: int, dim: int, dtype: torch.dtype, device: str, packed: bool) -> tuple:
    g = torch.Generator().manual_seed(hq * 100 + hkv * 10 + dim)
    if packed:  # q, k, v as column views of one (T, (Hq + 2 Hkv) D) projection output
        qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=g).to(device=device, dtype=dtype)
        q = qkv[:, : hq * dim].view(tokens, hq, dim)
        k = qkv[:, hq * dim: (hq + hkv) * dim].view(tokens, hkv, dim)
        v = qkv[:, (hq + hkv) * dim:].view(tokens, hkv, dim)
    else:
        q, k, v = (torch.randn(tokens, h, dim, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv))
    slots = torch.randperm(NB * BS, generator=g)[:tokens].to(device)
    cos, sin = _rotary(tokens, dim, device)
    return q, k, v, cos.to(dtype), sin.to(dtype), slots


def _caches(hkv: int, dim: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(NB, BS, hkv, dim, dtype=dtype, device=device),
            torch.zeros(NB, BS, hkv, dim, dtype=dtype, device=device))


def test_the_reference_is_hugging_faces_rotation_then_the_cache_write() -> None:
    q, k, v, cos, sin, slots = _case(9, 6, 2, 16, torch.float32, "cpu", packed=True)
    kc, vc = _caches(2, 16, torch.float32, "cpu")
    out = rope_write_kv_reference(q, k, v, cos, sin, kc, vc, slots)
    want_q, want_k = rope_reference(q[:, None], k[:, None], cos, sin)  # (T, 1, H, D) layout
    kc2, vc2 = _caches(2, 16, torch.float32, "cpu")
    write_kv(want_k[:, 0], v, kc2, vc2, slots)
    assert torch.allclose(out, want_q[:, 0], atol=1e-6, rtol=0)
    assert torch.allclose(kc, kc2, atol=1e-6, rtol=0) and torch.equal(vc, vc2)
    assert kc.flatten(0, 1)[slots].abs().sum() > 0 and vc.flatten(0, 1).abs().sum(-1).sum(-1).count_nonzero() == 9


def test_mismatched_shapes_get_one_line() -> None:
    q, k, v, cos, sin, slots = _case(5, 4, 2, 8, torch.float32, "cpu", packed=False)
    kc, vc = _caches(2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="rope_write_kv: q"):
        rope_write_kv(q, k, v, cos, sin, kc, vc, slots[:4])


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "hq", "hkv", "dim", "packed"), [
    (1, 32, 8, 128, True), (13, 6, 3, 64, True), (27, 4, 4, 16, False), (5, 12, 1, 256, False),
])
def test_the_kernel_matches_the_reference(dtype: torch.dtype, tokens: int, hq: int, hkv: int, dim: int,
                                          packed: bool) -> None:
    q, k, v, cos, sin, slots = _case(tokens, hq, hkv, dim, dtype, "cuda", packed)
    kc, vc = _caches(hkv, dim, dtype, "cuda")
    kc_ref, vc_ref = _caches(hkv, dim, dtype, "cuda")
    out = rope_write_kv(q, k, v, cos, sin, kc, vc, slots)
    want = rope_write_kv_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # both fp32 inside; one rounding each
    assert out.shape == (tokens, hq, dim) and out.is_contiguous()
    assert rel_err(out, want) < tol and rel_err(kc, kc_ref) < tol
    assert torch.equal(vc, vc_ref)  # values are copied, not computed
    untouched = torch.ones(NB * BS, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert not kc.flatten(0, 1)[untouched].any() and not vc.flatten(0, 1)[untouched].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_kv_out_receives_the_cached_keys_and_values_densely(packed: bool, dtype: torch.dtype, device: str) -> None:
    """kv_out (the step's own K/V for fresh prompts' attention): rope(k) and v at each token's row, equal to what
    the cache holds at its slot, with the cache written as before (kernel on a GPU or interpreted, else reference)."""
    if device == "cpu" and dtype != torch.float32 and INTERPRETED:
        pytest.skip("Triton's interpreter rounds bf16 by truncation; bf16 is checked on a GPU")
    q, k, v, cos, sin, slots = _case(11, 8, 2, 32, dtype, device, packed)
    kc, vc = _caches(2, 32, dtype, device)
    kv_out = (torch.empty(11, 2, 32, dtype=dtype, device=device), torch.empty(11, 2, 32, dtype=dtype, device=device))
    out = rope_write_kv(q, k, v, cos, sin, kc, vc, slots, kv_out=kv_out)
    kc_ref, vc_ref = _caches(2, 32, dtype, device)
    want = rope_write_kv_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots)
    assert torch.equal(kv_out[0], kc.flatten(0, 1)[slots]) and torch.equal(kv_out[1], v)
    assert torch.equal(vc, vc_ref) and rel_err(out, want) < 1e-2 and rel_err(kc, kc_ref) < 1e-2


def test_a_kv_out_of_the_wrong_shape_gets_one_line() -> None:
    q, k, v, cos, sin, slots = _case(5, 4, 2, 8, torch.float32, "cpu", packed=False)
    kc, vc = _caches(2, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="kv_out must be two contiguous"):
        rope_write_kv(q, k, v, cos, sin, kc, vc, slots, kv_out=(torch.empty(5, 4, 8), torch.empty(5, 2, 8)))
