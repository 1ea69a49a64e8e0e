"""End-to-end: three nodes behind HAProxy share one issuer and its certificates through etcd.

The real pieces, each a process on loopback: etcd (Debian's ``etcd-server``), three
``trackproxy run`` nodes with their own ``state_dir``, HAProxy in TCP mode sending PROXY v2
and checking ``/healthz`` on each node's health listener, pebble validating HTTP-01 through
HAProxy (so the CA's request reaches whichever node HAProxy picks), the real certbot with
the trackproxy plugin, and the stand-in platform recording what it is sent.

The tests run in order on one cluster: each leaves it as the next expects (the drain
test, last, stops a node for good).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy.cluster import LEASE_TTL, SYNC_INTERVAL
from proxy.clusterstore import EtcdStore
from proxy.testing import LocalCA

from balancer import Backend, HAProxy, require_haproxy
from etcd_server import EtcdServer, require_etcd
from observe import poll, scrape
from pebble import Pebble, require_pebble
from proxy_process import LOOPBACK, ProxyProcess, free_port, run_trackproxy, start_proxy
from standin_upstream import UpstreamStandIn

BOOT = "boot.example.test"  # self-signed, served from the start
GOOD = "track.example.test"  # certificate: acme, added once the cluster runs
PREFIX = "/trackproxy/test"
NAMES = ("n1", "n2", "n3")
CLIENT = "127.0.0.5"  # the recipient, as the platform should hear of it
ISSUANCE_WITHIN = 90.0


class Cluster:
    def __init__(self, etcd: EtcdServer, pebble: Pebble, haproxy: HAProxy, nodes: dict[str, ProxyProcess]) -> None:
        self.etcd = etcd
        self.pebble = pebble
        self.haproxy = haproxy
        self.nodes = nodes

    def running(self) -> dict[str, ProxyProcess]:
        return {name: node for name, node in self.nodes.items() if node.process.poll() is None}

    def logs(self) -> str:
        parts = [f"--- {name}\n{node.log_tail()}" for name, node in self.nodes.items()]
        return "\n".join(parts + [f"--- pebble\n{self.pebble.log_tail()}", f"--- etcd\n{self.etcd.log_tail()}"])

    def issuer(self, among: dict[str, ProxyProcess] | None = None) -> str:
        """The node every running node names as issuer, once they agree."""
        among = among or self.running()

        def agreed() -> str | None:
            named = {cluster_status(node).get("issuer") for node in among.values()}
            return named.pop() if len(named) == 1 and None not in named else None

        return poll(agreed, LEASE_TTL + 4 * SYNC_INTERVAL, "the nodes to agree on an issuer", interval=0.2)


def node_config(pebble: Pebble, ca: LocalCA, upstream: UpstreamStandIn, etcd: EtcdServer, name: str,
                secret: Path, domains: dict[str, Any]) -> dict[str, Any]:
    return {
        "acme": {"server": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle), "renew_before": "30d"},
        "resolvers": [pebble.dns_server],
        "defaults": {"cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "proxy_protocol": {"from": [f"{LOOPBACK}/32"], "timeout": "2s"},
        "drain_delay": "2s",
        "cluster": {"etcd": [etcd.url], "prefix": PREFIX, "node": name, "secret_file": str(secret)},
        # One node with a parent and two workers: the challenge lookups are the workers'.
        "workers": 2 if name == "n3" else 1,
        "domains": domains,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn) -> Iterator[Cluster]:
    require_etcd()
    require_haproxy()
    require_pebble()
    root = tmp_path_factory.mktemp("cluster")
    secret = root / "cluster.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    secret.chmod(0o600)
    balancer_http, balancer_https = free_port(), free_port()
    with EtcdServer(root / "etcd") as etcd, Pebble(root / "pebble", http_port=balancer_http) as pebble:
        nodes: dict[str, ProxyProcess] = {}
        backends = []
        haproxy = HAProxy(root / "haproxy", balancer_http, balancer_https)
        try:
            for name in NAMES:
                health = free_port()
                nodes[name] = start_proxy(
                    root / name,
                    node_config(pebble, ca, upstream, etcd, name, secret, {BOOT: {"certificate": "self-signed"}}),
                    listen={"health": [f"tcp:{health}:interface={LOOPBACK}"]},
                )
                backends.append(Backend(name, nodes[name].http_port, nodes[name].https_port, health))
            haproxy.start(backends)
            yield Cluster(etcd, pebble, haproxy, nodes)
        finally:
            haproxy.stop()
            for node in nodes.values():
                if node.process.poll() is None:
                    try:
                        os.kill(node.process.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                node.stop()


# ---------------------------------------------------------------------------
# Helpers


def status(node: ProxyProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{node.admin_port}/status", timeout=5) as answer:
        return json.load(answer)


def cluster_status(node: ProxyProcess) -> dict[str, Any]:
    return status(node)["cluster"]


def reload(node: ProxyProcess) -> None:
    request = urllib.request.Request(f"http://{LOOPBACK}:{node.admin_port}/reload", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


def add_domain(node: ProxyProcess, domain: str, spec: dict[str, Any]) -> None:
    config = yaml.safe_load(node.config_path.read_text())
    config["domains"][domain] = spec
    node.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    reload(node)


def proxy_v1(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} {LOOPBACK} 40000 {port}\r\n".encode()


def served_serial(node: ProxyProcess, domain: str) -> int | None:
    """The serial of what ``node`` serves for ``domain`` (reached directly, with the header
    the balancer would send)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((LOOPBACK, node.https_port), timeout=5) as raw:
            raw.sendall(proxy_v1(CLIENT, node.https_port))
            with context.wrap_socket(raw, server_hostname=domain) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    if cert.issuer == cert.subject:
        return None  # not (yet) the CA's
    return cert.serial_number


def serials(nodes: dict[str, ProxyProcess], domain: str) -> dict[str, int | None]:
    return {name: served_serial(node, domain) for name, node in nodes.items()}


def all_serve_one_serial(nodes: dict[str, ProxyProcess], domain: str, other_than: int | None = None) -> int | None:
    seen = set(serials(nodes, domain).values())
    if len(seen) == 1 and None not in seen and other_than not in seen:
        return seen.pop()
    return None


def shared_serial(etcd: EtcdServer) -> int:
    value = EtcdStore((etcd.url,), PREFIX).get("certs", GOOD)
    assert value is not None
    return int(json.loads(value)["serial"], 16)


def get_through(port: int, path: str, source: str = CLIENT, host: str = BOOT) -> int:
    """A plain-HTTP GET through the balancer's http frontend from ``source``; the status."""
    with socket.create_connection((LOOPBACK, port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        answer.begin()
        answer.read()
        return answer.status


def renewals(nodes: dict[str, ProxyProcess], domain: str) -> dict[str, float]:
    return {name: sum(scrape(node.admin_port).total("trackproxy_certificate_renewals_total", domain=domain,
                                                    result=result) for result in ("success", "failure"))
            for name, node in nodes.items()}


def challenges_answered(node: ProxyProcess) -> int:
    """How many HTTP-01 requests for GOOD the node answered 200 (its access log)."""
    count = 0
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (entry.get("namespace") == "trackproxy.access" and entry.get("domain") == GOOD
                and str(entry.get("path", "")).startswith("/.well-known/") and entry.get("status") == 200):
            count += 1
    return count


def force_renewal(cluster: Cluster, issuer: str) -> None:
    done = run_trackproxy("certs", "-c", str(cluster.nodes[issuer].config_path), "renew", "--force", GOOD)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------
# The tests, in order


def test_one_node_is_elected_and_every_node_says_which(cluster: Cluster) -> None:
    issuer = cluster.issuer()
    assert issuer in NAMES
    for name, node in cluster.nodes.items():
        view = cluster_status(node)
        assert (view["node"], view["store"]) == (name, "ok") and view["last_sync"]
        assert scrape(node.admin_port).total("trackproxy_cluster_issuer") == (1 if name == issuer else 0)
    shown = run_trackproxy("status", "-c", str(cluster.nodes[issuer].config_path))
    assert shown.returncode == 0 and f"issuer {issuer}, etcd ok" in shown.stdout, shown.stdout


def test_the_platform_hears_of_the_real_client_through_haproxy(cluster: Cluster, upstream: UpstreamStandIn) -> None:
    paths = [f"/f/{uuid.uuid4().hex}" for _ in range(6)]
    for path in paths:
        assert get_through(cluster.haproxy.http_port, path) == 302
    for path in paths:
        assert upstream.only(path).header("X-Forwarded-For") == CLIENT


@pytest.mark.parametrize(("source", "header"), [("127.0.0.2", True), (LOOPBACK, False)],
                         ids=["header-from-unlisted-source", "no-header-from-the-balancer"])
def test_a_wrong_proxy_header_is_refused_and_nothing_forwarded(
    cluster: Cluster, upstream: UpstreamStandIn, source: str, header: bool
) -> None:
    node = cluster.nodes["n1"]
    path = f"/f/{uuid.uuid4().hex}"
    with socket.create_connection((LOOPBACK, node.http_port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall((proxy_v1(CLIENT, node.http_port) if header else b"")
                     + f"GET {path} HTTP/1.1\r\nHost: {BOOT}\r\n\r\n".encode())
        try:
            said = sock.recv(100)
        except ConnectionResetError:
            said = b""
    assert said == b"" and upstream.matching(path) == []


def test_a_new_acme_domain_is_issued_once_and_served_by_all_while_the_issuer_is_out_of_the_balancer(
    cluster: Cluster,
) -> None:
    issuer = cluster.issuer()
    cluster.haproxy.set_state(issuer, "maint")
    try:
        # The others first: when the issuer's certbot asks, every node knows the domain.
        for name in [n for n in NAMES if n != issuer] + [issuer]:
            add_domain(cluster.nodes[name], GOOD, {"certificate": "acme"})
        try:
            serial = poll(lambda: all_serve_one_serial(cluster.nodes, GOOD), ISSUANCE_WITHIN,
                          "all three nodes to serve the new certificate", interval=0.5)
        except TimeoutError:
            raise AssertionError(cluster.logs()) from None
    finally:
        cluster.haproxy.set_state(issuer, "ready")
    assert shared_serial(cluster.etcd) == serial
    tokens, _ = EtcdStore((cluster.etcd.url,), PREFIX).changed_since("tokens", 0)
    assert tokens == [], "the plugin's cleanup withdrew its tokens from etcd"
    answered = {name: challenges_answered(node) for name, node in cluster.nodes.items()}
    assert answered[issuer] == 0 and sum(answered.values()) >= 1, answered  # the others served the tokens
    counted = renewals(cluster.nodes, GOOD)
    assert counted == {name: (1 if name == issuer else 0) for name in NAMES}, counted
    assert not (cluster.nodes[issuer].state_dir / "acme-challenge").exists() or not os.listdir(
        cluster.nodes[issuer].state_dir / "acme-challenge")
    for name, node in cluster.nodes.items():
        certificate = status(node)["domains"][GOOD]["certificate"]
        assert certificate["status"] == "valid", (name, certificate)
        key = node.state_dir / "certs" / GOOD / "privkey.pem"
        assert key.stat().st_mode & 0o077 == 0


def test_certbot_by_hand_is_refused_on_a_node_that_does_not_issue(cluster: Cluster) -> None:
    issuer = cluster.issuer()
    other = next(name for name in NAMES if name != issuer)
    done = run_trackproxy("certs", "-c", str(cluster.nodes[other].config_path), "renew", "--force", GOOD)
    assert done.returncode == 1 and f"({issuer} does): run trackproxy certs there" in done.stderr, done.stderr


def test_a_paused_issuer_is_replaced_within_the_lease_and_cannot_overwrite_what_followed(cluster: Cluster) -> None:
    old = cluster.issuer()
    before = shared_serial(cluster.etcd)
    others = {name: node for name, node in cluster.nodes.items() if name != old}
    os.kill(cluster.nodes[old].process.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        new = poll(lambda: (lambda n: n if n not in (None, old) else None)(
            cluster_status(next(iter(others.values())))["issuer"]), LEASE_TTL + 3 * SYNC_INTERVAL,
            "another node to take over", interval=0.2)
        took = time.monotonic() - stopped
        assert took <= LEASE_TTL + 2 * SYNC_INTERVAL, took
        assert cluster.issuer(others) == new
        force_renewal(cluster, new)
        renewed = poll(lambda: all_serve_one_serial(others, GOOD, other_than=before), ISSUANCE_WITHIN,
                       "the renewed certificate on the running nodes", interval=0.5)
    finally:
        os.kill(cluster.nodes[old].process.pid, signal.SIGCONT)
    assert poll(lambda: all_serve_one_serial(cluster.nodes, GOOD) == renewed or None, 30,
                "the resumed node to serve its successor's certificate", interval=0.3)
    assert cluster.issuer() == new
    time.sleep(0)  # nothing to wait for: the checks below read what is there now
    assert shared_serial(cluster.etcd) == renewed
    assert "stops issuing certificates" in cluster.nodes[old].log_path.read_text()


def test_with_etcd_stopped_every_node_serves_and_says_so_and_a_renewal_reaches_all_after(cluster: Cluster) -> None:
    before = all_serve_one_serial(cluster.nodes, GOOD)
    assert before is not None
    cluster.etcd.stop()
    try:
        for node in cluster.nodes.values():
            poll(lambda n=node: cluster_status(n)["store"] == "unreachable" or None, 4 * SYNC_INTERVAL + 5,
                 "status to say etcd is unreachable", interval=0.2)
            assert scrape(node.admin_port).total("trackproxy_cluster_store_up") == 0
        for _ in range(6):
            assert get_through(cluster.haproxy.http_port, f"/f/{uuid.uuid4().hex}") == 302
        assert all_serve_one_serial(cluster.nodes, GOOD) == before
    finally:
        cluster.etcd.start()
    for node in cluster.nodes.values():
        poll(lambda n=node: cluster_status(n)["store"] == "ok" or None, 4 * SYNC_INTERVAL + 10,
             "status to say etcd is back", interval=0.2)
    issuer = cluster.issuer()
    force_renewal(cluster, issuer)
    poll(lambda: all_serve_one_serial(cluster.nodes, GOOD, other_than=before), ISSUANCE_WITHIN,
         "the forced renewal on every node", interval=0.5)


def test_sigterm_to_a_node_under_load_through_haproxy_loses_no_request(cluster: Cluster) -> None:
    issuer = cluster.issuer()
    victim = next(name for name in NAMES if name != issuer)
    outcomes: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                outcomes.append(get_through(cluster.haproxy.http_port, f"/f/{uuid.uuid4().hex}"))
            except OSError as e:
                outcomes.append(f"{type(e).__name__}: {e}")

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        poll(lambda: len(outcomes) >= 20 or None, 10, "the load to start")
        node = cluster.nodes[victim]
        node.process.send_signal(signal.SIGTERM)
        node.process.wait(timeout=30)
        count = len(outcomes)
        poll(lambda: len(outcomes) >= count + 20 or None, 10, "requests after the node left")
    finally:
        stop.set()
        loader.join(timeout=20)
    assert node.process.returncode == 0
    failed = [o for o in outcomes if o != 302]
    assert failed == [] and len(outcomes) >= 40, (len(outcomes), failed[:5])


def test_a_node_starts_and_serves_with_etcd_down_and_says_so(
    tmp_path: Path, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    secret = tmp_path / "cluster.key"
    secret.write_bytes(b"s" * 44)
    secret.chmod(0o600)
    node = start_proxy(tmp_path / "alone", {
        "acme": {"server": f"https://{LOOPBACK}:{free_port()}/dir"},  # never asked: nobody issues
        "defaults": {"cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "cluster": {"etcd": [f"http://{LOOPBACK}:{free_port()}"], "node": "alone", "secret_file": str(secret)},
        "domains": {BOOT: {"certificate": "self-signed"}, GOOD: {"certificate": "acme"}},
    })
    try:
        path = f"/f/{uuid.uuid4().hex}"
        with socket.create_connection((LOOPBACK, node.http_port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {BOOT}\r\nConnection: close\r\n\r\n".encode())
            answer = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
            answer.begin()
            assert answer.status == 302
        view = poll(lambda: (lambda c: c if c["store_error"] != "not synced yet" else None)(cluster_status(node)),
                    10, "the first sync to fail", interval=0.1)
        assert (view["store"], view["issuer"], view["last_sync"]) == ("unreachable", None, None)
        assert "etcd unreachable" in view["store_error"]
        # Not elected, so no certbot for the acme domain: it waits.
        assert status(node)["domains"][GOOD]["certificate"]["status"] == "pending"
        assert renewals({"alone": node}, GOOD) == {"alone": 0}
    finally:
        node.stop()
