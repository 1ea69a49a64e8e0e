"""The stand-in platform (``trackproxy stand-in``): its answers, its certificates, its TLS.

In memory (``StringTransport`` and ``Clock``) for what it answers; as a real process on
loopback, with real TLS, for what a client and the proxy meet: SNI required, the
platform's 302, and a printed line with what the request carried.
"""

from __future__ import annotations

import datetime
import io
import re
import shlex
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy import standin

from observe import poll
from proxy_process import REPO_ROOT, free_port
from wire import TLS, request


def exchange(data: bytes, delay: float = 0.0, clock: Clock | None = None) -> tuple[StringTransport, io.StringIO]:
    clock = clock or Clock()
    out = io.StringIO()
    protocol = standin.StandIn(clock, delay, out).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    return transport, out


def answers(raw: bytes) -> list[bytes]:
    """The status lines in ``raw``, in order."""
    return re.findall(rb"HTTP/1\.1 [0-9]{3} [^\r]*", raw)


def test_a_click_gets_the_platforms_redirect_and_an_open_gets_a_pixel():
    transport, _ = exchange(
        b"GET /f/abc HTTP/1.1\r\nHost: t.example\r\n\r\n"
        b"GET /q/abc HTTP/1.1\r\nHost: t.example\r\n\r\n"
        b"GET /other HTTP/1.1\r\nHost: t.example\r\nConnection: close\r\n\r\n"
    )
    raw = transport.value()
    assert answers(raw) == [b"HTTP/1.1 302 Found", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"]
    assert raw.count(b"Server: msys-http\r\n") == 3
    assert b"Location: https://example.com/landing\r\n" in raw
    assert b"Content-Type: image/gif\r\n" in raw and standin.PIXEL in raw
    assert transport.disconnecting, "Connection: close is honoured"


def test_pipelined_requests_are_answered_in_order_each_after_the_delay():
    clock = Clock()
    transport, out = exchange(
        b"GET /f/1 HTTP/1.1\r\nHost: a\r\n\r\nGET /q/2 HTTP/1.1\r\nHost: a\r\n\r\n", delay=0.05, clock=clock
    )
    assert transport.value() == b""
    clock.advance(0.05)
    assert answers(transport.value()) == [b"HTTP/1.1 302 Found"]
    clock.advance(0.05)
    assert answers(transport.value()) == [b"HTTP/1.1 302 Found", b"HTTP/1.1 200 OK"]
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["/f/1", "/q/2"]


def test_head_has_the_length_but_no_body():
    transport, _ = exchange(b"HEAD /q/1 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % len(standin.PIXEL) in head and body == b""


def test_bad_framing_gets_400_and_a_closed_connection():
    transport, _ = exchange(b"GET /f/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert answers(transport.value()) == [b"HTTP/1.1 400 Bad Request"] and transport.disconnecting


def test_the_printed_line_names_what_the_platform_relies_on():
    _, out = exchange(
        b"GET /f/x HTTP/1.1\r\nHost: track.example.test\r\nUser-Agent: Mozilla/5.0 (X11)\r\n"
        b"X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    fields = shlex.split(out.getvalue())
    assert fields[:2] == ["GET", "/f/x"]
    assert {"host=track.example.test", "sni=-", "user-agent=Mozilla/5.0 (X11)",
            "x-forwarded-for=198.51.100.7", "x-forwarded-proto=https", "302"} <= set(fields)


def test_certificates_are_made_once_and_kept(tmp_path):
    first = standin.ensure_certificates(str(tmp_path), "spgo.io")
    ca_pem = Path(first.ca).read_bytes()
    assert oct(Path(first.key).stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / standin.CA_KEY).stat().st_mode & 0o777) == "0o600"
    again = standin.ensure_certificates(str(tmp_path), "spgo.io")
    assert again == first and Path(again.ca).read_bytes() == ca_pem, "a ca_file pointing here stays good"
    leaf = x509.load_pem_x509_certificate(Path(first.cert).read_bytes())
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))


def test_certificates_near_their_end_are_made_again(tmp_path):
    files = standin.ensure_certificates(str(tmp_path), "spgo.io")
    leaf_before = Path(files.cert).read_bytes()
    later = datetime.datetime.now(datetime.UTC) + standin.LEAF_LIFETIME - datetime.timedelta(days=1)
    standin.ensure_certificates(str(tmp_path), "spgo.io", now=later)
    assert Path(files.cert).read_bytes() != leaf_before
    other = standin.ensure_certificates(str(tmp_path), "eu.spgo.io")
    assert other.ca == files.ca and other.cert != files.cert


# ---------------------------------------------------------------------------
# As a process, over real TLS


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """``trackproxy stand-in`` on a free port: (port, its CA file, its output file)."""
    directory = tmp_path_factory.mktemp("stand-in")
    port = free_port()
    log = directory / "out.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "stand-in", "--port", str(port), "--dir", str(directory / "pki")],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        poll(lambda: process.poll() is None and b"listening on" in log.read_bytes() or process.poll() is not None,
             15, "the stand-in to start")
        assert process.poll() is None, log.read_text()
        yield port, directory / "pki" / "ca.pem", log
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_it_serves_its_name_with_a_certificate_from_its_ca(running):
    port, ca_file, log = running
    answer = request(port, "track.example.test", "/f/a/b/c/d", tls=TLS("spgo.io", ca_file),
                     headers=[("User-Agent", "probe/1"), ("X-Forwarded-For", "203.0.113.9")])
    assert answer.status == 302 and answer.header("Server") == "msys-http"
    assert answer.header("Location") == standin.LANDING_URL.decode()
    poll(lambda: b"x-forwarded-for=203.0.113.9" in log.read_bytes(), 5, "the request line printed")
    line = next(line for line in log.read_text().splitlines() if "203.0.113.9" in line)
    assert {"host=track.example.test", "sni=spgo.io", "user-agent=probe/1"} <= set(shlex.split(line))


@pytest.mark.parametrize("sni", ["sendgrid.net", None], ids=["other-name", "no-sni"])
def test_any_other_sni_is_refused_with_unrecognized_name(running, sni):
    port, ca_file, _ = running
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            context.wrap_socket(sock, server_hostname=sni)


def test_a_busy_port_is_a_clear_error(running):
    port, _, _ = running
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "stand-in", "--port", str(port), "--dir", str(running[1].parent)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
