"""A worker process: ``python -m proxy.worker``, started by ``workers.Supervisor``.

A worker serves the listening sockets its parent bound (or received from systemd) and
handed down: it adopts them, serves them with its own :class:`~proxy.frontend.Frontend`
(its own cache, pools and access log), and does what its parent asks over the control
channel: ``start`` and ``reload`` (with the parent's copy of the YAML text: every
process parses the same bytes, and a worker started after a crash serves what the
others serve, not what the file on disk says now), ``certificates`` (re-read what
changed), ``metrics`` (its exposition) and ``status`` (its cache and upstream counts).
It runs no certbot, no admin listener and sends nothing to systemd. It stops on
``SIGTERM`` (answers under way go out first) and when its parent goes away.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.logger import Logger

if TYPE_CHECKING:
    from twisted.internet import defer
    from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime

    from proxy.frontend import Frontend

log = Logger(namespace="trackproxy.worker")

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


class _WorkerReactor(Protocol):
    """What a worker asks of its reactor (``IReactorCore`` and ``IReactorSocket`` parts)."""

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: socket.AddressFamily, factory: IProtocolFactory
    ) -> IListeningPort: ...


def _listener(text: str) -> tuple[str, int, socket.AddressFamily]:
    role, fd, family = text.split(":")
    return role, int(fd), _FAMILIES[family]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control", type=int, required=True, help="the control socket's fd")
    parser.add_argument("--listener", type=_listener, action="append", default=[],
                        help="ROLE:FD:FAMILY of a listening socket to serve")
    return parser.parse_args(argv)


class Worker:
    """Answers the parent's requests; serves once told to ``start``."""

    def __init__(
        self, reactor: _WorkerReactor, index: int, listeners: Sequence[tuple[str, int, socket.AddressFamily]]
    ) -> None:
        self._reactor = reactor
        self.index = index
        self._listeners = list(listeners)
        self.frontend: Frontend | None = None
        self.ports: list[IListeningPort] = []

    def handle(self, message: dict[str, Any]) -> object:
        op = message.get("op")
        if op == "start":
            return self._start(message["text"], message["path"])
        if self.frontend is None:
            raise ValueError(f"{op!r} before start")
        if op == "reload":
            return self._reload(message["text"], message["path"])
        if op == "certificates":
            self.frontend.load_certificates(self.frontend.config, bool(message.get("reread")))
            return {"ok": True}
        if op == "metrics":
            from prometheus_client import generate_latest

            return {"text": generate_latest(self.frontend.metrics.registry).decode("utf-8")}
        if op == "status":
            cache, health = self.frontend.status()
            return {"cache": cache, "health": health}
        raise ValueError(f"unknown control request {op!r}")

    def _start(self, text: str, path: str) -> dict[str, Any]:
        """Build the frontend for the parent's config text, then serve the sockets."""
        from proxy.access import load_or_create_key
        from proxy.config import parse_config
        from proxy.frontend import Frontend
        from proxy.service import new_metrics, utc_now

        if self.frontend is not None:
            raise ValueError("started already")
        config = parse_config(text, path)  # the parent accepted it: errors are not expected
        self.frontend = Frontend(cast("IReactorTime", self._reactor), config, new_metrics(management=False), utc_now,
                                 load_or_create_key(config.state_dir), sys.stdout, in_worker=True)
        for role, fd, family in self._listeners:
            self.ports.append(self._reactor.adoptStreamPort(fd, family, self.frontend.factory_for(role)))
            os.close(fd)  # Twisted keeps its own duplicate
        self._listeners = []
        self.frontend.start()
        return {"ok": True, "pid": os.getpid()}

    def _reload(self, text: str, path: str) -> dict[str, Any]:
        from proxy.config import parse_config
        from proxy.yamlnodes import ConfigErrors

        assert self.frontend is not None  # handle() answers a reload only once started
        try:
            config = parse_config(text, path)
            self.frontend.apply(config)
        except ConfigErrors as e:
            return {"ok": False, "errors": [str(error) for error in e.errors]}
        except (OSError, ValueError) as e:
            return {"ok": False, "errors": [f"{path}: worker {self.index}: {e}"]}
        self.frontend.load_certificates(config, reread=True)
        return {"ok": True}

    def parent_gone(self) -> None:
        if self._reactor.running:
            log.warn("worker {index}: the parent process went away; stopping", index=self.index)
            self._reactor.stop()

    def stop(self) -> defer.Deferred[list[Any]]:
        """Stop accepting, let answers under way go out, close pools, flush the log."""
        from twisted.internet import defer

        closing = [defer.maybeDeferred(p.stopListening) for p in self.ports]
        if self.frontend is None:
            return defer.gatherResults(closing, consumeErrors=True)
        frontend = self.frontend
        drained = frontend.drain(frontend.config.limits.upstream_timeout + 1)
        drained.addCallback(lambda _: frontend.stop())
        return defer.gatherResults([*closing, drained], consumeErrors=True)


def _end_with_parent() -> None:
    """SIGTERM when the parent process goes away, however it goes (Linux)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # it went before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _end_with_parent()
    from proxy import process

    reactor = process.prepare()

    from proxy.control import ChannelFactory, ControlChannel

    worker = Worker(reactor, args.index, args.listener)
    channel = ControlChannel(worker.handle, on_lost=worker.parent_gone)
    reactor.adoptStreamConnection(args.control, socket.AF_UNIX, ChannelFactory(channel))  # type: ignore[no-untyped-call]
    os.close(args.control)
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    # Ctrl-C in a terminal reaches the whole process group: the parent stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor.run(installSignalHandlers=True)
    if worker.frontend is not None:
        worker.frontend.flush_logs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
