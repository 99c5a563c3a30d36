"""LoRA training throughput and memory: PEFT vs PEFT + Liger-Kernel vs splice, in one invocation.

    PYTHONPATH=. python benchmarks/train_throughput.py --out results/ [--maxseq]

Each framework runs in its own subprocess (a ``--worker``) on the same random Llama-3-8B-shaped
bf16 model, data, LoRA init and optimizer (see ``_workload.py``), through the issue's configs
A (r8 q/v, seq 1024), C (r16 all-linear, 2 x 2048, checkpointing) and E (r16 all-linear, 8192,
checkpointing), plus P (a loss-parity run: no dropout, one batch repeated). splice runs C and E
as ``layers="auto"`` (checkpoint only what memory needs: the fast setting), ``"all"`` (every layer
checkpointed: the low-memory setting), each eager and replayed from a CUDA graph
(splice.training.graphs), and ``"all"`` with the kept inputs offloaded to CPU; A eager and with graphs. ``--maxseq`` then finds each framework's
longest trainable batch-1 sequence with C's settings (splice: all layers checkpointed, inputs
offloaded to CPU) by doubling from a start length, then bisecting, within a time budget; a length
whose offloaded inputs would not fit the host's available memory counts as too long, untried, and
``--offload-compression fp8|int8`` stores them in 8 bits (half the host memory).
``--mlp-chunk-tokens N`` runs splice's MLPs N tokens at a time (memory.tiled_mlp: their intermediates
then scale with N, not the sequence).
``--quantize fp8`` gives splice FP8 base weights (splice.quant.fp8: e4m3 weights and FP8 GEMMs, a
GPU of compute capability 8.9+) while PEFT and Liger stay bf16: ``--configs C,P --parity-steps 200
--frameworks peft,splice --quantize fp8`` times C and compares 200 steps of loss against PEFT's.
``--pack mask|varlen`` trains every config on packed rows instead (ShareGPT-like segments, see
``_workload.sharegpt_lengths``): splice attends them through Hugging Face's block-diagonal mask or the
varlen kernel (no mask), PEFT and Liger through the mask; run it once each way for splice's speed and
peak memory both ways (MFU still counts attention as one full-length sequence per row).
Writes ``results.json`` and ``table.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCRATCH = Path(os.environ.get("SPLICE_BENCH_TMP", "/tmp/splice_bench"))


def _versions() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        out["matmul_tflops"] = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["driver"] = None
    return out


def _host_shortfall(need: int) -> str | None:
    """Why ``need`` more bytes of pinned host memory would not fit now (what is available, less
    2 GiB for the rest of the step), or None (also where the OS does not say)."""
    from splice.memory.offload import host_memory

    available = host_memory(available=True)
    if available is None or need + (2 << 30) <= available:
        return None
    return (f"the offloaded layer inputs need {need / 2**30:.1f} GiB of pinned host memory, "
            f"{available / 2**30:.1f} GiB is available")


def offload_host_bytes(seq: int, *, layers: int, hidden: int, cfg: Any, compression: str) -> int:
    """Pinned host memory splice's offloaded checkpoints (inputs only, attention recomputed) take at
    batch 1 x ``seq`` tokens: each layer's input (8-bit with ``compression``) and its LoRA
    down-projections (``splice.memory.offload.offloaded_host_bytes``; bf16, Llama's 7 linears)."""
    import torch

    from splice.memory.offload import offloaded_host_bytes

    linears = 7 if cfg.targets == "all-linear" else len(cfg.targets)
    return offloaded_host_bytes(tokens=seq, hidden=hidden, layers=layers, dtype=torch.bfloat16,
                                compression=compression, lora_ranks=linears * cfg.rank)  # type: ignore[arg-type]


def probe_step(setup: Any, cfg: Any, seq: int, *, packed: bool = False,
               host_bytes: Callable[[int], int] | None = None) -> dict[str, Any]:
    """One batch-1 step at ``seq`` tokens (``try_one_step``), skipped as host-bound when the pinned
    memory ``host_bytes(seq)`` says its offloaded checkpoints take is not available; the pinned
    buffers are freed after it (the next length needs buffers of its own shape)."""
    from _workload import try_one_step

    from splice.memory.checkpointing import release_pinned_memory

    need = host_bytes(seq) if host_bytes is not None else 0
    short = _host_shortfall(need) if need else None
    if short is not None:
        return {"seq": seq, "ok": False, "host_bound": short}
    r = try_one_step(setup, cfg, seq, packed=packed)
    if need:
        r["host_offload_gib"] = round(need / 2**30, 2)
    release_pinned_memory(setup.model)
    return r


def _maxseq(setup: Any, cfg: Any, *, start: int, cap: int, gran: int, budget_s: float,
            packed: bool = False, host_bytes: Callable[[int], int] | None = None) -> dict[str, Any]:
    """Doubling from ``start`` (up to ``cap``), then bisecting to ``gran``, within ``budget_s``
    (a length whose offloaded inputs would not fit host memory counts as too long, untried)."""
    t0 = time.perf_counter()
    probes: list[dict[str, Any]] = []

    def probe(seq: int) -> bool:
        r = probe_step(setup, cfg, seq, packed=packed, host_bytes=host_bytes)
        probes.append(r)
        print(f"  maxseq probe {seq}: {'ok' if r['ok'] else 'OOM'} {r}", flush=True)
        return bool(r["ok"])

    ok, bad, seq = None, None, start
    while seq <= cap and time.perf_counter() - t0 < budget_s:
        if probe(seq):
            ok, seq = seq, seq * 2
        else:
            bad = seq
            break
    while ok is None and bad is not None and bad > gran and time.perf_counter() - t0 < budget_s:
        seq = max(gran, bad // 2)
        if probe(seq):
            ok = seq
        else:
            bad = seq
    while ok is not None and bad is not None and bad - ok > gran and time.perf_counter() - t0 < budget_s:
        mid = (ok + bad) // 2 // gran * gran
        if probe(mid):
            ok = mid
        else:
            bad = mid
    return {"longest_ok": ok, "shortest_oom": bad, "cap": cap, "probes": probes,
            "budget_hit": time.perf_counter() - t0 >= budget_s}


def _quantized(setup: Any, fw: str, args: argparse.Namespace) -> Any:
    """splice's setup with FP8 base weights under ``--quantize fp8`` (PEFT and Liger stay bf16)."""
    if fw == "splice" and args.quantize == "fp8":
        from splice.quant.fp8 import quantize_fp8

        quantize_fp8(setup.model, allow_cpu=args.tiny)  # after LoRA and fuse: the bases inside the wrappers
    return setup


def _frozen_gib(model: Any) -> float:
    """The frozen weights' GiB: parameters, and FP8 bases' codes and scales (buffers)."""
    from splice.quant.fp8 import FP8Linear

    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return (frozen + sum(m.nbytes_stored() for m in model.modules() if isinstance(m, FP8Linear))) / 2**30


def worker(args: argparse.Namespace) -> None:
    import dataclasses

    import _workload
    from _workload import CONFIGS, batches, flops_per_token, free_cuda, init_lora, make_setup, train
    from torch import nn

    if args.dropout is not None:  # A, C and E at another LoRA dropout (P, the loss-parity run, keeps 0)
        CONFIGS = {k: c if k == "P" else dataclasses.replace(c, dropout=args.dropout) for k, c in CONFIGS.items()}

    _workload.configure(tiny=args.tiny, device="cpu" if args.tiny else "cuda")
    fw = args.worker
    if fw == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # its Llama patches, before the model is built
    result: dict[str, Any] = {"framework": fw, "runs": [], "maxseq": None}
    out_file = SCRATCH / f"{fw}.json"

    def save() -> None:
        out_file.write_text(json.dumps(result, indent=1))

    packed = args.pack is not None
    pack = (args.pack if fw == "splice" else "mask") if packed else "mask"  # PEFT, Liger: Hugging Face's mask

    def record(setup: Any, cfg: Any, variant: str, r: dict[str, Any], weights_gib: float) -> None:
        n_lora = sum(a.numel() + b.numel() for _, a, b in setup.lora)
        fpt = flops_per_token(cfg, cfg.seq, args.layers, n_lora)
        variant = f"fp8 {variant}".strip() if fw == "splice" and args.quantize else variant
        variant = " + ".join(v for v in (variant, f"packed {pack}" if packed else "") if v)
        r.update(config=cfg.name, framework=fw, variant=variant, weights_gib=weights_gib,
                 act_gib=r["peak_gib"] - weights_gib, flops_per_token=fpt,
                 mfu=fpt * r["tok_s"] / (args.peak_tflops * 1e12), lora_params=n_lora)
        result["runs"].append(r)
        print(f"[{fw}] {cfg.name} {variant}: {r['tok_s']:.0f} tok/s, {r['step_ms']:.1f} ms, "
              f"peak {r['peak_gib']:.2f} GiB, loss {r['losses'][-1]:.4f}", flush=True)
        save()

    def maybe_profile(setup: Any, cfg: Any, key: str, graphs: bool = False) -> None:
        from _workload import profile_steps

        try:
            text = profile_steps(setup, cfg, graphs=graphs, packed=args.pack is not None)
        except Exception as exc:  # a profiler problem must not lose the timings
            text = f"profiler failed: {exc!r}"
        print(f"[{fw}] profile {key}:\n{text}", flush=True)
        result.setdefault("profiles", {})[key] = text
        save()
        free_cuda()

    configs = [c for c in args.configs.split(",") if c]
    shared = None  # the C-settings model, reused by C, E, P and the max-seq search
    for name in configs + (["maxseq"] if args.maxseq else []):
        cfg = CONFIGS["C" if name in ("E", "P", "maxseq") else name]
        if name == "A":
            setup = _quantized(make_setup(fw, CONFIGS["A"], args.layers, pack=pack), fw, args)
            weights = _frozen_gib(setup.model)
            setup.set_ckpt("off")
            for graphs in [False] + ([True] if fw == "splice" else []):
                free_cuda()
                record(setup, CONFIGS["A"], "graphs" if graphs else "",
                       train(setup, batches(CONFIGS["A"], packed=packed), warmup=args.warmup, steps=args.steps,
                             graphs=graphs), weights)
            if "A" in args.profile.split(",") and not args.tiny:
                for graphs in [False] + ([True] if fw == "splice" else []):
                    maybe_profile(setup, CONFIGS["A"], "A graphs" if graphs else "A", graphs)
            del setup
            free_cuda()
            continue
        if shared is None:
            shared = _quantized(make_setup(fw, CONFIGS["C"], args.layers, pack=pack), fw, args)
            weights = _frozen_gib(shared.model)
        run_cfg = CONFIGS[name] if name != "maxseq" else cfg
        if name in ("C", "E"):
            modes = [("on", False)] + ([("on", True), ("all", False), ("all", True), ("offload", False),
                                        ("offload", True), ("offload-recompute", True)]
                                       if fw == "splice" else [])
            if name == "E":  # 8,192-token steps are not launch-bound: no graph variants (time)
                modes = [m for m in modes if not m[1]]
            if args.modes:  # e.g. "on+graphs": only those checkpointing modes (+ graphs) of splice
                modes = [m for m in modes if fw != "splice" or f"{m[0]}{'+graphs' if m[1] else ''}" in
                         args.modes.split(",")]
            for mode, graphs in modes:
                shared.set_ckpt(mode)
                variant = {"on": "auto" if fw == "splice" else "", "all": "ckpt all",
                           "offload": "ckpt all + offload",
                           "offload-recompute": "ckpt all + offload, attention recomputed"}[mode]
                variant += " + graphs" if graphs else ""
                free_cuda()
                record(shared, run_cfg, variant, train(shared, batches(run_cfg, packed=packed), warmup=args.warmup,
                                                       steps=args.steps, graphs=graphs), weights)
                if name in args.profile.split(",") and not args.tiny:
                    maybe_profile(shared, run_cfg, f"{name} {variant}".strip(), graphs)
        elif name == "P":
            drops = [m for m in shared.model.modules() if isinstance(m, nn.Dropout)]
            saved = [m.p for m in drops]
            for m in drops:
                m.p = 0.0
            init_lora(shared.lora)
            shared.set_ckpt("off")
            free_cuda()
            record(shared, run_cfg, "", train(shared, batches(run_cfg, same=True, packed=packed), warmup=0,
                                              steps=args.parity_steps, lr=1e-3), weights)
            for m, p in zip(drops, saved):
                m.p = p
        else:
            compression = args.offload_compression
            # host RAM: inputs only (8-bit with --offload-compression)
            shared.set_ckpt(("offload-recompute" + ("" if compression == "none" else f"+{compression}"))
                            if fw == "splice" else "on")
            if args.mlp_chunk_tokens and fw == "splice":  # each MLP a chunk of tokens at a time
                from splice.memory.tiled_mlp import tile_mlps

                tile_mlps(shared.model, chunk_tokens=args.mlp_chunk_tokens)
            host = (lambda seq: offload_host_bytes(seq, layers=args.layers, hidden=_workload.HIDDEN, cfg=cfg,
                                                   compression=compression)) if fw == "splice" else None
            starts = dict(kv.split("=") for kv in args.maxseq_start.split(","))
            result["maxseq"] = _maxseq(shared, cfg, start=int(starts.get(fw, 16384)), cap=args.maxseq_cap,
                                       gran=args.maxseq_gran, budget_s=args.maxseq_budget, packed=packed,
                                       host_bytes=host)
            result["maxseq"]["offload_compression"] = compression if fw == "splice" else None
            result["maxseq"]["mlp_chunk_tokens"] = args.mlp_chunk_tokens if fw == "splice" else None
            result["maxseq"]["weights_gib"] = weights
            save()
    save()


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def tables(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    runs = [r for res in results for r in res.get("runs", [])]
    lines = ["| config | framework | tok/s | step ms | peak GiB | activation GiB | MFU | loss (last step) "
             "| tok/s vs PEFT | activation vs PEFT |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cname in ("A", "C", "E"):
        rows = [r for r in runs if r["config"] == cname]
        peft = next((r for r in rows if r["framework"] == "peft"), None)
        for r in rows:
            label = {"peft": "PEFT", "liger": "PEFT + Liger", "splice": "splice"}[r["framework"]]
            label += f" ({r['variant']})" if r["variant"] else ""
            speed = r["tok_s"] / peft["tok_s"] if peft else None
            act = r["act_gib"] / peft["act_gib"] if peft and peft["act_gib"] > 0 else None
            lines.append(f"| {cname} | {label} | {r['tok_s']:,.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | "
                         f"{r['act_gib']:.2f} | {100 * r['mfu']:.1f}% | {r['losses'][-1]:.4f} | "
                         f"{_fmt(speed, '.2f')}x | {_fmt(act, '.2f')}x |")
    parity = [r for r in runs if r["config"] == "P"]
    if parity:
        lines += ["", "Loss parity (P: r16 all-linear, seq 1024, dropout 0, one batch repeated, AdamW lr 1e-3):", "",
                  "| step | " + " | ".join(f"{r['framework']} {r['variant']}".strip() for r in parity) + " |",
                  "|---|" + "---|" * len(parity)]
        for i in range(len(parity[0]["losses"])):
            lines.append(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.5f}" for r in parity) + " |")
    ms = [(res["framework"], res["maxseq"]) for res in results if res.get("maxseq")]
    if ms:
        lines += ["", "Longest batch-1 sequence with C's settings (one optimizer step each probe):", "",
                  "| framework | longest that trained | shortest OOM | peak GiB at longest | tok/s at longest "
                  "| probes (seq: result, s) |", "|---|---|---|---|---|---|"]
        for fw, m in ms:
            best = next((p for p in m["probes"] if p["ok"] and p["seq"] == m["longest_ok"]), None)
            probes = ", ".join(f"{p['seq']}: {'ok' if p['ok'] else 'OOM'}"
                               + (f" {p['seconds']:.1f}" if p["ok"] else "") for p in m["probes"])
            oom = m["shortest_oom"] or f"none up to the {m['cap']:,} cap"
            lines.append(f"| {fw} | {_fmt(m['longest_ok'], ',')} | {oom} | "
                         f"{_fmt(best and best['peak_gib'], '.2f')} | {_fmt(best and best['tok_s'], ',.0f')} | {probes} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--frameworks", default="peft,liger,splice")
    ap.add_argument("--configs", default="A,C,E,P")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--parity-steps", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=775.0, help="bf16 matmul peak for MFU")
    ap.add_argument("--profile", default="", help="configs to profile after timing, e.g. C")
    ap.add_argument("--maxseq", action="store_true")
    ap.add_argument("--maxseq-start", default="peft=16384,liger=32768,splice=131072")
    ap.add_argument("--maxseq-cap", type=int, default=131072)
    ap.add_argument("--maxseq-gran", type=int, default=8192)
    ap.add_argument("--maxseq-budget", type=float, default=150.0)
    ap.add_argument("--offload-compression", choices=("none", "fp8", "int8"), default="none",
                    help="--maxseq: splice's offloaded layer inputs in 8 bits (half the host memory)")
    ap.add_argument("--mlp-chunk-tokens", type=int, default=None,
                    help="--maxseq: splice runs each MLP this many tokens at a time (splice.memory.tiled_mlp)")
    ap.add_argument("--modes", default="", help="C/E: only these of splice's modes, e.g. on,on+graphs (on: auto "
                    "checkpointing; all, offload, offload-recompute)")
    ap.add_argument("--worker-timeout", type=float, default=500.0)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks this harness")
    ap.add_argument("--pack", choices=("mask", "varlen"), default=None,
                    help="train on packed rows; splice attends them through the block mask or the varlen kernel")
    ap.add_argument("--dropout", type=float, default=None,
                    help="the LoRA dropout of A, C and E for every framework (default: 0.05, the issue's settings)")
    ap.add_argument("--quantize", choices=("fp8",), default=None,
                    help="splice's base weights in FP8 (compute capability 8.9+); PEFT and Liger stay bf16")
    args = ap.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _versions() if not args.tiny else {"tiny": True}
    env["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    env["command"] = " ".join(sys.argv)
    print(json.dumps(env), flush=True)
    results = []
    passthrough = sys.argv[1:]
    for fw in args.frameworks.split(","):
        (SCRATCH / f"{fw}.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", fw, *passthrough],
                                  timeout=args.worker_timeout)
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        path = SCRATCH / f"{fw}.json"
        res = json.loads(path.read_text()) if path.exists() else {"framework": fw, "runs": []}
        res.update(returncode=rc, wall_s=time.perf_counter() - t0)
        results.append(res)
        (out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    table = tables(results, env)
    (out / "table.md").write_text(table + "\n")
    profiles = [f"## {res['framework']} {key}\n{text}" for res in results
                for key, text in res.get("profiles", {}).items()]
    if profiles:
        (out / "profile.txt").write_text("\n\n".join(profiles) + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
