"""Launch shapes of the Triton LoRA kernels, timed on the GPU at config C's sizes.

    PYTHONPATH=. python benchmarks/lora_kernel_tuning.py [--out tuning.json] [--defaults-only] [--dropout 0,0.05]

The three kernels of :mod:`splice.kernels.lora_kernels` are memory-bound (rank 16: a few FLOPs
per byte), so each is judged by the bandwidth it reaches: bytes it must move (every input read
once, every output written once) over its median time, against a device-to-device copy measured
in the same run. For every kernel and Llama-3-8B shape (4,096 tokens) it times the current
default (``TILES``) and the candidate launch shapes below, checks each candidate's result against
the default's (fp32 atomics: equal to ~1e-6), and prints a table with the best one per row.
``--dropout`` lists the dropout rates to time (default 0.05: config C's), ``--defaults-only`` times
the defaults alone: with ``--dropout 0,0.05`` that is what the mask's hash costs. The ``x3`` rows are
q/k/v's group (three members over one ``x``, each with its own mask: splice.kernels.lora_group).
``b_grads`` rows (dropout 0 runs) time the backward's ``T`` and ``dB`` from one read of the output gradient ``G``;
a second table puts them beside the two kernels they replace (``lora_down`` on ``G``, then ``tn_reduce``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable

import torch
from torch import Tensor

from splice.kernels.lora_kernels import TILES, Tiles, lora_b_grads, lora_down, lora_dx_add_, tn_reduce

N, R = 4096, 16
BF16 = torch.bfloat16


def bench(fn: Callable[[], object], graphs: bool = False) -> float:
    """Median ms of ``fn``; ``graphs``: replayed from a CUDA graph, so a small kernel's time is the GPU's,
    not Python's launch (training runs these kernels inside graphs)."""
    import triton

    if graphs:
        return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


# --quick: eight launch shapes a kernel around the defaults (more warps, other tiles, stages, waves; tn_reduce x_major)
QUICK = {
    "down": [Tiles(64, 64, 8, 3, 6), Tiles(128, 64, 8, 3, 6), Tiles(64, 128, 4, 3, 6), Tiles(64, 128, 8, 3, 6),
             Tiles(32, 64, 4, 4, 6), Tiles(64, 64, 4, 4, 8), Tiles(128, 128, 8, 3, 6), Tiles(64, 64, 4, 3, 3)],
    # sweep12's best (32, 128, 4, 4, 4) is the default now; x_major puts the x tile on wgmma's M side
    "reduce": [Tiles(64, 128, 4, 3, 4), Tiles(64, 64, 4, 3, 4), Tiles(32, 128, 4, 3, 4), Tiles(32, 64, 4, 4, 4),
               Tiles(32, 128, 4, 4, 4, x_major=True), Tiles(64, 128, 4, 3, 4, x_major=True),
               Tiles(64, 64, 4, 4, 4, x_major=True), Tiles(128, 128, 8, 3, 4, x_major=True)],
    "dx": [Tiles(32, 256, 8, 1), Tiles(64, 256, 8, 1), Tiles(64, 128, 4, 1), Tiles(32, 256, 4, 1),
           Tiles(16, 256, 4, 1), Tiles(64, 256, 4, 1), Tiles(32, 512, 8, 1), Tiles(32, 256, 4, 2)],
    # (bn rows a loop step, bk columns a program)
    "b_grads": [Tiles(64, 128, 4, 3, 4), Tiles(64, 256, 4, 3, 4), Tiles(64, 128, 8, 3, 4), Tiles(128, 128, 8, 3, 4),
                Tiles(64, 256, 8, 4, 4), Tiles(128, 64, 4, 3, 4), Tiles(64, 256, 8, 3, 8), Tiles(64, 128, 4, 4, 8)],
}


def candidates(kind: str) -> list[Tiles]:
    if kind == "b_grads":
        return QUICK[kind]
    if kind == "dx":
        shapes = [(64, 128), (128, 128), (64, 256), (128, 256), (32, 256), (256, 128)]
        return [Tiles(bn, bk, w, 1) for (bn, bk), w in itertools.product(shapes, (4, 8))]
    shapes = ([(64, 64), (64, 128), (128, 64), (128, 128), (64, 256), (32, 256)] if kind == "down"
              else [(64, 128), (128, 128), (64, 256), (128, 64), (32, 256), (128, 256)])
    return [Tiles(bn, bk, w, st, wv) for (bn, bk), w, st, wv
            in itertools.product(shapes, (4, 8), (3, 4), (2, 6))]


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


Run = Callable[[Tiles], Tensor]


def problems(p: float) -> list[tuple[str, str, int, Run, Run]]:
    """(kernel, shape label, bytes moved, check(tiles) -> result, timed(tiles)) at dropout ``p``."""
    out = []
    for k, g in ((4096, 1), (4096, 3), (14336, 1)):  # the input widths of q/k/v/o/gate/up (g: q/k/v's group), down
        x = torch.randn(N, k, device="cuda").to(BF16)
        a = torch.randn(g * R, k, device="cuda") / k**0.5
        t = torch.randn(N, g * R, device="cuda")
        keys = torch.randint(0, 2**31 - 1, (g, 2) if g > 1 else (2,), dtype=torch.int32, device="cuda")
        tag = f" x{g}" if g > 1 else ""
        down = lambda tl, x=x, a=a, keys=keys, g=g: lora_down(x, a, p, keys, tiles=tl, members=g)  # noqa: E731
        out.append(("down", f"x {N}x{k}{tag}", x.numel() * 2 + a.numel() * 4 + N * g * R * 4, down, down))
        da = lambda tl, x=x, t=t, keys=keys, g=g: tn_reduce(t, x, p, keys, tiles=tl, members=g)  # noqa: E731
        out.append(("reduce", f"dA {g * R}x{k}", x.numel() * 2 + t.numel() * 4 + g * R * k * 4, da, da))
        dx = torch.randn(N, k, device="cuda").to(BF16)
        scratch = dx.clone()
        # the check adds into a fresh copy; the timed call adds into one scratch buffer
        out.append(("dx", f"dx {N}x{k}{tag}", 2 * dx.numel() * 2 + t.numel() * 4 + a.numel() * 4,
                    lambda tl, dx=dx, t=t, a=a, keys=keys, g=g: lora_dx_add_(dx.clone(), t, a, p, keys, tiles=tl,
                                                                              members=g),
                    lambda tl, s=scratch, t=t, a=a, keys=keys, g=g: lora_dx_add_(s, t, a, p, keys, tiles=tl,
                                                                                  members=g)))
    if p == 0:  # dB has no dropout
        for o in (1024, 14336):  # dB = G^T U: the output gradient of k/v, gate/up
            g_ = torch.randn(N, o, device="cuda").to(BF16)
            u = torch.randn(N, R, device="cuda")
            db = lambda tl, g_=g_, u=u: tn_reduce(u, g_, alpha=2.0, tiles=tl)  # noqa: E731
            out.append(("reduce", f"dB {R}x{o}", g_.numel() * 2 + u.numel() * 4 + R * o * 4, db, db))
        for o in B_GRADS_WIDTHS:  # T and dB from one read of G
            out.append(("b_grads", f"T+dB G {N}x{o}", *b_grads_case(o)))
    return out


B_GRADS_WIDTHS = (1024, 4096, 14336)  # output gradients of k/v, q/o/down, gate/up


def b_grads_inputs(o: int) -> tuple[Tensor, Tensor, Tensor]:
    """G (N, o) bf16, B^T (R, o) and U (N, R) fp32, as the backward hands them to lora_b_grads."""
    return (torch.randn(N, o, device="cuda").to(BF16), torch.randn(R, o, device="cuda") / 4,
            torch.randn(N, R, device="cuda"))


def b_grads_case(o: int) -> tuple[int, Run, Run]:
    """Bytes moved and the run of ``lora_b_grads`` over G (N, o) (the check returns T and dB^T side by side)."""
    g_, b_t, u = b_grads_inputs(o)
    run = lambda tl, g_=g_, b_t=b_t, u=u: torch.cat(  # noqa: E731
        [v.flatten() for v in lora_b_grads(g_, b_t, u, alpha=2.0, tiles=tl)])
    return g_.numel() * 2 + 2 * u.numel() * 4 + 2 * b_t.numel() * 4, run, run


def separate_b_grads(graphs: bool) -> list[str]:
    """Rows of the second table: lora_down + tn_reduce at their defaults against lora_b_grads' default."""
    rows = []
    for o in B_GRADS_WIDTHS:
        g_, b_t, u = b_grads_inputs(o)
        two = bench(lambda g_=g_, b_t=b_t, u=u: (lora_down(g_, b_t, alpha=2.0), tn_reduce(u, g_, alpha=2.0)), graphs)
        one = bench(lambda g_=g_, b_t=b_t, u=u: lora_b_grads(g_, b_t, u, alpha=2.0), graphs)
        rows.append(f"| G {N}x{o} | {two * 1e3:.1f} | {one * 1e3:.1f} | {two / one:.2f}x |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--dropout", default="0.05", help="comma-separated dropout rates")
    ap.add_argument("--defaults-only", action="store_true", help="time TILES alone, no candidates")
    ap.add_argument("--quick", action="store_true", help="eight candidates a kernel (QUICK), not the full sweep")
    ap.add_argument("--graphs", action="store_true", help="time replays of a CUDA graph (no launch overhead)")
    ap.add_argument("--kinds", default="down,reduce,dx,b_grads", help="comma-separated kernels to time")
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = copy_bandwidth()
    rows, results = [], []
    for kind, label, nbytes, check, timed_run, p in [
            (*prob, float(rate)) for rate in args.dropout.split(",") for prob in problems(float(rate))
            if prob[0] in args.kinds.split(",")]:
        ref = check(TILES[kind]).clone()
        timed = []
        pool = [] if args.defaults_only else QUICK[kind] if args.quick else candidates(kind)
        for tiles in [TILES[kind]] + pool:
            try:
                err = rel(check(tiles), ref)
                ms = bench(lambda tiles=tiles, run=timed_run: run(tiles), args.graphs)
            except Exception as exc:
                timed.append({"tiles": tiles.__dict__, "error": repr(exc)[:120]})
                continue
            timed.append({"tiles": tiles.__dict__, "ms": ms, "rel_err": err})
        ok = [t for t in timed if "ms" in t and t["rel_err"] < 1e-5]
        best = min(ok, key=lambda t: t["ms"])
        default = timed[0]
        results.append({"kernel": kind, "shape": label, "dropout": p, "bytes": nbytes, "default": default,
                        "best": best, "all": timed})
        rows.append(f"| {kind} | {label} | {p:g} | {default['ms'] * 1e3:.1f} | {nbytes / default['ms'] / 1e6:.0f} | "
                    f"{best['ms'] * 1e3:.1f} | {nbytes / best['ms'] / 1e6:.0f} | {best['tiles']} |")
    print(f"device-to-device copy: {peak:.0f} GB/s")
    print("| kernel | shape | dropout | default us | default GB/s | best us | best GB/s | best tiles |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if 0.0 in [float(r) for r in args.dropout.split(",")] and "b_grads" in args.kinds.split(","):
        print("\n| output gradient | lora_down + tn_reduce us | lora_b_grads us | speed-up |\n|---|---|---|---|")
        print("\n".join(separate_b_grads(args.graphs)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_gbps": peak, "device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
