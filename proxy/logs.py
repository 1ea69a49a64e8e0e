"""Event logs as one JSON object per line on standard output (journald keeps them).

This module owns the log format. Messages carry structured fields (``domain``,
``upstream``, ``outcome``, ...) next to the formatted text, and never request paths or
query strings: tracking paths encode recipients' addresses.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

if TYPE_CHECKING:
    # What ILogFilterPredicate's __call__ returns (PredicateResult's constants are these).
    from constantly import NamedConstant  # type: ignore[import-untyped]

_SKIP = frozenset({"log_format", "log_logger", "log_source", "log_io", "log_text",
                   "log_time", "log_level", "log_namespace", "log_failure", "log_system",
                   "log_flattened", "log_trace", "format", "message", "isError",
                   "system", "time", "why", "failure"})


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as ``{"time", "level", "namespace", "message", ...fields}``."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.get("log_time", time.time()))),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key not in _SKIP and not key.startswith("_"):
                record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        self._stream.write(json.dumps(record, sort_keys=False) + "\n")
        self._stream.flush()


@implementer(ILogFilterPredicate)
class QuietLegacyInfo:
    """Drops Twisted's own legacy chatter ("Starting protocol", "... starting on 8080",
    "(UDP Port 4711 Closed)") that every DNS lookup and listener produces at info level;
    legacy warnings and errors still pass."""

    def __call__(self, event: dict[str, Any]) -> NamedConstant:
        if event.get("log_namespace") == "log_legacy" and event.get("log_level") in (LogLevel.info, LogLevel.debug):
            return PredicateResult.no
        return PredicateResult.maybe


@implementer(ILogFilterPredicate)
class DescriptorShortage:
    """One warning when the process runs out of file descriptors, one line when it has
    them again, instead of Twisted's lines for every connection it accepts and closes
    meanwhile (``EMFILE``: it keeps a spare descriptor to accept and close new clients,
    so they are refused at once instead of waiting).

    :meth:`tick` (every few seconds) notices the end of a shortage.
    """

    #: No EMFILE for this long: the shortage is over.
    QUIET = 3.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.since: float | None = None
        self._last = 0.0
        self.closed = 0
        self._log = Logger(namespace="trackproxy.limits")

    def __call__(self, event: dict[str, Any]) -> NamedConstant:
        text = event.get("log_format") or ""
        if "EMFILE" not in text:
            return PredicateResult.maybe
        self._last = self._clock()
        if text.startswith("EMFILE recovery: Closed socket"):
            self.closed += 1
        if self.since is not None:
            return PredicateResult.no
        self.since = self._last
        event["log_format"] = (
            "out of file descriptors (the limit is {limit}): new connections are closed at once "
            "until some are free"
        )
        event["limit"] = _open_files_limit()
        event["log_level"] = LogLevel.warn
        return PredicateResult.yes

    def tick(self) -> None:
        if self.since is not None and self._clock() - self._last > self.QUIET:
            self._log.warn(
                "file descriptors available again after {seconds:.0f}s; {closed} connections were "
                "closed meanwhile", seconds=self._last - self.since, closed=self.closed,
            )
            self.since = None
            self.closed = 0


def _open_files_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit() -> int:
    """Raise this process's descriptor limit to what it may (a connection is one, a
    proxied one two; the soft limit is often 1024). Returns the limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def start_logging(
    stream: IO[str] | None = None, level: LogLevel = LogLevel.info, clock: Callable[[], float] | None = None
) -> DescriptorShortage:
    """Send every event at ``level`` or above to ``stream`` (standard output); the
    shortage filter is returned for its :meth:`~DescriptorShortage.tick`."""
    shortage = DescriptorShortage(clock or time.time)
    observer = FilteringLogObserver(
        JSONLineObserver(stream or sys.stdout),
        [shortage, LogLevelFilterPredicate(defaultLogLevel=level), QuietLegacyInfo()],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return shortage
