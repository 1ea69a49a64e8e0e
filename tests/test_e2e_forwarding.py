"""End-to-end: ``trackproxy run`` as a process between a real client and a stand-in platform.

What users meet, on real loopback sockets with real TLS: routing by Host and SNI, the
certificate each domain serves, what the platform receives (and what it must never
receive), what the client gets back, ACME challenges, upstream failures and timeouts, and
connection pooling. One proxy serves the whole module; the trusted-proxies test starts a
second one because its config must differ.

The proxy's cache is off (``cache_ttl: 0``) so that every request is observable upstream;
caching has its own tests.
"""

from __future__ import annotations

import ssl
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.testing import LocalCA

from proxy_process import ProxyProcess, free_port, start_proxy
from standin_upstream import LANDING_URL, REDIRECT_BODY, SLOW_SECONDS, UpstreamStandIn
from wire import TLS, Response, connect, dns_names, first_certificate_der, request, wait_closed

TRACK = "track.example.test"  # self-signed, default upstream (the overridden sparkpost preset)
CLICK = "click.example.test"  # certificate files signed by the test CA
POST = "post.example.test"  # allows POST
WRONG_SNI = "wrong.example.test"  # upstream whose host the stand-in refuses as SNI
DOWN = "down.example.test"  # upstream where nothing listens
UNTRUSTED = "untrusted.example.test"  # upstream certificate from a CA the proxy does not trust
MISMATCH = "mismatch.example.test"  # upstream certificate for another name
POOLED = "pool.example.test"  # its own stand-in, to count connections
PLAIN = "plain.example.test"  # http:// upstream

CLIENT_TIMEOUT = 2.0
UPSTREAM_TIMEOUT = 2.0
MAX_HEADER_BYTES = 8 * 1024

# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def spgo_certificate(ca: LocalCA) -> tuple[Path, Path]:
    return ca.issue("spgo.io")


@pytest.fixture(scope="module")
def upstream(spgo_certificate: tuple[Path, Path]) -> Iterator[UpstreamStandIn]:
    """The platform: accepts only SNI ``spgo.io``."""
    stand_in = UpstreamStandIn(spgo_certificate)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def pool_upstream(spgo_certificate: tuple[Path, Path]) -> Iterator[UpstreamStandIn]:
    """A second platform endpoint that only the pooling test talks to."""
    stand_in = UpstreamStandIn(spgo_certificate)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def lenient_upstream(spgo_certificate: tuple[Path, Path]) -> Iterator[UpstreamStandIn]:
    """Serves the ``spgo.io`` certificate whatever SNI it is asked for."""
    stand_in = UpstreamStandIn(spgo_certificate, strict_sni=False)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def plain_upstream() -> Iterator[UpstreamStandIn]:
    """A platform that speaks plain HTTP (Mailgun's case)."""
    stand_in = UpstreamStandIn(None)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def stand_ins(
    upstream: UpstreamStandIn,
    pool_upstream: UpstreamStandIn,
    lenient_upstream: UpstreamStandIn,
    plain_upstream: UpstreamStandIn,
) -> tuple[UpstreamStandIn, ...]:
    return upstream, pool_upstream, lenient_upstream, plain_upstream


@pytest.fixture(scope="module")
def click_certificate(ca: LocalCA) -> tuple[Path, Path]:
    return ca.issue(CLICK)


def proxy_config(
    ca: LocalCA,
    upstream: UpstreamStandIn,
    pool_upstream: UpstreamStandIn,
    lenient_upstream: UpstreamStandIn,
    plain_upstream: UpstreamStandIn,
    **extra: Any,
) -> dict[str, Any]:
    """The test domain map; ``click.pem``/``click.key`` sit next to the YAML file."""
    ca_file = str(ca.cert_path)
    return {
        "limits": {
            "client_timeout": f"{CLIENT_TIMEOUT:g}s",
            "upstream_connect_timeout": "2s",
            "upstream_timeout": f"{UPSTREAM_TIMEOUT:g}s",
            "max_header_bytes": "8KiB",
        },
        **extra,
        "defaults": {"cache_ttl": 0},
        "upstreams": {
            # Overrides the built-in preset; its url stays https://spgo.io.
            "sparkpost": {"connect_to": upstream.address, "ca_file": ca_file},
            "wrongsni": {
                "url": "https://other.example", "connect_to": upstream.address, "ca_file": ca_file,
            },
            "down": {
                "url": "https://spgo.io", "connect_to": f"127.0.0.1:{free_port()}", "ca_file": ca_file,
            },
            # No ca_file: the system roots, which do not know the test CA.
            "untrusted": {"url": "https://spgo.io", "connect_to": upstream.address},
            "mismatch": {
                "url": "https://eu.spgo.io", "connect_to": lenient_upstream.address, "ca_file": ca_file,
            },
            "pooled": {
                "url": "https://spgo.io", "connect_to": pool_upstream.address, "ca_file": ca_file,
            },
            "plainup": {"url": "http://mailgun.test", "connect_to": plain_upstream.address},
        },
        "domains": {
            TRACK: {"certificate": "self-signed"},
            CLICK: {"certificate": {"cert": "click.pem", "key": "click.key"}},
            POST: {"certificate": "self-signed", "methods": ["GET", "HEAD", "POST"]},
            WRONG_SNI: {"upstream": "wrongsni", "certificate": "self-signed"},
            DOWN: {"upstream": "down", "certificate": "self-signed"},
            UNTRUSTED: {"upstream": "untrusted", "certificate": "self-signed"},
            MISMATCH: {"upstream": "mismatch", "certificate": "self-signed"},
            POOLED: {"upstream": "pooled", "certificate": "self-signed"},
            PLAIN: {"upstream": "plainup", "certificate": "self-signed"},
        },
    }


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory,
    ca: LocalCA,
    click_certificate: tuple[Path, Path],
    stand_ins: tuple[UpstreamStandIn, ...],
) -> Iterator[ProxyProcess]:
    running = start_proxy(
        tmp_path_factory.mktemp("proxy"),
        proxy_config(ca, *stand_ins),
        files={"click.pem": click_certificate[0], "click.key": click_certificate[1]},
    )
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _show_what_happened(
    proxy: ProxyProcess, stand_ins: tuple[UpstreamStandIn, ...]
) -> Iterator[None]:
    """On failure pytest shows this teardown output: the proxy's log and upstream traffic."""
    proxy.mark_log()
    seen = [len(s.requests) for s in stand_ins]
    yield
    print(f"--- proxy log during this test ({proxy.log_path}):\n{proxy.log_since_mark()}")
    for name, stand_in, count in zip(("upstream", "pool", "lenient", "plain"), stand_ins, seen):
        for r in stand_in.requests[count:]:
            print(f"--- {name} upstream received: {r}")


# ---------------------------------------------------------------------------
# Helpers


def tracking_path(query: str = "") -> str:
    """A path no other test uses, shaped like a platform's click link."""
    return f"/f/{uuid.uuid4().hex}/a%20b/c" + (f"?{query}" if query else "")


def tls_for(proxy: ProxyProcess, ca: LocalCA, sni: str) -> TLS:
    """TLS that verifies the certificate ``sni`` should get: the test CA's or self-signed."""
    return TLS(sni, ca.cert_path if sni == CLICK else proxy.certificate_path(sni))


def https(
    proxy: ProxyProcess, ca: LocalCA, host: str, path: str, sni: str | None = None, **kw: Any
) -> Response:
    """A request on the HTTPS listener, SNI = ``sni`` (default: ``host``), verified."""
    return request(proxy.https_port, host, path, tls=tls_for(proxy, ca, sni or host), **kw)


def plain(proxy: ProxyProcess, host: str | None, path: str, **kw: Any) -> Response:
    """A request on the plain HTTP listener."""
    return request(proxy.http_port, host, path, **kw)


@contextmanager
def nothing_forwarded(stand_ins: tuple[UpstreamStandIn, ...]) -> Iterator[None]:
    """Fails if any stand-in upstream receives a request or a TLS handshake attempt."""
    before = [(len(s.requests), s.connections) for s in stand_ins]
    yield
    after = [(len(s.requests), s.connections) for s in stand_ins]
    assert after == before, "something reached an upstream: " + "; ".join(
        f"{s.requests[b[0]:]} ({a[1] - b[1]} new connections)"
        for s, a, b in zip(stand_ins, after, before)
        if a != b
    )


def assert_short_text(response: Response) -> None:
    """An answer made by the proxy itself: a short plain-text body."""
    content_type = response.header("Content-Type") or ""
    assert content_type.startswith("text/"), response.headers
    assert 0 < len(response.body) < 1024, response.body


def connection_tokens(values: list[str]) -> set[str]:
    """The lower-cased tokens of comma-separated header values (Connection, Allow)."""
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


# ---------------------------------------------------------------------------
# Forwarding: what the platform receives


def test_https_request_is_forwarded_with_same_method_path_and_query_over_tls_with_upstream_sni(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path("x=1&y=%2F&z")
    answer = https(proxy, ca, TRACK, path)
    assert answer.status == 302
    seen = upstream.only(path)
    assert seen.method == "GET"
    assert seen.sni == "spgo.io"
    assert seen.header("Host") == TRACK


def test_upstream_302_is_relayed_with_its_location_server_header_and_body(
    proxy: ProxyProcess, ca: LocalCA
) -> None:
    answer = https(proxy, ca, TRACK, tracking_path())
    assert answer.status == 302
    assert answer.header("Location") == LANDING_URL
    assert answer.values("Server") == ["msys-http"]
    assert answer.header("X-Upstream-Marker") == "from-stand-in"
    assert answer.body == REDIRECT_BODY


def test_user_agent_is_forwarded_unchanged(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    agent = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) GoogleImageProxy e2e/1"
    path = tracking_path()
    https(proxy, ca, TRACK, path, headers=[("User-Agent", agent)])
    assert upstream.only(path).header("User-Agent") == agent


def test_spoofed_forwarding_headers_are_replaced_by_peer_ip_scheme_and_host(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    https(
        proxy, ca, TRACK, path,
        headers=[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "gopher"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    seen = upstream.only(path)
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
    assert seen.header("X-Forwarded-Host") == TRACK


def test_http_listener_forwards_over_tls_with_forwarded_proto_http(
    proxy: ProxyProcess, upstream: UpstreamStandIn
) -> None:
    path = tracking_path("q=1")
    answer = plain(proxy, TRACK, path)
    assert answer.status == 302
    assert answer.header("Location") == LANDING_URL
    seen = upstream.only(path)
    assert seen.sni == "spgo.io"
    assert seen.header("Host") == TRACK
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == TRACK
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


def test_hop_by_hop_request_headers_are_dropped_and_end_to_end_ones_pass(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    https(
        proxy, ca, TRACK, path,
        headers=[
            # No keep-alive token here: each hop-by-hop name must be dropped on its own.
            ("Connection", "X-Hop-Named"),
            ("X-Hop-Named", "drop-me"),
            ("Keep-Alive", "timeout=9"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Trailer", "X-Trailing"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
            ("Proxy-Authenticate", "Basic"),
            ("X-Custom", "1"),
            ("Cookie", "session=abc; other=1"),
            ("Accept", "image/*"),
        ],
    )
    seen = upstream.only(path)
    leaked = seen.names() & {
        "x-hop-named", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate",
    }
    assert not leaked, seen.headers
    # The proxy may say keep-alive/close for its own hop, never pass the client's tokens on.
    assert connection_tokens(seen.values("Connection")) <= {"keep-alive", "close"}, seen.headers
    assert seen.header("X-Custom") == "1"
    assert seen.header("Cookie") == "session=abc; other=1"
    assert seen.header("Accept") == "image/*"


def test_hop_by_hop_response_headers_are_dropped_before_the_client(
    proxy: ProxyProcess, ca: LocalCA
) -> None:
    answer = https(proxy, ca, TRACK, tracking_path())
    assert answer.status == 302
    assert not answer.names() & {"x-up-hop", "keep-alive", "proxy-authenticate"}, answer.headers
    assert connection_tokens(answer.values("Connection")) <= {"keep-alive", "close"}, answer.headers
    assert answer.header("X-Upstream-Marker") == "from-stand-in"


def test_head_is_forwarded_as_head(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    answer = https(proxy, ca, TRACK, path, method="HEAD")
    assert answer.status == 302
    assert answer.body == b""
    assert upstream.only(path).method == "HEAD"


def test_post_body_is_forwarded_where_the_domain_allows_post(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    body = b'{"event": "click", "n": 1}'
    answer = https(
        proxy, ca, POST, path, method="POST", body=body,
        headers=[("Content-Type", "application/json")],
    )
    assert answer.status == 302
    seen = upstream.only(path)
    assert seen.method == "POST"
    assert seen.body == body
    assert seen.header("Content-Type") == "application/json"
    assert seen.header("Host") == POST


@pytest.mark.parametrize(
    "host",
    ["TRACK.Example.TEST", "track.example.test:8080", "track.example.test.", "Track.Example.Test.:80"],
)
def test_host_is_normalised_before_routing_and_forwarded_normalised(
    proxy: ProxyProcess, upstream: UpstreamStandIn, host: str
) -> None:
    path = tracking_path()
    answer = plain(proxy, host, path)
    assert answer.status == 302
    seen = upstream.only(path)
    assert seen.header("Host") == TRACK
    assert seen.header("X-Forwarded-Host") == TRACK


def test_https_host_with_port_case_and_trailing_dot_still_matches_its_sni(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    answer = https(proxy, ca, "Track.Example.Test.:443", path, sni=TRACK)
    assert answer.status == 302
    assert upstream.only(path).header("Host") == TRACK


def test_plain_http_upstream_is_forwarded_over_plain_http(
    proxy: ProxyProcess, ca: LocalCA, plain_upstream: UpstreamStandIn
) -> None:
    path = tracking_path("id=7")
    answer = https(proxy, ca, PLAIN, path)
    assert answer.status == 302
    assert answer.header("Location") == LANDING_URL
    seen = plain_upstream.only(path)
    assert seen.sni is None
    assert seen.header("Host") == PLAIN
    assert seen.header("X-Forwarded-Proto") == "https"


# ---------------------------------------------------------------------------
# Certificates and the TLS handshake


def test_self_signed_domain_serves_the_certificate_generated_in_state_dir(
    proxy: ProxyProcess, ca: LocalCA
) -> None:
    pem = proxy.certificate_path(TRACK)
    key = pem.with_name("self-signed.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Verified against that file as the trust anchor, host name checked.
    answer = https(proxy, ca, TRACK, tracking_path())
    assert answer.status == 302
    assert answer.peer_certificate == first_certificate_der(pem)
    assert TRACK in dns_names(answer.peer_certificate)


def test_second_domain_gets_its_own_certificate_files_chosen_by_sni(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn, click_certificate: tuple[Path, Path]
) -> None:
    path = tracking_path()
    answer = https(proxy, ca, CLICK, path)  # verified against the test CA
    assert answer.status == 302
    assert answer.peer_certificate == first_certificate_der(click_certificate[0])
    assert dns_names(answer.peer_certificate) == [CLICK]
    assert answer.peer_certificate != first_certificate_der(proxy.certificate_path(TRACK))
    assert upstream.only(path).header("Host") == CLICK


@pytest.mark.parametrize(
    "sni", ["unknown.example.test", "sub.track.example.test", None], ids=["unknown", "subdomain", "none"]
)
def test_unknown_or_missing_sni_fails_the_handshake_and_nothing_reaches_upstream(
    proxy: ProxyProcess, stand_ins: tuple[UpstreamStandIn, ...], sni: str | None
) -> None:
    with nothing_forwarded(stand_ins):
        # The client accepts any certificate: a failure can only be the proxy's refusal.
        with pytest.raises(ssl.SSLError) as refused:
            request(proxy.https_port, TRACK, tracking_path(), tls=TLS(sni))
    assert "UNRECOGNIZED_NAME" in str(refused.value)


def test_tls_1_1_is_refused_and_tls_1_2_is_accepted(proxy: ProxyProcess, ca: LocalCA) -> None:
    with pytest.raises(ssl.SSLError) as refused:
        connect(proxy.https_port, TLS(TRACK, maximum_version=ssl.TLSVersion.TLSv1_1))
    # The refusal is about the version (not, say, a cipher or an internal error).
    assert "PROTOCOL_VERSION" in str(refused.value)
    answer = request(
        proxy.https_port, TRACK, tracking_path(),
        tls=TLS(TRACK, proxy.certificate_path(TRACK), maximum_version=ssl.TLSVersion.TLSv1_2),
    )
    assert answer.status == 302


# ---------------------------------------------------------------------------
# Routing refusals: never an open proxy


def test_https_host_differing_from_sni_gets_421_and_nothing_upstream(
    proxy: ProxyProcess, ca: LocalCA, stand_ins: tuple[UpstreamStandIn, ...]
) -> None:
    with nothing_forwarded(stand_ins):
        answer = https(proxy, ca, CLICK, tracking_path(), sni=TRACK)
    assert (answer.status, answer.reason) == (421, "Misdirected Request")
    assert_short_text(answer)


# ---------------------------------------------------------------------------
# Upstream failures


def test_unreachable_upstream_gets_502(proxy: ProxyProcess, ca: LocalCA) -> None:
    answer = https(proxy, ca, DOWN, tracking_path())
    assert answer.status == 502
    assert_short_text(answer)


def test_upstream_refusing_the_sni_gets_502_and_the_sni_was_the_upstream_host(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    refused_before = upstream.refused_sni.count("other.example")
    path = tracking_path()
    answer = https(proxy, ca, WRONG_SNI, path)
    assert answer.status == 502
    assert upstream.refused_sni.count("other.example") > refused_before
    assert upstream.matching(path) == []


def test_upstream_certificate_from_an_untrusted_ca_gets_502(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    answer = https(proxy, ca, UNTRUSTED, path)
    assert answer.status == 502
    assert upstream.matching(path) == []


def test_upstream_certificate_for_another_name_gets_502(
    proxy: ProxyProcess, ca: LocalCA, lenient_upstream: UpstreamStandIn
) -> None:
    path = tracking_path()
    answer = https(proxy, ca, MISMATCH, path)
    assert answer.status == 502
    assert lenient_upstream.matching(path) == []


def test_upstream_slower_than_upstream_timeout_gets_504_in_time(
    proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    # The stand-in answers after SLOW_SECONDS: a 504 means the proxy's deadline came first.
    # (When exactly it comes is test_upstream's business, on a Clock.)
    path = "/slow/" + uuid.uuid4().hex
    answer = https(proxy, ca, TRACK, path, timeout=SLOW_SECONDS + 5)
    assert answer.status == 504
    assert_short_text(answer)
    assert len(upstream.matching(path)) == 1


# ---------------------------------------------------------------------------
# Connections


def test_sequential_requests_reuse_one_pooled_upstream_connection(
    proxy: ProxyProcess, ca: LocalCA, pool_upstream: UpstreamStandIn
) -> None:
    first, second = tracking_path(), tracking_path()
    # Two separate client connections: only the proxy's pool can make them share one.
    assert https(proxy, ca, POOLED, first).status == 302
    connections = pool_upstream.connections
    assert https(proxy, ca, POOLED, second).status == 302
    a, b = pool_upstream.only(first), pool_upstream.only(second)
    assert (a.peer_port, a.connection) == (b.peer_port, b.connection)
    assert pool_upstream.connections == connections


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_idle_client_connection_is_closed_after_client_timeout(
    proxy: ProxyProcess, ca: LocalCA, scheme: str
) -> None:
    # Closed by the proxy at all; when, to the second, is test_server's (on a Clock).
    if scheme == "https":
        sock = connect(proxy.https_port, tls_for(proxy, ca, TRACK))
    else:
        sock = connect(proxy.http_port)
    with sock:
        wait_closed(sock, within=CLIENT_TIMEOUT + 6)


def test_half_sent_request_head_is_closed_after_client_timeout(proxy: ProxyProcess) -> None:
    with connect(proxy.http_port) as sock:
        sock.sendall(b"GET /f/slowloris HTTP/1.1\r\nHost: " + TRACK.encode() + b"\r\nX-A: 1\r\n")
        wait_closed(sock, within=CLIENT_TIMEOUT + 6)


# ---------------------------------------------------------------------------
# ACME HTTP-01 and other /.well-known/ paths


@pytest.fixture
def challenge_dir(proxy: ProxyProcess) -> Path:
    directory = proxy.state_dir / "acme-challenge"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_acme_challenge_is_answered_from_state_dir_and_not_forwarded(
    proxy: ProxyProcess, challenge_dir: Path, stand_ins: tuple[UpstreamStandIn, ...]
) -> None:
    token = "tok-" + uuid.uuid4().hex + "_X9"
    content = token + ".thumbprint-of-the-account-key"
    (challenge_dir / token).write_text(content)
    with nothing_forwarded(stand_ins):
        answer = plain(proxy, TRACK, f"/.well-known/acme-challenge/{token}")
    assert answer.status == 200
    assert answer.body == content.encode()


def test_missing_acme_token_gets_404_and_is_not_forwarded(
    proxy: ProxyProcess, challenge_dir: Path, stand_ins: tuple[UpstreamStandIn, ...]
) -> None:
    with nothing_forwarded(stand_ins):
        answer = plain(proxy, TRACK, "/.well-known/acme-challenge/" + uuid.uuid4().hex)
    assert answer.status == 404


@pytest.mark.parametrize(
    "token", ["a.b", "..%2Fsecret", "%2E%2E%2Fsecret", "..%2F..%2Fstate%2Fsecret", "tok%00"]
)
def test_acme_token_with_forbidden_characters_gets_404_and_is_not_forwarded(
    proxy: ProxyProcess, challenge_dir: Path, stand_ins: tuple[UpstreamStandIn, ...], token: str
) -> None:
    # Files that a lax lookup would find: the token taken literally, or after unquoting.
    (challenge_dir / "a.b").write_text("served-a-dot-b")
    (proxy.state_dir / "secret").write_text("served-the-secret")
    with nothing_forwarded(stand_ins):
        answer = plain(proxy, TRACK, f"/.well-known/acme-challenge/{token}")
    assert answer.status == 404
    assert b"served-" not in answer.body


def test_acme_challenge_for_an_unconfigured_host_gets_404(
    proxy: ProxyProcess, challenge_dir: Path, stand_ins: tuple[UpstreamStandIn, ...]
) -> None:
    token = uuid.uuid4().hex
    (challenge_dir / token).write_text("for-configured-domains-only")
    with nothing_forwarded(stand_ins):
        answer = plain(proxy, "unknown.example.test", f"/.well-known/acme-challenge/{token}")
    assert answer.status == 404
    assert b"for-configured-domains-only" not in answer.body


# ---------------------------------------------------------------------------
# trusted_proxies: a second proxy, since its config differs


@pytest.fixture
def trusting_proxy(
    tmp_path: Path,
    ca: LocalCA,
    click_certificate: tuple[Path, Path],
    stand_ins: tuple[UpstreamStandIn, ...],
) -> Iterator[ProxyProcess]:
    running = start_proxy(
        tmp_path / "trusting",
        proxy_config(ca, *stand_ins, trusted_proxies=["127.0.0.0/8"]),
        files={"click.pem": click_certificate[0], "click.key": click_certificate[1]},
    )
    running.mark_log()
    yield running
    print(f"--- trusting proxy log ({running.log_path}):\n{running.log_since_mark()}")
    running.stop()


def test_x_forwarded_for_from_a_trusted_peer_is_extended_not_replaced(
    trusting_proxy: ProxyProcess, ca: LocalCA, upstream: UpstreamStandIn
) -> None:
    extended, fresh = tracking_path(), tracking_path()
    assert https(
        trusting_proxy, ca, TRACK, extended, headers=[("X-Forwarded-For", "203.0.113.9")]
    ).status == 302
    assert https(trusting_proxy, ca, TRACK, fresh).status == 302
    assert upstream.only(extended).header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert upstream.only(fresh).header("X-Forwarded-For") == "127.0.0.1"


# ---------------------------------------------------------------------------
# Framing on the wire (RFC 9112): what the parser refuses never goes upstream
