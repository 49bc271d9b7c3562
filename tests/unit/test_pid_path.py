"""Where the daemon keeps its pid file, and where `relayq flush` looks for it: the
same place, whoever runs each (the Debian unit runs the daemon as relayq with
RuntimeDirectory=relayq; root runs `relayq flush` from a network hook)."""

from __future__ import annotations

import os

import pytest

from relayq.core.config import Config
from relayq.daemon.life import ROOT_PID_FILE, pid_path


def _cfg(tmp_path, pid_file: str = "") -> Config:
    return Config({"queue_dir": str(tmp_path / "q"), "pid_file": pid_file})


def test_configured_pid_file_wins(tmp_path):
    (tmp_path / "run").mkdir()
    assert pid_path(_cfg(tmp_path, "/x/y.pid"), str(tmp_path / "run")) == "/x/y.pid"


def test_runtime_directory_is_used_by_its_owner_and_by_root(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert pid_path(_cfg(tmp_path), str(run)) == str(run / "relayq.pid")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_root_looks_in_the_service_users_runtime_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, 65534, 65534)
    assert pid_path(_cfg(tmp_path), str(run)) == str(run / "relayq.pid")
    pid = os.fork()
    if pid == 0:  # another user (not the directory's owner): its own queue's pid file
        os.setgid(65533)
        os.setuid(65533)
        os._exit(0 if pid_path(_cfg(tmp_path), str(run)) == str(tmp_path / "q" / "relayq.pid")
                 else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_without_runtime_directory(tmp_path):
    want = ROOT_PID_FILE if os.geteuid() == 0 else str(tmp_path / "q" / "relayq.pid")
    assert pid_path(_cfg(tmp_path), str(tmp_path / "absent")) == want
    (tmp_path / "file").write_text("")
    assert pid_path(_cfg(tmp_path), str(tmp_path / "file")) == want
