"""DoRA training throughput: splice DoRA vs PEFT DoRA vs splice LoRA (and PEFT LoRA), one run.

    PYTHONPATH=. python benchmarks/dora.py --out results/dora [--layers 8] [--seq 2048 --batch 2]

Every run trains the same random Llama-3-8B-shaped bf16 model (``_workload.build_model``, the
first ``--layers`` decoder layers), on the same data, with the same adapter init (A seeded by
path, B = 0, so DoRA's magnitudes start at PEFT's norms and the first losses agree), rank 16 on
every linear, no dropout (with dropout PEFT's DoRA, and splice's, run a second base GEMM on the
dropped-out input), AdamW. splice runs with its fused kernels (``fuse``): LoRA through
``splice.kernels.lora_linear``, DoRA through ``splice.kernels.dora``. Prints a table and writes
``dora.json`` (and ``dora.md``) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RUNS = [("splice", False), ("splice", True), ("peft", True), ("peft", False)]


def _setup(framework: str, dora: bool, *, rank: int, layers: int) -> Any:
    import _workload as w
    from torch import nn

    base = w.build_model(layers)
    if framework == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM", use_dora=dora))
        pairs = w._peft_pairs(model)

        def loss(ids: Any) -> Any:
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        from splice.fused.apply import fuse
        from splice.lora.apply import add_lora, lora_modules
        from splice.lora.freeze import freeze
        from splice.lora.layers import LoraConfig as SpliceConfig
        from splice.training.loss import causal_lm_loss, lm_head_params, model_hidden_states

        add_lora(base, SpliceConfig(rank=rank, alpha=16, dropout=0.0, targets="all-linear", use_dora=dora))
        freeze(base)
        fuse(base)
        weight, bias = lm_head_params(base)
        model = base
        pairs = [(p, layer.lora_A.weight, layer.lora_B.weight) for p, _, layer in lora_modules(base)]

        def loss(ids: Any) -> Any:
            hidden = model_hidden_states(base, input_ids=ids)
            return causal_lm_loss(hidden, weight, ids, lm_head_bias=bias, chunk_size=1024, static_shapes=True)

    w.init_lora(pairs)
    if dora:  # magnitudes = the norms of the (unchanged, B = 0) weights: recompute after init_lora
        import torch

        for module in model.modules():
            reset = getattr(module, "reset_magnitude", None)
            if callable(reset):
                reset()
            mags = getattr(module, "lora_magnitude_vector", None)
            if isinstance(mags, nn.ModuleDict) and "default" in mags:  # PEFT: recompute the same way
                layer = mags["default"]
                with torch.no_grad():
                    base_layer = module.get_base_layer()
                    layer.update_layer(base_layer=base_layer, lora_A=module.lora_A["default"].weight,
                                       lora_B=module.lora_B["default"].weight, scaling=module.scaling["default"])
    return w.Setup(model, loss, pairs, lambda mode: None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/dora")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B shape (32: the full model)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (harness smoke test)")
    args = parser.parse_args(argv)

    import _workload as w
    import torch

    w.configure(tiny=args.tiny, device="cpu" if args.tiny else "cuda")
    cfg = w.Config("dora", args.rank, "all-linear", args.seq, args.batch, False, dropout=0.0)
    rows: list[dict[str, Any]] = []
    for framework, dora in RUNS:
        name = f"{framework} {'DoRA' if dora else 'LoRA'}"
        print(f"== {name}", flush=True)
        setup = _setup(framework, dora, rank=args.rank, layers=args.layers)
        try:
            result = w.train(setup, w.batches(cfg), warmup=args.warmup, steps=args.steps)
        except torch.cuda.OutOfMemoryError as exc:
            result = {"error": f"OOM: {str(exc)[:200]}"}
        rows.append({"run": name, "framework": framework, "dora": dora, **result})
        del setup
        w.free_cuda()

    reference = next((r for r in rows if r["run"] == "splice LoRA" and "tok_s" in r), None)
    lines = ["| run | step ms | tok/s | vs splice LoRA | peak GiB | first loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['run']} | {r['error']} | | | | |")
            continue
        rel = f"{r['tok_s'] / reference['tok_s']:.2f}x" if reference else ""
        lines.append(f"| {r['run']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {rel} | {r['peak_gib']:.2f} | "
                     f"{r['losses'][0]:.4f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "versions": {"torch": torch.__version__}, "runs": rows}
    (out / "dora.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "dora.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
