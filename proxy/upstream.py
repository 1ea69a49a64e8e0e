"""Talking to one upstream: pooled HTTP/1.1 connections over TLS with SNI, deadlines, outcomes.

This module owns the client side of a forwarded request: which address is dialled
(``connect_to``, or the URL's host resolved once per pool generation, never a thread per
connection), how the upstream's certificate is verified (SNI and name = the upstream
host), how connections are kept and reused, how long an exchange may take, and how a
failure is named (``connect_error``, ``tls_error``, ``timeout``, ``reset``). What is sent
and what is relayed back is ``forward``'s business.

The pool keeps every connection that comes back idle (up to :data:`MAX_IDLE_CONNECTIONS`)
so that the next burst finds as many as the last one used, and it never reuses one older
than :data:`POOL_MAX_AGE` or from before the last :meth:`UpstreamClient.rotate`: platform
endpoints move (DNS-based load balancing), and new connections follow DNS. A request
goes out in one write; the answer is parsed by llhttp (httptools), strictly, and read
whole up to :data:`MAX_RESPONSE_BYTES`: tracking endpoints answer with redirects and
one-pixel images, and a complete answer is what the cache stores.

(Over 400 lines: the connection protocol, its pool and the address rotation share one
connection's life cycle (connecting, busy, idle, rotated out) and change together.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast
from typing import Protocol as TypingProtocol

import attrs
import httptools
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.config import Upstream
from proxy.http11 import connection_tokens
from proxy.tls import upstream_tls_options

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IConnector,
        IDelayedCall,
        IHostnameResolver,
        IHostResolution,
    )
    from twisted.internet.protocol import P

#: Largest upstream answer relayed; a tracking redirect or pixel is a few hundred bytes.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: Idle connections kept per upstream: as many as a burst used, up to this.
MAX_IDLE_CONNECTIONS = 512
#: Platform endpoints move (DNS-based load balancing); no connection lives longer
#: than about this, so new ones follow DNS.
POOL_MAX_AGE = 180.0
#: A connection idle this long is closed rather than reused. A server that closes an
#: idle connection sooner is seen doing so (the connection leaves the pool), and one
#: reused as it closes is retried once on a new connection; so idle connections are
#: kept as long as connections live, and a burst after a quiet minute finds them warm.
IDLE_TIMEOUT = POOL_MAX_AGE

OUTCOMES = ("ok", "connect_error", "tls_error", "timeout", "reset")


class UpstreamReactor(TypingProtocol):
    """What :class:`UpstreamClient` needs of its reactor: time (``IReactorTime``), TCP
    connections (``IReactorTCP``) and name resolution (``IReactorPluggableNameResolver``)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...

    def connectTCP(self, host: str, port: int, factory: ClientFactory[P], timeout: float = 30.0,
                   bindAddress: tuple[str, int] | None = None) -> IConnector: ...

    @property
    def nameResolver(self) -> IHostnameResolver: ...


class UpstreamError(Exception):
    """An exchange with an upstream failed; ``outcome`` names how."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail


@attrs.frozen
class UpstreamResponse:
    """A complete upstream answer: status, headers as received, body."""

    code: int
    phrase: bytes
    #: ``(name, value)`` pairs as received (names in their own case), hop-by-hop included.
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    #: The upstream's Content-Length (kept for HEAD, whose body is empty).
    length: int | None = None
    #: Header names the upstream's ``Connection`` header marked hop-by-hop.
    connection_tokens: frozenset[bytes] = frozenset()
    #: True for the answer to a HEAD (no body; ``length`` is the resource's).
    for_head: bool = False


def classify_failure(failure: Failure) -> str:
    """Name a connection's failure with one of :data:`OUTCOMES`."""
    exc = failure.value
    if isinstance(exc, (SSL.Error, VerificationError)):
        return "tls_error"
    if isinstance(exc, (error.ConnectionLost, error.ConnectionDone, error.ConnectionAborted)):
        return "reset"
    # A connection that could not be made in time is an unreachable upstream, like a
    # refused one; "timeout" is the exchange's own deadline (UpstreamClient).
    return "connect_error"


def _describe(failure: Failure) -> str:
    exc = failure.value
    if isinstance(exc, SSL.Error):
        try:
            return "; ".join(str(item[2]) for item in exc.args[0]) or str(exc)
        except (IndexError, TypeError):
            return str(exc)
    return failure.getErrorMessage() or type(exc).__name__


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Exchange:
    """One request on its way: the bytes to send, the deadline, the outcome."""

    __slots__ = ("request", "for_head", "retryable", "deferred", "timer", "connection", "connector",
                 "done", "attempts")

    def __init__(self, request: bytes, for_head: bool, retryable: bool) -> None:
        self.request = request
        self.for_head = for_head
        self.retryable = retryable
        self.deferred: defer.Deferred[UpstreamResponse] = defer.Deferred()
        self.timer: IDelayedCall | None = None
        self.connection: _Connection | None = None
        self.connector: IConnector | None = None
        self.done = False
        self.attempts = 0

    def succeed(self, response: UpstreamResponse) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        self.deferred.callback(response)

    def fail(self, outcome: str, detail: str) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        self.deferred.errback(UpstreamError(outcome, detail))

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """One connection to the upstream: one exchange at a time, answers parsed by llhttp."""

    def __init__(self, client: UpstreamClient, generation: int) -> None:
        self._client = client
        self.generation = generation
        self.created = client.clock.seconds()
        self.last_used = self.created
        self.exchange: _Exchange | None = None
        self.reused = False
        self.handshake_done = not client.tls
        self._parser: httptools.HttpResponseParser | None = None
        self._reset_response()
        self.open = False

    def _reset_response(self) -> None:
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._code = 0
        self._length: int | None = None
        self._headers_done = False
        self._received = False

    # ------------------------------------------------------------ exchange

    def start(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        exchange.connection = self
        exchange.attempts += 1
        self._reset_response()
        self._parser = httptools.HttpResponseParser(self)
        self.last_used = self._client.clock.seconds()
        self.transport.write(exchange.request)  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # ------------------------------------------------------------ Twisted

    def connectionMade(self) -> None:
        self.open = True
        exchange = self.exchange
        if exchange is not None and not exchange.done:
            self.start(exchange)  # TLS holds it until the handshake is done
        else:
            # Its exchange timed out while connecting: the next one can use it.
            self.exchange = None
            self._client._release(self)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None or self._parser is None:
            self.abort()  # bytes nobody asked for: the connection is not trustworthy
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail_exchange("reset", f"malformed answer: {e}")
            self.abort()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.open = False
        self._client._forget(self)
        exchange = self.exchange
        self.exchange = None
        if exchange is None or exchange.done:
            return
        if self._headers_done and self._length is None and not self._chunked():
            # Close-delimited body (RFC 9112 §6.3 rule 8): the end of the connection ends it.
            exchange.succeed(self._response(exchange))
            return
        if not self._received and self.reused and exchange.retryable and exchange.attempts < 2:
            # The server closed an idle pooled connection as we reused it: once more, new.
            self._client._connect(exchange)
            return
        exchange.fail(classify_failure(reason), _describe(reason))

    # ------------------------------------------------------------ httptools callbacks

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser: httptools.HttpResponseParser = self._parser  # type: ignore[assignment]  # the parser calling back
        self._code = parser.get_status_code()
        if 100 <= self._code < 200:
            return  # an interim answer (100 Continue): the final one follows
        self._headers_done = True
        for name, value in self._headers:
            if name.lower() == b"content-length" and value.strip().isdigit():
                self._length = int(value)
        if self._length is not None and self._length > MAX_RESPONSE_BYTES:
            self._fail_exchange("reset", f"response of {self._length} bytes is too large")
            self.abort()
            return
        exchange = self.exchange
        if exchange is not None and exchange.for_head:
            # llhttp cannot be told an answer is to HEAD (it would wait for the body):
            # the head is the whole answer, and the connection is not reused.
            exchange.succeed(self._response(exchange))
            self.exchange = None
            self._parser = None
            if self.transport is not None:
                self.transport.loseConnection()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_RESPONSE_BYTES:
            self._fail_exchange("reset", "response body is too large")
            self.abort()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if not self._headers_done:
            self._headers = []  # after a 1xx: the final answer's head starts afresh
            self._phrase = b""
            return
        exchange = self.exchange
        if exchange is None or self._parser is None:
            return
        keep_alive = self._parser.should_keep_alive()
        self.exchange = None
        exchange.connection = None
        response = self._response(exchange)
        if keep_alive:
            self._client._release(self)
        elif self.transport is not None:
            self.transport.loseConnection()
        exchange.succeed(response)

    # ------------------------------------------------------------ helpers

    def _chunked(self) -> bool:
        return any(n.lower() == b"transfer-encoding" for n, _ in self._headers)

    def _fail_exchange(self, outcome: str, detail: str) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.fail(outcome, detail)

    def _response(self, exchange: _Exchange) -> UpstreamResponse:
        tokens: frozenset[bytes] = frozenset()
        connection = [v for n, v in self._headers if n.lower() == b"connection"]
        if connection:
            tokens = connection_tokens(connection)
        return UpstreamResponse(
            code=self._code,
            phrase=self._phrase,
            headers=tuple(self._headers),
            body=b"".join(self._body),
            length=self._length,
            connection_tokens=tokens,
            for_head=exchange.for_head,
        )


class _ConnectionFactory(ClientFactory):
    """Makes the one connection an exchange is waiting for, and reports if it fails."""

    noisy = False

    def __init__(self, client: UpstreamClient, exchange: _Exchange) -> None:
        self._client = client
        self._exchange = exchange

    def buildProtocol(self, addr: IAddress | None) -> _Connection:
        connection = _Connection(self._client, self._client.generation)
        connection.exchange = self._exchange
        self._exchange.connection = connection
        self._client._opened(connection)
        return connection

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._exchange.fail(classify_failure(reason), _describe(reason))


class UpstreamClient:
    """Sends requests to one upstream over a pool of persistent connections.

    Args:
        reactor: provides TCP, name resolution and time (tests pass a fake).
        upstream: where to go and whom to trust.
        connect_timeout: seconds to establish a TCP connection.
        timeout: seconds for the whole exchange, connection included, first byte to last.
    """

    def __init__(
        self, reactor: UpstreamReactor, upstream: Upstream, connect_timeout: float, timeout: float
    ) -> None:
        self.upstream = upstream
        self.clock = reactor
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._dial_host, self._dial_port = upstream.dial
        self.tls = upstream.scheme == "https"
        self._tls_options = upstream_tls_options(upstream.host, upstream.ca_file) if self.tls else None
        self._addresses: list[str] = [self._dial_host] if _is_ip(self._dial_host) else []
        self._next_address = 0
        self._resolving: defer.Deferred[list[str]] | None = None
        self._waiting: list[_Exchange] = []  # for addresses
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self.generation = 0
        self._closed = False
        #: Connections opened since start.
        self.opened = 0

    # ------------------------------------------------------------ requests

    def fetch(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        """One exchange: fires with an :class:`UpstreamResponse` or fails with
        :class:`UpstreamError`. ``headers`` are sent as given (``Host`` among them)."""
        lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        if body:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        exchange = _Exchange(b"".join(lines), method == b"HEAD", method in (b"GET", b"HEAD") and not body)
        exchange.timer = self.clock.callLater(self._timeout, self._time_out, exchange)
        connection = self._take_idle()
        if connection is not None:
            connection.reused = True
            connection.start(exchange)
        else:
            self._connect(exchange)
        return exchange.deferred

    def _time_out(self, exchange: _Exchange) -> None:
        exchange.timer = None
        connection = exchange.connection
        exchange.fail("timeout", f"no complete answer within {self._timeout:g}s")
        if exchange in self._waiting:
            self._waiting.remove(exchange)
        if connection is not None:
            connection.exchange = None
            connection.abort()
        elif exchange.connector is not None:
            try:
                exchange.connector.stopConnecting()
            except RuntimeError:
                pass  # it had already ended

    # ------------------------------------------------------------ the pool

    def _take_idle(self) -> _Connection | None:
        now = self.clock.seconds()
        while self._idle:
            connection = self._idle.pop()
            if (connection.open and connection.generation == self.generation
                    and now - connection.created < POOL_MAX_AGE and now - connection.last_used < IDLE_TIMEOUT):
                return connection
            connection.transport.loseConnection()  # type: ignore[union-attr]
        return None

    def _release(self, connection: _Connection) -> None:
        """A connection whose exchange is complete: keep it for the next one, or close it."""
        now = self.clock.seconds()
        connection.last_used = now
        if (self._closed or connection.generation != self.generation
                or now - connection.created >= POOL_MAX_AGE or len(self._idle) >= MAX_IDLE_CONNECTIONS):
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._idle.append(connection)

    def _opened(self, connection: _Connection) -> None:
        self.opened += 1
        self._all.add(connection)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        try:
            self._idle.remove(connection)
        except ValueError:
            pass

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def _connect(self, exchange: _Exchange) -> None:
        if exchange.done:
            return
        exchange.connection = None
        if not self._addresses:
            self._waiting.append(exchange)
            self._resolve()
            return
        address = self._addresses[self._next_address % len(self._addresses)]
        self._next_address += 1
        factory: ClientFactory[Any] = _ConnectionFactory(self, exchange)
        if self._tls_options is not None:
            factory = TLSMemoryBIOFactory(self._tls_options, True, factory, clock=cast("IReactorTime", self._reactor))
        exchange.connector = self._reactor.connectTCP(
            address, self._dial_port, factory, timeout=self._connect_timeout
        )

    # ------------------------------------------------------------ addresses

    def _resolve(self) -> None:
        """Look the dial host up once (in the resolver's own way: a thread for the
        system's); every exchange waiting for it goes on when it answers."""
        if self._resolving is not None:
            return
        self._resolving = _resolve(self._reactor, self._dial_host)
        self._resolving.addBoth(self._resolved)

    def _resolved(self, outcome: list[str] | Failure) -> None:
        self._resolving = None
        waiting, self._waiting = self._waiting, []
        if isinstance(outcome, Failure) or not outcome:
            detail = outcome.getErrorMessage() if isinstance(outcome, Failure) else "no address"
            for exchange in waiting:
                exchange.fail("connect_error", f"cannot resolve {self._dial_host}: {detail}")
            return
        self._addresses = list(outcome)
        for exchange in waiting:
            self._connect(exchange)

    # ------------------------------------------------------------ lifetime

    def rotate(self) -> None:
        """Start a new generation: idle connections close now, busy ones when their
        exchange ends, and the dial host is looked up again for new ones."""
        self.generation += 1
        for connection in self._idle:
            connection.transport.loseConnection()  # type: ignore[union-attr]
        self._idle = []
        if not _is_ip(self._dial_host):
            self._addresses = []

    def close(self) -> defer.Deferred[None]:
        """Close idle connections and keep no more (shutdown, or an upstream a reload
        dropped); exchanges under way finish on theirs."""
        self._closed = True
        for connection in self._idle:
            connection.transport.loseConnection()  # type: ignore[union-attr]
        self._idle = []
        return defer.succeed(None)


def _resolve(reactor: UpstreamReactor, host: str) -> defer.Deferred[list[str]]:
    """``host``'s addresses through the reactor's name resolver."""
    from twisted.internet.interfaces import IResolutionReceiver

    found: list[str] = []
    done: defer.Deferred[list[str]] = defer.Deferred()

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution: IHostResolution) -> None:
            pass

        def addressResolved(self, address: IAddress) -> None:
            found.append(address.host)  # type: ignore[attr-defined]

        def resolutionComplete(self) -> None:
            if found:
                done.callback(list(dict.fromkeys(found)))
            else:
                done.errback(error.DNSLookupError(host))

    reactor.nameResolver.resolveHostName(Receiver(), host, 0)
    return done


def rotate_every(clock: IReactorTime, clients: Callable[[], list[UpstreamClient]]) -> LoopingCall:
    """Rotate every client's pool each :data:`POOL_MAX_AGE` seconds; returns the LoopingCall."""
    def rotate_all() -> None:
        for c in clients():
            c.rotate()

    loop = LoopingCall(rotate_all)
    loop.clock = clock
    loop.start(POOL_MAX_AGE, now=False)
    return loop
