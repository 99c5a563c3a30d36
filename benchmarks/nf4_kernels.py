"""NF4 kernel check on a GPU: correctness against bitsandbytes and the reference, and variant speed.

Run on the GPU machine: ``python3 benchmarks/nf4_kernels.py --out DIR`` (writes nf4_kernels.json).
Variants, Llama-3-8B projection shapes: bf16 ``F.linear`` (the ceiling), splice NF4 (one Triton
dequant pass per kernel / program-size / warps variant, + cuBLAS), the plain-PyTorch dequant,
bitsandbytes' ``dequantize_4bit`` and ``matmul_4bit`` (where it imports); forward, and forward +
input gradient.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from splice.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference
from splice.quant.nf4 import to_nf4

SHAPES = {"q/o 4096x4096": (4096, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336), "k/v 1024x4096": (1024, 4096)}


def bench(fn, reps: int = 20, inner: int = 1) -> float:  # type: ignore[no-untyped-def]
    """Median milliseconds of one call of ``fn`` (CUDA events around ``inner`` back-to-back
    calls, so a short kernel is timed by its GPU time rather than by the event's resolution)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[len(times) // 2]


# Dequant variants: (kernel, packed bytes per program, warps).
DEQUANT_VARIANTS = [("flat", 1024, 4)] + [("blocks", pb, w) for pb in (512, 1024, 2048, 4096) for w in (4, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
    except Exception as error:
        print("bitsandbytes does not import:", error)
        bnb = bnb_f = None
    result: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "torch": torch.__version__, "rows": []}
    torch.manual_seed(0)
    for label, (d_out, d_in) in SHAPES.items():
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * 0.02
        t = to_nf4(w)
        ref = dequantize_nf4_reference(t.packed, t.fp32_absmax(), t.code, shape=(d_out, d_in), block_size=64,
                                       dtype=torch.bfloat16)
        row: dict = {"shape": label, "max_abs_vs_reference": float((t.dequantize() - ref).abs().max())}
        if bnb_f is not None:
            packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            row["bnb_codes_equal"] = bool(torch.equal(packed.reshape(-1), t.packed))
            row["bnb_qabsmax_equal"] = bool(torch.equal(state.absmax, t.qabsmax))
            row["bnb_dequant_max_abs"] = float((bnb_f.dequantize_4bit(packed, state) - t.dequantize()).abs().max())
        moved = 2.0 * w.numel() + t.nbytes_stored()
        buf = torch.empty(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        for kernel, pb, warps in DEQUANT_VARIANTS:
            kw = dict(shape=(d_out, d_in), block_size=64, dtype=torch.bfloat16, qabsmax=t.qabsmax,
                      scale2=t.scale2, offset=t.offset, code2=t.code2, program_bytes=pb, kernel=kernel,
                      num_warps=warps)
            got = dequantize_nf4(t.packed, t.code, out=buf, **kw)
            name = f"{kernel}_pb{pb}_w{warps}"
            row[f"dequant_equal_default_{name}"] = bool(torch.equal(got, t.dequantize()))
            ms = bench(lambda kw=kw, buf=buf: dequantize_nf4(t.packed, t.code, out=buf, **kw), inner=10)
            row[f"dequant_ms_{name}"] = ms
            row[f"dequant_TBps_{name}"] = moved / ms / 1e9
        if bnb_f is not None:
            row["dequant_ms_bnb"] = bench(lambda: bnb_f.dequantize_4bit(packed, state), inner=10)
            row["dequant_TBps_bnb"] = moved / row["dequant_ms_bnb"] / 1e9
        row["dequant_ms_torch_reference"] = bench(lambda: dequantize_nf4_reference(
            t.packed, t.fp32_absmax(), t.code, shape=(d_out, d_in), block_size=64, dtype=torch.bfloat16), reps=5)
        for n in (512, 4096, 8192):
            x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16)
            variants = {"bf16": w, "splice_nf4": t}
            for name, weight in variants.items():
                row[f"fwd_ms_{name}_n{n}"] = bench(lambda weight=weight, x=x: F.linear(x, weight))
                row[f"fwdbwd_ms_{name}_n{n}"] = bench(
                    lambda weight=weight, x=x, g=g: F.linear(x, weight).backward(g))
            if bnb is not None:
                row[f"fwd_ms_bnb_n{n}"] = bench(lambda x=x: bnb.matmul_4bit(x, packed.t(), quant_state=state))
                row[f"fwdbwd_ms_bnb_n{n}"] = bench(
                    lambda x=x, g=g: bnb.matmul_4bit(x, packed.t(), quant_state=state).backward(g))
        print(json.dumps(row))
        result["rows"].append(row)
    (out / "nf4_kernels.json").write_text(json.dumps(result, indent=1))
    names = [f"{k}_pb{pb}_w{w}" for k, pb, w in DEQUANT_VARIANTS] + ["bnb"]
    print("dequant TB/s (2 bytes written + the stored bytes read, per weight)")
    print(f"{'variant':<22}" + "".join(f"{row['shape']:>20}" for row in result["rows"]))
    for name in names:
        print(f"{name:<22}" + "".join(f"{row.get('dequant_TBps_' + name, float('nan')):>20.2f}"
                                      for row in result["rows"]))
    print(f"{'shape':<20} {'fwd+dx ms n4096: bf16':>22} {'nf4':>7} {'bnb':>7}")
    for row in result["rows"]:
        print(f"{row['shape']:<20} {row['fwdbwd_ms_bf16_n4096']:>22.3f} "
              f"{row['fwdbwd_ms_splice_nf4_n4096']:>7.3f} {row.get('fwdbwd_ms_bnb_n4096', float('nan')):>7.3f}")


if __name__ == "__main__":
    main()
