"""Where the daemon keeps its pid file, and where `relayq flush` looks for it: the
same place, whoever runs each (the Debian unit runs the daemon as relayq with
RuntimeDirectory=relayq; root runs `relayq flush` from a network hook)."""

from __future__ import annotations

import os

import pytest

from relayq.core.config import SYSTEM_QUEUE, Config
from relayq.core.errors import TempFailure
from relayq.daemon.life import ROOT_PID_FILE, PidFile, find_daemon, pid_candidates, pid_path


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
def test_root_writes_its_own_but_looks_in_the_service_users_runtime_directory(tmp_path):
    """Root never writes into the service user's directory (a link or FIFO there is
    theirs to plant), but finds the service's daemon there (pid_candidates)."""
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, 65534, 65534)
    assert pid_path(_cfg(tmp_path), str(run)) == ROOT_PID_FILE
    system = Config({"queue_dir": SYSTEM_QUEUE, "pid_file": ""})
    assert str(run / "relayq.pid") in pid_candidates(system, str(run))
    pid = os.fork()
    if pid == 0:  # another user (not the directory's owner): its own queue's pid file
        os.setgid(65533)
        os.setuid(65533)
        os._exit(0 if pid_path(_cfg(tmp_path), str(run)) == str(tmp_path / "q" / "relayq.pid")
                 and pid_candidates(_cfg(tmp_path), str(run)) == [
                     str(tmp_path / "q" / "relayq.pid")] else 1)
    assert os.waitpid(pid, 0)[1] == 0


def test_candidates(tmp_path):
    """The configured file alone; for the system queue every place its daemon may be
    (root's by hand, the service's); another queue's: ours and the queue's."""
    run = tmp_path / "run"
    run.mkdir()
    assert pid_candidates(_cfg(tmp_path, "/x/y.pid"), str(run)) == ["/x/y.pid"]
    system = Config({"queue_dir": SYSTEM_QUEUE, "pid_file": ""})
    assert pid_candidates(system, str(run), str(tmp_path / "root.pid")) == [
        str(run / "relayq.pid"), str(tmp_path / "root.pid"), f"{SYSTEM_QUEUE}/relayq.pid"]
    own = str(tmp_path / "q" / "relayq.pid")
    assert pid_candidates(_cfg(tmp_path), str(run)) == [str(run / "relayq.pid"), own]
    assert pid_candidates(_cfg(tmp_path), str(tmp_path / "absent")) == (
        [ROOT_PID_FILE, own] if os.geteuid() == 0 else [own])


def test_a_daemon_holding_any_candidate_refuses_the_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = PidFile(str(tmp_path / "root.pid"))
    holder.acquire()
    try:
        system = Config({"queue_dir": SYSTEM_QUEUE, "pid_file": ""})
        found = find_daemon(pid_candidates(system, str(run), holder.path))
        assert found == (os.getpid(), holder.path)
        other = PidFile(str(run / "relayq.pid"))
        with pytest.raises(TempFailure, match=f"pid {os.getpid()}, pid file {holder.path}"):
            other.acquire([str(run / "relayq.pid"), holder.path])
        assert not os.path.lexists(other.path)
    finally:
        holder.release()


def test_a_fifo_or_a_link_is_no_daemon_and_never_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo.pid")
    held = PidFile(str(tmp_path / "held.pid"))
    held.acquire()
    try:
        os.symlink(held.path, tmp_path / "link.pid")
        assert PidFile.running(str(tmp_path / "fifo.pid")) is None
        assert PidFile.running(str(tmp_path / "link.pid")) is None
        assert PidFile.running(held.path) == os.getpid()
    finally:
        held.release()


def test_without_runtime_directory(tmp_path):
    want = ROOT_PID_FILE if os.geteuid() == 0 else str(tmp_path / "q" / "relayq.pid")
    assert pid_path(_cfg(tmp_path), str(tmp_path / "absent")) == want
    (tmp_path / "file").write_text("")
    assert pid_path(_cfg(tmp_path), str(tmp_path / "file")) == want


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_a_pid_in_another_users_file_is_believed_only_for_that_users_process(tmp_path):
    """The service user's pid file naming someone else's process (here ours, root's):
    a live daemon (a start is refused) but no pid to signal."""
    held = PidFile(str(tmp_path / "relayq.pid"))
    held.acquire()
    try:
        assert PidFile.running(held.path) == os.getpid()
        os.chown(held.path, 65534, 65534)
        assert PidFile.running(held.path) == -1
    finally:
        held.release()
