"""The admin listener (loopback by default): health now, metrics/status/reload later.

This module owns the admin HTTP resources. It reads the service's state through
the callables it is given and never touches the proxy's listeners itself.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web import server
from twisted.web.resource import Resource


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


class AdminSite(server.Site):
    """The admin listener's factory; its own access log stays quiet too."""

    noisy = False

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        root = Resource()
        root.putChild(b"healthz", HealthResource(is_ready))
        super().__init__(root)

    def log(self, request: object) -> None:
        pass
