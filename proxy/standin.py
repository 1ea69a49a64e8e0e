"""A stand-in tracking platform on loopback: the real flow, without the platform.

``trackproxy stand-in`` answers the way a platform's tracking endpoint does, so that the
local config, demos, tests and the benchmark show what the product is for (the domain's
own certificate, and the platform's ``302`` relayed) on a machine that cannot reach the
platform:

- HTTPS only, as ``spgo.io`` by default, with a certificate from its own test CA, made
  on first use in a directory of its own (``ca.pem`` is what an upstream's ``ca_file``
  trusts); the handshake fails with ``unrecognized_name`` for any other SNI, or none, as
  multi-tenant endpoints do;
- ``/f/...`` (a click): ``302`` to a landing page, ``Server: msys-http``;
- ``/q/...`` (an open): a 1×1 transparent GIF;
- anything else: ``404``;
- one line per request on standard output with what it received (Host, SNI,
  User-Agent, X-Forwarded-For, X-Forwarded-Proto), the things the platform relies on;
- ``--delay`` holds every answer, for timeouts and coalescing demos;
- ``SIGUSR1`` prints how many connections and requests it has had (the benchmark
  counts the proxies' upstream connections with it).

It parses requests with httptools (llhttp) and answers from bytes prepared at start-up,
so it costs little next to the proxy it stands behind. It keeps no state between
requests and is never a production upstream.
"""

from __future__ import annotations

import datetime
import os
import shlex
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast
from typing import Protocol as TypingProtocol

import attrs
import httptools
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy import http11, pki
from proxy.statedir import write_atomically
from proxy.tls import ServerTLS, context_for_files, normalise_server_name

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IListeningPort, IProtocolFactory, IReactorTime
    from twisted.python.failure import Failure

DEFAULT_NAME = "spgo.io"
DEFAULT_PORT = 9443
LANDING_URL = b"https://example.com/landing"
SERVER = b"msys-http"
#: A 1x1 transparent GIF, what open-tracking pixels are.
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
CA_FILE = "ca.pem"
CA_KEY = "ca.key"
CA_LIFETIME = datetime.timedelta(days=5 * 365)
LEAF_LIFETIME = datetime.timedelta(days=365)
#: Certificates this close to their end are made again at start.
REFRESH = datetime.timedelta(days=30)
#: What the stand-in reads of a request head at most (a platform refuses more, too).
MAX_HEAD_BYTES = 64 * 1024  # (and body: a tracking request has none)


def default_directory(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """``$XDG_STATE_HOME/trackproxy/stand-in`` (``~/.local/state/...`` by default)."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "trackproxy", "stand-in")


@attrs.frozen
class StandInFiles:
    """Where the stand-in's CA and its server certificate are."""

    ca: str
    cert: str
    key: str


def _load_valid(path: str, now: datetime.datetime) -> x509.Certificate | None:
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError):
        return None
    return cert if cert.not_valid_after_utc - now > REFRESH else None


def ensure_certificates(directory: str, name: str, now: datetime.datetime | None = None) -> StandInFiles:
    """The stand-in's CA and its certificate for ``name`` in ``directory``, made when
    missing or near their end (kept otherwise, so a ``ca_file`` pointing here stays good).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca_path, ca_key_path = os.path.join(directory, CA_FILE), os.path.join(directory, CA_KEY)
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    authority = None
    ca_cert = _load_valid(ca_path, now)
    if ca_cert is not None:
        try:
            with open(ca_key_path, "rb") as f:
                authority = pki.Authority(ca_cert, pki.load_key(f.read()))
        except (OSError, ValueError):
            authority = None
    if authority is None:
        authority = pki.Authority.create(
            f"trackproxy stand-in test CA ({os.uname().nodename})", now - datetime.timedelta(hours=1),
            now + CA_LIFETIME,
        )
        write_atomically(ca_key_path, pki.key_pem(authority.key), mode=0o600)
        write_atomically(ca_path, pki.cert_pem(authority.cert), mode=0o644)
    leaf = _load_valid(cert_path, now)
    if leaf is None or not _issued_by(leaf, authority.cert) or pki.dns_names(leaf) != [name]:
        cert, key = authority.issue(name, now - datetime.timedelta(hours=1), now + LEAF_LIFETIME)
        write_atomically(key_path, pki.key_pem(key), mode=0o600)
        write_atomically(cert_path, pki.cert_pem(cert), mode=0o644)
    return StandInFiles(ca=ca_path, cert=cert_path, key=key_path)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------
# Answers, prepared once


def _answer(code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[bytes, bytes]:
    """The head (without Date and Connection) and body of a fixed answer."""
    lines = [http11.status_line(code), b"Server: %s\r\n" % SERVER]
    lines += [b"%s: %s\r\n" % pair for pair in headers]
    lines.append(b"Content-Length: %d\r\n" % len(body))
    return b"".join(lines), body


REDIRECT = _answer(
    302,
    [(b"Location", LANDING_URL), (b"Content-Type", b"text/html")],
    b"<a href='%s'>Moved</a>\n" % LANDING_URL,
)
OPEN_PIXEL = _answer(200, [(b"Content-Type", b"image/gif")], PIXEL)
NOT_FOUND = _answer(404, [(b"Content-Type", b"text/plain")], b"not a tracking link\n")
BAD_REQUEST = _answer(400, [(b"Content-Type", b"text/plain")], b"bad request\n")


def answer_for(path: bytes) -> tuple[int, tuple[bytes, bytes]]:
    if path.startswith(b"/f/"):
        return 302, REDIRECT
    if path.startswith(b"/q/"):
        return 200, OPEN_PIXEL
    return 404, NOT_FOUND


_SHOWN = (b"host", b"user-agent", b"x-forwarded-for", b"x-forwarded-proto")


def describe(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], sni: str | None,
             code: int) -> str:
    """The line printed for a request: what the platform would see of it."""
    fields = [method.decode("latin-1"), shlex.quote(target.decode("latin-1"))]
    values = {}
    for name, value in headers:
        if name in _SHOWN and name not in values:
            values[name] = value.decode("latin-1")
    fields.append(f"host={shlex.quote(values.get(b'host', '-'))}")
    fields.append(f"sni={sni or '-'}")
    for name in _SHOWN[1:]:
        fields.append(f"{name.decode()}={shlex.quote(values.get(name, '-'))}")
    fields.append(f"-> {code}")
    return " ".join(fields)


# ---------------------------------------------------------------------------
# The protocol


class StandInProtocol(Protocol):
    """One client connection: requests answered in order (pipelining included)."""

    def __init__(self, stand_in: StandIn) -> None:
        self._stand_in = stand_in
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bool]] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._unanswered_bytes = 0  # received since the last complete request
        self._timer: IDelayedCall | None = None
        self._closed = False

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_message_complete(self) -> None:
        self._queue.append(
            (self._parser.get_method(), self._url, self._headers, self._parser.should_keep_alive())
        )
        self._unanswered_bytes = 0

    # Twisted

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._unanswered_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._refuse()
            return
        if self._unanswered_bytes > MAX_HEAD_BYTES:
            self._refuse()
            return
        if self._timer is None:
            self._answer_queued()

    def _refuse(self) -> None:
        head, body = BAD_REQUEST
        self._write(head, body, keep_alive=False)

    def _answer_queued(self) -> None:
        delay = self._stand_in.delay
        while self._queue and not self._closed:
            if delay > 0:
                if self._timer is None:
                    self._timer = self._stand_in.clock.callLater(delay, self._after_delay)
                return
            self._answer_one()

    def _after_delay(self) -> None:
        self._timer = None
        if self._queue and not self._closed:
            self._answer_one()
        self._answer_queued()

    def _answer_one(self) -> None:
        method, target, headers, keep_alive = self._queue.popleft()
        self._stand_in.requests += 1
        code, (head, body) = answer_for(target)
        self._stand_in.show(describe(method, target, headers, self._server_name(), code))
        self._write(head, b"" if method == b"HEAD" else body, keep_alive)

    def _write(self, head: bytes, body: bytes, keep_alive: bool) -> None:
        connection = b"keep-alive" if keep_alive else b"close"
        self.transport.write(  # type: ignore[union-attr]
            b"%sDate: %s\r\nConnection: %s\r\n\r\n%s" % (head, self._stand_in.date(), connection, body)
        )
        if not keep_alive:
            self._closed = True
            self._queue.clear()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _server_name(self) -> str | None:
        handle = getattr(self.transport, "getHandle", lambda: None)()
        get = getattr(handle, "get_servername", None)
        return normalise_server_name(get()) if get is not None else None

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class StandIn(Factory):
    """The stand-in's HTTP layer (TLS is put around it by :func:`tls_factory`).

    Args:
        clock: schedules delayed answers.
        delay: seconds every answer waits.
        out: where request lines go; None prints nothing.
    """

    noisy = False

    def __init__(self, clock: IReactorTime, delay: float = 0.0, out: IO[str] | None = sys.stdout) -> None:
        self.clock = clock
        self.delay = delay
        self._out = out
        self.date: Callable[[], bytes] = http11.DateCache(clock.seconds)

    connections = 0
    requests = 0

    def buildProtocol(self, addr: IAddress | None) -> StandInProtocol:
        self.connections += 1
        return StandInProtocol(self)

    def counts(self) -> str:
        """What ``SIGUSR1`` prints: connections accepted and requests answered so far."""
        return f"stand-in counts: connections={self.connections} requests={self.requests}"

    def show(self, line: str) -> None:
        if self._out is None:
            return
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass


def tls_factory(stand_in: StandIn, name: str, files: StandInFiles) -> TLSMemoryBIOFactory:
    """HTTPS around ``stand_in``: the certificate for ``name``, any other SNI refused."""
    server_tls = ServerTLS()
    server_tls.set_contexts({name: context_for_files(files.cert, files.key)})
    factory = TLSMemoryBIOFactory(server_tls, False, stand_in)
    factory.noisy = False
    return factory


class StandInReactor(TypingProtocol):
    """What :func:`run` needs of its reactor: ``IReactorTime``, ``IReactorTCP``'s
    ``listenTCP``, ``IReactorThreads``' ``callFromThread`` and ``IReactorCore``'s ``run``."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...

    # IReactorTCP says ServerFactory; reactors take any IProtocolFactory (tls_factory's is a WrappingFactory).
    def listenTCP(
        self, port: int, factory: IProtocolFactory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort: ...

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None: ...

    def run(self) -> None: ...


def run(
    reactor: StandInReactor,
    name: str,
    port: int,
    delay: float,
    directory: str,
    quiet: bool,
    out: IO[str] = sys.stdout,
) -> int:
    """``trackproxy stand-in``: listen on loopback until interrupted."""
    from twisted.internet.error import CannotListenError

    files = ensure_certificates(directory, name)
    stand_in = StandIn(cast("IReactorTime", reactor), delay, None if quiet else out)
    try:
        listening = reactor.listenTCP(
            port, tls_factory(stand_in, name, files), interface="127.0.0.1"
        )
    except CannotListenError as e:
        print(f"trackproxy: the stand-in cannot listen on 127.0.0.1:{port}: {e.socketError}; "
              f"choose another port with --port", file=sys.stderr)
        return 1
    bound = listening.getHost().port  # type: ignore[attr-defined]  # a TCP port's: an IPv4Address

    def print_counts() -> None:
        print(stand_in.counts(), file=out, flush=True)

    # A signal handler may run between any two bytecodes: print on the reactor's next turn.
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(print_counts))
    held = f", every answer held {delay:g}s" if delay else ""
    print(
        f"stand-in platform {name} listening on https://127.0.0.1:{bound} (SNI {name} only{held})\n"
        f"  CA for an upstream's ca_file: {files.ca}\n"
        f"  /f/... -> 302 Server: msys-http; /q/... -> open pixel; SIGUSR1 prints counts; Ctrl-C stops",
        file=out, flush=True,
    )
    reactor.run()
    return 0
