"""A real HAProxy (Debian's ``haproxy``) in front of trackproxy nodes, for cluster tests.

TCP mode with ``send-proxy-v2`` to each node's http and https listeners, health-checked
with ``GET /healthz`` on each node's ``listen.health`` port, as the README's "Running
several nodes" example; checks every 300 ms so that a drained node leaves quickly.
:meth:`HAProxy.set_state` takes a node out (``maint``) or puts it back (``ready``)
through the runtime API, as an operator would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from proxy_process import LOOPBACK, log_tail, stop_process

HAPROXY = "haproxy"


def require_haproxy() -> None:
    if shutil.which(HAPROXY) is None:
        pytest.skip(f"{HAPROXY} not installed: needs the Debian package 'haproxy' (as root: apt-get "
                    "install -y haproxy; scripts/dev test installs it when run as root)")


@attrs.frozen
class Backend:
    name: str
    http_port: int
    https_port: int
    health_port: int


def haproxy_config(http_port: int, https_port: int, nodes: Sequence[Backend], socket_path: Path) -> str:
    lines = [
        "global",
        f"    stats socket {socket_path} mode 600 level admin",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 500ms",
        "    retries 3",
        "    option redispatch",
    ]
    for scheme, port in (("http", http_port), ("https", https_port)):
        lines += [
            f"frontend {scheme}_in",
            f"    bind {LOOPBACK}:{port}",
            f"    default_backend {scheme}_nodes",
            f"backend {scheme}_nodes",
            "    balance roundrobin",
            "    option httpchk GET /healthz",
        ]
        for node in nodes:
            target = node.http_port if scheme == "http" else node.https_port
            lines.append(f"    server {node.name} {LOOPBACK}:{target} send-proxy-v2 "
                         f"check port {node.health_port} inter 300ms fall 1 rise 1")
    return "\n".join(lines) + "\n"


class HAProxy:
    """HAProxy as a child process; ``http_port``/``https_port`` are its frontends."""

    def __init__(self, directory: Path, http_port: int, https_port: int) -> None:
        self.directory = directory
        self.http_port = http_port
        self.https_port = https_port
        self.socket_path = directory / "haproxy.sock"
        self.log_path = directory / "haproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, nodes: Sequence[Backend], ready_within: float = 10.0) -> HAProxy:
        require_haproxy()
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "haproxy.cfg"
        config.write_text(haproxy_config(self.http_port, self.https_port, nodes, self.socket_path))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self._process.returncode}:\n{self.log_tail()}")
            if self.socket_path.exists() and all(
                state == "UP" for state in self.server_states().values()
            ) and len(self.server_states()) == 2 * len(nodes):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"haproxy's servers were not all up within {ready_within}s:\n{self.log_tail()}")

    def command(self, line: str) -> str:
        """One runtime API command, and its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """``backend/server`` -> ``UP``, ``DOWN``, ``MAINT`` ... from ``show stat``."""
        try:
            answer = self.command("show stat")
        except OSError:
            return {}
        lines = [line for line in answer.splitlines() if line and not line.startswith("#")]
        states = {}
        for line in lines:
            fields = line.split(",")
            if len(fields) > 17 and fields[1] not in ("FRONTEND", "BACKEND"):
                states[f"{fields[0]}/{fields[1]}"] = fields[17].split(" ")[0]
        return states

    def set_state(self, node: str, state: str) -> None:
        """``maint`` (out of the balancer) or ``ready`` (back in), on both backends."""
        for backend in ("http_nodes", "https_nodes"):
            self.command(f"set server {backend}/{node} state {state}")

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)
