"""One run per output directory: the lock, stale locks, temporary folders, moved run dirs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splice.core.errors import UsageError
from splice.training.loop import train
from splice.training.rundir import LOCK_NAME, lock_run_dir
from splice.training.state import latest_checkpoint
from tests.tiny import run_config, subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return subprocess_env()


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_second_training_is_refused_while_the_first_runs(tiny_run_inputs, tmp_path) -> None:
    model, data = tiny_run_inputs
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "splice", "train", "--model", str(model), "--data", str(data),
         "--output-dir", str(out), "--prompt-template", "Q: {question}\nA: ",
         "--response-template", "{answer}", "--max-length", "64", "--steps", "100000",
         "--eval-samples", "0", "--no-compare-base", "--save-every", "0", "--device", "cpu"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "metrics.jsonl", first)  # it has trained a step: well into its run
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid
        with pytest.raises(UsageError, match=f"in use by another training \\(pid {first.pid} on host"):
            train(run_config(tiny_run_inputs, out, steps=2))
        with pytest.raises(UsageError, match="in use by another training"):
            train(run_config(tiny_run_inputs, out, steps=2, resume=True))
        first.send_signal(signal.SIGTERM)  # the first saves a checkpoint and exits 128 + 15
        _, err = first.communicate(timeout=120)
        assert first.returncode == 143, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / LOCK_NAME).exists()  # released on exit
    assert latest_checkpoint(out / "checkpoints") is not None  # the SIGTERM checkpoint
    lock = lock_run_dir(out)  # free again, and not stale: the first let go on its way out
    assert lock.stale == {}
    lock.release()


def test_lock_of_a_killed_process_is_taken_over(tmp_path) -> None:
    out = tmp_path / "run"
    code = ("import sys, time; from splice.training.rundir import lock_run_dir; "
            f"lock_run_dir({str(out)!r}); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            lock_run_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays behind
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = lock_run_dir(out)
    try:
        assert lock.stale["pid"] == holder.pid  # seen, reported and taken over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            lock_run_dir(out)  # held: a second lock (even in this process) is refused
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_file_does_not_block_a_training(tiny_run_inputs, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "elsewhere", "started": 0}))
    result = train(run_config(tiny_run_inputs, out, steps=2))  # an empty dir but for the stale lock
    assert result.steps == 2
    assert f"took over the lock of run dir {out} from pid {pid}" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()


def test_stale_temporary_checkpoints_are_removed_and_moved_run_resumes(tiny_run_inputs, tmp_path) -> None:
    first = tmp_path / "first"
    train(run_config(tiny_run_inputs, first, steps=4))
    debris = first / "checkpoints" / ".tmp-step-000006-99999"  # a write killed midway
    debris.mkdir()
    (debris / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (first / "adapter" / ".adapter_model.safetensors.x1.tmp").write_bytes(b"\0")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied)
    for run in (moved, copied):
        result = train(run_config(tiny_run_inputs, run, steps=8, resume=True))
        assert result.steps == 8 and len(result.losses) == 4  # steps 5..8, continued
        assert not list(run.glob("checkpoints/.tmp-step-*"))
        assert not list(run.glob("adapter/.*.tmp"))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
        saved = json.loads((run / "run_config.json").read_text())
        assert saved["output_dir"] == str(run)


def test_unwritable_or_blocked_output_dir(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UsageError, match=f"{afile} is a file, not a folder"):
        lock_run_dir(afile / "run")
    if Path("/sys").is_dir():  # sysfs: nobody, root included, makes folders there
        with pytest.raises(UsageError, match="cannot create output dir /sys/splice-test"):
            lock_run_dir("/sys/splice-test/run")


def test_damaged_checkpoint_is_named_on_resume(tiny_run_inputs, tmp_path) -> None:
    from splice.core.errors import RunError

    out = tmp_path / "run"
    train(run_config(tiny_run_inputs, out, steps=2, save_every=1))
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None
    weights = newest / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(RunError, match=f"checkpoint {newest} is damaged .*move it aside"):
        train(run_config(tiny_run_inputs, out, steps=4, save_every=1, resume=True))
    assert not (out / LOCK_NAME).exists()  # released on the way out of the error
