"""The gate/up multi-LoRA expand fused with SwiGLU (splice.kernels.lora_swiglu) against the unfused pair.

    PYTHONPATH=. python benchmarks/lora_swiglu.py [--json FILE] [--tiny]

Llama-3-8B's MLP (K 4,096, I 14,336, bf16), rank 16: from the packed gate/up GEMM output ``y`` (T, 2I) and the
group's shrink (made once, outside the timings) to the hidden activation ``h`` (T, I), unfused (``multi_lora_expand``
into ``y``, then ``swiglu_packed``: what the engine ran before) and fused (``multi_lora_expand_swiglu``: ``y`` read
once, never written). Scenarios: a decode batch of 256 tokens over 64 adapters, and steps with prompts of 2,048 and
8,192 tokens in 8 runs of one adapter each (the offline run's mixed steps). The gate/up GEMM is timed beside them
for scale. Each time is a median of CUDA-graph replays (``benchmarks/multi_lora.py``'s Clock); bytes are the
element moves each way needs (unfused: y read twice, written once, h written; fused: y read once, h written), over
the time, against the card's copy bandwidth measured in the same run; "fused" runs the kernel's default blocks
(128 columns up to 512 tokens, else 64), "n64" / "n128" each block width alike. ``--tiny``: a smoke run at toy sizes on the
CPU (under ``TRITON_INTERPRET=1``: the kernels run in Triton's interpreter; its times mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import torch
from multi_lora import Clock, slots_for  # (benchmarks/multi_lora.py, beside this script)

from splice.kernels.lora_swiglu import multi_lora_expand_swiglu
from splice.kernels.multi_lora import multi_lora_expand, multi_lora_shrink, plan_tiles, tiles_for
from splice.kernels.swiglu import swiglu_packed

SCENARIOS = [("decode-256x64", 256, 64, "decode"), ("mixed-512x8", 512, 8, "runs"), ("mixed-2048x8", 2048, 8, "runs"),
             ("mixed-8192x8", 8192, 8, "runs")]
K, WIDTH, RANK = 4096, 14336, 16


def scenario_row(clock: Clock, name: str, tokens: int, adapters: int, kind: str, *, k: int, width: int,
                 device: str, bandwidth: float) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(tokens)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(tokens, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(2 * width, k, device=device, dtype=dtype, generator=g) / k**0.5
    a = torch.randn(adapters, 2, RANK, k, device=device, dtype=dtype, generator=g) / k**0.5
    b = torch.randn(adapters, 2 * width, RANK, device=device, dtype=dtype, generator=g) / RANK**0.5
    slots = slots_for(tokens, adapters, kind, device)
    tiles = tiles_for(tokens, 0)
    shrunk = multi_lora_shrink(x, a, slots, tiles=tiles, plan=plan_tiles(slots, capacity=adapters, tiles=tiles))
    y = x @ w.t()
    scratch = y.clone()
    fused = multi_lora_expand_swiglu(shrunk, b, y, slots)
    multi_lora_expand(shrunk, b, scratch, widths=(width, width))
    err = float((fused.float() - swiglu_packed(scratch).float()).abs().max())

    def unfused() -> None:
        multi_lora_expand(shrunk, b, scratch, widths=(width, width))  # (deltas pile up: the time is the same)
        swiglu_packed(scratch)

    size = y.element_size()
    moved = {"unfused": tokens * (2 * width * 3 + width) * size, "fused": tokens * (2 * width + width) * size}
    row: dict[str, Any] = {"scenario": name, "tokens": tokens, "adapters": adapters, "max_abs_diff": err,
                           "gemm_us": clock.us([lambda: torch.mm(x, w.t(), out=y)])}
    moved["fused_n64"] = moved["fused_n128"] = moved["fused"]
    for way, calls in (("unfused", [unfused]), ("fused", [lambda: multi_lora_expand_swiglu(shrunk, b, y, slots)]),
                       ("fused_n64", [lambda: multi_lora_expand_swiglu(shrunk, b, y, slots, block_n=64)]),
                       ("fused_n128", [lambda: multi_lora_expand_swiglu(shrunk, b, y, slots, block_n=128)])):
        us = clock.us(calls)
        row[f"{way}_us"], row[f"{way}_of_bandwidth"] = us, moved[way] / (us * 1e-6) / bandwidth
    row["speedup"] = row["unfused_us"] / row["fused_us"]
    row["saved_ms_per_32_layers"] = 32 * (row["unfused_us"] - row["fused_us"]) / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at toy sizes")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    k, width = (K, WIDTH) if device == "cuda" else (K // 64, WIDTH // 64)
    clock = Clock(device=device, deadline=time.monotonic() + 600)
    src = torch.empty(1 << (29 if device == "cuda" else 20), device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / (clock.us([lambda: dst.copy_(src)]) * 1e-6)  # read + write
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9, "rows": []}
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    print(f"{'scenario':>14} {'gemm us':>8} {'unfused us':>10} {'fused us':>9} {'speedup':>7} {'unfused bw':>10} "
          f"{'fused bw':>8} {'ms/32 layers':>12} {'max diff':>8} {'n64 us':>7} {'n128 us':>8}")
    for name, tokens, adapters, kind in SCENARIOS:
        if device == "cpu":
            tokens //= 8
        row = scenario_row(clock, name, tokens, adapters, kind, k=k, width=width, device=device, bandwidth=bandwidth)
        result["rows"].append(row)
        print(f"{name:>14} {row['gemm_us']:8.1f} {row['unfused_us']:10.1f} {row['fused_us']:9.1f} "
              f"{row['speedup']:6.2f}x {row['unfused_of_bandwidth']:10.0%} {row['fused_of_bandwidth']:8.0%} "
              f"{row['saved_ms_per_32_layers']:12.2f} {row['max_abs_diff']:8.4f} {row['fused_n64_us']:7.1f} "
              f"{row['fused_n128_us']:8.1f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
