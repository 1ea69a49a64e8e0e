"""The request relay: from a client's request to the platform and back.

This module owns what a tracking request becomes on its way through: which domain it is
for (Host, lower-cased, port and trailing dot removed; never an open proxy), the checks
before anything leaves the host (SNI = Host, allowed method, the platform's header
limit), the ACME challenge short-cut, the headers the platform sees (``Host`` and
``User-Agent`` kept, ``X-Forwarded-*`` set, hop-by-hop dropped) and the answer relayed
back: through the cache when the domain has one.

It leaves reading and writing HTTP to ``server`` (it sees an
:class:`~proxy.server.IncomingRequest` and answers with its ``send``), connections and
deadlines to ``upstream``, certificates to ``tls``/``certs``, and wiring to ``service``.
Everything a request consults is in one :class:`Router`, built at start-up or reload and
swapped whole, so the per-request path does no parsing, no file I/O and no scanning.

An upstream answer is serialised once, when it arrives (:func:`prepare`): the status
line and the relayed headers become bytes that every client it is relayed to (the one
that asked, those that waited for the same fetch, every later cache hit) gets with only
``Date``, ``Age`` and ``Content-Length`` added, in one write.

(Over 400 lines: the header rules, the routing decision and the relay are one request's
path, and each rule is a small pure function tested alone.)
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from proxy import http11
from proxy.acme import CHALLENGE_PREFIX, ChallengeStore, SharedChallenges
from proxy.cache import ENTRY_OVERHEAD, ResponseCache, cache_key, storable_ttl
from proxy.config import Domain
from proxy.health import HealthBook, UpstreamHealth
from proxy.metrics import Metrics
from proxy.server import IncomingRequest, client_ip
from proxy.upstream import UpstreamClient, UpstreamError, UpstreamResponse

if TYPE_CHECKING:
    from twisted.python.failure import Failure

__all__ = ["Router", "client_ip"]

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
_NOT_FORWARDED = HOP_BY_HOP | _REPLACED_REQUEST_HEADERS
#: Response headers the relay sets itself (Age and Content-Length) or never relays.
_NOT_RELAYED = HOP_BY_HOP | {b"content-length", b"age"}
_NO_BODY_CODES = frozenset({204, 304})
SERVER_NAME = b"trackproxy"
_OWN_HEAD = b"Server: trackproxy\r\nContent-Type: text/plain; charset=utf-8\r\n"


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


def forwarded_for(peer: str, incoming: Sequence[bytes] | None, peer_is_trusted: bool) -> bytes:
    """X-Forwarded-For for the upstream.

    A trusted proxy's list is extended with its address; anyone else's claim is
    replaced, so a client cannot pass itself off as someone else.
    """
    address = peer.encode("ascii")
    if peer_is_trusted and incoming:
        return b", ".join([*incoming, address])
    return address


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    host: bytes,
    peer: str,
    scheme: bytes,
    peer_is_trusted: bool,
    connection: Sequence[bytes] = (),
    incoming_forwarded_for: Sequence[bytes] = (),
) -> list[tuple[bytes, bytes]]:
    """The headers sent upstream: ``Host``, the end-to-end ones as received, then
    ``X-Forwarded-*``. ``connection`` and ``incoming_forwarded_for`` are the values of
    those request headers (the server picks them out while parsing)."""
    dropped = http11.connection_tokens(connection) if connection else frozenset()
    outgoing = [(b"Host", host)]
    for name, value in headers:
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower in dropped:
            continue
        outgoing.append((name, value))
    outgoing.append((b"X-Forwarded-For", forwarded_for(peer, incoming_forwarded_for, peer_is_trusted)))
    outgoing.append((b"X-Forwarded-Proto", scheme))
    outgoing.append((b"X-Forwarded-Host", host))
    return outgoing


def relayed_headers(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """The upstream's end-to-end headers, its ``Server`` included (Age and
    Content-Length are the relay's own)."""
    tokens = response.connection_tokens
    return [
        (name, value)
        for name, value in response.headers
        if (lower := name.lower()) not in _NOT_RELAYED and lower not in tokens
    ]


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


@attrs.frozen
class Relayed:
    """An upstream answer made ready to relay, once, when it arrived.

    ``head`` is the status line and the relayed headers as bytes; ``length`` the
    Content-Length to announce (None: none, for 204/304); ``upstream_age`` the
    upstream's own ``Age``.
    """

    code: int
    head: bytes
    body: bytes
    length: int | None
    has_date: bool
    upstream_age: int | None
    size: int


def prepare(response: UpstreamResponse) -> Relayed:
    """Serialise an upstream answer's status line and relayed headers once."""
    lines = [http11.status_line(response.code, response.phrase or None)]
    has_date = False
    upstream_age = None
    for name, value in response.headers:
        lower = name.lower()
        if lower == b"age":
            text = value.strip()
            upstream_age = int(text) if text.isdigit() else 0
            continue
        if lower in _NOT_RELAYED or lower in response.connection_tokens:
            continue
        if lower == b"date":
            has_date = True
        lines.append(b"%s: %s\r\n" % (name, value))
    head = b"".join(lines)
    length: int | None = None
    if response.code not in _NO_BODY_CODES and response.code >= 200:
        length = response.length if response.for_head else len(response.body)
    return Relayed(
        code=response.code,
        head=head,
        body=response.body,
        length=length,
        has_date=has_date,
        upstream_age=upstream_age,
        size=ENTRY_OVERHEAD + len(head) + len(response.body),
    )


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
        clock: Callable[[], float] = time.time,
        health: HealthBook | None = None,
        shared_challenges: SharedChallenges | None = None,
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
        self.shared_challenges = shared_challenges
        self.trusted_proxies = tuple(trusted_proxies)
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.date = http11.DateCache(clock)
        self._trusted: dict[str, bool] = {}

    def is_trusted(self, peer: str) -> bool:
        if not self.trusted_proxies:
            return False
        known = self._trusted.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                known = False
            else:
                known = any(address in net for net in self.trusted_proxies)
            if len(self._trusted) > 4096:
                self._trusted.clear()
            self._trusted[peer] = known
        return known

    def handle(self, request: IncomingRequest) -> None:
        """Answer ``request``: an error, a challenge, or the upstream's relayed answer."""
        hosts = request.hosts
        if len(hosts) != 1:
            self.respond(request, 400, b"missing or repeated Host header")
            return
        host = normalise_request_host(hosts[0])
        target = request_target(request.target, host)
        if target is None:
            self.respond(request, 400, b"unsupported request target")
            return
        route = self.routes.get(host) if host else None
        if route is None:
            # Never an open proxy: nothing leaves for a name we do not serve.
            self.respond(request, 404, b"unknown tracking domain")
            return
        request.domain_label = route.domain.name
        if request.scheme == b"https" and request.server_name != host:
            self.respond(request, 421, b"this connection is for another domain")
            return
        if target.startswith(CHALLENGE_PREFIX):
            self._answer_challenge(request, target, route)
            return
        method = request.method
        if method not in route.domain.allowed_methods:
            self.respond(request, 405, b"method not allowed", b"Allow: %s\r\n" % route.allow)
            return
        limit = route.domain.upstream.max_request_header_bytes
        if limit is not None and request.head_size - len(request.target) >= limit:
            self.respond(request, 431, b"request headers too large for this platform")
            return
        if route.cached and (method == b"GET" or method == b"HEAD"):
            self._through_cache(request, route, target)
        else:
            request.cache_label = "bypass"
            self._forward(request, route, target)

    def _through_cache(self, request: IncomingRequest, route: Route, target: bytes) -> None:
        """Answer from the cache, from a fetch already under way, or fetch and store."""
        cache: ResponseCache = self.cache  # type: ignore[assignment]  # route.cached: there is a cache
        key = cache_key(request.scheme, route.host, target)
        entry = cache.get(key)
        if entry is not None:
            request.cache_label = "hit"
            answer: Relayed = entry.answer  # type: ignore[assignment]  # what _forward stored
            self.relay(answer, request, age=cache.age(entry))
            return
        waiting = cache.join(key)
        if waiting is not None:
            request.cache_label = "coalesced"
            waiting.addCallbacks(
                self._shared_answer, self._upstream_failed,
                callbackArgs=(request, route, target), errbackArgs=(request, route),
            )
            return
        request.cache_label = "miss"
        if request.method == b"HEAD":
            # A HEAD answer has no body to store; it is forwarded as HEAD.
            self._forward(request, route, target)
            return
        cache.lead(key)
        d = self._fetch(request, route, target)
        d.addBoth(self._store_and_share, key, route)
        d.addCallbacks(self.relay, self._upstream_failed, callbackArgs=(request,), errbackArgs=(request, route))

    def _store_and_share(self, outcome: UpstreamResponse | Failure, key: bytes, route: Route) -> Relayed | Failure:
        cache: ResponseCache = self.cache  # type: ignore[assignment]  # (cast() costs a call)
        if isinstance(outcome, UpstreamResponse):
            answer = prepare(outcome)
            ttl = storable_ttl(outcome, route.domain.cache_ttl)
            if ttl > 0:
                cache.put(key, route.host, answer, ttl)
                cache.settle(key, answer)
            else:
                cache.settle(key, None)  # not shareable: each waiter fetches its own
            return answer
        cache.settle(key, outcome)  # the same error for every waiter
        return outcome

    def _shared_answer(self, answer: Relayed | None, request: IncomingRequest, route: Route, target: bytes) -> None:
        if answer is None:
            request.cache_label = "miss"
            self._forward(request, route, target)
        else:
            self.relay(answer, request)

    def _answer_challenge(self, request: IncomingRequest, target: bytes, route: Route) -> None:
        if request.method not in (b"GET", b"HEAD"):
            self.respond(request, 405, b"method not allowed", b"Allow: GET, HEAD\r\n")
            return
        token = target[len(CHALLENGE_PREFIX):].split(b"?", 1)[0]
        answer = self.challenges.answer(token)
        if answer is None and self.shared_challenges is not None:
            # Another node's certbot asked (a cluster): etcd has the token for its domain.
            d = self.shared_challenges.answer(token, route.domain.name)
            d.addCallback(self._challenge_answered, request)
            return
        self._challenge_answered(answer, request)

    def _challenge_answered(self, answer: bytes | None, request: IncomingRequest) -> None:
        if answer is None:
            self.respond(request, 404, b"no such challenge")
            return
        self.respond(request, 200, answer, newline=False)

    def _forward(self, request: IncomingRequest, route: Route, target: bytes) -> None:
        d = self._fetch(request, route, target)
        d.addCallbacks(self._relay_response, self._upstream_failed, callbackArgs=(request,),
                       errbackArgs=(request, route))

    def _relay_response(self, response: UpstreamResponse, request: IncomingRequest) -> None:
        self.relay(prepare(response), request)

    def _fetch(self, request: IncomingRequest, route: Route, target: bytes) -> defer.Deferred[UpstreamResponse]:
        peer = request.peer
        headers = upstream_request_headers(
            request.headers, route.host, peer, request.scheme, self.is_trusted(peer),
            request.connection, request.forwarded_for,
        )
        d = route.client.fetch(request.method, target, headers, request.body or None)
        if self.metrics is not None or route.health is not None:
            d.addBoth(self._count_upstream, route, self.clock())
        return d

    def _count_upstream(
        self, outcome: UpstreamResponse | Failure, route: Route, started: float
    ) -> UpstreamResponse | Failure:
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

    # -----------------------------------------------------------------------
    # Answers

    def respond(
        self, request: IncomingRequest, code: int, text: bytes, headers: bytes = b"", newline: bool = True
    ) -> None:
        """A short plain-text answer made by trackproxy itself (``headers``: extra
        header lines, each ending in CRLF)."""
        body = text + b"\n" if newline else text
        head = b"%s%sDate: %s\r\nContent-Length: %d\r\n%s" % (
            http11.status_line(code), _OWN_HEAD, self.date(), len(body), headers
        )
        request.send(code, head, body)

    def relay(self, answer: Relayed, request: IncomingRequest, age: int | None = None) -> None:
        """Send an upstream answer to the client: its prepared head, then what the relay
        adds: ``Date`` (if the upstream sent none), ``Age`` (answers from the cache: how
        long they have been stored, plus the upstream's own), ``Content-Length``."""
        extra = b""
        if not answer.has_date:
            extra = b"Date: %s\r\n" % self.date()
        if age is not None:
            extra += b"Age: %d\r\n" % (age + (answer.upstream_age or 0))
        elif answer.upstream_age is not None:
            extra += b"Age: %d\r\n" % answer.upstream_age
        if answer.length is not None:
            extra += b"Content-Length: %d\r\n" % answer.length
        request.send(answer.code, answer.head + extra, answer.body)

    def _upstream_failed(self, failure: Failure, request: IncomingRequest, route: Route) -> None:
        """Map an upstream failure to 504 (too slow) or 502 (anything else) and log it once."""
        exc = failure.value
        if not isinstance(exc, UpstreamError):
            log.failure("unexpected error relaying for {domain}", failure, domain=route.domain.name)
            self.respond(request, 502, b"bad gateway")
            return
        log.warn(
            "upstream {upstream} failed for {domain}: {outcome}: {detail}",
            upstream=route.domain.upstream.name,
            domain=route.domain.name,
            outcome=exc.outcome,
            detail=exc.detail,
        )
        if exc.outcome == "timeout":
            self.respond(request, 504, b"the tracking platform did not answer in time")
        else:
            self.respond(request, 502, b"the tracking platform could not be reached")
