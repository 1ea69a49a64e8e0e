"""The admin listener (loopback by default): ``/healthz``, ``/metrics``, ``/status``
and ``POST /reload``.

This module owns the admin HTTP resources. It reads the service's state and asks for
reloads through the callables it is given (each may answer at once or with a Deferred:
with workers, the parent asks every worker first), and never touches the proxy's
listeners itself. The listener has no authentication: it belongs on loopback (the
default) or a private interface.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from proxy import http11

if TYPE_CHECKING:
    from twisted.python.failure import Failure

_T = TypeVar("_T")

log = Logger(namespace="trackproxy.admin")


def _answer_later(request: server.Request, result: _T | defer.Deferred[_T], write: Callable[[_T], bytes]) -> int:
    """Render ``result`` (a value or a Deferred of one) with ``write``, now or when it fires."""
    # maybeDeferred waits for a Deferred result (its overloads cannot say so for a union).
    d = cast("defer.Deferred[_T]", defer.maybeDeferred(lambda: result))

    def done(value: _T) -> None:
        if request.finished or request._disconnected:
            return
        request.write(write(value))
        request.finish()

    def failed(failure: Failure) -> None:
        log.failure("admin request failed", failure)
        if request.finished or request._disconnected:
            return
        request.write(_json(request, 500, {"error": "internal error (see the log)"}))
        request.finish()

    d.addCallbacks(done, failed)
    return server.NOT_DONE_YET


#: What ``/healthz`` says: ``ok`` (200), ``starting`` or ``draining`` (503).
HEALTH_OK, HEALTH_STARTING, HEALTH_DRAINING = "ok", "starting", "draining"


class HealthResource(Resource):
    """``GET /healthz``: 200 once the config is loaded and every listener is up, 503 from
    the moment the proxy is told to stop (a load balancer takes it out meanwhile)."""

    isLeaf = True

    def __init__(self, health: Callable[[], str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._health = health

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        state = self._health()
        if state != HEALTH_OK:
            request.setResponseCode(503)
        return state.encode("ascii") + b"\n"


class MetricsResource(Resource):
    """``GET /metrics``: Prometheus exposition, in the format the scraper asks for."""

    isLeaf = True

    def __init__(
        self, exposition: Callable[[str | None], tuple[bytes, str] | defer.Deferred[tuple[bytes, str]]]
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._exposition = exposition

    def render_GET(self, request: server.Request) -> int:
        accept = request.getHeader(b"accept")

        def write(answer: tuple[bytes, str]) -> bytes:
            body, content_type = answer
            request.setHeader(b"content-type", content_type.encode("ascii"))
            return body

        return _answer_later(request, self._exposition(accept.decode("latin-1") if accept else None), write)


def _json(request: server.Request, code: int, document: object) -> bytes:
    request.setResponseCode(code, http11.reason(code))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, indent=2).encode("utf-8") + b"\n"


class StatusResource(Resource):
    """``GET /status``: the JSON document of README "Commands" (what ``trackproxy status --json`` prints)."""

    isLeaf = True

    def __init__(self, status: Callable[[], dict[str, Any] | defer.Deferred[dict[str, Any]]]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._status = status

    def render_GET(self, request: server.Request) -> int:
        return _answer_later(request, self._status(), lambda document: _json(request, 200, document))


class ReloadResource(Resource):
    """``POST /reload``: 200 with the outcome, or 422 with the config errors (and
    nothing changed)."""

    isLeaf = True

    def __init__(
        self, reload: Callable[[], tuple[bool, dict[str, Any]] | defer.Deferred[tuple[bool, dict[str, Any]]]]
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._reload = reload

    def render_POST(self, request: server.Request) -> int:
        def write(result: tuple[bool, dict[str, Any]]) -> bytes:
            ok, outcome = result
            return _json(request, 200 if ok else 422, outcome)

        return _answer_later(request, self._reload(), write)


#: Every admin answer names the config file the proxy serves, so that the CLI can tell
#: its own proxy from another one (or from another program) on the same port.
CONFIG_HEADER = b"Trackproxy-Config"


def encode_config_path(path: str) -> bytes:
    """A file name as a header value (percent-encoded: a path may be any bytes)."""
    return urllib.parse.quote(path, safe="/").encode("ascii")


def decode_config_path(value: str) -> str:
    return urllib.parse.unquote(value)


class _AdminRequest(server.Request):
    def process(self) -> None:
        # Site.buildProtocol sets the channel's site; HTTPChannel does not declare it.
        self.setHeader(CONFIG_HEADER, encode_config_path(self.channel.site.config_path()))  # type: ignore[attr-defined, no-untyped-call]
        super().process()  # type: ignore[no-untyped-call]


class AdminSite(server.Site):
    """The admin listener's factory; its own access log stays quiet too.

    Args:
        config_path: the absolute path of the config file being served (it names
            every answer, see :data:`CONFIG_HEADER`).
    """

    noisy = False
    requestFactory = _AdminRequest

    def __init__(
        self,
        health: Callable[[], str],
        exposition: Callable[[str | None], tuple[bytes, str] | defer.Deferred[tuple[bytes, str]]],
        status: Callable[[], dict[str, Any] | defer.Deferred[dict[str, Any]]],
        reload: Callable[[], tuple[bool, dict[str, Any]] | defer.Deferred[tuple[bool, dict[str, Any]]]],
        config_path: Callable[[], str],
    ) -> None:
        root = Resource()
        root.putChild(b"healthz", HealthResource(health))
        root.putChild(b"metrics", MetricsResource(exposition))
        root.putChild(b"status", StatusResource(status))
        root.putChild(b"reload", ReloadResource(reload))
        super().__init__(root)  # type: ignore[no-untyped-call]
        self.config_path = config_path

    def log(self, request: object) -> None:
        pass


class HealthSite(server.Site):
    """``listen.health``: ``GET /healthz`` and nothing else (404 for any other path, 405
    for any other method), for a load balancer's checks; the admin listener, with its
    ``POST /reload``, stays private."""

    noisy = False

    def __init__(self, health: Callable[[], str]) -> None:
        root = Resource()
        root.putChild(b"healthz", HealthResource(health))
        super().__init__(root)  # type: ignore[no-untyped-call]

    def log(self, request: object) -> None:
        pass
