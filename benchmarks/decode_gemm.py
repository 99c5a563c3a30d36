"""The decode step's GEMMs alone: each Llama-3-8B projection at decode batch sizes, against the weight-read floor.

A decode step reads every weight once, so each projection's time is bounded below by its weight bytes over the
card's copy bandwidth (measured here, device-to-device). This times ``F.linear(x, W)`` (what the engine runs) and
the swapped product ``(W x^T)^T`` (cuBLAS then sees M as its wide dimension and picks other tiles; the transpose
back is a copy of the small (M, N) output, included) for M = 1 .. 128 rows, over enough copies of each weight that
L2 holds none between calls, with the cuBLAS kernel each one ran.

    python benchmarks/decode_gemm.py --json decode_gemm.json   # H100/H200, ~30 s
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "head": (4096, 128256)}  # (K, N) of the 8B's projections (q/k/v and gate/up packed, as the engine runs them)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes a second of a 1 GiB device-to-device copy (read + write counted)."""
    a = torch.empty(1 << 29, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * 20 / (time.perf_counter() - start)


def timed(fn: Callable[[int], Any], copies: int, iters: int) -> float:
    """Mean seconds of ``fn(i)`` (i cycles over the weight copies), CUDA events over ``iters`` calls."""
    for i in range(copies):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % copies)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def kernel_names(fn: Callable[[], Any]) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " + ".join(e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure(name: str, k: int, n: int, ms: list[int], bandwidth: float) -> list[dict[str, Any]]:
    """One projection's rows of the table (printed as they come)."""
    nbytes = k * n * 2
    copies = max(2, -(-(200 << 20) // nbytes))  # > 200 MiB of weights in rotation: none stays in L2
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def linear(i: int, x: torch.Tensor = x) -> torch.Tensor:
            return F.linear(x, weights[i])

        def swapped(i: int, x: torch.Tensor = x) -> torch.Tensor:
            return torch.mm(weights[i], x.t()).t().contiguous()

        floor = nbytes / bandwidth
        t_linear, t_swapped = timed(linear, copies, 50), timed(swapped, copies, 50)
        names = kernel_names(lambda: linear(0)), kernel_names(lambda: swapped(0))
        rows.append({"projection": name, "k": k, "n": n, "m": m, "floor_us": floor * 1e6, "linear_us": t_linear * 1e6,
                     "swapped_us": t_swapped * 1e6, "linear_kernel": names[0], "swapped_kernel": names[1]})
        print(f"| {name} | {m} | {floor * 1e6:.1f} | {t_linear * 1e6:.1f} | {floor / t_linear:.0%} | "
              f"{t_swapped * 1e6:.1f} | {floor / t_swapped:.0%} | {names[0][:40]} | {names[1][:40]} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32,64,128")
    parser.add_argument("--json", type=Path, default=Path("decode_gemm.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s\n")
    print("| projection | M | floor us | linear us | of floor | swapped us | of floor | linear kernel | swapped kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row for name, (k, n) in SHAPES.items()
            for row in measure(name, k, n, [int(r) for r in args.rows.split(",")], bandwidth)]
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth,
                                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                                    indent=1))


if __name__ == "__main__":
    main()
