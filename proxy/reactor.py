"""The reactor of a worker process: epoll, waking one worker per new connection.

Workers share each listening socket. With plain epoll every worker waiting on it is
woken for every new connection, and all but one find nothing to accept: with two
workers that doubled the CPU a connection costs (the benchmark's workload C). Linux's
``EPOLLEXCLUSIVE`` (4.5+) wakes one waiter instead, as nginx does. Twisted's epoll
reactor has no option for it, so this subclass registers listening ports with it; an
exclusive registration cannot be modified later, which a listening port never needs
(it is only ever read). Everything else is Twisted's reactor unchanged.
"""

from __future__ import annotations

import select

from twisted.internet import epollreactor, tcp, unix

EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


class SharedListenerReactor(epollreactor.EPollReactor):
    """An epoll reactor whose listening ports wake only one process per event."""

    def addReader(self, reader: object) -> None:
        fd = reader.fileno()  # type: ignore[attr-defined]
        if (EPOLLEXCLUSIVE and isinstance(reader, (tcp.Port, unix.Port))
                and fd not in self._reads and fd not in self._writes):
            self._poller.register(fd, select.EPOLLIN | EPOLLEXCLUSIVE)
            self._reads.add(fd)
            self._selectables[fd] = reader
            return
        super().addReader(reader)


def install() -> SharedListenerReactor:
    """Make it the global reactor (before anything imports ``twisted.internet.reactor``)."""
    from twisted.internet.main import installReactor

    reactor = SharedListenerReactor()
    installReactor(reactor)
    return reactor
