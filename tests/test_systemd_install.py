"""The systemd units and ``scripts/install.sh``, for real.

``install.sh --root`` installs into a scratch root once per module (a virtualenv and a
``pip install`` of this checkout: the slow part), then runs again to prove it idempotent.
The installed units are checked by ``systemd-analyze verify`` and ``security --offline``
(no running systemd needed), and the installed ``trackproxy`` runs on the installed
config under ``systemd-socket-activate`` with sockets shaped like the socket units'
(a bare port: one dual-stack IPv6 socket), watched through ``$NOTIFY_SOCKET`` the way
``Type=notify`` and ``WatchdogSec=`` watch it.

What a container without systemd as PID 1 cannot show (``systemctl enable --now``, the
sandbox applied, the timer firing) is left to a VM; ``install.sh`` skips those steps in
``--root`` mode and says so.
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.cli import _parser
from proxy.config import load_config

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install.sh"
UNITS = ("trackproxy-http.socket", "trackproxy-https.socket", "trackproxy.service",
         "trackproxy-renew.service", "trackproxy-renew.timer")
CONFIG = "/etc/trackproxy/trackproxy.yaml"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian package systemd)"
)
needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="needs systemd-socket-activate (Debian package systemd)",
)


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}/{key} set {len(values)} times"
    return values[0]


@dataclass
class Install:
    root: Path
    prefix: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess
    units_before_second: dict[str, tuple[bytes, int]]
    edited_config: str

    @property
    def trackproxy(self) -> Path:
        return self.prefix / "venv" / "bin" / "trackproxy"

    @property
    def config(self) -> Path:
        return self.root / CONFIG.lstrip("/")

    def unit(self, name: str) -> Path:
        return self.root / "etc" / "systemd" / "system" / name


def run_install(root: Path, prefix: Path) -> subprocess.CompletedProcess:
    # The test's interpreter: deterministic, and any Python 3.11+ will do for --root.
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--prefix", str(prefix), "--no-start"],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    """install.sh run twice into one scratch root, the operator's edit in between."""
    base = tmp_path_factory.mktemp("install")
    root, prefix = base / "root", base / "opt" / "trackproxy"
    first = run_install(root, prefix)
    assert first.returncode == 0, f"install.sh failed:\n{first.stdout}\n{first.stderr}"
    system = root / "etc" / "systemd" / "system"
    before = {name: ((system / name).read_bytes(), (system / name).stat().st_mtime_ns) for name in UNITS}
    config = root / CONFIG.lstrip("/")
    edited = config.read_text().replace("ops@example.com", "tracking-ops@example.org") + "# edited by the operator\n"
    config.write_text(edited)
    second = run_install(root, prefix)
    return Install(root, prefix, first, second, before, edited)


# ---------------------------------------------------------------------------
# install.sh


def test_install_puts_a_working_trackproxy_in_the_prefix_virtualenv(installed):
    version = subprocess.run([installed.trackproxy, "--version"], capture_output=True, text=True)
    assert version.returncode == 0
    assert version.stdout.startswith("trackproxy ")
    # Non-editable: the code lives in the virtualenv, not in this checkout.
    where = subprocess.run([installed.prefix / "venv" / "bin" / "python", "-c", "import proxy; print(proxy.__file__)"],
                           capture_output=True, text=True, check=True, cwd=installed.root).stdout
    assert where.startswith(str(installed.prefix / "venv"))


def test_first_install_writes_the_example_config_and_the_state_dir(installed):
    assert f"writing {installed.config} from conf/trackproxy.yaml" in installed.first.stdout
    assert installed.config.stat().st_mode & 0o777 == 0o640
    state = installed.root / "var" / "lib" / "trackproxy"
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o750
    check = subprocess.run([installed.trackproxy, "check-config", "-c", installed.config],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # The next steps name what the operator must edit.
    assert "domains:" in installed.first.stdout and "acme.email:" in installed.first.stdout


def test_root_mode_says_which_steps_it_skipped(installed):
    skipped = [line for line in installed.first.stdout.splitlines() if "skipped in --root mode" in line]
    assert any("system user trackproxy" in line for line in skipped)
    assert any("systemctl" in line for line in skipped)


def test_units_are_installed_with_the_prefix_substituted(installed):
    venv_bin = f"{installed.prefix}/venv/bin/trackproxy"
    service = read_unit(installed.unit("trackproxy.service"))
    assert one(service, "Service", "ExecStart") == f"{venv_bin} run -c {CONFIG}"
    assert one(service, "Service", "ExecStartPre") == f"{venv_bin} check-config -c {CONFIG}"
    renew = read_unit(installed.unit("trackproxy-renew.service"))
    assert one(renew, "Service", "ExecStart") == f"{venv_bin} certs -c {CONFIG} renew"
    for name in UNITS:
        text = installed.unit(name).read_text()
        assert text.replace(str(installed.prefix), "/opt/trackproxy") == (ROOT / "systemd" / name).read_text()


def test_second_run_succeeds_keeps_the_edited_config_and_rewrites_nothing(installed):
    assert installed.second.returncode == 0, f"{installed.second.stdout}\n{installed.second.stderr}"
    assert f"keeping the existing {installed.config}" in installed.second.stdout
    assert installed.config.read_text() == installed.edited_config
    for name, (content, mtime) in installed.units_before_second.items():
        assert installed.unit(name).read_bytes() == content
        assert installed.unit(name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not any(f"installing {installed.unit(name)}" in installed.second.stdout for name in UNITS)


def test_install_refuses_unknown_options():
    result = subprocess.run(["bash", str(INSTALL), "--prefx", "/x"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown option --prefx" in result.stderr


# ---------------------------------------------------------------------------
# The units as systemd reads them


@needs_systemd_analyze
def test_installed_units_pass_systemd_analyze_verify(installed):
    paths = [str(installed.unit(name)) for name in UNITS]
    result = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Any "Unknown key", missing unit or non-executable command is printed here.
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_misspelt_directive(tmp_path, installed):
    """The check above has teeth in this environment."""
    bad = tmp_path / "trackproxy.service"
    bad.write_text(installed.unit("trackproxy.service").read_text().replace("ProtectSystem=", "ProtectSytem="))
    for name in UNITS:
        if name != "trackproxy.service":
            shutil.copy(installed.unit(name), tmp_path / name)
    result = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert "Unknown key 'ProtectSytem'" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["trackproxy.service", "trackproxy-renew.service"])
def test_services_keep_a_low_exposure_score(installed, name):
    """systemd's own sandbox rating stays in its "OK" band (below 2.0 of 10)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=19", str(installed.unit(name))],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:]


def test_service_unit_is_a_notify_service_reloaded_by_sighup_as_an_unprivileged_user():
    service = read_unit(ROOT / "systemd" / "trackproxy.service")
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s",
        "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
        "User": "trackproxy", "Group": "trackproxy",
        "StateDirectory": "trackproxy", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {key: one(service, "Service", key) for key in expected} == expected
    # Each would break the service, or open /etc/trackproxy: see the unit's comments.
    for key in ("MemoryDenyWriteExecute", "ConfigurationDirectory", "ReadWritePaths"):
        assert key not in service["Service"]
    sockets = {"trackproxy-http.socket", "trackproxy-https.socket"}
    assert set(one(service, "Unit", "Requires").split()) == sockets
    assert sockets <= set(one(service, "Unit", "After").split())
    assert one(service, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize(
    ("unit", "key"),
    [("trackproxy.service", "ExecStartPre"), ("trackproxy.service", "ExecStart"),
     ("trackproxy-renew.service", "ExecStart")],
)
def test_unit_command_lines_are_valid_trackproxy_commands(unit, key):
    argv = shlex.split(one(read_unit(ROOT / "systemd" / unit), "Service", key))
    assert argv[0] == "/opt/trackproxy/venv/bin/trackproxy"
    args = _parser().parse_args(argv[1:])
    assert args.config == CONFIG
    if unit == "trackproxy-renew.service":
        assert (args.command, args.action, args.force, args.domains) == ("certs", "renew", False, [])


def test_renew_timer_runs_the_renew_service_twice_a_day_with_a_random_delay():
    timer = read_unit(ROOT / "systemd" / "trackproxy-renew.timer")
    assert one(timer, "Timer", "OnCalendar") == "*-*-* 00,12:00:00"
    assert one(timer, "Timer", "RandomizedDelaySec") == "1h"
    assert one(timer, "Timer", "Persistent") == "true"
    assert "Unit" not in timer["Timer"]  # the service of the same name
    assert one(timer, "Install", "WantedBy") == "timers.target"
    renew = read_unit(ROOT / "systemd" / "trackproxy-renew.service")
    assert (one(renew, "Service", "Type"), one(renew, "Service", "User")) == ("oneshot", "trackproxy")
    assert "AF_INET" in one(renew, "Service", "RestrictAddressFamilies").split()  # POST /reload


@pytest.mark.parametrize(("role", "port"), [("http", "80"), ("https", "443")])
def test_installed_config_adopts_each_socket_unit_by_its_descriptor_name(installed, role, port):
    sock = read_unit(ROOT / "systemd" / f"trackproxy-{role}.socket")
    assert one(sock, "Socket", "ListenStream") == port
    assert one(sock, "Socket", "FileDescriptorName") == role
    assert one(sock, "Socket", "Service") == "trackproxy.service"
    assert one(sock, "Install", "WantedBy") == "sockets.target"
    # A bare port is one IPv6 socket taking IPv4 too: INET6 reads its addresses right
    # (INET would misread every IPv6 sockaddr, hence X-Forwarded-For).
    assert one(sock, "Socket", "BindIPv6Only") == "both"
    config = load_config(str(installed.config))
    assert getattr(config.listen, role) == (f"systemd:domain=INET6:name={role}",)
    assert config.listen.admin == ("tcp:9180:interface=127.0.0.1",)


# ---------------------------------------------------------------------------
# The installed service under socket activation and a notify watcher


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return s.getsockname()[1]


def receive(notify: socket.socket, wanted: str, deadline: float, seen: list[str]) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        notify.settimeout(max(0.01, end - time.monotonic()))
        try:
            message = notify.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if wanted in message.split("\n"):
            return
    pytest.fail(f"no {wanted} within {deadline}s; got {seen}")


def get(host: str, port: int, domain: str, path: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
        conn.sock = context.wrap_socket(socket.create_connection((host, port), timeout=10), server_hostname=domain)
    try:
        conn.request("GET", path, headers={"Host": domain})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def connect_when_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"systemd-socket-activate is not listening on {port}:\n{log.read_text()}")
            time.sleep(0.05)


@needs_socket_activate
def test_installed_service_speaks_notify_and_serves_the_dual_stack_sockets(installed, tmp_path, ca, upstream):
    """The installed trackproxy, on the installed config's listen: endpoints, handed
    sockets like ListenStream=80/443 make: READY=1 when up, answers over IPv4 and IPv6
    with each client's own address in X-Forwarded-For, WATCHDOG=1 pings, RELOADING=1
    then READY=1 on SIGHUP (ExecReload), STOPPING=1 on SIGTERM."""
    domain, token = "track.example.test", "tok-EN_1"
    state = tmp_path / "state"
    (state / "acme-challenge").mkdir(parents=True)
    (state / "acme-challenge" / token).write_text(f"{token}.thumbprint")
    installed_listen = load_config(str(installed.config)).listen
    admin = free_port()
    config = tmp_path / "trackproxy.yaml"
    config.write_text(
        "listen:\n"
        f"  http: {list(installed_listen.http)}\n"
        f"  https: {list(installed_listen.https)}\n"
        f'  admin: ["tcp:{admin}:interface=127.0.0.1"]\n'
        f"state_dir: {state}\n"
        "defaults: {upstream: sparkpost, cache_ttl: 0}\n"
        f"upstreams:\n  sparkpost: {{connect_to: '{upstream.address}', ca_file: '{ca.cert_path}'}}\n"
        f"domains:\n  {domain}: {{certificate: self-signed}}\n"
    )
    http_port, https_port = free_port(), free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["systemd-socket-activate",
             "-l", str(http_port), "--fdname=http", "-l", str(https_port), "--fdname=https",
             "-E", f"NOTIFY_SOCKET={tmp_path / 'notify'}", "-E", "WATCHDOG_USEC=1000000",
             str(installed.trackproxy), "run", "-c", str(config)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    seen: list[str] = []
    try:
        # systemd-socket-activate execs the service at the first connection.
        connect_when_listening(http_port, proc, log)
        receive(notify, "READY=1", 30, seen)
        expected = (200, f"{token}.thumbprint".encode())
        challenge_path = f"/.well-known/acme-challenge/{token}"
        assert get("127.0.0.1", http_port, domain, challenge_path) == expected
        assert get("::1", http_port, domain, challenge_path) == expected
        context = ssl.create_default_context(cafile=str(state / "certs" / domain / "self-signed.pem"))
        assert get("127.0.0.1", https_port, domain, challenge_path, context) == expected
        assert get("::1", https_port, domain, challenge_path, context) == expected
        # An IPv4 client reaches the IPv6 socket as ::ffff:127.0.0.1; the platform
        # must see each client's own address.
        for client, port, tls in (("127.0.0.1", http_port, None), ("::1", https_port, context)):
            path = f"/f/dual-stack/{'tls' if tls else 'plain'}"
            assert get(client, port, domain, path, tls)[0] == 302
            assert upstream.only(path).header("X-Forwarded-For") == client
        receive(notify, "WATCHDOG=1", 3, seen)
        proc.send_signal(signal.SIGHUP)
        receive(notify, "RELOADING=1", 10, seen)
        receive(notify, "READY=1", 10, seen)
        proc.send_signal(signal.SIGTERM)
        receive(notify, "STOPPING=1", 10, seen)
        assert proc.wait(timeout=30) == 0, log.read_text()
    except BaseException:
        print(log.read_text())
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
