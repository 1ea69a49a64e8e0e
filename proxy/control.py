"""The control channel between the parent and each worker process.

One stream socket per worker (a ``socketpair`` made by the parent before it spawns the
worker). Messages are JSON objects, each framed by a 32-bit length: a request carries
``op`` and an ``id`` and gets one reply (``reply_to`` with ``result`` or ``error``); a
notification (``op``, no ``id``) gets none. Either side may ask; what an ``op`` means is
``workers``' and ``worker``'s business, not this module's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress

log = Logger(namespace="trackproxy.control")

Handler = Callable[[dict[str, Any]], object]


class ControlError(Exception):
    """The other side answered a request with an error, or went away before answering."""


class ControlChannel(Int32StringReceiver):
    """One end of a control connection.

    Args:
        handler: answers the other side's requests and notifications (a value or a
            Deferred of one; the value is the reply's ``result``).
        on_lost: called once when the connection ends.
    """

    #: A worker's metrics exposition can be large (a series per domain).
    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self, handler: Handler, on_lost: Callable[[], None] = lambda: None) -> None:
        self._handler = handler
        self._on_lost = on_lost
        self._pending: dict[int, defer.Deferred[Any]] = {}
        self._next_id = 0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def call(self, op: str, **fields: Any) -> defer.Deferred[Any]:
        """Ask the other side; fires with its ``result`` or fails with :class:`ControlError`."""
        if not self.open:
            return defer.fail(ControlError("the control connection is closed"))
        self._next_id += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self._pending[self._next_id] = d
        self._send({"op": op, "id": self._next_id, **fields})
        return d

    def notify(self, op: str, **fields: Any) -> None:
        if self.open:
            self._send({"op": op, **fields})

    def _send(self, message: dict[str, Any]) -> None:
        self.sendString(json.dumps(message).encode("utf-8"))  # type: ignore[no-untyped-call]

    def stringReceived(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.error("unreadable control message ({size} bytes)", size=len(data))
            return
        if "reply_to" in message:
            d = self._pending.pop(message["reply_to"], None)
            if d is None:
                return
            if "error" in message:
                d.errback(ControlError(message["error"]))
            else:
                d.callback(message.get("result"))
            return
        answer = defer.maybeDeferred(self._handler, message)
        request_id = message.get("id")
        if request_id is None:
            answer.addErrback(lambda f: log.failure("control notification {op} failed", f, op=message.get("op")))
            return
        answer.addCallbacks(
            lambda result: self._send({"reply_to": request_id, "result": result}),
            lambda failure: self._reply_failed(request_id, message.get("op"), failure),
        )

    def _reply_failed(self, request_id: int, op: object, failure: Failure) -> None:
        log.failure("control request {op} failed", failure, op=op)
        if self.open:
            self._send({"reply_to": request_id, "error": failure.getErrorMessage()})

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("control message of {length} bytes refused", length=length)
        assert self.transport is not None  # only data received over a connection gets here
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.open = False
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ControlError("the control connection closed before the answer"))
        self._on_lost()


class ChannelFactory(Factory):
    """Hands out one prepared :class:`ControlChannel` (``adoptStreamConnection`` wants a
    factory)."""

    noisy = False

    def __init__(self, channel: ControlChannel) -> None:
        self._channel = channel

    def buildProtocol(self, addr: IAddress | None) -> ControlChannel:
        return self._channel
