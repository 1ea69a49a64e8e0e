"""Talking to one upstream: pooled TLS connections with SNI, deadlines, and outcomes.

This module owns the client side of a forwarded request: which address is dialled
(``connect_to`` or the URL's host, re-resolved whenever a connection is replaced),
how the upstream's certificate is verified (SNI and name = the upstream host), how
long an exchange may take, and how a failure is named (``connect_error``,
``tls_error``, ``timeout``, ``reset``). What is sent and what is relayed back is
``forward``'s business.

Responses are read whole, up to :data:`MAX_RESPONSE_BYTES`: tracking endpoints answer
with redirects and one-pixel images, and a complete answer is what the cache stores.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from OpenSSL import SSL
from service_identity.exceptions import VerificationError
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from proxy.config import Upstream
from proxy.tls import upstream_tls_options

#: Largest upstream answer relayed; a tracking redirect or pixel is a few hundred bytes.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
#: Idle connections kept per upstream for the next burst.
MAX_IDLE_CONNECTIONS = 16
#: Platform endpoints move (DNS-based load balancing); no connection lives longer
#: than about this, so new ones follow DNS.
POOL_MAX_AGE = 180.0

OUTCOMES = ("ok", "connect_error", "tls_error", "timeout", "reset")


class UpstreamError(Exception):
    """An exchange with an upstream failed; ``outcome`` names how."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(f"{outcome}: {detail}")
        self.outcome = outcome
        self.detail = detail


@attrs.frozen
class UpstreamResponse:
    """A complete upstream answer: status, end-to-end headers, body."""

    code: int
    phrase: bytes
    headers: tuple[tuple[bytes, tuple[bytes, ...]], ...]
    body: bytes
    #: The upstream's Content-Length (kept for HEAD, whose body is empty).
    length: int | None = None
    #: Header names the upstream's ``Connection`` header marked hop-by-hop.
    connection_tokens: frozenset[bytes] = frozenset()
    #: True for the answer to a HEAD (no body; ``length`` is the resource's).
    for_head: bool = False


class _ParserKeepingConnectionHeaders(_newclient.HTTPClientParser):
    """Twisted's response parser, also exposing the connection-control headers.

    Twisted files ``Connection`` and ``Content-Length`` away from ``Response.headers``.
    A proxy needs both: the headers ``Connection`` names are hop-by-hop and must be
    dropped (RFC 9110 §7.6.1), and a HEAD answer's Content-Length must be relayed.
    """

    def allHeadersReceived(self) -> None:
        self.response._trackproxy_conn_headers = self.connHeaders
        super().allHeadersReceived()


# HTTP11ClientProtocol builds its parser through this module-level name.
_newclient.HTTPClientParser = _ParserKeepingConnectionHeaders


def connection_tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """The lower-cased header names listed in ``Connection`` values."""
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


@implementer(IAgentEndpointFactory)
class _FixedEndpoints:
    """Every URI of one upstream goes to the same endpoint (``connect_to`` aware)."""

    def __init__(self, endpoint: object) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> object:
        return self._endpoint


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" log line per upstream connection is noise


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietClientFactory


def classify_failure(failure: Failure) -> str:
    """Name an upstream failure with one of :data:`OUTCOMES`."""
    exc = failure.value
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed)):
        for reason in exc.reasons:
            if reason.check(SSL.Error, VerificationError):
                return "tls_error"
        for reason in exc.reasons:
            if reason.check(defer.CancelledError, error.TimeoutError):
                return "timeout"
        return "reset"
    if isinstance(exc, (SSL.Error, VerificationError)):
        return "tls_error"
    if isinstance(exc, (error.ConnectionLost, error.ConnectionDone)):
        return "reset"
    return "connect_error"


class UpstreamClient:
    """Sends requests to one upstream over a pool of persistent connections.

    Args:
        reactor: provides TCP, name resolution and time (tests pass a fake).
        upstream: where to go and whom to trust.
        connect_timeout: seconds to establish a connection.
        timeout: seconds for the whole exchange, first byte to last.
    """

    def __init__(
        self, reactor: IReactorTime, upstream: Upstream, connect_timeout: float, timeout: float
    ) -> None:
        self.upstream = upstream
        self._reactor = reactor
        self._timeout = timeout
        host, port = upstream.dial
        endpoint: object = HostnameEndpoint(reactor, host, port, timeout=connect_timeout)
        if upstream.scheme == "https":
            endpoint = wrapClientTLS(upstream_tls_options(upstream.host, upstream.ca_file), endpoint)
        self._endpoints = _FixedEndpoints(endpoint)
        self._base_url = upstream.origin.encode("ascii")
        self._pool, self._agent = self._new_agent()

    def _new_agent(self) -> tuple[HTTPConnectionPool, Agent]:
        pool = _QuietPool(self._reactor, persistent=True)
        pool.maxPersistentPerHost = MAX_IDLE_CONNECTIONS
        pool.cachedConnectionTimeout = POOL_MAX_AGE
        pool.retryAutomatically = True
        return pool, Agent.usingEndpointFactory(self._reactor, self._endpoints, pool=pool)

    def rotate(self) -> None:
        """Start a new pool; the old one closes its connections as they come back.

        Called every few minutes so that no connection is older than that and a new
        connection re-resolves the upstream's name.
        """
        old = self._pool
        self._pool, self._agent = self._new_agent()
        old.cachedConnectionTimeout = 0
        old.closeCachedConnections()

    def close(self) -> defer.Deferred:
        """Close idle connections (at shutdown, or when a reload drops this upstream)."""
        self._pool.cachedConnectionTimeout = 0
        return self._pool.closeCachedConnections()

    def fetch(
        self, method: bytes, path_and_query: bytes, headers: Headers, body: bytes | None
    ) -> defer.Deferred[UpstreamResponse]:
        """One exchange: fires with an :class:`UpstreamResponse` or fails with
        :class:`UpstreamError`."""
        producer = _BytesProducer(body) if body else None
        exchange = _Exchange(self._reactor, self._timeout, for_head=method == b"HEAD")
        return exchange.start(
            self._agent.request(method, self._base_url + path_and_query, headers, producer)
        )


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory (FileBodyProducer would spin a cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: object) -> defer.Deferred:
        consumer.write(self._body)  # type: ignore[attr-defined]
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Exchange:
    """One request/response with a deadline over both phases (head and body)."""

    def __init__(self, clock: IReactorTime, timeout: float, for_head: bool = False) -> None:
        self._clock = clock
        self._timeout = timeout
        self.for_head = for_head
        self._done: defer.Deferred[UpstreamResponse] = defer.Deferred()
        self._request: defer.Deferred | None = None
        self._collector: _BodyCollector | None = None
        self._finished = False
        self._timer = None

    def start(self, request: defer.Deferred) -> defer.Deferred[UpstreamResponse]:
        self._request = request
        self._timer = self._clock.callLater(self._timeout, self._time_out)
        request.addCallbacks(self._got_response, self._request_failed)
        return self._done

    def _got_response(self, response: object) -> None:
        self._request = None
        if self._finished:
            return
        length = response.length  # type: ignore[attr-defined]
        if length is not UNKNOWN_LENGTH and length > MAX_RESPONSE_BYTES:
            response.deliverBody(_Discard())  # type: ignore[attr-defined]
            self._fail(UpstreamError("reset", f"response of {length} bytes is too large"))
            return
        self._collector = _BodyCollector(self, response)
        response.deliverBody(self._collector)  # type: ignore[attr-defined]

    def _request_failed(self, failure: Failure) -> None:
        self._request = None
        if not self._finished:
            self._fail(UpstreamError(classify_failure(failure), failure.getErrorMessage()))

    def _time_out(self) -> None:
        self._timer = None
        error_ = UpstreamError("timeout", f"no complete answer within {self._timeout:g}s")
        self._fail(error_)
        if self._request is not None:
            self._request.cancel()
        if self._collector is not None:
            self._collector.abort()

    def body_done(self, response: UpstreamResponse) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        self._done.callback(response)

    def _fail(self, exc: UpstreamError) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        self._done.errback(exc)

    body_failed = _fail

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class _BodyCollector(Protocol):
    """Gathers a response body, bounded by :data:`MAX_RESPONSE_BYTES`."""

    def __init__(self, exchange: _Exchange, response: object) -> None:
        self._exchange = exchange
        self._response = response
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_RESPONSE_BYTES:
            self._exchange.body_failed(UpstreamError("reset", "response body is too large"))
            self.abort()
            return
        self._chunks.append(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self._exchange.body_failed(UpstreamError(classify_failure(reason), reason.getErrorMessage()))
            return
        r = self._response
        conn_headers: Headers | None = getattr(r, "_trackproxy_conn_headers", None)
        length = None
        tokens: frozenset[bytes] = frozenset()
        if conn_headers is not None:
            tokens = connection_tokens(conn_headers.getRawHeaders(b"connection"))
            lengths = conn_headers.getRawHeaders(b"content-length")
            if lengths and lengths[0].strip().isdigit():
                length = int(lengths[0])
        self._exchange.body_done(
            UpstreamResponse(
                code=r.code,  # type: ignore[attr-defined]
                phrase=r.phrase,  # type: ignore[attr-defined]
                headers=tuple(
                    (name, tuple(values))
                    for name, values in r.headers.getAllRawHeaders()  # type: ignore[attr-defined]
                ),
                body=b"".join(self._chunks),
                length=length,
                connection_tokens=tokens,
                for_head=self._exchange.for_head,
            )
        )


def rotate_every(clock: IReactorTime, clients: Callable[[], list[UpstreamClient]]) -> object:
    """Rotate every client's pool each :data:`POOL_MAX_AGE` seconds; returns the LoopingCall."""
    loop = LoopingCall(lambda: [c.rotate() for c in clients()])
    loop.clock = clock
    loop.start(POOL_MAX_AGE, now=False)
    return loop
