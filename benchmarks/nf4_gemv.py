"""The fused NF4 GEMV / small-M GEMM (splice.kernels.nf4_gemv) against dequantize + cuBLAS and bf16 cuBLAS.

Run on a GPU: ``python benchmarks/nf4_gemv.py [--out FILE.json] [--no-sweep]`` (under a minute on an
H200). Llama-3-8B projection shapes (N x K: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down
4096x14336) at M = 1, 8, 32 activation rows (bf16, double-quantized NF4 as ``quantize_nf4`` makes it):

* ``fused``: :func:`nf4_linear` with its default tiles (what NF4Tensor's matmuls run for M <= 16);
* ``dequant+mm``: ``F.linear(x, W.dequantize())``, the path above the threshold;
* ``bf16``: ``F.linear`` over the bf16 weight (the ceiling a 4-bit weight should beat ~3.5x at M = 1).

Timing as a decode step sees it: each variant runs over enough copies of the weight to overflow L2
(as consecutive layers do), the calls captured in one CUDA graph (no launch gaps), time per call =
replay time / copies. Bandwidth = the weight's stored bytes (NF4: packed codes + 8-bit absmax +
fp32 second-level scales; bf16: 2 bytes a weight) / time, with the device's measured copy bandwidth
as the roofline. ``--sweep`` (default on) also times a few other tile configs, to tune
``default_config``. Prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.nf4_gemv import GemvConfig, default_config, nf4_linear
from splice.quant.nf4 import NF4Tensor, to_nf4

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
ROWS = (1, 8, 32)
GIB = 1 << 30


def graph_time(calls: list[Callable[[], Any]], *, replays: int = 10) -> float:
    """Seconds per call: ``calls`` run once eagerly (compiles), then captured in one CUDA graph and
    replayed ``replays`` times between two events."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) / 1e3 / replays / len(calls)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the memory roofline."""
    a = torch.empty(GIB // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = graph_time([lambda: b.copy_(a)] * 4)
    return 2 * a.numel() / seconds


def copies_for(nbytes: int) -> int:
    """Weight copies whose bytes are 4x the L2 (so every call reads its weight from HBM), within 2 GiB."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(2, min(math.ceil(4 * l2 / nbytes), 2 * GIB // nbytes))


def fused_call(x: Tensor, w: NF4Tensor, config: GemvConfig | None) -> Callable[[], Tensor]:
    def call() -> Tensor:
        return nf4_linear(x, w.packed, w.code, shape=w.weight_shape, block_size=w.block_size, absmax=w.absmax,
                          qabsmax=w.qabsmax, scale2=w.scale2, offset=w.offset, code2=w.code2, config=config)
    return call


def sweep_configs(m: int, n: int, k: int) -> list[GemvConfig]:
    """Tile configs around the default for ``(m, n, k)``."""
    if m == 1:
        configs = [GemvConfig(kernel="gemv", block_n=bn, block_k=min(k, 8192 // bn)) for bn in (2, 4, 8, 16, 32)]
        configs += [GemvConfig(kernel="gemv", block_n=bn, block_k=min(k, 8192 // bn), num_warps=8) for bn in (4, 16)]
        configs += [GemvConfig(kernel="gemv", block_n=4, block_k=min(k, 4096), num_warps=8)]  # 8 KiB steps
        return configs + [GemvConfig(kernel="dot", block_n=16, block_k=256)]
    configs = [GemvConfig(kernel="dot", block_n=bn, block_k=bk) for bn in (16, 32, 64) for bk in (128, 256)]
    return configs + [GemvConfig(kernel="dot", block_n=32, block_k=256, num_warps=8)]


def bench_shape(name: str, n: int, k: int, *, sweep: bool, deadline: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    nf4 = to_nf4(dense, dtype=torch.bfloat16)
    nf4_bytes, bf16_bytes = nf4.nbytes_stored(), dense.numel() * 2
    nf4s = [nf4] + [nf4.rebuild(fn=torch.clone) for _ in range(copies_for(nf4_bytes) - 1)]
    denses = [dense] + [dense.clone() for _ in range(copies_for(bf16_bytes) - 1)]
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        default = default_config(m, n, k, block_size=64, sms=torch.cuda.get_device_properties(0).multi_processor_count)
        times = {
            "fused": graph_time([fused_call(x, w, None) for w in nf4s]),
            "dequant+mm": graph_time([lambda w=w: F.linear(x, w.dequantize(torch.bfloat16)) for w in nf4s[:4]]),
            "bf16": graph_time([lambda w=w: F.linear(x, w) for w in denses]),
        }
        tuned: list[dict[str, Any]] = []
        if sweep and m <= 8:
            for config in sweep_configs(m, n, k):
                if time.monotonic() > deadline:  # each new tile config compiles (~1 s)
                    break
                seconds = graph_time([fused_call(x, w, config) for w in nf4s])
                tuned.append({**config.__dict__, "us": round(seconds * 1e6, 2)})
            tuned.sort(key=lambda row: row["us"])
        rows.append({
            "shape": f"{name} {n}x{k}", "m": m, "default_config": default.__dict__,
            "us": {key: round(s * 1e6, 2) for key, s in times.items()},
            "GB/s": {"fused": nf4_bytes / times["fused"] / 1e9, "dequant+mm": nf4_bytes / times["dequant+mm"] / 1e9,
                     "bf16": bf16_bytes / times["bf16"] / 1e9},
            "fused_vs_bf16": times["bf16"] / times["fused"],
            "best_configs": tuned[:3],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only the default tiles")
    parser.add_argument("--budget", type=float, default=45.0, help="seconds after which the sweep stops")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_gemv.py: needs a CUDA GPU")
    began = time.monotonic()
    roofline = copy_bandwidth()
    rows = [row for name, (n, k) in SHAPES.items()
            for row in bench_shape(name, n, k, sweep=args.sweep, deadline=began + args.budget)]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {roofline / 1e9:.0f} GB/s (the roofline)")
    print(f"{'shape':<22}{'M':>4} {'fused us':>9} {'deq+mm us':>10} {'bf16 us':>8} {'fused GB/s':>11} "
          f"{'% roof':>7} {'bf16 GB/s':>10} {'fused/bf16':>11}  best sweep config")
    for row in rows:
        us, gbs = row["us"], row["GB/s"]
        best = row["best_configs"][0] if row["best_configs"] else None
        best_text = "" if best is None else (f"{best['kernel']} n{best['block_n']} k{best['block_k']} "
                                             f"w{best['num_warps']}: {best['us']} us")
        print(f"{row['shape']:<22}{row['m']:>4} {us['fused']:>9.2f} {us['dequant+mm']:>10.2f} {us['bf16']:>8.2f} "
              f"{gbs['fused']:>11.0f} {100 * gbs['fused'] * 1e9 / roofline:>6.0f}% {gbs['bf16']:>10.0f} "
              f"{row['fused_vs_bf16']:>10.2f}x  {best_text}")
    result = {"device": torch.cuda.get_device_name(), "copy_GB/s": roofline / 1e9, "rows": rows,
              "seconds": time.monotonic() - began}
    text = json.dumps(result, indent=1, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
