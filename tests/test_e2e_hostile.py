"""End to end: hostile clients against a real proxy, over plain HTTP and TLS.

Slow clients (the request line, headers or body dripped a byte at a time, without ever
finishing) are cut at ``client_timeout`` from their first byte; absurd lengths are
answered at once; after any error answer the connection ends at once, TLS included
(no waiting for the client's close_notify or for ``client_timeout``); nothing of it
reaches the platform.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from proxy.testing import LocalCA

from proxy_process import ProxyProcess, start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS, connect, wait_closed

TRACK = "track.example.test"
POST = "post.example.test"
CLIENT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn) -> Iterator[ProxyProcess]:
    config = {
        "limits": {"client_timeout": f"{CLIENT_TIMEOUT:g}s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}, POST: {"methods": ["GET", "HEAD", "POST"]}},
    }
    running = start_proxy(tmp_path_factory.mktemp("hostile"), config)
    yield running
    running.stop()


def tls_for(proxy: ProxyProcess, name: str = TRACK) -> TLS:
    return TLS(name, proxy.certificate_path(name))


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the proxy sends until it closes, and how long that took."""
    started = time.monotonic()
    data = b""
    sock.settimeout(within)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {within}s; got {data!r}")
    return data, time.monotonic() - started


@pytest.mark.parametrize(
    "start",
    [b"GET /f/aaaa", b"GET /f/a HTTP/1.1\r\nHost: " + TRACK.encode() + b"\r\nX-Slow: ",
     b"POST /l HTTP/1.1\r\nHost: " + POST.encode() + b"\r\nContent-Length: 100\r\n\r\nab"],
    ids=["request-line", "headers", "body"],
)
def test_two_hundred_slow_clients_are_all_cut_at_client_timeout(proxy, upstream, start):
    before = len(upstream.requests)
    sockets = [connect(proxy.http_port) for _ in range(200)]
    for sock in sockets:
        sock.sendall(start)
    stop = threading.Event()

    def drip() -> None:  # a byte every 0.3 s on each: never idle, never finished
        while not stop.wait(0.3):
            for sock in sockets:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        started = time.monotonic()
        for sock in sockets:
            wait_closed(sock, within=CLIENT_TIMEOUT + 4 - (time.monotonic() - started))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        dripper.join()
        for sock in sockets:
            sock.close()
    assert elapsed < CLIENT_TIMEOUT + 3, f"the last was cut after {elapsed:.1f}s"
    assert len(upstream.requests) == before
    stage = "request line" if b"\r\n" not in start else "headers" if b"\r\n\r\n" not in start else "body"
    print(f"FIGURE hostile: 200 clients dripping the {stage}: all cut {elapsed:.1f}s after their first byte "
          f"(client_timeout {CLIENT_TIMEOUT:g}s), nothing forwarded")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST /l HTTP/1.1\r\nHost: %s\r\nContent-Length: 1000000000000\r\n\r\n", b"413"),
        (b"POST /l HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n", b"400"),
        (b"POST /l HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: identity\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: %s\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    ],
    ids=["huge-length", "chunk-size-overflow", "te-identity", "head-too-large"],
)
def test_absurd_requests_are_answered_at_once_and_the_connection_ends_at_once(proxy, upstream, tls, raw, status):
    before = len(upstream.requests)
    sock = connect(proxy.https_port if tls else proxy.http_port, tls_for(proxy, POST) if tls else None)
    with sock:
        sock.sendall(raw % POST.encode())
        data, elapsed = read_until_closed(sock, within=CLIENT_TIMEOUT + 3)
    assert data.startswith(b"HTTP/1.1 " + status + b" "), data[:80]
    assert elapsed < CLIENT_TIMEOUT / 2, f"closed after {elapsed:.2f}s, not at once"
    assert len(upstream.requests) == before


def test_a_slow_request_over_tls_gets_408_and_the_connection_ends_with_it(proxy):
    sock = connect(proxy.https_port, tls_for(proxy))
    with sock:
        sock.sendall(b"GET /f/slow HTTP/1.1\r\nHost: " + TRACK.encode() + b"\r\n")
        data, elapsed = read_until_closed(sock, within=CLIENT_TIMEOUT + 3)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert CLIENT_TIMEOUT * 0.8 < elapsed < CLIENT_TIMEOUT + 1.5, elapsed
