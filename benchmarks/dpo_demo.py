"""DPO after SFT on the embedded function-naming task, on a CPU.

Time on this project's 2-core machine: the SFT stage is ``make train``'s job (5 min 20 s idle,
2026-12-05); the DPO stage with ``--sft-from`` took 615 s on the machine shared with other jobs
(docs/benchmarks.md); ``--sft-from DIR`` reuses an earlier run's SFT stage and pairs.

    PYTHONPATH=. python benchmarks/dpo_demo.py --out results/dpo_demo [--quick]

1. SFT: ``splice train``'s default job (embedded SmolLM2-135M-Instruct, the function-naming task),
   which scores the base model and the SFT adapter on held-out functions.
2. Pairs from training functions the demo did not score: chosen = the reference answer
   (``{"name": "<the real name>"}``); rejected = the SFT model's own greedy answer where it is
   wrong (on-policy negatives), else the name of another function. Chat-message rows, as TRL takes them.
3. DPO from the SFT model: the SFT adapter merged into the base, a new LoRA trained with
   ``method="dpo"`` on the pairs, the reference being the merged SFT model (adapters disabled).
   ``--rpo-alpha A``: DPO+NLL (RPO), the chosen answers' NLL per token weighted A added to the loss.
4. The same held-out functions scored with the DPO adapter.

Prints base / SFT / DPO held-out scores (JSON-valid, exact match, word F1) and whether DPO beats
SFT-only on word F1; writes ``dpo_demo.json`` under ``--out``. ``--quick``: a smoke test (a few
steps and rows; the scores mean nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any


def _pairs(rows: list[dict[str, Any]], answers: list[str], seed: int) -> tuple[list[dict[str, Any]], int]:
    """Chat-message pairs (module doc) and how many rejected answers are the SFT model's own."""
    from splice.data.function_names import function_name_messages
    from splice.evaluation.tasks import name_words, parse_name

    rng = random.Random(seed)
    names = [row["name"] for row in rows]
    pairs, own = [], 0
    for row, output in zip(rows, answers, strict=True):
        system, user, chosen = function_name_messages(row)
        wrong = parse_name(output) != row["name"]
        if wrong:
            rejected = output.strip()
            own += 1
        else:  # the SFT model got it: another function's name, sharing no word with this one
            other = rng.choice([n for n in names if not set(name_words(n)) & set(name_words(row["name"]))])
            rejected = json.dumps({"name": other})
        pairs.append({"prompt": [system, user], "chosen": [chosen],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs, own


def _scores(model_dir: str | None, adapter: Path, rows: list[dict[str, Any]], *, max_new_tokens: int) -> dict[str, float]:
    from splice.evaluation.scoring import evaluate_generation
    from splice.evaluation.tasks import function_names_task
    from splice.lora.peft_io import load_adapter
    from splice.models.loading import load_model

    model, tokenizer = load_model(model_dir)
    load_adapter(model, adapter)
    return evaluate_generation(model, tokenizer, rows, task=function_names_task(), max_new_tokens=max_new_tokens,
                               batch_size=16)


def _sft_answers_and_merge(adapter: Path, rows: list[dict[str, Any]], merged: Path, *,
                           max_new_tokens: int) -> list[str]:
    """The SFT model's greedy answers to ``rows``; then the adapter merged into the base, saved to ``merged``."""
    from splice.evaluation.scoring import answer
    from splice.evaluation.tasks import function_name_prompt
    from splice.lora.apply import merge
    from splice.lora.peft_io import load_adapter
    from splice.models.loading import load_model

    model, tokenizer = load_model(None)
    load_adapter(model, adapter)
    outputs = answer(model, tokenizer, [function_name_prompt(row, tokenizer) for row in rows],
                     max_new_tokens=max_new_tokens, batch_size=16)
    merge(model, unload=True)
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    return outputs


def _sft_stage(args: argparse.Namespace, splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Steps 1-2 of the module doc into ``--out``: the SFT scores, merged model, pairs and seconds."""
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    t0 = time.perf_counter()
    sft = train(TrainConfig(output_dir=str(args.out / "sft"), steps=args.sft_steps, eval_samples=args.eval,
                            save_every=0))
    t_sft = time.perf_counter()
    # Pairs from the end of the training split (the 40-step SFT run reads ~400 of its 6k+ rows).
    rows = splits["train"][-args.pairs:]
    answers = _sft_answers_and_merge(args.out / "sft" / "adapter", rows, args.out / "sft_merged",
                                     max_new_tokens=TrainConfig().max_new_tokens)
    pairs, own = _pairs(rows, answers, seed=0)
    with (args.out / "pairs.jsonl").open("w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return {"base": sft.metrics["base"], "SFT": sft.metrics["final"], "dir": args.out, "pairs": len(pairs),
            "own": own, "losses": sft.losses, "seconds": {"sft_with_base_and_sft_scores": round(t_sft - t0, 1),
                                                            "pairs_and_merge": round(time.perf_counter() - t_sft, 1)}}


def _reused_sft(folder: Path) -> dict[str, Any]:
    """Steps 1-2 from an earlier demo's ``--out`` (its dpo_demo.json, sft_merged/ and pairs.jsonl)."""
    earlier = json.loads((folder / "dpo_demo.json").read_text())
    return {"base": earlier["scores"]["base"], "SFT": earlier["scores"]["SFT"], "dir": folder,
            "pairs": earlier["pairs"], "own": earlier["rejected_from_sft_model"], "losses": earlier["losses"]["sft"],
            "seconds": {"sft_reused_from": str(folder)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/dpo_demo"))
    parser.add_argument("--quick", action="store_true", help="smoke test: a few steps and rows")
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=120, help="preference pairs built from training functions")
    parser.add_argument("--eval", type=int, default=96, help="held-out functions scored")
    parser.add_argument("--lr", type=float, default=2e-4, help="DPO learning rate")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--rpo-alpha", type=float, default=None,
                        help="DPO+NLL: weight of the chosen answers' NLL in the loss (default: off, plain DPO)")
    parser.add_argument("--sft-from", type=Path, default=None,
                        help="an earlier demo's --out: reuse its SFT scores, merged SFT model and pairs "
                             "(steps 1-2), e.g. to compare DPO losses on the same pairs")
    args = parser.parse_args()
    if args.quick:
        args.sft_steps, args.dpo_steps, args.pairs, args.eval = 2, 2, 8, 4
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"dpo_demo: --out {args.out} is not empty; choose a new folder")
    if args.sft_from is not None and not (args.sft_from / "dpo_demo.json").is_file():
        sys.exit(f"dpo_demo: --sft-from {args.sft_from} has no dpo_demo.json; pass an earlier demo's --out")
    args.out.mkdir(parents=True, exist_ok=True)

    from splice.data.function_names import build_function_names
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    t0 = time.perf_counter()
    splits = build_function_names()
    held_out = splits["test"][: args.eval]
    sft = _sft_stage(args, splits) if args.sft_from is None else _reused_sft(args.sft_from)
    t_pairs = time.perf_counter()
    dpo = train(TrainConfig(model=str(sft["dir"] / "sft_merged"), data=str(sft["dir"] / "pairs.jsonl"),
                            method="dpo", output_dir=str(args.out / "dpo"), steps=args.dpo_steps, lr=args.lr,
                            beta=args.beta, rpo_alpha=args.rpo_alpha, val_fraction=0.0, eval_samples=0,
                            compare_base=False, save_every=0, warmup_steps=2))
    t_dpo = time.perf_counter()
    dpo_scores = _scores(str(sft["dir"] / "sft_merged"), args.out / "dpo" / "adapter", held_out,
                         max_new_tokens=TrainConfig().max_new_tokens)
    t_end = time.perf_counter()

    dpo_name = "SFT + DPO" if args.rpo_alpha is None else "SFT + DPO+NLL"
    table = {"base": sft["base"], "SFT": sft["SFT"], dpo_name: dpo_scores}
    train_rows = [json.loads(line) for line in (args.out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in train_rows if r["kind"] == "train"]
    lines = [f"{'model':<16}{'json_valid':>12}{'exact_match':>13}{'word_f1':>10}"]
    lines += [f"{name:<16}{s['json_valid']:>12.3f}{s['exact_match']:>13.3f}{s['word_f1']:>10.3f}"
              for name, s in table.items()]
    beats = dpo_scores["word_f1"] > sft["SFT"]["word_f1"]
    lines.append(f"{dpo_name.removeprefix('SFT + ')} {'beats' if beats else 'does not beat'} SFT-only on held-out "
                 f"word F1 ({dpo_scores['word_f1']:.3f} vs {sft['SFT']['word_f1']:.3f}, {len(held_out)} functions)")
    print("\n".join(lines))
    report = {
        "held_out_functions": len(held_out), "scores": table, "dpo_beats_sft_word_f1": beats,
        "pairs": sft["pairs"], "rejected_from_sft_model": sft["own"],
        "settings": {"sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps, "dpo_lr": args.lr, "beta": args.beta,
                     "rpo_alpha": args.rpo_alpha, "sft_from": args.sft_from and str(args.sft_from),
                     "quick": args.quick},
        "dpo_train": {"first": train_rows[0], "last": train_rows[-1]} if train_rows else {},
        "seconds": {**sft["seconds"], "dpo": round(t_dpo - t_pairs, 1), "dpo_scores": round(t_end - t_dpo, 1),
                    "total": round(t_end - t0, 1)},
        "losses": {"sft": sft["losses"], "dpo": dpo.losses},
    }
    (args.out / "dpo_demo.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"written {args.out / 'dpo_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
