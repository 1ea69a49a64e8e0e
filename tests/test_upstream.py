"""The upstream client in memory: one write per request, the pool, deadlines, outcomes.

``MemoryReactorClock`` records each connection attempt; the test plays the upstream by
connecting the client's protocol to a ``StringTransport`` and feeding it bytes. TLS,
SNI and certificate checks against real sockets are the end-to-end tests' business.
"""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy.config import Upstream
from proxy.testing import MemoryUpstream
from proxy.upstream import (
    IDLE_TIMEOUT,
    MAX_RESPONSE_BYTES,
    POOL_MAX_AGE,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    classify_failure,
    rotate_every,
)

PLAIN = Upstream("plain", "http", "platform.example", 80, connect_to=("127.0.0.1", 8080))
HEADERS = [(b"Host", b"track.example.com"), (b"User-Agent", b"UA/1")]
ANSWER = b"HTTP/1.1 302 Found\r\nServer: msys-http\r\nLocation: https://l.example/\r\nContent-Length: 5\r\n\r\nmoved"
result_of = SynchronousTestCase().successResultOf
failure_of = SynchronousTestCase().failureResultOf


class Upstreams(MemoryUpstream):
    """A client of the plain upstream on a fake reactor, and its connection attempts."""

    def __init__(self, timeout: float = 15.0) -> None:
        super().__init__()
        self.client = UpstreamClient(self.reactor, PLAIN, connect_timeout=5, timeout=timeout)

    def accept(self, index: int = -1) -> tuple[object, StringTransport]:
        assert self.address(index) == ("127.0.0.1", 8080, 5)
        return super().accept(index)


def get(upstreams: Upstreams, target: bytes = b"/f/a", method: bytes = b"GET", body: bytes | None = None):
    return upstreams.client.fetch(method, target, HEADERS, body)


def test_a_request_goes_out_in_one_write_and_the_answer_comes_back_whole():
    upstreams = Upstreams()
    d = get(upstreams, b"/f/a?b=1")
    protocol, transport = upstreams.accept()
    assert transport.value() == b"GET /f/a?b=1 HTTP/1.1\r\nHost: track.example.com\r\nUser-Agent: UA/1\r\n\r\n"
    protocol.dataReceived(ANSWER[:40])
    assert not d.called
    protocol.dataReceived(ANSWER[40:])
    response = result_of(d)
    assert isinstance(response, UpstreamResponse)
    assert (response.code, response.phrase, response.body, response.length) == (302, b"Found", b"moved", 5)
    assert response.headers[:2] == ((b"Server", b"msys-http"), (b"Location", b"https://l.example/"))
    assert upstreams.reactor.getDelayedCalls() == [], "the deadline is cancelled"


def test_a_body_gets_its_content_length():
    upstreams = Upstreams()
    get(upstreams, method=b"POST", body=b"abc")
    _, transport = upstreams.accept()
    assert transport.value().endswith(b"UA/1\r\nContent-Length: 3\r\n\r\nabc")


def test_a_kept_alive_connection_serves_the_next_request():
    upstreams = Upstreams()
    first = get(upstreams)
    protocol, transport = upstreams.accept()
    protocol.dataReceived(ANSWER)
    result_of(first)
    assert upstreams.client.idle_connections == 1
    transport.clear()
    second = get(upstreams, b"/f/b")
    assert upstreams.attempts == 1 and transport.value().startswith(b"GET /f/b ")
    protocol.dataReceived(ANSWER)
    assert result_of(second).code == 302


def test_every_connection_a_burst_used_is_kept_for_the_next_burst():
    upstreams = Upstreams()
    pending = [get(upstreams, b"/f/%d" % i) for i in range(20)]
    protocols = [upstreams.accept(i)[0] for i in range(20)]
    for protocol in protocols:
        protocol.dataReceived(ANSWER)
    assert all(result_of(d).code == 302 for d in pending)
    assert upstreams.client.idle_connections == 20
    again = [get(upstreams, b"/f/again/%d" % i) for i in range(20)]
    assert upstreams.attempts == 20, "no new connection for the second burst"
    assert all(not d.called for d in again)


def test_connection_close_is_not_reused():
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, transport = upstreams.accept()
    protocol.dataReceived(ANSWER.replace(b"Content-Length", b"Connection: close\r\nContent-Length"))
    assert result_of(d).code == 302
    assert transport.disconnecting and upstreams.client.idle_connections == 0


def test_a_close_delimited_body_ends_with_the_connection():
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npixel")
    assert not d.called
    protocol.connectionLost(Failure(error.ConnectionDone()))
    assert result_of(d).body == b"pixel"


def test_an_interim_100_answer_is_skipped():
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.dataReceived(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + ANSWER)
    response = result_of(d)
    assert response.code == 302 and all(name != b"X-Interim" for name, _ in response.headers)


def test_head_is_complete_at_the_end_of_the_head_and_the_connection_is_not_reused():
    upstreams = Upstreams()
    d = get(upstreams, method=b"HEAD")
    protocol, transport = upstreams.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 43\r\nContent-Type: image/gif\r\n\r\n")
    response = result_of(d)
    assert (response.code, response.length, response.body, response.for_head) == (200, 43, b"", True)
    assert transport.disconnecting and upstreams.client.idle_connections == 0


def test_no_complete_answer_within_the_deadline_is_a_timeout_and_the_connection_is_cut():
    upstreams = Upstreams(timeout=2)
    d = get(upstreams)
    protocol, transport = upstreams.accept()
    protocol.dataReceived(ANSWER[:30])
    upstreams.reactor.advance(2)
    failure = failure_of(d, UpstreamError)
    assert failure.value.outcome == "timeout"
    assert transport.disconnected, "aborted, not left to finish"
    protocol.connectionLost(Failure(error.ConnectionAborted()))
    assert upstreams.client.idle_connections == 0 and upstreams.reactor.getDelayedCalls() == []


def test_a_connection_still_being_made_at_the_deadline_is_stopped():
    upstreams = Upstreams(timeout=2)
    d = get(upstreams)
    connector = upstreams.reactor.connectors[-1]
    upstreams.reactor.advance(2)
    assert failure_of(d, UpstreamError).value.outcome == "timeout"
    assert connector.stoppedConnecting


def test_a_refused_connection_is_a_connect_error_with_the_reason():
    upstreams = Upstreams()
    d = get(upstreams)
    upstreams.refuse()
    failure = failure_of(d, UpstreamError)
    assert failure.value.outcome == "connect_error" and "refused" in failure.value.detail.lower()


def test_a_pooled_connection_the_server_closed_is_retried_once_on_a_new_one():
    upstreams = Upstreams()
    first = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.dataReceived(ANSWER)
    result_of(first)
    retried = get(upstreams, b"/f/again")
    protocol.connectionLost(Failure(error.ConnectionDone()))  # closed as it was reused
    assert not retried.called and upstreams.attempts == 2
    fresh, transport = upstreams.accept()
    assert transport.value().startswith(b"GET /f/again ")
    fresh.dataReceived(ANSWER)
    assert result_of(retried).code == 302


def test_a_reset_on_a_new_connection_is_not_retried():
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.connectionLost(Failure(error.ConnectionLost()))
    assert failure_of(d, UpstreamError).value.outcome == "reset" and upstreams.attempts == 1


@pytest.mark.parametrize(
    "answer",
    [b"garbage that is not HTTP\r\n\r\n", b"HTTP/1.1 302 Found\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"],
    ids=["garbage", "duplicate-length"],
)
def test_a_malformed_answer_is_a_reset(answer):
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.dataReceived(answer)
    assert failure_of(d, UpstreamError).value.outcome == "reset"


def test_an_answer_over_the_bound_is_refused_before_its_body():
    upstreams = Upstreams()
    d = get(upstreams)
    protocol, _ = upstreams.accept()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_RESPONSE_BYTES + 1))
    failure = failure_of(d, UpstreamError)
    assert failure.value.outcome == "reset" and "too large" in failure.value.detail


def test_connections_older_than_the_pool_age_or_idle_too_long_are_not_reused():
    for wait in {IDLE_TIMEOUT, POOL_MAX_AGE}:
        upstreams = Upstreams()
        first = get(upstreams)
        protocol, transport = upstreams.accept()
        protocol.dataReceived(ANSWER)
        result_of(first)
        upstreams.reactor.advance(wait)
        get(upstreams)
        assert upstreams.attempts == 2 and transport.disconnecting, wait


def test_rotation_closes_idle_connections_and_busy_ones_when_their_answer_is_in():
    upstreams = Upstreams()
    loop = rotate_every(upstreams.reactor, lambda: [upstreams.client])
    upstreams.reactor.advance(POOL_MAX_AGE - 5)
    idle, busy = get(upstreams, b"/f/idle"), get(upstreams, b"/f/busy")
    (idle_protocol, idle_transport), (busy_protocol, busy_transport) = upstreams.accept(0), upstreams.accept(1)
    idle_protocol.dataReceived(ANSWER)
    result_of(idle)
    upstreams.reactor.advance(5)  # the rotation
    assert idle_transport.disconnecting and upstreams.client.idle_connections == 0
    busy_protocol.dataReceived(ANSWER)
    assert result_of(busy).code == 302
    assert busy_transport.disconnecting, "a connection from before the rotation is not kept"
    get(upstreams, b"/f/after")
    assert upstreams.attempts == 3
    loop.stop()


@pytest.mark.parametrize(
    "exc, outcome",
    [
        (error.ConnectionRefusedError(), "connect_error"),
        (error.DNSLookupError("x"), "connect_error"),
        (error.TimeoutError(), "connect_error"),  # could not connect in time: unreachable
        (SSL.Error([("SSL routines", "", "certificate verify failed")]), "tls_error"),
        (VerificationError([]), "tls_error"),
        (error.ConnectionLost(), "reset"),
        (error.ConnectionDone(), "reset"),
    ],
)
def test_upstream_failures_are_named(exc, outcome):
    assert classify_failure(Failure(exc)) == outcome
