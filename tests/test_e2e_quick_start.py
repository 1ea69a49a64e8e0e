"""End to end: the README's first command, from a fresh checkout, as a newcomer runs it.

A copy of the repository's files (what a clone holds: tracked and not ignored) in a new
directory, without a virtualenv; ``scripts/dev run`` there sets everything up, starts
the stand-in platform and the proxy, and prints a curl command. That command, run as
printed from another directory, must show the local domain's certificate and the
platform's 302 relayed; the README's local doctor invocation must pass; Ctrl-C
(SIGINT) must stop everything, and a second run must not run pip again.

Ports are fresh ones through the environment variables ``scripts/dev run`` documents, so
a developer's own ``scripts/dev run`` on the default ports does not collide.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from observe import poll
from proxy_process import REPO_ROOT, free_port

#: A fresh virtualenv takes pip a while (about 15 s here; more on a slow mirror).
FIRST_RUN_WITHIN = 240.0
RUN_WITHIN = 60.0
DOMAIN = "track.example.test"


def fresh_checkout(target: Path) -> Path:
    """The repository's files as a clone would have them, copied to ``target``."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs the repository's git metadata to know what a clone holds")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if not source.is_file():
            continue  # deleted in the working tree
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    return target


class LocalRun:
    """``scripts/dev run`` as a process, its output gathered line by line."""

    def __init__(self, checkout: Path, ports: dict[str, int]) -> None:
        self.checkout = checkout
        self.ports = ports
        self.lines: list[str] = []
        env = dict(os.environ, **{name: str(port) for name, port in ports.items()})
        env.pop("VIRTUAL_ENV", None)
        self.process = subprocess.Popen(
            [str(checkout / "scripts" / "dev"), "run"], cwd=checkout, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def curl_command(self, within: float) -> str:
        def printed() -> str | None:
            assert self.process.poll() is None, f"scripts/dev run exited:\n{self.output}"
            return next((line.strip() for line in self.lines if line.strip().startswith("curl ")), None)

        return poll(printed, within, "scripts/dev run to print its curl command", interval=0.2)

    def interrupt(self) -> int:
        """Ctrl-C (SIGINT, to the script's PID); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


def processes_in(directory: Path) -> list[str]:
    """``PID command`` of every process whose working directory is ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) == directory:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name} {command}")
        except OSError:
            continue
    return found


def fresh_ports() -> dict[str, int]:
    return {
        "TRACKPROXY_LOCAL_HTTP_PORT": free_port(),
        "TRACKPROXY_LOCAL_HTTPS_PORT": free_port(),
        "TRACKPROXY_LOCAL_ADMIN_PORT": free_port(),
        "TRACKPROXY_LOCAL_STAND_IN_PORT": free_port(),
    }


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRun]:
    checkout = fresh_checkout(tmp_path_factory.mktemp("fresh") / "trackproxy").resolve()
    assert not (checkout / ".venv").exists()
    run = LocalRun(checkout, fresh_ports())
    try:
        run.curl_command(FIRST_RUN_WITHIN)
        yield run
    finally:
        run.interrupt()


def test_the_printed_curl_shows_the_domains_certificate_and_the_relayed_302(first_run, tmp_path):
    command = first_run.curl_command(RUN_WITHIN)
    # As printed, from a terminal somewhere else.
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"subject: CN={DOMAIN}" in result.stderr, result.stderr
    assert "< HTTP/1.1 302 Found" in result.stderr and "< Server: msys-http" in result.stderr, result.stderr
    assert shlex.split(command)[-1].endswith("/f/a/b/c/d")
    # The platform saw the click for the tracking domain, over TLS with its own name as SNI.
    poll(lambda: any(line.startswith("platform | GET /f/a/b/c/d") and f"host={DOMAIN}" in line
                     and "sni=spgo.io" in line for line in first_run.lines),
         10, "the stand-in's line for the click")


def test_the_first_run_prints_no_packaging_noise(first_run):
    output = first_run.output
    for noise in ("Editable installation", "WARNING", "!!", "Successfully installed"):
        assert noise not in output, output
    assert f"http://127.0.0.1:{first_run.ports['TRACKPROXY_LOCAL_ADMIN_PORT']}/status" in output
    assert "Ctrl-C" in output


def test_doctor_on_the_local_config_passes_all_but_dns_which_says_why(first_run):
    result = subprocess.run(
        [str(first_run.checkout / ".venv" / "bin" / "trackproxy"), "doctor", "-c", "conf/.local-ports.yaml",
         "--trust-self-signed"],
        cwd=first_run.checkout, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split(None, 3) for line in result.stdout.splitlines() if line.startswith(DOMAIN)]
    verdicts = {row[1]: (row[2], row[3]) for row in rows}
    assert verdicts["dns"][0] == "WARN" and "reserved" in verdicts["dns"][1], result.stdout
    assert {check: verdict for check, (verdict, _) in verdicts.items() if check != "dns"} == {
        "caa": "PASS", "https": "PASS", "probe": "PASS", "http": "PASS"}, result.stdout
    assert "302 from msys-http" in verdicts["probe"][1]


def test_ctrl_c_stops_the_proxy_and_the_stand_in(first_run):
    assert processes_in(first_run.checkout), "the proxy and the stand-in run in the checkout"
    assert first_run.interrupt() == 0, first_run.output
    assert processes_in(first_run.checkout) == []
    for port in first_run.ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # nothing listens on it any more


def test_a_second_run_runs_no_pip(first_run):
    first_run.interrupt()
    pip_log = first_run.checkout / ".venv" / "pip.log"
    before = pip_log.stat().st_mtime_ns
    again = LocalRun(first_run.checkout, fresh_ports())
    try:
        again.curl_command(RUN_WITHIN)
        assert pip_log.stat().st_mtime_ns == before
        assert "installing trackproxy" not in again.output, again.output
    finally:
        assert again.interrupt() == 0


def test_a_busy_port_is_reported_with_what_to_change(first_run):
    first_run.interrupt()
    ports = fresh_ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["TRACKPROXY_LOCAL_HTTPS_PORT"]))
        taken.listen()
        run = LocalRun(first_run.checkout, ports)
        status = run.process.wait(timeout=RUN_WITHIN)
    poll(lambda: "in use" in run.output, 5, "the message")
    assert status == 1
    port = ports["TRACKPROXY_LOCAL_HTTPS_PORT"]
    assert f"port {port} (listen.https) is in use" in run.output, run.output
    assert "TRACKPROXY_LOCAL_HTTPS_PORT=" in run.output
    assert processes_in(first_run.checkout) == []
