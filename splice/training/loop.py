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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.core.device import resolve_device
from splice.core.errors import RunError
from splice.distributed.checkpoint import save_adapter_once
from splice.distributed.process import DistEnv, all_reduce_sum, barrier, collective_errors
from splice.distributed.process import start as start_distributed
from splice.distributed.process import stop as stop_distributed
from splice.distributed.wrap import clip_grad_norm
from splice.training.config import MIN_HELD_OUT, TrainConfig
from splice.training.loss import check_labels, train_step_loss
from splice.training.oom import card_memory, out_of_memory
from splice.training.optim import lr_at
from splice.training.preflight import preflight
from splice.training.report import Progress, plot_losses
from splice.training.rundir import run_directory
from splice.training.setup import Run, build_run
from splice.training.state import latest_checkpoint

__all__ = ["StepStats", "TrainConfig", "TrainResult", "TrainingDiverged", "finish", "lr_at", "step", "train",
           "train_step_loss"]


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


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did (``loss`` None: non-finite, the step was skipped)."""

    loss: float | None
    lr: float
    grad_norm: float
    tokens: int  # real tokens of all ranks' micro-batches
    seconds: float
    signalled: bool  # a stop signal on some rank: every rank stops after this step
    metrics: dict[str, float] = field(default_factory=dict)  # the method's means (splice.training.method)


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
    """Set up, score the base, step until done or stopped, finish."""
    run = build_run(config, log=log, env=env)
    base = run.evaluate.generation(base=True) if config.compare_base and run.state.step == 0 else {}
    result = TrainResult(output_dir=run.out, steps=run.state.step, losses=[],
                         parallel=run.wrapped.kind if run.wrapped else "none", world_size=run.world)
    progress = log or (Progress(run.total, start=run.state.step) if env is None or env.is_main
                       else _Quiet(run.total))
    run.model.train()
    stopped = False
    try:
        with _stop_on_signals() as stop:
            while run.state.step < run.total and not stopped:
                stats = step(run, stop=stop)
                if stats.loss is not None:  # (None: a non-finite loss, the step was skipped)
                    result.losses.append(stats.loss)
                    _report(run, stats, progress)
                # One process: a signal even during this step's report; several: all ranks agree.
                stopped = stats.signalled if env is not None else "signal" in stop
                every = config.save_every
                if stats.loss is not None and every and run.state.step % every == 0 and not stopped:
                    run.checkpoint()
            signal_number = stop.get("signal", 0)
    except BaseException:
        progress.close()  # the bar's last line comes before the error, not after it
        run.metrics.close()
        raise
    return finish(run, result, progress=progress, base=base, stopped_by=signal_number if stopped else None)


def _report(run: Run, stats: StepStats, progress: Progress) -> None:
    """A finished step in the metrics log and the bar; the periodic evaluation (``eval_every``)."""
    state, every = run.state, run.config.eval_every
    run.metrics.write({"kind": "train", "step": state.step, "loss": stats.loss, **stats.metrics, "lr": stats.lr,
                       "grad_norm": stats.grad_norm, "tokens": stats.tokens,
                       "tokens_per_s": stats.tokens / stats.seconds, "epoch": state.epoch})
    progress.update(state.step, loss=float(stats.loss or 0.0), lr=stats.lr, tokens=stats.tokens)
    if every and state.step % every == 0 and state.step < run.total:
        run.evaluate(state.step)


def step(run: Run, *, stop: dict[str, int]) -> StepStats:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward, the loss averaged
    over the global batch's units (SFT: target tokens; see :mod:`splice.training.method`), then
    clip, optimizer and schedule. A non-finite loss skips the update; ``max_bad_steps`` of them in
    a row raise :class:`TrainingDiverged`. ``stop``: the signal a handler recorded (see
    :func:`_stop_on_signals`)."""
    config, state, device, env, method = run.config, run.state, run.device, run.env, run.method
    assert run.micro_step is not None, "the run has finished"
    t0 = time.perf_counter()
    micro, step_metrics = method.step_batches(run, [run.batches.take(state) for _ in range(config.grad_accum)])
    # All ranks' units and tokens: the loss is a mean over the global batch's units.
    units, tokens = (int(v) for v in all_reduce_sum(
        [sum(method.units(b) for b in micro), sum(int(b["num_tokens"]) for b in micro)], env, device=device))
    sums: list[float] = []  # the method's summed loss, then its summed metrics
    for i, batch in enumerate(micro):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "num_tokens"}
        if run.graphed:  # the graph's loss skips its host-side label check: do it here
            check_labels(batch["labels"], vocab=run.vocab)
        # DDP/FSDP2 average gradients over ranks: scale by the world size to sum them.
        inputs["loss_scale"] = torch.tensor(run.world / max(units, 1), device=device)
        with run.wrapped.sync(i == len(micro) - 1) if run.wrapped else contextlib.nullcontext():
            try:
                part = run.micro_step(inputs).tolist()
            except torch.OutOfMemoryError as error:
                rows, length = inputs["input_ids"].shape
                raise out_of_memory(error, step=state.step + 1, rows=rows, tokens=length, device=str(device),
                                    memory=card_memory(device), config=config) from None
        sums = [a + b for a, b in zip(sums, part, strict=True)] if sums else part
    # One collective: the summed loss and metrics, and whether any rank has had a stop signal (all
    # ranks must stop after the same step, or the checkpoint's collectives would hang; a signal
    # that comes after this step's collective stops the run after the next step).
    *sums, signalled = all_reduce_sum([*sums, float("signal" in stop)], env, device=device)
    loss = sums[0] / max(units, 1)
    metrics = {**{name: value / max(units, 1) for name, value in zip(method.metric_names, sums[1:], strict=True)},
               **step_metrics}
    lr = run.optimizer.param_groups[0]["lr"]
    if not math.isfinite(loss):
        run.optimizer.zero_grad(set_to_none=not run.graphed)
        _skip(run)
        return StepStats(None, lr, math.nan, tokens, time.perf_counter() - t0, signalled > 0)
    state.bad_steps = 0
    grad_norm = clip_grad_norm(run.params, config.max_grad_norm) if config.max_grad_norm else math.nan
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=not run.graphed)  # a graph adds into the same tensors
    state.step += 1
    state.tokens_seen += tokens
    return StepStats(loss, lr, grad_norm, tokens, time.perf_counter() - t0, signalled > 0, metrics)


def _skip(run: Run) -> None:
    """Count a non-finite step; raise once ``max_bad_steps`` come in a row."""
    state, config = run.state, run.config
    state.bad_steps += 1
    run.say(f"warning: non-finite loss at step {state.step + 1}; step skipped "
            f"({state.bad_steps}/{config.max_bad_steps} in a row)")
    if state.bad_steps >= config.max_bad_steps:
        good = latest_checkpoint(run.out / "checkpoints")
        where = f"the last good checkpoint is {good} (continue from it with --resume)" if good else \
            "no checkpoint was written yet"
        raise TrainingDiverged(f"{state.bad_steps} non-finite losses in a row at step {state.step + 1}: "
                               f"stopping; {where}. Lower --lr or check the data")


def finish(run: Run, result: TrainResult, *, progress: Progress, base: dict[str, float],
           stopped_by: int | None) -> TrainResult:
    """The one way a run ends without an error: close the bar, write a checkpoint; then, when it
    was stopped by a signal (``stopped_by``: its number, 0 when it came to another rank), say how
    to resume; otherwise save the adapter, score it, and print base vs fine-tuned."""
    progress.close()
    out = run.out
    try:
        run.checkpoint()
        result.steps = run.state.step
        result.cuda_graphs = run.micro_step.captured if run.micro_step else 0
        if stopped_by is not None:
            run.say(f"stopped by signal {stopped_by or 'on another rank'} after step {run.state.step}; "
                    "checkpoint written. Continue with --resume")
            result.interrupted, result.stopped_by = True, stopped_by
            return result
        run.micro_step = None  # its graphs' memory pool
        save_adapter_once(run.model, out / "adapter", env=run.env, base_model=run.config.model_name())
        final = run.evaluate(run.state.step)
        result.metrics = {"final": final, "base": base}
        run.metrics.write({"kind": "summary", "step": run.state.step,
                           **{f"base_{k}": v for k, v in base.items()}, **final})
    finally:
        run.metrics.close()
    if run.env is None or run.env.is_main:
        plot_losses(run.metrics.read(), out / "loss.png")
    run.say(_comparison(base, final))
    held_out = len(run.data.eval_rows)
    if 0 < held_out < MIN_HELD_OUT:  # generation scores on this few rows are noise
        run.say(f"note: these scores are on {held_out} held-out rows, too few to tell models apart; score "
                f"the adapter on more rows with: splice eval --adapter {out / 'adapter'} --data FILE")
    run.say(f"adapter saved to {out / 'adapter'}; metrics in {run.metrics.path}; plot in {out / 'loss.png'}")
    return result


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


class _Quiet(Progress):
    """Ranks other than 0 show no bar."""

    def update(self, step: int, *, loss: float, lr: float, tokens: int) -> None:
        pass

    def close(self) -> None:
        pass


def _comparison(base: dict[str, Any], final: dict[str, Any]) -> str:
    keys = [k for k in final if k in base]
    if not keys:
        return "final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    rows = [f"{'metric':<14}{'base':>10}{'fine-tuned':>12}{'change':>10}"]
    for k in keys:
        rows.append(f"{k:<14}{base[k]:>10.3f}{final[k]:>12.3f}{final[k] - base[k]:>+10.3f}")
    return "\n".join(rows)
