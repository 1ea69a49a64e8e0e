"""Property-based tests (hypothesis), bounded in examples: what any input may and may not do.

- the config loader: any text gives a Config or ConfigErrors, each error located inside
  the text; never another exception;
- the header rules: whatever a client sends, no hop-by-hop header (or one ``Connection``
  names) goes upstream, ``Host`` is the route's and comes first, ``X-Forwarded-For`` is
  the peer's (extended only for a trusted peer);
- the host rules: the routing key is ASCII lower-case without port or trailing dot, and
  no request target steers the proxy to another host;
- the running proxy, fed arbitrary request bytes: never a 500, never a traceback in its
  log, never a request upstream for a host it does not serve, still serving after.
"""

from __future__ import annotations

import re
import socket
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ConfigErrors, parse_config
from proxy.forward import HOP_BY_HOP, normalise_request_host, request_target, upstream_request_headers

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# The config loader

KEYS = ["listen", "state_dir", "acme", "defaults", "cache", "limits", "trusted_proxies", "workers", "log_paths",
        "resolvers", "upstreams", "domains", "http", "https", "admin", "email", "server", "key_type",
        "renew_before", "ca_bundle", "upstream", "certificate", "cache_ttl", "methods", "cert", "key", "url",
        "connect_to", "ca_file", "max_entries", "max_bytes", "client_timeout", "track.example.com", "a.b"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.sampled_from(["10s", "5m", "auto", "acme", "self-signed", "none", "tcp:443", "https://spgo.io",
                     "127.0.0.1:1", "16KiB", "GET", "x" * 300, "", "*", "xn--", "::1", "soon", "-1"]),
    st.text(max_size=20),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5)),
    max_leaves=25,
)


def check_located(text: str, errors: ConfigErrors) -> None:
    # YAML's line breaks: CR LF, CR, LF, NEL, LS, PS (a lone CR or an LS ends a line too).
    lines = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))
    assert errors.errors
    for error in errors.errors:
        assert 1 <= error.line <= lines + 1 and error.column >= 1, error
        assert str(error).startswith(f"{error.file}:{error.line}:{error.column}: ")


@BOUNDED
@given(trees)
def test_any_yaml_structure_gives_a_config_or_located_errors(tree):
    text = yaml.safe_dump(tree, allow_unicode=True) if isinstance(tree, dict) else yaml.safe_dump({"domains": tree})
    try:
        parse_config(text, "/etc/trackproxy/fuzz.yaml")
    except ConfigErrors as e:
        check_located(text, e)


@BOUNDED
@given(st.text(alphabet=string.printable + "äé\t\x00\x85\u2028", max_size=300))
def test_any_text_gives_a_config_or_located_errors(text):
    try:
        parse_config(text, "/etc/trackproxy/fuzz.yaml")
    except ConfigErrors as e:
        check_located(text, e)


# ---------------------------------------------------------------------------
# Header and host rules

header_names = st.one_of(
    st.sampled_from([n.decode() for n in HOP_BY_HOP] + ["Host", "User-Agent", "X-Forwarded-For", "Cookie", "X-A"]),
    st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12),
).map(lambda n: n.encode())
header_values = st.binary(max_size=40).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
headers = st.lists(st.tuples(header_names.map(lambda n: n.title() if len(n) % 2 else n), header_values),
                   max_size=12)


@BOUNDED
@given(headers, st.booleans(), st.ip_addresses().map(str))
def test_no_hop_by_hop_header_goes_upstream_and_host_comes_first(incoming, trusted, peer):
    connection = [v for n, v in incoming if n.lower() == b"connection"]
    forwarded = [v for n, v in incoming if n.lower() == b"x-forwarded-for"]
    out = upstream_request_headers(incoming, b"t.example", peer, b"https", trusted, connection, forwarded)
    named = {t.strip().lower() for v in connection for t in v.split(b",") if t.strip()}
    names = [n.lower() for n, _ in out]
    assert out[0] == (b"Host", b"t.example") and names.count(b"host") == 1
    assert not (set(names) & HOP_BY_HOP) and not (set(names) & named - {b"host", b"x-forwarded-for",
                                                                         b"x-forwarded-proto", b"x-forwarded-host"})
    xff = [v for n, v in out if n.lower() == b"x-forwarded-for"]
    assert len(xff) == 1 and xff[0].endswith(peer.encode())
    if not trusted:
        assert xff[0] == peer.encode(), "an untrusted peer's claim is replaced"


@BOUNDED
@given(st.binary(max_size=40))
def test_the_routing_key_is_lower_case_ascii_without_port_or_trailing_dot(raw):
    host = normalise_request_host(raw)
    if host is not None:
        assert host == host.lower() and host.isascii() and not host.endswith(".")
        assert ":" not in host or raw.strip().count(b":") > 1


@BOUNDED
@given(st.binary(max_size=60), st.sampled_from(["t.example", "other.example"]))
def test_no_request_target_steers_to_another_host(uri, host):
    target = request_target(uri, host)
    if target is not None:
        assert target.startswith(b"/")
        if not uri.startswith(b"/"):
            authority = uri.partition(b"://")[2].partition(b"/")[0]
            assert normalise_request_host(authority) == host


# ---------------------------------------------------------------------------
# The running proxy, fed arbitrary bytes

VALID = b"GET /f/x HTTP/1.1\r\nHost: track.example.test\r\nUser-Agent: fuzz\r\n\r\n"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, ca, upstream):
    from proxy_process import start_proxy

    config = {
        "limits": {"client_timeout": "2s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {"track.example.test": {"methods": ["GET", "HEAD", "POST"]}},
    }
    proxy = start_proxy(tmp_path_factory.mktemp("fuzz"), config)
    yield proxy
    proxy.stop()


mutations = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=20)).map(
        lambda t: VALID[: t[0]] + t[1] + VALID[t[0]:]),
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)).map(
        lambda t: VALID[: t[0]] + bytes([t[1]]) + VALID[t[0] + 1:]),
    st.sampled_from([b"GET http://evil.example/ HTTP/1.1\r\nHost: track.example.test\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                     b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
                     b"GET / HTTP/1.1\r\nHost: track.example.test\r\nHost: evil.example\r\n\r\n"]),
)


#: How many raw requests the fuzzer sent (for the figure the last test prints).
SENT = [0]


def exchange(port: int, data: bytes) -> bytes:
    SENT[0] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations)
def test_arbitrary_request_bytes_never_get_a_500_and_never_reach_the_platform_for_another_host(fuzzed, upstream, data):
    answer = exchange(fuzzed.http_port, data)
    if answer:
        assert answer.startswith(b"HTTP/1.1 "), answer[:60]
        assert b" 500 " not in answer.split(b"\r\n", 1)[0]
    for seen in upstream.requests:
        host = seen.header("Host")
        assert host == "track.example.test", f"{host!r} reached the platform"


def test_after_the_fuzzing_the_proxy_serves_and_logged_no_traceback(fuzzed, upstream):
    assert fuzzed.process.poll() is None
    assert exchange(fuzzed.http_port, VALID.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")).startswith(
        b"HTTP/1.1 302 ")
    log = fuzzed.log_path.read_text()
    assert "Traceback" not in log and '"level": "critical"' not in log
    print(f"FIGURE fuzzing: {SENT[0]:,} mutated raw requests: no 500, none upstream for another host, "
          "no traceback, still serving")
