"""The proxy as a child process for the end-to-end tests: free loopback ports, ``trackproxy
run`` on a YAML written for the test, its log, its worker processes, and the CLI.

(Test modules import these helpers by module name: pytest puts ``tests/`` on
``sys.path`` because the directory is not a package.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------
# Ports


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]



# ---------------------------------------------------------------------------
# The proxy as a process


@dataclass
class ProxyProcess:
    """A running ``python -m proxy run -c CONFIG``, and where to reach it."""

    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    state_dir: Path
    http_port: int
    https_port: int
    admin_port: int
    _log_offset: int = field(default=0)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines the proxy wrote to stdout and stderr."""
        return log_tail(self.log_path, lines)

    def mark_log(self) -> None:
        """Remember where the log ends, for :meth:`log_since_mark`."""
        try:
            self._log_offset = self.log_path.stat().st_size
        except OSError:
            self._log_offset = 0

    def log_since_mark(self) -> str:
        """What the proxy logged since :meth:`mark_log`."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return "(no log)"

    def certificate_path(self, domain: str) -> Path:
        """Where the proxy keeps a self-signed domain's certificate."""
        return self.state_dir / "certs" / domain / "self-signed.pem"

    def stop(self) -> None:
        stop_process(self.process)


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child process's log, for a failure message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(process: subprocess.Popen[Any]) -> None:
    """End a process we started, by its own PID: terminate, then kill if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_proxy(
    directory: Path,
    config: Mapping[str, Any],
    files: Mapping[str, Path] | None = None,
    ready_within: float = 15.0,
    http_port: int | None = None,
    env: Mapping[str, str] | None = None,
    listen: Mapping[str, list[str]] | None = None,
) -> ProxyProcess:
    """Write ``trackproxy.yaml`` into ``directory`` and run the proxy on it.

    ``listen`` (three fresh loopback ports) and ``state_dir`` are filled in unless
    ``config`` sets them. ``files`` are copied next to the YAML under the given names,
    so the config can name them by relative path. ``http_port`` chooses the plain-HTTP
    port in advance (pebble's ``httpPort`` must name it before the proxy starts); ``env``
    adds to the process's environment; ``listen`` adds listener roles (``health``).

    Returns:
        The process once ``GET /healthz`` on its admin listener answers 200.

    Raises:
        RuntimeError: it exited or was not ready within ``ready_within`` seconds; the
            message carries the tail of its log.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in (files or {}).items():
        target = directory / name
        target.write_bytes(source.read_bytes())
        target.chmod(source.stat().st_mode & 0o777)
    if http_port is None:
        http_port = free_port()
    https_port, admin_port = free_port(), free_port()
    full = {
        "listen": {
            "http": [f"tcp:{http_port}:interface={LOOPBACK}"],
            "https": [f"tcp:{https_port}:interface={LOOPBACK}"],
            "admin": [f"tcp:{admin_port}:interface={LOOPBACK}"],
            **(listen or {}),
        },
        "state_dir": str(directory / "state"),
        **config,
    }
    config_path = directory / "trackproxy.yaml"
    config_path.write_text(yaml.safe_dump(full, sort_keys=False))
    log_path = directory / "proxy.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    proxy = ProxyProcess(
        process=process,
        config_path=config_path,
        log_path=log_path,
        state_dir=Path(full["state_dir"]),
        http_port=http_port,
        https_port=https_port,
        admin_port=admin_port,
    )
    try:
        _wait_healthy(proxy, ready_within)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def _wait_healthy(proxy: ProxyProcess, within: float) -> None:
    url = f"http://{LOOPBACK}:{proxy.admin_port}/healthz"
    deadline = time.monotonic() + within
    last = "no answer yet"
    while True:
        if proxy.process.poll() is not None:
            raise RuntimeError(
                f"the proxy exited with {proxy.process.returncode} before it was ready; "
                f"log:\n{proxy.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except OSError as e:
            last = repr(e)
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the proxy was not healthy within {within}s ({last}); log:\n{proxy.log_tail()}"
            )
        time.sleep(0.05)  # poll interval, not a wait for something to happen


def children(pid: int) -> set[int]:
    """The PIDs of ``pid``'s live children (a proxy's worker processes)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def run_trackproxy(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``trackproxy ARGS`` as an operator runs it, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
    )


def kill_a_worker(proxy: ProxyProcess) -> int:
    """SIGKILL one of the proxy's worker processes (the oldest); its PID."""
    victim = min(children(proxy.process.pid))
    os.kill(victim, signal.SIGKILL)
    return victim


def replaced_worker(proxy: ProxyProcess, victim: int, workers: int = 2, within: float = 20) -> set[int]:
    """Wait until the parent has ``workers`` workers again, ``victim`` not among them; them."""
    deadline = time.monotonic() + within
    while True:
        now = children(proxy.process.pid)
        if len(now) == workers and victim not in now:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {victim} not replaced within {within}s (workers now: {now})")
        time.sleep(0.05)  # poll interval, not a wait for something to happen
