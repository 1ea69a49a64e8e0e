"""The state directory's layout and its one atomic write (``proxy.statedir``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from proxy import statedir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomically_replaces_the_file_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "privkey.pem"
    target.write_bytes(b"old")
    target.chmod(0o644)
    statedir.write_atomically(str(target), b"new key", 0o600)
    assert target.read_bytes() == b"new key"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["privkey.pem"]


def test_a_reader_holding_the_old_file_keeps_reading_it(tmp_path: Path) -> None:
    """A rename, not a rewrite in place: what a reader opened stays whole."""
    target = tmp_path / "fullchain.pem"
    target.write_bytes(b"old chain")
    with target.open("rb") as reader:
        statedir.write_atomically(str(target), b"new chain", 0o644)
        assert reader.read() == b"old chain"
    assert target.read_bytes() == b"new chain"


def test_a_failed_write_leaves_the_old_file_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    target.write_bytes(b"{}")
    with pytest.raises(TypeError):
        statedir.write_atomically(str(target), "not bytes", 0o644)  # type: ignore[arg-type]
    assert target.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_the_file_and_then_its_directory_reach_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    statedir.write_atomically(str(tmp_path / "access-log.key"), b"k" * 32, 0o600)
    assert synced == ["file", "directory"]


def test_prepare_makes_the_served_and_the_private_directories(tmp_path: Path) -> None:
    state = tmp_path / "state"
    os.umask(umask := os.umask(0))  # read the umask without changing it
    statedir.prepare(str(state))
    assert Path(statedir.challenge_dir(str(state))) == state / "acme-challenge"
    assert Path(statedir.certs_dir(str(state))) == state / "certs"
    assert mode(state / "certs") == statedir.CERTS_MODE & ~umask
    assert mode(state / "certs") & 0o077 == 0
    statedir.prepare(str(state))  # again: what exists is left alone
    assert Path(statedir.domain_cert_dir(str(state), "t.example.com")) == state / "certs" / "t.example.com"
