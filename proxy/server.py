"""The HTTP/1.1 server side: one lean protocol per client connection, behind a small seam.

This module owns reading requests off a connection and writing answers back, under the
bounds a client must not be able to escape:

- parsing is llhttp's (through httptools), strict: CL together with TE, a final transfer
  coding other than ``chunked``, duplicate or malformed Content-Length, malformed chunk
  sizes, obs-fold, bare LF, NUL or CR in a field, whitespace before the colon are all
  refused with ``400`` and a closed connection (RFC 9112 §6.3, §11.2);
- a request head over ``max_header_bytes`` gets ``431``; a body over
  :data:`MAX_REQUEST_BODY` gets ``413`` as soon as its length is known;
- the head deadline (``client_timeout``) runs from the connection's first moment, and on
  keep-alive from the end of the previous answer, to the end of the request, however
  the bytes trickle in: ``408`` if part of a request came, a quiet close if none did;
- pipelined requests are answered one at a time, in order; reading pauses while too many
  wait, or while the client does not read its answers;
- after an error answer, or ``Connection: close``, the connection is closed at once
  (with TLS, after our close_notify, without waiting for the client's).

What is the same for every request of a connection (peer address, scheme, SNI) is read
once. The seam is :class:`IncomingRequest`: the handler (``forward.Router``) reads
method, target, headers and body from it and answers with :meth:`IncomingRequest.send`,
one ``write`` of a prepared head and body; it never sees the parser, and this module
never sees routing, caching or upstreams.

(Over 400 lines: one HTTP/1.1 connection's state machine (head deadline, limits,
pipelining, keep-alive, half-close, refusals) reads best in one place.)
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from proxy import http11
from proxy.tls import normalise_server_name

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, ITransport
    from twisted.python.failure import Failure

log = Logger(namespace="trackproxy.server")

#: Largest request body accepted (POST for Iterable's links is a few hundred bytes).
MAX_REQUEST_BODY = 1024 * 1024
#: Complete requests a connection may have waiting behind the one being answered
#: before reading pauses (pipelining is allowed, hoarding is not).
MAX_PIPELINED = 16
#: How long a closed connection may linger for the client to go away after our last
#: bytes (and close_notify) before it is cut.
LINGER = 2.0
#: Headers the seam picks out while parsing, so the handler never scans for them.
_HOST, _CONNECTION, _FORWARDED_FOR, _CONTENT_LENGTH = (
    b"host", b"connection", b"x-forwarded-for", b"content-length",
)


def _refusal(code: int, text: bytes) -> bytes:
    body = text + b"\n"
    return (
        http11.status_line(code)
        + b"Server: trackproxy\r\nContent-Type: text/plain; charset=utf-8\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )


BAD_REQUEST = _refusal(400, b"malformed request")
TOO_SLOW = _refusal(408, b"request head took too long")
TOO_LARGE_BODY = _refusal(413, b"request body too large")
TOO_LARGE_HEAD = _refusal(431, b"request header block too large")


def client_ip(host: str) -> str:
    """The peer address as it should appear in X-Forwarded-For (IPv4-mapped → IPv4)."""
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


class IncomingRequest:
    """One complete request, and the way to answer it (the seam).

    Attributes:
        method, target, version: as on the request line (``b"GET"``, ``b"/f/x?y"``,
            ``"1.1"``).
        headers: ``(name, value)`` pairs as received, names in their own case.
        hosts, forwarded_for, connection: the values of those headers (lists).
        head_size: bytes of the header lines (name, ``: ``, value, CRLF each).
        body: the request body (bounded by :data:`MAX_REQUEST_BODY`).
        peer, scheme, server_name: the connection's client address, ``b"http"`` or
            ``b"https"``, and the TLS SNI (normalised), read once per connection.
        started: when the request was complete (the factory's clock).
        domain_label, cache_label: set by the handler for metrics and the access log.
    """

    __slots__ = (
        "method", "target", "version", "headers", "hosts", "forwarded_for", "connection",
        "head_size", "body", "keep_alive", "peer", "scheme", "server_name", "started",
        "domain_label", "cache_label", "code", "sent", "_channel",
    )

    def __init__(self, channel: HTTPServerProtocol | None = None) -> None:
        self._channel = channel
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.hosts: list[bytes] = []
        self.forwarded_for: list[bytes] = []
        self.connection: list[bytes] = []
        self.head_size = 0
        self.body = b""
        self.keep_alive = True
        self.peer = ""
        self.scheme = b"http"
        self.server_name: str | None = None
        self.started = 0.0
        self.domain_label = "_unknown"
        self.cache_label = "bypass"
        self.code = 0
        self.sent = 0

    @property
    def is_head(self) -> bool:
        return self.method == b"HEAD"

    def send(self, code: int, head: bytes, body: bytes) -> None:
        """Answer with ``head`` (status line and header lines, each ending in CRLF,
        without ``Connection`` and without the blank line) and ``body`` (not sent for
        HEAD). Does nothing if the client has gone or an answer was sent."""
        channel = self._channel
        if self.code != 0 or channel is None or channel.current is not self:
            return
        self.code = code
        channel.answer(self, head, body)


#: Called with each request once its answer is written (metrics, access log).
Finished = Callable[[IncomingRequest], None]


@implementer(IPushProducer, IHalfCloseableProtocol)
class HTTPServerProtocol(Protocol):
    """One client connection (plain TCP, or inside ``tls.CountingTLSProtocol``)."""

    def __init__(self, factory: HTTPFactory) -> None:
        self.factory = factory
        self._parser: httptools.HttpRequestParser | _NoParser = httptools.HttpRequestParser(self)
        self._parsing: IncomingRequest | None = None
        self._queue: deque[IncomingRequest] = deque()
        self.current: IncomingRequest | None = None
        self._timer: IDelayedCall | None = None
        self._head_bytes = 0  # of the request being parsed, before its head completes
        self._in_head = False
        self._body_parts: list[bytes] = []
        self._body_size = 0
        self._refused: bytes | None = None  # set by a callback that stops parsing
        self._pending_refusal: bytes | None = None  # sent once the answers before it are
        self._closing = False
        self._writes_paused = False
        self._reading_paused = False
        self._close_after_current = False
        self._peer = ""
        self._server_name: str | None = None
        self._server_name_read = False
        self._producing = False  # registered as the transport's producer

    # ---------------------------------------------------------------- lifetime

    def connectionMade(self) -> None:
        self.factory.open_connections += 1
        self.factory.protocols.add(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self._peer = client_ip(getattr(peer, "host", "") or "")
        self._start_timer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.open_connections -= 1
        self.factory.protocols.discard(self)
        self.factory.idle.pop(self, None)
        self._cancel_timer()
        self._closing = True
        self.current = None
        self._queue.clear()

    # ---------------------------------------------------------------- timers

    def _start_timer(self) -> None:
        self._cancel_timer()
        if self.factory.client_timeout > 0:
            self._timer = self.factory.clock.callLater(self.factory.client_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing:
            # Lingering after our last answer: the client did not go away.
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self._parsing is not None or self._head_bytes:
            self._refuse(TOO_SLOW)
        else:
            self._close()  # idle keep-alive: nothing to say

    # ---------------------------------------------------------------- reading

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # lingering: what the client still sends is dropped
        if self._in_head or self._parsing is None:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade or CONNECT: the request itself is complete and gets its answer;
            # nothing after it is HTTP/1.1, so the connection ends there.
            self._close_after_current = True
            self._parser = _NoParser()
        except httptools.HttpParserCallbackError:
            self._refuse(self._refused or BAD_REQUEST)
        except httptools.HttpParserError:
            self._refuse(BAD_REQUEST)
        else:
            if self._in_head and self._head_bytes > self.factory.max_header_bytes + 4:
                # The head is not complete and already too large: no need to see the rest.
                self._refuse(TOO_LARGE_HEAD)
        self._dispatch()

    # httptools callbacks: each fills the request being parsed.

    def on_message_begin(self) -> None:
        self.factory.idle.pop(self, None)
        request = IncomingRequest(self)
        request.scheme = self.factory.scheme
        request.peer = self._peer
        self._parsing = request
        self._in_head = True
        self._body_parts = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        request: IncomingRequest = self._parsing  # type: ignore[assignment]  # set by on_message_begin
        request.target += url
        request.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        request: IncomingRequest = self._parsing  # type: ignore[assignment]  # (cast() costs a call)
        request.headers.append((name, value))
        request.head_size += len(name) + len(value) + 4
        lower = name.lower()
        if lower == _HOST:
            request.hosts.append(value)
        elif lower == _CONNECTION:
            request.connection.append(value)
        elif lower == _FORWARDED_FOR:
            request.forwarded_for.append(value)
        elif lower == _CONTENT_LENGTH and len(value) > 6 and value.isdigit() and int(value) > MAX_REQUEST_BODY:
            # llhttp has checked it is one number; past the bound there is nothing to wait for.
            self._refused = TOO_LARGE_BODY
            raise _Stop()

    def on_headers_complete(self) -> None:
        request: IncomingRequest = self._parsing  # type: ignore[assignment]  # (cast() costs a call)
        self._in_head = False
        self._head_bytes = 0
        if request.head_size > self.factory.max_header_bytes:
            self._refused = TOO_LARGE_HEAD
            raise _Stop()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_REQUEST_BODY:
            self._refused = TOO_LARGE_BODY
            raise _Stop()
        self._body_parts.append(body)

    def on_message_complete(self) -> None:
        request: IncomingRequest = self._parsing  # type: ignore[assignment]  # (cast() costs a call)
        self._parsing = None
        self._head_bytes = 0
        parser: httptools.HttpRequestParser = self._parser  # type: ignore[assignment]  # only the real one calls back
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        if self._body_parts:
            request.body = b"".join(self._body_parts)
            self._body_parts = []
        request.started = self.factory.clock.seconds()
        self._cancel_timer()
        self._queue.append(request)
        if len(self._queue) > MAX_PIPELINED and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    # ---------------------------------------------------------------- answering

    def _dispatch(self) -> None:
        """Hand queued requests to the handler, one at a time, in order."""
        while self.current is None and self._queue and not self._writes_paused and not self._closing:
            request = self._queue.popleft()
            if self.factory.scheme == b"https" and not self._server_name_read:
                self._server_name = _server_name_of(self.transport)
                self._server_name_read = True
            request.server_name = self._server_name
            self.current = request
            if self._reading_paused and len(self._queue) <= MAX_PIPELINED // 2:
                self._reading_paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            try:
                self.factory.handler(request)
            except Exception:
                log.failure("failed to handle a request")
                request.send(500, http11.status_line(500) + b"Content-Length: 0\r\n", b"")

    def answer(self, request: IncomingRequest, head: bytes, body: bytes) -> None:
        """Write ``request``'s answer (one write), then go on with the next one."""
        last = not self._queue and (self._close_after_current or self._pending_refusal is not None)
        close = (not request.keep_alive or self._closing or request.code in _CLOSING_CODES
                 or (last and self._pending_refusal is None) or self.factory.draining)
        if close:
            connection = b"Connection: close\r\n\r\n"
        elif request.version == "1.0":
            connection = b"Connection: keep-alive\r\n\r\n"
        else:
            connection = b"\r\n"
        if request.method == b"HEAD":
            body = b""
        self.transport.write(head + connection + body)  # type: ignore[union-attr]
        request.sent = len(body)
        self.current = None
        try:
            self.factory.finished(request)
        except Exception:
            log.failure("failed to count a request")
        if close:
            self._close()
            return
        if not self._producing:
            # A connection that stays for another request may pipeline many and not read
            # the answers: from now on the transport tells when its buffer is full. (A
            # connection's first answers are bounded by MAX_PIPELINED, and most
            # connections carry one click: they never pay for the registration.)
            self._producing = True
            self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        if not self._queue:
            if self._pending_refusal is not None:
                self.transport.write(self._pending_refusal)  # type: ignore[union-attr]
                self._close()
                return
            self._start_timer()  # keep-alive: the next request's deadline starts now
            if self._parsing is None:
                self.factory.idle[self] = None  # a candidate to close if the listener is full
        self._dispatch()

    def _refuse(self, answer: bytes) -> None:
        """An error answer for what the client sent, then close (no more parsing).

        Answers stay in order: requests that came whole before the bad bytes are
        answered first, then the error, then the connection ends.
        """
        if self._closing:
            return
        self._parser = _NoParser()
        self._parsing = None
        self._in_head = False
        if self.current is None and not self._queue:
            self.transport.write(answer)  # type: ignore[union-attr]
            self._close()
        else:
            self._pending_refusal = answer

    def _close(self) -> None:
        """Close now; linger briefly for the client to read and go away."""
        if self._closing and self._timer is not None:
            return
        self._closing = True
        self._queue.clear()
        self.factory.idle.pop(self, None)
        transport = self.transport
        if self._producing:
            self._producing = False
            transport.unregisterProducer()  # type: ignore[union-attr]
        transport.loseConnection()  # type: ignore[union-attr]
        self._cancel_timer()
        self._timer = self.factory.clock.callLater(LINGER, self._timed_out)

    def readConnectionLost(self) -> None:
        """The client is done sending (a TCP half-close, as ``nc -N`` does): what it sent
        whole is answered, then the connection ends."""
        if self._closing:
            return
        self._parser = _NoParser()
        self._parsing = None
        if self.current is None and not self._queue:
            self._close()
        else:
            self._close_after_current = True

    def writeConnectionLost(self) -> None:
        self._closing = True

    def drain(self) -> None:
        """Stopping: close now if idle, else once the answer under way is out."""
        if self.current is None and not self._queue:
            self._close()
        else:
            self._close_after_current = True

    # ---------------------------------------------------------------- IPushProducer (our writes)

    def pauseProducing(self) -> None:
        """The client does not read its answers: stop answering (and reading) for now."""
        self._writes_paused = True

    def resumeProducing(self) -> None:
        self._writes_paused = False
        self._dispatch()

    def stopProducing(self) -> None:
        self._closing = True


#: Answers after which the connection is closed: what the client sent cannot be trusted
#: to be framed as it says (or must not be read any further).
_CLOSING_CODES = frozenset({400, 408, 413, 431})


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; ``_refused`` says what to answer."""


class _NoParser:
    def feed_data(self, data: bytes) -> None:
        pass


def _server_name_of(transport: ITransport | None) -> str | None:
    known: str | None = getattr(transport, "server_name", None)
    if known is not None:
        return known  # what the server-name callback served the handshake for
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    get = getattr(connection, "get_servername", None)
    return normalise_server_name(get()) if get is not None else None


class HTTPFactory(Factory):
    """Builds :class:`HTTPServerProtocol` connections for one listener role.

    Args:
        handler: answers each request (``forward.Router.handle``); swapped on reload
            by assigning :attr:`handler`.
        scheme: ``b"http"`` or ``b"https"``.
        client_timeout: seconds for a request to arrive whole (and for keep-alive idle).
        max_header_bytes: the request head's bound (431 past it).
        clock: schedules the deadlines.
        finished: called with each answered request (metrics, access log).
        limit: open connections past which new ones are closed at once.
    """

    noisy = False

    def __init__(
        self,
        handler: Callable[[IncomingRequest], None],
        scheme: bytes,
        client_timeout: float,
        max_header_bytes: int,
        clock: IReactorTime,
        finished: Finished = lambda request: None,
        limit: int = 10_000,
    ) -> None:
        self.handler = handler
        self.scheme = scheme
        self.client_timeout = client_timeout
        self.max_header_bytes = max_header_bytes
        self.clock = clock
        self.finished = finished
        self.limit = limit
        self.open_connections = 0
        self.protocols: set[HTTPServerProtocol] = set()
        #: Kept-alive connections waiting for their next request, oldest first.
        self.idle: dict[HTTPServerProtocol, None] = {}
        self.draining = False

    def drain(self) -> None:
        """Close idle connections, and each busy one after its answer (shutdown)."""
        self.draining = True
        for protocol in list(self.protocols):
            protocol.drain()

    def cut(self) -> None:
        """Abort every connection still open (the drain took too long)."""
        for protocol in list(self.protocols):
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

    def at_limit(self) -> bool:
        """Whether a new connection must be refused. At the limit, the connection that
        has waited longest for its next request is closed to make room, as nginx does:
        a new client matters more than an idle one (only connections in the middle of a
        request, bounded by ``client_timeout``, make the listener refuse)."""
        if self.open_connections < self.limit:
            return False
        if self.idle:
            oldest = next(iter(self.idle))
            oldest._close()  # leaves self.idle at once; counted until its close completes
            return self.open_connections >= self.limit + len(self.protocols) // 100 + 16
        return True

    def buildProtocol(self, addr: IAddress | None) -> HTTPServerProtocol | None:
        if self.at_limit():
            return None
        return HTTPServerProtocol(self)
