"""benchmarks/serve.py runs end to end: ``--tiny`` (a 2-layer toy on the CPU) through every part.

The figures are meaningless on a CPU; this pins that every part runs on the engine, writes its rows
into the JSON and prints its table, so a broken harness is found here rather than on the device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("bandwidth", "hf", "peft", "decode", "offline", "http", "nf4")


@pytest.mark.slow
def test_serve_benchmark_runs_every_part_tiny(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--tiny", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env=subprocess_env(), check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == set(PARTS)
    failed = {name: part.get("error") or part["notes"] for name, part in parts.items() if part["status"] != "ok"}
    assert not failed, failed
    decode = parts["decode"]["rows"]
    assert {(r["batch"], r["context"]) for r in decode if r["label"] == "bf16"} == {
        (b, c) for b in (1, 4, 8) for c in (16, 48, 96)}
    assert all(0 < r["roofline_fraction"] and r["bytes_per_step"] > r["weights_bytes"] for r in decode)
    assert any(r.get("adapters") == 2 for r in decode)
    assert [r["adapters"] for r in parts["offline"]["rows"]] == [0, 2, 4]
    assert all(r["finished"] == r["requests"] == 12 for r in parts["offline"]["rows"])
    http = parts["http"]["rows"]
    assert http and all(r["requests"] >= 2 and r["ttft_p50_ms"] > 0 for r in http)
    assert set(parts["http"]["gc"]) == {"0", "1", "2"}  # the server's collector pauses under load, by generation
    full = parts["http"]["gc_full_collection_ms"]  # the start-up heap frozen, as the server runs, and not
    assert min(full["unfrozen"], full["frozen"]) >= 0 and full["tracked_objects"] > 10_000  # (not compared: no timing)
    assert {r["label"] for r in parts["nf4"]["rows"]} == {"bf16", "nf4"}
    assert {r["batch"] for r in parts["hf"]["rows"]} == {1, 4}
    assert parts["peft"]["rows"][0]["adapters"] == 2
    for title in ("engine decode", "offline, ShareGPT-like", "HTTP, Poisson", "NF4 vs bf16", "Hugging Face generate",
                  "PEFT, mixed adapters"):
        assert title in proc.stdout


def test_offline_overlap_shrink_runs_each_adapter_count_both_ways_and_refuses_other_values(tmp_path: Path) -> None:
    """``--offline-overlap-shrink off,on``: every adapter count runs with the bank's shrinks on the GEMM's stream, then
    aside (the flag in each row); a value other than off / on is refused in one line before the model is built."""
    def run(value: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--tiny", "--parts", "offline",
             "--offline-overlap-shrink", value, "--json", str(tmp_path / "serve.json")],
            capture_output=True, text=True, timeout=600, env=subprocess_env(), check=False,
        )

    refused = run("off,yes")
    assert refused.returncode == 2 and "--offline-overlap-shrink off,yes: ['yes'] unknown" in refused.stderr
    assert not (tmp_path / "serve.json").exists()
    proc = run("off,on")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "serve.json").read_text())["parts"]["offline"]["rows"]
    assert [(r["adapters"], r["overlap_shrink"]) for r in rows] == [(0, False), (2, False), (2, True), (4, False),
                                                                     (4, True)]
    assert all(r["finished"] == r["requests"] == 12 for r in rows)
