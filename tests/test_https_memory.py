"""The HTTPS listener stack and an upstream TLS exchange, in memory (``iosim``): real TLS,
real certificates, no sockets, Twisted's ``MemoryReactorClock`` for time and connections.

What the end-to-end tests check on loopback sockets, checked here without them: SNI picks
the certificate, a name not served is refused and counted, a request goes through TLS,
the router and the upstream client and its answer comes back; the upstream client asks
for the platform's name (SNI) and refuses a certificate for another name.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from proxy.config import Upstream, parse_config
from proxy.frontend import Frontend
from proxy.service import new_metrics, utc_now
from proxy.testing import LocalCA, MemoryUpstream, RecordingProtocol, connect_in_memory, tls_client
from proxy.tls import CountingTLSFactory, ServerTLS, load_pair
from proxy.upstream import UpstreamClient, UpstreamError

TRACK = "track.example.com"
ANSWER = b"HTTP/1.1 302 Found\r\nServer: msys-http\r\nLocation: https://l.example/\r\nContent-Length: 5\r\n\r\nmoved"
result_of = SynchronousTestCase().successResultOf
failure_of = SynchronousTestCase().failureResultOf

CONFIG = """\
state_dir: {state}
upstreams:
  platform: {{url: "http://platform.example", connect_to: "127.0.0.1:8080"}}
domains:
  {track}:
    upstream: platform
    certificate: {{cert: {cert}, key: {key}}}
"""


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA(tmp_path / "ca")


@pytest.fixture
def frontend(tmp_path: Path, ca: LocalCA) -> tuple[Frontend, MemoryReactorClock]:
    cert, key = ca.issue(TRACK)
    text = CONFIG.format(state=tmp_path / "state", track=TRACK, cert=cert, key=key)
    reactor = MemoryReactorClock()
    return Frontend(reactor, parse_config(text, str(tmp_path / "t.yaml")), new_metrics(), utc_now, b"k" * 32,
                    out=io.StringIO()), reactor


def counted(frontend: Frontend, name: str, **labels: str) -> float:
    from prometheus_client import generate_latest

    text = generate_latest(frontend.metrics.registry).decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_request_over_tls_goes_through_the_stack_to_the_platform_and_back(frontend, ca):
    proxy, reactor = frontend
    client = RecordingProtocol(send=f"GET /f/abc HTTP/1.1\r\nHost: {TRACK}\r\nConnection: close\r\n\r\n".encode())
    server = proxy.factory_for("https").buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    pump = connect_in_memory(server, tls_client(TRACK, ca, client, reactor), reactor, peer=("192.0.2.7", 40000))
    pump.flush()

    platform = MemoryUpstream(reactor)
    assert platform.attempts == 1 and platform.address() == ("127.0.0.1", 8080, 5.0)
    upstream, sent = platform.accept()
    head = sent.value()
    assert head.startswith(b"GET /f/abc HTTP/1.1\r\n")
    assert f"Host: {TRACK}\r\n".encode() in head and b"X-Forwarded-For: 192.0.2.7\r\n" in head
    upstream.dataReceived(ANSWER)
    pump.flush()

    assert client.received.startswith(b"HTTP/1.1 302 Found\r\n"), client.received
    assert b"Server: msys-http\r\n" in client.received and client.received.endswith(b"moved")
    assert client.lost is not None, "Connection: close"


def test_a_server_name_not_served_is_refused_and_counted(frontend, ca):
    proxy, reactor = frontend
    client = RecordingProtocol(send=f"GET / HTTP/1.1\r\nHost: {TRACK}\r\n\r\n".encode())
    server = proxy.factory_for("https").buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    pump = connect_in_memory(server, tls_client("other.example.com", ca, client, reactor), reactor)
    pump.flush()
    assert client.received == b"" and client.lost is not None
    assert counted(proxy, "trackproxy_tls_handshake_failures_total", reason="unknown_sni") == 1
    assert MemoryUpstream(reactor).attempts == 0


def platform_tls(ca: LocalCA, name: str, certificate_for: str) -> tuple[CountingTLSFactory, list[RecordingProtocol]]:
    """A platform endpoint serving ``name`` with a certificate for ``certificate_for``
    (``ServerTLS`` refuses any other SNI), answering each request with ``ANSWER``."""
    cert, key = ca.issue(certificate_for)
    sni = ServerTLS()
    sni.set_contexts({name: load_pair(str(cert), str(key))})
    seen: list[RecordingProtocol] = []

    def answer_when_whole(protocol: RecordingProtocol) -> None:
        if protocol.received.endswith(b"\r\n\r\n"):
            protocol.transport.write(ANSWER)

    def make() -> RecordingProtocol:
        seen.append(RecordingProtocol(on_data=answer_when_whole))
        return seen[-1]

    return CountingTLSFactory(sni, Factory.forProtocol(make), lambda reason: None), seen


def test_the_upstream_client_asks_for_the_platforms_name_and_reads_its_answer(ca):
    reactor = MemoryReactorClock()
    upstream = Upstream("sparkpost", "https", "spgo.io", 443, connect_to=("127.0.0.1", 8443),
                        ca_file=str(ca.cert_path))
    client = UpstreamClient(reactor, upstream, connect_timeout=5, timeout=15)
    answered = client.fetch(b"GET", b"/f/a", [(b"Host", TRACK.encode()), (b"User-Agent", b"UA/1")], None)

    platform = MemoryUpstream(reactor)
    assert platform.address() == ("127.0.0.1", 8443, 5)
    factory, seen = platform_tls(ca, "spgo.io", "spgo.io")
    server = factory.buildProtocol(None)
    connect_in_memory(server, platform.protocol(), reactor).flush()

    assert server.server_name == "spgo.io", "SNI is the platform's name, not the tracking domain"
    assert seen[0].received.startswith(b"GET /f/a HTTP/1.1\r\n") and f"Host: {TRACK}".encode() in seen[0].received
    response = result_of(answered)
    assert (response.code, response.body) == (302, b"moved")


def test_the_upstream_client_refuses_a_certificate_for_another_name(ca):
    reactor = MemoryReactorClock()
    upstream = Upstream("sparkpost", "https", "spgo.io", 443, connect_to=("127.0.0.1", 8443),
                        ca_file=str(ca.cert_path))
    client = UpstreamClient(reactor, upstream, connect_timeout=5, timeout=15)
    answered = client.fetch(b"GET", b"/f/a", [(b"Host", TRACK.encode())], None)

    factory, seen = platform_tls(ca, "spgo.io", "impostor.example")
    connect_in_memory(factory.buildProtocol(None), MemoryUpstream(reactor).protocol(), reactor).flush()

    failure = failure_of(answered, UpstreamError)
    assert failure.value.outcome == "tls_error"
    assert all(protocol.received == b"" for protocol in seen), "no request to an unverified platform"
