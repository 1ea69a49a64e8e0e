"""Wiring: from a loaded config to listening sockets, and the life of the process.

This module owns the only contact with the running reactor besides the CLI entry:
it creates the state directories, loads certificates into the SNI map, builds the
:class:`~proxy.forward.Router` and the upstream clients, and listens on every endpoint
of every role (``tcp:``, ``tcp6:``, ``systemd:`` ...).

Everything a configuration determines is built into a :class:`Runtime` first and only
then put in service by swapping references, so a later reload can build a new
runtime, refuse it whole on any error, and otherwise swap it in without touching the
listening sockets (systemd-adopted sockets can only be listened on once).

Each worker process holds its own runtime, built from the same files; nothing here
assumes it is the only process serving the sockets.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from prometheus_client import CollectorRegistry, ProcessCollector

from proxy.acme import ChallengeStore, challenge_dir
from proxy.admin import AdminSite
from proxy.cache import ResponseCache
from proxy.certs import CertificateStore
from proxy.config import Config
from proxy.forward import ProxySite, Router
from proxy.metrics import Metrics
from proxy.tls import ServerTLS
from proxy.upstream import UpstreamClient, rotate_every

log = Logger(namespace="trackproxy.service")

#: Open connections one listener accepts; past it new ones are closed at once, so
#: memory stays bounded (a TLS connection costs tens of KiB) whatever clients do.
MAX_CONNECTIONS_PER_LISTENER = 10_000


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


def build_runtime(reactor: object, config: Config, cache: ResponseCache, metrics: Metrics) -> Runtime:
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
        self, reactor: object, config: Config, now: Callable[[], datetime.datetime] = utc_now
    ) -> None:
        self._reactor = reactor
        self.server_tls = ServerTLS()
        self.certificates = CertificateStore(now)
        self.ready = False
        self.ports: dict[str, list[object]] = {"http": [], "https": [], "admin": []}
        self._rotation = None
        prepare_state_dir(config.state_dir)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.metrics = Metrics(registry)
        # One cache per process, kept across reloads (which drop removed domains' entries).
        self.cache = ResponseCache(
            reactor.seconds,  # type: ignore[attr-defined]
            config.cache.max_entries,
            config.cache.max_bytes,
            on_change=self.metrics.cache_changed,
            on_evict=self.metrics.cache_evicted,
        )
        self.runtime = build_runtime(reactor, config, self.cache, self.metrics)
        self._load_certificates(config)
        limits = config.limits
        self.http_site = ProxySite(self.runtime.router, b"http", limits.client_timeout, limits.max_header_bytes)
        self.https_site = ProxySite(self.runtime.router, b"https", limits.client_timeout, limits.max_header_bytes)
        self.admin_site = AdminSite(lambda: self.ready, self.metrics)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _load_certificates(self, config: Config) -> None:
        states = self.certificates.load(config)
        self.server_tls.set_contexts(self.certificates.contexts())
        for state in states.values():
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
        https_factory = TLSMemoryBIOFactory(self.server_tls, False, self.https_site)
        roles = (
            ("http", config.listen.http, ConnectionLimit(self.http_site)),
            ("https", config.listen.https, ConnectionLimit(https_factory)),
            ("admin", config.listen.admin, ConnectionLimit(self.admin_site, limit=64)),
        )
        listening = []
        for role, descriptions, factory in roles:
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
        self.ready = True
        log.info(
            "trackproxy serving {count} domains",
            count=len(self.config.domains),
            config=self.config.path,
        )

    def stop(self) -> defer.Deferred:
        """Stop listening and close idle upstream connections."""
        self.ready = False
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()
        closing = [defer.maybeDeferred(p.stopListening) for ps in self.ports.values() for p in ps]
        closing += [c.close() for c in self.runtime.clients.values()]
        return defer.gatherResults(closing, consumeErrors=True)


class ListenError(Exception):
    """A listener could not be started (port in use, no permission, bad fd name)."""

    def __init__(self, role: str, description: str, reason: str) -> None:
        super().__init__(f"cannot listen for {role} on {description!r}: {reason}")
        self.role = role
        self.description = description
        self.reason = reason
