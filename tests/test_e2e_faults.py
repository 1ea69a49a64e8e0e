"""End to end: a platform that fails in every way, and what trackproxy makes of it.

A faulty platform on loopback (real TLS, SNI ``spgo.io``) that, by path, resets in the
middle of an answer, truncates the body, answers garbage instead of HTTP, completes TLS
and then says nothing, or drips its answer a byte at a time; and upstreams that are
refused, present a certificate for another name, or an expired one. Each gives the
client 502 or 504 within ``upstream_timeout``, is counted with its ``outcome``, and
leaves nothing open behind it: the proxy's descriptors come back to where they were.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import pki
from proxy.testing import LocalCA

from observe import poll, scrape
from proxy_process import LOOPBACK, ProxyProcess, free_port, start_proxy
from wire import request

TRACK = "track.example.test"
WRONG_NAME = "wrong.example.test"
EXPIRED = "expired.example.test"
REFUSED = "refused.example.test"
UPSTREAM_TIMEOUT = 2.0


class FaultyPlatform:
    """A TLS server that misbehaves as each request's path asks (``/fault/KIND/...``)."""

    def __init__(self, certificate: tuple[Path, Path]) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.open = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        with self._lock:
            self.open += 1
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            self._misbehave(conn, request.split(b" ", 2)[1].decode())
        except (OSError, ssl.SSLError):
            pass
        finally:
            with self._lock:
                self.open -= 1
            raw.close()

    def _misbehave(self, conn: ssl.SSLSocket, path: str) -> None:
        kind = path.split("/")[2] if path.startswith("/fault/") else "ok"
        head = b"HTTP/1.1 302 Found\r\nServer: msys-http\r\nLocation: https://l.example/\r\nContent-Length: 100\r\n\r\n"
        if kind == "reset":
            conn.sendall(head + b"partial")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        elif kind == "truncate":
            conn.sendall(head + b"partial")
            conn.unwrap()
        elif kind == "garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\nnot http at all\r\n")
        elif kind == "stall":
            while conn.recv(65536):  # until the proxy gives up and closes
                pass
        elif kind == "drip":
            for byte in head:
                conn.sendall(bytes([byte]))
                time.sleep(0.25)
        else:
            conn.sendall(head.replace(b"100", b"5") + b"moved")

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def platform(ca: LocalCA) -> Iterator[FaultyPlatform]:
    running = FaultyPlatform(ca.issue("spgo.io"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def expired_platform(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA) -> Iterator[FaultyPlatform]:
    directory = tmp_path_factory.mktemp("expired")
    now = datetime.datetime.now(datetime.UTC)
    authority = pki.Authority.from_pem(ca.cert_path.read_bytes(), pki.key_pem(ca._authority.key))
    cert, key = authority.issue("spgo.io", now - datetime.timedelta(days=10), now - datetime.timedelta(days=1))
    (directory / "c.pem").write_bytes(pki.cert_pem(cert))
    (directory / "c.key").write_bytes(pki.key_pem(key))
    running = FaultyPlatform((directory / "c.pem", directory / "c.key"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, platform: FaultyPlatform,
          expired_platform: FaultyPlatform) -> Iterator[ProxyProcess]:
    ca_file = str(ca.cert_path)
    config = {
        "limits": {"upstream_timeout": f"{UPSTREAM_TIMEOUT:g}s", "upstream_connect_timeout": "1s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {
            "sparkpost": {"connect_to": f"{LOOPBACK}:{platform.port}", "ca_file": ca_file},
            "wrongname": {"url": "https://other.example", "connect_to": f"{LOOPBACK}:{platform.port}",
                          "ca_file": ca_file},
            "expired": {"url": "https://spgo.io", "connect_to": f"{LOOPBACK}:{expired_platform.port}",
                        "ca_file": ca_file},
            "refused": {"url": "https://spgo.io", "connect_to": f"{LOOPBACK}:{free_port()}", "ca_file": ca_file},
        },
        "domains": {TRACK: {}, WRONG_NAME: {"upstream": "wrongname"}, EXPIRED: {"upstream": "expired"},
                    REFUSED: {"upstream": "refused"}},
    }
    running = start_proxy(tmp_path_factory.mktemp("faults"), config)
    yield running
    running.stop()


def descriptors(proxy: ProxyProcess) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


@pytest.mark.parametrize(
    "domain, path, status, upstream, outcome",
    [
        (TRACK, "/fault/reset/1", 502, "sparkpost", "reset"),
        (TRACK, "/fault/truncate/1", 502, "sparkpost", "reset"),
        (TRACK, "/fault/garbage/1", 502, "sparkpost", "reset"),
        (TRACK, "/fault/stall/1", 504, "sparkpost", "timeout"),
        (TRACK, "/fault/drip/1", 504, "sparkpost", "timeout"),
        (WRONG_NAME, "/f/x", 502, "wrongname", "tls_error"),
        (EXPIRED, "/f/x", 502, "expired", "tls_error"),
        (REFUSED, "/f/x", 502, "refused", "connect_error"),
    ],
    ids=["reset-mid-answer", "truncated-body", "garbage", "tls-then-stall", "byte-at-a-time",
         "wrong-name", "expired", "refused"],
)
def test_each_platform_fault_is_answered_in_time_counted_and_leaves_nothing_behind(
    proxy, platform, domain, path, status, upstream, outcome
):
    request(proxy.http_port, TRACK, "/f/warm")  # the pool has its connection; descriptors settle
    baseline = descriptors(proxy)
    before = scrape(proxy.admin_port).total("trackproxy_upstream_requests_total", upstream=upstream, outcome=outcome)
    started = time.monotonic()
    answer = request(proxy.http_port, domain, path, timeout=UPSTREAM_TIMEOUT + 5)
    elapsed = time.monotonic() - started
    assert answer.status == status, answer
    assert answer.header("Server") == "trackproxy"
    assert elapsed < UPSTREAM_TIMEOUT + 1.5, f"answered after {elapsed:.1f}s"
    after = scrape(proxy.admin_port).total("trackproxy_upstream_requests_total", upstream=upstream, outcome=outcome)
    assert after == before + 1
    # Nothing left open: the upstream connection of the fault is gone, and so are ours.
    poll(lambda: descriptors(proxy) <= baseline, 10, f"the proxy's descriptors back to {baseline}")
    poll(lambda: platform.open <= 1, 10, "the faulty platform's connections closed (but the pooled one)")
    fault = path.split("/")[2] if path.startswith("/fault/") else domain.split(".")[0]
    fault = {"reset": "reset mid-answer", "truncate": "truncated body", "garbage": "garbage for HTTP",
             "stall": "TLS then stall", "drip": "a byte at a time", "wrong": "wrong certificate name",
             "expired": "expired certificate", "refused": "connection refused"}[fault]
    print(f"FIGURE faults: {fault}: {status} in {elapsed:.2f}s, outcome {outcome}, nothing left open")


def test_a_healthy_answer_still_flows_after_every_fault(proxy):
    answer = request(proxy.http_port, TRACK, "/f/after-the-faults")
    assert answer.status == 302 and answer.header("Server") == "msys-http"
