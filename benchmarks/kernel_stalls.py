"""A few kernels run alone, for a profiler (Nsight Compute) to say where their time goes.

    PYTHONPATH=. python benchmarks/kernel_stalls.py --kernel nf4-gate-up [--calls 4]
    ncu --kernel-name regex:_nf4_gemv2 --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        python benchmarks/kernel_stalls.py --kernel nf4-gate-up

Why: sessions 17-19 changed kernels on guesses about their limit and measured the guesses wrong (pipelined NF4
loads 2-4x slower, row tiles with an L2 prefetch slower, a column loop in the multi-LoRA expands slower). These are
the kernels whose time is furthest from their bytes, each at a Llama-3-8B shape:

* ``nf4-gate-up`` / ``nf4-down``: :func:`splice.kernels.nf4_gemv.nf4_linear` at one row of x over a double-quantized
  NF4 weight (14,336 x 4,096 / 4,096 x 14,336), the default (gemv2) tiles;
* ``expand-swiglu-decode`` / ``expand-swiglu-mixed``: :func:`splice.kernels.lora_swiglu.multi_lora_expand_swiglu`
  for 256 tokens of 64 adapters and for 2,048 tokens in 8 runs of one adapter (rank 16, I = 14,336);
* ``lora-down-qkv`` / ``lora-down-down`` / ``tn-reduce-qkv`` / ``lora-dx-qkv``: the training LoRA kernels of
  :mod:`splice.kernels.lora_kernels` as config C calls them (4,096 tokens, rank 16, dropout 0.05): the q/k/v
  group's down-projection (3 members over one x, 4,096 wide), down's (14,336 wide), the group's ``dA`` reduction
  and its input-gradient pass (26.6 ms of C's 252 ms step on an H200, session 18).

Each runs ``--calls`` times eagerly (one launch each, the first compiles) and prints its mean time from CUDA events
over the calls after the first, with its bytes over that time: a baseline for the profiler's figures. ``all`` runs
every kernel. ``--tiny``: toy sizes on the CPU, a smoke run of the script under ``TRITON_INTERPRET=1`` (the Triton
kernels run in the interpreter; no times are printed there).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

KERNELS = ("nf4-gate-up", "nf4-down", "expand-swiglu-decode", "expand-swiglu-mixed", "lora-down-qkv", "lora-down-down",
           "tn-reduce-qkv", "lora-dx-qkv")


def nf4_case(n: int, k: int, *, device: str) -> tuple[Callable[[], object], int]:
    """One row of x against an (n, k) NF4 weight, and the weight's stored bytes."""
    # benchmarks/nf4_gemv.py's call of the fused kernel (default tiles)
    from nf4_gemv import fused_call

    from splice.quant.nf4 import to_nf4

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = to_nf4(torch.randn(n, k, device=device, dtype=dtype) / k**0.5, double_quant=True)
    parts = (w.packed, w.absmax, w.qabsmax, w.scale2, w.offset, w.code2)
    nbytes = sum(t.numel() * t.element_size() for t in parts if t is not None)
    return fused_call(torch.randn(1, k, device=device, dtype=dtype), w, None), nbytes


def expand_case(tokens: int, adapters: int, kind: str, *, k: int, width: int,
                device: str) -> tuple[Callable[[], object], int]:
    """The fused gate/up expand + SwiGLU of ``tokens`` tokens over ``adapters`` adapters (``kind``: "decode", each
    token's adapter drawn at random; "runs", 8 runs of one adapter: ``slots_for``), and the bytes of y, h and the
    adapters' B it moves."""
    # benchmarks/multi_lora.py's draw of the tokens' adapters, as lora_swiglu.py uses it
    from multi_lora import slots_for

    from splice.kernels.lora_swiglu import multi_lora_expand_swiglu
    from splice.kernels.multi_lora import multi_lora_shrink, plan_tiles, tiles_for

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rank = 16
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    y = torch.randn(tokens, 2 * width, device=device, dtype=dtype)
    a = torch.randn(adapters, 2, rank, k, device=device, dtype=dtype) / k**0.5
    b = torch.randn(adapters, 2 * width, rank, device=device, dtype=dtype) / rank**0.5
    slots = slots_for(tokens, adapters, kind, device)
    tiles = tiles_for(tokens, 0)
    shrunk = multi_lora_shrink(x, a, slots, tiles=tiles, plan=plan_tiles(slots, capacity=adapters, tiles=tiles))
    nbytes = (tokens * 3 * width + adapters * 2 * width * rank) * y.element_size()
    return (lambda: multi_lora_expand_swiglu(shrunk, b, y, slots)), nbytes


def lora_case(name: str, tokens: int, k: int, members: int, *, device: str) -> tuple[Callable[[], object], int]:
    """One training LoRA kernel over x (tokens, k) bf16 and ``members`` rank-16 adapters with dropout 0.05, and the
    bytes it must move (x read, or dx read and written; the fp32 rank-wide operands)."""
    from splice.kernels.lora_kernels import lora_down, lora_dx_add_, tn_reduce

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rank, p = 16 * members, 0.05
    x = torch.randn(tokens, k, device=device, dtype=dtype)
    a = torch.randn(rank, k, device=device) / k**0.5
    t = torch.randn(tokens, rank, device=device)
    keys = torch.arange(2 * members, device=device, dtype=torch.int32) + 7  # a key pair a member
    keys = keys.view(members, 2) if members > 1 else keys
    small = (rank * k + tokens * rank) * 4
    if name.startswith("lora-down"):
        return (lambda: lora_down(x, a, p, keys, members=members)), x.numel() * x.element_size() + small
    if name.startswith("tn-reduce"):
        return (lambda: tn_reduce(t, x, p, keys, members=members)), x.numel() * x.element_size() + small
    return (lambda: lora_dx_add_(x, t, a, p, keys, members=members)), 2 * x.numel() * x.element_size() + small


def case(name: str, *, tiny: bool, device: str) -> tuple[Callable[[], object], int]:
    d = 64 if tiny else 1  # toy sizes: every dimension / 64 (the kernels' shapes stay legal)
    if name == "nf4-gate-up":
        return nf4_case(14336 // d, 4096 // d, device=device)
    if name == "nf4-down":
        return nf4_case(4096 // d, 256 if tiny else 14336, device=device)  # (K a whole number of 64-value blocks)
    if name.startswith(("lora-", "tn-")):
        return lora_case(name, 4096 // (8 if tiny else 1), (14336 if name.endswith("-down") else 4096) // d,
                         1 if name.endswith("-down") else 3, device=device)
    if name == "expand-swiglu-decode":
        return expand_case(32 if tiny else 256, 4 if tiny else 64, "decode", k=4096 // d, width=14336 // d,
                           device=device)
    return expand_case(256 if tiny else 2048, 8, "runs", k=4096 // d, width=14336 // d, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="all", help=f"one of {', '.join(KERNELS)}, or all")
    parser.add_argument("--calls", type=int, default=4, help="launches of each kernel (the first compiles)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    args = parser.parse_args()
    names = KERNELS if args.kernel == "all" else (args.kernel,)
    if any(name not in KERNELS for name in names):
        parser.error(f"--kernel {args.kernel!r}: choose from {', '.join(KERNELS)} or all")
    if args.calls < 2:
        parser.error(f"--calls {args.calls}: at least 2 (the first compiles)")
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        parser.error("no GPU here: run it on one, or with --tiny for a smoke run")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--tiny on the CPU runs the Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: {', '.join(names)}, {args.calls} calls each")
    for name in names:
        call, nbytes = case(name, tiny=args.tiny, device=device)
        call()  # compiles
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.calls - 1):
                call()
            end.record()
            torch.cuda.synchronize()
            us = start.elapsed_time(end) * 1e3 / (args.calls - 1)
            print(f"{name}: {us:.1f} us a call (eager, launch gaps included), {nbytes / 1e6:.1f} MB, "
                  f"{nbytes / us / 1e6:.2f} TB/s", flush=True)
        else:
            t0 = time.perf_counter()
            for _ in range(args.calls - 1):
                call()
            print(f"{name}: ran {args.calls} calls on the CPU in {time.perf_counter() - t0:.1f} s (no timing meant)")


if __name__ == "__main__":
    main()
