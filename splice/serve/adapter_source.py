"""Where a runtime ``/v1/load_lora_adapter`` may read from, and which adapter names are allowed.

Runtime loading is off unless the server was started with ``--allow-adapter-dir DIR``: a client
then names an adapter folder as a path (relative paths are taken inside DIR) whose resolved real
path lies inside DIR's real path (``..``, symlinks that lead out and absolute paths elsewhere are
refused with 403, whether or not the target exists, so the answer tells nothing about the disk
outside DIR), or as a Hugging Face hub id (``org/name``, when DIR has no ``org`` entry) found in
the local hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``,
read at each call); nothing is downloaded. The cache is the operator's, not the client's, so it is not confined to DIR.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from splice.serve.service import ServeError

__all__ = ["check_adapter_name", "check_runtime_loading", "hub_cache", "resolve_adapter_path"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")  # like OpenAI model ids ("ft:org/name-v2")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def check_adapter_name(name: str, *, base: str, option: str = "lora_name") -> None:
    """A name clients can send as ``model``: 1-128 characters of letters, digits and ``._:/-``,
    starting with a letter or digit, never the base model's own name."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ServeError(400, f"{option} {name[:140]!r} is not a valid adapter name: use 1-128 letters, digits "
                              "and . _ : / - starting with a letter or digit, without '..'", param="lora_name")
    if name == base:
        raise ServeError(400, f"{option} {name!r} is the base model's name: give the adapter its own",
                         param="lora_name")


def _forbidden(message: str) -> ServeError:
    return ServeError(403, message, kind="permission_error", param="lora_path", code="forbidden")


def check_runtime_loading(allowed: Path | None) -> Path:
    """``allowed``, or the 403 for a server started without ``--allow-adapter-dir``."""
    if allowed is None:
        raise _forbidden("loading and unloading adapters at run time is off: start splice serve with "
                         "--allow-adapter-dir DIR and name folders inside DIR")
    return allowed


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, by huggingface_hub's own environment rules, read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(str(snapshot_download(repo_id, cache_dir=cache, local_files_only=True)))
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ServeError(400, f"lora_path {repo_id!r} is neither a folder in the allowed adapter directory nor "
                              f"a Hugging Face hub id in the local hub cache {cache}: this server downloads "
                              f"nothing; run `hf download {repo_id}` where it has network access (same "
                              "HF_HUB_CACHE), or put the folder in the adapter directory", param="lora_path") from None


def resolve_adapter_path(lora_path: str, allowed: Path | None) -> Path:
    """The folder to read for a runtime load of ``lora_path``; 403 when runtime loading is off or the
    path leads outside ``allowed``, 400 for a hub id that is not in the local hub cache."""
    root = check_runtime_loading(allowed).resolve()
    if "\x00" in lora_path or not lora_path.strip():
        raise ServeError(400, "lora_path is empty or holds a NUL character", param="lora_path")
    path = lora_path.strip()
    # "org/name" is a hub id unless DIR has an "org" entry (then it is a path, checked as any path)
    if _HUB_ID.fullmatch(path) and ".." not in path and not os.path.lexists(root / path.split("/")[0]):
        return _from_hub_cache(path)
    candidate = (root / path).resolve()  # an absolute lora_path replaces root here
    if not candidate.is_relative_to(root):  # refused before looking whether it exists
        raise _forbidden(f"lora_path {lora_path[:200]!r} resolves outside the allowed adapter directory "
                         f"(--allow-adapter-dir {allowed}): name a folder inside it")
    return candidate  # inside: reading it names any missing file (a 400)
