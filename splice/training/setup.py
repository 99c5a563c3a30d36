"""Setting up a run from its config: the model on its device, and the tokenized data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splice.data.rows import ChatTemplate, Example, PromptTemplate, read_rows, split_rows, tokenize_rows
from splice.evaluation.scoring import Task, text_task
from splice.models.loading import load_model
from splice.training.config import TrainConfig

__all__ = ["RunData", "function_names_task", "prepare_data", "prepare_model", "resolve_device", "speed_up"]

Row = dict[str, Any]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is available; use --device cpu")
    return device


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
    model, tokenizer = load_model(config.model, dtype=dtype, device=load_device or device)
    model.config.use_cache = False  # training: no KV cache (generation turns it on itself)
    return model, tokenizer, device, precision


def speed_up(model: nn.Module, config: TrainConfig, device: torch.device) -> list[str]:
    """Opt-in rewrites after LoRA is attached: fused kernels (``fast``, on by default on a GPU)
    and activation checkpointing of the decoder layers. Returns what was rewritten."""
    from splice.fused.modules import accelerate
    from splice.memory.checkpointing import checkpoint_layers

    fast = device.type == "cuda" if config.fast is None else config.fast
    names = accelerate(model) if fast else []
    if config.gradient_checkpointing or config.offload_checkpoints:
        names += checkpoint_layers(model, layers="all", offload=config.offload_checkpoints,
                                   keep_attention=config.keep_attention)
    elif fast and device.type == "cuda":
        names += checkpoint_layers(model, layers="auto")  # recompute only what memory needs
    return names


def function_names_task() -> Task:
    """The embedded default task: name a function from its code, answering JSON."""
    from splice.evaluation.tasks import function_name_prompt, name_metrics

    return Task(name="function-names", prompt=function_name_prompt,
                reference=lambda row: row["name"], score=name_metrics)


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
    if config.prompt_template is not None and config.response_template is not None:
        if not config.chat:
            return PromptTemplate(config.prompt_template, config.response_template)
        prompt, response, system = config.prompt_template, config.response_template, config.system_prompt

        def messages(row: Row) -> list[dict[str, str]]:
            head = [{"role": "system", "content": system}] if system else []
            return head + [{"role": "user", "content": prompt.format_map(row)},
                           {"role": "assistant", "content": response.format_map(row)}]

        return ChatTemplate(messages)
    if "messages" in columns:
        return ChatTemplate(lambda row: list(row["messages"]))
    for prompt_col, response_col in (("prompt", "completion"), ("prompt", "response"),
                                     ("instruction", "output"), ("input", "output")):
        if {prompt_col, response_col} <= columns:
            return PromptTemplate("{" + prompt_col + "}", "{" + response_col + "}")
    raise ValueError(
        f"cannot tell prompt from answer in columns {sorted(columns)}: pass --prompt-template "
        "and --response-template (e.g. 'Q: {question}\\nA: ' and '{answer}'), or use columns "
        "prompt/completion or messages"
    )


def prepare_data(config: TrainConfig, tokenizer: Any) -> RunData:
    """Rows -> template -> token ids with answer-only labels, plus held-out rows for scoring."""
    if config.data is None:
        from splice.evaluation.tasks import build_function_names, function_name_template

        splits = build_function_names()
        train_rows, val_rows = splits["train"], splits["validation"]
        eval_rows = splits["test"][: config.eval_samples]
        template: PromptTemplate | ChatTemplate = function_name_template()
        task = function_names_task()
        source = "embedded function-naming task (Python standard library)"
    else:
        rows = read_rows(config.data)
        if config.val_data:
            train_rows, val_rows = rows, read_rows(config.val_data)
        else:
            train_rows, val_rows = split_rows(rows, val_fraction=config.val_fraction, seed=config.seed)
        template = _template(config, set(rows[0]))
        task = text_task(template)
        eval_rows = val_rows[: config.eval_samples]
        source = str(config.data)
    if config.max_rows is not None:
        train_rows = train_rows[: config.max_rows]
    train = tokenize_rows(train_rows, tokenizer, template=template, max_length=config.max_length,
                          train_on_prompt=config.train_on_prompt)
    validation = (tokenize_rows(val_rows, tokenizer, template=template, max_length=config.max_length,
                                train_on_prompt=config.train_on_prompt).examples if val_rows else [])
    return RunData(train=train.examples, validation=validation, eval_rows=list(eval_rows), task=task,
                   truncated=train.truncated, dropped=train.dropped, source=source)
