"""HTTP/1.1 on the wire: status lines and the reason phrases that go with them, and the
``Connection`` header's tokens (both directions of the proxy read them).

This module owns the bytes of a response's first line for every status the product
sends itself (RFC 9110 §15 names them) and the ``Date`` value. Twisted's own table stops
at RFC 2616 and answers ``Unknown Status`` for 421, 422 and 431, which the proxy and the
admin listener send; the upstream's own reason phrase is relayed as it came.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

#: RFC 9110 §15 reason phrases (and RFC 6585's 429/431) for what trackproxy answers.
REASONS: dict[int, bytes] = {
    200: b"OK",
    204: b"No Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    411: b"Length Required",
    413: b"Content Too Large",
    414: b"URI Too Long",
    415: b"Unsupported Media Type",
    421: b"Misdirected Request",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def reason(code: int) -> bytes:
    """The reason phrase for ``code`` (a generic one for a code not in the table)."""
    phrase = REASONS.get(code)
    if phrase is not None:
        return phrase
    return {1: b"Informational", 2: b"Success", 3: b"Redirection", 4: b"Client Error"}.get(
        code // 100, b"Server Error"
    )


def status_line(code: int, phrase: bytes | None = None) -> bytes:
    """``HTTP/1.1 CODE PHRASE\\r\\n``."""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase if phrase is not None else reason(code))


_DAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def http_date(seconds: float) -> bytes:
    """An IMF-fixdate (RFC 9110 §5.6.7): ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec
    )


class DateCache:
    """The ``Date`` value for now, formatted once per second, not once per answer."""

    __slots__ = ("_clock", "_second", "_value")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = http_date(now)
        return self._value


def connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of ``Connection`` header values (``close``, ``keep-alive``,
    and the names of headers the sender made hop-by-hop, RFC 9110 §7.6.1)."""
    return frozenset(token.strip().lower() for value in values for token in value.split(b",") if token.strip())
