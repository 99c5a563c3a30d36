"""splice's own error types: every failure a user can cause or meet, as one clear line.

Each message is one line that names the file, row, column or option at fault and says what
would be valid (the fix). The ``splice`` command prints ``splice <cmd>: error: <message>`` and
exits with the error's ``exit_code``: 2 for bad usage or input (:class:`UsageError`), 1 for a
failure at run time (:class:`RunError`). Both also subclass the builtin a caller would expect
(``ValueError`` / ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["RunError", "SpliceError", "UsageError", "one_line"]


def one_line(text: str) -> str:
    """``text`` with its line breaks folded into spaces (messages are printed as one line)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class SpliceError(Exception):
    """Base of splice's errors; ``exit_code`` is what the ``splice`` command exits with."""

    exit_code = 1


class UsageError(SpliceError, ValueError):
    """Bad usage or input (an option, a config file, a data or adapter file): exit code 2."""

    exit_code = 2


class RunError(SpliceError, RuntimeError):
    """A failure while running (disk full, training diverged, a broken checkpoint): exit code 1."""

    exit_code = 1
