"""The access log: one JSON line per request, without the recipient's address.

Tracking paths encode who the mail went to (``/f/<recipient token>/...``), so by
default (``log_paths: redacted``) a line keeps the path's first segment and replaces
the rest, query included, with a short keyed hash: the same URL always logs the same
way (a scanner's repeats stand out), but the path cannot be read back or guessed from
the line. The key is made once per installation (``state_dir/access-log.key``, 0600),
so hashes stay comparable across restarts and differ between installations.
``log_paths: full`` logs raw paths, for troubleshooting only.

This module owns the line's fields, the redaction and the batching; the server calls
:class:`Recorder` for every answered request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import IO, Any

from proxy import statedir

KEY_FILE = statedir.ACCESS_LOG_KEY
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
    statedir.write_atomically(path, key, 0o600)
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


#: Lines are written in batches of about this many bytes (or every FLUSH_DELAY seconds):
#: one write per batch instead of one per request, and never more than this held.
FLUSH_BYTES = 64 * 1024
FLUSH_DELAY = 0.25
#: Distinct targets whose redacted (JSON-quoted) form is remembered: scanners repeat URLs.
PATH_CACHE = 4096


class AccessLog:
    """Writes one JSON line per request to ``stream`` (standard output: journald keeps it).

    A line costs about a microsecond: the redacted path is remembered per target, the
    time is formatted once per second, and the line is a template filled with values
    that need no escaping (configured names, labels, numbers) or are escaped once.
    Lines are held and written in batches (:data:`FLUSH_BYTES`, :data:`FLUSH_DELAY`);
    :meth:`flush` writes what is held (the service calls it at stop, so a clean stop
    loses nothing), and a full batch is written at once, so a slow standard output
    slows the writer rather than letting memory grow.

    Args:
        stream: where lines go.
        full_paths: ``log_paths: full``.
        key: the redaction key (:func:`load_or_create_key`).
        wall_clock: seconds since the epoch (injected for tests).
        call_later: schedules the delayed flush (``reactor.callLater``); None: lines
            wait for a full batch or :meth:`flush`.
    """

    def __init__(
        self,
        stream: IO[str],
        full_paths: bool,
        key: bytes,
        wall_clock: Any = time.time,
        call_later: Any = None,
    ) -> None:
        self._stream = stream
        self._full = full_paths
        self._key = key
        self._wall_clock = wall_clock
        self._call_later = call_later
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._scheduled = None
        self._paths: dict[bytes, str] = {}
        self._second = -1
        self._time_text = ""
        self._methods: dict[bytes, str] = {}

    def _path(self, target: bytes) -> str:
        quoted = self._paths.get(target)
        if quoted is None:
            if len(self._paths) >= PATH_CACHE:
                self._paths.clear()
            path = _text(target) if self._full else redact(target, self._key)
            quoted = self._paths[target] = json.dumps(path)
        return quoted

    def _time(self) -> str:
        now = self._wall_clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._time_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._time_text

    def _method(self, method: bytes) -> str:
        quoted = self._methods.get(method)
        if quoted is None:
            quoted = json.dumps(method.decode("latin-1")[:16])
            if len(self._methods) < 64:
                self._methods[method] = quoted
        return quoted

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
        # domain (configured or "_unknown"), scheme, cache and client (an address) never
        # need escaping; the path and method are escaped once per distinct value.
        client_json = f'"{client}"' if client else "null"
        line = (
            f'{{"time": "{self._time()}", "level": "info", "namespace": "trackproxy.access", '
            f'"domain": "{domain}", "scheme": "{scheme.decode("ascii")}", "method": {self._method(method)}, '
            f'"path": {self._path(target)}, "status": {status}, "cache": "{cache}", "bytes": {size}, '
            f'"duration_ms": {seconds * 1000:.2f}, "client": {client_json}}}\n'
        )
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._scheduled is None and self._call_later is not None:
            self._scheduled = self._call_later(FLUSH_DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = None
        self.flush()

    def flush(self) -> None:
        """Write every held line now."""
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending = []
        self._pending_bytes = 0
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stdout must not fail requests


class Recorder:
    """What each answered request leaves behind: a count in the metrics and an access
    line. It is ``server.HTTPFactory``'s ``finished`` callback.

    Args:
        metrics: ``proxy.metrics.Metrics``, or None.
        access_log: the :class:`AccessLog` in service now (a reload may change it), or
            None for none.
        clock: the clock requests were stamped with (``reactor.seconds``).
    """

    def __init__(self, metrics: Any, access_log: Callable[[], AccessLog | None], clock: Any) -> None:
        self.metrics = metrics
        self._access_log = access_log
        self._clock = clock

    def __call__(self, request: Any) -> None:
        seconds = self._clock() - request.started
        if self.metrics is not None:
            self.metrics.count_request(
                request.domain_label, request.scheme, request.method, request.code, request.cache_label, seconds
            )
        access_log = self._access_log()
        if access_log is not None:
            access_log.record(
                domain=request.domain_label,
                scheme=request.scheme,
                method=request.method,
                target=request.target,
                status=request.code,
                cache=request.cache_label,
                size=request.sent,
                seconds=seconds,
                client=request.peer or None,
            )
