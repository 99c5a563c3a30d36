"""Do sibling LoRA linears pay as one node? q/k/v and gate/up member by member vs ``lora_group``.

    PYTHONPATH=. python benchmarks/lora_group.py --out lora_group.json [--tokens 4096,8192] [--tiny]

Llama-3-8B widths (hidden 4096, 8 KV heads of 128, intermediate 14336), r16, bf16 activations and frozen
bf16 base weights, fp32 adapter weights (PEFT's default), no dropout, at config C's 4,096 and config E's
8,192 tokens. For each group it times, per layer (median of ``triton.testing.do_bench``):

* **forward**: :func:`splice.kernels.lora_linear.lora_linear` per member (G down-projections, each reading
  x) vs :func:`splice.kernels.lora_group.lora_group` (one stacked down-projection);
* **forward + backward**: the same plus ``backward`` with fixed output gradients: per member, autograd
  sums G input gradients; the group accumulates them in the GEMMs and runs one ``dA`` reduction and one
  LoRA ``dx`` pass.

The two must agree: the table also gives the largest relative difference of the outputs and of every
gradient (x, A, B) between them. ``--tiny``: small widths on the CPU, to test this harness only.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import Tensor

from splice.kernels.lora_group import lora_group
from splice.kernels.lora_linear import lora_linear

RANK, LAYERS_PER_STEP = 16, 32


def _groups(tiny: bool) -> tuple[int, dict[str, tuple[int, ...]]]:
    hidden, kv, inter = (64, 16, 224) if tiny else (4096, 1024, 14336)
    return hidden, {"qkv": (hidden, kv, kv), "gate_up": (inter, inter)}


def timed(fn: Callable[[], None], device: str) -> float:
    """Median ms of ``fn``."""
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench(tokens: int, hidden: int, outs: tuple[int, ...], device: str) -> dict[str, float]:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)

    def rnd(*shape: int, dtype: torch.dtype = dt, std: float = 0.02) -> Tensor:
        return torch.randn(*shape, device=device, generator=gen).mul_(std).to(dtype)

    x = rnd(tokens, hidden, std=1.0).requires_grad_()
    ws = [rnd(n, hidden) for n in outs]
    la = [rnd(RANK, hidden, dtype=torch.float32).requires_grad_() for _ in outs]
    lb = [rnd(n, RANK, dtype=torch.float32).requires_grad_() for n in outs]
    dys = [rnd(tokens, n, std=1.0) for n in outs]
    leaves = [x, *la, *lb]

    def members() -> list[Tensor]:
        return [lora_linear(x, w, None, a, b, scale=2.0) for w, a, b in zip(ws, la, lb)]

    def group() -> list[Tensor]:
        return list(lora_group(x, ws, [None] * len(outs), la, lb, scales=[2.0] * len(outs)))

    def forward_only(forward: Callable[[], list[Tensor]]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                forward()
        return run

    def step(forward: Callable[[], list[Tensor]]) -> Callable[[], None]:
        def run() -> None:
            for t in leaves:
                t.grad = None
            torch.autograd.backward(forward(), dys)
        return run

    result: dict[str, float] = {}
    outputs = {}
    for name, forward in (("members", members), ("group", group)):
        result[f"fwd {name} ms"] = timed(forward_only(forward), device)
        result[f"fwd+bwd {name} ms"] = timed(step(forward), device)
        step(forward)()
        outputs[name] = ([y.detach() for y in forward()], [t.grad.clone() for t in leaves])  # type: ignore[union-attr]
    (ym, gm), (yg, gg) = outputs["members"], outputs["group"]
    result["max rel diff outputs"] = max(_rel(a, b) for a, b in zip(yg, ym))
    result["max rel diff grads"] = max(_rel(a, b) for a, b in zip(gg, gm))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lora_group.json")
    parser.add_argument("--tokens", default="4096,8192")
    parser.add_argument("--tiny", action="store_true", help="small widths on the CPU (tests this harness)")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    hidden, groups = _groups(args.tiny)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, outs in groups.items():
            r = bench(tokens, hidden, outs, device)
            saving = r["fwd+bwd members ms"] - r["fwd+bwd group ms"]
            rows.append({"tokens": tokens, "group": name, **r, "saving ms per 32-layer step": saving * LAYERS_PER_STEP})
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{where}  torch {torch.__version__}  r{RANK}, members vs lora_group, ms per layer")
    print("| tokens | group | fwd members | fwd group | fwd+bwd members | fwd+bwd group | speedup fwd+bwd"
          " | saving per 32-layer step ms | max rel diff outputs / grads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['group']} | {r['fwd members ms']:.3f} | {r['fwd group ms']:.3f} "
              f"| {r['fwd+bwd members ms']:.3f} | {r['fwd+bwd group ms']:.3f} "
              f"| {r['fwd+bwd members ms'] / r['fwd+bwd group ms']:.2f}x | {r['saving ms per 32-layer step']:.2f} "
              f"| {r['max rel diff outputs']:.1e} / {r['max rel diff grads']:.1e} |")
    with open(args.out, "w") as f:
        json.dump({"device": where, "torch": torch.__version__, "rank": RANK, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
