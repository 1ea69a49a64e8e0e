"""The command line as an operator runs it: a real ``python -m proxy`` process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not the dot-files scripts/dev run may write there (conf/.local-ports.yaml).
CONF_FILES = sorted(p for p in (ROOT / "conf").glob("*.yaml") if not p.name.startswith("."))


def trackproxy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize("path", CONF_FILES, ids=[p.name for p in CONF_FILES])
def test_every_shipped_config_passes_check_config(path, tmp_path):
    # As in a fresh clone: the file alone, plus the stand-in's CA that conf/local.yaml
    # trusts, made as the stand-in's first start (and scripts/dev run) makes it.
    from proxy.standin import ensure_certificates

    copy = tmp_path / "conf" / path.name
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    ensure_certificates(str(tmp_path / "conf" / "local-state" / "stand-in"), "spgo.io")
    result = trackproxy("check-config", "-c", str(copy))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_conf_has_the_local_and_production_examples():
    assert {p.name for p in CONF_FILES} >= {"local.yaml", "trackproxy.yaml"}


def test_check_config_prints_one_located_line_per_problem_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen:\n  htps: []\ndomains:\n  track.example.com: {cache_ttl: soon}\n")
    result = trackproxy("check-config", "-c", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{bad}:2:3: listen: unknown key 'htps' (did you mean 'https'?); allowed: admin, health, http, https",
        f"{bad}:4:34: domains.track.example.com.cache_ttl: 'soon' is not a duration (use e.g. 10s, 5m, 2h, 30d)",
    ]


def test_check_config_warns_about_plain_http_upstreams_but_passes(tmp_path):
    path = tmp_path / "mg.yaml"
    path.write_text("domains:\n  track.example.com: {upstream: mailgun}\n")
    result = trackproxy("check-config", "-c", str(path))
    assert result.returncode == 0
    assert f"{path}:2:33: warning:" in result.stderr and "plain http://" in result.stderr


def test_config_file_comes_from_the_environment_without_dash_c(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("domains: {track.example.com: {}}\n")
    import os

    result = trackproxy("check-config", env={**os.environ, "TRACKPROXY_CONFIG": str(path)})
    assert result.returncode == 0 and str(path) in result.stdout


def test_run_refuses_an_invalid_file_before_listening(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("domains: {track.example.com: {upstream: nowhere}}\n")
    result = trackproxy("run", "-c", str(path))
    assert result.returncode == 1
    assert "unknown upstream 'nowhere'" in result.stderr


def test_run_exits_1_naming_the_listener_when_its_port_is_taken(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "t.yaml"
        path.write_text(
            f"listen: {{http: ['tcp:{port}:interface=127.0.0.1'], https: [], admin: []}}\n"
            f"state_dir: {tmp_path / 'state'}\ndomains: {{track.example.com: {{certificate: none}}}}\n"
        )
        result = trackproxy("run", "-c", str(path))
    assert result.returncode == 1
    assert f"cannot listen for http on 'tcp:{port}:interface=127.0.0.1'" in result.stdout
