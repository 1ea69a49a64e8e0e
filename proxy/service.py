"""Wiring: from a loaded config to listening sockets, and the life of the process.

This module owns the only contact with the running reactor besides the CLI entry:
it creates the state directories, loads certificates into the SNI map, builds the
:class:`~proxy.forward.Router` and the upstream clients, and listens on every endpoint
of every role (``tcp:``, ``tcp6:``, ``systemd:`` ...).

Everything a configuration determines is built into a :class:`Runtime` first and only
then put in service by swapping references, so a later reload can build a new
runtime, refuse it whole on any error, and otherwise swap it in without touching the
listening sockets (systemd-adopted sockets can only be listened on once).

Reload (:meth:`ProxyService.reload`, on ``SIGHUP`` or ``POST /reload``) parses the
YAML again, builds a new runtime and loads every certificate, and swaps them in only
when all of that worked; a refused file changes nothing. Listener changes need a
restart (the sockets are the one thing a reload never touches).

Certificates are also re-read every :data:`CERTIFICATE_CHECK_INTERVAL` seconds (a stat
per file; only changed files are parsed), which is how files renewed by an operator's
tooling or by ``certbot renew`` without the plugin's reload are picked up.

Each worker process holds its own runtime, built from the same files; nothing here
assumes it is the only process serving the sockets.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

from prometheus_client import CollectorRegistry, ProcessCollector

from proxy.access import AccessLog, Recorder, load_or_create_key
from proxy.acme import ChallengeStore, challenge_dir
from proxy.admin import AdminSite
from proxy.cache import ResponseCache
from proxy.certs import AcmeRecords, CertificateStore, CertificateView, describe
from proxy.config import Config, ConfigErrors, load_config
from proxy.forward import Router
from proxy.health import HealthBook
from proxy.issuer import CertbotIssuer
from proxy.metrics import Metrics
from proxy.preflight import Preflight, resolver_for
from proxy.renewal import RenewalManager
from proxy.server import HTTPFactory
from proxy.systemd import Notifier
from proxy.tls import CountingTLSFactory, ServerTLS
from proxy.upstream import UpstreamClient, rotate_every

log = Logger(namespace="trackproxy.service")

#: Open connections one listener accepts; past it new ones are closed at once, so
#: memory stays bounded (a TLS connection costs tens of KiB) whatever clients do.
MAX_CONNECTIONS_PER_LISTENER = 10_000
#: How often certificate files are checked for changes on disk (SPEC: within a minute).
CERTIFICATE_CHECK_INTERVAL = 30.0


class ConnectionLimit(WrappingFactory):
    """Caps a listener's open connections, and knows how many are open."""

    noisy = False

    def __init__(self, wrapped: object, limit: int = MAX_CONNECTIONS_PER_LISTENER) -> None:
        super().__init__(wrapped)
        self.limit = limit

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr: object) -> object:
        if len(self.protocols) >= self.limit:
            return None
        return super().buildProtocol(addr)


@attrs.frozen
class Runtime:
    """What one configuration puts in service."""

    config: Config
    router: Router
    clients: dict[str, UpstreamClient]


def prepare_state_dir(state_dir: str) -> None:
    """Create ``state_dir`` with ``acme-challenge/`` (served) and ``certs/`` (private)."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    os.makedirs(challenge_dir(state_dir), mode=0o755, exist_ok=True)
    os.makedirs(os.path.join(state_dir, "certs"), mode=0o700, exist_ok=True)


def build_runtime(
    reactor: object, config: Config, cache: ResponseCache, metrics: Metrics, health: HealthBook
) -> Runtime:
    """Build the router and one pooled client per upstream in use."""
    clients = {
        domain.upstream.name: UpstreamClient(
            reactor,
            domain.upstream,
            connect_timeout=config.limits.upstream_connect_timeout,
            timeout=config.limits.upstream_timeout,
        )
        for domain in config.domains.values()
    }
    router = Router(
        config.domains,
        clients,
        ChallengeStore(challenge_dir(config.state_dir)),
        config.trusted_proxies,
        cache=cache,
        metrics=metrics,
        clock=reactor.seconds,  # type: ignore[attr-defined]
        health=health,
    )
    return Runtime(config=config, router=router, clients=clients)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class ProxyService:
    """The running proxy: listeners, SNI map and the current runtime.

    Args:
        reactor: the reactor to listen on and schedule with.
        config: the configuration to start with.
        now: the wall clock for certificate validity (injected for tests).
    """

    def __init__(
        self,
        reactor: object,
        config: Config,
        now: Callable[[], datetime.datetime] = utc_now,
        notifier: Notifier | None = None,
    ) -> None:
        self._reactor = reactor
        self._now = now
        self.notifier = notifier or Notifier({})
        self._watchdog: LoopingCall | None = None
        self.server_tls = ServerTLS()
        self.certificates = CertificateStore(now)
        self.ready = False
        self.ports: dict[str, list[object]] = {"http": [], "https": [], "admin": []}
        self._rotation = None
        self._certificate_check: LoopingCall | None = None
        self.loaded_at = now()
        self.last_reload_success = True
        prepare_state_dir(config.state_dir)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.metrics = Metrics(registry)
        self.renewals = RenewalManager(
            now,
            AcmeRecords(config.state_dir),
            CertbotIssuer(reactor, os.environ),
            on_issued=self.check_certificates,
            count=self.metrics.count_renewal,
        )
        self._preflight = self._preflight_for(config, None)
        # One cache per process, kept across reloads (which drop removed domains' entries).
        self.cache = ResponseCache(
            reactor.seconds,  # type: ignore[attr-defined]
            config.cache.max_entries,
            config.cache.max_bytes,
            on_change=self.metrics.cache_changed,
            on_evict=self.metrics.cache_evicted,
        )
        self.health = HealthBook(reactor.seconds)  # type: ignore[attr-defined]
        self.runtime = build_runtime(reactor, config, self.cache, self.metrics, self.health)
        self._load_certificates(config)
        limits = config.limits
        self._access_key = load_or_create_key(config.state_dir)
        self.recorder = Recorder(self.metrics, None, reactor.seconds)  # type: ignore[attr-defined]
        self._set_access_log(config)
        self.http_factory, self.https_factory = (
            HTTPFactory(
                self.runtime.router.handle, scheme, limits.client_timeout, limits.max_header_bytes,
                reactor, self.recorder, limit=MAX_CONNECTIONS_PER_LISTENER,  # type: ignore[arg-type]
            )
            for scheme in (b"http", b"https")
        )
        self.admin_site = AdminSite(
            lambda: self.ready, self.metrics, self.status, self.reload, lambda: self.config.path
        )
        self.metrics.watch_certificates(self.certificate_views)

    def _set_access_log(self, config: Config) -> None:
        previous = self.recorder.access_log
        self.recorder.access_log = AccessLog(
            sys.stdout, config.log_paths == "full", self._access_key,
            call_later=self._reactor.callLater,  # type: ignore[attr-defined]
        )
        if previous is not None:
            previous.flush()

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _load_certificates(self, config: Config, reread: bool = False) -> None:
        previous = self.certificates.states
        states = self.certificates.load(config, reread)
        self.server_tls.set_contexts(self.certificates.contexts())
        for state in states.values():
            before = previous.get(state.domain)
            if before is not None and before.files == state.files and before.source == state.source:
                continue  # unchanged on disk: said already
            if state.last_error:
                log.error(
                    "certificate for {domain} refused: {error}",
                    domain=state.domain,
                    source=state.source,
                    error=state.last_error,
                )
            elif state.context is None and state.source != "none":
                log.warn(
                    "no certificate yet for {domain} ({source}); HTTPS for it fails until one "
                    "is deployed",
                    domain=state.domain,
                    source=state.source,
                )
            else:
                log.info(
                    "certificate for {domain} loaded ({source}), valid until {not_after}",
                    domain=state.domain,
                    source=state.source,
                    not_after=_iso(state.not_after),
                )

    def _preflight_for(self, config: Config, previous: Config | None) -> Preflight:
        """Keep the resolver while ``resolvers`` stays the same (the system's re-reads
        resolv.conf on its own schedule, so one is made, not one per reload)."""
        if previous is not None and previous.resolvers == config.resolvers:
            return self._preflight
        return Preflight(resolver_for(config.resolvers, self._reactor))

    def check_certificates(self, reread: bool = False) -> None:
        """Re-read certificate files that changed (all of them if ``reread``), then let
        ACME domains that need it have a certbot run."""
        self._load_certificates(self.config, reread)
        self.renewals.update(self.config, self.certificates.states, self._preflight)

    def certificate_views(self) -> dict[str, CertificateView]:
        """Each configured domain's certificate as status and metrics show it."""
        config = self.config
        now = self._now()
        views = {}
        for name, state in self.certificates.states.items():
            acme = config.domains[name].certificate.kind == "acme" if name in config.domains else False
            record = self.renewals.records.get(name) if acme else None
            views[name] = describe(
                state, record, config.acme.renew_before, now, in_progress=self.renewals.running == name
            )
        return views

    def status(self) -> dict:
        """The ``GET /status`` document (SPEC §5 Admin)."""
        config = self.config
        views = self.certificate_views()
        cache_counts = self.cache.entries_per_domain()
        domains = {}
        for name, domain in config.domains.items():
            view = views.get(name)
            domains[name] = {
                "upstream": domain.upstream.name,
                "cache_entries": cache_counts.get(name, 0),
                "certificate": {
                    "status": view.status if view else "inactive",
                    "source": view.source if view else domain.certificate.source,
                    "not_after": _iso(view.not_after) if view else None,
                    "next_renewal": _iso(view.next_renewal) if view else None,
                    "last_error": view.last_error if view else None,
                },
                "upstream_health": self.health.for_domain(name).document(),
            }
        return {
            "config": {
                "path": config.path,
                "loaded_at": _iso(self.loaded_at),
                "last_reload_success": self.last_reload_success,
            },
            "domains": domains,
        }

    def reload(self) -> tuple[bool, dict]:
        """Re-read the YAML and the certificates; swap them in only if all is well.

        Returns:
            (True, summary) after a swap, or (False, {"errors": [...]}) with nothing
            changed.
        """
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            self.notifier.ready(self._summary())

    def _summary(self) -> str:
        """One line for ``systemctl status``."""
        return f"serving {len(self.config.domains)} domains" + (
            "" if self.last_reload_success else "; last reload refused (see the log)"
        )

    def _reload(self) -> tuple[bool, dict]:
        path = self.config.path
        try:
            config = load_config(path)
            prepare_state_dir(config.state_dir)
        except ConfigErrors as e:
            return self._reload_refused([str(error) for error in e.errors])
        except OSError as e:
            return self._reload_refused([f"{path}: cannot prepare state_dir: {e}"])
        old = self.runtime
        if config.listen != old.config.listen:
            log.warn("listener changes in {config} take effect at the next restart", config=path)
        try:
            runtime = build_runtime(self._reactor, config, self.cache, self.metrics, self.health)
        except (OSError, ValueError) as e:  # a file changed between parsing and use
            return self._reload_refused([f"{path}: {e}"])
        if config.state_dir != old.config.state_dir:
            self.renewals.records = AcmeRecords(config.state_dir)
        self.runtime = runtime
        self.http_factory.handler = runtime.router.handle
        self.https_factory.handler = runtime.router.handle
        self._set_access_log(config)
        self.cache.drop_domains_except(name.encode("ascii") for name in config.domains)
        self.health.keep_only(config.domains)
        self._preflight = self._preflight_for(config, old.config)
        self.check_certificates(reread=True)
        for client in old.clients.values():
            client.close()  # idle connections only: requests under way finish on theirs
        self.loaded_at = self._now()
        self.last_reload_success = True
        self.metrics.count_reload(True)
        for warning in config.warnings:
            log.warn("{warning}", warning=str(warning))
        log.info("configuration reloaded: {count} domains", count=len(config.domains), config=path)
        return True, {
            "result": "success",
            "config": path,
            "domains": len(config.domains),
            "certificates": {name: view.status for name, view in self.certificate_views().items()},
        }

    def _reload_refused(self, errors: list[str]) -> tuple[bool, dict]:
        self.last_reload_success = False
        self.metrics.count_reload(False)
        for error in errors:
            log.error("reload refused: {error}", error=error)
        return False, {"result": "failure", "errors": errors}

    def start(self) -> defer.Deferred:
        """Listen on every configured endpoint; fires when all are up, fails on the first
        that cannot be bound."""
        config = self.config
        for warning in config.warnings:
            log.warn("{warning}", warning=str(warning))
        if config.workers != 1:
            log.warn(
                "workers: {workers} is not supported yet; serving with one process",
                workers="auto" if config.workers is None else config.workers,
            )
        tls_factory = CountingTLSFactory(
            self.server_tls, self.https_factory, self.metrics.count_handshake_failure
        )
        admin = ConnectionLimit(self.admin_site, limit=64)
        roles = (
            ("http", config.listen.http, self.http_factory, self.http_factory),
            ("https", config.listen.https, tls_factory, self.https_factory),
            ("admin", config.listen.admin, admin, admin),
        )
        listening = []
        for role, descriptions, factory, counted in roles:
            self.metrics.watch_connections(role, lambda counted=counted: counted.open_connections)
            for description in descriptions:
                d = defer.maybeDeferred(serverFromString(self._reactor, description).listen, factory)
                d.addCallback(self._listening, role, description)
                d.addErrback(self._listen_failed, role, description)
                listening.append(d)
        done = defer.gatherResults(listening, consumeErrors=True)
        done.addCallback(self._started)
        done.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        return done

    def _listening(self, port: object, role: str, description: str) -> None:
        self.ports[role].append(port)
        address = port.getHost()  # type: ignore[attr-defined]
        log.info("listening for {role} on {address}", role=role, endpoint=description,
                 address=f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}")

    def _listen_failed(self, failure: object, role: str, description: str) -> object:
        raise ListenError(role, description, failure.getErrorMessage())  # type: ignore[attr-defined]

    def _started(self, _: object) -> None:
        self._rotation = rotate_every(self._reactor, lambda: list(self.runtime.clients.values()))
        self._certificate_check = LoopingCall(self.check_certificates)
        self._certificate_check.clock = self._reactor
        self._certificate_check.start(CERTIFICATE_CHECK_INTERVAL, now=True)
        if self.notifier.watchdog_interval:
            self._watchdog = LoopingCall(self.notifier.watchdog)
            self._watchdog.clock = self._reactor
            self._watchdog.start(self.notifier.watchdog_interval, now=True)
        self.ready = True
        self.notifier.ready(self._summary())
        log.info(
            "trackproxy serving {count} domains",
            count=len(self.config.domains),
            config=self.config.path,
        )

    def stop(self) -> defer.Deferred:
        """Stop listening and close idle upstream connections."""
        self.ready = False
        self.notifier.stopping()
        self.renewals.stop()
        for loop in (self._rotation, self._certificate_check, self._watchdog):
            if loop is not None and loop.running:
                loop.stop()
        closing = [defer.maybeDeferred(p.stopListening) for ps in self.ports.values() for p in ps]
        closing += [c.close() for c in self.runtime.clients.values()]
        self.flush_logs()
        return defer.gatherResults(closing, consumeErrors=True)

    def flush_logs(self) -> None:
        """Write the access lines held for the next batch."""
        if self.recorder.access_log is not None:
            self.recorder.access_log.flush()


def _iso(moment: datetime.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ListenError(Exception):
    """A listener could not be started (port in use, no permission, bad fd name)."""

    def __init__(self, role: str, description: str, reason: str) -> None:
        super().__init__(f"cannot listen for {role} on {description!r}: {reason}")
        self.role = role
        self.description = description
        self.reason = reason
