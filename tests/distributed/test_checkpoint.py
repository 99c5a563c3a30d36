"""Sharded checkpoints (torch.distributed.checkpoint): exact resume on the same world size, and a
checkpoint written by 2 FSDP2 ranks resumed by one plain process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.distributed.checkpoint import is_sharded_checkpoint, load_sharded
from splice.lora.apply import add_lora
from splice.lora.freeze import freeze
from splice.lora.layers import LoraConfig
from splice.lora.peft_io import save_adapter
from splice.models.loading import load_model
from splice.training.loop import train
from tests.distributed.ranks import check, run_ranks
from tests.tiny import run_config

# Dropout on: an exact resume needs each rank's restored RNG, optimizer, schedule and data position.
OPTIONS = dict(device="cpu", dropout=0.1, save_every=3, batch_size=2, shard=True)


@pytest.fixture(scope="module")
def runs(tiny_run_inputs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    job = {"inputs": [str(p) for p in tiny_run_inputs], "runs": [
        {"out": str(root / "whole"), "options": {**OPTIONS, "steps": 6}},
        {"out": str(root / "cut"), "options": {**OPTIONS, "steps": 6}, "interrupt_at": 3},
        {"out": str(root / "cut"), "options": {**OPTIONS, "steps": 6, "resume": True}},
    ]}
    results = run_ranks(job, world=2, timeout=400)
    check(results)
    (root / "rank0.log").write_text(results[0].stdout + results[0].stderr)
    return root


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_same_world_size_resume_is_exact(runs: Path) -> None:
    whole = json.loads((runs / "whole" / "result-rank0.json").read_text())
    resumed = json.loads((runs / "cut" / "result-rank0.json").read_text())
    # SIGINT came after step 3's collective: every rank stops after step 4 (rank 1, never
    # signalled, too), checkpoints, and the resumed run does steps 5 and 6.
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 2 and not resumed["interrupted"]
    assert "stopped by signal 2 after step 4" in (runs / "rank0.log").read_text()
    torch.testing.assert_close(torch.tensor(_losses(runs / "cut")), torch.tensor(whole["losses"]),
                               rtol=1e-6, atol=1e-6)
    step = runs / "whole" / "checkpoints" / "step-000003"
    assert is_sharded_checkpoint(step)
    assert {p.name for p in step.iterdir()} >= {".metadata", "trainer_state.json", "adapter_model.safetensors",
                                                "adapter_config.json", "rng-rank0.safetensors",
                                                "rng-rank1.safetensors"}
    assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2


def test_two_rank_checkpoint_loads_into_one_process(runs: Path, tiny_run_inputs, tmp_path) -> None:
    step = runs / "whole" / "checkpoints" / "step-000003"
    model, _ = load_model(str(tiny_run_inputs[0]))
    add_lora(model, LoraConfig(rank=8, alpha=16, dropout=0.1, targets="all-linear"))
    freeze(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    trainer, notes = load_sharded(step, model=model, optimizer=optimizer, scheduler=scheduler, env=None)
    assert trainer["step"] == 3 and trainer["batch_index"] == 6  # 3 global batches of 2 shares
    assert "written by 2 rank(s), resumed on 1" in notes[0]
    save_adapter(model, tmp_path / "loaded")
    loaded = load_file(tmp_path / "loaded" / "adapter_model.safetensors")
    gathered = load_file(step / "adapter_model.safetensors")  # rank 0's gathered copy
    assert loaded.keys() == gathered.keys() and len(loaded) == len(params)
    for key, value in gathered.items():
        assert torch.equal(loaded[key], value), key
    for param in params.values():
        state = optimizer.state[param]
        assert float(state["step"]) == 3.0
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].min() >= 0
    assert sum(float(s["exp_avg_sq"].sum()) for s in optimizer.state.values()) > 0
    assert scheduler.last_epoch == 3


def test_two_rank_run_resumes_in_one_process(runs: Path, tiny_run_inputs, tmp_path, capsys) -> None:
    out = tmp_path / "moved"
    shutil.copytree(runs / "whole", out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    saved = json.loads((out / "run_config.json").read_text())  # the run, moved to another directory
    (out / "run_config.json").write_text(json.dumps({**saved, "output_dir": str(out)}))
    config = dict(OPTIONS, shard=False, resume=True)
    at_three = train(run_config(tiny_run_inputs, out, **config, steps=3))  # nothing left to train
    assert at_three.steps == 3 and at_three.losses == [] and at_three.parallel == "none"
    assert "written by 2 rank(s), resumed on 1" in capsys.readouterr().out
    # The final adapter of a resumed run that trains nothing is the checkpoint's, exactly.
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, value in load_file(out / "checkpoints" / "step-000003" / "adapter_model.safetensors").items():
        assert torch.equal(saved[key], value), key
    finished = train(run_config(tiny_run_inputs, out, **config, steps=6))
    assert finished.steps == 6 and len(finished.losses) == 3
    assert finished.losses[-1] < _losses(runs / "whole")[0] - 1.0  # it kept learning
