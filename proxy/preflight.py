"""Pre-flight DNS checks: what DNS says about a domain before an ACME CA is asked.

This module owns the DNS facts that decide whether a certificate request could succeed at
all, so that no CA rate limit is spent on one that cannot: the name is one a public CA
certifies (two labels or more, no IP literal, no wildcard), it resolves (A or AAAA), and
its CAA records (RFC 8659) permit the configured CA. The answer is a :class:`Verdict`.

It leaves every decision to its callers (``certs``, ``doctor``): which status a verdict
maps to, when to check again, how to back off. A lookup that fails (timeout, SERVFAIL,
refused) is never a verdict (README "Certificates"): only an answer that forbids counts. The resolver,
and through it the reactor, is handed in; nothing here touches the global reactor.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IReactorUDP, IResolver
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

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


def resolver_for(resolvers: Sequence[tuple[str, int]], reactor: IReactorUDP) -> IResolver:
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
        verdict = eligibility(name)
        if verdict.outcome == OK:
            verdict = await self._addresses(name) or await self._caa(name, server_url)
        return verdict or Verdict(OK)

    async def _addresses(self, name: str) -> Verdict | None:
        results = await DeferredList(
            [
                self._resolver.lookupAddress(name, timeout=self._timeout),
                self._resolver.lookupIPV6Address(name, timeout=self._timeout),
            ],
            consumeErrors=True,
        )
        answers: list[dns.RRHeader] = []
        for succeeded, result in results:
            if succeeded:
                answers.extend(result[0])
            elif result.check(DNSNameError):
                answers.extend(_answers_of(result))
            else:
                return None
        if any(rr.type in (dns.A, dns.AAAA) for rr in answers):
            return None
        alias = _cname_target(name, answers)
        subject = f"{name} is a CNAME to {alias}, which" if alias else name
        if all(succeeded for succeeded, _ in results):
            return Verdict(UNRESOLVABLE, f"{subject} has no A or AAAA record")
        if not any(succeeded for succeeded, _ in results):
            return Verdict(UNRESOLVABLE, f"{subject} does not exist in DNS (NXDOMAIN)")
        return None

    async def _caa(self, name: str, server_url: str) -> Verdict | None:
        # An unknown CA is looked up too: a set that forbids every CA forbids it.
        identities = ca_identities(server_url)
        labels = name.split(".")
        # RFC 8659 §3: climb towards the root, excluding it; the first RRset found counts.
        for owner in (".".join(labels[i:]) for i in range(len(labels))):
            query = dns.Query(owner, CAA, dns.IN)
            try:
                answers, _, _ = await self._resolver.query(query, timeout=self._timeout)
            except DNSNameError:
                continue
            except Exception:
                return None
            found = [rr for rr in answers if rr.type == CAA]
            if found:
                # Through a CNAME the RRset is the target's: name where it really is.
                where = found[0].name.name.decode("ascii", "replace")
                return caa_permits(_parse_all([rr.payload for rr in found]), identities, where)
        return None


def _parse_all(payloads: Sequence[dns.UnknownRecord]) -> list[CAARecord]:
    """The records that parse: a malformed one forbids nothing (it is no answer)."""
    records = []
    for payload in payloads:
        try:
            records.append(parse_caa(payload.data))
        except ValueError:
            pass
    return records


def _answers_of(reason: Failure) -> list[dns.RRHeader]:
    """The answer section an NXDOMAIN response came with (a CNAME to a missing name)."""
    message = reason.value.args[0] if reason.value.args else None
    return list(message.answers) if isinstance(message, dns.Message) else []


def _cname_target(name: str, answers: Sequence[dns.RRHeader]) -> str | None:
    """Where ``name``'s CNAME chain in ``answers`` ends, or None if it has none."""
    aliases = {rr.name.name.decode().lower(): rr.payload.name.name.decode().lower()
               for rr in answers if rr.type == dns.CNAME}
    target, seen = name, set()
    while target in aliases and target not in seen:
        seen.add(target)
        target = aliases[target]
    return None if target == name else target
