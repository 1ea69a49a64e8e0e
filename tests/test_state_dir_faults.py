"""A full or read-only ``state_dir``: real small file systems (tmpfs), real writes.

What must hold: nothing half-written is left or loaded, every writer says why it could
not write (the plugin to certbot, the ACME records in the status, certificates in
``last_error``), and a running proxy keeps serving the certificates it has.
"""

from __future__ import annotations

import errno
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from certbot import errors

from proxy.certs import AcmeRecord, AcmeRecords

from proxy_process import LOOPBACK, start_proxy
from wire import TLS, request

TRACK = "track.example.test"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own (root only)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path) -> None:
    """Use up every byte left."""
    with open(mount / "filler", "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def test_acme_records_are_kept_in_memory_and_the_write_error_said_when_the_disk_is_full(small_fs):
    records = AcmeRecords(str(small_fs))
    records.set("a.example.com", AcmeRecord(failures=1, last_error="first"))
    fill(small_fs)
    records.set("a.example.com", AcmeRecord(failures=2, last_error="second"))
    assert records.get("a.example.com").failures == 2, "the back-off holds in memory"
    assert "No space left on device" in records.write_error
    saved = json.loads((small_fs / "status.json").read_text())
    assert saved["domains"]["a.example.com"]["failures"] == 1, "the file on disk is the last whole one"
    (small_fs / "filler").unlink()
    records.set("a.example.com", AcmeRecord(failures=3))
    assert records.write_error is None
    assert json.loads((small_fs / "status.json").read_text())["domains"]["a.example.com"]["failures"] == 3


@pytest.mark.parametrize("fault", [fill, read_only], ids=["full", "read-only"])
def test_the_plugin_says_why_and_leaves_nothing_half_written(small_fs, tmp_path, fault, monkeypatch):
    import test_plugin
    from certbot._internal.plugins import disco

    monkeypatch.setenv("HOME", str(tmp_path))
    state = small_fs / "state"
    config = tmp_path / "trackproxy.yaml"
    config.write_text(f"state_dir: {state}\nlisten: {{admin: []}}\ndomains:\n  {TRACK}: {{certificate: acme}}\n")
    plugin = test_plugin.make_plugin(disco.PluginsRegistry.find_all(), tmp_path, config)
    plugin.prepare()  # makes state_dir's folders while it can
    (state / "certs").mkdir(parents=True, exist_ok=True)
    (state / "acme-challenge").mkdir(parents=True, exist_ok=True)
    live = tmp_path / "live"
    live.mkdir()
    (live / "privkey.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nkey\n")
    (live / "fullchain.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nchain\n")
    fault(small_fs)
    with pytest.raises(errors.PluginError, match="cannot write the challenge answer"):
        plugin.perform([test_plugin.http01(TRACK, 1)])
    with pytest.raises(errors.PluginError, match=f"cannot (install the certificate for |create .*){TRACK}"):
        plugin.deploy_cert(TRACK, str(live / "cert.pem"), str(live / "privkey.pem"), str(live / "chain.pem"),
                           str(live / "fullchain.pem"))
    left = [p.name for p in (state / "acme-challenge").iterdir()] + [
        p.name for p in (state / "certs").rglob("*") if p.is_file()]
    assert left == [], f"half-written files left: {left}"


@pytest.mark.parametrize("fault", [fill, read_only], ids=["full", "read-only"])
def test_a_running_proxy_keeps_serving_and_says_what_it_could_not_write(small_fs, tmp_path, fault):
    state = small_fs / "state"
    proxy = start_proxy(tmp_path / "proxy", {"state_dir": str(state), "domains": {TRACK: {"certificate": "self-signed"}}})
    try:
        pem = proxy.certificate_path(TRACK)
        before = request(proxy.https_port, TRACK, "/.well-known/acme-challenge/none", tls=TLS(TRACK, pem))
        fault(small_fs)
        proxy.config_path.write_text(proxy.config_path.read_text().replace(
            f"  {TRACK}:", f"  added.example.test:\n    certificate: self-signed\n  {TRACK}:"))
        answer = urllib.request.urlopen(urllib.request.Request(
            f"http://{LOOPBACK}:{proxy.admin_port}/reload", method="POST"), timeout=30)
        assert answer.status == 200
        status = json.loads(urllib.request.urlopen(f"http://{LOOPBACK}:{proxy.admin_port}/status").read())
        added = status["domains"]["added.example.test"]["certificate"]
        assert added["status"] == "failed" and "cannot write its self-signed certificate" in added["last_error"]
        assert status["domains"][TRACK]["certificate"]["status"] == "valid"
        after = request(proxy.https_port, TRACK, "/.well-known/acme-challenge/none", tls=TLS(TRACK, pem))
        assert after.status == before.status == 404 and after.peer_certificate == before.peer_certificate
        assert proxy.process.poll() is None
    finally:
        proxy.stop()
