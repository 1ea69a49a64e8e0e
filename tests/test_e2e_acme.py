"""End-to-end: the proxy gets and renews its own certificates from a real ACME server.

The real pieces: ``trackproxy run`` as a process, Debian's pebble as the CA, pebble's
DNS (``pebble-challtestsrv``) as the only resolver (for pebble and for the proxy's
pre-flight checks), the real certbot with the trackproxy plugin, started by the proxy.
Pebble validates HTTP-01 against the proxy's plain-HTTP listener.

One proxy serves the module, with three ``certificate: acme`` domains that end three
ways: one whose DNS reaches the proxy (``valid``), one whose DNS points elsewhere
(``failed`` with the CA's reason, then back-off), and one whose CAA forbids every CA
(``unavailable``, the CA never asked). Tests that need their own proxy start one.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.testing import LocalCA

from observe import poll, scrape
from pebble import Pebble, require_pebble
from proxy_process import ProxyProcess, free_port, run_trackproxy, start_proxy
from standin_upstream import LANDING_URL, UpstreamStandIn
from wire import TLS, connect, keep_alive_get, request

GOOD = "track.example.test"  # DNS -> 127.0.0.1, the proxy
ELSEWHERE = "lost.example.test"  # DNS -> 127.0.0.2, where nothing answers pebble
FORBIDDEN = "caa.example.test"  # CAA: issue ";" (no CA may issue)
ISSUANCE_WITHIN = 60.0


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    require_pebble()
    directory = tmp_path_factory.mktemp("pebble")
    with Pebble(directory, http_port=free_port()) as server:
        server.set_address(ELSEWHERE, "127.0.0.2")
        server.add_caa(FORBIDDEN, ";")
        yield server


def acme_config(pebble: Pebble, ca: LocalCA, upstream: UpstreamStandIn, domains: dict[str, Any]) -> dict[str, Any]:
    return {
        "acme": {"server": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle), "renew_before": "30d"},
        "resolvers": [pebble.dns_server],
        "defaults": {"cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": domains,
    }


@pytest.fixture(scope="module")
def managed(
    tmp_path_factory: pytest.TempPathFactory, pebble: Pebble, ca: LocalCA, upstream: UpstreamStandIn
) -> Iterator[tuple[ProxyProcess, dict[str, Any]]]:
    """The proxy, and its ``/status`` as first seen once it was up."""
    domains = {name: {"certificate": "acme"} for name in (GOOD, ELSEWHERE, FORBIDDEN)}
    proxy = start_proxy(
        tmp_path_factory.mktemp("managed"),
        acme_config(pebble, ca, upstream, domains),
        http_port=pebble.http_port,
    )
    try:
        first = status(proxy)
        yield proxy, first
    finally:
        proxy.stop()


def status(proxy: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/status", timeout=5) as answer:
        return json.load(answer)


def certificate(proxy: ProxyProcess, domain: str) -> dict[str, Any]:
    return status(proxy)["domains"][domain]["certificate"]


def settled(proxy: ProxyProcess, domain: str, pebble: Pebble) -> dict[str, Any]:
    """The domain's certificate status once no certbot run is under way for it."""
    def check() -> dict[str, Any] | None:
        cert = certificate(proxy, domain)
        return cert if cert["status"] != "pending" else None

    try:
        return poll(check, ISSUANCE_WITHIN, f"{domain} to leave pending", interval=0.2)
    except TimeoutError:
        raise AssertionError(f"proxy log:\n{proxy.log_tail()}\npebble:\n{pebble.log_tail()}") from None


def pebble_roots(pebble: Pebble, directory: Path) -> Path:
    """pebble's root, to verify what the proxy serves (its fullchain carries the intermediate)."""
    path = directory / "pebble-root.pem"
    path.write_text(pebble.root_pem())
    return path


def served_certificate(proxy: ProxyProcess, domain: str, roots: Path) -> x509.Certificate:
    """The certificate the proxy's HTTPS listener presents for ``domain``, verified
    against pebble's root and for the name."""
    with connect(proxy.https_port, TLS(domain, roots)) as sock:
        return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))


def test_a_new_acme_domain_goes_pending_then_valid_and_https_serves_pebbles_certificate(
    managed: tuple[ProxyProcess, dict[str, Any]], pebble: Pebble, tmp_path: Path
) -> None:
    proxy, first = managed
    assert first["domains"][GOOD]["certificate"]["status"] == "pending"
    cert = settled(proxy, GOOD, pebble)
    assert cert["status"] == "valid", cert
    assert cert["source"] == "acme" and cert["last_error"] is None

    served = served_certificate(proxy, GOOD, pebble_roots(pebble, tmp_path))
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [GOOD]
    assert cert["not_after"] == served.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    key = proxy.state_dir / "certs" / GOOD / "privkey.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not os.listdir(proxy.state_dir / "acme-challenge"), "challenge answers left behind"

    metrics = scrape(proxy.admin_port)
    assert metrics.total("trackproxy_certificate_status", domain=GOOD, status="valid") == 1
    assert metrics.total("trackproxy_certificate_status", domain=GOOD, status="pending") == 0
    assert metrics.total("trackproxy_certificate_expiry_timestamp_seconds", domain=GOOD) == (
        served.not_valid_after_utc.timestamp()
    )
    assert metrics.total("trackproxy_certificate_renewals_total", domain=GOOD, result="success") == 1


def test_requests_are_served_with_the_issued_certificate(
    managed: tuple[ProxyProcess, dict[str, Any]], pebble: Pebble, upstream: UpstreamStandIn, tmp_path: Path
) -> None:
    proxy, _ = managed
    assert settled(proxy, GOOD, pebble)["status"] == "valid"
    answer = request(
        proxy.https_port, GOOD, "/f/a/b/c/d", tls=TLS(GOOD, pebble_roots(pebble, tmp_path))
    )
    assert answer.status == 302 and answer.header("Location") == LANDING_URL


def test_a_domain_whose_dns_does_not_reach_the_proxy_fails_with_the_cas_reason_and_backs_off(
    managed: tuple[ProxyProcess, dict[str, Any]], pebble: Pebble
) -> None:
    proxy, _ = managed
    cert = settled(proxy, ELSEWHERE, pebble)
    assert cert["status"] == "failed", cert
    # Pebble's own words: it could not fetch the token from 127.0.0.2.
    assert "127.0.0.2" in cert["last_error"] and "connection" in cert["last_error"].lower(), cert
    next_renewal = time.mktime(time.strptime(cert["next_renewal"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert next_renewal - time.time() > 4 * 60, "no back-off after a failure"
    assert scrape(proxy.admin_port).total(
        "trackproxy_certificate_renewals_total", domain=ELSEWHERE, result="failure"
    ) == 1

    # Reloads and periodic checks come and go: within the back-off, the CA is not asked again.
    for _ in range(3):
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}/reload", method="POST"), timeout=30
        ) as answer:
            assert answer.status == 200
    assert settled(proxy, ELSEWHERE, pebble)["status"] == "failed"
    assert scrape(proxy.admin_port).total(
        "trackproxy_certificate_renewals_total", domain=ELSEWHERE, result="failure"
    ) == 1
    assert proxy.log_tail(400).count(f"requesting a certificate for {ELSEWHERE}") == 1

    # The failure and its back-off are kept in state_dir, for the next start.
    remembered = json.loads((proxy.state_dir / "status.json").read_text())["domains"][ELSEWHERE]
    assert remembered["failures"] == 1 and remembered["next_attempt"] > time.time() + 4 * 60


def test_a_domain_whose_caa_forbids_the_ca_is_unavailable_and_the_ca_is_never_asked(
    managed: tuple[ProxyProcess, dict[str, Any]], pebble: Pebble
) -> None:
    proxy, _ = managed
    cert = settled(proxy, FORBIDDEN, pebble)
    assert cert["status"] == "unavailable", cert
    assert "CAA" in cert["last_error"], cert
    assert f"requesting a certificate for {FORBIDDEN}" not in proxy.log_tail(400)
    assert scrape(proxy.admin_port).total(
        "trackproxy_certificate_status", domain=FORBIDDEN, status="unavailable"
    ) == 1


def test_a_forced_renewal_serves_a_new_serial_without_restart_and_open_connections_keep_working(
    managed: tuple[ProxyProcess, dict[str, Any]], pebble: Pebble, tmp_path: Path
) -> None:
    proxy, _ = managed
    assert settled(proxy, GOOD, pebble)["status"] == "valid"
    roots = pebble_roots(pebble, tmp_path)
    before = served_certificate(proxy, GOOD, roots)

    opened = connect(proxy.https_port, TLS(GOOD, roots))
    try:
        assert keep_alive_get(opened, GOOD) == 302

        # Not due (pebble's certificates last years; renew_before is 30 days): nothing to do.
        idle = run_trackproxy("certs", "-c", str(proxy.config_path), "renew", GOOD)
        assert idle.returncode == 0, idle.stderr
        assert "not due" in idle.stdout
        assert served_certificate(proxy, GOOD, roots).serial_number == before.serial_number

        forced = run_trackproxy("certs", "-c", str(proxy.config_path), "renew", "--force", GOOD)
        assert forced.returncode == 0, forced.stdout + forced.stderr + proxy.log_tail()

        after = served_certificate(proxy, GOOD, roots)
        assert after.serial_number != before.serial_number
        assert proxy.process.poll() is None, "the proxy restarted"
        # The connection made before the renewal still carries requests.
        assert keep_alive_get(opened, GOOD) == 302
        assert opened.getpeercert(binary_form=True) == before.public_bytes(Encoding.DER)
    finally:
        opened.close()
    assert certificate(proxy, GOOD)["not_after"] == after.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")






def test_a_restart_remembers_a_failure_and_its_back_off(
    tmp_path: Path, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    require_pebble()
    # Its own pebble: the module's proxy holds the other one's HTTP-01 port.
    with Pebble(tmp_path / "pebble", http_port=free_port()) as pebble:
        pebble.set_address(ELSEWHERE, "127.0.0.2")
        directory = tmp_path / "proxy"
        config = acme_config(pebble, ca, upstream, {ELSEWHERE: {"certificate": "acme"}})
        proxy = start_proxy(directory, config, http_port=pebble.http_port)
        try:
            first = settled(proxy, ELSEWHERE, pebble)
            assert first["status"] == "failed"
        finally:
            proxy.stop()
        proxy = start_proxy(directory, {**config, "state_dir": str(proxy.state_dir)}, http_port=pebble.http_port)
        try:
            again = certificate(proxy, ELSEWHERE)
            assert again["status"] == "failed" and again["last_error"] == first["last_error"]
            assert again["next_renewal"] == first["next_renewal"]
            assert f"requesting a certificate for {ELSEWHERE}" not in proxy.log_tail(200)
        finally:
            proxy.stop()


def test_certbot_killed_in_the_middle_leaves_nothing_half_loaded_and_the_next_attempt_recovers(
    tmp_path: Path, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    import signal

    from proxy_process import children

    require_pebble()
    with Pebble(tmp_path / "pebble", http_port=free_port()) as pebble:
        config = acme_config(pebble, ca, upstream, {GOOD: {"certificate": "acme"}})
        proxy = start_proxy(tmp_path / "proxy", config, http_port=pebble.http_port)
        try:
            challenges = proxy.state_dir / "acme-challenge"
            # certbot is validating (its answer is on disk): kill it there.
            poll(lambda: any(challenges.iterdir()), ISSUANCE_WITHIN, "certbot's challenge answer", interval=0.02)
            certbot = [pid for pid in children(proxy.process.pid)
                       if b"certbot" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            assert certbot, "the proxy's certbot"
            os.kill(certbot[0], signal.SIGKILL)
            crashed = poll(lambda: (c := certificate(proxy, GOOD))["status"] != "pending" and c, 30,
                           "the crashed attempt recorded", interval=0.1)
            assert crashed["status"] == "failed" and crashed["last_error"], crashed
            deployed = proxy.state_dir / "certs" / GOOD
            assert not (deployed / "fullchain.pem").exists(), "nothing was installed"
            assert not any(p.name.startswith(".tmp") for p in proxy.state_dir.rglob("*"))

            # The next attempt (an operator's, the proxy's waits out its back-off) recovers.
            again = run_trackproxy("certs", "-c", str(proxy.config_path), "issue", GOOD)
            assert again.returncode == 0, again.stdout + again.stderr
            roots = pebble_roots(pebble, tmp_path)
            assert poll(lambda: certificate(proxy, GOOD)["status"] == "valid", 20, "valid after the retry")
            assert GOOD in served_certificate(proxy, GOOD, roots).subject.rfc4514_string()
            assert sorted(p.name for p in deployed.iterdir()) == ["fullchain.pem", "privkey.pem"]
        finally:
            proxy.stop()
