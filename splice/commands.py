"""What each ``splice`` subcommand does (train, generate, eval, data, export, merge, serve), given the
parsed arguments; :mod:`splice.cli` parses the command line and turns errors into one line.

Every check of the arguments that needs no model (output paths, adapter files, data shapes) runs
before the model loads. torch and transformers are imported inside the commands only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from splice.core.errors import UsageError, one_line
from splice.training.config import TrainConfig

__all__ = ["cmd_data", "cmd_eval", "cmd_export", "cmd_generate", "cmd_merge", "cmd_serve", "cmd_train", "load",
           "new_dir", "new_file", "train_config"]


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The train command's options: its flags over its ``--config`` file (:meth:`TrainConfig.from_sources`)."""
    flags = {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
    if isinstance(flags["reward"], list):  # --reward is repeatable
        flags["reward"] = ",".join(flags["reward"])
    return TrainConfig.from_sources(flags, config_file=args.config)


def cmd_train(args: argparse.Namespace) -> int:
    from splice.training.loop import train

    result = train(train_config(args))
    return 128 + (result.stopped_by or signal.SIGINT) if result.interrupted else 0


def new_dir(path: Path, option: str) -> None:
    """Create ``path`` (an output folder) now, before slow work, or say why it cannot be."""
    if path.is_file():
        raise UsageError(f"{option} {path} is a file; pass a new directory")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{option} {path} is not empty: choose a new directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {option} {path} ({exc.strerror or exc}); choose a writable "
                         "location") from exc


def new_file(path: Path, option: str) -> None:
    """Check, before slow work, that a file can be written at ``path``."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; pass a file name")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{option} {path}: {blocker} is a file, not a folder")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"{option} {path}: folder {path.parent} is not writable")


def check_prompts(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> None:
    """Refuse prompts that, with the tokens to generate, pass the model's context."""
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not isinstance(context, int):
        return
    for number, prompt in enumerate(prompts, start=1):
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length + max_new_tokens > context:
            raise UsageError(
                f"prompt {number} is {length} tokens; with --max-new-tokens {max_new_tokens} it "
                f"passes the model's context of {context} tokens: shorten it or lower --max-new-tokens")


def _unreadable_weights(model: str | None, exc: Exception) -> UsageError:
    """One line naming the model's safetensors file that does not open (truncated, not safetensors)."""
    from safetensors import safe_open

    folder = Path(model) if model else None
    for file in sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # any failure to open names this file
            return UsageError(f"{file} ({file.stat().st_size} bytes) is not a readable safetensors file "
                              f"({one_line(str(exc))}); it may be truncated: re-download or re-save the model")
    return UsageError(f"the weights of model {model} are not readable ({one_line(str(exc))}); re-download "
                      "or re-save the model")


def load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch
    from safetensors import SafetensorError

    from splice.core.device import resolve_device
    from splice.lora.peft_io import load_adapter, read_adapter
    from splice.models.loading import load_model

    quantize = getattr(args, "quantize", None)
    device = resolve_device(args.device)
    if args.adapter:
        read_adapter(args.adapter)  # a broken adapter file is found before the model loads
    dtype = torch.bfloat16 if quantize and device.type == "cuda" else torch.float32
    try:
        model, tokenizer = load_model(args.model, device=device, quantize=quantize, dtype=dtype)
    except SafetensorError as exc:
        raise _unreadable_weights(args.model, exc) from exc
    if quantize and getattr(args, "dequantize", False):
        from splice.core.rewrite import unrewrite

        unrewrite(model)  # float linears holding the dequantized weights the adapter trained on
    if args.adapter:
        load_adapter(model, args.adapter)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from splice.generation.generate import generate

    model, tokenizer = load(args)
    prompts = list(args.prompt) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or lines on standard input")
    if args.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    check_prompts(model, tokenizer, prompts, args.max_new_tokens)
    outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, stop=args.stop or (), kv_cache=args.kv_cache)
    for text in outputs:
        print(text)
    return 0


def data_template(args: argparse.Namespace, rows: list[dict[str, Any]], where: str) -> Any:
    """The template the data/eval commands render rows with (the train options), every row checked."""
    from splice.data.formats import choose_template, columns_of
    from splice.data.rows import check_template

    template = choose_template(columns_of(rows), prompt_template=args.prompt_template,
                               response_template=args.response_template, chat=args.chat,
                               system_prompt=args.system_prompt, last_turn_only=args.last_turn_only)
    check_template(rows, template, where=where)
    return template


def cmd_eval(args: argparse.Namespace) -> int:
    from splice.evaluation.compare import compare_rows, compare_table
    from splice.evaluation.scoring import text_task
    from splice.evaluation.tasks import function_names_task
    from splice.training.validate import validation_loss

    for option, path in (("--json", args.json), ("--predictions", args.predictions)):
        if path:
            new_file(Path(path), option)

    if args.data:
        from splice.data.rows import read_rows

        rows = read_rows(args.data, max_line_bytes=args.max_line_bytes)
        template = data_template(args, rows, args.data)  # before the model loads
        task, source = text_task(template), str(args.data)
    else:
        from splice.data.function_names import build_function_names, function_name_template

        split = build_function_names()[args.split]
        rows = split[: args.samples] if args.samples else split  # --samples 0: the loss over the whole split
        template, task, source = function_name_template(), function_names_task(), f"{args.split} functions"
    model, tokenizer = load(args)
    device = next(model.parameters()).device

    def loss(model: Any, examples: Any) -> float:
        return validation_loss(model, examples, batch_size=args.batch_size, pad_id=tokenizer.pad_token_id,
                               device=device)

    result = compare_rows(model, tokenizer, rows, template=template, task=task, loss=loss,
                          max_length=args.max_length, samples=args.samples,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"{source}: {len(rows)} rows, {min(args.samples, len(rows))} scored by generation")
    print(compare_table(result.scores))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": source, "rows": len(rows), **result.scores}, indent=1) + "\n")
    if args.predictions:
        with Path(args.predictions).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in result.predictions)
        print(f"{len(result.predictions)} answers (prompt, reference, {', '.join(result.scores)}) "
              f"written to {args.predictions}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from splice.data.formats import columns_of
    from splice.data.preview import preview_rows, shape_name
    from splice.data.rows import read_rows
    from splice.models.loading import load_tokenizer

    rows = read_rows(args.file, max_line_bytes=args.max_line_bytes)
    template = data_template(args, rows, args.file)
    shape = shape_name(columns_of(rows), templated=args.prompt_template is not None, chat=args.chat)
    tokenizer = load_tokenizer(args.model)
    color = sys.stdout.isatty() if args.color is None else args.color
    print(preview_rows(rows, tokenizer, template=template, max_length=args.max_length,
                       train_on_prompt=args.train_on_prompt, count=args.rows, color=color, tokens=args.tokens,
                       shape=shape))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from splice.export.gguf import check_output, export_gguf, export_lora_gguf
    from splice.lora.adapter_file import read_adapter

    out = check_output(args.output, overwrite=args.overwrite)  # before the model loads
    types = {"outtype": args.outtype, "quantize": args.quantize, "overwrite": args.overwrite}
    if args.adapter_only:
        if not args.adapter:
            raise ValueError("--adapter-only needs --adapter DIR (the adapter to write as a GGUF LoRA)")
        read_adapter(args.adapter)  # a broken adapter file is found before the model loads
        model, _ = load(argparse.Namespace(model=args.model, adapter=None, device="cpu"))
        written = export_lora_gguf(model, args.adapter, out, **types)
    else:
        model, tokenizer = load(argparse.Namespace(model=args.model, adapter=args.adapter, device="cpu"))
        if args.adapter:
            from splice.lora.apply import merge

            merge(model, unload=True)
        written = export_gguf(model, tokenizer, out, **types)
    print(f"{'GGUF LoRA adapter' if args.adapter_only else 'GGUF model'} written to {written}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from splice.core.io import follow_umask
    from splice.lora.apply import merge

    out = Path(args.output)
    new_dir(out, "--output")
    args.dequantize = True  # a QLoRA adapter merges into the dequantized (not the original) base
    model, tokenizer = load(args)
    merge(model, unload=True)
    if args.quantize:
        import torch

        model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    follow_umask(out)  # safetensors writes 0600 files; a merged model is for sharing
    print(f"merged model written to {out} (a plain Hugging Face checkpoint)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from splice.distributed.process import launched
    from splice.serve.auth import api_keys
    from splice.serve.server import parse_adapters, serve

    adapters = parse_adapters(list(args.adapter or []))  # bad specs fail before the model loads
    keys = api_keys(args.api_key or [], os.environ)
    if launched():  # torchrun: the base split over the ranks (tensor parallelism), rank 0 serves HTTP
        from splice.serve.tensor_parallel import serve_sharded as serve
    serve(args.model, adapters=adapters, host=args.host, port=args.port, device=args.device,
          dtype=args.dtype, model_name=args.name, max_batch=args.max_batch, max_len=args.max_len,
          gpu_adapters=args.gpu_adapters, max_lora_rank=args.max_lora_rank,
          max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout,
          api_keys=keys, allow_adapter_dir=args.allow_adapter_dir, quantize=args.quantize, kv_cache=args.kv_cache,
          kv_memory=args.kv_memory)
    return 0
