"""The cache's rules with a fake clock: what is stored, for how long, what goes first,
and how concurrent misses share one upstream fetch."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxy.access import Recorder
from proxy.acme import ChallengeStore
from proxy.cache import ResponseCache, cache_key, storable_ttl
from proxy.config import parse_config
from proxy.forward import Router, prepare
from proxy.metrics import Metrics
from proxy.server import HTTPFactory
from proxy.upstream import UpstreamError, UpstreamResponse


def answer(code=302, headers=(), body=b"moved"):
    return UpstreamResponse(code, b"X", ((b"Location", b"https://l.example/"), *headers), body)


def stored(**kwargs):
    """An answer as the cache keeps it (prepared for relaying)."""
    return prepare(answer(**kwargs))


@pytest.mark.parametrize(
    "response, expected",
    [
        (answer(), 10.0),
        (answer(headers=((b"Cache-Control", b"max-age=3"),)), 3.0),
        (answer(headers=((b"Cache-Control", b"public, max-age=3600"),)), 10.0),  # never lengthened
        (answer(headers=((b"Cache-Control", b"max-age=60, s-maxage=2"),)), 2.0),  # s-maxage wins
        (answer(headers=((b"Cache-Control", b"max-age=0"),)), 0.0),
        (answer(headers=((b"Cache-Control", b"no-store"),)), 0.0),
        (answer(headers=((b"Cache-Control", b"Private"),)), 0.0),
        (answer(headers=((b"Cache-Control", b"no-cache"),)), 0.0),
        (answer(headers=((b"Set-Cookie", b"id=1"),)), 0.0),
        (answer(headers=((b"Vary", b"Accept-Encoding, *"),)), 0.0),
        (answer(headers=((b"Vary", b"Accept-Encoding"),)), 10.0),
        (answer(code=200), 10.0),
        (answer(code=404), 10.0),
        (answer(code=410), 10.0),
        (answer(code=500), 0.0),
        (answer(code=502), 0.0),
        (answer(code=403), 0.0),
    ],
)
def test_storable_ttl_follows_status_and_upstream_directives(response, expected):
    assert storable_ttl(response, 10.0) == expected


def test_cache_off_for_the_domain_stores_nothing():
    assert storable_ttl(answer(), 0.0) == 0.0


def new_cache(clock, max_entries=100, max_bytes=1 << 20):
    evicted = []
    cache = ResponseCache(clock.seconds, max_entries, max_bytes, on_evict=evicted.append)
    return cache, evicted


def test_entry_expires_after_its_ttl_and_age_counts_up():
    clock = Clock()
    cache, _ = new_cache(clock)
    cache.put(b"k", b"d", stored(), 10)
    clock.advance(3.7)
    entry = cache.get(b"k")
    assert entry is not None and cache.age(entry) == 3
    clock.advance(6.3)
    assert cache.get(b"k") is None
    assert len(cache) == 0 and cache.bytes == 0


def test_expired_entries_are_purged_without_being_looked_up():
    clock = Clock()
    cache, _ = new_cache(clock)
    for i in range(10):
        cache.put(b"k%d" % i, b"d", stored(), 5)
    clock.advance(6)
    cache.put(b"fresh", b"d", stored(), 5)
    assert len(cache) == 1 and cache.bytes == stored().size


def test_least_recently_used_goes_first_when_entries_run_out():
    clock = Clock()
    cache, evicted = new_cache(clock, max_entries=3)
    for key in (b"a", b"b", b"c"):
        cache.put(key, b"d", stored(), 10)
    cache.get(b"a")  # a is now the most recently used
    cache.put(b"d", b"d", stored(), 10)
    assert cache.get(b"b") is None
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert evicted == [1]


def test_byte_bound_counts_headers_and_body():
    clock = Clock()
    size = stored(body=b"x" * 1000).size
    cache, evicted = new_cache(clock, max_bytes=size * 2 + 10)
    for key in (b"a", b"b", b"c"):
        cache.put(key, b"d", stored(body=b"x" * 1000), 10)
    assert len(cache) == 2 and cache.bytes <= size * 2 + 10
    assert cache.get(b"a") is None and sum(evicted) == 1


def test_an_answer_larger_than_the_whole_cache_is_not_stored():
    cache, _ = new_cache(Clock(), max_bytes=500)
    assert cache.put(b"a", b"d", stored(body=b"x" * 1000), 10) is False
    assert len(cache) == 0


def test_both_bounds_hold_under_many_distinct_urls():
    clock = Clock()
    cache, evicted = new_cache(clock, max_entries=1000, max_bytes=200_000)
    for i in range(20_000):
        cache.put(b"https://t.example/f/%d" % i, b"t.example", stored(body=b"x" * (i % 300)), 10)
        clock.advance(0.001)
    assert len(cache) <= 1000 and cache.bytes <= 200_000
    assert cache.bytes == sum(e.size for e in cache._entries.values())
    assert sum(evicted) == 20_000 - len(cache)


def test_dropping_removed_domains_forgets_only_their_entries():
    cache, _ = new_cache(Clock())
    cache.put(b"a1", b"a.example", stored(), 10)
    cache.put(b"b1", b"b.example", stored(), 10)
    cache.drop_domains_except([b"b.example"])
    assert cache.get(b"a1") is None and cache.get(b"b1") is not None
    assert cache.entries_for(b"b.example") == 1


def test_key_is_scheme_host_path_and_query_exactly():
    assert cache_key(b"https", b"t.example", b"/f/a?x=1") == b"https://t.example/f/a?x=1"
    assert cache_key(b"http", b"t.example", b"/f/a?x=1") != cache_key(b"https", b"t.example", b"/f/a?x=1")
    assert cache_key(b"https", b"t.example", b"/f/a?x=1") != cache_key(b"https", b"t.example", b"/f/a?x=2")


# ---------------------------------------------------------------------------
# Through the router: hit, miss, coalesced, bypass


class HeldClient:
    """An upstream client whose answers the test releases by hand."""

    def __init__(self):
        self.pending: list[defer.Deferred] = []
        self.calls: list[tuple] = []

    def fetch(self, method, target, headers, body):
        self.calls.append((method, target))
        d = defer.Deferred()
        self.pending.append(d)
        return d


CONFIG = """
state_dir: {state}
upstreams: {{sparkpost: {{connect_to: "127.0.0.1:1"}}}}
domains:
  track.example.com: {{certificate: none}}
  nocache.example.com: {{certificate: none, cache_ttl: 0}}
"""


@pytest.fixture
def setup(tmp_path):
    config = parse_config(CONFIG.format(state=tmp_path), str(tmp_path / "t.yaml"))
    clock = Clock()
    metrics = Metrics(CollectorRegistry())
    cache = ResponseCache(clock.seconds, 100, 1 << 20, on_change=metrics.cache_changed, on_evict=metrics.cache_evicted)
    client = HeldClient()
    router = Router(
        config.domains, {n: client for n in config.upstreams}, ChallengeStore(str(tmp_path)),
        cache=cache, metrics=metrics, clock=clock.seconds,
    )
    return HTTPFactory(router.handle, b"http", 30, 16384, clock, Recorder(metrics, lambda: None, clock.seconds)), client, clock, metrics


def open_request(site, raw):
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport


def counted(metrics, **labels):
    value = metrics.registry.get_sample_value("trackproxy_requests_total", labels)
    return int(value or 0)


GET = b"GET /f/a?b=1 HTTP/1.1\r\nHost: track.example.com\r\n\r\n"


def test_concurrent_misses_share_one_fetch_and_then_hit(setup):
    site, client, clock, metrics = setup
    transports = [open_request(site, GET) for _ in range(5)]
    assert len(client.calls) == 1
    client.pending[0].callback(answer())
    assert all(t.value().startswith(b"HTTP/1.1 302 ") for t in transports)
    clock.advance(2)
    later = open_request(site, GET)
    assert b"\r\nAge: 2\r\n" in later.value() and len(client.calls) == 1
    base = dict(domain="track.example.com", scheme="http", method="GET", code="302")
    assert (counted(metrics, cache="miss", **base), counted(metrics, cache="coalesced", **base),
            counted(metrics, cache="hit", **base)) == (1, 4, 1)
    assert metrics.registry.get_sample_value("trackproxy_cache_entries") == 1


def test_a_failed_fetch_gives_every_waiter_the_same_error_without_retrying(setup):
    site, client, _, _ = setup
    transports = [open_request(site, GET) for _ in range(4)]
    client.pending[0].errback(Failure(UpstreamError("timeout", "slow")))
    assert all(t.value().startswith(b"HTTP/1.1 504 ") for t in transports)
    assert len(client.calls) == 1


def test_an_answer_setting_a_cookie_is_not_shared_with_waiters(setup):
    site, client, _, _ = setup
    first, second = open_request(site, GET), open_request(site, GET)
    client.pending[0].callback(answer(headers=((b"Set-Cookie", b"id=first"),)))
    assert b"id=first" in first.value()
    assert second.value() == b"" and len(client.calls) == 2  # the waiter fetches its own
    client.pending[1].callback(answer(headers=((b"Set-Cookie", b"id=second"),)))
    assert b"id=second" in second.value() and b"id=first" not in second.value()


def test_head_is_answered_from_a_stored_get_with_its_length(setup):
    site, client, _, _ = setup
    open_request(site, GET)
    client.pending[0].callback(answer(body=b"0123456789"))
    head = open_request(site, b"HEAD /f/a?b=1 HTTP/1.1\r\nHost: track.example.com\r\n\r\n").value()
    assert head.startswith(b"HTTP/1.1 302 ") and b"Content-Length: 10\r\n" in head
    assert head.endswith(b"\r\n\r\n") and len(client.calls) == 1


def test_cache_off_domain_forwards_every_request_as_bypass(setup):
    site, client, _, metrics = setup
    for _ in range(2):
        open_request(site, b"GET /f HTTP/1.1\r\nHost: nocache.example.com\r\n\r\n")
        client.pending[-1].callback(answer())
    assert len(client.calls) == 2
    assert counted(metrics, domain="nocache.example.com", scheme="http", method="GET", code="302", cache="bypass") == 2


def test_unknown_hosts_are_counted_as_unknown_never_by_name(setup):
    site, _, _, metrics = setup
    open_request(site, b"GET /f HTTP/1.1\r\nHost: victim.example\r\n\r\n")
    assert counted(metrics, domain="_unknown", scheme="http", method="GET", code="404", cache="bypass") == 1
    exposition = metrics.exposition(None)[0]
    assert b"victim.example" not in exposition and b"/f" not in exposition
