"""DPO (and IPO): LoRA training on preference pairs, the reference being the same model with its
adapters disabled (no copy of any weight).

With ``pi`` the policy (base + adapter) and ``ref`` the base alone, per pair (chosen ``c``,
rejected ``r``, each log-prob summed over the answer tokens, see :mod:`splice.training.logps`)::

    rc = beta * (log pi(c) - log ref(c))        rr = beta * (log pi(r) - log ref(r))   the "rewards"
    d  = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))

    sigmoid (DPO, cDPO label smoothing e):  -(1 - e) * logsigmoid(beta * d) - e * logsigmoid(-beta * d)
    ipo:  (d_c / n_c - d_r / n_r - 1 / (2 beta))^2    with d_x = log pi(x) - log ref(x), n_x its tokens

(TRL's ``DPOTrainer``: its "sigmoid", the older sigmoid with ``label_smoothing``, its "ipo" with the
per-token normalisation.) The step's loss is the mean over pairs; each ``train`` row of metrics.jsonl
also carries ``reward_accuracy`` (share of pairs with rc > rr), ``reward_margin`` (rc - rr),
``chosen_logp``/``rejected_logp`` (log pi, summed over the answer), ``chosen_reward``/``rejected_reward``
and ``nll``, the chosen answers' negative log-likelihood per token (below).

RPO / DPO+NLL (``rpo_alpha``): DPO can push the rejected answers down without lifting the chosen
ones; the chosen answers' NLL under the policy (the same forward) is added to the loss::

    nll = -(sum of log pi over every chosen answer token of the batch) / (those tokens)
    loss = mean over pairs of the DPO loss + rpo_alpha * nll

one mean per token over the (micro-)batch, not per answer: TRL 1.16's ``loss_type=["sigmoid", "sft"]``
with ``loss_weights=[1, rpo_alpha]`` (and TRL 0.x's ``rpo_alpha``, a cross-entropy over the chosen
half). Over several micro-batches or ranks the step's term is the pair-weighted mean of each batch's.

The reference log-probs come from a no-grad forward with the adapters disabled in every step, or,
with ``precompute_ref``, once for every pair before the first step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.core.errors import UsageError
from splice.data.batching import Batch
from splice.data.formats import columns_of
from splice.data.preference import Pair, check_pairs, pair_batches, pair_template, tokenize_pairs, wrong_shape
from splice.data.rows import IGNORE_INDEX, Row, Template
from splice.lora.apply import adapters_disabled
from splice.training.logps import token_logps
from splice.training.method import Method, RunData, RunParts, RunRows
from splice.training.validate import autocast

__all__ = ["DPO", "DEFAULT_BETA", "chosen_nll", "dpo_losses"]

DEFAULT_BETA = 0.1  # TRL's


def dpo_losses(policy: Tensor, reference: Tensor, *, beta: float, label_smoothing: float = 0.0,
               loss_type: str = "sigmoid", tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss (b,), chosen rewards (b,), rejected rewards (b,)) of the module doc, from
    ``policy`` and ``reference`` (2b,) log-probs: the chosen answers then the rejected ones.
    ``tokens`` (2b,): answer tokens per row (needed by ipo)."""
    chosen, rejected = (policy - reference).chunk(2)  # log-ratios of the chosen and rejected answers
    if loss_type == "sigmoid":
        logits = beta * (chosen - rejected)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if tokens is None:
            raise ValueError("the ipo loss needs the answer tokens per row (tokens=)")
        n_chosen, n_rejected = tokens.clamp(min=1).to(chosen.dtype).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}: DPO's are sigmoid and ipo")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def chosen_nll(token_logps: Tensor, answer: Tensor, pair_weight: Tensor) -> Tensor:
    """The module doc's ``nll`` (a scalar): from ``token_logps`` (2b, T) and the ``answer`` mask
    (2b, T) of the chosen rows then the rejected ones; ``pair_weight`` (b,) 0 drops a placeholder pair."""
    logps = token_logps.chunk(2)[0]
    mask = answer.chunk(2)[0].to(logps.dtype) * pair_weight.to(logps.dtype)[:, None]
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


class DPO(Method):
    """Direct preference optimisation (module doc); the hooks of :class:`~splice.training.method.Method`."""

    name = "dpo"
    metric_names = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "chosen_reward",
                    "rejected_reward", "nll")
    graphs = False  # rows of every length, and a reference forward in the step

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.beta = DEFAULT_BETA if config.beta is None else config.beta
        self.loss_type = config.loss_type or "sigmoid"
        self.rpo_alpha = config.rpo_alpha or 0.0

    def embedded(self) -> RunRows:
        raise UsageError("--method dpo trains on preference pairs: pass --data FILE of prompt/chosen/rejected "
                         "rows (the embedded task has none; benchmarks/dpo_demo.py builds pairs from it)")

    def template(self, rows: Sequence[Row], *, where: str) -> tuple[Template, str]:
        problem = wrong_shape(columns_of(rows), where)
        if problem:
            raise ValueError(problem)
        return pair_template(rows), "preference pairs (prompt, chosen, rejected)"

    def check_rows(self, rows: Sequence[Row], template: Template, *, where: str) -> None:
        check_pairs(rows, where=where)

    def tokenize(self, rows: RunRows, tokenizer: Any) -> RunData:
        train = tokenize_pairs(rows.train, tokenizer, max_length=self.config.max_length)
        return RunData(train=train.pairs, validation=[], eval_rows=list(rows.eval_rows), task=rows.task,
                       truncated=train.truncated, dropped=train.dropped, source=rows.source,
                       kind="preference pairs")

    def epoch_batches(self, items: Sequence[Any], *, pad_id: int, epoch: int, rank: int, world: int) -> list[Batch]:
        return pair_batches(items, batch_size=self.config.batch_size, pad_id=pad_id, seed=self.config.seed,
                            epoch=epoch, rank=rank, world=world)

    def start(self, run: RunParts) -> None:
        """``precompute_ref``: every pair's reference log-probs, once (each rank computes them all,
        in the same batches: under FSDP2 every rank takes part in every forward)."""
        if not self.config.precompute_ref or all(p.ref is not None for p in run.data.train):
            return
        pairs: list[Pair] = run.data.train
        done: list[Pair] = []
        evaluation = run.wrapped.evaluation if run.wrapped else contextlib.nullcontext
        size = self.config.batch_size
        was_training = run.model.training
        run.model.eval()
        for start in range(0, len(pairs), size):
            group = pairs[start:start + size]
            batch = pair_batches(group, batch_size=size, pad_id=run.tokenizer.pad_token_id, seed=0, epoch=0,
                                 shuffle=False)[0]
            inputs = {k: v.to(run.device) for k, v in batch.items()}
            with autocast(run.device, run.precision), evaluation():
                ref = self.reference_logps(run.model, inputs).tolist()
            done += [replace(p, ref=(ref[i], ref[len(group) + i])) for i, p in enumerate(group)]
        run.model.train(was_training)
        run.data.train = done
        run.say(f"reference log-probs of {len(done)} pairs computed (--precompute-ref)")

    def units(self, batch: Batch) -> int:
        return int(batch["pair_weight"].sum())

    @staticmethod
    def reference_logps(model: nn.Module, batch: Batch) -> Tensor:
        """(2b,) summed answer log-probs with the adapters disabled, without gradients."""
        with torch.no_grad(), adapters_disabled(model):
            return _token_logps(model, batch).sum(dim=1)

    def loss(self, model: nn.Module, batch: Batch, *, device: torch.device, static_shapes: bool = False) -> Tensor:
        """[summed loss, then the summed metrics of ``metric_names``] over the batch's (real) pairs."""
        batch = {k: v.to(device) for k, v in batch.items()}
        reference = batch["ref_logps"] if "ref_logps" in batch else self.reference_logps(model, batch)
        per_token = _token_logps(model, batch)  # (2b, T-1)
        policy = per_token.sum(dim=1)
        answer = batch["labels"][:, 1:] != IGNORE_INDEX
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy, reference.to(policy.dtype), beta=self.beta, label_smoothing=self.config.label_smoothing,
            loss_type=self.loss_type, tokens=answer.sum(dim=1))
        weight = batch["pair_weight"].to(losses.dtype)
        nll = chosen_nll(per_token, answer, weight)
        pairs = weight.sum()  # the loop divides the sums by the step's pairs: a batch-level term counts per pair
        loss = (losses * weight).sum() + (self.rpo_alpha * nll * pairs if self.rpo_alpha else 0.0)
        chosen_logp, rejected_logp = policy.detach().chunk(2)
        metrics = [(chosen_rewards > rejected_rewards).to(losses.dtype), chosen_rewards - rejected_rewards,
                   chosen_logp, rejected_logp, chosen_rewards, rejected_rewards]
        return torch.stack([loss, *((m * weight).sum() for m in metrics), nll.detach() * pairs])


def _token_logps(model: nn.Module, batch: Batch) -> Tensor:
    """(2b, T-1) log-probs of each row's answer tokens (0 elsewhere)."""
    return token_logps(model, input_ids=batch["input_ids"], labels=batch["labels"],
                       attention_mask=batch["attention_mask"])
