"""The GPU benchmark harness still runs: benchmarks/train_throughput.py on a tiny CPU model.

The numbers are meaningless on a CPU; what this pins is that every framework's worker, every
splice variant (graphs, checkpointing, offload) and the table/JSON writing work, so a broken
harness is found here rather than on the device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_harness_runs_tiny(tmp_path: Path) -> None:
    env = subprocess_env(SPLICE_BENCH_TMP=str(tmp_path / "scratch"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--tiny", "--frameworks", "peft,splice",
         "--configs", "A,C,P", "--layers", "2", "--steps", "1", "--warmup", "1", "--parity-steps", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    runs = {(r["framework"], r["config"], r["variant"]) for res in results for r in res["runs"]}
    assert ("peft", "A", "") in runs and ("splice", "A", "graphs") in runs
    for variant in ("auto", "auto + graphs", "ckpt all", "ckpt all + graphs", "ckpt all + offload",
                    "ckpt all + offload + graphs"):
        assert ("splice", "C", variant) in runs
    parity = {res["framework"]: r["losses"] for res in results for r in res["runs"] if r["config"] == "P"}
    assert abs(parity["peft"][0] - parity["splice"][0]) < 1e-4  # same model, data and init
    table = (out / "table.md").read_text()
    assert "| C | splice (ckpt all + offload + graphs) |" in table


@pytest.mark.slow
def test_dora_benchmark_runs_tiny(tmp_path: Path) -> None:
    """benchmarks/dora.py: splice/PEFT x LoRA/DoRA on a tiny CPU model; DoRA starts where LoRA does."""
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dora.py"), "--tiny", "--layers", "2", "--seq", "32",
         "--batch", "1", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["run"]: r for r in json.loads((tmp_path / "dora.json").read_text())["runs"]}
    assert set(runs) == {"splice LoRA", "splice DoRA", "peft DoRA", "peft LoRA"}
    first = [r["losses"][0] for r in runs.values()]
    assert max(first) - min(first) < 1e-2  # same model, data and init: a no-op adapter at step 0
    assert "| splice DoRA |" in (tmp_path / "dora.md").read_text()


def test_lora_group_benchmark_runs_tiny(tmp_path: Path) -> None:
    """benchmarks/lora_group.py on the CPU: both groups timed, the grouped node equal to the members."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "lora_group.py"), "--tiny", "--tokens", "64",
         "--out", str(tmp_path / "lora_group.json")],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "lora_group.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["qkv", "gate_up"]
    assert all(r["max rel diff outputs"] < 1e-6 and r["max rel diff grads"] < 1e-6 for r in rows)
    assert "| 64 | qkv |" in proc.stdout


def test_rollout_profile_runs_tiny(tmp_path: Path) -> None:
    """benchmarks/rollout_profile.py on the CPU: every row of a rollout's split timed and written."""
    out = tmp_path / "rollout.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "rollout_profile.py"), "--tiny", "--seqs", "4", "--tokens", "6",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["sampled, seeded", "sampled, unseeded", "greedy", "greedy, adapters off",
                                        "greedy, casts per call"]
    assert all(r["tok_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_offline_profile_runs_tiny_with_adapters_and_dense_fresh_attention(tmp_path: Path) -> None:
    """benchmarks/offline_profile.py: a plain variant, one with 2 bank adapters and one with fresh_attention='dense'
    (the PyTorch path on the CPU); every variant finishes its requests and reports its settings."""
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "offline_profile.py"), "--tiny", "--variants",
         "8x64,8x64:a2,8x64:dense", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=subprocess_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    assert [(v["adapters"], v["fresh_attention"]) for v in variants] == [(0, "paged"), (2, "paged"), (0, "dense")]
    assert all(v["finished"] == v["requests"] > 0 for v in variants)
    assert "2 adapters" in proc.stdout and "fresh_attention=dense" in proc.stdout
