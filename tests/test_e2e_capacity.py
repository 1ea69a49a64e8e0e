"""End to end: many idle clients and too few file descriptors, on a real proxy process.

10,000 kept-alive connections: what each costs in resident memory (bounded), and new
clients still served (at the listener's cap the longest idle connection makes room).
Out of file descriptors: new clients are closed at once rather than left hanging, the
log says so once (not once per accept) and once more when descriptors come back, and
the proxy serves as before.
"""

from __future__ import annotations

import json
import resource
import socket
from collections.abc import Iterator

import pytest

from proxy.testing import LocalCA

from observe import poll
from proxy_process import LOOPBACK, ProxyProcess, start_proxy
from standin_upstream import UpstreamStandIn
from wire import request

TRACK = "track.example.test"
IDLE = 10_000
#: Resident memory an idle kept-alive plain connection may cost the proxy.
MAX_BYTES_PER_IDLE_CONNECTION = 24 * 1024


def resident(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def proxy(tmp_path, ca: LocalCA, upstream: UpstreamStandIn) -> Iterator[ProxyProcess]:
    config = {
        "defaults": {"certificate": "self-signed", "cache_ttl": "10s"},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    }
    running = start_proxy(tmp_path, config)
    yield running
    running.stop()


def kept_alive(port: int) -> socket.socket:
    """A connection that has had one answer and stays open."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(b"GET /f/idle HTTP/1.1\r\nHost: " + TRACK.encode() + b"\r\n\r\n")
    data = b""
    while b"moved" not in data and b"\r\n\r\n" not in data[-4:]:
        chunk = sock.recv(65536)
        assert chunk, "closed"
        data += chunk
        if data.count(b"\r\n\r\n") and b"Content-Length: " in data:
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    return sock


def test_ten_thousand_idle_connections_cost_bounded_memory_and_new_clients_are_served(proxy):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 500:
        pytest.skip(f"needs {IDLE + 500} open files in the test process (ulimit -n is {soft})")
    kept_alive(proxy.http_port).close()  # warm: the answer is cached, the pool is made
    before = resident(proxy.process.pid)
    sockets = []
    try:
        for _ in range(IDLE):
            sockets.append(kept_alive(proxy.http_port))
        grown = resident(proxy.process.pid) - before
        per_connection = grown / IDLE
        print(f"FIGURE capacity: {IDLE:,} idle kept-alive connections, {per_connection / 1024:.1f} KiB each")
        assert per_connection < MAX_BYTES_PER_IDLE_CONNECTION, f"{per_connection:.0f} bytes each"
        # The listener is at its cap (10,000): a new client is served all the same.
        for _ in range(3):
            assert request(proxy.http_port, TRACK, "/f/new").status == 302
    finally:
        for sock in sockets:
            sock.close()


def test_out_of_descriptors_new_clients_are_refused_at_once_and_it_is_said_once(proxy):
    pid = proxy.process.pid
    in_use = len(__import__("os").listdir(f"/proc/{pid}/fd"))
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 20, hard))
    except PermissionError:
        pytest.skip("cannot lower the proxy's descriptor limit here")
    proxy.mark_log()
    held = []
    try:
        for _ in range(60):  # well past the limit
            sock = socket.create_connection((LOOPBACK, proxy.http_port), timeout=5)
            held.append(sock)
        # Past the limit, clients are closed at once (not left waiting for an accept).
        refused = 0
        for sock in held[-20:]:
            sock.settimeout(5)
            try:
                if sock.recv(1) == b"":
                    refused += 1
            except ConnectionResetError:
                refused += 1
            except TimeoutError:
                pass
        assert refused >= 10, f"only {refused} of the last 20 were closed"
    finally:
        for sock in held:
            sock.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))

    def warnings() -> list[str]:
        lines = [json.loads(line) for line in proxy.log_since_mark().splitlines() if line.startswith("{")]
        return [line["message"] for line in lines if line.get("namespace") in ("trackproxy.limits",)
                or "file descriptors" in line.get("message", "")]

    poll(lambda: any("available again" in m for m in warnings()), 15, "the all-clear in the log")
    said = warnings()
    assert sum("out of file descriptors" in m for m in said) == 1, said
    assert sum("available again" in m for m in said) == 1, said
    assert not any("EMFILE" in line for line in proxy.log_since_mark().splitlines()), "no line per accept"
    assert request(proxy.http_port, TRACK, "/f/after").status == 302
    print(f"FIGURE capacity: out of descriptors, {refused} of 20 new clients closed at once, said once, served after")
