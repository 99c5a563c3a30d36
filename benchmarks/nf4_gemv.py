"""The fused NF4 GEMV / small-M GEMM (splice.kernels.nf4_gemv) against bf16 cuBLAS and dequantize + cuBLAS.

Run on a GPU: ``python benchmarks/nf4_gemv.py [--json FILE.json] [--no-sweep] [--jobs 16]`` (about a
minute on an H200, most of it compiling the sweep's kernels, which ``--jobs`` processes do in
parallel first; ``--precompile-only`` stops there, to overlap it with something else). Llama-3-8B
projection shapes (N x K: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336) at
M = 1, 8, 32, 64 activation rows (bf16, double-quantized NF4 as ``quantize_nf4`` makes it):

* ``bf16``: ``F.linear`` over the bf16 weight (cuBLAS; what a 4-bit weight should beat ~3.5x at M = 1);
* ``dequant+mm``: ``F.linear(x, W.dequantize())``, what NF4Tensor runs above ``FUSED_MAX_ROWS``;
* ``default``: :func:`nf4_linear` with :func:`default_config` (what NF4Tensor runs up to it);
* the sweep: other tile configs (kernel, rows, columns, warps, stages, K splits, lookup), each also
  checked against ``F.linear`` over the dequantized weight (a config that is fast and wrong is
  reported as wrong, never as best). The ``gemv2`` kernel (:mod:`splice.kernels.nf4_gemv2`, up to 4 rows
  of x a program) is swept at M <= 4 (:func:`gemv2_candidates`); a second table puts the best ``gemv``
  (M = 1) or ``dot`` config beside the best ``gemv2`` one, per shape and M.

Old vs new at M = 1 and 4 only, within ~2 minutes of an H100 / H200 (compiling included; the dot
kernel's sweep left out, its default tiles still timed at M = 4)::

    timeout 170 python3 benchmarks/nf4_gemv.py --rows 1,4 --kernels gemv,gemv2 --json nf4_gemv2.json --budget 110

(``--shapes q/o,down`` limits the shapes; the default tiles and the bf16 / dequant baselines are always
timed.)

Timing as a decode step sees it: each variant runs over enough copies of the weight to overflow L2
(as consecutive layers do), the calls captured in one CUDA graph (no launch gaps), time per call =
replay time / copies. Effective bandwidth = the weight's stored bytes (NF4: packed codes + 8-bit
absmax + fp32 second-level scales; bf16: 2 bytes a weight) / time. Prints a table and writes the
JSON (device, date, versions, per shape and M: microseconds, TB/s, ratio to bf16, every config).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.kernels.nf4_gemv import GemvConfig, default_config, gemv2_config, k_splits, nf4_linear
from splice.quant.nf4 import NF4Tensor, to_nf4

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          # q/k/v and gate/up as the engine launches them at one token (nf4_linear_group: one launch)
          "qkv": (6144, 4096), "gate+up": (28672, 4096)}
DEFAULT_SHAPES = "q/o,k/v,gate/up,down"
ROWS = (1, 8, 32, 64)
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
    """Bytes/s of a 1 GiB device-to-device copy (read + write), a memory roofline."""
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


def gemv2_candidates(m: int, n: int, k: int) -> list[GemvConfig]:
    """gemv2's tiles for ``(M <= 4, N, K)`` (64-value blocks): :func:`gemv2_config`, then 2 / 4 / 8 weight rows
    a program (16 where K is one step) with one block a lane: 64 blocks a step over 2 warps (one step for
    K = 4,096; 3.5 for 14,336, the last one half masked) or 32 over 1 warp (2 or 7 steps, the next step's
    loads in flight); K split into one-step ranges (more programs, a second kernel to sum them); the plain
    lookup once; where a split has several steps, each with the next step's codes loaded ahead or not."""
    blocks = k // 64
    configs = [gemv2_config(m, n, k, block_size=64)]
    for bn in (2, 4, 8, 16):
        for lanes, warps in ((64, 2), (32, 1)):
            if lanes <= 2 * blocks and (bn < 16 or blocks <= lanes):  # (16 rows of two steps' codes: spills)
                configs.append(GemvConfig(kernel="gemv2", block_n=bn, block_k=64 * lanes, num_warps=warps))
    steps = -(-blocks // 32)
    if steps > 1:
        configs.append(GemvConfig(kernel="gemv2", block_n=4 if n >= 2048 else 2, block_k=2048, num_warps=1,
                                  split_k=steps))
    configs.append(GemvConfig(kernel="gemv2", block_n=8, block_k=4096 if blocks <= 64 else 2048,
                              num_warps=2 if blocks <= 64 else 1, lut="plain"))
    # where a split has several steps, each tile with and without the next step's codes in registers (num_stages
    # 2 / 1: 190 against 95 registers a thread for down's default, H100 ncu, 2026-12-07)
    configs += [replace(c, num_stages=3 - c.num_stages) for c in configs
                if -(-blocks // (c.block_k // 64)) > c.split_k]
    return list(dict.fromkeys(configs))  # in order, without repeats


def candidates(m: int, n: int, k: int, *, sms: int, kernels: frozenset[str] = frozenset({"gemv", "dot", "gemv2"})
               ) -> list[GemvConfig]:
    """The sweep's tile configs for ``(M, N, K)``: the gemv kernel's row / column tiles and lookups
    (M = 1), the dot kernel's row tiles, warps, stages, K splits and lookups (every M), gemv2's
    (:func:`gemv2_candidates`, M <= 4); only those of ``kernels``."""
    return [c for c in _candidates(m, n, k, sms=sms) if c.kernel in kernels]


def _candidates(m: int, n: int, k: int, *, sms: int) -> list[GemvConfig]:
    configs: list[GemvConfig] = gemv2_candidates(m, n, k) if m <= 4 else []
    if m == 1:
        configs += [GemvConfig(kernel="gemv", block_n=bn, block_k=bk, num_warps=w)
                    for bn, bk, w in ((8, 1024, 4), (16, 512, 4), (32, 256, 4), (16, 1024, 8))]
        configs += [GemvConfig(kernel="gemv", block_n=16, block_k=512, lut=lut) for lut in ("ldg", "plain")]
        configs.append(GemvConfig(kernel="gemv", block_n=4, block_k=512,
                                  split_k=k_splits(-(-n // 4), k // 512, sms=sms)))
    m_tiles = -(-m // 64)
    for bn, w, stages in ((128, 4, 1), (64, 4, 1), (128, 8, 1), (128, 4, 2)):
        split = k_splits(-(-n // bn) * m_tiles, k // 64, sms=sms)
        configs += [GemvConfig(kernel="dot", block_n=bn, block_k=64, split_k=s, num_warps=w, num_stages=stages)
                    for s in sorted({1, split})]
    configs.append(GemvConfig(kernel="dot", block_n=128, block_k=64, lut="ldg",
                              split_k=k_splits(-(-n // 128) * m_tiles, k // 64, sms=sms)))
    configs.append(GemvConfig(kernel="dot", block_n=64, block_k=128,  # two blocks a step: absmax per weight
                              split_k=k_splits(-(-n // 64) * m_tiles, k // 128, sms=sms)))
    return configs


def _warm(tasks: list[tuple[int, int, int, dict[str, Any] | None]]) -> list[str]:
    """Pool worker: run each (N, K, M, config) once so its kernels compile into Triton's on-disk
    cache (shared by the processes); the errors, as text."""
    errors, weights = [], {}
    for n, k, m, config in tasks:
        try:
            if (n, k) not in weights:
                weights[(n, k)] = to_nf4(torch.randn(n, k, device="cuda") * 0.02, dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fused_call(x, weights[(n, k)], None if config is None else GemvConfig(**config))()
            torch.cuda.synchronize()
        except Exception as e:
            errors.append(f"{n}x{k} M={m} {config}: {type(e).__name__}: {str(e)[:300]}")
    return errors


def precompile(*, sweep: bool, jobs: int, shapes: dict[str, tuple[int, int]], rows: tuple[int, ...],
               kernels: frozenset[str]) -> list[str]:
    """Compile every kernel the timing run will launch, in ``jobs`` processes (spawned: CUDA)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tasks: list[tuple[int, int, int, dict[str, Any] | None]] = []
    for n, k in shapes.values():
        for m in rows:
            tasks.append((n, k, m, None))
            if sweep:
                tasks += [(n, k, m, asdict(c)) for c in candidates(m, n, k, sms=sms, kernels=kernels)]
    chunks = [tasks[i::jobs] for i in range(jobs)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return [e for errors in pool.map(_warm, chunks) for e in errors]


def _time_config(x: Tensor, nf4s: list[NF4Tensor], config: GemvConfig | None, truth: Tensor) -> dict[str, Any]:
    """One config: its time per call and its error against the dequantized weight's F.linear."""
    try:
        got = fused_call(x, nf4s[0], config)().float()
        err = ((got - truth).norm() / truth.norm()).item()
        seconds = graph_time([fused_call(x, w, config) for w in nf4s])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"us": round(seconds * 1e6, 2), "rel_err": err, "ok": err < 2e-2}


def bench_shape(name: str, n: int, k: int, *, sweep: bool, deadline: float, rows: tuple[int, ...] = ROWS,
                kernels: frozenset[str] = frozenset({"gemv", "dot", "gemv2"})) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    nf4 = to_nf4(dense, dtype=torch.bfloat16)
    nf4_bytes, bf16_bytes = nf4.nbytes_stored(), dense.numel() * 2
    nf4s = [nf4] + [nf4.rebuild(fn=torch.clone) for _ in range(copies_for(nf4_bytes) - 1)]
    denses = [dense] + [dense.clone() for _ in range(copies_for(bf16_bytes) - 1)]
    w32 = nf4.dequantize(torch.float32)
    table = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        truth = F.linear(x.float(), w32)
        base = {
            "bf16": graph_time([lambda w=w: F.linear(x, w) for w in denses]),
            "dequant+mm": graph_time([lambda w=w: F.linear(x, w.dequantize(torch.bfloat16)) for w in nf4s[:4]]),
        }
        default = default_config(m, n, k, block_size=64, sms=sms)
        results = [{"config": asdict(default), "default": True, **_time_config(x, nf4s, None, truth)}]
        for config in candidates(m, n, k, sms=sms, kernels=kernels) if sweep else []:
            if time.monotonic() > deadline:
                break
            results.append({"config": asdict(config), **_time_config(x, nf4s, config, truth)})
        timed = [r for r in results if r.get("ok")]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        by_kernel = {kernel: min((r for r in timed if r["config"]["kernel"] == kernel), key=lambda r: r["us"],
                                 default=None) for kernel in ("gemv", "dot", "gemv2")}
        us = {key: round(s * 1e6, 2) for key, s in base.items()}
        row = {"shape": f"{name} {n}x{k}", "m": m, "us": us, "default": results[0], "best": best,
               "TB/s": {"bf16": bf16_bytes / base["bf16"] / 1e12,
                        "dequant+mm": nf4_bytes / base["dequant+mm"] / 1e12,
                        "default": nf4_bytes / results[0]["us"] / 1e6 if results[0].get("us") else None,
                        "best": nf4_bytes / best["us"] / 1e6 if best else None},
               "vs_bf16": {"default": us["bf16"] / results[0]["us"] if results[0].get("us") else None,
                           "best": us["bf16"] / best["us"] if best else None},
               "best_by_kernel": by_kernel, "configs": results}
        table.append(row)
    return table


def _describe(result: dict[str, Any] | None) -> str:
    if not result:
        return "-"
    c = result["config"]
    return (f"{c['kernel']} n{c['block_n']} k{c['block_k']} s{c['split_k']} {c['lut']} w{c['num_warps']}"
            f" st{c['num_stages']}: {result['us']} us")


def print_table(rows: list[dict[str, Any]], roofline: float) -> None:
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {roofline / 1e9:.0f} GB/s")
    print(f"{'shape':<22}{'M':>4} {'bf16':>7} {'deq+mm':>7} {'default':>8} {'TB/s':>5} {'x bf16':>6}"
          f" {'best':>7} {'TB/s':>5} {'x bf16':>6}  best config")
    for row in rows:
        us, tbs, ratio, d, b = row["us"], row["TB/s"], row["vs_bf16"], row["default"], row["best"]
        def num(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"
        print(f"{row['shape']:<22}{row['m']:>4} {us['bf16']:>7.2f} {us['dequant+mm']:>7.2f} "
              f"{num(d.get('us'), '8.2f'):>8} {num(tbs['default'], '5.2f'):>5} {num(ratio['default'], '6.2f'):>6} "
              f"{num(b and b['us'], '7.2f'):>7} {num(tbs['best'], '5.2f'):>5} {num(ratio['best'], '6.2f'):>6}"
              f"  {_describe(b)}")
    print(f"\n{'shape':<22}{'M':>4} {'bf16':>7} {'old best':>9} {'x bf16':>6} {'gemv2 best':>10} {'x bf16':>6}"
          f" {'new/old':>7}  old config | gemv2 config")
    for row in rows:
        kernels = row["best_by_kernel"]
        old = min((r for r in (kernels["gemv"], kernels["dot"]) if r), key=lambda r: r["us"], default=None)
        new, bf16 = kernels["gemv2"], row["us"]["bf16"]
        if not (old or new):
            continue
        def ratio(r: dict[str, Any] | None) -> str:
            return f"{bf16 / r['us']:6.2f}" if r else "     -"
        speedup = f"{old['us'] / new['us']:7.2f}" if old and new else "      -"
        print(f"{row['shape']:<22}{row['m']:>4} {bf16:>7.2f} {old['us'] if old else '-':>9} {ratio(old)} "
              f"{new['us'] if new else '-':>10} {ratio(new)} {speedup}  {_describe(old)} | {_describe(new)}")
    wrong = [(row["shape"], row["m"], r["config"], r.get("rel_err", r.get("error")))
             for row in rows for r in row["configs"] if not r.get("ok")]
    for item in wrong:
        print("NOT OK:", *item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", "--out", dest="json", default=None, help="also write the JSON here")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="time only the default tiles")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds after which the sweep stops")
    parser.add_argument("--jobs", type=int, default=16, help="processes compiling kernels first (0: none)")
    parser.add_argument("--precompile-only", action="store_true", help="compile the kernels, time nothing")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="activation rows M, comma-separated")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"a subset of {','.join(SHAPES)}")
    parser.add_argument("--kernels", default="gemv,dot,gemv2", help="the kernels the sweep tries")
    args = parser.parse_args()
    rows = tuple(int(m) for m in args.rows.split(","))
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    kernels = frozenset(args.kernels.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nf4_gemv.py: needs a CUDA GPU")
    began = time.monotonic()
    errors = (precompile(sweep=args.sweep, jobs=args.jobs, shapes=shapes, rows=rows, kernels=kernels)
              if args.jobs > 0 else [])
    print(f"precompiled in {time.monotonic() - began:.0f} s; {len(errors)} errors", *errors[:5], sep="\n")
    if args.precompile_only:
        return
    roofline = copy_bandwidth()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__, "triton": __import__("triton").__version__, "copy_GB/s": roofline / 1e9,
        "compile_errors": errors, "rows": []}
    for name, (n, k) in shapes.items():
        result["rows"] += bench_shape(name, n, k, sweep=args.sweep, deadline=began + args.budget, rows=rows,
                                      kernels=kernels)
        result["seconds"] = time.monotonic() - began
        if args.json:  # after every shape: a run cut short still leaves its rows
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, default=float)
    print_table(result["rows"], roofline)


if __name__ == "__main__":
    main()
