"""Wiring: one proxy's management around its serving, and the single-process proxy.

This module owns what a proxy does once per machine, whatever serves the traffic
(:class:`Management`): the admin listener, the certificates' status and their renewals
(certbot, one at a time), reload requests (``SIGHUP``, ``POST /reload``), systemd
notifications and the watchdog. :class:`ProxyService` is the proxy in one process:
management and one :class:`~proxy.frontend.Frontend` (the serving half). With
``workers`` > 1, ``workers.Supervisor`` is the same management in the parent, and each
worker process has its own frontend.

Everything a configuration determines is built first and only then put in service, so
a reload can refuse a file whole and otherwise swap it in without touching the
listening sockets (systemd-adopted sockets can only be listened on once). Listener
changes need a restart.

Certificates are re-read every :data:`CERTIFICATE_CHECK_INTERVAL` seconds (a stat per
file; only changed files are parsed), which is how files renewed by an operator's
tooling or by ``certbot renew`` without the plugin's reload are picked up.

(Over 400 lines because it is the whole single-process wiring: start, stop, reload,
the certificate checks and the admin documents each need the others' state.)
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import IO, TYPE_CHECKING, Any, cast

import attrs
from prometheus_client import CollectorRegistry, ProcessCollector
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

from proxy import statedir
from proxy.access import load_or_create_key
from proxy.admin import HEALTH_DRAINING, HEALTH_OK, HEALTH_STARTING, AdminSite, HealthSite
from proxy.certs import AcmeRecords, CertificateState, CertificateView, describe, iso
from proxy.cluster import ClusterNode, RunBlocking, in_thread_pool
from proxy.clusterkey import ClusterKey
from proxy.clusterstore import etcd_store
from proxy.config import Config, load_config, parse_config
from proxy.frontend import MAX_CONNECTIONS_PER_LISTENER, Frontend, Runtime, build_runtime
from proxy.health import health_document
from proxy.metrics import Metrics
from proxy.preflight import Preflight, resolver_for
from proxy.renewal import RenewalManager
from proxy.systemd import Notifier
from proxy.yamlnodes import ConfigErrors

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IAddress,
        IListeningPort,
        IProtocolFactory,
        IReactorTime,
        IStreamServerEndpoint,
    )
    from twisted.protocols.policies import ProtocolWrapper
    from twisted.python.failure import Failure

    from proxy.cache import ResponseCache
    from proxy.clusterstore import ClusterStore
    from proxy.preflight import NamesReactor
    from proxy.renewal import Issuer
    from proxy.server import HTTPFactory
    from proxy.tls import ServerTLS

__all__ = ["MAX_CONNECTIONS_PER_LISTENER", "ProxyService", "Runtime", "build_runtime"]

log = Logger(namespace="trackproxy.service")

#: How often certificate files are checked for changes on disk (README "Certificates": within 30 seconds).
CERTIFICATE_CHECK_INTERVAL = 30.0
#: Connections the admin listener accepts at once (it is for operators and Prometheus).
ADMIN_CONNECTIONS = 64


class ConnectionLimit(WrappingFactory):
    """Caps a listener's open connections, and knows how many are open."""

    noisy = False

    def __init__(self, wrapped: IProtocolFactory, limit: int = MAX_CONNECTIONS_PER_LISTENER) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.limit = limit

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    # WrappingFactory says it always builds one; IProtocolFactory lets it refuse (None).
    def buildProtocol(self, addr: IAddress | None) -> ProtocolWrapper | None:  # type: ignore[override]
        if len(self.protocols) >= self.limit:
            return None
        return super().buildProtocol(addr)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_metrics(serving: bool = True, management: bool = True) -> Metrics:
    """A fresh registry with the process collector and trackproxy's metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return Metrics(registry, serving=serving, management=management)


class Management:
    """What a proxy does once per machine: admin, certificates' status and renewals,
    reload, systemd. Subclasses say how the serving side is told (:meth:`_apply`,
    :meth:`_reread_certificates`) and where certificate states come from.

    Args:
        reactor: the reactor to listen on and schedule with.
        config: the configuration to start with.
        now: the wall clock for certificate validity (injected for tests).
        notifier: systemd's notification socket (a silent one by default).
        metrics: this process's metrics.
        issuer: runs certbot for a domain (``issuer.CertbotIssuer`` in production).
        cluster_store: with ``cluster.etcd``, the shared state (etcd by default).
        run_blocking: runs a cluster store call off the reactor (its thread pool by default).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        now: Callable[[], datetime.datetime],
        notifier: Notifier | None,
        metrics: Metrics,
        issuer: Issuer,
        cluster_store: ClusterStore | None = None,
        run_blocking: RunBlocking | None = None,
    ) -> None:
        self._reactor = reactor
        self._now = now
        self._config = config
        self.notifier = notifier or Notifier({})
        self.metrics = metrics
        self.ready = False
        #: Told to stop: ``/healthz`` answers 503 while serving goes on for ``drain_delay``.
        self.draining = False
        self.loaded_at = now()
        self.last_reload_success = True
        self.ports: dict[str, list[IListeningPort]] = {"http": [], "https": [], "admin": [], "health": []}
        self._loops: list[LoopingCall] = []
        statedir.prepare(config.state_dir)
        self.access_key = load_or_create_key(config.state_dir)
        self.renewals = RenewalManager(
            now,
            AcmeRecords(config.state_dir),
            issuer,
            on_issued=self._issued,
            count=metrics.count_renewal,
        )
        self._preflight = self._preflight_for(config, None)
        self.cluster = self._join_cluster(config, cluster_store, run_blocking)
        self.admin_site = AdminSite(
            self.health, self.exposition, self.status, self.reload, lambda: self.config.path
        )
        metrics.watch_certificates(self.certificate_views)

    @property
    def config(self) -> Config:
        return self._config

    # ------------------------------------------------------------------ to be provided

    def certificate_states(self) -> Mapping[str, CertificateState]:
        raise NotImplementedError

    def check_certificates(self, reread: bool = False) -> None:
        """Re-read certificate files that changed (all if ``reread``) where they serve,
        then let ACME domains that need it have a certbot run."""
        raise NotImplementedError

    def exposition(self, accept: str | None) -> tuple[bytes, str] | defer.Deferred[tuple[bytes, str]]:
        """``/metrics``: (body, content type), or a Deferred of it."""
        return self.metrics.exposition(accept)

    def status(self) -> dict[str, Any] | defer.Deferred[dict[str, Any]]:
        raise NotImplementedError

    def reload(self) -> tuple[bool, dict[str, Any]] | defer.Deferred[tuple[bool, dict[str, Any]]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ certificates

    def _join_cluster(
        self, config: Config, store: ClusterStore | None, run_blocking: RunBlocking | None
    ) -> ClusterNode | None:
        """With ``cluster.etcd``: this node's part, and no certbot until it is elected.

        Raises:
            ClusterKeyError: the cluster secret is missing, unsafe or too short.
        """
        settings = config.cluster
        if settings is None or not settings.etcd:
            return None
        assert settings.node is not None  # config fills in the host name
        node = ClusterNode(
            self._reactor, settings.node, store or etcd_store(settings),
            ClusterKey.from_file(settings.secret_file),
            run_blocking or in_thread_pool(self._reactor), self._now,
            config=lambda: self.config, records=lambda: self.renewals.records,
            on_elected=self._elected, on_deposed=self.renewals.pause, on_mirrored=self.check_certificates,
        )
        self.renewals.pause()
        self.metrics.watch_cluster(node)
        return node

    def _issued(self) -> None:
        """certbot deployed a certificate: load it, and share it at once on a cluster."""
        self.check_certificates()
        if self.cluster is not None:
            self.cluster.sync_soon()

    def _elected(self) -> None:
        self._update_renewals()
        self.renewals.resume()

    def _preflight_for(self, config: Config, previous: Config | None) -> Preflight:
        """Keep the resolver while ``resolvers`` stays the same (the system's re-reads
        resolv.conf on its own schedule, so one is made, not one per reload)."""
        if previous is not None and previous.resolvers == config.resolvers:
            return self._preflight
        # The reactor is Twisted's: it provides IReactorUDP and IReactorTCP as well as IReactorTime.
        return Preflight(resolver_for(config.resolvers, cast("NamesReactor", self._reactor)))

    def _update_renewals(self) -> None:
        self.renewals.update(self.config, self.certificate_states(), self._preflight)

    def certificate_views(self) -> dict[str, CertificateView]:
        """Each configured domain's certificate as status and metrics show it."""
        config = self.config
        now = self._now()
        views = {}
        write_error = self.renewals.records.write_error
        for name, state in self.certificate_states().items():
            acme = config.domains[name].certificate.kind == "acme" if name in config.domains else False
            record = self.renewals.records.get(name) if acme else None
            view = describe(state, record, config.acme.renew_before, now, in_progress=self.renewals.running == name)
            if acme and write_error and view.last_error is None:
                view = attrs.evolve(view, last_error=write_error)  # what a restart would forget
            views[name] = view
        return views

    def status_document(
        self, cache_counts: Mapping[str, int], health: Mapping[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """The ``GET /status`` document (README "Commands", ``trackproxy status``), from the serving side's counts:
        cache entries per domain, and ``health.health_document`` per domain."""
        config = self.config
        views = self.certificate_views()
        domains = {}
        for name, domain in config.domains.items():
            view = views.get(name)
            domains[name] = {
                "upstream": domain.upstream.name,
                "cache_entries": cache_counts.get(name, 0),
                "certificate": {
                    "status": view.status if view else "inactive",
                    "source": view.source if view else domain.certificate.source,
                    "not_after": iso(view.not_after) if view else None,
                    "next_renewal": iso(view.next_renewal) if view else None,
                    "last_error": view.last_error if view else None,
                },
                "upstream_health": health.get(name) or health_document(0, 0, None, None),
            }
        document = {
            "config": {
                "path": config.path,
                "loaded_at": iso(self.loaded_at),
                "last_reload_success": self.last_reload_success,
            },
            "domains": domains,
        }
        if self.cluster is not None:
            document["cluster"] = self.cluster.status()
        return document

    # ------------------------------------------------------------------ reload

    def _summary(self) -> str:
        """One line for ``systemctl status``."""
        return f"serving {len(self.config.domains)} domains" + (
            "" if self.last_reload_success else "; last reload refused (see the log)"
        )

    def _read_for_reload(self) -> tuple[Config, str] | list[str]:
        """The file parsed again (and its text, for other processes to parse the same),
        or the errors that refuse it."""
        path = self.config.path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            try:
                load_config(path)  # the same located message the CLI gives
            except ConfigErrors as errors:
                return [str(error) for error in errors.errors]
            return [f"{path}: cannot read the file: {e}"]
        try:
            config = parse_config(text, path)
            statedir.prepare(config.state_dir)
        except ConfigErrors as e:
            return [str(error) for error in e.errors]
        except OSError as e:
            return [f"{path}: cannot prepare state_dir: {e}"]
        if config.listen != self.config.listen:
            log.warn("listener changes in {config} take effect at the next restart", config=path)
        if config.cluster != self.config.cluster:
            # Kept whole until a restart: a node half in the old cluster and half in the new
            # one (its lease in one, its token lookups in the other) would serve neither.
            log.warn("cluster changes in {config} take effect at the next restart", config=path)
            config = attrs.evolve(config, cluster=self.config.cluster)
        return config, text

    def _accept_reload(self, config: Config) -> None:
        """Management's own part of a reload that the serving side took."""
        old = self.config
        self._config = config
        if config.state_dir != old.state_dir:
            self.renewals.records = AcmeRecords(config.state_dir)
        self._preflight = self._preflight_for(config, old)
        self.loaded_at = self._now()
        self.last_reload_success = True
        self.metrics.count_reload(True)
        for warning in config.warnings:
            log.warn("{warning}", warning=str(warning))
        log.info("configuration reloaded: {count} domains", count=len(config.domains), config=config.path)

    def _reload_summary(self) -> dict[str, Any]:
        config = self.config
        return {
            "result": "success",
            "config": config.path,
            "domains": len(config.domains),
            "certificates": {name: view.status for name, view in self.certificate_views().items()},
        }

    def _reload_refused(self, errors: list[str]) -> tuple[bool, dict[str, Any]]:
        self.last_reload_success = False
        self.metrics.count_reload(False)
        for error in errors:
            log.error("reload refused: {error}", error=error)
        return False, {"result": "failure", "errors": errors}

    # ------------------------------------------------------------------ listening

    def _listen(
        self, role: str, descriptions: tuple[str, ...], factory: IProtocolFactory
    ) -> list[defer.Deferred[None]]:
        listening = []
        for description in descriptions:
            endpoint: IStreamServerEndpoint = serverFromString(self._reactor, description)
            d = defer.maybeDeferred(endpoint.listen, factory)
            d.addCallback(self._listening, role, description)
            d.addErrback(self._listen_failed, role, description)
            listening.append(cast("defer.Deferred[None]", d))  # _listening's result, now that it is chained
        return listening

    def health(self) -> str:
        """What ``/healthz`` says (admin and ``listen.health``)."""
        if self.draining:
            return HEALTH_DRAINING
        return HEALTH_OK if self.ready else HEALTH_STARTING

    def _listen_admin(self) -> list[defer.Deferred[None]]:
        """The admin listener, and the health listener if ``listen.health`` names one."""
        admin = ConnectionLimit(self.admin_site, limit=ADMIN_CONNECTIONS)
        self.metrics.watch_connections("admin", lambda: admin.open_connections)
        listening = self._listen("admin", self.config.listen.admin, admin)
        if self.config.listen.health:
            health = ConnectionLimit(HealthSite(self.health), limit=ADMIN_CONNECTIONS)
            listening += self._listen("health", self.config.listen.health, health)
        return listening

    def drain(self) -> defer.Deferred[None]:
        """The first step of a stop: ``/healthz`` says 503 at once, and everything keeps
        serving for ``drain_delay`` so that a load balancer takes this node out before it
        stops accepting connections."""
        self.draining = True
        delay = self.config.drain_delay
        if delay <= 0:
            return defer.succeed(None)
        log.info("stopping: /healthz answers 503; serving for {delay:g}s more (drain_delay)", delay=delay)
        return deferLater(self._reactor, delay)

    def _listening(self, port: IListeningPort, role: str, description: str) -> None:
        self.ports[role].append(port)
        address = port.getHost()
        log.info("listening for {role} on {address}", role=role, endpoint=description,
                 address=f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}")

    def _listen_failed(self, failure: Failure, role: str, description: str) -> object:
        raise ListenError(role, description, failure.getErrorMessage())

    def _every(self, seconds: float, function: Callable[[], object], now: bool = True) -> None:
        loop = LoopingCall(function)
        loop.clock = self._reactor
        loop.start(seconds, now=now)
        self._loops.append(loop)

    def _start_management(self) -> None:
        """Once serving: the certificate check, the watchdog, READY=1."""
        self._every(CERTIFICATE_CHECK_INTERVAL, self.check_certificates)
        if self.cluster is not None:
            self.cluster.start()
        if self.notifier.watchdog_interval:
            self._every(self.notifier.watchdog_interval, self._watchdog)
        self.ready = True
        self.notifier.ready(self._summary())
        log.info("trackproxy serving {count} domains", count=len(self.config.domains), config=self.config.path)

    def _watchdog(self) -> None:
        self.notifier.watchdog()

    def _stop_management(self) -> list[defer.Deferred[None]]:
        self.ready = False
        self.notifier.stopping()
        self.renewals.stop()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        leaving = [self.cluster.stop()] if self.cluster is not None else []
        # maybeDeferred flattens the Deferred stopListening may return (its overloads cannot say so).
        return leaving + [cast("defer.Deferred[None]", defer.maybeDeferred(p.stopListening))
                          for ps in self.ports.values() for p in ps]


class ProxyService(Management):
    """The proxy in one process: management and one frontend.

    Args:
        reactor: the reactor to listen on and schedule with.
        config: the configuration to start with.
        issuer: runs certbot for a domain (``issuer.CertbotIssuer`` in production).
        out: where access lines go (standard output in production).
        now: the wall clock for certificate validity (injected for tests).
        notifier: systemd's notification socket.
        metrics: this process's metrics (a new registry by default).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        *,
        issuer: Issuer,
        out: IO[str],
        now: Callable[[], datetime.datetime] = utc_now,
        notifier: Notifier | None = None,
        metrics: Metrics | None = None,
        cluster_store: ClusterStore | None = None,
        run_blocking: RunBlocking | None = None,
    ) -> None:
        super().__init__(reactor, config, now, notifier, metrics or new_metrics(), issuer,
                         cluster_store, run_blocking)
        self.frontend = Frontend(reactor, config, self.metrics, now, self.access_key, out)

    # What tests and the admin read of the serving half.
    @property
    def runtime(self) -> Runtime:
        return self.frontend.runtime

    @property
    def cache(self) -> ResponseCache:
        return self.frontend.cache

    @property
    def server_tls(self) -> ServerTLS:
        return self.frontend.server_tls

    @property
    def http_factory(self) -> HTTPFactory:
        return self.frontend.http_factory

    @property
    def https_factory(self) -> HTTPFactory:
        return self.frontend.https_factory

    def certificate_states(self) -> Mapping[str, CertificateState]:
        return self.frontend.certificates.states

    def check_certificates(self, reread: bool = False) -> None:
        self.frontend.load_certificates(self.config, reread)
        self._update_renewals()

    def status(self) -> dict[str, Any]:
        """The ``GET /status`` document (README "Commands", ``trackproxy status``)."""
        counts, health = self.frontend.status()
        return self.status_document(
            counts, {d: health_document(h["ok"], h["failed"], h["last_error"], h["last_error_at"])
                     for d, h in health.items()},
        )

    def reload(self) -> tuple[bool, dict[str, Any]]:
        """Re-read the YAML and the certificates; swap them in only if all is well.

        Returns:
            (True, summary) after a swap, or (False, {"errors": [...]}) with nothing
            changed.
        """
        self.notifier.reloading()
        try:
            read = self._read_for_reload()
            if isinstance(read, list):
                return self._reload_refused(read)
            config, _ = read
            try:
                self.frontend.apply(config)
            except (OSError, ValueError) as e:  # a file changed between parsing and use
                return self._reload_refused([f"{config.path}: {e}"])
            self._accept_reload(config)
            self.check_certificates(reread=True)
            return True, self._reload_summary()
        finally:
            self.notifier.ready(self._summary())

    def start(self) -> defer.Deferred[None]:
        """Listen on every configured endpoint; fires when all are up, fails on the first
        that cannot be bound."""
        config = self.config
        for warning in config.warnings:
            log.warn("{warning}", warning=str(warning))
        listening = (
            self._listen("http", config.listen.http, self.frontend.factory_for("http"))
            + self._listen("https", config.listen.https, self.frontend.factory_for("https"))
            + self._listen_admin()
        )
        done = defer.gatherResults(listening, consumeErrors=True)
        done.addCallback(self._started)
        done.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        return cast("defer.Deferred[None]", done)  # _started's result, now that it is chained

    def _started(self, _: object) -> None:
        self.frontend.start()
        self._start_management()

    def stop(self) -> defer.Deferred[list[object]]:
        """Drain (:meth:`drain`), then stop listening, let answers under way go out
        (bounded by the upstream timeout) and close idle upstream connections."""
        return self.drain().addCallback(lambda _: self._stop_serving())

    def _stop_serving(self) -> defer.Deferred[list[object]]:
        closing = self._stop_management()
        drained = self.frontend.drain(self.config.limits.upstream_timeout + 1)
        drained.addCallback(lambda _: self.frontend.stop())
        # drained now fires with frontend.stop()'s result, not drain()'s None.
        return cast("defer.Deferred[list[object]]", defer.gatherResults([*closing, drained], consumeErrors=True))

    def flush_logs(self) -> None:
        """Write the access lines held for the next batch."""
        self.frontend.flush_logs()


class ListenError(Exception):
    """A listener could not be started (port in use, no permission, bad fd name)."""

    def __init__(self, role: str, description: str, reason: str) -> None:
        super().__init__(f"cannot listen for {role} on {description!r}: {reason}")
        self.role = role
        self.description = description
        self.reason = reason
