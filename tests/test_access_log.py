"""The access log: one JSON line per request, recipients' paths redacted by default."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from proxy.access import KEY_FILE, AccessLog, load_or_create_key, redact
from proxy.testing import LocalCA

from proxy_process import start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS, request

KEY = b"k" * 32


@pytest.mark.parametrize(
    "target, shape",
    [
        (b"/", "/"),
        (b"/favicon.ico", "/favicon.ico"),
        (b"/f/", "/f/"),
        (b"/f/a/b/c/d", "/f/~"),
        (b"/q?u=someone@example.org", "/q~"),
        (b"/f/eyJyIjoicmVjaXBpZW50In0/x?y=1", "/f/~"),
    ],
)
def test_redaction_keeps_the_first_segment_and_hashes_the_rest(target: bytes, shape: str) -> None:
    redacted = redact(target, KEY)
    assert redacted.startswith(shape)
    if shape.endswith("~"):
        assert len(redacted) == len(shape) + 12
        secret = target.split(b"/", 2)[-1] if target.count(b"/") > 1 else target.split(b"?")[1]
        assert secret.decode() not in redacted


def test_the_same_url_logs_the_same_hash_and_another_key_another() -> None:
    assert redact(b"/f/abc", KEY) == redact(b"/f/abc", KEY)
    assert redact(b"/f/abc", KEY) != redact(b"/f/abd", KEY)
    assert redact(b"/f/abc", KEY) != redact(b"/f/abc", b"x" * 32)


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key = load_or_create_key(str(tmp_path))
    assert len(key) == 32
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert load_or_create_key(str(tmp_path)) == key


def test_a_line_has_the_fields_an_operator_reads() -> None:
    stream = io.StringIO()
    access_log = AccessLog(stream, False, KEY, wall_clock=lambda: 0)
    access_log.record(
        domain="track.example.test", scheme=b"https", method=b"GET", target=b"/f/secret",
        status=302, cache="hit", size=0, seconds=0.0015, client="192.0.2.1",
    )
    access_log.flush()
    line = json.loads(stream.getvalue())
    assert line == {
        "time": "1970-01-01T00:00:00Z", "level": "info", "namespace": "trackproxy.access",
        "domain": "track.example.test", "scheme": "https", "method": "GET",
        "path": redact(b"/f/secret", KEY), "status": 302, "cache": "hit", "bytes": 0,
        "duration_ms": 1.5, "client": "192.0.2.1",
    }


def access_lines(log: str) -> list[dict]:
    lines = []
    for text in log.splitlines():
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if record.get("namespace") == "trackproxy.access":
            lines.append(record)
    return lines


@pytest.mark.parametrize("log_paths", ["redacted", "full"])
def test_the_running_proxy_logs_each_request(
    tmp_path: Path, ca: LocalCA, upstream: UpstreamStandIn, log_paths: str
) -> None:
    proxy = start_proxy(
        tmp_path,
        {
            "log_paths": log_paths,
            "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
            "domains": {"track.example.test": {"certificate": "self-signed"}},
        },
    )
    try:
        secret = "/f/recipient-at-example-org/c/d?u=zzsecret"
        assert request(proxy.http_port, "track.example.test", secret).status == 302
        assert request(proxy.http_port, "nobody.example.test", "/f/x").status == 404
        pem = proxy.certificate_path("track.example.test")
        assert request(proxy.https_port, "track.example.test", secret, tls=TLS("track.example.test", pem)).status == 302
    finally:
        proxy.stop()
    log = proxy.log_path.read_text()
    lines = access_lines(log)
    assert [(r["domain"], r["scheme"], r["status"]) for r in lines] == [
        ("track.example.test", "http", 302), ("_unknown", "http", 404), ("track.example.test", "https", 302),
    ]
    assert all(r["client"] == "127.0.0.1" and r["method"] == "GET" for r in lines)
    if log_paths == "redacted":
        assert "zzsecret" not in log and "recipient-at-example-org" not in log
        assert lines[0]["path"].startswith("/f/~") and lines[0]["path"] == lines[2]["path"]
    else:
        assert lines[0]["path"] == secret


def record(access_log: AccessLog, target: bytes = b"/f/x") -> None:
    access_log.record(domain="track.example.test", scheme=b"http", method=b"GET", target=target,
                      status=302, cache="miss", size=5, seconds=0.001, client="192.0.2.1")


def test_lines_are_written_in_batches_within_a_quarter_second() -> None:
    from twisted.internet.task import Clock

    from proxy.access import FLUSH_DELAY

    clock, stream = Clock(), io.StringIO()
    access_log = AccessLog(stream, False, KEY, wall_clock=clock.seconds, call_later=clock.callLater)
    for _ in range(3):
        record(access_log)
    assert stream.getvalue() == ""
    clock.advance(FLUSH_DELAY)
    assert len(stream.getvalue().splitlines()) == 3
    assert clock.getDelayedCalls() == []


def test_a_full_batch_is_written_at_once_so_memory_stays_bounded() -> None:
    from proxy.access import FLUSH_BYTES

    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Counting()
    access_log = AccessLog(stream, False, KEY)
    for i in range(5000):
        record(access_log, b"/f/%d" % i)
        assert access_log._pending_bytes < FLUSH_BYTES
    access_log.flush()
    assert len(stream.getvalue().splitlines()) == 5000
    assert stream.writes < 5000 / 50, "one write per batch, not per line"


def test_the_redacted_form_is_remembered_per_target_and_the_cache_stays_bounded() -> None:
    from proxy.access import PATH_CACHE

    access_log = AccessLog(io.StringIO(), False, KEY)
    for i in range(PATH_CACHE * 3):
        record(access_log, b"/f/%d" % i)
    assert len(access_log._paths) <= PATH_CACHE
