"""GRPO (group relative policy optimization) on the LoRA adapter, with rollouts on splice's engine.

One step, TRL's ``GRPOTrainer`` conventions (``num_iterations = 1``):

1. **Rollouts.** ``B`` prompts (``batch_size x grad_accum`` per rank), ``G = num_generations``
   completions each, sampled by :class:`splice.engine.engine.Engine` at ``temperature`` / ``top_p``
   up to ``max_completion_length`` tokens. The engine runs the model's own LoRA layers: the adapter
   being trained, with no weight copy. A completion that ended on EOS keeps the EOS token (its
   log-prob is trained, so the model learns to stop), as in TRL.
2. **Rewards.** Every reward function (:mod:`splice.training.rewards`) scores every completion;
   ``r = sum_k w_k r_k``.
3. **Advantages**, per group of ``G``: ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` (unbiased std, as
   TRL); ``dr_grpo`` leaves out the division (Dr. GRPO).
4. **Loss.** Per completion token ``t`` of completion ``i``, with ``logp`` the policy's log-prob of
   the token at the sampling temperature (logits / temperature) and ``old`` the rollout policy's,
   which with one update per rollout batch is ``logp`` itself, detached (so ``ratio = 1``; TRL skips
   that forward for the same reason)::

       ratio = exp(logp - old)
       l_it  = -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon) A_i) + beta kl_it
       kl_it = exp(ref - logp) - (ref - logp) - 1    (k3 estimator; ref = adapters disabled)

   aggregated by ``loss_type``: ``grpo`` the mean over completions of each one's token mean;
   ``dr_grpo`` ``sum / (N max_completion_length)``; ``dapo`` (TRL's default) the mean over all the
   step's completion tokens (``N`` = completions of the step, over all ranks).

The loop (:mod:`splice.training.loop`) sums ``loss`` over micro-batches and ranks and divides by the
step's ``units`` (completions, completions x max_completion_length, or tokens), so splitting a step
into micro-batches or ranks gives the same update.

Under torchrun each rank samples the completions of its own prompts (its share of the step's, from
:meth:`GRPO.epoch_batches`); groups never span ranks, so advantages need no communication. Under
FSDP2 (``--shard``) the engine runs inside :meth:`~splice.distributed.wrap.Wrapped.whole_weights`:
every rank gathers the whole policy (base and live adapter) once for its rollouts, runs as many
forwards as they take with no collective, and reshards after them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from splice.core.errors import RunError, UsageError
from splice.data.batching import Batch
from splice.data.formats import columns_of
from splice.data.function_names import function_name_messages
from splice.data.rows import IGNORE_INDEX, PromptTemplate, Row, Template, render_chat
from splice.distributed.process import all_reduce_sum
from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.evaluation.metrics import text_metrics
from splice.evaluation.scoring import Task
from splice.lora.apply import adapters_disabled
from splice.training.config import LOSS_TYPES as METHOD_LOSS_TYPES
from splice.training.config import TrainConfig
from splice.training.logps import selected_logps
from splice.training.loss import lm_head_params, model_hidden_states
from splice.training.method import Method, RunData, RunParts, RunRows, StepBatches
from splice.training.rewards import REFERENCE_COLUMNS, RewardScores, check_columns, parse_rewards, score
from splice.training.state import latest_checkpoint

__all__ = ["ADVANTAGE_EPS", "GRPO", "LOSS_TYPES", "PromptItem", "Rollouts", "completion_logps", "derived_seed",
           "group_advantages", "grpo_loss", "loss_batch", "prompt_ids", "prompt_text", "rollout", "token_terms",
           "unit_weights", "units_of"]

LOSS_TYPES = METHOD_LOSS_TYPES["grpo"]
ADVANTAGE_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not 0/0


# ----------------------------------------------------------------------------- the math


def group_advantages(rewards: Tensor, *, group: int, scale: bool = True) -> Tensor:
    """(N,) rewards of consecutive groups of ``group`` completions of one prompt -> (N,) advantages
    ``r - mean_group`` divided by ``std_group + ADVANTAGE_EPS`` (unbiased std; 0 for a group of one)
    when ``scale``."""
    if rewards.dim() != 1 or rewards.numel() % group:
        raise ValueError(f"rewards must be (N,) with N a multiple of the group size {group}, got "
                         f"{tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + ADVANTAGE_EPS)
    return centred.reshape(-1)


def token_terms(logps: Tensor, old_logps: Tensor, advantages: Tensor, *, epsilon: float, beta: float = 0.0,
                ref_logps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per completion token (all (N, C)): the loss ``l_it`` (module doc), the KL estimate ``kl_it``
    (zeros without ``ref_logps``) and whether the clip bound is active (ratio past ``1 -/+ epsilon``
    on the side the advantage pushes towards, TRL's ``clip_ratio/region``)."""
    ratio = torch.exp(logps - old_logps)
    bounded = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    a = advantages[:, None].to(ratio.dtype)
    loss = -torch.min(ratio * a, bounded * a)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
    else:
        kl = torch.zeros_like(logps)
    if beta:
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    return loss, kl, clipped


def unit_weights(mask: Tensor, *, loss_type: str, max_completion_length: int) -> tuple[Tensor, Tensor]:
    """(loss weights, metric weights), (N, C) each: ``sum(weights x per-token values)`` over a batch,
    divided by the step's :func:`units_of`, is the ``loss_type``'s aggregate (module doc); metric
    weights make a per-token metric a token mean (``dapo``) or a mean of completions' token means."""
    mask = mask.float()
    per_completion = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # each completion's token mean
    if loss_type == "dapo":
        return mask, mask
    if loss_type == "grpo":
        return per_completion, per_completion
    if loss_type == "dr_grpo":
        return mask, per_completion * max_completion_length
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def units_of(mask: Tensor, *, loss_type: str, max_completion_length: int) -> int:
    """What the step's summed loss is divided by: completions (``grpo``), completions x
    ``max_completion_length`` (``dr_grpo``) or completion tokens (``dapo``)."""
    if loss_type == "dapo":
        return int(mask.sum())
    return mask.shape[0] * (max_completion_length if loss_type == "dr_grpo" else 1)


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, loss_type: str,
              epsilon: float, max_completion_length: int, beta: float = 0.0,
              ref_logps: Tensor | None = None) -> Tensor:
    """The GRPO loss of one whole batch (module doc): ``logps`` / ``old_logps`` / ``ref_logps`` (N, C)
    per completion token, ``advantages`` (N,), ``mask`` (N, C) 1 on completion tokens."""
    per_token, _, _ = token_terms(logps, old_logps, advantages, epsilon=epsilon, beta=beta, ref_logps=ref_logps)
    weights, _ = unit_weights(mask, loss_type=loss_type, max_completion_length=max_completion_length)
    units = units_of(mask, loss_type=loss_type, max_completion_length=max_completion_length)
    return (per_token * weights).sum() / max(units, 1)


# ----------------------------------------------------------------------------- log-probs


def completion_logps(model: nn.Module, input_ids: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """(N, T-1) fp32 log-probs of the completion tokens (``labels`` not -100, unshifted) under ``model``
    at ``temperature`` (logits / temperature, as TRL; 0 elsewhere). Rows are right-padded, so no
    attention mask is needed: causal attention never lets a real token see the padding after it."""
    hidden = model_hidden_states(model, input_ids=input_ids)
    weight, bias = lm_head_params(model)
    # (h W^T + b) / t = (h / t) W^T + b / t: the head's logits at the temperature, never all held at once
    return selected_logps(hidden / temperature, weight, None if bias is None else bias / temperature, labels)


# ----------------------------------------------------------------------------- rollouts


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run's seed and coordinates (an epoch's shuffle; a completion's epoch, data
    row and generation index), so a resumed run shuffles and samples as the uninterrupted one."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class PromptItem:
    """One training prompt: its data row, the prompt as given (text or chat messages), its token ids and
    the row's other columns (passed to the rewards)."""

    row: int
    prompt: Any
    ids: list[int]
    columns: dict[str, Any]


def prompt_text(prompt: Any, tokenizer: Any) -> str:
    """A prompt as text: itself, or chat messages through the chat template with the generation prompt."""
    return prompt if isinstance(prompt, str) else render_chat(tokenizer, list(prompt), generation_prompt=True)


def prompt_ids(prompt: Any, tokenizer: Any) -> list[int]:
    """A prompt's token ids as TRL makes them: text as the tokenizer encodes it (special tokens and
    all); chat messages as rendered by the chat template (which holds any special tokens itself)."""
    return list(tokenizer(prompt_text(prompt, tokenizer), add_special_tokens=isinstance(prompt, str))["input_ids"])


def _where(item: PromptItem) -> str:
    text = item.prompt if isinstance(item.prompt, str) else str(item.prompt[-1].get("content", ""))
    text = " ".join(text.split())
    return f"training row {item.row + 1} (prompt {text[:40] + '...' if len(text) > 40 else text!r})"


@dataclass
class Rollouts:
    """A step's completions, ``G`` consecutive ones per prompt: the prompt item, the completion's ids
    (with the EOS it ended on) and text."""

    items: list[PromptItem]
    ids: list[list[int]]
    texts: list[str]

    def completions(self) -> list[Any]:
        """The completions as reward functions get them: text, or TRL's assistant message for chat prompts."""
        return [text if isinstance(item.prompt, str) else [{"role": "assistant", "content": text}]
                for item, text in zip(self.items, self.texts, strict=True)]


def rollout(engine: Engine, items: Sequence[PromptItem], *, generations: int, params: Callable[[PromptItem, int],
            SamplingParams]) -> Rollouts:
    """``generations`` completions of each of ``items`` on ``engine`` (the model's live adapter);
    ``params(item, g)``: the sampling params of completion ``g`` of ``item``."""
    many = [item for item in items for _ in range(generations)]
    done = engine.generate([item.ids for item in many],
                           [params(item, g) for item in items for g in range(generations)])
    eos = engine.eos
    stop_id = engine.tokenizer.eos_token_id if engine.tokenizer.eos_token_id in eos else min(eos, default=None)
    ids = [list(r.generated) + ([stop_id] if r.finish_reason == "stop" and stop_id is not None else [])
           for r in done]
    return Rollouts(items=many, ids=ids, texts=[r.text for r in done])


def loss_batch(rollouts: Rollouts, advantages: Tensor, rows: slice, *, pad_id: int) -> Batch:
    """Completions ``rows`` of ``rollouts`` as a training micro-batch: ``input_ids`` (n, T) prompt +
    completion, right-padded; ``labels`` (n, T) the completion tokens, -100 elsewhere (unshifted);
    ``advantages`` (n,); ``num_tokens``."""
    prompts = [item.ids for item in rollouts.items[rows]]
    completions = rollouts.ids[rows]
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "labels": labels, "advantages": advantages[rows].float(),
            "num_tokens": torch.tensor(sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)))}


# ----------------------------------------------------------------------------- the method


def _prompt_problem(prompt: Any) -> str | None:
    """Why ``prompt`` is not a GRPO prompt (text, or a list of chat messages), or None."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty"
    if isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return None
    return (f"the prompt is {type(prompt).__name__} {str(prompt)[:40]!r}; give text, or chat messages "
            '[{"role": "user", "content": "..."}]')


def _mask(labels: Tensor) -> Tensor:
    """(N, T-1) 1.0 where position t predicts a completion token (``labels[:, t+1]`` kept)."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def _reference_column(columns: set[str]) -> str | None:
    return next((c for c in REFERENCE_COLUMNS if c in columns), None)


class GRPO(Method):
    """GRPO with rollouts on the engine (module doc). ``config``'s GRPO options: ``reward`` /
    ``reward_weights``, ``num_generations``, ``max_completion_length``, ``temperature``, ``top_p``,
    ``epsilon``, ``beta`` and ``loss_type``; ``batch_size x grad_accum`` prompts per step and rank."""

    name = "grpo"
    graphs = False

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        if config.temperature <= 0:
            raise UsageError(f"--temperature {config.temperature}: GRPO samples its rollouts, so it needs a "
                             "temperature > 0 (e.g. 1, TRL's default)")
        self.rewards = parse_rewards(config.reward, config.reward_weights)  # bad specs: before any model loads
        self.loss_type = config.loss_type or LOSS_TYPES[0]
        self.beta = config.beta or 0.0
        self.metric_names = ("clip_ratio", "kl") if self.beta else ("clip_ratio",)
        self.engine: Engine | None = None

    def embedded(self) -> RunRows:
        """The function-naming task's rows, each with its chat ``prompt`` (system + code)."""
        rows = super().embedded()
        rows.train = [{**row, "prompt": function_name_messages(row)[:-1]} for row in rows.train]
        return rows

    def template(self, rows: Sequence[Row], *, where: str) -> tuple[Template, str]:
        columns = columns_of(rows)
        if "prompt" not in columns:
            raise UsageError(f"{where}: --method grpo trains on rows with a prompt column (text or chat "
                             f"messages) plus any columns the rewards read; the columns are "
                             f"{', '.join(sorted(columns))}")
        check_columns(self.rewards, columns, where=where)
        ref = _reference_column(columns)
        template = PromptTemplate(prompt=lambda row: str(row["prompt"]),
                                  response=lambda row: "" if ref is None else str(row[ref]))
        return template, "prompts for GRPO (prompt + the rewards' columns)"

    def check_rows(self, rows: Sequence[Row], template: Template, *, where: str) -> None:
        for number, row in enumerate(rows, start=1):
            problem = _prompt_problem(row.get("prompt"))
            if problem is not None:
                raise UsageError(f"{where}, row {number}: {problem}")

    def tokenize(self, rows: RunRows, tokenizer: Any) -> RunData:
        """The prompts' token ids (a prompt of ``max_length`` tokens or more is dropped); the held-out rows
        are scored on their ``name`` / ``reference`` column (the embedded task: its own metrics)."""
        items, dropped = [], 0
        for index, row in enumerate(rows.train):
            ids = prompt_ids(row["prompt"], tokenizer)
            if len(ids) >= self.config.max_length:
                dropped += 1
                continue
            items.append(PromptItem(row=index, prompt=row["prompt"], ids=ids,
                                    columns={k: v for k, v in row.items() if k != "prompt"}))
        if not items:
            raise UsageError(f"every prompt has --max-length {self.config.max_length} tokens or more; raise "
                             "--max-length or shorten the prompts")
        task, eval_rows = rows.task, list(rows.eval_rows)
        ref = _reference_column(set(eval_rows[0]) if eval_rows else set())
        if self.config.data is not None:  # the user's rows: score against their reference column, if any
            eval_rows = eval_rows if ref is not None else []
            task = Task(name="text", prompt=lambda row, tok: prompt_text(row["prompt"], tok),
                        reference=lambda row: str(row[ref or "prompt"]), score=text_metrics)
        return RunData(train=items, validation=[], eval_rows=eval_rows, task=task, truncated=0, dropped=dropped,
                       source=rows.source, kind="prompts")

    def epoch_batches(self, items: Sequence[Any], *, pad_id: int, epoch: int, rank: int,
                      world: int) -> list[Batch]:
        """This rank's ``batch_size`` prompts of each global batch, shuffled by (seed, epoch); the last
        global batch is filled from the epoch's start, so every rank gets as many."""
        per, count = self.config.batch_size, len(items)
        generator = torch.Generator().manual_seed(derived_seed(self.config.seed, epoch))
        order = torch.randperm(count, generator=generator).tolist()
        steps = -(-count // (per * world))
        order = (order * -(-steps * per * world // count))[: steps * per * world]
        out = []
        for b in range(steps):
            mine = order[(b * world + rank) * per : (b * world + rank + 1) * per]
            ids = torch.tensor(mine)
            out.append({"items": ids, "input_ids": ids[None], "epoch": torch.tensor(epoch),
                        "num_tokens": torch.tensor(sum(len(items[i].ids) for i in mine))})
        return out

    def start(self, run: RunParts) -> None:
        """The engine the rollouts run on: the run's model (its live adapter), a KV cache for one step's
        completions (never the GPU's free memory: training needs it)."""
        config = self.config
        seqs = min(config.batch_size * config.grad_accum * config.num_generations, 256)
        max_len = max(len(item.ids) for item in run.data.train) + config.max_completion_length + 1
        block = 16
        # FSDP2 gathers the weights anew for each step's rollouts, not always at the same addresses: a CUDA
        # graph captured on one step's could read freed memory on the next, so those rollouts run eagerly
        sharded = run.wrapped is not None and run.wrapped.kind == "fsdp2"
        self.engine = Engine(run.model, run.tokenizer, max_seqs=seqs, max_len=max_len, token_budget=max_len + seqs,
                             block_size=block, kv_blocks=seqs * -(-max_len // block) + 1, cuda_graphs=not sharded)

    def step_batches(self, run: RunParts, micro: list[Batch]) -> StepBatches:
        """Rollouts for the step's prompts, their rewards and advantages, as ``len(micro)`` loss
        micro-batches; the step's reward metrics over all ranks."""
        config, engine = self.config, self.engine
        assert engine is not None, "GRPO.start(run) makes the engine before the first step"
        items: list[PromptItem] = [run.data.train[i] for batch in micro for i in batch["items"].tolist()]
        epoch = int(micro[0]["epoch"])
        started = time.perf_counter()

        def params(item: PromptItem, g: int) -> SamplingParams:
            return SamplingParams(max_tokens=config.max_completion_length, temperature=config.temperature,
                                  top_p=config.top_p, seed=derived_seed(config.seed, epoch, item.row, g))

        with run.wrapped.whole_weights() if run.wrapped else contextlib.nullcontext():
            rolled = rollout(engine, items, generations=config.num_generations, params=params)
        rollout_s = time.perf_counter() - started
        keys = list(items[0].columns)
        try:
            scores = score(self.rewards, prompts=[item.prompt for item in rolled.items],
                           completions=rolled.completions(), completion_ids=rolled.ids,
                           columns={k: [item.columns.get(k) for item in rolled.items] for k in keys},
                           rows=[_where(item) for item in rolled.items])
        except RunError as error:
            last = latest_checkpoint(Path(config.output_dir) / "checkpoints")
            raise RunError(f"{error}; " + (f"the last checkpoint, {last}, is kept (fix the reward and continue "
                                           "with --resume)" if last else "no checkpoint was written yet")) from error
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        advantages = group_advantages(rewards, group=config.num_generations, scale=self.loss_type != "dr_grpo")
        pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
        per = len(rolled.ids) // len(micro)
        batches = [loss_batch(rolled, advantages, slice(k * per, (k + 1) * per), pad_id=pad)
                   for k in range(len(micro))]
        return batches, {**self._reward_metrics(run, rewards, scores, rolled), "rollout_s": rollout_s}

    def _reward_metrics(self, run: RunParts, rewards: Tensor, scores: RewardScores,
                        rolled: Rollouts) -> dict[str, float]:
        """reward_mean / reward_std (TRL's reward, reward_std), one mean per reward function, the mean
        completion length (tokens trained, EOS included) and the fraction of groups whose rewards are
        all equal (no signal), over all ranks."""
        groups = rewards.view(-1, self.config.num_generations)
        sums = [rewards.numel(), float(rewards.sum()), float((rewards**2).sum()), sum(len(i) for i in rolled.ids),
                float((groups.std(dim=1) == 0).sum()), groups.shape[0],
                *(sum(scores.each[r.name]) for r in self.rewards)]
        n, total, squares, length, flat, count, *each = all_reduce_sum(sums, run.env, device=run.device)
        mean = total / n
        return {"reward_mean": mean, "reward_std": math.sqrt(max(0.0, squares - n * mean * mean) / max(n - 1, 1)),
                **{f"reward/{r.name}": value / n for r, value in zip(self.rewards, each, strict=True)},
                "completion_length": length / n, "frac_reward_zero_std": flat / count}

    def units(self, batch: Batch) -> int:
        return units_of(_mask(batch["labels"]), loss_type=self.loss_type,
                        max_completion_length=self.config.max_completion_length)

    def loss(self, model: nn.Module, batch: Batch, *, device: torch.device, static_shapes: bool = False) -> Tensor:
        """[summed loss, summed clip ratio, (summed KL)] of a micro-batch of completions (module doc)."""
        config = self.config
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        mask = _mask(labels)
        logps = completion_logps(model, ids, labels, temperature=config.temperature)
        ref = None
        if self.beta:
            with torch.no_grad(), adapters_disabled(model):
                ref = completion_logps(model, ids, labels, temperature=config.temperature)
        per_token, kl, clipped = token_terms(logps, logps.detach(), batch["advantages"].to(device),
                                             epsilon=config.epsilon, beta=self.beta, ref_logps=ref)
        weights, metric_weights = unit_weights(mask, loss_type=self.loss_type,
                                               max_completion_length=config.max_completion_length)
        sums = [(per_token * weights).sum(), (clipped.float() * metric_weights).sum()]
        if self.beta:
            sums.append((kl.detach() * metric_weights).sum())
        return torch.stack(sums)
