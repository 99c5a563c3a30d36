"""API keys for ``splice serve``: which keys the server takes, and whether a request carries one.

Keys come from ``--api-key`` (repeatable) and the ``SPLICE_API_KEY`` environment variable, which may
hold several keys separated by commas (a key is printable ASCII without spaces or commas, so the
separator is never part of a key; it lets one secret rotate keys without restarting with new flags).
With no key configured the server is open. With keys, every route but :data:`OPEN_PATHS` (a
load balancer's or Kubernetes' probes) needs ``Authorization: Bearer <key>``, as the ``openai``
client sends it; a missing or wrong key gets 401 with OpenAI's body and code ``invalid_api_key``.
The comparison is constant-time (:func:`hmac.compare_digest` against every key), so response times
do not tell how much of a guess was right, nor which key it was close to.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping

from splice.serve.service import ServeError

__all__ = ["ENV_VAR", "OPEN_PATHS", "api_keys", "refusal"]

ENV_VAR = "SPLICE_API_KEY"
OPEN_PATHS = frozenset({"/health", "/ready"})
_KEY = re.compile(r"[!-+\--~]+")  # printable ASCII (0x21-0x7e) but the comma (0x2c)


def api_keys(flags: Iterable[str], environ: Mapping[str, str]) -> frozenset[str]:
    """The keys of ``--api-key`` flags plus ``environ[SPLICE_API_KEY]`` (comma-separated); a key that
    could never be sent as a Bearer token is refused naming where it came from."""
    keys: set[str] = set()
    sources = [("--api-key", key) for key in flags]
    sources += [(f"${ENV_VAR}", key.strip()) for key in environ.get(ENV_VAR, "").split(",") if key.strip()]
    for where, key in sources:
        if not _KEY.fullmatch(key):
            shown = "an empty key" if not key else f"a key of {len(key)} characters"
            raise ValueError(f"{where}: {shown} with a space, comma or non-ASCII character; use printable "
                             "ASCII without spaces or commas (e.g. the output of `openssl rand -hex 32`)")
        keys.add(key)
    return frozenset(keys)


def _matches(token: bytes, keys: Iterable[str]) -> bool:
    # compare_digest with every key, no early exit: the time taken does not depend on which key matched
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key.encode())
    return found


def refusal(path: str, headers: Iterable[tuple[bytes, bytes]], keys: frozenset[str]) -> ServeError | None:
    """None if a request for ``path`` with these (ASGI, lower-case) ``headers`` may pass, else the 401."""
    if not keys or path in OPEN_PATHS:
        return None
    value = next((v for k, v in headers if k == b"authorization"), None)
    scheme, _, token = (value or b"").strip().partition(b" ")
    if value is None or scheme.lower() != b"bearer" or not token.strip():
        message = ("You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (the openai "
                   "client's api_key); this server's keys are set by splice serve --api-key or $SPLICE_API_KEY")
    elif _matches(token.strip(), keys):
        return None
    else:
        message = "Incorrect API key provided: check the key this server was started with (--api-key or $SPLICE_API_KEY)"
    return ServeError(401, message, code="invalid_api_key")
