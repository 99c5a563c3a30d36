"""What a run shows a person: a progress line, metrics as JSONL, and a loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from splice.core.progress import progress

__all__ = ["TRACKERS", "CsvTracker", "MetricsLog", "Progress", "TensorBoardTracker", "Tracker", "WandbTracker",
           "check_trackers", "open_trackers", "plot_losses"]


# ----------------------------------------------------------------------------- trackers

# tracker name -> (module imported to use it, the splice extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "csv": ("csv", None)}


class Tracker(Protocol):
    """Somewhere metrics records go besides metrics.jsonl."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a record as ``"<kind>/<key>"`` (``train/loss``, ``eval/val_loss``)."""
    kind = record.get("kind", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def check_trackers(report_to: str) -> list[str]:
    """The tracker names in ``report_to`` ("tensorboard,wandb,csv"), each importable: an unknown
    name or a missing optional dependency is one clear error, before any model loads."""
    names = [n.strip().lower() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name!r}: unknown tracker; use any of {', '.join(TRACKERS)} "
                             "(comma-separated)")
        module, extra = TRACKERS[name]
        try:
            __import__(module)
        except ImportError as error:
            raise ValueError(f"--report-to {name} needs the {module} package, which is not installed: "
                             f"pip install 'splice[{extra}]' (or pip install {module})") from error
    return list(dict.fromkeys(names))


class TensorBoardTracker:
    """Scalars as TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir``)."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record.get("step", 0)))
        self.writer.flush()  # a record per step: a crash keeps every one

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (project ``$WANDB_PROJECT`` or "splice"; files in ``<run>/wandb``;
    ``WANDB_MODE=offline`` works without network, ``wandb sync`` uploads later)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        import os

        import wandb

        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "splice"), dir=str(out),
                              name=out.name, config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class CsvTracker:
    """``metrics.csv``: one row per record, a column per key seen (the file is rewritten when a
    new key appears, so every row has every column)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []

    def log(self, record: dict[str, Any]) -> None:
        import csv

        self.rows.append(record)
        new = [k for k in record if k not in self.columns]
        self.columns += new
        with self.path.open("w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
                writer.writerows(self.rows)
            else:
                writer.writerow(record)

    def close(self) -> None:
        pass


def open_trackers(report_to: str, out: Path, config: dict[str, Any]) -> list[Tracker]:
    """The trackers ``report_to`` names, writing under the run directory ``out``."""
    trackers: list[Tracker] = []
    for name in check_trackers(report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out / "tensorboard"))
        elif name == "wandb":
            trackers.append(WandbTracker(out, config))
        else:
            trackers.append(CsvTracker(out / "metrics.csv"))
    return trackers


# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed, so a crash keeps it), and
    hands every record to the ``trackers`` (see :func:`open_trackers`)."""

    def __init__(self, path: str | Path, *, trackers: Sequence[Tracker] = ()) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = list(trackers)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """Flush and close the trackers (metrics.jsonl needs nothing)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class Progress:
    """The training progress bar (tqdm): step, loss, learning rate and tokens/s, with tqdm's
    elapsed time and ETA.

    Redraws in place on a terminal; elsewhere (logs, CI) prints a line every ``interval`` seconds
    (and the last step), so a slow run shows it is alive without a line per step.
    """

    def __init__(self, total: int, *, start: int = 0, stream: TextIO | None = None,
                 interval: float = 5.0) -> None:
        self.total, self.step = total, start
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = progress(desc="training", total=total, initial=start, unit="step", stream=self.stream,
                            interval=interval, delay=0.0)

    def update(self, step: int, *, loss: float, lr: float, tokens: int) -> None:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {rate:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.step)
        self.step = step

    def message(self, text: str) -> None:
        if self.tty:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar.close()


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training (and validation) loss against step as a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval" and "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
