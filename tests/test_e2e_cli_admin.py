"""End to end: the CLI talks to its own proxy, and status shows the platform's health.

Real processes: ``trackproxy stand-in`` as the platform, ``trackproxy run`` in front of
it, and ``trackproxy status|reload`` as an operator runs them.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from observe import poll, scrape
from proxy_process import LOOPBACK, REPO_ROOT, ProxyProcess, free_port, run_trackproxy, start_proxy
from wire import request

TRACK = "track.example.test"


class StandInProcess:
    """``trackproxy stand-in`` as a child process."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.log = directory / "stand-in.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "stand-in", "--port", str(self.port), "--dir", str(directory / "pki")],
                cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        poll(lambda: b"listening on" in self.log.read_bytes() or self.process.poll() is not None,
             15, "the stand-in to start")
        assert self.process.poll() is None, self.log.read_text()

    @property
    def ca_file(self) -> Path:
        return self.directory / "pki" / "ca.pem"

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.startswith(("GET", "HEAD", "POST"))]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[StandInProcess]:
    running = StandInProcess(tmp_path)
    yield running
    running.stop()


def proxy_for(directory: Path, stand_in: StandInProcess, **extra) -> ProxyProcess:
    config = {
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": f"{LOOPBACK}:{stand_in.port}", "ca_file": str(stand_in.ca_file)}},
        "domains": {TRACK: {}},
        **extra,
    }
    return start_proxy(directory, config)


def status_json(proxy: ProxyProcess) -> dict:
    result = run_trackproxy("status", "-c", str(proxy.config_path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_what_the_stand_in_records_is_what_the_proxy_sent(tmp_path, stand_in):
    proxy = proxy_for(tmp_path / "proxy", stand_in)
    try:
        answer = request(proxy.http_port, TRACK, "/f/recorded", headers=[("User-Agent", "Mail/1.0 (Mac)"),
                                                                          ("X-Forwarded-For", "6.6.6.6")])
        assert answer.status == 302 and answer.header("Server") == "msys-http"
        poll(stand_in.lines, 5, "the stand-in's line")
        fields = stand_in.lines()[-1]
        # Host kept, User-Agent kept, X-Forwarded-For replaced by the real peer, SNI = the platform.
        for expected in ("/f/recorded", f"host={TRACK}", "sni=spgo.io", "user-agent='Mail/1.0 (Mac)'",
                         "x-forwarded-for=127.0.0.1", "x-forwarded-proto=http"):
            assert expected in fields, fields
    finally:
        proxy.stop()


def test_status_shows_the_upstream_failing_once_the_platform_is_gone(tmp_path, stand_in):
    proxy = proxy_for(tmp_path / "proxy", stand_in)
    try:
        assert request(proxy.http_port, TRACK, "/f/before").status == 302
        health = status_json(proxy)["domains"][TRACK]["upstream_health"]
        assert health == {"last_error": None, "last_error_at": None, "failed_ratio_5m": 0.0}
        stand_in.stop()
        assert request(proxy.http_port, TRACK, "/f/after").status == 502
        health = status_json(proxy)["domains"][TRACK]["upstream_health"]
        assert health["last_error"].startswith("connect_error: "), health
        assert health["last_error_at"] is not None and health["failed_ratio_5m"] == 0.5
        table = run_trackproxy("status", "-c", str(proxy.config_path))
        assert table.returncode == 0, table.stderr
        row = next(line for line in table.stdout.splitlines() if line.startswith(TRACK))
        assert "50% failed (5m)" in row
        assert f"{TRACK}: upstream sparkpost last failed at {health['last_error_at']}: connect_error: " in table.stdout
    finally:
        proxy.stop()


def test_the_cli_refuses_a_proxy_that_serves_another_config(tmp_path, stand_in):
    proxy = proxy_for(tmp_path / "proxy", stand_in)
    try:
        other = tmp_path / "other.yaml"
        mine = yaml.safe_load(proxy.config_path.read_text())
        mine["domains"] = {"other.example.test": {}}
        other.write_text(yaml.safe_dump(mine))
        before = scrape(proxy.admin_port).total("trackproxy_config_reloads_total")
        for command in (["status"], ["reload"]):
            result = run_trackproxy(*command, "-c", str(other))
            assert result.returncode == 1, (command, result.stdout)
            assert f"serves {proxy.config_path}, not {other}" in result.stderr, result.stderr
        assert scrape(proxy.admin_port).total("trackproxy_config_reloads_total") == before, "nothing reloaded"
        own = run_trackproxy("reload", "-c", str(proxy.config_path))
        assert own.returncode == 0, own.stderr
    finally:
        proxy.stop()


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


def test_the_cli_refuses_another_program_on_the_admin_port(tmp_path):
    server = HTTPServer((LOOPBACK, 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "t.yaml"
        path.write_text(
            f"listen: {{admin: ['tcp:{server.server_address[1]}:interface=127.0.0.1']}}\n"
            "domains: {track.example.test: {}}\n"
        )
        result = run_trackproxy("status", "-c", str(path))
        assert result.returncode == 1
        assert "is not a trackproxy admin listener" in result.stderr, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_reload_answers_422_unprocessable_content(tmp_path, stand_in):
    proxy = proxy_for(tmp_path / "proxy", stand_in)
    try:
        proxy.config_path.write_text(proxy.config_path.read_text() + "\nnonsense: 1\n")
        connection = http.client.HTTPConnection(LOOPBACK, proxy.admin_port, timeout=30)
        connection.request("POST", "/reload")
        answer = connection.getresponse()
        assert (answer.status, answer.reason) == (422, "Unprocessable Content")
        assert "unknown key 'nonsense'" in json.loads(answer.read())["errors"][0]
    finally:
        proxy.stop()
