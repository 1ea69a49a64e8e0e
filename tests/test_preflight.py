"""Pre-flight DNS checks: the pure rules, then the real client against a loopback DNS server.

The loopback tests run a Twisted Names authoritative server (:class:`Zone`) on a free UDP
port of 127.0.0.1 and point :func:`resolver_for` at it, so every answer, CAA records
included, really crosses the wire and is decoded by the client as the proxy will meet it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.names import common, dns, error, server

from proxy.preflight import (
    CAA,
    CAARecord,
    Preflight,
    Verdict,
    ca_identities,
    caa_permits,
    eligibility,
    parse_caa,
    resolver_for,
)

LE = "https://acme-v02.api.letsencrypt.org/directory"
PEBBLE = "https://localhost:14000/dir"
OK = Verdict("ok")


def caa_data(tag: str, value: str, flags: int = 0) -> bytes:
    return struct.pack("!BB", flags, len(tag)) + tag.encode() + value.encode()


def forbids(where: str, detail: str) -> Verdict:
    return Verdict("caa_forbids", f"CAA at {where} {detail}")


def unresolvable(detail: str) -> Verdict:
    return Verdict("unresolvable", detail)


# ---------------------------------------------------------------------------
# Pure rules


@pytest.mark.parametrize(
    "data, record",
    [
        (caa_data("issue", "letsencrypt.org"), CAARecord(0, "issue", "letsencrypt.org")),
        (caa_data("issue", ";"), CAARecord(0, "issue", ";")),
        (caa_data("issue", ""), CAARecord(0, "issue", "")),
        (caa_data("ISSUE", "pki.goog", 128), CAARecord(128, "issue", "pki.goog")),
        (caa_data("iodef", "mailto:a@b.example"), CAARecord(0, "iodef", "mailto:a@b.example")),
    ],
)
def test_parse_caa_reads_the_wire_format(data: bytes, record: CAARecord) -> None:
    assert parse_caa(data) == record


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00issue", b"\x00\x09issue", b"\x00\x05is-uepki.goog",
     b"\x00\x05issue\xff\xfe"],
    ids=["empty", "no-tag-length", "zero-tag-length", "tag-past-end", "tag-not-alnum",
         "value-not-utf8"],
)
def test_parse_caa_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_caa(data)


def rec(value: str, tag: str = "issue", flags: int = 0) -> CAARecord:
    return CAARecord(flags, tag, value)


ONLY_SECTIGO = forbids("example.com", "allows only sectigo.com, not letsencrypt.org")
NO_CA = forbids("example.com", 'forbids every CA (issue ";"), so letsencrypt.org too')


@pytest.mark.parametrize(
    "records, verdict",
    [
        ([rec("letsencrypt.org")], OK),
        ([rec("sectigo.com"), rec("letsencrypt.org")], OK),
        ([rec("LetsEncrypt.ORG")], OK),
        ([rec(" letsencrypt.org ; validationmethods=http-01")], OK),
        ([rec("sectigo.com")], ONLY_SECTIGO),
        ([rec("sectigo.com; letsencrypt.org")], ONLY_SECTIGO),
        ([rec(";")], NO_CA),
        ([rec("letsencrypt.org", tag="issuewild")], OK),
        ([rec(";", tag="issuewild"), rec("sectigo.com")], ONLY_SECTIGO),
        ([rec("mailto:a@b.example", tag="iodef")], OK),
        ([rec("x", tag="iodef", flags=128), rec("letsencrypt.org")], OK),
        ([rec("x", tag="tbs", flags=128), rec("letsencrypt.org")],
         forbids("example.com", "has an unknown critical tag 'tbs', which forbids every CA")),
        ([rec("x", tag="tbs")], OK),
        ([], OK),
    ],
    ids=["allowed", "one-of-several", "case", "params", "other-ca", "params-not-issuers",
         "empty-issuer", "issuewild-only", "issuewild-ignored", "iodef-only", "critical-known",
         "critical-unknown", "unknown-not-critical", "empty-rrset"],
)
def test_caa_permits_follows_rfc_8659(records: list[CAARecord], verdict: Verdict) -> None:
    assert caa_permits(records, frozenset({"letsencrypt.org"}), "example.com") == verdict


def test_caa_permits_judges_an_unknown_ca_only_when_every_ca_is_forbidden() -> None:
    assert caa_permits([rec("letsencrypt.org")], frozenset(), "example.com") is None
    assert caa_permits([], frozenset(), "example.com") is None
    forbids = caa_permits([rec(";")], frozenset(), "example.com")
    assert forbids is not None and forbids.outcome == "caa_forbids"
    assert "forbids every CA" in forbids.detail


@pytest.mark.parametrize(
    "name, eligible",
    [("track.example.com", True), ("xn--bcher-kva.example", True), ("a-b.c0.example.co.uk", True),
     ("192.0.2.1", False), ("2001:db8::1", False), ("[2001:db8::1]", False), ("localhost", False),
     ("com", False), ("*.example.com", False), ("track..example.com", False),
     ("-track.example.com", False), ("track_1.example.com", False), ("1.2.3", False),
     ("träck.example.com", False), ("a" * 64 + ".example.com", False)],
)
def test_eligibility_wants_a_public_dns_name(name: str, eligible: bool) -> None:
    verdict = eligibility(name)
    assert verdict.outcome == ("ok" if eligible else "ineligible")
    assert (verdict.detail is None) == eligible


@pytest.mark.parametrize(
    "url, names",
    [
        (LE, {"letsencrypt.org"}),
        ("https://acme-staging-v02.api.letsencrypt.org/directory", {"letsencrypt.org"}),
        ("https://dv.acme-v02.api.pki.goog/directory", {"pki.goog"}),
        ("https://dv.acme-v02.test-api.pki.goog/directory", {"pki.goog"}),
        ("https://api.buypass.com/acme/directory", {"buypass.com", "buypass.no"}),
        ("https://acme.ssl.com/sslcom-dv-ecc", {"ssl.com"}),
        (PEBBLE, set()),
        ("https://acme.notletsencrypt.org/directory", set()),
        ("", set()),
    ],
)
def test_ca_identities_of_known_acme_servers(url: str, names: set[str]) -> None:
    assert ca_identities(url) == names


def test_ca_identities_of_zerossl_are_sectigos() -> None:
    names = ca_identities("https://acme.zerossl.com/v2/DV90")
    assert "sectigo.com" in names and "zerossl.com" not in names


# ---------------------------------------------------------------------------
# An in-process resolver, for what a real server cannot be made to send


class StubResolver(common.ResolverBase):
    """Answers from a table of (name, type) -> result or exception; records lookups."""

    def __init__(self, table: dict[tuple[str, int], Any]) -> None:
        super().__init__()
        self.table = table
        self.asked: list[tuple[str, int]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        key = (name.decode(), type)
        self.asked.append(key)
        result = self.table.get(key, ([], [], []))
        return defer.fail(result) if isinstance(result, Exception) else defer.succeed(result)


def at_once(d: defer.Deferred[Verdict]) -> Verdict:
    """The verdict of a check the stub resolver let finish synchronously."""
    results: list[Verdict] = []
    d.addCallback(results.append)
    assert results, "the check did not finish"
    return results[0]


def test_nxdomain_through_a_cname_names_the_missing_target() -> None:
    message = dns.Message(rCode=dns.ENAME)
    cname = dns.Record_CNAME("gone.example.net")
    message.answers = [dns.RRHeader("t.example.com", dns.CNAME, payload=cname)]
    nx = error.DNSNameError(message)
    stub = StubResolver({("t.example.com", dns.A): nx, ("t.example.com", dns.AAAA): nx})
    assert at_once(Preflight(stub).check("t.example.com", LE)) == unresolvable(
        "t.example.com is a CNAME to gone.example.net, which does not exist in DNS (NXDOMAIN)"
    )


def test_ineligible_names_cost_no_lookup_and_names_are_normalised() -> None:
    a = dns.RRHeader("t.example.com", dns.A, payload=dns.Record_A("192.0.2.1"))
    stub = StubResolver({("t.example.com", dns.A): ([a], [], [])})
    assert at_once(Preflight(stub).check("*.example.com", LE)).outcome == "ineligible"
    assert stub.asked == []
    assert at_once(Preflight(stub).check("T.Example.COM.", PEBBLE)) == OK
    # An unknown CA's CAA is still climbed: issue ";" would forbid it too.
    assert stub.asked == [
        ("t.example.com", dns.A), ("t.example.com", dns.AAAA),
        ("t.example.com", 257), ("example.com", 257), ("com", 257),
    ]


# ---------------------------------------------------------------------------
# The real client against a real server on loopback


def caa(tag: str, value: str) -> dns.UnknownRecord:
    return dns.UnknownRecord(caa_data(tag, value))


#: name -> records; names not listed are NXDOMAIN.
ZONE: dict[str, list[Any]] = {
    "plain.example.com": [dns.Record_A("192.0.2.1")],
    "v6.example.com": [dns.Record_AAAA("2001:db8::1")],
    "txt.example.com": [dns.Record_TXT(b"v=spf1 -all")],
    "alias.example.com": [dns.Record_CNAME("gone.example.net")],
    "broken.example": [],
    "allowed.example": [caa("issue", "LetsEncrypt.org; validationmethods=http-01")],
    "track.allowed.example": [dns.Record_A("192.0.2.2")],
    "other.example": [caa("issue", "sectigo.com"), caa("issuewild", "letsencrypt.org")],
    "track.other.example": [dns.Record_A("192.0.2.3")],
    "deep.gap.other.example": [dns.Record_A("192.0.2.4")],
    "closest.other.example": [dns.Record_A("192.0.2.5"), caa("issue", "letsencrypt.org")],
    "flaky.other.example": [dns.Record_A("192.0.2.6")],
    "cdn.example.com": [dns.Record_CNAME("edge.other.example")],
    "edge.other.example": [dns.Record_A("192.0.2.7"), caa("issue", "buypass.com")],
}
SERVFAIL = {("flaky.other.example", CAA), ("broken.example", dns.A), ("broken.example", dns.AAAA)}


def type_of(payload: Any) -> int:
    return CAA if isinstance(payload, dns.UnknownRecord) else payload.TYPE


class Zone(common.ResolverBase):
    """Authority for :data:`ZONE`; CAA goes out as an opaque record of type 257."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        owner = name.decode().lower()
        if (owner, type) in SERVFAIL:
            # Twisted's server answers NXDOMAIN for any DomainError, SERVFAIL for the rest.
            return defer.fail(RuntimeError("SERVFAIL on purpose"))
        if owner not in ZONE:
            return defer.fail(error.DomainError(owner))
        answers = self._records(owner, type)
        cnames = self._records(owner, dns.CNAME)
        if cnames and not answers:
            # As a recursive resolver would: the CNAME, then its target's records.
            answers = cnames + self._records(cnames[0].payload.name.name.decode(), type)
        return defer.succeed((answers, [], []))

    def _records(self, owner: str, type: int) -> list[dns.RRHeader]:
        return [
            dns.RRHeader(owner, type, payload=payload, auth=True)
            for payload in ZONE.get(owner, [])
            if type_of(payload) == type
        ]


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def zone_server(reactor: Any) -> Iterator[tuple[str, int]]:
    protocol = dns.DNSDatagramProtocol(server.DNSServerFactory(authorities=[Zone()]))
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    yield ("127.0.0.1", port.getHost().port)
    port.stopListening()


SECTIGO_NOT_LE = "allows only sectigo.com, not letsencrypt.org"


@pytest.mark.parametrize(
    "name, verdict",
    [
        ("plain.example.com", OK),
        ("v6.example.com", OK),
        ("track.allowed.example", OK),
        ("closest.other.example", OK),
        ("flaky.other.example", OK),
        ("broken.example", OK),
        ("track.other.example", forbids("other.example", SECTIGO_NOT_LE)),
        ("deep.gap.other.example", forbids("other.example", SECTIGO_NOT_LE)),
        ("cdn.example.com",
         forbids("edge.other.example", "allows only buypass.com, not letsencrypt.org")),
        ("missing.example.com",
         unresolvable("missing.example.com does not exist in DNS (NXDOMAIN)")),
        ("txt.example.com", unresolvable("txt.example.com has no A or AAAA record")),
        # The server answers with the CNAME alone; the target is asked for, and is not there.
        ("alias.example.com", unresolvable(
            "alias.example.com is a CNAME to gone.example.net, which does not exist in DNS (NXDOMAIN)")),
        ("192.0.2.1", Verdict("ineligible", "192.0.2.1 is an IP address, not a DNS name")),
    ],
    ids=["no-caa", "aaaa-only", "caa-at-parent-allows", "closest-rrset-wins",
         "caa-servfail-no-verdict", "address-servfail-no-verdict", "caa-at-parent-forbids",
         "climbs-past-nxdomain", "caa-at-cname-target", "nxdomain", "no-address",
         "cname-to-nothing", "ip-literal"],
)
@pytest_twisted.ensureDeferred
async def test_check_against_a_loopback_dns_server(
    reactor: Any, zone_server: tuple[str, int], name: str, verdict: Verdict
) -> None:
    preflight = Preflight(resolver_for([zone_server], reactor), timeout=2.0)
    assert await preflight.check(name, LE).addTimeout(10, reactor) == verdict


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_is_no_verdict_and_no_hang(reactor: Any) -> None:
    silent = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    resolver = resolver_for([("127.0.0.1", silent.getHost().port)], reactor)
    started = time.monotonic()
    try:
        verdict = await Preflight(resolver, timeout=0.5).check("t.example.com", LE).addTimeout(
            10, reactor
        )
    finally:
        silent.stopListening()
    assert verdict == OK
    # A and AAAA time out together, then the first CAA query: two timeouts, no retries.
    assert 0.9 < time.monotonic() - started < 3.0


def test_resolver_for_without_servers_reads_resolv_conf() -> None:
    resolver: Any = resolver_for((), MemoryReactorClock())
    assert resolver.resolv == "/etc/resolv.conf" and resolver.servers == []
