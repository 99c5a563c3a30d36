"""The ``splice`` command: train, generate, eval, merge.

``splice train`` with no flags fine-tunes the embedded SmolLM2-135M-Instruct on the embedded
function-naming dataset and prints base vs fine-tuned scores on held-out functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from splice.training.config import TrainConfig, load_config_file

_HELP = {
    "model": "HF model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)",
    "data": "training data: .parquet, .jsonl or .csv (default: embedded function-naming task)",
    "val_data": "validation data file (default: split --val-fraction off the training rows)",
    "prompt_template": "prompt format string over the columns, e.g. 'Q: {question}\\nA: '",
    "response_template": "answer format string, e.g. '{answer}' (trained on; the prompt is not)",
    "system_prompt": "system message (with --chat)",
    "chat": "render prompt/answer through the tokenizer's chat template",
    "output_dir": "run directory: adapter/, checkpoints/, metrics.jsonl, loss.png",
    "rank": "LoRA rank r", "alpha": "LoRA alpha (scale = alpha / r)", "dropout": "LoRA dropout",
    "targets": "'all-linear', a regex, or comma-separated module names (q_proj,v_proj)",
    "rslora": "scale by alpha / sqrt(r)",
    "steps": "optimizer steps (0: use --epochs)", "epochs": "epochs when --steps is 0",
    "lr": "peak learning rate", "optimizer": "adamw or sgd", "weight_decay": "weight decay",
    "schedule": "cosine, linear or constant (after warmup)", "warmup_steps": "linear warmup steps",
    "batch_size": "examples per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping norm (0: off)", "max_length": "max tokens per example",
    "max_rows": "use at most this many training rows", "val_fraction": "validation share",
    "pack": "pack short examples into max-length rows", "train_on_prompt": "loss on prompt tokens too",
    "precision": "auto, bf16 or fp32", "device": "auto, cpu, cuda, cuda:1 ...",
    "gradient_checkpointing": "recompute activations in backward (less memory)",
    "fast": "fused kernels and memory-aware checkpointing (default: on with a CUDA GPU)",
    "offload_checkpoints": "keep checkpointed activations in CPU memory", "seed": "random seed",
    "keep_attention": "with checkpointing, keep each layer's attention internals too (in CPU memory "
                      "with --offload-checkpoints): no q/k/v/o or attention recompute, more memory",
    "cuda_graphs": "replay each training step from a CUDA graph (default: on with --fast on a GPU)",
    "eval_every": "validation loss every N steps (0: at the end)",
    "eval_batches": "validation batches per evaluation",
    "eval_samples": "held-out examples scored by generation (0: none)",
    "eval_batch_size": "prompts per generation batch", "max_new_tokens": "tokens generated per answer",
    "compare_base": "score the base model before training", "save_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept", "max_bad_steps": "non-finite losses in a row before stopping",
    "resume": "continue the run in --output-dir from its last checkpoint",
    # LoRA variants (issue 18)
    "dora": "DoRA: learn a magnitude per output channel too (better at low rank, ~LoRA's speed fused)",
    "init": "adapter init: default, gaussian, pissa, pissa_niter_N (fast SVD) or olora (PiSSA/OLoRA "
            "start from the weight's principal part; the base keeps the residual)",
    "loraplus_ratio": "LoRA+: lora_B's learning rate is lr * this (e.g. 16); default: off",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML or YAML file of options (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = _HELP.get(f.name, "")
        if "default" not in help_text:
            help_text += f" (default: {default})"
        base = str(f.type).split("|")[0].strip()  # "int | None" -> "int" (string annotations)
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(base, str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    if values.get("steps") == 0:
        values["steps"] = None
    return TrainConfig(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from splice.training.loop import train

    result = train(_train_config(args))
    return 130 if result.interrupted else 0


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from splice.lora.peft_io import load_adapter
    from splice.models.loading import load_model
    from splice.training.setup import resolve_device

    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    if args.adapter:
        load_adapter(model, args.adapter)
    return model, tokenizer


def _cmd_generate(args: argparse.Namespace) -> int:
    from splice.generation.generate import generate

    model, tokenizer = _load(args)
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or lines on standard input")
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, stop=args.stop or ())
    for text in outputs:
        print(text)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from splice.evaluation.scoring import evaluate_generation
    from splice.evaluation.tasks import build_function_names
    from splice.training.setup import function_names_task

    model, tokenizer = _load(args)
    rows = build_function_names()[args.split][: args.samples]
    task = function_names_task()
    report: dict[str, dict[str, float]] = {}
    if args.adapter:
        report["base"] = evaluate_generation(model, tokenizer, rows, task=task, base=True,
                                             max_new_tokens=args.max_new_tokens)
    report["adapter" if args.adapter else "base"] = evaluate_generation(
        model, tokenizer, rows, task=task, max_new_tokens=args.max_new_tokens)
    print(f"{len(rows)} {args.split} functions")
    for name, scores in report.items():
        print(f"{name:>8}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from splice.lora.layers import merge

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: choose a new directory for the merged model")
    model, tokenizer = _load(args)
    merge(model, unload=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} (a plain Hugging Face checkpoint)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splice", description="LoRA fine-tuning on a model rewriter.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with LoRA (defaults: SmolLM2-135M on the "
                             "function-naming task)")
    _add_train_flags(p_train)
    p_train.set_defaults(run=_cmd_train)

    def model_flags(p: argparse.ArgumentParser, *, adapter_required: bool = False) -> None:
        p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M)")
        p.add_argument("--adapter", required=adapter_required, help="adapter directory (PEFT format)")
        p.add_argument("--device", default="auto")

    p_gen = sub.add_parser("generate", help="generate text with a model and optional adapter")
    model_flags(p_gen)
    p_gen.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; or stdin)")
    p_gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=None)
    p_gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    p_gen.set_defaults(run=_cmd_generate)

    p_eval = sub.add_parser("eval", help="score base vs adapter on held-out functions")
    model_flags(p_eval)
    p_eval.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p_eval.add_argument("--samples", type=int, default=100)
    p_eval.add_argument("--max-new-tokens", type=int, default=24)
    p_eval.add_argument("--json", help="also write the scores to this JSON file")
    p_eval.set_defaults(run=_cmd_eval)

    p_merge = sub.add_parser("merge", help="fold an adapter into the base and save a HF checkpoint")
    model_flags(p_merge, adapter_required=True)
    p_merge.add_argument("--output", required=True, help="new directory for the merged model")
    p_merge.set_defaults(run=_cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"splice {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
