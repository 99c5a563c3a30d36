"""benchmarks/preference.py still runs: splice's and TRL's DPO and GRPO (and splice's GRPO on an NF4
base) on a tiny CPU model, each in its own worker, so a broken harness is found here rather than on
the device. The figures of a CPU run mean nothing: this checks every row is there, finished, with
positive figures, and that both frameworks trained on the same DPO tokens; it compares no timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_preference_benchmark_runs_tiny(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    env = subprocess_env(SPLICE_BENCH_TMP=str(tmp_path / "scratch"))  # the carried wheels (trl) stay on the path
    out = tmp_path / "out"
    limits = [arg for part in ("dpo", "grpo", "nf4") for arg in (f"--limit-{part}", "1200")]  # never the limit
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preference.py"), "--tiny", "--out", str(out),
                           *limits], capture_output=True, text=True, timeout=1800, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "preference.json").read_text())["rows"]
    assert [(r["part"], r["framework"], r["checkpointing"]) for r in rows] == [
        ("dpo", "splice", "auto"), ("dpo", "splice", "all"), ("dpo", "trl", "on"), ("grpo", "splice", "auto"),
        ("grpo", "trl", "on"), ("nf4", "splice", "auto")]
    for row in rows:
        assert row["status"] == "complete", row.get("trace", row["status"])
        assert row["timed_steps"] == row["planned_steps"] == 1
        assert row["step_s"] > 0 and row["peak_gib"] > 0
        assert all(step["loss"] is not None for step in row["steps"])
        if row["part"] == "dpo":
            assert row["tok_s"] > 0
            per_step = row["tokens_per_step"]  # 2 pairs x 2 rows x (16 prompt + 16 answer + EOS)
            assert per_step == 132
            done = [s.get("tokens_seen", per_step * (i + 1)) for i, s in enumerate(row["steps"])]
            assert [s.get("tokens", per_step) for s in row["steps"]] == [per_step] * 2  # splice counts each step
            assert done == [per_step, 2 * per_step]  # TRL counts the running total
        else:
            assert row["rollout_s"] > 0 and row["rest_s"] > 0 and row["completion_length"] > 0
            assert all(0 <= step["reward"] <= 1 for step in row["steps"])
    table = (out / "preference.md").read_text()
    assert "| TRL + PEFT (checkpointing on) |" in table and "| splice (checkpointing all) |" in table
    assert "x tokens/s (target >= 3x)" in table and "seconds per step" in table
