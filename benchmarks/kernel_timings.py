"""Per-kernel timings on the GPU: each fused kernel against the PyTorch code it replaces.

    PYTHONPATH=. python benchmarks/kernel_timings.py

Shapes are Llama-3-8B's at config C (4,096 tokens). Each row times forward + backward (median of
``triton.testing.do_bench``), fresh random inputs, bf16 activations, fp32 LoRA weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.cross_entropy import cross_entropy_grad_
from splice.kernels.lora_linear import lora_linear
from splice.kernels.rmsnorm import rms_norm, rms_norm_reference
from splice.kernels.rope import rope
from splice.kernels.swiglu import swiglu, swiglu_reference

N, H, INTER, R = 4096, 4096, 14336, 16
BF16 = torch.bfloat16


def bench(fn: Callable[[], None]) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fwd_bwd(forward: Callable[[], Tensor | tuple[Tensor, ...]], grads: tuple[Tensor, ...],
            inputs: list[Tensor]) -> Callable[[], None]:
    def run() -> None:
        for t in inputs:
            t.grad = None
        out = forward()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grads)

    return run


def peft_lora(x: Tensor, w: Tensor, a: Tensor, b: Tensor, p: float, scale: float) -> Tensor:
    """What PEFT does with fp32 adapters and no autocast."""
    y = F.linear(x, w)
    xf = F.dropout(x.to(a.dtype), p, training=True)
    return y + (F.linear(F.linear(xf, a), b) * scale).to(y.dtype)


def ce_grad_torch(logits: Tensor, y: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """What splice.training.loss did per chunk before the kernel: fp32 copy, loss, in-place gradient, bf16."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, y[:, None]).squeeze(1)
    grad = z.sub_(lse[:, None]).exp_()
    grad[torch.arange(z.shape[0], device=z.device), y] -= 1.0
    grad.mul_(scale[:, None])
    return grad.to(logits.dtype), loss


def rope_hf(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def main() -> None:
    dev = "cuda"
    rows: list[tuple[str, float, float, float]] = []  # name, reference ms, fused ms, bytes moved (fused)

    x = torch.randn(N, H, device=dev, dtype=BF16, requires_grad=True)
    wn = (1 + 0.1 * torch.randn(H, device=dev)).to(BF16)
    dy = torch.randn(N, H, device=dev, dtype=BF16)
    ref = bench(fwd_bwd(lambda: rms_norm_reference(x, wn, 1e-5), (dy,), [x]))
    fused = bench(fwd_bwd(lambda: rms_norm(x, wn, 1e-5), (dy,), [x]))
    rows.append(("RMSNorm (4096 x 4096)", ref, fused, 5 * N * H * 2))

    g = torch.randn(N, INTER, device=dev, dtype=BF16, requires_grad=True)
    u = torch.randn(N, INTER, device=dev, dtype=BF16, requires_grad=True)
    dh = torch.randn(N, INTER, device=dev, dtype=BF16)
    ref = bench(fwd_bwd(lambda: swiglu_reference(g, u), (dh,), [g, u]))
    fused = bench(fwd_bwd(lambda: swiglu(g, u), (dh,), [g, u]))
    rows.append(("SwiGLU (4096 x 14336)", ref, fused, 8 * N * INTER * 2))

    q = torch.randn(1, N, 32, 128, device=dev, dtype=BF16, requires_grad=True)
    k = torch.randn(1, N, 8, 128, device=dev, dtype=BF16, requires_grad=True)
    pos = torch.arange(N, device=dev, dtype=torch.float32)[None, :, None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=dev) / 128.0))
    emb = torch.cat((pos * inv, pos * inv), -1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    dq = torch.randn(1, 32, N, 128, device=dev, dtype=BF16)
    dk = torch.randn(1, 8, N, 128, device=dev, dtype=BF16)
    ref = bench(fwd_bwd(lambda: rope_hf(q, k, cos, sin), (dq, dk), [q, k]))
    fused = bench(fwd_bwd(lambda: tuple(t.transpose(1, 2) for t in rope(q, k, cos, sin)),
                          (dq, dk), [q, k]))
    rows.append(("RoPE q+k (4096 tok, 32/8 heads)", ref, fused, 4 * N * 40 * 128 * 2))

    # One chunk of the fused linear + cross-entropy (splice.training.loss), without its GEMMs. The kernel
    # runs in place on the same buffer every time: after the first call it holds a gradient, which
    # is as good an input as logits for timing. It reads the bf16 block twice and writes it once.
    c, v = 256, 128256
    z = torch.randn(c, v, device=dev, dtype=BF16)
    yt = torch.randint(0, v, (c,), device=dev)
    st = torch.full((c,), 1.0 / 4096, device=dev)
    ref = bench(lambda: ce_grad_torch(z, yt, st))
    fused = bench(lambda: cross_entropy_grad_(z, yt, st))
    rows.append((f"cross-entropy grad, in place ({c} x {v}, no GEMMs)", ref, fused, 3 * c * v * 2))

    for out_f, name in ((H, "q/o"), (INTER, "gate/up")):
        xl = torch.randn(N, H, device=dev, dtype=BF16, requires_grad=True)
        w = (torch.randn(out_f, H, device=dev) / H**0.5).to(BF16)
        a = (torch.randn(R, H, device=dev) / H**0.5).requires_grad_()
        b = (0.01 * torch.randn(out_f, R, device=dev)).requires_grad_()
        gy = torch.randn(N, out_f, device=dev, dtype=BF16)
        base = bench(fwd_bwd(lambda: F.linear(xl, w), (gy,), [xl]))
        for p in (0.0, 0.05):
            ref = bench(fwd_bwd(lambda: peft_lora(xl, w, a, b, p, 2.0), (gy,), [xl, a, b]))
            fused = bench(fwd_bwd(lambda: lora_linear(xl, w, None, a, b, scale=2.0, dropout_p=p, keys=1),
                                  (gy,), [xl, a, b]))
            rows.append((f"LoRA linear {name} r{R} p={p} (base alone {base:.3f} ms)", ref, fused, 0))

    print(f"{'kernel (forward + backward)':58s} {'PyTorch ms':>10s} {'fused ms':>9s} {'speed-up':>8s} {'fused GB/s':>10s}")
    for name, ref, fused, nbytes in rows:
        bw = f"{nbytes / fused / 1e6:10.0f}" if nbytes else f"{'-':>10s}"
        print(f"{name:58s} {ref:10.3f} {fused:9.3f} {ref / fused:7.2f}x {bw}")


if __name__ == "__main__":
    main()
