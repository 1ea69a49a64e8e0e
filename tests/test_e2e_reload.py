"""End-to-end: reloading a running ``trackproxy run`` — config, certificates, the CLI.

What an operator meets on real loopback sockets with real TLS: certificate files
replaced on disk and picked up (at once on ``POST /reload``, within the periodic check
otherwise) without dropping a connection; broken certificate files and broken YAML
refused with the old ones still serving and the refusal visible in ``/status``, the
metrics and the log; domains added and removed; ``SIGHUP``; a keep-alive connection
carried across a reload that moves its domain to another upstream; ``trackproxy
reload`` and ``trackproxy status`` as processes.

Every test that reloads rewrites the YAML, so each starts its own proxy. The cache is
off (``cache_ttl: 0``) so that every request is observable at the stand-in upstream.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy.testing import LocalCA

from observe import poll, scrape
from proxy_process import LOOPBACK, ProxyProcess, run_trackproxy, start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS, connect, keep_alive_get, request

OWN = "own.example.test"  # operator-managed {cert, key} files signed by the test CA
TRACK = "track.example.test"  # self-signed
ADDED = "added.example.test"  # not configured at start; a reload adds it

#: The upstream names: the overridden ``sparkpost`` preset (stand-in A) and a custom one (B).
UPSTREAM_A = "sparkpost"
UPSTREAM_B = "otherplatform"

#: How long a reload may take to show (it is synchronous; this is only a deadline).
RELOAD_WITHIN = 5.0
#: The periodic certificate check runs every 30 s (service.CERTIFICATE_CHECK_INTERVAL);
#: README "Certificates" promises within 30 seconds.
PERIODIC_WITHIN = 45.0

# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def upstream_a(upstream: UpstreamStandIn) -> UpstreamStandIn:
    return upstream


@pytest.fixture(scope="module")
def upstream_b(ca: LocalCA) -> Iterator[UpstreamStandIn]:
    stand_in = UpstreamStandIn(ca.issue("spgo.io"))
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def own_pair(ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The certificate ``OWN`` starts with (copied, since the CA reuses file names)."""
    return keep_pair(ca, OWN, tmp_path_factory.mktemp("own"))


def base_config(ca: LocalCA, upstream_a: UpstreamStandIn, upstream_b: UpstreamStandIn) -> dict[str, Any]:
    ca_file = str(ca.cert_path)
    return {
        "defaults": {"cache_ttl": 0},
        "upstreams": {
            UPSTREAM_A: {"connect_to": upstream_a.address, "ca_file": ca_file},
            UPSTREAM_B: {"url": "https://spgo.io", "connect_to": upstream_b.address, "ca_file": ca_file},
        },
        "domains": {
            OWN: {"certificate": {"cert": "own.pem", "key": "own.key"}},
            TRACK: {"certificate": "self-signed"},
        },
    }


@pytest.fixture
def launch(
    tmp_path: Path,
    ca: LocalCA,
    own_pair: tuple[Path, Path],
    upstream_a: UpstreamStandIn,
    upstream_b: UpstreamStandIn,
) -> Iterator[Callable[[], ProxyProcess]]:
    """Starts this test's proxy on :func:`base_config`; stops it after, and prints its log
    (pytest shows it when the test failed)."""
    started: list[ProxyProcess] = []

    def start() -> ProxyProcess:
        proxy = start_proxy(
            tmp_path / f"proxy{len(started)}",
            base_config(ca, upstream_a, upstream_b),
            files={"own.pem": own_pair[0], "own.key": own_pair[1]},
        )
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        print(f"--- proxy log ({proxy.log_path}):\n{proxy.log_tail(80)}")


@pytest.fixture
def proxy(launch: Callable[[], ProxyProcess]) -> ProxyProcess:
    return launch()


# ---------------------------------------------------------------------------
# Helpers


def keep_pair(ca: LocalCA, host: str, directory: Path) -> tuple[Path, Path]:
    """A fresh certificate and key for ``host``, copied out of the CA's directory."""
    cert, key = ca.issue(host)
    directory.mkdir(parents=True, exist_ok=True)
    stem = uuid.uuid4().hex
    kept = directory / f"{stem}.pem", directory / f"{stem}.key"
    kept[0].write_bytes(cert.read_bytes())
    kept[1].write_bytes(key.read_bytes())
    return kept


def replace_file(target: Path, data: bytes) -> None:
    """Write ``data`` under a temporary name next to ``target``, then rename it into place
    (what careful tooling does: a reader sees the old file or the new one)."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    temporary.write_bytes(data)
    temporary.chmod(0o600)
    os.replace(temporary, target)


def install_pair(proxy: ProxyProcess, pair: tuple[Path, Path]) -> x509.Certificate:
    """Put ``pair`` in place as ``own.pem``/``own.key``; the certificate put there."""
    directory = proxy.config_path.parent
    replace_file(directory / "own.key", pair[1].read_bytes())
    replace_file(directory / "own.pem", pair[0].read_bytes())
    return load(pair[0])


def load(pem: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.read_bytes())


def iso(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def admin(proxy: ProxyProcess, method: str, path: str) -> tuple[int, Any]:
    """One request to the admin listener: status code and the JSON answer."""
    url = f"http://{LOOPBACK}:{proxy.admin_port}{path}"
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_reload(proxy: ProxyProcess) -> tuple[int, Any]:
    return admin(proxy, "POST", "/reload")


def status(proxy: ProxyProcess) -> dict[str, Any]:
    code, document = admin(proxy, "GET", "/status")
    assert code == 200, document
    return document


def certificate_status(proxy: ProxyProcess, domain: str) -> dict[str, Any]:
    return status(proxy)["domains"][domain]["certificate"]


def served(proxy: ProxyProcess, sni: str, ca_file: Path) -> x509.Certificate:
    """The certificate the HTTPS listener presents for ``sni``, verified for the name."""
    with connect(proxy.https_port, TLS(sni, ca_file)) as sock:
        return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))


def edit_config(proxy: ProxyProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Read the proxy's YAML, let ``change`` modify it, write it back."""
    config = yaml.safe_load(proxy.config_path.read_text())
    change(config)
    proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))




def tracking_path() -> str:
    return f"/f/{uuid.uuid4().hex}/a/b"




def log_records(text: str) -> list[dict[str, Any]]:
    """The JSON event lines of a stretch of the proxy's log."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def errors_logged(proxy: ProxyProcess) -> list[str]:
    """The messages logged at level error since :meth:`ProxyProcess.mark_log`."""
    return [r.get("message", "") for r in log_records(proxy.log_since_mark()) if r.get("level") == "error"]


# ---------------------------------------------------------------------------
# Operator-managed certificate files


def test_replaced_certificate_files_serve_new_connections_after_post_reload_and_an_open_connection_keeps_the_old_one(
    proxy: ProxyProcess, ca: LocalCA, tmp_path: Path, upstream_a: UpstreamStandIn
) -> None:
    before = served(proxy, OWN, ca.cert_path)
    opened = connect(proxy.https_port, TLS(OWN, ca.cert_path))
    try:
        path = tracking_path()
        assert keep_alive_get(opened, OWN, path) == 302
        assert len(upstream_a.matching(path)) == 1

        new = install_pair(proxy, keep_pair(ca, OWN, tmp_path / "new"))
        assert new.serial_number != before.serial_number
        code, outcome = post_reload(proxy)
        assert code == 200, outcome
        assert outcome["result"] == "success", outcome

        assert served(proxy, OWN, ca.cert_path).serial_number == new.serial_number
        # The connection made before the reload still carries requests, on its old certificate.
        assert keep_alive_get(opened, OWN, tracking_path()) == 302
        assert x509.load_der_x509_certificate(opened.getpeercert(binary_form=True)).serial_number == before.serial_number
    finally:
        opened.close()
    cert = certificate_status(proxy, OWN)
    assert cert["not_after"] == iso(new), cert
    assert cert["status"] == "valid" and cert["source"] == "files" and cert["last_error"] is None, cert


def test_replaced_certificate_files_are_picked_up_without_reload_by_the_periodic_check(
    proxy: ProxyProcess, ca: LocalCA, tmp_path: Path
) -> None:
    """Slow on purpose: the check runs every 30 s, as README "Certificates" says."""
    before = served(proxy, OWN, ca.cert_path)
    opened = connect(proxy.https_port, TLS(OWN, ca.cert_path))
    try:
        assert keep_alive_get(opened, OWN) == 302
        new = install_pair(proxy, keep_pair(ca, OWN, tmp_path / "new"))

        def swapped() -> bool:
            # Keep the open connection busy: idle for client_timeout (30 s), it would be
            # closed by design, whatever the certificate.
            assert keep_alive_get(opened, OWN) == 302
            return served(proxy, OWN, ca.cert_path).serial_number == new.serial_number

        poll(swapped, PERIODIC_WITHIN, "the replaced certificate to be served", interval=2.0)
        assert keep_alive_get(opened, OWN) == 302
        assert x509.load_der_x509_certificate(opened.getpeercert(binary_form=True)).serial_number == before.serial_number
    finally:
        opened.close()
    assert certificate_status(proxy, OWN)["not_after"] == iso(new)
    assert proxy.process.poll() is None


@pytest.mark.parametrize("breakage", ["garbage", "truncated", "mismatched key"])
def test_a_broken_certificate_file_is_refused_the_previous_one_keeps_serving_and_a_fixed_one_clears_last_error(
    proxy: ProxyProcess, ca: LocalCA, tmp_path: Path, breakage: str
) -> None:
    before = served(proxy, OWN, ca.cert_path)
    pem = proxy.config_path.parent / "own.pem"
    if breakage == "garbage":
        replace_file(pem, b"this is not a certificate\n")
    elif breakage == "truncated":  # a copy cut short: the PEM ends inside its base64
        whole = pem.read_bytes()
        replace_file(pem, whole[: len(whole) // 2])
    else:
        # A valid certificate for the name, but for another key than own.key.
        other_cert, _ = keep_pair(ca, OWN, tmp_path / "other")
        replace_file(pem, other_cert.read_bytes())
    proxy.mark_log()
    code, outcome = post_reload(proxy)
    assert code == 200, outcome  # the YAML is fine: the reload itself succeeds

    assert served(proxy, OWN, ca.cert_path).serial_number == before.serial_number
    assert request(proxy.https_port, OWN, tracking_path(), tls=TLS(OWN, ca.cert_path)).status == 302
    cert = certificate_status(proxy, OWN)
    assert cert["status"] == "valid", cert
    assert cert["not_after"] == iso(before), cert
    assert cert["last_error"], cert
    assert "own.pem" in cert["last_error"], cert
    if breakage == "mismatched key":
        assert "match" in cert["last_error"], cert
    refused = [m for m in errors_logged(proxy) if OWN in m]
    assert refused, f"no error logged for {OWN}:\n{proxy.log_since_mark()}"

    new = install_pair(proxy, keep_pair(ca, OWN, tmp_path / "fixed"))
    code, outcome = post_reload(proxy)
    assert code == 200 and outcome["result"] == "success", outcome
    assert served(proxy, OWN, ca.cert_path).serial_number == new.serial_number
    cert = certificate_status(proxy, OWN)
    assert cert["last_error"] is None, cert
    assert cert["status"] == "valid" and cert["not_after"] == iso(new), cert


def test_an_explicit_reload_rereads_certificate_files_even_when_their_modification_time_is_unchanged(
    proxy: ProxyProcess, ca: LocalCA, tmp_path: Path
) -> None:
    """README "Certificates": a reload re-reads the certificates, "at once on reload". A new file can
    carry the old one's mtime: 1-2 s timestamps (ext3, HFS+, FAT, some NFS) when it is
    replaced within the same tick, or tools that keep the source's time (cp -p, rsync -t,
    tar x); the mtime-only check must not make the operator's explicit reload a no-op."""
    directory = proxy.config_path.parent
    times = {name: os.stat(directory / name) for name in ("own.pem", "own.key")}
    before = served(proxy, OWN, ca.cert_path)
    new = install_pair(proxy, keep_pair(ca, OWN, tmp_path / "new"))
    for name, old in times.items():
        os.utime(directory / name, ns=(old.st_atime_ns, old.st_mtime_ns))
    code, outcome = post_reload(proxy)
    assert code == 200 and outcome["result"] == "success", outcome
    now = served(proxy, OWN, ca.cert_path)
    assert now.serial_number == new.serial_number, (
        f"after POST /reload the proxy still serves serial {now.serial_number:x} "
        f"(the replaced certificate's {before.serial_number:x}), not the new file's {new.serial_number:x}"
    )
    assert certificate_status(proxy, OWN)["not_after"] == iso(new)


# ---------------------------------------------------------------------------
# Broken YAML


def test_a_yaml_with_a_typo_is_refused_with_file_line_col_and_the_old_config_keeps_serving(
    proxy: ProxyProcess, upstream_a: UpstreamStandIn
) -> None:
    good = proxy.config_path.read_text()
    edit_config(proxy, lambda c: c["domains"][TRACK].update(cache_tll="5s"))
    text = proxy.config_path.read_text()
    line_number, line = next((i, s) for i, s in enumerate(text.splitlines(), 1) if "cache_tll" in s)
    where = f"trackproxy.yaml:{line_number}:{line.index('cache_tll') + 1}"
    loaded_at = status(proxy)["config"]["loaded_at"]
    proxy.mark_log()

    code, outcome = post_reload(proxy)
    assert code == 422, outcome
    assert outcome["result"] == "failure", outcome
    assert any(where in error and "cache_tll" in error for error in outcome["errors"]), (where, outcome)
    assert any(where in m for m in errors_logged(proxy)), proxy.log_since_mark()

    refused = run_trackproxy("reload", "-c", str(proxy.config_path))
    assert refused.returncode == 1, refused
    assert any(
        re.search(re.escape(f"{proxy.config_path}:{line_number}:") + r"\d+:", said) and where in said
        for said in refused.stderr.splitlines()
    ), refused.stderr

    metrics = scrape(proxy.admin_port)
    assert metrics.total("trackproxy_config_reloads_total", result="failure") >= 1
    assert metrics.total("trackproxy_config_last_reload_success") == 0
    document = status(proxy)
    assert document["config"]["last_reload_success"] is False, document["config"]
    assert document["config"]["loaded_at"] == loaded_at, "a refused file counted as loaded"
    # The old config keeps serving.
    path = tracking_path()
    assert request(proxy.http_port, TRACK, path).status == 302
    assert len(upstream_a.matching(path)) == 1

    successes = metrics.total("trackproxy_config_reloads_total", result="success")
    proxy.config_path.write_text(good)
    accepted = run_trackproxy("reload", "-c", str(proxy.config_path))
    assert accepted.returncode == 0, accepted
    assert "reloaded" in accepted.stdout, accepted.stdout
    metrics = scrape(proxy.admin_port)
    assert metrics.total("trackproxy_config_reloads_total", result="success") == successes + 1
    assert metrics.total("trackproxy_config_last_reload_success") == 1
    assert status(proxy)["config"]["last_reload_success"] is True


# ---------------------------------------------------------------------------
# Domains added and removed


def test_a_domain_added_by_reload_serves_http_and_https(
    proxy: ProxyProcess, upstream_a: UpstreamStandIn
) -> None:
    assert request(proxy.http_port, ADDED, tracking_path()).status == 404
    edit_config(proxy, lambda c: c["domains"].update({ADDED: {"certificate": "self-signed"}}))
    code, outcome = post_reload(proxy)
    assert code == 200 and outcome["result"] == "success", outcome

    path = tracking_path()
    assert request(proxy.http_port, ADDED, path).status == 302
    assert upstream_a.only(path).header("Host") == ADDED
    path = tracking_path()
    secure = request(proxy.https_port, ADDED, path, tls=TLS(ADDED, proxy.certificate_path(ADDED)))
    assert secure.status == 302
    assert upstream_a.only(path).header("Host") == ADDED
    assert certificate_status(proxy, ADDED)["status"] == "valid"


def test_a_domain_removed_by_reload_gets_404_sends_nothing_upstream_and_its_tls_handshake_is_refused(
    proxy: ProxyProcess, upstream_a: UpstreamStandIn
) -> None:
    tls = TLS(TRACK, proxy.certificate_path(TRACK))
    assert request(proxy.https_port, TRACK, tracking_path(), tls=tls).status == 302
    opened = connect(proxy.https_port, tls)
    try:
        assert keep_alive_get(opened, TRACK, tracking_path()) == 302
        edit_config(proxy, lambda c: c["domains"].pop(TRACK))
        code, outcome = post_reload(proxy)
        assert code == 200 and outcome["result"] == "success", outcome

        plain_path, secure_path, open_path = tracking_path(), tracking_path(), tracking_path()
        assert request(proxy.http_port, TRACK, plain_path).status == 404
        with pytest.raises(ssl.SSLError):
            request(proxy.https_port, TRACK, secure_path, tls=tls)
        # Nor with verification off: no certificate at all is served for the name.
        with pytest.raises(ssl.SSLError):
            connect(proxy.https_port, TLS(TRACK)).close()
        # A connection opened before the reload follows the new config too.
        assert keep_alive_get(opened, TRACK, open_path) == 404
    finally:
        opened.close()
    for path in (plain_path, secure_path, open_path):
        assert upstream_a.matching(path) == [], upstream_a.requests
    assert TRACK not in status(proxy)["domains"]
    # The domain that stayed is untouched.
    assert request(proxy.http_port, OWN, tracking_path()).status == 302


# ---------------------------------------------------------------------------
# SIGHUP


def test_sighup_reloads_the_yaml_and_the_process_lives_on(proxy: ProxyProcess, upstream_a: UpstreamStandIn) -> None:
    edit_config(proxy, lambda c: c["domains"].update({ADDED: {"certificate": "self-signed"}}))
    proxy.process.send_signal(signal.SIGHUP)
    poll(lambda: ADDED in status(proxy)["domains"], RELOAD_WITHIN, f"/status to list {ADDED}")
    assert proxy.process.poll() is None, proxy.log_tail()
    path = tracking_path()
    assert request(proxy.http_port, ADDED, path).status == 302
    assert upstream_a.only(path).header("Host") == ADDED
    assert status(proxy)["config"]["last_reload_success"] is True

    # A broken file on SIGHUP: refused, counted, and the process serves on.
    proxy.config_path.write_text(proxy.config_path.read_text() + "bogus_key: 1\n")
    proxy.process.send_signal(signal.SIGHUP)
    poll(
        lambda: scrape(proxy.admin_port).total("trackproxy_config_reloads_total", result="failure") >= 1,
        RELOAD_WITHIN, "the refused SIGHUP reload to be counted",
    )
    assert proxy.process.poll() is None, proxy.log_tail()
    assert status(proxy)["config"]["last_reload_success"] is False
    assert request(proxy.http_port, ADDED, tracking_path()).status == 302


# ---------------------------------------------------------------------------
# Connections across a reload


def test_a_keep_alive_connection_survives_a_reload_and_its_next_request_goes_to_the_new_upstream(
    proxy: ProxyProcess, upstream_a: UpstreamStandIn, upstream_b: UpstreamStandIn
) -> None:
    opened = connect(proxy.http_port)
    try:
        first = tracking_path()
        assert keep_alive_get(opened, TRACK, first) == 302
        assert len(upstream_a.matching(first)) == 1

        edit_config(proxy, lambda c: c["domains"][TRACK].update(upstream=UPSTREAM_B))
        code, outcome = post_reload(proxy)
        assert code == 200 and outcome["result"] == "success", outcome

        second = tracking_path()
        assert keep_alive_get(opened, TRACK, second) == 302  # "connection closed" if dropped
        assert upstream_b.only(second).header("Host") == TRACK
        assert upstream_a.matching(second) == []
    finally:
        opened.close()
    assert status(proxy)["domains"][TRACK]["upstream"] == UPSTREAM_B


# ---------------------------------------------------------------------------
# trackproxy status


def shape(document: Any) -> Any:
    """A JSON document's keys, recursively, without the values."""
    if isinstance(document, dict):
        return {key: shape(value) for key, value in document.items()}
    return None


def test_status_command_prints_a_row_per_domain_and_its_json_is_the_admin_status(
    proxy: ProxyProcess, own_pair: tuple[Path, Path]
) -> None:
    table = run_trackproxy("status", "-c", str(proxy.config_path))
    assert table.returncode == 0, table
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines() if line.strip()}
    assert rows[OWN][1:3] == [UPSTREAM_A, "valid"], table.stdout
    assert iso(load(own_pair[0])) in rows[OWN], table.stdout
    assert rows[TRACK][1:3] == [UPSTREAM_A, "valid"], table.stdout

    as_json = run_trackproxy("status", "-c", str(proxy.config_path), "--json")
    assert as_json.returncode == 0, as_json
    printed = json.loads(as_json.stdout)
    assert printed == status(proxy)
    domain = {
        "upstream": None,
        "cache_entries": None,
        "certificate": dict.fromkeys(["status", "source", "not_after", "next_renewal", "last_error"]),
        "upstream_health": dict.fromkeys(["last_error", "last_error_at", "failed_ratio_5m"]),
    }
    assert shape(printed) == {
        "config": dict.fromkeys(["path", "loaded_at", "last_reload_success"]),
        "domains": {OWN: domain, TRACK: domain},
    }
    assert printed["config"]["path"] == str(proxy.config_path)
    assert printed["domains"][OWN]["certificate"]["source"] == "files"
    assert printed["domains"][TRACK]["certificate"]["source"] == "self-signed"


def test_status_command_exits_1_saying_the_proxy_does_not_answer_when_it_is_stopped(proxy: ProxyProcess) -> None:
    proxy.stop()
    for args in ((), ("--json",)):
        result = run_trackproxy("status", "-c", str(proxy.config_path), *args)
        assert result.returncode == 1, result
        assert "does not answer" in result.stderr, result.stderr
        assert f"{LOOPBACK}:{proxy.admin_port}" in result.stderr, result.stderr
