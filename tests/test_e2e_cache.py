"""End-to-end: the scanner-absorbing cache of ``trackproxy run``, counted at a stand-in platform.

What an operator relies on, through the real process on loopback sockets: a repeat within
the TTL never reaches the platform and a repeat after it does; what makes two URLs two
entries (scheme, host, path, query, exactly); HEAD from a stored GET; concurrent misses
sharing one upstream fetch, its answer or its error; what is never stored (cookies,
``no-store``/``private``, ``Vary: *``, other statuses); the TTL shortened by the
platform's ``max-age``; both bounds holding under thousands of distinct URLs; and what
``/metrics`` says about it. ``scripts/absorption`` is run as users would run it.
The 200,000-URL scale of the bounds runs in-process, in ``test_cache_bounds.py``.

The stand-in numbers its answers (``X-Upstream-Request``), so a replayed answer is told
from a fresh one by more than timing. Every test uses paths no other test uses. Waiting
for a TTL to pass polls with a deadline; the only fixed sleeps are the stand-in's.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.testing import LocalCA

from observe import Scrape, scrape
from proxy_process import LOOPBACK, REPO_ROOT, ProxyProcess, start_proxy
from standin_upstream import LANDING_URL, REDIRECT_BODY, SERIAL_HEADER, UpstreamStandIn, scripted_path
from wire import TLS, Response, connect, request

TRACK = "track.example.test"  # cache_ttl 10s, the default
OTHER = "other.example.test"  # cache_ttl 10s, same upstream; allows POST
SHORT = "short.example.test"  # cache_ttl 1s
NOCACHE = "nocache.example.test"  # cache_ttl 0
BURST = "burst.example.test"  # only the 50-client test, so its counts are its own
FLAKY = "flaky.example.test"  # its own stand-in, which drops connections
DOMAINS = (TRACK, OTHER, SHORT, NOCACHE, BURST, FLAKY)
UPSTREAMS = ("sparkpost", "flaky")
CACHE_LABELS = {"hit", "miss", "coalesced", "bypass"}

DOMAIN_TTL = 10.0
SHORT_TTL = 1.0
UPSTREAM_TIMEOUT = 2.0
#: Longest a 1 s TTL may take to run out, polled: far below DOMAIN_TTL, so an entry that
#: expired within it was kept for the short TTL, not the domain's.
EXPIRY_DEADLINE = 5.0

# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def upstream(ca: LocalCA) -> Iterator[UpstreamStandIn]:
    """The platform behind every domain but FLAKY; numbers its answers."""
    stand_in = UpstreamStandIn(ca.issue("spgo.io"), numbered=True)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def flaky_upstream(ca: LocalCA) -> Iterator[UpstreamStandIn]:
    """FLAKY's platform. Only the dropped-connection test talks to it, so each of its
    fetches is on a new connection, which Twisted's pool never retries: the count it
    sees is the proxy's own."""
    stand_in = UpstreamStandIn(ca.issue("spgo.io"), numbered=True)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    ca: LocalCA,
    upstream: UpstreamStandIn,
    flaky_upstream: UpstreamStandIn,
) -> Iterator[ProxyProcess]:
    ca_file = str(ca.cert_path)
    running = start_proxy(
        tmp_path_factory.mktemp("cache-proxy"),
        {
            "limits": {
                "client_timeout": "10s",
                "upstream_connect_timeout": "2s",
                "upstream_timeout": f"{UPSTREAM_TIMEOUT:g}s",
            },
            "defaults": {"certificate": "self-signed", "cache_ttl": f"{DOMAIN_TTL:g}s"},
            "upstreams": {
                "sparkpost": {"connect_to": upstream.address, "ca_file": ca_file},
                "flaky": {
                    "url": "https://spgo.io", "connect_to": flaky_upstream.address, "ca_file": ca_file,
                },
            },
            "domains": {
                TRACK: {},
                OTHER: {"methods": ["GET", "HEAD", "POST"]},
                SHORT: {"cache_ttl": f"{SHORT_TTL:g}s"},
                NOCACHE: {"cache_ttl": 0},
                BURST: {},
                FLAKY: {"upstream": "flaky"},
            },
        },
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _show_what_happened(
    request: pytest.FixtureRequest, upstream: UpstreamStandIn, flaky_upstream: UpstreamStandIn
) -> Iterator[None]:
    """On failure pytest shows this teardown output: the proxy's log and upstream traffic."""
    if "proxy" not in request.fixturenames:
        yield
        return
    running: ProxyProcess = request.getfixturevalue("proxy")
    running.mark_log()
    seen = (len(upstream.requests), len(flaky_upstream.requests))
    yield
    print(f"--- proxy log during this test ({running.log_path}):\n{running.log_since_mark()}")
    for name, stand_in, count in zip(("upstream", "flaky"), (upstream, flaky_upstream), seen):
        for r in stand_in.requests[count:]:
            print(f"--- {name} received: {r.method} {r.path} (Host {r.header('Host')})")


# ---------------------------------------------------------------------------
# Helpers


def tracking_path(query: str = "") -> str:
    """A path no other test uses, shaped like a platform's click link."""
    return f"/f/{uuid.uuid4().hex}/c" + (f"?{query}" if query else "")


def https(proxy: ProxyProcess, host: str, path: str, **kw: Any) -> Response:
    """A request on the HTTPS listener, SNI = ``host``, its self-signed certificate verified."""
    return request(proxy.https_port, host, path, tls=TLS(host, proxy.certificate_path(host)), **kw)


def plain(proxy: ProxyProcess, host: str, path: str, **kw: Any) -> Response:
    """A request on the plain HTTP listener."""
    return request(proxy.http_port, host, path, **kw)


def serial(answer: Response) -> int:
    """Which upstream request produced ``answer`` (the stand-in's numbering)."""
    value = answer.header(SERIAL_HEADER)
    assert value is not None, f"no {SERIAL_HEADER}: {answer.headers}"
    return int(value)


def assert_replayed(first: Response, again: Response) -> None:
    """``again`` is ``first`` from the cache: same answer, same upstream request, an Age."""
    assert again.status == first.status
    assert again.header("Location") == first.header("Location")
    assert again.body == first.body
    assert serial(again) == serial(first)
    age = again.header("Age")
    assert age is not None and 0 <= int(age) <= DOMAIN_TTL, again.headers


def assert_fresh(answer: Response, previous: Response) -> None:
    """``answer`` came from its own upstream request, not from the cache."""
    assert serial(answer) != serial(previous)
    assert answer.header("Age") is None, answer.headers


def requests_by_cache(before: Scrape, after: Scrape, **labels: str) -> Counter[str]:
    """How many requests matching ``labels`` each cache outcome counted between scrapes."""
    return Counter(
        {
            outcome: int(
                after.total("trackproxy_requests_total", cache=outcome, **labels)
                - before.total("trackproxy_requests_total", cache=outcome, **labels)
            )
            for outcome in CACHE_LABELS
        }
    )


def concurrently(count: int, call: Callable[[], Response]) -> list[Response]:
    """``call()`` from ``count`` threads released together; their answers."""
    start = threading.Barrier(count)

    def one(_: int) -> Response:
        start.wait(timeout=10)
        return call()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def refetch_until_upstream_sees(
    fetch: Callable[[], Response], upstream: UpstreamStandIn, path: str, count: int, within: float
) -> tuple[Response, float]:
    """Repeat ``fetch()`` until ``upstream`` has received ``count`` requests for ``path``.

    Returns:
        The answer to the request that reached the upstream, and when it was sent
        (``time.monotonic()``).

    Raises:
        TimeoutError: the upstream still had fewer after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        sent = time.monotonic()
        answer = fetch()
        if len(upstream.matching(path)) >= count:
            return answer, sent
        if sent > deadline:
            raise TimeoutError(f"{path}: upstream saw {len(upstream.matching(path))} < {count} in {within}s")
        time.sleep(0.05)  # poll interval, not a wait for something to happen


def raw_exchange(port: int, data: bytes) -> tuple[bytes, bytes]:
    """Send ``data`` (a request with ``Connection: close``); the answer's head and every
    byte after it, read until the proxy closes."""
    with connect(port) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
    return head, rest


def header_lines(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}


# ---------------------------------------------------------------------------
# Hits, misses and the TTL


def test_second_get_within_the_ttl_is_answered_from_the_cache_with_age(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path("x=1")
    first = https(proxy, TRACK, path)
    again = https(proxy, TRACK, path)
    assert first.status == 302
    assert first.header("Location") == LANDING_URL and first.body == REDIRECT_BODY
    assert first.header("Age") is None
    assert_replayed(first, again)
    assert again.values("Server") == ["msys-http"]
    assert len(upstream.matching(path)) == 1


def test_get_after_the_ttl_reaches_the_upstream_again(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    sent = time.monotonic()
    first = https(proxy, SHORT, path)
    assert_replayed(first, https(proxy, SHORT, path))
    later, later_sent = refetch_until_upstream_sees(
        lambda: https(proxy, SHORT, path), upstream, path, 2, within=EXPIRY_DEADLINE
    )
    assert later_sent - sent >= SHORT_TTL * 0.9, "the entry went before its TTL"
    assert later.status == 302
    assert_fresh(later, first)
    assert len(upstream.matching(path)) == 2


@pytest.mark.parametrize(
    "host, cache_control",
    [(TRACK, "max-age=1"), (TRACK, "s-maxage=1, max-age=60"), (SHORT, "max-age=3600")],
    ids=["max-age-shortens", "s-maxage-wins", "never-lengthened"],
)
def test_entry_lasts_the_shorter_of_the_domain_ttl_and_the_upstream_max_age(
    proxy: ProxyProcess, upstream: UpstreamStandIn, host: str, cache_control: str
) -> None:
    path = scripted_path(headers=[("Cache-Control", cache_control)])
    sent = time.monotonic()
    first = https(proxy, host, path)
    assert_replayed(first, https(proxy, host, path))
    later, later_sent = refetch_until_upstream_sees(
        lambda: https(proxy, host, path), upstream, path, 2, within=EXPIRY_DEADLINE
    )
    assert later_sent - sent >= 0.9, "the entry went before its 1 s lifetime"
    assert_fresh(later, first)


# ---------------------------------------------------------------------------
# The key: scheme + host + path + query, exactly


@pytest.mark.parametrize(
    "first_suffix, second_suffix",
    [("?a=1", "?a=2"), ("?a=1&b=2", "?b=2&a=1"), ("?a=1", ""), ("/c", "/C"), ("/c", "/%63")],
    ids=["query-value", "query-order", "query-or-none", "path-case", "percent-encoding"],
)
def test_urls_differing_in_path_or_query_are_separate_entries(
    proxy: ProxyProcess, upstream: UpstreamStandIn, first_suffix: str, second_suffix: str
) -> None:
    base = f"/f/{uuid.uuid4().hex}"
    a, b = base + first_suffix, base + second_suffix
    first_a, first_b = https(proxy, TRACK, a), https(proxy, TRACK, b)
    assert serial(first_b) != serial(first_a)
    assert_replayed(first_a, https(proxy, TRACK, a))
    assert_replayed(first_b, https(proxy, TRACK, b))
    assert (len(upstream.matching(a)), len(upstream.matching(b))) == (1, 1)


def test_same_path_on_another_domain_is_a_separate_entry(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path("u=7")
    track, other = https(proxy, TRACK, path), https(proxy, OTHER, path)
    assert serial(track) != serial(other)
    assert_replayed(track, https(proxy, TRACK, path))
    assert_replayed(other, https(proxy, OTHER, path))
    assert sorted(r.header("Host") for r in upstream.matching(path)) == sorted([TRACK, OTHER])


def test_scheme_is_part_of_the_key_so_http_and_https_each_reach_the_upstream_once(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    secure, clear = https(proxy, TRACK, path), plain(proxy, TRACK, path)
    assert serial(secure) != serial(clear)
    assert_replayed(secure, https(proxy, TRACK, path))
    assert_replayed(clear, plain(proxy, TRACK, path))
    seen = upstream.matching(path)
    assert sorted(r.header("X-Forwarded-Proto") for r in seen) == ["http", "https"]


# ---------------------------------------------------------------------------
# HEAD


def test_head_after_get_is_a_hit_with_the_get_body_length_and_no_body(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    got = plain(proxy, TRACK, path)
    assert got.status == 302
    head, rest = raw_exchange(
        proxy.http_port,
        f"HEAD {path} HTTP/1.1\r\nHost: {TRACK}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 302 "), head
    fields = header_lines(head)
    assert fields.get("content-length") == str(len(REDIRECT_BODY)), fields
    assert fields.get("location") == LANDING_URL
    assert int(fields.get(SERIAL_HEADER.lower(), "0")) == serial(got)
    assert "age" in fields, fields
    assert rest == b"", "a HEAD answer carried a body"
    assert [r.method for r in upstream.matching(path)] == ["GET"]


def test_head_miss_is_forwarded_as_head_and_not_stored(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    assert https(proxy, TRACK, path, method="HEAD").status == 302
    got = https(proxy, TRACK, path)  # the HEAD stored nothing for it to find
    assert got.body == REDIRECT_BODY and got.header("Age") is None
    assert https(proxy, TRACK, path, method="HEAD").status == 302  # now from the stored GET
    assert [r.method for r in upstream.matching(path)] == ["HEAD", "GET"]


# ---------------------------------------------------------------------------
# Concurrent misses


def test_fifty_concurrent_identical_gets_reach_a_slow_upstream_once_and_all_get_its_302(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    clients = 50
    path = scripted_path(delay=1.0)  # every client asks while the first fetch is under way
    before = scrape(proxy.admin_port)
    answers = concurrently(clients, lambda: plain(proxy, BURST, path, timeout=15))
    after = scrape(proxy.admin_port)
    assert len(upstream.matching(path)) == 1
    assert Counter(a.status for a in answers) == {302: clients}
    assert {a.header("Location") for a in answers} == {LANDING_URL}
    assert {a.body for a in answers} == {REDIRECT_BODY}
    assert {serial(a) for a in answers} == {serial(answers[0])}
    counted = requests_by_cache(before, after, domain=BURST, code="302")
    assert counted["miss"] == 1, counted
    assert counted["coalesced"] + counted["hit"] == clients - 1, counted
    assert counted["coalesced"] >= 1, counted  # a one-second fetch: someone waited for it
    assert counted["bypass"] == 0, counted


@pytest.mark.parametrize(
    "host, path, status, outcome, upstream_name",
    [
        (TRACK, scripted_path(delay=UPSTREAM_TIMEOUT + 1.5), 504, "timeout", "sparkpost"),
        (FLAKY, scripted_path(delay=0.5, drop=True), 502, "reset", "flaky"),
    ],
    ids=["timeout-504", "dropped-502"],
)
def test_concurrent_misses_whose_fetch_fails_all_get_the_same_error_from_one_upstream_request(
    proxy: ProxyProcess,
    upstream: UpstreamStandIn,
    flaky_upstream: UpstreamStandIn,
    host: str,
    path: str,
    status: int,
    outcome: str,
    upstream_name: str,
) -> None:
    clients = 10
    stand_in = flaky_upstream if host == FLAKY else upstream
    before = scrape(proxy.admin_port)
    answers = concurrently(clients, lambda: plain(proxy, host, path, timeout=UPSTREAM_TIMEOUT + 10))
    after = scrape(proxy.admin_port)
    assert Counter(a.status for a in answers) == {status: clients}
    assert len(stand_in.matching(path)) == 1
    fetches = after.total("trackproxy_upstream_requests_total", upstream=upstream_name) - before.total(
        "trackproxy_upstream_requests_total", upstream=upstream_name
    )
    failed = after.total(
        "trackproxy_upstream_requests_total", upstream=upstream_name, outcome=outcome
    ) - before.total("trackproxy_upstream_requests_total", upstream=upstream_name, outcome=outcome)
    assert (fetches, failed) == (1, 1)
    counted = requests_by_cache(before, after, domain=host, code=str(status))
    assert (counted["miss"], counted["coalesced"]) == (1, clients - 1), counted


def test_a_failed_fetch_is_not_stored_and_the_next_request_tries_again(
    proxy: ProxyProcess, flaky_upstream: UpstreamStandIn
) -> None:
    path = scripted_path(drop=True)
    assert plain(proxy, FLAKY, path).status == 502
    assert plain(proxy, FLAKY, path).status == 502
    assert len(flaky_upstream.matching(path)) == 2


# ---------------------------------------------------------------------------
# What is not cached


def test_cache_ttl_zero_forwards_every_request_counted_as_bypass(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    before = scrape(proxy.admin_port)
    first, second = https(proxy, NOCACHE, path), https(proxy, NOCACHE, path)
    after = scrape(proxy.admin_port)
    assert (first.status, second.status) == (302, 302)
    assert_fresh(second, first)
    assert len(upstream.matching(path)) == 2
    counted = requests_by_cache(before, after, domain=NOCACHE)
    assert counted == Counter(bypass=2, hit=0, miss=0, coalesced=0), counted


def test_post_on_a_cached_domain_is_forwarded_every_time_and_counted_as_bypass(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    before = scrape(proxy.admin_port)
    posted = [https(proxy, OTHER, path, method="POST", body=b"e=click") for _ in range(2)]
    got = https(proxy, OTHER, path)  # no POST answer was stored for a GET to find
    after = scrape(proxy.admin_port)
    assert [p.status for p in posted] == [302, 302]
    assert got.header("Age") is None
    assert [r.method for r in upstream.matching(path)] == ["POST", "POST", "GET"]
    counted = requests_by_cache(before, after, domain=OTHER, method="POST")
    assert counted["bypass"] == 2, counted


def test_answer_setting_a_cookie_is_never_replayed_to_another_client(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = scripted_path(cookie=True)
    first, second = https(proxy, TRACK, path), https(proxy, TRACK, path)
    assert len(upstream.matching(path)) == 2
    assert first.header("Set-Cookie") != second.header("Set-Cookie")
    assert_fresh(second, first)
    assert second.header("Set-Cookie").startswith(f"visit={serial(second)};")


def test_concurrent_gets_of_a_cookie_setting_url_each_get_their_own_answer(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    clients = 6
    path = scripted_path(delay=0.5, cookie=True)
    answers = concurrently(clients, lambda: https(proxy, TRACK, path))
    assert len(upstream.matching(path)) == clients
    assert Counter(a.status for a in answers) == {302: clients}
    cookies = [a.header("Set-Cookie") for a in answers]
    assert len(set(cookies)) == clients, cookies
    for answer, cookie in zip(answers, cookies):
        assert cookie.startswith(f"visit={serial(answer)};")  # each client's own fetch


@pytest.mark.parametrize(
    "name, value",
    [
        ("Cache-Control", "no-store"),
        ("Cache-Control", "private"),
        ("Cache-Control", "no-cache"),
        ("Cache-Control", "private, max-age=60"),
        ("Cache-Control", "max-age=0"),
        ("Vary", "*"),
    ],
)
def test_answer_the_upstream_marks_uncacheable_is_not_stored(
    proxy: ProxyProcess, upstream: UpstreamStandIn, name: str, value: str
) -> None:
    path = scripted_path(headers=[(name, value)])
    first, second = https(proxy, TRACK, path), https(proxy, TRACK, path)
    assert second.header(name) == value  # relayed as the upstream said it
    assert_fresh(second, first)
    assert len(upstream.matching(path)) == 2


@pytest.mark.parametrize("status", [200, 204, 301, 302, 303, 307, 308, 404, 410])
def test_cacheable_status_is_stored(
    proxy: ProxyProcess, upstream: UpstreamStandIn, status: int
) -> None:
    path = scripted_path(status=status)
    first = https(proxy, TRACK, path)
    assert first.status == status
    assert_replayed(first, https(proxy, TRACK, path))
    assert len(upstream.matching(path)) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 403, 201])
def test_other_status_is_not_stored(proxy: ProxyProcess, upstream: UpstreamStandIn, status: int) -> None:
    path = scripted_path(status=status)
    first, second = https(proxy, TRACK, path), https(proxy, TRACK, path)
    assert (first.status, second.status) == (status, status)
    assert_fresh(second, first)
    assert len(upstream.matching(path)) == 2


# ---------------------------------------------------------------------------
# Bounds: a separate proxy with a small cache


def test_cache_stays_within_max_entries_and_max_bytes_under_thousands_of_distinct_urls(
    tmp_path: Path,
) -> None:
    max_entries, max_bytes = 1000, 256 * 1024
    urls, clients = 3000, 4
    stand_in = UpstreamStandIn(None, numbered=True, no_delay=True)
    bounded = start_proxy(
        tmp_path / "bounded",
        {
            # A TTL longer than the run: every entry that goes, goes for space.
            "defaults": {"certificate": "none", "cache_ttl": "10m"},
            "cache": {"max_entries": max_entries, "max_bytes": "256KiB"},
            "upstreams": {"plain": {"url": "http://bounded.test", "connect_to": stand_in.address}},
            "domains": {TRACK: {"upstream": "plain"}},
        },
    )
    paths = [[f"/f/{c}-{i}/{uuid.uuid4().hex}" for i in range(urls // clients)] for c in range(clients)]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def run(mine: list[str]) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, bounded.http_port, timeout=10)
        try:
            for path in mine:
                conn.request("GET", path, headers={"Host": TRACK})
                answer = conn.getresponse()
                answer.read()
                with lock:
                    statuses[answer.status] += 1
        finally:
            conn.close()

    try:
        seen: list[tuple[float, float]] = []
        with ThreadPoolExecutor(max_workers=clients) as pool:
            running = [pool.submit(run, mine) for mine in paths]
            while not all(f.done() for f in running):
                now = scrape(bounded.admin_port)
                seen.append((now.total("trackproxy_cache_entries"), now.total("trackproxy_cache_bytes")))
                time.sleep(0.1)  # sampling interval while the clients run
            for f in running:
                f.result()
        final = scrape(bounded.admin_port)
        entries = final.total("trackproxy_cache_entries")
        cache_bytes = final.total("trackproxy_cache_bytes")
        evicted = final.total("trackproxy_cache_evictions_total")
        assert statuses == {302: urls}
        assert len(stand_in.requests) == urls  # every URL distinct: every one a miss
        seen.append((entries, cache_bytes))
        assert all(0 <= e <= max_entries and 0 <= b <= max_bytes for e, b in seen), max(seen)
        assert entries > 0 and evicted > 0
        assert entries + evicted == urls  # nothing lost track of, nothing expired
        # The latest URL is still served from the cache; the first was evicted for space.
        recent, oldest = paths[0][-1], paths[0][0]
        assert request(bounded.http_port, TRACK, recent).header("Age") is not None
        assert request(bounded.http_port, TRACK, oldest).header("Age") is None
        assert len(stand_in.matching(recent)) == 1 and len(stand_in.matching(oldest)) == 2
    finally:
        print(f"--- bounded proxy log:\n{bounded.log_tail()}")
        bounded.stop()
        stand_in.close()


# ---------------------------------------------------------------------------
# The demo script


def test_absorption_script_reports_how_many_requests_reached_the_upstream() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "absorption"), "--urls", "5", "--repeats", "4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 requests in, 5 reached the upstream (75.0% absorbed)" in done.stdout, done.stdout
    assert "5 miss" in done.stdout, done.stdout


# ---------------------------------------------------------------------------
# Metrics, after everything above went through the module's proxy


def test_metric_labels_name_only_configured_domains_and_never_a_path_or_client_made_host(
    proxy: ProxyProcess,
) -> None:
    marker = uuid.uuid4().hex
    path = f"/f/{marker}/someone%40example.org?utm={marker}"
    stranger = f"scanner-{marker}.example.test"
    assert plain(proxy, TRACK, path).status == 302
    assert plain(proxy, TRACK, path).status == 302
    assert plain(proxy, NOCACHE, path).status == 302
    assert plain(proxy, stranger, path).status == 404
    metrics = scrape(proxy.admin_port)
    domains = metrics.label_values("trackproxy_requests_total", "domain")
    assert {TRACK, NOCACHE, "_unknown"} <= domains <= {*DOMAINS, "_unknown"}, domains
    assert metrics.label_values("trackproxy_request_duration_seconds_count", "domain") <= {*DOMAINS, "_unknown"}
    assert {"hit", "miss", "bypass"} <= metrics.label_values("trackproxy_requests_total", "cache") <= CACHE_LABELS
    assert metrics.label_values("trackproxy_upstream_requests_total", "upstream") <= set(UPSTREAMS)
    assert marker not in metrics.text  # neither the path, its query nor the stranger's host
    for name, labels, _ in metrics.series("trackproxy_"):
        assert not any("/" in v or "@" in v for v in labels.values()), (name, labels)
    assert metrics.total("trackproxy_cache_entries") > 0
    assert metrics.total("trackproxy_cache_bytes") > 0
