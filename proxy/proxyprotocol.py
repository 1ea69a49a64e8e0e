"""The PROXY protocol (v1 text, v2 binary) on the public listeners, for a node behind an L4
load balancer (HAProxy ``send-proxy-v2``, a cloud network load balancer).

Behind such a balancer every connection comes from the balancer's address; the header it
sends first says whose connection it really is. This module owns whom to believe:

- from an address in ``proxy_protocol.from`` (the socket's real peer) the header is
  required, within ``proxy_protocol.timeout``; its source address is then the client's
  for routing, ``X-Forwarded-For``, ``trusted_proxies``, logs and metrics. A v2 ``LOCAL``
  header (the balancer's own health check) or v1 ``UNKNOWN`` keeps the socket's peer;
- from anyone else a header is refused (the connection is closed): a client must not be
  able to name its own address;
- a refusal closes the connection at once and is counted
  (``trackproxy_proxy_protocol_refusals_total{reason}``, registered only when PROXY
  protocol is on); nothing is forwarded.

Twisted's ``haproxy:`` endpoint parses the header but believes every peer, and drops a
first segment shorter than the header; the parsing here is RFC-sized (a v1 line is at
most 107 bytes, a v2 header 16 bytes plus its stated length) and waits for the rest.

The header comes before anything else, TLS included, so this layer sits under the TLS
and HTTP protocols: once the header is read, the connection is handed to them directly
(the TCP transport's protocol is replaced), so nothing of this module runs per request.
With ``from`` empty no connection is touched at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import twistedcompat
from proxy.config import ProxyProtocolSettings

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: RFC: a v1 line, CRLF included, is at most 107 bytes.
V1_MAX = 107
#: v2: the fixed part; the addresses follow (at most 216 bytes for unix, TLVs beyond).
V2_FIXED = 16
V2_MAX = V2_FIXED + 1024
REASONS = ("unlisted_source", "missing", "malformed", "timeout")


class Refused(Exception):
    """Not a PROXY header we accept; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def starts_like_a_header(data: bytes) -> bool | None:
    """Whether ``data`` begins a PROXY header (v1 or v2): True, False, or None while it
    is too short to tell."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        if data[: len(signature)] == signature:
            return True
        if len(data) < len(signature) and signature.startswith(data):
            return None
    return False


def parse_header(data: bytes) -> tuple[int, IAddress | None] | None:
    """The header at the start of ``data``: (its length, the client's address, or None to
    keep the socket's peer), or None while it is incomplete.

    Raises:
        Refused: not a PROXY header, or not one we accept.
    """
    begins = starts_like_a_header(data)
    if begins is None:
        return None
    if not begins:
        raise Refused("missing", "no PROXY header from a balancer that must send one")
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> tuple[int, IAddress | None] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise Refused("malformed", "a PROXY v1 line longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return end + 2, None
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise Refused("malformed", f"a PROXY v1 line of an unknown form: {data[:end][:60]!r}")
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        ipaddress.ip_address(fields[3].decode("ascii"))
        if not (fields[4].isdigit() and fields[5].isdigit()):
            raise ValueError("a port is not a number")
        port = int(fields[4])
        if port > 65535 or int(fields[5]) > 65535:
            raise ValueError("a port past 65535")
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused("malformed", f"a PROXY v1 line with a bad address or port ({e})") from None
    if (source.version == 4) != (fields[1] == b"TCP4"):
        raise Refused("malformed", "a PROXY v1 line whose address is not of its family")
    return end + 2, _address(source, port)


def _parse_v2(data: bytes) -> tuple[int, IAddress | None] | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    if version_command >> 4 != 2:
        raise Refused("malformed", f"a PROXY v2 header of version {version_command >> 4}")
    total = V2_FIXED + length
    if total > V2_MAX:
        raise Refused("malformed", f"a PROXY v2 header of {total} bytes")
    if len(data) < total:
        return None
    command = version_command & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection (a health check)
        return total, None
    if command != 0x1:
        raise Refused("malformed", f"a PROXY v2 header with command {command}")
    body = data[V2_FIXED:total]
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        return total, _address(ipaddress.IPv4Address(body[0:4]), int.from_bytes(body[8:10], "big"))
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        return total, _address(ipaddress.IPv6Address(body[0:16]), int.from_bytes(body[32:34], "big"))
    if family >> 4 == 0:  # AF_UNSPEC: no address given
        return total, None
    raise Refused("malformed", f"a PROXY v2 header for address family {family:#x}")


def _address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> IAddress:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return IPv4Address("TCP", str(ip.ipv4_mapped), port)
    if ip.version == 4:
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


class HeaderReader(Protocol):
    """A connection's protocol until its PROXY header is read (from a listed source) or
    its first bytes show there is none (from anyone else); then the connection belongs
    to ``inner`` (the listener's TLS or HTTP protocol) directly."""

    def __init__(self, factory: ProxyProtocolFactory, inner: Any, listed: bool, timeout: float) -> None:
        self._factory = factory
        self._inner = inner
        self._listed = listed
        self._timeout = timeout
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._inner_connected = False

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._tcp: tcp.Connection = transport
        self.connected = True
        if self._listed:
            self._timer = self._factory.clock.callLater(self._timeout, self._timed_out)
        else:
            # Its own deadlines start now; only the first bytes still pass through here.
            self._inner.makeConnection(transport)
            self._inner_connected = True

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._listed:
            self._read_header()
            return
        begins = starts_like_a_header(self._buffer)
        if begins is None:
            return
        if begins:
            self._refuse(Refused("unlisted_source", "a PROXY header from a source not in proxy_protocol.from"))
            return
        self._hand_over(self._buffer)

    def _read_header(self) -> None:
        try:
            parsed = parse_header(self._buffer)
        except Refused as refused:
            self._refuse(refused)
            return
        if parsed is None:
            if len(self._buffer) > V2_MAX:
                self._refuse(Refused("malformed", "no complete PROXY header"))
            return
        length, client = parsed
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if client is not None:
            twistedcompat.set_client_address(self._tcp, client)
        self._inner.makeConnection(self.transport)
        self._inner_connected = True
        self._hand_over(self._buffer[length:])

    def _hand_over(self, rest: bytes) -> None:
        self._buffer = b""
        twistedcompat.hand_over(self._tcp, self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def _timed_out(self) -> None:
        self._refuse(Refused("timeout", "no PROXY header within proxy_protocol.timeout"))

    def _refuse(self, refused: Refused) -> None:
        self._factory.refused(refused.reason)
        self._buffer = b""
        self._tcp.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._inner_connected:
            self._inner.connectionLost(reason)


@implementer(IProtocolFactory)
class ProxyProtocolFactory:
    """Wraps a listener's factory with PROXY protocol as ``settings()`` says now (a
    reload changes it for new connections).

    Args:
        wrapped: the listener's own factory (TLS or HTTP; it may refuse a connection:
            its cap stays in force).
        settings: the ``proxy_protocol`` settings in service now.
        clock: schedules the header deadline.
        refused: called with a reason from :data:`REASONS` for each refused connection.
    """

    noisy = False

    def __init__(self, wrapped: Any, settings: Callable[[], ProxyProtocolSettings], clock: IReactorTime,
                 refused: Callable[[str], None]) -> None:
        self.wrapped = wrapped
        self._settings = settings
        self.clock = clock
        self.refused = refused

    def buildProtocol(self, addr: IAddress) -> Any:
        settings = self._settings()
        inner = self.wrapped.buildProtocol(addr)
        if inner is None or not settings.sources:
            return inner
        try:
            peer = ipaddress.ip_address(getattr(addr, "host", ""))
        except ValueError:
            return HeaderReader(self, inner, False, settings.timeout)
        if peer.version == 6 and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        listed = any(peer in network for network in settings.sources)
        return HeaderReader(self, inner, listed, settings.timeout)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
