"""Reading a GGUF file's header (its key-value metadata) without the ``gguf`` package or the weights.

Layout (little-endian): magic ``GGUF``, version u32, tensor count u64, key count u64, then per key:
name (u64 length + UTF-8 bytes), value type u32, value. Scalars are types 0-7 and 10-12
(:data:`_GGUF_SCALARS`); a string (8) is a u64 length + bytes; an array (9) is an element type
u32, a count u64 and the elements. The tensors' descriptions and data follow the keys; nothing
here reads them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["gguf_context_length", "gguf_scalars"]

# GGUF value types -> struct format of a scalar (8: string, 9: array are read by hand)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_MAX_KEYS = 1 << 16  # a corrupt key count must not make the scan run for ever


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)[0]


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind == 8:
        f.seek(_read(f, "Q"), 1)
    elif kind == 9:
        inner, count = _read(f, "I"), _read(f, "Q")
        if inner in _GGUF_SCALARS:
            f.seek(struct.calcsize("<" + _GGUF_SCALARS[inner]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, inner)
    elif kind in _GGUF_SCALARS:
        f.seek(struct.calcsize("<" + _GGUF_SCALARS[kind]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def gguf_scalars(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The scalar values (numbers, bools) of the header keys whose names ``wanted`` accepts; ``{}`` if the file
    is not a GGUF file or unreadable (a corrupt header keeps what was read before the damage)."""
    found: dict[str, Any] = {}
    try:
        with Path(path).open("rb") as f:
            if f.read(4) != b"GGUF":
                return found
            _version, _tensors, n_keys = _read(f, "I"), _read(f, "Q"), _read(f, "Q")
            for _ in range(min(n_keys, _MAX_KEYS)):
                name = f.read(_read(f, "Q")).decode("utf-8", "replace")
                kind = _read(f, "I")
                if wanted(name) and kind in _GGUF_SCALARS:
                    found[name] = _read(f, _GGUF_SCALARS[kind])
                else:
                    _skip_value(f, kind)
    except (OSError, EOFError, ValueError, struct.error, OverflowError, MemoryError):
        pass
    return found


def gguf_context_length(path: str | Path) -> int | None:
    """``<arch>.context_length`` from a GGUF file's header (None if absent, not positive, not a
    GGUF file or unreadable: the caller then has no limit to check against)."""
    for value in gguf_scalars(path, lambda name: name.endswith(".context_length")).values():
        return int(value) if isinstance(value, int) and value > 0 else None
    return None
