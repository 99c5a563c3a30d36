"""Progress for long steps (data build, scoring, generation, merge, conversion, export) via tqdm.

On a terminal a tqdm bar redraws in place; anywhere else (a log file, CI) the same bar is printed
as one plain line every ``interval`` seconds, so a log shows that a slow step is alive without a
line per item. Nothing appears for steps shorter than ``delay`` seconds, so quick calls (tests,
small data) stay quiet. ``TQDM_DISABLE=1`` in the environment silences every bar.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["LineStream", "busy", "progress"]

T = TypeVar("T")
_PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LineStream:
    """A text stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""  # the count part of the last line: tqdm's close repeats the final state

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        count = line.split(" [")[0]
        if line and count != self.last:
            self.last = count
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    stream: TextIO | None = None,
    interval: float = 5.0,
    delay: float = 2.0,
    **options: Any,
) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one, ``bar.update(n)``), written to ``stream``
    (default stderr): redrawn on a terminal, one line per ``interval`` seconds elsewhere."""
    out = stream or sys.stderr
    options.setdefault("disable", False)  # shown even where TQDM_DISABLE hides third-party bars (cli.entry)
    if out.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=out, delay=delay,
                    dynamic_ncols=True, **options)
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=LineStream(out), delay=delay,
                mininterval=interval, ascii=True, bar_format=_PLAIN_FORMAT, **options)


@contextmanager
def busy(desc: str, *, stream: TextIO | None = None, interval: float = 5.0, delay: float = 2.0) -> Iterator[None]:
    """Elapsed time of one long call that reports no progress of its own (e.g. a GGUF conversion
    inside transformers): redrawn every second on a terminal, a line every ``interval`` seconds
    elsewhere, nothing if the call ends within ``delay`` seconds."""
    out = stream or sys.stderr
    tty = out.isatty()
    bar = tqdm(desc=desc, total=None, file=out if tty else LineStream(out), delay=delay, disable=False,
               bar_format="{desc}: {elapsed} elapsed", mininterval=0 if tty else interval)
    stop = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while not stop.wait(1.0 if tty else interval):
            if time.monotonic() - start >= delay:
                bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
