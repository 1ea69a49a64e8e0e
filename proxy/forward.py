"""The request relay: from a client's request to the platform and back.

This module owns what a tracking request becomes on its way through: which domain it is
for (Host, lower-cased, port and trailing dot removed; never an open proxy), the checks
before anything leaves the host (SNI = Host, allowed method, header size), the ACME
challenge short-cut, the headers the platform sees (``Host`` and ``User-Agent`` kept,
``X-Forwarded-*`` set, hop-by-hop dropped) and the answer relayed back.

It leaves connections and deadlines to ``upstream``, certificates to ``tls``/``certs``,
and wiring listeners to ``service``. Everything a request consults is in one
:class:`Router`, built at start-up or reload and swapped whole, so the per-request path
does no parsing, no file I/O and no scanning.

The request path bypasses ``twisted.web``'s resource traversal: :class:`ProxyRequest`
overrides ``process`` and hands itself to the router.
"""

from __future__ import annotations

import ipaddress
import io
import time
from collections.abc import Callable, Iterable, Mapping

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from proxy.acme import CHALLENGE_PREFIX, ChallengeStore
from proxy.cache import ResponseCache, cache_key, storable_ttl
from proxy.config import Domain
from proxy.health import HealthBook, UpstreamHealth
from proxy import http11
from proxy.metrics import UNKNOWN_DOMAIN, Metrics
from proxy.tls import normalise_server_name
from proxy.upstream import UpstreamClient, UpstreamError, UpstreamResponse

log = Logger(namespace="trackproxy.forward")

#: RFC 9110 §7.6.1 hop-by-hop headers, plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
#: Request headers that trackproxy sets itself rather than passes on.
_REPLACED_REQUEST_HEADERS = frozenset(
    {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"}
)
#: Largest request body accepted (POST for Iterable's links is a few hundred bytes).
MAX_REQUEST_BODY = 1024 * 1024
_NO_BODY_CODES = frozenset({204, 304})
SERVER_NAME = b"trackproxy"


# ---------------------------------------------------------------------------
# Pure rules


def normalise_request_host(raw: bytes) -> str | None:
    """The routing key of a Host header: lower-case, no port, no trailing dot.

    Returns None for a value that cannot be a configured domain (empty, not ASCII,
    an IPv6 literal).
    """
    value = raw.strip()
    if not value or value.startswith(b"["):
        return None
    name, sep, port = value.rpartition(b":")
    if sep:
        if not port.isdigit():
            return None
        value = name
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text.rstrip(".").lower() or None


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


def forwarded_for(peer: str, incoming: list[bytes] | None, peer_is_trusted: bool) -> bytes:
    """X-Forwarded-For for the upstream.

    A trusted proxy's list is extended with its address; anyone else's claim is
    replaced, so a client cannot pass itself off as someone else.
    """
    address = peer.encode("ascii")
    if peer_is_trusted and incoming:
        return b", ".join([*incoming, address])
    return address


def upstream_request_headers(
    incoming: Headers, host: bytes, peer: str, scheme: bytes, peer_is_trusted: bool
) -> Headers:
    """The headers sent upstream: end-to-end ones as received, plus Host and X-Forwarded-*."""
    dropped = _connection_named(incoming.getRawHeaders(b"connection"))
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in _REPLACED_REQUEST_HEADERS or lower in dropped:
            continue
        outgoing.setRawHeaders(name, values)
    outgoing.setRawHeaders(b"Host", [host])
    outgoing.setRawHeaders(
        b"X-Forwarded-For",
        [forwarded_for(peer, incoming.getRawHeaders(b"x-forwarded-for"), peer_is_trusted)],
    )
    outgoing.setRawHeaders(b"X-Forwarded-Proto", [scheme])
    outgoing.setRawHeaders(b"X-Forwarded-Host", [host])
    return outgoing


def relayed_headers(response: UpstreamResponse) -> Iterable[tuple[bytes, tuple[bytes, ...]]]:
    """The upstream's end-to-end headers, its ``Server`` included."""
    for name, values in response.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in response.connection_tokens or lower == b"content-length":
            continue
        yield name, values


def _connection_named(values: list[bytes] | None) -> frozenset[bytes]:
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(b",") if t.strip())


def header_bytes(headers: Headers) -> int:
    """Size of a header block as sent on the wire (name, ': ', value, CRLF)."""
    return sum(len(n) + len(v) + 4 for n, vs in headers.getAllRawHeaders() for v in vs)


# ---------------------------------------------------------------------------
# Routing


@attrs.frozen
class Route:
    """A configured domain and the client for its upstream."""

    domain: Domain
    client: UpstreamClient
    host: bytes
    allow: bytes  # the Allow header for 405 answers
    cached: bool  # cache_ttl > 0
    health: UpstreamHealth | None = None


class Router:
    """Everything a request consults, for one configuration; replaced whole on reload."""

    def __init__(
        self,
        domains: Mapping[str, Domain],
        clients: Mapping[str, UpstreamClient],
        challenges: ChallengeStore,
        trusted_proxies: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        cache: ResponseCache | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        health: HealthBook | None = None,
    ) -> None:
        self.routes: dict[str, Route] = {
            name: Route(
                domain=domain,
                client=clients[domain.upstream.name],
                host=name.encode("ascii"),
                allow=b", ".join(m.encode("ascii") for m in domain.methods),
                cached=cache is not None and domain.cache_ttl > 0,
                health=health.for_domain(name) if health is not None else None,
            )
            for name, domain in domains.items()
        }
        self.challenges = challenges
        self.trusted_proxies = tuple(trusted_proxies)
        self.cache = cache
        self.metrics = metrics
        self.clock = clock

    def is_trusted(self, peer: str) -> bool:
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)

    def handle(self, request: ProxyRequest, scheme: bytes) -> None:
        """Answer ``request``: an error, a challenge, or the upstream's relayed answer."""
        hosts = request.requestHeaders.getRawHeaders(b"host")
        if not hosts or len(hosts) != 1:
            respond(request, 400, b"missing or repeated Host header")
            return
        host = normalise_request_host(hosts[0])
        target = request_target(request.uri, host)
        if target is None:
            respond(request, 400, b"unsupported request target")
            return
        route = self.routes.get(host) if host else None
        if route is None:
            # Never an open proxy: nothing leaves for a name we do not serve.
            respond(request, 404, b"unknown tracking domain")
            return
        request.domain_label = route.domain.name
        if scheme == b"https":
            tls = request.channel.transport.getHandle()
            if normalise_server_name(tls.get_servername()) != host:
                respond(request, 421, b"this connection is for another domain")
                return
        if target.startswith(CHALLENGE_PREFIX):
            self._answer_challenge(request, target)
            return
        if request.method not in route.domain.allowed_methods:
            respond(request, 405, b"method not allowed", ((b"Allow", route.allow),))
            return
        if request.body_too_large:
            respond(request, 413, b"request body too large")
            return
        limit = route.domain.upstream.max_request_header_bytes
        if limit is not None and header_bytes(request.requestHeaders) >= limit:
            respond(request, 431, b"request headers too large for this platform")
            return
        if route.cached and request.method in (b"GET", b"HEAD"):
            self._through_cache(request, route, scheme, target)
        else:
            request.cache_label = "bypass"
            self._forward(request, route, scheme, target)

    def _through_cache(self, request: ProxyRequest, route: Route, scheme: bytes, target: bytes) -> None:
        """Answer from the cache, from a fetch already under way, or fetch and store."""
        cache: ResponseCache = self.cache  # type: ignore[assignment]
        key = cache_key(scheme, route.host, target)
        entry = cache.get(key)
        if entry is not None:
            request.cache_label = "hit"
            relay(entry.response, request, age=cache.age(entry))
            return
        waiting = cache.join(key)
        if waiting is not None:
            request.cache_label = "coalesced"
            waiting.addCallbacks(
                self._shared_answer, upstream_failed,
                callbackArgs=(request, route, scheme, target), errbackArgs=(request, route),
            )
            return
        request.cache_label = "miss"
        if request.method == b"HEAD":
            # A HEAD answer has no body to store; it is forwarded as HEAD.
            self._forward(request, route, scheme, target)
            return
        cache.lead(key)
        d = self._fetch(request, route, scheme, target)
        d.addBoth(self._store_and_share, key, route)
        d.addCallbacks(relay, upstream_failed, callbackArgs=(request,), errbackArgs=(request, route))

    def _store_and_share(self, outcome: object, key: bytes, route: Route) -> object:
        cache: ResponseCache = self.cache  # type: ignore[assignment]
        if isinstance(outcome, UpstreamResponse):
            ttl = storable_ttl(outcome, route.domain.cache_ttl)
            if ttl > 0:
                cache.put(key, route.host, outcome, ttl)
                cache.settle(key, outcome)
            else:
                cache.settle(key, None)  # not shareable: each waiter fetches its own
        else:
            cache.settle(key, outcome)  # the same error for every waiter, no stampede
        return outcome

    def _shared_answer(
        self, response: UpstreamResponse | None, request: ProxyRequest, route: Route, scheme: bytes, target: bytes
    ) -> None:
        if response is None:
            request.cache_label = "miss"
            self._forward(request, route, scheme, target)
        else:
            relay(response, request)

    def _answer_challenge(self, request: ProxyRequest, target: bytes) -> None:
        if request.method not in (b"GET", b"HEAD"):
            respond(request, 405, b"method not allowed", ((b"Allow", b"GET, HEAD"),))
            return
        token = target[len(CHALLENGE_PREFIX):].split(b"?", 1)[0]
        answer = self.challenges.answer(token)
        if answer is None:
            respond(request, 404, b"no such challenge")
            return
        respond(request, 200, answer, newline=False)

    def _forward(self, request: ProxyRequest, route: Route, scheme: bytes, target: bytes) -> None:
        d = self._fetch(request, route, scheme, target)
        d.addCallbacks(relay, upstream_failed, callbackArgs=(request,), errbackArgs=(request, route))

    def _fetch(self, request: ProxyRequest, route: Route, scheme: bytes, target: bytes) -> defer.Deferred:
        peer = client_ip(request.getClientAddress().host)
        headers = upstream_request_headers(
            request.requestHeaders, route.host, peer, scheme, self.is_trusted(peer)
        )
        body = request.content.getvalue() or None
        d = route.client.fetch(request.method, target, headers, body)
        if self.metrics is not None or route.health is not None:
            d.addBoth(self._count_upstream, route, self.clock())
        return d

    def _count_upstream(self, outcome: object, route: Route, started: float) -> object:
        if isinstance(outcome, UpstreamResponse):
            name = "ok"
            if route.health is not None:
                route.health.succeeded()
        else:
            exc = getattr(outcome, "value", None)
            name = exc.outcome if isinstance(exc, UpstreamError) else "connect_error"
            if route.health is not None:
                route.health.failed(str(exc) if isinstance(exc, UpstreamError) else f"{name}: {exc}")
        if self.metrics is not None:
            self.metrics.count_upstream(route.domain.upstream.name, name, self.clock() - started)
        return outcome


def request_target(uri: bytes, host: str | None) -> bytes | None:
    """The origin-form target to forward, or None if it cannot be forwarded.

    Absolute-form (``GET http://host/path``) is accepted only for the Host it names,
    so a request line cannot steer the proxy anywhere else.
    """
    if uri.startswith(b"/"):
        return uri
    scheme, sep, rest = uri.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    authority, slash, path = rest.partition(b"/")
    if normalise_request_host(authority) != host:
        return None
    return b"/" + path if slash else b"/"


# ---------------------------------------------------------------------------
# Answers


def respond(
    request: ProxyRequest,
    code: int,
    text: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    newline: bool = True,
) -> None:
    """A short plain-text answer made by trackproxy itself."""
    if request.finished or request._disconnected:
        return
    body = text + b"\n" if newline else text
    request.setResponseCode(code, http11.reason(code))
    rh = request.responseHeaders
    rh.setRawHeaders(b"Server", [SERVER_NAME])
    rh.setRawHeaders(b"Date", [http.datetimeToString()])
    rh.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
    rh.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    for name, value in headers:
        rh.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


def relay(response: UpstreamResponse, request: ProxyRequest, age: int | None = None) -> None:
    """Send the upstream's answer to the client: status, headers and body.

    ``age`` is set for answers from the cache: seconds they have been stored.
    """
    if request.finished or request._disconnected:
        return
    request.setResponseCode(response.code, response.phrase)
    rh = request.responseHeaders
    for name, values in relayed_headers(response):
        rh.setRawHeaders(name, list(values))
    if not rh.hasHeader(b"date"):
        rh.setRawHeaders(b"Date", [http.datetimeToString()])
    if age is not None:
        upstream_age = rh.getRawHeaders(b"age", [b"0"])[0].strip()
        age += int(upstream_age) if upstream_age.isdigit() else 0
        rh.setRawHeaders(b"Age", [b"%d" % age])
    if response.code not in _NO_BODY_CODES and response.code >= 200:
        length = response.length if response.for_head else len(response.body)
        if length is not None:
            rh.setRawHeaders(b"Content-Length", [b"%d" % length])
    if response.body:
        request.write(response.body)
    request.finish()


def upstream_failed(failure: object, request: ProxyRequest, route: Route) -> None:
    """Map an upstream failure to 504 (too slow) or 502 (anything else) and log it once."""
    exc = failure.value  # type: ignore[attr-defined]
    if not isinstance(exc, UpstreamError):
        log.failure("unexpected error relaying for {domain}", failure, domain=route.domain.name)
        respond(request, 502, b"bad gateway")
        return
    log.warn(
        "upstream {upstream} failed for {domain}: {outcome}: {detail}",
        upstream=route.domain.upstream.name,
        domain=route.domain.name,
        outcome=exc.outcome,
        detail=exc.detail,
    )
    if exc.outcome == "timeout":
        respond(request, 504, b"the tracking platform did not answer in time")
    else:
        respond(request, 502, b"the tracking platform could not be reached")


# ---------------------------------------------------------------------------
# Twisted glue


class ProxyRequest(server.Request):
    """A request routed straight to the :class:`Router`, with a bounded body."""

    # Relayed answers keep exactly the upstream's Content-Type (or none).
    defaultContentType = None
    body_too_large = False
    #: Labels for metrics, set as the router decides (never a client-made name).
    domain_label = UNKNOWN_DOMAIN
    cache_label = "bypass"
    started = 0.0

    def gotLength(self, length: int | None) -> None:
        # Always in memory: bodies are bounded, and twisted.web would otherwise spool
        # large or chunked bodies to a temporary file.
        self.content = io.BytesIO()
        if length is not None and length > MAX_REQUEST_BODY:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content.tell() + len(data) > MAX_REQUEST_BODY:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)

    def process(self) -> None:
        site = self.channel.site
        self.site = site
        self.started = site.router.clock()
        try:
            site.router.handle(self, site.scheme)
        except Exception:
            log.failure("failed to handle a request")
            respond(self, 500, b"internal error")


_TOO_SLOW = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 26\r\nConnection: close\r\n\r\n"
    b"request head took too long\n"
)
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 30\r\nConnection: close\r\n\r\n"
    b"request header block too large\n"
)


class ProxyChannel(http.HTTPChannel):
    """HTTP/1.1 channel with bounded request heads: in size (431) and in time (408).

    twisted.web's idle timer restarts on every byte, so a client dripping a header a
    byte at a time would hold the connection for ever; a request head must arrive
    whole within ``client_timeout`` of its first line.
    """

    _head_deadline = None

    def lineReceived(self, line: bytes) -> None:
        if self._head_deadline is None and self.timeOut:
            self._head_deadline = self.callLater(self.timeOut, self._head_too_slow)
        # The head's size is counted by twisted.web, which answers a bare 400; say 431.
        if getattr(self, "_receivedHeaderSize", 0) + len(line) > self.totalHeadersSize:
            self._refuse_head(_TOO_LARGE)
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head(_TOO_LARGE)

    def connectionLost(self, reason: object) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        self._refuse_head(_TOO_SLOW)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None and self._head_deadline.active():
            self._head_deadline.cancel()
        self._head_deadline = None

    def _refuse_head(self, answer: bytes) -> None:
        self._cancel_head_deadline()
        if self.transport is not None:
            self.transport.write(answer)
            self.transport.loseConnection()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]


class ProxySite(server.Site):
    """The HTTP or HTTPS listener's factory; ``router`` is swapped on reload."""

    requestFactory = ProxyRequest
    protocol = ProxyChannel
    noisy = False

    def __init__(self, router: Router, scheme: bytes, client_timeout: float, max_header_bytes: int) -> None:
        super().__init__(Resource(), timeout=client_timeout)
        self.router = router
        self.scheme = scheme
        self.max_header_bytes = max_header_bytes
        #: An :class:`~proxy.access.AccessLog`, or None for no access log.
        self.access_log: object | None = None

    def buildProtocol(self, addr: object) -> ProxyChannel:
        channel = super().buildProtocol(addr)
        channel.totalHeadersSize = self.max_header_bytes
        # A single line may use the whole budget; past it the channel answers 431.
        channel.MAX_LENGTH = self.max_header_bytes + 1
        return channel

    def log(self, request: ProxyRequest) -> None:  # type: ignore[override]
        """Count and log each finished request. (Twisted's own access line would carry
        raw paths, i.e. recipients' addresses: never written; ``access`` redacts.)"""
        router = self.router
        seconds = router.clock() - request.started
        if router.metrics is not None:
            router.metrics.count_request(
                request.domain_label,
                self.scheme,
                request.method,
                request.code,
                request.cache_label,
                seconds,
            )
        if self.access_log is not None:
            peer = request.getClientAddress()
            self.access_log.record(  # type: ignore[attr-defined]
                domain=request.domain_label,
                scheme=self.scheme,
                method=request.method,
                target=request.uri,
                status=request.code,
                cache=request.cache_label,
                size=request.sentLength,
                seconds=seconds,
                client=getattr(peer, "host", None),
            )
