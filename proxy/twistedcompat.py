"""Every use trackproxy makes of Twisted's private APIs, in one place.

Twisted gives no public way to do what the request path needs for its speed
(``reactor``: send at once, accept one connection per turn, register a listening
socket with ``EPOLLEXCLUSIVE``, dispatch without the legacy logging context; ``tls``:
a TLS layer without per-connection interface declarations that closes without waiting
for the peer's close_notify). Each of those reaches into an underscored attribute or
overrides an underscored method; this module holds all of them, each behind a name
that says what it is for, so a Twisted release that renames one breaks here and
nowhere else. ``tests/test_twistedcompat.py`` checks every one against the installed
Twisted (setup.cfg bounds the version; constraints.txt pins the one CI tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.protocols import tls
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.interfaces import (
        IAddress,
        IProtocol,
        IProtocolFactory,
        IReadDescriptor,
        ITransport,
        IWriteDescriptor,
    )
    from twisted.internet.posixbase import PosixReactorBase

# ---------------------------------------------------------------------------
# TCP transports (twisted.internet.abstract.FileDescriptor, tcp.Connection)


def nothing_waiting_to_send(transport: tcp.Connection) -> bool:
    """True when the transport's send buffer is empty and writing is still allowed, so
    that data sent on the socket now goes out in order."""
    return (not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer))


def hand_over(transport: tcp.Connection, protocol: IProtocol) -> None:
    """From now on ``transport`` delivers what it reads to ``protocol`` (already connected
    to it), not to the protocol it was accepted with (PROXY protocol's header reader)."""
    transport.protocol = protocol


def set_client_address(transport: tcp.Connection, address: IAddress) -> None:
    """``transport.getPeer()`` answers ``address`` from now on (the client a PROXY header
    named), for every layer above that asks (TLS delegates ``getPeer`` down to here)."""
    transport.getPeer = lambda: address  # type: ignore[method-assign]


# ---------------------------------------------------------------------------
# Listening ports (tcp.Port) and connectors (tcp.Connector)


def limit_accepts(port: tcp.Port, count: int) -> None:
    """How many connections ``port.doRead()`` accepts before returning (Twisted starts
    at 100 and raises it by 20 after every turn that used them all)."""
    port.numberAccepts = count


def adopt_listening_descriptor(port_class: type[tcp.Port], reactor: PosixReactorBase, fd: int, family: int,
                               factory: IProtocolFactory) -> tcp.Port:
    """A ``port_class`` serving an already-listening socket, as ``adoptStreamPort`` makes
    one (it always makes a plain ``tcp.Port``)."""
    return port_class._fromListeningDescriptor(reactor, fd, family, factory)  # type: ignore[no-any-return]


class Connector(tcp.Connector):
    """A connector whose transport is an instance of :attr:`transport_class`."""

    transport_class: type[tcp.Client] = tcp.Client

    def _makeTransport(self) -> tcp.Client:
        return self.transport_class(self.host, self.port, self.bindAddress, self, self.reactor)


# ---------------------------------------------------------------------------
# The epoll reactor (twisted.internet.epollreactor, posixbase)


def is_registered(reactor: EPollReactor, fd: int) -> bool:
    """Whether ``fd`` is in the reactor's epoll set (for reading or writing)."""
    return fd in reactor._reads or fd in reactor._writes


def register_reader(reactor: EPollReactor, reader: IReadDescriptor, fd: int, events: int) -> None:
    """Add ``reader`` to the reactor's epoll set with ``events`` (which may carry flags
    such as ``EPOLLEXCLUSIVE`` that ``addReader`` cannot pass)."""
    reactor._poller.register(fd, events)
    reactor._reads.add(fd)
    reactor._selectables[fd] = reader


def poll(reactor: EPollReactor, timeout: float) -> list[tuple[int, int]]:
    """One ``epoll_wait``: the (fd, events) ready, waiting at most ``timeout`` seconds
    (-1: until something is)."""
    return reactor._poller.poll(timeout, len(reactor._selectables))  # type: ignore[no-any-return]


def selectables(reactor: EPollReactor) -> dict[int, IReadDescriptor | IWriteDescriptor]:
    """fd -> the reader or writer registered for it."""
    return reactor._selectables


def event_handler(reactor: EPollReactor) -> Callable[[IReadDescriptor | IWriteDescriptor, int, int], None]:
    """What the reactor runs for one ready fd: ``handler(selectable, fd, events)``."""
    return reactor._doReadOrWrite


# ---------------------------------------------------------------------------
# TLS over a transport (twisted.protocols.tls)


def represents_eof(error: SSL.Error) -> bool:
    """Whether a TLS error only says that the peer went away (Twisted's own rule)."""
    return bool(tls._representsEOF(error))


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """``TLSMemoryBIOProtocol`` for servers, with less per connection and a plain close.

    - :meth:`makeConnection` does not re-declare every interface of the TCP transport
      on this object (``directlyProvides`` twice per connection, about 25 µs; nothing
      here asks for them) nor try a handshake step before the client has said
      anything (a server has nothing to send before the ClientHello);
    - closing sends our close_notify and then closes the TCP connection, without
      waiting for the peer's, which many clients never send;
    - :meth:`tls_ended` is called when the TLS connection is over, with whether the
      handshake had finished.
    """

    def makeConnection(self, transport: ITransport) -> None:
        # TLSMemoryBIOProtocol.makeConnection without the directlyProvides loops (and
        # without registering with the factory twice).
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)

    @property
    def handshake_done(self) -> bool:
        return bool(self._handshakeDone)

    def tls_ended(self, reason: Failure | None) -> None:
        """The TLS connection is over: ``reason`` is None for a clean end."""

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()  # type: ignore[no-untyped-call]
        if self.disconnecting and self.transport is not None:
            self.transport.loseConnection()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        self.tls_ended(reason)
        super()._tlsShutdownFinished(reason)  # type: ignore[no-untyped-call]
