"""DPO: the loss math, parity with TRL's DPOTrainer, runs (metrics, precomputed reference, NF4,
checkpointing, two DDP ranks) and bad input named before any model loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from splice.core.errors import UsageError
from splice.training.config import TrainConfig
from splice.training.dpo import chosen_nll, dpo_losses
from splice.training.loop import step, train
from splice.training.setup import build_run, prepare_rows
from splice.training.state import latest_checkpoint
from tests.tiny import run_config

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma"]


def write_pairs(path: Path, n: int = 24, *, chat: bool = False) -> Path:
    """Pairs the tiny model can learn: the chosen answer swaps the two words, the rejected does not.
    (Its second word is another one: with the same words both answers' log-probs nearly cancel,
    and float rounding alone would move the gradient by 1%.)"""
    with path.open("w") as f:
        for i in range(n):
            a, b, c = WORDS[i % 8], WORDS[(i * 3 + 1) % 8], WORDS[(i + 5) % 8]
            row = {"prompt": f"Q: {a} then {b}?\nA: ", "chosen": f"{b} {a}", "rejected": f"{a} {c}"}
            if chat:
                row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                       "chosen": [{"role": "assistant", "content": row["chosen"]}],
                       "rejected": [{"role": "assistant", "content": row["rejected"]}]}
            f.write(json.dumps(row) + "\n")
    return path


def dpo_config(inputs: tuple[Path, Path], out: Path, pairs: Path, **overrides: object) -> TrainConfig:
    options: dict[str, object] = dict(method="dpo", data=str(pairs), prompt_template=None, response_template=None,
                                      dropout=0.0, steps=6, warmup_steps=0, lr=2e-3)
    options.update(overrides)
    return run_config(inputs, out, **options)


def train_rows(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


# ----------------------------------------------------------------------------- the loss


def test_losses_are_the_formulas() -> None:
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0], dtype=torch.float64)  # chosen (2), then rejected (2)
    reference = torch.tensor([-3.5, -4.0, -4.5, -2.5], dtype=torch.float64)
    d = torch.tensor([0.5 - 0.5, -1.0 - 0.5], dtype=torch.float64)  # chosen log-ratio - rejected log-ratio
    losses, chosen, rejected = dpo_losses(policy, reference, beta=0.2)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.2 * d))
    torch.testing.assert_close(losses, torch.tensor([math.log(2), 0.8543552444685271], dtype=torch.float64))
    torch.testing.assert_close(chosen, torch.tensor([0.1, -0.2], dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor([0.1, 0.1], dtype=torch.float64))
    smoothed, _, _ = dpo_losses(policy, reference, beta=0.2, label_smoothing=0.25)
    expected = -0.75 * torch.nn.functional.logsigmoid(0.2 * d) - 0.25 * torch.nn.functional.logsigmoid(-0.2 * d)
    torch.testing.assert_close(smoothed, expected)
    tokens = torch.tensor([2, 4, 5, 1])
    ipo, _, _ = dpo_losses(policy, reference, beta=0.2, loss_type="ipo", tokens=tokens)
    per_token = torch.tensor([0.5 / 2 - 0.5 / 5, -1.0 / 4 - 0.5 / 1], dtype=torch.float64)
    torch.testing.assert_close(ipo, (per_token - 1 / 0.4) ** 2)
    with pytest.raises(ValueError, match="ipo loss needs the answer tokens"):
        dpo_losses(policy, reference, beta=0.2, loss_type="ipo")


def test_chosen_nll_is_a_mean_per_token_over_the_chosen_answers() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -0.25],  # chosen (2), then rejected (2)
                                [-9.0, -9.0, -9.0], [-7.0, -7.0, -7.0]], dtype=torch.float64)
    answer = torch.tensor([[True, True, False], [False, True, True], [True, True, True], [True, False, False]])
    both = chosen_nll(token_logps, answer, torch.ones(2))
    torch.testing.assert_close(both, torch.tensor((1 + 2 + 0.25 + 0.25) / 4, dtype=torch.float64))  # not per answer
    only_first = chosen_nll(token_logps, answer, torch.tensor([1.0, 0.0]))  # the second pair is a placeholder
    torch.testing.assert_close(only_first, torch.tensor(1.5, dtype=torch.float64))
    assert chosen_nll(token_logps, answer, torch.zeros(2)).item() == 0.0


def test_rpo_alpha_is_a_dpo_option() -> None:
    for bad in (dict(rpo_alpha=1.0), dict(method="grpo", rpo_alpha=1.0), dict(method="dpo", rpo_alpha=-0.5)):
        with pytest.raises(UsageError, match=r"rpo_alpha is an option of method dpo \(>= 0"):
            TrainConfig(**bad)  # type: ignore[arg-type]
    assert TrainConfig(method="dpo", rpo_alpha=1).rpo_alpha == 1.0


@pytest.mark.parametrize("rpo_alpha", [None, 0.5])
def test_first_steps_match_trl_dpo_trainer(tiny_run_inputs, tmp_path, rpo_alpha: float | None) -> None:
    """The same pairs, beta, initial adapter and optimizer (SGD, momentum 0.9, constant lr): TRL's
    DPOTrainer + PEFT logs the same loss, rewards and log-probs for three steps. With ``rpo_alpha``:
    TRL 1.16's DPO+NLL, ``loss_type=["sigmoid", "sft"]`` weighted ``[1, rpo_alpha]``."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from splice.lora.peft_io import save_adapter

    model_dir = tiny_run_inputs[0]
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    config = dpo_config(tiny_run_inputs, tmp_path / "run", pairs, steps=3, lr=0.05, optimizer="sgd",
                        schedule="constant", batch_size=4, val_fraction=0.0, rank=4, alpha=8,
                        targets="q_proj,v_proj", rpo_alpha=rpo_alpha, device="cpu")  # TRL runs use_cpu=True below
    run = build_run(config)
    save_adapter(run.model, tmp_path / "init", base_model=str(model_dir))
    ours = [step(run, stop={}) for _ in range(3)]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "init",
                                           is_trainable=True)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                     beta=0.1, learning_rate=0.05, report_to=[], max_length=64, save_strategy="no", use_cpu=True,
                     bf16=False, fp16=False,
                     **({} if rpo_alpha is None else {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, rpo_alpha]}))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h]
    names = {"reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins",
             "chosen_logp": "logps/chosen", "rejected_logp": "logps/rejected", "chosen_reward": "rewards/chosen",
             "rejected_reward": "rewards/rejected"}
    assert len(theirs) == 3
    for mine, trl_row in zip(ours, theirs, strict=True):
        assert mine.loss == pytest.approx(trl_row["loss"], abs=1e-5)
        assert mine.grad_norm == pytest.approx(trl_row["grad_norm"], rel=1e-4)
        for name, trl_name in names.items():
            assert mine.metrics[name] == pytest.approx(trl_row[trl_name], rel=1e-4, abs=1e-5), name
    # a fresh adapter is the reference (and the chosen answers' NLL is the base model's, not trivial)
    assert ours[0].loss == pytest.approx(math.log(2) + (rpo_alpha or 0.0) * ours[0].metrics["nll"])
    assert ours[0].metrics["nll"] > 1.0
    assert ours[-1].metrics["reward_margin"] > 0.05  # and the steps moved it: not a trivial agreement


# ----------------------------------------------------------------------------- runs


def test_run_learns_and_logs_the_metrics(tiny_run_inputs, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    result = train(dpo_config(tiny_run_inputs, tmp_path / "run", pairs, steps=12, batch_size=8))
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "chosen_reward",
                "rejected_reward", "nll"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["loss"] == pytest.approx(math.log(2))
    assert rows[0]["reward_margin"] == 0.0
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.64  # from ln 2 = 0.693
    assert min(r["reward_accuracy"] for r in rows[-3:]) >= 0.75 and rows[-1]["reward_margin"] > 0.1
    assert result.losses == [r["loss"] for r in rows]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_precomputed_reference_is_the_same_run(tiny_run_inputs, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12, chat=True)
    every_step = train(dpo_config(tiny_run_inputs, tmp_path / "a", pairs, steps=4, max_length=160))
    once = train(dpo_config(tiny_run_inputs, tmp_path / "b", pairs, steps=4, max_length=160, precompute_ref=True))
    torch.testing.assert_close(torch.tensor(once.losses), torch.tensor(every_step.losses), rtol=1e-5, atol=1e-6)
    assert once.losses[0] == pytest.approx(math.log(2))


def test_checkpointing_and_nf4(tiny_run_inputs, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    plain = train(dpo_config(tiny_run_inputs, tmp_path / "plain", pairs, steps=3))
    ckpt = train(dpo_config(tiny_run_inputs, tmp_path / "ckpt", pairs, steps=3, gradient_checkpointing=True))
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    nf4 = train(dpo_config(tiny_run_inputs, tmp_path / "nf4", pairs, steps=3, quantize="nf4",
                           gradient_checkpointing=True))
    assert nf4.losses[0] == pytest.approx(math.log(2)) and all(math.isfinite(v) for v in nf4.losses)
    assert nf4.losses != plain.losses  # the quantized base is another reference


@pytest.mark.parametrize("shard", [False, True])
def test_two_ranks_equal_one_process(tiny_run_inputs, tmp_path, shard: bool) -> None:
    """2 gloo ranks (DDP, or FSDP2 with the reference precomputed) with 2 pairs each = one process
    with 4 (the last global batch of 10 pairs has 2: each rank takes one)."""
    from tests.distributed.ranks import run_ranks

    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    options = dict(method="dpo", data=str(pairs), prompt_template=None, response_template=None, dropout=0.0,
                   steps=4, warmup_steps=0, lr=2e-3, save_every=0, device="cpu")  # gloo ranks: CPU on any machine
    job = {"inputs": [str(p) for p in tiny_run_inputs], "runs": [
        {"out": str(tmp_path / "ddp"), "options": {**options, "batch_size": 2, "shard": shard,
                                                   "precompute_ref": shard}}]}
    results = run_ranks(job, world=2, timeout=300)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    ddp = json.loads((tmp_path / "ddp" / "result-rank0.json").read_text())
    one = train(dpo_config(tiny_run_inputs, tmp_path / "one", pairs, **{**options, "batch_size": 4}))
    assert ddp["parallel"] == ("fsdp2" if shard else "ddp") and ddp["world_size"] == 2
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(one.losses), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_data_that_does_not_fit_the_method_is_one_line(tiny_run_inputs, tmp_path) -> None:
    completion = tmp_path / "sft.jsonl"
    completion.write_text('{"prompt": "2+2=", "completion": "4"}\n' * 4)
    with pytest.raises(ValueError, match=r"sft.jsonl: --method dpo needs prompt, chosen and rejected columns.*"
                                         r"missing chosen, rejected.*--method sft"):
        prepare_rows(dpo_config(tiny_run_inputs, tmp_path / "a", completion))
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    with pytest.raises(ValueError, match=r"pairs.jsonl: rows with prompt, chosen and rejected are preference "
                                         r"pairs; train them with --method dpo"):
        prepare_rows(run_config(tiny_run_inputs, tmp_path / "b", data=str(pairs), prompt_template=None,
                                response_template=None))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(pairs.read_text() + '{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, row 5: the row has no rejected"):
        prepare_rows(dpo_config(tiny_run_inputs, tmp_path / "c", broken))
    with pytest.raises(ValueError, match="pass --data FILE of prompt/chosen/rejected rows"):
        prepare_rows(TrainConfig(method="dpo"))


def test_cli_names_the_row_before_the_model_loads(tiny_run_inputs, tmp_path, monkeypatch, capsys) -> None:
    import splice.training.setup as setup
    from splice.cli import main

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(setup, "load_model", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    code = main(["train", "--method", "dpo", "--model", str(tiny_run_inputs[0]), "--data", str(bad),
                 "--output-dir", str(tmp_path / "run"), "--steps", "2", "--max-length", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "bad.jsonl, row 2: 'chosen' holds int" in err[0], err


def test_bad_data_on_resume_keeps_the_checkpoint(tiny_run_inputs, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 12)
    out = tmp_path / "run"
    train(dpo_config(tiny_run_inputs, out, pairs, steps=4, save_every=2))
    saved = latest_checkpoint(out / "checkpoints")
    assert saved is not None and saved.name == "step-000004"
    pairs.write_text(pairs.read_text() + '{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="row 13: the row has no rejected"):
        train(dpo_config(tiny_run_inputs, out, pairs, steps=8, resume=True))
    assert latest_checkpoint(out / "checkpoints") == saved
    assert len(train_rows(out)) == 4
