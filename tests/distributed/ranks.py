"""Launching N real ranks on the CPU (gloo) as subprocesses, with torchrun's environment set.

Each rank is ``python -m tests.distributed.worker <json>`` with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, exactly as torchrun sets them (without
its agent, so a rank that dies is seen by the others' collectives, not killed for them). Every
wait has a deadline: on expiry all ranks are killed by their pids and the test fails, so nothing
hangs a CI job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.tiny import free_port, subprocess_env

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    return subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # 2 CPU ranks on a small machine


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(timeout=30)


def run_ranks(job: dict[str, Any], *, world: int = 2, timeout: float = 300.0,
              worker: str = "tests.distributed.worker", env: dict[str, str] | None = None) -> list[RankResult]:
    """Run the ``worker`` module's ``job`` on ``world`` ranks (``env``: added to each rank's
    environment); returns each rank's exit code and output."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", worker, json.dumps(job)],
                              cwd=REPO, env={**rank_env(rank, world, port), **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(RankResult(rank, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        kill(procs)
        tails = "\n".join(f"--- rank {r}:\n{(p.stderr.read() if p.stderr else '')[-3000:]}"
                          for r, p in enumerate(procs))
        raise AssertionError(f"ranks still running after {timeout:.0f}s: a hang\n{tails}") from None
    return results


def check(results: list[RankResult]) -> None:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
