"""Listener descriptions: the endpoint strings of ``listen:``, read in one place.

trackproxy documents four of Twisted's server endpoint types: ``tcp:PORT``, ``tcp6:PORT``
(``interface=``, ``backlog=``), ``unix:PATH`` and ``systemd:domain=...:name=...`` (socket
activation). This module owns reading such a string into an :class:`Endpoint` (config
checks it, the CLI and doctor find where a local client reaches a listener, the worker
parent binds it) and binding one into a listening socket for worker processes to share.
Listening in a single process is left to Twisted's own ``serverFromString``.
"""

from __future__ import annotations

import re
import socket
from typing import cast

import attrs

TYPES = frozenset({"tcp", "tcp6", "unix", "systemd"})
#: Twisted's own default listen backlog for tcp: endpoints.
DEFAULT_BACKLOG = 50
_OPTIONS = {
    "tcp": {"port", "interface", "backlog"},
    "tcp6": {"port", "interface", "backlog"},
    "unix": {"address", "mode", "backlog", "lockfile"},
    "systemd": {"domain", "name", "index"},
}


@attrs.frozen
class Endpoint:
    """One listener description, as written (``text``) and as understood."""

    text: str
    kind: str
    port: int | None = None
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG
    path: str | None = None
    mode: int | None = None
    domain: str | None = None  # systemd: INET, INET6 or UNIX
    name: str | None = None
    index: int | None = None


def parse_endpoint(text: str) -> Endpoint:
    """An :class:`Endpoint` from a Twisted server endpoint string.

    Raises:
        ValueError: not one of the documented forms, with what is wrong.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", text)]
    kind = parts[0]
    if kind not in TYPES:
        raise ValueError(f"{text!r}: unknown endpoint type {kind!r} (use one of {', '.join(sorted(TYPES))})")
    args = [p for p in parts[1:] if "=" not in p]
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(f"{text!r}: unknown option {sorted(unknown)[0]!r}")
    backlog = _number(text, options.get("backlog"), "backlog", DEFAULT_BACKLOG)
    if kind in ("tcp", "tcp6"):
        port = args[0] if args else options.get("port")
        if port is None or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"{text!r}: expected {kind}:PORT with PORT 0-65535")
        return Endpoint(text, kind, port=int(port), interface=options.get("interface", ""), backlog=backlog)
    if kind == "unix":
        path = args[0] if args and args[0] else options.get("address")
        if not path:
            raise ValueError(f"{text!r}: expected unix:PATH")
        mode = options.get("mode")
        return Endpoint(text, kind, path=path, backlog=backlog, mode=int(mode, 8) if mode else None)
    domain = options.get("domain")
    if domain not in ("INET", "INET6", "UNIX"):
        raise ValueError(f"{text!r}: systemd endpoints need domain=INET|INET6|UNIX")
    if "name" not in options and "index" not in options:
        raise ValueError(f"{text!r}: systemd endpoints need name=... or index=...")
    index = options.get("index")
    if index is not None and not index.isdigit():
        raise ValueError(f"{text!r}: index must be a number")
    return Endpoint(text, kind, domain=domain, name=options.get("name"),
                    index=int(index) if index is not None else None)


def _number(text: str, value: str | None, what: str, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit():
        raise ValueError(f"{text!r}: {what} must be a number")
    return int(value)


def local_address(endpoint: Endpoint, systemd_port: int) -> tuple[str, int] | None:
    """Where a client on this host reaches ``endpoint`` (a wildcard interface through
    loopback; a systemd socket on ``systemd_port``, the unit's usual one), or None for
    a unix socket."""
    if endpoint.kind == "systemd":
        if endpoint.domain == "UNIX":
            return None
        return ("::1" if endpoint.domain == "INET6" else "127.0.0.1"), systemd_port
    if endpoint.kind == "unix":
        return None
    host = endpoint.interface
    if host in ("", "0.0.0.0", "::"):
        host = "::1" if endpoint.kind == "tcp6" or host == "::" else "127.0.0.1"
    return host, cast(int, endpoint.port)  # tcp, tcp6: parse_endpoint sets it


def family(endpoint: Endpoint) -> int:
    """The address family a listening socket for ``endpoint`` has."""
    if endpoint.kind == "unix" or endpoint.domain == "UNIX":
        return socket.AF_UNIX
    if endpoint.kind == "tcp6" or endpoint.domain == "INET6" or ":" in endpoint.interface:
        return socket.AF_INET6
    return socket.AF_INET


def bind(endpoint: Endpoint) -> socket.socket:
    """A listening, non-blocking socket for a ``tcp``, ``tcp6`` or ``unix`` endpoint, bound
    as Twisted's ``listenTCP``/``listenUNIX`` would bind it (``SO_REUSEADDR``; ``tcp6`` and
    IPv6 interfaces dual-stack as the system has it).

    Raises:
        OSError: the address is in use, or may not be bound.
    """
    import os

    sock_family = family(endpoint)
    sock = socket.socket(sock_family, socket.SOCK_STREAM)
    try:
        if sock_family == socket.AF_UNIX:
            if endpoint.path and os.path.exists(endpoint.path) and not os.path.isdir(endpoint.path):
                os.unlink(endpoint.path)
            sock.bind(cast(str, endpoint.path))  # unix: parse_endpoint sets it
            if endpoint.mode is not None:
                os.chmod(cast(str, endpoint.path), endpoint.mode)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            interface = endpoint.interface or ("::" if sock_family == socket.AF_INET6 else "")
            sock.bind((interface, endpoint.port))
        sock.listen(endpoint.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
