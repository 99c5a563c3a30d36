"""splice.training.grpo: advantages, the loss of each type on hand-computed values and against TRL's
own loss code, clipping and KL, log-probs through the head, rollouts on the live adapter, and whole
GRPO runs on the tiny model (the reward rises; NF4 + checkpointing + resume; a failing reward)."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from splice.core.errors import RunError, UsageError
from splice.data.rows import IGNORE_INDEX
from splice.engine.engine import Engine
from splice.engine.sampling import SamplingParams
from splice.lora.apply import adapters_disabled, add_lora, lora_modules
from splice.lora.layers import LoraConfig
from splice.training.config import TrainConfig
from splice.training.grpo import (
    GRPO,
    PromptItem,
    Rollouts,
    completion_logps,
    group_advantages,
    grpo_loss,
    loss_batch,
    rollout,
    token_terms,
    unit_weights,
    units_of,
)
from splice.training.loop import train
from tests import tiny
from tests.numerics import GPU

# ----------------------------------------------------------------------------- advantages


def test_advantages_are_group_normalized() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2
    assert group_advantages(rewards, group=4).tolist() == pytest.approx([*expected[:1], *expected[1:2] * 2,
                                                                         expected[0], 0, 0, 0, 0], abs=1e-6)
    # Dr. GRPO: centred only; a group with equal rewards has no signal either way
    assert group_advantages(rewards, group=4, scale=False).tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="multiple of the group size 3"):
        group_advantages(rewards, group=3)


# ----------------------------------------------------------------------------- the loss, by hand

# Two completions: one of 2 tokens (advantage +1), one of 1 token then padding (advantage -1).
LOGPS = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.8), 0.0]])
OLD = torch.tensor([[math.log(0.25), math.log(0.25)], [math.log(0.5), 0.0]])  # ratios 2, 1 | 1.6
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_token_terms_clip_on_the_side_the_advantage_pushes() -> None:
    loss, kl, clipped = token_terms(LOGPS, OLD, ADV, epsilon=0.2)
    # row 0 (A = +1): ratio 2 -> min(2, 1.2) = 1.2; ratio 1 -> 1.  Row 1 (A = -1): ratio 1.6 -> min(-1.6, -1.2) = -1.6
    assert loss[0].tolist() == pytest.approx([-1.2, -1.0])
    assert loss[1, 0].item() == pytest.approx(1.6)
    assert clipped.tolist() == [[True, False], [False, False]]  # row 1's ratio is past 1.2 but A < 0: not clipped
    assert kl.abs().sum() == 0  # no reference given


def test_clipped_tokens_pass_no_gradient() -> None:
    logps = LOGPS.clone().requires_grad_(True)
    grpo_loss(logps, OLD, ADV, MASK, loss_type="dapo", epsilon=0.2, max_completion_length=2).backward()
    assert logps.grad is not None
    grad = logps.grad.tolist()
    assert grad[0][0] == 0.0  # ratio 2 > 1.2 with A > 0: the clipped branch, constant
    assert grad[0][1] == pytest.approx(-1 / 3)  # d(-ratio * A)/dlogp = -ratio * A = -1, over 3 tokens
    assert grad[1][0] == pytest.approx(1.6 / 3)  # the unclipped branch with A < 0
    assert grad[1][1] == 0.0  # padding


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("dapo", (-1.2 - 1.0 + 1.6) / 3),  # token mean over the batch
    ("grpo", ((-1.2 - 1.0) / 2 + 1.6 / 1) / 2),  # each completion's token mean, then the mean
    ("dr_grpo", (-1.2 - 1.0 + 1.6) / (2 * 4)),  # sum / (completions x max_completion_length)
])
def test_each_loss_type_on_a_hand_computed_batch(loss_type: str, expected: float) -> None:
    loss = grpo_loss(LOGPS, OLD, ADV, MASK, loss_type=loss_type, epsilon=0.2, max_completion_length=4)
    assert loss.item() == pytest.approx(expected)


def test_the_kl_term_is_trls_k3_estimator() -> None:
    ref = torch.tensor([[math.log(0.25), math.log(0.25)], [math.log(0.4), 0.0]])
    _, kl, _ = token_terms(LOGPS, LOGPS, ADV, epsilon=0.2, ref_logps=ref)
    # k3 = p_ref/p - log(p_ref/p) - 1: 0.5 - ln 0.5 - 1, 0 (equal), 0.5 - ln 0.5 - 1 again
    k = 0.5 - math.log(0.5) - 1
    assert kl.flatten().tolist() == pytest.approx([k, 0.0, k, 0.0])
    with_kl = grpo_loss(LOGPS, LOGPS, ADV, MASK, loss_type="dapo", epsilon=0.2, max_completion_length=2,
                        beta=0.1, ref_logps=ref)
    assert with_kl.item() == pytest.approx((-1 - 1 + 1 + 0.1 * 2 * k) / 3)  # ratio 1: -A per token, + beta kl


def test_micro_batches_and_units_add_up_to_the_whole_batch() -> None:
    torch.manual_seed(0)
    logps, old = -torch.rand(6, 5) * 3, -torch.rand(6, 5) * 3
    adv, mask = torch.randn(6), (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1.0
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        whole = grpo_loss(logps, old, adv, mask, loss_type=loss_type, epsilon=0.2, max_completion_length=7)
        summed = units = 0.0
        for part in (slice(0, 2), slice(2, 6)):  # as the loop sums micro-batches, then divides once
            per_token, _, _ = token_terms(logps[part], old[part], adv[part], epsilon=0.2)
            weights, _ = unit_weights(mask[part], loss_type=loss_type, max_completion_length=7)
            summed += float((per_token * weights).sum())
            units += units_of(mask[part], loss_type=loss_type, max_completion_length=7)
        assert summed / units == pytest.approx(whole.item(), rel=1e-6)


# ----------------------------------------------------------------------------- against TRL's code


def _trl_loss(logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str, epsilon: float, beta: float, max_completion_length: int) -> tuple[torch.Tensor, Any]:
    """TRL's own ``GRPOTrainer._compute_loss`` on fixed per-token log-probs: its ``self`` holds only the
    settings that code reads (one process, no accumulation), its model forward returns ``logps``."""
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer  # the reference, when installed

    one = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                reduce=lambda x, reduction="sum": x)
    settings = types.SimpleNamespace(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon, args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                                         steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length, accelerator=one,
        _metrics=defaultdict(lambda: defaultdict(list)), _entropy_bonus_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    rows = logps.shape[0]
    inputs = {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2),
              "completion_ids": torch.zeros(logps.shape, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(settings, None, inputs), settings._metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_match_trl(loss_type: str, beta: float) -> None:
    torch.manual_seed(1)
    logps = (-torch.rand(6, 5) * 3).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(6, 5)  # ratios far enough from 1 that some clip
    ref = logps.detach() + 0.2 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = torch.ones(6, 5)
    mask[0, 3:] = mask[2, 1:] = 0
    theirs, logged = _trl_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2, beta=beta,
                               max_completion_length=8)
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    ours = grpo_loss(logps, old, adv, mask, loss_type=loss_type, epsilon=0.2, max_completion_length=8, beta=beta,
                     ref_logps=ref)
    (grad_ours,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-7)
    _, kl, clipped = token_terms(logps.detach(), old, adv, epsilon=0.2, ref_logps=ref)
    assert logged["clip_ratio/region_mean"][0] == pytest.approx(float((clipped.float() * mask).sum() / mask.sum()))
    assert 0 < logged["clip_ratio/region_mean"][0] < 1
    if beta:
        assert logged["kl"][0] == pytest.approx(float((kl * mask).sum() / mask.sum()))


# ----------------------------------------------------------------------------- log-probs and rollouts


def _lora_llama(tokenizer: Any) -> torch.nn.Module:
    model = tiny.build_tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    add_lora(model, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    return model


def test_completion_logps_are_log_softmax_at_the_temperature(tiny_tokenizer: Any) -> None:
    model = _lora_llama(tiny_tokenizer)
    torch.manual_seed(0)
    items = [PromptItem(row=0, prompt="hi", ids=[5, 6, 7], columns={}),
             PromptItem(row=1, prompt="yo", ids=[8, 9], columns={})]
    rolled = Rollouts(items=items, ids=[[10, 11], [12, 13, 2]], texts=["", ""])
    batch = loss_batch(rolled, torch.tensor([1.0, -1.0]), slice(0, 2), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 10, 11], [8, 9, 12, 13, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [10, 11], [IGNORE_INDEX] * 2 + [12, 13, 2]]
    assert batch["num_tokens"].item() == 10
    got = completion_logps(model, batch["input_ids"], batch["labels"], temperature=0.7)
    full = torch.log_softmax(model(batch["input_ids"]).logits.float() / 0.7, dim=-1)
    for row, (start, tokens) in enumerate(((3, [10, 11]), (2, [12, 13, 2]))):
        for j, token in enumerate(tokens):
            assert got[row, start - 1 + j].item() == pytest.approx(full[row, start - 1 + j, token].item(), abs=1e-5)
    assert int((got != 0).sum()) == 5  # zero off the completions


def test_rollouts_read_the_live_adapter(tiny_tokenizer: Any) -> None:
    model = _lora_llama(tiny_tokenizer)
    engine = Engine(model, tiny_tokenizer, max_seqs=8, max_len=64)
    ids = list(tiny_tokenizer("the name")["input_ids"])
    items = [PromptItem(row=0, prompt="the name", ids=ids, columns={})]

    def params(item: PromptItem, g: int) -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=1.0, seed=g)

    model.train()
    first = rollout(engine, items, generations=4, params=params)
    assert model.training  # generate ran in eval mode and restored the mode it found
    with adapters_disabled(model):  # lora_B starts at zero: the adapter changes nothing yet
        assert rollout(engine, items, generations=4, params=params).ids == first.ids
    assert rollout(engine, items, generations=4, params=params).ids == first.ids  # seeded: reproducible
    with torch.no_grad():  # an optimizer step, in place
        for _, _, layer in lora_modules(model):
            layer.lora_B.weight.normal_(std=0.5)
    moved = rollout(engine, items, generations=4, params=params)
    assert moved.ids != first.ids  # the same engine samples from the new adapter: nothing was copied
    fresh = Engine(model, tiny_tokenizer, max_seqs=8, max_len=64)
    assert rollout(fresh, items, generations=4, params=params).ids == moved.ids
    assert all(len(c) <= 8 + 1 for c in moved.ids) and len(moved.ids) == 4


# ----------------------------------------------------------------------------- whole runs

FAVOURITE = 200  # the reward asks for tokens of ids from here on (about a third of the tiny vocabulary)


@pytest.fixture(scope="module")
def grpo_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model folder, prompts.jsonl, rewards.py) for whole GRPO runs on the tiny Llama."""
    root = tmp_path_factory.mktemp("grpo")
    model, _ = tiny.write_run_inputs(root)
    words = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"{words[i % 8]} then {words[(i * 3) % 8]}?", "want": FAVOURITE}) + "\n")
    (root / "rewards.py").write_text(
        "def favourite(prompts, completions, completion_ids, want, **kwargs):\n"
        "    return [sum(t >= w for t in ids) / max(1, len(ids)) for ids, w in zip(completion_ids, want)]\n\n"
        "def fails_later(prompts, completions, **kwargs):\n"
        "    import os\n"
        "    if os.path.exists(os.path.join(os.path.dirname(__file__), 'fail')):\n"
        "        raise ValueError('cannot score ' + repr(completions[0][:0]))\n"
        "    return [0.0] * len(completions)\n")
    return model, root / "prompts.jsonl", root / "rewards.py"


def _config(inputs: tuple[Path, Path, Path], out: Path, **overrides: Any) -> TrainConfig:
    model, data, rewards = inputs
    options: dict[str, Any] = dict(
        model=str(model), data=str(data), method="grpo", reward=f"{rewards}:favourite", output_dir=str(out),
        steps=8, lr=3e-2, rank=8, alpha=16, batch_size=2, num_generations=8, max_completion_length=6,
        max_length=48, eval_samples=0, compare_base=False, save_every=4, warmup_steps=0, schedule="constant")
    options.update(overrides)
    return TrainConfig(**options)


def _rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_the_reward_rises_on_a_learnable_reward(grpo_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    result = train(_config(grpo_inputs, tmp_path / "run"))
    rows = _rows(tmp_path / "run")
    assert result.steps == 8 and len(rows) == 8
    first, last = rows[0]["reward_mean"], sum(r["reward_mean"] for r in rows[-2:]) / 2
    assert last > first + 0.3, [r["reward_mean"] for r in rows]
    row = rows[-1]
    assert {"loss", "clip_ratio", "reward_mean", "reward_std", "reward/favourite", "completion_length",
            "frac_reward_zero_std"} <= set(row)
    assert "kl" not in row  # beta 0: no reference forward
    assert row["reward/favourite"] == pytest.approx(row["reward_mean"])
    assert 1 <= row["completion_length"] <= 7  # up to 6 tokens, + the EOS when it stopped
    assert row["clip_ratio"] == 0.0  # one update per rollout batch: the ratio is 1


def test_nf4_checkpointing_kl_and_resume(grpo_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    options = dict(quantize="nf4", gradient_checkpointing=True, beta=0.05, loss_type="grpo", steps=4,
                   save_every=2)
    whole = train(_config(grpo_inputs, tmp_path / "whole", **options))
    rows = _rows(tmp_path / "whole")
    assert whole.steps == 4 and all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0
    # stop after 2 steps (a checkpoint), resume to 4: the same rollouts (seeded by epoch, row and
    # generation) and the same losses as the uninterrupted run
    train(_config(grpo_inputs, tmp_path / "split", **{**options, "steps": 2}))
    train(_config(grpo_inputs, tmp_path / "split", **options, resume=True))
    resumed = _rows(tmp_path / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("loss", "reward_mean", "kl"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in rows], rel=1e-4, abs=1e-6)


RANK_RUNS = {  # name: each rank's options (1 prompt a step); its one-process reference reads both ranks' prompts
    "ddp": {},
    "fsdp2": {"shard": True},
    "fsdp2_fast": {"shard": True, "fuse": True, "gradient_checkpointing": True},  # the CPU's reference paths
    "fsdp2_nf4": {"shard": True, "quantize": "nf4", "gradient_checkpointing": True},  # sharded in 4 bits
}


def test_two_ranks_equal_one_process(grpo_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """2 gloo ranks, DDP or FSDP2 (the rollouts on whole weights gathered for them), each sampling its own
    prompt's completions = one process sampling both: the same losses, rewards and KL each step and the
    same saved adapter (the KL term makes the loss more than the advantages' zero mean)."""
    from tests.distributed.ranks import check, run_ranks

    model, data, _ = grpo_inputs
    common: dict[str, Any] = dict(steps=3, num_generations=4, beta=0.05, lr=1e-2, save_every=0, device="cpu",
                                  dropout=0.0)

    def options(name: str) -> dict[str, Any]:  # a rank's whole config, as the rank worker's overrides
        config = _config(grpo_inputs, tmp_path / name, **common, **RANK_RUNS[name], batch_size=1)
        return {k: v for k, v in config.to_dict().items() if k not in ("model", "data", "output_dir")}

    check(run_ranks({"inputs": [str(model), str(data)], "runs": [
        {"out": str(tmp_path / name), "options": options(name)} for name in RANK_RUNS]}, world=2, timeout=400))
    for reference, extra in (("one", {}), ("one_nf4", {"quantize": "nf4"})):
        train(_config(grpo_inputs, tmp_path / reference, **common, **extra, batch_size=2))
    for name in RANK_RUNS:
        ranks = [json.loads((tmp_path / name / f"result-rank{r}.json").read_text()) for r in (0, 1)]
        one = tmp_path / ("one_nf4" if "nf4" in name else "one")
        assert ranks[0]["parallel"] == name.split("_")[0] and ranks[0]["world_size"] == 2
        assert ranks[0]["losses"] == ranks[1]["losses"]  # all-reduced: every rank reports the same
        ours, theirs = _rows(tmp_path / name), _rows(one)
        for key in ("loss", "reward_mean", "kl", "completion_length"):
            torch.testing.assert_close(torch.tensor([r[key] for r in ours]), torch.tensor([r[key] for r in theirs]),
                                       rtol=1e-4, atol=1e-5, msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
        assert theirs[-1]["kl"] > 0 and theirs[-1]["reward_mean"] != theirs[0]["reward_mean"]  # it trained
        mine, ref = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (tmp_path / name, one))
        assert mine.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-5)


@GPU
def test_fsdp2_rollouts_on_the_gpu(grpo_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """FSDP2 in a world of one on a GPU (bf16 compute): the rollouts run eagerly on the gathered weights
    (no CUDA graph holds the addresses of one step's gather) and the run trains."""
    result = train(_config(grpo_inputs, tmp_path / "run", shard=True, beta=0.05, steps=3))
    rows = _rows(tmp_path / "run")
    assert result.parallel == "fsdp2" and result.steps == 3
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["kl"] > 0


def test_grpo_trains_an_sft_adapter_further(grpo_inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    model, _, _ = grpo_inputs
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    train(TrainConfig(model=str(model), data=str(qa), output_dir=str(tmp_path / "sft"), steps=2, rank=4,
                      max_length=48, eval_samples=0, compare_base=False, warmup_steps=0))
    sft = tmp_path / "sft" / "adapter"
    train(_config(grpo_inputs, tmp_path / "grpo", adapter=str(sft), steps=1, rank=8))
    saved = json.loads((tmp_path / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4  # the SFT adapter's rank, trained further (not a fresh rank-8 LoRA)
    with pytest.raises(UsageError, match=r"adapter must be an adapter folder"):
        _config(grpo_inputs, tmp_path / "x", adapter=str(tmp_path / "nowhere"))


def test_a_failing_reward_names_it_and_keeps_the_checkpoint(grpo_inputs: tuple[Path, Path, Path],
                                                            tmp_path: Path) -> None:
    _, _, rewards = grpo_inputs
    config = _config(grpo_inputs, tmp_path / "run", reward=f"{rewards}:fails_later", steps=4, save_every=1)
    flag = rewards.parent / "fail"
    try:
        train(_config(grpo_inputs, tmp_path / "run", reward=f"{rewards}:fails_later", steps=1, save_every=1))
        flag.write_text("")
        with pytest.raises(RunError, match=r"reward .*rewards.py:fails_later raised ValueError: cannot score '' "
                                           r"\(on training row \d+ \(prompt '.* then .*\?'\)\); the last "
                                           r"checkpoint, .*step-000001, is kept") as error:
            train(TrainConfig(**{**config.to_dict(), "resume": True}))
        assert "\n" not in str(error.value)
    finally:
        flag.unlink(missing_ok=True)
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()


def test_bad_grpo_input_is_refused_before_the_model_loads(grpo_inputs: tuple[Path, Path, Path],
                                                          tmp_path: Path) -> None:
    model, data, rewards = grpo_inputs
    cases = [
        (dict(reward=f"{rewards}:nope"), r"--reward .*rewards.py:nope: .*rewards.py defines no 'nope'"),
        (dict(reward=str(tmp_path / "gone.py") + ":f"), r"gone.py does not exist"),
        (dict(reward="builtin:word_f1"), r"has no name or reference column to score against"),
        (dict(reward=None), r"GRPO needs a reward"),
        (dict(temperature=0.0), r"--temperature 0.0: GRPO samples its rollouts"),
        (dict(model=str(tmp_path / "no-model")), r"does not exist|not found|no-model"),
    ]
    for overrides, message in cases[:-1]:
        with pytest.raises(UsageError, match=message):
            GRPO(_config(grpo_inputs, tmp_path / "x", **overrides)).template(
                [json.loads(line) for line in data.read_text().splitlines()], where=str(data))
    sft_rows = tmp_path / "qa.jsonl"
    sft_rows.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UsageError, match=r"qa.jsonl: --method grpo trains on rows with a prompt column"):
        train(_config(grpo_inputs, tmp_path / "y", data=str(sft_rows)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(UsageError, match=r"bad.jsonl, row 2: the prompt is int '3'; give text, or chat messages"):
        train(_config(grpo_inputs, tmp_path / "z", data=str(bad), model=str(tmp_path / "no-model")))
