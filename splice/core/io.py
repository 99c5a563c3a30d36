"""Atomic writes: readers see the old file or folder, or the complete new one, never a part.

A file or folder is written under a temporary name beside its target (same filesystem) and
renamed into place only once complete; a failure leaves the target as it was and removes the
temporary copy. What they write follows the process umask (0644 files, 0755 folders under umask
022), as ``open``/``mkdir`` would make them: ``tempfile.mkstemp``/``mkdtemp`` and safetensors'
own writer make private files (0600 / 0700), which surprises anyone an adapter, checkpoint or
model is shared with. :func:`follow_umask` does the same for a folder written another way.

:func:`check_line_lengths` scans a text file in bounded pieces, so a data file with a 200 MB
line is refused with its line named before anything reads that line whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MAX_LINE_BYTES", "atomic_dir", "atomic_file", "check_line_lengths", "follow_umask", "read_utf8"]

MAX_LINE_BYTES = 16 << 20  # 16 MiB: far above any real training row, far below what exhausts memory
_SCAN_BYTES = 1 << 20  # check_line_lengths reads this much at a time


def check_line_lengths(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
    """Refuse ``path`` if one of its lines is longer than ``max_line_bytes`` (a ``UsageError``
    naming the file and the line), reading at most ``_SCAN_BYTES`` at a time."""
    from splice.core.errors import UsageError

    line, length = 1, 0  # the current line's number and bytes so far
    with open(path, "rb") as f:
        while piece := f.read(_SCAN_BYTES):
            start = 0
            while (end := piece.find(b"\n", start)) >= 0:
                length += end - start
                if length > max_line_bytes:
                    break
                line, length, start = line + 1, 0, end + 1
            else:
                length += len(piece) - start
            if length > max_line_bytes:
                raise UsageError(f"{path}, line {line}: longer than {max_line_bytes} bytes (max_line_bytes, "
                                 "--max-line-bytes); split the record, or raise the limit if it is meant")


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only
    read it by setting it, which races other threads' file creation)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the mode ``open``/``mkdir`` would
    have given it under the process umask."""
    mask, path = _umask(), Path(path)
    if path.is_dir():
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def read_utf8(path: str | Path) -> tuple[bytes, str]:
    """``path``'s bytes and their UTF-8 text, read once; text that is not UTF-8 is one line naming
    the file, the line and the byte (a ``UsageError``)."""
    from splice.core.errors import UsageError

    data = Path(path).read_bytes()
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UsageError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}); save the file as UTF-8") from None


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target``."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        follow_umask(tmp)  # mkstemp's file, or the writer's own, may be private
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, tmp_name: str | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it becomes ``target``.

    ``replace``: an existing ``target`` is swapped out; otherwise a ``target`` that appeared
    meanwhile (another process finished the same work first) is kept and the new copy dropped.
    ``tmp_name``: the temporary folder's name beside ``target`` (default: a fresh hidden name),
    for callers that recognise and clean up their own leftovers.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp_name is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        tmp = target.parent / tmp_name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        follow_umask(tmp)
        if replace:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
