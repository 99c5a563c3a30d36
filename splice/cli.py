"""The ``splice`` command: train, generate, eval, merge, serve.

``splice train`` with no flags fine-tunes the embedded SmolLM2-135M-Instruct on the embedded
function-naming dataset and prints base vs fine-tuned scores on held-out functions.

Errors: every failure ends as one line ``splice <cmd>: error: <what, where, the fix>`` on stderr,
with exit code 2 for bad usage or input, 1 for a failure at run time, 130 / 143 when stopped by
SIGINT / SIGTERM. ``--debug`` (anywhere on the line, or ``SPLICE_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, NoReturn

import splice.commands as commands
from splice.core.allocator import default_to_expandable
from splice.core.errors import SpliceError, one_line
from splice.training.config import DEFAULT_EPOCHS, DEFAULT_STEPS, MIN_HELD_OUT, TrainConfig

_HELP = {
    "model": "HF model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)",
    "data": "training data: a .jsonl, .json, .csv or .parquet file or a save_to_disk folder; the shape "
            "(prompt/completion, Alpaca, chat, ShareGPT ...) is detected from the columns (default: "
            "embedded function-naming task)",
    "val_data": "validation data, a file or folder as --data (default: split --val-fraction off the "
                "training rows)",
    "prompt_template": "prompt format string over the columns, e.g. 'Q: {question}\\nA: '",
    "response_template": "answer format string, e.g. '{answer}' (trained on; the prompt is not)",
    "system_prompt": "system message (with --chat)",
    "chat": "render prompt/answer through the tokenizer's chat template",
    "output_dir": "run directory: adapter/, checkpoints/, metrics.jsonl, loss.png",
    "rank": "LoRA rank r", "alpha": "LoRA alpha (scale = alpha / r)", "dropout": "LoRA dropout",
    "targets": "'all-linear', a regex, or comma-separated module names (q_proj,v_proj)",
    "rslora": "scale by alpha / sqrt(r)",
    "steps": f"optimizer steps (default: {DEFAULT_EPOCHS:g} epochs of --data, as TRL; {DEFAULT_STEPS} steps on "
             "the embedded task)",
    "epochs": "passes over the training rows, instead of --steps (a run over more than 3 says so)",
    "lr": "peak learning rate", "optimizer": "adamw or sgd", "weight_decay": "weight decay",
    "schedule": "cosine, linear or constant (after warmup)", "warmup_steps": "linear warmup steps",
    "batch_size": "examples per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "max_grad_norm": "gradient clipping norm (0: off)", "max_length": "max tokens per example",
    "max_rows": "use at most this many training rows",
    "max_line_bytes": "longest line of a JSONL/CSV data file, in bytes (default: 16 MiB); a longer one is "
                      "refused, file and line named",
    "val_fraction": f"share of --data held out for validation and scoring (default: 5%%, at least "
                    f"{MIN_HELD_OUT} rows while 80%% is left to train)",
    "pack": "pack short examples into max-length rows", "train_on_prompt": "loss on prompt tokens too",
    "precision": "auto, bf16 or fp32", "device": "auto, cpu, cuda, cuda:1 ...",
    "gradient_checkpointing": "recompute activations in backward (less memory)",
    "fuse": "fused kernels and memory-aware checkpointing (default: on with a CUDA GPU)",
    "offload_checkpoints": "keep checkpointed activations in CPU memory", "seed": "random seed",
    "offload_compression": "with --offload-checkpoints: store each offloaded layer input in 8 bits with a scale "
                           "per token, half the host memory: fp8 (recommended) or int8; the loss is unchanged, "
                           "the gradients move by the inputs' rounding (default: none)",
    "mlp_chunk_tokens": "run each SwiGLU MLP this many tokens at a time, forward and backward (e.g. 65536): "
                        "its intermediates then scale with the chunk, not the sequence, for the longest "
                        "sequences; exact, one more gate/up pass per chunk without checkpointing (default: off)",
    "keep_attention": "with checkpointing, keep each layer's attention internals too (in CPU memory "
                      "with --offload-checkpoints): no q/k/v/o or attention recompute, more memory",
    "embeddings_on_host": "keep the frozen input embedding in CPU memory (frees its GPU copy: the "
                          "lowest peak; steps run without CUDA graphs)",
    "cuda_graphs": "replay each training step from a CUDA graph (default: on with --fuse on a GPU)",
    "eval_every": "validation loss every N steps (0: at the end)",
    "eval_batches": "validation batches per evaluation",
    "eval_samples": "held-out examples scored by generation (0: none)",
    "eval_batch_size": "prompts per generation batch", "max_new_tokens": "tokens generated per answer",
    "compare_base": "score the base model before training", "save_every": "checkpoint every N steps",
    "keep_checkpoints": "checkpoints kept", "max_bad_steps": "non-finite losses in a row before stopping",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "quantize": "quantize the frozen base: nf4 (QLoRA, 4-bit NormalFloat as bitsandbytes), int8, or fp8 "
                "(e4m3 weights, FP8 GEMMs; a GPU of compute capability 8.9+) (default: none)",
    "last_turn_only": "conversations: loss on the last assistant turn only (default: every assistant turn)",
    "report_to": "also log to these trackers, comma-separated: tensorboard, wandb, csv (default: none)",
    "shard": "under torchrun: FSDP2 (weights sharded over the ranks, per decoder layer) instead of "
             "DDP; without torchrun: FSDP2 on one device (default: off; on when the model would "
             "take over half of one GPU)",
    "dist_timeout": "seconds a collective waits for the other ranks before failing (default: 600)",
    # LoRA variants (issue 18)
    "dora": "DoRA: learn a magnitude per output channel too (better at low rank, ~LoRA's speed fused)",
    "init": "adapter init: default, gaussian, pissa, pissa_niter_N (fast SVD) or olora (PiSSA/OLoRA "
            "start from the weight's principal part; the base keeps the residual)",
    "loraplus_ratio": "LoRA+: lora_B's learning rate is lr * this (e.g. 16); default: off",
    "adapter": "start from this adapter folder and train it further, with its rank, alpha and targets "
               "(e.g. GRPO or DPO after SFT); default: a fresh LoRA",
    # preference and reward training (issue 27)
    "method": "sft (next-token loss on the answers), dpo (preference pairs: prompt/chosen/rejected rows) "
              "or grpo (rewards of sampled completions: prompt rows and --reward) (default: sft)",
    "beta": "dpo: the strength of the pull to the reference (default 0.1); grpo: the weight of the KL "
            "term to the reference (default: 0)",
    "label_smoothing": "dpo sigmoid loss: the chance a pair's preference is wrong, cDPO (default: 0)",
    "loss_type": "dpo: sigmoid or ipo (default: sigmoid); grpo: dapo, grpo or dr_grpo (default: dapo, TRL's)",
    "precompute_ref": "dpo: compute the reference log-probs once before training (default: off: in "
                      "every step, with the adapters disabled)",
    "rpo_alpha": "dpo: add this weight times the chosen answers' NLL (mean per token) to the loss: RPO, "
                 "DPO+NLL, TRL's loss_type [sigmoid, sft] (default: off)",
    "reward": "grpo: a reward function FILE.py:FUNCTION, f(prompts, completions, **columns) -> list of "
              "floats (repeatable; default: none)",
    "reward_weights": "grpo: one weight per --reward, comma-separated (default: all 1)",
    "num_generations": "grpo: completions sampled per prompt (default: 8)",
    "max_completion_length": "grpo: tokens per sampled completion (default: 256)",
    "epsilon": "grpo: clip range of the surrogate objective (default: 0.2)",
    "temperature": "grpo: sampling temperature of the rollouts (default: 1.0)",
    "top_p": "grpo: nucleus of the rollouts (default: 1.0: off)",
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
        aliases = ["--fast"] if f.name == "fuse" else []  # the flag's name before 0.2
        if base == "bool":
            parser.add_argument(flag, *aliases, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif f.name == "reward":  # repeatable; TrainConfig holds them comma-separated
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(base, str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind: type, *, low: float | None = None, high: float | None = None,
            above: bool = False, says: str = "") -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` in [low, high] (``above``: strictly above low)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        bad = not math.isfinite(value) or (low is not None and (value <= low if above else value < low)) \
            or (high is not None and value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: {says}")
        return value

    return parse


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The train command's template options, for commands that render a data file."""
    p.add_argument("--prompt-template", help=_HELP["prompt_template"])
    p.add_argument("--response-template", help=_HELP["response_template"])
    p.add_argument("--chat", action="store_true", help=_HELP["chat"])
    p.add_argument("--system-prompt", help=_HELP["system_prompt"])
    p.add_argument("--last-turn-only", action="store_true", help=_HELP["last_turn_only"])
    p.add_argument("--max-length", type=int, default=352, help="max tokens per example (default: 352)")
    p.add_argument("--max-line-bytes", type=_at_least_one, default=TrainConfig.max_line_bytes,
                   help=_HELP["max_line_bytes"])


# Options of other trainers (transformers' TrainingArguments and TRL, axolotl, PEFT's LoraConfig),
# spelled with "-" and lower case, -> the splice flag that does the same.
_FOREIGN_FLAGS = {
    "lora-r": "--rank", "r": "--rank", "lora-rank": "--rank", "lora-alpha": "--alpha",
    "lora-dropout": "--dropout", "target-modules": "--targets", "lora-target-modules": "--targets",
    "lora-target-linear": "--targets all-linear", "use-rslora": "--rslora", "use-dora": "--dora",
    "init-lora-weights": "--init", "num-train-epochs": "--epochs", "num-epochs": "--epochs",
    "max-steps": "--steps", "learning-rate": "--lr", "per-device-train-batch-size": "--batch-size",
    "micro-batch-size": "--batch-size", "train-batch-size": "--batch-size",
    "per-device-eval-batch-size": "--eval-batch-size", "gradient-accumulation-steps": "--grad-accum",
    "max-seq-length": "--max-length", "max-seq-len": "--max-length", "sequence-len": "--max-length",
    "cutoff-len": "--max-length", "lr-scheduler-type": "--schedule", "lr-scheduler": "--schedule",
    "optim": "--optimizer", "warmup-ratio": "--warmup-steps", "save-steps": "--save-every",
    "eval-steps": "--eval-every", "save-total-limit": "--keep-checkpoints",
    "resume-from-checkpoint": "--resume", "model-name-or-path": "--model", "base-model": "--model",
    "dataset": "--data", "dataset-name": "--data", "datasets": "--data", "train-file": "--data",
    "data-path": "--data", "validation-file": "--val-data", "val-set-size": "--val-fraction",
    "load-in-4bit": "--quantize nf4", "load-in-8bit": "--quantize int8", "bf16": "--precision bf16",
    "packing": "--pack", "sample-packing": "--pack", "train-on-inputs": "--train-on-prompt",
    "precompute-ref-log-probs": "--precompute-ref", "reward-funcs": "--reward",
}


def _suggestion(token: str, options: list[str]) -> str | None:
    """The splice flag for an unknown ``token`` of the command line: another trainer's name for it,
    the same name with "_" (``--output_dir``), or a close spelling; None when nothing is close."""
    import difflib

    key = token.lstrip("-").split("=")[0].lower().replace("_", "-")
    known = _FOREIGN_FLAGS.get(key)
    if known is not None and known.split()[0] in options:
        return known
    if f"--{key}" in options:
        return f"--{key}"
    close = difflib.get_close_matches(f"--{key}", options, n=1, cutoff=0.8)
    return close[0] if close else None


def _unknown_arguments(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> NoReturn:
    """Exit 2 with one line: the unknown arguments, and the flag each flag probably meant."""
    options: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            options = [o for a in action.choices[command]._actions for o in a.option_strings]
    pairs = [(t, _suggestion(t, options)) for t in extra if t.startswith("-")]
    hints = [(t.split("=")[0], s) for t, s in pairs if s is not None]
    message = f"unrecognized arguments: {' '.join(extra)}"
    if len(hints) == 1:
        message += f"; did you mean {hints[0][1]}?"
    elif hints:
        message += "; did you mean " + ", ".join(f"{s} (for {t})" for t, s in hints) + "?"
    _Parser(prog=f"splice {command}").error(message)


def _version() -> str:
    """The installed distribution's version, without importing the package (torch); from a source tree that
    is not installed (on PYTHONPATH), its pyproject.toml's version marked ``+source``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splice")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text())["project"]["version"]) + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown (not installed)"


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a base model and adapters on an OpenAI-compatible API")
    p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--adapter", action="append", help="NAME=PATH of a PEFT adapter folder (repeatable); "
                   "requests pick it with model=NAME")
    p.add_argument("--name", default=None, help="the base model's name in /v1/models (default: folder name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-len", type=int, default=1024, help="context per request (prompt + completion)")
    p.add_argument("--gpu-adapters", type=int, default=8,
                   help="adapters resident on the device at once (more are kept in host memory)")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-request-bytes", type=_at_least_one, default=1 << 20,
                   help="largest request body; larger ones get 413 (default 1 MiB)")
    p.add_argument("--drain-timeout", default=30.0, type=_number(float, low=0, says="must be >= 0 seconds"),
                   help="seconds running requests get to finish after SIGTERM; then they are cancelled")
    p.add_argument("--api-key", action="append", default=None,
                   help="a key clients send as 'Authorization: Bearer KEY' (repeatable; also $SPLICE_API_KEY, "
                        "comma-separated); without keys the server is open; /health and /ready never need one")
    p.add_argument("--allow-adapter-dir", default=None, metavar="DIR",
                   help="the folder /v1/load_lora_adapter may load adapters from (and hub ids from the local "
                        "hub cache); default: loading and unloading at run time answer 403")
    p.add_argument("--quantize", choices=("nf4", "int8"), default=None,
                   help="quantize the base model's linears as it loads (a local model folder)")
    p.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                   help="the K/V cache: auto (the model's dtype) or int8 (8-bit with a scale per token and head: "
                        "about half the bytes a decode step reads, twice the tokens in the same memory)")
    p.add_argument("--kv-memory", default=0.8, type=_number(float, low=0, high=1, above=True,
                                                             says="give a fraction of the free GPU memory in (0, 1]"),
                   help="on a GPU, the K/V cache may take at most this fraction of the memory free after the model "
                        "loads (default 0.8); it holds up to 4x max-batch x max-len tokens (the rest caches prefixes)")
    p.set_defaults(run=commands.cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="splice", description="LoRA fine-tuning on a model rewriter.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also after the command, or SPLICE_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"splice {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="fine-tune with LoRA (defaults: SmolLM2-135M on the "
                             "function-naming task)")
    _add_train_flags(p_train)
    p_train.set_defaults(run=commands.cmd_train)

    def model_flags(p: argparse.ArgumentParser, *, adapter_required: bool = False, quantize: bool = True) -> None:
        p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M)")
        p.add_argument("--adapter", required=adapter_required, help="adapter directory (PEFT format)")
        p.add_argument("--device", default="auto")
        if quantize:  # export's --quantize is the GGUF's block type instead
            p.add_argument("--quantize", choices=["nf4", "int8", "fp8"], default=None,
                           help="quantize the base as it loads (the adapter was trained on a quantized "
                                "base: merge then writes its dequantized weights + adapter in bf16)")

    p_gen = sub.add_parser("generate", help="generate text with a model and optional adapter")
    model_flags(p_gen)
    p_gen.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; or stdin)")
    p_gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p_gen.add_argument("--max-new-tokens", type=_at_least_one, default=64)
    p_gen.add_argument("--temperature", default=0.0, help="0: greedy",
                       type=_number(float, low=0, says="the temperature must be a finite number >= 0 (0: greedy)"))
    p_gen.add_argument("--top-k", default=0, type=_number(int, low=0, says="must be >= 0 (0: off)"))
    p_gen.add_argument("--top-p", default=1.0,
                       type=_number(float, low=0, above=True, high=1, says="must be in (0, 1] (1: off)"))
    p_gen.add_argument("--seed", type=_number(int, low=0, high=2**63 - 1, says="must be in [0, 2**63)"),
                       default=None)
    p_gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    p_gen.add_argument("--kv-cache", choices=("auto", "int8"), default="auto",
                       help="the K/V cache: auto (the model's dtype) or int8 (8-bit, a scale per token and head)")
    p_gen.set_defaults(run=commands.cmd_generate)

    p_eval = sub.add_parser("eval", help="score base vs adapter: validation loss, perplexity and "
                            "generation metrics on --data (default: held-out functions)")
    model_flags(p_eval)
    p_eval.add_argument("--data", help="held-out data file or save_to_disk folder, any shape train "
                        "accepts (default: the embedded task's --split)")
    _data_flags(p_eval)
    p_eval.add_argument("--split", default="test", choices=["train", "validation", "test"],
                        help="embedded task split (without --data)")
    p_eval.add_argument("--samples", type=_number(int, low=0, says="must be an integer >= 0"), default=100, help="rows scored by generation (0: loss only); without --data also the "
                        "split's rows the loss covers (0: all of them)")
    p_eval.add_argument("--batch-size", type=_at_least_one, default=16, help="rows per batch")
    p_eval.add_argument("--max-new-tokens", type=_at_least_one, default=24)
    p_eval.add_argument("--json", help="also write the scores to this JSON file")
    p_eval.add_argument("--predictions", help="also write each scored row's prompt, reference and answers "
                        "(base, adapter) to this JSONL file")
    p_eval.set_defaults(run=commands.cmd_eval)

    p_data = sub.add_parser("data", help="preview how the first rows of a data file render, trained "
                            "tokens marked")
    p_data.add_argument("file", help="data file (.jsonl/.json/.csv/.parquet) or save_to_disk folder")
    p_data.add_argument("--model", default=None, help="model whose tokenizer renders the rows "
                        "(default: embedded SmolLM2-135M)")
    _data_flags(p_data)
    p_data.add_argument("--train-on-prompt", action="store_true", help=_HELP["train_on_prompt"])
    p_data.add_argument("--rows", type=int, default=3, help="rows shown (default: 3)")
    p_data.add_argument("--tokens", action="store_true", help="also list every token as id/label piece")
    p_data.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                        help="mark trained tokens in colour (default: on a terminal)")
    p_data.set_defaults(run=commands.cmd_data)

    p_export = sub.add_parser("export", help="write a model (merged with --adapter) or an adapter alone "
                              "as GGUF for llama.cpp / Ollama")
    model_flags(p_export, quantize=False)
    p_export.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    p_export.add_argument("--output", required=True, help="the .gguf file to write")
    p_export.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p_export.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16"],
                          help="tensor type of the weights (default: f16)")
    p_export.add_argument("--quantize", choices=["q8_0", "q4_k"], default=None,
                          help="store the 2-D weights in llama.cpp's Q8_0 or Q4_K blocks (a weight whose rows "
                               "are not a multiple of 32 / 256 values stays in --outtype)")
    p_export.add_argument("--adapter-only", action="store_true",
                          help="write only the adapter, as a llama.cpp GGUF LoRA (use with the base GGUF)")
    p_export.set_defaults(run=commands.cmd_export)

    p_merge = sub.add_parser("merge", help="fold an adapter into the base and save a HF checkpoint")
    model_flags(p_merge, adapter_required=True)
    p_merge.add_argument("--output", required=True, help="new directory for the merged model")
    p_merge.set_defaults(run=commands.cmd_merge)
    _add_serve_parser(sub)
    return parser


_at_least_one = _number(int, low=1, says="must be an integer >= 1")


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself: checkpoint, then return)."""


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    def handler(_signum: int, _frame: Any) -> None:
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another --output-dir",
    errno.EDQUOT: "the disk quota is used up: free space or choose another --output-dir",
    errno.EFBIG: "the file is too large for this file system or limit",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.EACCES: "permission denied: choose a location you can write to",
    errno.EPERM: "not permitted: choose a location you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a directory; a file was expected",
}


def _explain(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error that reached the command line."""
    if isinstance(exc, SpliceError):
        return exc.exit_code, one_line(str(exc))
    if isinstance(exc, FileNotFoundError):
        return 2, one_line(str(exc) if not exc.filename else f"{exc.filename} does not exist")
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        hint = _OS_HINTS.get(exc.errno or 0, "check the path and the disk")
        return 1, one_line(f"cannot use{where}: {exc.strerror or exc}; {hint}")
    if isinstance(exc, UnicodeDecodeError):
        return 2, one_line(f"a file is not UTF-8 text ({exc}); save it as UTF-8")
    if isinstance(exc, (ValueError, KeyError, TypeError)):  # lower layers' checks of the input
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return 2, one_line(str(text))
    if isinstance(exc, MemoryError):
        return 1, "out of memory: lower --batch-size or --max-length"
    return 1, one_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                       "traceback, and please report it)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SPLICE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named with the subcommand, as every other error
        _unknown_arguments(parser, args.command, extra)
    try:
        with _sigterm_exits():
            return int(args.run(args))
    except KeyboardInterrupt:
        print(f"splice {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"splice {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as exc:
        if debug:
            raise
        code, message = _explain(exc)
        print(f"splice {args.command}: error: {message}", file=sys.stderr)
        return code


def entry(argv: list[str] | None = None) -> int:
    """The ``splice`` program: :func:`main` in a process whose CUDA allocator uses expandable
    segments unless the user set it (torch reads it when CUDA starts, so before any command), and
    whose Hugging Face progress bars are off when stderr is not a terminal (a log keeps no carriage
    returns). Library callers keep their own settings."""
    default_to_expandable()
    if not sys.stderr.isatty():
        # Hugging Face's own bars (loading weights, downloads, saving shards) redraw with carriage
        # returns, which a log file keeps; splice's bars print plain lines there (core.progress).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # Plain tqdm bars of libraries (transformers' GGUF conversion) follow TQDM_DISABLE; splice's
        # own bars pass disable=False and print plain lines instead.
        os.environ.setdefault("TQDM_DISABLE", "1")
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
