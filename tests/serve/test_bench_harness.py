"""benchmarks/serve.py still runs: decode (splice + PEFT) and the HTTP load on a tiny CPU model.

The figures are meaningless on a CPU; this pins that every part and the JSON writing work, so a
broken harness is found here rather than on the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_benchmark_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--tiny", "--batch", "2", "--adapters", "2",
         "--new-tokens", "3", "--peft-tokens", "2", "--http-adapters", "1,3", "--http-requests", "4",
         "--gpu-adapters", "2", "--rate", "50", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert {(r["part"], r.get("framework"), r["adapters"]) for r in rows} == {
        ("decode", "splice", "r16 q/k/v/o"), ("decode", "splice", "r16 all-linear"), ("decode", "peft", "r16 q/k/v/o"),
        ("http", None, 1), ("http", None, 3)}
    assert "| HTTP adapters |" in proc.stdout
