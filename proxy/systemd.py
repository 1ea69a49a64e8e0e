"""Telling systemd how the service is doing (``sd_notify``), without libsystemd.

This module owns the notification protocol of ``Type=notify`` units: one datagram per
state change to the unix socket named in ``$NOTIFY_SOCKET`` (``@`` for the abstract
namespace) — ``READY=1`` once every listener is up, ``RELOADING=1`` … ``READY=1``
around a reload, ``STOPPING=1`` at shutdown, and ``WATCHDOG=1`` at half the interval
systemd asks for in ``$WATCHDOG_USEC``, so a wedged reactor gets the service
restarted. Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

When to notify is the service's business; this module only speaks the protocol.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends state changes to systemd.

    Args:
        environ: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are
            read from (``os.environ`` in service; a dict in tests).
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self.watchdog_interval = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> None:
        """One notification of ``KEY=VALUE`` fields; lost quietly if systemd is gone
        (a notification must never take the proxy down)."""
        if self._address is None:
            return
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) tell this reload apart.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half what systemd asked for, or None when
    it asked nothing of this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2_000_000
