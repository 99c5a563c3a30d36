"""SFT anchor: splice's default SFT job against TRL ``SFTTrainer`` + PEFT LoRA, scored the same way.

    PYTHONPATH=. python benchmarks/sft_anchor.py [--steps N] [--out DIR] [--tiny]

The default job is what ``make train`` / ``splice train`` runs with every option defaulted
(``TrainConfig()``): LoRA r16 / alpha 32 / no dropout on every linear layer of the embedded
SmolLM2-135M-Instruct, the embedded function-naming task's training split rendered through the
tokenizer's chat template (system + ``Code: ...`` user turn; loss on the assistant's
``{"name": ...}`` answer and its end-of-turn token only), packed into rows of 352 tokens, 4 rows a
step, AdamW at lr 1e-3 (no weight decay), 3 linear warm-up steps then cosine, gradient clipping at
1.0, fp32 on the CPU, 40 steps (``--steps``).

TRL gets the same: the same base folder, the same training rows as conversational prompt/completion
rows (system + user, then the assistant answer: TRL's completion-only loss), ``packing=True`` with
``max_length`` 352 and ``per_device_train_batch_size`` 4, PEFT ``LoraConfig`` with the same rank,
alpha, dropout and ``all-linear`` targets, an AdamW with the same hyper-parameters and splice's
schedule (``splice.training.optim.lr_at``: Hugging Face's own cosine warm-up starts at lr 0, splice's
at lr / warmup), fp32 (``bf16=False``), no gradient checkpointing, seed 0. Every value comes from
``TrainConfig()``, so the two stay the same job when a default changes. What stays each framework's
own: which rows land in a step (each shuffles with its own generator), how rows are packed (splice:
greedily in shuffled order; TRL: best-fit decreasing), the LoRA initialisation's random draw, and
where an answer ends (splice trains through ``<|im_end|>``; TRL also on the newline the chat template
writes after it).

Each framework trains in its own subprocess; a third scores both adapters with splice's held-out
scorer (``splice.evaluation``: greedy answers to the first ``eval_samples`` (96) functions of the test
split, ``max_new_tokens`` 20; JSON-valid, exact match, word F1). The issue's bar: the two word F1s
within 2 points. Writes ``sft_anchor.json`` and ``sft_anchor.md`` under ``--out`` and prints the
table. ``--tiny``: a tiny random Llama with SmolLM2's tokenizer, 2 steps, 4 held-out rows (checks
this harness; the figures mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("splice", "trl")
METRICS = ("json_valid", "exact_match", "word_f1")
BAR = 0.02  # the bar on |word F1 (splice) - word F1 (TRL)|
TINY = {"steps": 2, "eval_samples": 4, "max_new_tokens": 4}  # --tiny: a harness check in about a minute


# ----------------------------------------------------------------------------- what both train on


def job(*, steps: int | None) -> dict[str, Any]:
    """The default job's options (``TrainConfig()``), with ``steps`` (None: the default's)."""
    from splice.training.config import DEFAULT_STEPS, TrainConfig

    c = TrainConfig()
    # What the TRL worker mirrors; a default it cannot mirror is named here, before any training.
    if c.optimizer != "adamw" or not c.pack or c.grad_accum != 1 or c.train_on_prompt or c.dora or c.rslora \
            or c.init != "default" or c.loraplus_ratio is not None or c.quantize or c.targets != "all-linear":
        raise SystemExit("sft_anchor: TrainConfig's defaults changed in a way the TRL worker does not mirror "
                         "(optimizer, packing, accumulation, prompt loss, LoRA variant or targets); update it")
    return {"steps": steps or DEFAULT_STEPS, "rank": c.rank, "alpha": c.alpha, "dropout": c.dropout,
            "targets": c.targets, "lr": c.lr, "weight_decay": c.weight_decay, "schedule": c.schedule,
            "warmup_steps": c.warmup_steps, "batch_size": c.batch_size, "max_grad_norm": c.max_grad_norm,
            "max_length": c.max_length, "seed": c.seed, "eval_samples": c.eval_samples,
            "max_new_tokens": c.max_new_tokens, "eval_batch_size": c.eval_batch_size}


def tiny_model(folder: Path) -> None:
    """A 2-layer random Llama with the embedded model's tokenizer (and chat template) in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from splice.models.loading import load_tokenizer

    tokenizer = load_tokenizer(None)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def trained_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    """The text of the tokens a row is trained on (labels not -100), spans joined by ``|``."""
    spans: list[list[int]] = []
    for t, label in enumerate(labels):
        if label == -100:
            continue
        if spans and labels[t - 1] != -100 and t > 0:
            spans[-1].append(ids[t])
        else:
            spans.append([ids[t]])
    return "|".join(tokenizer.decode(span) for span in spans)


# ----------------------------------------------------------------------------- workers


def splice_worker(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """The default job (``TrainConfig()`` but ``steps``; no scoring, which the score worker does)."""
    from splice.data.function_names import build_function_names, function_name_template
    from splice.data.rows import tokenize_rows
    from splice.models.loading import load_tokenizer
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    j = spec["job"]
    started = time.perf_counter()
    train(TrainConfig(model=spec["model"], output_dir=str(out / "run"), steps=j["steps"], eval_samples=0,
                      compare_base=False, save_every=0))
    seconds = time.perf_counter() - started
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    tokenizer = load_tokenizer(spec["model"])
    first = tokenize_rows(build_function_names()["train"][:1], tokenizer, template=function_name_template(),
                          max_length=j["max_length"]).examples[0]
    return {"adapter": str(out / "run" / "adapter"), "train_s": seconds,
            "steps": [{"step": s["step"], "loss": s["loss"], "lr": s["lr"], "grad_norm": s["grad_norm"],
                       "tokens": s["tokens"]} for s in steps],
            "trained_text_of_row_0": trained_text(tokenizer, first.input_ids, first.labels)}


def _trl_rows() -> Any:
    """The training split as TRL's conversational prompt/completion rows."""
    from datasets import Dataset

    from splice.data.function_names import build_function_names, function_name_messages

    messages = [function_name_messages(row) for row in build_function_names()["train"]]
    return Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in messages])


def trl_worker(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """TRL ``SFTTrainer`` + PEFT LoRA on the same rows with the same settings (module doc)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from splice.training.optim import lr_at

    j = spec["job"]
    base = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    torch.manual_seed(j["seed"])
    model = get_peft_model(base, LoraConfig(r=j["rank"], lora_alpha=j["alpha"], lora_dropout=j["dropout"],
                                             target_modules=j["targets"], task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=j["lr"], weight_decay=j["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, total=j["steps"], warmup=j["warmup_steps"], schedule=j["schedule"]))
    args = SFTConfig(output_dir=str(out / "run"), max_steps=j["steps"], per_device_train_batch_size=j["batch_size"],
                     gradient_accumulation_steps=1, learning_rate=j["lr"], weight_decay=j["weight_decay"],
                     max_grad_norm=j["max_grad_norm"], packing=True, max_length=j["max_length"], bf16=False,
                     fp16=False, gradient_checkpointing=False, seed=j["seed"], data_seed=j["seed"], logging_steps=1,
                     save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=_trl_rows(),
                         processing_class=tokenizer, optimizers=(optimizer, schedule))
    packed: Any = trainer.train_dataset  # a datasets.Dataset of packed rows (input_ids, labels, seq_lengths)
    row = packed[0]
    first = int(row["seq_lengths"][0])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(out / "run" / "adapter"))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    tokens = [entry.get("num_tokens", math.nan) for entry in logs]  # TRL's running total of input tokens
    return {"adapter": str(out / "run" / "adapter"), "train_s": seconds,
            "steps": [{"step": e["step"], "loss": e["loss"], "lr": e["learning_rate"], "grad_norm": e["grad_norm"],
                       "tokens": t - (tokens[i - 1] if i else 0)} for i, (e, t) in enumerate(zip(logs, tokens))],
            "examples_per_packed_row": sum(len(s) for s in packed["seq_lengths"]) / len(packed),
            "trained_text_of_row_0": trained_text(tokenizer, row["input_ids"][:first], row["labels"][:first])}


def score_worker(spec: dict[str, Any], adapters: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each adapter on the held-out rows, by splice's scorer (a fresh base model for each)."""
    from splice.data.function_names import build_function_names
    from splice.evaluation.scoring import evaluate_generation
    from splice.evaluation.tasks import function_names_task
    from splice.lora.peft_io import load_adapter
    from splice.models.loading import load_model

    j = spec["job"]
    rows = build_function_names()["test"][: j["eval_samples"]]
    scores = {}
    for framework, adapter in adapters.items():
        model, tokenizer = load_model(spec["model"])
        load_adapter(model, adapter)
        scores[framework] = evaluate_generation(model, tokenizer, rows, task=function_names_task(),
                                                max_new_tokens=j["max_new_tokens"], batch_size=j["eval_batch_size"])
    return scores


# ----------------------------------------------------------------------------- driver


def run_worker(kind: str, spec_path: Path, out: Path) -> dict[str, Any]:
    """``kind`` in its own interpreter; its JSON answer. The caller's PYTHONPATH stays."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    result = out / f"{kind}.json"
    with (out / f"{kind}.log").open("w") as log:
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", str(spec_path)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path}, check=False)
    if proc.returncode != 0 or not result.is_file():
        tail = (out / f"{kind}.log").read_text()[-3000:]
        raise SystemExit(f"sft_anchor: the {kind} worker failed (exit {proc.returncode}); its log ends:\n{tail}")
    answer: dict[str, Any] = json.loads(result.read_text())
    return answer


def worker(kind: str, spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    if kind == "score":
        answer: Any = score_worker(spec, {f: json.loads((out / f"{f}.json").read_text())["adapter"]
                                          for f in FRAMEWORKS})
    else:
        answer = (splice_worker if kind == "splice" else trl_worker)(spec, out / kind)
    (out / f"{kind}.json").write_text(json.dumps(answer, indent=1) + "\n")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def table(result: dict[str, Any]) -> str:
    j = result["job"]
    lines = [f"{j['steps']} steps of {j['batch_size']} packed rows x {j['max_length']} tokens, lr {j['lr']:g} "
             f"({j['warmup_steps']} warm-up steps, {j['schedule']}), LoRA r{j['rank']} alpha {j['alpha']:g} "
             f"{j['targets']}, dropout {j['dropout']:g}; {result['held_out']} held-out functions", "",
             "| framework | JSON-valid | exact match | word F1 | first loss | mean loss, last 5 steps "
             "| tokens/step | train s |", "|---|---|---|---|---|---|---|---|"]
    for name, f in (("splice (default job)", "splice"), ("TRL SFTTrainer + PEFT", "trl")):
        s, run = result["scores"][f], result["runs"][f]
        losses = [step["loss"] for step in run["steps"]]
        lines.append(f"| {name} | {s['json_valid']:.3f} | {s['exact_match']:.3f} | {s['word_f1']:.3f} "
                     f"| {losses[0]:.3f} | {_mean(losses[-5:]):.3f} | {_mean([x['tokens'] for x in run['steps']]):.0f} "
                     f"| {run['train_s']:.0f} |")
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    gap = result["scores"]["splice"]["word_f1"] - result["scores"]["trl"]["word_f1"]
    within = "within" if abs(gap) <= BAR else "NOT within"
    return (f"word F1 splice - TRL = {100 * gap:+.1f} points: {within} the issue's bar of "
            f"{100 * BAR:.0f} points ({result['held_out']} held-out functions)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the default job's)")
    parser.add_argument("--out", type=Path, default=Path("results/sft_anchor"))
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: checks this harness")
    parser.add_argument("--worker", choices=(*FRAMEWORKS, "score"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.spec)
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"sft_anchor: --out {args.out} is not empty; choose a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    from splice.models.loading import default_model_path, gguf_cache_path, load_tokenizer

    spec: dict[str, Any] = {"out": str(out), "job": job(steps=args.steps or (TINY["steps"] if args.tiny else None))}
    if args.tiny:
        spec["job"].update(eval_samples=TINY["eval_samples"], max_new_tokens=TINY["max_new_tokens"])
        tiny_model(out / "tiny-model")
        spec.update(model=str(out / "tiny-model"), model_folder=str(out / "tiny-model"))
    else:
        load_tokenizer(None)  # converts the embedded GGUF once, if no run has yet
        spec.update(model=None, model_folder=str(gguf_cache_path(default_model_path())))
    (out / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                              "command": " ".join(sys.argv), "tiny": args.tiny, "job": spec["job"],
                              "held_out": spec["job"]["eval_samples"], "runs": {}}
    for framework in FRAMEWORKS:  # one after the other: each has the machine to itself
        print(f"== {framework}", flush=True)
        result["runs"][framework] = run_worker(framework, out / "spec.json", out)
    print("== scoring both adapters", flush=True)
    result["scores"] = run_worker("score", out / "spec.json", out)
    result["word_f1_gap_points"] = 100 * (result["scores"]["splice"]["word_f1"] - result["scores"]["trl"]["word_f1"])
    result["verdict"] = verdict(result)
    text = table(result)
    print(text + "\n\n" + result["verdict"])
    (out / "sft_anchor.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "sft_anchor.md").write_text(text + "\n\n" + result["verdict"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
