"""One rank of a test job (see :mod:`tests.distributed.ranks`): runs splice's trainer, records losses.

The job (JSON on the command line): ``{"inputs": [model_dir, data_file], "runs": [{"out": dir,
"options": {...}, "die_at": step or null, "interrupt_at": step or null}]}``; each run is ``train(run_config(inputs, out, **options))``
from tests/training/test_loop.py, and writes ``out/result-rank<r>.json``. ``die_at``: rank 1 ends
its process abruptly after that step (a crashed GPU, an OOM kill); ``interrupt_at``: rank 0 gets
SIGINT after that step. A :class:`RankFailure` ends
this rank with its message on stderr and exit code 1, as the CLI does. The runs share one
process group, opened here (``train`` adopts an open group).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from splice.distributed.process import RankFailure, start, stop
from splice.training.loop import train
from splice.training.report import Progress
from tests.tiny import run_config


class _At(Progress):
    """After step ``at``: end this process abruptly (``die``), or send it SIGINT (a Ctrl-C)."""

    def __init__(self, total: int, at: int, *, die: bool) -> None:
        super().__init__(total)
        self.at, self.die = at, die

    def update(self, step: int, **kwargs) -> None:  # type: ignore[override]
        super().update(step, **kwargs)
        if step == self.at and self.die:
            os._exit(3)  # no clean-up, no goodbye to the other ranks
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def main() -> int:
    job = json.loads(sys.argv[1])
    if job.get("dump_after"):  # a hang prints every thread's stack to stderr, then ends the rank
        faulthandler.dump_traceback_later(float(job["dump_after"]), exit=True)
    rank = int(os.environ["RANK"])
    inputs = tuple(Path(p) for p in job["inputs"])
    # One process group for all the runs (each train() adopts it): a group re-opened in the same
    # process on the same port races the other ranks' rendezvous.
    env = start(device_type="cpu", timeout_s=float(job.get("timeout", 120)))
    try:
        return _runs(job, inputs, rank)
    finally:
        stop(env)


def _runs(job: dict, inputs: tuple[Path, ...], rank: int) -> int:
    for run in job["runs"]:
        config = run_config(inputs, Path(run["out"]), **run.get("options", {}))
        die_at, interrupt_at = run.get("die_at"), run.get("interrupt_at")
        log = None
        if die_at and rank == 1:
            log = _At(config.steps or 0, die_at, die=True)
        elif interrupt_at and rank == 0:  # only rank 0 is interrupted: all must stop together
            log = _At(config.steps or 0, interrupt_at, die=False)
        try:
            result = train(config, log=log)
        except RankFailure as exc:
            print(f"splice train: error: {exc}", file=sys.stderr, flush=True)
            return 1
        record = {k: v for k, v in asdict(result).items() if k in ("steps", "losses", "parallel",
                                                                    "world_size", "interrupted")}
        (Path(run["out"]) / f"result-rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
