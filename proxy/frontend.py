"""What serves traffic in one process: certificates by SNI, the router, the cache, listeners.

This module owns the serving half of the proxy, the same whether it runs alone or in
each worker process: the SNI map (``tls.ServerTLS``) with the certificates behind it
(``certs.CertificateStore``), one :class:`Runtime` per configuration (router and
upstream clients), the cache and upstream health (kept across reloads), the HTTP and
HTTPS factories, and the access log. Management (the admin listener, certbot runs,
systemd, reload requests) is ``service``'s and ``workers``'; they tell a
:class:`Frontend` what to apply.

A configuration is applied by building its whole runtime first and then swapping one
reference per listener role; a build that fails changes nothing. Upstream clients whose
upstream did not change are kept, so a reload (every certificate deployment is one)
does not start the pools cold.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from proxy.access import AccessLog, Recorder
from proxy.acme import ChallengeStore, SharedChallenges
from proxy.cache import ResponseCache
from proxy.certs import CertificateState, CertificateStore
from proxy.cluster import in_thread_pool
from proxy.clusterstore import etcd_store
from proxy.config import Config
from proxy.forward import Router
from proxy.health import HealthBook
from proxy.metrics import Metrics
from proxy.proxyprotocol import ProxyProtocolFactory
from proxy.server import HTTPFactory, IncomingRequest
from proxy.statedir import challenge_dir
from proxy.tls import SESSION_KEY_LIFETIME, CountingTLSFactory, ServerTLS
from proxy.upstream import UpstreamClient, rotate_every

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocolFactory, IReactorTime

    from proxy.upstream import UpstreamReactor

log = Logger(namespace="trackproxy.service")

#: Open connections one listener accepts; past it new ones are closed at once, so
#: memory stays bounded (a TLS connection costs tens of KiB) whatever clients do.
MAX_CONNECTIONS_PER_LISTENER = 10_000


@attrs.frozen
class Runtime:
    """What one configuration puts in service: a reload builds a new one and swaps it in
    as one reference (``Frontend.runtime``), which the listeners read per request."""

    config: Config
    router: Router
    clients: dict[str, UpstreamClient]
    access_log: AccessLog | None = None


def build_runtime(
    reactor: IReactorTime,
    config: Config,
    cache: ResponseCache,
    metrics: Metrics | None,
    health: HealthBook,
    previous: Runtime | None = None,
    access_log: AccessLog | None = None,
) -> Runtime:
    """Build the router and one pooled client per upstream in use (an unchanged upstream
    keeps the client, and its warm connections, of ``previous``)."""
    limits = config.limits
    kept = {}
    if previous is not None and previous.config.limits == limits:
        kept = {name: c for name, c in previous.clients.items()}
    clients = {}
    for domain in config.domains.values():
        upstream = domain.upstream
        if upstream.name in clients:
            continue
        old = kept.get(upstream.name)
        if old is not None and old.upstream == upstream:
            clients[upstream.name] = old
        else:
            # The reactor is Twisted's: it provides IReactorTCP and a name resolver as well as IReactorTime.
            clients[upstream.name] = UpstreamClient(
                cast("UpstreamReactor", reactor), upstream,
                connect_timeout=limits.upstream_connect_timeout, timeout=limits.upstream_timeout,
            )
    router = Router(
        config.domains,
        clients,
        ChallengeStore(challenge_dir(config.state_dir)),
        config.trusted_proxies,
        cache=cache,
        metrics=metrics,
        clock=reactor.seconds,
        health=health,
        shared_challenges=_shared_challenges(reactor, config, previous),
    )
    return Runtime(config=config, router=router, clients=clients, access_log=access_log)


def _shared_challenges(reactor: IReactorTime, config: Config, previous: Runtime | None) -> SharedChallenges | None:
    """On a cluster node: challenge answers from etcd. Made at start and kept across
    reloads, since ``cluster`` changes take effect at the next restart (README)."""
    if previous is not None:
        return previous.router.shared_challenges
    settings = config.cluster
    if settings is None or not settings.etcd:
        return None
    return SharedChallenges(etcd_store(settings), in_thread_pool(reactor))


class Frontend:
    """The serving half of one process.

    Args:
        reactor: listens, connects and schedules.
        config: the configuration to start with (certificates are loaded at once).
        metrics: where requests are counted (this process's registry).
        now: the wall clock for certificate validity.
        access_key: the access log's redaction key (``access.load_or_create_key``).
        out: where access lines go (standard output).
        in_worker: a worker process: its parent makes self-signed certificates and
            reports certificate changes (the worker loads quietly).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        metrics: Metrics,
        now: Callable[[], datetime.datetime],
        access_key: bytes,
        out: IO[str],
        in_worker: bool = False,
    ) -> None:
        self._reactor = reactor
        self.metrics = metrics
        self._access_key = access_key
        self._out = out
        self.server_tls = ServerTLS()
        self.certificates = CertificateStore(now, make_self_signed=not in_worker)
        self._report = not in_worker
        # One cache per process, kept across reloads (which drop removed domains' entries).
        self.cache = ResponseCache(
            reactor.seconds,
            config.cache.max_entries,
            config.cache.max_bytes,
            on_change=metrics.cache_changed,
            on_evict=metrics.cache_evicted,
        )
        self.health = HealthBook(reactor.seconds)
        self.runtime = build_runtime(reactor, config, self.cache, metrics, self.health,
                                     access_log=self._access_log_for(config, None))
        self.recorder = Recorder(metrics, lambda: self.runtime.access_log, reactor.seconds)
        limits = config.limits
        self.http_factory, self.https_factory = (
            HTTPFactory(
                self._route, scheme, limits.client_timeout, limits.max_header_bytes,
                reactor, self.recorder, limit=MAX_CONNECTIONS_PER_LISTENER,
            )
            for scheme in (b"http", b"https")
        )
        self.tls_factory = CountingTLSFactory(self.server_tls, self.https_factory, metrics.count_handshake_failure)
        # PROXY protocol under TLS and HTTP, as the current config says (off: untouched).
        self._listening = {
            role: ProxyProtocolFactory(factory, lambda: self.runtime.config.proxy_protocol, reactor,
                                       metrics.count_proxy_protocol_refusal)
            for role, factory in (("http", self.http_factory), ("https", self.tls_factory))
        }
        metrics.watch_connections("http", lambda: self.http_factory.open_connections)
        metrics.watch_connections("https", lambda: self.https_factory.open_connections)
        self._rotation: LoopingCall | None = None
        self._session_keys: LoopingCall | None = None
        self.load_certificates(config)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def factory_for(self, role: str) -> IProtocolFactory:
        """What listens for ``role`` (``http`` or ``https``)."""
        return self._listening[role]

    def _route(self, request: IncomingRequest) -> None:
        """Both listeners' handler: the router of the runtime in service now."""
        self.runtime.router.handle(request)

    def _access_log_for(self, config: Config, previous: Runtime | None) -> AccessLog:
        """The previous runtime's access log if ``log_paths`` did not change, else a new one."""
        if previous is not None and previous.access_log is not None and previous.config.log_paths == config.log_paths:
            return previous.access_log
        return AccessLog(
            self._out, config.log_paths == "full", self._access_key,
            call_later=self._reactor.callLater,
        )

    # ------------------------------------------------------------------ configuration

    def apply(self, config: Config) -> None:
        """Serve ``config`` from now on (new requests; those under way finish on theirs).

        Raises:
            OSError, ValueError: a file named by ``config`` changed since it was parsed
                and cannot be used; nothing changed.
        """
        old = self.runtime
        runtime = build_runtime(self._reactor, config, self.cache, self.metrics, self.health, previous=old,
                                access_log=self._access_log_for(config, old))
        self.runtime = runtime  # the swap: what follows only tidies what the old one left
        if old.access_log is not None and old.access_log is not runtime.access_log:
            old.access_log.flush()
        self.cache.drop_domains_except(name.encode("ascii") for name in config.domains)
        self.health.keep_only(config.domains)
        kept = set(map(id, runtime.clients.values()))
        for client in old.clients.values():
            if id(client) not in kept:
                client.close()  # idle connections only: requests under way finish on theirs

    def load_certificates(self, config: Config, reread: bool = False) -> dict[str, CertificateState]:
        """Load what changed (everything if ``reread``) and serve it; say what happened."""
        previous = self.certificates.states
        states = self.certificates.load(config, reread)
        self.server_tls.set_contexts(self.certificates.contexts())
        if self._report:
            report_certificates(previous, states)
        return states

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Start what runs on a schedule: pool rotation, session-ticket key rotation."""
        self._rotation = rotate_every(self._reactor, lambda: list(self.runtime.clients.values()))
        self._session_keys = LoopingCall(self.server_tls.rotate_session_keys)
        self._session_keys.clock = self._reactor
        self._session_keys.start(SESSION_KEY_LIFETIME, now=False)

    def status(self) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
        """Per domain: cache entries, and upstream health counts (for ``/status``)."""
        health = {}
        for name in self.config.domains:
            record = self.health.for_domain(name)
            ok, failed = record.counts()
            health[name] = {"ok": ok, "failed": failed, "last_error": record.last_error,
                            "last_error_at": record.last_error_at}
        return self.cache.entries_per_domain(), health

    def drain(self, within: float) -> defer.Deferred[None]:
        """Close idle connections now and the others once their answer is out; fires
        when all are closed, or after ``within`` seconds (the rest are cut)."""
        factories = (self.http_factory, self.https_factory)
        for factory in factories:
            factory.drain()
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self._reactor.seconds() + within

        def check() -> None:
            if all(f.open_connections == 0 for f in factories):
                done.callback(None)
            elif self._reactor.seconds() >= deadline:
                for factory in factories:
                    factory.cut()
                done.callback(None)
            else:
                self._reactor.callLater(0.05, check)

        check()
        return done

    def stop(self) -> defer.Deferred[list[None]]:
        """Stop the schedule, close idle upstream connections, write held log lines."""
        for loop in (self._rotation, self._session_keys):
            if loop is not None and loop.running:
                loop.stop()
        closing = [c.close() for c in self.runtime.clients.values()]
        self.flush_logs()
        return defer.gatherResults(closing, consumeErrors=True)

    def flush_logs(self) -> None:
        if self.runtime.access_log is not None:
            self.runtime.access_log.flush()


#: Past this many certificates loaded at once (a start, a reload of a large map), one
#: line says how many instead of one line each.
REPORT_EACH_UP_TO = 20


def report_certificates(
    previous: dict[str, CertificateState] | Iterable[str], states: dict[str, CertificateState]
) -> None:
    """Log each certificate that changed: loaded, refused, or still missing."""
    from proxy.certs import iso

    loaded = []
    for state in states.values():
        before = previous.get(state.domain) if isinstance(previous, dict) else None
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
                "no certificate yet for {domain} ({source}); HTTPS for it fails until one is deployed",
                domain=state.domain,
                source=state.source,
            )
        elif state.context is not None:
            loaded.append(state)
    if len(loaded) > REPORT_EACH_UP_TO:
        first = min(loaded, key=lambda s: s.not_after or datetime.datetime.max.replace(tzinfo=datetime.UTC))
        log.info(
            "certificates loaded for {count} domains; the first to end is {domain}'s, at {not_after}",
            count=len(loaded),
            domain=first.domain,
            not_after=iso(first.not_after),
        )
        return
    for state in loaded:
        log.info(
            "certificate for {domain} loaded ({source}), valid until {not_after}",
            domain=state.domain,
            source=state.source,
            not_after=iso(state.not_after),
        )
