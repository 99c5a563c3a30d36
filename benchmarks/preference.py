"""Preference training on one card: splice's DPO and GRPO against TRL + PEFT, in one invocation.

    PYTHONPATH=. python benchmarks/preference.py --out DIR [--parts dpo,grpo,nf4] [--frameworks splice,trl]
        [--limit-dpo S] [--limit-grpo S] [--limit-nf4 S] [--completion N] [--tiny]

Each (part, framework, checkpointing) runs in its own subprocess (a ``--worker``) on the same random
Llama-3-8B-shaped model (weights seeded per parameter name and made on the GPU by
``splice.models.streaming.random_quantized``, as ``benchmarks/qlora.py`` builds them; bf16, or NF4
for ``nf4``), the same word-level tokenizer (word ``t<i>`` is token ``i``, so a text of N words is N
tokens in both frameworks, and nothing is downloaded), the same synthetic rows, and LoRA r16,
alpha 32, every linear layer, no dropout. Peak memory is ``torch.cuda.max_memory_allocated`` from
the model's build to the last step (weights included).

* ``dpo``: ``--pairs`` 4 pairs a step, each a 256-token prompt with a 256-token chosen and a 256-token
  rejected answer (+ EOS); ``--dpo-warmup`` 2 warm-up then ``--dpo-steps`` timed steps; tokens/s counts
  prompt + answer tokens of both rows of every pair. The reference log-probs are computed in every
  step (adapters disabled, no grad) by both, or before training by both with ``--precompute-ref``
  (TRL's ``precompute_ref_log_probs``). splice: ``TrainConfig(method="dpo")`` through its own loop
  (``build_run`` + ``step``), a row for each ``--splice-checkpointing`` mode: ``auto`` (its default on
  a GPU: only the layers memory needs) and ``all`` (every layer, as TRL); TRL: ``DPOTrainer`` + PEFT
  ``LoraConfig``, TRL's defaults otherwise (bf16, gradient checkpointing on; ``--trl-checkpointing
  off`` turns it off).
* ``grpo``: ``--prompts`` 8 prompts x ``--generations`` 8 completions of ``--completion`` tokens (a random
  model almost never samples EOS, so nearly every completion is that long) from 64-token prompts,
  the reward ``even_words`` of ``_preference_reward.py`` (a regex) for both, micro-batches of
  ``--micro`` 32 completions; seconds per step, split into rollout (generation alone) and the rest
  (rewards, log-probs, backward, optimizer). splice: ``method="grpo"``, rollouts on splice's engine
  with the live adapter (checkpointing: the first ``--splice-checkpointing`` mode); TRL:
  ``GRPOTrainer`` generating with transformers (``use_vllm=False``).
* ``nf4``: the splice GRPO step on an NF4 base (``quantize="nf4"``).

Time limits: each part has ``--limit-<part>`` seconds, shared by its workers in turn (each gets its
``SHARE`` of what is left to the workers still to run). Once it has one timed step, a worker starts
no step that its last step's time says would end past its share; it is killed ``GRACE_S`` after
it. What it finished is kept (its JSON is written after every step) and its row says so.

Writes ``preference.json`` and ``preference.md`` under ``--out`` and prints the tables. ``--tiny``: a
tiny model on the CPU, a smoke test of this harness (the figures mean nothing; memory is the
process's peak RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SCRATCH = Path(os.environ.get("SPLICE_BENCH_TMP", Path(tempfile.gettempdir()) / "splice_preference"))
PARTS = ("dpo", "grpo", "nf4")
FRAMEWORKS = ("splice", "trl")
SHARE = {"splice": 1.0, "trl": 2.0}  # weights of a part's time limit
GRACE_S = 20.0  # after a worker's share: time to finish a step it started and to exit
FIRST_WORD = 3  # token ids 0, 1, 2: <pad>, <bos>, <eos> (Llama's default bos/eos ids)
LR, BETA, RANK, ALPHA = 1e-5, 0.1, 16, 32.0
# --tiny: sizes a CPU runs in seconds
TINY = dict(layers=2, prompt=16, answer=16, pairs=2, dpo_warmup=1, dpo_steps=1, grpo_prompt=8, prompts=2,
            generations=2, completion=8, micro=2, grpo_warmup=1, grpo_steps=1)


@dataclass(frozen=True)
class Workload:
    """The sizes both frameworks run (module doc)."""

    layers: int | None  # decoder layers (None: Llama-3-8B's 32)
    prompt: int  # DPO prompt tokens
    answer: int  # DPO tokens of each answer (+ EOS)
    pairs: int  # DPO pairs per step
    dpo_warmup: int
    dpo_steps: int
    grpo_prompt: int  # GRPO prompt tokens
    prompts: int  # GRPO prompts per step
    generations: int  # GRPO completions per prompt
    completion: int  # GRPO max completion tokens
    micro: int  # GRPO completions per micro-batch
    grpo_warmup: int
    grpo_steps: int
    precompute_ref: bool
    trl_checkpointing: bool  # TRL's gradient checkpointing (its default: on)
    splice_checkpointing: str  # "auto" (its default on a GPU: the layers memory needs) | "all" (every layer)

    def dpo_tokens(self) -> int:
        """Tokens of one DPO step: prompt + answer + EOS, for the chosen and the rejected row of each pair."""
        return self.pairs * 2 * (self.prompt + self.answer + 1)

    def steps(self, part: str) -> tuple[int, int]:
        """(warm-up, timed) steps of ``part``."""
        return (self.dpo_warmup, self.dpo_steps) if part == "dpo" else (self.grpo_warmup, self.grpo_steps)


# ----------------------------------------------------------------------------- shared by both frameworks


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(FIRST_WORD, vocab)}" for _ in range(n))


def pair_rows(w: Workload, vocab: int) -> list[dict[str, str]]:
    """Text preference pairs (the prompt ends in a space: both frameworks tokenize prompt + answer)."""
    rng = random.Random(0)
    count = w.pairs * (w.dpo_warmup + w.dpo_steps)
    return [{"prompt": _words(rng, w.prompt, vocab) + " ", "chosen": _words(rng, w.answer, vocab),
             "rejected": _words(rng, w.answer, vocab)} for _ in range(count)]


def prompt_rows(w: Workload, vocab: int) -> list[dict[str, str]]:
    rng = random.Random(1)
    count = w.prompts * (w.grpo_warmup + w.grpo_steps)
    return [{"prompt": _words(rng, w.grpo_prompt, vocab)} for _ in range(count)]


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer of ``vocab`` ids: ``t<i>`` is id ``i``, split on whitespace, no BOS added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(FIRST_WORD, vocab)}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def base_model(w: Workload, *, quantize: str | None, tiny: bool) -> tuple[Any, Any]:
    """(model, tokenizer): the random Llama (fp32 on the CPU, as splice's CPU default), finished as
    splice's loader finishes a loaded model (pad/eos ids, generation with a KV cache)."""
    import _workload
    import torch
    from qlora import llama_config

    from splice.models.loading import _finish_load
    from splice.models.streaming import random_quantized

    config = llama_config("8b", layers=w.layers, tiny=tiny)
    model: Any = random_quantized(config, quantize=quantize, device=_workload.DEVICE,
                                  dtype=torch.float32 if tiny else torch.bfloat16)
    tokenizer = word_tokenizer(config.vocab_size)
    _finish_load(model, tokenizer)
    return model.train(), tokenizer


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Recorder:
    """A worker's row: every finished step's seconds and extras, summarised and written after each step,
    so a worker killed at its time limit leaves what it finished."""

    def __init__(self, path: Path, row: dict[str, Any], *, warmup: int, steps: int, deadline: float) -> None:
        self.path, self.row, self.warmup, self.planned, self.deadline = path, row, warmup, steps, deadline
        self.steps: list[dict[str, Any]] = []
        self.pending: dict[str, float] = {}  # seconds added up during the current step (rollouts)
        self.t = time.perf_counter()

    def start(self) -> None:
        _sync()
        self.t = time.perf_counter()
        self.save()

    def add(self, key: str, seconds: float) -> None:
        self.pending[key] = self.pending.get(key, 0.0) + seconds

    def step_done(self, **extra: Any) -> bool:
        """Record the step that just ended; whether the worker should stop: all steps done, or one timed
        step done and no time for another like the last (the hard limit may still stop the first)."""
        _sync()
        now = time.perf_counter()
        self.steps.append({"s": now - self.t, **self.pending, **extra})
        self.pending, self.t = {}, now
        self.save()
        if len(self.steps) >= self.warmup + self.planned:
            return True
        return len(self.steps) > self.warmup and time.time() + self.steps[-1]["s"] > self.deadline

    def annotate(self, **extra: Any) -> None:
        """Extras that come after the step ended (TRL logs after ``on_step_end``)."""
        if self.steps:
            self.steps[-1].update(extra)
            self.save()

    def save(self, *, final: bool = False) -> None:
        timed = self.steps[self.warmup:]
        row = self.row
        row.update(steps=self.steps, timed_steps=len(timed), planned_steps=self.planned, peak_gib=_peak_gib())
        if timed:
            for key in ("s", "rollout_s", "rollout_score_s", "completion_length"):
                if all(key in s for s in timed):
                    row["step_s" if key == "s" else key] = sum(s[key] for s in timed) / len(timed)
            if "rollout_s" in row:
                row["rest_s"] = row["step_s"] - row["rollout_s"]
            if row["part"] == "dpo":
                row["tok_s"] = row["tokens_per_step"] / row["step_s"]
        if final:
            row["status"] = ("complete" if len(timed) >= self.planned else
                             f"time limit: {len(timed)} of {self.planned} timed steps")
        self.path.write_text(json.dumps(row, indent=1))


# ----------------------------------------------------------------------------- splice


@contextlib.contextmanager
def _given_model(model: Any, tokenizer: Any, device: str) -> Iterator[None]:
    """``build_run`` loads ``config.model`` through ``setup.prepare_model``; here that returns the random
    model built above (an 8B model cannot be written and read back in the time a part has). The rest
    of the run (LoRA, fused kernels, checkpointing, the method, the optimizer) is splice's own."""
    import torch

    import splice.training.setup as setup

    original = setup.prepare_model

    def prepared(config: Any, *, load_device: Any = None) -> tuple[Any, Any, Any, str]:
        return model, tokenizer, torch.device(device), "bf16" if device == "cuda" else "fp32"

    setup.prepare_model = prepared
    try:
        yield
    finally:
        setup.prepare_model = original


def splice_config(part: str, w: Workload, out: Path, vocab: int) -> Any:
    from splice.training.config import TrainConfig

    warmup, steps = w.steps(part)
    common: dict[str, Any] = dict(
        output_dir=str(out), rank=RANK, alpha=ALPHA, dropout=0.0, targets="all-linear", lr=LR,
        schedule="constant", warmup_steps=0, val_fraction=0.0, eval_samples=0, compare_base=False,
        save_every=0, seed=0, steps=warmup + steps, gradient_checkpointing=w.splice_checkpointing == "all")
    if part == "dpo":
        return TrainConfig(**common, method="dpo", data=pair_rows(w, vocab), batch_size=w.pairs, beta=BETA,
                           max_length=w.prompt + w.answer + 8, precompute_ref=w.precompute_ref)
    per_micro = w.micro // w.generations  # prompts per micro-batch
    return TrainConfig(**common, method="grpo", data=prompt_rows(w, vocab),
                       reward=f"{HERE / '_preference_reward.py'}:even_words",
                       batch_size=per_micro, grad_accum=w.prompts // per_micro, num_generations=w.generations,
                       max_completion_length=w.completion, max_length=w.grpo_prompt + w.completion + 8,
                       quantize="nf4" if part == "nf4" else None)


def run_splice(part: str, model: Any, tokenizer: Any, w: Workload, rec: Recorder) -> None:
    import _workload

    from splice.training.loop import step
    from splice.training.setup import build_run

    out = SCRATCH / f"{part}-splice-run"
    shutil.rmtree(out, ignore_errors=True)
    config = splice_config(part, w, out, model.config.vocab_size)
    with _given_model(model, tokenizer, _workload.DEVICE):
        run = build_run(config)
    rec.start()
    for _ in range(config.steps):
        stats = step(run, stop={})
        extra: dict[str, Any] = {"loss": stats.loss, "tokens": stats.tokens}
        if "rollout_s" in stats.metrics:
            rec.add("rollout_s", stats.metrics["rollout_s"])
            extra.update(completion_length=stats.metrics["completion_length"],
                         reward=stats.metrics["reward_mean"])
        if rec.step_done(**extra):
            break


# ----------------------------------------------------------------------------- TRL + PEFT


def _timer(rec: Recorder) -> Any:
    """A TrainerCallback timing each optimizer step into ``rec`` and stopping training at its deadline."""
    from transformers import TrainerCallback

    logged = {"loss": "loss", "reward": "reward", "completions/mean_length": "completion_length",
              "num_tokens": "tokens_seen"}  # (tokens_seen: input tokens of every step so far)

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rec.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if rec.step_done():
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            rec.annotate(**{name: (logs or {})[key] for key, name in logged.items() if key in (logs or {})})

    return Timer()


def _timed(obj: Any, name: str, rec: Recorder, key: str) -> None:
    """Wrap method ``name`` of ``obj`` so its seconds (device work included) add up under ``key``."""
    original: Callable[..., Any] = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        _sync()
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync()
            rec.add(key, time.perf_counter() - t0)

    setattr(obj, name, timed)


def run_trl(part: str, model: Any, tokenizer: Any, w: Workload, rec: Recorder) -> None:
    import _workload
    from datasets import Dataset
    from peft import LoraConfig

    cuda = _workload.DEVICE == "cuda"
    warmup, steps = w.steps(part)
    peft_config = LoraConfig(r=RANK, lora_alpha=int(ALPHA), lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    common: dict[str, Any] = dict(
        output_dir=str(SCRATCH / f"{part}-trl-run"), max_steps=warmup + steps, learning_rate=LR,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, bf16=cuda, fp16=False, use_cpu=not cuda,
        gradient_checkpointing=w.trl_checkpointing, dataloader_num_workers=0)
    vocab = model.config.vocab_size
    if part == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo = DPOConfig(**common, per_device_train_batch_size=w.pairs, max_length=w.prompt + w.answer + 8,
                        beta=BETA, precompute_ref_log_probs=w.precompute_ref)
        trainer: Any = DPOTrainer(model=model, args=dpo, train_dataset=Dataset.from_list(pair_rows(w, vocab)),
                                  processing_class=tokenizer, peft_config=peft_config,
                                  callbacks=[_timer(rec)])
    else:
        from trl import GRPOConfig, GRPOTrainer

        grpo = GRPOConfig(**common, per_device_train_batch_size=w.micro,
                          gradient_accumulation_steps=w.prompts * w.generations // w.micro,
                          num_generations=w.generations, max_completion_length=w.completion, temperature=1.0,
                          top_p=1.0, use_vllm=False, beta=0.0)
        from _preference_reward import even_words

        reward: Any = even_words  # (TRL types rewards as returning list[float | None])
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=grpo,
                              train_dataset=Dataset.from_list(prompt_rows(w, vocab)),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[_timer(rec)])
        _timed(trainer, "_generate_single_turn", rec, "rollout_s")  # generation alone
        _timed(trainer, "_generate_and_score_completions", rec, "rollout_score_s")  # + rewards, log-probs
    trainer.train()


# ----------------------------------------------------------------------------- worker and driver


def _installed(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def workload(args: argparse.Namespace) -> Workload:
    values = {f.name: getattr(args, f.name) for f in fields(Workload)}  # (flags named as the fields)
    return Workload(**{**values, "trl_checkpointing": args.trl_checkpointing == "on"})


def _name(part: str, framework: str, checkpointing: str) -> str:
    return f"{part}-{framework}-{checkpointing}"


def worker(args: argparse.Namespace) -> None:
    """One (part, framework, checkpointing): build the model, train, and keep its JSON current."""
    import _workload
    import torch
    from train_throughput import _versions

    part, framework = args.worker.split(":")
    _workload.configure(tiny=args.tiny, device="cpu" if args.tiny else "cuda")
    w = workload(args)
    warmup, steps = w.steps(part)
    checkpointing = w.splice_checkpointing if framework == "splice" else args.trl_checkpointing
    row: dict[str, Any] = {
        "part": part, "framework": framework, "checkpointing": checkpointing, "status": "running",
        "base": "nf4" if part == "nf4" else ("fp32" if args.tiny else "bf16"),
        "memory": "process peak RSS (CPU)" if args.tiny else "cuda max_memory_allocated",
        "versions": {**_versions(), **{name: _installed(name) for name in ("trl", "datasets")}}}
    if part == "dpo":
        row.update(tokens_per_step=w.dpo_tokens(),
                   reference="precomputed" if w.precompute_ref else "every step")
    rec = Recorder(SCRATCH / f"{_name(part, framework, checkpointing)}.json", row, warmup=warmup, steps=steps,
                   deadline=args.deadline)
    try:
        t0 = time.perf_counter()
        model, tokenizer = base_model(w, quantize="nf4" if part == "nf4" else None, tiny=args.tiny)
        row["build_s"] = time.perf_counter() - t0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the weights stay counted: they are allocated
        (run_splice if framework == "splice" else run_trl)(part, model, tokenizer, w, rec)
        rec.save(final=True)
    except Exception as error:
        row.update(status=f"error: {type(error).__name__}: {' '.join(str(error).split())[:400]}",
                   trace=traceback.format_exc()[-4000:])
        rec.save()
        raise


def run_worker(part: str, framework: str, checkpointing: str, budget: float,
               argv: list[str]) -> dict[str, Any]:
    """Run one worker for ``budget`` seconds (+ GRACE_S); its row, with how it ended."""
    path = SCRATCH / f"{_name(part, framework, checkpointing)}.json"
    path.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    mode = "--splice-checkpointing" if framework == "splice" else "--trl-checkpointing"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", f"{part}:{framework}",
               mode, checkpointing, "--deadline", f"{time.time() + budget:.1f}"]
    t0 = time.perf_counter()
    try:
        rc: int | str = subprocess.run(command, timeout=budget + GRACE_S, env=env, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = "killed"
    row: dict[str, Any] = {"part": part, "framework": framework, "checkpointing": checkpointing}
    if path.exists():
        row = json.loads(path.read_text())
    status = row.get("status", "running")
    if rc == "killed":
        row["status"] = (f"killed at the time limit ({budget:.0f} s + {GRACE_S:.0f} s) after "
                         f"{row.get('timed_steps', 0)} of {row.get('planned_steps', '?')} timed steps")
    elif rc != 0 and not status.startswith("error"):
        row["status"] = f"exited with code {rc}"
    row.update(returncode=rc, wall_s=time.perf_counter() - t0, budget_s=budget)
    return row


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cells(row: dict[str, Any], keys: tuple[tuple[str, str], ...]) -> str:
    name = {"splice": "splice", "trl": "TRL + PEFT"}[row["framework"]]
    label = f"{name} (checkpointing {row['checkpointing']})"
    cells = [label, *(_fmt(row.get(key), spec) for key, spec in keys), str(row.get("timed_steps", 0)),
             str(row.get("status"))]
    return "| " + " | ".join(cells) + " |"


def tables(rows: list[dict[str, Any]], w: Workload) -> str:
    """The DPO and GRPO tables (markdown), with splice's ratios to TRL."""
    def trl(part: str) -> dict[str, Any]:
        return next((r for r in rows if r["part"] == part and r["framework"] == "trl"), {})

    reference = "precomputed" if w.precompute_ref else "every step"
    lines = [f"DPO: {w.pairs} pairs x ({w.prompt} prompt + {w.answer} answer tokens) a step, reference "
             f"log-probs {reference}, {w.dpo_warmup} warm-up steps", "",
             "| framework | tokens/s | s/step | peak GiB | timed steps | status |",
             "|---|---|---|---|---|---|"]
    dpo = [r for r in rows if r["part"] == "dpo"]
    lines += [_cells(r, (("tok_s", ",.0f"), ("step_s", ".3f"), ("peak_gib", ".2f"))) for r in dpo]
    theirs = trl("dpo")
    for mine in (r for r in dpo if r["framework"] == "splice" and r.get("tok_s") and theirs.get("tok_s")):
        lines.append(f"\nsplice (checkpointing {mine['checkpointing']}) / TRL: "
                     f"{mine['tok_s'] / theirs['tok_s']:.2f}x tokens/s (target >= 3x), "
                     f"{mine['peak_gib'] / theirs['peak_gib']:.2f}x peak memory (target <= 1x)")
    lines += ["", f"GRPO: {w.prompts} prompts x {w.generations} generations, {w.completion} completion "
              f"tokens, {w.grpo_prompt}-token prompts, micro-batches of {w.micro}, {w.grpo_warmup} warm-up "
              "step(s)", "", "| framework | base | s/step | rollout s | rest s | completion tokens "
              "| peak GiB | timed steps | status |", "|---|---|---|---|---|---|---|---|---|"]
    grpo = [r for r in rows if r["part"] in ("grpo", "nf4")]
    lines += [_cells(r, (("base", "s"), ("step_s", ".2f"), ("rollout_s", ".2f"), ("rest_s", ".2f"),
                         ("completion_length", ".0f"), ("peak_gib", ".2f"))) for r in grpo]
    theirs = trl("grpo")
    for mine in (r for r in grpo if r["framework"] == "splice" and r.get("step_s") and theirs.get("step_s")):
        ratio = theirs["step_s"] / mine["step_s"]
        lines.append(f"\nTRL / splice ({mine['base']}) seconds per step: {ratio:.2f}x"
                     + (" (target >= 5x)" if mine["part"] == "grpo" else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--parts", default="dpo,grpo,nf4", help="of dpo, grpo, nf4 (nf4: splice only)")
    ap.add_argument("--frameworks", default="splice,trl")
    for part, default in (("dpo", 90.0), ("grpo", 150.0), ("nf4", 60.0)):
        ap.add_argument(f"--limit-{part}", type=float, default=default, help=f"seconds for the {part} part")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all 32)")
    for name, default in (("prompt", 256), ("answer", 256), ("pairs", 4), ("dpo-warmup", 2), ("dpo-steps", 5),
                          ("grpo-prompt", 64), ("prompts", 8), ("generations", 8), ("completion", 512),
                          ("micro", 32), ("grpo-warmup", 1), ("grpo-steps", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--precompute-ref", action="store_true", help="DPO: reference log-probs before training")
    ap.add_argument("--trl-checkpointing", choices=("on", "off"), default="on",
                    help="TRL's gradient checkpointing (its default: on)")
    ap.add_argument("--splice-checkpointing", default="auto,all",
                    help="splice's, comma-separated, a DPO row each (GRPO: the first): auto (its default "
                         "on a GPU: the layers memory needs), all (every layer, as TRL's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks this harness")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    bad = sorted(set(args.parts.split(",")) - set(PARTS) | set(args.frameworks.split(",")) - set(FRAMEWORKS))
    if bad:
        ap.error(f"unknown part or framework {', '.join(bad)}: parts are {', '.join(PARTS)}; "
                 "frameworks splice, trl")
    modes = args.splice_checkpointing.split(",")
    if not modes or set(modes) - {"auto", "all"}:
        ap.error(f"--splice-checkpointing {args.splice_checkpointing}: give auto, all or auto,all")
    if args.micro % args.generations or (args.prompts * args.generations) % args.micro:
        ap.error(f"--micro {args.micro} must be a multiple of --generations {args.generations} and divide "
                 f"--prompts x --generations ({args.prompts * args.generations})")
    return args


def _runs(part: str, args: argparse.Namespace) -> list[tuple[str, str]]:
    """(framework, checkpointing) of each worker of ``part``: a DPO row per splice mode, GRPO with the
    first; TRL in dpo and grpo."""
    runs = []
    for framework in (f for f in args.frameworks.split(",") if f):
        if framework == "splice":
            modes = args.splice_checkpointing.split(",")
            runs += [("splice", mode) for mode in (modes if part == "dpo" else modes[:1])]
        elif part != "nf4":
            runs.append(("trl", args.trl_checkpointing))
    return runs


def main() -> None:
    args = parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = workload(args)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "python": sys.version.split()[0], "tiny": args.tiny,
        "workload": asdict(w), "rows": []}
    for part in [p for p in args.parts.split(",") if p]:
        runs = _runs(part, args)
        end = time.time() + getattr(args, f"limit_{part}")
        for i, (framework, mode) in enumerate(runs):
            # the part's time left, shared by the runs still to go: TRL's steps are the longer ones
            budget = max(0.0, (end - time.time()) * SHARE[framework] / sum(SHARE[f] for f, _ in runs[i:]))
            print(f"== {part} / {framework} (checkpointing {mode}): {budget:.0f} s", flush=True)
            result["rows"].append(run_worker(part, framework, mode, budget, sys.argv[1:]))
            (out / "preference.json").write_text(json.dumps(result, indent=1))
    table = tables(result["rows"], w)
    (out / "preference.md").write_text(table + "\n")
    print(table, flush=True)


if __name__ == "__main__":
    main()
