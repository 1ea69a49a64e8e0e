"""End-to-end: certbot run by hand with the trackproxy plugin, against pebble and a running proxy.

What an operator meets who drives certbot themselves: ``certbot certonly`` (or ``run``)
``-a trackproxy -i trackproxy --trackproxy-config FILE -d NAME`` gets the name validated
through the running proxy's HTTP listener (pebble's ``httpPort`` is that listener),
deploys the certificate into the proxy's state directory and makes the proxy serve it at
once, without a restart; ``certbot renew`` does it again from the renewal file alone; a
name the YAML does not list is refused by the plugin.

The proxy also manages ``certificate: acme`` domains by itself. Here its own ACME server
is ``https://127.0.0.1:1/directory``, where nothing listens, so its own attempts fail fast
and back off for minutes; the hand-run certbot is the only one that reaches pebble.
"""

from __future__ import annotations

import datetime
import http.client
import json
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from pebble import Pebble, certbot, certbot_dirs, certbot_report
from proxy_process import LOOPBACK, ProxyProcess, free_port, start_proxy
from wire import TLS, connect, request

TRACK = "track.example.test"  # in the YAML, certificate: acme
OTHER = "other.example.test"  # not in the YAML
#: The proxy's own ACME server: nothing listens there, so its own attempts fail at once.
UNREACHABLE_ACME = "https://127.0.0.1:1/directory"
#: A challenge path with no token behind it: the proxy answers 404 itself, never upstream.
NO_SUCH_TOKEN = "/.well-known/acme-challenge/nonexistent"


@dataclass(frozen=True)
class Stack:
    """Pebble, the proxy whose HTTP listener pebble validates on, and where things go."""

    pebble: Pebble
    proxy: ProxyProcess
    #: pebble's root for this run, the only trust anchor a client is given.
    root: Path
    #: where certbot keeps its config, work, logs and home directories (``pebble.certbot_dirs``).
    workspace: Path

    def certbot(
        self, *args: str, workspace: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return certbot(args, workspace or self.workspace, ca_bundle=self.pebble.ca_bundle)

    def plugin_args(self, domain: str) -> list[str]:
        return [
            "-a", "trackproxy", "-i", "trackproxy",
            "--trackproxy-config", str(self.proxy.config_path),
            "-d", domain,
            "--server", self.pebble.directory_url,
        ]

    def explain(
        self,
        result: subprocess.CompletedProcess[str] | None = None,
        workspace: Path | None = None,
    ) -> str:
        """Everything a failure message needs: certbot's verdict, the proxy's and pebble's logs."""
        parts = []
        if result is not None:
            parts.append(certbot_report(result, workspace or self.workspace))
        parts.append(f"--- proxy log\n{self.proxy.log_tail(40)}")
        parts.append(self.pebble.log_tail(20))
        return "\n".join(parts)

    def live(self, domain: str, name: str = "cert.pem") -> Path:
        return certbot_dirs(self.workspace)["config"] / "live" / domain / name


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Pebble validating on the HTTP port of a proxy that serves ``TRACK`` (acme)."""
    http_port = free_port()
    with Pebble(tmp_path / "pebble", http_port) as pebble:
        root = tmp_path / "pebble-root.pem"
        root.write_text(pebble.root_pem())
        config = {
            "acme": {"server": UNREACHABLE_ACME, "ca_bundle": str(pebble.ca_bundle)},
            "resolvers": [pebble.dns_server],
            "domains": {TRACK: {"certificate": "acme"}},
        }
        proxy = start_proxy(tmp_path / "proxy", config, http_port=http_port)
        try:
            yield Stack(pebble, proxy, root, tmp_path / "certbot")
        finally:
            proxy.stop()


# ---------------------------------------------------------------------------
# Helpers


def issue(stack: Stack, verb: str) -> subprocess.CompletedProcess[str]:
    """``certbot VERB`` for ``TRACK`` with the plugin as authenticator and installer."""
    result = stack.certbot(verb, *stack.plugin_args(TRACK), "--key-type", "ecdsa")
    assert result.returncode == 0, stack.explain(result)
    return result


def served(stack: Stack) -> x509.Certificate:
    """The certificate the proxy serves for ``TRACK``, verified against pebble's root alone.

    Trusting only the root also proves the proxy sends the intermediate. The request is
    for a challenge token that does not exist, which the proxy answers itself.
    """
    try:
        answer = request(
            stack.proxy.https_port, TRACK, NO_SUCH_TOKEN, tls=TLS(sni=TRACK, ca_file=stack.root)
        )
    except ssl.SSLError as e:
        pytest.fail(f"no verified TLS for {TRACK}: {e}\n{stack.explain()}")
    assert answer.status == 404, (answer, stack.explain())
    assert answer.peer_certificate is not None
    return x509.load_der_x509_certificate(answer.peer_certificate)


def certificate_status(proxy: ProxyProcess, domain: str) -> dict[str, Any]:
    """``/status`` on the admin listener: the ``certificate`` object of ``domain``."""
    url = f"http://{LOOPBACK}:{proxy.admin_port}/status"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)["domains"][domain]["certificate"]


def utc(text: str) -> datetime.datetime:
    """An ISO 8601 UTC time from ``/status`` (``...Z``)."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def exchange(sock: ssl.SSLSocket, host: str, path: str) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 request on an open connection; the status and body.

    Raw on the socket, so a closed connection fails here instead of being reopened
    behind the test's back.
    """
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii"))
    answer = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    answer.begin()
    body = answer.read()
    assert not answer.will_close, "the proxy meant to close a keep-alive connection"
    return answer.status, body


# ---------------------------------------------------------------------------
# Tests


def test_certbot_certonly_with_the_plugin_issues_and_the_running_proxy_serves_it(
    stack: Stack,
) -> None:
    issued_and_served(stack, "certonly")


def test_certbot_run_with_the_plugin_issues_and_the_running_proxy_serves_it(stack: Stack) -> None:
    issued_and_served(stack, "run")


def issued_and_served(stack: Stack, verb: str) -> None:
    """``certbot VERB -a trackproxy -i trackproxy`` issues through the proxy's HTTP listener,
    deploys into its state directory, and the same proxy process serves it at once."""
    challenges = stack.proxy.state_dir / "acme-challenge"
    deployed = stack.proxy.state_dir / "certs" / TRACK
    result = issue(stack, verb)
    assert (deployed / "fullchain.pem").exists() and (deployed / "privkey.pem").exists(), (
        f"certbot {verb} -a trackproxy -i trackproxy exited 0 but installed nothing into "
        f"{deployed}\n" + stack.explain(result)
    )

    # Served at once: the plugin's restart() reloaded the proxy, which is still the same process.
    assert stack.proxy.process.poll() is None, stack.explain()
    live = x509.load_pem_x509_certificate(stack.live(TRACK).read_bytes())
    leaf = served(stack)
    assert leaf == live, (
        f"the proxy serves serial {leaf.serial_number:x}, certbot issued {live.serial_number:x}\n"
        + stack.explain()
    )
    intermediate = x509.load_pem_x509_certificate(stack.pebble.intermediate_pem().encode())
    leaf.verify_directly_issued_by(intermediate)  # pebble's, this run's
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [TRACK]

    key = deployed / "privkey.pem"
    assert key.stat().st_mode & 0o777 == 0o600, oct(key.stat().st_mode)
    chain = x509.load_pem_x509_certificates((deployed / "fullchain.pem").read_bytes())
    assert chain[0] == live
    assert intermediate in chain[1:]

    status = certificate_status(stack.proxy, TRACK)
    assert status["status"] == "valid", (status, stack.explain())
    assert status["source"] == "acme", status
    assert utc(status["not_after"]) == live.not_valid_after_utc, status

    # The plugin's cleanup() removed the key authorizations it had written.
    left = sorted(p.name for p in challenges.iterdir()) if challenges.exists() else []
    assert left == [], f"tokens left in {challenges}: {left}"


def test_certbot_renew_reuses_the_plugin_and_the_proxy_swaps_without_dropping_connections(
    stack: Stack,
) -> None:
    issue(stack, "run")
    before = served(stack)
    pid = stack.proxy.process.pid

    # A client that connected before the renewal, and has used its connection once.
    sock = connect(stack.proxy.https_port, TLS(sni=TRACK, ca_file=stack.root))
    try:
        assert isinstance(sock, ssl.SSLSocket)
        assert exchange(sock, TRACK, NO_SUCH_TOKEN)[0] == 404

        started = time.monotonic()
        result = stack.certbot("renew", "--force-renewal")  # nothing about the plugin
        took = time.monotonic() - started
        assert result.returncode == 0, stack.explain(result)

        renewal = certbot_dirs(stack.workspace)["config"] / "renewal" / f"{TRACK}.conf"
        lines = {line.strip() for line in renewal.read_text().splitlines()}
        persisted = {
            "authenticator = trackproxy",
            "installer = trackproxy",
            f"trackproxy_config = {stack.proxy.config_path}",
        }
        assert persisted <= lines, renewal.read_text()

        still_running = stack.proxy.process.poll() is None and stack.proxy.process.pid == pid
        assert still_running, stack.explain()
        live = x509.load_pem_x509_certificate(stack.live(TRACK).read_bytes())
        assert live.serial_number != before.serial_number, "certbot renew did not issue anew"
        after = served(stack)
        assert after == live, (
            f"after renew ({took:.1f}s) the proxy serves serial {after.serial_number:x}, "
            f"certbot's is {live.serial_number:x}, before it was {before.serial_number:x}\n"
            + stack.explain(result)
        )
        status = certificate_status(stack.proxy, TRACK)
        assert status["status"] == "valid", status
        assert utc(status["not_after"]) == live.not_valid_after_utc, status

        # The old connection still works, still on the certificate it was opened with.
        try:
            code, body = exchange(sock, TRACK, NO_SUCH_TOKEN)
        except (OSError, http.client.HTTPException) as e:
            pytest.fail(f"the connection opened before the renewal broke: {e!r}\n{stack.explain()}")
        assert code == 404, body
        old = sock.getpeercert(binary_form=True)
        assert old is not None and x509.load_der_x509_certificate(old) == before
    finally:
        sock.close()


def test_plugin_refuses_a_name_the_config_does_not_list(stack: Stack, tmp_path: Path) -> None:
    workspace = tmp_path / "certbot-other"
    result = stack.certbot("certonly", *stack.plugin_args(OTHER), workspace=workspace)
    said = result.stdout + result.stderr
    assert result.returncode != 0, stack.explain(result, workspace)
    assert str(stack.proxy.config_path) in said, (
        f"the refusal does not name {stack.proxy.config_path}:\n{said}"
    )
    assert not (certbot_dirs(workspace)["config"] / "live" / OTHER).exists()
    assert not (stack.proxy.state_dir / "certs" / OTHER).exists()
