"""Helpers for the end-to-end tests: a local CA, stand-in upstreams, the proxy process.

This module owns everything an end-to-end test needs around ``trackproxy run``: a
throw-away certificate authority, real loopback TLS servers that behave like a tracking
platform's endpoint, the proxy started as a child process from a YAML file, and an HTTP
client that controls exactly which SNI, Host and headers go on the wire. It holds no
assertions about the proxy; those belong to the test modules.

Test modules import it as ``from support import ...`` (pytest puts ``tests/`` on
``sys.path`` because the directory is not a package).
"""

from __future__ import annotations

import datetime
import http.client
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from proxy import pki

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------------------
# A throw-away certificate authority


class LocalCA:
    """A root CA made on the spot, issuing leaf certificates for host names.

    Args:
        directory: where ``ca.pem`` and every issued ``NAME.pem``/``NAME.key`` go.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._authority = pki.Authority.create(
            "trackproxy e2e test CA", now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)
        )
        self.certificate = self._authority.cert
        self.cert_path = directory / "ca.pem"
        self.cert_path.write_bytes(pki.cert_pem(self.certificate))

    def issue(self, host: str, ip: str | None = None) -> tuple[Path, Path]:
        """A server certificate for ``host`` (and the address ``ip``, if given) signed by
        this CA.

        Returns:
            The certificate file (the leaf alone: the root is the trust anchor, so the
            chain has nothing else to carry) and its private key file (mode 0600).
        """
        now = datetime.datetime.now(datetime.UTC)
        cert, key = self._authority.issue(
            host, now - datetime.timedelta(hours=1), now + datetime.timedelta(days=10), ips=[ip] if ip else ()
        )
        cert_path = self.directory / f"{host}.pem"
        key_path = self.directory / f"{host}.key"
        cert_path.write_bytes(pki.cert_pem(cert))
        key_path.write_bytes(pki.key_pem(key))
        key_path.chmod(0o600)
        return cert_path, key_path


def first_certificate_der(pem_path: Path) -> bytes:
    """The DER bytes of the first certificate in a PEM file."""
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def dns_names(der: bytes) -> list[str]:
    """The subjectAltName DNS names of a DER certificate."""
    return pki.dns_names(x509.load_der_x509_certificate(der))


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


# ---------------------------------------------------------------------------
# Ports


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The proxy as a process


@dataclass
class ProxyProcess:
    """A running ``python -m proxy run -c CONFIG``, and where to reach it."""

    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    state_dir: Path
    http_port: int
    https_port: int
    admin_port: int
    _log_offset: int = field(default=0)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines the proxy wrote to stdout and stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def mark_log(self) -> None:
        """Remember where the log ends, for :meth:`log_since_mark`."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0

    def log_since_mark(self) -> str:
        """What the proxy logged since :meth:`mark_log`."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return "(no log)"

    def certificate_path(self, domain: str) -> Path:
        """Where the proxy keeps a self-signed domain's certificate."""
        return self.state_dir / "certs" / domain / "self-signed.pem"

    def stop(self) -> None:
        """End the process (by its own PID): terminate, then kill if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_proxy(
    directory: Path,
    config: Mapping[str, Any],
    files: Mapping[str, Path] | None = None,
    ready_within: float = 15.0,
    http_port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> ProxyProcess:
    """Write ``trackproxy.yaml`` into ``directory`` and run the proxy on it.

    ``listen`` (three fresh loopback ports) and ``state_dir`` are filled in unless
    ``config`` sets them. ``files`` are copied next to the YAML under the given names,
    so the config can name them by relative path. ``http_port`` chooses the plain-HTTP
    port in advance (pebble's ``httpPort`` must name it before the proxy starts); ``env``
    adds to the process's environment.

    Returns:
        The process once ``GET /healthz`` on its admin listener answers 200.

    Raises:
        RuntimeError: it exited or was not ready within ``ready_within`` seconds; the
            message carries the tail of its log.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in (files or {}).items():
        target = directory / name
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode & 0o777)
    if http_port is None:
        http_port = free_port()
    https_port, admin_port = free_port(), free_port()
    full = {
        "listen": {
            "http": [f"tcp:{http_port}:interface={LOOPBACK}"],
            "https": [f"tcp:{https_port}:interface={LOOPBACK}"],
            "admin": [f"tcp:{admin_port}:interface={LOOPBACK}"],
        },
        "state_dir": str(directory / "state"),
        **config,
    }
    config_path = directory / "trackproxy.yaml"
    config_path.write_text(yaml.safe_dump(full, sort_keys=False))
    log_path = directory / "proxy.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    proxy = ProxyProcess(
        process=process,
        config_path=config_path,
        log_path=log_path,
        state_dir=Path(full["state_dir"]),
        http_port=http_port,
        https_port=https_port,
        admin_port=admin_port,
    )
    try:
        _wait_healthy(proxy, ready_within)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def _wait_healthy(proxy: ProxyProcess, within: float) -> None:
    url = f"http://{LOOPBACK}:{proxy.admin_port}/healthz"
    deadline = time.monotonic() + within
    last = "no answer yet"
    while True:
        if proxy.process.poll() is not None:
            raise RuntimeError(
                f"the proxy exited with {proxy.process.returncode} before it was ready; "
                f"log:\n{proxy.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the proxy was not healthy within {within}s ({last}); log:\n{proxy.log_tail()}"
            )
        time.sleep(0.05)  # poll interval, not a wait for something to happen


# ---------------------------------------------------------------------------
# A client with exact control over what goes on the wire


@dataclass(frozen=True)
class TLS:
    """How the client does TLS.

    Args:
        sni: the server name sent, ``None`` for no SNI at all.
        ca_file: trust this CA and check the certificate matches ``sni``; ``None``
            accepts any certificate (to prove a failure is the server's doing).
        maximum_version: cap the TLS version the client offers.
    """

    sni: str | None
    ca_file: Path | None = None
    maximum_version: ssl.TLSVersion | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file is None:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.load_verify_locations(str(self.ca_file))
            context.check_hostname = self.sni is not None
        if self.maximum_version is not None:
            if self.maximum_version < ssl.TLSVersion.TLSv1_2:
                # Let OpenSSL offer the old version at all, so the server is what refuses it.
                context.set_ciphers("DEFAULT:@SECLEVEL=0")
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
                context.maximum_version = self.maximum_version
        return context


@dataclass(frozen=True)
class Response:
    """What the proxy answered."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    peer_certificate: bytes | None = None
    reason: str = ""

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        """The single value of header ``name``; fails if it came more than once."""
        found = self.values(name)
        assert len(found) <= 1, f"{name} came {len(found)} times: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


def connect(port: int, tls: TLS | None = None, timeout: float = 10.0) -> socket.socket:
    """A connected socket to the proxy on loopback, TLS-wrapped (handshake done) if asked."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.context().wrap_socket(sock, server_hostname=tls.sni)
    except BaseException:
        sock.close()
        raise


def request(
    port: int,
    host: str | None,
    path: str = "/",
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    tls: TLS | None = None,
    timeout: float = 10.0,
) -> Response:
    """Send one request on a new connection and read the whole answer.

    Only the headers given go out, in order: ``Host: host`` first (none when ``host`` is
    ``None``), then ``headers``, then ``Content-Length`` when there is a ``body``. No
    User-Agent, Accept-Encoding or anything else is added.
    """
    sock = connect(port, tls, timeout)
    peer = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        content = answer.read()
        return Response(answer.status, tuple(answer.getheaders()), content, peer, answer.reason)
    finally:
        conn.close()


def keep_alive_get(sock: socket.socket, host: str, path: str = "/f/a/b/c/d") -> int:
    """One HTTP/1.1 GET on an open connection, leaving it open; the status code."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def children(pid: int) -> set[int]:
    """The PIDs of ``pid``'s live children (a proxy's worker processes)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def run_trackproxy(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``trackproxy ARGS`` as an operator runs it, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
    )


def wait_closed(sock: socket.socket, within: float) -> float:
    """Read from ``sock`` until the peer closes it; how many seconds that took.

    Data the peer sends first (an error answer, say) is read and ignored.

    Raises:
        TimeoutError: still open after ``within`` seconds.
    """
    started = time.monotonic()
    deadline = started + within
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"connection still open after {within}s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"connection still open after {within}s") from None
        except (ssl.SSLError, ConnectionError):
            data = b""  # an alert or a reset: closed all the same
        if not data:
            return time.monotonic() - started



# ---------------------------------------------------------------------------
# Metrics and waiting


@dataclass(frozen=True)
class Scrape:
    """One ``GET /metrics`` from the admin listener, parsed."""

    text: str
    #: ``(sample name, labels, value)``, counters under their ``_total`` names.
    samples: tuple[tuple[str, dict[str, str], float], ...]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value label ``label`` takes on the samples called ``name``."""
        return {have[label] for sample, have, _ in self.samples if sample == name and label in have}

    def series(self, prefix: str) -> list[tuple[str, dict[str, str], float]]:
        """The samples whose name starts with ``prefix``."""
        return [s for s in self.samples if s[0].startswith(prefix)]


def scrape(admin_port: int, timeout: float = 5.0) -> Scrape:
    """The proxy's metrics now, in the Prometheus text format."""
    url = f"http://{LOOPBACK}:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode("utf-8")
    samples = tuple(
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    return Scrape(text, samples)


def poll(check: Any, within: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check()`` until it returns something true; that value.

    Raises:
        TimeoutError: still false after ``within`` seconds (``what`` says what was awaited).
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within}s (last: {result!r})")
        time.sleep(interval)  # poll interval, not a wait for something to happen
