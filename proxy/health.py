"""Upstream health per domain: the last failure and the share of recent requests that failed.

A certificate that serves says nothing about the platform behind it: a domain whose
upstream refuses every request looks healthy in a certificate status. This module keeps,
per domain, what ``/status`` and ``trackproxy status`` show next to the certificate: the
last upstream error with its time, and the failed share of the domain's upstream
requests over the last five minutes (README "Certificates", ``upstream_health``).

Counts live in ten-second buckets of a fixed ring, so recording is two additions and
memory does not grow with traffic. Time comes from an injected clock (seconds since the
epoch: ``reactor.seconds``). Which outcome counts as a failure is the caller's business.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

#: The window ``failed_ratio_5m`` covers.
WINDOW = 300.0
BUCKET = 10.0
_BUCKETS = int(WINDOW // BUCKET)


class UpstreamHealth:
    """One domain's recent upstream outcomes."""

    __slots__ = ("_clock", "_slots", "_ok", "_failed", "last_error", "last_error_at")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._slots = [-1] * _BUCKETS  # which bucket number each ring slot holds
        self._ok = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def _slot(self, now: float) -> int:
        number = int(now // BUCKET)
        slot = number % _BUCKETS
        if self._slots[slot] != number:
            self._slots[slot] = number
            self._ok[slot] = 0
            self._failed[slot] = 0
        return slot

    def succeeded(self) -> None:
        self._ok[self._slot(self._clock())] += 1

    def failed(self, error: str) -> None:
        now = self._clock()
        self._failed[self._slot(now)] += 1
        self.last_error = error
        self.last_error_at = now

    def counts(self) -> tuple[int, int]:
        """(succeeded, failed) over the last :data:`WINDOW` seconds."""
        current = int(self._clock() // BUCKET)
        ok = failed = 0
        for slot, number in enumerate(self._slots):
            if 0 <= current - number < _BUCKETS:
                ok += self._ok[slot]
                failed += self._failed[slot]
        return ok, failed

    def failed_ratio(self) -> float:
        ok, failed = self.counts()
        total = ok + failed
        return round(failed / total, 4) if total else 0.0

    def document(self) -> dict[str, Any]:
        """The ``upstream_health`` object of ``/status``."""
        ok, failed = self.counts()
        return health_document(ok, failed, self.last_error, self.last_error_at)


def health_document(ok: int, failed: int, last_error: str | None, last_error_at: float | None) -> dict[str, Any]:
    """The ``upstream_health`` object of ``/status`` (also from several processes' counts)."""
    at = None
    if last_error_at is not None:
        at = datetime.datetime.fromtimestamp(last_error_at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    total = ok + failed
    return {"last_error": last_error, "last_error_at": at,
            "failed_ratio_5m": round(failed / total, 4) if total else 0.0}


class HealthBook:
    """:class:`UpstreamHealth` per configured domain, kept across reloads."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._domains: dict[str, UpstreamHealth] = {}

    def for_domain(self, domain: str) -> UpstreamHealth:
        health = self._domains.get(domain)
        if health is None:
            health = self._domains[domain] = UpstreamHealth(self._clock)
        return health

    def keep_only(self, domains: Iterable[str]) -> None:
        """Forget domains a reload removed."""
        keep = frozenset(domains)
        for name in [d for d in self._domains if d not in keep]:
            del self._domains[name]
