"""The decode step's GEMMs alone: each Llama-3-8B projection at decode batch sizes, against the weight-read floor.

A decode step reads every weight once, so each projection's time is bounded below by its weight bytes over the
card's copy bandwidth (measured here, device-to-device). This times ``F.linear(x, W)`` (what the engine runs) and
the swapped product ``(W x^T)^T`` (cuBLAS then sees M as its wide dimension and picks other tiles; the transpose
back is a copy of the small (M, N) output, included) for M = 1 .. 128 rows, over enough copies of each weight that
L2 holds none between calls, with the cuBLAS kernel each one ran.

    python benchmarks/decode_gemm.py --json decode_gemm.json   # H100/H200, ~30 s

``--gemv`` instead times :mod:`splice.kernels.gemv` (one launch, the residual add in its epilogue) over a few
tile configs at M <= 64 against cuBLAS's ``residual.addmm_(x, W^T)`` (the engine's o / down form) and
``F.linear``, every call inside a CUDA graph (a Triton launch from Python costs more than these kernels take),
each result checked against the fp32 reference.
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

from splice.kernels.gemv import MAX_ROWS, GemvConfig, gemv, gemv_reference

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


GEMV_CONFIGS = [GemvConfig(block_n=n, block_k=k, num_warps=w, num_stages=st) for n, k, w, st in (
    (16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 2, 6), (16, 256, 2, 4), (16, 512, 8, 3), (16, 1024, 8, 2),
    (32, 256, 4, 4), (32, 128, 4, 6), (32, 512, 8, 3), (32, 256, 2, 4), (64, 128, 4, 4), (64, 256, 8, 3))] + [
    GemvConfig(block_n=n, block_k=k, num_warps=w, num_stages=st, split_k=sk) for n, k, w, st, sk in (
        (32, 128, 4, 4, 2), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (64, 256, 8, 3, 4), (128, 64, 4, 4, 4))]


def graph_timed(fn: Callable[[int], Any], copies: int, iters: int = 40) -> float:
    """Mean seconds of ``fn(i)`` replayed from one CUDA graph of ``iters`` calls cycling over the copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(copies, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * iters)


def measure_gemv(name: str, k: int, n: int, ms: list[int], bandwidth: float) -> list[dict[str, Any]]:
    """One projection's gemv rows: cuBLAS addmm_ / linear and every config, in CUDA graphs (printed as they come)."""
    nbytes = k * n * 2
    copies = max(2, -(-(200 << 20) // nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        residual = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        want = gemv_reference(x, weights[0], add_to=residual)
        floor = nbytes / bandwidth
        stream = residual.clone()  # the engine's form: the residual stream updated in place, call after call
        found = {"cublas addmm_": graph_timed(lambda i: stream.addmm_(x, weights[i].t()), copies),
                 "cublas linear": graph_timed(lambda i: F.linear(x, weights[i]), copies)}
        errors = {}
        for cfg in GEMV_CONFIGS:
            label = (f"gemv n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
                     + (f" split{cfg.split_k}" if cfg.split_k > 1 else ""))
            try:
                got = gemv(x, weights[0], add_to=residual, config=cfg)
                errors[label] = float((got.float() - want.float()).abs().max())
                found[label] = graph_timed(lambda i, cfg=cfg: gemv(x, weights[i], add_to=residual, config=cfg), copies)
            except Exception as error:  # a tile past the card's shared memory: noted, the sweep goes on
                print(f"{name} M={m} {label}: {str(error).splitlines()[0][:160]}")
        best = min((lbl for lbl in found if lbl.startswith("gemv")), key=found.__getitem__, default=None)
        rows.append({"projection": name, "k": k, "n": n, "m": m, "floor_us": floor * 1e6, "best": best,
                     "us": {lbl: t * 1e6 for lbl, t in found.items()}, "max_abs_err": errors})
        if best is not None:
            print(f"| {name} | {m} | {floor * 1e6:.1f} | {found['cublas addmm_'] * 1e6:.1f} | "
                  f"{found['cublas linear'] * 1e6:.1f} | {found[best] * 1e6:.1f} | {floor / found[best]:.0%} | "
                  f"{best} | {errors[best]:.3g} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,32,64,128")
    parser.add_argument("--json", type=Path, default=Path("decode_gemm.json"))
    parser.add_argument("--gemv", action="store_true", help="time splice.kernels.gemv's configs (M <= 64)")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s\n")
    if args.gemv:
        print("| projection | M | floor us | cuBLAS addmm_ us | cuBLAS linear us | gemv us | of floor | gemv config | "
              "max abs err |")
        print("|---|---|---|---|---|---|---|---|---|")
        ms = [int(r) for r in args.rows.split(",") if int(r) <= MAX_ROWS]
        rows = [row for name, (k, n) in SHAPES.items() for row in measure_gemv(name, k, n, ms, bandwidth)]
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth,
                                         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                                        indent=1))
        return
    print("| projection | M | floor us | linear us | of floor | swapped us | of floor | linear kernel | swapped kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row for name, (k, n) in SHAPES.items()
            for row in measure(name, k, n, [int(r) for r in args.rows.split(",")], bandwidth)]
    args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth,
                                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                                    indent=1))


if __name__ == "__main__":
    main()
