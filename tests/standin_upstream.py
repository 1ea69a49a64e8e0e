"""A stand-in tracking platform on loopback for the end-to-end tests: real TLS as the
platform's name (SNI required), every request recorded, scripted misbehaviour on request.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from proxy_process import LOOPBACK

# ---------------------------------------------------------------------------
# Stand-in upstream: a tracking platform's endpoint on loopback


@dataclass(frozen=True)
class UpstreamRequest:
    """One request as the stand-in upstream received it."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    sni: str | None
    peer_port: int
    connection: int
    #: Why the stand-in refused to parse it (then method/path may be empty), else None.
    refused: str | None = None

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in arrival order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        """The single value of header ``name``; fails if it came more than once."""
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times upstream: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        """The lower-cased names of all headers received."""
        return {k.lower() for k, _ in self.headers}


#: What the stand-in answers, the way SparkPost's click endpoint does.
LANDING_URL = "https://landing.example/x"
REDIRECT_BODY = b"<a href='https://landing.example/x'>moved</a>\n"
#: How long ``/slow...`` paths wait before answering; longer than the tests' upstream_timeout.
SLOW_SECONDS = 4.0
#: Response headers that are hop-by-hop and must not reach the proxy's client.
UPSTREAM_HOP_HEADERS = (
    ("Connection", "X-Up-Hop"),
    ("X-Up-Hop", "secret"),
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Authenticate", 'Basic realm="upstream"'),
)
#: With ``UpstreamStandIn(numbered=True)``, the number of the request an answer is for.
SERIAL_HEADER = "X-Upstream-Request"


@dataclass(frozen=True)
class Script:
    """What a scripted path asks the stand-in to do; an ordinary path asks for nothing.

    A scripted path starts with any of these segments, in any order, then anything:

    - ``/delay/MS``: answer after MS milliseconds;
    - ``/status/CODE``: answer CODE instead of 302 (``Location`` only for 3xx);
    - ``/header/NAME/VALUE``: add the response header ``NAME: VALUE`` (VALUE
      percent-encoded; repeatable);
    - ``/cookie``: add ``Set-Cookie: visit=N``, N being the request's number, so each
      answer's cookie differs;
    - ``/drop``: close the connection without answering.
    """

    delay: float = 0.0
    status: int = 302
    headers: tuple[tuple[str, str], ...] = ()
    cookie: bool = False
    drop: bool = False

    @classmethod
    def parse(cls, path: str) -> Script:
        segments = path.split("?", 1)[0].split("/")[1:]
        found: dict[str, Any] = {}
        headers: list[tuple[str, str]] = []
        i = 0
        while i < len(segments):
            word = segments[i]
            if word == "delay" and i + 1 < len(segments) and segments[i + 1].isdigit():
                found["delay"] = int(segments[i + 1]) / 1000
                i += 2
            elif word == "status" and i + 1 < len(segments) and segments[i + 1].isdigit():
                found["status"] = int(segments[i + 1])
                i += 2
            elif word == "header" and i + 2 < len(segments):
                headers.append((segments[i + 1], urllib.parse.unquote(segments[i + 2])))
                i += 3
            elif word in ("cookie", "drop"):
                found[word] = True
                i += 1
            else:
                break
        return cls(headers=tuple(headers), **found)


def scripted_path(
    *,
    delay: float | None = None,
    status: int | None = None,
    headers: Iterable[tuple[str, str]] = (),
    cookie: bool = False,
    drop: bool = False,
    tail: str | None = None,
) -> str:
    """A path that makes the stand-in behave as asked (see :class:`Script`).

    Args:
        delay: seconds before the answer.
        tail: what follows the script; default a fresh ``/f/UUID``, so the path is new.
    """
    parts = []
    if delay is not None:
        parts.append(f"/delay/{round(delay * 1000)}")
    if status is not None:
        parts.append(f"/status/{status}")
    for name, value in headers:
        parts.append(f"/header/{name}/{urllib.parse.quote(value, safe='')}")
    if cookie:
        parts.append("/cookie")
    if drop:
        parts.append("/drop")
    return "".join(parts) + (tail if tail is not None else f"/f/{uuid.uuid4().hex}")



class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle pooled connection ends eventually, so does its thread
    server: _StandInServer

    def version_string(self) -> str:
        return "msys-http"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # A request too broken to parse still reached the upstream: record it.
        self.server.stand_in.record(
            UpstreamRequest(
                method=getattr(self, "command", None) or "",
                path=getattr(self, "path", None) or "",
                headers=(),
                body=b"",
                sni=self.server.stand_in.connection_state.sni,
                peer_port=self.client_address[1],
                connection=self.server.stand_in.connection_state.number,
                refused=f"{code} {message or ''}".strip(),
            )
        )
        super().send_error(code, message, explain)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self) -> None:
        record = UpstreamRequest(
            method=self.command,
            path=self.path,
            headers=tuple(self.headers.items()),
            body=self._read_body(),
            sni=self.server.stand_in.connection_state.sni,
            peer_port=self.client_address[1],
            connection=self.server.stand_in.connection_state.number,
        )
        serial = self.server.stand_in.record(record)
        script = Script.parse(self.path)
        if self.path.startswith("/slow"):
            time.sleep(SLOW_SECONDS)
        if script.delay:
            time.sleep(script.delay)
        if script.drop:
            self._drop()
            return
        code = script.status
        self.send_response(code)  # also sends Server (version_string) and Date
        if 300 <= code < 400:
            self.send_header("Location", LANDING_URL)
        self.send_header("Content-Type", "text/html")
        self.send_header("X-Upstream-Marker", "from-stand-in")
        for name, value in UPSTREAM_HOP_HEADERS:
            self.send_header(name, value)
        if self.server.stand_in.numbered:
            self.send_header(SERIAL_HEADER, str(serial))
        if script.cookie:
            self.send_header("Set-Cookie", f"visit={serial}; Path=/; HttpOnly")
        for name, value in script.headers:
            self.send_header(name, value)
        body = REDIRECT_BODY if code == 302 else b"stand-in answer %d\n" % code
        if code in (204, 304):
            body = b""  # RFC 9110 §6.4.1: no content, and no Content-Length to announce one
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self) -> None:
        """Close the connection without a word, as a crashing backend does."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _answer


class _StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    stand_in: UpstreamStandIn

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # Runs in the connection's own thread, as does its handler: per-connection facts
        # travel in a thread-local (plain sockets take no extra attributes).
        request.settimeout(_UpstreamHandler.timeout)
        if self.stand_in.no_delay:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        state = self.stand_in.connection_state
        state.number = self.stand_in.count_connection()
        state.sni = None
        context = self.stand_in.ssl_context
        if context is not None:
            try:
                request = context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        self.RequestHandlerClass(request, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a /slow answer written after the proxy gave up is expected to fail


class UpstreamStandIn:
    """A tracking endpoint on loopback: TLS (or plain HTTP) in a daemon thread.

    With TLS it serves the certificate for ``server_name`` and fails the handshake with
    ``unrecognized_name`` for any other SNI, or none, as multi-tenant endpoints do. With
    ``strict_sni=False`` it serves that certificate whatever the SNI. Every request is
    recorded; every answer is a ``302`` to :data:`LANDING_URL` with ``Server: msys-http``
    and the hop-by-hop headers in :data:`UPSTREAM_HOP_HEADERS`. Paths starting with
    ``/slow`` are answered after :data:`SLOW_SECONDS`. Paths made by :func:`scripted_path`
    choose a delay, a status, extra headers, a per-request cookie or a dropped
    connection (see :class:`Script`).

    Args:
        certificate: ``(cert_path, key_path)`` for TLS, ``None`` for plain HTTP.
        server_name: the only SNI accepted.
        strict_sni: refuse any other SNI.
        numbered: every answer carries :data:`SERIAL_HEADER`, the number of the request
            it answers (1 for the first received), so a client can tell a replayed
            answer from a fresh one.
        no_delay: send without Nagle's delay. An answer's head and body are two writes;
            with Nagle the body waits for the peer's delayed ACK (about 40 ms), which
            matters only to tests that send thousands of requests.
    """

    def __init__(
        self,
        certificate: tuple[Path, Path] | None = None,
        server_name: str = "spgo.io",
        strict_sni: bool = True,
        numbered: bool = False,
        no_delay: bool = False,
    ) -> None:
        self.server_name = server_name
        self.strict_sni = strict_sni
        self.numbered = numbered
        self.no_delay = no_delay
        self.connection_state = threading.local()
        self._lock = threading.Lock()
        self._requests: list[UpstreamRequest] = []
        self._refused_sni: list[str | None] = []
        self._connections = 0
        self.ssl_context: ssl.SSLContext | None = None
        if certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(certificate[0]), str(certificate[1]))
            context.sni_callback = self._on_sni
            self.ssl_context = context
        self._server = _StandInServer((LOOPBACK, 0), _UpstreamHandler)
        self._server.stand_in = self
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def _on_sni(self, sock: Any, server_name: str | None, context: ssl.SSLContext) -> int | None:
        self.connection_state.sni = server_name
        if self.strict_sni and server_name != self.server_name:
            with self._lock:
                self._refused_sni.append(server_name)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    @property
    def address(self) -> str:
        """``HOST:PORT`` for an upstream's ``connect_to``."""
        return f"{LOOPBACK}:{self.port}"

    def record(self, request: UpstreamRequest) -> int:
        """Keep ``request``; returns how many were received so far, it included."""
        with self._lock:
            self._requests.append(request)
            return len(self._requests)

    def count_connection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    @property
    def requests(self) -> list[UpstreamRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def refused_sni(self) -> list[str | None]:
        """The SNI of every handshake refused so far (``None``: the client sent none)."""
        with self._lock:
            return list(self._refused_sni)

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted so far."""
        with self._lock:
            return self._connections

    def matching(self, path: str) -> list[UpstreamRequest]:
        """The requests received for exactly ``path`` (path and query)."""
        return [r for r in self.requests if r.path == path]

    def only(self, path: str) -> UpstreamRequest:
        """The one request received for ``path``; fails if there were none or several."""
        found = self.matching(path)
        assert len(found) == 1, (
            f"upstream got {len(found)} requests for {path!r}; "
            f"it saw: {[r.path for r in self.requests]}"
        )
        return found[0]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
