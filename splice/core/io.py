"""Atomic writes: readers see the old file or folder, or the complete new one, never a part.

A file or folder is written under a temporary name beside its target (same filesystem) and
renamed into place only once complete; a failure leaves the target as it was and removes the
temporary copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "read_utf8"]


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
        tmp.chmod(0o755)  # mkdtemp makes it private (0700); these are ordinary folders
    else:
        tmp = target.parent / tmp_name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
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
