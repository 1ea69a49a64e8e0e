"""When each ``certificate: acme`` domain gets a certbot run, and what a failure costs.

This module owns the schedule: a domain without a usable certificate, or whose
certificate ends within ``acme.renew_before``, is due; due domains get certbot one at a
time (certbot holds directory locks, and the CA's rate limits are per account); a
failure pushes the next attempt back exponentially (or to the CA's ``retry after``),
remembered in ``state_dir/status.json`` so a restart does not retry at once.

Before the CA is asked, DNS is asked (``preflight``): a name that does not exist, or
whose CAA forbids the CA, would only burn the account's failed-validation allowance.

Running certbot is ``issuer``'s job; loading what it deployed is the caller's
(``on_issued``); the status that results is ``certs.describe``'s.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, cast

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.certs import AcmeRecord, AcmeRecords, CertificateState, is_due, iso
from proxy.config import AcmeSettings, Config

if TYPE_CHECKING:
    from proxy.issuer import CertbotOutcome
    from proxy.preflight import Preflight

log = Logger(namespace="trackproxy.renewal")

#: First wait after a failure; doubled after each further one. Let's Encrypt allows 5
#: failed validations per name and hour: 5, 10, 20, 40 minutes stays under it.
BACKOFF_BASE = 300.0
BACKOFF_MAX = 6 * 3600.0
#: Another certbot held the lock (an operator's ``trackproxy certs``): try again soon,
#: without counting a failure.
BUSY_RETRY = 60.0


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure."""
    return min(BACKOFF_MAX, BACKOFF_BASE * cast(int, 2 ** max(0, failures - 1)))


class Issuer(Protocol):
    """What runs certbot for a domain (``issuer.CertbotIssuer``); ``stop()``, if it has
    one, ends a run under way."""

    def issue(
        self, config_path: str, state_dir: str, acme: AcmeSettings, domain: str, force: bool
    ) -> defer.Deferred[CertbotOutcome]:
        ...


class RenewalManager:
    """Runs certbot for due ACME domains, one at a time, with back-off after failures.

    Args:
        now: the wall clock (aware UTC datetime).
        records: the remembered attempts (``state_dir/status.json``).
        issuer: has ``issue(config_path, state_dir, acme, domain, force)`` firing with a
            :class:`~proxy.issuer.CertbotOutcome`.
        on_issued: called after a successful run, to load what certbot deployed.
        count: ``count(domain, result)`` for ``trackproxy_certificate_renewals_total``.
    """

    def __init__(
        self,
        now: Callable[[], datetime.datetime],
        records: AcmeRecords,
        issuer: Issuer,
        on_issued: Callable[[], None],
        count: Callable[[str, str], None],
    ) -> None:
        self._now = now
        self.records = records
        self._issuer = issuer
        self._on_issued = on_issued
        self._count = count
        self._config: Config | None = None
        self._states: Mapping[str, CertificateState] = {}
        self._preflight: Preflight | None = None
        self.running: str | None = None
        self._stopped = False
        #: False on a cluster node that does not hold the issuer lease (``cluster``).
        self.active = True

    def acme_domains(self) -> list[str]:
        if self._config is None:
            return []
        return sorted(d.name for d in self._config.domains.values() if d.certificate.kind == "acme")

    def update(
        self, config: Config, states: Mapping[str, CertificateState], preflight: Preflight | None
    ) -> None:
        """Take the current config and certificate states, then start what is due."""
        self._config = config
        self._states = states
        self._preflight = preflight
        domains = self.acme_domains()
        self.records.forget_except(set(domains))
        now = self._now()
        for domain in domains:
            state = states.get(domain)
            record = self.records.get(domain)
            if state is not None and not is_due(state, config.acme.renew_before, now) and record != AcmeRecord():
                # A good certificate arrived by another way (an operator's certbot run):
                # earlier failures no longer describe the domain.
                self.records.set(domain, AcmeRecord())
        self.kick()

    def stop(self) -> None:
        """Start no further runs, and end the one under way (shutting down)."""
        self._stopped = True
        stop = getattr(self._issuer, "stop", None)
        if stop is not None:
            stop()

    def pause(self) -> None:
        """Start no runs until :meth:`resume`, and end the one under way (this cluster
        node no longer issues: another one may start certbot for the same names)."""
        if not self.active:
            return
        self.active = False
        stop = getattr(self._issuer, "stop", None)
        if stop is not None and self.running is not None:
            stop()

    def resume(self) -> None:
        """Runs may start again (this node now issues)."""
        self.active = True
        self.kick()

    def kick(self) -> None:
        """Start a run for the first due domain, unless one is under way."""
        if self.running is not None or self._stopped or not self.active:
            return
        domain = self._next_due()
        if domain is None:
            return
        self.running = domain
        attempt = defer.ensureDeferred(self._attempt(domain))
        attempt.addErrback(self._crashed, domain)
        attempt.addBoth(self._finished)

    def _next_due(self) -> str | None:
        config = self._config
        if config is None:
            return None
        now = self._now()
        for domain in self.acme_domains():
            record = self.records.get(domain)
            if record.next_attempt is not None and record.next_attempt > now.timestamp():
                continue
            state = self._states.get(domain)
            if state is None or is_due(state, config.acme.renew_before, now):
                return domain
        return None

    def _crashed(self, failure: Failure, domain: str) -> None:
        """A bug, not the CA: logged with its traceback, and backed off like a failure
        so that it cannot turn into a loop of certbot runs."""
        log.failure("certificate attempt for {domain} crashed", failure, domain=domain)
        self._failed(domain, f"internal error: {failure.getErrorMessage()}")

    def _finished(self, _: object) -> None:
        self.running = None
        self.kick()

    async def _attempt(self, domain: str) -> None:
        config = self._config
        assert config is not None
        if self._preflight is not None:
            verdict = await self._preflight.check(domain, config.acme.server)
            if verdict.outcome in ("caa_forbids", "ineligible"):
                self._failed(domain, verdict.detail, unavailable=True)
                return
            if verdict.outcome == "unresolvable":
                self._failed(domain, f"{verdict.detail}; the CA was not asked")
                return
            if self._stopped or not self.active:
                return
        state = self._states.get(domain)
        renewing = state is not None and state.context is not None
        log.info(
            "{action} a certificate for {domain} from {server}",
            action="renewing" if renewing else "requesting",
            domain=domain,
            server=config.acme.server,
        )
        outcome = await self._issuer.issue(
            config.path, config.state_dir, config.acme, domain, renewing
        )
        if self._stopped or not self.active:
            return  # ended by shutdown or a lost lease, not by the CA: nothing to hold against the domain
        if outcome.busy:
            log.info("certbot is busy with another run; {domain} is tried again shortly", domain=domain)
            record = self.records.get(domain)
            self.records.set(domain, AcmeRecord(
                failures=record.failures, last_error=record.last_error,
                next_attempt=self._now().timestamp() + BUSY_RETRY, unavailable=record.unavailable,
            ))
            return
        if not outcome.ok:
            self._failed(domain, outcome.error, retry_after=outcome.retry_after)
            return
        self._on_issued()
        state = self._states.get(domain)
        if state is None or is_due(state, config.acme.renew_before, self._now()):
            # Guard against a loop: a CA whose certificates live shorter than
            # renew_before would otherwise be asked again at once, forever; counted as
            # a failure so the waits grow.
            self._failed(domain, _still_due(state, config.acme.renew_before))
            return
        self.records.set(domain, AcmeRecord())
        self._count(domain, "success")
        log.info("certificate for {domain} issued, valid until {not_after}",
                 domain=domain, not_after=iso(state.not_after))

    def _failed(
        self, domain: str, error: str | None, unavailable: bool = False, retry_after: float | None = None
    ) -> None:
        previous = self.records.get(domain)
        failures = previous.failures + 1
        wait_until = self._now().timestamp() + backoff(failures)
        if retry_after is not None:
            wait_until = max(wait_until, retry_after)
        self.records.set(domain, AcmeRecord(
            failures=failures, last_error=error, next_attempt=wait_until, unavailable=unavailable,
        ))
        self._count(domain, "failure")
        log.error(
            "certificate for {domain} {verdict}: {error}; next attempt after {next_attempt}",
            domain=domain,
            verdict="unavailable" if unavailable else "failed",
            error=error,
            failures=failures,
            next_attempt=iso(datetime.datetime.fromtimestamp(wait_until, datetime.UTC)),
        )


def _still_due(state: CertificateState | None, renew_before: float) -> str:
    if state is None or state.context is None:
        return "certbot succeeded but no usable certificate was deployed" + (
            f" ({state.last_error})" if state is not None and state.last_error else ""
        )
    return (
        f"the new certificate ends {iso(state.not_after)}, within acme.renew_before "
        f"({renew_before:.0f}s) of now; lower renew_before"
    )

