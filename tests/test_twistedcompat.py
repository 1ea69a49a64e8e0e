"""Each of Twisted's private APIs that trackproxy uses, against the installed Twisted.

A Twisted release that renames or reshapes one fails here, by name, before anything
subtler breaks on the request path.
"""

from __future__ import annotations

import select
import socket

from OpenSSL import SSL
from twisted.internet import epollreactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from proxy import twistedcompat


class _Port:
    """What a tcp.Server asks of the port that accepted it."""

    _realPortNumber = 1
    _type = "TCP"


def server_transport(reactor: object) -> tuple[tcp.Server, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), _Port(), 1, reactor)
    return transport, theirs


def test_nothing_waiting_to_send_reads_the_send_buffer():
    reactor = epollreactor.EPollReactor()
    transport, theirs = server_transport(reactor)
    try:
        assert twistedcompat.nothing_waiting_to_send(transport)
        transport.write(b"buffered")  # Twisted's own write buffers until the reactor runs
        assert not twistedcompat.nothing_waiting_to_send(transport)
    finally:
        transport.socket.close()
        theirs.close()


def test_limit_accepts_sets_what_port_do_read_obeys():
    reactor = epollreactor.EPollReactor()
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1", reactor=reactor)
    port.startListening()
    try:
        assert port.numberAccepts == 100, "Twisted's own starting point changed"
        twistedcompat.limit_accepts(port, 1)
        assert port.numberAccepts == 1
    finally:
        port.stopListening()


def test_adopt_listening_descriptor_makes_the_given_port_class():
    class Mine(tcp.Port):
        pass

    reactor = epollreactor.EPollReactor()
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        port = twistedcompat.adopt_listening_descriptor(Mine, reactor, listening.fileno(), socket.AF_INET,
                                                        Factory.forProtocol(Protocol))
        assert isinstance(port, Mine)
        port.startListening()
        assert port.getHost().port == listening.getsockname()[1]
        port.stopListening()
    finally:
        listening.close()


def test_the_connector_builds_its_transport_class():
    class Mine(tcp.Client):
        pass

    class MyConnector(twistedcompat.Connector):
        transport_class = Mine

    reactor = epollreactor.EPollReactor()
    connector = MyConnector("127.0.0.1", 9, ClientFactory.forProtocol(Protocol), 1, None, reactor)
    connector.connect()
    try:
        assert isinstance(connector.transport, Mine)
    finally:
        connector.stopConnecting()


def test_the_epoll_set_is_read_registered_and_polled():
    reactor = epollreactor.EPollReactor()
    r, w = socket.socketpair()
    try:

        class Reader:
            def fileno(self) -> int:
                return r.fileno()

        reader = Reader()
        assert not twistedcompat.is_registered(reactor, r.fileno())
        twistedcompat.register_reader(reactor, reader, r.fileno(), select.EPOLLIN)
        assert twistedcompat.is_registered(reactor, r.fileno())
        assert twistedcompat.selectables(reactor)[r.fileno()] is reader
        w.send(b"x")
        assert (r.fileno(), select.EPOLLIN) in twistedcompat.poll(reactor, 1.0)
        assert callable(twistedcompat.event_handler(reactor))
    finally:
        r.close()
        w.close()


def test_represents_eof_tells_a_peer_gone_from_a_tls_error():
    assert twistedcompat.represents_eof(SSL.SysCallError(-1, "Unexpected EOF"))
    assert not twistedcompat.represents_eof(SSL.Error([("SSL routines", "", "no shared cipher")]))


def test_the_lean_tls_protocol_overrides_what_twisted_still_has():
    for name in ("makeConnection", "_shutdownTLS", "_tlsShutdownFinished"):
        assert name in vars(TLSMemoryBIOProtocol), f"TLSMemoryBIOProtocol.{name} is gone"
    assert TLSMemoryBIOProtocol._handshakeDone is False
    factory = TLSMemoryBIOFactory(CertificateOptions(), False, Factory.forProtocol(Protocol))
    assert hasattr(factory, "_creatorCallable")
    protocol = TLSMemoryBIOProtocol(factory, Protocol())
    assert protocol._connectWrapped is True


def test_a_connection_is_handed_to_another_protocol_with_another_peer():
    reactor = epollreactor.EPollReactor()
    transport, theirs = server_transport(reactor)
    try:
        second = Protocol()
        twistedcompat.hand_over(transport, second)
        assert transport.protocol is second, "what tcp.Connection.doRead delivers to"
        client = IPv4Address("TCP", "203.0.113.9", 40000)
        twistedcompat.set_client_address(transport, client)
        assert transport.getPeer() == client
    finally:
        transport.socket.close()
        theirs.close()
