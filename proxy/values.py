"""The value forms a configuration file writes: durations, sizes, host names, HOST:PORT.

Each parser takes what YAML gave (a string, or a number where one makes sense) and
returns the value in the unit the proxy uses, or raises ``ValueError`` with a message
an operator can act on; the YAML reader adds the file, line and column.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import idna

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^([0-9]+)\s*(B|KiB|MiB|GiB|K|M|G|KB|MB|GB)?$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    # Operators write K/M/G meaning the binary units; nginx does the same.
    "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_duration(value: Any) -> float:
    """Seconds from ``10s``, ``5m``, ``2h``, ``30d``, ``250ms`` or a bare number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m, 2h or 30d")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration (use e.g. 10s, 5m, 2h, 30d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from ``64MiB``, ``16KiB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16KiB or 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. 16KiB, 64MiB or bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def normalise_domain(name: str) -> str:
    """The canonical form of a configured host name: lower-case IDNA, no trailing dot.

    Raises:
        ValueError: the name is not a host name trackproxy can serve.
    """
    name = name.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty domain name")
    if "*" in name:
        raise ValueError(
            f"{name!r}: wildcard domains are not supported (HTTP-01 cannot validate them)"
        )
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"{name!r} is not a valid internationalised name: {e}")
    if len(name) > 253:
        raise ValueError(f"{name!r} is longer than 253 characters")
    for label in name.split("."):
        if not _HOST_LABEL.match(label):
            raise ValueError(f"{name!r} is not a valid host name")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is an IP address; a tracking domain is a name")
    return name


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a tuple."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not HOST:PORT")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    return host, int(port_text)
