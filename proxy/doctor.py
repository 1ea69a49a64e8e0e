"""``trackproxy doctor``: the platforms' troubleshooting guide, run for each domain.

This module owns the five checks an operator would otherwise do by hand (README "Doctor"):

- ``dns``: the name's A/AAAA records (through any CNAME) point at this host;
- ``caa``: CAA (RFC 8659) lets ``acme.server``'s CA issue for the name;
- ``https``: the HTTPS listener serves a certificate valid for the name (SNI = the name);
- ``probe``: ``GET /f/a/b/c/d`` over that connection relays a 3xx from the platform;
- ``http``: the same over plain HTTP (links in mail already delivered).

Verdicts are decided by pure functions (``judge_*``, ``classify_*``), fed by the I/O
below them: DNS through Twisted Names on ``resolvers`` (``preflight`` owns the CAA rules),
sockets with the standard library, blocking, under a timeout: the doctor is a short-lived
command, not the daemon. The reactor is handed in by the CLI and runs only while DNS is
asked. Changing anything is left to the operator; every ``FAIL`` says what to change.

(Over 400 lines: five checks, each a pure judging rule next to the probe that feeds it,
and the report; the DNS lookups themselves are ``preflight``'s.)
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import IO, Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IResolver
from twisted.python.failure import Failure

from proxy import __version__
from proxy.config import Config, Domain
from proxy.endpoints import local_address, parse_endpoint
from proxy.preflight import (
    CAAFound,
    NamesReactor,
    Resolution,
    ca_identities,
    caa_permits,
    find_caa,
    resolve,
    resolver_for,
)
from proxy.values import normalise_domain

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
CHECKS = ("dns", "caa", "https", "probe", "http")
DEFAULT_PROBE_PATH = "/f/a/b/c/d"
#: Seconds any one DNS query, connection or answer may take.
TIMEOUT = 5.0
#: The proxy's own answers carry this ``Server`` (``forward.SERVER_NAME``); relayed ones
#: carry the platform's.
PROXY_SERVER = "trackproxy"
#: Addresses that route like the Internet does (RFC 5737/3849 documentation ranges):
#: a UDP socket "connected" to one tells this host's outbound address; nothing is sent.
_ROUTE_PROBES = ("192.0.2.1", "2001:db8::1")
#: Top-level names reserved for tests and local networks (RFC 6761, 6762, 8375, ICANN's
#: .internal): no public DNS has them, so asking the system's resolvers only waits.
RESERVED_SUFFIXES = ("test", "example", "invalid", "localhost", "local", "home.arpa", "internal")
#: CAA issuer names to suggest, for CAs known under several (ZeroSSL is Sectigo's).
_PREFERRED_ISSUERS = ("letsencrypt.org", "sectigo.com", "pki.goog", "buypass.com", "ssl.com")


@attrs.frozen
class Check:
    """One check's outcome for one domain: ``verdict`` is PASS, FAIL, WARN or SKIP;
    ``hint`` says what to change (set for every FAIL)."""

    domain: str
    name: str
    verdict: str
    detail: str
    hint: str | None = None


# ---------------------------------------------------------------------------
# Pure rules


def listener_address(endpoints: Sequence[str], default_port: int) -> tuple[str, int] | None:
    """Where a local client reaches the first TCP listener of ``endpoints``.

    ``tcp``/``tcp6`` give their port and interface (a wildcard is reached through
    loopback); a ``systemd`` socket's port is not in the config: it is ``default_port``
    (the unit's usual ``ListenStream=``). None when there is only ``unix`` listeners.
    """
    for description in endpoints:
        found = local_address(parse_endpoint(description), default_port)
        if found is not None:
            return found
    return None


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addresses_here(
    resolved: Iterable[str], here: Iterable[str], loopback_is_here: bool = True
) -> tuple[str, ...]:
    """The ``resolved`` addresses that are this host: listed in ``here`` (compared as
    addresses, not text), or loopback when ``loopback_is_here``."""
    mine = {ip for ip in map(_ip, here) if ip is not None}
    found = []
    for address in resolved:
        ip = _ip(address)
        if ip is not None and (ip in mine or (loopback_is_here and ip.is_loopback)):
            found.append(address)
    return tuple(found)


def judge_dns(
    resolution: Resolution, here: Sequence[str], this_host: Sequence[str], guessed: bool = False
) -> Check:
    """The ``dns`` check: at least one address is this host (all of them, for a PASS).

    Args:
        here: the resolved addresses that are this host (:func:`addresses_here`).
        this_host: this host's addresses, to name in the hint.
        guessed: ``this_host`` was found, not given with ``--address``.
    """
    name = resolution.name
    target = ", ".join(this_host) or "its public address"
    point = f"point {name}'s CNAME/A record at this host ({target})"
    if guessed and all((ip := _ip(a)) is None or ip.is_private for a in this_host):
        point += "; behind NAT, give doctor this host's public address with --address"
    path = " → ".join([name] + [f"CNAME {alias}" for alias in resolution.aliases])
    if resolution.problem is not None:
        return Check(name, "dns", FAIL, f"{path}: {resolution.problem}", point)
    shown = f"{path} → {', '.join(resolution.addresses)}"
    elsewhere = [a for a in resolution.addresses if a not in here]
    if not here:
        return Check(name, "dns", FAIL, f"{shown}: not this host ({target})", point)
    if elsewhere:
        return Check(
            name, "dns", WARN,
            f"{shown}: {', '.join(elsewhere)} is not this host; clients that pick it miss the proxy",
            f"remove {name}'s records for {', '.join(elsewhere)}, or {point}",
        )
    return Check(name, "dns", PASS, f"{shown} (this host)")


def reserved_suffix(name: str) -> str | None:
    """The reserved top-level name ``name`` is under (``test`` for ``a.example.test``), if any."""
    for suffix in RESERVED_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return suffix
    return None


def judge_reserved_dns(name: str, suffix: str) -> Check:
    """The ``dns`` check for a name no public DNS can have: a WARN that says why (the
    listener checks still examine this host, so a laptop run is useful)."""
    return Check(
        name, "dns", WARN,
        f"{name}: .{suffix} is reserved for tests and local use, so no public DNS has it; "
        f"clients reach it here only through curl --resolve or /etc/hosts "
        f"(the checks below examine this host's listener)",
    )


def judge_caa_not_needed(domain: Domain) -> Check:
    """The ``caa`` check for a domain whose certificate no CA issues (self-signed, none)."""
    return Check(
        domain.name, "caa", PASS,
        f"certificate: {domain.certificate.source}: no CA is asked, so CAA does not apply",
    )


def caa_issuer_for(identities: frozenset[str]) -> str:
    """The CAA issuer domain name to suggest for a CA known under ``identities``."""
    return next((i for i in _PREFERRED_ISSUERS if i in identities), min(identities))


def judge_caa(name: str, found: CAAFound, server_url: str) -> Check:
    """The ``caa`` check for ``acme.server``'s CA (``preflight`` holds the RFC 8659 rules)."""
    identities = ca_identities(server_url)
    ca = " or ".join(sorted(identities)) if identities else urlsplit(server_url).hostname or server_url
    if found.problem is not None:
        return Check(name, "caa", WARN, f"CAA lookup failed ({found.problem}): cannot judge")
    if found.owner is None:
        may = f" ({ca} may issue)" if identities else ""
        return Check(name, "caa", PASS, f"no CAA restriction found{may}")
    verdict = caa_permits(found.records, identities, found.owner)
    issuers = ", ".join(sorted({r.value.split(";")[0].strip() for r in found.records
                                if r.tag == "issue"}))
    if verdict is None:
        return Check(
            name, "caa", WARN,
            f"CAA at {found.owner} allows {issuers or 'any CA'}; the CA at {ca} is unknown, cannot judge",
            f"make sure the CAA records at {found.owner} name the issuer domain of the CA at {ca}",
        )
    if verdict.outcome == "ok":
        return Check(name, "caa", PASS, f"CAA at {found.owner} permits {ca}")
    issuer = caa_issuer_for(identities) if identities else "your CA's issuer domain"
    return Check(
        name, "caa", FAIL, verdict.detail or "CAA forbids the CA",
        f'add a CAA record `0 issue "{issuer}"` at {found.owner} (and remove any `issue ";"`)',
    )


def classify_tls_error(
    error: BaseException, where: str, domain: Domain, config_path: str
) -> tuple[str, str]:
    """What a failed TLS connection to ``where`` means: ``(detail, hint)``."""
    name = domain.name
    status = "trackproxy status shows the certificate's status and last_error"
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or str(error)
        if domain.certificate.kind == "self-signed":
            hint = (f"certificate: self-signed is for local use: "
                    f"give {name} certificate: acme (or your own files); "
                    f"on your own machine, doctor --trust-self-signed trusts it")
        elif domain.certificate.kind == "acme":
            hint = f"{status}; `trackproxy certs -c {config_path} issue {name}` asks for a new one"
        else:
            hint = f"certificate: files must hold {name}'s full chain from a trusted CA; {status}"
        if "expired" in why:
            hint = f"the certificate has expired: {status}"
        return f"{where}: certificate verify failed: {why}", hint
    if isinstance(error, ssl.SSLError) and "UNRECOGNIZED_NAME" in (error.reason or str(error)).upper():
        return (
            f"{where}: the server has no certificate for {name} (unrecognized_name alert)",
            f"if the proxy there runs {config_path}, `trackproxy reload -c {config_path}`; "
            f"if {name} has certificate: none, give it one; {status}",
        )
    if isinstance(error, ssl.SSLError):
        return (
            f"{where}: TLS handshake failed: {error.reason or error}",
            f"is trackproxy what listens on {where}? {status}",
        )
    return classify_connect_error(error, where, "https")


def classify_connect_error(error: BaseException, where: str, listener: str) -> tuple[str, str]:
    """What a failed TCP connection to ``where`` means: ``(detail, hint)``."""
    if isinstance(error, ConnectionRefusedError):
        return (
            f"{where}: connection refused, nothing listens there",
            f"start trackproxy (systemctl status trackproxy) and check listen.{listener}",
        )
    if isinstance(error, (socket.timeout, TimeoutError)):
        return (
            f"{where}: no answer within {TIMEOUT:g}s",
            f"a firewall or security group must let TCP port {where.rsplit(':', 1)[-1]} in",
        )
    return f"{where}: {error}", f"check that this host can reach {where}"


def judge_certificate(name: str, where: str, peer: Mapping[str, Any], now: datetime.datetime) -> Check:
    """The ``https`` check's PASS: which CA issued the verified certificate, until when."""
    issuer = dict(rdn[0] for rdn in peer.get("issuer", ()))
    who = issuer.get("commonName") or issuer.get("organizationName") or "an unnamed CA"
    if issuer.get("organizationName") and issuer.get("commonName"):
        who = f"{issuer['commonName']} ({issuer['organizationName']})"
    not_after = datetime.datetime.fromtimestamp(
        ssl.cert_time_to_seconds(peer["notAfter"]), datetime.UTC
    )
    left = (not_after - now).days
    return Check(
        name, "https", PASS,
        f"{where}: certificate for {name} issued by {who}, "
        f"valid until {not_after:%Y-%m-%dT%H:%M:%SZ} ({left} days left)",
    )


def classify_probe(
    check: str, domain: Domain, status: int, headers: Mapping[str, str], config_path: str
) -> Check:
    """A probe's answer: a 3xx relayed from the platform is a PASS, anything else a FAIL.

    ``headers`` have lower-case names.
    """
    name, upstream = domain.name, domain.upstream
    server = headers.get("server") or "a server without a Server header"
    detail = f"{status} from {server}"
    if headers.get("location"):
        detail += f", Location: {headers['location']}"
    own = headers.get("server") == PROXY_SERVER
    via = f"upstream {upstream.name} ({upstream.origin})"
    if 300 <= status < 400:
        return Check(name, check, PASS, detail)
    if status == 404 and own:
        return Check(
            name, check, FAIL, f"{detail}: the proxy there does not serve {name}",
            f"is it running {config_path}? `trackproxy reload -c {config_path}` makes it serve {name}",
        )
    if status == 404:
        return Check(
            name, check, FAIL, f"{detail}: {via} does not know this domain's links",
            f"register and verify {name} as a tracking domain with the platform, "
            f"or give {name} the upstream its links come from",
        )
    if status == 502 and own:
        dial = "{}:{}".format(*upstream.dial)
        return Check(
            name, check, FAIL, f"{detail}: {via} is unreachable",
            f"trackproxy's log says why (connect_error, tls_error); check that this host "
            f"reaches {dial} and upstreams.{upstream.name} (url, connect_to, ca_file)",
        )
    if status == 504 and own:
        return Check(
            name, check, FAIL, f"{detail}: {via} did not answer in time",
            f"check that this host reaches {upstream.origin}; limits.upstream_timeout bounds the wait",
        )
    if status == 405 and own:
        return Check(
            name, check, FAIL, f"{detail}: GET is not allowed for {name}",
            f"add GET to {name}'s methods",
        )
    return Check(
        name, check, FAIL, f"{detail}: expected a redirect relayed from {via}",
        f"is {upstream.name} the platform {name}'s links come from?",
    )


def skipped(domain: str, check: str, why: str) -> Check:
    return Check(domain, check, SKIP, why)


def format_report(checks: Sequence[Check], domain_width: int | None = None) -> str:
    """``DOMAIN  CHECK  VERDICT  detail`` lines, a ``hint:`` line under each that has one."""
    width = domain_width or max((len(c.domain) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.domain:<{width}}  {c.name:<5}  {c.verdict:<4}  {c.detail}")
        if c.hint:
            lines.append(f"{'':<{width}}  hint: {c.hint}")
    return "\n".join(lines)


def summary(checks: Sequence[Check]) -> str:
    counts = {v: sum(c.verdict == v for c in checks) for v in (PASS, FAIL, WARN, SKIP)}
    domains = len({c.domain for c in checks})
    return f"{domains} domain(s): " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)


def exit_status(checks: Iterable[Check]) -> int:
    """1 if any check failed, else 0 (a WARN or SKIP does not fail)."""
    return 1 if any(c.verdict == FAIL for c in checks) else 0


# ---------------------------------------------------------------------------
# DNS, through Twisted Names


async def _ask_dns(resolver: IResolver, names: Sequence[str]) -> dict[str, tuple[Resolution, CAAFound]]:
    async def both(name: str) -> tuple[Resolution, CAAFound]:
        return await resolve(resolver, name, TIMEOUT), await find_caa(resolver, name, TIMEOUT)

    results = await gatherResults([ensureDeferred(both(n)) for n in names])
    return dict(zip(names, results))


_T = TypeVar("_T")


class CoreReactor(Protocol):
    """What :func:`run_until_done` uses of a reactor: ``IReactorCore``'s running and stopping."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> Any | None:
        ...

    def run(self) -> None:
        ...

    def stop(self) -> None:
        ...


class DoctorReactor(CoreReactor, NamesReactor, Protocol):
    """What :func:`run_doctor` uses of a reactor: running it, and DNS through Twisted Names."""


def run_until_done(reactor: CoreReactor, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run ``reactor`` until the coroutine ``make()`` finishes; its result.

    Raises:
        KeyboardInterrupt: the reactor was stopped (Ctrl-C) before it finished.
    """
    box: list[_T | Failure] = []

    def start() -> None:
        d: Deferred[_T] = ensureDeferred(make())
        d.addBoth(box.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not box:
        raise KeyboardInterrupt
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


# ---------------------------------------------------------------------------
# This host's addresses


def local_addresses(toward: Iterable[str] = ()) -> tuple[str, ...]:
    """Addresses of this host: its name's, and the ones it would send from to reach
    ``toward`` and the Internet (a UDP ``connect`` only consults the routing table)."""
    found: list[str] = []
    try:
        # An IPv4 or IPv6 address: the text of one (a name resolves to no other family).
        found += [cast(str, info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        pass
    for address in (*toward, *_ROUTE_PROBES):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((address, 9))
                found.append(s.getsockname()[0])
        except OSError:
            pass
    return tuple(dict.fromkeys(a.split("%", 1)[0] for a in found))


def public_looking(addresses: Iterable[str]) -> tuple[str, ...]:
    """The addresses worth naming in a DNS hint: not loopback, not link-local."""
    return tuple(a for a in addresses if (ip := _ip(a)) and not ip.is_loopback and not ip.is_link_local)


# ---------------------------------------------------------------------------
# Sockets


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _tls_context(ca_files: Sequence[str], extra: Sequence[str], verify: bool) -> ssl.SSLContext:
    """``ca_files`` replace the system roots (none given: the system's); ``extra`` are
    trusted as well."""
    context = ssl.create_default_context(cafile=ca_files[0] if ca_files else None)
    for path in (*ca_files[1:], *extra):
        context.load_verify_locations(path)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _connect_tls(address: str, port: int, name: str, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection((address, port), timeout=TIMEOUT)
    try:
        return context.wrap_socket(sock, server_hostname=name)
    except BaseException:
        sock.close()
        raise


def probe(sock: socket.socket, name: str, path: str) -> tuple[int, dict[str, str]]:
    """One ``GET path`` with ``Host: name`` on ``sock`` (then closed): the status and the
    headers, names lower-cased."""
    conn = http.client.HTTPConnection(name)
    conn.sock = sock
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", name)
        conn.putheader("User-Agent", f"trackproxy-doctor/{__version__}")
        conn.putheader("Connection", "close")
        conn.endheaders()
        answer = conn.getresponse()
        answer.read(64 * 1024)
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}
    finally:
        conn.close()


class Doctor:
    """Runs the checks for the domains of one config.

    Args:
        config: the loaded configuration.
        here: this host's addresses (``--address``, else :func:`local_addresses`).
        explicit: ``here`` came from the operator: loopback is then not "here" by itself.
        ca_files: trust these CAs instead of the system roots for the ``https`` check.
        also_trusted: certificates trusted as well (``--trust-self-signed``).
    """

    def __init__(
        self,
        config: Config,
        here: Sequence[str],
        explicit: bool,
        ca_files: Sequence[str] = (),
        also_trusted: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.here = tuple(here)
        self.explicit = explicit
        self.ca_files = tuple(ca_files)
        self.also_trusted = tuple(also_trusted)
        self.https = listener_address(config.listen.https, 443)
        self.http = listener_address(config.listen.http, 80)

    def examine(self, domain: Domain, resolution: Resolution, caa: CAAFound) -> list[Check]:
        name, path = domain.name, domain.upstream.probe_path or DEFAULT_PROBE_PATH
        here = addresses_here(resolution.addresses, self.here, loopback_is_here=not self.explicit)
        shown_here = self.here if self.explicit else public_looking(self.here) or self.here
        suffix = reserved_suffix(name) if not self.config.resolvers else None
        checks = [
            judge_reserved_dns(name, suffix) if suffix
            else judge_dns(resolution, here, shown_here, guessed=not self.explicit),
            judge_caa_not_needed(domain) if domain.certificate.kind in ("self-signed", "none")
            else judge_caa(name, caa, self.config.acme.server),
        ]
        # Where DNS does not point here yet, this host's own listener is examined, so that
        # the proxy can be made ready before the record is changed.
        note = "" if here else " (this host's listener; DNS does not point here)"
        checks += self._https(domain, path, here[0] if here else None, note)
        checks.append(self._http(domain, path, here[0] if here else None, note))
        return checks

    def _https(self, domain: Domain, path: str, address: str | None, note: str) -> list[Check]:
        name = domain.name
        if self.https is None:
            why = "no tcp or systemd listener in listen.https"
            return [skipped(name, "https", why), skipped(name, "probe", why)]
        target = (address or self.https[0], self.https[1])
        where = _where(*target) + note
        unverified = ""
        try:
            sock = _connect_tls(*target, name, _tls_context(self.ca_files, self.also_trusted, verify=True))
            now = datetime.datetime.now(datetime.UTC)
            checks = [judge_certificate(name, where, sock.getpeercert() or {}, now)]
        except (OSError, ssl.SSLError) as e:
            detail, hint = classify_tls_error(e, where, domain, self.config.path)
            checks = [Check(name, "https", FAIL, detail, hint)]
            if not isinstance(e, ssl.SSLCertVerificationError):
                return checks + [skipped(name, "probe", "needs a TLS connection (see https)")]
            # The relay can still be examined: the certificate has had its verdict.
            try:
                sock = _connect_tls(*target, name, _tls_context((), (), verify=False))
            except (OSError, ssl.SSLError) as again:
                detail, hint = classify_tls_error(again, where, domain, self.config.path)
                return checks + [Check(name, "probe", FAIL, detail, hint)]
            unverified = " (over TLS not verified, see https)"
        return checks + [self._probe("probe", domain, path, sock, where, unverified)]

    def _http(self, domain: Domain, path: str, address: str | None, note: str) -> Check:
        if self.http is None:
            return skipped(domain.name, "http", "no tcp or systemd listener in listen.http")
        target = (address or self.http[0], self.http[1])
        where = _where(*target) + note
        try:
            sock = socket.create_connection(target, timeout=TIMEOUT)
        except OSError as e:
            return Check(domain.name, "http", FAIL, *classify_connect_error(e, where, "http"))
        return self._probe("http", domain, path, sock, where, "")

    def _probe(
        self, check: str, domain: Domain, path: str, sock: socket.socket, where: str, note: str
    ) -> Check:
        # Longer than the proxy's own deadline, so that its 504 is what is seen.
        sock.settimeout(self.config.limits.upstream_timeout + TIMEOUT)
        try:
            status, headers = probe(sock, domain.name, path)
        except (OSError, http.client.HTTPException) as e:
            return Check(
                domain.name, check, FAIL, f"{where}: GET {path}: no answer: {e or type(e).__name__}",
                "trackproxy's log shows what happened to the request; limits.upstream_timeout bounds it",
            )
        verdict = classify_probe(check, domain, status, headers, self.config.path)
        return attrs.evolve(verdict, detail=f"GET {path}: {verdict.detail}{note}")


def self_signed_certificates(config: Config) -> tuple[str, ...]:
    """The certificate files of this config's ``self-signed`` domains that exist."""
    from proxy.certs import certificate_files

    found = []
    for domain in config.domains.values():
        if domain.certificate.kind == "self-signed":
            files = certificate_files(config, domain)
            if files is not None and os.path.isfile(files[0]):
                found.append(files[0])
    return tuple(found)


def run_doctor(
    config: Config,
    names: Sequence[str],
    reactor: DoctorReactor,
    addresses: Sequence[str] = (),
    ca_files: Sequence[str] = (),
    trust_self_signed: bool = False,
    out: IO[str] = sys.stdout,
    preamble: str | None = None,
) -> int:
    """``trackproxy doctor``: examine ``names`` (default: every domain); the exit status.

    0 when nothing failed, 1 when a check failed, 2 for a usage error (a name that is not
    configured, an ``--address`` that is not an IP address). ``preamble`` is printed
    first (what the CLI found on the admin listener).
    """
    chosen = []
    for raw in names or sorted(config.domains):
        try:
            name = normalise_domain(raw)
        except ValueError:
            name = raw
        if name not in config.domains:
            print(f"trackproxy: {raw} is not a domain of {config.path}", file=sys.stderr)
            return 2
        chosen.append(name)
    bad = [a for a in addresses if _ip(a) is None]
    if bad:
        print(f"trackproxy: --address wants an IP address, not {bad[0]!r}", file=sys.stderr)
        return 2
    if not chosen:
        print(f"{config.path}: no domains")
        return 0

    if preamble:
        print(preamble, file=out, flush=True)
    # Reserved names (a laptop's .test domains) are not asked of the system's resolvers:
    # no public DNS has them, and offline every query would wait for its timeout.
    asked = [n for n in chosen if config.resolvers or reserved_suffix(n) is None]
    resolver = resolver_for(config.resolvers, reactor)
    try:
        facts = run_until_done(reactor, lambda: _ask_dns(resolver, asked)) if asked else {}
    except KeyboardInterrupt:
        return 130
    for name in chosen:
        facts.setdefault(name, (Resolution(name, problem="reserved name"), CAAFound()))
    resolved = [a for resolution, _ in facts.values() for a in resolution.addresses]
    here = tuple(addresses) or local_addresses(resolved)
    trusted = self_signed_certificates(config) if trust_self_signed else ()
    doctor = Doctor(config, here, bool(addresses), ca_files, trusted)
    width = max(len(n) for n in chosen)
    every: list[Check] = []
    for name in chosen:
        checks = doctor.examine(config.domains[name], *facts[name])
        every += checks
        print(format_report(checks, width), file=out, flush=True)
    print(summary(every), file=out)
    return exit_status(every)
