"""Certificates per domain: where they come from, whether they serve, and what went wrong.

This module owns the certificate files in ``state_dir/certs/DOMAIN/`` and the operator's
own ``{cert, key}`` pairs: it makes self-signed certificates for local use, loads every
pair into a serving context (through ``tls``), and keeps a status per domain with the
statuses of the README's "Certificates" section (``inactive``, ``valid``, ``expired``, ``failed``, ...).

A refused file never takes away what was serving: :meth:`CertificateStore.load` keeps
the previous context of a domain whose new files are broken and records why in
``last_error``. Which contexts the HTTPS listener serves is decided by the caller, which
hands :meth:`CertificateStore.contexts` to ``tls.ServerTLS`` in one swap.

Issuing and renewing ACME certificates is certbot's job (through the plugin, driven by
``renewal``); this module picks up what certbot deployed into ``state_dir/certs/DOMAIN/``,
remembers each ACME domain's attempts in ``state_dir/status.json`` (:class:`AcmeRecords`)
so a restart keeps failures and back-off, and combines both into the status an operator
sees (:func:`describe`).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.logger import Logger

from proxy import pki
from proxy.config import Config, Domain
from proxy.statedir import (
    FULLCHAIN,
    PRIVKEY,
    SELF_SIGNED_CERT,
    SELF_SIGNED_KEY,
    STATUS_FILE,
    domain_cert_dir,
    write_atomically,
)
from proxy.tls import CertificateLoadError, CertifiedKey, load_pair, pair_digest, parse_pair, read_pair

if TYPE_CHECKING:
    import builtins

_log = Logger(namespace="trackproxy.certs")

STATUSES = ("inactive", "pending", "valid", "expired", "failed", "unavailable")

SELF_SIGNED_LIFETIME = datetime.timedelta(days=365)
#: A self-signed certificate this close to its end is made again at start-up.
SELF_SIGNED_REFRESH = datetime.timedelta(days=30)


@attrs.frozen
class CertificateState:
    """What one domain serves, as status reports it."""

    domain: str
    source: str  # acme | files | self-signed | none
    status: str
    #: What serves it (checked; its OpenSSL context is built at the first handshake).
    context: CertifiedKey | None = attrs.field(default=None, eq=False, repr=False)
    not_after: datetime.datetime | None = None
    last_error: str | None = None
    #: The files this state was loaded from, with (mtime, inode, size), so a watcher can
    #: tell when they change.
    files: tuple[tuple[str, tuple[int, int, int]], ...] = ()


def iso(moment: datetime.datetime | None) -> str | None:
    """A time as status shows it: UTC, ISO 8601, to the second (``2027-01-21T10:00:00Z``)."""
    if moment is None:
        return None
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_files(config: Config, domain: Domain) -> tuple[str, str] | None:
    """The (fullchain, key) paths a domain serves from, or None for ``none``."""
    spec = domain.certificate
    directory = domain_cert_dir(config.state_dir, domain.name)
    if spec.kind == "files":
        return cast("tuple[str, str]", (spec.cert, spec.key))  # config sets both for "files"
    if spec.kind == "self-signed":
        return (os.path.join(directory, SELF_SIGNED_CERT), os.path.join(directory, SELF_SIGNED_KEY))
    if spec.kind == "acme":
        return (os.path.join(directory, FULLCHAIN), os.path.join(directory, PRIVKEY))
    return None


def fingerprints(paths: tuple[str, ...]) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """What tells a changed file without reading it: modification time, inode (an atomic
    replace makes a new one, even when a copy kept the old time) and size."""
    result = []
    for path in paths:
        try:
            info = os.stat(path)
            result.append((path, (info.st_mtime_ns, info.st_ino, info.st_size)))
        except OSError:
            result.append((path, (0, 0, 0)))
    return tuple(result)


class CertificateStore:
    """Loads each domain's certificate and remembers the last one that worked.

    Args:
        now: the current time as an aware UTC datetime (injected so tests control it).
    """

    def __init__(self, now: Callable[[], datetime.datetime], make_self_signed: bool = True) -> None:
        self._now = now
        #: False in worker processes: their parent makes self-signed certificates, once,
        #: before it has them load the files (two workers making their own would serve
        #: two different certificates for one name).
        self._make_self_signed = make_self_signed
        self._states: dict[str, CertificateState] = {}

    @property
    def states(self) -> Mapping[str, CertificateState]:
        return dict(self._states)

    def contexts(self) -> dict[str, CertifiedKey]:
        """name -> context for every domain that has something to serve."""
        return {d: s.context for d, s in self._states.items() if s.context is not None}

    def load(self, config: Config, reread: bool = False) -> dict[str, CertificateState]:
        """Load every domain of ``config``; domains no longer configured are dropped.

        Files that look unchanged (:func:`fingerprints`) are not parsed again unless
        ``reread`` (an operator's reload: whatever the files look like, they are read).
        Self-signed certificates that are missing or stale are made first.
        """
        states: dict[str, CertificateState] = {}
        for domain in config.domains.values():
            if domain.certificate.kind == "self-signed" and self._make_self_signed:
                try:
                    ensure_self_signed(config, domain, self._now())
                except OSError as e:
                    # A full or read-only state_dir: what is there (if anything) serves.
                    states[domain.name] = self._refused(
                        config, domain, f"cannot write its self-signed certificate: {e.strerror or e}"
                    )
                    continue
            states[domain.name] = self._load_domain(config, domain, reread)
        self._states = states
        return dict(states)

    def _load_domain(self, config: Config, domain: Domain, reread: bool) -> CertificateState:
        source = domain.certificate.source
        files = certificate_files(config, domain)
        if files is None:
            return CertificateState(domain.name, source, "inactive")
        fingerprint = fingerprints(files)
        previous = self._states.get(domain.name)
        same_source = previous is not None and previous.source == source
        if same_source and previous is not None and previous.files == fingerprint and not reread:
            return attrs.evolve(previous, status=self._status_for(previous.not_after, previous))
        if source == "acme" and fingerprint[0][1] == (0, 0, 0):
            # Nothing issued yet: the domain waits for certbot.
            return CertificateState(domain.name, source, "inactive", files=fingerprint)
        try:
            data = read_pair(*files)
            kept = previous.context if same_source and previous is not None else None
            if kept is not None and kept.digest == pair_digest(data):
                # Read again (an explicit reload reads every file) and unchanged.
                assert previous is not None  # kept is its context
                return attrs.evolve(previous, files=fingerprint, last_error=None,
                                    status=self._status_for(previous.not_after, previous))
            context = parse_pair(data, *files)
        except (CertificateLoadError, OSError, ValueError) as e:
            reason = e.reason if isinstance(e, CertificateLoadError) else f"{files[0]}: {e}"
            if same_source and previous is not None and previous.context is not None:
                # Keep serving what worked; say what was refused.
                return attrs.evolve(previous, last_error=reason, files=fingerprint)
            return CertificateState(domain.name, source, "failed", last_error=reason, files=fingerprint)
        state = CertificateState(
            domain.name, source, "valid", context=context, not_after=context.not_after, files=fingerprint
        )
        return attrs.evolve(state, status=self._status_for(context.not_after, state))

    def _refused(self, config: Config, domain: Domain, reason: str) -> CertificateState:
        """The domain's state when something kept it from being loaded: what served
        before still serves, or what is on disk, with ``reason`` as ``last_error``."""
        previous = self._states.get(domain.name)
        if previous is not None and previous.context is not None and previous.source == domain.certificate.source:
            return attrs.evolve(previous, last_error=reason)
        state = self._load_domain(config, domain, reread=False)
        if state.context is not None:
            return attrs.evolve(state, last_error=reason)
        return attrs.evolve(state, status="failed", last_error=reason)

    def _status_for(self, not_after: datetime.datetime | None, state: CertificateState) -> str:
        if state.context is None:
            return state.status
        if not_after is not None and not_after <= self._now():
            return "expired"
        return "valid"


def ensure_self_signed(config: Config, domain: Domain, now: datetime.datetime) -> None:
    """Make ``domain``'s self-signed certificate unless a usable one is already there.

    Kept across restarts so that a browser exception or a pinned test client keeps
    working; made again when missing, unreadable, for another name, or near its end.
    """
    cert_path, key_path = cast("tuple[str, str]", certificate_files(config, domain))  # self-signed: never None
    if _self_signed_is_usable(cert_path, key_path, domain.name, now):
        return
    cert, key = pki.self_signed(
        domain.name, now - datetime.timedelta(hours=1), now + SELF_SIGNED_LIFETIME
    )
    directory = os.path.dirname(cert_path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    write_atomically(key_path, pki.key_pem(key), mode=0o600)
    write_atomically(cert_path, pki.cert_pem(cert), mode=0o644)


def _self_signed_is_usable(cert_path: str, key_path: str, name: str, now: datetime.datetime) -> bool:
    if not (os.path.isfile(cert_path) and os.path.isfile(key_path)):
        return False
    try:
        cert = load_pair(cert_path, key_path).chain[0]
    except (OSError, ValueError, CertificateLoadError):
        return False
    return name in pki.dns_names(cert) and cert.not_valid_after_utc - now > SELF_SIGNED_REFRESH


# ---------------------------------------------------------------------------
# ACME attempts, remembered across restarts


@attrs.frozen
class AcmeRecord:
    """What the last ACME attempts for one domain left behind.

    ``failures`` counts consecutive failed attempts (it sets the back-off);
    ``next_attempt`` is the earliest wall-clock time (epoch seconds) of the next one;
    ``unavailable`` is set when the CA must not be asked at all (CAA forbids it, or the
    name is not eligible), with ``last_error`` saying why.
    """

    failures: int = 0
    last_error: str | None = None
    next_attempt: float | None = None
    unavailable: bool = False


class AcmeRecords:
    """``state_dir/status.json``: one :class:`AcmeRecord` per ACME domain.

    Every change is written through at once (atomically), so a crash or restart never
    forgets a failure and never resets a back-off. An unreadable file is treated as
    empty: the worst outcome is one early attempt.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, STATUS_FILE)
        self._records: dict[str, AcmeRecord] = self._read()
        #: Why the last write failed (None: it did not).
        self.write_error: str | None = None

    def _read(self) -> dict[str, AcmeRecord]:
        try:
            with open(self.path, encoding="utf-8") as f:
                raw = json.load(f)
            return {domain: _record_from(entry) for domain, entry in raw.get("domains", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def get(self, domain: str) -> AcmeRecord:
        return self._records.get(domain, AcmeRecord())

    def set(self, domain: str, record: AcmeRecord) -> None:
        if self._records.get(domain, AcmeRecord()) == record:
            return
        if record == AcmeRecord():
            self._records.pop(domain, None)
        else:
            self._records[domain] = record
        self._write()

    def forget_except(self, domains: frozenset[str] | builtins.set[str]) -> None:
        """Drop the records of domains no longer configured."""
        gone = [d for d in self._records if d not in domains]
        for domain in gone:
            del self._records[domain]
        if gone:
            self._write()

    def _write(self) -> None:
        """Write through; a full or read-only ``state_dir`` keeps the records in memory
        (the back-off still holds until a restart) and says why once per change."""
        body = {"domains": {d: attrs.asdict(r) for d, r in sorted(self._records.items())}}
        try:
            write_atomically(self.path, json.dumps(body, indent=2).encode("utf-8") + b"\n", mode=0o644)
        except OSError as e:
            self.write_error = f"cannot write {self.path}: {e.strerror or e}"
            _log.error("ACME records kept in memory only: {error}", error=self.write_error)
        else:
            self.write_error = None


def _record_from(entry: dict[str, Any]) -> AcmeRecord:
    """One record as written by :meth:`AcmeRecords._write`; ValueError/TypeError if the
    file was edited into something else."""
    next_attempt = entry.get("next_attempt")
    last_error = entry.get("last_error")
    if last_error is not None and not isinstance(last_error, str):
        raise TypeError("last_error")
    return AcmeRecord(
        failures=int(entry.get("failures", 0)),
        last_error=last_error,
        next_attempt=None if next_attempt is None else float(next_attempt),
        unavailable=bool(entry.get("unavailable", False)),
    )


def is_due(state: CertificateState, renew_before: float, now: datetime.datetime) -> bool:
    """Whether an ACME domain needs certbot: nothing usable served, or the served
    certificate ends within ``renew_before`` seconds."""
    if state.context is None or state.not_after is None:
        return True
    return now >= renewal_starts(state.not_after, renew_before)


def renewal_starts(not_after: datetime.datetime, renew_before: float) -> datetime.datetime:
    """When a certificate ending at ``not_after`` becomes due (``acme.renew_before``)."""
    return not_after - datetime.timedelta(seconds=renew_before)


@attrs.frozen
class CertificateView:
    """One domain's certificate as ``/status`` and the metrics show it."""

    status: str
    source: str
    not_after: datetime.datetime | None
    next_renewal: datetime.datetime | None
    last_error: str | None


def describe(
    state: CertificateState,
    record: AcmeRecord | None,
    renew_before: float,
    now: datetime.datetime,
    in_progress: bool = False,
) -> CertificateView:
    """The status machine of the README's "Certificates": what the served files and the ACME attempts say
    together.

    A usable certificate decides the status (``valid`` or ``expired``) whatever the
    attempts to renew it say; their error shows in ``last_error``. Without one, an ACME
    domain is ``pending`` while certbot works or has yet to try, ``failed`` after a failed
    attempt, and ``unavailable`` when the CA must not be asked.
    """
    next_renewal = None
    last_error = state.last_error
    status = state.status
    if record is not None:  # an ACME domain
        last_error = record.last_error or state.last_error
        if record.next_attempt is not None:
            next_renewal = datetime.datetime.fromtimestamp(record.next_attempt, datetime.UTC)
        elif state.not_after is not None:
            next_renewal = max(now, renewal_starts(state.not_after, renew_before))
        else:
            next_renewal = now
        if state.context is None:
            if in_progress:
                status = "pending"
            elif record.unavailable:
                status = "unavailable"
            elif record.failures or state.status == "failed":
                status = "failed"
            else:
                status = "pending"
    return CertificateView(
        status=status,
        source=state.source,
        not_after=state.not_after,
        next_renewal=next_renewal,
        last_error=last_error,
    )
