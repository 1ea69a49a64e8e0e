"""What the measuring scripts share: the virtualenv, ports, the processes they start,
the stand-in platform, waiting for trackproxy, and what ``/proc`` says of a process tree.

``scripts/bench``, ``scripts/soak`` and ``scripts/testssl`` import it (a script's own
directory is first on ``sys.path``). Everything started through :class:`Processes` runs
on loopback and is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
LOOPBACK = "127.0.0.1"


def in_the_virtualenv() -> bool:
    return Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def rerun_in_the_virtualenv(script: str, argv: list[str]) -> None:
    """Make the checkout's virtualenv (scripts/dev venv) and run ``script`` again in it."""
    subprocess.run([str(ROOT / "scripts" / "dev"), "venv"], check=True)
    os.execv(str(PYTHON), [str(PYTHON), script, *argv])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Processes:
    """Everything a script started, stopped by PID at the end (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=ROOT, **kwargs)
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for _, process in reversed(self.started):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.started.clear()


def wait_for(check: Callable[[], bool], process: subprocess.Popen, what: str, within: float = 30.0) -> None:
    """Poll ``check`` until it holds; exit the script if ``process`` dies or time runs out."""
    deadline = time.monotonic() + within
    while not check():
        if process.poll() is not None:
            sys.exit(f"{Path(sys.argv[0]).name}: {what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"{Path(sys.argv[0]).name}: {what} not ready within {within:g}s")
        time.sleep(0.05)


class StandIn:
    """``trackproxy stand-in`` on a free loopback port, its counts read through SIGUSR1."""

    def __init__(self, processes: Processes, directory: Path, name: str, delay: float = 0.0,
                 quiet: bool = True) -> None:
        self.port = free_port()
        self.log = directory / f"stand-in-{name}.log"
        command = [str(PYTHON), "-m", "proxy", "stand-in", "--port", str(self.port),
                   "--dir", str(directory / "stand-in"), "--delay", f"{delay}"]
        self.process = processes.start(f"stand-in {name}", command + (["--quiet"] if quiet else []), self.log)
        wait_for(lambda: b"listening on" in self.log.read_bytes(), self.process, f"the {name} stand-in")
        self.address = f"{LOOPBACK}:{self.port}"
        self.ca_file = directory / "stand-in" / "ca.pem"

    def counts(self) -> tuple[int, int]:
        """(connections, requests) so far."""
        before = self.log.read_bytes().count(b"stand-in counts:")
        self.process.send_signal(signal.SIGUSR1)
        wait_for(lambda: self.log.read_bytes().count(b"stand-in counts:") > before, self.process, "stand-in counts")
        last = self.log.read_text().rsplit("stand-in counts:", 1)[1]
        found = dict(re.findall(r"(\w+)=(\d+)", last.splitlines()[0]))
        return int(found["connections"]), int(found["requests"])


def healthy(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def start_trackproxy(processes: Processes, config: Path, admin_port: int, log: Path,
                     name: str = "trackproxy", within: float = 60.0) -> subprocess.Popen:
    """``trackproxy run -c config``, returned once its admin listener says healthy."""
    process = processes.start(name, [str(PYTHON), "-m", "proxy", "run", "-c", str(config)], log)
    wait_for(lambda: healthy(admin_port), process, name, within)
    return process


def _proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/PID/stat fields after the command name."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stats[int(entry)] = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return stats


def children_of(pid: int) -> list[int]:
    return [child for child, fields in _proc_stats().items() if int(fields[1]) == pid]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats = _proc_stats()
    return sum((int(stats[p][11]) + int(stats[p][12])) / ticks for p in process_tree(pid) if p in stats)


def resident_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
