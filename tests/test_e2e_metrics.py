"""End-to-end: every metric of README "Metrics", after real traffic through ``trackproxy run``.

``/metrics`` is parsed with prometheus-client's own parser. The names, types and label
sets are exactly README "Metrics"'s; the values follow the traffic sent; label values never
carry a path, a client address or a host name that is not configured.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.testing import LocalCA

from observe import poll, scrape
from proxy_process import ProxyProcess, start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS, connect, request

TRACK = "track.example.test"
OWN = "own.example.test"

#: README "Metrics": name -> (type, label names).
SPEC_METRICS = {
    "trackproxy_requests": ("counter", {"domain", "scheme", "method", "code", "cache"}),
    "trackproxy_request_duration_seconds": ("histogram", {"domain", "cache"}),
    "trackproxy_upstream_requests": ("counter", {"upstream", "outcome"}),
    "trackproxy_upstream_duration_seconds": ("histogram", {"upstream"}),
    "trackproxy_cache_entries": ("gauge", set()),
    "trackproxy_cache_bytes": ("gauge", set()),
    "trackproxy_cache_evictions": ("counter", set()),
    "trackproxy_certificate_expiry_timestamp_seconds": ("gauge", {"domain"}),
    "trackproxy_certificate_status": ("gauge", {"domain", "status"}),
    "trackproxy_certificate_renewals": ("counter", {"domain", "result"}),
    "trackproxy_config_reloads": ("counter", {"result"}),
    "trackproxy_config_last_reload_success": ("gauge", set()),
    "trackproxy_tls_handshake_failures": ("counter", {"reason"}),
    "trackproxy_open_connections": ("gauge", {"listener"}),
}
HISTOGRAM_LABELS = {"le"}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn
) -> Iterator[ProxyProcess]:
    own_cert, own_key = ca.issue(OWN)
    running = start_proxy(
        tmp_path_factory.mktemp("metrics"),
        {
            "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
            "domains": {
                TRACK: {"certificate": "self-signed"},
                OWN: {"certificate": {"cert": "own.pem", "key": "own.key"}},
            },
        },
        files={"own.pem": own_cert, "own.key": own_key},
    )
    yield running
    running.stop()


def families(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def handshake(port: int, sni: str | None) -> None:
    """A handshake the proxy is expected to refuse."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(port, TLS(sni)).close()


def test_every_spec_metric_is_exported_with_its_type_and_labels(proxy: ProxyProcess, ca: LocalCA) -> None:
    request(proxy.https_port, OWN, "/f/types", tls=TLS(OWN, ca.cert_path))
    found = families(proxy.admin_port)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in found, f"{name} missing"
        family = found[name]
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            assert set(sample.labels) - HISTOGRAM_LABELS == labels, (name, sample)


def test_values_follow_real_traffic(proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn) -> None:
    before = scrape(proxy.admin_port)
    for _ in range(3):
        assert request(proxy.https_port, OWN, "/f/counted", tls=TLS(OWN, ca.cert_path)).status == 302
    assert request(proxy.http_port, "nobody.example.test", "/f/x").status == 404
    after = scrape(proxy.admin_port)

    def grew(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    # The first request is a miss, the two repeats are hits (10 s default cache).
    assert grew("trackproxy_requests_total", domain=OWN, scheme="https", method="GET", code="302") == 3
    assert grew("trackproxy_requests_total", domain=OWN, cache="hit") == 2
    assert grew("trackproxy_requests_total", domain="_unknown", code="404") == 1
    assert grew("trackproxy_upstream_requests_total", upstream="sparkpost", outcome="ok") == 1
    assert grew("trackproxy_request_duration_seconds_count", domain=OWN) == 3
    assert after.total("trackproxy_cache_entries") >= 1
    assert after.total("trackproxy_config_last_reload_success") == 1

    served = x509.load_pem_x509_certificate((proxy.config_path.parent / "own.pem").read_bytes())
    assert after.total("trackproxy_certificate_expiry_timestamp_seconds", domain=OWN) == (
        served.not_valid_after_utc.timestamp()
    )
    assert after.total("trackproxy_certificate_status", domain=OWN, status="valid") == 1
    assert after.total("trackproxy_certificate_status", domain=OWN) == 1  # exactly one status


@pytest.mark.parametrize(
    "reason, attempt",
    [
        ("unknown_sni", lambda port: handshake(port, "stranger.example.test")),
        ("no_sni", lambda port: handshake(port, None)),
        ("protocol_version", lambda port: _old_tls_to(port)),
        ("not_tls", lambda port: _plain_http_to(port)),
    ],
)
def test_failed_handshakes_are_counted_by_reason(proxy: ProxyProcess, reason: str, attempt: Any) -> None:
    before = scrape(proxy.admin_port).total("trackproxy_tls_handshake_failures_total", reason=reason)
    attempt(proxy.https_port)
    poll(
        lambda: scrape(proxy.admin_port).total("trackproxy_tls_handshake_failures_total", reason=reason)
        == before + 1,
        5, f"a {reason} handshake failure to be counted",
    )


def _old_tls_to(port: int) -> None:
    """A TLS 1.1 client (wire.TLS lets OpenSSL offer it, so the server is what refuses)."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(port, TLS(TRACK, maximum_version=ssl.TLSVersion.TLSv1_1)).close()


def _plain_http_to(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        while sock.recv(4096):
            pass


def test_a_client_that_connects_and_leaves_is_not_a_handshake_failure(proxy: ProxyProcess) -> None:
    before = scrape(proxy.admin_port).total("trackproxy_tls_handshake_failures_total")
    socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5).close()
    # A real failure after it: once that one is counted, the silent one has been seen too.
    handshake(proxy.https_port, "stranger.example.test")
    poll(
        lambda: scrape(proxy.admin_port).total("trackproxy_tls_handshake_failures_total") > before,
        5, "the refused handshake to be counted",
    )
    assert scrape(proxy.admin_port).total("trackproxy_tls_handshake_failures_total") == before + 1


def test_open_connections_are_counted_per_listener(proxy: ProxyProcess, ca: LocalCA) -> None:
    def open_now(listener: str) -> float:
        return scrape(proxy.admin_port).total("trackproxy_open_connections", listener=listener)

    base_http, base_https = open_now("http"), open_now("https")
    held = [socket.create_connection(("127.0.0.1", proxy.http_port), timeout=5) for _ in range(3)]
    held.append(connect(proxy.https_port, TLS(OWN, ca.cert_path)))
    try:
        poll(lambda: open_now("http") == base_http + 3 and open_now("https") == base_https + 1,
             5, "held connections to be counted")
    finally:
        for sock in held:
            sock.close()
    poll(lambda: open_now("http") == base_http and open_now("https") == base_https,
         5, "closed connections to be uncounted")
    assert open_now("admin") >= 1  # the scrape itself


def test_label_values_never_carry_paths_addresses_or_unconfigured_names(proxy: ProxyProcess) -> None:
    secret = "/f/recipient@example.org/zzsecret"
    request(proxy.http_port, "attacker-chosen.example.test", secret)
    request(proxy.http_port, TRACK, "/f/other@example.org?u=zzsecret2")
    text = scrape(proxy.admin_port).text
    for leak in ("zzsecret", "recipient", "attacker-chosen", "127.0.0.1", "@example.org"):
        assert leak not in text, leak
    domains = scrape(proxy.admin_port).label_values("trackproxy_requests_total", "domain")
    assert domains <= {TRACK, OWN, "_unknown"}


def test_promtool_finds_nothing_to_complain_about(proxy: ProxyProcess) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool missing (Debian package prometheus)")
    text = scrape(proxy.admin_port).text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and checked.stdout.strip() == "" and checked.stderr.strip() == "", (
        checked.stdout + checked.stderr
    )
