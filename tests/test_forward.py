"""The request relay's rules: routing, header rewriting, X-Forwarded-For, refusals.

Pure functions are tested with tables; the router is driven through the real server
protocol (``server.HTTPFactory``, llhttp) over an in-memory transport, with an inline
fake upstream client that records what would have been sent.
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.acme import ChallengeStore
from proxy.config import parse_config
from proxy.forward import (
    Router,
    forwarded_for,
    normalise_request_host,
    relayed_headers,
    request_target,
    upstream_request_headers,
)
from proxy.server import HTTPFactory
from proxy.testing import FakeUpstreamClient
from proxy.upstream import UpstreamError, UpstreamResponse


def ProxySite(router, scheme=b"http", client_timeout=30, max_header_bytes=16384, clock=None):
    """The HTTP listener's factory around ``router``, its timers on a fake clock."""
    return HTTPFactory(router.handle, scheme, client_timeout, max_header_bytes, clock or Clock())


def values(headers, name: bytes) -> list[bytes]:
    """Every value of ``name`` (case-insensitive) in a list of header pairs."""
    return [v for n, v in headers if n.lower() == name]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"track.example.com", "track.example.com"),
        (b"Track.Example.COM", "track.example.com"),
        (b"track.example.com:443", "track.example.com"),
        (b"track.example.com.", "track.example.com"),
        (b"TRACK.example.com.:8443", "track.example.com"),
        (b"  track.example.com ", "track.example.com"),
        (b"[::1]:443", None),
        (b"track.example.com:http", None),
        (b"", None),
        ("bücher.example".encode(), None),
    ],
)
def test_request_host_is_lower_cased_without_port_or_trailing_dot(raw, expected):
    assert normalise_request_host(raw) == expected


@pytest.mark.parametrize(
    "peer, incoming, trusted, expected",
    [
        ("192.0.2.7", None, False, b"192.0.2.7"),
        ("192.0.2.7", [b"6.6.6.6"], False, b"192.0.2.7"),  # spoofed: replaced
        ("10.0.0.2", [b"198.51.100.9"], True, b"198.51.100.9, 10.0.0.2"),  # trusted: extended
        ("10.0.0.2", [b"198.51.100.9, 10.1.1.1", b"10.2.2.2"], True, b"198.51.100.9, 10.1.1.1, 10.2.2.2, 10.0.0.2"),
        ("10.0.0.2", None, True, b"10.0.0.2"),
    ],
)
def test_x_forwarded_for_is_replaced_unless_the_peer_is_trusted(peer, incoming, trusted, expected):
    assert forwarded_for(peer, incoming, trusted) == expected


def test_upstream_headers_keep_end_to_end_ones_and_set_forwarding_ones():
    incoming = [
        (b"Host", b"TRACK.example.com:443"),
        (b"User-Agent", b"Mozilla/5.0 scanner"),
        (b"Cookie", b"a=1"),
        (b"X-Custom", b"kept"),
        (b"Connection", b"keep-alive, X-Hop-Named"),
        (b"X-Hop-Named", b"dropped"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Content-Length", b"0"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"gopher"),
        (b"X-Forwarded-Host", b"evil.example"),
    ]
    out = upstream_request_headers(
        incoming, b"track.example.com", "192.0.2.7", b"https", False,
        connection=[b"keep-alive, X-Hop-Named"], incoming_forwarded_for=[b"6.6.6.6"],
    )
    names = [name.lower() for name, _ in out]
    assert names == [
        b"host", b"user-agent", b"cookie", b"x-custom",
        b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    ]
    assert values(out, b"host") == [b"track.example.com"]
    assert values(out, b"user-agent") == [b"Mozilla/5.0 scanner"]
    assert values(out, b"x-forwarded-for") == [b"192.0.2.7"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"track.example.com"]


def test_absent_user_agent_stays_absent():
    out = upstream_request_headers([(b"Host", b"t.example")], b"t.example", "192.0.2.1", b"http", False)
    assert not values(out, b"user-agent")


def test_relayed_headers_drop_hop_by_hop_and_connection_named_ones_but_keep_server():
    response = UpstreamResponse(
        code=302,
        phrase=b"Found",
        headers=(
            (b"Server", b"msys-http"),
            (b"Location", b"https://landing.example/"),
            (b"Set-Cookie", b"a=1"),
            (b"X-Up-Hop", b"secret"),
            (b"Set-Cookie", b"b=2"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
        ),
        body=b"",
        connection_tokens=frozenset({b"x-up-hop"}),
    )
    assert relayed_headers(response) == [
        (b"Server", b"msys-http"),
        (b"Location", b"https://landing.example/"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]


@pytest.mark.parametrize(
    "uri, host, expected",
    [
        (b"/f/a?b=1", "t.example", b"/f/a?b=1"),
        (b"http://t.example/f/a?b=1", "t.example", b"/f/a?b=1"),
        (b"https://T.example:443", "t.example", b"/"),
        (b"http://evil.example/f", "t.example", None),  # never steered elsewhere
        (b"*", "t.example", None),
        (b"ftp://t.example/", "t.example", None),
    ],
)
def test_request_target_accepts_absolute_form_only_for_its_own_host(uri, host, expected):
    assert request_target(uri, host) == expected


# ---------------------------------------------------------------------------
# The router through the real HTTP parser


CONFIG = """
state_dir: {state}
limits: {{max_header_bytes: 2KiB}}
trusted_proxies: ["10.0.0.0/8"]
upstreams:
  sparkpost: {{connect_to: "127.0.0.1:1"}}
domains:
  track.example.com: {{certificate: none}}
  pay.example.com: {{certificate: none, upstream: iterable}}
  ses.example.com: {{certificate: none, upstream: ses-us-east-1}}
"""


@pytest.fixture
def proxy(tmp_path):
    config = parse_config(CONFIG.format(state=tmp_path), str(tmp_path / "t.yaml"))
    client = FakeUpstreamClient()
    clients = {name: client for name in config.upstreams}
    (tmp_path / "acme-challenge").mkdir()
    router = Router(config.domains, clients, ChallengeStore(str(tmp_path / "acme-challenge")), config.trusted_proxies)
    site = ProxySite(router, b"http", client_timeout=30, max_header_bytes=config.limits.max_header_bytes)
    return site, client, tmp_path


def exchange(site, raw: bytes, peer: str = "192.0.2.7") -> bytes:
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    channel.connectionLost(None)
    return transport.value()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_unknown_host_gets_404_and_nothing_goes_upstream(proxy):
    site, client, _ = proxy
    response = exchange(site, b"GET /f/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert status_of(response) == 404
    assert client.calls == []


@pytest.mark.parametrize("headers", [b"", b"Host: track.example.com\r\nHost: track.example.com\r\n"])
def test_missing_or_repeated_host_gets_400(proxy, headers):
    site, client, _ = proxy
    assert status_of(exchange(site, b"GET / HTTP/1.1\r\n" + headers + b"\r\n")) == 400
    assert client.calls == []


def test_relays_upstream_answer_with_its_server_header(proxy):
    site, client, _ = proxy
    response = exchange(site, b"GET /f/a/b?c=1 HTTP/1.1\r\nHost: Track.Example.com:80\r\nUser-Agent: UA/1\r\n\r\n")
    assert status_of(response) == 302
    assert b"Server: msys-http\r\n" in response and b"TwistedWeb" not in response
    assert b"Location: https://l.example/\r\n" in response
    assert response.endswith(b"moved")
    method, target, headers, body = client.calls[0]
    assert (method, target, body) == (b"GET", b"/f/a/b?c=1", None)
    assert values(headers, b"host") == [b"track.example.com"]
    assert values(headers, b"x-forwarded-proto") == [b"http"]
    assert values(headers, b"user-agent") == [b"UA/1"]


def test_trusted_peer_extends_x_forwarded_for(proxy):
    site, client, _ = proxy
    exchange(site, b"GET / HTTP/1.1\r\nHost: track.example.com\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n", peer="10.1.2.3")
    assert values(client.calls[0][2], b"x-forwarded-for") == [b"198.51.100.1, 10.1.2.3"]


def test_method_not_allowed_gets_405_with_allow(proxy):
    site, client, _ = proxy
    response = exchange(site, b"DELETE /x HTTP/1.1\r\nHost: track.example.com\r\n\r\n")
    assert status_of(response) == 405
    assert b"Allow: GET, HEAD\r\n" in response
    assert client.calls == []


def test_iterable_domain_forwards_post_with_its_body(proxy):
    site, client, _ = proxy
    exchange(site, b"POST /l HTTP/1.1\r\nHost: pay.example.com\r\nContent-Length: 3\r\n\r\nabc")
    assert client.calls[0][0] == b"POST" and client.calls[0][3] == b"abc"


def test_oversized_request_head_gets_431_and_nothing_upstream(proxy):
    site, client, _ = proxy
    big = b"X-Big: " + b"a" * 3000 + b"\r\n"
    response = exchange(site, b"GET / HTTP/1.1\r\nHost: track.example.com\r\n" + big + b"\r\n")
    assert status_of(response) == 431
    assert client.calls == []


def test_ses_domain_refuses_headers_of_8kib_before_forwarding(tmp_path):
    config = parse_config(CONFIG.format(state=tmp_path).replace("2KiB", "16KiB"), str(tmp_path / "t.yaml"))
    client = FakeUpstreamClient()
    router = Router(config.domains, {n: client for n in config.upstreams}, ChallengeStore(str(tmp_path)))
    site = ProxySite(router, b"http", 30, config.limits.max_header_bytes)
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 900) for i in range(9))
    assert status_of(exchange(site, b"GET / HTTP/1.1\r\nHost: ses.example.com\r\n" + big + b"\r\n")) == 431
    assert status_of(exchange(site, b"GET / HTTP/1.1\r\nHost: track.example.com\r\n" + big + b"\r\n")) == 302
    assert len(client.calls) == 1


def test_acme_challenge_is_answered_from_disk_and_never_forwarded(proxy):
    site, client, state = proxy
    (state / "acme-challenge" / "tok_EN-1").write_bytes(b"tok_EN-1.thumbprint")
    response = exchange(site, b"GET /.well-known/acme-challenge/tok_EN-1 HTTP/1.1\r\nHost: track.example.com\r\n\r\n")
    assert status_of(response) == 200 and response.endswith(b"tok_EN-1.thumbprint")
    for token in (b"missing", b"..%2F..%2Fetc", b"a.b"):
        response = exchange(site, b"GET /.well-known/acme-challenge/" + token + b" HTTP/1.1\r\nHost: track.example.com\r\n\r\n")
        assert status_of(response) == 404
    assert client.calls == []


def test_other_well_known_paths_are_forwarded(proxy):
    site, client, _ = proxy
    exchange(site, b"GET /.well-known/assetlinks.json HTTP/1.1\r\nHost: track.example.com\r\n\r\n")
    assert client.calls[0][1] == b"/.well-known/assetlinks.json"


@pytest.mark.parametrize("outcome, status", [("timeout", 504), ("connect_error", 502), ("tls_error", 502), ("reset", 502)])
def test_upstream_failures_map_to_502_or_504(tmp_path, outcome, status):
    config = parse_config(CONFIG.format(state=tmp_path), str(tmp_path / "t.yaml"))
    client = FakeUpstreamClient(failure=UpstreamError(outcome, "test"))
    router = Router(config.domains, {n: client for n in config.upstreams}, ChallengeStore(str(tmp_path)))
    site = ProxySite(router, b"http", 30, 16384)
    assert status_of(exchange(site, b"GET / HTTP/1.1\r\nHost: track.example.com\r\n\r\n")) == status


def test_router_trust_check_uses_the_configured_networks():
    router = Router({}, {}, ChallengeStore("/nonexistent"), [ipaddress.ip_network("10.0.0.0/8")])
    assert router.is_trusted("10.9.9.9") and not router.is_trusted("192.0.2.1")
    assert not router.is_trusted("not-an-ip")


# ---------------------------------------------------------------------------
# Bounds on what a client can hold


def clocked_channel(router, timeout=30):
    """A connection to a listener around ``router``, on a fake clock: (channel, transport, clock)."""
    clock = Clock()
    site = ProxySite(router, client_timeout=timeout, clock=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    channel.makeConnection(transport)
    return channel, transport, clock


def test_a_request_head_dripping_past_client_timeout_gets_408_and_is_closed(proxy):
    site, client, _ = proxy
    channel, transport, clock = clocked_channel(site.handler.__self__)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: track.example.com\r\n")
    for _ in range(29):  # a byte a second does not restart the deadline
        clock.advance(1)
        channel.dataReceived(b"X")
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(1.5)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert transport.disconnecting
    assert client.calls == []


def test_no_client_deadline_runs_while_the_upstream_is_asked(tmp_path):
    config = parse_config(CONFIG.format(state=tmp_path), str(tmp_path / "t.yaml"))
    client = FakeUpstreamClient(hold=True)
    router = Router(config.domains, {n: client for n in config.upstreams}, ChallengeStore(str(tmp_path)))
    channel, transport, clock = clocked_channel(router, timeout=30)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: track.example.com\r\n\r\n")
    assert len(client.pending) == 1 and clock.getDelayedCalls() == []
    clock.advance(60)  # the upstream's own deadline is its business
    client.release()
    assert transport.value().startswith(b"HTTP/1.1 302 Found\r\n") and not transport.disconnecting
    # Keep-alive: the next request's deadline starts at the end of this answer.
    assert [c.getTime() for c in clock.getDelayedCalls()] == [90.0]


def test_a_listener_closes_connections_past_its_limit():
    factory = HTTPFactory(lambda request: None, b"http", 30, 16384, Clock(), limit=2)
    addr = IPv4Address("TCP", "192.0.2.7", 1)
    first, second = factory.buildProtocol(addr), factory.buildProtocol(addr)
    for p in (first, second):
        p.makeConnection(StringTransport())
    assert factory.buildProtocol(addr) is None
    first.connectionLost(None)
    assert factory.open_connections == 1 and factory.buildProtocol(addr) is not None
