"""What lives in ``state_dir``, and the one way a file there is written.

The proxy, its certbot plugin and certbot itself share this directory::

    state_dir/
      acme-challenge/TOKEN        HTTP-01 answers (the plugin writes, the proxy serves)
      certs/DOMAIN/               0700: fullchain.pem + privkey.pem (the plugin deploys),
                                  self-signed.pem + self-signed.key (the proxy makes)
      certbot/{config,work,logs}  certbot's own directories (the proxy runs it there)
      status.json                 ACME attempts and back-off, kept across restarts
      access-log.key              0600: the access log's redaction key

Every file the proxy or the plugin writes here goes through :func:`write_atomically`: a
reader (the running proxy re-reads certificates whenever they change) sees the old file or
the new one, never half of one, and after a crash or power cut the rename is on disk too.

This module imports nothing but the standard library: certbot imports the plugin, and so
this module, before every command it runs.
"""

from __future__ import annotations

import os
import tempfile

CHALLENGES = "acme-challenge"
CERTS = "certs"
CERTBOT = "certbot"
STATUS_FILE = "status.json"
ACCESS_LOG_KEY = "access-log.key"

#: The files certbot's trackproxy installer deploys into ``certs/DOMAIN/``.
FULLCHAIN = "fullchain.pem"
PRIVKEY = "privkey.pem"
#: The files the proxy makes there for ``certificate: self-signed``.
SELF_SIGNED_CERT = "self-signed.pem"
SELF_SIGNED_KEY = "self-signed.key"

#: Served to anyone who asks for a token: readable; certificates and keys: private.
CHALLENGES_MODE = 0o755
CERTS_MODE = 0o700


def challenge_dir(state_dir: str) -> str:
    return os.path.join(state_dir, CHALLENGES)


def certs_dir(state_dir: str) -> str:
    return os.path.join(state_dir, CERTS)


def domain_cert_dir(state_dir: str, domain: str) -> str:
    return os.path.join(state_dir, CERTS, domain)


def certbot_dir(state_dir: str) -> str:
    return os.path.join(state_dir, CERTBOT)


def prepare(state_dir: str) -> None:
    """Create ``state_dir`` with ``acme-challenge/`` (served) and ``certs/`` (private);
    directories that exist are left as the operator made them."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    os.makedirs(challenge_dir(state_dir), mode=CHALLENGES_MODE, exist_ok=True)
    os.makedirs(certs_dir(state_dir), mode=CERTS_MODE, exist_ok=True)


def write_atomically(path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one.

    The temporary file lives in the same directory (``os.replace`` is atomic only within a
    file system), has its mode (and ``owner``, if given) before it has any content, and is
    on disk before the rename; the directory is synced after it, so the rename is too.
    Nothing is left behind when any step fails.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    sync_directory(directory)


def sync_directory(directory: str) -> None:
    """fsync a directory: what was renamed or created in it is on disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
