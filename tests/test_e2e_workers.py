"""End to end: ``workers: 2``, one parent and two worker processes on the same sockets.

Real processes on loopback: both workers serve the one port; a worker killed with
SIGKILL is replaced while the port keeps answering; SIGHUP and ``POST /reload`` reach
every worker (a domain added is served by both), a broken file is refused once and
changes nothing anywhere; ``/metrics`` counts every worker's requests under a
``worker`` label; SIGTERM lets answers under way go out and leaves no process.
"""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from proxy.testing import LocalCA

from observe import poll, scrape
from proxy_process import LOOPBACK, ProxyProcess, children, kill_a_worker, replaced_worker, start_proxy
from standin_upstream import UpstreamStandIn, scripted_path
from wire import TLS, request

TRACK = "track.example.test"
ADDED = "added.example.test"
LATER = "later.example.test"


def per_worker(proxy: ProxyProcess, domain: str) -> dict[str, float]:
    """Requests counted for ``domain``, by worker."""
    counts: dict[str, float] = {}
    for name, labels, value in scrape(proxy.admin_port).samples:
        if name == "trackproxy_requests_total" and labels.get("domain") == domain:
            counts[labels["worker"]] = counts.get(labels["worker"], 0) + value
    return counts


def burst(proxy: ProxyProcess, domain: str, count: int = 40, tls: bool = True) -> list[int]:
    """``count`` requests at once, each on its own connection; their statuses."""
    pem = proxy.certificate_path(domain)

    def one(i: int) -> int:
        if tls:
            return request(proxy.https_port, domain, f"/f/{i}", tls=TLS(domain, pem)).status
        return request(proxy.http_port, domain, f"/f/{i}").status

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def served_by_both(proxy: ProxyProcess, domain: str) -> bool:
    """Bursts until both workers have answered for ``domain`` (the kernel gives each new
    connection to one of them; under load both get some)."""
    def both() -> bool:
        assert set(burst(proxy, domain)) == {302}
        counts = per_worker(proxy, domain)
        return set(counts) == {"0", "1"} and min(counts.values()) > 0

    return poll(both, 30, f"both workers to serve {domain}", interval=0.01)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn) -> Iterator[ProxyProcess]:
    config = {
        "workers": 2,
        "limits": {"upstream_timeout": "5s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    }
    running = start_proxy(tmp_path_factory.mktemp("workers"), config)
    yield running
    running.stop()


def rewrite(proxy: ProxyProcess, **changes: object) -> None:
    config = yaml.safe_load(proxy.config_path.read_text())
    config.update(changes)
    proxy.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def post_reload(proxy: ProxyProcess) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(LOOPBACK, proxy.admin_port, timeout=60)
    connection.request("POST", "/reload")
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read())


def test_two_worker_processes_serve_one_port(proxy):
    assert len(children(proxy.process.pid)) == 2
    served_by_both(proxy, TRACK)


def test_metrics_count_every_workers_requests(proxy):
    before = sum(per_worker(proxy, TRACK).values())
    assert burst(proxy, TRACK, count=30, tls=False) == [302] * 30
    after = per_worker(proxy, TRACK)
    assert sum(after.values()) - before == 30
    text = scrape(proxy.admin_port).text
    assert 'trackproxy_open_connections{listener="admin"}' in text
    assert 'trackproxy_open_connections{listener="https",worker="1"}' in text
    assert "trackproxy_config_last_reload_success 1.0" in text, "the parent's own series, unlabelled"


def test_sighup_and_post_reload_reach_every_worker(proxy):
    rewrite(proxy, domains={TRACK: {}, ADDED: {}})
    proxy.process.send_signal(signal.SIGHUP)
    poll(lambda: request(proxy.http_port, ADDED, "/f/x").status == 302, 20, "the added domain served")
    served_by_both(proxy, ADDED)
    rewrite(proxy, domains={TRACK: {}, ADDED: {}, LATER: {}})
    status, outcome = post_reload(proxy)
    assert status == 200 and outcome["domains"] == 3, outcome
    # One answer for the whole proxy, given once every worker has it: no retry needed.
    assert set(burst(proxy, LATER, count=20, tls=False)) == {302}
    served_by_both(proxy, LATER)


def test_a_broken_file_is_refused_once_and_changes_nothing_anywhere(proxy):
    before = scrape(proxy.admin_port).total("trackproxy_config_reloads_total", result="failure")
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good.replace("domains:", "domains:\n  new.example.test: {cache_ttl: soon}\n"
                                                            "  other.example.test: {}"))
    try:
        status, outcome = post_reload(proxy)
        assert status == 422 and len(outcome["errors"]) == 1, outcome
        after = scrape(proxy.admin_port)
        assert after.total("trackproxy_config_reloads_total", result="failure") == before + 1
        assert after.total("trackproxy_config_last_reload_success") == 0
        statuses = burst(proxy, "other.example.test", count=20, tls=False)
        assert set(statuses) == {404}, "no worker took the refused file"
        assert set(burst(proxy, TRACK, count=20, tls=False)) == {302}
    finally:
        proxy.config_path.write_text(good)
        assert post_reload(proxy)[0] == 200


def test_status_is_one_document_for_the_whole_proxy(proxy):
    result = request(proxy.admin_port, None, "/status")
    document = json.loads(result.body)
    assert TRACK in document["domains"] and document["config"]["path"] == str(proxy.config_path)
    assert document["domains"][TRACK]["upstream_health"]["failed_ratio_5m"] == 0.0


def test_a_replaced_worker_serves_the_accepted_config_not_the_file_on_disk(proxy):
    good = proxy.config_path.read_text()
    proxy.config_path.write_text("this: [is not a config\n")  # an edit not reloaded (yet)
    try:
        replaced_worker(proxy, kill_a_worker(proxy))
        poll(lambda: request(proxy.admin_port, None, "/healthz").status == 200, 20, "healthy again")
        served_by_both(proxy, TRACK)
    finally:
        proxy.config_path.write_text(good)


def test_a_worker_killed_is_replaced_and_the_port_keeps_answering(proxy):
    workers = children(proxy.process.pid)
    victim = kill_a_worker(proxy)
    # Through the restart, every request is answered (the other worker takes them all).
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert request(proxy.http_port, TRACK, "/f/during").status == 302
    replaced = replaced_worker(proxy, victim)
    assert victim not in replaced and replaced & workers
    poll(lambda: request(proxy.admin_port, None, "/healthz").status == 200, 20, "healthy again")
    served_by_both(proxy, TRACK)


def test_sigterm_lets_answers_under_way_go_out_and_stops_every_process(
    tmp_path, ca: LocalCA, upstream: UpstreamStandIn
):
    config = {
        "workers": 2,
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {TRACK: {}},
    }
    proxy = start_proxy(tmp_path, config)
    workers = children(proxy.process.pid)
    slow = scripted_path(delay=1.5)
    answers: list[int] = []
    thread = threading.Thread(target=lambda: answers.append(request(proxy.http_port, TRACK, slow).status))
    thread.start()
    poll(lambda: upstream.matching(slow), 10, "the slow request upstream")
    proxy.process.send_signal(signal.SIGTERM)
    thread.join(15)
    assert answers == [302], "the answer under way went out"
    assert proxy.process.wait(20) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in workers), "no worker left behind"
