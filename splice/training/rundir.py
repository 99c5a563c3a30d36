"""One run per output directory: a lock held for the whole run, and a clean start.

The lock is ``<output_dir>/.splice.lock``, held with ``flock`` (the kernel drops it when the
process ends, however it ends, kill -9 included) and holding the holder's pid, host and start
time for the message a second run gets. A lock file whose lock nobody holds was left by a dead
process: it is taken over. Where the file system has no ``flock`` (some network mounts), the pid
and host decide: a lock of a dead pid on this host is stale.

On start, under the lock, temporary checkpoint folders (``checkpoints/.tmp-step-*``) and
temporary adapter files that a crash left behind are removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splice.core.errors import UsageError
from splice.training.config import TrainConfig, check_output_dir

__all__ = ["LOCK_NAME", "RunLock", "clean_temporaries", "lock_run_dir", "run_directory"]

LOCK_NAME = ".splice.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" \
        if isinstance(started, (int, float)) else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _create_dir(out: Path) -> None:
    """``out`` and its parents, or a UsageError saying which part is a file or not writable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UsageError(f"output dir {out}: {blocker} is a file, not a folder; choose another "
                             "--output-dir") from exc
        raise UsageError(f"cannot create output dir {out} ({exc.strerror or exc}); choose a "
                         "writable --output-dir") from exc


@dataclass
class RunLock:
    """A held run-directory lock; ``stale`` is the holder a dead process left (or empty)."""

    path: Path
    fd: int
    stale: dict[str, Any]

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)  # unlinked while still held: a waiter sees a new file
        os.close(self.fd)
        self.fd = -1


def lock_run_dir(out: str | Path) -> RunLock:
    """Take the lock of run directory ``out`` (created if needed), or raise :class:`UsageError`
    naming the live process that holds it."""
    out = Path(out)
    _create_dir(out)
    path = out / LOCK_NAME
    for _ in range(5):  # retried only when a releasing process unlinked the file under us
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write in output dir {out} ({exc.strerror or exc}); choose a "
                             "writable --output-dir") from exc
        try:
            previous = _take(fd, out)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            continue
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(mine) + "\n").encode())
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"cannot write in output dir {out} ({exc.strerror or exc}); choose a "
                             "writable --output-dir with free space") from exc
        return RunLock(path=path, fd=fd, stale=previous)
    raise UsageError(f"output dir {out} is being locked and released repeatedly by other "
                     "processes; choose another --output-dir")


def _take(fd: int, out: Path) -> dict[str, Any]:
    """flock ``fd`` without waiting; returns what a dead holder left in the file."""
    holder = _read_holder(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(
            f"output dir {out} is in use by another training ({_holder_text(_read_holder(fd))}): "
            "wait for it to finish, or choose another --output-dir"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        # No flock here: judge by pid and host.
        if holder and (holder.get("host") != socket.gethostname() or _pid_alive(holder.get("pid"))):
            raise UsageError(
                f"output dir {out} is in use by another training ({_holder_text(holder)}): wait "
                f"for it to finish, or, if that process is gone, delete {out / LOCK_NAME}"
            ) from None
    return holder if holder.get("pid") != os.getpid() else {}


def clean_temporaries(out: str | Path) -> list[Path]:
    """Remove what interrupted writes left in run directory ``out``; returns what was removed.
    Call only while holding its lock (nobody else writes there then)."""
    out = Path(out)
    removed: list[Path] = []
    for tmp in sorted(out.glob("checkpoints/.tmp-step-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    for tmp in sorted(out.glob("adapter/.*.tmp")):  # peft_io's atomic writes, if killed mid-write
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def run_directory(config: TrainConfig, *, say: Any = print) -> Iterator[Path]:
    """The run directory of ``config``, checked, locked and cleaned, for the length of the run.

    An existing directory is locked first (a live run there is reported as such) and checked
    under the lock; a new one is checked before it is created. Under torchrun only rank 0 locks:
    the ranks share one run.
    """
    out = Path(config.output_dir)
    if os.environ.get("RANK", "0") != "0":  # rank 0 checks and locks; the trainer waits for it
        yield out
        return
    if not out.is_dir():
        check_output_dir(out, config)  # no side effects before the checks pass
    lock = lock_run_dir(out)
    try:
        if lock.stale:
            say(f"took over the lock of run dir {out} from {_holder_text(lock.stale)}, which no "
                "longer runs")
        check_output_dir(out, config)
        removed = clean_temporaries(out)
        if removed:
            say(f"removed {len(removed)} temporary file(s) an interrupted write left in {out}")
        yield out
    finally:
        lock.release()
