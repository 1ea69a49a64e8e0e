"""Event logs as one JSON object per line on standard output (journald keeps them).

This module owns the log format. Messages carry structured fields (``domain``,
``upstream``, ``outcome``, ...) next to the formatted text, and never request paths or
query strings: tracking paths encode recipients' addresses.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    PredicateResult,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

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

    def __call__(self, event: dict[str, Any]) -> PredicateResult:
        if event.get("log_namespace") == "log_legacy" and event.get("log_level") in (LogLevel.info, LogLevel.debug):
            return PredicateResult.no
        return PredicateResult.maybe


def start_logging(stream: IO[str] | None = None, level: LogLevel = LogLevel.info) -> None:
    """Send every event at ``level`` or above to ``stream`` (standard output)."""
    observer = FilteringLogObserver(
        JSONLineObserver(stream or sys.stdout),
        [LogLevelFilterPredicate(defaultLogLevel=level), QuietLegacyInfo()],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
