"""The admin listener (loopback by default): ``/healthz`` and ``/metrics``.

This module owns the admin HTTP resources. It reads the service's state through
the callables it is given and never touches the proxy's listeners itself.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web import server
from twisted.web.resource import Resource

from proxy.metrics import Metrics


class HealthResource(Resource):
    """``GET /healthz``: 200 once the config is loaded and every listener is up."""

    isLeaf = True

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        super().__init__()
        self._is_ready = is_ready

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._is_ready():
            return b"ok\n"
        request.setResponseCode(503)
        return b"starting\n"


class MetricsResource(Resource):
    """``GET /metrics``: Prometheus exposition, in the format the scraper asks for."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self._metrics.exposition(accept.decode("latin-1") if accept else None)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class AdminSite(server.Site):
    """The admin listener's factory; its own access log stays quiet too."""

    noisy = False

    def __init__(self, is_ready: Callable[[], bool], metrics: Metrics) -> None:
        root = Resource()
        root.putChild(b"healthz", HealthResource(is_ready))
        root.putChild(b"metrics", MetricsResource(metrics))
        super().__init__(root)

    def log(self, request: object) -> None:
        pass
