"""Serving HTTP-01 challenge answers that certbot's trackproxy plugin leaves on disk.

This module owns the mapping from ``/.well-known/acme-challenge/TOKEN`` to the file
``state_dir/acme-challenge/TOKEN``. Such a request is always answered here, from disk,
and never forwarded: a CA validating the name must see our answer, not the platform's.
Writing and removing the files is the plugin's job.

On a cluster the CA's request reaches whichever node the balancer picks, and only the
issuer's certbot wrote the file: a node without it asks etcd (:class:`SharedChallenges`),
where the plugin stored the token too, and answers only for the token's own domain.

The CA fetches a token several times (Let's Encrypt validates from several vantage
points; pebble fetches each token three times), so a token is served until the plugin
removes it, and never rate-limited.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.clusterstore import StoreError, read_token_record

if TYPE_CHECKING:
    from proxy.clusterstore import ClusterStore

log = Logger(namespace="trackproxy.acme")

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"^[A-Za-z0-9_-]+$")
#: Key authorizations are a token, a dot and a thumbprint: well under a kilobyte.
MAX_ANSWER_BYTES = 4096


class ChallengeStore:
    """Reads challenge answers from one directory, refusing anything but a bare token."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def answer(self, token: bytes) -> bytes | None:
        """The key authorization for ``token``, or None if there is none (or the token
        is not of the ``[A-Za-z0-9_-]+`` form, so no path can escape the directory)."""
        if not _TOKEN.match(token):
            return None
        try:
            with open(os.path.join(self.directory, token.decode("ascii")), "rb") as f:
                return f.read(MAX_ANSWER_BYTES)
        except OSError:
            return None


#: Lookups in etcd one process runs at once; past it a challenge request is answered
#: 404 at once (a flood of made-up tokens must not queue up work or threads).
MAX_SHARED_LOOKUPS = 8


class SharedChallenges:
    """Challenge answers another node's certbot stored in etcd (``clusterstore``).

    Args:
        store: the cluster's store (blocking).
        run_blocking: runs ``store.get`` off the reactor thread.
    """

    def __init__(self, store: ClusterStore,
                 run_blocking: Callable[..., defer.Deferred[Any]]) -> None:
        self._store = store
        self._run = run_blocking
        self.in_flight = 0

    def answer(self, token: bytes, domain: str) -> defer.Deferred[bytes | None]:
        """The key authorization for ``token`` if etcd has it for ``domain`` (the request's
        routed Host): None for another domain's token, a malformed one, or no answer."""
        if not _TOKEN.match(token) or self.in_flight >= MAX_SHARED_LOOKUPS:
            return defer.succeed(None)
        self.in_flight += 1
        d = self._run(self._store.get, "tokens", token.decode("ascii"))
        d.addBoth(self._looked_up, token, domain)
        return d

    def _looked_up(self, value: object, token: bytes, domain: str) -> bytes | None:
        self.in_flight -= 1
        if isinstance(value, Failure):
            if not value.check(StoreError):  # an unreachable etcd is reported by the cluster sync
                log.failure("challenge lookup in etcd failed", value)
            return None
        if not isinstance(value, bytes):
            return None
        record = read_token_record(value)
        if record is None or record[0] != domain:
            return None
        return record[1][:MAX_ANSWER_BYTES]
