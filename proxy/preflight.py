"""Pre-flight DNS checks: what DNS says about a domain before an ACME CA is asked.

This module owns the DNS facts that decide whether a certificate request could succeed at
all, so that no CA rate limit is spent on one that cannot: the name is one a public CA
certifies (two labels or more, no IP literal, no wildcard), it resolves (A or AAAA), and
its CAA records (RFC 8659) permit the configured CA. The answer is a :class:`Verdict`.
The lookups behind it (:func:`resolve`, through CNAMEs; :func:`find_caa`, climbing the
tree) live here once: ``doctor`` asks the same questions and reports the answers.

It leaves every decision to its callers (``certs``, ``doctor``): which status a verdict
maps to, when to check again, how to back off. A lookup that fails (timeout, SERVFAIL,
refused) is never a verdict (README "Certificates"): only an answer that forbids counts. The resolver,
and through it the reactor, is handed in; nothing here touches the global reactor.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IConnector, IDelayedCall, IListeningPort, IResolver
from twisted.names import client, dns
from twisted.names.error import DNSNameError, DNSQueryTimeoutError, DNSServerError
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.protocol import ClientFactory, DatagramProtocol, P

    #: What a lookup fires with: answers, authority and additional records. (IResolver
    #: declares three RRHeaders; Twisted Names delivers three lists of them.)
    _Answers: TypeAlias = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]

    # Payloads as Twisted Names documents them (its classes default the attributes to None).
    class _CNAMEPayload(Protocol):
        name: dns.Name  # the alias's target

    class _AddressPayload(Protocol):
        address: bytes  # Record_A, Record_AAAA: packed, network order

OK, UNRESOLVABLE, CAA_FORBIDS, INELIGIBLE = "ok", "unresolvable", "caa_forbids", "ineligible"
#: RFC 8659 §4: Twisted Names has no record class for it, so it arrives as UnknownRecord.
CAA = 257
_ISSUER_CRITICAL = 0x80
#: Property tags of RFC 8659; any other tag flagged critical forbids issuance (§4.1).
KNOWN_TAGS = frozenset({"issue", "issuewild", "iodef"})
#: ACME server host (or its parent) -> the issuer domain names the CA recognises in CAA,
#: as its directory's ``meta.caaIdentities`` (RFC 8555 §7.1.1) lists them.
_CA_IDENTITIES: tuple[tuple[str, frozenset[str]], ...] = (
    ("letsencrypt.org", frozenset({"letsencrypt.org"})),  # production and staging
    ("zerossl.com", frozenset({  # issues through Sectigo's CA; zerossl.com is none of them
        "sectigo.com", "comodoca.com", "comodo.com", "usertrust.com",
        "trust-provider.com", "entrust.net", "affirmtrust.com",
    })),
    ("pki.goog", frozenset({"pki.goog"})),  # Google Trust Services, dv.acme-v02.(test-)api
    ("buypass.com", frozenset({"buypass.com", "buypass.no"})),
    ("buypass.no", frozenset({"buypass.com", "buypass.no"})),  # its test server
    ("ssl.com", frozenset({"ssl.com"})),
)


@attrs.frozen
class Verdict:
    """What DNS says about a domain: ``outcome`` is one of ``ok``, ``unresolvable``,
    ``caa_forbids``, ``ineligible``; ``detail`` is one human line, or None for ``ok``."""

    outcome: str
    detail: str | None = None


@attrs.frozen
class CAARecord:
    """One CAA resource record (RFC 8659 §4.1)."""

    flags: int
    tag: str
    value: str


def ca_identities(server_url: str) -> frozenset[str]:
    """The CAA issuer domain names of a well-known ACME directory URL.

    Returns:
        The names, or an empty set for an unknown server (pebble, a private CA): its CAA
        identity is unknown, so CAA cannot be judged for it.
    """
    host = (urlsplit(server_url).hostname or "").rstrip(".")
    for suffix, names in _CA_IDENTITIES:
        if host == suffix or host.endswith("." + suffix):
            return names
    return frozenset()


def parse_caa(data: bytes) -> CAARecord:
    """A CAA record from its RDATA: flags (1 byte), tag length (1), tag, value.

    Raises:
        ValueError: ``data`` is not a CAA record.
    """
    if len(data) < 2:
        raise ValueError(f"CAA record of {len(data)} bytes is too short")
    flags, tag_length = struct.unpack("!BB", data[:2])
    tag = data[2 : 2 + tag_length]
    if not tag_length or len(tag) != tag_length or not tag.isalnum():
        raise ValueError(f"CAA record has no valid tag: {data[:2 + tag_length]!r}")
    try:
        value = data[2 + tag_length :].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"CAA value is not text: {e}") from None
    return CAARecord(flags, tag.decode("ascii").lower(), value)


def caa_permits(
    records: Sequence[CAARecord], identities: frozenset[str], owner: str | None = None
) -> Verdict | None:
    """Whether a relevant CAA RRset lets one of ``identities`` issue a non-wildcard name.

    Args:
        records: The RRset found by climbing the tree (RFC 8659 §3).
        identities: The CA's issuer domain names (:func:`ca_identities`).
        owner: Where the RRset was found, to name it in the detail.

    Returns:
        ``ok`` or ``caa_forbids``. For an unknown CA (``identities`` empty) only a set
        that forbids every CA is a verdict; otherwise None (no verdict).
    """
    where = f"CAA at {owner}" if owner else "CAA"
    for record in records:
        if record.flags & _ISSUER_CRITICAL and record.tag not in KNOWN_TAGS:
            detail = f"{where} has an unknown critical tag {record.tag!r}, which forbids every CA"
            return Verdict(CAA_FORBIDS, detail)
    # issuewild governs wildcard names only (§4.3); this proxy never asks for one.
    issuers = [r.value.partition(";")[0].strip().lower() for r in records if r.tag == "issue"]
    named = sorted({issuer for issuer in issuers if issuer})
    if issuers and not named:
        ca = " or ".join(sorted(identities)) or "this CA"
        return Verdict(CAA_FORBIDS, f'{where} forbids every CA (issue ";"), so {ca} too')
    if not identities:
        return None
    if not issuers or any(issuer in identities for issuer in issuers):
        return Verdict(OK)
    ca = " or ".join(sorted(identities))
    return Verdict(CAA_FORBIDS, f"{where} allows only {', '.join(named)}, not {ca}")


def eligibility(name: str) -> Verdict:
    """Whether ``name`` is a DNS name a public CA certifies: ``ok`` or ``ineligible``."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        pass
    else:
        return Verdict(INELIGIBLE, f"{name} is an IP address, not a DNS name")
    labels = name.rstrip(".").split(".")
    if "*" in name:
        return Verdict(INELIGIBLE, f"{name} is a wildcard; HTTP-01 cannot validate one")
    if len(labels) < 2:
        return Verdict(INELIGIBLE, f"{name} is a single label, not a public DNS name")
    if not all(_is_ldh_label(label) for label in labels) or labels[-1].isdigit():
        return Verdict(INELIGIBLE, f"{name} is not a valid DNS name")
    return Verdict(OK)


def _is_ldh_label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label.isascii()
        and label.replace("-", "").isalnum()
        and not label.startswith("-")
        and not label.endswith("-")
    )


class NamesReactor(Protocol):
    """What Twisted Names' client resolver uses of a reactor: ``IReactorUDP``,
    ``IReactorTCP`` (truncated answers) and ``IReactorTime`` (timeouts)."""

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str, maxPacketSize: int) -> IListeningPort:
        ...

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory[P],
        timeout: float = 30.0,
        bindAddress: tuple[str, int] | None = None,
    ) -> IConnector:
        ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> IDelayedCall:
        ...


def resolver_for(resolvers: Sequence[tuple[str, int]], reactor: NamesReactor) -> IResolver:
    """A resolver asking ``resolvers`` (``Config.resolvers``), or the system's if empty.

    ``reactor`` provides ``IReactorUDP``, ``IReactorTCP`` (truncated answers) and
    ``IReactorTime`` (timeouts).

    The system's are the ``nameserver`` lines of ``/etc/resolv.conf``, re-read when the
    file changes (Twisted checks once a minute, so make one resolver and keep it).
    ``/etc/hosts`` is deliberately not consulted: the CA sees public DNS only.
    """
    if resolvers:
        return client.Resolver(servers=list(resolvers), reactor=reactor)
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)


class Preflight:
    """Checks a domain before a certificate is requested for it."""

    def __init__(self, resolver: IResolver, timeout: float = 5.0) -> None:
        self._resolver = resolver
        # Twisted Names takes a sequence of retry timeouts; one try bounds each query.
        self._timeout = (timeout,)

    def check(self, name: str, server_url: str) -> Deferred[Verdict]:
        """The first of ``ineligible``, ``unresolvable``, ``caa_forbids``; else ``ok``.

        Never fails: a lookup that fails is not a verdict, and checking goes on.
        """
        return ensureDeferred(self._check(name.lower().rstrip("."), server_url))

    async def _check(self, name: str, server_url: str) -> Verdict:
        verdict: Verdict | None
        verdict = eligibility(name)
        if verdict.outcome == OK:
            verdict = await self._addresses(name) or await self._caa(name, server_url)
        return verdict or Verdict(OK)

    async def _addresses(self, name: str) -> Verdict | None:
        resolution = await resolve(self._resolver, name, self._timeout[0])
        if resolution.addresses or resolution.lookup_failed:
            return None
        subject = f"{name} is a CNAME to {resolution.aliases[-1]}, which" if resolution.aliases else name
        return Verdict(UNRESOLVABLE, f"{subject} {resolution.problem}")

    async def _caa(self, name: str, server_url: str) -> Verdict | None:
        # An unknown CA is looked up too: a set that forbids every CA forbids it.
        found = await find_caa(self._resolver, name, self._timeout[0])
        if found.owner is None:
            return None  # no CAA anywhere (any CA may issue), or the lookup failed
        return caa_permits(found.records, ca_identities(server_url), found.owner)


# ---------------------------------------------------------------------------
# Lookups (``doctor`` asks the same questions and reports the answers)

#: CNAMEs followed before a name counts as unresolvable.
MAX_CNAME_HOPS = 8


@attrs.frozen
class Resolution:
    """What DNS says a name's addresses are; ``problem`` says why there are none."""

    name: str
    aliases: tuple[str, ...] = ()  # the CNAME chain's targets, in order
    addresses: tuple[str, ...] = ()
    problem: str | None = None
    #: The problem is a lookup that failed (timeout, SERVFAIL): no verdict.
    lookup_failed: bool = False


@attrs.frozen
class CAAFound:
    """The relevant CAA RRset (RFC 8659 §3): where it is, or ``owner`` None if none exists."""

    owner: str | None = None
    records: tuple[CAARecord, ...] = ()
    problem: str | None = None  # the lookup failed: no verdict


async def resolve(resolver: IResolver, name: str, timeout: float) -> Resolution:
    """``name``'s addresses, following CNAMEs (asking again for a target left unresolved)."""
    aliases: list[str] = []
    owner = name
    for _ in range(MAX_CNAME_HOPS):
        # Twisted annotates timeouts as whole seconds; its resolver takes any number.
        results = await DeferredList(
            [cast("Deferred[_Answers]", resolver.lookupAddress(owner, timeout=(timeout,))),  # type: ignore[arg-type]
             cast("Deferred[_Answers]", resolver.lookupIPV6Address(owner, timeout=(timeout,)))],  # type: ignore[arg-type]
            consumeErrors=True,
        )
        answers: list[dns.RRHeader] = []
        missing: list[Failure] = []
        failed: list[Failure] = []
        for succeeded, result in results:
            if succeeded:
                answers.extend(result[0])
            elif (failure := cast(Failure, result)).check(DNSNameError):
                missing.append(failure)
                answers.extend(_answers_of(failure))
            else:
                failed.append(failure)
        chain = {rr.name.name.decode().lower(): cast("_CNAMEPayload", rr.payload).name.name.decode().lower()
                 for rr in answers if rr.type == dns.CNAME}
        followed = len(aliases)
        while owner in chain and chain[owner] != name and chain[owner] not in aliases:
            owner = chain[owner]
            aliases.append(owner)
        addresses = tuple(
            socket.inet_ntop(socket.AF_INET if rr.type == dns.A else socket.AF_INET6,
                             cast("_AddressPayload", rr.payload).address)
            for rr in answers if rr.type in (dns.A, dns.AAAA)
        )
        if addresses:
            return Resolution(name, tuple(aliases), addresses)
        if failed:
            return Resolution(name, tuple(aliases), problem=f"lookup failed: {describe_failure(failed[0])}",
                              lookup_failed=True)
        if missing:
            return Resolution(name, tuple(aliases), problem="does not exist in DNS (NXDOMAIN)")
        if len(aliases) == followed:
            return Resolution(name, tuple(aliases), problem="has no A or AAAA record")
        # A CNAME without its target's addresses: ask for the target.
    return Resolution(name, tuple(aliases), problem="CNAME chain too long")


async def find_caa(resolver: IResolver, name: str, timeout: float) -> CAAFound:
    """The relevant CAA RRset: climbing from ``name`` towards the root, the root excluded,
    the first RRset found counts (RFC 8659 §3). Through a CNAME the RRset is the
    target's, and ``owner`` says where it really is."""
    labels = name.split(".")
    for owner in (".".join(labels[i:]) for i in range(len(labels))):
        try:
            answers, _, _ = await cast(
                "Deferred[_Answers]", resolver.query(dns.Query(owner, CAA, dns.IN), timeout=(timeout,))  # type: ignore[arg-type]
            )
        except DNSNameError:
            continue
        except Exception as e:
            return CAAFound(problem=describe_failure(Failure(e)))
        found = [rr for rr in answers if rr.type == CAA]
        if found:
            records = []
            for rr in found:
                try:
                    records.append(parse_caa(cast(dns.UnknownRecord, rr.payload).data))
                except ValueError:
                    pass  # a malformed record forbids nothing (it is no answer)
            return CAAFound(found[0].name.name.decode("ascii", "replace").lower(), tuple(records))
    return CAAFound()


def describe_failure(failure: Failure) -> str:
    """A failed lookup in a few words."""
    if failure.check(DNSQueryTimeoutError):
        return "the resolvers did not answer in time"
    if failure.check(DNSServerError):
        return "the resolver answered SERVFAIL"
    # A Failure always has its exception's type and value (its constructor sets them).
    return failure.getErrorMessage() or cast("type[BaseException]", failure.type).__name__


def _answers_of(failure: Failure) -> list[dns.RRHeader]:
    """The answer section an NXDOMAIN response came with (a CNAME to a missing name)."""
    error = cast(BaseException, failure.value)
    message = error.args[0] if error.args else None
    return list(message.answers) if isinstance(message, dns.Message) else []
