"""Tests for ``proxy.config``: YAML in, frozen configuration or located errors out.

The contract is README "Configuration". Every error test checks the exact line and column (1-based)
because ``check-config`` prints them to operators as ``FILE:LINE:COL: message``.
"""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import attrs
import pytest

from proxy.config import (
    DEFAULT_CONFIG_PATH,
    CertificateSpec,
    Config,
    ConfigError,
    ConfigErrors,
    check_endpoint,
    config_path,
    load_config,
    parse_config,
)
from proxy.presets import SES_MAX_HEADER_BYTES, preset_for
from proxy.values import normalise_domain, parse_duration, parse_host_port, parse_size


def _ca_pem() -> bytes:
    """A real (throw-away) certificate: ca_file and ca_bundle must hold one."""
    import datetime

    from proxy import pki

    now = datetime.datetime.now(datetime.UTC)
    authority = pki.Authority.create("config test CA", now, now + datetime.timedelta(days=1))
    return pki.cert_pem(authority.cert)


CA_PEM = _ca_pem()

PATH = "/etc/trackproxy/trackproxy.yaml"
#: Appended to snippets that test some other section, so the file is otherwise valid.
ONE_DOMAIN = "domains: {track.example.com: {}}\n"


def parse(text: str, path: str = PATH) -> Config:
    return parse_config(textwrap.dedent(text), path)


def errors_of(text: str, path: str = PATH) -> tuple[ConfigError, ...]:
    with pytest.raises(ConfigErrors) as info:
        parse(text, path)
    return info.value.errors


def only_error(text: str) -> ConfigError:
    errors = errors_of(text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------
# Values: durations and sizes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("30d", 30 * 86400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("10 s", 10.0),
        (" 10s ", 10.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
        ("0", 0.0),
    ],
)
def test_parse_duration_accepts_units_and_bare_seconds(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["5 minutes", "10S", "10sec", "-5s", -1, -0.5, "", "s", "1,5s", True, False, None],
)
def test_parse_duration_rejects_anything_but_a_non_negative_duration(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64MiB", 64 * 1024 * 1024),
        ("16KiB", 16 * 1024),
        ("1GiB", 1 << 30),
        ("16 KiB", 16 * 1024),
        ("16K", 16 * 1024),
        ("2KB", 2000),
        ("100B", 100),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts_binary_units_and_bytes(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["lots", "64 mebibytes", "1.5MiB", "16kib", "MiB", "-1", -1, "", True, None]
)
def test_parse_size_rejects_junk(value):
    with pytest.raises(ValueError):
        parse_size(value)


# ---------------------------------------------------------------------------
# Host names


LABEL_63 = "a" * 63


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("track.example.com", "track.example.com"),
        ("Track.EXAMPLE.com", "track.example.com"),
        ("track.example.com.", "track.example.com"),
        ("  track.example.com  ", "track.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.example", "a-b.example"),
        ("localhost", "localhost"),
        (f"{LABEL_63}.example", f"{LABEL_63}.example"),
        # 63 + 1 + 63 + 1 + 63 + 1 + 61 = 253 characters: the longest name DNS allows.
        (f"{LABEL_63}.{LABEL_63}.{LABEL_63}.{'a' * 61}", f"{LABEL_63}.{LABEL_63}.{LABEL_63}.{'a' * 61}"),
    ],
)
def test_normalise_domain_lowercases_encodes_idna_and_drops_the_trailing_dot(name, canonical):
    assert normalise_domain(name) == canonical


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("*.example.com", "wildcard"),
        ("track.*.example.com", "wildcard"),
        ("192.0.2.10", "IP address"),
        ("192.0.2.10.", "IP address"),
        ("::1", "not a valid host name"),
        ("", "empty"),
        (".", "empty"),
        ("exa_mple.com", "not a valid host name"),
        ("-track.example.com", "not a valid host name"),
        ("track-.example.com", "not a valid host name"),
        ("track..example.com", "not a valid host name"),
        ("track example.com", "not a valid host name"),
        (f"{'a' * 64}.example", "not a valid host name"),
        (f"{LABEL_63}.{LABEL_63}.{LABEL_63}.{'a' * 62}", "longer than 253"),
        ("a\u200db.example", "not a valid internationalised name"),
    ],
)
def test_normalise_domain_rejects_what_cannot_be_a_tracking_domain(name, reason):
    with pytest.raises(ValueError, match=reason):
        normalise_domain(name)


# ---------------------------------------------------------------------------
# HOST:PORT and endpoint strings


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("127.0.0.1:8443", None, ("127.0.0.1", 8443)),
        ("upstream.internal:443", None, ("upstream.internal", 443)),
        ("[::1]:53", None, ("::1", 53)),
        ("9.9.9.9", 53, ("9.9.9.9", 53)),
        ("[2001:db8::1]", 53, ("2001:db8::1", 53)),
        (" 10.0.0.1:65535 ", None, ("10.0.0.1", 65535)),
    ],
)
def test_parse_host_port_splits_host_and_port(text, default_port, expected):
    assert parse_host_port(text, default_port) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", "has no port"),
        (":443", "has no host"),
        ("host:0", "port must be"),
        ("host:65536", "port must be"),
        ("host:https", "port must be"),
        ("[::1", "not HOST:PORT"),
        ("[::1]x53", "not HOST:PORT"),
    ],
)
def test_parse_host_port_rejects_missing_or_bad_parts(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_host_port(text)


@pytest.mark.parametrize(
    "description",
    [
        "tcp:80",
        "tcp:port=443",
        "tcp:9180:interface=127.0.0.1",
        "tcp:443:backlog=128",
        "tcp6:443:interface=\\:\\:",
        "unix:/run/trackproxy/admin.sock",
        "unix:address=/run/trackproxy/admin.sock:mode=660",
        "systemd:domain=INET:name=http",
        "systemd:domain=INET6:index=0",
    ],
)
def test_check_endpoint_accepts_the_documented_forms(description):
    check_endpoint(description)


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("ssl:443", "unknown endpoint type 'ssl'"),
        ("tls:443", "unknown endpoint type 'tls'"),
        ("443", "unknown endpoint type '443'"),
        ("tcp", "expected tcp:PORT"),
        ("tcp:http", "expected tcp:PORT"),
        ("tcp:70000", "expected tcp:PORT"),
        ("tcp:80:interfce=127.0.0.1", "unknown option 'interfce'"),
        ("unix", "expected unix:PATH"),
        ("systemd:name=http", "domain=INET"),
        ("systemd:domain=INET", "name=... or index="),
    ],
)
def test_check_endpoint_rejects_unknown_types_and_malformed_strings(description, reason):
    with pytest.raises(ValueError, match=reason):
        check_endpoint(description)


# ---------------------------------------------------------------------------
# A whole file


SPEC_EXAMPLE = """\
listen:                      # Twisted server endpoint strings, each a list
  http:  ["tcp:80"]          # e.g. "systemd:domain=INET:name=http" under socket activation
  https: ["tcp:443"]
  admin: ["tcp:9180:interface=127.0.0.1"]
state_dir: /var/lib/trackproxy   # acme-challenge/, certs/, status; created if missing
acme:
  email: ops@example.com
  server: https://acme-v02.api.letsencrypt.org/directory
  key_type: ecdsa            # ecdsa | rsa
  renew_before: 30d
  ca_bundle: null            # CA file to trust for the ACME server (tests: pebble)
defaults:                    # every domain inherits these
  upstream: sparkpost
  certificate: acme          # acme | self-signed | none | {cert: PATH, key: PATH}
  cache_ttl: 10s             # 0 turns the cache off for the domain
  methods: [GET, HEAD]
cache:
  max_entries: 100000
  max_bytes: 64MiB
limits:
  client_timeout: 30s        # idle / header read
  upstream_connect_timeout: 5s
  upstream_timeout: 15s      # whole upstream response
  max_header_bytes: 16KiB
trusted_proxies: []          # CIDRs whose X-Forwarded-For is extended, not replaced
workers: 1                   # processes sharing the listening sockets; "auto" = one per core
log_paths: redacted          # redacted | full (access log; see §7)
resolvers: []                # "HOST:PORT" DNS servers for doctor and pre-flight checks; [] = the system's
upstreams:                   # your own; built-in presets below need no entry
  mytenant:
    url: https://mytenant.et.e.sparkpost.com
    connect_to: null         # "HOST:PORT" to dial instead of DNS (private link, tests)
    ca_file: null            # trust this CA for the upstream instead of the system roots
domains:
  track.example.com: {}
  click.example.com: {upstream: sendgrid, cache_ttl: 5s}
"""


def test_the_spec_example_parses_into_the_documented_values():
    config = parse_config(SPEC_EXAMPLE, PATH)

    assert config.path == PATH
    assert config.listen.http == ("tcp:80",)
    assert config.listen.https == ("tcp:443",)
    assert config.listen.admin == ("tcp:9180:interface=127.0.0.1",)
    assert config.state_dir == "/var/lib/trackproxy"
    assert config.acme.email == "ops@example.com"
    assert config.acme.server == "https://acme-v02.api.letsencrypt.org/directory"
    assert config.acme.key_type == "ecdsa"
    assert config.acme.renew_before == 30 * 86400
    assert config.acme.ca_bundle is None
    assert config.cache.max_entries == 100_000
    assert config.cache.max_bytes == 64 * 1024 * 1024
    assert config.limits.client_timeout == 30
    assert config.limits.upstream_connect_timeout == 5
    assert config.limits.upstream_timeout == 15
    assert config.limits.max_header_bytes == 16 * 1024
    assert config.trusted_proxies == ()
    assert config.workers == 1
    assert config.log_paths == "redacted"
    assert config.resolvers == ()
    assert config.upstreams["mytenant"].origin == "https://mytenant.et.e.sparkpost.com"
    assert config.upstreams["mytenant"].connect_to is None
    assert config.upstreams["mytenant"].ca_file is None
    assert list(config.domains) == ["track.example.com", "click.example.com"]
    track, click = config.domains["track.example.com"], config.domains["click.example.com"]
    assert (track.upstream.name, track.cache_ttl) == ("sparkpost", 10.0)
    assert (click.upstream.name, click.cache_ttl) == ("sendgrid", 5.0)
    assert config.warnings == ()


def test_a_file_with_only_domains_gets_the_documented_defaults():
    config = parse(
        """\
        domains:
          track.example.com:
        """
    )

    assert config.listen.http == ("tcp:80",)
    assert config.listen.https == ("tcp:443",)
    assert config.listen.admin == ("tcp:9180:interface=127.0.0.1",)
    assert config.state_dir == "/var/lib/trackproxy"
    assert config.acme.key_type == "ecdsa"
    assert config.acme.renew_before == 30 * 86400
    assert config.cache.max_bytes == 64 * 1024 * 1024
    assert config.limits.max_header_bytes == 16 * 1024
    assert config.workers == 1
    assert config.log_paths == "redacted"
    domain = config.domains["track.example.com"]
    assert domain.upstream.name == "sparkpost"
    assert domain.upstream.origin == "https://spgo.io"
    assert domain.certificate == CertificateSpec("acme")
    assert domain.cache_ttl == 10.0
    assert domain.methods == ("GET", "HEAD")
    assert domain.allowed_methods == frozenset({b"GET", b"HEAD"})


def test_domain_keys_are_normalised_in_the_config():
    config = parse(
        """\
        domains:
          BÜCHER.Example.: {}
          Track.Example.COM.: {}
        """
    )

    assert list(config.domains) == ["xn--bcher-kva.example", "track.example.com"]
    assert config.domains["track.example.com"].name == "track.example.com"


@pytest.mark.parametrize(
    ("text", "attribute", "expected"),
    [
        ("http: tcp:8080", "http", ("tcp:8080",)),
        ("http: [tcp:8080, tcp6:8080]", "http", ("tcp:8080", "tcp6:8080")),
        ("https: ['systemd:domain=INET:name=https']", "https", ("systemd:domain=INET:name=https",)),
        ("admin: []", "admin", ()),
    ],
)
def test_listen_takes_a_list_or_a_single_endpoint(text, attribute, expected):
    config = parse("listen: {" + text + "}\n" + ONE_DOMAIN)

    assert getattr(config.listen, attribute) == expected


@pytest.mark.parametrize(
    ("value", "workers"),
    [("auto", None), ("1", 1), ("4", 4)],
)
def test_workers_is_a_count_or_auto_for_one_per_core(value, workers):
    assert parse(f"workers: {value}\n" + ONE_DOMAIN).workers == workers


def test_trusted_proxies_become_networks():
    config = parse("trusted_proxies: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7, 172.16.0.1/12]\n" + ONE_DOMAIN)

    assert config.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("172.16.0.0/12"),
    )


def test_resolvers_are_ip_and_port_with_53_by_default():
    config = parse("resolvers: ['9.9.9.9:5353', 1.1.1.1, '[2606:4700:4700::1111]:53']\n" + ONE_DOMAIN)

    assert config.resolvers == (("9.9.9.9", 5353), ("1.1.1.1", 53), ("2606:4700:4700::1111", 53))


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("0", 0.0), ("0s", 0.0), ("1", 1.0), ("1s", 1.0), ("1500ms", 1.5), ("5m", 300.0)],
)
def test_cache_ttl_of_zero_turns_the_cache_off_and_a_second_or_more_is_accepted(ttl, seconds):
    config = parse(f"domains: {{track.example.com: {{cache_ttl: {ttl}}}}}\n")

    assert config.domains["track.example.com"].cache_ttl == seconds


def test_methods_are_upper_cased_and_deduplicated():
    config = parse("domains: {track.example.com: {methods: [get, HEAD, Get, post]}}\n")

    domain = config.domains["track.example.com"]
    assert domain.methods == ("GET", "HEAD", "POST")
    assert domain.allowed_methods == frozenset({b"GET", b"HEAD", b"POST"})


def test_a_custom_upstream_keeps_its_port_and_connect_to():
    config = parse(
        """\
        upstreams:
          mytenant:
            url: https://MyTenant.et.e.sparkpost.com:8443/
            connect_to: "[::1]:9443"
        domains:
          track.example.com: {upstream: mytenant}
        """
    )

    upstream = config.domains["track.example.com"].upstream
    assert (upstream.scheme, upstream.host, upstream.port) == ("https", "mytenant.et.e.sparkpost.com", 8443)
    assert upstream.origin == "https://mytenant.et.e.sparkpost.com:8443"
    assert upstream.connect_to == ("::1", 9443)
    assert upstream.dial == ("::1", 9443)
    assert config.upstreams["mytenant"] is upstream


# ---------------------------------------------------------------------------
# Inheritance


INHERITANCE = """\
defaults:
  upstream: sendgrid
  certificate: self-signed
  cache_ttl: 30s
  methods: [GET, HEAD, OPTIONS]
domains:
  inherits.example.com: {}
  overrides.example.com:
    upstream: sparkpost-eu
    certificate: none
    cache_ttl: 0
    methods: [GET]
"""


@pytest.mark.parametrize(
    ("read", "inherited", "overridden"),
    [
        (lambda d: d.upstream.name, "sendgrid", "sparkpost-eu"),
        (lambda d: d.upstream.origin, "https://sendgrid.net", "https://eu.spgo.io"),
        (lambda d: d.certificate, CertificateSpec("self-signed"), CertificateSpec("none")),
        (lambda d: d.cache_ttl, 30.0, 0.0),
        (lambda d: d.methods, ("GET", "HEAD", "OPTIONS"), ("GET",)),
    ],
    ids=["upstream", "upstream-url", "certificate", "cache_ttl", "methods"],
)
def test_domains_inherit_defaults_and_their_own_keys_override(read, inherited, overridden):
    config = parse_config(INHERITANCE, PATH)

    assert read(config.domains["inherits.example.com"]) == inherited
    assert read(config.domains["overrides.example.com"]) == overridden


def test_a_domain_overriding_one_key_inherits_the_others():
    config = parse(
        """\
        defaults: {upstream: sendgrid, cache_ttl: 30s}
        domains:
          track.example.com: {cache_ttl: 5s}
        """
    )

    domain = config.domains["track.example.com"]
    assert (domain.upstream.name, domain.cache_ttl) == ("sendgrid", 5.0)


def test_defaults_may_name_a_custom_upstream():
    config = parse(
        """\
        defaults: {upstream: mytenant}
        upstreams:
          mytenant: {url: https://mytenant.et.e.sparkpost.com}
        domains:
          track.example.com: {}
        """
    )

    assert config.domains["track.example.com"].upstream is config.upstreams["mytenant"]


PRESET_URLS = [
    ("sparkpost", "https://spgo.io"),
    ("sparkpost-eu", "https://eu.spgo.io"),
    ("sparkpost-v2", "https://v2.spgo.io"),
    ("sparkpost-eu-v2", "https://eu.v2.spgo.io"),
    ("sendgrid", "https://sendgrid.net"),
    ("mailgun", "http://mailgun.org"),
    ("mailgun-eu", "http://eu.mailgun.org"),
    ("ses-us-east-1", "https://r.us-east-1.awstrack.me"),
    ("ses-eu-west-1", "https://r.eu-west-1.awstrack.me"),
    ("ses-us-gov-west-1", "https://r.us-gov-west-1.awstrack.me"),
    ("customerio", "https://track.customer.io"),
    ("customerio-eu", "https://track-eu.customer.io"),
    ("iterable", "https://links.iterable.com"),
    ("iterable-eu", "https://links.eu.iterable.com"),
]


@pytest.mark.parametrize(("name", "url"), PRESET_URLS)
def test_preset_for_knows_every_platform_in_the_spec(name, url):
    assert preset_for(name).url == url


@pytest.mark.parametrize(("name", "url"), PRESET_URLS)
def test_a_domain_naming_a_preset_needs_no_upstreams_entry(name, url):
    config = parse(f"domains: {{track.example.com: {{upstream: {name}}}}}\n")

    upstream = config.domains["track.example.com"].upstream
    assert upstream.name == name
    assert upstream.origin == url
    assert upstream.probe_path == "/f/a/b/c/d"
    assert config.upstreams[name] is upstream


@pytest.mark.parametrize("name", ["ses", "ses-", "ses-US-EAST-1", "ses-useast1", "sparkpost-us", "spgo"])
def test_preset_for_returns_none_for_unknown_names(name):
    assert preset_for(name) is None


@pytest.mark.parametrize(
    ("name", "header_limit"),
    [("ses-us-east-1", SES_MAX_HEADER_BYTES), ("ses-ap-southeast-2", 8192), ("sparkpost", None), ("iterable", None)],
)
def test_only_ses_upstreams_carry_the_8kib_request_header_limit(name, header_limit):
    assert SES_MAX_HEADER_BYTES == 8 * 1024
    config = parse(f"domains: {{track.example.com: {{upstream: {name}}}}}\n")

    assert config.domains["track.example.com"].upstream.max_request_header_bytes == header_limit


@pytest.mark.parametrize(
    ("name", "methods"),
    [
        ("iterable", ("GET", "HEAD", "POST")),
        ("iterable-eu", ("GET", "HEAD", "POST")),
        ("sparkpost", ("GET", "HEAD")),
        ("sendgrid", ("GET", "HEAD")),
    ],
)
def test_iterable_domains_allow_post_by_default_and_others_do_not(name, methods):
    config = parse(f"domains: {{track.example.com: {{upstream: {name}}}}}\n")

    assert config.domains["track.example.com"].methods == methods


def test_a_domain_own_methods_override_the_iterable_preset():
    config = parse("domains: {track.example.com: {upstream: iterable, methods: [GET]}}\n")

    assert config.domains["track.example.com"].methods == ("GET",)


def test_overriding_a_preset_with_only_connect_to_and_ca_file_keeps_the_preset_url(tmp_path):
    (tmp_path / "pebble-ca.pem").write_bytes(CA_PEM)
    path = write(
        tmp_path / "trackproxy.yaml",
        """\
        upstreams:
          sparkpost:
            connect_to: 127.0.0.1:8443
            ca_file: pebble-ca.pem
          ses-us-east-1:
            connect_to: 127.0.0.1:9443
        domains:
          track.example.com: {}
          ses.example.com: {upstream: ses-us-east-1}
        """,
    )

    config = load_config(path)

    sparkpost = config.domains["track.example.com"].upstream
    assert sparkpost.origin == "https://spgo.io"
    assert sparkpost.connect_to == ("127.0.0.1", 8443)
    assert sparkpost.dial == ("127.0.0.1", 8443)
    assert sparkpost.ca_file == str(tmp_path / "pebble-ca.pem")
    ses = config.domains["ses.example.com"].upstream
    assert ses.origin == "https://r.us-east-1.awstrack.me"
    assert ses.connect_to == ("127.0.0.1", 9443)
    assert ses.max_request_header_bytes == 8192


def test_overriding_a_preset_url_replaces_it():
    config = parse(
        """\
        upstreams:
          sparkpost: {url: "https://127.0.0.1:8443"}
        domains:
          track.example.com: {}
        """
    )

    assert config.domains["track.example.com"].upstream.origin == "https://127.0.0.1:8443"


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("domains:\n  track.example.com: {upstream: mailgun}\n", 2, 33),
        ("domains:\n  track.example.com:\n    upstream: mailgun-eu\n", 3, 15),
        ("defaults:\n  upstream: mailgun\ndomains:\n  track.example.com: {}\n", 2, 13),
        (
            "upstreams:\n  plain: {url: 'http://tracking.internal'}\n"
            "domains:\n  track.example.com: {upstream: plain}\n",
            4,
            33,
        ),
    ],
    ids=["mailgun-inline", "mailgun-eu-block", "mailgun-from-defaults", "custom-http"],
)
def test_a_plain_http_upstream_is_accepted_with_a_warning_at_its_line(text, line, column):
    config = parse(text)

    assert len(config.warnings) == 1
    warning = config.warnings[0]
    assert (warning.file, warning.line, warning.column) == (PATH, line, column)
    assert "plain http://" in warning.message
    assert "track.example.com" in warning.message
    assert str(warning).startswith(f"{PATH}:{line}:{column}: warning: ")


def test_https_upstreams_give_no_warnings():
    config = parse("domains: {a.example: {upstream: sendgrid}, b.example: {upstream: ses-us-east-1}}\n")

    assert config.warnings == ()


# ---------------------------------------------------------------------------
# Relative paths


def test_relative_paths_resolve_against_the_yaml_files_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    (conf_dir / "ca").mkdir(parents=True)
    (conf_dir / "ca" / "upstream.pem").write_bytes(CA_PEM)
    (conf_dir / "ca" / "pebble.pem").write_bytes(CA_PEM)
    path = write(
        conf_dir / "trackproxy.yaml",
        """\
        state_dir: state
        acme:
          ca_bundle: ca/pebble.pem
        defaults:
          certificate: {cert: certs/track.pem, key: ./certs/../keys/track.key}
        upstreams:
          mytenant:
            url: https://mytenant.et.e.sparkpost.com
            ca_file: ca/upstream.pem
        domains:
          track.example.com: {upstream: mytenant}
          abs.example.com:
            certificate: {cert: /srv/abs.pem, key: /srv/abs.key}
        """,
    )
    # Relative to the file, never to wherever the command happens to run.
    monkeypatch.chdir(tmp_path)

    config = load_config(path)

    assert config.state_dir == str(conf_dir / "state")
    assert config.acme.ca_bundle == str(conf_dir / "ca" / "pebble.pem")
    track = config.domains["track.example.com"]
    assert track.certificate == CertificateSpec(
        "files", cert=str(conf_dir / "certs" / "track.pem"), key=str(conf_dir / "keys" / "track.key")
    )
    assert track.certificate.source == "files"
    assert track.upstream.ca_file == str(conf_dir / "ca" / "upstream.pem")
    assert config.domains["abs.example.com"].certificate == CertificateSpec(
        "files", cert="/srv/abs.pem", key="/srv/abs.key"
    )


def test_a_relative_config_path_still_resolves_against_its_own_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "local.yaml", "state_dir: local-state\n" + ONE_DOMAIN)
    monkeypatch.chdir(tmp_path)

    config = load_config(os.path.join("conf", "local.yaml"))

    assert config.state_dir == str(tmp_path / "conf" / "local-state")


# ---------------------------------------------------------------------------
# Errors: every class, with its exact place


def test_config_error_prints_as_file_line_column_message():
    error = ConfigError("/etc/t.yaml", 4, 3, "domains: something")

    assert str(error) == "/etc/t.yaml:4:3: domains: something"
    assert str(ConfigErrors([error, ConfigError("/etc/t.yaml", 9, 1, "x")])) == (
        "/etc/t.yaml:4:3: domains: something\n/etc/t.yaml:9:1: x"
    )


@pytest.mark.parametrize(
    ("text", "line", "column", "fragments"),
    [
        pytest.param(
            """\
            domains:
              track.example.com: {}
             listen: {}
            """,
            3, 2, ["YAML:"], id="yaml-bad-indentation",
        ),
        pytest.param(
            """\
            domains:
              track.example.com: {upstream: [sendgrid
            """,
            3, 1, ["YAML:"], id="yaml-unclosed-flow",
        ),
        pytest.param("domains:\n\ttrack.example.com: {}\n", 2, 1, ["YAML:", "'\\t'"], id="yaml-tab"),
        pytest.param("", 1, 1, ["empty"], id="empty-file"),
        pytest.param("# only a comment\n\n", 1, 1, ["empty"], id="comment-only-file"),
        pytest.param("- track.example.com\n", 1, 1, ["top level must be a mapping"], id="top-level-list"),
        pytest.param("track.example.com\n", 1, 1, ["top level must be a mapping"], id="top-level-scalar"),
        pytest.param(
            """\
            workers: 1
            domian: {}
            """ + ONE_DOMAIN,
            2, 1, ["the top level: unknown key 'domian'", "did you mean 'domains'?", "allowed: acme,"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            """\
            workers: 1
            colour: blue
            """ + ONE_DOMAIN,
            2, 1, ["the top level: unknown key 'colour'"], id="unknown-top-level-key-without-hint",
        ),
        pytest.param(
            """\
            listen:
              http: [tcp:80]
              htps: [tcp:443]
            """ + ONE_DOMAIN,
            3, 3, ["listen: unknown key 'htps'", "did you mean 'https'?"], id="unknown-key-in-listen",
        ),
        pytest.param(
            """\
            acme:
              emial: ops@example.com
            """ + ONE_DOMAIN,
            2, 3, ["acme: unknown key 'emial'", "did you mean 'email'?"], id="unknown-key-in-acme",
        ),
        pytest.param(
            """\
            cache:
              max_entry: 10
            """ + ONE_DOMAIN,
            2, 3, ["cache: unknown key 'max_entry'", "did you mean 'max_entries'?"], id="unknown-key-in-cache",
        ),
        pytest.param(
            """\
            limits:
              client_timout: 10s
            """ + ONE_DOMAIN,
            2, 3, ["limits: unknown key 'client_timout'", "did you mean 'client_timeout'?"],
            id="unknown-key-in-limits",
        ),
        pytest.param(
            """\
            defaults:
              upstream: sendgrid
              cache_tll: 5s
            """ + ONE_DOMAIN,
            3, 3, ["defaults: unknown key 'cache_tll'", "did you mean 'cache_ttl'?"],
            id="unknown-key-in-defaults",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                cache_ttl: 5s
                upstrem: sendgrid
            """,
            4, 5, ["domains.track.example.com: unknown key 'upstrem'", "did you mean 'upstream'?"],
            id="unknown-key-in-domain",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: https://mytenant.et.e.sparkpost.com
                conect_to: 127.0.0.1:443
            """ + ONE_DOMAIN,
            4, 5, ["upstreams.mytenant: unknown key 'conect_to'", "did you mean 'connect_to'?"],
            id="unknown-key-in-upstream",
        ),
        pytest.param(
            """\
            workers: 1
            log_paths: full
            workers: 2
            """ + ONE_DOMAIN,
            3, 1, ["duplicate key 'workers'"], id="duplicate-top-level-key",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                cache_ttl: 5s
                cache_ttl: 10s
            """,
            4, 5, ["domains.track.example.com: duplicate key 'cache_ttl'"], id="duplicate-domain-key",
        ),
        pytest.param(
            """\
            domains:
              track.example.com: {}
              track.example.com: {}
            """,
            3, 3, ["domains: duplicate key 'track.example.com'"], id="duplicate-domain-verbatim",
        ),
        pytest.param(
            """\
            listen:
              https:
                - ssl:443
            """ + ONE_DOMAIN,
            3, 7, ["listen.https[0]", "unknown endpoint type 'ssl'"], id="bad-endpoint-type",
        ),
        pytest.param(
            """\
            listen:
              http: [tcp:80, 'tcp:eighty']
            """ + ONE_DOMAIN,
            2, 18, ["listen.http[1]", "expected tcp:PORT"], id="bad-endpoint-port",
        ),
        pytest.param(
            """\
            limits:
              client_timeout: 5 minutes
            """ + ONE_DOMAIN,
            2, 19, ["limits.client_timeout", "'5 minutes' is not a duration"], id="bad-duration",
        ),
        pytest.param(
            """\
            acme:
              renew_before: -30d
            """ + ONE_DOMAIN,
            2, 17, ["acme.renew_before", "is not a duration"], id="negative-duration",
        ),
        pytest.param(
            """\
            limits:
              upstream_timeout: 0
            """ + ONE_DOMAIN,
            2, 21, ["limits.upstream_timeout must be more than 0"], id="zero-timeout",
        ),
        pytest.param(
            """\
            limits:
              upstream_timeout: true
            """ + ONE_DOMAIN,
            2, 21, ["limits.upstream_timeout", "expected a duration"], id="boolean-duration",
        ),
        pytest.param(
            """\
            cache:
              max_entries: 10
              max_bytes: lots
            """ + ONE_DOMAIN,
            3, 14, ["cache.max_bytes", "'lots' is not a size"], id="bad-size",
        ),
        pytest.param(
            """\
            cache:
              max_bytes: 0
            """ + ONE_DOMAIN,
            2, 14, ["cache.max_bytes must be more than 0"], id="zero-size",
        ),
        pytest.param(
            """\
            limits:
              max_header_bytes: 512
            """ + ONE_DOMAIN,
            2, 21, ["limits.max_header_bytes must be at least 1KiB"], id="header-limit-too-small",
        ),
        pytest.param(
            """\
            cache:
              max_entries: 0
            """ + ONE_DOMAIN,
            2, 16, ["cache.max_entries must be a whole number of at least 1"], id="zero-cache-entries",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                cache_ttl: 0.5
            """,
            3, 16, ["domains.track.example.com.cache_ttl", "use 0 to turn the cache off, or at least 1s"],
            id="cache-ttl-half-second",
        ),
        pytest.param(
            """\
            defaults:
              cache_ttl: 500ms
            """ + ONE_DOMAIN,
            2, 14, ["defaults.cache_ttl", "at least 1s"], id="cache-ttl-500ms-in-defaults",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                upstream: sparkpots
            """,
            3, 15, ["domains.track.example.com: unknown upstream 'sparkpots'", "built-in preset"],
            id="unknown-upstream",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: https://mytenant.et.e.sparkpost.com/f/a/b/c/d
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "origin only"], id="upstream-url-with-path",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: https://mytenant.et.e.sparkpost.com/?x=1
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "origin only"], id="upstream-url-with-query",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: ftp://mytenant.et.e.sparkpost.com
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "scheme must be https"], id="upstream-url-bad-scheme",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: mytenant.et.e.sparkpost.com
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "scheme must be https"], id="upstream-url-no-scheme",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: https://user:secret@mytenant.et.e.sparkpost.com
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "credentials"], id="upstream-url-credentials",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                url: https://mytenant.et.e.sparkpost.com:99999
            """ + ONE_DOMAIN,
            3, 10, ["upstreams.mytenant.url", "invalid port"], id="upstream-url-bad-port",
        ),
        pytest.param(
            """\
            upstreams:
              mytenant:
                connect_to: 10.0.0.5:443
            """ + ONE_DOMAIN,
            2, 3, ["upstreams.mytenant: url is required"], id="custom-upstream-without-url",
        ),
        pytest.param(
            """\
            upstreams:
              MyTenant:
                url: https://mytenant.et.e.sparkpost.com
            """ + ONE_DOMAIN,
            2, 3, ["upstreams.MyTenant: names are lower-case"], id="upstream-name-upper-case",
        ),
        pytest.param(
            """\
            upstreams:
              sparkpost:
                connect_to: 127.0.0.1
            """ + ONE_DOMAIN,
            3, 17, ["upstreams.sparkpost.connect_to", "has no port"], id="connect-to-without-port",
        ),
        pytest.param(
            """\
            upstreams:
              sparkpost:
                ca_file: /nonexistent/trackproxy/ca.pem
            """ + ONE_DOMAIN,
            3, 14, ["upstreams.sparkpost.ca_file", "no such file", "/nonexistent/trackproxy/ca.pem"],
            id="ca-file-missing",
        ),
        pytest.param(
            """\
            acme:
              ca_bundle: /nonexistent/pebble.pem
            """ + ONE_DOMAIN,
            2, 14, ["acme.ca_bundle", "no such file"], id="acme-ca-bundle-missing",
        ),
        pytest.param(
            """\
            acme:
              server: http://localhost:14000/dir
            """ + ONE_DOMAIN,
            2, 11, ["acme.server must be an https:// ACME directory URL"], id="acme-server-not-https",
        ),
        pytest.param(
            """\
            acme:
              key_type: dsa
            """ + ONE_DOMAIN,
            2, 13, ["acme.key_type must be one of: ecdsa, rsa"], id="acme-key-type",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                certificate:
                  cert: /etc/ssl/track.pem
            """,
            4, 7, ["domains.track.example.com.certificate", "missing key"], id="certificate-missing-key",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                certificate: {key: /etc/ssl/track.key}
            """,
            3, 18, ["domains.track.example.com.certificate", "missing cert"], id="certificate-missing-cert",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                certificate: {cert: a.pem, key: a.key, chain: c.pem}
            """,
            3, 44, ["domains.track.example.com.certificate: unknown key 'chain'"],
            id="certificate-unknown-key",
        ),
        pytest.param(
            """\
            defaults:
              certificate: letsencrypt
            """ + ONE_DOMAIN,
            2, 16, ["defaults.certificate must be one of: acme, self-signed, none"],
            id="certificate-kind-unknown",
        ),
        pytest.param(
            """\
            domains:
              track.example.com:
                methods: [GET, HEAD, TRACE]
            """,
            3, 26, ["domains.track.example.com.methods[2]", "'TRACE' is not an allowed method"],
            id="method-trace",
        ),
        pytest.param(
            """\
            defaults:
              methods: [GET, connect]
            """ + ONE_DOMAIN,
            2, 18, ["defaults.methods[1]", "'CONNECT' is not an allowed method"], id="method-connect",
        ),
        pytest.param(
            """\
            defaults:
              methods: GET
            """ + ONE_DOMAIN,
            2, 12, ["defaults.methods must be a list"], id="methods-not-a-list",
        ),
        pytest.param(
            """\
            log_paths: redacted
            workers: many
            """ + ONE_DOMAIN,
            2, 10, ["workers", "a number or \"auto\"", "at least 1"], id="workers-many",
        ),
        pytest.param("workers: 0\n" + ONE_DOMAIN, 1, 10, ["workers", "at least 1"], id="workers-zero"),
        pytest.param("workers: 2.5\n" + ONE_DOMAIN, 1, 10, ["workers", "at least 1"], id="workers-fraction"),
        pytest.param("workers: true\n" + ONE_DOMAIN, 1, 10, ["workers", "at least 1"], id="workers-boolean"),
        pytest.param(
            "log_paths: everything\n" + ONE_DOMAIN,
            1, 12, ["log_paths must be one of: redacted, full"], id="log-paths",
        ),
        pytest.param(
            """\
            trusted_proxies:
              - 10.0.0.0/8
              - 10.0.0.0/33
            """ + ONE_DOMAIN,
            3, 5, ["trusted_proxies[1]", "10.0.0.0/33"], id="trusted-proxies-bad-prefix",
        ),
        pytest.param(
            "trusted_proxies: [office]\n" + ONE_DOMAIN,
            1, 19, ["trusted_proxies[0]", "office"], id="trusted-proxies-not-a-cidr",
        ),
        pytest.param(
            "resolvers: ['9.9.9.9:53', 'dns.google:53']\n" + ONE_DOMAIN,
            1, 27, ["resolvers[1]", "expected IP:PORT of a DNS server"], id="resolver-host-name",
        ),
        pytest.param(
            "resolvers: ['9.9.9.9:0']\n" + ONE_DOMAIN,
            1, 13, ["resolvers[0]", "port must be"], id="resolver-port-zero",
        ),
        pytest.param("workers: 1\n", 1, 1, ["domains: at least one tracking domain is required"], id="missing-domains"),
        pytest.param(
            "workers: 1\ndomains: {}\n",
            2, 10, ["domains: at least one tracking domain is required"], id="empty-domains",
        ),
        pytest.param(
            "domains: [track.example.com]\n", 1, 10, ["domains must be a mapping"], id="domains-as-a-list",
        ),
        pytest.param(
            """\
            domains:
              A.example: {}
              a.example.: {}
            """,
            3, 3, ["'a.example.' is the same domain as 'a.example'"], id="duplicate-domain-normalised",
        ),
        pytest.param(
            """\
            domains:
              track.example.com: {}
              '*.example.com': {}
            """,
            3, 3, ["domains:", "wildcard"], id="wildcard-domain",
        ),
        pytest.param(
            """\
            domains:
              track.example.com: {}
              192.0.2.10: {}
            """,
            3, 3, ["domains:", "'192.0.2.10' is an IP address"], id="ip-address-domain",
        ),
        pytest.param(
            """\
            domains:
              track_1.example.com: {}
            """,
            2, 3, ["domains:", "'track_1.example.com' is not a valid host name"], id="bad-label-domain",
        ),
        pytest.param(
            "listen: [tcp:80]\n" + ONE_DOMAIN, 1, 9, ["listen must be a mapping"], id="section-not-a-mapping",
        ),
        pytest.param(
            "state_dir: [a, b]\n" + ONE_DOMAIN, 1, 12, ["state_dir must be a non-empty string"], id="state-dir-list",
        ),
    ],
)
def test_each_error_names_its_file_line_column_and_key(text, line, column, fragments):
    error = only_error(text)

    assert (error.file, error.line, error.column) == (PATH, line, column), str(error)
    for fragment in fragments:
        assert fragment in error.message, str(error)
    assert str(error) == f"{PATH}:{line}:{column}: {error.message}"


def test_a_misspelt_domains_key_is_named_with_a_hint_and_the_domains_are_missing():
    errors = errors_of(
        """\
        workers: 1
        domain:
          track.example.com: {}
        """
    )

    assert [(e.line, e.column) for e in errors] == [(1, 1), (2, 1)]
    assert errors[0].message == "domains: at least one tracking domain is required"
    assert errors[1].message.startswith("the top level: unknown key 'domain' (did you mean 'domains'?); allowed: ")


def test_a_yaml_error_is_the_only_error_reported():
    errors = errors_of("workers: many\nbogus: 1\ndomains: {track.example.com: {upstream: [}\n")

    assert len(errors) == 1
    assert errors[0].message.startswith("YAML: ")


def test_several_errors_in_one_file_are_all_reported_in_line_order():
    errors = errors_of(
        """\
        domains:
          track.example.com:
            cache_ttl: 0.5
            methods: [GET, TRACE]
          click.example.com: {upstream: nope}
        listen:
          http: [ssl:80]
        workers: many
        trusted_proxies: [10.0.0.0/33]
        resolvers: [dns.example:53]
        bogus: 1
        """
    )

    assert [(e.line, e.column) for e in errors] == [
        (3, 16),
        (4, 20),
        (5, 33),
        (7, 10),
        (8, 10),
        (9, 19),
        (10, 13),
        (11, 1),
    ]
    assert len(errors) == 8
    assert all(e.file == PATH for e in errors)


def test_an_error_does_not_hide_valid_values_of_other_sections():
    errors = errors_of(
        """\
        cache: {max_bytes: lots}
        limits: {client_timeout: forever}
        """ + ONE_DOMAIN
    )

    assert [e.message.split(":")[0] for e in errors] == ["cache.max_bytes", "limits.client_timeout"]


def test_a_cache_ttl_below_one_second_is_refused_but_zero_is_accepted():
    config = parse("domains: {off.example.com: {cache_ttl: 0}}\n")
    assert config.domains["off.example.com"].cache_ttl == 0.0

    error = only_error("domains: {on.example.com: {cache_ttl: 0.999}}\n")
    assert "cache_ttl" in error.message


def test_a_ca_file_on_a_plain_http_upstream_is_refused(tmp_path):
    (tmp_path / "ca.pem").write_bytes(CA_PEM)
    path = write(
        tmp_path / "t.yaml",
        """\
        upstreams:
          mailgun:
            ca_file: ca.pem
        domains:
          track.example.com: {upstream: mailgun}
        """,
    )

    with pytest.raises(ConfigErrors) as info:
        load_config(path)

    [error] = info.value.errors
    assert (error.line, error.column) == (3, 5)
    assert "upstreams.mailgun.ca_file: has no meaning for an http:// upstream" in error.message


@pytest.mark.parametrize("content, problem", [(b"x\n", "holds no PEM certificate"), (b"", "holds no PEM certificate")])
def test_a_ca_file_without_a_certificate_is_refused_where_it_is_named(tmp_path, content, problem):
    (tmp_path / "ca.pem").write_bytes(content)
    with pytest.raises(ConfigErrors) as e:
        parse(f"upstreams: {{sendgrid: {{ca_file: {tmp_path / 'ca.pem'}}}}}\n" + ONE_DOMAIN)
    (error,) = e.value.errors
    assert (error.line, error.column) == (1, 33) and problem in error.message


def test_an_existing_ca_file_is_accepted(tmp_path):
    (tmp_path / "ca.pem").write_bytes(CA_PEM)
    config = parse(f"upstreams: {{sendgrid: {{ca_file: {tmp_path / 'ca.pem'}}}}}\n" + ONE_DOMAIN)

    assert config.upstreams["sendgrid"].ca_file == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("workers: !!int many\n" + ONE_DOMAIN, 1, 10),
        ("state_dir: !secret vault\n" + ONE_DOMAIN, 1, 12),
        ("workers: !!python/name:os.system\n" + ONE_DOMAIN, 1, 10),
        ("base: &b {cache_ttl: 5s}\ndomains:\n  track.example.com:\n    <<: *b\n", 4, 5),
    ],
    ids=["bad-int-tag", "unknown-local-tag", "python-tag", "merge-key"],
)
def test_yaml_tags_the_reader_cannot_construct_are_located_errors(text, line, column):
    errors = errors_of(text)

    assert (errors[-1].line, errors[-1].column) == (line, column)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_parse_duration_rejects_nan_and_infinity(value):
    with pytest.raises(ValueError):
        parse_duration(value)


# ---------------------------------------------------------------------------
# Reading the file


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.yaml", "No such file or directory"),
        (lambda d: d, "Is a directory"),
    ],
    ids=["missing", "directory"],
)
def test_an_unreadable_file_is_one_error_at_line_one(tmp_path, make, reason):
    path = str(make(tmp_path))

    with pytest.raises(ConfigErrors) as info:
        load_config(path)

    assert [str(e) for e in info.value.errors] == [f"{path}:1:1: cannot read the file: {reason}"]


def test_a_file_that_is_not_utf8_is_one_error_at_line_one(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("domains: {bücher.example: {}}\n".encode("latin-1"))

    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))

    [error] = info.value.errors
    assert (error.file, error.line, error.column) == (str(path), 1, 1)
    assert error.message.startswith("cannot read the file: ")
    assert "utf-8" in error.message


def test_load_config_names_the_file_in_errors(tmp_path):
    path = write(tmp_path / "t.yaml", "workers: many\n" + ONE_DOMAIN)

    with pytest.raises(ConfigErrors) as info:
        load_config(path)

    assert str(info.value).startswith(f"{path}:1:10: ")


# ---------------------------------------------------------------------------
# Immutability


FROZEN_CONFIG = """\
upstreams:
  mytenant: {url: https://mytenant.et.e.sparkpost.com}
domains:
  track.example.com: {upstream: mytenant}
"""


@pytest.mark.parametrize(
    ("read", "attribute"),
    [
        (lambda c: c, "workers"),
        (lambda c: c, "domains"),
        (lambda c: c.listen, "http"),
        (lambda c: c.acme, "email"),
        (lambda c: c.cache, "max_bytes"),
        (lambda c: c.limits, "client_timeout"),
        (lambda c: c.domains["track.example.com"], "cache_ttl"),
        (lambda c: c.domains["track.example.com"].certificate, "kind"),
        (lambda c: c.upstreams["mytenant"], "host"),
        (lambda c: c.warnings, None),
    ],
    ids=["config", "config-domains", "listen", "acme", "cache", "limits", "domain", "certificate",
         "upstream", "warnings"],
)
def test_config_objects_are_frozen(read, attribute):
    target = read(parse_config(FROZEN_CONFIG, PATH))

    if attribute is None:
        assert isinstance(target, tuple)
        return
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(target, attribute, None)


@pytest.mark.parametrize("mapping", ["domains", "upstreams"])
def test_domain_and_upstream_mappings_are_read_only(mapping):
    config = parse_config(FROZEN_CONFIG, PATH)
    table = getattr(config, mapping)
    some_key = next(iter(table))

    with pytest.raises(TypeError):
        table["new.example.com"] = table[some_key]
    with pytest.raises(TypeError):
        del table[some_key]


@pytest.mark.parametrize(
    "read",
    [
        lambda c: c.listen.http,
        lambda c: c.trusted_proxies,
        lambda c: c.resolvers,
        lambda c: c.domains["track.example.com"].methods,
    ],
    ids=["listen", "trusted_proxies", "resolvers", "methods"],
)
def test_sequences_in_the_config_are_tuples(read):
    config = parse(
        """\
        trusted_proxies: [10.0.0.0/8]
        resolvers: [9.9.9.9]
        domains:
          track.example.com: {methods: [GET]}
        """
    )

    assert isinstance(read(config), tuple)


# ---------------------------------------------------------------------------
# Which file


def test_config_path_prefers_the_explicit_file(monkeypatch):
    monkeypatch.setenv("TRACKPROXY_CONFIG", "/srv/env.yaml")

    assert config_path("/srv/explicit.yaml") == "/srv/explicit.yaml"


def test_config_path_honours_the_environment_variable(monkeypatch):
    monkeypatch.setenv("TRACKPROXY_CONFIG", "/srv/env.yaml")

    assert config_path(None) == "/srv/env.yaml"


@pytest.mark.parametrize("env", [None, ""])
def test_config_path_falls_back_to_the_system_file(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("TRACKPROXY_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TRACKPROXY_CONFIG", env)

    assert config_path(None) == DEFAULT_CONFIG_PATH == "/etc/trackproxy/trackproxy.yaml"


def test_iterable_keeps_post_even_when_defaults_list_methods():
    config = parse("defaults: {methods: [GET, HEAD]}\ndomains: {pay.example.com: {upstream: iterable}}\n")

    assert config.domains["pay.example.com"].methods == ("GET", "HEAD", "POST")


def test_a_domain_listing_its_own_methods_gets_exactly_those():
    config = parse("domains: {pay.example.com: {upstream: iterable, methods: [GET]}}\n")

    assert config.domains["pay.example.com"].methods == ("GET",)


def test_an_empty_method_list_is_an_error():
    errors = errors_of("domains:\n  track.example.com: {methods: []}\n")

    assert (errors[0].line, errors[0].column) == (2, 32)
    assert "at least one method" in errors[0].message


def test_a_unix_endpoint_needs_a_path():
    with pytest.raises(ValueError):
        check_endpoint("unix:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2001:db8::1", ("2001:db8::1", 53)), ("::1", ("::1", 53)), ("[::1]:5353", ("::1", 5353)),
     ("127.0.0.1", ("127.0.0.1", 53)), ("127.0.0.1:8053", ("127.0.0.1", 8053))],
)
def test_resolvers_take_bare_addresses_of_either_family(text, expected):
    config = parse(f"resolvers: [\"{text}\"]\n" + ONE_DOMAIN)

    assert config.resolvers == (expected,)


# ---------------------------------------------------------------------------
# A node behind a load balancer: listen.health, proxy_protocol, drain_delay, cluster


def test_the_balancer_keys_have_their_defaults():
    config = parse(ONE_DOMAIN)
    assert config.listen.health == ()
    assert (config.proxy_protocol.sources, config.proxy_protocol.timeout) == ((), 5.0)
    assert config.drain_delay == 0.0 and config.cluster is None


def test_the_balancer_keys_are_read():
    config = parse(
        "listen: {health: ['tcp:8081:interface=10.0.0.2']}\n"
        "proxy_protocol: {from: [10.0.0.0/24, '2001:db8::1'], timeout: 2s}\n"
        "drain_delay: 15s\n"
        + ONE_DOMAIN
    )
    assert config.listen.health == ("tcp:8081:interface=10.0.0.2",)
    assert config.proxy_protocol.sources == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::1"))
    assert config.proxy_protocol.timeout == 2.0 and config.drain_delay == 15.0


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("proxy_protocol: {from: [10.0.0.300/8]}\n", 1, 25, "proxy_protocol.from[0]: "),
    ("proxy_protocol: {timeout: 0s}\n", 1, 27, "proxy_protocol.timeout must be more than 0"),
    ("proxy_protocol: {form: []}\n", 1, 18, "unknown key 'form' (did you mean 'from'?)"),
    ("drain_delay: soon\n", 1, 14, "config.drain_delay: 'soon' is not a duration"),
    ("listen: {health: ['tcp:abc']}\n", 1, 19, "listen.health[0]: "),
    ("cluster: {prefix: trackproxy}\n", 1, 19, "cluster.prefix must start with /"),
    ("cluster: {etcd: ['ftp://10.0.0.5']}\n", 1, 18, "is not an etcd endpoint"),
    ("cluster: {etcd: ['https://10.0.0.5:2379'], secret_file: /nonexistent/cluster.key}\n", 1, 57,
     "cluster.secret_file: no such file '/nonexistent/cluster.key'"),
    ("cluster: {etcd: ['https://10.0.0.5:2379']}\n", 1, 11, "cluster.secret_file: no such file '/etc/trackproxy/cluster.key'"),
    ("cluster: {node: 'node a'}\n", 1, 17, "cluster.node: 'node a' is not a node name"),
    ("cluster: {cert: " + __file__ + "}\n", 1, 11, "cluster.cert and cluster.key go together"),
    ("cluster: {lease: 10s}\n", 1, 11, "unknown key 'lease'"),
], ids=["bad-cidr", "zero-timeout", "typo", "bad-duration", "bad-endpoint", "prefix", "etcd-url", "no-secret",
        "no-default-secret", "node-name", "cert-without-key", "unknown-key"])
def test_the_balancer_keys_are_checked_with_positions(text, line, column, message):
    error = only_error(text + ONE_DOMAIN)
    assert (error.line, error.column) == (line, column) and message in error.message, str(error)


def test_a_cluster_section_without_etcd_is_read_and_changes_nothing():
    config = parse("cluster: {prefix: /tp/eu, node: node-a}\n" + ONE_DOMAIN)
    assert config.cluster is not None and (config.cluster.prefix, config.cluster.node) == ("/tp/eu", "node-a")
    assert config.cluster.etcd == ()


@pytest.mark.parametrize(("content", "mode", "message"), [
    ("x" * 44, 0o644, "is readable by everyone; chmod 0600 it"),
    ("short\n", 0o600, "the secret has 5 bytes; at least 32 are needed"),
], ids=["world-readable", "short"])
def test_an_unsafe_cluster_secret_is_an_error_at_its_position(tmp_path, content, mode, message):
    secret = tmp_path / "cluster.key"
    secret.write_text(content)
    secret.chmod(mode)
    error = only_error(f"cluster: {{etcd: ['http://127.0.0.1:2379'], secret_file: {secret}}}\n" + ONE_DOMAIN)
    assert (error.line, error.column) == (1, 57) and message in error.message, str(error)


def test_a_cluster_is_read_with_the_host_name_as_its_node_by_default(tmp_path):
    secret = tmp_path / "cluster.key"
    secret.write_text("x" * 44)
    secret.chmod(0o600)
    config = parse(
        f"cluster: {{etcd: ['http://127.0.0.1:2379', 'https://10.0.0.6:2379'], secret_file: {secret}}}\n"
        + ONE_DOMAIN
    )
    assert config.cluster is not None
    assert config.cluster.etcd == ("http://127.0.0.1:2379", "https://10.0.0.6:2379")
    assert config.cluster.secret_file == str(secret) and config.cluster.prefix == "/trackproxy/default"
    assert config.cluster.node and config.cluster.node.replace("-", "").replace(".", "").replace("_", "").isalnum()
