"""The training loop, in plain sight: LoRA on a causal LM with a loss outside ``model.forward``.

One optimizer step = ``grad_accum`` micro-batches; the loss of a step is the sum of the target
tokens' cross-entropies divided by their count over the whole step (so accumulation equals one
big batch). Checkpoints (adapter, optimizer, scheduler, RNG, data position) are written
atomically; ``resume`` continues on the same loss trajectory. SIGINT/SIGTERM finish the current
step, write a checkpoint and return. Non-finite losses skip the step and stop the run after
``max_bad_steps`` in a row, leaving the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.core.device import resolve_device
from splice.core.errors import RunError, UsageError
from splice.data.batching import Batch, batches
from splice.distributed.checkpoint import is_sharded_checkpoint, load_sharded, save_adapter_once, save_sharded
from splice.distributed.process import DistEnv, all_reduce_sum, barrier, collective_errors, main_first
from splice.distributed.process import start as start_distributed
from splice.distributed.process import stop as stop_distributed
from splice.distributed.shards import rank_share
from splice.distributed.wrap import Wrapped, clip_grad_norm, shard_reason, wrap_model
from splice.evaluation.scoring import evaluate_generation
from splice.lora.apply import add_lora
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.training.config import DEFAULT_STEPS, TrainConfig, save_run_config
from splice.training.graphs import GraphedStep
from splice.training.loss import check_labels, lm_head_params, train_step_loss
from splice.training.oom import card_memory, out_of_memory
from splice.training.optim import param_groups
from splice.training.preflight import preflight
from splice.training.report import MetricsLog, Progress, check_trackers, open_trackers, plot_losses
from splice.training.rundir import run_directory
from splice.training.setup import (
    RunData,
    prepare_data,
    prepare_model,
    prepare_rows,
    run_rewrites,
)
from splice.training.state import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from splice.training.validate import validation_loss

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "lr_at", "train", "train_step_loss"]


class TrainingDiverged(RunError):
    """Raised after ``max_bad_steps`` non-finite losses in a row."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]
    interrupted: bool = False
    stopped_by: int = 0  # the signal that interrupted the run (0: none)
    metrics: dict[str, Any] = field(default_factory=dict)
    cuda_graphs: int = 0  # training-step graphs captured (0: eager steps)
    parallel: str = "none"  # "none" | "ddp" | "fsdp2" (torch.distributed data parallelism)
    world_size: int = 1


def lr_at(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}: use 'adamw' or 'sgd'")


def _autocast(device: torch.device, precision: str, *, cache: bool = True) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        # No weight-cast cache inside CUDA graphs: cached casts would outlive the capture.
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


_MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


def _micro_step(model: nn.Module, device: torch.device, precision: str,
                graphed: bool, wrapped: Wrapped | None = None) -> Any:
    """One micro-batch's forward, loss and backward (``loss_scale`` = 1 / the step's targets,
    times the world size under DDP/FSDP2, which average gradients over ranks); returns the summed
    loss. The function :class:`GraphedStep` captures. ``wrapped``: the DDP/FSDP2 step."""

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with _autocast(device, precision, cache=not graphed):
            if wrapped is not None:
                part = wrapped(batch)
            else:
                part = train_step_loss(model, batch, device=device, static_shapes=graphed)
        (part * batch["loss_scale"]).backward()
        return part.detach()

    return step


class _Batches:
    """Micro-batches in a fixed order for (seed, epoch); resumable at (epoch, index). Under
    torch.distributed each global micro-batch has ``batch_size * world_size`` rows and this rank
    takes its share (:mod:`splice.distributed.shards`)."""

    def __init__(self, data: RunData, config: TrainConfig, pad_id: int, env: DistEnv | None = None) -> None:
        self.data, self.config, self.pad_id = data, config, pad_id
        self.rank, self.world = (env.rank, env.world_size) if env else (0, 1)
        self._epoch: int | None = None
        self._list: list[Batch] = []

    def epoch_batches(self, epoch: int) -> list[Batch]:
        if self._epoch != epoch:
            self._list = batches(self.data.train, batch_size=self.config.batch_size * self.world,
                                 pad_id=self.pad_id, shuffle=True, seed=self.config.seed,
                                 epoch=epoch, pack=self.config.pack,
                                 max_length=self.config.max_length)
            self._epoch = epoch
        return self._list

    def take(self, state: TrainerState) -> Batch:
        if state.batch_index >= len(self.epoch_batches(state.epoch)):
            state.epoch, state.batch_index = state.epoch + 1, 0
        batch = self.epoch_batches(state.epoch)[state.batch_index]
        state.batch_index += 1
        return rank_share(batch, rank=self.rank, world_size=self.world, pad_id=self.pad_id)


def _n_tokens(batch: Batch) -> int:
    """Real tokens the model processed (not padding)."""
    return int(batch["num_tokens"])


def _total_steps(config: TrainConfig, n_batches: int) -> int:
    if config.epochs is None:
        return config.steps or DEFAULT_STEPS
    return max(1, math.ceil(config.epochs * n_batches / config.grad_accum))


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int]]:
    """Record SIGINT/SIGTERM instead of dying mid-step; the loop checks after each step."""
    flag: dict[str, int] = {}
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        flag["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _NoMetrics(MetricsLog):
    """Ranks other than 0 write no metrics (rank 0 writes the all-reduced ones)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


class _Quiet(Progress):
    def update(self, step: int, *, loss: float, lr: float, tokens: int) -> None:
        pass

    def close(self) -> None:
        pass


def train(config: TrainConfig, *, log: Progress | None = None) -> TrainResult:
    """Fine-tune ``config.model`` with LoRA on ``config.data``; see :class:`TrainConfig`.

    Every option is checked before the model loads (:func:`splice.training.preflight.preflight`),
    and the run directory is locked for the whole run (:mod:`splice.training.rundir`). Under
    torchrun (or with ``shard`` on one device) this process is one rank of a torch.distributed
    data-parallel run (DDP, or FSDP2 with ``shard``); rank 0 locks, prints and writes.
    """
    preflight(config)
    env = start_distributed(device_type=resolve_device(config.device).type,
                            timeout_s=config.dist_timeout, single=config.shard)
    try:
        with collective_errors(env), run_directory(config, say=log.message if log else print):
            barrier(env)  # rank 0 has locked and checked the directory before any rank goes on
            return _train(config, log=log, env=env)
    finally:
        stop_distributed(env)


def _train(config: TrainConfig, *, log: Progress | None, env: DistEnv | None) -> TrainResult:
    out = Path(config.output_dir)
    main = env is None or env.is_main
    torch.manual_seed(config.seed)  # the same LoRA init on every rank
    check_trackers(config.report_to)
    if env is not None and config.embeddings_on_host:
        raise UsageError("--embeddings-on-host runs in one process only (DDP and FSDP2 keep every "
                         "weight and buffer on the GPU): drop it under torchrun")
    rows = prepare_rows(config)  # bad data is named before the slow model load
    # FSDP2 over several GPUs: weights load on the CPU, each rank's shards then go to its GPU.
    on_cpu = env is not None and env.world_size > 1 and config.shard
    with main_first(env):  # rank 0 fills the model/data caches; the others then read them
        model, tokenizer, device, precision = prepare_model(
            config, load_device=torch.device("cpu") if on_cpu else None)
        data = prepare_data(config, tokenizer, rows)
    add_lora(model, LoraConfig(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                               targets=config.target_spec(), rslora=config.rslora,
                               use_dora=config.dora, init=config.init))
    summary = freeze(model)
    say = (log.message if log else print) if main else (lambda _text: None)
    say(str(summary))
    sped = run_rewrites(model, config, device)
    if sped:
        say(f"fused kernels / checkpointing / host embedding on {len(sped)} modules")
    say(data.describe())
    wrapped = None
    if env is not None:
        wrapped = wrap_model(
            model, loss=lambda m, b: train_step_loss(m, b, device=device), env=env, device=device,
            shard_why=shard_reason(model, shard=config.shard, device=device),
            mixed_precision=precision == "bf16" and device.type == "cuda")
        for note in wrapped.notes:
            say(note)
    if main:
        save_run_config(out, config)

    stream = _Batches(data, config, tokenizer.pad_token_id, env)
    total = _total_steps(config, len(stream.epoch_batches(0)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params if config.loraplus_ratio is None else param_groups(  # type: ignore[arg-type]
        model, lr=config.lr, ratio=config.loraplus_ratio, weight_decay=config.weight_decay), config)
    fast = config.fuses(device.type)
    # Default: graphs with the fused kernels on packed batches, whose shape never changes
    # (unpacked batches are as long as their longest row: a new graph for every new length).
    auto_graphs = fast and config.pack and not config.embeddings_on_host  # (a host gather: no capture)
    graphed = device.type == "cuda" and (auto_graphs if config.cuda_graphs is None else config.cuda_graphs)
    if graphed and wrapped is not None:
        say(f"CUDA graphs off under {wrapped.kind}: its gradient communication runs in autograd "
            "hooks on other streams, which a graph capture cannot hold; steps run eagerly")
        graphed = False
    micro_step = GraphedStep(_micro_step(model, device, precision, graphed, wrapped), params,
                             enabled=graphed, warn=say)
    vocab = lm_head_params(model)[0].shape[0]
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, total=total, warmup=warmup, schedule=config.schedule))
    state = TrainerState()
    metrics = (MetricsLog(out / "metrics.jsonl", trackers=open_trackers(config.report_to, out, config.to_dict()))
               if main else _NoMetrics(out / "metrics.jsonl"))
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if config.resume else None
    if latest is not None and is_sharded_checkpoint(latest):
        trainer, notes = load_sharded(latest, model=model, optimizer=optimizer, scheduler=scheduler, env=env)
        state = TrainerState(**trainer)
        for note in notes:
            say(note)
    elif latest is not None:
        if wrapped is not None and wrapped.kind == "fsdp2":
            raise ValueError(f"--resume: {latest} was written by one process; resume it without "
                             "--shard (DDP or one process), or start a new --output-dir")
        state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        metrics.truncate_after(state.step)
        say(f"resumed from {latest} at step {state.step}")
    result = TrainResult(output_dir=out, steps=state.step, losses=[],
                         parallel=wrapped.kind if wrapped else "none", world_size=env.world_size if env else 1)
    evaluate = _Evaluator(model, tokenizer, data, config, device, precision, metrics, say,
                          wrapped.evaluation if wrapped else contextlib.nullcontext)
    base_metrics = evaluate.generation(base=True) if config.compare_base and state.step == 0 else {}

    def checkpoint() -> None:
        if env is not None:
            save_sharded(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                         trainer=asdict(state), env=env, base_model=config.model_name(),
                         keep=config.keep_checkpoints)
            return
        save_checkpoint(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        state=state, base_model=config.model_name(), keep=config.keep_checkpoints)

    progress = log or (Progress(total, start=state.step) if main else _Quiet(total))
    model.train()
    with _stop_on_signals() as stop:
        while state.step < total:
            t0 = time.perf_counter()
            micro = [stream.take(state) for _ in range(config.grad_accum)]
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            # All ranks' targets and tokens: the loss is token-weighted over the global batch.
            n_targets, tokens = (int(v) for v in all_reduce_sum(
                [n_targets, sum(_n_tokens(b) for b in micro)], env, device=device))
            loss_sum = 0.0
            for i, batch in enumerate(micro):
                inputs = {k: batch[k].to(device) for k in _MODEL_INPUTS if k in batch}
                if graphed:  # the graph's loss skips its host-side label check: do it here
                    check_labels(batch["labels"], vocab=vocab)
                world = env.world_size if env else 1  # DDP/FSDP2 average gradients over ranks
                inputs["loss_scale"] = torch.tensor(world / max(n_targets, 1), device=device)
                last = i == len(micro) - 1
                with wrapped.sync(last) if wrapped else contextlib.nullcontext():
                    try:
                        loss_sum += float(micro_step(inputs))
                    except torch.OutOfMemoryError as error:
                        metrics.close()
                        progress.close()
                        shape = inputs["input_ids"].shape
                        raise out_of_memory(error, step=state.step + 1, rows=shape[0], tokens=shape[1],
                                            device=str(device), memory=card_memory(device), config=config) from None
            # One collective: the summed loss, and whether any rank has had a stop signal (all
            # ranks must stop after the same step, or the checkpoint's collectives would hang; a
            # signal that comes after this step's collective stops the run after the next step).
            loss_sum, signalled = all_reduce_sum([loss_sum, float("signal" in stop)], env, device=device)
            loss = loss_sum / max(n_targets, 1)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=not graphed)
                state.bad_steps += 1
                say(f"warning: non-finite loss at step {state.step + 1}; step skipped "
                    f"({state.bad_steps}/{config.max_bad_steps} in a row)")
                if state.bad_steps >= config.max_bad_steps:
                    good = latest_checkpoint(ckpt_dir)
                    where = (f"the last good checkpoint is {good} (continue from it with --resume)"
                             if good else "no checkpoint was written yet")
                    metrics.close()
                    progress.close()  # the bar's last line comes before the error, not after it
                    raise TrainingDiverged(
                        f"{state.bad_steps} non-finite losses in a row at step {state.step + 1}: "
                        f"stopping; {where}. Lower --lr or check the data"
                    )
                continue
            state.bad_steps = 0
            grad_norm = clip_grad_norm(params, config.max_grad_norm) \
                if config.max_grad_norm else float("nan")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=not graphed)  # a graph adds into the same tensors
            state.step += 1
            state.tokens_seen += tokens
            result.losses.append(loss)
            seconds = time.perf_counter() - t0
            metrics.write({"kind": "train", "step": state.step, "loss": loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens": tokens,
                           "tokens_per_s": tokens / seconds, "epoch": state.epoch})
            progress.update(state.step, loss=loss, lr=lr, tokens=tokens)
            if config.eval_every and state.step % config.eval_every == 0 and state.step < total:
                evaluate(state.step)
            if (signalled > 0) if env is not None else "signal" in stop:
                checkpoint()
                progress.close()
                say(f"stopped by signal {stop.get('signal', 'on another rank')} after step {state.step}; checkpoint "
                    f"written. Continue with --resume")
                result.interrupted = True
                result.stopped_by = int(stop.get("signal", 0))  # 0: another rank was signalled
                result.steps = state.step
                result.cuda_graphs = micro_step.captured
                metrics.close()
                return result
            if config.save_every and state.step % config.save_every == 0:
                checkpoint()
    progress.close()
    checkpoint()
    result.steps = state.step
    result.cuda_graphs = micro_step.captured
    del micro_step  # its graph's memory pool
    save_adapter_once(model, out / "adapter", env=env, base_model=config.model_name())
    final = evaluate(state.step)
    result.metrics = {"final": final, "base": base_metrics}
    metrics.write({"kind": "summary", "step": state.step, **{f"base_{k}": v for k, v in
                   base_metrics.items()}, **final})
    metrics.close()
    if main:
        plot_losses(metrics.read(), out / "loss.png")
    say(_comparison(base_metrics, final))
    say(f"adapter saved to {out / 'adapter'}; metrics in {metrics.path}; plot in {out / 'loss.png'}")
    return result


@dataclass
class _Evaluator:
    """Validation loss and generation scores of one run, written to its metrics log."""

    model: nn.Module
    tokenizer: Any
    data: RunData
    config: TrainConfig
    device: torch.device
    precision: str
    metrics: MetricsLog
    say: Any
    context: Any = contextlib.nullcontext  # entered around each evaluation (FSDP2: the root's weights)

    def generation(self, *, base: bool) -> dict[str, float]:
        if not self.data.eval_rows:
            return {}
        t0 = time.perf_counter()
        with self.context():
            scores = evaluate_generation(self.model, self.tokenizer, self.data.eval_rows,
                                         task=self.data.task, base=base,
                                         max_new_tokens=self.config.max_new_tokens,
                                         batch_size=self.config.eval_batch_size)
        self.say(f"{'base model' if base else 'fine-tuned'} on {len(self.data.eval_rows)} held-out "
                 f"examples ({time.perf_counter() - t0:.0f}s): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        self.model.train()
        return scores

    def __call__(self, step: int) -> dict[str, Any]:
        """Validation loss and generation scores at ``step``, logged as one "eval" record."""
        result: dict[str, Any] = {}
        if self.data.validation:
            with _autocast(self.device, self.precision), self.context():
                result["val_loss"] = validation_loss(
                    self.model, self.data.validation, batch_size=self.config.batch_size,
                    pad_id=self.tokenizer.pad_token_id, device=self.device,
                    max_batches=self.config.eval_batches)
            self.say(f"step {step}: validation loss {result['val_loss']:.4f}")
        result.update(self.generation(base=False))
        self.metrics.write({"kind": "eval", "step": step, **result})
        self.model.train()
        return result


def _comparison(base: dict[str, Any], final: dict[str, Any]) -> str:
    keys = [k for k in final if k in base]
    if not keys:
        return "final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    rows = [f"{'metric':<14}{'base':>10}{'fine-tuned':>12}{'change':>10}"]
    for k in keys:
        rows.append(f"{k:<14}{base[k]:>10.3f}{final[k]:>12.3f}{final[k] - base[k]:>+10.3f}")
    return "\n".join(rows)
