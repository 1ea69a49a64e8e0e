"""PROXY protocol v1/v2 (``proxy.proxyprotocol``): the header parser, then the running
proxy behind a stand-in balancer on loopback (a client that writes the header itself, as
HAProxy's ``send-proxy``/``send-proxy-v2`` do), plain and over TLS."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import struct
import uuid
from collections.abc import Iterator

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.config import ProxyProtocolSettings
from proxy.proxyprotocol import V2_SIGNATURE, ProxyProtocolFactory, Refused, parse_header, starts_like_a_header
from proxy.testing import LocalCA

from observe import poll, scrape
from proxy_process import LOOPBACK, ProxyProcess, start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS

TRACK = "track.example.test"


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp4(source: str, port: int = 40000) -> bytes:
    return v2(1, 0x11, socket.inet_aton(source) + socket.inet_aton("198.51.100.1") + struct.pack("!HH", port, 443))


V1 = b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 443\r\n"


@pytest.mark.parametrize(("data", "expected"), [
    (V1 + b"GET /", (len(V1), IPv4Address("TCP", "203.0.113.9", 40000))),
    (b"PROXY TCP6 2001:db8::9 2001:db8::1 40000 443\r\n", (46, IPv6Address("TCP", "2001:db8::9", 40000))),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (v2_tcp4("203.0.113.9") + b"\x16\x03", (28, IPv4Address("TCP", "203.0.113.9", 40000))),
    (v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "2001:db8::9") + bytes(16) + struct.pack("!HH", 5, 443)),
     (52, IPv6Address("TCP", "2001:db8::9", 5))),
    (v2(0, 0x00, b""), (16, None)),  # LOCAL: the balancer's own health check
    (v2(1, 0x11, bytes(12) + b"\x03\x00\x02ab"), (33, IPv4Address("TCP", "0.0.0.0", 0))),  # TLVs skipped
], ids=["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4", "v2-tcp6", "v2-local", "v2-tlv"])
def test_a_whole_header_gives_its_length_and_the_client(data, expected):
    assert parse_header(data) == expected


@pytest.mark.parametrize("data", [b"PRO", V1[:20], V2_SIGNATURE[:5], v2_tcp4("203.0.113.9")[:20]])
def test_part_of_a_header_waits_for_the_rest(data):
    assert parse_header(data) is None
    assert starts_like_a_header(data) is not False


@pytest.mark.parametrize(("data", "reason"), [
    (b"GET / HTTP/1.1\r\n", "missing"),
    (b"\x16\x03\x01\x02\x00", "missing"),  # a TLS ClientHello without a header
    (b"PROXY TCP4 203.0.113.300 198.51.100.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 2001:db8::9 198.51.100.1 1 2\r\n", "malformed"),
    (b"PROXY TCP4 203.0.113.9 198.51.100.1 99999 2\r\n", "malformed"),
    (b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 +443\r\n", "malformed"),
    (b"PROXY " + b"x" * 120, "malformed"),
    (V2_SIGNATURE + b"\x10\x11\x00\x00", "malformed"),  # version 1 in a v2 signature
    (v2(2, 0x11, bytes(12)), "malformed"),
], ids=["http", "tls", "bad-ip", "wrong-family", "bad-port", "signed-port", "too-long", "v2-version",
        "v2-command"])
def test_what_is_not_an_acceptable_header_is_refused_with_its_reason(data, reason):
    with pytest.raises(Refused) as info:
        parse_header(data)
    assert info.value.reason == reason


# ---------------------------------------------------------------------------
# The connection's first bytes, in memory (a Clock for the deadline)


class Inner(Protocol):
    """The listener's own protocol: what it is told of its peer, and what it reads."""

    def __init__(self) -> None:
        self.peer: object = None
        self.data = b""

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def reader_from(source: str, listed: str = "127.0.0.0/8"):
    clock, refused = Clock(), []
    factory = ProxyProtocolFactory(Factory.forProtocol(Inner),
                                   lambda: ProxyProtocolSettings((ipaddress.ip_network(listed),), 5.0),
                                   clock, refused.append)
    peer = IPv4Address("TCP", source, 5000)
    reader = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    reader.makeConnection(transport)
    return reader, transport, clock, refused


def test_a_header_split_across_segments_is_waited_for_then_the_connection_handed_over():
    reader, transport, clock, refused = reader_from("127.0.0.1")
    header = v2_tcp4("203.0.113.9")
    reader.dataReceived(header[:7])  # shorter than the signature, as a slow balancer may send
    reader.dataReceived(header[7:20])
    assert not hasattr(transport, "protocol"), "nothing handed over yet"
    reader.dataReceived(header[20:] + b"GET /")
    inner = transport.protocol
    assert isinstance(inner, Inner) and inner.peer == IPv4Address("TCP", "203.0.113.9", 40000)
    assert inner.data == b"GET /"
    clock.advance(10)
    assert refused == [] and not transport.disconnecting, "the header's deadline was cancelled"


def test_a_listed_source_that_sends_no_header_in_time_is_cut():
    reader, transport, clock, refused = reader_from("127.0.0.1")
    reader.dataReceived(b"PROXY TCP4 ")
    clock.advance(5)
    assert refused == ["timeout"] and transport.disconnecting


def test_an_unlisted_source_is_its_own_client_from_its_first_byte():
    reader, transport, clock, refused = reader_from("192.0.2.7")
    reader.dataReceived(b"G")  # cannot begin a header: handed over at once
    assert transport.protocol.peer == IPv4Address("TCP", "192.0.2.7", 5000)
    assert transport.protocol.data == b"G" and refused == []


# ---------------------------------------------------------------------------
# The running proxy


def proxy_with(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn,
               sources: list[str]) -> ProxyProcess:
    return start_proxy(tmp_path_factory.mktemp("proxyprotocol"), {
        "proxy_protocol": {"from": sources, "timeout": "1s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    })


@pytest.fixture(scope="module")
def behind_balancer(tmp_path_factory, ca, upstream) -> Iterator[ProxyProcess]:
    """Loopback is the balancer: every client must send a header."""
    running = proxy_with(tmp_path_factory, ca, upstream, ["127.0.0.0/8"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def balancer_elsewhere(tmp_path_factory, ca, upstream) -> Iterator[ProxyProcess]:
    """The balancer is 10.0.0.0/8: a loopback client is an ordinary client."""
    running = proxy_with(tmp_path_factory, ca, upstream, ["10.0.0.0/8"])
    yield running
    running.stop()


def exchange(proxy: ProxyProcess, header: bytes, path: str, tls: bool) -> int | None:
    """Send ``header`` (if any) and a GET for ``path``; the status, or None if the proxy
    closed the connection without an answer."""
    sock = socket.create_connection((LOOPBACK, proxy.https_port if tls else proxy.http_port), timeout=5)
    try:
        sock.sendall(header)
        if tls:
            sock = TLS(TRACK, proxy.certificate_path(TRACK)).context().wrap_socket(sock, server_hostname=TRACK)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {TRACK}\r\nConnection: close\r\n\r\n".encode())
        answer = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        answer.begin()
        return answer.status
    except (ConnectionError, ssl.SSLError, http.client.RemoteDisconnected, OSError):
        return None
    finally:
        sock.close()


def path() -> str:
    return f"/f/{uuid.uuid4().hex}"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("header", [V1, v2_tcp4("203.0.113.9")], ids=["v1", "v2"])
def test_the_header_s_client_is_who_the_platform_hears_of(behind_balancer, upstream, header, tls):
    p = path()
    assert exchange(behind_balancer, header, p, tls) == 302
    assert upstream.only(p).header("X-Forwarded-For") == "203.0.113.9"


def test_a_balancer_health_check_local_keeps_the_socket_peer(behind_balancer, upstream):
    p = path()
    assert exchange(behind_balancer, v2(0, 0x00, b""), p, tls=False) == 302
    assert upstream.only(p).header("X-Forwarded-For") == LOOPBACK


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_no_header_from_the_balancer_is_refused_and_nothing_forwarded(behind_balancer, upstream, tls):
    before = scrape(behind_balancer.admin_port).total("trackproxy_proxy_protocol_refusals_total", reason="missing")
    p = path()
    assert exchange(behind_balancer, b"", p, tls) is None
    assert upstream.matching(p) == []
    assert poll(lambda: scrape(behind_balancer.admin_port).total(
        "trackproxy_proxy_protocol_refusals_total", reason="missing") == before + 1, 5, "the refusal counted")


def test_a_balancer_that_sends_nothing_is_cut_at_the_timeout(behind_balancer):
    with socket.create_connection((LOOPBACK, behind_balancer.http_port), timeout=10) as sock:
        try:
            said = sock.recv(1)
        except ConnectionResetError:
            said = b""
        assert said == b"", "closed without a word"
    assert scrape(behind_balancer.admin_port).total("trackproxy_proxy_protocol_refusals_total", reason="timeout") >= 1


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_header_from_an_unlisted_source_is_refused(balancer_elsewhere, upstream, tls):
    p = path()
    assert exchange(balancer_elsewhere, V1, p, tls) is None
    assert upstream.matching(p) == []
    assert scrape(balancer_elsewhere.admin_port).total(
        "trackproxy_proxy_protocol_refusals_total", reason="unlisted_source") >= 1


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_an_ordinary_client_of_an_unlisted_source_is_served_as_itself(balancer_elsewhere, upstream, tls):
    p = path()
    assert exchange(balancer_elsewhere, b"", p, tls) == 302
    assert upstream.only(p).header("X-Forwarded-For") == LOOPBACK


def test_without_proxy_protocol_the_metric_is_not_even_there(tmp_path, ca, upstream):
    proxy = start_proxy(tmp_path / "plain", {
        "defaults": {"certificate": "self-signed"},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    })
    try:
        assert exchange(proxy, V1, path(), tls=False) == 400, "a PROXY line is just a bad request then"
        assert "trackproxy_proxy_protocol" not in scrape(proxy.admin_port).text
    finally:
        proxy.stop()
