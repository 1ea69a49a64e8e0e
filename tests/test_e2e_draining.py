"""End to end: ``listen.health`` for a load balancer's checks, and draining on SIGTERM.

Real processes: ``trackproxy run`` (one process, and with two workers) on loopback with
self-signed certificates and plain HTTP, a health listener of its own, and SIGTERM as
systemd sends it.
"""

from __future__ import annotations

import http.client
import signal
import time
from pathlib import Path

import pytest

from observe import poll
from proxy_process import LOOPBACK, ProxyProcess, free_port, start_proxy
from wire import request

TRACK = "track.example.test"
DRAIN = 3.0


def health(port: int, method: str = "GET", path: str = "/healthz") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def start(tmp_path: Path, workers: int) -> tuple[ProxyProcess, int]:
    health_port = free_port()
    proxy = start_proxy(tmp_path / "proxy", {
        "workers": workers,
        "drain_delay": f"{DRAIN:g}s",
        # A domain whose answers come from the proxy itself: no platform needed to see
        # that requests are still served (an ACME challenge path is answered from disk).
        "domains": {TRACK: {"certificate": "self-signed"}},
    }, listen={"health": [f"tcp:{health_port}:interface={LOOPBACK}"]})
    return proxy, health_port


def challenge(proxy: ProxyProcess, token: str = "drain-token") -> int:
    return request(proxy.http_port, TRACK, f"/.well-known/acme-challenge/{token}").status


@pytest.mark.parametrize("workers", [1, 2])
def test_the_health_listener_serves_healthz_only(tmp_path: Path, workers: int) -> None:
    proxy, health_port = start(tmp_path, workers)
    try:
        assert health(health_port) == (200, b"ok\n")
        assert health(health_port, path="/status")[0] == 404, "the admin documents stay private"
        assert health(health_port, path="/metrics")[0] == 404
        assert health(health_port, method="POST", path="/reload")[0] == 404
        assert health(health_port, method="POST")[0] == 405
    finally:
        proxy.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_says_503_at_once_serves_through_drain_delay_then_exits(tmp_path: Path, workers: int) -> None:
    proxy, health_port = start(tmp_path, workers)
    (proxy.state_dir / "acme-challenge" / "drain-token").write_text("served while draining")
    try:
        assert challenge(proxy) == 200
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert poll(lambda: health(health_port)[0] == 503, 2, "/healthz 503 after SIGTERM", interval=0.02)
        assert health(proxy.admin_port) == (503, b"draining\n"), "the admin listener's /healthz agrees"
        # Still serving, on new connections too, until drain_delay is over.
        while time.monotonic() - signalled < DRAIN - 1.0:
            assert challenge(proxy) == 200
            time.sleep(0.1)  # a request loop's pace, not a wait for something to happen
        assert proxy.process.wait(timeout=DRAIN + 20) == 0
        assert time.monotonic() - signalled >= DRAIN - 0.1, "did not stop before drain_delay"
    finally:
        proxy.stop()
