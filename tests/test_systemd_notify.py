"""``sd_notify`` as systemd sees it: READY, RELOADING, STOPPING and the watchdog.

The end-to-end test plays systemd's part: it binds the unix datagram socket named in
``NOTIFY_SOCKET`` and reads what ``trackproxy run`` sends over its life.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.systemd import Notifier

from proxy_process import children, start_proxy


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, until: str, within: float = 10.0) -> list[dict[str, str]]:
    """Notifications received up to and including the first that has ``until`` (KEY=VALUE)."""
    return [fields for _, _, fields in credentialed(sock, until, within)]


def test_notifier_speaks_the_protocol_to_a_path_socket(systemd_socket: tuple[socket.socket, str]) -> None:
    sock, path = systemd_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("serving 2 domains")
    notifier.reloading()
    notifier.stopping()
    sock.settimeout(2)
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 domains"
    reloading = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert sock.recv(4096) == b"STOPPING=1"


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"trackproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        sock.settimeout(2)
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize(
    "environ, interval",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_is_half_what_systemd_asks_of_this_process(environ: dict, interval: float | None) -> None:
    assert Notifier(environ).watchdog_interval == interval


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")  # no socket: a no-op, not an error


def test_a_gone_systemd_does_not_take_the_proxy_down(tmp_path: Path) -> None:
    Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}).ready("x")


def test_the_running_proxy_notifies_ready_reloading_watchdog_and_stopping(
    tmp_path: Path, systemd_socket: tuple[socket.socket, str]
) -> None:
    sock, path = systemd_socket
    proxy = start_proxy(
        tmp_path / "proxy",
        {"domains": {"track.example.test": {"certificate": "self-signed"}}},
        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
    )
    try:
        ready = messages(sock, "READY=1")[-1]
        assert ready["STATUS"] == "serving 1 domains"
        # Pings every 0.2 s (half of WATCHDOG_USEC): several arrive in a second.
        pings = [m for m in messages(sock, "WATCHDOG=1") + messages(sock, "WATCHDOG=1")]
        assert sum(1 for m in pings if m.get("WATCHDOG") == "1") == 2

        proxy.process.send_signal(signal.SIGHUP)
        seen = messages(sock, "READY=1")
        assert any(m.get("RELOADING") == "1" for m in seen), seen

        request = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        seen = messages(sock, "READY=1")
        assert any(m.get("RELOADING") == "1" for m in seen), seen

        proxy.process.terminate()
        messages(sock, "STOPPING=1")
    finally:
        proxy.stop()


def credentialed(
    sock: socket.socket, until: str, within: float = 10.0
) -> list[tuple[float, int | None, dict[str, str]]]:
    """Notifications received up to and including the first that has ``until``
    (KEY=VALUE), each with its arrival time and, with SO_PASSCRED on, its sender's PID."""
    import struct

    key, value = until.split("=", 1)
    deadline = time.monotonic() + within
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {until} within {within}s; got {seen}")
        sock.settimeout(remaining)
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = next((struct.unpack("3i", d)[0] for level, kind, d in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        seen.append((time.monotonic(), pid, fields))
        if fields.get(key) == value:
            return seen


def test_with_workers_only_the_parent_notifies_and_the_watchdog_waits_for_its_workers(
    tmp_path: Path, systemd_socket: tuple[socket.socket, str]
) -> None:
    sock, path = systemd_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    proxy = start_proxy(
        tmp_path / "proxy",
        {"workers": 2, "domains": {"track.example.test": {"certificate": "self-signed"}}},
        env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"},
    )
    try:
        seen = credentialed(sock, "READY=1")
        assert {pid for _, pid, _ in seen} == {proxy.process.pid}, "NotifyAccess=main: the parent alone"
        workers = sorted(children(proxy.process.pid))
        assert len(workers) == 2
        credentialed(sock, "WATCHDOG=1")
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        pings = [t for t, _, fields in credentialed(sock, "WATCHDOG=1", within=15) if fields.get("WATCHDOG") == "1"]
        # Pings every 0.1 s while both serve; none from the kill until the new one serves
        # (a Python process takes several intervals to start).
        assert pings[-1] - killed_at > 0.25, "the watchdog waited for the replacement"
        later = [t for t, _, fields in credentialed(sock, "WATCHDOG=1") if fields.get("WATCHDOG") == "1"]
        assert later, "and pings again once it serves"
    finally:
        proxy.stop()
