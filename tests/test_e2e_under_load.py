"""End to end: changes under traffic. Reloads, certificate replacements and a dying worker
while clients keep coming, and how many of their requests fail (none may, but the
killed worker's requests in flight).
"""

from __future__ import annotations

import datetime
import os
import ssl
import threading
import urllib.request
from collections.abc import Callable

from proxy import pki
from proxy.testing import LocalCA

from observe import poll
from proxy_process import LOOPBACK, kill_a_worker, replaced_worker, start_proxy
from standin_upstream import UpstreamStandIn, scripted_path
from wire import TLS, request

TRACK = "track.example.test"
OWN = "own.example.test"


class Load:
    """Client threads sending requests until stopped; every outcome counted."""

    def __init__(self, send: Callable[[int], int], threads: int = 4) -> None:
        self._send = send
        self._stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                status = self._send(index * 1_000_000 + n)
                outcome = None if status == 302 else f"status {status}"
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                outcome = f"{type(e).__name__}: {e}"
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failed.append(outcome)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def post_reload(port: int) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://{LOOPBACK}:{port}/reload", method="POST"),
                                    timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_hundred_reloads_good_and_broken_under_traffic_fail_no_request(tmp_path, ca: LocalCA,
                                                                        upstream: UpstreamStandIn):
    config = {
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    }
    proxy = start_proxy(tmp_path, config)
    try:
        pem = proxy.certificate_path(TRACK)
        good = proxy.config_path.read_text()
        broken = good + "\nnot_a_key: 1\n"
        load = Load(lambda n: request(proxy.https_port if n % 2 else proxy.http_port, TRACK, f"/f/{n}",
                                      tls=TLS(TRACK, pem) if n % 2 else None).status)
        outcomes = []
        for i in range(100):
            proxy.config_path.write_text(broken if i % 2 else good)
            outcomes.append(post_reload(proxy.admin_port))
            served = load.ok
            poll(lambda served=served: load.ok >= served + 2, 10, "requests between two reloads", interval=0.005)
        load.stop()
        assert outcomes == [200, 422] * 50
        assert load.failed == [] and load.ok >= 200, (load.ok, load.failed[:5])
        print(f"FIGURE under load: 100 reloads (50 refused) under {load.ok:,} requests, {len(load.failed)} failed")
    finally:
        proxy.stop()


def test_twenty_certificate_replacements_fail_no_handshake(tmp_path, ca: LocalCA, upstream: UpstreamStandIn):
    cert_path, key_path = ca.issue(OWN)
    config = {
        "defaults": {"cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {OWN: {"certificate": {"cert": "own.pem", "key": "own.key"}}},
    }
    proxy = start_proxy(tmp_path, config, files={"own.pem": cert_path, "own.key": key_path})
    try:
        serials: set[int] = set()
        context = ssl.create_default_context(cafile=str(ca.cert_path))

        def handshake(n: int) -> int:
            import socket

            with socket.create_connection((LOOPBACK, proxy.https_port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=OWN) as sock:
                    der = sock.getpeercert(binary_form=True)
                    serials.add(__import__("cryptography.x509", fromlist=["x"]).load_der_x509_certificate(der)
                                .serial_number)
            return 302

        load = Load(handshake)
        authority = pki.Authority.from_pem(ca.cert_path.read_bytes(), pki.key_pem(ca._authority.key))
        now = datetime.datetime.now(datetime.UTC)
        directory = proxy.config_path.parent
        for i in range(20):
            cert, key = authority.issue(OWN, now - datetime.timedelta(hours=1), now + datetime.timedelta(days=5 + i))
            for name, data in (("own.key", pki.key_pem(key)), ("own.pem", pki.cert_pem(cert))):
                (directory / f".{name}.new").write_bytes(data)
                os.replace(directory / f".{name}.new", directory / name)  # as certbot's deploy does
            assert post_reload(proxy.admin_port) == 200
            served = load.ok
            poll(lambda served=served: load.ok >= served + 4, 10, "handshakes between two replacements", interval=0.005)
        load.stop()
        assert load.failed == [], load.failed[:5]
        assert len(serials) > 10, "the replacements were served"
        print(f"FIGURE under load: 20 certificate replacements under {load.ok:,} new TLS connections, "
              f"{len(load.failed)} failed handshakes")
    finally:
        proxy.stop()


def test_a_worker_killed_under_load_fails_only_its_requests_in_flight(tmp_path, ca: LocalCA,
                                                                     upstream: UpstreamStandIn):
    config = {
        "workers": 2,
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    }
    proxy = start_proxy(tmp_path, config)
    try:
        threads = 6
        # Each request takes 50 ms upstream: at any moment each thread has one in flight.
        load = Load(lambda n: request(proxy.http_port, TRACK, scripted_path(delay=0.05)).status, threads=threads)
        poll(lambda: load.ok >= 30, 20, "traffic flowing", interval=0.01)
        replaced_worker(proxy, kill_a_worker(proxy))
        failed_at_kill = len(load.failed)
        served = load.ok
        poll(lambda: load.ok >= served + 30, 20, "traffic after the replacement", interval=0.01)
        load.stop()
        assert load.ok > 50
        assert failed_at_kill <= threads, f"more than the requests in flight failed: {load.failed}"
        assert len(load.failed) == failed_at_kill, "nothing failed after the kill"
        print(f"FIGURE under load: a worker killed under {load.ok:,} requests, {failed_at_kill} failed "
              f"(in flight on it, at most {threads}), 0 after")
    finally:
        proxy.stop()
