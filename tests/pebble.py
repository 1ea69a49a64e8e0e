"""Helpers for tests that need a real ACME server: Debian's pebble, and certbot run against it.

This module owns the ACME side of an end-to-end test: a listener certificate for pebble
made on the spot, ``pebble-challtestsrv`` as the only DNS server pebble (and the proxy's
``resolvers``) asks, ``pebble`` itself on loopback ports, and ``certbot`` run as a child
process with its directories, ``HOME`` and trust confined to a test directory. Which port
pebble's HTTP-01 validation dials is the caller's choice: the proxy's plain-HTTP listener.
It holds no assertions about the proxy or its plugin; those belong to the test modules.

Facts it relies on (Debian pebble 2.4.0, certbot 5.8; see the team's certbot-pebble notes):

- challtestsrv binds its own HTTP-01/TLS-ALPN-01 servers on every interface by default
  (``:5002`` would steal an HTTP port): they are turned off, DNS and management bound to
  127.0.0.1, and no AAAA answer, so pebble dials the proxy on 127.0.0.1 only.
- ``PEBBLE_VA_NOSLEEP=1`` (else up to 15 s per validation), ``PEBBLE_WFE_NONCEREJECT=0``
  (else 5 % of nonces are refused), ``PEBBLE_AUTHZREUSE=0`` (else a second order may skip
  the challenge, so a plugin's ``perform`` would not run).
- Pebble makes a new root and intermediate on every start; :meth:`Pebble.root_pem` and
  :meth:`Pebble.intermediate_pem` fetch them to verify what it issued.
- Non-interactive ``certbot renew`` sleeps up to 480 s first unless told
  ``--no-random-sleep-on-renew``; :func:`certbot` always says so.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from proxy.testing import LocalCA

from proxy_process import LOOPBACK, free_port

PEBBLE = "pebble"
CHALLTESTSRV = "pebble-challtestsrv"
#: Where pebble's binaries come from, for the skip message.
DEBIAN_PACKAGE = "pebble"

#: certbot's console script without depending on where the venv keeps it
#: (certbot 5.8 has no ``certbot.__main__``, so ``python -m certbot`` does not run).
_CERTBOT_MAIN = "import sys; from certbot.main import main; sys.exit(main())"


def require_pebble() -> None:
    """Skip the calling test unless Debian's pebble binaries are on ``PATH``."""
    missing = [name for name in (PEBBLE, CHALLTESTSRV) if shutil.which(name) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: needs the Debian package "
            f"{DEBIAN_PACKAGE!r} (as root: apt-get install -y {DEBIAN_PACKAGE}; "
            f"scripts/dev test installs it when run as root)"
        )


def _distinct_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` free loopback ports, none equal to another or to one in ``taken``."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in taken and port not in ports:
            ports.append(port)
    return ports


# ---------------------------------------------------------------------------
# The ACME server


class Pebble:
    """Pebble and its DNS server (``pebble-challtestsrv``) as child processes on loopback.

    Every name resolves to 127.0.0.1 (A only, no AAAA) unless :meth:`set_address` says
    otherwise; pebble validates HTTP-01 on ``http_port`` of the address it resolved.
    Use as a context manager, or call :meth:`start` and :meth:`stop`. Logs go to
    ``pebble.log`` and ``challtestsrv.log`` in ``directory``.

    Args:
        directory: for the listener certificate, the config and the logs.
        http_port: the port pebble's HTTP-01 validation connects to (``httpPort``).
    """

    def __init__(self, directory: Path, http_port: int) -> None:
        self.directory = directory
        self.http_port = http_port
        (
            self.port,
            self.management_port,
            self.tls_port,
            self.dns_port,
            self.challtestsrv_port,
        ) = _distinct_ports(5, {http_port})
        self.pebble_log = directory / "pebble.log"
        self.challtestsrv_log = directory / "challtestsrv.log"
        self.ca_bundle = directory / "listener-ca.pem"
        self._processes: list[subprocess.Popen[bytes]] = []
        self._ssl: ssl.SSLContext | None = None

    # -- where to reach it

    @property
    def directory_url(self) -> str:
        """The ACME directory, for certbot's ``--server``."""
        return f"https://{LOOPBACK}:{self.port}/dir"

    @property
    def dns_server(self) -> str:
        """``HOST:PORT`` of the DNS server pebble asks, for the proxy's ``resolvers``."""
        return f"{LOOPBACK}:{self.dns_port}"

    # -- life cycle

    def start(self, ready_within: float = 15.0) -> Pebble:
        """Write the certificate and config, start both servers, wait until ACME answers.

        Raises:
            RuntimeError: a server exited or the directory did not answer in time; the
                message carries both logs' tails.
        """
        require_pebble()
        self.directory.mkdir(parents=True, exist_ok=True)
        # pebble's listeners: a throw-away CA, and a leaf for localhost and 127.0.0.1.
        listener_ca = LocalCA(self.directory / "listener")
        cert_path, key_path = listener_ca.issue("localhost", ip=LOOPBACK)
        shutil.copyfile(listener_ca.cert_path, self.ca_bundle)
        self._ssl = ssl.create_default_context(cafile=str(self.ca_bundle))
        config = {
            "pebble": {
                "listenAddress": f"{LOOPBACK}:{self.port}",
                "managementListenAddress": f"{LOOPBACK}:{self.management_port}",
                "certificate": str(cert_path),
                "privateKey": str(key_path),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        config_path = self.directory / "pebble.json"
        config_path.write_text(json.dumps(config, indent=2))
        try:
            self._spawn(
                [
                    CHALLTESTSRV,
                    "-dns01", self.dns_server,
                    "-http01", "",
                    "-https01", "",
                    "-tlsalpn01", "",
                    "-management", f"{LOOPBACK}:{self.challtestsrv_port}",
                    "-defaultIPv4", LOOPBACK,
                    "-defaultIPv6", "",
                ],
                self.challtestsrv_log,
                {},
            )
            self._spawn(
                [PEBBLE, "-config", str(config_path), "-dnsserver", self.dns_server],
                self.pebble_log,
                {
                    "PEBBLE_VA_NOSLEEP": "1",
                    "PEBBLE_WFE_NONCEREJECT": "0",
                    "PEBBLE_AUTHZREUSE": "0",
                },
            )
            self._wait_ready(ready_within)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        with log_path.open("wb") as log:
            self._processes.append(
                subprocess.Popen(
                    argv,
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **env),
                )
            )

    def _wait_ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        last = "no answer yet"
        while True:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited with {process.returncode} before pebble "
                        f"was ready; logs:\n{self.log_tail()}"
                    )
            try:
                with urllib.request.urlopen(
                    self.directory_url, timeout=1, context=self._ssl
                ) as answer:
                    directory = json.load(answer)
                if "newOrder" in directory and self._challtestsrv_answers():
                    return
                last = f"directory {directory!r}"
            except (OSError, ValueError) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"pebble was not ready within {within}s ({last}); logs:\n{self.log_tail()}"
                )
            time.sleep(0.05)  # poll interval, not a wait for something to happen

    def _challtestsrv_answers(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{LOOPBACK}:{self.challtestsrv_port}/", timeout=1
            ):
                return True
        except urllib.error.HTTPError:
            return True  # 404 for "/": the management server is up
        except OSError:
            return False

    def stop(self) -> None:
        """End both servers (each by its own PID): terminate, then kill if they linger."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each server's log, under a heading per server."""
        parts = []
        for path in (self.pebble_log, self.challtestsrv_log):
            try:
                text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            except OSError:
                text = "(no log)"
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    # -- DNS, through challtestsrv's management API

    def _manage(self, endpoint: str, body: Mapping[str, Any]) -> None:
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.challtestsrv_port}/{endpoint}",
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            if answer.status != 200:
                raise RuntimeError(f"challtestsrv /{endpoint} answered {answer.status}")

    def set_address(self, name: str, ip: str) -> None:
        """Answer A (or AAAA, for an IPv6 ``ip``) queries for ``name`` with ``ip`` alone."""
        family = "aaaa" if ipaddress.ip_address(ip).version == 6 else "a"
        fqdn = _fqdn(name)
        self._manage(f"clear-{family}", {"host": fqdn})  # add-* appends to what is there
        self._manage(f"add-{family}", {"host": fqdn, "addresses": [ip]})

    def clear_address(self, name: str) -> None:
        """Back to the defaults for ``name``: A 127.0.0.1, no AAAA."""
        fqdn = _fqdn(name)
        self._manage("clear-a", {"host": fqdn})
        self._manage("clear-aaaa", {"host": fqdn})

    def add_caa(self, name: str, value: str, tag: str = "issue") -> None:
        """Add one CAA record (flags 0) to ``name``'s answer; records accumulate."""
        self._manage("add-caa", {"host": _fqdn(name), "policies": [{"tag": tag, "value": value}]})

    def clear_caa(self, name: str) -> None:
        """No CAA records for ``name`` any more."""
        self._manage("clear-caa", {"host": _fqdn(name)})

    # -- what pebble issues with

    def _management_get(self, path: str) -> str:
        url = f"https://{LOOPBACK}:{self.management_port}{path}"
        with urllib.request.urlopen(url, timeout=5, context=self._ssl) as answer:
            return answer.read().decode("ascii")

    def root_pem(self) -> str:
        """This run's root certificate (PEM): pebble makes a new one on every start."""
        return self._management_get("/roots/0")

    def intermediate_pem(self) -> str:
        """This run's intermediate certificate (PEM), which signs every leaf."""
        return self._management_get("/intermediates/0")


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


# ---------------------------------------------------------------------------
# certbot as a child process


def certbot_dirs(directory: Path) -> dict[str, Path]:
    """Where :func:`certbot` keeps its config (``live/``, ``renewal/``), work, logs and HOME."""
    return {name: directory / name for name in ("config", "work", "logs", "home")}


def certbot(
    args: Sequence[str],
    directory: Path,
    *,
    ca_bundle: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``certbot ARGS`` non-interactively with everything it writes under ``directory``.

    Added to ``args``: the config, work and logs directories (see :func:`certbot_dirs`),
    ``--non-interactive --agree-tos --no-random-sleep-on-renew``, and
    ``--register-unsafely-without-email`` unless ``args`` give an address. ``HOME`` is a
    fresh directory (certbot reads ``~/.config/letsencrypt/cli.ini``) and certbot trusts
    ``ca_bundle`` for HTTPS (pebble's listener). ``--server`` is the caller's to give.

    Returns:
        The finished process, output captured as text; it is not checked.
    """
    dirs = certbot_dirs(directory)
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-c", _CERTBOT_MAIN,
        *args,
        "--config-dir", str(dirs["config"]),
        "--work-dir", str(dirs["work"]),
        "--logs-dir", str(dirs["logs"]),
        "--non-interactive",
        "--agree-tos",
        # Hidden flag: without it a non-interactive renew first sleeps 1-480 s.
        "--no-random-sleep-on-renew",
    ]
    if not any(a in ("-m", "--email") or a.startswith("--email=") for a in args):
        argv.append("--register-unsafely-without-email")
    full_env = dict(os.environ)
    full_env.update(
        HOME=str(dirs["home"]),
        XDG_CONFIG_HOME=str(dirs["home"] / ".config"),
        REQUESTS_CA_BUNDLE=str(ca_bundle),
    )
    full_env.update(env or {})
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def certbot_report(
    result: subprocess.CompletedProcess[str], directory: Path, lines: int = 40
) -> str:
    """What a failed :func:`certbot` run said: exit code, output, and its log's tail."""
    log = certbot_dirs(directory)["logs"] / "letsencrypt.log"
    try:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        tail = "(no log)"
    return (
        f"certbot exited with {result.returncode}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}\n--- {log}\n{tail}"
    )
