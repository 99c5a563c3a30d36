"""GRPO demo on the CPU: SFT briefly, then GRPO from the SFT adapter, on the embedded task.

    PYTHONPATH=. python benchmarks/grpo_demo.py [--out results/grpo_demo] [--quick]

The embedded SmolLM2-135M-Instruct and the embedded function-naming task (name a standard-library
function from its code, answering ``{"name": "..."}``), about 10 minutes on 2 CPU cores:

1. SFT: a short LoRA run (``splice train``'s defaults, fewer steps), scoring the base model and the
   SFT adapter on the held-out test rows (greedy; JSON-valid, exact match, word F1);
2. GRPO from the SFT adapter (``--adapter``), with the built-in rewards ``json_valid`` and ``word_f1``
   (against each row's name), rollouts sampled on splice's engine from the adapter being trained;
   then the same held-out scores.

Prints a table and whether GRPO beats the SFT-only adapter on held-out word F1, and writes
``grpo_demo.json`` and ``grpo_demo.md`` under ``--out``. ``--quick`` is a smoke run (a few steps and
rows: the numbers mean nothing). The runs' directories are temporary unless ``--keep``. ``--sft-run DIR``
starts from a finished SFT run instead (its adapter and scores: ``make train``'s ``runs/splice``, with
``--held-out 96``, the rows it scored); ``--grpo-steps``, ``--prompts``, ``--generations`` override the setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The CPU's budget: a GRPO step trains on prompts x generations whole sequences (prompt + completion,
# ~300 tokens each here), so 8 steps of 2 x 4 cost about what 12 SFT steps of 4 packed rows do.
SETTINGS = {"full": dict(sft_steps=30, grpo_steps=8, prompts=2, generations=4, held_out=40,
                         max_completion_length=16),
            "quick": dict(sft_steps=1, grpo_steps=1, prompts=1, generations=2, held_out=2, max_completion_length=8)}
METRICS = ("json_valid", "exact_match", "word_f1")
REWARDS = "builtin:json_valid,builtin:word_f1"


def _train_rows(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == "train"]


def _finished_scores(run: Path) -> dict[str, dict[str, float]]:
    """The base and final held-out scores a finished ``splice train`` run wrote (its summary row)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = next((r for r in reversed(rows) if r["kind"] == "summary"), None)
    if summary is None or any(f"base_{k}" not in summary or k not in summary for k in METRICS):
        sys.exit(f"grpo_demo: --sft-run {run}: its metrics.jsonl has no summary with base and final scores "
                 "(a finished run with compare_base, e.g. make train's runs/splice)")
    return {"base": {k: summary[f"base_{k}"] for k in METRICS}, "final": {k: summary[k] for k in METRICS}}


def run_demo(root: Path, *, sft_steps: int, grpo_steps: int, prompts: int, generations: int, held_out: int,
             grpo_lr: float, max_completion_length: int, sft_run: Path | None = None) -> dict[str, Any]:
    """SFT (or ``sft_run``, a finished SFT run scored on the same ``held_out`` rows), then GRPO from its
    adapter; the held-out scores and timings of each."""
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    shared = dict(eval_samples=held_out, seed=0, save_every=0)
    started = time.perf_counter()
    if sft_run is None:
        sft_metrics = train(TrainConfig(output_dir=str(root / "sft"), steps=sft_steps, compare_base=True,
                                        **shared)).metrics
        adapter = root / "sft" / "adapter"
    else:
        sft_metrics, adapter = _finished_scores(sft_run), sft_run / "adapter"
    sft_s = time.perf_counter() - started
    started = time.perf_counter()
    grpo = train(TrainConfig(
        output_dir=str(root / "grpo"), method="grpo", adapter=str(adapter), reward=REWARDS,
        steps=grpo_steps, batch_size=prompts, num_generations=generations,
        max_completion_length=max_completion_length, lr=grpo_lr, warmup_steps=0, schedule="constant",
        compare_base=False, **shared))
    grpo_s = time.perf_counter() - started
    rows = _train_rows(root / "grpo")
    return {
        "scores": {"base": {k: sft_metrics["base"][k] for k in METRICS},
                   "sft": {k: sft_metrics["final"][k] for k in METRICS},
                   "grpo": {k: grpo.metrics["final"][k] for k in METRICS}},
        "seconds": {"sft (incl. base and SFT scoring)": sft_s, "grpo (incl. scoring)": grpo_s,
                    "grpo rollouts": sum(r["rollout_s"] for r in rows)},
        "grpo_steps": [{k: r[k] for k in ("step", "loss", "reward_mean", "reward_std", "reward/json_valid",
                                          "reward/word_f1", "completion_length", "rollout_s")} for r in rows],
    }


def table(result: dict[str, Any]) -> str:
    lines = ["| model | JSON-valid | exact match | word F1 |", "|---|---|---|---|"]
    names = {"base": "base SmolLM2-135M-Instruct", "sft": "SFT adapter", "grpo": "SFT, then GRPO"}
    for key, name in names.items():
        scores = result["scores"][key]
        lines.append(f"| {name} | {scores['json_valid']:.3f} | {scores['exact_match']:.3f} | {scores['word_f1']:.3f} |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    sft, grpo = result["scores"]["sft"]["word_f1"], result["scores"]["grpo"]["word_f1"]
    rows = result["settings"]["held_out"]
    if grpo > sft:
        return f"GRPO beats the SFT-only adapter on held-out word F1: {grpo:.3f} vs {sft:.3f} ({rows} rows)"
    return f"GRPO does not beat the SFT-only adapter on held-out word F1: {grpo:.3f} vs {sft:.3f} ({rows} rows)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/grpo_demo", help="where grpo_demo.json and .md go")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps and rows")
    parser.add_argument("--keep", action="store_true", help="keep the runs' directories under --out")
    parser.add_argument("--grpo-lr", type=float, default=2e-4)
    parser.add_argument("--sft-run", type=Path, default=None,
                        help="a finished SFT run to start GRPO from (its adapter, and its base and final scores, "
                             "e.g. make train's runs/splice: then --held-out must be the rows it scored, 96)")
    parser.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the setting's)")
    parser.add_argument("--held-out", type=int, default=None, help="held-out rows scored (default: the setting's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a GRPO step (default: the setting's)")
    parser.add_argument("--generations", type=int, default=None, help="completions a prompt (default: the setting's)")
    args = parser.parse_args(argv)
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    for key in ("grpo_steps", "held_out", "prompts", "generations"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out if args.keep else None) as scratch:
        root = Path(scratch)
        result = run_demo(root, grpo_lr=args.grpo_lr, sft_run=args.sft_run, **settings)
        if args.keep:  # the context would delete it
            kept = out / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
            root.rename(kept)
            root.mkdir()
    result["settings"] = {**settings, "grpo_lr": args.grpo_lr, "rewards": REWARDS, "quick": args.quick,
                          "sft_run": args.sft_run and str(args.sft_run)}
    if args.sft_run is not None:
        result["settings"]["sft_steps"] = "the --sft-run's"
    result["verdict"] = verdict(result)
    text = table(result)
    print(text)
    print(result["verdict"])
    (out / "grpo_demo.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "grpo_demo.md").write_text(text + "\n\n" + result["verdict"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
