"""Setting up a run from its config, in the order that fails fastest: options and data before the
model; then LoRA, the rewrites, the data-parallel wrapper, the optimizer and schedule, and the
state of a resumed run. :func:`build_run` returns it all as a :class:`Run`; the loop
(:mod:`splice.training.loop`) only steps it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.core.device import resolve_device
from splice.core.errors import UsageError
from splice.data.batching import Batch
from splice.data.rows import describe_source, read_rows, split_rows
from splice.distributed.checkpoint import is_sharded_checkpoint, load_sharded, save_sharded
from splice.distributed.process import DistEnv, main_first
from splice.distributed.wrap import Wrapped, shard_reason, wrap_model
from splice.evaluation.scoring import text_task
from splice.lora.apply import add_lora
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import load_adapter
from splice.models.loading import load_model
from splice.training.config import DEFAULT_EPOCHS, MANY_EPOCHS, TrainConfig, save_run_config
from splice.training.graphs import GraphedStep
from splice.training.loss import lm_head_params, train_step_loss
from splice.training.method import Method, RunData, RunRows
from splice.training.optim import lr_at, make_optimizer
from splice.training.report import MetricsLog, Progress, check_trackers, open_trackers
from splice.training.state import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from splice.training.validate import Evaluator, autocast

__all__ = ["Batches", "Run", "RunData", "RunRows", "build_run", "method_for", "plan_line", "prepare_data",
           "prepare_model", "prepare_rows", "run_rewrites"]


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
    if config.mlp_chunk_tokens is not None:  # inside the checkpointed layers, around the fused MLPs
        from splice.memory.tiled_mlp import tile_mlps

        names += tile_mlps(model, chunk_tokens=config.mlp_chunk_tokens)
    if config.gradient_checkpointing or config.offload_checkpoints:
        names += checkpoint_layers(model, layers="all", offload=config.offload_checkpoints,
                                   keep_attention=config.keep_attention,
                                   offload_compression=config.offload_compression)  # type: ignore[arg-type]
    elif fused and device.type == "cuda":
        names += checkpoint_layers(model, layers="auto")  # recompute only what memory needs
    if config.embeddings_on_host:
        from splice.memory.host_embedding import embeddings_to_host

        names += embeddings_to_host(model)
    return names


def method_for(config: TrainConfig) -> Method:
    """The training method ``config.method`` names (:mod:`splice.training.method`)."""
    if config.method == "dpo":
        from splice.training.dpo import DPO

        return DPO(config)
    if config.method == "grpo":
        from splice.training.grpo import GRPO

        return GRPO(config)
    return Method(config, lm_loss=train_step_loss)


def prepare_rows(config: TrainConfig, method: Method | None = None) -> RunRows:
    """Read, split and check every row (no tokenizer needed): a bad file, shape, column or value,
    or data that does not fit ``config.method``, is an error naming it before the slow model load."""
    method = method or method_for(config)
    if config.data is None:
        return method.embedded()
    rows = read_rows(config.data, max_line_bytes=config.max_line_bytes)
    source = describe_source(config.data)
    if config.val_data:
        train_rows, val_rows = rows, read_rows(config.val_data, max_line_bytes=config.max_line_bytes)
    elif config.val_fraction is not None:
        train_rows, val_rows = split_rows(rows, val_fraction=config.val_fraction, seed=config.seed)
    else:  # the default rule (TrainConfig.held_out_rows), as the fraction that holds out that many
        held_out = config.held_out_rows(len(rows))
        train_rows, val_rows = split_rows(rows, val_fraction=held_out / len(rows) if rows else 0.0,
                                          seed=config.seed)
    template, shape = method.template(rows, where=source)
    method.check_rows(rows, template, where=source)
    if config.val_data:
        method.check_rows(val_rows, template, where=describe_source(config.val_data))
    if config.max_rows is not None:
        train_rows = train_rows[: config.max_rows]
    return RunRows(train=train_rows, validation=val_rows, eval_rows=val_rows[: config.eval_samples],
                   template=template, task=text_task(template), source=f"{source}, {shape}")


def prepare_data(config: TrainConfig, tokenizer: Any, rows: RunRows | None = None,
                 method: Method | None = None) -> RunData:
    """Rows -> the method's training items (SFT: token ids with answer-only labels), plus held-out
    rows for scoring (``rows`` from :func:`prepare_rows`, read now if not given)."""
    method = method or method_for(config)
    return method.tokenize(rows or prepare_rows(config, method), tokenizer)


# ----------------------------------------------------------------------------- the run


class Batches:
    """Micro-batches in a fixed order for (seed, epoch); resumable at (epoch, index). Under
    torch.distributed each global micro-batch has ``batch_size * world_size`` rows and this rank
    takes its share (:mod:`splice.distributed.shards`); the method builds them."""

    def __init__(self, data: RunData, method: Method, pad_id: int, env: DistEnv | None = None) -> None:
        self.data, self.method, self.pad_id = data, method, pad_id
        self.rank, self.world = (env.rank, env.world_size) if env else (0, 1)
        self._epoch: int | None = None
        self._list: list[Batch] = []

    def epoch_batches(self, epoch: int) -> list[Batch]:
        if self._epoch != epoch:
            self._list = self.method.epoch_batches(self.data.train, pad_id=self.pad_id, epoch=epoch,
                                                   rank=self.rank, world=self.world)
            self._epoch = epoch
        return self._list

    def refresh(self) -> None:
        """The items changed: build the epoch's batches again."""
        self._epoch = None

    def take(self, state: TrainerState) -> Batch:
        if state.batch_index >= len(self.epoch_batches(state.epoch)):
            state.epoch, state.batch_index = state.epoch + 1, 0
        batch = self.epoch_batches(state.epoch)[state.batch_index]
        state.batch_index += 1
        return batch


def micro_step(model: nn.Module, device: torch.device, precision: str, graphed: bool,
               wrapped: Wrapped | None = None, *, method: Method) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """One micro-batch's forward, loss and backward (``loss_scale`` = 1 / the step's units,
    times the world size under DDP/FSDP2, which average gradients over ranks); returns the
    method's summed loss vector (loss, then metrics; see :mod:`splice.training.method`). The
    function :class:`GraphedStep` captures. ``wrapped``: the DDP/FSDP2 step."""
    loss = method.loss

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, precision, cache=not graphed):
            if wrapped is not None:
                part = wrapped(batch)
            else:
                part = loss(model, batch, device=device, static_shapes=graphed)
        part = part.reshape(-1)  # (1 + metrics,): a 0-dim loss is a vector of one
        (part[0] * batch["loss_scale"]).backward()
        return part.detach()

    return step


class _NoMetrics(MetricsLog):
    """Ranks other than 0 write no metrics (rank 0 writes the all-reduced ones)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


@dataclass
class Run:
    """Everything a run trains with, built by :func:`build_run` before its first step."""

    config: TrainConfig
    method: Method  # what the run trains with: SFT, DPO, GRPO (splice.training.method)
    env: DistEnv | None  # torch.distributed (None: one process)
    say: Callable[[str], None]  # a line for the person (rank 0 only)
    model: nn.Module
    tokenizer: Any
    device: torch.device
    precision: str  # "bf16" | "fp32"
    data: RunData
    rewritten: list[str]  # modules fused, checkpointed or moved to the host
    wrapped: Wrapped | None  # the DDP/FSDP2 step
    batches: Batches
    total: int  # optimizer steps of the whole run
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    graphed: bool  # steps replayed from CUDA graphs
    micro_step: GraphedStep | None  # None once finished (its graphs' memory is freed)
    vocab: int
    state: TrainerState
    metrics: MetricsLog
    evaluate: Evaluator

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def world(self) -> int:
        return self.env.world_size if self.env else 1

    def checkpoint(self) -> None:
        """Adapter, optimizer, scheduler, RNG and data position, written atomically."""
        directory, config = self.out / "checkpoints", self.config
        if self.env is not None:
            save_sharded(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                         trainer=asdict(self.state), env=self.env, base_model=config.model_name(),
                         keep=config.keep_checkpoints)
            return
        save_checkpoint(directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        state=self.state, base_model=config.model_name(), keep=config.keep_checkpoints)


def plan_line(config: TrainConfig, *, total: int, batches_per_epoch: int, examples: int) -> str | None:
    """The line a run prints before training when its length needs a word: the default number of
    epochs for the user's data, or a run over more than MANY_EPOCHS passes (small data overfits)."""
    epochs = total * config.grad_accum / max(1, batches_per_epoch)
    if config.steps is None and config.epochs is None and config.epochs_planned() == DEFAULT_EPOCHS:
        return (f"training {DEFAULT_EPOCHS:g} epochs of {examples} examples: {total} steps (the default "
                "for --data; set --epochs N or --steps N)")
    if epochs > MANY_EPOCHS:
        return (f"note: {total} steps are {epochs:.1f} epochs of {examples} examples, each seen about "
                f"{round(epochs)} times: small data overfits; train by passes with --epochs N "
                f"(1-{MANY_EPOCHS:g} is typical, see docs/guide.md)")
    return None


def _graphs_on(config: TrainConfig, device: torch.device, wrapped: Wrapped | None,
               say: Callable[[str], None]) -> bool:
    """Whether steps replay from CUDA graphs. Default: with the fused kernels on packed batches,
    whose shape never changes (unpacked batches are as long as their longest row: a new graph for
    every new length); not with the embedding on the host (a host gather: no capture)."""
    auto = config.fuses(device.type) and config.pack and not config.embeddings_on_host
    graphed = device.type == "cuda" and (auto if config.cuda_graphs is None else config.cuda_graphs)
    if graphed and wrapped is not None:
        say(f"CUDA graphs off under {wrapped.kind}: its gradient communication runs in autograd "
            "hooks on other streams, which a graph capture cannot hold; steps run eagerly")
        return False
    return graphed


def _resume(run: Run) -> None:
    """Load the last checkpoint of ``run``'s directory into it (``config.resume``)."""
    latest = latest_checkpoint(run.out / "checkpoints") if run.config.resume else None
    if latest is None:
        return
    if is_sharded_checkpoint(latest):
        trainer, notes = load_sharded(latest, model=run.model, optimizer=run.optimizer,
                                      scheduler=run.scheduler, env=run.env)
        run.state = TrainerState(**trainer)
        for note in notes:
            run.say(note)
        return
    if run.wrapped is not None and run.wrapped.kind == "fsdp2":
        raise ValueError(f"--resume: {latest} was written by one process; resume it without "
                         "--shard (DDP or one process), or start a new --output-dir")
    run.state = load_checkpoint(latest, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    run.metrics.truncate_after(run.state.step)
    run.say(f"resumed from {latest} at step {run.state.step}")


def build_run(config: TrainConfig, *, log: Progress | None = None, env: DistEnv | None = None) -> Run:
    """Everything a run needs before its first step (module doc). ``log``: where lines go (default:
    print); ``env``: this rank of a torch.distributed run. Writes ``run_config.json``."""
    main = env is None or env.is_main
    say: Callable[[str], None] = (log.message if log else print) if main else (lambda _text: None)
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    check_trackers(config.report_to)
    if env is not None and config.embeddings_on_host:
        raise UsageError("--embeddings-on-host runs in one process only (DDP and FSDP2 keep every "
                         "weight and buffer on the GPU): drop it under torchrun")
    method = method_for(config)
    rows = prepare_rows(config, method)  # bad data is named before the slow model load
    # FSDP2 over several GPUs: weights load on the CPU, each rank's shards then go to its GPU.
    on_cpu = env is not None and env.world_size > 1 and config.shard
    with main_first(env):  # rank 0 fills the model/data caches; the others then read them
        model, tokenizer, device, precision = prepare_model(
            config, load_device=torch.device("cpu") if on_cpu else None)
        data = prepare_data(config, tokenizer, rows, method)
    if config.adapter:  # trained further, as it was saved (rank, alpha, targets)
        load_adapter(model, config.adapter)
    else:
        add_lora(model, LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                                   targets=config.target_spec(), rslora=config.rslora,
                                   use_dora=config.dora, init=config.init))
    say(str(freeze(model)))
    rewritten = run_rewrites(model, config, device)
    if rewritten:
        say(f"fused kernels / checkpointing / host embedding on {len(rewritten)} modules")
    say(data.describe())
    wrapped = None
    if env is not None:
        wrapped = wrap_model(
            model, loss=lambda m, b: method.loss(m, b, device=device), env=env, device=device,
            shard_why=shard_reason(model, shard=config.shard, device=device),
            mixed_precision=precision == "bf16" and device.type == "cuda")
        for note in wrapped.notes:
            say(note)
    out = Path(config.output_dir)
    if main:
        save_run_config(out, config)

    stream = Batches(data, method, tokenizer.pad_token_id, env)
    per_epoch = len(stream.epoch_batches(0))
    total = config.total_steps(per_epoch)
    plan = plan_line(config, total=total, batches_per_epoch=per_epoch, examples=len(data.train))
    if plan:
        say(plan)
    optimizer = make_optimizer(model, name=config.optimizer, lr=config.lr, weight_decay=config.weight_decay,
                               loraplus_ratio=config.loraplus_ratio)
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = _graphs_on(config, device, wrapped, say) and method.graphs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, total=total, warmup=config.warmup_steps, schedule=config.schedule))
    metrics = (MetricsLog(out / "metrics.jsonl", trackers=open_trackers(config.report_to, out, config.to_dict()))
               if main else _NoMetrics(out / "metrics.jsonl"))
    evaluate = Evaluator(model, tokenizer, data.validation, data.eval_rows, data.task, device, precision,
                         metrics, say, batch_size=config.batch_size, eval_batches=config.eval_batches,
                         eval_batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens,
                         context=wrapped.evaluation if wrapped else contextlib.nullcontext)
    run = Run(config=config, method=method, env=env, say=say, model=model, tokenizer=tokenizer, device=device,
              precision=precision, data=data, rewritten=rewritten, wrapped=wrapped, batches=stream, total=total,
              params=params, optimizer=optimizer, scheduler=scheduler, graphed=graphed,
              micro_step=GraphedStep(micro_step(model, device, precision, graphed, wrapped, method=method), params,
                                     enabled=graphed, warn=say),
              vocab=lm_head_params(model)[0].shape[0], state=TrainerState(), metrics=metrics, evaluate=evaluate)
    _resume(run)
    method.start(run)
    stream.refresh()  # start may have changed the items (DPO: reference log-probs)
    return run
