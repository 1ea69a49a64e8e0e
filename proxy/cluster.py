"""One node of a cluster: the issuer election, and certificates shared through etcd.

Every ``SYNC_INTERVAL`` a node, in this order:

1. keeps its lease alive (or gets a new one: a lease that expired means it was cut off or
   paused, and if it issued, it no longer does);
2. mirrors what changed in etcd since the last sync: certificates newer than its own are
   written into ``state_dir/certs/DOMAIN/`` with the same atomic writes certbot's plugin
   uses, then loaded as any changed file is; back-off records replace its own;
3. campaigns for the issuer key (it stays with whoever holds it until that lease ends);
4. if it issues: publishes its own certificates that are newer than etcd's, and its
   back-off records, each write fenced by its tenure (``clusterstore``);
5. now and then, reports itself under ``nodes/`` for ``trackproxy status``.

Only the issuer runs the certificate manager (``renewal``): the caller's ``on_elected``
and ``on_deposed`` start and stop it. Serving never waits for etcd: the store is asked in
a thread (``run_blocking``), a failed sync only changes what ``status`` says, and the
certificates on disk keep serving. An issuer that cannot renew its lease stops issuing
before the lease can have run out, so two certbots never run at once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import attrs
from cryptography import x509
from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from proxy import statedir
from proxy.certs import AcmeRecord, AcmeRecords, fingerprints, iso
from proxy.clusterkey import ClusterKey, ClusterKeyError
from proxy.clusterstore import ClusterStore, Entry, Leader, StoreError, StoreUnreachable
from proxy.config import Config
from proxy.tls import CertificateLoadError, parse_pair, read_pair

log = Logger(namespace="trackproxy.cluster")

#: The issuer lease: a node that stops renewing it (dead, paused, cut off) is replaced
#: this long after its last renewal.
LEASE_TTL = 10
SYNC_INTERVAL = 2.0
#: How often a node writes its ``nodes/NODE`` report (and reads the others').
REPORT_INTERVAL = 10.0

T = TypeVar("T")


class RunBlocking(Protocol):
    """Runs a blocking call off the reactor thread (``threads.deferToThreadPool``)."""

    def __call__(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        ...


@attrs.frozen
class SharedCertificate:
    """A certificate as etcd holds it (``certs/DOMAIN``)."""

    fullchain: bytes
    sealed_key: str
    not_before: float
    not_after: float
    serial: str
    node: str

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.fullchain).digest()

    @property
    def summary(self) -> SharedSummary:
        return SharedSummary(self.digest, self.not_before, self.serial)

    def encode(self) -> bytes:
        return json.dumps({
            "fullchain": self.fullchain.decode("ascii"), "key": self.sealed_key,
            "not_before": self.not_before, "not_after": self.not_after, "serial": self.serial,
            "node": self.node,
        }).encode("utf-8")

    @classmethod
    def decode(cls, value: bytes) -> SharedCertificate | None:
        try:
            raw = json.loads(value)
            return cls(raw["fullchain"].encode("ascii"), str(raw["key"]), float(raw["not_before"]),
                       float(raw["not_after"]), str(raw["serial"]), str(raw["node"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@attrs.frozen
class SharedSummary:
    """What a node remembers of a shared certificate between syncs: enough to tell whether
    its own is older (the chain and key are fetched again when they are needed).

    Newer means issued later (``not_before``), not ending later: a reissue onto a shorter
    lifetime must replace the longer one, not be replaced by it."""

    digest: bytes
    not_before: float
    serial: str


@attrs.frozen
class LocalCertificate:
    """What ``state_dir/certs/DOMAIN/`` holds, as far as the cluster compares it."""

    files: tuple[tuple[str, tuple[int, int, int]], ...]
    digest: bytes
    not_before: float


def encode_record(record: AcmeRecord) -> bytes:
    return json.dumps(attrs.asdict(record), sort_keys=True).encode("utf-8")


def decode_record(value: bytes) -> AcmeRecord | None:
    try:
        raw = json.loads(value)
        next_attempt = raw.get("next_attempt")
        last_error = raw.get("last_error")
        return AcmeRecord(
            failures=int(raw.get("failures", 0)),
            last_error=None if last_error is None else str(last_error),
            next_attempt=None if next_attempt is None else float(next_attempt),
            unavailable=bool(raw.get("unavailable", False)),
        )
    except (ValueError, TypeError, AttributeError):
        return None


class ClusterNode:
    """This node's part in the cluster (README "Running several nodes").

    Args:
        clock: schedules the syncs and tells how long ago the lease was renewed.
        node: this node's name (``cluster.node``).
        store: the shared state (``clusterstore.EtcdStore``), called through ``run_blocking``.
        key: seals and opens private keys.
        run_blocking: runs a store call off the reactor thread.
        now: the wall clock (for ``last_sync``).
        config: the configuration now (it changes on reload).
        records: this node's ACME back-off records (``renewals.records``).
        on_elected, on_deposed: start and stop the certificate manager.
        on_mirrored: certificate files were written: load them.
    """

    def __init__(
        self,
        clock: IReactorTime,
        node: str,
        store: ClusterStore,
        key: ClusterKey,
        run_blocking: RunBlocking,
        now: Callable[[], datetime.datetime],
        config: Callable[[], Config],
        records: Callable[[], AcmeRecords],
        on_elected: Callable[[], None],
        on_deposed: Callable[[], None],
        on_mirrored: Callable[[], None],
    ) -> None:
        self.node = node
        self._clock = clock
        self._store = store
        self._key = key
        self._run = run_blocking
        self._now = now
        self._config = config
        self._records = records
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._on_mirrored = on_mirrored
        #: Who issues, as last read (None: nobody, or not known yet).
        self.issuer: str | None = None
        #: "ok", "unreachable", "error" (etcd refused a request), or "unknown" before the first sync.
        self.store_state = "unknown"
        self.store_error: str | None = "not synced yet"
        self.last_sync: datetime.datetime | None = None
        #: The other nodes' reports (``nodes/NODE``), by name.
        self.nodes: dict[str, dict[str, Any]] = {}
        self._lease: int | None = None
        self._renewed_at = 0.0
        self._deadline: IDelayedCall | None = None
        self._tenure: Leader | None = None
        self._revisions = {"certs": 0, "acme": 0}
        self._shared: dict[str, SharedSummary] = {}
        #: (domain, digest) of shared certificates that cannot be taken here (another
        #: secret, a key that does not match): not fetched again until etcd holds another.
        self._refused: set[tuple[str, bytes]] = set()
        #: The last disk error per domain, to log each once.
        self._write_errors: dict[str, str] = {}
        self._local: dict[str, LocalCertificate] = {}
        self._published_records: dict[str, AcmeRecord] = {}
        self._reported_at: float | None = None
        self._syncing: defer.Deferred[None] | None = None
        self._again = False
        self._stopped = False
        self._loop = LoopingCall(self.sync_soon)
        self._loop.clock = clock

    @property
    def is_issuer(self) -> bool:
        return self._tenure is not None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._loop.start(SYNC_INTERVAL, now=True)

    def stop(self) -> defer.Deferred[None]:
        """Stop syncing; an issuer gives its lease back so another node takes over at once."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._tenure is not None:
            self._step_down("this node is stopping")
        if self._syncing is None:
            return self._give_lease_back()
        under_way: defer.Deferred[None] = defer.Deferred()
        self._syncing.addBoth(self._then, under_way)
        return under_way.addCallback(lambda _: self._give_lease_back())

    @staticmethod
    def _then(result: None, after: defer.Deferred[None]) -> None:
        after.callback(None)
        return result

    def _give_lease_back(self) -> defer.Deferred[None]:
        """Once no sync is under way (it might grant a lease after this)."""
        lease, self._lease = self._lease, None
        if lease is None:
            return defer.succeed(None)
        d = self._run(self._store.revoke, lease)
        d.addErrback(lambda f: log.warn("could not give the cluster lease back: {error}",
                                        error=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    def sync_soon(self) -> defer.Deferred[None] | None:
        """Sync now, or right after the sync under way."""
        if self._stopped:
            return None
        if self._syncing is not None:
            self._again = True
            return self._syncing
        self._syncing = defer.ensureDeferred(self._sync())
        self._syncing.addBoth(self._synced)
        return self._syncing

    def _synced(self, result: object) -> None:
        self._syncing = None
        if isinstance(result, Failure):
            log.failure("cluster sync crashed", result)
        if self._again:
            self._again = False
            self.sync_soon()

    # ------------------------------------------------------------------ one sync

    async def _sync(self) -> None:
        changed = False
        try:
            await self._hold_lease()
            changed = await self._mirror()
            await self._elect()
            if self._tenure is not None:
                await self._publish()
            await self._report()
        except StoreError as e:
            self._unreachable(e)
        else:
            if self.store_state == "unknown":
                log.info("node {node} joined the cluster through etcd", node=self.node)
            elif self.store_state != "ok":
                log.info("cluster store reachable again (etcd); node {node}", node=self.node)
            self.store_state, self.store_error = "ok", None
            self.last_sync = self._now()
        if changed:  # written is written, whatever failed after
            self._on_mirrored()

    def _unreachable(self, error: StoreError) -> None:
        if self.store_state in ("ok", "unknown") or self.store_error != str(error):
            log.error("cluster store: {error}; serving goes on with the certificates on disk",
                      error=str(error))
        self.store_state = "unreachable" if isinstance(error, StoreUnreachable) else "error"
        self.store_error = str(error)

    def _arm_deadline(self) -> None:
        """An issuer stops issuing ``LEASE_TTL - 2 * SYNC_INTERVAL`` after its last lease
        renewal unless another renewal comes first: before the lease can have expired in
        etcd (where another node then takes over), however long a hanging etcd holds the
        sync up."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self._clock.callLater(max(0.0, self._deadline_at() - self._clock.seconds()),
                                               self._expiring)

    def _deadline_at(self) -> float:
        return self._renewed_at + LEASE_TTL - 2 * SYNC_INTERVAL

    def _expiring(self) -> None:
        self._deadline = None
        if self._tenure is not None:
            self._step_down("its lease could not be renewed in time")

    async def _hold_lease(self) -> None:
        if self._lease is not None:
            started = self._clock.seconds()
            if await self._run(self._store.keepalive, self._lease):
                self._renewed_at = started
                if self._tenure is not None:
                    self._arm_deadline()
                return
            log.warn("cluster lease of node {node} expired", node=self.node)
            self._lease = None
            if self._tenure is not None:
                self._step_down("its lease expired")
        if self._stopped:
            return
        started = self._clock.seconds()
        self._lease = await self._run(self._store.grant, LEASE_TTL)
        self._renewed_at = started

    async def _elect(self) -> None:
        lease = self._lease
        if lease is None or self._stopped:
            return
        leader = await self._run(self._store.campaign, self.node, lease)
        if self._stopped:
            return
        ours = leader.node == self.node and leader.lease == lease
        tenure = self._tenure
        if tenure is not None and not (ours and leader.fence == tenure.fence):
            # Someone else's key, or ours deleted and made again: this tenure is over.
            self._step_down(f"{leader.node or 'nobody'} holds the issuer key")
        elif ours and tenure is None and self._clock.seconds() < self._deadline_at():
            # The back-off records the previous issuer wrote up to its last moment.
            records, _ = await self._run(self._store.changed_since, "acme", 0)
            self._take_records(records)
            if self._stopped or self._clock.seconds() >= self._deadline_at():
                return
            self._tenure = leader
            self._arm_deadline()
            log.info("node {node} now issues certificates for the cluster", node=self.node)
            self._on_elected()
        self.issuer = leader.node or None

    def _step_down(self, why: str) -> None:
        self._tenure = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.issuer == self.node:
            self.issuer = None
        log.warn("node {node} stops issuing certificates: {why}", node=self.node, why=why)
        self._on_deposed()

    # ------------------------------------------------------------------ etcd -> disk

    async def _changed(self, kind: str) -> list[Entry]:
        """What changed under ``kind/`` since the last sync; everything again if etcd's
        revision went back (restored from a backup), since the old one no longer counts."""
        entries, revision = await self._run(self._store.changed_since, kind, self._revisions[kind])
        if revision < self._revisions[kind]:
            entries, revision = await self._run(self._store.changed_since, kind, 0)
        self._revisions[kind] = revision
        return entries

    async def _mirror(self) -> bool:
        """Take what changed in etcd; True if certificate files were written."""
        entries = await self._changed("certs")
        fresh = {}
        for entry in entries:
            shared = SharedCertificate.decode(entry.value)
            if shared is None:
                log.error("cluster store: certs/{domain} is not a certificate record; ignored", domain=entry.name)
                continue
            self._shared[entry.name] = shared.summary
            fresh[entry.name] = shared
        records = await self._changed("acme")
        if self._tenure is None:  # the issuer's own records are the newest
            self._take_records(records)
        written = False
        for domain in self._acme_domains():
            summary = self._shared.get(domain)
            if summary is None or (domain, summary.digest) in self._refused:
                continue
            if not self._is_newer(summary, self.local_certificate(domain)):
                continue
            shared = fresh.get(domain) or await self._fetch(domain)
            if shared is None:
                continue
            outcome = self._write(domain, shared)
            if outcome == "refused":
                self._refused.add((domain, shared.digest))
            written |= outcome == "written"
        return written

    def _take_records(self, entries: list[Entry]) -> None:
        for entry in entries:
            record = decode_record(entry.value)
            if record is not None:
                self._records().set(entry.name, record)
                self._published_records[entry.name] = record

    async def _fetch(self, domain: str) -> SharedCertificate | None:
        """A shared certificate seen in an earlier sync (its domain was configured since)."""
        value = await self._run(self._store.get, "certs", domain)
        return SharedCertificate.decode(value) if value is not None else None

    @staticmethod
    def _is_newer(shared: SharedSummary, local: LocalCertificate | None) -> bool:
        """etcd's copy replaces the local one: issued no earlier and different (on a tie
        etcd's wins, and the issuer does not publish it, so every node ends on one)."""
        if local is None:
            return True
        return shared.digest != local.digest and shared.not_before >= local.not_before

    def _write(self, domain: str, shared: SharedCertificate) -> str:
        """Write a shared pair into ``state_dir``: ``written``, ``refused`` (it will never
        open or match here: not fetched again) or ``failed`` (the disk: tried next sync)."""
        config = self._config()
        try:
            private_key = self._key.open(domain, shared.sealed_key, shared.fullchain)
            parse_pair((shared.fullchain, private_key), f"etcd certs/{domain}", f"etcd certs/{domain}")
        except (ClusterKeyError, CertificateLoadError) as e:
            log.error("{error}; {domain} keeps its certificate", error=str(e), domain=domain)
            return "refused"
        directory = statedir.domain_cert_dir(config.state_dir, domain)
        try:
            os.makedirs(directory, mode=statedir.CERTS_MODE, exist_ok=True)
            statedir.write_atomically(os.path.join(directory, statedir.PRIVKEY), private_key, 0o600)
            statedir.write_atomically(os.path.join(directory, statedir.FULLCHAIN), shared.fullchain, 0o644)
        except OSError as e:
            error = e.strerror or str(e)
            if self._write_errors.get(domain) != error:
                log.error("cannot write the certificate for {domain} from the cluster: {error}; "
                          "tried again at every sync", domain=domain, error=error)
            self._write_errors[domain] = error
            return "failed"
        self._write_errors.pop(domain, None)
        log.info("certificate for {domain} (serial {serial}, issued through node {issuer}) "
                 "taken from the cluster", domain=domain, serial=shared.serial, issuer=shared.node)
        return "written"

    # ------------------------------------------------------------------ disk -> etcd (issuer)

    async def _publish(self) -> None:
        tenure = self._tenure
        assert tenure is not None
        for domain in self._acme_domains():
            local = self.local_certificate(domain)
            shared = self._shared.get(domain)
            if local is None or (shared is not None and
                                 (shared.digest == local.digest or shared.not_before >= local.not_before)):
                continue
            record = self._shareable(domain)
            if record is None:
                continue
            if not await self._run(self._store.put_fenced, "certs", domain, record.encode(), tenure.fence):
                self._step_down("another node holds the issuer key (write refused)")
                return
            self._shared[domain] = record.summary
            log.info("certificate for {domain} (serial {serial}) shared with the cluster",
                     domain=domain, serial=record.serial)
        records = self._records()
        for domain in self._acme_domains():
            attempts = records.get(domain)
            if self._published_records.get(domain, AcmeRecord()) == attempts:
                continue
            if not await self._run(self._store.put_fenced, "acme", domain, encode_record(attempts), tenure.fence):
                self._step_down("another node holds the issuer key (write refused)")
                return
            self._published_records[domain] = attempts

    def _shareable(self, domain: str) -> SharedCertificate | None:
        """The domain's files as a record for etcd, if they are a valid pair."""
        directory = statedir.domain_cert_dir(self._config().state_dir, domain)
        paths = (os.path.join(directory, statedir.FULLCHAIN), os.path.join(directory, statedir.PRIVKEY))
        try:
            data = read_pair(*paths)
            certified = parse_pair(data, *paths)
        except (CertificateLoadError, OSError, ValueError) as e:
            log.warn("the certificate for {domain} is not shared: {error}", domain=domain, error=str(e))
            return None
        leaf = x509.load_pem_x509_certificate(data[0])
        return SharedCertificate(
            fullchain=data[0], sealed_key=self._key.seal(domain, data[1], data[0]),
            not_before=leaf.not_valid_before_utc.timestamp(), not_after=certified.not_after.timestamp(),
            serial=f"{leaf.serial_number:x}", node=self.node,
        )

    # ------------------------------------------------------------------ reports

    async def _report(self) -> None:
        now = self._clock.seconds()
        if self._reported_at is not None and now - self._reported_at < REPORT_INTERVAL:
            return
        self._reported_at = now
        report = {"node": self.node, "issuer": self.is_issuer, "store": "ok", "last_sync": iso(self._now())}
        await self._run(self._store.put, "nodes", self.node, json.dumps(report).encode("utf-8"), None)
        entries, _ = await self._run(self._store.changed_since, "nodes", 0)
        nodes = {}
        for entry in entries:
            try:
                nodes[entry.name] = dict(json.loads(entry.value))
            except (ValueError, TypeError):
                continue
        self.nodes = nodes

    def status(self) -> dict[str, Any]:
        """``/status``'s ``cluster`` object (README "Running several nodes")."""
        nodes = {name: {"last_sync": doc.get("last_sync"), "issuer": name == self.issuer}
                 for name, doc in sorted(self.nodes.items())}
        nodes[self.node] = {"last_sync": iso(self.last_sync), "issuer": self.is_issuer}
        return {
            "node": self.node,
            "issuer": self.issuer,
            "store": self.store_state if self.store_state == "ok" else "unreachable",
            "last_sync": iso(self.last_sync),
            "store_error": self.store_error,
            "nodes": dict(sorted(nodes.items())),
        }

    # ------------------------------------------------------------------ helpers

    def _acme_domains(self) -> list[str]:
        return sorted(d.name for d in self._config().domains.values() if d.certificate.kind == "acme")

    def local_certificate(self, domain: str) -> LocalCertificate | None:
        """The domain's deployed chain, read again only when its files changed."""
        directory = statedir.domain_cert_dir(self._config().state_dir, domain)
        files = fingerprints((os.path.join(directory, statedir.FULLCHAIN), os.path.join(directory, statedir.PRIVKEY)))
        known = self._local.get(domain)
        if known is not None and known.files == files:
            return known
        if files[0][1] == (0, 0, 0):
            self._local.pop(domain, None)
            return None
        try:
            with open(files[0][0], "rb") as f:
                chain = f.read()
            not_before = x509.load_pem_x509_certificate(chain).not_valid_before_utc.timestamp()
        except (OSError, ValueError):
            self._local.pop(domain, None)
            return None
        local = LocalCertificate(files, hashlib.sha256(chain).digest(), not_before)
        self._local[domain] = local
        return local


#: Threads for etcd calls in one process: the sync, and the challenge lookups
#: (``acme.MAX_SHARED_LOOKUPS``). Its own pool, so that a hanging etcd never takes the
#: reactor's threads (name resolution uses those).
ETCD_THREADS = 10


def in_thread_pool(reactor: IReactorTime) -> RunBlocking:
    """Blocking calls on a thread pool of their own, started at the first call and
    stopped with the reactor (the reactor is Twisted's: it runs system event triggers)."""
    pool: list[ThreadPool] = []

    def run(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if not pool:
            threads_ = ThreadPool(minthreads=0, maxthreads=ETCD_THREADS, name="trackproxy-etcd")
            threads_.start()
            cast(IReactorCore, reactor).addSystemEventTrigger("during", "shutdown", threads_.stop)
            pool.append(threads_)
        return threads.deferToThreadPool(cast(IReactorThreads, reactor), pool[0], function, *args)

    return run
