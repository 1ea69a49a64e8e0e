"""The certbot side of trackproxy: HTTP-01 answers, deployment, and the reload request.

This module owns what certbot does to a trackproxy box, and nothing else:

- ``perform``/``cleanup`` write and remove ``STATE_DIR/acme-challenge/TOKEN`` files, and
  on a cluster (``cluster.etcd``) the same answers in etcd, for whichever node the CA's
  request reaches;
- ``deploy_cert``/``renew_deploy`` copy a lineage's key and full chain into
  ``STATE_DIR/certs/DOMAIN/{privkey,fullchain}.pem``, each file replaced atomically;
- ``restart`` first installs any lineage in certbot's ``live/DOMAIN/`` newer than what
  the proxy has (``certbot certonly -i trackproxy`` calls only ``restart``, never
  ``deploy_cert``), then asks the running proxy to load them (``POST /reload`` on its
  admin listener).

It leaves to the proxy everything that happens on the wire: serving the challenge files on
its HTTP listener, choosing certificates by SNI, refusing a broken pair while the previous
one keeps serving, and deciding when to issue or renew. The proxy's YAML is only ever read
here (through ``proxy.config``, which is pure), never edited.

certbot imports every plugin at start-up and an import error breaks all of its commands,
so this module imports neither Twisted nor anything of ``proxy`` but its config reader and
``proxy.statedir`` (the directory layout and the atomic write, both standard library only),
and ``proxy.clusterstore`` (etcd, no Twisted) only on a cluster, when it is needed.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from acme import challenges, messages
from certbot import achallenges, errors, interfaces
from certbot.plugins import common

from proxy import statedir
from proxy.config import Config, ConfigErrors, admin_url, config_path, load_config

logger = logging.getLogger("trackproxy_certbot")

#: Set by the proxy when it runs certbot itself: it reloads once certbot is done.
NO_RELOAD_ENV = "TRACKPROXY_CERTBOT_NO_RELOAD"
RELOAD_TIMEOUT = 30.0

_STATE_DIR_MODE = 0o755
_CHALLENGE_FILE_MODE = 0o644
_FULLCHAIN_MODE = 0o644
_PRIVKEY_MODE = 0o600
# Tokens are base64url (RFC 8555 §8.1); the proxy serves nothing else either.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


class Configurator(common.Installer, interfaces.Authenticator, interfaces.RenewDeployer):
    """Authenticator and installer for a trackproxy configured by one YAML file."""

    description = "trackproxy: answer HTTP-01 through the running proxy and deploy into its state_dir"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._config: Config | None = None
        #: token -> the etcd lease its answer is stored under (a cluster), for cleanup.
        self._token_leases: dict[str, int] = {}

    @classmethod
    def add_parser_arguments(cls, add: Callable[..., None]) -> None:
        add(
            "config",
            default=None,
            metavar="FILE",
            # Absolute, because the renewal file stores it and renewals run elsewhere.
            type=os.path.abspath,
            help="trackproxy's YAML file (default: $TRACKPROXY_CONFIG, else "
            "/etc/trackproxy/trackproxy.yaml).",
        )

    # -- Plugin

    def prepare(self) -> None:
        """Load and check the proxy's configuration.

        Raises:
            certbot.errors.MisconfigurationError: the file is unreadable or invalid; the
                message has one ``FILE:LINE:COL: message`` line per problem.
        """
        self._config = self._load()

    def more_info(self) -> str:
        return (
            "Writes HTTP-01 answers into the proxy's state_dir/acme-challenge/, where the "
            "running trackproxy serves them on its HTTP listener; installs certificates into "
            "state_dir/certs/DOMAIN/ and asks the proxy to reload them (POST /reload on its "
            "admin listener). Reads " + self._path() + "; never edits it."
        )

    # -- Authenticator

    def get_chall_pref(self, identifier: str) -> Iterable[type[challenges.Challenge]]:
        return [challenges.HTTP01]

    def perform(
        self, achalls: list[achallenges.AnnotatedChallenge]
    ) -> list[challenges.ChallengeResponse]:
        """Write every key authorization where the proxy serves it.

        All names are checked before anything is written, so a refused order leaves no
        files behind.

        Raises:
            certbot.errors.PluginError: a name is not a domain of the configuration.
        """
        config = self._loaded_config()
        for achall in achalls:
            self._require_domain(config, _name_of(achall))
        directory = statedir.challenge_dir(config.state_dir)
        owner = _ensure_dirs(config.state_dir, (directory, statedir.CHALLENGES_MODE))
        store = _cluster_store(config)
        responses = []
        for achall in achalls:
            response, validation = achall.response_and_validation()
            answer = validation.encode("utf-8")
            try:
                path = os.path.join(directory, _token_of(achall))
                statedir.write_atomically(path, answer, _CHALLENGE_FILE_MODE, owner)
            except OSError as e:
                raise errors.PluginError(f"cannot write the challenge answer: {e}") from e
            if store is not None:
                self._token_leases[_token_of(achall)] = _share_token(store, _token_of(achall), _name_of(achall), answer)
            responses.append(response)
        return responses

    def cleanup(self, achalls: list[achallenges.AnnotatedChallenge]) -> None:
        """Remove the answers ``perform`` wrote; one already gone is fine."""
        config = self._loaded_config()
        directory = statedir.challenge_dir(config.state_dir)
        store = _cluster_store(config)
        for achall in achalls:
            try:
                os.unlink(os.path.join(directory, _token_of(achall)))
            except FileNotFoundError:
                pass
            lease = self._token_leases.pop(_token_of(achall), None)
            if store is not None and lease is not None:
                _unshare_token(store, lease)

    def auth_hint(self, failed_achalls: list[achallenges.AnnotatedChallenge]) -> str:
        names = sorted({achall.identifier.value for achall in failed_achalls})
        path = self._path()
        return (
            "The CA could not fetch the answer from trackproxy. It must reach this proxy's "
            "HTTP listener on port 80 as " + ", ".join(names) + ": each name's DNS A/AAAA "
            "records, or its CNAME, must point to this machine, and the port must be open "
            "to the internet. Check with: trackproxy doctor -c " + path + " " + " ".join(names)
        )

    # -- Installer

    def get_all_names(self) -> Iterable[str]:
        return list(self._loaded_config().domains)

    def deploy_cert(
        self, domain: str, cert_path: str, key_path: str, chain_path: str, fullchain_path: str
    ) -> None:
        """Install the key and full chain for one configured domain.

        Raises:
            certbot.errors.PluginError: the domain is not configured, or a file cannot be
                read or written.
        """
        config = self._loaded_config()
        self._require_domain(config, domain)
        _install(config, domain, key_path=key_path, fullchain_path=fullchain_path)

    def renew_deploy(self, lineage: Any, *args: Any, **kwargs: Any) -> None:
        """Install a renewed lineage for each of its names the proxy serves.

        ``certbot renew`` calls this and then ``restart``; it never calls ``deploy_cert``.
        """
        config = self._loaded_config()
        for name in lineage.names():
            if name not in config.domains:
                logger.warning(
                    "%s is not a domain of %s; its renewed certificate is not deployed",
                    name, config.path,
                )
                continue
            _install(config, name, key_path=lineage.key_path, fullchain_path=lineage.fullchain_path)

    def enhance(
        self, domain: str, enhancement: str, options: list[str] | str | None = None
    ) -> None:
        raise errors.PluginError("trackproxy supports no enhancements")

    def supported_enhancements(self) -> list[str]:
        return []

    def save(self, title: str | None = None, temporary: bool = False) -> None:
        """Nothing to save: deployed files are final when written, the YAML is never edited."""

    def config_test(self) -> None:
        """The same validation as ``trackproxy check-config``.

        Raises:
            certbot.errors.MisconfigurationError: one line per problem.
        """
        self._load()

    def restart(self) -> None:
        """Make the running proxy load the deployed files.

        A proxy that is not running loads them when it starts, so that is not an error.

        Raises:
            certbot.errors.PluginError: the proxy refused the reload or could not be asked.
        """
        config = self._loaded_config()
        self._install_newer_lineages(config)
        if os.environ.get(NO_RELOAD_ENV) == "1":
            return
        url = admin_url(config)
        if url is None:
            logger.warning(
                "%s has no TCP admin listener to ask for a reload; reload trackproxy by hand "
                "(systemctl reload trackproxy)", config.path,
            )
            return
        try:
            status, body = _post(url + "/reload")
        except ConnectionRefusedError:
            logger.info("trackproxy is not running; it loads the certificate when it starts")
            return
        except (OSError, http.client.HTTPException) as e:
            raise errors.PluginError(f"could not ask trackproxy to reload at {url}: {e}") from e
        if status != 200:
            raise errors.PluginError(
                f"trackproxy refused the reload (HTTP {status} from {url}/reload):\n"
                + _describe_failure(body)
            )
        logger.info("trackproxy reloaded its configuration and certificates")

    # -- helpers

    def _install_newer_lineages(self, config: Config) -> None:
        """Install ``live/DOMAIN/`` for each ACME domain whose lineage (named after the
        domain, as ``--cert-name`` defaults to) ends later than the deployed certificate.

        Never older: an operator's own certbot directory may hold a stale lineage for a
        domain the proxy has renewed since.
        """
        live = getattr(self.config, "live_dir", None)
        if not live or not os.path.isdir(live):
            return
        for domain, spec in config.domains.items():
            if spec.certificate.kind != "acme":
                continue
            fullchain = os.path.join(live, domain, "fullchain.pem")
            key = os.path.join(live, domain, "privkey.pem")
            if not (os.path.isfile(fullchain) and os.path.isfile(key)):
                continue
            deployed = os.path.join(statedir.domain_cert_dir(config.state_dir, domain), statedir.FULLCHAIN)
            if _not_after(fullchain) > _not_after(deployed):
                _install(config, domain, key_path=key, fullchain_path=fullchain)

    def _loaded_config(self) -> Config:
        """The configuration read by ``prepare``, reading it now if it has not run."""
        if self._config is None:
            self.prepare()
        assert self._config is not None
        return self._config

    def _path(self) -> str:
        return os.path.abspath(config_path(self.conf("config")))

    def _load(self) -> Config:
        try:
            return load_config(self._path())
        except ConfigErrors as e:
            raise errors.MisconfigurationError(
                "trackproxy's configuration is invalid:\n" + "\n".join(str(x) for x in e.errors)
            ) from e

    @staticmethod
    def _require_domain(config: Config, name: str) -> None:
        if name not in config.domains:
            raise errors.PluginError(
                f"trackproxy only answers challenges and installs certificates for the "
                f"domains in {config.path}; {name} is not one of them"
            )


# ---------------------------------------------------------------------------
# Challenge files


def _name_of(achall: achallenges.AnnotatedChallenge) -> str:
    # achall.domain is deprecated since certbot 5.3 (IP identifiers): read the identifier.
    identifier = achall.identifier
    if identifier.typ != messages.IDENTIFIER_FQDN:
        raise errors.PluginError(
            f"trackproxy serves domain names only, not {identifier.typ.name} {identifier.value}"
        )
    return identifier.value


def _token_of(achall: achallenges.AnnotatedChallenge) -> str:
    token = achall.chall.encode("token")
    if not _TOKEN.match(token):
        raise errors.PluginError(f"refusing a challenge token that is not base64url: {token!r}")
    return token


# ---------------------------------------------------------------------------
# Certificate files


def _install(config: Config, domain: str, *, key_path: str, fullchain_path: str) -> None:
    """Copy key then full chain into ``STATE_DIR/certs/DOMAIN/``, each atomically.

    The key goes first: a proxy that reloads in between sees a new key with the old chain,
    refuses the mismatched pair, and keeps serving the old one until the chain follows.
    """
    key = _read(key_path, "private key")
    fullchain = _read(fullchain_path, "full chain")
    certs = statedir.certs_dir(config.state_dir)
    directory = statedir.domain_cert_dir(config.state_dir, domain)
    owner = _ensure_dirs(
        config.state_dir, (certs, statedir.CERTS_MODE), (directory, statedir.CERTS_MODE)
    )
    try:
        statedir.write_atomically(os.path.join(directory, statedir.PRIVKEY), key, _PRIVKEY_MODE, owner)
        statedir.write_atomically(os.path.join(directory, statedir.FULLCHAIN), fullchain, _FULLCHAIN_MODE, owner)
    except OSError as e:
        raise errors.PluginError(f"cannot install the certificate for {domain}: {e}") from e
    logger.info("installed the certificate for %s into %s", domain, directory)
    kind = config.domains[domain].certificate.kind
    if kind != "acme":
        logger.warning(
            "%s has 'certificate: %s' in %s: the proxy keeps serving that, not this "
            "certificate, until it says 'certificate: acme'", domain, kind, config.path,
        )


def _not_after(fullchain: str) -> float:
    """When the first certificate in ``fullchain`` ends (epoch seconds); 0 if unreadable."""
    from cryptography import x509

    try:
        with open(fullchain, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
    except (OSError, ValueError):
        return 0.0


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise errors.PluginError(f"cannot read the {what} {path}: {e.strerror or e}") from e


# ---------------------------------------------------------------------------
# Files and directories


def _ensure_dirs(state_dir: str, *wanted: tuple[str, int]) -> tuple[int, int] | None:
    """Create ``state_dir`` and then each ``(path, mode)`` that is missing.

    Existing directories are left as they are: the proxy or the operator owns them.

    Returns:
        The owner that new files must be given (see :func:`_owner_for_new_files`).
    """
    _make_dir(state_dir, _STATE_DIR_MODE, None)
    owner = _owner_for_new_files(state_dir)
    for path, mode in wanted:
        _make_dir(path, mode, owner)
    return owner


def _make_dir(path: str, mode: int, owner: tuple[int, int] | None) -> None:
    try:
        os.makedirs(path, mode=mode)
    except FileExistsError:
        return
    except OSError as e:
        raise errors.PluginError(f"cannot create {path}: {e.strerror or e}") from e
    os.chmod(path, mode)  # makedirs' mode is filtered by the umask
    if owner is not None:
        os.chown(path, *owner)


def _owner_for_new_files(state_dir: str) -> tuple[int, int] | None:
    """The state directory's owner when certbot runs as root (its renew timer) and the
    directory belongs to someone else: the proxy runs unprivileged and must read its own
    key. None when files may keep the owner they are created with."""
    if os.geteuid() != 0:
        return None
    st = os.stat(state_dir)
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


# ---------------------------------------------------------------------------
# The admin listener


def _post(url: str) -> tuple[int, bytes]:
    """POST an empty body to ``url``; the status and body of the answer."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=RELOAD_TIMEOUT)
    try:
        connection.request("POST", parts.path, body=b"", headers={"Content-Length": "0"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _describe_failure(body: bytes) -> str:
    """The errors of a ``{"result": "failure", "errors": [...]}`` answer, one a line, or
    the body itself when it is not that."""
    try:
        answer = json.loads(body)
        lines = answer["errors"]
        if isinstance(lines, list) and lines:
            return "\n".join(str(line) for line in lines)
    except (ValueError, KeyError, TypeError):
        pass
    return body.decode("utf-8", "replace").strip() or "(empty answer)"


# -- a cluster: tokens in etcd too, for the node the CA's request reaches


def _cluster_store(config: Config) -> Any:
    """The cluster's etcd (``proxy.clusterstore.EtcdStore``), or None for a single node."""
    if config.cluster is None or not config.cluster.etcd:
        return None
    from proxy.clusterstore import etcd_store  # only on a cluster: a single node needs no etcd client

    return etcd_store(config.cluster)


def _share_token(store: Any, token: str, domain: str, answer: bytes) -> int:
    from proxy.clusterstore import StoreError, publish_token

    try:
        return int(publish_token(store, token, domain, answer))
    except StoreError as e:
        raise errors.PluginError(
            f"cannot store the challenge answer in the cluster's etcd ({e}); the CA's request "
            "may reach another node, which would not have it"
        ) from e


def _unshare_token(store: Any, lease: int) -> None:
    """Revoke the token's lease, which removes it (it expires within the hour anyway)."""
    from proxy.clusterstore import withdraw_token

    withdraw_token(store, lease)
