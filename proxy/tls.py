"""TLS policy on both sides: the SNI map that serves client handshakes, and upstream trust.

Server side: a default :class:`OpenSSL.SSL.Context` carries the session cache, the
session-ticket keys and a server-name callback. The callback looks the client's SNI up
in a ``name -> Context`` mapping and switches the connection to that domain's context.
Every context, default and domain, is made by :func:`server_context` with the whole
policy (TLS 1.2 minimum, Mozilla "intermediate" ciphers, no compression, no
renegotiation): OpenSSL takes some settings from the initial context and some (the
cipher list) from the one switched to. Session keys stay with the default context, so
resumption keeps working across certificate swaps. A name that is not in the mapping
(or no SNI at all) makes the callback raise, which pyOpenSSL turns into a fatal
``unrecognized_name`` alert: no certificate is ever served for a name that is not
configured.

Session tickets: OpenSSL makes random ticket keys for each default context and
pyOpenSSL offers no way to set or rotate them, so the default context itself is
replaced every :data:`SESSION_KEY_LIFETIME` (:meth:`ServerTLS.rotate_session_keys`):
tickets (and cached sessions) older than that no longer resume, and a full handshake
follows. Keys are per process (each worker has its own).

The mapping is replaced whole (:meth:`ServerTLS.set_contexts`), never mutated: a reload
builds every context first and then swaps one reference. Open connections keep the
context they were handshaken with.

Client side: :func:`upstream_tls_options` builds, once per upstream, the options that
verify the upstream's certificate for its host name and send that name as SNI.

Loading certificate files, generating self-signed ones and tracking their state belongs
to ``certs``; this module only turns PEM files into contexts.

(Over 400 lines: the policy, the SNI map, the contexts it builds lazily and the
handshake-failure vocabulary are one listener's TLS, changed together.)
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.twistedcompat import LeanTLSProtocol, represents_eof

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
    from twisted.internet.interfaces import IAddress, IOpenSSLClientConnectionCreator, IProtocolFactory
    from twisted.protocols.tls import TLSMemoryBIOProtocol

#: How long one set of session-ticket keys (and the session cache) is used.
SESSION_KEY_LIFETIME = 12 * 3600.0
#: Contexts kept built at once (each tens of KiB); past this the least recently used is
#: dropped and built again at its name's next handshake (about 0.2 ms).
MAX_BUILT_CONTEXTS = 1000
#: The same session-id context on every context, so sessions stay resumable after the
#: server-name callback has switched contexts.
_SESSION_ID_CONTEXT = b"trackproxy"

#: Mozilla's "intermediate" TLS 1.2 suites (forward secret AEAD only); TLS 1.3 suites are
#: OpenSSL's defaults, which are all modern.
_TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class UnknownServerName(Exception):
    """A client asked for a name we hold no certificate for (or for no name).

    Raised inside the server-name callback; pyOpenSSL answers it with a fatal
    ``unrecognized_name`` alert and hands it to :data:`sys.excepthook`, which
    :func:`install_quiet_excepthook` keeps from printing a traceback per scanner.
    """


def install_quiet_excepthook() -> None:
    """Stop pyOpenSSL from printing a traceback for every refused server name."""
    previous = sys.excepthook
    if getattr(previous, "_trackproxy_quiet", False):
        return

    def hook(
        kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        if isinstance(value, UnknownServerName):
            return
        previous(kind, value, tb)

    hook._trackproxy_quiet = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def normalise_server_name(name: bytes | None) -> str | None:
    """SNI as sent (any case, maybe a trailing dot) to the configured form, or None."""
    if not name:
        return None
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text.rstrip(".").lower()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Creates server-side TLS connections whose certificate is chosen by SNI."""

    def __init__(self) -> None:
        self._contexts: Mapping[str, SSL.Context | CertifiedKey] = MappingProxyType({})
        self._recent: OrderedDict[int, CertifiedKey] = OrderedDict()
        self._default = self._build_default_context()

    def _build_default_context(self) -> SSL.Context:
        ctx = server_context()
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_tlsext_servername_callback(self._on_server_name)
        return ctx

    def _on_server_name(self, connection: SSL.Connection) -> None:
        name = normalise_server_name(connection.get_servername())
        entry = self._contexts.get(name) if name else None
        protocol = connection.get_app_data()
        if entry is None:
            if isinstance(protocol, CountingTLSProtocol):
                protocol.refusal = "unknown_sni" if name else "no_sni"
            raise UnknownServerName(name)
        if isinstance(entry, CertifiedKey):
            context = self._built(entry)
        else:
            context = entry
        if isinstance(protocol, CountingTLSProtocol):
            protocol.server_name = name
        connection.set_context(context)

    def _built(self, entry: CertifiedKey) -> SSL.Context:
        """``entry``'s context, keeping the :data:`MAX_BUILT_CONTEXTS` most recently used."""
        recent = self._recent
        if entry.built:
            recent.move_to_end(id(entry))
            return entry.context()
        context = entry.context()
        recent[id(entry)] = entry
        while len(recent) > MAX_BUILT_CONTEXTS:
            _, oldest = recent.popitem(last=False)
            oldest.forget()  # connections using it keep it; the next handshake rebuilds
        return context

    def rotate_session_keys(self) -> None:
        """New handshakes from a new default context: fresh ticket keys and cache."""
        self._default = self._build_default_context()

    def set_contexts(self, contexts: Mapping[str, SSL.Context | CertifiedKey]) -> None:
        """Serve new handshakes from ``contexts`` (contexts, or checked pairs whose
        context is built at their first handshake); open connections are untouched."""
        self._contexts = MappingProxyType(dict(contexts))
        current = {id(e) for e in self._contexts.values()}
        for key in [k for k in self._recent if k not in current]:
            del self._recent[key]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._contexts)

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._default, None)
        # The server-name callback only sees the connection; this is how it finds the
        # protocol to say why it refused.
        connection.set_app_data(protocol)
        return connection


#: OpenSSL's words for why a handshake failed -> the ``reason`` label (a fixed set).
_HANDSHAKE_REASONS = (
    ("unsupported protocol", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("no shared cipher", "no_shared_cipher"),
    ("http request", "not_tls"),
    ("wrong version number", "not_tls"),
    ("unknown ca", "client_rejected_certificate"),
    ("bad certificate", "client_rejected_certificate"),
    ("certificate unknown", "client_rejected_certificate"),
)
HANDSHAKE_FAILURE_REASONS = (
    "unknown_sni", "no_sni", "protocol_version", "no_shared_cipher", "not_tls",
    "client_rejected_certificate", "other",
)


def handshake_failure_reason(error: SSL.Error) -> str:
    """The label for a failed handshake's OpenSSL error (one of
    :data:`HANDSHAKE_FAILURE_REASONS`)."""
    text = _ssl_reason(error).lower()
    for words, reason in _HANDSHAKE_REASONS:
        if words in text:
            return reason
    return "other"


class CountingTLSProtocol(LeanTLSProtocol):
    """The HTTPS listener's TLS layer for one connection.

    Reports each handshake that fails with a TLS error, and why: a client that connects
    and goes away before finishing (a port scanner) is not a handshake failure, only an
    OpenSSL error during the handshake counts. (What it does differently from Twisted's
    own TLS layer, for the cost of a connection, is :class:`LeanTLSProtocol`'s.)
    """

    refusal: str | None = None
    #: The SNI the handshake was served for (normalised), set by the server-name callback.
    server_name: str | None = None

    def tls_ended(self, reason: Failure | None) -> None:
        if (
            reason is not None
            and not self.handshake_done
            and isinstance(reason.value, SSL.Error)
            and not represents_eof(reason.value)
        ):
            report = getattr(self.factory, "on_handshake_failure", None)
            if report is not None:
                report(self.refusal or handshake_failure_reason(reason.value))


class CountingTLSFactory(TLSMemoryBIOFactory):
    """The HTTPS listener's TLS layer: :class:`CountingTLSProtocol` connections.

    The wrapped factory (``server.HTTPFactory``) may refuse a connection (the
    listener's cap): then no TLS state is made for it either.
    """

    protocol = CountingTLSProtocol
    noisy = False

    def __init__(self, creator: ServerTLS, wrapped: IProtocolFactory,
                 on_handshake_failure: Callable[[str], None]) -> None:
        super().__init__(creator, False, wrapped)
        self.on_handshake_failure = on_handshake_failure

    @property
    def open_connections(self) -> int:
        return len(self.protocols)

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        # WrappingFactory's, but the wrapped factory may refuse (its connection cap).
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)  # type: ignore[no-untyped-call]


class CertificateLoadError(Exception):
    """A certificate/key pair could not be used; ``reason`` is fit for ``last_error``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_pem_chain(path: str) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, leaf first."""
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


class CertifiedKey:
    """A certificate chain and its key, checked, and the context serving them built the
    first time a handshake asks for it (:meth:`context`).

    Building an OpenSSL context costs about 0.2 ms and tens of KiB; a proxy with
    thousands of domains would pay that for every one at start and at every reload,
    most of them before any client asks. What is checked at load (readable files, PEM,
    the key matching the leaf) is done with the parsed objects kept here, so the
    context built later serves exactly what was checked, whatever happens to the files
    meanwhile. :meth:`forget` drops a built context (``ServerTLS`` keeps the most
    recently used ones).
    """

    __slots__ = ("chain", "key", "not_after", "digest", "_context", "_paths")

    def __init__(self, chain: list[x509.Certificate], key: PrivateKeyTypes, paths: tuple[str, str]) -> None:
        self.chain = chain
        self.key = key
        self.not_after = chain[0].not_valid_after_utc
        #: The files' contents' digest (``pair_digest``): a re-read that finds the same
        #: bytes keeps this pair instead of parsing them again.
        self.digest = b""
        self._context: SSL.Context | None = None
        self._paths = paths

    def context(self) -> SSL.Context:
        context = self._context
        if context is None:
            context = self._context = _context_for(self.chain, self.key)
        return context

    @property
    def built(self) -> bool:
        return self._context is not None

    def forget(self) -> None:
        self._context = None


def server_context() -> SSL.Context:
    """A server context with the whole policy: TLS 1.2 minimum, Mozilla "intermediate"
    TLS 1.2 suites (ECDHE with AES-GCM or ChaCha20-Poly1305), no compression, no
    renegotiation, the shared session-id context.

    Every context gets all of it, the default one and each domain's: after the
    server-name callback switches a connection to a domain's context, OpenSSL takes
    the cipher list from the new context (a domain context with OpenSSL's defaults
    had offered CBC suites on TLS 1.2).
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(_TLS12_CIPHERS)
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    return ctx


def _context_for(chain: list[x509.Certificate], key: PrivateKeyTypes) -> SSL.Context:
    ctx = server_context()
    ctx.use_certificate(chain[0])
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    return ctx


def read_pair(fullchain_path: str, key_path: str) -> tuple[bytes, bytes]:
    """The two files' bytes.

    Raises:
        CertificateLoadError: a file is missing or cannot be read.
    """
    data = []
    for what, path in (("certificate", fullchain_path), ("key", key_path)):
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except FileNotFoundError:
            raise CertificateLoadError(f"{what} file {path} does not exist")
        except PermissionError:
            raise CertificateLoadError(f"{what} file {path} is not readable")
        except IsADirectoryError:
            raise CertificateLoadError(f"{what} file {path} does not exist (it is a directory)")
        except OSError as e:
            raise CertificateLoadError(f"{what} file {path}: {e.strerror or e}")
    return data[0], data[1]


def pair_digest(data: tuple[bytes, bytes]) -> bytes:
    """What tells one pair's contents from another's (without parsing them)."""
    import hashlib

    return hashlib.sha256(b"%d\0%s%s" % (len(data[0]), data[0], data[1])).digest()


def parse_pair(data: tuple[bytes, bytes], fullchain_path: str, key_path: str) -> CertifiedKey:
    """Check a certificate chain and its key, as read (the context is built later).

    Raises:
        CertificateLoadError: not PEM, or the key does not match the certificate.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        chain = x509.load_pem_x509_certificates(data[0])
    except ValueError as e:
        raise CertificateLoadError(f"certificate file {fullchain_path}: no certificate in it ({e})")
    try:
        # The RSA consistency check costs milliseconds per key; the match with the
        # certificate below is what matters for serving.
        key = serialization.load_pem_private_key(data[1], None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError) as e:
        raise CertificateLoadError(f"key file {key_path}: no usable private key in it ({e})")
    if key.public_key() != chain[0].public_key():
        raise CertificateLoadError(f"key {key_path} does not match certificate {fullchain_path}")
    pair = CertifiedKey(chain, key, (fullchain_path, key_path))
    pair.digest = pair_digest(data)
    return pair


def load_pair(fullchain_path: str, key_path: str) -> CertifiedKey:
    """Read and check a certificate chain and its key (the context is built later).

    Raises:
        CertificateLoadError: a file is missing or unreadable, is not PEM, or the key
            does not match the certificate.
    """
    return parse_pair(read_pair(fullchain_path, key_path), fullchain_path, key_path)


def context_for_files(fullchain_path: str, key_path: str) -> SSL.Context:
    """A fresh context serving one certificate chain and its key.

    pyOpenSSL forbids changing a context once it has made a connection, so every load
    builds a new one; the server-name callback then switches connections to it.

    Raises:
        CertificateLoadError: a file is missing or unreadable, is not PEM, or the key
            does not match the certificate.
    """
    for what, path in (("certificate", fullchain_path), ("key", key_path)):
        if not os.path.isfile(path):
            raise CertificateLoadError(f"{what} file {path} does not exist")
        if not os.access(path, os.R_OK):
            raise CertificateLoadError(f"{what} file {path} is not readable")
    ctx = server_context()
    try:
        ctx.use_certificate_chain_file(fullchain_path)
    except SSL.Error as e:
        raise CertificateLoadError(f"certificate file {fullchain_path}: {_ssl_reason(e)}")
    try:
        ctx.use_privatekey_file(key_path)
    except SSL.Error as e:
        reason = _ssl_reason(e)
        if "mismatch" in reason:
            raise CertificateLoadError(f"key {key_path} does not match certificate {fullchain_path}")
        raise CertificateLoadError(f"key file {key_path}: {reason}")
    try:
        ctx.check_privatekey()
    except SSL.Error as e:
        raise CertificateLoadError(
            f"key {key_path} does not match certificate {fullchain_path}: {_ssl_reason(e)}"
        )
    return ctx


def _ssl_reason(error: SSL.Error) -> str:
    """The readable part of an OpenSSL error stack (e.g. ``key values mismatch``)."""
    try:
        return "; ".join(str(item[2]) for item in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


def upstream_tls_options(host: str, ca_file: str | None) -> IOpenSSLClientConnectionCreator:
    """Client TLS options for an upstream: SNI and verification both use ``host``.

    Built once per upstream at start-up or reload (it costs about 0.1 ms).
    """
    if ca_file is None:
        trust = tssl.platformTrust()
    else:
        # Certificate.loadPEM keeps only the first certificate of a bundle.
        trust = tssl.trustRootFromCertificates(
            [tssl.Certificate(crypto.X509.from_cryptography(c)) for c in load_pem_chain(ca_file)]
        )
    return tssl.optionsForClientTLS(host, trustRoot=trust)
