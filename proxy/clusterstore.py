"""The cluster's shared state in etcd v3: who issues, certificates, back-off, tokens, nodes.

This module owns the key layout under ``cluster.prefix`` and every operation on it::

    PREFIX/issuer          the issuing node's name, held by its lease (the election)
    PREFIX/certs/DOMAIN    {fullchain, sealed key, not_after, serial, node}: fenced writes
    PREFIX/acme/DOMAIN     the ACME back-off record (certs.AcmeRecord): fenced writes
    PREFIX/tokens/TOKEN    {domain, answer} of an HTTP-01 challenge, with its own lease
    PREFIX/nodes/NODE      {node, issuer, store, last_sync}: what each node last reported

Fencing: the issuer key's ``create_revision`` names one tenure. A write of certificate
material is a transaction that succeeds only while the issuer key still has the writer's
``create_revision``, so a node that was paused past its lease (and may still believe it
issues) cannot overwrite what its successor wrote.

It speaks to etcd's JSON gateway through ``etcd3gw`` and blocks: the certbot plugin calls
it directly, the proxy in a thread (``cluster``). Like ``statedir`` it imports no Twisted,
since certbot imports the plugin before every command. :class:`MemoryStore` has the same
semantics in memory, for tests of everything above it.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

#: Seconds one etcd request may take before the next endpoint is tried.
REQUEST_TIMEOUT = 2.0
#: An HTTP-01 token outlives any validation (certbot gives up long before).
TOKEN_TTL = 3600


class StoreError(Exception):
    """The store could not do what was asked; the message says why."""


class StoreUnreachable(StoreError):
    """No etcd endpoint answered; the message says which and why."""


class StoreRefused(StoreError):
    """etcd answered, and refused the request (an expired lease, a malformed request)."""


@attrs.frozen
class Leader:
    """The issuer key as read: who holds it, and the tenure (``fence``) its writes carry."""

    node: str
    fence: int
    lease: int


@attrs.frozen
class Entry:
    """One key under a sub-prefix: its name below it, value and ``mod_revision``."""

    name: str
    value: bytes
    revision: int


class ClusterStore(Protocol):
    """What the proxy and the plugin need of the shared state (:class:`EtcdStore`,
    :class:`MemoryStore`). Every method raises :class:`StoreUnreachable` when the store
    cannot be asked, and :class:`StoreRefused` when it refuses."""

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        ...

    def keepalive(self, lease: int) -> bool:
        """Renew ``lease``; False if it has already expired."""
        ...

    def revoke(self, lease: int) -> None:
        ...

    def campaign(self, node: str, lease: int) -> Leader:
        """Take the issuer key for ``node`` under ``lease`` if nobody holds it; the holder
        either way."""
        ...

    def put_fenced(self, kind: str, name: str, value: bytes, fence: int) -> bool:
        """Write ``kind/name`` only while the issuer key is still the tenure ``fence``."""
        ...

    def issuer(self) -> str | None:
        """The issuing node's name, if one holds the key."""
        ...

    def put(self, kind: str, name: str, value: bytes, lease: int | None = None) -> None:
        ...

    def get(self, kind: str, name: str) -> bytes | None:
        ...

    def delete(self, kind: str, name: str) -> None:
        ...

    def changed_since(self, kind: str, revision: int) -> tuple[list[Entry], int]:
        """Every ``kind/*`` entry written after ``revision`` (0: all), and the store's
        revision now, to pass next time."""
        ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for every key starting with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdStore:
    """:class:`ClusterStore` on etcd v3, through the JSON gateway of ``endpoints``.

    Requests go to one endpoint until it fails, then to the next; an operation fails
    with :class:`StoreUnreachable` once every endpoint has.

    Args:
        endpoints: ``cluster.etcd`` (``http://HOST:PORT`` or ``https://HOST:PORT``).
        prefix: ``cluster.prefix``.
        ca_file, cert, key: TLS trust and client authentication (``cluster.*``).
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        prefix: str,
        ca_file: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        import requests
        from etcd3gw.client import Etcd3Client  # not at import: the plugin loads without it

        self.prefix = prefix.rstrip("/").encode("utf-8") + b"/"
        # The YAML alone says whom to trust and how to reach etcd: requests would otherwise
        # let REQUESTS_CA_BUNDLE override ca_file, and route through an *_proxy variable.
        session = requests.Session()
        session.trust_env = False
        session.verify = ca_file if ca_file is not None else True
        if cert is not None and key is not None:
            session.cert = (cert, key)
        self._clients = []
        for url in endpoints:
            parts = urlsplit(url)
            self._clients.append(Etcd3Client(
                host=parts.hostname or "", port=parts.port or 2379, protocol=parts.scheme,
                timeout=timeout, api_path="/v3/", session=session,
            ))
        self._endpoints = endpoints
        self._current = 0
        self._lock = threading.Lock()

    # -- the wire

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers, starting with the last one that did."""
        from etcd3gw.exceptions import (
            ConnectionFailedError,
            ConnectionTimeoutError,
            Etcd3Exception,
            InternalServerError,
        )
        from requests import RequestException

        errors = []
        with self._lock:
            start = self._current
        for step in range(len(self._clients)):
            index = (start + step) % len(self._clients)
            client = self._clients[index]
            try:
                answer: dict[str, Any] = client.post(client.get_url(path), json=body)
            except (ConnectionFailedError, ConnectionTimeoutError, InternalServerError,
                    RequestException, ValueError) as e:
                errors.append(f"{self._endpoints[index]}: {_reason(e)}")
                continue
            except Etcd3Exception as e:
                raise StoreRefused(f"etcd at {self._endpoints[index]} refused {path}: {_reason(e)}")
            with self._lock:
                self._current = index
            return answer
        raise StoreUnreachable("etcd unreachable: " + "; ".join(errors))

    def _key(self, kind: str, name: str = "") -> bytes:
        return self.prefix + kind.encode("utf-8") + (b"/" + name.encode("utf-8") if name else b"")

    # -- leases

    def grant(self, ttl: int) -> int:
        return int(self._post("lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> bool:
        answer = self._post("lease/keepalive", {"ID": lease})
        if "error" in answer:  # a stream error (no leader for a moment): not an expiry
            raise StoreUnreachable(f"etcd could not renew the lease: {str(answer['error'])[:200]}")
        return int(answer.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        try:
            self._post("kv/lease/revoke", {"ID": lease})
        except StoreRefused:  # expired already: nothing left to revoke
            pass

    # -- the election and fencing

    def campaign(self, node: str, lease: int) -> Leader:
        key = _b64(self._key("issuer"))
        answer = self._post("kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": _b64(node.encode("utf-8")), "lease": str(lease)}}],
            "failure": [{"request_range": {"key": key}}],
        })
        if answer.get("succeeded"):
            return Leader(node, int(answer["header"]["revision"]), lease)
        kvs = answer["responses"][0]["response_range"].get("kvs", [])
        if not kvs:  # released between the compare and the read: try again next time
            return Leader("", 0, 0)
        kv = kvs[0]
        return Leader(
            _unb64(kv.get("value", "")).decode("utf-8", "replace"),
            int(kv["create_revision"]), int(kv.get("lease", 0)),
        )

    def put_fenced(self, kind: str, name: str, value: bytes, fence: int) -> bool:
        answer = self._post("kv/txn", {
            "compare": [{"key": _b64(self._key("issuer")), "result": "EQUAL", "target": "CREATE",
                         "create_revision": str(fence)}],
            "success": [{"request_put": {"key": _b64(self._key(kind, name)), "value": _b64(value)}}],
        })
        return bool(answer.get("succeeded"))

    def issuer(self) -> str | None:
        kvs = self._post("kv/range", {"key": _b64(self._key("issuer"))}).get("kvs", [])
        return _unb64(kvs[0].get("value", "")).decode("utf-8", "replace") if kvs else None

    # -- plain keys

    def put(self, kind: str, name: str, value: bytes, lease: int | None = None) -> None:
        body: dict[str, Any] = {"key": _b64(self._key(kind, name)), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        self._post("kv/put", body)

    def get(self, kind: str, name: str) -> bytes | None:
        kvs = self._post("kv/range", {"key": _b64(self._key(kind, name))}).get("kvs", [])
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def delete(self, kind: str, name: str) -> None:
        self._post("kv/deleterange", {"key": _b64(self._key(kind, name))})

    def changed_since(self, kind: str, revision: int) -> tuple[list[Entry], int]:
        prefix = self._key(kind) + b"/"
        body: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))}
        if revision:
            body["min_mod_revision"] = str(revision + 1)
        answer = self._post("kv/range", body)
        entries = [
            Entry(_unb64(kv["key"])[len(prefix):].decode("utf-8", "replace"),
                  _unb64(kv.get("value", "")), int(kv["mod_revision"]))
            for kv in answer.get("kvs", [])
        ]
        return entries, int(answer["header"]["revision"])


def _reason(error: Exception) -> str:
    """One line: etcd3gw keeps its message in ``detail_text``, not in ``str()``."""
    text = str(getattr(error, "detail_text", None) or error).strip()
    return (text.splitlines()[0][:300] if text else "") or type(error).__name__


def etcd_store(settings: Any) -> EtcdStore:
    """The store ``cluster:`` (a ``config.ClusterSettings``) names."""
    return EtcdStore(settings.etcd, settings.prefix, settings.ca_file, settings.cert, settings.key)


# ---------------------------------------------------------------------------
# Tokens, as the plugin writes them and any node reads them


def token_record(domain: str, answer: bytes) -> bytes:
    return json.dumps({"domain": domain, "answer": answer.decode("ascii")}).encode("utf-8")


def read_token_record(value: bytes) -> tuple[str, bytes] | None:
    """(domain, answer) of a token record, or None for anything else."""
    try:
        record = json.loads(value)
        domain, answer = record["domain"], record["answer"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(domain, str) or not isinstance(answer, str):
        return None
    return domain, answer.encode("ascii", "replace")


def publish_token(store: ClusterStore, token: str, domain: str, answer: bytes) -> int:
    """Store one HTTP-01 answer under its own lease (expiring by itself if ``cleanup``
    never comes); the lease, which :func:`withdraw_token` revokes."""
    lease = store.grant(TOKEN_TTL)
    try:
        store.put("tokens", token, token_record(domain, answer), lease=lease)
    except StoreError:
        withdraw_token(store, lease)
        raise
    return lease


def withdraw_token(store: ClusterStore, lease: int) -> None:
    """Revoke a token's lease, which removes the token too; best effort."""
    try:
        store.revoke(lease)
    except StoreError:
        pass


# ---------------------------------------------------------------------------
# The same semantics in memory


class MemoryStore:
    """:class:`ClusterStore` in one process: revisions, leases (expired by
    :meth:`expire`, not by time), the election and fencing as etcd does them.
    ``reachable = False`` makes every call fail as an unreachable etcd would."""

    def __init__(self) -> None:
        self.revision = 1
        self.reachable = True
        self._leases: set[int] = set()
        self._next_lease = 100
        #: key -> (value, create_revision, mod_revision, lease)
        self.keys: dict[str, tuple[bytes, int, int, int]] = {}

    def _check(self) -> None:
        if not self.reachable:
            raise StoreUnreachable("etcd unreachable: memory store switched off")

    def _write(self, key: str, value: bytes, lease: int = 0) -> None:
        self.revision += 1
        old = self.keys.get(key)
        created = old[1] if old is not None else self.revision
        self.keys[key] = (value, created, self.revision, lease)

    def expire(self, lease: int) -> None:
        """The lease ran out: its keys go, as etcd deletes them."""
        self._leases.discard(lease)
        for key in [k for k, v in self.keys.items() if v[3] == lease]:
            del self.keys[key]
            self.revision += 1

    def grant(self, ttl: int) -> int:
        self._check()
        self._next_lease += 1
        self._leases.add(self._next_lease)
        return self._next_lease

    def keepalive(self, lease: int) -> bool:
        self._check()
        return lease in self._leases

    def revoke(self, lease: int) -> None:
        self._check()
        self.expire(lease)

    def campaign(self, node: str, lease: int) -> Leader:
        self._check()
        held = self.keys.get("issuer")
        if held is None:
            self._write("issuer", node.encode("utf-8"), lease)
            held = self.keys["issuer"]
        return Leader(held[0].decode("utf-8"), held[1], held[3])

    def put_fenced(self, kind: str, name: str, value: bytes, fence: int) -> bool:
        self._check()
        held = self.keys.get("issuer")
        if held is None or held[1] != fence:
            return False
        self._write(f"{kind}/{name}", value)
        return True

    def issuer(self) -> str | None:
        self._check()
        held = self.keys.get("issuer")
        return held[0].decode("utf-8") if held is not None else None

    def put(self, kind: str, name: str, value: bytes, lease: int | None = None) -> None:
        self._check()
        self._write(f"{kind}/{name}", value, lease or 0)

    def get(self, kind: str, name: str) -> bytes | None:
        self._check()
        held = self.keys.get(f"{kind}/{name}")
        return held[0] if held is not None else None

    def delete(self, kind: str, name: str) -> None:
        self._check()
        if self.keys.pop(f"{kind}/{name}", None) is not None:
            self.revision += 1

    def changed_since(self, kind: str, revision: int) -> tuple[list[Entry], int]:
        self._check()
        start = kind + "/"
        entries = [
            Entry(key[len(start):], value, modified)
            for key, (value, _, modified, _) in sorted(self.keys.items())
            if key.startswith(start) and modified > revision
        ]
        return entries, self.revision

