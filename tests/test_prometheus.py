"""The monitoring kit in ``conf/prometheus`` and ``conf/grafana``, against the real tools.

Alert rules pass ``promtool check rules`` and their unit tests; the dashboard and the rules
name only the metrics of README "Metrics"; and a real Prometheus scrapes ``trackproxy run`` (one
proxy and one Prometheus for the module, on loopback): it sees the series with their
labels, loads the rules healthy, parses every dashboard expression, and puts the
certificate-expiry alerts in ``pending`` for a certificate that ends in two days, and for
no other domain. ``promtool check metrics`` finds nothing to say about the exposition.

Needs Debian's ``prometheus`` package (``promtool`` and ``prometheus``); without it those
tests are skipped.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from proxy import pki
from proxy.testing import LocalCA

from observe import poll
from proxy_process import LOOPBACK, REPO_ROOT, ProxyProcess, free_port, start_proxy, stop_process
from standin_upstream import UpstreamStandIn
from wire import TLS, connect, request

RULES = REPO_ROOT / "conf" / "prometheus" / "trackproxy-rules.yml"
RULES_TESTS = REPO_ROOT / "conf" / "prometheus" / "trackproxy-rules.test.yml"
SCRAPE_EXAMPLE = REPO_ROOT / "conf" / "prometheus" / "prometheus.example.yml"
DASHBOARD = REPO_ROOT / "conf" / "grafana" / "trackproxy-dashboard.json"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason="needs prometheus (Debian package prometheus)"
)

#: README "Metrics": every metric trackproxy exports, and its type.
SPEC_METRICS = {
    "trackproxy_requests_total": "counter",
    "trackproxy_request_duration_seconds": "histogram",
    "trackproxy_upstream_requests_total": "counter",
    "trackproxy_upstream_duration_seconds": "histogram",
    "trackproxy_cache_entries": "gauge",
    "trackproxy_cache_bytes": "gauge",
    "trackproxy_cache_evictions_total": "counter",
    "trackproxy_certificate_expiry_timestamp_seconds": "gauge",
    "trackproxy_certificate_status": "gauge",
    "trackproxy_certificate_renewals_total": "counter",
    "trackproxy_config_reloads_total": "counter",
    "trackproxy_config_last_reload_success": "gauge",
    "trackproxy_tls_handshake_failures_total": "counter",
    "trackproxy_open_connections": "gauge",
}
#: What prometheus-client's ProcessCollector exports on Linux, and Prometheus's own ``up``.
OTHER_METRICS = {
    "up",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
}
STATUSES = {"inactive", "pending", "valid", "expired", "failed", "unavailable"}
EXPIRY_ALERTS = {"TrackproxyCertificateExpiringSoon", "TrackproxyCertificateExpiringCritical"}

TRACK = "track.example.test"  # self-signed: a year left
SHORT = "short.example.test"  # certificate files that end in two days
WITHIN = 60.0  # seconds for Prometheus to start, scrape and evaluate


# ---------------------------------------------------------------------------
# What the files name


def dashboard_expressions() -> list[str]:
    """Every PromQL ``expr`` of the dashboard's panels (rows included)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def dashboard_variable_queries() -> list[str]:
    return [
        v["definition"]
        for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
        if v["type"] == "query"
    ]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names in ``expr``: ``trackproxy_*``/``process_*`` tokens and the names
    before a ``{`` selector, histogram series under their family's name."""
    names = set(re.findall(r"\b((?:trackproxy|process)_[a-z0-9_]+)", expr))
    names |= set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    families = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        families.add(base if SPEC_METRICS.get(base) == "histogram" else name)
    return families


def grafana_to_promql(expr: str) -> str:
    """An expression as Grafana sends it with every variable set to "All"."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "15s")
        .replace("$instance", ".*")
        .replace("$domain", ".*")
    )


# ---------------------------------------------------------------------------
# The files, checked without a proxy


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_alert_rules_unit_tests_pass() -> None:
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULES_TESTS)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_example_scrape_config_passes_promtool_check_config() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(SCRAPE_EXAMPLE)], capture_output=True, text=True, timeout=30, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_for_a_severity_and_a_summary_and_description() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULES_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']} never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']} never shown not firing"


def test_rules_and_dashboard_name_only_metrics_of_the_spec() -> None:
    allowed = set(SPEC_METRICS) | OTHER_METRICS
    sources = (
        [(f"rule {r['alert']}", r["expr"]) for r in alert_rules()]
        + [("dashboard", e) for e in dashboard_expressions()]
        + [("dashboard variable", q) for q in dashboard_variable_queries()]
    )
    assert len(sources) > 20
    unknown = {(where, name) for where, expr in sources for name in metric_names(expr) - allowed}
    assert not unknown


def test_dashboard_has_the_datasource_and_domain_variables_and_every_panel_uses_them() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "label_values(trackproxy_requests_total" in variables["domain"]["definition"]
    assert variables["domain"]["definition"].endswith(", domain)")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]


# ---------------------------------------------------------------------------
# A real Prometheus scraping the real proxy


def short_lived_certificate(directory: Path, host: str, days: float) -> tuple[Path, Path, datetime.datetime]:
    """A self-signed certificate for ``host`` that ends ``days`` from now (to the second).

    Returns:
        The certificate file, its key file, and its not-after.
    """
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after = now + datetime.timedelta(days=days)
    cert, key = pki.self_signed(host, now - datetime.timedelta(hours=1), not_after)
    cert_path, key_path = directory / f"{host}.pem", directory / f"{host}.key"
    cert_path.write_bytes(pki.cert_pem(cert))
    key_path.write_bytes(pki.key_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path, not_after


@dataclass
class Prometheus:
    """``prometheus`` as a child process, and its HTTP API."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """``GET /api/v1/PATH?PARAMS``, decoded; an error answer (400, 422) too. While
        Prometheus is still starting it answers 503 in plain text: OSError, asked again."""
        url = f"http://{LOOPBACK}:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return json.loads(body)
            except ValueError:
                raise OSError(f"prometheus answered {e.code}: {body[:100]!r}") from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` selects now; fails on an error answer."""
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process(self.process)


def start_prometheus(directory: Path, admin_port: int) -> Prometheus:
    """Prometheus scraping ``admin_port`` every second as job ``trackproxy``, evaluating
    the shipped rules every second."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "trackproxy", "static_configs": [{"targets": [f"{LOOPBACK}:{admin_port}"]}]}
        ],
    }
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,  # type: ignore[list-item]
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Prometheus(process, port, log_path)


@dataclass
class Stack:
    proxy: ProxyProcess
    prometheus: Prometheus
    short_not_after: datetime.datetime


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn
) -> Iterator[Stack]:
    """The proxy (two domains, some traffic through it) and a Prometheus scraping it,
    once the target is up and the rules have been evaluated."""
    directory = tmp_path_factory.mktemp("prometheus-e2e")
    cert, key, not_after = short_lived_certificate(directory, SHORT, days=2)
    proxy = start_proxy(
        directory / "proxy",
        {
            "defaults": {"cache_ttl": "60s"},
            "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
            "domains": {
                TRACK: {"certificate": "self-signed"},
                SHORT: {"certificate": {"cert": "short.pem", "key": "short.key"}},
            },
        },
        files={"short.pem": cert, "short.key": key},
    )
    prometheus: Prometheus | None = None
    try:
        for host in (TRACK, SHORT):
            tls = TLS(sni=host)
            assert request(proxy.https_port, host, "/f/monitoring", tls=tls).status == 302
            assert request(proxy.https_port, host, "/f/monitoring", tls=tls).status == 302  # a hit
        assert request(proxy.http_port, TRACK, "/f/plain").status == 302
        assert request(proxy.http_port, "unknown.example.test", "/f/x").status == 404
        with pytest.raises(OSError):  # no certificate for a name not configured
            connect(proxy.https_port, TLS(sni="unknown.example.test")).close()

        prometheus = start_prometheus(directory / "prometheus", proxy.admin_port)
        running = prometheus

        def target_up() -> bool:
            if running.process.poll() is not None:
                raise RuntimeError(f"prometheus exited; log:\n{running.log_tail()}")
            try:
                targets = running.api("targets")["data"]["activeTargets"]
            except OSError:
                return False
            return any(t["labels"].get("job") == "trackproxy" and t["health"] == "up" for t in targets)

        def rules_evaluated() -> bool:
            try:
                groups = running.api("rules")["data"]["groups"]
            except OSError:  # a busy machine: an API call that timed out is asked again
                return False
            return bool(groups) and all(r["health"] != "unknown" for g in groups for r in g["rules"])

        def scraped_data() -> bool:
            try:
                return bool(running.query("trackproxy_requests_total"))
            except OSError:
                return False

        try:
            poll(target_up, WITHIN, "prometheus scraping the proxy", interval=0.2)
            poll(scraped_data, WITHIN, "a scrape with data", interval=0.2)
            poll(rules_evaluated, WITHIN, "the rules evaluated", interval=0.2)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}\nprometheus log:\n{running.log_tail()}\nproxy log:\n{proxy.log_tail()}")
        yield Stack(proxy, prometheus, not_after)
    finally:
        if prometheus is not None:
            prometheus.stop()
        proxy.stop()


@pytest.fixture
def show_logs(stack: Stack) -> Iterator[Stack]:
    """On failure pytest shows this teardown output: both processes' logs."""
    yield stack
    print(f"--- proxy log:\n{stack.proxy.log_tail()}")
    print(f"--- prometheus log:\n{stack.prometheus.log_tail()}")


def labels_of(result: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [r["metric"] for r in result]


@needs_prometheus
def test_prometheus_scrapes_request_and_upstream_series_with_their_labels(show_logs: Stack) -> None:
    prom = show_logs.prometheus
    requests = labels_of(prom.query("trackproxy_requests_total"))
    for series in requests:
        assert set(series) == {"__name__", "domain", "scheme", "method", "code", "cache", "instance", "job"}
        assert series["job"] == "trackproxy"
    mine = {(s["scheme"], s["method"], s["code"], s["cache"]) for s in requests if s["domain"] == TRACK}
    assert {("https", "GET", "302", "miss"), ("https", "GET", "302", "hit"), ("http", "GET", "302", "miss")} <= mine
    assert {s["domain"] for s in requests} == {TRACK, SHORT, "_unknown"}
    assert any(s["domain"] == "_unknown" and s["code"] == "404" for s in requests)

    buckets = labels_of(prom.query(f'trackproxy_request_duration_seconds_bucket{{domain="{TRACK}"}}'))
    assert {s["cache"] for s in buckets} == {"hit", "miss"}
    assert all(set(s) == {"__name__", "domain", "cache", "le", "instance", "job"} for s in buckets)

    upstream = labels_of(prom.query("trackproxy_upstream_requests_total"))
    assert {(s["upstream"], s["outcome"]) for s in upstream} == {("sparkpost", "ok")}
    assert prom.query("trackproxy_upstream_duration_seconds_count")
    for name in ("trackproxy_cache_entries", "trackproxy_cache_bytes", "trackproxy_cache_evictions_total",
                 "trackproxy_config_last_reload_success"):
        assert len(prom.query(name)) == 1, name
    reloads = labels_of(prom.query("trackproxy_config_reloads_total"))
    assert {s["result"] for s in reloads} == {"success", "failure"}


@needs_prometheus
def test_prometheus_sees_open_connections_per_listener_and_handshake_failures(show_logs: Stack) -> None:
    prom = show_logs.prometheus
    connections = labels_of(prom.query("trackproxy_open_connections"))
    assert sorted(s["listener"] for s in connections) == ["admin", "http", "https"]
    failures = prom.query("trackproxy_tls_handshake_failures_total")
    assert all(set(r["metric"]) == {"__name__", "reason", "instance", "job"} for r in failures)
    assert sum(float(r["value"][1]) for r in failures) >= 1


@needs_prometheus
def test_prometheus_sees_one_current_certificate_status_per_domain(show_logs: Stack) -> None:
    statuses = show_logs.prometheus.query("trackproxy_certificate_status")
    for domain in (TRACK, SHORT):
        mine = {r["metric"]["status"]: float(r["value"][1]) for r in statuses if r["metric"]["domain"] == domain}
        assert set(mine) == STATUSES
        assert mine["valid"] == 1.0
        assert sum(mine.values()) == 1.0


@needs_prometheus
def test_certificate_expiry_series_is_the_served_certificates_not_after(show_logs: Stack) -> None:
    stack = show_logs
    self_signed = x509.load_pem_x509_certificate(stack.proxy.certificate_path(TRACK).read_bytes())
    expected = {TRACK: self_signed.not_valid_after_utc.timestamp(), SHORT: stack.short_not_after.timestamp()}
    expiry = stack.prometheus.query("trackproxy_certificate_expiry_timestamp_seconds")
    got = {r["metric"]["domain"]: float(r["value"][1]) for r in expiry}
    assert set(got) == set(expected)
    for domain, value in expected.items():
        assert got[domain] == pytest.approx(value, abs=1.0), domain


@needs_prometheus
def test_prometheus_loads_the_trackproxy_rules_healthy(show_logs: Stack) -> None:
    groups = show_logs.prometheus.api("rules")["data"]["groups"]
    assert [g["name"] for g in groups] == ["trackproxy"]
    rules = groups[0]["rules"]
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


@needs_prometheus
def test_every_dashboard_expression_is_valid_promql(show_logs: Stack) -> None:
    prom = show_logs.prometheus
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    for expr in expressions:
        answer = prom.api("query", query=grafana_to_promql(expr))
        assert answer["status"] == "success", (expr, answer.get("error"))


@needs_prometheus
def test_a_parse_error_is_reported_as_an_error(show_logs: Stack) -> None:
    """The check above can fail: Prometheus answers ``status: error`` to bad PromQL."""
    answer = show_logs.prometheus.api("query", query="sum by (code (rate(trackproxy_requests_total[1m]))")
    assert answer["status"] == "error"


@needs_prometheus
def test_expiry_alerts_are_pending_for_the_certificate_ending_in_two_days_only(show_logs: Stack) -> None:
    prom = show_logs.prometheus

    def expiry_alerts_for_short() -> list[dict[str, Any]]:
        alerts = prom.api("alerts")["data"]["alerts"]
        found = [a for a in alerts if a["labels"]["alertname"] in EXPIRY_ALERTS and a["labels"]["domain"] == SHORT]
        return alerts if len(found) == len(EXPIRY_ALERTS) else []

    alerts = poll(expiry_alerts_for_short, WITHIN, "expiry alerts for the short-lived certificate", interval=0.2)
    for alert in alerts:
        name = alert["labels"]["alertname"]
        assert name in EXPIRY_ALERTS, f"a healthy proxy raised {name}: {alert}"
        assert alert["labels"]["domain"] == SHORT
        # Their `for:` (1h, 15m) has not passed; promtool's unit tests show them firing.
        assert alert["state"] in ("pending", "firing")
        assert alert["labels"]["job"] == "trackproxy"
        assert SHORT in alert["annotations"]["summary"]


@needs_prometheus
def test_promtool_check_metrics_finds_no_problem_in_the_exposition(show_logs: Stack) -> None:
    url = f"http://{LOOPBACK}:{show_logs.proxy.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read()
    assert b"trackproxy_requests_total{" in text
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"],  # type: ignore[list-item]
        input=text, capture_output=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
