"""The reactor's departures from Twisted's epoll reactor, on real sockets (never run)."""

from __future__ import annotations

import os
import socket

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs

from proxy.reactor import EPOLLEXCLUSIVE, EagerServer, SharedListenerReactor


def epoll_flags(reactor: SharedListenerReactor, fd: int) -> int:
    """The events ``fd`` is registered for in the reactor's epoll set (from /proc)."""
    info = open(f"/proc/self/fdinfo/{reactor._poller.fileno()}").read()
    for line in info.splitlines():
        if line.startswith("tfd:") and int(line.split()[1]) == fd:
            return int(line.split()[3], 16)
    raise AssertionError(f"fd {fd} is not registered")


def test_listening_ports_wake_one_process_per_connection():
    reactor = SharedListenerReactor()
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        assert EPOLLEXCLUSIVE and epoll_flags(reactor, port.fileno()) & EPOLLEXCLUSIVE
    finally:
        port.stopListening()


def test_a_listening_port_accepts_one_connection_per_turn():
    """Workers sharing a socket: a burst of connections is not all taken by one of them."""
    reactor = SharedListenerReactor()
    accepted: list[Protocol] = []

    class Counted(Protocol):
        def connectionMade(self) -> None:
            accepted.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Counted), interface="127.0.0.1")
    clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(3)]
    try:
        for turn in (1, 2, 3):
            port.doRead()  # what the reactor calls when the socket is readable
            assert len(accepted) == turn
    finally:
        for client in clients:
            client.close()
        for protocol in accepted:
            protocol.transport.abortConnection()
        port.stopListening()


def test_a_write_to_an_idle_socket_is_sent_at_once_without_the_reactor():
    reactor = SharedListenerReactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    protocol = Protocol()
    transport = EagerServer(ours, protocol, ("127.0.0.1", 1), _FakePort(), 1, reactor)
    protocol.makeConnection(transport)
    transport.write(b"answer")
    assert theirs.recv(100) == b"answer"
    assert transport not in reactor.getWriters(), "no epoll round trip for it"
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = b"x" * (8 * 1024 * 1024)
    transport.write(big)  # more than the kernel takes now: the rest waits for the reactor
    assert transport in reactor.getWriters()
    ours.close()
    theirs.close()


def test_an_exception_escaping_a_handler_is_logged_and_the_loop_goes_on():
    reactor = SharedListenerReactor()
    r, w = os.pipe()

    class Broken:
        def fileno(self) -> int:
            return r

        def doRead(self) -> None:
            raise RuntimeError("boom")

        def logPrefix(self) -> str:
            return "broken"

    os.write(w, b"x")
    reactor._selectables[r] = Broken()
    reactor._poller.register(r, 1)
    reactor._doReadOrWrite = lambda selectable, fd, event: selectable.doRead()  # type: ignore[method-assign]
    with capturedLogs() as events:
        reactor.doPoll(0)
    assert any("unhandled error" in e.get("log_format", "") for e in events)
    os.close(r)
    os.close(w)


class _FakePort:
    """What ``tcp.Server`` asks of the port that accepted it."""

    _realPortNumber = 1
    _type = "TCP"
