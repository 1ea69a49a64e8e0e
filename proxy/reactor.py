"""The reactor ``trackproxy run`` and its workers use: Twisted's epoll reactor, leaner.

What it changes, each measured on the request path:

- Workers share each listening socket. With plain epoll every worker waiting on it is
  woken for every new connection, and all but one find nothing to accept. Linux's
  ``EPOLLEXCLUSIVE`` (4.5+) wakes one waiter instead, as nginx does; Twisted has no
  option for it, so listening ports are registered with it here (an exclusive
  registration cannot be modified later, which a listening port never needs). And a
  port accepts one connection per turn (:class:`EagerPort`), so the next one wakes
  another worker: in the benchmark's keep-alive workload, one worker took all 32
  connections in two runs of four before, and 34-66 % in each run after.
- Twisted dispatches every I/O event through ``log.callWithLogger``, which builds a
  logging context (a log prefix string and a copied dict) for legacy ``log.msg`` calls
  made inside the handler: several microseconds per event, several events per
  connection. trackproxy logs through ``twisted.logger``, which does not read that
  context; events are dispatched directly, and an exception escaping a handler is
  still logged (as Twisted would).
- Twisted's TCP transports never send in ``write()``: they buffer, ask epoll for
  writability (a syscall), send on the next loop turn and stop asking (another one).
  A proxy writes small answers to idle sockets, so a write to an empty buffer is sent
  at once here, and only what the kernel does not take waits for the reactor.

Everything else is Twisted's reactor unchanged; what this needs of Twisted's private parts
it reaches through :mod:`proxy.twistedcompat`.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import TYPE_CHECKING

from twisted.internet import epollreactor, tcp, unix
from twisted.logger import Logger

from proxy import twistedcompat

if TYPE_CHECKING:
    from twisted.internet.interfaces import Binding, IListeningPort, IProtocolFactory, IReadDescriptor
    from twisted.internet.protocol import ClientFactory, P

log = Logger(namespace="trackproxy.reactor")

EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


class _EagerWrites:
    """``write()`` sends at once when nothing is waiting to be sent before it."""

    def write(self, data: bytes) -> None:
        if data and self.connected and not self.disconnecting and twistedcompat.nothing_waiting_to_send(self):  # type: ignore[attr-defined, arg-type]
            try:
                sent = self.socket.send(data)  # type: ignore[attr-defined]
            except OSError:  # EAGAIN and the rest: Twisted's way finds out and reports it
                sent = 0
            if sent >= len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]


class EagerServer(_EagerWrites, tcp.Server):
    pass


class EagerClient(_EagerWrites, tcp.Client):
    pass


#: Connections a listening port accepts per reactor turn (nginx's ``multi_accept off``).
ACCEPTS_PER_TURN = 1


class EagerPort(tcp.Port):
    """A listening port that takes :data:`ACCEPTS_PER_TURN` connections per turn.

    Twisted accepts up to 100 at a time, and more each time it finds that many waiting.
    With worker processes sharing the socket that hands a burst of new connections (a
    client opening 32 keep-alive connections at once) to whichever worker woke first,
    for as long as they stay open. Taken one per turn, the process returns to epoll
    between accepts, and the kernel wakes another waiting process for the next.
    """

    transport = EagerServer

    def doRead(self) -> None:
        twistedcompat.limit_accepts(self, ACCEPTS_PER_TURN)  # Twisted raises it after a full turn
        super().doRead()  # type: ignore[no-untyped-call]


class EagerConnector(twistedcompat.Connector):
    transport_class = EagerClient


class SharedListenerReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor with exclusive listening ports and direct dispatch."""

    def addReader(self, reader: IReadDescriptor) -> None:
        fd = reader.fileno()
        if (EPOLLEXCLUSIVE and isinstance(reader, (tcp.Port, unix.Port))
                and not twistedcompat.is_registered(self, fd)):
            twistedcompat.register_reader(self, reader, fd, select.EPOLLIN | EPOLLEXCLUSIVE)
            return
        super().addReader(reader)  # type: ignore[no-untyped-call]

    def listenTCP(self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = "") -> EagerPort:
        listening = EagerPort(port, factory, backlog, interface, self)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: IProtocolFactory) -> IListeningPort:
        if addressFamily in (socket.AF_INET, socket.AF_INET6):
            listening = twistedcompat.adopt_listening_descriptor(EagerPort, self, fileDescriptor, addressFamily,
                                                                 factory)
            listening.startListening()
            return listening
        return super().adoptStreamPort(fileDescriptor, addressFamily, factory)  # type: ignore[no-untyped-call, no-any-return]

    def connectTCP(self, host: str, port: int, factory: ClientFactory[P], timeout: float = 30.0,
                   bindAddress: Binding | tuple[str, int] | None = None) -> EagerConnector:
        connector = EagerConnector(host, port, factory, timeout, bindAddress, self)
        connector.connect()
        return connector

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = twistedcompat.poll(self, -1 if timeout is None else timeout)
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = twistedcompat.selectables(self)
        handle = twistedcompat.event_handler(self)
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except Exception:
                log.failure("unhandled error handling {selectable}", selectable=selectable)

    doIteration = doPoll


def install() -> SharedListenerReactor:
    """Make it the global reactor (before anything imports ``twisted.internet.reactor``)."""
    from twisted.internet.main import installReactor

    reactor = SharedListenerReactor()  # type: ignore[no-untyped-call]
    installReactor(reactor)
    return reactor
