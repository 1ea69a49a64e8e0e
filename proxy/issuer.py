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
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from collections.abc import Mapping

import attrs
from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

from proxy.config import AcmeSettings
from proxy.statedir import certbot_dir

#: Output kept from one certbot run: its verdict is in the last lines.
MAX_OUTPUT_BYTES = 64 * 1024
#: A certbot run that takes longer than this is stuck (its own HTTP timeouts are 45 s).
RUN_TIMEOUT = 600.0
#: The plugin's restart() asks the running proxy to reload; when the proxy itself runs
#: certbot it reloads on its own once certbot has exited.
NO_RELOAD_ENV = "TRACKPROXY_CERTBOT_NO_RELOAD"

#: certbot's entry point, run by the interpreter given.
CERTBOT_MAIN = "import sys; from certbot.main import main; sys.exit(main())"
_BUSY = "Another instance of Certbot is already running"
_RETRY_AFTER = re.compile(r"retry after (\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?: UTC|Z)?", re.IGNORECASE)
_NOISE = re.compile(
    r"^(Saving debug log|Hint:|Ask for help|See the logfile|Some challenges have failed|"
    r"Certbot failed to authenticate|The Certificate Authority reported|IMPORTANT NOTES|"
    r"Requesting a certificate|Simulating|Plugins selected|Account registered|Missing command line flag)",
)


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


def read_outcome(exit_code: int, output: str) -> CertbotOutcome:
    """Turn certbot's exit code and output into an outcome with a one-line reason.

    certbot reports a CA's refusal as ``Type:``/``Detail:`` lines under the domain;
    other failures end with their own line. The reason is the CA's words when there
    are any, else certbot's last meaningful line.
    """
    if exit_code == 0:
        return CertbotOutcome(ok=True)
    if _BUSY in output:
        return CertbotOutcome(ok=False, error=_BUSY, busy=True)
    retry_after = None
    match = _RETRY_AFTER.search(output)
    if match:
        moment = datetime.datetime.fromisoformat(match.group(1).replace(" ", "T"))
        retry_after = moment.replace(tzinfo=datetime.UTC).timestamp()
    return CertbotOutcome(ok=False, error=_reason(output, exit_code), retry_after=retry_after)


def _reason(output: str, exit_code: int) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    kind = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Type:")), None)
    detail = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Detail:")), None)
    if detail:
        return f"{kind}: {detail}" if kind else detail
    meaningful = [line for line in lines if not _NOISE.match(line) and not line.startswith("-")]
    if meaningful:
        return meaningful[-1][:500]
    return f"certbot exited with status {exit_code}"


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


class CertbotIssuer:
    """Runs certbot for one domain at a time, without blocking the reactor.

    Args:
        reactor: provides ``spawnProcess`` and ``callLater``.
        environ: the environment certbot starts from (``os.environ`` in service).
        python: the interpreter whose certbot and plugin are used.
    """

    def __init__(self, reactor: object, environ: Mapping[str, str], python: str = sys.executable) -> None:
        self._reactor = reactor
        self._environ = environ
        self._python = python
        self._running: object | None = None

    def issue(self, config_path: str, state_dir: str, acme: AcmeSettings, domain: str, force: bool) -> defer.Deferred:
        """Run certbot; fires with a :class:`CertbotOutcome` (never fails)."""
        command = certbot_command(config_path, state_dir, acme, domain, force, self._python)
        collector = _Collector()
        try:
            process = self._reactor.spawnProcess(  # type: ignore[attr-defined]
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
        timer = self._reactor.callLater(RUN_TIMEOUT, _kill, process)  # type: ignore[attr-defined]

        def ended(result: tuple[int, str]) -> CertbotOutcome:
            self._running = None
            if timer.active():
                timer.cancel()
                return read_outcome(*result)
            return CertbotOutcome(ok=False, error=f"certbot did not finish within {RUN_TIMEOUT:.0f}s")

        return collector.done.addCallback(ended)


    def stop(self) -> None:
        """Ask a certbot under way to stop (the proxy is shutting down): certbot exits
        cleanly on SIGTERM, releasing its locks; the next start tries again."""
        if self._running is not None:
            _kill(self._running, "TERM")


def _kill(process: object, signal: str = "KILL") -> None:
    try:
        process.signalProcess(signal)  # type: ignore[attr-defined]
    except error.ProcessExitedAlready:
        pass
