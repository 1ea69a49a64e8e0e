"""Worker processes: one parent managing, N workers serving the same listening sockets.

With ``workers: N`` (or ``auto``, one per core) ``trackproxy run`` becomes a parent that
owns what must be one per machine and N ``python -m proxy.worker`` processes that serve:

- the parent binds the http and https sockets itself, or takes systemd's (``systemd:``
  endpoints and ``LISTEN_FDS`` belong to it: ``NotifyAccess=main`` and ``LISTEN_PID``
  name it alone), and hands them to every worker as inherited descriptors. The kernel
  gives each new connection to one of the workers waiting on the shared socket (no
  ``SO_REUSEPORT``: that would need ``CAP_NET_BIND_SERVICE`` in every worker);
- it restarts a worker that dies (at once, then backing off if it keeps dying), and on
  ``SIGTERM`` stops them all, each letting its answers under way go out;
- it serves the admin listener: ``/metrics`` is its own series (certificates, reloads,
  the admin listener, its process) plus every worker's, each with a ``worker`` label;
  ``/status`` is one document (cache entries and upstream health summed over workers);
- it runs the certificate manager (one certbot for the machine) and tells workers to
  re-read certificates when files change; a reload (``SIGHUP``, ``POST /reload``)
  parses the file once, sends the same text to every worker, and answers once;
- it sends ``READY=1`` once every worker is up, and the watchdog pings only while all
  of them are.

Each worker keeps its own cache and coalesces its own misses: a burst reaches the
upstream at most once per worker.

(Over 400 lines: starting, replacing and stopping workers, fanning a reload out and
merging their metrics and status are one supervisor's life cycle.)
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy import endpoints
from proxy.cache import ResponseCache
from proxy.certs import CertificateState, CertificateStore, ensure_self_signed
from proxy.config import Config, parse_config
from proxy.control import ChannelFactory, ControlChannel
from proxy.frontend import build_runtime, report_certificates
from proxy.health import HealthBook, health_document
from proxy.issuer import SpawnsProcesses
from proxy.metrics import Metrics
from proxy.service import ListenError, Management, new_metrics, utc_now
from proxy.systemd import Notifier

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IProtocolFactory,
        IReactorTime,
    )

    from proxy.renewal import Issuer

log = Logger(namespace="trackproxy.workers")

#: How long a worker may take from spawn to "ready", and the parent's requests to answer.
READY_WITHIN = 30.0
ASK_WITHIN = 10.0
#: A worker that dies within this of its start counts as crashing: restarts back off.
CRASH_WINDOW = 10.0
RESTART_BACKOFF_MAX = 30.0
#: Environment that belongs to the parent only.
_PARENT_ONLY_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}


class _SpawningReactor(SpawnsProcesses, Protocol):
    """What the supervisor asks of its reactor beyond ``IReactorTime``: ``IReactorProcess``'s
    ``spawnProcess`` and ``IReactorSocket``'s ``adoptStreamConnection`` (with any factory,
    as Twisted's reactors take it: the control channel's is a plain ``Factory``)."""

    def adoptStreamConnection(
        self, fileDescriptor: int, addressFamily: socket.AddressFamily, factory: IProtocolFactory
    ) -> None: ...


def worker_count(config: Config) -> int:
    """``workers``, with ``auto`` as one per core."""
    return config.workers if config.workers is not None else max(1, os.cpu_count() or 1)


class WorkerProcess(ProcessProtocol):
    """One worker: its process, its control channel, whether it is serving."""

    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self._supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.started_at = 0.0
        self.channel = ControlChannel(self._handle, on_lost=self._channel_lost)
        self.became_ready: defer.Deferred[WorkerProcess] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        #: The config text it serves.
        self.text: str | None = None

    def _handle(self, message: dict[str, Any]) -> object:
        raise ValueError(f"unknown request from worker {self.index}: {message.get('op')!r}")

    def start(self, text: str, path: str, reactor: IReactorTime) -> None:
        """Have it serve ``text`` (the config the parent serves); ready once it says so."""
        self.text = text
        d = self.channel.call("start", text=text, path=path)
        d.addTimeout(READY_WITHIN, reactor)

        def started(_: object) -> None:
            self.ready = True
            if not self.became_ready.called:
                self.became_ready.callback(self)
            self._supervisor.worker_ready(self)

        def failed(failure: Failure) -> None:
            log.error("worker {index} could not start: {error}", index=self.index, error=failure.getErrorMessage())
            self.signal("KILL")  # its end is reported, and it is started again

        d.addCallbacks(started, failed)

    def _channel_lost(self) -> None:
        self.ready = False

    def processEnded(self, reason: Failure) -> None:
        self.ready = False
        if not self.became_ready.called:
            self.became_ready.errback(RuntimeError(
                f"worker {self.index} exited before it was ready: {reason.getErrorMessage()}"
            ))
        self._supervisor.worker_ended(self, reason)
        self.ended.callback(None)

    def signal(self, signum: str) -> None:
        if self.transport is not None and self.transport.pid is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception:  # ProcessExitedAlready
                pass


class _Families:
    """What an exposition encoder asks of a registry: ``collect()``."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_metrics(own: list[Metric], workers: Mapping[int, str]) -> list[Metric]:
    """The parent's families and each worker's (parsed from its exposition), one family
    per name, the workers' samples labelled ``worker``."""
    merged: dict[str, Metric] = {}
    for family in own:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = list(family.samples)
        merged[family.name] = copy
    for index, text in sorted(workers.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            label = str(index)
            target.samples.extend(s._replace(labels={**s.labels, "worker": label}) for s in family.samples)
    return list(merged.values())


def merge_status(replies: Mapping[int, dict[str, Any]]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Cache entries summed per domain; upstream counts summed, the latest error kept."""
    cache: dict[str, int] = {}
    counts: dict[str, dict[str, Any]] = {}
    for reply in replies.values():
        for domain, entries in reply["cache"].items():
            cache[domain] = cache.get(domain, 0) + entries
        for domain, health in reply["health"].items():
            total = counts.setdefault(domain, {"ok": 0, "failed": 0, "last_error": None, "last_error_at": None})
            total["ok"] += health["ok"]
            total["failed"] += health["failed"]
            if health["last_error_at"] is not None and (
                total["last_error_at"] is None or health["last_error_at"] > total["last_error_at"]
            ):
                total["last_error"], total["last_error_at"] = health["last_error"], health["last_error_at"]
    documents = {
        domain: health_document(h["ok"], h["failed"], h["last_error"], h["last_error_at"])
        for domain, h in counts.items()
    }
    return cache, documents


class Supervisor(Management):
    """The parent of the worker processes.

    Args:
        reactor: the reactor to listen, spawn and schedule with (it provides
            ``IReactorProcess`` and ``IReactorSocket`` too).
        config: the configuration to start with.
        count: how many workers.
        now: the wall clock for certificate validity.
        notifier: systemd's notification socket.
        worker_command: the command line that starts worker ``i`` (tests may wrap it).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        config: Config,
        count: int,
        *,
        issuer: Issuer,
        now: Callable[[], datetime.datetime] = utc_now,
        notifier: Notifier | None = None,
        worker_command: Callable[[int, list[str]], list[str]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(reactor, config, now, notifier, metrics or new_metrics(serving=False), issuer)
        # What the workers are given to serve: the text of the file as it was accepted
        # (at start, at each reload), never what the file says now.
        with open(config.path, encoding="utf-8") as f:
            self._config_text = f.read()
        self._config = parse_config(self._config_text, config.path)
        self.count = count
        self._worker_command = worker_command or (lambda index, args: [sys.executable, "-m", "proxy.worker", *args])
        self.certificates = CertificateStore(now)
        # Made here first (self-signed certificates; the access-log key above), so
        # workers only ever read them. The parent's own view of the certificates is
        # loaded once the workers are starting, alongside them.
        _make_self_signed(config, now())
        self.workers: list[WorkerProcess | None] = [None] * count
        self._shared: list[tuple[str, int, int]] = []  # (role, fd, family)
        self._held: list[socket.socket] = []  # sockets kept open for the workers
        self._stopping = False
        self._restarts = [0] * count
        self._devnull = os.open(os.devnull, os.O_RDWR)

    # ------------------------------------------------------------------ listening

    def _bind(self) -> None:
        """The http and https sockets, bound here (or systemd's), for every worker."""
        for role, descriptions in (("http", self.config.listen.http), ("https", self.config.listen.https)):
            for description in descriptions:
                endpoint = endpoints.parse_endpoint(description)
                if endpoint.kind == "systemd":
                    try:
                        adopted = serverFromString(self._reactor, description)
                    except (KeyError, IndexError, ValueError) as e:
                        raise ListenError(role, description, f"no such socket from systemd ({e})")
                    fd, family = adopted.fileno, adopted.addressFamily
                    # Non-blocking for every process that shares it (systemd hands it over
                    # blocking; a worker's accept() would then stall its reactor).
                    os.set_blocking(fd, False)
                else:
                    try:
                        sock = endpoints.bind(endpoint)
                    except OSError as e:
                        raise ListenError(role, description, e.strerror or str(e))
                    self._held.append(sock)
                    fd, family = sock.fileno(), sock.family
                    log.info("listening for {role} on {address} ({count} workers)", role=role,
                             endpoint=description, address=_address(sock), count=self.count)
                self._shared.append((role, fd, family))

    # ------------------------------------------------------------------ workers

    def _spawn(self, index: int) -> WorkerProcess:
        spawning = cast("_SpawningReactor", self._reactor)  # the same reactor, seen as IReactorProcess/Socket
        worker = WorkerProcess(self, index)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, int | str] = {0: self._devnull, 1: 1, 2: 2, 3: child_end.fileno()}
        args = ["--index", str(index), "--control", "3"]
        for number, (role, fd, family) in enumerate(self._shared, start=4):
            child_fds[number] = fd
            args += ["--listener", f"{role}:{number}:{_FAMILY_NAMES[family]}"]
        environment = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY_ENV}
        environment["PYTHONUNBUFFERED"] = "1"
        command = self._worker_command(index, args)
        try:
            spawning.spawnProcess(worker, command[0], command, env=environment, childFDs=child_fds)
        finally:
            child_end.close()
        assert worker.transport is not None  # spawnProcess connected it
        worker.pid = worker.transport.pid
        worker.started_at = self._reactor.seconds()
        spawning.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, ChannelFactory(worker.channel))
        parent_end.close()
        worker.start(self._config_text, self.config.path, self._reactor)
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)
        return worker

    def worker_ready(self, worker: WorkerProcess) -> None:
        if worker.text != self._config_text:
            # A reload was accepted while it was starting: it serves the same as the others.
            d = worker.channel.call("reload", text=self._config_text, path=self.config.path)
            d.addTimeout(ASK_WITHIN, self._reactor)
            d.addCallbacks(lambda _, text=self._config_text: setattr(worker, "text", text),
                           lambda f: log.warn("worker {index} missed a reload: {error}", index=worker.index,
                                              error=f.getErrorMessage()))
        if self.ready:
            log.info("worker {index} serving (pid {pid})", index=worker.index, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers[worker.index] is worker:
            self.workers[worker.index] = None
        if self._stopping:
            return
        crashed = self._reactor.seconds() - worker.started_at < CRASH_WINDOW
        self._restarts[worker.index] = self._restarts[worker.index] + 1 if crashed else 0
        delay = 0.0 if self._restarts[worker.index] <= 1 else min(
            RESTART_BACKOFF_MAX, 2.0 ** (self._restarts[worker.index] - 2)
        )
        log.error("worker {index} (pid {pid}) exited: {reason}; starting another in {delay:g}s",
                  index=worker.index, pid=worker.pid, reason=reason.getErrorMessage(), delay=delay)
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self._stopping or self.workers[index] is not None:
            return
        worker = self._spawn(index)
        worker.became_ready.addErrback(lambda f: None)  # its end is reported by worker_ended

    def _serving(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w is not None and w.ready]

    def _ask(self, op: str, **fields: Any) -> defer.Deferred[dict[int, Any]]:
        """Ask every serving worker; fires with {index: result} of those that answered."""
        workers = self._serving()
        asked: list[defer.Deferred[Any]] = []
        for worker in workers:
            d = worker.channel.call(op, **fields)
            d.addTimeout(ASK_WITHIN, self._reactor)
            asked.append(d)
        done = defer.DeferredList(asked, consumeErrors=True)

        def collect(results: list[tuple[bool, Any]]) -> dict[int, Any]:
            answers: dict[int, Any] = {}
            for worker, (ok, value) in zip(workers, results):
                if ok:
                    answers[worker.index] = value
                else:
                    log.warn("worker {index} did not answer {op}: {error}", index=worker.index, op=op,
                             error=value.getErrorMessage())
            return answers

        return done.addCallback(collect)

    # ------------------------------------------------------------------ management

    def certificate_states(self) -> Mapping[str, CertificateState]:
        return self.certificates.states

    def check_certificates(self, reread: bool = False, tell_workers: bool = True) -> None:
        previous = self.certificates.states
        states = self.certificates.load(self.config, reread)
        report_certificates(previous, states)
        changed = reread or any(
            previous.get(name) is None or previous[name].files != state.files for name, state in states.items()
        )
        if changed and tell_workers:
            self._ask("certificates", reread=reread)
        self._update_renewals()

    def exposition(self, accept: str | None) -> defer.Deferred[tuple[bytes, str]]:
        d = self._ask("metrics")

        def encode(answers: dict[int, Any]) -> tuple[bytes, str]:
            families = merge_metrics(list(self.metrics.registry.collect()),
                                     {index: answer["text"] for index, answer in answers.items()})
            encoder, content_type = choose_encoder(accept or "")
            return encoder(_Families(families)), content_type

        return d.addCallback(encode)

    def status(self) -> defer.Deferred[dict[str, Any]]:
        d = self._ask("status")
        return d.addCallback(lambda answers: self.status_document(*merge_status(answers)))

    def reload(self) -> defer.Deferred[tuple[bool, dict[str, Any]]]:
        """Parse once, check, send the same text to every worker, answer once."""
        self.notifier.reloading()
        read = self._read_for_reload()
        if isinstance(read, list):
            self.notifier.ready(self._summary())
            return defer.succeed(self._reload_refused(read))
        config, text = read
        try:
            # What a worker will build, built once here: a file that cannot be used
            # (an upstream's ca_file, say) refuses the reload before any worker sees it.
            trial = build_runtime(self._reactor, config, ResponseCache(lambda: 0.0, 1, 1), None,
                                  HealthBook(lambda: 0.0))
            for client in trial.clients.values():
                client.close()
            _make_self_signed(config, self._now())  # once, here, for the workers to load
        except (OSError, ValueError) as e:
            self.notifier.ready(self._summary())
            return defer.succeed(self._reload_refused([f"{config.path}: {e}"]))
        asked = self._serving()
        d = self._ask("reload", text=text, path=config.path)
        # The parent's own view of the certificates, re-read while the workers re-read theirs.
        previous = self.certificates.states
        mine = self.certificates.load(config, reread=True)

        def outcome(answers: dict[int, Any]) -> tuple[bool, dict[str, Any]]:
            errors = [error for answer in answers.values() if not answer["ok"] for error in answer["errors"]]
            # A slot is empty (None) while its worker is being replaced, after a crash.
            missing = [index for index, w in enumerate(self.workers) if w is None or index not in answers]
            if errors:
                self.certificates.load(self.config)  # back to the file the workers still serve
                return self._reload_refused(errors)
            report_certificates(previous, mine)
            self._config_text = text
            for worker in asked:
                if worker.index in answers:
                    worker.text = text
            self._accept_reload(config)
            self._update_renewals()
            if missing:
                log.warn("workers {missing} were not serving during the reload; they start with the new file",
                         missing=missing)
            return True, self._reload_summary()

        def notify_ready(result: tuple[bool, dict[str, Any]] | Failure) -> tuple[bool, dict[str, Any]] | Failure:
            self.notifier.ready(self._summary())
            return result

        return d.addCallback(outcome).addBoth(notify_ready)

    def _watchdog(self) -> None:
        # NotifyAccess=main: only this process may ping, and only while every worker serves.
        if len(self._serving()) == self.count:
            self.notifier.watchdog()

    # ------------------------------------------------------------------ life

    def start(self) -> defer.Deferred[None]:
        """Bind, start the workers and the admin listener; fires once every worker serves."""
        config = self.config
        for warning in config.warnings:
            log.warn("{warning}", warning=str(warning))
        try:
            self._bind()
        except ListenError as e:
            return defer.fail(e)
        admin = defer.gatherResults(self._listen_admin(), consumeErrors=True)
        admin.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        workers = [self._spawn(index).became_ready for index in range(self.count)]
        report_certificates({}, self.certificates.load(config))  # while the workers load theirs
        ready = defer.gatherResults(workers, consumeErrors=True)
        ready.addTimeout(READY_WITHIN, self._reactor)
        ready.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        done: defer.Deferred[list[Any]] = defer.gatherResults([admin, ready], consumeErrors=True)
        done.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        return done.addCallback(lambda _: self._start_management())

    def stop(self) -> defer.Deferred[list[Any]]:
        """Drain (``/healthz`` 503, serving on for ``drain_delay``), then stop the workers
        (each finishes its answers under way), then the rest."""
        return self.drain().addCallback(lambda _: self._stop_serving())

    def _stop_serving(self) -> defer.Deferred[list[Any]]:
        self._stopping = True
        closing = self._stop_management()
        running = [w for w in self.workers if w is not None]
        for worker in running:
            worker.signal("TERM")
        all_ended = defer.DeferredList([w.ended for w in running])
        kill = self._reactor.callLater(self.config.limits.upstream_timeout + 5, self._kill_stragglers)

        def ended(_: object) -> None:
            if kill.active():
                kill.cancel()
            for sock in self._held:
                sock.close()

        all_ended.addCallback(ended)
        return defer.gatherResults([*closing, all_ended], consumeErrors=True)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker is not None:
                log.warn("worker {index} did not stop in time; killing it", index=worker.index)
                worker.signal("KILL")

    def flush_logs(self) -> None:
        """The parent writes no access lines."""


def _make_self_signed(config: Config, now: datetime.datetime) -> None:
    for domain in config.domains.values():
        if domain.certificate.kind == "self-signed":
            ensure_self_signed(config, domain, now)


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)


__all__ = ["Supervisor", "merge_metrics", "merge_status", "worker_count"]
