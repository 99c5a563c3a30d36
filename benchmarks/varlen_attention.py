"""Packed (varlen) causal attention, forward + backward: splice's Triton kernel against torch SDPA with the
block-diagonal mask Hugging Face builds for packed rows, and torch's FlashAttention varlen_attn where this
torch has it.

    PYTHONPATH=. python benchmarks/varlen_attention.py --json DIR/varlen_attention.json

Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16) over one pack of 2,048 and one of
8,192 tokens, cut into ShareGPT-like segments (``_workload.sharegpt_lengths``, fixed seed). Each method runs
the forward and the backward (dq, dk, dv for one fixed output gradient): median milliseconds over
``--reps`` calls after ``--warmup``, the forward alone too; peak memory above the inputs
(``torch.cuda.max_memory_allocated``, outputs and gradients included); the SDPA mask (built once outside the
timing: Hugging Face shares it across layers) is its own column. TFLOP/s count causal attention within the
segments: forward ``4 D Hq sum L(L+1)/2``, backward 2.5x that. Every result is checked against splice's
PyTorch reference (relative error of the output and the three gradients).

``torch.nn.attention.varlen.varlen_attn`` changed its signature across torch versions (2.13: ``window_size``
and ``enable_gqa``, no ``is_causal``): it is probed with ``inspect`` and skipped, with the reason in the
table, where it is missing or cannot be made causal. ``--tiny``: small shapes on the CPU (checks this script;
the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import sharegpt_lengths

from splice.kernels import use_triton
from splice.kernels.varlen_attention import varlen_attention, varlen_attention_reference

Forward = Callable[[], Tensor]  # one method's forward over the pack: the output (T, Hq, D)


class Case:
    """One pack: q (T, Hq, D), k/v (T, Hkv, D) needing gradients, the output gradient, the segments."""

    def __init__(self, lengths: list[int], *, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        tokens = sum(lengths)
        self.lengths, self.scale = lengths, d**-0.5
        self.q, self.k, self.v = (torch.randn(tokens, h, d, generator=g).to(device, dtype).requires_grad_()
                                  for h in (hq, hkv, hkv))
        self.grad = torch.randn(tokens, hq, d, generator=g).to(device, dtype)
        self.cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)

    def backward(self, out: Tensor) -> list[Tensor]:
        """[out, dq, dk, dv] for the fixed output gradient."""
        return [out, *torch.autograd.grad(out, (self.q, self.k, self.v), self.grad.to(out.dtype))]

    def flops(self) -> float:
        """Forward + backward FLOPs of causal attention within the segments."""
        hq, d = self.q.shape[1:]
        return 3.5 * 4 * d * hq * sum(n * (n + 1) / 2 for n in self.lengths)


def splice_forward(case: Case) -> Forward:
    return lambda: varlen_attention(case.q, case.k, case.v, cu_seqlens=case.cu, max_seqlen=max(case.lengths),
                                    scale=case.scale)


def reference_forward(case: Case) -> Forward:
    return lambda: varlen_attention_reference(case.q.float(), case.k.float(), case.v.float(), cu_seqlens=case.cu,
                                              max_seqlen=max(case.lengths), scale=case.scale)


def block_mask(case: Case) -> Tensor:
    """(T, T) bool: same segment and causal (what Hugging Face builds from packed position ids)."""
    seg = torch.repeat_interleave(torch.arange(len(case.lengths), device=case.q.device),
                                  torch.tensor(case.lengths, device=case.q.device))
    i = torch.arange(seg.numel(), device=seg.device)
    return (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])


def sdpa_forward(case: Case, mask: Tensor) -> Forward:
    """SDPA over the whole pack as one (1, H, T, D) batch with the block mask, KV heads repeated for the
    query heads as Hugging Face does under a mask (its grouped-query SDPA would fall back to the math kernel)."""
    group = case.q.shape[1] // case.k.shape[1]

    def forward() -> Tensor:
        q, k, v = (x.transpose(0, 1)[None] for x in (case.q, case.k.repeat_interleave(group, 1),
                                                      case.v.repeat_interleave(group, 1)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], scale=case.scale)[0].transpose(0, 1)

    return forward


def torch_varlen_forward(case: Case) -> tuple[Forward | None, str]:
    """torch's varlen_attn made causal for this torch's signature, or None and why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if case.q.device.type != "cuda":
        return None, "varlen_attn runs on CUDA only"
    params = inspect.signature(varlen_attn).parameters
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # (left, right): causal
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return None, "varlen_attn takes neither window_size nor is_causal: cannot make it causal"
    if "scale" in params:
        kw["scale"] = case.scale
    grouped = "enable_gqa" in params
    if grouped:
        kw["enable_gqa"] = True
    longest, group = max(case.lengths), case.q.shape[1] // case.k.shape[1]

    def forward() -> Tensor:
        k, v = (case.k, case.v) if grouped else (x.repeat_interleave(group, 1) for x in (case.k, case.v))
        return varlen_attn(case.q, k, v, case.cu, case.cu, longest, longest, **kw)  # type: ignore[return-value]

    return forward, "" if grouped else "KV heads repeated (no enable_gqa)"


def timed(call: Callable[[], object], *, reps: int, warmup: int) -> float:
    """Median milliseconds of one call (CUDA events on a GPU, the wall clock on a CPU)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_mib(call: Callable[[], object]) -> float:
    """Memory one call allocates at its peak above what was allocated before it (0 on a CPU)."""
    if not torch.cuda.is_available():
        call()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(case: Case, name: str, forward: Forward, reference: list[Tensor], *, reps: int, warmup: int,
            note: str = "", mask_mib: float = 0.0) -> dict[str, Any]:
    """Forward + backward time, forward time, peak memory and error against ``reference`` of one method."""
    def run() -> list[Tensor]:
        return case.backward(forward())

    errors = [float((a.detach().double() - b.double()).norm() / b.double().norm())
              for a, b in zip(run(), reference, strict=True)]
    ms = timed(run, reps=reps, warmup=warmup)
    return {"method": name, "fwd_bwd_ms": ms, "fwd_ms": timed(forward, reps=reps, warmup=warmup),
            "tflops": case.flops() / ms / 1e9, "peak_mib": peak_mib(run), "mask_mib": mask_mib,
            "max_rel_err": max(errors), "note": note}


def bench_pack(tokens: int, args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Every method on one pack of ``tokens`` ShareGPT-like segments."""
    lengths = sharegpt_lengths(tokens, seed=args.seed, median=12 if args.tiny else 350)
    case = Case(lengths, hq=args.heads, hkv=args.kv_heads, d=args.head_dim, dtype=dtype, device=device)
    reference = [x.detach() for x in case.backward(reference_forward(case)())]  # fp32, one segment at a time
    kernel = "Triton" if use_triton(case.q) else "reference"
    rows = [measure(case, f"splice varlen ({kernel})", splice_forward(case), reference, reps=args.reps,
                    warmup=args.warmup)]
    mask = block_mask(case)
    rows.append(measure(case, "torch SDPA + block mask", sdpa_forward(case, mask), reference, reps=args.reps,
                        warmup=args.warmup, mask_mib=mask.numel() * mask.element_size() / 2**20))
    del mask
    forward, why = torch_varlen_forward(case)
    rows.append({"method": "torch varlen_attn", "skipped": why} if forward is None else
                measure(case, "torch varlen_attn", forward, reference, reps=args.reps, warmup=args.warmup, note=why))
    for row in rows:
        row.update(tokens=tokens, segments=len(lengths), longest=max(lengths), lengths=lengths)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| pack tokens | segments (longest) | method | fwd+bwd ms | fwd ms | TFLOP/s | peak MiB | mask MiB "
             "| max rel err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['tokens']:,} | {r['segments']} ({r['longest']:,}) | {r['method']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped: {r['skipped']} | | | | | |")
            continue
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"{head} {r['fwd_bwd_ms']:.3f} | {r['fwd_ms']:.3f} | {r['tflops']:.1f} | {r['peak_mib']:,.1f} | "
                     f"{r['mask_mib']:,.1f} | {r['max_rel_err']:.1e}{note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", default="2048,8192", help="pack lengths in tokens")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks this script")
    args = ap.parse_args()
    if args.tiny:
        args.packs, args.heads, args.kv_heads, args.head_dim, args.reps, args.warmup = "64,160", 8, 2, 16, 2, 1
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": str(dtype), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
           "seed": args.seed, "reps": args.reps, "warmup": args.warmup}
    rows = [row for tokens in (int(p) for p in args.packs.split(",")) for row in bench_pack(tokens, args, device, dtype)]
    print(table(rows), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"env": env, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
