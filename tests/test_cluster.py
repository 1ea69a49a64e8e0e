"""The cluster's rules: one issuer, fenced writes, certificates mirrored, tokens shared.

The store contract runs against both stores: :class:`MemoryStore` and a real etcd (Debian's
``etcd-server``, skipped without it). The node's rules run on a ``Clock`` against the
memory store, with store calls answered at once, or held (:class:`HeldCalls`) to pause a
node between two of them as a stopped process would be.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from proxy import pki, statedir
from proxy.acme import MAX_SHARED_LOOKUPS, SharedChallenges
from proxy.certs import AcmeRecord, AcmeRecords
from proxy.cluster import LEASE_TTL, SYNC_INTERVAL, ClusterNode, SharedCertificate
from proxy.clusterkey import ClusterKey, ClusterKeyError
from proxy.clusterstore import (
    EtcdStore,
    MemoryStore,
    StoreUnreachable,
    publish_token,
    read_token_record,
)
from proxy.config import Config, parse_config
from proxy.testing import LocalCA

from etcd_server import EtcdServer, require_etcd
from proxy_process import free_port

DOMAIN = "track.example.com"
NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    require_etcd()
    with EtcdServer(tmp_path_factory.mktemp("etcd")) as server:
        yield server


_prefixes = iter(range(1_000_000))


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd as operators should run it: TLS, and client certificates required."""
    require_etcd()
    directory = tmp_path_factory.mktemp("etcd-tls")
    with EtcdServer(directory, ca=LocalCA(directory / "ca")) as server:
        yield server


@pytest.fixture(params=["memory", "etcd", "etcd-tls"])
def store(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryStore()
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd")
        return EtcdStore((server.url,), f"/test/{next(_prefixes)}")
    secured: EtcdServer = request.getfixturevalue("etcd_tls")
    assert secured.ca is not None
    return EtcdStore((secured.url,), f"/test/{next(_prefixes)}", ca_file=str(secured.ca.cert_path),
                     cert=str(secured.client_cert), key=str(secured.client_key))


# ---------------------------------------------------------------------------
# The store contract


def test_the_first_campaign_wins_and_the_others_see_the_holder(store: Any) -> None:
    a, b = store.grant(LEASE_TTL), store.grant(LEASE_TTL)
    first = store.campaign("a", a)
    second = store.campaign("b", b)
    assert (first.node, first.lease) == ("a", a)
    assert (second.node, second.fence, second.lease) == ("a", first.fence, a)
    assert store.campaign("a", a) == first  # asking again changes nothing
    assert store.issuer() == "a"


def test_a_revoked_lease_frees_the_issuer_key_for_a_new_tenure(store: Any) -> None:
    a, b = store.grant(LEASE_TTL), store.grant(LEASE_TTL)
    first = store.campaign("a", a)
    store.revoke(a)
    assert store.keepalive(a) is False and store.keepalive(b) is True
    assert store.issuer() is None
    second = store.campaign("b", b)
    assert second.node == "b" and second.fence != first.fence


def test_a_fenced_write_from_an_old_tenure_is_refused(store: Any) -> None:
    a, b = store.grant(LEASE_TTL), store.grant(LEASE_TTL)
    old = store.campaign("a", a)
    assert store.put_fenced("certs", DOMAIN, b"from a", old.fence) is True
    store.revoke(a)
    assert store.put_fenced("certs", DOMAIN, b"from a, while nobody issues", old.fence) is False
    new = store.campaign("b", b)
    assert store.put_fenced("certs", DOMAIN, b"from b", new.fence) is True
    assert store.put_fenced("certs", DOMAIN, b"from a, paused past its lease", old.fence) is False
    assert store.get("certs", DOMAIN) == b"from b"


def test_changed_since_returns_only_later_writes(store: Any) -> None:
    store.put("acme", "one.example", b"1")
    entries, revision = store.changed_since("acme", 0)
    assert [(e.name, e.value) for e in entries] == [("one.example", b"1")]
    store.put("acme", "two.example", b"2")
    store.put("certs", "elsewhere.example", b"not acme")
    later, _ = store.changed_since("acme", revision)
    assert [(e.name, e.value) for e in later] == [("two.example", b"2")]


def test_a_token_is_stored_with_its_domain(store: Any) -> None:
    publish_token(store, "tok_EN-1", DOMAIN, b"tok_EN-1.thumb")
    assert read_token_record(store.get("tokens", "tok_EN-1")) == (DOMAIN, b"tok_EN-1.thumb")
    store.delete("tokens", "tok_EN-1")
    assert store.get("tokens", "tok_EN-1") is None


def test_an_etcd_nobody_listens_on_is_unreachable_and_says_where() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    store = EtcdStore((url,), "/test/down", timeout=1.0)
    with pytest.raises(StoreUnreachable, match=url.replace(".", r"\.")):
        store.grant(LEASE_TTL)


def test_etcd_with_tls_refuses_a_client_without_its_certificate(etcd_tls: EtcdServer) -> None:
    assert etcd_tls.ca is not None
    store = EtcdStore((etcd_tls.url,), "/test/nocert", ca_file=str(etcd_tls.ca.cert_path), timeout=1.0)
    with pytest.raises(StoreUnreachable):
        store.grant(LEASE_TTL)


def test_a_second_endpoint_answers_when_the_first_does_not(etcd: EtcdServer) -> None:
    store = EtcdStore((f"http://127.0.0.1:{free_port()}", etcd.url), "/test/failover", timeout=1.0)
    lease = store.grant(LEASE_TTL)
    assert store.campaign("a", lease).node == "a"


# ---------------------------------------------------------------------------
# The cluster key


def test_a_sealed_key_opens_only_with_the_same_secret_and_domain() -> None:
    key = ClusterKey(b"s" * 32)
    sealed = key.seal(DOMAIN, b"PRIVATE KEY", b"CHAIN")
    assert b"PRIVATE" not in sealed.encode()
    assert ClusterKey(b"s" * 32).open(DOMAIN, sealed, b"CHAIN") == b"PRIVATE KEY"
    with pytest.raises(ClusterKeyError, match="same cluster.secret_file"):
        ClusterKey(b"t" * 32).open(DOMAIN, sealed, b"CHAIN")
    with pytest.raises(ClusterKeyError):
        key.open("other.example.com", sealed, b"CHAIN")
    with pytest.raises(ClusterKeyError):
        key.open(DOMAIN, sealed, b"ANOTHER CHAIN")


def test_a_short_or_world_readable_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterKeyError, match="at least 32"):
        ClusterKey(b"short")
    path = tmp_path / "cluster.key"
    path.write_bytes(b"x" * 44)
    path.chmod(0o644)
    with pytest.raises(ClusterKeyError, match="readable by everyone"):
        ClusterKey.from_file(str(path))
    path.chmod(0o600)
    ClusterKey.from_file(str(path))
    with pytest.raises(ClusterKeyError, match="No such file"):
        ClusterKey.from_file(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------
# A node's rules, on a Clock


def instantly(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


class HeldCalls:
    """Store calls answered at once, except ``hold`` (a method name): that one waits for
    :meth:`release`, as a process stopped just before it would."""

    def __init__(self) -> None:
        self.hold: str | None = None
        self.held: list[tuple[defer.Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if function.__name__ == self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((d, function, args))
            return d
        return defer.maybeDeferred(function, *args)

    def release(self) -> None:
        self.hold = None
        for d, function, args in self.held:
            defer.maybeDeferred(function, *args).chainDeferred(d)
        self.held.clear()


class Node:
    """One node's ClusterNode with its own state_dir, and what its callbacks saw."""

    def __init__(self, name: str, root: Path, store: MemoryStore, clock: Clock,
                 secret: bytes = b"k" * 32, run: Callable[..., defer.Deferred[Any]] = instantly) -> None:
        self.state_dir = root / name
        statedir.prepare(str(self.state_dir))
        self.config: Config = parse_config(
            f"state_dir: {self.state_dir}\ndomains: {{{DOMAIN}: {{certificate: acme}}}}\n", str(root / "x.yaml")
        )
        self.records = AcmeRecords(str(self.state_dir))
        self.events: list[str] = []
        self.cluster = ClusterNode(
            clock, name, store, ClusterKey(secret), run, lambda: NOW,
            config=lambda: self.config, records=lambda: self.records,
            on_elected=lambda: self.events.append("elected"),
            on_deposed=lambda: self.events.append("deposed"),
            on_mirrored=lambda: self.events.append("mirrored"),
        )

    def sync(self) -> None:
        self.cluster.sync_soon()

    @property
    def fullchain(self) -> Path:
        return self.state_dir / "certs" / DOMAIN / statedir.FULLCHAIN

    @property
    def privkey(self) -> Path:
        return self.state_dir / "certs" / DOMAIN / statedir.PRIVKEY

    def deploy(self, days: float, issued_minutes_ago: float = 60) -> bytes:
        """What certbot's plugin would deploy: a pair issued ``issued_minutes_ago`` and
        valid for ``days`` from NOW."""
        cert, key = pki.self_signed(DOMAIN, NOW - datetime.timedelta(minutes=issued_minutes_ago),
                                    NOW + datetime.timedelta(days=days))
        self.fullchain.parent.mkdir(parents=True, exist_ok=True)
        statedir.write_atomically(str(self.privkey), pki.key_pem(key), 0o600)
        statedir.write_atomically(str(self.fullchain), pki.cert_pem(cert), 0o644)
        return pki.cert_pem(cert)


@pytest.fixture
def memory() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_one_node_of_two_is_elected_and_only_it_is_told(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    b.sync()
    assert a.cluster.is_issuer and not b.cluster.is_issuer
    assert (a.events, b.events) == (["elected"], [])
    assert a.cluster.issuer == b.cluster.issuer == "a"
    status = b.cluster.status()
    assert {k: status[k] for k in ("node", "issuer", "store", "last_sync")} == {
        "node": "b", "issuer": "a", "store": "ok", "last_sync": "2026-12-01T12:00:00Z"}


def test_the_issuers_certificate_reaches_the_other_node_with_its_key_sealed(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    b.sync()
    chain = a.deploy(days=90)
    a.sync()
    stored = SharedCertificate.decode(memory.get("certs", DOMAIN) or b"")
    assert stored is not None and stored.fullchain == chain and stored.node == "a"
    assert b"PRIVATE KEY" not in (memory.get("certs", DOMAIN) or b"")

    b.sync()
    assert b.fullchain.read_bytes() == chain
    assert b.privkey.read_bytes() == a.privkey.read_bytes()
    assert stat.S_IMODE(os.stat(b.privkey).st_mode) == 0o600
    assert b.events == ["mirrored"]
    b.sync()
    assert b.events == ["mirrored"], "an unchanged certificate is written once"


def test_a_domain_configured_after_its_certificate_was_shared_gets_it(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    configured = b.config
    b.config = parse_config(f"state_dir: {b.state_dir}\ndomains: {{other.example.com: {{}}}}\n", "x.yaml")
    a.sync()
    chain = a.deploy(days=90)
    a.sync()
    b.sync()
    assert not b.fullchain.exists()
    b.config = configured  # a reload added the domain
    b.sync()
    assert b.fullchain.read_bytes() == chain


def test_a_node_with_another_secret_keeps_what_it_has(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a = Node("a", tmp_path, memory, clock)
    b = Node("b", tmp_path, memory, clock, secret=b"z" * 32)
    a.sync()
    a.deploy(days=90)
    a.sync()
    b.sync()
    assert not b.fullchain.exists() and b.events == []


def test_an_older_certificate_in_etcd_does_not_replace_a_newer_one_on_disk(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    a.deploy(days=90, issued_minutes_ago=60)
    a.sync()
    newer = b.deploy(days=30, issued_minutes_ago=10)  # issued later, even if it ends sooner
    b.sync()
    assert b.fullchain.read_bytes() == newer


def test_a_reissue_that_ends_sooner_replaces_the_shared_one(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    a.deploy(days=90, issued_minutes_ago=60)
    a.sync()
    shorter = a.deploy(days=7, issued_minutes_ago=1)  # a forced reissue onto a shorter profile
    a.sync()
    assert a.fullchain.read_bytes() == shorter, "the issuer keeps what its certbot deployed"
    b.sync()
    assert b.fullchain.read_bytes() == shorter


def test_a_chain_swapped_in_etcd_is_refused(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    a.deploy(days=90)
    a.sync()
    record = json.loads(memory.get("certs", DOMAIN) or b"")
    other, _ = pki.self_signed(DOMAIN, NOW, NOW + datetime.timedelta(days=90))
    record["fullchain"] = pki.cert_pem(other).decode()  # written by someone without the secret
    memory.put("certs", DOMAIN, json.dumps(record).encode())
    b.sync()
    assert not b.fullchain.exists() and b.events == []


def test_an_issuer_key_made_again_ends_the_tenure_it_replaced(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a = Node("a", tmp_path, memory, clock)
    a.sync()
    first = memory.keys["issuer"][1]
    del memory.keys["issuer"]  # an operator's etcdctl del
    a.sync()
    assert a.events == ["elected", "deposed"] and memory.keys["issuer"][1] != first
    a.sync()
    assert a.events == ["elected", "deposed", "elected"]


def test_an_expired_lease_hands_the_issuer_over_and_the_old_one_steps_down(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    b.sync()
    memory.expire(memory.keys["issuer"][3])  # a stopped renewing it
    b.sync()
    assert b.cluster.is_issuer and b.events == ["elected"]
    a.sync()
    assert not a.cluster.is_issuer and a.events == ["elected", "deposed"]
    assert a.cluster.issuer == "b"


def test_a_paused_ex_issuer_cannot_overwrite_its_successors_certificate(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    held = HeldCalls()
    a = Node("a", tmp_path, memory, clock, run=held)
    b = Node("b", tmp_path, memory, clock)
    a.sync()
    assert a.cluster.is_issuer
    a.deploy(days=60)
    held.hold = "put_fenced"
    a.sync()  # renewed its lease, then stopped just before sharing its certificate
    assert held.held

    memory.expire(memory.keys["issuer"][3])
    b.sync()
    newest = b.deploy(days=90)
    b.sync()
    held.release()  # a resumes where it stopped

    assert "deposed" in a.events and not a.cluster.is_issuer
    stored = SharedCertificate.decode(memory.get("certs", DOMAIN) or b"")
    assert stored is not None and stored.fullchain == newest and stored.node == "b"
    a.sync()
    assert a.fullchain.read_bytes() == newest


def test_an_unreachable_store_changes_only_the_status_and_stops_the_issuer_before_its_lease_ends(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    a = Node("a", tmp_path, memory, clock)
    a.cluster.start()
    assert a.cluster.is_issuer
    memory.reachable = False
    clock.advance(SYNC_INTERVAL)
    assert a.cluster.status()["store"] == "unreachable" and a.cluster.is_issuer
    while clock.seconds() < LEASE_TTL - SYNC_INTERVAL:
        clock.advance(SYNC_INTERVAL)
    assert not a.cluster.is_issuer and a.events == ["elected", "deposed"]
    assert clock.seconds() < LEASE_TTL, "stepped down before the lease could have expired"
    assert "memory store switched off" in a.cluster.status()["store_error"]

    memory.reachable = True
    clock.advance(SYNC_INTERVAL)
    assert a.cluster.status()["store"] == "ok" and a.cluster.is_issuer
    a.cluster.stop()


def test_an_issuer_whose_store_hangs_steps_down_before_its_lease_ends(
    tmp_path: Path, memory: MemoryStore, clock: Clock
) -> None:
    held = HeldCalls()
    a = Node("a", tmp_path, memory, clock, run=held)
    a.cluster.start()
    assert a.cluster.is_issuer
    held.hold = "keepalive"  # etcd accepts the connection and never answers
    clock.advance(SYNC_INTERVAL)
    assert held.held and a.cluster.is_issuer
    clock.advance(LEASE_TTL - 3 * SYNC_INTERVAL - 0.1)
    assert a.cluster.is_issuer
    clock.advance(0.2)
    assert not a.cluster.is_issuer and a.events == ["elected", "deposed"]
    assert clock.seconds() < LEASE_TTL
    a.cluster.stop()
    held.release()


def test_back_off_records_follow_the_issuer(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    b.sync()
    failed = AcmeRecord(failures=2, last_error="CA said no", next_attempt=NOW.timestamp() + 600)
    a.records.set(DOMAIN, failed)
    a.sync()
    assert json.loads(memory.get("acme", DOMAIN) or b"")["failures"] == 2
    b.sync()
    assert b.records.get(DOMAIN) == failed, "the next issuer would not retry early"


def test_a_stopping_issuer_gives_its_lease_back(tmp_path: Path, memory: MemoryStore, clock: Clock) -> None:
    a, b = Node("a", tmp_path, memory, clock), Node("b", tmp_path, memory, clock)
    a.sync()
    a.cluster.stop()
    assert "issuer" not in memory.keys and a.events == ["elected", "deposed"]
    b.sync()
    assert b.cluster.is_issuer


# ---------------------------------------------------------------------------
# HTTP-01 tokens from etcd


def test_a_token_is_answered_only_for_its_own_domain(memory: MemoryStore) -> None:
    publish_token(memory, "abc_DEF-1", DOMAIN, b"abc_DEF-1.thumbprint")
    shared = SharedChallenges(memory, instantly)
    assert shared.answer(b"abc_DEF-1", DOMAIN).result == b"abc_DEF-1.thumbprint"  # type: ignore[attr-defined]
    assert shared.answer(b"abc_DEF-1", "other.example.com").result is None  # type: ignore[attr-defined]
    assert shared.answer(b"unknown", DOMAIN).result is None  # type: ignore[attr-defined]


def test_malformed_tokens_and_floods_never_reach_the_store(memory: MemoryStore) -> None:
    held = HeldCalls()
    held.hold = "get"
    shared = SharedChallenges(memory, held)
    for bad in (b"../../etc/passwd", b"a.b", b""):
        assert shared.answer(bad, DOMAIN).result is None  # type: ignore[attr-defined]
    assert not held.held
    for _ in range(MAX_SHARED_LOOKUPS + 5):
        shared.answer(b"token", DOMAIN)
    assert len(held.held) == MAX_SHARED_LOOKUPS
    held.release()
    assert shared.in_flight == 0


def test_an_unreachable_store_answers_no_such_challenge(memory: MemoryStore) -> None:
    memory.reachable = False
    assert SharedChallenges(memory, instantly).answer(b"token", DOMAIN).result is None  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# The wiring: ProxyService on a cluster, in memory


class Certbot:
    """Records each certbot run a node would start (none finishes)."""

    def __init__(self) -> None:
        self.domains: list[str] = []

    def issue(self, config_path: str, state_dir: str, acme: Any, domain: str, force: bool) -> defer.Deferred[Any]:
        self.domains.append(domain)
        return defer.Deferred()

    def stop(self) -> None:
        pass


def cluster_service(tmp_path: Path, name: str, memory: MemoryStore) -> tuple[Any, Certbot, Path]:
    from twisted.internet.testing import MemoryReactorClock

    from proxy.config import load_config
    from proxy.service import ProxyService

    secret = tmp_path / "cluster.key"
    if not secret.exists():
        secret.write_bytes(b"k" * 44)
        secret.chmod(0o600)
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        'listen: {http: ["tcp:0"], https: ["tcp:0"], admin: ["tcp:0:interface=127.0.0.1"]}\n'
        f"state_dir: {tmp_path / name}\n"
        f"cluster: {{etcd: ['http://127.0.0.1:2379'], node: {name}, secret_file: {secret}}}\n"
        f"domains: {{{DOMAIN}: {{certificate: acme}}}}\n"
    )
    certbot = Certbot()
    service = ProxyService(MemoryReactorClock(), load_config(str(path)), issuer=certbot, out=io.StringIO(),
                           now=lambda: NOW, cluster_store=memory, run_blocking=instantly)
    service._preflight = None  # type: ignore[assignment]  # no DNS in memory: straight to certbot
    service.start()
    return service, certbot, path


def test_only_the_elected_node_runs_certbot(tmp_path: Path, memory: MemoryStore) -> None:
    a, a_certbot, _ = cluster_service(tmp_path, "a", memory)
    b, b_certbot, _ = cluster_service(tmp_path, "b", memory)
    assert a.cluster.is_issuer and not b.cluster.is_issuer
    assert a_certbot.domains == [DOMAIN] and b_certbot.domains == []
    assert b.status()["cluster"]["issuer"] == "a"
    assert b.status()["domains"][DOMAIN]["certificate"]["status"] == "pending"


def test_a_reload_that_changes_cluster_keeps_the_one_it_started_with(tmp_path: Path, memory: MemoryStore) -> None:
    service, _, path = cluster_service(tmp_path, "a", memory)
    shared = service.runtime.router.shared_challenges
    started_with = service.config.cluster
    path.write_text(path.read_text().replace("node: a", "node: renamed"))
    ok, _ = service.reload()
    assert ok
    assert service.config.cluster == started_with
    assert service.runtime.router.shared_challenges is shared is not None
