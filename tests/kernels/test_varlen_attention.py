"""splice.kernels.varlen_attention: packed causal attention and its gradients against dense attention over
the whole flat batch with a block-diagonal causal mask (torch SDPA in float64, or the same formula written
out when there is a softcap): an independent computation of the same thing.

The Triton tests need a GPU, or ``TRITON_INTERPRET=1`` set before pytest starts (then the kernels run on
CPU tensors in Triton's interpreter: fp32 and fp16 there, bf16 only on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels import use_triton
from splice.kernels.varlen_attention import KernelConfig, varlen_attention, varlen_attention_reference
from tests.numerics import DEVICES, GPU, HostSyncs, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative error (norms) vs float64
ODD = [1, 17, 130, 5, 2]  # odd lengths: tiles spanning segments, a 1-token segment, one over two tiles


@dataclass
class Case:
    q: Tensor  # (T, Hq, D)
    k: Tensor  # (T, Hkv, D)
    v: Tensor
    cu: Tensor  # (S + 1,) int32
    grad: Tensor  # the output's gradient (T, Hq, D)


def make_case(lens: list[int], *, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str = "cpu",
              seed: int = 0, trailing: int = 0) -> Case:
    """Random q, k, v of ``lens`` segments; ``trailing`` empty segments at the end (a fixed-shape cu)."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(lens)
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist() + [tokens] * trailing
    q, k, v = (torch.randn(tokens, h, d, generator=g).to(device=device, dtype=dtype) for h in (hq, hkv, hkv))
    grad = torch.randn(tokens, hq, d, generator=g).to(device=device, dtype=dtype)
    return Case(q, k, v, torch.tensor(bounds, dtype=torch.int32, device=device), grad)


def dense(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, *, scale: float, window: int = 0,
          softcap: float = 0.0) -> Tensor:
    """Attention over all T rows at once with the block-diagonal causal (and window) mask, in float64:
    torch SDPA (the masked path Hugging Face takes), or the formula written out with a softcap."""
    tokens, hq, _ = q.shape
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long().cpu())
    i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    allowed = (seg[:, None] == seg[None, :]) & (j <= i)
    if window:
        allowed &= j > i - window
    allowed = allowed.to(q.device)
    group = hq // k.shape[1]
    q64, k64, v64 = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)))
    if not softcap:
        return F.scaled_dot_product_attention(q64, k64, v64, attn_mask=allowed, scale=scale).transpose(0, 1)
    s = torch.tanh(q64 @ k64.transpose(1, 2) * scale / softcap) * softcap
    return (torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v64).transpose(0, 1)


def grads(fn, case: Case, **kw) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """[out, dq, dk, dv] of ``fn(q, k, v, cu)`` for ``case.grad``."""
    inputs = [x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v)]
    out = fn(*inputs, case.cu, **kw)
    return [out.detach(), *torch.autograd.grad(out, inputs, case.grad.to(out.dtype))]


def check_against_dense(fn, case: Case, dtype: torch.dtype, **kw) -> None:  # type: ignore[no-untyped-def]
    got = grads(fn, case, **kw)
    kw.pop("config", None)
    want = grads(dense, case, **kw)
    assert got[0].dtype == dtype and got[0].shape == case.q.shape
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


def reference(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, **kw) -> Tensor:  # type: ignore[no-untyped-def]
    return varlen_attention_reference(q, k, v, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), **kw)


def kernel(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, **kw) -> Tensor:  # type: ignore[no-untyped-def]
    return varlen_attention(q, k, v, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), **kw)


# (lens, hq, hkv, d, window, softcap): GQA ratios 1 and 4, head dims 64 and 128, windows, softcaps
CASES = [
    (ODD, 4, 4, 64, 0, 0.0),
    (ODD, 4, 1, 128, 0, 0.0),
    (ODD, 4, 1, 64, 20, 0.0),
    (ODD, 4, 4, 128, 0, 5.0),
    ([3, 1, 60], 4, 1, 64, 7, 3.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", CASES)
def test_reference_matches_masked_dense_attention(spec, dtype: torch.dtype) -> None:
    """The reference (one attention per segment) equals SDPA over the flat batch with the block mask."""
    lens, hq, hkv, d, window, softcap = spec
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype)
    check_against_dense(reference, case, dtype, scale=d**-0.5, window=window, softcap=softcap)


def _kernel_or_skip(device: str) -> None:
    if not use_triton(torch.empty(0, device=device)):
        pytest.skip("the Triton path needs a GPU, or TRITON_INTERPRET=1 set before pytest starts")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", CASES)
def test_kernel_matches_masked_dense_attention(spec, dtype: torch.dtype, device: str) -> None:
    _kernel_or_skip(device)
    lens, hq, hkv, d, window, softcap = spec
    case = make_case(lens, hq=hq, hkv=hkv, d=d, dtype=dtype, device=device, seed=1)
    check_against_dense(kernel, case, dtype, scale=d**-0.5, window=window, softcap=softcap)


# 16-wide tiles: segments spanning tiles, tiles holding several segments, every loop phase (masked head,
# unmasked middle, masked tail) of the forward, dK/dV and dQ programs; trailing empty segments
SMALL = [KernelConfig(block_m=16, block_n=16, bwd_m=16, bwd_n=16, dq_m=16, dq_n=16),
         KernelConfig(block_m=32, block_n=16, bwd_m=16, bwd_n=32, dq_m=16, dq_n=32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [0, 19])
@pytest.mark.parametrize("config", SMALL)
def test_kernel_tilings(config: KernelConfig, window: int, device: str) -> None:
    _kernel_or_skip(device)
    case = make_case([1, 17, 70, 3, 1, 33, 2], hq=4, hkv=2, d=16, dtype=torch.float32, device=device, seed=2,
                     trailing=3)
    check_against_dense(kernel, case, torch.float32, scale=0.3, window=window, config=config)


def test_bad_inputs_name_the_problem() -> None:
    case = make_case([3, 2], hq=4, hkv=2, d=8, dtype=torch.float32)
    kw = dict(max_seqlen=3, scale=1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(case.q, case.k[:, :1].expand(-1, 3, -1), case.v[:, :1].expand(-1, 3, -1),
                         cu_seqlens=case.cu, **kw)
    with pytest.raises(ValueError, match=r"cu_seqlens must be \(S \+ 1,\) int32"):
        varlen_attention(case.q, case.k, case.v, cu_seqlens=case.cu.float(), **kw)
    with pytest.raises(ValueError, match="must rise from 0 to T=5"):
        varlen_attention_reference(case.q, case.k, case.v, cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32),
                                   **kw)
    with pytest.raises(ValueError, match="share a device and q, k, v a dtype"):
        varlen_attention(case.q, case.k.double(), case.v, cu_seqlens=case.cu, **kw)


@GPU
def test_no_host_sync_and_cuda_graph_replay() -> None:
    """Forward and backward read no tensor value on the host, so a graph captured once replays for other
    segment boundaries written into the same (fixed-shape) cu_seqlens."""
    case = make_case([1, 17, 130, 5, 2], hq=8, hkv=2, d=64, dtype=torch.bfloat16, device="cuda", seed=3,
                     trailing=4)
    q, k, v = (x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v))

    def step() -> list[Tensor]:
        out = varlen_attention(q, k, v, cu_seqlens=case.cu, max_seqlen=155, scale=0.125)
        return [out, *torch.autograd.grad(out, (q, k, v), case.grad)]

    with HostSyncs() as syncs:
        step()
    assert syncs.synced == []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    other = make_case([60, 40, 3, 1, 50, 1], hq=8, hkv=2, d=64, dtype=torch.bfloat16, device="cuda", seed=4,
                      trailing=3)
    for name in ("cu", "grad"):
        getattr(case, name).copy_(getattr(other, name))
    with torch.no_grad():
        for mine, theirs in zip((q, k, v), (other.q, other.k, other.v), strict=True):
            mine.copy_(theirs)
    graph.replay()
    torch.cuda.synchronize()
    want = grads(dense, other, scale=0.125)
    for name, a, b in zip(("out", "dq", "dk", "dv"), captured, want, strict=True):
        assert rel_err(a, b) < TOL[torch.bfloat16], name
