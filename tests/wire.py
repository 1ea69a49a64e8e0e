"""A client for the end-to-end tests with exact control over what goes on the wire (which
SNI, which Host, which headers, nothing added), and what it can tell of the answer and the
connection.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy import pki

from proxy_process import LOOPBACK

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


def first_certificate_der(pem_path: Path) -> bytes:
    """The DER bytes of the first certificate in a PEM file."""
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def dns_names(der: bytes) -> list[str]:
    """The subjectAltName DNS names of a DER certificate."""
    return pki.dns_names(x509.load_der_x509_certificate(der))
