"""How a training method plugs into a run: which rows it takes, how they become micro-batches, and
the loss of one micro-batch. :class:`Method` itself is supervised fine-tuning (SFT, the default);
DPO (:mod:`splice.training.dpo`) and GRPO (:mod:`splice.training.grpo`) subclass it and override
the hooks they need. :mod:`splice.training.setup` and :mod:`splice.training.loop` call, in order:

==========================  ========================================================================
hook                        when, and what it returns
==========================  ========================================================================
``embedded()``              no ``data``: the run's rows from the embedded task (or a UsageError)
``template(rows, ...)``     before any model loads: (template for generation scoring, shape name)
``check_rows(rows, ...)``   before any model loads: every row checked; a ValueError naming the
                            file, the row and the fix
``tokenize(rows, tok)``     the training items (:class:`RunData`; ``train`` holds whatever the
                            method batches: SFT :class:`~splice.data.rows.Example`)
``epoch_batches(...)``      this rank's micro-batches of one epoch (its share of each global batch)
``start(run)``              once, after the run is built, before the first step
``step_batches(run, m)``    the step's micro-batches from the ``grad_accum`` taken ones, and
                            metrics already global for the step's ``train`` row (GRPO: rollouts)
``units(batch)``            what the step's loss is averaged over (SFT: target tokens)
``loss(model, batch)``      ``(1 + len(metric_names),)`` float: summed loss, then summed metrics
==========================  ========================================================================

The loop sums ``loss`` vectors over micro-batches and ranks (one all-reduce) and divides every entry
by the step's global ``units``: the step's ``loss`` and one mean per ``metric_names`` entry, all
written to the ``kind: "train"`` row of metrics.jsonl. A 0-dim loss is a vector of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from splice.data.batching import Batch, batches
from splice.data.formats import choose_template, columns_of
from splice.data.preference import PAIR_COLUMNS
from splice.data.preview import shape_name
from splice.data.rows import IGNORE_INDEX, Row, Template, check_template, tokenize_rows
from splice.distributed.process import DistEnv
from splice.distributed.shards import rank_share
from splice.distributed.wrap import Wrapped
from splice.evaluation.scoring import Task
from splice.training.config import TrainConfig
from splice.training.loss import train_step_loss

__all__ = ["Method", "RunData", "RunParts", "RunRows", "StepBatches"]

StepBatches = tuple[list[Batch], dict[str, float]]


class LossFn(Protocol):
    def __call__(self, model: nn.Module, batch: Batch, *, device: torch.device,
                 static_shapes: bool = False) -> Tensor: ...


@dataclass
class RunRows:
    """A run's rows and template, read and checked before any model loads."""

    train: list[Row]
    validation: list[Row]
    eval_rows: list[Row]
    template: Template  # renders a row's prompt and reference for generation scoring
    task: Task
    source: str


@dataclass
class RunData:
    train: list[Any]  # the method's items (SFT: Example; DPO: Pair)
    validation: list[Any]  # items for the validation loss (SFT: Example; [] for none)
    eval_rows: list[Row]  # held-out rows scored by generation
    task: Task
    truncated: int
    dropped: int
    source: str
    kind: str = "training examples"  # what ``train`` holds, for the log line

    def describe(self) -> str:
        return (f"data: {self.source}: {len(self.train)} {self.kind} ({self.truncated} "
                f"truncated, {self.dropped} dropped as too long), {len(self.validation)} validation, "
                f"{len(self.eval_rows)} held-out for generation")


class RunParts(Protocol):
    """What a hook may use of the run (:class:`splice.training.setup.Run` has all of it)."""

    @property
    def config(self) -> TrainConfig: ...
    @property
    def env(self) -> DistEnv | None: ...
    @property
    def say(self) -> Callable[[str], None]: ...
    @property
    def model(self) -> nn.Module: ...
    @property
    def tokenizer(self) -> Any: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def precision(self) -> str: ...
    @property
    def data(self) -> RunData: ...
    @property
    def wrapped(self) -> Wrapped | None:  # the DDP/FSDP2 step (FSDP2: run the bare model in its evaluation())
        ...


class Method:
    """Supervised fine-tuning: the next-token loss on the answer tokens (module doc for the hooks)."""

    name = "sft"
    metric_names: tuple[str, ...] = ()
    graphs = True  # steps may replay from CUDA graphs (fixed shapes, no host syncs)

    def __init__(self, config: TrainConfig, *, lm_loss: LossFn = train_step_loss) -> None:
        self.config = config
        self.lm_loss = lm_loss  # the summed next-token loss of a batch (a test may poison it)

    def embedded(self) -> RunRows:
        """The embedded function-naming task's rows (no ``data``)."""
        from splice.data.function_names import build_function_names, function_name_template
        from splice.evaluation.tasks import function_names_task

        splits = build_function_names()
        return RunRows(train=splits["train"], validation=splits["validation"],
                       eval_rows=splits["test"][: self.config.eval_samples], template=function_name_template(),
                       task=function_names_task(),
                       source="embedded function-naming task (Python standard library)")

    def template(self, rows: Sequence[Row], *, where: str) -> tuple[Template, str]:
        """(the template for ``rows`` of ``where``, the shape's name); raises naming the shapes the
        method takes."""
        config, columns = self.config, columns_of(rows)
        try:
            template = choose_template(columns, prompt_template=config.prompt_template,
                                       response_template=config.response_template, chat=config.chat,
                                       system_prompt=config.system_prompt, last_turn_only=config.last_turn_only)
        except ValueError:
            if set(PAIR_COLUMNS) <= columns:  # a --method that does not fit the data
                raise ValueError(f"{where}: rows with prompt, chosen and rejected are preference pairs; train "
                                 "them with --method dpo (--method sft takes prompt/completion, chat ... rows)") from None
            raise
        return template, shape_name(columns, templated=config.prompt_template is not None, chat=config.chat)

    def check_rows(self, rows: Sequence[Row], template: Template, *, where: str) -> None:
        """Every row renders (a ValueError naming ``where``, the row and the fix)."""
        check_template(rows, template, where=where)

    def tokenize(self, rows: RunRows, tokenizer: Any) -> RunData:
        """Rows -> template -> token ids with answer-only labels."""
        config = self.config
        train = tokenize_rows(rows.train, tokenizer, template=rows.template, max_length=config.max_length,
                              train_on_prompt=config.train_on_prompt)
        validation = (tokenize_rows(rows.validation, tokenizer, template=rows.template,
                                    max_length=config.max_length,
                                    train_on_prompt=config.train_on_prompt).examples if rows.validation else [])
        return RunData(train=train.examples, validation=validation, eval_rows=list(rows.eval_rows),
                       task=rows.task, truncated=train.truncated, dropped=train.dropped, source=rows.source)

    def epoch_batches(self, items: Sequence[Any], *, pad_id: int, epoch: int, rank: int,
                      world: int) -> list[Batch]:
        """This rank's share of each global micro-batch (``batch_size * world`` rows) of ``epoch``,
        in an order fixed by (seed, epoch)."""
        config = self.config
        every = batches(items, batch_size=config.batch_size * world, pad_id=pad_id, shuffle=True,
                        seed=config.seed, epoch=epoch, pack=config.pack, max_length=config.max_length)
        return [rank_share(b, rank=rank, world_size=world, pad_id=pad_id) for b in every]

    def start(self, run: RunParts) -> None:
        """Once, after the run is built and resumed, before its first step."""

    def step_batches(self, run: RunParts, micro: list[Batch]) -> StepBatches:
        """The step's micro-batches from the ``grad_accum`` taken ones, and step metrics (already
        global: every rank returns the same) for the ``train`` row."""
        return micro, {}

    def units(self, batch: Batch) -> int:
        """The count ``loss`` is a sum over: target tokens."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch, *, device: torch.device, static_shapes: bool = False) -> Tensor:
        """The summed next-token loss of the batch's target tokens (``static_shapes``: no host
        syncs, for CUDA graphs)."""
        return self.lm_loss(model, batch, device=device, static_shapes=static_shapes)
