"""The YAML domain map: read once, checked completely, frozen.

This module owns turning a YAML file into an immutable :class:`Config`, and every
message an operator sees about a bad file. It reads the file and nothing else: no
sockets, no reactor, no certificates (those belong to ``certs`` and ``tls``).

Every problem is reported as one ``FILE:LINE:COL: message`` line (1-based), and all
problems of a file are collected before giving up, so one ``check-config`` run shows
everything that needs fixing. Three helpers hold what is not about trackproxy's keys:
``yamlnodes`` (the position-keeping reader and the errors), ``values`` (durations,
sizes, host names) and ``presets`` (the platforms built in). What stays here is the
frozen model and what each section of the file may hold.

(Over 400 lines: every key of the file, each next to its checks; splitting by section
would scatter the rules one section's keys share, such as inheritance from defaults.)
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import attrs
import yaml

from proxy.clusterkey import ClusterKeyError, read_secret
from proxy.endpoints import local_address, parse_endpoint
from proxy.presets import preset_for
from proxy.values import normalise_domain, parse_host_port
from proxy.yamlnodes import ConfigError, ConfigErrors, Reader, Reported, Warning_, compose

if TYPE_CHECKING:
    from proxy.presets import Preset

DEFAULT_CONFIG_PATH = "/etc/trackproxy/trackproxy.yaml"
CONFIG_ENV = "TRACKPROXY_CONFIG"

CERTIFICATE_KINDS = ("acme", "self-signed", "none")
#: Methods an operator may allow. CONNECT and TRACE have no place on a tracking domain.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# ---------------------------------------------------------------------------
# The frozen configuration


@attrs.frozen
class Upstream:
    """Where a domain's requests go, and how to reach and trust it."""

    name: str
    scheme: str
    host: str
    port: int
    connect_to: tuple[str, int] | None = None
    ca_file: str | None = None
    probe_path: str = "/f/a/b/c/d"
    max_request_header_bytes: int | None = None

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}"

    @property
    def dial(self) -> tuple[str, int]:
        """The address actually connected to: ``connect_to``, else the URL's."""
        return self.connect_to or (self.host, self.port)


@attrs.frozen
class CertificateSpec:
    """Where a domain's certificate comes from: acme, self-signed, none or files."""

    kind: str
    cert: str | None = None
    key: str | None = None

    @property
    def source(self) -> str:
        """The ``source`` reported in status: ``files`` for operator-managed pairs."""
        return "files" if self.kind == "files" else self.kind


@attrs.frozen
class Domain:
    """A tracking domain: its upstream, certificate, cache and allowed methods."""

    name: str
    upstream: Upstream
    certificate: CertificateSpec
    cache_ttl: float
    methods: tuple[str, ...]
    #: The same methods as bytes, for the per-request check.
    allowed_methods: frozenset[bytes] = attrs.field(eq=False)

    @allowed_methods.default
    def _allowed_from_methods(self) -> frozenset[bytes]:
        return frozenset(m.encode("ascii") for m in self.methods)


@attrs.frozen
class Listen:
    http: tuple[str, ...] = ("tcp:80",)
    https: tuple[str, ...] = ("tcp:443",)
    admin: tuple[str, ...] = ("tcp:9180:interface=127.0.0.1",)
    #: ``GET /healthz`` only, for a load balancer's checks (none by default).
    health: tuple[str, ...] = ()


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class ProxyProtocolSettings:
    """PROXY protocol v1/v2 on the http and https listeners: required from ``sources``,
    refused from anyone else; no sources, no PROXY protocol."""

    sources: tuple[Network, ...] = ()
    timeout: float = 5.0


@attrs.frozen
class ClusterSettings:
    """``cluster:`` as written; ``node`` is filled in with the host name if not given.
    A cluster is on when ``etcd`` names an endpoint (README "Running several nodes")."""

    etcd: tuple[str, ...] = ()
    prefix: str = "/trackproxy/default"
    node: str | None = None
    ca_file: str | None = None
    cert: str | None = None
    key: str | None = None
    secret_file: str = "/etc/trackproxy/cluster.key"


@attrs.frozen
class AcmeSettings:
    email: str | None = None
    server: str = "https://acme-v02.api.letsencrypt.org/directory"
    key_type: str = "ecdsa"
    renew_before: float = 30 * 86400
    ca_bundle: str | None = None


@attrs.frozen
class CacheSettings:
    max_entries: int = 100_000
    max_bytes: int = 64 * 1024 * 1024


@attrs.frozen
class Limits:
    client_timeout: float = 30.0
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 15.0
    max_header_bytes: int = 16 * 1024


@attrs.frozen
class Config:
    """The whole configuration, immutable; a reload builds a new one."""

    path: str
    listen: Listen
    state_dir: str
    acme: AcmeSettings
    cache: CacheSettings
    limits: Limits
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    workers: int | None  # None: one per core
    log_paths: str
    resolvers: tuple[tuple[str, int], ...]
    upstreams: Mapping[str, Upstream]
    domains: Mapping[str, Domain]
    warnings: tuple[Warning_, ...] = ()
    proxy_protocol: ProxyProtocolSettings = ProxyProtocolSettings()
    #: Seconds between SIGTERM (``/healthz`` answers 503 at once) and no longer accepting.
    drain_delay: float = 0.0
    cluster: ClusterSettings | None = None


# ---------------------------------------------------------------------------
# Values

_UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NODE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def check_endpoint(description: str) -> None:
    """Check a Twisted server endpoint string well enough to catch typos.

    Only the forms trackproxy documents are accepted (``endpoints``); binding is left
    to start-up.
    """
    parse_endpoint(description)


# ---------------------------------------------------------------------------
# Sections


def _read_listen(r: Reader, node: yaml.Node | None) -> Listen:
    if node is None:
        return Listen()
    entries = r.mapping(node, "listen", ("http", "https", "admin", "health"))

    def endpoint(n: yaml.Node, what: str) -> str:
        text = r.as_string(n, what)
        try:
            check_endpoint(text)
        except ValueError as e:
            raise r._fail(n, f"{what}: {e}")
        return text

    endpoints = r.as_list(endpoint, allow_scalar=True)
    defaults = Listen()
    return Listen(
        http=r.value(entries, "http", "listen", endpoints, defaults.http),
        https=r.value(entries, "https", "listen", endpoints, defaults.https),
        admin=r.value(entries, "admin", "listen", endpoints, defaults.admin),
        health=r.value(entries, "health", "listen", endpoints, defaults.health),
    )


def _cidr(r: Reader, n: yaml.Node, what: str) -> Network:
    try:
        return ipaddress.ip_network(r.as_string(n, what), strict=False)
    except ValueError as e:
        raise r._fail(n, f"{what}: {e}")


def _read_proxy_protocol(r: Reader, node: yaml.Node | None) -> ProxyProtocolSettings:
    d = ProxyProtocolSettings()
    if node is None:
        return d
    e = r.mapping(node, "proxy_protocol", ("from", "timeout"))
    return ProxyProtocolSettings(
        sources=r.value(e, "from", "proxy_protocol", r.as_list(lambda n, w: _cidr(r, n, w)), d.sources),
        timeout=r.value(e, "timeout", "proxy_protocol", r.as_positive_duration, d.timeout),
    )


def _read_cluster(r: Reader, node: yaml.Node | None) -> ClusterSettings | None:
    if node is None:
        return None
    d = ClusterSettings()
    e = r.mapping(node, "cluster", ("etcd", "prefix", "node", "ca_file", "cert", "key", "secret_file"))

    def etcd_url(n: yaml.Node, what: str) -> str:
        url = r.as_string(n, what)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise r._fail(n, f"{what}: {url!r} is not an etcd endpoint (http:// or https://HOST:PORT)")
        return url

    def prefix(n: yaml.Node, what: str) -> str:
        text = r.as_string(n, what)
        if not text.startswith("/"):
            raise r._fail(n, f"{what} must start with /")
        return text

    def node_name(n: yaml.Node, what: str) -> str | None:
        text = r.as_optional_string(n, what)
        if text is not None and not _NODE_NAME.match(text):
            raise r._fail(n, f"{what}: {text!r} is not a node name (letters, digits, '.', '_' and '-')")
        return text

    settings = ClusterSettings(
        etcd=r.value(e, "etcd", "cluster", r.as_list(etcd_url), d.etcd),
        prefix=r.value(e, "prefix", "cluster", prefix, d.prefix),
        node=r.value(e, "node", "cluster", node_name, d.node),
        ca_file=r.value(e, "ca_file", "cluster", r.as_optional_ca_file, d.ca_file),
        cert=r.value(e, "cert", "cluster", r.as_optional_existing_file, d.cert),
        key=r.value(e, "key", "cluster", r.as_optional_existing_file, d.key),
        secret_file=r.value(e, "secret_file", "cluster", r.as_path, d.secret_file),
    )
    if e is not None and (settings.cert is None) != (settings.key is None):
        r.error(e["cert"][0] if "cert" in e else e["key"][0],
                "cluster.cert and cluster.key go together (etcd's client certificate and its key)")
    if settings.etcd and e is not None:
        # Without it no private key can be shared: refused here (check-config, reload, the
        # plugin) rather than at the first issuance.
        where = e["secret_file"][1] if "secret_file" in e else e["etcd"][0]
        if not os.path.isfile(settings.secret_file):
            r.error(where, f"cluster.secret_file: no such file {settings.secret_file!r} (the key that "
                    "encrypts private keys in etcd, the same on every node: openssl rand -base64 32)")
        else:
            try:
                read_secret(settings.secret_file)
            except ClusterKeyError as error:
                r.error(where, f"cluster.secret_file {settings.secret_file}: {error}")
    if settings.node is None:
        settings = attrs.evolve(settings, node=_NODE_NAME_UNSAFE.sub("-", socket.gethostname()) or "node")
    return settings


def _read_acme(r: Reader, node: yaml.Node | None) -> AcmeSettings:
    d = AcmeSettings()
    if node is None:
        return d
    e = r.mapping(node, "acme", ("email", "server", "key_type", "renew_before", "ca_bundle"))

    def server(n: yaml.Node, what: str) -> str:
        url = r.as_string(n, what)
        if urlsplit(url).scheme != "https":
            raise r._fail(n, f"{what} must be an https:// ACME directory URL")
        return url

    return AcmeSettings(
        email=r.value(e, "email", "acme", r.as_optional_string, d.email),
        server=r.value(e, "server", "acme", server, d.server),
        key_type=r.value(e, "key_type", "acme", r.as_choice(("ecdsa", "rsa")), d.key_type),
        renew_before=r.value(e, "renew_before", "acme", r.as_positive_duration, d.renew_before),
        ca_bundle=r.value(e, "ca_bundle", "acme", r.as_optional_ca_file, d.ca_bundle),
    )


def _read_cache(r: Reader, node: yaml.Node | None) -> CacheSettings:
    d = CacheSettings()
    if node is None:
        return d
    e = r.mapping(node, "cache", ("max_entries", "max_bytes"))
    return CacheSettings(
        max_entries=r.value(e, "max_entries", "cache", r.as_positive_int, d.max_entries),
        max_bytes=r.value(e, "max_bytes", "cache", r.as_size, d.max_bytes),
    )


def _read_limits(r: Reader, node: yaml.Node | None) -> Limits:
    d = Limits()
    if node is None:
        return d
    e = r.mapping(
        node,
        "limits",
        ("client_timeout", "upstream_connect_timeout", "upstream_timeout", "max_header_bytes"),
    )

    def header_bytes(n: yaml.Node, what: str) -> int:
        size = r.as_size(n, what)
        if size < 1024:
            raise r._fail(n, f"{what} must be at least 1KiB (browsers send that much)")
        return size

    return Limits(
        client_timeout=r.value(e, "client_timeout", "limits", r.as_positive_duration, d.client_timeout),
        upstream_connect_timeout=r.value(
            e, "upstream_connect_timeout", "limits", r.as_positive_duration, d.upstream_connect_timeout
        ),
        upstream_timeout=r.value(e, "upstream_timeout", "limits", r.as_positive_duration, d.upstream_timeout),
        max_header_bytes=r.value(e, "max_header_bytes", "limits", header_bytes, d.max_header_bytes),
    )


def _read_upstreams(r: Reader, node: yaml.Node | None) -> dict[str, Upstream]:
    if node is None:
        return {}
    entries = r.mapping(node, "upstreams") or {}
    result: dict[str, Upstream] = {}
    for name, (key_node, value_node) in entries.items():
        what = f"upstreams.{name}"
        if not _UPSTREAM_NAME.match(name):
            r.error(key_node, f"{what}: names are lower-case letters, digits, '-' and '_'")
            continue
        e = r.mapping(value_node, what, ("url", "connect_to", "ca_file"))
        if e is None:
            continue
        preset = preset_for(name)
        url_node = e.get("url", (None, None))[1]
        if url_node is None and preset is None:
            r.error(key_node, f"{what}: url is required (only built-in presets may omit it)")
            continue
        try:
            # Without a url node there is a preset (checked above).
            url = r.as_string(url_node, f"{what}.url") if url_node is not None else cast("Preset", preset).url
            scheme, host, port = _parse_upstream_url(url)
        except ValueError as exc:
            r.error(url_node, f"{what}.url: {exc}")
            continue
        except Reported:
            continue

        def connect_to(n: yaml.Node, w: str) -> tuple[str, int] | None:
            text = r.as_optional_string(n, w)
            if text is None:
                return None
            try:
                return parse_host_port(text)
            except ValueError as exc:
                raise r._fail(n, f"{w}: {exc}")

        upstream = Upstream(
            name=name,
            scheme=scheme,
            host=host,
            port=port,
            connect_to=r.value(e, "connect_to", what, connect_to, None),
            ca_file=r.value(e, "ca_file", what, r.as_optional_ca_file, None),
            probe_path=preset.probe_path if preset else "/f/a/b/c/d",
            max_request_header_bytes=preset.max_request_header_bytes if preset else None,
        )
        if upstream.scheme == "http" and upstream.ca_file:
            r.error(e["ca_file"][0], f"{what}.ca_file: has no meaning for an http:// upstream")
        result[name] = upstream
    return result


def _parse_upstream_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise ValueError(f"{url!r}: the scheme must be https (or http where nothing else exists)")
    if parts.username or parts.password:
        raise ValueError(f"{url!r}: credentials do not belong in an upstream URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: an upstream is an origin only (no path, query or fragment)")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port")
    return parts.scheme, parts.hostname.lower(), port


def _upstream_from_preset(name: str) -> Upstream | None:
    preset = preset_for(name)
    if preset is None:
        return None
    scheme, host, port = _parse_upstream_url(preset.url)
    return Upstream(
        name=name,
        scheme=scheme,
        host=host,
        port=port,
        probe_path=preset.probe_path,
        max_request_header_bytes=preset.max_request_header_bytes,
    )


@attrs.frozen
class _DomainSettings:
    """Per-domain keys as written; ``None`` means "not set here, inherit"."""

    upstream: tuple[str, yaml.Node] | None = None
    certificate: CertificateSpec | None = None
    cache_ttl: float | None = None
    methods: tuple[str, ...] | None = None


_DOMAIN_KEYS = ("upstream", "certificate", "cache_ttl", "methods")


def _read_domain_settings(r: Reader, node: yaml.Node, what: str) -> _DomainSettings:
    e = r.mapping(node, what, _DOMAIN_KEYS)

    def upstream(n: yaml.Node, w: str) -> tuple[str, yaml.Node]:
        return r.as_string(n, w), n

    def certificate(n: yaml.Node, w: str) -> CertificateSpec:
        if isinstance(n, yaml.MappingNode):
            c = r.mapping(n, w, ("cert", "key")) or {}
            missing = [k for k in ("cert", "key") if k not in c]
            if missing:
                raise r._fail(n, f"{w}: needs both cert and key (missing {', '.join(missing)})")
            cert = r.as_path(c["cert"][1], f"{w}.cert")
            key = r.as_path(c["key"][1], f"{w}.key")
            return CertificateSpec("files", cert=cert, key=key)
        kind = r._plain(n, w)
        if kind not in CERTIFICATE_KINDS:
            raise r._fail(
                n, f"{w} must be one of: {', '.join(CERTIFICATE_KINDS)}, or {{cert: PATH, key: PATH}}"
            )
        return CertificateSpec(kind)

    def method(n: yaml.Node, w: str) -> str:
        name = r.as_string(n, w).upper()
        if name not in KNOWN_METHODS:
            raise r._fail(n, f"{w}: {name!r} is not an allowed method ({', '.join(sorted(KNOWN_METHODS))})")
        return name

    def methods(n: yaml.Node, w: str) -> tuple[str, ...]:
        listed = r.as_list(method)(n, w)
        if not listed:
            raise r._fail(n, f"{w}: list at least one method (GET, HEAD)")
        return listed

    return _DomainSettings(
        upstream=r.value(e, "upstream", what, upstream, None),
        certificate=r.value(e, "certificate", what, certificate, None),
        cache_ttl=r.value(e, "cache_ttl", what, r.as_cache_ttl, None),
        methods=r.value(e, "methods", what, methods, None),
    )


def _read_domains(
    r: Reader,
    node: yaml.Node | None,
    defaults: _DomainSettings,
    upstreams: dict[str, Upstream],
) -> dict[str, Domain]:
    if node is None:
        r.error(None, "domains: at least one tracking domain is required")
        return {}
    entries = r.mapping(node, "domains")
    if entries is None:
        return {}
    if not entries:
        r.error(node, "domains: at least one tracking domain is required")
    domains: dict[str, Domain] = {}
    for raw_name, (key_node, value_node) in entries.items():
        try:
            name = normalise_domain(raw_name)
        except ValueError as e:
            r.error(key_node, f"domains: {e}")
            continue
        if name in domains:
            r.error(key_node, f"domains: {raw_name!r} is the same domain as {name!r} above")
            continue
        what = f"domains.{raw_name}"
        own = _read_domain_settings(r, value_node, what)
        upstream_name, upstream_node = own.upstream or defaults.upstream or ("sparkpost", None)
        upstream = upstreams.get(upstream_name) or _upstream_from_preset(upstream_name)
        if upstream is None:
            r.error(
                upstream_node or key_node,
                f"{what}: unknown upstream {upstream_name!r} "
                "(define it under upstreams:, or use a built-in preset)",
            )
            continue
        upstreams.setdefault(upstream_name, upstream)
        if upstream.scheme == "http":
            r.warn(
                upstream_node or key_node,
                f"{what}: upstream {upstream_name!r} is plain http://; requests leave this "
                "host unencrypted (the platform offers nothing else)",
            )
        preset = preset_for(upstream_name)
        methods = own.methods or defaults.methods or ("GET", "HEAD")
        if own.methods is None and preset is not None and preset.methods:
            # The platform needs these (Iterable: POST); inherited defaults do not remove them.
            methods = (*methods, *preset.methods)
        cache_ttl = own.cache_ttl if own.cache_ttl is not None else defaults.cache_ttl
        domains[name] = Domain(
            name=name,
            upstream=upstream,
            certificate=own.certificate or defaults.certificate or CertificateSpec("acme"),
            cache_ttl=10.0 if cache_ttl is None else cache_ttl,
            methods=tuple(dict.fromkeys(methods)),
        )
    return domains


_TOP_KEYS = (
    "listen", "state_dir", "acme", "defaults", "cache", "limits", "trusted_proxies",
    "workers", "log_paths", "resolvers", "proxy_protocol", "drain_delay", "cluster", "upstreams", "domains",
)


def parse_config(text: str, path: str) -> Config:
    """Build a :class:`Config` from YAML text; ``path`` names it in errors.

    Raises:
        ConfigErrors: every problem found, each with its line and column.
    """
    base_dir = os.path.dirname(os.path.abspath(path))
    r = Reader(path, base_dir)
    try:
        root = compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigErrors([ConfigError(path, line, col, f"YAML: {e.problem or e}")])
    except yaml.YAMLError as e:
        raise ConfigErrors([ConfigError(path, 1, 1, f"YAML: {e}")])
    if root is None:
        raise ConfigErrors([ConfigError(path, 1, 1, "the file is empty; expected a mapping")])
    top = r.mapping(root, "the top level", _TOP_KEYS)
    if top is None:
        raise ConfigErrors(r.errors)

    def section(key: str) -> yaml.Node | None:
        return top[key][1] if key in top else None

    listen = _read_listen(r, section("listen"))
    state_dir = r.value(top, "state_dir", "config", r.as_path, os.path.normpath("/var/lib/trackproxy"))
    acme = _read_acme(r, section("acme"))
    cache = _read_cache(r, section("cache"))
    limits = _read_limits(r, section("limits"))

    trusted = r.value(top, "trusted_proxies", "config", r.as_list(lambda n, w: _cidr(r, n, w)), ())
    proxy_protocol = _read_proxy_protocol(r, section("proxy_protocol"))
    drain_delay = r.value(top, "drain_delay", "config", r.as_duration, 0.0)
    cluster = _read_cluster(r, section("cluster"))

    def workers(n: yaml.Node, what: str) -> int | None:
        if isinstance(n, yaml.ScalarNode) and r.scalar(n) == "auto":
            return None
        return r.as_positive_int(n, what + ' (a number or "auto")')

    worker_count = r.value(top, "workers", "config", workers, 1)
    log_paths = r.value(top, "log_paths", "config", r.as_choice(("redacted", "full")), "redacted")

    def resolver(n: yaml.Node, what: str) -> tuple[str, int]:
        text = r.as_string(n, what)
        try:
            try:
                return str(ipaddress.ip_address(text)), 53
            except ValueError:
                pass
            host, port = parse_host_port(text, default_port=53)
            ipaddress.ip_address(host)
        except ValueError as e:
            raise r._fail(n, f"{what}: {e} (expected IP:PORT of a DNS server)")
        return host, port

    resolvers = r.value(top, "resolvers", "config", r.as_list(resolver), ())
    upstreams = _read_upstreams(r, section("upstreams"))
    defaults = (
        _read_domain_settings(r, cast("yaml.Node", section("defaults")), "defaults")
        if "defaults" in top
        else _DomainSettings()
    )
    domains = _read_domains(r, section("domains"), defaults, upstreams)

    if r.errors:
        raise ConfigErrors(sorted(r.errors, key=lambda e: (e.line, e.column)))
    return Config(
        path=path,
        listen=listen,
        state_dir=state_dir,
        acme=acme,
        cache=cache,
        limits=limits,
        trusted_proxies=trusted,
        workers=worker_count,
        log_paths=log_paths,
        resolvers=resolvers,
        proxy_protocol=proxy_protocol,
        drain_delay=drain_delay,
        cluster=cluster,
        upstreams=MappingProxyType(upstreams),
        domains=MappingProxyType(domains),
        warnings=tuple(r.warnings),
    )


def load_config(path: str) -> Config:
    """Read and parse the file at ``path``.

    Raises:
        ConfigErrors: the file cannot be read, or is not a valid configuration.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigErrors([ConfigError(path, 1, 1, f"cannot read the file: {reason}")])
    return parse_config(text, path)


def config_path(explicit: str | None) -> str:
    """``-c FILE``, else ``$TRACKPROXY_CONFIG``, else the system-wide default."""
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def admin_url(config: Config) -> str | None:
    """``http://HOST:PORT`` of the first ``tcp``/``tcp6`` admin listener, as a local client
    reaches it (a wildcard interface is reached through loopback), or None when the admin
    listener is only a unix or systemd socket."""
    for description in config.listen.admin:
        endpoint = parse_endpoint(description)
        if endpoint.kind not in ("tcp", "tcp6"):
            continue
        host, port = cast("tuple[str, int]", local_address(endpoint, 0))  # tcp, tcp6: never None
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"
    return None
