"""Listeners from endpoint strings, for real: several per role, IPv6, systemd sockets.

These start ``python -m proxy run`` as a process. The requests are ACME challenge
fetches, which the proxy answers itself from ``state_dir``: they prove a listener
serves without needing an upstream.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "track.example.test"
TOKEN = "tok-EN_1"


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, listen: str) -> Path:
    state = tmp_path / "state"
    (state / "acme-challenge").mkdir(parents=True)
    (state / "acme-challenge" / TOKEN).write_text(f"{TOKEN}.thumbprint")
    path = tmp_path / "trackproxy.yaml"
    path.write_text(f"{listen}\nstate_dir: {state}\ndomains:\n  {DOMAIN}: {{certificate: self-signed}}\n")
    return path


def wait_until(check, what: str, deadline: float = 20.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"proxy exited ({proc.returncode}) before {what}:\n{log.read_text() if log else ''}")
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text() if log else ''}")


def challenge_over_http(host: str, port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", f"/.well-known/acme-challenge/{TOKEN}", headers={"Host": DOMAIN})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def challenge_over_https(host: str, port: int, cafile: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    conn = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    # SNI and certificate verification use DOMAIN while the socket goes to host:port.
    conn.sock = context.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=DOMAIN)
    try:
        conn.request("GET", f"/.well-known/acme-challenge/{TOKEN}", headers={"Host": DOMAIN})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fetch_challenge_tls(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession, bool]:
    """One HTTPS challenge fetch on a fresh connection: (its session, whether it resumed)."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=DOMAIN, session=session
    )
    with sock:
        sock.sendall(f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: {DOMAIN}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
        # Read after the answer: TLS 1.3 tickets arrive after the handshake.
        return sock.session, sock.session_reused


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_several_listeners_per_role_including_ipv6(tmp_path):
    http4, http6, https6, admin = free_port(), free_port(socket.AF_INET6, "::1"), free_port(socket.AF_INET6, "::1"), free_port()
    config = write_config(
        tmp_path,
        "listen:\n"
        f'  http: ["tcp:{http4}:interface=127.0.0.1", "tcp6:{http6}:interface=\\\\:\\\\:1"]\n'
        f'  https: ["tcp6:{https6}:interface=\\\\:\\\\:1"]\n'
        f'  admin: ["tcp:{admin}:interface=127.0.0.1"]\n',
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: healthy(admin), "/healthz", proc=proc, log=log)
        assert challenge_over_http("127.0.0.1", http4) == (200, f"{TOKEN}.thumbprint".encode())
        assert challenge_over_http("::1", http6) == (200, f"{TOKEN}.thumbprint".encode())
        cafile = tmp_path / "state" / "certs" / DOMAIN / "self-signed.pem"
        assert challenge_over_https("::1", https6, cafile) == (200, f"{TOKEN}.thumbprint".encode())
    finally:
        stop(proc)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate (Debian package systemd)")
@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation_with_named_sockets(tmp_path, workers):
    http_port, https_port, admin = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path,
        f"workers: {workers}\n"
        "listen:\n"
        '  http: ["systemd:domain=INET:name=http"]\n'
        '  https: ["systemd:domain=INET:name=https"]\n'
        f'  admin: ["tcp:{admin}:interface=127.0.0.1"]\n',
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l", f"127.0.0.1:{http_port}",
                "-l", f"127.0.0.1:{https_port}",
                "--fdname=http:https",
                sys.executable, "-m", "proxy", "run", "-c", str(config),
            ],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        # systemd-socket-activate starts the service at the first connection, which the
        # service then answers from the socket it was handed.
        wait_until(lambda: socket.create_connection(("127.0.0.1", http_port), timeout=1).close() or True,
                   "the activation socket", proc=proc, log=log)
        status = wait_until(lambda: challenge_over_http("127.0.0.1", http_port), "a response over the http socket",
                            proc=proc, log=log)
        assert status == (200, f"{TOKEN}.thumbprint".encode())
        cafile = tmp_path / "state" / "certs" / DOMAIN / "self-signed.pem"
        assert challenge_over_https("127.0.0.1", https_port, cafile) == (200, f"{TOKEN}.thumbprint".encode())
        assert os.path.exists(cafile)
        if workers > 1:
            # Every worker serves the sockets systemd handed to the parent.
            wait_until(lambda: served_by_every_worker(admin, http_port, workers), "every worker serving",
                       proc=proc, log=log)
    finally:
        stop(proc)


def served_by_every_worker(admin: int, port: int, workers: int) -> bool:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(20) as pool:
        assert set(pool.map(lambda _: challenge_over_http("127.0.0.1", port)[0], range(40))) == {200}
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    seen = {line.split('worker="', 1)[1].split('"', 1)[0] for line in text.splitlines()
            if line.startswith("trackproxy_requests_total{") and 'worker="' in line}
    return len(seen) == workers


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_sessions_resume_on_a_domain_chosen_by_sni(tmp_path, version):
    https, admin = free_port(), free_port()
    config = write_config(
        tmp_path,
        "listen:\n  http: []\n"
        f'  https: ["tcp:{https}:interface=127.0.0.1"]\n'
        f'  admin: ["tcp:{admin}:interface=127.0.0.1"]\n',
    )
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: healthy(admin), "/healthz", proc=proc, log=log)
        context = ssl.create_default_context(cafile=str(tmp_path / "state" / "certs" / DOMAIN / "self-signed.pem"))
        context.minimum_version = context.maximum_version = version
        session, resumed = fetch_challenge_tls(https, context)
        assert session is not None and not resumed
        _, resumed = fetch_challenge_tls(https, context, session=session)
        assert resumed
    finally:
        stop(proc)
