"""The cache's memory stays bounded under 200,000 distinct URLs: both bounds, every put.

The end-to-end suite sends a few thousand distinct URLs through the real process; this
is the scale of a campaign's worth of unique tracking links, run in-process with a fake
clock so it takes seconds. Besides the two configured bounds it checks the cache's own
bookkeeping (expiry heap, in-flight table) does not grow with the URLs seen.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from proxy.cache import ResponseCache
from proxy.forward import Relayed, prepare
from proxy.upstream import UpstreamResponse

URLS = 200_000
KIB = 1024
#: Longer than the whole run on the fake clock: every entry that goes, goes for space.
TTL = 3600.0


def tracking_answer(i: int, body_size: int) -> Relayed:
    return prepare(UpstreamResponse(
        302,
        b"Found",
        (
            (b"Location", b"https://landing.example/p/%d" % i),
            (b"Server", b"msys-http"),
            (b"Content-Type", b"text/html"),
        ),
        b"x" * body_size,
    ))


@pytest.mark.parametrize(
    "max_entries, max_bytes, body_sizes",
    [
        (1000, 256 * KIB, range(0, 700, 7)),  # the bounds: ~400 answers fill the bytes
        (1000, 16 * 1024 * KIB, range(0, 100)),  # small answers, roomy bytes: entries bind
    ],
    ids=["issue-bounds", "entries-bind"],
)
def test_two_hundred_thousand_distinct_urls_never_exceed_max_entries_or_max_bytes(
    max_entries: int, max_bytes: int, body_sizes: range
) -> None:
    clock = Clock()
    evicted: list[int] = []
    cache = ResponseCache(clock.seconds, max_entries, max_bytes, on_evict=evicted.append)
    sizes = list(body_sizes)
    fullest = (0, 0)
    largest = max(tracking_answer(URLS, s).size for s in sizes)
    for i in range(URLS):
        key = b"https://track.example.com/f/%d/%x" % (i, i * 2654435761 % 2**32)
        assert cache.put(key, b"track.example.com", tracking_answer(i, sizes[i % len(sizes)]), TTL)
        assert len(cache) <= max_entries and cache.bytes <= max_bytes, (i, len(cache), cache.bytes)
        if i % 997 == 0:
            assert sum(evicted) == i + 1 - len(cache), "an entry went without being counted"
            # Bookkeeping bounded by the entries kept, not by the URLs seen.
            assert len(cache._expiry) <= 2 * max_entries + 64 + 1
            assert not cache._inflight
        fullest = max(fullest, (len(cache), cache.bytes))
        clock.advance(0.001)
    assert sum(evicted) == URLS - len(cache)
    assert cache.bytes == sum(e.answer.size for e in cache._entries.values())
    # A bound was reached, so it was the bound (not the run's size) that held the cache in.
    assert fullest[0] == max_entries or fullest[1] > max_bytes - largest, fullest
    # What is left is the most recent URLs, and they are served.
    newest = b"https://track.example.com/f/%d/%x" % (URLS - 1, (URLS - 1) * 2654435761 % 2**32)
    assert cache.get(newest) is not None
    assert cache.get(b"https://track.example.com/f/0/0") is None
