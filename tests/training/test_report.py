"""splice.training.report: the progress bar, and metrics sent to TensorBoard, W&B (offline) and CSV."""

from __future__ import annotations

import csv
import io
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from splice.training.report import (
    CsvTracker,
    MetricsLog,
    Progress,
    TensorBoardTracker,
    WandbTracker,
    check_trackers,
    open_trackers,
)

RECORDS = [{"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "epoch": 0},
           {"kind": "train", "step": 2, "loss": 2.0, "lr": 1e-3, "epoch": 0},
           {"kind": "eval", "step": 2, "val_loss": 2.25, "word_f1": 0.5}]


def test_progress_off_a_terminal_prints_a_line_per_interval() -> None:
    every = io.StringIO()
    bar = Progress(4, stream=every, interval=0.0)
    for step in range(1, 5):
        bar.update(step, loss=1.0 / step, lr=1e-3, tokens=10)
    bar.message("note")
    bar.close()
    lines = every.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines[:5]] == [f"training: {i}/4 step" for i in range(5)]
    assert "loss 0.2500" in lines[4] and lines[5] == "note" and "\r" not in every.getvalue()
    rare = io.StringIO()  # an interval longer than the run: the start and the end only
    bar = Progress(4, start=1, stream=rare, interval=3600.0)
    for step in range(2, 5):
        bar.update(step, loss=1.0, lr=1e-3, tokens=10)
    bar.close()
    assert [line.split(" [")[0] for line in rare.getvalue().splitlines()] == ["training: 1/4 step",
                                                                            "training: 4/4 step"]


def test_tensorboard_event_files_read_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", trackers=[TensorBoardTracker(tmp_path / "tb")])
    for record in RECORDS:
        log.write(record)
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/val_loss")] == [(2, 2.25)]
    assert len(log.read()) == 3  # metrics.jsonl still gets everything


def _wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history records of an offline .wandb file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, data, history = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = data + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            data = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.append({k: v for k, v in items.items() if not k.startswith("_")})
    return history


def test_wandb_offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "metrics.jsonl", trackers=[WandbTracker(tmp_path, {"rank": 8})])
    for record in RECORDS:
        log.write(record)
    log.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history: list[dict[str, float]] = []
    for _ in range(300):  # wandb's service process may still be writing the file on a loaded machine
        try:
            history = _wandb_history(run_file)
        except Exception:  # a record cut mid-write
            history = []
        if len([h for h in history if "train/loss" in h]) >= 2:
            break
        time.sleep(0.1)
    assert [h.get("train/loss") for h in history if "train/loss" in h] == [2.5, 2.0]
    assert any(h.get("eval/val_loss") == 2.25 for h in history)


def test_csv_has_every_column(tmp_path: Path) -> None:
    tracker = CsvTracker(tmp_path / "metrics.csv")
    for record in RECORDS:
        tracker.log(record)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "2"]
    assert rows[0]["loss"] == "2.5" and rows[2]["val_loss"] == "2.25" and rows[0]["val_loss"] == ""


def test_several_trackers_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    trackers = open_trackers("tensorboard, csv", tmp_path, {})
    assert [type(t).__name__ for t in trackers] == ["TensorBoardTracker", "CsvTracker"]
    for t in trackers:
        t.close()
    assert check_trackers("") == []
    with pytest.raises(ValueError, match="--report-to 'mlflow': unknown tracker; use any of tensorboard, wandb, csv"):
        check_trackers("csv,mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"--report-to wandb needs the wandb package.*splice\[wandb\]"):
        check_trackers("wandb")


def test_unknown_tracker_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from splice.training.config import TrainConfig
    from splice.training.loop import train

    config = TrainConfig(model=str(tmp_path / "no-model"), output_dir=str(tmp_path / "o"), report_to="csv,mlflow")
    with pytest.raises(ValueError, match="unknown tracker"):
        train(config)
