"""Fakes and helpers for testing trackproxy and what is built on it, shipped with it
(as treq ships ``StubTreq``).

- :class:`LocalCA`: a throw-away certificate authority that writes its root and the
  leaf certificates it issues to a directory, for TLS on loopback or in memory;
- :class:`FakeUpstreamClient`: stands in for ``upstream.UpstreamClient`` in a
  ``forward.Router``: records each fetch, answers as told, or holds the answer until
  the test releases it;
- :class:`MemoryUpstream`: the connection attempts a real ``UpstreamClient`` makes on
  a ``MemoryReactorClock``, completed by the test over ``StringTransport`` (plain
  HTTP) or, with :func:`connect_in_memory`, over real TLS in memory;
- :func:`connect_in_memory` and :func:`tls_client`: two protocols joined by Twisted's
  ``iosim`` (TLS included, no sockets), for the HTTPS listener stack.

Nothing here is imported by the proxy itself.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from proxy import pki
from proxy.upstream import UpstreamResponse

if TYPE_CHECKING:
    from twisted.internet.interfaces import IProtocol, IReactorTime
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import TLSMemoryBIOProtocol

# ---------------------------------------------------------------------------
# Certificates


class LocalCA:
    """A root CA made on the spot, issuing leaf certificates for host names.

    Args:
        directory: where ``ca.pem`` and every issued ``NAME.pem``/``NAME.key`` go.
        name: the root's common name.
    """

    def __init__(self, directory: Path, name: str = "trackproxy test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._authority = pki.Authority.create(name, now - datetime.timedelta(hours=1),
                                               now + datetime.timedelta(days=30))
        self.certificate = self._authority.cert
        self.cert_path = directory / "ca.pem"
        self.cert_path.write_bytes(pki.cert_pem(self.certificate))

    def issue(self, host: str, ip: str | None = None, days: float = 10, client: bool = False) -> tuple[Path, Path]:
        """A server certificate for ``host`` (and the address ``ip``, if given) signed by
        this CA, valid from an hour ago for ``days``; with ``client``, good for TLS client
        authentication too.

        Returns:
            The certificate file (the leaf alone: the root is the trust anchor, so the
            chain has nothing else to carry) and its private key file (mode 0600).
        """
        now = datetime.datetime.now(datetime.UTC)
        cert, key = self._authority.issue(
            host, now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days), ips=[ip] if ip else (),
            client=client,
        )
        cert_path = self.directory / f"{host}.pem"
        key_path = self.directory / f"{host}.key"
        cert_path.write_bytes(pki.cert_pem(cert))
        key_path.write_bytes(pki.key_pem(key))
        key_path.chmod(0o600)
        return cert_path, key_path

    def server_options(self, host: str) -> CertificateOptions:
        """Twisted TLS server options serving a certificate for ``host``."""
        from twisted.internet.ssl import PrivateCertificate

        cert_path, key_path = self.issue(host)
        options: CertificateOptions = PrivateCertificate.loadPEM(
            cert_path.read_text() + key_path.read_text()
        ).options()
        return options


# ---------------------------------------------------------------------------
# The upstream, faked or in memory


#: What a tracking platform answers to a click.
REDIRECT = UpstreamResponse(302, b"Found", ((b"Server", b"msys-http"), (b"Location", b"https://l.example/")),
                            b"moved")


class FakeUpstreamClient:
    """Stands in for ``UpstreamClient``: records each fetch, answers as told.

    Args:
        answer: what every fetch gets (a redirect by default).
        failure: an exception every fetch fails with instead.
        hold: answer nothing until :meth:`release` is called.
    """

    def __init__(self, answer: UpstreamResponse = REDIRECT, failure: Exception | None = None,
                 hold: bool = False) -> None:
        self.answer = answer
        self.failure = failure
        self.hold = hold
        #: (method, target, headers, body) of every fetch, in order.
        self.calls: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None]] = []
        self.pending: list[defer.Deferred[UpstreamResponse]] = []

    def fetch(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
              body: bytes | None) -> defer.Deferred[UpstreamResponse]:
        self.calls.append((method, target, headers, body))
        if self.hold:
            held: defer.Deferred[UpstreamResponse] = defer.Deferred()
            self.pending.append(held)
            return held
        if self.failure is not None:
            return defer.fail(self.failure)
        return defer.succeed(self.answer)

    def release(self, answer: UpstreamResponse | None = None) -> None:
        """Answer every held fetch (with ``answer``, or the client's own)."""
        pending, self.pending = self.pending, []
        for held in pending:
            held.callback(answer or self.answer)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class MemoryUpstream:
    """The connection attempts of the clients on :attr:`reactor`, completed by the test.

    Args:
        reactor: the ``MemoryReactorClock`` an ``UpstreamClient`` was given (a new one
            if None).
    """

    def __init__(self, reactor: MemoryReactorClock | None = None) -> None:
        self.reactor = reactor or MemoryReactorClock()
        self.transports: list[StringTransport] = []

    @property
    def attempts(self) -> int:
        """Connection attempts so far."""
        return len(self.reactor.tcpClients)

    def address(self, index: int = -1) -> tuple[str, int, float]:
        """(host, port, connect timeout) of attempt ``index``."""
        host, port, _, timeout, _ = self.reactor.tcpClients[index]
        return host, port, timeout

    def protocol(self, index: int = -1) -> IProtocol:
        """The client's protocol for attempt ``index`` (TLS, for an https upstream)."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        # An UpstreamClient's factories never refuse a connection (None).
        return cast("IProtocol", factory.buildProtocol(IPv4Address("TCP", host, port)))

    def accept(self, index: int = -1) -> tuple[IProtocol, StringTransport]:
        """Complete attempt ``index`` over a ``StringTransport`` (plain HTTP): the client's
        protocol and the transport whose ``value()`` is what it sent."""
        protocol = self.protocol(index)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return protocol, transport

    def refuse(self, index: int = -1, reason: Exception | None = None) -> None:
        """Fail attempt ``index`` (connection refused, unless ``reason`` says otherwise)."""
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        # No connector is passed: an UpstreamClient's factories do not use it.
        factory.clientConnectionFailed(
            None,  # type: ignore[arg-type]
            Failure(reason or error.ConnectionRefusedError()),
        )


# ---------------------------------------------------------------------------
# Two protocols joined in memory


def connect_in_memory(server: IProtocol, client: IProtocol, clock: IReactorTime,
                      peer: tuple[str, int] = ("192.0.2.7", 40000),
                      host: tuple[str, int] = ("198.51.100.1", 443)) -> iosim.IOPump:
    """Join a server and a client protocol (TLS layers included) through memory.

    The server sees ``peer`` as the client's address and ``host`` as its own. Call
    ``pump.flush()`` to move bytes until neither side has more to say; each step runs
    what ``clock`` (the reactor the TLS layers were given) has due now, as a reactor
    turn would (Twisted's client TLS sends small writes at the next turn).
    """
    server_transport = iosim.FakeTransport(
        server, True, IPv4Address("TCP", *host), IPv4Address("TCP", *peer)
    )
    client_transport = iosim.FakeTransport(
        client, False, IPv4Address("TCP", *peer), IPv4Address("TCP", *host)
    )
    return iosim.connect(  # type: ignore[no-any-return]
        server, server_transport, client, client_transport, greet=False, clock=clock
    )


class RecordingProtocol(Protocol):
    """Keeps what it receives; says ``send`` when connected; notes when the connection
    ends."""

    def __init__(self, send: bytes = b"", on_data: Callable[[RecordingProtocol], None] | None = None) -> None:
        self.send = send
        self.received = b""
        self.lost: Failure | None = None
        self._on_data = on_data

    def connectionMade(self) -> None:
        if self.send:
            self.transport.write(self.send)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._on_data is not None:
            self._on_data(self)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


def tls_client(server_name: str, ca: LocalCA, protocol: Protocol, clock: IReactorTime) -> TLSMemoryBIOProtocol:
    """A client TLS protocol that asks for ``server_name`` (SNI), trusts only ``ca``
    and checks the certificate's name, wrapping ``protocol``; ``clock`` schedules its
    writes (pass the same one to :func:`connect_in_memory`)."""
    options = optionsForClientTLS(server_name, trustRoot=Certificate.loadPEM(ca.cert_path.read_bytes()))
    factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: protocol), clock=clock)
    return factory.buildProtocol(None)
