"""Setting up a run from its config: the model on its device, and the tokenized data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.core.device import resolve_device
from splice.data.formats import choose_template, columns_of
from splice.data.rows import (
    ChatTemplate,
    Example,
    PromptTemplate,
    Row,
    check_template,
    describe_source,
    read_rows,
    split_rows,
    tokenize_rows,
)
from splice.evaluation.scoring import Task, text_task
from splice.models.loading import load_model
from splice.training.config import TrainConfig

__all__ = ["RunData", "RunRows", "prepare_data", "prepare_model", "prepare_rows", "run_rewrites"]


def prepare_model(config: TrainConfig, *, load_device: torch.device | None = None,
                  ) -> tuple[nn.Module, Any, torch.device, str]:
    """(model, tokenizer, device, precision): bf16 autocast on GPU by default, fp32 on CPU.
    ``load_device``: where the weights are loaded, if not on ``device`` (FSDP2 loads on the CPU
    and moves each rank's shard to the GPU itself, so no GPU ever holds the whole model)."""
    device = resolve_device(config.device)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    # Frozen base weights in bf16 on GPU (half the memory); adapters stay fp32 (PEFT's default).
    dtype = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else torch.float32
    # Loaded on the CPU for FSDP2: a quantized model still quantizes on this rank's GPU (fast),
    # one weight at a time, each going to the CPU once packed.
    elsewhere = load_device is not None and load_device != device and device.type == "cuda"
    model, tokenizer = load_model(config.model, dtype=dtype, device=load_device or device,
                                  quantize=config.quantize,
                                  quantize_device=device if elsewhere and config.quantize else None)
    model.config.use_cache = False  # training: no KV cache (generation turns it on itself)
    return model, tokenizer, device, precision


def run_rewrites(model: nn.Module, config: TrainConfig, device: torch.device) -> list[str]:
    """Opt-in rewrites after LoRA is attached: fused kernels (``fuse``, on by default on a GPU),
    activation checkpointing of the decoder layers, and the input embedding in host memory
    (``embeddings_on_host``). Returns what was rewritten."""
    from splice.fused.apply import fuse
    from splice.memory.checkpointing import checkpoint_layers

    fused = config.fuses(device.type)
    names = fuse(model) if fused else []
    if config.gradient_checkpointing or config.offload_checkpoints:
        names += checkpoint_layers(model, layers="all", offload=config.offload_checkpoints,
                                   keep_attention=config.keep_attention)
    elif fused and device.type == "cuda":
        names += checkpoint_layers(model, layers="auto")  # recompute only what memory needs
    if config.embeddings_on_host:
        from splice.memory.host_embedding import embeddings_to_host

        names += embeddings_to_host(model)
    return names


@dataclass
class RunData:
    train: list[Example]
    validation: list[Example]
    eval_rows: list[Row]  # held-out rows scored by generation
    task: Task
    truncated: int
    dropped: int
    source: str

    def describe(self) -> str:
        return (f"data: {self.source}: {len(self.train)} training examples ({self.truncated} "
                f"truncated, {self.dropped} dropped as too long), {len(self.validation)} validation, "
                f"{len(self.eval_rows)} held-out for generation")


def _template(config: TrainConfig, columns: set[str]) -> PromptTemplate | ChatTemplate:
    return choose_template(columns, prompt_template=config.prompt_template,
                           response_template=config.response_template, chat=config.chat,
                           system_prompt=config.system_prompt, last_turn_only=config.last_turn_only)


@dataclass
class RunRows:
    """A run's rows and template, read and checked before any model loads."""

    train: list[Row]
    validation: list[Row]
    eval_rows: list[Row]
    template: PromptTemplate | ChatTemplate
    task: Task
    source: str


def prepare_rows(config: TrainConfig) -> RunRows:
    """Read, split and render every row (no tokenizer needed): a bad file, shape, column or value
    is an error naming it before the slow model load."""
    if config.data is None:
        from splice.evaluation.tasks import build_function_names, function_name_template, function_names_task

        splits = build_function_names()
        return RunRows(train=splits["train"], validation=splits["validation"],
                       eval_rows=splits["test"][: config.eval_samples], template=function_name_template(),
                       task=function_names_task(),
                       source="embedded function-naming task (Python standard library)")
    rows = read_rows(config.data)
    source = describe_source(config.data)
    if config.val_data:
        train_rows, val_rows = rows, read_rows(config.val_data)
    else:
        train_rows, val_rows = split_rows(rows, val_fraction=config.val_fraction, seed=config.seed)
    template = _template(config, columns_of(rows))
    check_template(rows, template, where=source)
    if config.val_data:
        check_template(val_rows, template, where=describe_source(config.val_data))
    if config.max_rows is not None:
        train_rows = train_rows[: config.max_rows]
    return RunRows(train=train_rows, validation=val_rows, eval_rows=val_rows[: config.eval_samples],
                   template=template, task=text_task(template), source=source)


def prepare_data(config: TrainConfig, tokenizer: Any, rows: RunRows | None = None) -> RunData:
    """Rows -> template -> token ids with answer-only labels, plus held-out rows for scoring
    (``rows`` from :func:`prepare_rows`, read now if not given)."""
    rows = rows or prepare_rows(config)
    train = tokenize_rows(rows.train, tokenizer, template=rows.template, max_length=config.max_length,
                          train_on_prompt=config.train_on_prompt)
    validation = (tokenize_rows(rows.validation, tokenizer, template=rows.template,
                                max_length=config.max_length,
                                train_on_prompt=config.train_on_prompt).examples if rows.validation else [])
    return RunData(train=train.examples, validation=validation, eval_rows=list(rows.eval_rows),
                   task=rows.task, truncated=train.truncated, dropped=train.dropped, source=rows.source)
