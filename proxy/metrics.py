"""Prometheus metrics with the names the README's "Metrics" section lists, and their exposition.

This module owns metric names, label sets and label values. Label values come only from
configuration and fixed vocabularies (configured domain or ``_unknown``, known methods
or ``other``, status codes, outcome names): never a path, a client address or a host
name a client made up. Children are cached by label tuple so that counting a request
costs a dictionary lookup and an increment.

The registry is injected (a fresh ``CollectorRegistry()`` per test).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from proxy.certs import STATUSES
from proxy.config import KNOWN_METHODS
from proxy.tls import HANDSHAKE_FAILURE_REASONS

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from proxy.cache import ResponseCache
    from proxy.certs import CertificateView



class ClusterView(Protocol):
    """What the cluster gauges read of ``cluster.ClusterNode``."""

    store_state: str
    last_sync: datetime.datetime | None

    @property
    def is_issuer(self) -> bool:
        ...


UNKNOWN_DOMAIN = "_unknown"
_METHODS = {m.encode("ascii"): m for m in KNOWN_METHODS}
#: Request latencies of a proxy in front of a redirect service: most well under 1 s.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

class Metrics:
    """Every metric trackproxy exports, registered in ``registry``.

    A worker process counts what it serves (``management=False``); the parent of
    workers counts certificates and reloads (``serving=False``) and adds the workers'
    series to its ``/metrics`` (``workers``). One process does both.
    """

    def __init__(self, registry: CollectorRegistry, serving: bool = True, management: bool = True) -> None:
        self.registry = registry
        self._proxy_refusals: Counter | None = None
        self._request_children: dict[tuple[str, bytes, bytes, int, str], tuple[Counter, Histogram]] = {}
        self._upstream_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.open_connections = Gauge(
            "trackproxy_open_connections",
            "Connections open now, by listener (http, https, admin).",
            ["listener"],
            registry=registry,
        )
        if serving:
            self._serving_metrics(registry)
        if management:
            self._management_metrics(registry)

    def _serving_metrics(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "trackproxy_requests_total",
            "Requests answered, by domain, scheme, method, status code and cache outcome.",
            ["domain", "scheme", "method", "code", "cache"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "trackproxy_request_duration_seconds",
            "Time from a request's head to the end of its answer.",
            ["domain", "cache"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_requests = Counter(
            "trackproxy_upstream_requests_total",
            "Requests sent to upstreams, by outcome.",
            ["upstream", "outcome"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "trackproxy_upstream_duration_seconds",
            "Time an upstream took to answer completely.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache_entries = Gauge("trackproxy_cache_entries", "Entries in the cache.", registry=registry)
        self.cache_bytes = Gauge("trackproxy_cache_bytes", "Bytes held by the cache.", registry=registry)
        self.cache_evictions = Counter(
            "trackproxy_cache_evictions_total",
            "Entries evicted to stay within cache.max_entries / cache.max_bytes.",
            registry=registry,
        )
        self.tls_handshake_failures = Counter(
            "trackproxy_tls_handshake_failures_total",
            "HTTPS handshakes that failed, by reason (unknown_sni: a name not configured).",
            ["reason"],
            registry=registry,
        )
        for reason in HANDSHAKE_FAILURE_REASONS:
            self.tls_handshake_failures.labels(reason)

    def _management_metrics(self, registry: CollectorRegistry) -> None:
        self.certificate_renewals = Counter(
            "trackproxy_certificate_renewals_total",
            "certbot runs for a domain, by result (success, failure).",
            ["domain", "result"],
            registry=registry,
        )
        self.config_reloads = Counter(
            "trackproxy_config_reloads_total",
            "Reloads of the configuration, by result (success, failure).",
            ["result"],
            registry=registry,
        )
        self.config_last_reload_success = Gauge(
            "trackproxy_config_last_reload_success",
            "1 if the last reload (or the start) loaded the configuration, 0 if it was refused.",
            registry=registry,
        )
        self.config_last_reload_success.set(1)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)

    def count_request(
        self, domain: str, scheme: bytes, method: bytes, code: int, cache: str, seconds: float
    ) -> None:
        key = (domain, scheme, method, code, cache)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(domain, scheme.decode("ascii"), _METHODS.get(method, "other"), str(code), cache),
                self.request_duration.labels(domain, cache),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_upstream(self, upstream: str, outcome: str, seconds: float) -> None:
        key = (upstream, outcome)
        children = self._upstream_children.get(key)
        if children is None:
            children = (self.upstream_requests.labels(upstream, outcome), self.upstream_duration.labels(upstream))
            self._upstream_children[key] = children
        children[0].inc()
        if outcome == "ok":
            children[1].observe(seconds)

    def cache_changed(self, cache: ResponseCache) -> None:
        self.cache_entries.set(len(cache))
        self.cache_bytes.set(cache.bytes)

    def cache_evicted(self, count: int) -> None:
        self.cache_evictions.inc(count)

    def count_handshake_failure(self, reason: str) -> None:
        self.tls_handshake_failures.labels(reason).inc()

    def count_proxy_protocol_refusal(self, reason: str) -> None:
        """``trackproxy_proxy_protocol_refusals_total{reason}``: registered at the first
        refusal, so a proxy without PROXY protocol exports none of it."""
        if self._proxy_refusals is None:
            self._proxy_refusals = Counter(
                "trackproxy_proxy_protocol_refusals_total",
                "Connections closed for their PROXY protocol header (from an unlisted source, "
                "missing, malformed, or late).",
                ["reason"], registry=self.registry,
            )
        self._proxy_refusals.labels(reason).inc()

    def watch_cluster(self, node: ClusterView) -> None:
        """The cluster gauges (README "Running several nodes"), read at scrape time;
        registered only on a cluster node."""
        gauges = (
            ("trackproxy_cluster_store_up", "1 while the last sync with etcd succeeded.",
             lambda: 1.0 if node.store_state == "ok" else 0.0),
            ("trackproxy_cluster_issuer", "1 while this node holds the issuer lease.",
             lambda: 1.0 if node.is_issuer else 0.0),
            ("trackproxy_cluster_last_sync_timestamp_seconds", "When this node last synced with etcd.",
             lambda: node.last_sync.timestamp() if node.last_sync is not None else 0.0),
        )
        for name, help_text, read in gauges:
            Gauge(name, help_text, registry=self.registry).set_function(read)

    def watch_connections(self, listener: str, count: Callable[[], int]) -> None:
        """``trackproxy_open_connections{listener}`` reads ``count()`` at scrape time."""
        self.open_connections.labels(listener).set_function(count)

    def count_renewal(self, domain: str, result: str) -> None:
        self.certificate_renewals.labels(domain, result).inc()

    def count_reload(self, success: bool) -> None:
        self.config_reloads.labels("success" if success else "failure").inc()
        self.config_last_reload_success.set(1 if success else 0)

    def watch_certificates(self, views: Callable[[], Mapping[str, CertificateView]]) -> None:
        """Export each domain's certificate status and expiry, read at scrape time from
        ``views()`` (domain -> :class:`~proxy.certs.CertificateView`), so the series
        always match the configured domains, also after a reload removed one."""
        self.registry.register(_CertificateCollector(views))

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for, and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _CertificateCollector(Collector):
    """``trackproxy_certificate_status`` and ``..._expiry_timestamp_seconds``."""

    def __init__(self, views: Callable[[], Mapping[str, CertificateView]]) -> None:
        self._views = views

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = GaugeMetricFamily(
            "trackproxy_certificate_status",
            "1 for the domain's current certificate status, 0 for the others.",
            labels=["domain", "status"],
        )
        expiry = GaugeMetricFamily(
            "trackproxy_certificate_expiry_timestamp_seconds",
            "When the certificate served for the domain ends (Unix time).",
            labels=["domain"],
        )
        for domain, view in sorted(self._views().items()):
            for name in STATUSES:
                status.add_metric([domain, name], 1.0 if view.status == name else 0.0)
            if view.not_after is not None:
                expiry.add_metric([domain], view.not_after.timestamp())
        yield status
        yield expiry
