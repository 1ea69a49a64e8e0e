"""The cluster key: private keys are sealed with it before they go into etcd.

etcd's data directory, its backups and anyone with read access to the prefix see the
certificates; the private keys they see only sealed. The operator provides the secret in
``cluster.secret_file`` (the same on every node, e.g. ``openssl rand -base64 32``); an
AES-256-GCM key is derived from it with HKDF, and each sealed key is bound to its domain
and its certificate chain (both are the additional authenticated data): a record copied to
another domain's key does not open, and nobody without the secret can pair the key with
another chain.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Shorter secrets are refused: 32 bytes is the key size itself.
MIN_SECRET_BYTES = 32
_INFO = b"trackproxy cluster: private keys in etcd, v1"
_NONCE_BYTES = 12


class ClusterKeyError(Exception):
    """The secret file is missing, unsafe or too short, or a sealed key does not open."""


class ClusterKey:
    """Seals and opens private keys for etcd.

    Args:
        secret: the contents of ``cluster.secret_file`` (surrounding whitespace ignored).
    """

    def __init__(self, secret: bytes) -> None:
        secret = _checked(secret)
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: str) -> ClusterKey:
        try:
            return cls(read_secret(path))
        except ClusterKeyError as e:
            raise ClusterKeyError(f"cluster.secret_file {path}: {e}")

    def seal(self, domain: str, private_key: bytes, chain: bytes) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, private_key, _bound_to(domain, chain))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, domain: str, sealed: str, chain: bytes) -> bytes:
        """The private key ``seal`` sealed for ``domain`` and ``chain``.

        Raises:
            ClusterKeyError: not sealed with this secret, for this domain and chain, or damaged.
        """
        try:
            raw = base64.b64decode(sealed, validate=True)
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _bound_to(domain, chain))
        except (InvalidTag, ValueError) as e:
            raise ClusterKeyError(
                f"the private key for {domain} in etcd does not open with this node's cluster secret "
                f"for its chain ({type(e).__name__}); every node needs the same cluster.secret_file"
            )


def read_secret(path: str) -> bytes:
    """The secret in ``path``, refusing a file everyone may read, or a secret too short
    (what ``config`` reports at ``cluster.secret_file``, and the node reads at start).

    Raises:
        ClusterKeyError: why, without the path.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read(4096)
    except OSError as e:
        raise ClusterKeyError(f"cannot read it: {e.strerror or e}")
    if mode & stat.S_IROTH:
        raise ClusterKeyError("it is readable by everyone; chmod 0600 it")
    return _checked(secret)


def _checked(secret: bytes) -> bytes:
    secret = secret.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ClusterKeyError(
            f"the secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed "
            "(make one with: openssl rand -base64 32)"
        )
    return secret


def _bound_to(domain: str, chain: bytes) -> bytes:
    return domain.encode("utf-8") + b"\0" + hashlib.sha256(chain).digest()
