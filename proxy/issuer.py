"""Running certbot with the trackproxy plugin, as a child process.

This module owns certbot's command line and the reading of its outcome. The proxy
never imports certbot: certbot is a large synchronous program that holds directory
locks, so it runs as a child process, and the
reactor only waits for it to exit. It runs from the proxy's own interpreter (certbot
5 has no ``__main__``, hence ``-c``), so certbot and the plugin are the ones installed
next to the proxy. The same command line serves ``trackproxy certs``
(which runs it in the foreground) and the proxy's own renewals (``renewal``).

certbot keeps its account, lineages and logs under ``state_dir/certbot/``, so it runs
as the proxy's unprivileged user and ``certbot renew`` finds the lineages there.
Deciding *when* to run it is left to ``renewal``.

A run's outcome is read from what certbot leaves on disk, never from what it prints
(its wording changes between releases): its exit status; on success, the lineage
(``live/DOMAIN/fullchain.pem`` and ``renewal/DOMAIN.conf``); on failure, the CA's own
RFC 8555 problem document (``type``, ``detail``, and the response's ``Retry-After``),
which certbot's ACME client records in its debug log with every response; and whether
another certbot holds certbot's directory locks (``.certbot.lock``).
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import fcntl
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, AnyStr, Protocol, cast

import attrs
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport
from twisted.python.failure import Failure

from proxy.config import AcmeSettings
from proxy.statedir import certbot_dir

#: Output kept from one certbot run (it is drained, not read: see the module's docstring).
MAX_OUTPUT_BYTES = 64 * 1024
#: The most of certbot's debug log read after a failed run.
MAX_LOG_BYTES = 4 * 1024 * 1024
#: A certbot run that takes longer than this is stuck (its own HTTP timeouts are 45 s).
RUN_TIMEOUT = 600.0
#: The plugin's restart() asks the running proxy to reload; when the proxy itself runs
#: certbot it reloads on its own once certbot has exited.
NO_RELOAD_ENV = "TRACKPROXY_CERTBOT_NO_RELOAD"

#: certbot's entry point, run by the interpreter given.
CERTBOT_MAIN = "import sys; from certbot.main import main; sys.exit(main())"
BUSY = "another certbot is running (it holds certbot's lock)"
_ACME_ERROR = "urn:ietf:params:acme:error:"
#: Let's Encrypt also writes the horizon into a rate limit's detail (the CA's words).
_RETRY_AFTER = re.compile(r"retry after (\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?: UTC|Z)?", re.IGNORECASE)
#: A record of certbot's debug log starts with its time: ``2026-12-02 01:25:19,374:``.
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}:(?P<level>[A-Z]+):(?P<logger>[^:]*):(?P<message>.*)$")


def certbot_dirs(state_dir: str) -> dict[str, str]:
    """certbot's config, work and logs directories under ``state_dir/certbot/``."""
    base = certbot_dir(state_dir)
    return {name: os.path.join(base, name) for name in ("config", "work", "logs")}


def certbot_command(
    config_path: str,
    state_dir: str,
    acme: AcmeSettings,
    domain: str,
    force: bool,
    python: str = sys.executable,
) -> list[str]:
    """``certbot run`` for one domain, one lineage named after it, with the plugin as
    authenticator and installer.

    ``force`` renews even when certbot thinks the lineage is not due (the proxy decided
    it is, by ``acme.renew_before``); otherwise an existing good lineage is only
    re-deployed, without asking the CA.
    """
    dirs = certbot_dirs(state_dir)
    command = [
        python, "-c", CERTBOT_MAIN, "run",
        "--authenticator", "trackproxy", "--installer", "trackproxy",
        "--trackproxy-config", os.path.abspath(config_path),
        "--cert-name", domain, "--domains", domain,
        "--server", acme.server,
        "--key-type", acme.key_type,
        "--config-dir", dirs["config"], "--work-dir", dirs["work"], "--logs-dir", dirs["logs"],
        "--non-interactive", "--agree-tos",
        "--force-renewal" if force else "--keep-until-expiring",
    ]
    if acme.email:
        command += ["--email", acme.email, "--no-eff-email"]
    else:
        command += ["--register-unsafely-without-email"]
    return command


def certbot_environment(acme: AcmeSettings, base: Mapping[str, str], reload: bool) -> dict[str, str]:
    """The environment for certbot: trust ``acme.ca_bundle`` (certbot's HTTP client reads
    ``REQUESTS_CA_BUNDLE``), and tell the plugin whether to reload the proxy."""
    env = dict(base)
    if acme.ca_bundle:
        env["REQUESTS_CA_BUNDLE"] = acme.ca_bundle
    if reload:
        env.pop(NO_RELOAD_ENV, None)
    else:
        env[NO_RELOAD_ENV] = "1"
    return env


@attrs.frozen
class CertbotOutcome:
    """How one certbot run ended.

    ``busy`` means another certbot held the lock (an operator's ``trackproxy certs``):
    nothing was asked of the CA. ``retry_after`` is the CA's own rate-limit horizon when
    it gave one (epoch seconds).
    """

    ok: bool
    error: str | None = None
    busy: bool = False
    retry_after: float | None = None


def read_outcome(exit_code: int, state_dir: str, domain: str, started: float) -> CertbotOutcome:
    """How the certbot run for ``domain`` that started at ``started`` (epoch seconds)
    ended, from its exit status and the files it left (see the module's docstring)."""
    dirs = certbot_dirs(state_dir)
    if exit_code == 0:
        live = os.path.join(dirs["config"], "live", domain, "fullchain.pem")
        renewal = os.path.join(dirs["config"], "renewal", f"{domain}.conf")
        if os.path.isfile(live) and os.path.isfile(renewal):
            return CertbotOutcome(ok=True)
        return CertbotOutcome(ok=False, error=f"certbot exited with success but left no lineage for {domain}")
    if certbot_busy(state_dir):
        return CertbotOutcome(ok=False, error=BUSY, busy=True)
    log = _this_runs_log(os.path.join(dirs["logs"], "letsencrypt.log"), started)
    problem = last_acme_problem(log)
    if problem is not None:
        return problem
    last_error = next((m for level, m in reversed(list(_records(log))) if level in ("ERROR", "CRITICAL")), None)
    return CertbotOutcome(ok=False, error=(last_error or f"certbot exited with status {exit_code}")[:500])


def certbot_busy(state_dir: str) -> bool:
    """Whether another certbot holds the lock on any of its directories (certbot locks
    each with ``fcntl.lockf`` on ``DIR/.certbot.lock`` for as long as it runs).

    The probe is a shared lock on a read-only descriptor: it conflicts with certbot's
    exclusive one, and needs only read access to a lock file that root's certbot (the
    renew timer) may have made.
    """
    for directory in certbot_dirs(state_dir).values():
        try:
            fd = os.open(os.path.join(directory, ".certbot.lock"), os.O_RDONLY)
        except OSError:
            continue  # no lock file: nobody has run there, or nobody runs now
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return True
        finally:
            os.close(fd)  # releases the probe's lock too
    return False


def _this_runs_log(path: str, started: float) -> str:
    """certbot's debug log, if this run wrote it (certbot starts a new one per run)."""
    try:
        if os.stat(path).st_mtime < started - 1:
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - MAX_LOG_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _records(log: str) -> Iterator[tuple[str, str]]:
    """(level, message with its continuation lines) for each record of a debug log."""
    level, lines = "", []  # type: tuple[str, list[str]]
    for line in log.splitlines():
        record = _LOG_RECORD.match(line)
        if record:
            if lines:
                yield level, "\n".join(lines)
            level, lines = record.group("level"), [record.group("message")]
        else:
            lines.append(line)
    if lines:
        yield level, "\n".join(lines)


def last_acme_problem(log: str) -> CertbotOutcome | None:
    """The CA's last problem document in a certbot debug log, as an outcome.

    certbot's ACME client logs every response as ``Received response:`` followed by the
    status line, the headers, a blank line and the JSON body. A body is a problem when
    it is one (a refused order, a rate limit: RFC 8555 §6.7) or when it is an
    authorization whose challenge carries an ``error`` (a failed validation).
    """
    found: CertbotOutcome | None = None
    for _, message in _records(log):
        if not message.startswith("Received response:"):
            continue
        head, _, body = message.partition("\n\n")
        try:
            document = json.loads(body)
        except ValueError:
            continue
        problem = _problem_in(document)
        if problem is None:
            continue
        kind = str(problem.get("type", "")).removeprefix(_ACME_ERROR)
        detail = str(problem.get("detail", "")).strip()
        error = (f"{kind}: {detail}" if kind and detail else kind or detail or "the CA refused")[:500]
        found = CertbotOutcome(ok=False, error=error, retry_after=_retry_after(head, detail))
    return found


def _problem_in(document: object) -> dict[str, Any] | None:
    if not isinstance(document, dict):
        return None
    if str(document.get("type", "")).startswith(_ACME_ERROR):
        return document
    for challenge in document.get("challenges") or ():
        if isinstance(challenge, dict) and isinstance(challenge.get("error"), dict):
            return cast("dict[str, Any]", challenge["error"])
    return None


def _retry_after(head: str, detail: str) -> float | None:
    """When the CA says to ask again (epoch seconds): its ``Retry-After`` header, in
    seconds from its ``Date`` or as an HTTP date, else a "retry after" in its detail."""
    headers = {}
    value: str | None
    for line in head.splitlines()[2:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    value = headers.get("retry-after")
    if value:
        if value.isdigit():
            try:
                date = email.utils.parsedate_to_datetime(headers.get("date", ""))
            except (TypeError, ValueError):
                date = None
            base = date.timestamp() if date is not None else datetime.datetime.now(datetime.UTC).timestamp()
            return base + int(value)
        try:
            return email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            pass
    match = _RETRY_AFTER.search(detail)
    if match:
        moment = datetime.datetime.fromisoformat(match.group(1).replace(" ", "T"))
        return moment.replace(tzinfo=datetime.UTC).timestamp()
    return None


class _Collector(protocol.ProcessProtocol):
    """Keeps the last :data:`MAX_OUTPUT_BYTES` of a child's output and fires on exit."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.done: defer.Deferred[tuple[int, str]] = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        if len(self.output) > MAX_OUTPUT_BYTES:
            del self.output[: len(self.output) - MAX_OUTPUT_BYTES]

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode if isinstance(reason.value, (error.ProcessDone, error.ProcessTerminated)) else 1
        if code is None:  # killed by a signal
            code = 128 + (getattr(reason.value, "signal", 0) or 0)
        self.done.callback((code, self.output.decode("utf-8", "replace")))


class SpawnsProcesses(Protocol):
    """``IReactorProcess.spawnProcess`` as a structural type, which (unlike the interface)
    combines with other reactor capabilities."""

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str],
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: None | bytes | str = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport:
        ...


class ProcessReactor(SpawnsProcesses, Protocol):
    """What a certbot run uses of the reactor: ``IReactorProcess`` and ``IReactorTime``."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> IDelayedCall:
        ...


class CertbotIssuer:
    """Runs certbot for one domain at a time, without blocking the reactor.

    Args:
        reactor: provides ``spawnProcess`` and ``callLater``.
        environ: the environment certbot starts from (``os.environ`` in service).
        python: the interpreter whose certbot and plugin are used.
        wall_clock: epoch seconds now (to tell this run's debug log from an older one).
    """

    def __init__(self, reactor: ProcessReactor, environ: Mapping[str, str], python: str = sys.executable,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._reactor = reactor
        self._environ = environ
        self._python = python
        self._wall_clock = wall_clock
        self._running: IProcessTransport | None = None

    def issue(
        self, config_path: str, state_dir: str, acme: AcmeSettings, domain: str, force: bool
    ) -> defer.Deferred[CertbotOutcome]:
        """Run certbot; fires with a :class:`CertbotOutcome` (never fails)."""
        if certbot_busy(state_dir):  # an operator's certbot: do not even start
            return defer.succeed(CertbotOutcome(ok=False, error=BUSY, busy=True))
        command = certbot_command(config_path, state_dir, acme, domain, force, self._python)
        started = self._wall_clock()
        collector = _Collector()
        try:
            process = self._reactor.spawnProcess(
                collector,
                command[0],
                command,
                env=certbot_environment(acme, self._environ, reload=False),
                path=state_dir,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            return defer.succeed(CertbotOutcome(ok=False, error=f"cannot start certbot: {e}"))
        process.closeStdin()
        self._running = process
        timer = self._reactor.callLater(RUN_TIMEOUT, _kill, process)

        def ended(result: tuple[int, str]) -> CertbotOutcome:
            self._running = None
            if timer.active():
                timer.cancel()
                return read_outcome(result[0], state_dir, domain, started)
            return CertbotOutcome(ok=False, error=f"certbot did not finish within {RUN_TIMEOUT:.0f}s")

        return collector.done.addCallback(ended)

    def stop(self) -> None:
        """Ask a certbot under way to stop (the proxy is shutting down): certbot exits
        cleanly on SIGTERM, releasing its locks; the next start tries again."""
        if self._running is not None:
            _kill(self._running, "TERM")


def _kill(process: IProcessTransport, signal: str = "KILL") -> None:
    try:
        process.signalProcess(signal)
    except error.ProcessExitedAlready:
        pass
