"""Which order of the base GEMM and the LoRA delta is faster, at config C's shapes (4,096 tokens, r16).

    PYTHONPATH=. python benchmarks/lora_epilogue.py [--out epilogue.json]

The LoRA output ``y = x W^T + s U B^T`` can be computed with the big GEMM first and the low-rank part added in
a pass of its own over ``y`` (read and written again: "base first"), or with the low-rank part written first and
the big GEMM adding into it (cuBLAS's ``beta = 1``: ``y`` read in the GEMM's epilogue, "delta first":
:func:`splice.kernels.lora_linear.delta_then_base`, the GPU path's order since 2026-12-06). Timed from CUDA
graphs per Llama-3-8B projection shape, with the bare GEMM beside them (the floor of either order). Prints a
table and writes JSON; nothing here is a test. (The same comparison for the input gradient, ``dx = G W + D(T A)``
with the LoRA kernel writing first, was timed once, in ``benchmarks/results/h100-2026-12-06-s13/epi13``, with a
write-only mode of ``lora_dx_add_`` removed after it showed no gain.)
"""

from __future__ import annotations

import argparse
import json

import torch

from splice.kernels.lora_linear import delta_then_base

N, R = 4096, 16
SHAPES = {"q / o": (4096, 4096), "k / v": (4096, 1024), "gate / up": (4096, 14336), "down": (14336, 4096)}


def bench(fn) -> float:  # type: ignore[no-untyped-def]
    import triton

    return float(triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")) * 1000  # us


def rows() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    dev, bf = "cuda", torch.bfloat16
    for name, (k, n_out) in SHAPES.items():
        x = torch.randn(N, k, device=dev, dtype=bf)
        w = torch.randn(n_out, k, device=dev, dtype=bf) / k**0.5
        u = torch.randn(N, R, device=dev)
        b = torch.randn(n_out, R, device=dev) / R

        def base_first() -> None:
            y = x @ w.T
            y.addmm_(u.to(bf), b.to(bf).T, alpha=2.0)

        y_old = x @ w.T
        y_old.addmm_(u.to(bf), b.to(bf).T, alpha=2.0)
        y_new = delta_then_base(x, w, None, u, b, 2.0)
        err = float((y_new.float() - y_old.float()).norm() / y_old.float().norm())
        row = {"shape": name, "k": k, "out": n_out, "y_gemm_us": bench(lambda: x @ w.T),
               "y_base_first_us": bench(base_first),
               "y_delta_first_us": bench(lambda: delta_then_base(x, w, None, u, b, 2.0)), "y_rel_diff": err}
        out.append(row)
        print(f"| {name} | {k}x{n_out} | {row['y_gemm_us']:.1f} | {row['y_base_first_us']:.1f} | "
              f"{row['y_delta_first_us']:.1f} | {err:.1e} |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, {N} tokens, r{R}, us from CUDA graphs")
    print("| projection | in x out | GEMM alone | base first | delta first | rel diff |")
    print("|---|---|---|---|---|---|")
    result = rows()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": N, "rank": R, "rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
