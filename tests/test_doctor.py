"""``trackproxy doctor``: the verdict rules, then the command against real pieces on loopback.

The end-to-end half runs what an operator runs: ``python -m proxy doctor`` as a process,
asking a DNS server (``dns_stand_in.py``, a process too) and a real ``trackproxy run`` that
relays to the stand-in platform. ``--ca-file`` makes the test CA the trusted one and
``--address 127.0.0.1`` makes loopback "this host".
"""

from __future__ import annotations

import datetime
import json
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.names import common, dns, error

from proxy.cli import main
from proxy.config import parse_config
from proxy.doctor import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    Check,
    addresses_here,
    caa_issuer_for,
    classify_connect_error,
    classify_probe,
    classify_tls_error,
    exit_status,
    format_report,
    judge_caa,
    judge_certificate,
    judge_dns,
    listener_address,
    summary,
)
from proxy.preflight import CAA as CAA_TYPE
from proxy.preflight import CAAFound, CAARecord, Resolution, find_caa, resolve
from proxy.testing import LocalCA

from observe import poll
from proxy_process import REPO_ROOT, ProxyProcess, free_port, start_proxy, stop_process
from standin_upstream import LANDING_URL, UpstreamStandIn

LE = "https://acme-v02.api.letsencrypt.org/directory"
PEBBLE = "https://localhost:14000/dir"

# ---------------------------------------------------------------------------
# Pure rules


@pytest.mark.parametrize(
    "endpoints, default, address",
    [
        (["tcp:443"], 443, ("127.0.0.1", 443)),
        (["tcp:8443:interface=127.0.0.1"], 443, ("127.0.0.1", 8443)),
        (["tcp:port=8443:interface=10.0.0.5"], 443, ("10.0.0.5", 8443)),
        (["tcp:443:interface=0.0.0.0"], 443, ("127.0.0.1", 443)),
        (["tcp6:port=443"], 443, ("::1", 443)),
        (["tcp6:443:interface=\\:\\:"], 443, ("::1", 443)),
        (["tcp6:8443:interface=2001\\:db8\\:\\:7"], 443, ("2001:db8::7", 8443)),
        (["systemd:domain=INET:name=https"], 443, ("127.0.0.1", 443)),
        (["systemd:domain=INET6:index=0"], 80, ("::1", 80)),
        (["unix:/run/trackproxy.sock", "tcp:8080"], 80, ("127.0.0.1", 8080)),
        (["unix:/run/trackproxy.sock"], 80, None),
        ([], 443, None),
    ],
)
def test_listener_address_is_the_first_tcp_or_systemd_listener(
    endpoints: list[str], default: int, address: tuple[str, int] | None
) -> None:
    assert listener_address(endpoints, default) == address


@pytest.mark.parametrize(
    "resolved, here, loopback, found",
    [
        (["203.0.113.7"], ["203.0.113.7"], True, ("203.0.113.7",)),
        (["203.0.113.7"], ["198.51.100.1"], True, ()),
        (["127.0.0.1"], [], True, ("127.0.0.1",)),
        (["127.0.0.2", "::1"], [], True, ("127.0.0.2", "::1")),
        (["127.0.0.1"], ["203.0.113.7"], False, ()),
        (["2001:db8::0:7"], ["2001:db8::7"], True, ("2001:db8::0:7",)),
        (["::ffff:203.0.113.7"], ["203.0.113.7"], True, ("::ffff:203.0.113.7",)),
        (["fe80::1"], ["fe80::1%eth0"], True, ("fe80::1",)),
        (["192.0.2.10", "203.0.113.7"], ["203.0.113.7"], True, ("203.0.113.7",)),
        (["not-an-address"], ["not-an-address"], True, ()),
    ],
    ids=["listed", "elsewhere", "loopback", "loopback-range-and-v6", "loopback-not-by-itself",
         "same-v6-other-text", "v4-mapped", "scope-id", "some-here", "garbage"],
)
def test_addresses_here_compares_addresses_not_text(
    resolved: list[str], here: list[str], loopback: bool, found: tuple[str, ...]
) -> None:
    assert addresses_here(resolved, here, loopback_is_here=loopback) == found


NAME = "track.example.com"
POINT_HERE = f"point {NAME}'s CNAME/A record at this host (203.0.113.7)"


@pytest.mark.parametrize(
    "resolution, here, check",
    [
        (Resolution(NAME, (), ("203.0.113.7",)), ("203.0.113.7",),
         Check(NAME, "dns", PASS, f"{NAME} → 203.0.113.7 (this host)")),
        (Resolution(NAME, ("proxy.example.net",), ("203.0.113.7",)), ("203.0.113.7",),
         Check(NAME, "dns", PASS, f"{NAME} → CNAME proxy.example.net → 203.0.113.7 (this host)")),
        (Resolution(NAME, ("spgo.io",), ("192.0.2.10",)), (),
         Check(NAME, "dns", FAIL, f"{NAME} → CNAME spgo.io → 192.0.2.10: not this host (203.0.113.7)",
               POINT_HERE)),
        (Resolution(NAME, (), problem="does not exist in DNS (NXDOMAIN)"), (),
         Check(NAME, "dns", FAIL, f"{NAME}: does not exist in DNS (NXDOMAIN)", POINT_HERE)),
        (Resolution(NAME, ("gone.example.net",), problem="does not exist in DNS (NXDOMAIN)"), (),
         Check(NAME, "dns", FAIL, f"{NAME} → CNAME gone.example.net: does not exist in DNS (NXDOMAIN)",
               POINT_HERE)),
        (Resolution(NAME, (), ("203.0.113.7", "2001:db8::99")), ("203.0.113.7",),
         Check(NAME, "dns", WARN,
               f"{NAME} → 203.0.113.7, 2001:db8::99: 2001:db8::99 is not this host; "
               "clients that pick it miss the proxy",
               f"remove {NAME}'s records for 2001:db8::99, or {POINT_HERE}")),
    ],
    ids=["a-here", "cname-here", "elsewhere", "nxdomain", "cname-to-nothing", "aaaa-elsewhere"],
)
def test_judge_dns(resolution: Resolution, here: tuple[str, ...], check: Check) -> None:
    assert judge_dns(resolution, here, ("203.0.113.7",)) == check


def test_judge_dns_suggests_address_when_this_host_only_knows_private_ones() -> None:
    missing = Resolution(NAME, (), problem="does not exist in DNS (NXDOMAIN)")
    check = judge_dns(missing, (), ("10.0.0.5",), guessed=True)
    assert check.hint == (
        f"point {NAME}'s CNAME/A record at this host (10.0.0.5); "
        "behind NAT, give doctor this host's public address with --address"
    )
    public = "9.9.9.9"  # a global address (documentation ranges count as private)
    assert judge_dns(missing, (), (public,), guessed=True).hint == (
        f"point {NAME}'s CNAME/A record at this host ({public})"
    )
    assert judge_dns(missing, (), ("10.0.0.5",), guessed=False).hint == (
        f"point {NAME}'s CNAME/A record at this host (10.0.0.5)"
    )


def caa(value: str, tag: str = "issue", flags: int = 0) -> CAARecord:
    return CAARecord(flags, tag, value)


@pytest.mark.parametrize(
    "found, server, verdict, detail, hint",
    [
        (CAAFound(), LE, PASS, "no CAA restriction found (letsencrypt.org may issue)", None),
        (CAAFound(), PEBBLE, PASS, "no CAA restriction found", None),
        (CAAFound("example.com", (caa("letsencrypt.org"),)), LE, PASS,
         "CAA at example.com permits letsencrypt.org", None),
        (CAAFound("example.com", (caa("sectigo.com"),)), LE, FAIL,
         "CAA at example.com allows only sectigo.com, not letsencrypt.org",
         'add a CAA record `0 issue "letsencrypt.org"` at example.com (and remove any `issue ";"`)'),
        (CAAFound("example.com", (caa(";"),)), "https://acme.zerossl.com/v2/DV90", FAIL,
         'CAA at example.com forbids every CA (issue ";"), so '
         "affirmtrust.com or comodo.com or comodoca.com or entrust.net or sectigo.com or "
         "trust-provider.com or usertrust.com too",
         'add a CAA record `0 issue "sectigo.com"` at example.com (and remove any `issue ";"`)'),
        (CAAFound("example.com", (caa("sectigo.com"),)), PEBBLE, WARN,
         "CAA at example.com allows sectigo.com; the CA at localhost is unknown, cannot judge",
         "make sure the CAA records at example.com name the issuer domain of the CA at localhost"),
        (CAAFound(problem="the resolvers did not answer in time"), LE, WARN,
         "CAA lookup failed (the resolvers did not answer in time): cannot judge", None),
    ],
    ids=["none-known-ca", "none-unknown-ca", "permits", "forbids", "forbids-all", "unknown-ca",
         "lookup-failed"],
)
def test_judge_caa(found: CAAFound, server: str, verdict: str, detail: str, hint: str | None) -> None:
    assert judge_caa(NAME, found, server) == Check(NAME, "caa", verdict, detail, hint)


class StubResolver(common.ResolverBase):
    """Answers from a table of ``(name, type) -> records | exception``; others are NXDOMAIN."""

    def __init__(self, table: dict[tuple[str, int], Any]) -> None:
        super().__init__()
        self.table = table

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        result = self.table.get((name.decode(), type), error.DNSNameError(name.decode()))
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed((result, [], []))


def rr(owner: str, payload: Any) -> dns.RRHeader:
    kind = CAA_TYPE if isinstance(payload, dns.UnknownRecord) else payload.TYPE
    return dns.RRHeader(owner, kind, payload=payload)


def at_once(coroutine: Any) -> Any:
    """The result of a coroutine that the stub resolver lets finish synchronously."""
    return defer.ensureDeferred(coroutine).result


A_HERE = dns.Record_A("203.0.113.7")
NX_VIA_CNAME = error.DNSNameError(dns.Message(rCode=dns.ENAME))
NX_VIA_CNAME.args[0].answers = [rr(NAME, dns.Record_CNAME("gone.example.net"))]


@pytest.mark.parametrize(
    "table, resolution",
    [
        ({(NAME, dns.A): [rr(NAME, A_HERE)], (NAME, dns.AAAA): []},
         Resolution(NAME, (), ("203.0.113.7",))),
        ({(NAME, dns.A): [rr(NAME, dns.Record_CNAME("p.example.net")), rr("p.example.net", A_HERE)],
          (NAME, dns.AAAA): [rr(NAME, dns.Record_CNAME("p.example.net")),
                             rr("p.example.net", dns.Record_AAAA("2001:db8::7"))]},
         Resolution(NAME, ("p.example.net",), ("203.0.113.7", "2001:db8::7"))),
        # A resolver that answers with the CNAME alone is asked again for the target.
        ({(NAME, dns.A): [rr(NAME, dns.Record_CNAME("p.example.net"))],
          (NAME, dns.AAAA): [rr(NAME, dns.Record_CNAME("p.example.net"))],
          ("p.example.net", dns.A): [rr("p.example.net", A_HERE)], ("p.example.net", dns.AAAA): []},
         Resolution(NAME, ("p.example.net",), ("203.0.113.7",))),
        ({(NAME, dns.A): [rr(NAME, dns.Record_CNAME(NAME))], (NAME, dns.AAAA): []},
         Resolution(NAME, (), problem="has no A or AAAA record")),
        ({(NAME, dns.A): [], (NAME, dns.AAAA): []}, Resolution(NAME, (), problem="has no A or AAAA record")),
        ({}, Resolution(NAME, (), problem="does not exist in DNS (NXDOMAIN)")),
        ({(NAME, dns.A): NX_VIA_CNAME, (NAME, dns.AAAA): NX_VIA_CNAME},
         Resolution(NAME, ("gone.example.net",), problem="does not exist in DNS (NXDOMAIN)")),
        ({(NAME, dns.A): error.DNSServerError(dns.Message()), (NAME, dns.AAAA): []},
         Resolution(NAME, (), problem="lookup failed: the resolver answered SERVFAIL", lookup_failed=True)),
        ({(NAME, dns.A): error.DNSQueryTimeoutError(1), (NAME, dns.AAAA): error.DNSQueryTimeoutError(2)},
         Resolution(NAME, (), problem="lookup failed: the resolvers did not answer in time",
                    lookup_failed=True)),
        ({(NAME, dns.A): error.DNSQueryTimeoutError(1), (NAME, dns.AAAA): [rr(NAME, dns.Record_AAAA("::1"))]},
         Resolution(NAME, (), ("::1",))),
    ],
    ids=["a", "cname-and-targets", "cname-asked-again", "cname-loop", "no-data", "nxdomain",
         "nxdomain-via-cname", "servfail", "timeout", "one-family-answers"],
)
def test_resolve_follows_cnames_and_names_what_is_missing(
    table: dict[tuple[str, int], Any], resolution: Resolution
) -> None:
    assert at_once(resolve(StubResolver(table), NAME, 5.0)) == resolution


def caa_rr(owner: str, tag: str, value: str) -> dns.RRHeader:
    return rr(owner, dns.UnknownRecord(struct.pack("!BB", 0, len(tag)) + tag.encode() + value.encode()))


@pytest.mark.parametrize(
    "table, found",
    [
        ({}, CAAFound()),
        ({("example.com", CAA_TYPE): [caa_rr("example.com", "issue", "sectigo.com")]},
         CAAFound("example.com", (caa("sectigo.com"),))),
        ({(NAME, CAA_TYPE): [], ("example.com", CAA_TYPE): [caa_rr("example.com", "issue", ";")]},
         CAAFound("example.com", (caa(";"),))),
        ({(NAME, CAA_TYPE): [rr(NAME, dns.Record_CNAME("edge.cdn.example")),
                             caa_rr("edge.cdn.example", "issue", "pki.goog")]},
         CAAFound("edge.cdn.example", (caa("pki.goog"),))),
        ({("example.com", CAA_TYPE): [rr("example.com", dns.UnknownRecord(b"\x00")),
                                      caa_rr("example.com", "issue", "letsencrypt.org")]},
         CAAFound("example.com", (caa("letsencrypt.org"),))),
        ({("example.com", CAA_TYPE): error.DNSServerError(dns.Message())},
         CAAFound(problem="the resolver answered SERVFAIL")),
    ],
    ids=["none", "at-parent", "closest-wins", "through-cname", "malformed-skipped", "servfail"],
)
def test_find_caa_climbs_to_the_relevant_rrset(table: dict[tuple[str, int], Any], found: CAAFound) -> None:
    assert at_once(find_caa(StubResolver(table), NAME, 5.0)) == found


def test_caa_issuer_for_prefers_the_name_operators_know() -> None:
    assert caa_issuer_for(frozenset({"letsencrypt.org"})) == "letsencrypt.org"
    assert caa_issuer_for(frozenset({"affirmtrust.com", "sectigo.com"})) == "sectigo.com"
    assert caa_issuer_for(frozenset({"b.example", "a.example"})) == "a.example"


CONFIG = parse_config(
    """
upstreams:
  down: {url: "https://spgo.io", connect_to: "127.0.0.1:9"}
domains:
  track.example.com: {}
  own.example.com: {certificate: {cert: c.pem, key: c.key}}
  self.example.com: {certificate: self-signed}
  down.example.com: {upstream: down}
""",
    "/etc/trackproxy/trackproxy.yaml",
)
TRACK, OWN, SELF, DOWN = (CONFIG.domains[n] for n in (
    "track.example.com", "own.example.com", "self.example.com", "down.example.com"))
WHERE = "203.0.113.7:443"


def verify_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    error.verify_message = message
    return error


def ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    error.reason = reason
    return error


@pytest.mark.parametrize(
    "error, domain, detail, hint_has",
    [
        (verify_error("self-signed certificate"), SELF,
         f"{WHERE}: certificate verify failed: self-signed certificate",
         "certificate: self-signed is for local use"),
        (verify_error("unable to get local issuer certificate"), OWN,
         f"{WHERE}: certificate verify failed: unable to get local issuer certificate", "full chain"),
        (verify_error("certificate has expired"), TRACK,
         f"{WHERE}: certificate verify failed: certificate has expired",
         "trackproxy status shows the certificate's status and last_error"),
        (verify_error("Hostname mismatch, certificate is not valid for 'track.example.com'."), TRACK,
         f"{WHERE}: certificate verify failed: Hostname mismatch, certificate is not valid for "
         "'track.example.com'.",
         "trackproxy certs -c /etc/trackproxy/trackproxy.yaml issue track.example.com"),
        (ssl_error("TLSV1_UNRECOGNIZED_NAME"), TRACK,
         f"{WHERE}: the server has no certificate for track.example.com (unrecognized_name alert)",
         "trackproxy reload -c /etc/trackproxy/trackproxy.yaml"),
        (ssl_error("WRONG_VERSION_NUMBER"), TRACK,
         f"{WHERE}: TLS handshake failed: WRONG_VERSION_NUMBER", "is trackproxy what listens"),
        (ConnectionRefusedError(111, "Connection refused"), TRACK,
         f"{WHERE}: connection refused, nothing listens there", "start trackproxy"),
        (TimeoutError("timed out"), TRACK, f"{WHERE}: no answer within 5s", "TCP port 443"),
    ],
    ids=["self-signed", "missing-chain", "expired", "name-mismatch", "unrecognized-name",
         "not-tls", "refused", "timeout"],
)
def test_classify_tls_error(error: BaseException, domain: Any, detail: str, hint_has: str) -> None:
    got_detail, hint = classify_tls_error(error, WHERE, domain, CONFIG.path)
    assert got_detail == detail
    assert hint_has in hint


def test_classify_connect_error_names_the_listener() -> None:
    detail, hint = classify_connect_error(ConnectionRefusedError(), "192.0.2.1:80", "http")
    assert detail == "192.0.2.1:80: connection refused, nothing listens there"
    assert "listen.http" in hint


def test_judge_certificate_shows_issuer_and_not_after() -> None:
    peer = {
        "issuer": (
            (("countryName", "US"),), (("organizationName", "Let's Encrypt"),), (("commonName", "R11"),),
        ),
        "notAfter": "Feb 20 10:00:00 2027 GMT",
    }
    now = datetime.datetime(2027, 1, 21, 10, 0, tzinfo=datetime.UTC)
    assert judge_certificate(NAME, WHERE, peer, now) == Check(
        NAME, "https", PASS,
        f"{WHERE}: certificate for {NAME} issued by R11 (Let's Encrypt), "
        "valid until 2027-02-20T10:00:00Z (30 days left)",
    )


REDIRECT = {"server": "msys-http", "location": "https://landing.example/x"}
OWN_ANSWER = {"server": "trackproxy"}


@pytest.mark.parametrize(
    "domain, status, headers, verdict, detail, hint_has",
    [
        (TRACK, 302, REDIRECT, PASS, "302 from msys-http, Location: https://landing.example/x", None),
        (TRACK, 301, {"location": "https://x.example/"}, PASS,
         "301 from a server without a Server header, Location: https://x.example/", None),
        (TRACK, 404, OWN_ANSWER, FAIL,
         "404 from trackproxy: the proxy there does not serve track.example.com",
         "trackproxy reload"),
        (TRACK, 404, {"server": "msys-http"}, FAIL,
         "404 from msys-http: upstream sparkpost (https://spgo.io) does not know this domain's links",
         "register and verify track.example.com as a tracking domain"),
        (DOWN, 502, OWN_ANSWER, FAIL, "502 from trackproxy: upstream down (https://spgo.io) is unreachable",
         "reaches 127.0.0.1:9 and upstreams.down"),
        (TRACK, 504, OWN_ANSWER, FAIL,
         "504 from trackproxy: upstream sparkpost (https://spgo.io) did not answer in time",
         "limits.upstream_timeout"),
        (TRACK, 405, OWN_ANSWER, FAIL, "405 from trackproxy: GET is not allowed for track.example.com",
         "methods"),
        (TRACK, 200, {"server": "nginx"}, FAIL,
         "200 from nginx: expected a redirect relayed from upstream sparkpost (https://spgo.io)",
         "is sparkpost the platform"),
        (TRACK, 502, {"server": "cloudfront"}, FAIL,
         "502 from cloudfront: expected a redirect relayed from upstream sparkpost (https://spgo.io)",
         "is sparkpost the platform"),
    ],
    ids=["redirect", "redirect-no-server", "unknown-to-proxy", "unknown-to-platform", "upstream-down",
         "upstream-slow", "method", "not-a-redirect", "someone-elses-502"],
)
def test_classify_probe(
    domain: Any, status: int, headers: dict[str, str], verdict: str, detail: str, hint_has: str | None
) -> None:
    check = classify_probe("probe", domain, status, headers, CONFIG.path)
    assert (check.domain, check.name, check.verdict, check.detail) == (domain.name, "probe", verdict, detail)
    if hint_has is None:
        assert check.hint is None
    else:
        assert check.hint is not None and hint_has in check.hint


def test_format_report_aligns_columns_and_puts_hints_under_failures() -> None:
    checks = [
        Check("a.example.com", "dns", PASS, "a.example.com → 127.0.0.1 (this host)"),
        Check("long.example.com", "https", FAIL, "127.0.0.1:443: nope", "fix it"),
        Check("long.example.com", "probe", SKIP, "needs a TLS connection (see https)"),
    ]
    assert format_report(checks).splitlines() == [
        "a.example.com     dns    PASS  a.example.com → 127.0.0.1 (this host)",
        "long.example.com  https  FAIL  127.0.0.1:443: nope",
        "                  hint: fix it",
        "long.example.com  probe  SKIP  needs a TLS connection (see https)",
    ]
    assert summary(checks) == "2 domain(s): 1 PASS, 1 FAIL, 1 SKIP"


@pytest.mark.parametrize(
    "verdicts, status",
    [([PASS, PASS], 0), ([PASS, WARN, SKIP], 0), ([PASS, FAIL], 1), ([FAIL, WARN], 1), ([], 0)],
)
def test_exit_status_is_1_only_when_a_check_failed(verdicts: list[str], status: int) -> None:
    assert exit_status([Check("d", "dns", v, "") for v in verdicts]) == status


def test_doctor_refuses_a_domain_that_is_not_configured(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("domains: {track.example.com: {}}\n")
    assert main(["doctor", "-c", str(path), "click.example.com"]) == 2
    assert f"click.example.com is not a domain of {path}" in capsys.readouterr().err


def test_doctor_refuses_an_address_that_is_not_one(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("domains: {track.example.com: {}}\n")
    assert main(["doctor", "-c", str(path), "--address", "myhost"]) == 2
    assert "--address wants an IP address, not 'myhost'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The command against real pieces on loopback

GOOD = "good.example.test"  # A 127.0.0.1, certificate from the test CA: every check passes
ALIAS = "alias.example.test"  # CNAME proxy.example.test, which is A 127.0.0.1
ELSEWHERE = "elsewhere.example.test"  # A 192.0.2.10
CAA_SECTIGO = "caa.example.test"  # CAA 0 issue "sectigo.com"; the config's CA is Let's Encrypt
SELF_SIGNED = "self.example.test"  # the proxy's own self-signed certificate
DOWN_UP = "down.example.test"  # upstream where nothing listens
NO_CERT = "none.example.test"  # certificate: none, so the proxy has none to serve
MISSING = "missing.example.test"  # NXDOMAIN

ZONE = {
    GOOD: {"A": ["127.0.0.1"]},
    ALIAS: {"CNAME": "proxy.example.test"},
    "proxy.example.test": {"A": ["127.0.0.1"]},
    ELSEWHERE: {"A": ["192.0.2.10"]},
    CAA_SECTIGO: {"A": ["127.0.0.1"], "CAA": [[0, "issue", "sectigo.com"]]},
    SELF_SIGNED: {"A": ["127.0.0.1"]},
    DOWN_UP: {"A": ["127.0.0.1"]},
    NO_CERT: {"A": ["127.0.0.1"]},
}
ISSUED = (GOOD, ALIAS, ELSEWHERE, CAA_SECTIGO, DOWN_UP, MISSING)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``dns_stand_in.py`` serving :data:`ZONE` on a loopback UDP port."""
    directory = tmp_path_factory.mktemp("dns")
    zone, port_file = directory / "zone.json", directory / "port"
    zone.write_text(json.dumps(ZONE))
    with (directory / "dns.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "dns_stand_in.py"),
             "--zone-json", str(zone), "--port-file", str(port_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def listening() -> int | None:
            assert process.poll() is None, (directory / "dns.log").read_text()
            return int(port_file.read_text()) if port_file.exists() else None

        yield ("127.0.0.1", poll(listening, 10, "the DNS stand-in listening"))
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn,
    dns_server: tuple[str, int],
) -> Iterator[ProxyProcess]:
    files: dict[str, Path] = {}
    domains: dict[str, Any] = {}
    for name in ISSUED:
        cert, key = ca.issue(name)
        files[f"{name}.pem"], files[f"{name}.key"] = cert, key
        domains[name] = {"certificate": {"cert": f"{name}.pem", "key": f"{name}.key"}}
    domains[SELF_SIGNED] = {"certificate": "self-signed"}
    domains[NO_CERT] = {"certificate": "none"}
    domains[DOWN_UP]["upstream"] = "down"
    config = {
        "acme": {"server": LE},
        "resolvers": [f"{dns_server[0]}:{dns_server[1]}"],
        "defaults": {"cache_ttl": 0},
        "upstreams": {
            "sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)},
            "down": {"url": "https://spgo.io", "connect_to": f"127.0.0.1:{free_port()}",
                     "ca_file": str(ca.cert_path)},
        },
        "domains": domains,
    }
    running = start_proxy(tmp_path_factory.mktemp("doctor"), config, files=files)
    yield running
    running.stop()


def doctor(proxy: ProxyProcess, ca: LocalCA, *args: str) -> tuple[int, list[list[str]], str]:
    """``trackproxy doctor`` on the proxy's config: exit status, report rows split into
    ``[domain, check, verdict, detail]`` (a hint row is ``["hint:", text]``), and the text."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "-c", str(proxy.config_path),
         "--ca-file", str(ca.cert_path), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
    )
    rows = []
    for line in result.stdout.splitlines()[:-1]:  # the last line is the summary
        if line.lstrip().startswith("hint:"):
            rows.append(["hint:", line.split("hint:", 1)[1].strip()])
        else:
            rows.append(line.split(None, 3))
    return result.returncode, rows, result.stdout + result.stderr


def rows_for(rows: list[list[str]], domain: str) -> dict[str, tuple[str, str, str | None]]:
    """check -> (verdict, detail, hint) for ``domain``."""
    found: dict[str, tuple[str, str, str | None]] = {}
    last = None
    for row in rows:
        if row[0] == "hint:" and last is not None:
            verdict, detail, _ = found[last]
            found[last] = (verdict, detail, row[1])
        elif row[0] == domain:
            last = row[1]
            found[last] = (row[2], row[3], None)
        else:
            last = None
    return found


@pytest.mark.parametrize("address", [["--address", "127.0.0.1"], []], ids=["address-given", "own-addresses"])
def test_a_correct_setup_passes_every_check(
    proxy: ProxyProcess, ca: LocalCA, address: list[str]
) -> None:
    status, rows, text = doctor(proxy, ca, GOOD, ALIAS, *address)
    assert status == 0, text
    good, alias = rows_for(rows, GOOD), rows_for(rows, ALIAS)
    assert list(good) == ["dns", "caa", "https", "probe", "http"], text
    assert all(verdict == PASS for verdict, _, _ in [*good.values(), *alias.values()]), text
    assert good["dns"][1] == f"{GOOD} → 127.0.0.1 (this host)"
    assert alias["dns"][1] == f"{ALIAS} → CNAME proxy.example.test → 127.0.0.1 (this host)"
    assert good["caa"][1] == "no CAA restriction found (letsencrypt.org may issue)"
    assert good["https"][1].startswith(
        f"127.0.0.1:{proxy.https_port}: certificate for {GOOD} issued by trackproxy test CA, valid until "
    ), text
    redirect = f"GET /f/a/b/c/d: 302 from msys-http, Location: {LANDING_URL}"
    assert good["probe"][1] == redirect and good["http"][1] == redirect
    assert text.splitlines()[-1] == "2 domain(s): 10 PASS"


@pytest.mark.parametrize(
    "domain, check, detail, hint",
    [
        (ELSEWHERE, "dns", f"{ELSEWHERE} → 192.0.2.10: not this host (127.0.0.1)",
         f"point {ELSEWHERE}'s CNAME/A record at this host (127.0.0.1)"),
        (MISSING, "dns", f"{MISSING}: does not exist in DNS (NXDOMAIN)",
         f"point {MISSING}'s CNAME/A record at this host (127.0.0.1)"),
        (CAA_SECTIGO, "caa", f"CAA at {CAA_SECTIGO} allows only sectigo.com, not letsencrypt.org",
         f'add a CAA record `0 issue "letsencrypt.org"` at {CAA_SECTIGO} (and remove any `issue ";"`)'),
        (SELF_SIGNED, "https", "certificate verify failed: self-signed certificate",
         f"certificate: self-signed is for local use: give {SELF_SIGNED} certificate: acme "
         "(or your own files)"),
        (NO_CERT, "https", f"the server has no certificate for {NO_CERT} (unrecognized_name alert)",
         "if the proxy there runs "),
        (DOWN_UP, "probe",
         "GET /f/a/b/c/d: 502 from trackproxy: upstream down (https://spgo.io) is unreachable",
         "trackproxy's log says why (connect_error, tls_error); check that this host reaches 127.0.0.1:"),
    ],
    ids=["dns-elsewhere", "dns-nxdomain", "caa-forbids", "self-signed", "no-certificate", "upstream-down"],
)
def test_each_failure_is_named_with_what_to_change(
    proxy: ProxyProcess, ca: LocalCA, domain: str, check: str, detail: str, hint: str
) -> None:
    status, rows, text = doctor(proxy, ca, domain, "--address", "127.0.0.1")
    assert status == 1, text
    found = rows_for(rows, domain)
    verdict, got_detail, got_hint = found[check]
    assert verdict == FAIL, text
    assert detail in got_detail, text
    assert got_hint is not None and got_hint.startswith(hint), text
    # One cause, one FAIL: the other checks pass, or are skipped when they cannot run.
    others = {c: v for c, (v, _, _) in found.items() if c != check}
    if domain == DOWN_UP:
        assert others.pop("http") == FAIL, text  # the same upstream, over plain HTTP
    if domain == NO_CERT:
        assert others.pop("probe") == SKIP, text  # no TLS session to probe over
    assert set(others.values()) == {PASS}, text
