"""Do one-GEMM projections pay? Separate vs concatenated q/k/v and gate/up weights, timed on the GPU.

    PYTHONPATH=. python benchmarks/projection_fusion.py --out fusion.json

Llama-3-8B shapes (hidden 4096, 8 KV heads of 128, intermediate 14336), bf16, at config A's
1,024 tokens and config C's 4,096. For each group it times, per layer:

* forward: ``x @ W_i^T`` for each projection vs ``x @ cat(W_i)^T`` once;
* input gradient: what autograd runs for separate projections (one GEMM each, then adds) vs
  one GEMM over the concatenated weight (``dY_cat @ cat(W_i)``), plus the separate GEMMs
  accumulated in place (``addmm_``, no adds) as a third option.

Every variant is captured in a CUDA graph over ``LAYERS`` distinct weight sets (so weights are
read from memory, not the L2 cache) and timed by replaying it (median of ``triton.testing.do_bench``).
Prints a table (ms per layer, TFLOP/s) and the projected saving per 32-layer step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch import Tensor

HIDDEN, KV, INTER, LAYERS_PER_STEP = 4096, 1024, 14336, 32
LAYERS = 6  # distinct weight sets per timed graph (6 x 235 MB of MLP weights >> the 50 MB L2)
GROUPS = {"qkv": (HIDDEN, KV, KV), "gate_up": (INTER, INTER)}


def timed(fn: Callable[[], None]) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph."""
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median"))


def bench_group(tokens: int, outs: tuple[int, ...]) -> dict[str, float]:
    dev, dt = "cuda", torch.bfloat16
    total = sum(outs)
    gen = torch.Generator(dev).manual_seed(0)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen) * 0.02

    fused = [rnd(total, HIDDEN) for _ in range(LAYERS)]  # (sum(outs), hidden) per layer
    split = [list(w.split(outs)) for w in fused]  # views; .contiguous() copies for "separate"
    split = [[p.contiguous() for p in ws] for ws in split]
    x = rnd(tokens, HIDDEN)
    dy = rnd(tokens, total)
    dys = [d.contiguous() for d in dy.split(outs, dim=1)]
    y = torch.empty(tokens, total, device=dev, dtype=dt)
    dx = torch.empty(tokens, HIDDEN, device=dev, dtype=dt)

    def fwd_separate() -> None:
        for ws in split:
            for w in ws:
                torch.mm(x, w.t())

    def fwd_fused() -> None:
        for w in fused:
            torch.mm(x, w.t(), out=y)

    def bwd_separate() -> None:  # autograd: one GEMM per projection, then adds
        for ws in split:
            g = torch.mm(dys[0], ws[0])
            for d, w in zip(dys[1:], ws[1:]):
                g = g + torch.mm(d, w)

    def bwd_addmm() -> None:
        for ws in split:
            torch.mm(dys[0], ws[0], out=dx)
            for d, w in zip(dys[1:], ws[1:]):
                dx.addmm_(d, w)

    def bwd_fused() -> None:
        for w in fused:
            torch.mm(dy, w, out=dx)

    flops = 2.0 * tokens * HIDDEN * total * LAYERS
    result = {}
    for name, fn in [("fwd separate", fwd_separate), ("fwd fused", fwd_fused),
                     ("bwd separate+add", bwd_separate), ("bwd addmm", bwd_addmm),
                     ("bwd fused", bwd_fused)]:
        ms = timed(fn) / LAYERS
        result[name] = ms
        result[name + " TFLOP/s"] = flops / LAYERS / ms / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="projection_fusion.json")
    parser.add_argument("--tokens", default="1024,4096")
    args = parser.parse_args()
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for group, outs in GROUPS.items():
            r = bench_group(tokens, outs)
            saving = ((r["fwd separate"] - r["fwd fused"]) + (r["bwd separate+add"] - r["bwd fused"]))
            rows.append({"tokens": tokens, "group": group, **r,
                         "saving ms per 32-layer step": saving * LAYERS_PER_STEP})
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| tokens | group | fwd sep ms | fwd fused ms | bwd sep+add ms | bwd addmm ms | bwd fused ms"
          " | fused TFLOP/s fwd/bwd | saving per 32-layer step (fwd+bwd) ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['group']} | {r['fwd separate']:.3f} | {r['fwd fused']:.3f} "
              f"| {r['bwd separate+add']:.3f} | {r['bwd addmm']:.3f} | {r['bwd fused']:.3f} "
              f"| {r['fwd fused TFLOP/s']:.0f}/{r['bwd fused TFLOP/s']:.0f} "
              f"| {r['saving ms per 32-layer step']:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
