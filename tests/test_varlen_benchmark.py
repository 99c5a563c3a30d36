"""The packed-attention benchmarks still run on a CPU: benchmarks/varlen_attention.py --tiny (its table and
JSON, every method checked against the reference) and benchmarks/train_throughput.py --pack mask|varlen
(splice on packed rows both ways, PEFT on the same rows through Hugging Face's mask). The numbers mean
nothing on a CPU; what this pins is that the harness works before a GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env(SPLICE_BENCH_TMP=str(tmp_path / "scratch"))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=900, env=env, check=False)


def test_varlen_attention_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "varlen.json"
    proc = run("varlen_attention.py", "--tiny", "--json", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["tokens"], r["method"]) for r in rows] == [
        (n, m) for n in (64, 160)
        for m in ("splice varlen (reference)", "torch SDPA + block mask", "torch varlen_attn")]
    for r in rows:
        assert sum(r["lengths"]) == r["tokens"] and r["segments"] > 3  # several ShareGPT-like segments a pack
        if r["method"] == "torch varlen_attn":
            assert r["skipped"] == "varlen_attn runs on CUDA only"
        else:
            assert r["max_rel_err"] < 1e-5 and r["fwd_bwd_ms"] > 0
    assert "| 160 | 11 (49) | torch SDPA + block mask |" in proc.stdout


@pytest.mark.slow
def test_train_throughput_packs_both_ways(tmp_path: Path) -> None:
    losses = {}
    for pack in ("varlen", "mask"):
        out = tmp_path / pack
        proc = run("train_throughput.py", "--tiny", "--frameworks", "peft,splice", "--configs", "P", "--layers", "2",
                   "--parity-steps", "2", "--pack", pack, "--out", str(out), tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for res in json.loads((out / "results.json").read_text())["results"]:
            for r in res["runs"]:
                losses[(r["framework"], r["variant"])] = r["losses"]
    assert set(losses) == {("peft", "packed mask"), ("splice", "packed varlen"), ("splice", "packed mask")}
    for a, b in zip(losses[("splice", "packed varlen")], losses[("peft", "packed mask")], strict=True):
        assert abs(a - b) < 1e-4  # same model, rows and init: the varlen path trains as the mask does
    assert losses[("splice", "packed mask")] == pytest.approx(losses[("splice", "packed varlen")], abs=1e-4)
