"""The HTTP/1.1 server protocol behind the seam, in memory: framing, order, bounds, time.

A handler records each :class:`IncomingRequest` and answers it (at once, or when the
test says); ``StringTransport`` is the client's connection and ``Clock`` the time.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.server import MAX_PIPELINED, MAX_REQUEST_BODY, HTTPFactory, IncomingRequest

TIMEOUT = 30.0


class Handler:
    """Answers ``200`` with the target as the body, at once or when released."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.seen: list[IncomingRequest] = []
        self.finished: list[IncomingRequest] = []

    def __call__(self, request: IncomingRequest) -> None:
        self.seen.append(request)
        if not self.hold:
            self.answer(request)

    @staticmethod
    def answer(request: IncomingRequest, code: int = 200) -> None:
        body = request.target
        request.send(code, b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n" % (code, len(body)), body)


def connection(handler: Handler, max_header_bytes: int = 2048):
    clock = Clock()
    factory = HTTPFactory(handler, b"http", TIMEOUT, max_header_bytes, clock, handler.finished.append)
    protocol = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    return protocol, transport, clock, factory


def statuses(raw: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", raw)]


GET = b"GET /%s HTTP/1.1\r\nHost: t.example\r\n\r\n"


def test_the_seam_carries_what_the_handler_needs_read_once():
    handler = Handler()
    protocol, _, _, _ = connection(handler)
    protocol.dataReceived(
        b"GET /f/a?b=1 HTTP/1.1\r\nHost: t.example\r\nUser-Agent: UA\r\nConnection: keep-alive, X-A\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    request = handler.seen[0]
    assert (request.method, request.target, request.version, request.peer, request.scheme) == (
        b"GET", b"/f/a?b=1", "1.1", "192.0.2.7", b"http")
    assert request.hosts == [b"t.example"] and request.forwarded_for == [b"6.6.6.6"]
    assert request.connection == [b"keep-alive, X-A"]
    assert request.headers[1] == (b"User-Agent", b"UA")
    assert handler.finished == [request] and request.code == 200 and request.sent == len(b"/f/a?b=1")


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    handler = Handler(hold=True)
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(GET % b"1" + GET % b"2" + GET % b"3")
    assert [r.target for r in handler.seen] == [b"/1"], "the next waits for this answer"
    Handler.answer(handler.seen[0])
    assert [r.target for r in handler.seen] == [b"/1", b"/2"]
    Handler.answer(handler.seen[1])
    Handler.answer(handler.seen[2])
    assert re.findall(rb"\r\n\r\n(/[0-9])", transport.value()) == [b"/1", b"/2", b"/3"]
    assert not transport.disconnecting


def test_an_answer_out_of_turn_or_twice_is_not_written():
    handler = Handler(hold=True)
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(GET % b"1")
    request = handler.seen[0]
    Handler.answer(request)
    Handler.answer(request)
    assert statuses(transport.value()) == [200]


def test_too_many_pipelined_requests_pause_reading_until_answered():
    handler = Handler(hold=True)
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived((GET % b"x") * (MAX_PIPELINED + 2))
    assert transport.producerState == "paused"
    for _ in range(MAX_PIPELINED // 2 + 2):
        Handler.answer(handler.seen[-1])
    assert transport.producerState == "producing"


def test_a_client_that_does_not_read_gets_no_more_answers_until_it_does():
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.pauseProducing()  # the transport's buffer is full
    protocol.dataReceived(GET % b"1" + GET % b"2")
    assert handler.seen == []
    protocol.resumeProducing()
    assert [r.target for r in handler.seen] == [b"/1", b"/2"]


@pytest.mark.parametrize(
    "request_, keep_alive, connection_header",
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", True, None),
        (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", False, b"close"),
        (b"GET / HTTP/1.0\r\nHost: t\r\n\r\n", False, b"close"),
        (b"GET / HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n", True, b"keep-alive"),
    ],
    ids=["1.1", "1.1-close", "1.0", "1.0-keep-alive"],
)
def test_keep_alive_follows_rfc_9112(request_, keep_alive, connection_header):
    protocol, transport, _, _ = connection(Handler())
    protocol.dataReceived(request_)
    head = transport.value().split(b"\r\n\r\n", 1)[0]
    found = re.search(rb"\r\nConnection: ([a-z-]+)", head)
    assert (found.group(1) if found else None) == connection_header
    assert transport.disconnecting is not keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: t\n\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Cr: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3;\nx\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: t\r\n\r\n",
    ],
    ids=["cl-te", "te-cl", "te-identity", "te-chunked-identity", "te-twice", "te-gzip", "cl-twice",
         "cl-signed", "cl-list", "obs-fold", "bare-lf", "nul", "cr", "space-before-colon", "chunk-size",
         "chunk-overflow", "chunk-ext-lf", "http-1.2"],
)
def test_ambiguous_or_invalid_framing_gets_400_closed_and_never_reaches_the_handler(raw):
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(raw)
    assert statuses(transport.value()) == [400], transport.value()
    assert transport.disconnecting and handler.seen == []


def test_a_body_over_the_bound_gets_413_before_it_is_sent():
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n")
    assert statuses(transport.value()) == [413] and transport.disconnecting and handler.seen == []


def test_a_chunked_body_over_the_bound_gets_413():
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    for _ in range(MAX_REQUEST_BODY // (64 * 1024) + 1):
        protocol.dataReceived(chunk)
    assert statuses(transport.value()) == [413] and handler.seen == []


def test_a_body_within_the_bound_is_delivered_whole():
    handler = Handler()
    protocol, _, _, _ = connection(handler)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert handler.seen[0].body == b"abcde"


@pytest.mark.parametrize("complete", [True, False], ids=["complete-head", "unfinished-head"])
def test_a_head_over_max_header_bytes_gets_431(complete):
    handler = Handler()
    protocol, transport, _, _ = connection(handler, max_header_bytes=2048)
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000
    protocol.dataReceived(head + (b"\r\n\r\n" if complete else b""))
    assert statuses(transport.value()) == [431] and transport.disconnecting and handler.seen == []


def test_a_request_line_dripped_without_crlf_gets_408_at_the_deadline():
    handler = Handler()
    protocol, transport, clock, _ = connection(handler)
    for byte in b"GET /aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa":
        clock.advance(0.9)
        protocol.dataReceived(bytes([byte]))
        if clock.seconds() >= TIMEOUT:
            break
    clock.advance(TIMEOUT)
    assert statuses(transport.value()) == [408] and transport.disconnecting


def test_an_idle_connection_is_closed_quietly_at_the_deadline():
    protocol, transport, clock, _ = connection(Handler())
    clock.advance(TIMEOUT - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.value() == b"" and transport.disconnecting


def test_on_keep_alive_the_deadline_runs_from_the_end_of_the_previous_answer():
    handler = Handler(hold=True)
    protocol, transport, clock, _ = connection(handler)
    protocol.dataReceived(GET % b"1")
    clock.advance(TIMEOUT * 3)  # no deadline while the handler works
    assert not transport.disconnecting
    Handler.answer(handler.seen[0])
    protocol.dataReceived(b"GET /2 HTTP/1.1\r\n")
    clock.advance(TIMEOUT - 0.1)
    assert statuses(transport.value()) == [200]
    clock.advance(0.1)
    assert statuses(transport.value()) == [200, 408] and transport.disconnecting


def test_a_closed_connection_that_lingers_is_cut():
    protocol, transport, clock, _ = connection(Handler())
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting and not transport.disconnected
    clock.advance(10)
    assert transport.disconnected


def test_head_answers_carry_no_body():
    protocol, transport, _, _ = connection(Handler())
    protocol.dataReceived(b"HEAD /abc HTTP/1.1\r\nHost: t\r\n\r\n")
    assert transport.value().endswith(b"Content-Length: 4\r\n\r\n")


def test_an_upgrade_request_is_answered_and_the_connection_ends():
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello")
    assert statuses(transport.value()) == [200] and transport.disconnecting and len(handler.seen) == 1


def test_an_error_behind_a_request_under_way_waits_for_its_answer():
    handler = Handler(hold=True)
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(GET % b"1" + b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b""
    Handler.answer(handler.seen[0])
    assert statuses(transport.value()) == [200, 400] and transport.disconnecting
    assert len(handler.seen) == 1


def test_requests_whole_before_bad_bytes_are_answered_before_the_error():
    handler = Handler()
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(GET % b"1" + GET % b"2" + b"GET / HTTP/1.1\nHost: t\n\n" + GET % b"never")
    assert [r.target for r in handler.seen] == [b"/1", b"/2"]
    assert statuses(transport.value()) == [200, 200, 400] and transport.disconnecting
    head_of_last_good = transport.value().split(b"HTTP/1.1 400")[0]
    assert b"Connection: close" not in head_of_last_good


def test_a_kept_alive_connection_registers_for_back_pressure_after_its_first_answer():
    protocol, transport, _, _ = connection(Handler())
    protocol.dataReceived(GET % b"1")
    assert transport.producer is protocol and transport.streaming
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert transport.producer is None, "unregistered before closing"


def test_at_the_limit_the_longest_idle_connection_makes_room_for_a_new_one():
    handler = Handler()
    clock = Clock()
    factory = HTTPFactory(handler, b"http", TIMEOUT, 2048, clock, limit=3)
    opened = []
    for _ in range(3):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        opened.append((protocol, transport))
    opened[0][0].dataReceived(GET % b"1")  # now idle on keep-alive, the oldest to be so
    opened[1][0].dataReceived(GET % b"2")
    opened[2][0].dataReceived(b"GET /3 HTTP/1.1\r\n")  # in the middle of a request
    assert factory.buildProtocol(None) is not None, "room was made"
    assert opened[0][1].disconnecting and not opened[1][1].disconnecting and not opened[2][1].disconnecting


def test_at_the_limit_with_no_idle_connection_new_ones_are_refused():
    factory = HTTPFactory(Handler(hold=True), b"http", TIMEOUT, 2048, Clock(), limit=2)
    for _ in range(2):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(GET % b"busy")
    assert factory.buildProtocol(None) is None


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer():
    handler = Handler(hold=True)
    protocol, transport, _, _ = connection(handler)
    protocol.dataReceived(GET % b"1" + GET % b"2")
    protocol.readConnectionLost()
    assert not transport.disconnecting, "answers are owed"
    Handler.answer(handler.seen[0])
    Handler.answer(handler.seen[1])
    assert statuses(transport.value()) == [200, 200] and transport.disconnecting
