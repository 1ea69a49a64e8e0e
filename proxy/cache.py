"""The scanner-absorbing cache: complete upstream answers kept for a few seconds.

Inbound mail gateways fetch every tracking URL, often several times within seconds of
delivery. Every platform's guide asks for a short cache in front of the tracking
endpoint (10 s by default) so those repeats are absorbed while a real person's repeat
click after the TTL still counts.

This module owns what is stored (GET answers with the statuses README "Cache" names, nothing carrying
``Set-Cookie``, ``no-store``, ``private``, ``no-cache`` or ``Vary: *``), for how long
(the domain's ``cache_ttl``, shortened but never lengthened by ``s-maxage``/``max-age``),
the two bounds (entries and bytes, least recently used out first), and coalescing:
concurrent misses on one key wait for one upstream fetch. Time comes from an injected
clock. Deciding whether a request may use the cache at all, and relaying answers, is
``forward``'s business.

Expired entries are dropped as their time passes, through a heap of expiry times that
each store and lookup trims: no request ever scans the whole cache.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from proxy.upstream import UpstreamResponse

CACHEABLE_STATUSES = frozenset({200, 204, 301, 302, 303, 307, 308, 404, 410})
#: Bookkeeping per entry beyond its prepared head and body (key, objects, LRU links).
ENTRY_OVERHEAD = 256
_REFUSING_DIRECTIVES = (b"no-store", b"private", b"no-cache")


def cache_key(scheme: bytes, host: bytes, target: bytes) -> bytes:
    """scheme + host + path + query, exact: no headers, no cookies."""
    return b"%s://%s%s" % (scheme, host, target)


def storable_ttl(response: UpstreamResponse, domain_ttl: float) -> float:
    """How long ``response`` may be kept: 0 when it must not be stored at all."""
    if domain_ttl <= 0 or response.code not in CACHEABLE_STATUSES:
        return 0.0
    ttl = domain_ttl
    shared_max_age = None
    max_age = None
    for name, value in response.headers:
        lower = name.lower()
        if lower == b"set-cookie":
            return 0.0  # a cookie is one client's; replaying it would hand it to others
        if lower == b"vary" and any(v.strip() == b"*" for v in value.split(b",")):
            return 0.0
        if lower == b"cache-control":
            for directive in value.lower().split(b","):
                directive = directive.strip()
                if directive in _REFUSING_DIRECTIVES or directive.startswith(b"no-cache="):
                    return 0.0
                if directive.startswith(b"s-maxage="):
                    shared_max_age = _seconds(directive[9:])
                elif directive.startswith(b"max-age="):
                    max_age = _seconds(directive[8:])
    # A shared cache honours s-maxage over max-age (RFC 9111 §5.2.2.10).
    upstream_limit = shared_max_age if shared_max_age is not None else max_age
    if upstream_limit is not None:
        ttl = min(ttl, upstream_limit)
    return ttl


def _seconds(text: bytes) -> float:
    text = text.strip().strip(b'"')
    return float(int(text)) if text.isdigit() else 0.0


class Storable(Protocol):
    """What the cache keeps (``forward.Relayed``): it knows its own size in bytes."""

    @property
    def size(self) -> int:  # read-only: Relayed is frozen
        ...


@attrs.frozen
class Entry:
    """A stored answer and when it was stored."""

    answer: Storable
    domain: bytes
    stored_at: float
    expires_at: float
    size: int


class ResponseCache:
    """Bounded LRU store of upstream answers with per-entry expiry and coalescing.

    Args:
        clock: returns the current time in seconds (``reactor.seconds``).
        max_entries: most entries kept.
        max_bytes: most bytes kept (headers + body + bookkeeping).
        on_change: called after entries are added or removed (gauges).
        on_evict: called with the number of entries evicted for space.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        max_entries: int,
        max_bytes: int,
        on_change: Callable[[ResponseCache], None] = lambda cache: None,
        on_evict: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._now = clock
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._expiry: list[tuple[float, bytes]] = []
        self._inflight: dict[bytes, list[defer.Deferred[Storable | None]]] = {}
        self.bytes = 0
        self._on_change = on_change
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._entries)

    def entries_per_domain(self) -> dict[str, int]:
        """domain -> entries held, in one scan (for status; not per request)."""
        counts: dict[str, int] = {}
        for entry in self._entries.values():
            name = entry.domain.decode("ascii")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def entries_for(self, domain: bytes) -> int:
        """How many entries a domain holds (for status; scans, so not per request)."""
        return sum(1 for e in self._entries.values() if e.domain == domain)

    def get(self, key: bytes) -> Entry | None:
        """The fresh entry for ``key``, marked most recently used; None if absent or stale."""
        self._purge_expired()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._now():
            self._remove(key)
            self._on_change(self)
            return None
        self._entries.move_to_end(key)
        return entry

    def age(self, entry: Entry) -> int:
        """Seconds since the entry was stored, for the ``Age`` header."""
        return max(0, int(self._now() - entry.stored_at))

    def put(self, key: bytes, domain: bytes, answer: Storable, ttl: float) -> bool:
        """Store ``answer`` for ``ttl`` seconds; False if it cannot fit at all."""
        size = answer.size
        if ttl <= 0 or size > self.max_bytes:
            return False
        now = self._now()
        if key in self._entries:
            self._remove(key)
        entry = Entry(answer, domain, now, now + ttl, size)
        self._entries[key] = entry
        self.bytes += size
        heapq.heappush(self._expiry, (entry.expires_at, key))
        self._purge_expired()
        evicted = 0
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            evicted += 1
        if evicted:
            self._on_evict(evicted)
        if len(self._expiry) > 2 * self.max_entries + 64:
            # Replaced and evicted keys leave stale heap items; rebuild from the live ones.
            self._expiry = [(e.expires_at, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiry)
        self._on_change(self)
        return True

    def drop_domains_except(self, domains: Iterable[bytes]) -> None:
        """Forget every entry of a domain not in ``domains`` (after a reload)."""
        keep = frozenset(domains)
        for key in [k for k, e in self._entries.items() if e.domain not in keep]:
            self._remove(key)
        self._on_change(self)

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size

    def _purge_expired(self) -> None:
        now = self._now()
        heap = self._expiry
        removed = False
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at == expires_at:
                self._remove(key)
                removed = True
        if removed:
            self._on_change(self)

    # Coalescing

    def join(self, key: bytes) -> defer.Deferred[Storable | None] | None:
        """Wait for the fetch already under way for ``key``; None if there is none."""
        waiters = self._inflight.get(key)
        if waiters is None:
            return None
        d: defer.Deferred[Storable | None] = defer.Deferred()
        waiters.append(d)
        return d

    def lead(self, key: bytes) -> None:
        """Mark a fetch for ``key`` as under way; later misses :meth:`join` it."""
        self._inflight[key] = []

    def settle(self, key: bytes, outcome: Storable | Failure | None) -> None:
        """Hand the leader's outcome to every waiter: the same answer or the same error.

        ``None`` means the answer was not shareable (e.g. it set a cookie): waiters get
        ``None`` and fetch for themselves.
        """
        for d in self._inflight.pop(key, ()):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
