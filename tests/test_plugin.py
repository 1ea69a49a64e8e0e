"""Tests for the certbot plugin ``trackproxy_certbot.plugin``.

The plugin is found through certbot's own entry-point discovery and built with a
``NamespaceConfig`` from certbot's own command-line parser, so option names and the
config object are the ones certbot hands it. Challenges are real ``acme`` objects with a
real account key. The proxy's admin listener is a stdlib ``http.server`` stand-in on
loopback; the last tests run the ``certbot`` program itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import josepy
import pytest
from acme import challenges, messages
from certbot import achallenges, errors
from certbot._internal import cli
from certbot._internal.plugins import disco
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import pki
from proxy.acme import ChallengeStore

TRACK = "track.example.test"
CLICK = "click.example.test"
ACCOUNT_KEY = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def registry() -> disco.PluginsRegistry:
    return disco.PluginsRegistry.find_all()


@pytest.fixture(autouse=True)
def certbot_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """certbot reads ~/.config/letsencrypt/cli.ini: keep the user's out of the tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRACKPROXY_CERTBOT_NO_RELOAD", raising=False)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """Modes must be the plugin's choice, not whatever umask certbot inherited."""
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def write_config(tmp_path: Path, admin: str = "tcp:9:interface=127.0.0.1") -> Path:
    path = tmp_path / "trackproxy.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"listen: {{admin: [{json.dumps(admin)}]}}\n"
        "domains:\n"
        f"  {TRACK}: {{certificate: acme}}\n"
        f"  {CLICK}: {{}}\n"
    )
    return path


def make_plugin(registry: disco.PluginsRegistry, tmp_path: Path, config_file: Path | None,
                verb: str = "certonly"):
    args = [verb, "--config-dir", str(tmp_path / "le" / "config"),
            "--work-dir", str(tmp_path / "le" / "work"), "--logs-dir", str(tmp_path / "le" / "logs")]
    if config_file is not None:
        args += ["--trackproxy-config", str(config_file)]
    namespace = cli.prepare_and_parse_args(registry, args)
    return registry["trackproxy"].plugin_cls(namespace, "trackproxy")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def plugin(registry: disco.PluginsRegistry, tmp_path: Path, config_file: Path):
    made = make_plugin(registry, tmp_path, config_file)
    made.prepare()
    return made


def http01(domain: str, n: int) -> achallenges.KeyAuthorizationAnnotatedChallenge:
    chall = challenges.HTTP01(token=os.urandom(32))
    return achallenges.KeyAuthorizationAnnotatedChallenge(
        challb=messages.ChallengeBody(chall=chall, uri=f"https://ca.test/chall/{n}",
                                      status=messages.STATUS_PENDING),
        identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=domain),
        account_key=ACCOUNT_KEY,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------
# Authenticator


@pytest.mark.filterwarnings("error::DeprecationWarning")  # achall.domain is deprecated
def test_perform_writes_each_key_authorization_where_the_proxy_serves_it(
    plugin, tmp_path: Path, strict_umask: None
) -> None:
    achalls = [http01(TRACK, 1), http01(CLICK, 2)]
    responses = plugin.perform(achalls)

    challenge_dir = tmp_path / "state" / "acme-challenge"
    assert mode(tmp_path / "state") == 0o755 and mode(challenge_dir) == 0o755
    assert responses == [a.chall.response(ACCOUNT_KEY) for a in achalls]
    for achall in achalls:
        expected = achall.chall.key_authorization(ACCOUNT_KEY)
        answer = challenge_dir / achall.chall.encode("token")
        assert answer.read_text() == expected
        assert mode(answer) == 0o644
        assert challenges.HTTP01.URI_ROOT_PATH + "/" + answer.name == achall.chall.path[1:]
        # The proxy's own reader serves exactly what was written.
        served = ChallengeStore(str(challenge_dir)).answer(answer.name.encode())
        assert served == expected.encode()
    assert sorted(p.name for p in challenge_dir.iterdir()) == sorted(
        a.chall.encode("token") for a in achalls)


def test_cleanup_removes_the_answers_and_tolerates_missing_ones(plugin, tmp_path: Path) -> None:
    achalls = [http01(TRACK, 1), http01(CLICK, 2)]
    plugin.perform(achalls)
    (tmp_path / "state" / "acme-challenge" / achalls[0].chall.encode("token")).unlink()
    plugin.cleanup(achalls)
    assert list((tmp_path / "state" / "acme-challenge").iterdir()) == []


def test_perform_refuses_an_unconfigured_domain_and_writes_nothing(
    plugin, tmp_path: Path, config_file: Path
) -> None:
    with pytest.raises(errors.PluginError) as raised:
        plugin.perform([http01(TRACK, 1), http01("other.example.test", 2)])
    assert "other.example.test" in str(raised.value) and str(config_file) in str(raised.value)
    challenge_dir = tmp_path / "state" / "acme-challenge"
    assert not challenge_dir.exists() or list(challenge_dir.iterdir()) == []


def test_auth_hint_points_at_port_80_dns_and_doctor(plugin, config_file: Path) -> None:
    hint = plugin.auth_hint([http01(TRACK, 1)])
    assert "port 80" in hint and "CNAME" in hint
    assert f"trackproxy doctor -c {config_file} {TRACK}" in hint


# ---------------------------------------------------------------------------
# Installer


@pytest.fixture
def lineage_files(tmp_path: Path) -> tuple[Path, Path]:
    live = tmp_path / "le" / "live"
    live.mkdir(parents=True)
    (live / "privkey.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nkey one\n")
    (live / "fullchain.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nchain one\n")
    return live / "privkey.pem", live / "fullchain.pem"


def deploy(plugin, domain: str, key: Path, fullchain: Path) -> None:
    live = key.parent
    plugin.deploy_cert(domain, str(live / "cert.pem"), str(key), str(live / "chain.pem"),
                       str(fullchain))


def test_deploy_cert_installs_key_and_full_chain_with_private_modes(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path], strict_umask: None
) -> None:
    key, fullchain = lineage_files
    deploy(plugin, TRACK, key, fullchain)

    certs = tmp_path / "state" / "certs"
    domain_dir = certs / TRACK
    assert (domain_dir / "privkey.pem").read_bytes() == key.read_bytes()
    assert (domain_dir / "fullchain.pem").read_bytes() == fullchain.read_bytes()
    assert mode(domain_dir / "privkey.pem") == 0o600
    assert mode(domain_dir / "fullchain.pem") == 0o644
    assert mode(certs) == 0o700 and mode(domain_dir) == 0o700
    assert sorted(p.name for p in domain_dir.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_a_second_deploy_replaces_the_files_rather_than_rewriting_them(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path]
) -> None:
    key, fullchain = lineage_files
    deploy(plugin, TRACK, key, fullchain)
    domain_dir = tmp_path / "state" / "certs" / TRACK
    before = {name: (domain_dir / name).stat().st_ino for name in ("privkey.pem", "fullchain.pem")}
    # A reader holding the old file keeps reading the old content.
    with open(domain_dir / "fullchain.pem", "rb") as old_chain:
        key.write_bytes(b"key two\n")
        fullchain.write_bytes(b"chain two\n")
        deploy(plugin, TRACK, key, fullchain)
        assert old_chain.read() == b"-----BEGIN CERTIFICATE-----\nchain one\n"
    for name, inode in before.items():
        assert (domain_dir / name).stat().st_ino != inode
    assert (domain_dir / "fullchain.pem").read_bytes() == b"chain two\n"
    assert (domain_dir / "privkey.pem").read_bytes() == b"key two\n"
    assert sorted(p.name for p in domain_dir.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_deploy_cert_refuses_an_unconfigured_domain(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path]
) -> None:
    with pytest.raises(errors.PluginError, match="other.example.test"):
        deploy(plugin, "other.example.test", *lineage_files)
    assert not (tmp_path / "state" / "certs" / "other.example.test").exists()


def test_deploy_cert_refuses_unreadable_files_and_changes_nothing(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path]
) -> None:
    key, fullchain = lineage_files
    deploy(plugin, TRACK, key, fullchain)
    old_key = key.read_bytes()
    key.write_bytes(b"a key without its chain\n")
    with pytest.raises(errors.PluginError, match="missing.pem"):
        deploy(plugin, TRACK, key, fullchain.parent / "missing.pem")
    domain_dir = tmp_path / "state" / "certs" / TRACK
    assert (domain_dir / "privkey.pem").read_bytes() == old_key
    assert sorted(p.name for p in domain_dir.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_a_failed_install_leaves_no_temporary_file_behind(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path]
) -> None:
    domain_dir = tmp_path / "state" / "certs" / TRACK
    (domain_dir / "fullchain.pem" / "in-the-way").mkdir(parents=True)
    with pytest.raises(errors.PluginError, match=TRACK):
        deploy(plugin, TRACK, *lineage_files)
    # The key went first; the chain could not replace a directory, and its temp file is gone.
    assert sorted(p.name for p in domain_dir.iterdir()) == ["fullchain.pem", "privkey.pem"]


class FakeLineage:
    """The part of ``certbot.interfaces.RenewableCert`` that renew_deploy reads."""

    def __init__(self, names: list[str], key: Path, fullchain: Path) -> None:
        self._names = names
        self.key_path = str(key)
        self.fullchain_path = str(fullchain)

    def names(self) -> list[str]:
        return self._names


def test_renew_deploy_installs_every_configured_name_and_skips_the_rest(
    plugin, tmp_path: Path, lineage_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    key, fullchain = lineage_files
    lineage = FakeLineage([TRACK, "other.example.test", CLICK], key, fullchain)
    with caplog.at_level(logging.WARNING, logger="trackproxy_certbot"):
        plugin.renew_deploy(lineage)

    certs = tmp_path / "state" / "certs"
    for name in (TRACK, CLICK):
        assert (certs / name / "fullchain.pem").read_bytes() == fullchain.read_bytes()
        assert (certs / name / "privkey.pem").read_bytes() == key.read_bytes()
    assert sorted(p.name for p in certs.iterdir()) == sorted([TRACK, CLICK])
    assert any("other.example.test" in r.getMessage() and r.name == "trackproxy_certbot"
               for r in caplog.records)


def test_names_challenge_types_and_no_enhancements(plugin) -> None:
    assert list(plugin.get_chall_pref(TRACK)) == [challenges.HTTP01]
    assert sorted(plugin.get_all_names()) == sorted([TRACK, CLICK])
    assert plugin.supported_enhancements() == []
    with pytest.raises(errors.PluginError, match="no enhancements"):
        plugin.enhance(TRACK, "redirect")
    plugin.save("Deployed ACME Certificate")  # nothing to save, nothing raised
    plugin.config_test()


BROKEN = (
    "state_dir: unused-state\n"
    "domains:\n"
    f"  {TRACK}: {{certificat: acme, cache_ttl: -1}}\n"
)


def test_prepare_and_config_test_report_every_error_with_its_place(
    registry: disco.PluginsRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    made = make_plugin(registry, tmp_path, path)
    for check in (made.prepare, made.config_test):
        with pytest.raises(errors.MisconfigurationError) as raised:
            check()
        message = str(raised.value)
        assert f"{path}:3:24: " in message and "certificat" in message
        assert f"{path}:3:53: " in message and "negative" in message


def test_without_the_option_the_config_comes_from_the_environment(
    registry: disco.PluginsRegistry, tmp_path: Path, config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRACKPROXY_CONFIG", str(config_file))
    made = make_plugin(registry, tmp_path, None)
    made.prepare()
    assert sorted(made.get_all_names()) == sorted([TRACK, CLICK])


# ---------------------------------------------------------------------------
# restart(): POST /reload on the admin listener


class AdminStandIn(ThreadingHTTPServer):
    """Answers every request with ``status``/``body`` and records (method, path)."""

    def __init__(self, status: int, body: dict) -> None:
        self.status, self.body, self.seen = status, json.dumps(body).encode(), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.seen.append(("POST", self.path))
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def admin_factory() -> Iterator:
    servers: list[AdminStandIn] = []

    def start(status: int, body: dict) -> AdminStandIn:
        servers.append(AdminStandIn(status, body))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def plugin_for_admin(registry, tmp_path: Path, port: int):
    made = make_plugin(registry, tmp_path, write_config(tmp_path, f"tcp:{port}:interface=127.0.0.1"))
    made.prepare()
    return made


def test_restart_asks_the_running_proxy_to_reload(registry, tmp_path: Path, admin_factory) -> None:
    admin = admin_factory(200, {"result": "success"})
    plugin_for_admin(registry, tmp_path, admin.server_address[1]).restart()
    assert admin.seen == [("POST", "/reload")]


def test_restart_reports_a_refused_reload_with_the_proxys_errors(
    registry, tmp_path: Path, admin_factory
) -> None:
    errors_ = ["/etc/trackproxy/trackproxy.yaml:7:3: unknown key 'upstrem'",
               "/etc/trackproxy/trackproxy.yaml:9:14: a duration cannot be negative"]
    admin = admin_factory(422, {"result": "failure", "errors": errors_})
    with pytest.raises(errors.PluginError) as raised:
        plugin_for_admin(registry, tmp_path, admin.server_address[1]).restart()
    assert "422" in str(raised.value)
    assert all(line in str(raised.value) for line in errors_)


def test_restart_is_quiet_when_the_proxy_is_not_running(
    registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as bound_not_listening:  # connecting to it is refused
        bound_not_listening.bind(("127.0.0.1", 0))
        made = plugin_for_admin(registry, tmp_path, bound_not_listening.getsockname()[1])
        with caplog.at_level(logging.INFO, logger="trackproxy_certbot"):
            made.restart()
    assert "trackproxy is not running" in caplog.text


def test_restart_does_nothing_when_the_proxy_runs_certbot_itself(
    registry, tmp_path: Path, admin_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = admin_factory(200, {"result": "success"})
    monkeypatch.setenv("TRACKPROXY_CERTBOT_NO_RELOAD", "1")
    plugin_for_admin(registry, tmp_path, admin.server_address[1]).restart()
    assert admin.seen == []


def test_restart_without_a_tcp_admin_listener_asks_for_a_manual_reload(
    registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = make_plugin(registry, tmp_path, write_config(tmp_path, f"unix:{tmp_path}/admin.sock"))
    with caplog.at_level(logging.WARNING, logger="trackproxy_certbot"):
        made.restart()
    assert "systemctl reload trackproxy" in caplog.text


# ---------------------------------------------------------------------------
# The certbot program


def run_certbot(tmp_path: Path, *args: str) -> str:
    dirs = [f"--{d}-dir" for d in ("config", "work", "logs")]
    paths = [str(tmp_path / "le" / d) for d in ("config", "work", "logs")]
    command = [sys.executable, "-c", "import sys; from certbot.main import main; sys.exit(main())",
               *args, *[x for pair in zip(dirs, paths) for x in pair]]
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_certbot_lists_the_plugin_as_authenticator_and_installer(tmp_path: Path) -> None:
    out = run_certbot(tmp_path, "plugins", "--text")
    block = out[out.index("* trackproxy"):].split("\n\n")[0]
    assert "Interfaces: Authenticator, Installer, Plugin" in " ".join(block.split())
    assert "trackproxy_certbot.plugin:Configurator" in block


def test_certbot_help_shows_the_config_option(tmp_path: Path) -> None:
    out = run_certbot(tmp_path, "--help", "trackproxy")
    assert "--trackproxy-config FILE" in out


# ---------------------------------------------------------------------------
# certonly: restart() installs what certbot left in live/


def certificate_pem(days: int) -> bytes:
    """A throw-away certificate for TRACK ending in ``days`` days (only its dates matter)."""
    now = datetime.datetime.now(datetime.UTC)
    cert, _ = pki.self_signed(TRACK, now - datetime.timedelta(days=1), now + datetime.timedelta(days=days))
    return pki.cert_pem(cert)


def put_live_lineage(tmp_path: Path, fullchain: bytes) -> None:
    live = tmp_path / "le" / "config" / "live" / TRACK
    live.mkdir(parents=True, exist_ok=True)
    (live / "fullchain.pem").write_bytes(fullchain)
    (live / "privkey.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nlive key\n")


@pytest.mark.parametrize("live_days, deployed_days, installed", [
    (90, None, True),   # nothing deployed yet: certonly's lineage goes in
    (90, 30, True),     # newer than what the proxy has
    (30, 90, False),    # an older lineage never replaces a newer certificate
])
def test_restart_installs_a_newer_live_lineage_only(
    registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    live_days: int, deployed_days: int | None, installed: bool,
) -> None:
    monkeypatch.setenv("TRACKPROXY_CERTBOT_NO_RELOAD", "1")
    live = certificate_pem(live_days)
    put_live_lineage(tmp_path, live)
    target = tmp_path / "state" / "certs" / TRACK / "fullchain.pem"
    before = None
    if deployed_days is not None:
        before = certificate_pem(deployed_days)
        target.parent.mkdir(parents=True)
        target.write_bytes(before)
    plugin = make_plugin(registry, tmp_path, write_config(tmp_path))
    plugin.prepare()
    plugin.restart()
    assert target.read_bytes() == (live if installed else before)
    if installed:
        assert mode(target.parent / "privkey.pem") == 0o600


def test_a_relative_config_path_is_kept_absolute_for_renewals(
    registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    plugin = make_plugin(registry, tmp_path, Path("trackproxy.yaml"))
    assert plugin.conf("config") == str(tmp_path / "trackproxy.yaml")
