"""The YAML domain map: read once, checked completely, frozen.

This module owns turning a YAML file into an immutable :class:`Config`, and every
message an operator sees about a bad file. It reads the file and nothing else: no
sockets, no reactor, no certificates (those belong to ``certs`` and ``tls``).

Every problem is reported as one ``FILE:LINE:COL: message`` line (1-based), and all
problems of a file are collected before giving up, so one ``check-config`` run shows
everything that needs fixing. The YAML is composed into nodes rather than loaded into
plain Python values so that each value still knows where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import attrs
import idna
import yaml

from proxy.endpoints import local_address, parse_endpoint

DEFAULT_CONFIG_PATH = "/etc/trackproxy/trackproxy.yaml"
CONFIG_ENV = "TRACKPROXY_CONFIG"

CERTIFICATE_KINDS = ("acme", "self-signed", "none")
#: Methods an operator may allow. CONNECT and TRACE have no place on a tracking domain.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# ---------------------------------------------------------------------------
# Errors


@attrs.frozen
class ConfigError:
    """One problem in a configuration file, with where it is."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ConfigErrors(Exception):
    """A configuration file was refused; ``errors`` says every reason."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


# ---------------------------------------------------------------------------
# The frozen configuration


@attrs.frozen
class Preset:
    """A platform's tracking endpoint as its own guide describes it."""

    url: str
    probe_path: str = "/f/a/b/c/d"
    methods: tuple[str, ...] | None = None
    max_request_header_bytes: int | None = None


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "sparkpost": Preset("https://spgo.io"),
        "sparkpost-eu": Preset("https://eu.spgo.io"),
        "sparkpost-v2": Preset("https://v2.spgo.io"),
        "sparkpost-eu-v2": Preset("https://eu.v2.spgo.io"),
        "sendgrid": Preset("https://sendgrid.net"),
        # Mailgun's tracking host accepts plain HTTP only; start-up warns about it.
        "mailgun": Preset("http://mailgun.org"),
        "mailgun-eu": Preset("http://eu.mailgun.org"),
        "customerio": Preset("https://track.customer.io"),
        "customerio-eu": Preset("https://track-eu.customer.io"),
        # Iterable's links need POST (and cookies, which always pass).
        "iterable": Preset("https://links.iterable.com", methods=("GET", "HEAD", "POST")),
        "iterable-eu": Preset(
            "https://links.eu.iterable.com", methods=("GET", "HEAD", "POST")
        ),
    }
)
_SES_PRESET = re.compile(r"^ses-([a-z]{2}(?:-gov)?-[a-z]+-[0-9])$")
#: Amazon SES click tracking refuses requests with 8 KiB or more of headers.
SES_MAX_HEADER_BYTES = 8192


def preset_for(name: str) -> Preset | None:
    """The built-in preset called ``name``, including the ``ses-REGION`` family."""
    preset = PRESETS.get(name)
    if preset is not None:
        return preset
    match = _SES_PRESET.match(name)
    if match:
        return Preset(
            f"https://r.{match.group(1)}.awstrack.me",
            max_request_header_bytes=SES_MAX_HEADER_BYTES,
        )
    return None


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
class Warning_:
    """Something allowed but worth an operator's attention (e.g. plain-HTTP upstream)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: warning: {self.message}"


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


# ---------------------------------------------------------------------------
# Values


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^([0-9]+)\s*(B|KiB|MiB|GiB|K|M|G|KB|MB|GB)?$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
    # Operators write K/M/G meaning the binary units; nginx does the same.
    "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_UPSTREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def parse_duration(value: Any) -> float:
    """Seconds from ``10s``, ``5m``, ``2h``, ``30d``, ``250ms`` or a bare number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m, 2h or 30d")
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("a duration must be a finite number")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a duration (use e.g. 10s, 5m, 2h, 30d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Bytes from ``64MiB``, ``16KiB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16KiB or 64MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (use e.g. 16KiB, 64MiB or bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def normalise_domain(name: str) -> str:
    """The canonical form of a configured host name: lower-case IDNA, no trailing dot.

    Raises:
        ValueError: the name is not a host name trackproxy can serve.
    """
    name = name.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty domain name")
    if "*" in name:
        raise ValueError(
            f"{name!r}: wildcard domains are not supported (HTTP-01 cannot validate them)"
        )
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"{name!r} is not a valid internationalised name: {e}")
    if len(name) > 253:
        raise ValueError(f"{name!r} is longer than 253 characters")
    for label in name.split("."):
        if not _HOST_LABEL.match(label):
            raise ValueError(f"{name!r} is not a valid host name")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{name!r} is an IP address; a tracking domain is a name")
    return name


def parse_host_port(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a tuple."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not HOST:PORT")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, ""
    if not host:
        raise ValueError(f"{value!r} has no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected HOST:PORT)")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


def check_endpoint(description: str) -> None:
    """Check a Twisted server endpoint string well enough to catch typos.

    Only the forms trackproxy documents are accepted (``endpoints``); binding is left
    to start-up.
    """
    parse_endpoint(description)


# ---------------------------------------------------------------------------
# Reading nodes


class _Reader:
    """Walks the composed YAML, converting values and collecting every error."""

    def __init__(self, path: str, base_dir: str) -> None:
        self.path = path
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []
        self.warnings: list[Warning_] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def _where(self, node: yaml.Node | None) -> tuple[int, int]:
        if node is None:
            return 1, 1
        return node.start_mark.line + 1, node.start_mark.column + 1

    def error(self, node: yaml.Node | None, message: str) -> None:
        self.errors.append(ConfigError(self.path, *self._where(node), message))

    def warn(self, node: yaml.Node | None, message: str) -> None:
        self.warnings.append(Warning_(self.path, *self._where(node), message))

    def scalar(self, node: yaml.Node) -> Any:
        if node.tag == "tag:yaml.org,2002:str" and isinstance(node, yaml.ScalarNode):
            return node.value  # most values are strings: no constructor round trip
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = getattr(e, "problem", None) or str(e)
            raise self._fail(node, f"cannot read this value: {problem}")

    def mapping(
        self, node: yaml.Node, what: str, allowed: Iterable[str] | None = None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """A mapping's entries by key, with duplicate and unknown keys reported."""
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping")
            return None
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        allowed_set = set(allowed) if allowed is not None else None
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, f"{what}: YAML merge keys (<<) are not supported; write the keys out")
                continue
            try:
                key = self.scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            except _Reported:
                continue
            if not isinstance(key, str):
                self.error(key_node, f"{what}: keys must be strings")
                continue
            if key in entries:
                self.error(key_node, f"{what}: duplicate key {key!r}")
                continue
            if allowed_set is not None and key not in allowed_set:
                hint = _closest(key, allowed_set)
                self.error(
                    key_node,
                    f"{what}: unknown key {key!r}"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed: {', '.join(sorted(allowed_set))}",
                )
                continue
            entries[key] = (key_node, value_node)
        return entries

    def value(
        self,
        entries: dict[str, tuple[yaml.Node, yaml.Node]] | None,
        key: str,
        what: str,
        convert: Callable[[yaml.Node, str], Any],
        default: Any,
    ) -> Any:
        """Convert ``entries[key]`` or return ``default``; on error report and default."""
        if not entries or key not in entries:
            return default
        node = entries[key][1]
        try:
            return convert(node, f"{what}.{key}")
        except _Reported:
            return default

    # Converters: each takes (node, what) and either returns or reports and raises.

    def _fail(self, node: yaml.Node, message: str) -> _Reported:
        self.error(node, message)
        return _Reported()

    def as_string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self._fail(node, f"{what} must be a non-empty string")
        return value

    def as_optional_string(self, node: yaml.Node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        return self.as_string(node, what)

    def as_path(self, node: yaml.Node, what: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, self.as_string(node, what)))

    def as_optional_existing_file(self, node: yaml.Node, what: str) -> str | None:
        if self.as_optional_string(node, what) is None:
            return None
        path = self.as_path(node, what)
        if not os.path.isfile(path):
            raise self._fail(node, f"{what}: no such file {path!r}")
        return path

    def as_optional_ca_file(self, node: yaml.Node, what: str) -> str | None:
        """A CA bundle: an existing, readable file holding at least one PEM certificate
        (checked here, so a bad file is a config error and not a crash at start or
        reload)."""
        path = self.as_optional_existing_file(node, what)
        if path is None:
            return None
        from cryptography import x509

        try:
            with open(path, "rb") as f:
                x509.load_pem_x509_certificates(f.read())
        except OSError as e:
            raise self._fail(node, f"{what}: cannot read {path!r}: {e.strerror or e}")
        except ValueError:
            raise self._fail(node, f"{what}: {path!r} holds no PEM certificate")
        return path

    def as_duration(self, node: yaml.Node, what: str) -> float:
        try:
            return parse_duration(self._plain(node, what))
        except ValueError as e:
            raise self._fail(node, f"{what}: {e}")

    def as_positive_duration(self, node: yaml.Node, what: str) -> float:
        seconds = self.as_duration(node, what)
        if seconds <= 0:
            raise self._fail(node, f"{what} must be more than 0")
        return seconds

    def as_cache_ttl(self, node: yaml.Node, what: str) -> float:
        seconds = self.as_duration(node, what)
        if 0 < seconds < 1:
            # Below a second the cache absorbs nothing useful, and counts still inflate.
            raise self._fail(node, f"{what}: use 0 to turn the cache off, or at least 1s")
        return seconds

    def as_size(self, node: yaml.Node, what: str) -> int:
        try:
            size = parse_size(self._plain(node, what))
        except ValueError as e:
            raise self._fail(node, f"{what}: {e}")
        if size <= 0:
            raise self._fail(node, f"{what} must be more than 0")
        return size

    def as_positive_int(self, node: yaml.Node, what: str) -> int:
        value = self._plain(node, what)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self._fail(node, f"{what} must be a whole number of at least 1")
        return value

    def as_choice(self, choices: tuple[str, ...]) -> Callable[[yaml.Node, str], str]:
        def convert(node: yaml.Node, what: str) -> str:
            value = self._plain(node, what)
            if value not in choices:
                raise self._fail(node, f"{what} must be one of: {', '.join(choices)}")
            return value

        return convert

    def as_list(
        self, item: Callable[[yaml.Node, str], Any], allow_scalar: bool = False
    ) -> Callable[[yaml.Node, str], tuple[Any, ...]]:
        def convert(node: yaml.Node, what: str) -> tuple[Any, ...]:
            if allow_scalar and isinstance(node, yaml.ScalarNode) and not node.tag.endswith(":null"):
                return (item(node, what),)
            if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return ()
            if not isinstance(node, yaml.SequenceNode):
                raise self._fail(node, f"{what} must be a list")
            results = []
            failed = False
            for i, child in enumerate(node.value):
                try:
                    results.append(item(child, f"{what}[{i}]"))
                except _Reported:
                    failed = True
            if failed:
                raise _Reported()
            return tuple(results)

        return convert

    def _plain(self, node: yaml.Node, what: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self._fail(node, f"{what} must be a single value")
        return self.scalar(node)


class _Reported(Exception):
    """An error was already recorded for this node; unwind to the next value."""


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.7)
    return matches[0] if matches else None


# ---------------------------------------------------------------------------
# Sections


def _read_listen(r: _Reader, node: yaml.Node | None) -> Listen:
    if node is None:
        return Listen()
    entries = r.mapping(node, "listen", ("http", "https", "admin"))

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
    )


def _read_acme(r: _Reader, node: yaml.Node | None) -> AcmeSettings:
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


def _read_cache(r: _Reader, node: yaml.Node | None) -> CacheSettings:
    d = CacheSettings()
    if node is None:
        return d
    e = r.mapping(node, "cache", ("max_entries", "max_bytes"))
    return CacheSettings(
        max_entries=r.value(e, "max_entries", "cache", r.as_positive_int, d.max_entries),
        max_bytes=r.value(e, "max_bytes", "cache", r.as_size, d.max_bytes),
    )


def _read_limits(r: _Reader, node: yaml.Node | None) -> Limits:
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


def _read_upstreams(r: _Reader, node: yaml.Node | None) -> dict[str, Upstream]:
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
            url = r.as_string(url_node, f"{what}.url") if url_node is not None else preset.url
            scheme, host, port = _parse_upstream_url(url)
        except ValueError as exc:
            r.error(url_node, f"{what}.url: {exc}")
            continue
        except _Reported:
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


def _read_domain_settings(r: _Reader, node: yaml.Node, what: str) -> _DomainSettings:
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
    r: _Reader,
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
    "workers", "log_paths", "resolvers", "upstreams", "domains",
)


#: libyaml when PyYAML has it: a 10,000-domain file composes in a fraction of the time.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def _compose(text: str) -> yaml.Node | None:
    """The YAML's node tree, with positions. A file libyaml refuses is composed again by
    the pure-Python loader, whose messages (and positions) are the ones documented."""
    if _FAST_LOADER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_LOADER)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def parse_config(text: str, path: str) -> Config:
    """Build a :class:`Config` from YAML text; ``path`` names it in errors.

    Raises:
        ConfigErrors: every problem found, each with its line and column.
    """
    base_dir = os.path.dirname(os.path.abspath(path))
    r = _Reader(path, base_dir)
    try:
        root = _compose(text)
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

    def cidr(n: yaml.Node, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        try:
            return ipaddress.ip_network(r.as_string(n, what), strict=False)
        except ValueError as e:
            raise r._fail(n, f"{what}: {e}")

    trusted = r.value(top, "trusted_proxies", "config", r.as_list(cidr), ())

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
        _read_domain_settings(r, section("defaults"), "defaults")
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
        host, port = local_address(endpoint, 0)  # type: ignore[misc]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"
    return None
