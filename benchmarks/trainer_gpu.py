"""`splice train` on a GPU: the main job's whole pipeline (default dataset, packing, bf16 autocast,
evaluation by generation, checkpoints) with and without ``--fuse``.

The SmolLM2 weights (a 98 MB GGUF) cannot travel to the device, so the model is the
SmolLM2-135M-Instruct *architecture* with random weights, built from its ``config.json`` and real
tokenizer (``--assets``). Losses and scores are therefore those of a random model; the point is
that every stage runs on CUDA and how fast the steps are, next to PEFT on the same batches.

    python benchmarks/trainer_gpu.py --assets DIR --out OUT [--steps 40]

Prints a markdown table and writes ``OUT/trainer_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splice.training.config import TrainConfig
from splice.training.loop import train


def build_model(assets: Path, target: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(assets)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(assets).save_pretrained(target)


def run(model_dir: Path, out: Path, *, fast: bool, steps: int, graphs: bool | None = None) -> dict[str, object]:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train(TrainConfig(model=str(model_dir), output_dir=str(out), steps=steps, fuse=fast,
                               cuda_graphs=graphs, eval_samples=32, save_every=steps // 2))
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train"][3:]  # after warm-up
    tokens = sum(r["tokens"] for r in timed)
    step_s = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {
        "framework": "splice",
        "fast": fast,
        "cuda_graphs": result.cuda_graphs,
        "steps": result.steps,
        "wall_s": round(seconds, 1),
        "tok_per_s": round(tokens / step_s),
        "step_ms": round(1000 * step_s / len(timed), 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": round(result.losses[0], 4),
        "last_loss": round(result.losses[-1], 4),
        "final": result.metrics.get("final", {}),
        "checkpoints": sorted(p.name for p in (out / "checkpoints").iterdir()),
    }


def run_peft(model_dir: Path, *, steps: int) -> dict[str, object]:
    """The PEFT baseline on the same packed batches: PEFT's LoRA (r16, alpha 32, all linear, no
    dropout, fp32 adapters), bf16 weights + autocast as splice's GPU default, AdamW lr 1e-3 with
    the same warmup + cosine schedule, Hugging Face's loss (``model(labels=...)``)."""
    import peft

    from splice.data.batching import batches
    from splice.models.loading import load_model
    from splice.training.loop import lr_at
    from splice.training.setup import prepare_data

    config = TrainConfig(model=str(model_dir), steps=steps)
    model, tokenizer = load_model(str(model_dir), dtype=torch.bfloat16, device="cuda")
    data = prepare_data(config, tokenizer)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total=steps, warmup=config.warmup_steps, schedule="cosine"))
    stream = batches(data.train, batch_size=config.batch_size, pad_id=tokenizer.pad_token_id,
                     seed=config.seed, pack=True, max_length=config.max_length)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, times, tokens = [], [], []
    for step in range(steps):
        batch = {k: v.cuda() for k, v in stream[step].items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # syncs
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch["num_tokens"]))
    timed = slice(3, None)
    return {
        "framework": "peft", "fast": None, "steps": steps, "wall_s": None,
        "tok_per_s": round(sum(tokens[timed]) / sum(times[timed])),
        "step_ms": round(1000 * sum(times[timed]) / len(times[timed]), 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "final": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=Path, required=True, help="config.json + tokenizer files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("trainer_gpu.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "model"
    build_model(args.assets, model_dir)
    rows = [run(model_dir, args.out / f"run-{name}", fuse=fast, steps=args.steps, graphs=graphs)
            for name, fast, graphs in (("fast", True, None), ("fast-eager", True, False),
                                       ("plain", False, None))]
    rows.append(run_peft(model_dir, steps=args.steps))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": rows}
    (args.out / "trainer_gpu.json").write_text(json.dumps(info, indent=1))
    print(f"\n{info['device']}, torch {torch.__version__}, {args.steps} steps of the default job")
    print("| framework | --fast | CUDA graphs | tok/s | step ms | peak GiB | wall s | loss first -> last | val loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['fast']} | {r.get('cuda_graphs', '-')} | {r['tok_per_s']:,} | {r['step_ms']} | {r['peak_gib']} | {r['wall_s'] or '-'} | "
              f"{r['first_loss']} -> {r['last_loss']} | {r['final'].get('val_loss', float('nan')):.4f} |".replace("nan", "-"))


if __name__ == "__main__":
    main()
