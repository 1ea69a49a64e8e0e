"""The access log: one JSON line per request, without the recipient's address.

Tracking paths encode who the mail went to (``/f/<recipient token>/...``), so by
default (``log_paths: redacted``) a line keeps the path's first segment and replaces
the rest, query included, with a short keyed hash: the same URL always logs the same
way (a scanner's repeats stand out), but the path cannot be read back or guessed from
the line. The key is made once per installation (``state_dir/access-log.key``, 0600),
so hashes stay comparable across restarts and differ between installations.
``log_paths: full`` logs raw paths, for troubleshooting only.

This module owns the line's fields and the redaction; ``forward`` calls
:meth:`AccessLog.record` for every finished request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from typing import IO, Any

KEY_FILE = "access-log.key"
#: Hex characters of the keyed hash kept: enough to tell URLs apart in a log.
HASH_LENGTH = 12


def load_or_create_key(state_dir: str) -> bytes:
    """The installation's redaction key, made (0600) on first use."""
    path = os.path.join(state_dir, KEY_FILE)
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return key


def redact(target: bytes, key: bytes) -> str:
    """``/f/SECRET/more?q=1`` -> ``/f/~3f9a2b1c4d5e``: first segment, then a keyed hash
    of everything after it (``~`` marks the hash). ``/`` and a bare ``/segment`` stay."""
    path, _, query = target.partition(b"?")
    first, slash, rest = path[1:].partition(b"/") if path.startswith(b"/") else (b"", b"", path)
    remainder = rest + (b"?" + query if query else b"")
    if not slash and not query:
        return _text(path)
    if not remainder:
        return _text(b"/" + first + slash)
    digest = hmac.new(key, remainder, hashlib.sha256).hexdigest()[:HASH_LENGTH]
    return f"/{_text(first)}{'/' if slash else ''}~{digest}"


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


class AccessLog:
    """Writes one line per request to ``stream`` (standard output: journald keeps it).

    Args:
        stream: where lines go.
        full_paths: ``log_paths: full``.
        key: the redaction key (:func:`load_or_create_key`).
        wall_clock: seconds since the epoch (injected for tests).
    """

    def __init__(self, stream: IO[str], full_paths: bool, key: bytes, wall_clock: Any = time.time) -> None:
        self._stream = stream
        self._full = full_paths
        self._key = key
        self._wall_clock = wall_clock

    def record(
        self,
        *,
        domain: str,
        scheme: bytes,
        method: bytes,
        target: bytes,
        status: int,
        cache: str,
        size: int,
        seconds: float,
        client: str | None,
    ) -> None:
        path = _text(target) if self._full else redact(target, self._key)
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._wall_clock())),
            "level": "info",
            "namespace": "trackproxy.access",
            "domain": domain,
            "scheme": scheme.decode("ascii"),
            "method": method.decode("latin-1")[:16],
            "path": path,
            "status": status,
            "cache": cache,
            "bytes": size,
            "duration_ms": round(seconds * 1000, 2),
            "client": client,
        }
        try:
            self._stream.write(json.dumps(line) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stdout must not fail the request
