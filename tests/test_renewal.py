"""Certificates over time (README "Certificates", "Metrics"): the status machine, the ACME attempts
remembered in ``status.json``, the renewal schedule and its back-off, certbot's command line
and outcome, the child process, the periodic re-read and reload, and the certificate metrics.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from proxy import issuer as issuer_module
from proxy import pki
from proxy.certs import STATUSES, AcmeRecord, AcmeRecords, CertificateState, CertificateView, describe
from proxy.config import AcmeSettings, load_config, parse_config
from proxy.forward import prepare
from proxy.issuer import (
    CERTBOT_MAIN,
    NO_RELOAD_ENV,
    CertbotIssuer,
    CertbotOutcome,
    certbot_command,
    certbot_environment,
    read_outcome,
)
from proxy.metrics import Metrics
from proxy.preflight import Verdict
from proxy.renewal import BACKOFF_BASE, BACKOFF_MAX, BUSY_RETRY, RenewalManager, backoff
from proxy.service import CERTIFICATE_CHECK_INTERVAL, ProxyService
from proxy.upstream import UpstreamResponse

T0 = datetime.datetime(2026, 11, 22, 10, 0, tzinfo=datetime.UTC)
RENEW_BEFORE = 30 * 86400.0
SERVING = SSL.Context(SSL.TLS_SERVER_METHOD)  # stands for "a usable certificate is loaded"
A, B = "a.example.com", "b.example.com"


def days(n: float) -> datetime.timedelta:
    return datetime.timedelta(days=n)


def at(moment: datetime.datetime) -> float:
    return moment.timestamp()


def acme_state(domain: str, not_after: datetime.datetime | None = None) -> CertificateState:
    if not_after is None:
        return CertificateState(domain, "acme", "inactive")
    return CertificateState(domain, "acme", "valid", context=SERVING, not_after=not_after)


def write_pair(cert: Path, key: Path, host: str, not_after: datetime.datetime, bump: float = 0) -> None:
    """A self-signed pair for ``host`` ending at ``not_after``; mtimes moved by ``bump`` s."""
    certificate, private = pki.self_signed(host, not_after - days(90), not_after)
    cert.write_bytes(pki.cert_pem(certificate))
    key.write_bytes(pki.key_pem(private))
    touch(cert, key, bump=bump)


def touch(*paths: Path, bump: float) -> None:
    for path in paths:
        moment = path.stat().st_mtime + bump
        os.utime(path, (moment, moment))


# ---------------------------------------------------------------------------
# 1. describe(): the status machine


RETRY = T0 + datetime.timedelta(seconds=300)
FAILING = AcmeRecord(failures=1, last_error="connection: refused", next_attempt=at(RETRY))


@pytest.mark.parametrize("state, record, in_progress, expected", [
    pytest.param(acme_state(A), AcmeRecord(), False, ("pending", None, T0), id="acme-never-tried"),
    pytest.param(acme_state(A), FAILING, True, ("pending", "connection: refused", RETRY), id="acme-running"),
    pytest.param(acme_state(A), FAILING, False, ("failed", "connection: refused", RETRY), id="acme-failed"),
    pytest.param(acme_state(A), attrs.evolve(FAILING, last_error="CAA forbids", unavailable=True), False,
                 ("unavailable", "CAA forbids", RETRY), id="acme-unavailable"),
    pytest.param(acme_state(A, T0 + days(10)), FAILING, False, ("valid", "connection: refused", RETRY),
                 id="acme-valid-renewal-failing"),
    pytest.param(acme_state(A, T0 + days(60)), AcmeRecord(), False, ("valid", None, T0 + days(30)),
                 id="acme-next-renewal-is-not-after-minus-renew-before"),
    pytest.param(acme_state(A, T0 + days(10)), AcmeRecord(), False, ("valid", None, T0), id="acme-due-now"),
    pytest.param(CertificateState(A, "acme", "expired", SERVING, T0 - days(1)), AcmeRecord(), False,
                 ("expired", None, T0), id="acme-expired-still-served"),
    pytest.param(CertificateState(A, "acme", "failed", last_error="no start line"), AcmeRecord(), False,
                 ("failed", "no start line", T0), id="acme-broken-files"),
    pytest.param(CertificateState(A, "self-signed", "valid", SERVING, T0 + days(365)), None, False,
                 ("valid", None, None), id="self-signed"),
    pytest.param(CertificateState(A, "files", "valid", SERVING, T0 + days(5)), None, False,
                 ("valid", None, None), id="files"),
    pytest.param(CertificateState(A, "files", "expired", SERVING, T0 - days(5)), None, False,
                 ("expired", None, None), id="files-expired"),
    pytest.param(CertificateState(A, "files", "failed", last_error="key mismatch"), None, False,
                 ("failed", "key mismatch", None), id="files-broken-no-previous"),
    pytest.param(CertificateState(A, "files", "valid", SERVING, T0 + days(5), last_error="key mismatch"), None,
                 False, ("valid", "key mismatch", None), id="files-broken-previous-kept"),
    pytest.param(CertificateState(A, "none", "inactive"), None, False, ("inactive", None, None), id="none"),
])
def test_describe(state, record, in_progress, expected):
    status, last_error, next_renewal = expected
    assert describe(state, record, RENEW_BEFORE, T0, in_progress) == CertificateView(
        status=status, source=state.source, not_after=state.not_after,
        next_renewal=next_renewal, last_error=last_error)


# ---------------------------------------------------------------------------
# 2. AcmeRecords: status.json


def test_records_survive_a_restart_and_forget_unconfigured_domains(tmp_path):
    records = AcmeRecords(str(tmp_path))
    for domain in (A, B, "c.example.com"):
        records.set(domain, FAILING)
    records.forget_except({A, "d.example.com"})
    restarted = AcmeRecords(str(tmp_path))
    assert (restarted.get(A), restarted.get(B), restarted.get("c.example.com")) == (FAILING, AcmeRecord(), AcmeRecord())


def test_records_file_is_json_replaced_whole(tmp_path):
    records = AcmeRecords(str(tmp_path))
    records.set(A, FAILING)
    with open(records.path) as before:  # a reader holding the old file keeps reading it whole
        records.set(B, FAILING)
        assert json.load(before) == {"domains": {A: attrs.asdict(FAILING)}}
    assert json.loads(Path(records.path).read_text())["domains"].keys() == {A, B}
    assert sorted(os.listdir(tmp_path)) == ["status.json"]  # no temporary file left behind


def test_setting_the_default_record_removes_the_entry(tmp_path):
    records = AcmeRecords(str(tmp_path))
    records.set(A, FAILING)
    records.set(A, AcmeRecord())
    assert json.loads(Path(records.path).read_text()) == {"domains": {}}


@pytest.mark.parametrize("content", [
    "", "{not json", "[]", '{"domains": []}', '{"domains": {"a.example.com": "x"}}',
    '{"domains": {"a.example.com": {"failures": "many"}}}',
    # A wrongly typed next_attempt would stop the certificate check loop if it were kept.
    '{"domains": {"a.example.com": {"failures": 1, "next_attempt": "2026-11-22T13:00:00Z"}}}',
])
def test_a_corrupt_file_reads_as_empty(tmp_path, content):
    (tmp_path / "status.json").write_text(content)
    records = AcmeRecords(str(tmp_path))
    assert records.get(A) == AcmeRecord()
    records.set(B, FAILING)
    assert AcmeRecords(str(tmp_path)).get(B) == FAILING


# ---------------------------------------------------------------------------
# 3. RenewalManager: one certbot at a time, back-off, pre-flight


@pytest.mark.parametrize("failures, seconds", [
    (0, BACKOFF_BASE), (1, BACKOFF_BASE), (2, 2 * BACKOFF_BASE), (3, 4 * BACKOFF_BASE),
    (7, 64 * BACKOFF_BASE), (8, BACKOFF_MAX), (100, BACKOFF_MAX),
])
def test_backoff_doubles_up_to_a_cap(failures, seconds):
    assert backoff(failures) == seconds


class FakeIssuer:
    """certbot runs that end when a test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, defer.Deferred]] = []
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def issue(self, config_path, state_dir, acme, domain, force):
        self.calls.append((domain, force, defer.Deferred()))
        return self.calls[-1][2]


class FakePreflight:
    def __init__(self) -> None:
        self.verdicts: dict[str, Verdict] = {}

    def check(self, name, server_url):
        return defer.succeed(self.verdicts.get(name, Verdict("ok")))


class Renewals:
    """A RenewalManager on a hand-moved clock; a success deploys a ``lifetime`` certificate."""

    def __init__(self, tmp_path: Path, domains: tuple[str, ...] = (A,)) -> None:
        text = f"state_dir: {tmp_path}\nacme: {{renew_before: {RENEW_BEFORE:.0f}}}\ndomains:\n" + "".join(
            f"  {d}: {{certificate: acme}}\n" for d in domains)
        self.tmp_path = tmp_path
        self.config = parse_config(text, str(tmp_path / "trackproxy.yaml"))
        self.now = T0
        self.states = {d: acme_state(d) for d in domains}
        self.lifetime = days(90)
        self.issuer, self.preflight = FakeIssuer(), FakePreflight()
        self.counts: list[tuple[str, str]] = []
        self.issued: list[str] = []
        self.manager = self.restart()

    def restart(self) -> RenewalManager:
        return RenewalManager(lambda: self.now, AcmeRecords(str(self.tmp_path)), self.issuer,
                              self.deploy, lambda d, r: self.counts.append((d, r)))

    def deploy(self) -> None:
        domain = self.manager.running
        self.issued.append(domain)
        self.states[domain] = acme_state(domain, self.now + self.lifetime)
        self.update()

    def update(self) -> None:
        self.manager.update(self.config, dict(self.states), self.preflight)

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)

    def fire(self, outcome: CertbotOutcome) -> None:
        self.issuer.calls[-1][2].callback(outcome)

    def record(self, domain: str = A) -> AcmeRecord:
        return self.manager.records.get(domain)

    def asked(self) -> list[tuple[str, bool]]:
        return [(domain, force) for domain, force, _ in self.issuer.calls]


FAILED = CertbotOutcome(ok=False, error="connection: refused")


def test_one_certbot_at_a_time(tmp_path):
    r = Renewals(tmp_path, (A, B))
    r.update()
    r.manager.kick()
    assert r.asked() == [(A, False)] and r.manager.running == A
    r.fire(CertbotOutcome(ok=True))
    assert r.asked() == [(A, False), (B, False)] and r.manager.running == B


@pytest.mark.parametrize("not_after, asked", [
    (None, [(A, False)]),         # nothing served: certbot may re-deploy a good lineage
    (T0 + days(29), [(A, True)]),  # inside renew_before: certbot must not keep it
    (T0 + days(31), []),           # not due: certbot is not run at all
])
def test_when_certbot_runs_and_whether_it_forces(tmp_path, not_after, asked):
    r = Renewals(tmp_path)
    r.states[A] = acme_state(A, not_after)
    r.update()
    r.manager.kick()
    assert r.asked() == asked


RATE_LIMITED_UNTIL = at(T0) + 3 * 3600


@pytest.mark.parametrize("before, outcome, after, counted", [
    (AcmeRecord(), FAILED, AcmeRecord(1, "connection: refused", at(T0) + BACKOFF_BASE), "failure"),
    (AcmeRecord(1, "old"), FAILED, AcmeRecord(2, "connection: refused", at(T0) + 2 * BACKOFF_BASE), "failure"),
    (AcmeRecord(20, "old"), FAILED, AcmeRecord(21, "connection: refused", at(T0) + BACKOFF_MAX), "failure"),
    (AcmeRecord(), CertbotOutcome(ok=False, error="rateLimited", retry_after=RATE_LIMITED_UNTIL),
     AcmeRecord(1, "rateLimited", RATE_LIMITED_UNTIL), "failure"),
    (AcmeRecord(), CertbotOutcome(ok=False, error="rateLimited", retry_after=at(T0) + 10),
     AcmeRecord(1, "rateLimited", at(T0) + BACKOFF_BASE), "failure"),
    (AcmeRecord(2, "old"), CertbotOutcome(ok=False, error="busy", busy=True),
     AcmeRecord(2, "old", at(T0) + BUSY_RETRY), None),
    (AcmeRecord(2, "old"), CertbotOutcome(ok=True), AcmeRecord(), "success"),
], ids=["first-failure", "second-doubles", "capped", "ca-retry-after-later-wins",
        "backoff-later-than-retry-after", "busy-is-no-failure", "success-clears"])
def test_what_a_certbot_run_leaves_behind(tmp_path, before, outcome, after, counted):
    r = Renewals(tmp_path)
    r.manager.records.set(A, before)
    r.update()
    r.fire(outcome)
    assert r.record() == after and AcmeRecords(str(tmp_path)).get(A) == after
    assert r.counts == ([(A, counted)] if counted else [])
    assert r.issued == ([A] if outcome.ok else []) and r.manager.running is None


def test_no_new_attempt_before_next_attempt_even_after_a_restart(tmp_path):
    r = Renewals(tmp_path)
    r.update()
    r.fire(FAILED)
    r.manager.kick()
    r.advance(BACKOFF_BASE - 1)
    r.update()
    r.manager = r.restart()
    r.update()
    assert len(r.issuer.calls) == 1
    r.advance(1)
    r.manager.kick()
    assert r.asked() == [(A, False), (A, False)]


def test_success_that_is_still_due_is_a_failure_not_a_loop(tmp_path):
    r = Renewals(tmp_path)
    r.lifetime = days(20)  # shorter than renew_before
    r.update()
    r.fire(CertbotOutcome(ok=True))
    assert r.issued == [A] and r.counts == [(A, "failure")] and len(r.issuer.calls) == 1
    assert r.record().failures == 1 and "renew_before" in r.record().last_error
    assert r.record().next_attempt == at(T0) + BACKOFF_BASE


def test_repeated_still_due_successes_back_off_further(tmp_path):
    r = Renewals(tmp_path)
    r.lifetime = days(20)
    r.update()
    r.fire(CertbotOutcome(ok=True))
    r.advance(BACKOFF_BASE)
    r.update()
    r.fire(CertbotOutcome(ok=True))
    assert r.record().failures == 2 and r.record().next_attempt == at(r.now) + 2 * BACKOFF_BASE


def test_a_crashed_attempt_backs_off_like_a_failure(tmp_path):
    r = Renewals(tmp_path)
    r.update()
    r.issuer.calls[-1][2].errback(RuntimeError("on_issued or the issuer broke"))
    assert len(r.issuer.calls) == 1 and r.record().failures == 1


NXDOMAIN = "a.example.com does not exist in DNS (NXDOMAIN)"
CAA = "CAA at example.com allows only sectigo.com, not letsencrypt.org"


@pytest.mark.parametrize("verdict, after, status", [
    (Verdict("caa_forbids", CAA), AcmeRecord(1, CAA, at(T0) + BACKOFF_BASE, unavailable=True), "unavailable"),
    (Verdict("ineligible", "x is an IP"), AcmeRecord(1, "x is an IP", at(T0) + BACKOFF_BASE, True), "unavailable"),
    (Verdict("unresolvable", NXDOMAIN),
     AcmeRecord(1, NXDOMAIN + "; the CA was not asked", at(T0) + BACKOFF_BASE), "failed"),
])
def test_a_preflight_verdict_spares_the_ca(tmp_path, verdict, after, status):
    r = Renewals(tmp_path)
    r.preflight.verdicts[A] = verdict
    r.update()
    assert r.asked() == [] and r.record() == after and r.counts == [(A, "failure")]
    assert describe(r.states[A], r.record(), RENEW_BEFORE, T0).status == status


def test_a_good_certificate_from_elsewhere_clears_an_old_failure(tmp_path):
    r = Renewals(tmp_path)
    r.manager.records.set(A, AcmeRecord(failures=3, last_error="old", next_attempt=at(T0) + 999))
    r.states[A] = acme_state(A, T0 + days(80))
    r.update()
    assert r.record() == AcmeRecord() and r.asked() == []


def test_stop_prevents_new_runs(tmp_path):
    r = Renewals(tmp_path, (A, B))
    r.update()
    r.manager.stop()
    r.fire(CertbotOutcome(ok=True))
    r.update()
    assert r.asked() == [(A, False)] and r.manager.running is None


def test_stop_ends_the_run_under_way_without_holding_it_against_the_domain(tmp_path):
    r = Renewals(tmp_path)
    r.update()
    r.manager.stop()
    assert r.issuer.stopped
    r.fire(CertbotOutcome(ok=False, error="certbot exited with status 143"))
    assert r.record() == AcmeRecord() and r.counts == []


def test_removed_domains_are_forgotten(tmp_path):
    r = Renewals(tmp_path, (A, B))
    r.manager.records.set(B, FAILING)
    r.config = Renewals(tmp_path / "other", (A,)).config
    r.update()
    assert AcmeRecords(str(tmp_path)).get(B) == AcmeRecord()


# ---------------------------------------------------------------------------
# 4. read_outcome: what certbot leaves on disk

#: How certbot 5's ACME client records a response in its debug log (from a real run
#: against pebble, trimmed): a failed validation, in the authorization's challenge.
FAILED_VALIDATION_LOG = """\
2026-11-22 10:00:01,100:DEBUG:certbot._internal.main:certbot version: 5.8.0
2026-11-22 10:00:02,374:DEBUG:acme.client:Received response:
HTTP 200
Content-Type: application/json; charset=utf-8
Date: Sun, 22 Nov 2026 10:00:02 GMT

{
   "status": "invalid",
   "identifier": {"type": "dns", "value": "a.example.com"},
   "challenges": [
      {
         "type": "http-01",
         "status": "invalid",
         "error": {
            "type": "urn:ietf:params:acme:error:connection",
            "detail": "dial tcp 127.0.0.2:80: connect: connection refused",
            "status": 400
         }
      }
   ]
}
2026-11-22 10:00:02,375:INFO:certbot._internal.auth_handler:Challenge failed for domain a.example.com
2026-11-22 10:00:02,399:ERROR:certbot._internal.log:Some challenges have failed.
"""
#: A refused new order (RFC 8555 §6.7 problem document) with Retry-After in seconds.
RATE_LIMITED_LOG = """\
2026-11-22 10:00:02,374:DEBUG:acme.client:Received response:
HTTP 429
Content-Type: application/problem+json
Date: Sun, 22 Nov 2026 10:00:00 GMT
Retry-After: 3600

{
  "type": "urn:ietf:params:acme:error:rateLimited",
  "detail": "too many failed authorizations (5) for \\"a.example.com\\" in the last 1h0m0s",
  "status": 429
}
2026-11-22 10:00:02,399:ERROR:certbot._internal.log:urn:ietf:params:acme:error:rateLimited :: ...
"""
#: Let's Encrypt's own horizon in the detail, no header.
RATE_LIMITED_IN_DETAIL_LOG = RATE_LIMITED_LOG.replace("Retry-After: 3600\n", "").replace(
    'in the last 1h0m0s"', 'in the last 1h0m0s, retry after 2026-11-22 13:00:00 UTC: see https://letsencrypt.org"')
#: The ACME server unreachable: no response at all, certbot's last error record.
UNREACHABLE_LOG = """\
2026-11-22 10:00:01,100:DEBUG:certbot._internal.main:certbot version: 5.8.0
2026-11-22 10:00:01,200:ERROR:certbot._internal.log:HTTPSConnectionPool(host='localhost', port=14000): Max retries \
exceeded with url: /dir (Caused by NewConnectionError: [Errno 111] Connection refused)
"""


def certbot_left(state_dir: Path, log: str | None = None, lineage: bool = False) -> Path:
    """A state_dir/certbot/ as a certbot run leaves it."""
    for name in ("config", "work", "logs"):
        (state_dir / "certbot" / name).mkdir(parents=True, exist_ok=True)
    if log is not None:
        (state_dir / "certbot" / "logs" / "letsencrypt.log").write_text(log)
    if lineage:
        (state_dir / "certbot" / "config" / "live" / A).mkdir(parents=True)
        (state_dir / "certbot" / "config" / "live" / A / "fullchain.pem").write_text("PEM")
        (state_dir / "certbot" / "config" / "renewal").mkdir()
        (state_dir / "certbot" / "config" / "renewal" / f"{A}.conf").write_text("[renewalparams]\n")
    return state_dir


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """A local zone nine hours from UTC, so a "retry after" read as local time shows."""
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_time_not_utc")
@pytest.mark.parametrize("code, log, lineage, expected", [
    (0, None, True, CertbotOutcome(ok=True)),
    (0, None, False, CertbotOutcome(ok=False, error=f"certbot exited with success but left no lineage for {A}")),
    (1, FAILED_VALIDATION_LOG, False,
     CertbotOutcome(ok=False, error="connection: dial tcp 127.0.0.2:80: connect: connection refused")),
    (1, RATE_LIMITED_LOG, False, CertbotOutcome(
        ok=False, error='rateLimited: too many failed authorizations (5) for "a.example.com" in the last 1h0m0s',
        retry_after=at(T0 + datetime.timedelta(hours=1)))),
    (1, RATE_LIMITED_IN_DETAIL_LOG, False, CertbotOutcome(
        ok=False, error=('rateLimited: too many failed authorizations (5) for "a.example.com" in the last 1h0m0s, '
                         'retry after 2026-11-22 13:00:00 UTC: see https://letsencrypt.org'),
        retry_after=at(T0 + datetime.timedelta(hours=3)))),
    (1, UNREACHABLE_LOG, False, CertbotOutcome(ok=False, error=(
        "HTTPSConnectionPool(host='localhost', port=14000): Max retries exceeded with url: /dir "
        "(Caused by NewConnectionError: [Errno 111] Connection refused)"))),
    (137, None, False, CertbotOutcome(ok=False, error="certbot exited with status 137")),
], ids=["success", "success-without-lineage", "ca-refused-challenge", "rate-limited", "rate-limited-detail",
        "acme-server-down", "killed"])
def test_read_outcome_from_what_certbot_left(tmp_path, code, log, lineage, expected):
    state_dir = certbot_left(tmp_path, log, lineage)
    assert read_outcome(code, str(state_dir), A, started=time.time() - 5) == expected


def test_a_log_older_than_the_run_is_not_this_runs(tmp_path):
    state_dir = certbot_left(tmp_path, FAILED_VALIDATION_LOG)
    log = state_dir / "certbot" / "logs" / "letsencrypt.log"
    os.utime(log, (time.time() - 3600, time.time() - 3600))
    assert read_outcome(1, str(state_dir), A, started=time.time()) == CertbotOutcome(
        ok=False, error="certbot exited with status 1")


@pytest.fixture
def certbot_holding_its_lock(tmp_path):
    """Another process holding certbot's lock on state_dir/certbot/config, the way
    certbot itself takes it (its own lock module)."""
    config_dir = certbot_left(tmp_path) / "certbot" / "config"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from certbot._internal import lock; "
         f"held = lock.lock_dir({str(config_dir)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield tmp_path
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_held_by_another_certbot_is_busy(certbot_holding_its_lock):
    state_dir = str(certbot_holding_its_lock)
    assert issuer_module.certbot_busy(state_dir)
    assert read_outcome(1, state_dir, A, started=time.time()) == CertbotOutcome(
        ok=False, error=issuer_module.BUSY, busy=True)


def test_a_lock_file_nobody_holds_is_not_busy(tmp_path):
    state_dir = certbot_left(tmp_path)
    (state_dir / "certbot" / "config" / ".certbot.lock").write_text("")
    assert not issuer_module.certbot_busy(str(state_dir))


# ---------------------------------------------------------------------------
# 5. certbot's command line and environment


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("force, email, present, absent", [
    (True, None, ["--force-renewal", "--register-unsafely-without-email"], ["--keep-until-expiring", "--email"]),
    (False, "ops@example.com", ["--keep-until-expiring", "--email", "ops@example.com", "--no-eff-email"],
     ["--force-renewal", "--register-unsafely-without-email"]),
])
def test_force_and_email_options(force, email, present, absent):
    command = certbot_command("/etc/t.yaml", "/var/lib/t", AcmeSettings(email=email), A, force)
    assert command[-len(present):] == present and not set(absent) & set(command)


def test_command_runs_certbot_for_one_domain_under_state_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    acme = AcmeSettings(server="https://ca.test/dir", key_type="rsa")
    command = certbot_command("t.yaml", "/var/lib/t", acme, A, False, python="/opt/py")
    assert command[:4] == ["/opt/py", "-c", CERTBOT_MAIN, "run"]
    assert option(command, "--trackproxy-config") == str(tmp_path / "t.yaml")
    assert option(command, "--authenticator") == option(command, "--installer") == "trackproxy"
    assert option(command, "--cert-name") == option(command, "--domains") == A
    assert (option(command, "--server"), option(command, "--key-type")) == ("https://ca.test/dir", "rsa")
    for name in ("config", "work", "logs"):
        assert option(command, f"--{name}-dir") == f"/var/lib/t/certbot/{name}"


def test_environment_trusts_the_ca_bundle_and_says_whether_to_reload():
    base = {"PATH": "/usr/bin", NO_RELOAD_ENV: "1"}
    env = certbot_environment(AcmeSettings(ca_bundle="/etc/pebble.pem"), base, reload=True)
    assert env == {"PATH": "/usr/bin", "REQUESTS_CA_BUNDLE": "/etc/pebble.pem"}
    assert base == {"PATH": "/usr/bin", NO_RELOAD_ENV: "1"}
    assert certbot_environment(AcmeSettings(), {"PATH": "/usr/bin"}, reload=False) == {
        "PATH": "/usr/bin", NO_RELOAD_ENV: "1"}


# ---------------------------------------------------------------------------
# 6. CertbotIssuer: a real child process (a stand-in interpreter, no certbot)


@pytest.fixture
def reactor():
    from twisted.internet import reactor  # pytest-twisted runs it; only tests touch the global one

    return reactor


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


@pytest_twisted.ensureDeferred
async def test_issuer_runs_the_command_in_state_dir_and_reads_the_outcome(reactor, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    certbot_left(state_dir)
    python = fake_python(tmp_path, (
        'printf "%s\\n" "$@" > args; printf "%s" "$TRACKPROXY_CERTBOT_NO_RELOAD" > no-reload\n'
        "echo 'Certbot failed: words that change between releases'\n"
        f"cat > certbot/logs/letsencrypt.log <<'EOF'\n{FAILED_VALIDATION_LOG}EOF\nexit 1\n"))
    issuer = CertbotIssuer(reactor, {"PATH": os.environ["PATH"]}, python=python)
    outcome = await issuer.issue("/etc/t.yaml", str(state_dir), AcmeSettings(), A, True).addTimeout(10, reactor)
    assert outcome == CertbotOutcome(ok=False, error="connection: dial tcp 127.0.0.2:80: connect: connection refused")
    args = (state_dir / "args").read_text().splitlines()
    assert args == certbot_command("/etc/t.yaml", str(state_dir), AcmeSettings(), A, True, python)[1:]
    assert (state_dir / "no-reload").read_text() == "1"


@pytest_twisted.ensureDeferred
async def test_issuer_kills_a_certbot_that_never_finishes(reactor, tmp_path, monkeypatch):
    monkeypatch.setattr(issuer_module, "RUN_TIMEOUT", 1.0)
    python = fake_python(tmp_path, f"echo $$ > {tmp_path}/pid\nexec sleep 1000\n")
    issuer = CertbotIssuer(reactor, {"PATH": os.environ["PATH"]}, python=python)
    outcome = await issuer.issue("/etc/t.yaml", str(tmp_path), AcmeSettings(), A, False).addTimeout(10, reactor)
    assert outcome == CertbotOutcome(ok=False, error="certbot did not finish within 1s")
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)


# ---------------------------------------------------------------------------
# 7. ProxyService: the periodic certificate check and reload


OLD = "  old.example.com: {certificate: none}\n"
YAML = """\
listen: {{http: ["tcp:0"], https: ["tcp:0"], admin: ["tcp:0:interface=127.0.0.1"]}}
state_dir: {state}
domains:
  track.example.com: {{certificate: {{cert: {cert}, key: {key}}}}}
{extra}"""


@pytest.fixture
def served(tmp_path):
    cert, key = tmp_path / "track.pem", tmp_path / "track.key"
    write_pair(cert, key, "track.example.com", T0 + days(60))
    path = tmp_path / "trackproxy.yaml"
    path.write_text(YAML.format(state=tmp_path / "state", cert=cert, key=key, extra=OLD))
    reactor = MemoryReactorClock()
    service = ProxyService(reactor, load_config(str(path)), issuer=FakeIssuer(), out=io.StringIO(), now=lambda: T0)
    service.start()
    assert service.ready and len(reactor.tcpServers) == 3
    return service, reactor, path, cert, key


def served_context(service: ProxyService, name: str = "track.example.com") -> SSL.Context:
    return service.server_tls._contexts[name]


def test_changed_files_are_served_after_the_next_check(served):
    service, reactor, _, cert, key = served
    first = served_context(service)
    write_pair(cert, key, "track.example.com", T0 + days(80), bump=10)
    reactor.advance(CERTIFICATE_CHECK_INTERVAL - 1)
    assert served_context(service) is first
    reactor.advance(1)
    assert served_context(service) is not first
    view = service.certificate_views()["track.example.com"]
    assert (view.status, view.not_after, view.last_error) == ("valid", T0 + days(80), None)


def test_a_broken_replacement_keeps_the_previous_certificate(served):
    service, reactor, _, cert, key = served
    first = served_context(service)
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    touch(cert, bump=10)
    reactor.advance(CERTIFICATE_CHECK_INTERVAL)
    assert served_context(service) is first
    view = service.certificate_views()["track.example.com"]
    assert (view.status, view.not_after) == ("valid", T0 + days(60)) and str(cert) in view.last_error


def test_an_invalid_reload_changes_nothing(served):
    service, _, path, _, _ = served
    router, contexts = service.runtime.router, service.server_tls._contexts
    text = path.read_text()
    path.write_text(text + "bogus_key: 1\n")
    ok, summary = service.reload()
    line = text.count("\n") + 1
    assert not ok and summary["result"] == "failure"
    assert len(summary["errors"]) == 1 and summary["errors"][0].startswith(f"{path}:{line}:1: ")
    assert service.runtime.router is router
    assert service.server_tls._contexts is contexts
    registry = service.metrics.registry
    assert registry.get_sample_value("trackproxy_config_reloads_total", {"result": "failure"}) == 1
    assert registry.get_sample_value("trackproxy_config_last_reload_success") == 0


def test_a_good_reload_adds_a_domain_and_drops_a_removed_ones_cache(served, tmp_path):
    service, _, path, cert, key = served
    for host in (b"track.example.com", b"old.example.com"):
        service.cache.put(b"https://" + host + b"/f/a", host, prepare(UpstreamResponse(302, b"Found", (), b"")), 60)
    path.write_text(YAML.format(state=tmp_path / "state", cert=cert, key=key,
                                extra="  click.example.com: {certificate: none}\n"))
    ok, summary = service.reload()
    assert ok and summary["result"] == "success" and summary["domains"] == 2
    assert set(service.runtime.config.domains) == {"track.example.com", "click.example.com"}
    assert set(service.runtime.router.routes) == {"track.example.com", "click.example.com"}
    assert service.cache.entries_per_domain() == {"track.example.com": 1}
    assert service.metrics.registry.get_sample_value("trackproxy_config_reloads_total", {"result": "success"}) == 1


# ---------------------------------------------------------------------------
# 8. Metrics: certificate status and expiry


def test_certificate_metrics_follow_the_views():
    views = {
        A: CertificateView("valid", "acme", T0 + days(60), T0 + days(30), None),
        B: CertificateView("failed", "acme", None, T0, "connection: refused"),
    }
    metrics = Metrics(CollectorRegistry())
    metrics.watch_certificates(lambda: dict(views))
    sample = metrics.registry.get_sample_value
    for domain, view in views.items():
        values = {s: sample("trackproxy_certificate_status", {"domain": domain, "status": s}) for s in STATUSES}
        assert values == {s: 1.0 if s == view.status else 0.0 for s in STATUSES}
    assert sample("trackproxy_certificate_expiry_timestamp_seconds", {"domain": A}) == at(T0 + days(60))
    assert sample("trackproxy_certificate_expiry_timestamp_seconds", {"domain": B}) is None
    del views[B]
    assert B.encode() not in generate_latest(metrics.registry)
    assert sample("trackproxy_certificate_status", {"domain": A, "status": "valid"}) == 1.0


def test_a_reload_whose_upstream_ca_file_is_garbage_is_refused_and_changes_nothing(served, tmp_path):
    service, _, path, cert, key = served
    router = service.runtime.router
    bad_ca = tmp_path / "garbage-ca.pem"
    bad_ca.write_text("not a certificate\n")
    path.write_text(YAML.format(state=tmp_path / "state", cert=cert, key=key, extra="")
                    + f"upstreams:\n  sparkpost: {{ca_file: {bad_ca}}}\n")
    ok, summary = service.reload()
    assert not ok and summary["result"] == "failure"
    assert str(bad_ca) in summary["errors"][0]
    assert service.runtime.router is router and service.last_reload_success is False
