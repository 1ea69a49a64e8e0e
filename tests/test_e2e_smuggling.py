"""End to end: a request-smuggling suite, over plain HTTP and TLS, against a POST domain.

From RFC 9112 §6-7 and the published desync research (CL.TE, TE.CL, TE obfuscations,
duplicate and malformed Content-Length, malformed chunk sizes and extensions, obs-fold,
bare LF, NUL): every ambiguous framing is answered 400, the connection closed, and
nothing reaches the platform, neither the request nor what was hidden behind it. The
unambiguous framings (exact Content-Length, chunked with extensions and trailers) reach
it with exactly their body, so body framing is really exercised; the proxy always
forwards with a Content-Length of its own.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from proxy.testing import LocalCA

from proxy_process import ProxyProcess, start_proxy
from standin_upstream import UpstreamStandIn
from wire import TLS, connect

POST = "post.example.test"
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: " + POST.encode() + b"\r\n\r\n"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA, upstream: UpstreamStandIn) -> Iterator[ProxyProcess]:
    config = {
        "limits": {"client_timeout": "2s"},
        "defaults": {"certificate": "self-signed", "cache_ttl": 0},
        "upstreams": {"sparkpost": {"connect_to": upstream.address, "ca_file": str(ca.cert_path)}},
        "domains": {POST: {"methods": ["GET", "HEAD", "POST"]}},
    }
    running = start_proxy(tmp_path_factory.mktemp("smuggling"), config)
    yield running
    running.stop()


def exchange(proxy: ProxyProcess, data: bytes, tls: bool) -> bytes:
    sock = connect(proxy.https_port if tls else proxy.http_port,
                   TLS(POST, proxy.certificate_path(POST)) if tls else None, timeout=5)
    with sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
    return answer


def post(headers: bytes, body: bytes) -> bytes:
    return b"POST /l HTTP/1.1\r\nHost: " + POST.encode() + b"\r\n" + headers + b"\r\n" + body


AMBIGUOUS = {
    # CL.TE and TE.CL: both framings present
    "cl-te": post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-cl": post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
    # TE obfuscations: a final coding other than chunked, or not exactly "chunked"
    "te-identity": post(b"Transfer-Encoding: identity\r\n", HIDDEN),
    "te-chunked-identity": post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"),
    "te-twice": post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-xchunked": post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
    "te-space-before-colon": post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + HIDDEN),
    "te-tab-folded": post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
    "te-vertical-tab": post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"),
    "te-nul": post(b"Transfer-Encoding: chun\x00ked\r\n", b"0\r\n\r\n"),
    # Content-Length: duplicate, signed, listed, not a number
    "cl-twice-different": post(b"Content-Length: 3\r\nContent-Length: 12\r\n", b"abc" + HIDDEN),
    "cl-twice-same": post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"),
    "cl-list": post(b"Content-Length: 3, 3\r\n", b"abc"),
    "cl-plus": post(b"Content-Length: +3\r\n", b"abc"),
    "cl-minus": post(b"Content-Length: -1\r\n", b"abc"),
    "cl-hex": post(b"Content-Length: 0x3\r\n", b"abc"),
    "cl-space-inside": post(b"Content-Length: 1 2\r\n", b"abc"),
    # malformed chunks
    "chunk-size-not-hex": post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-overflow": post(b"Transfer-Encoding: chunked\r\n", b"FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n"),
    "chunk-size-negative": post(b"Transfer-Encoding: chunked\r\n", b"-3\r\nabc\r\n0\r\n\r\n"),
    "chunk-extension-bare-lf": post(b"Transfer-Encoding: chunked\r\n", b"3;x\nabc\r\n0\r\n\r\n"),
    "chunk-data-too-long": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabcdef\r\n0\r\n\r\n"),
    "chunk-bare-lf-after-data": post(b"Transfer-Encoding: chunked\r\n", b"3\r\nabc\n0\r\n\r\n"),
    # header syntax
    "obs-fold": post(b"X-A: a\r\n b\r\nContent-Length: 0\r\n", b""),
    "bare-lf-head": b"POST /l HTTP/1.1\nHost: " + POST.encode() + b"\nContent-Length: 0\n\n",
    "bare-cr": post(b"X-A: a\rContent-Length: 3\r\n", b"abc"),
    "nul-in-value": post(b"X-A: a\x00b\r\nContent-Length: 0\r\n", b""),
    "space-before-colon": post(b"Content-Length : 3\r\n", b"abc"),
    "http-0.9-like": b"POST /l\r\n\r\n",
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_ambiguous_framing_is_refused_and_nothing_reaches_the_platform(proxy, upstream, tls, name):
    before = len(upstream.requests)
    answer = exchange(proxy, AMBIGUOUS[name], tls)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:100]
    assert answer.count(b"HTTP/1.1 ") == 1, "one answer: nothing hidden behind it was served"
    assert upstream.requests[before:] == [], f"reached the platform: {upstream.requests[before:]}"


CLEAR = {
    "content-length": (post(b"Content-Length: 5\r\n", b"hello"), b"hello"),
    "chunked": (post(b"Transfer-Encoding: chunked\r\n", b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"), b"hello"),
    "chunked-extensions": (post(b"Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0;last\r\n\r\n"),
                           b"hello"),
    "chunked-trailer": (post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"),
                        b"hello"),
    "chunked-uppercase-hex": (post(b"Transfer-Encoding: chunked\r\n", b"A\r\n0123456789\r\n0\r\n\r\n"),
                              b"0123456789"),
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("name", sorted(CLEAR))
def test_unambiguous_framing_reaches_the_platform_with_exactly_its_body(proxy, upstream, tls, name):
    data, body = CLEAR[name]
    before = len(upstream.requests)
    answer = exchange(proxy, data + HIDDEN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), tls)
    assert answer.count(b"HTTP/1.1 302 ") == 2, answer[:200]
    seen = upstream.requests[before:]
    assert [r.path for r in seen] == ["/l", "/smuggled"], "two requests, framed as sent"
    assert seen[0].body == body
    assert seen[0].header("Content-Length") == str(len(body)) and seen[0].header("Transfer-Encoding") is None
