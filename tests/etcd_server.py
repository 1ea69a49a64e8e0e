"""A real etcd (Debian's ``etcd-server``) as a child process on loopback, for cluster tests.

One member, on free ports, with its data in a test directory; :meth:`EtcdServer.stop` and
:meth:`EtcdServer.start` again keep the data, as an operator's restart would.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from proxy.testing import LocalCA

from proxy_process import LOOPBACK, free_port, log_tail, stop_process

ETCD = "etcd"
DEBIAN_PACKAGE = "etcd-server"


def require_etcd() -> None:
    """Skip the calling test unless Debian's etcd is on ``PATH``."""
    if shutil.which(ETCD) is None:
        pytest.skip(
            f"{ETCD} not installed: needs the Debian package {DEBIAN_PACKAGE!r} (as root: apt-get "
            f"install -y {DEBIAN_PACKAGE}; scripts/dev test installs it when run as root)"
        )


class EtcdServer:
    """One etcd member; ``url`` is its client endpoint (``cluster.etcd``). With ``ca``,
    it serves TLS with a certificate from that CA and requires a client certificate from
    it too (:attr:`client_cert`, :attr:`client_key`)."""

    def __init__(self, directory: Path, ca: LocalCA | None = None) -> None:
        self.directory = directory
        self.ca = ca
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self._tls: list[str] = []
        if ca is not None:
            # client=True for the server too: etcd's JSON gateway dials etcd's own gRPC
            # port with the server's certificate as its client certificate.
            server_cert, server_key = ca.issue("etcd-server", ip=LOOPBACK, client=True)
            self.client_cert, self.client_key = ca.issue("etcd-client", client=True)
            self._tls = ["--cert-file", str(server_cert), "--key-file", str(server_key),
                         "--client-cert-auth", "--trusted-ca-file", str(ca.cert_path)]
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.log_path = directory / "etcd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://{LOOPBACK}:{self.client_port}"

    def start(self, ready_within: float = 20.0) -> EtcdServer:
        require_etcd()
        self.directory.mkdir(parents=True, exist_ok=True)
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [ETCD, "--name", "test", "--data-dir", str(self.directory / "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"test={peer}", "--logger", "zap", "--log-outputs", "stderr",
                 *self._tls],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._process.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy within {ready_within}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        context = None
        if self.ca is not None:
            context = ssl.create_default_context(cafile=str(self.ca.cert_path))
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1, context=context) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
