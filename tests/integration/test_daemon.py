"""The queue-runner daemon as a real process: interval runs, wake-ups, signals, pid file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.daemon_ready import socket_stamp, wait_startup_run
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error

from relayq.core.errors import EX_CONFIG, EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"From: alice@example.org\nTo: bob@example.org\nSubject: hello\n\nhi\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(0.05)


class DaemonProcess:
    """`relayq daemon --foreground ...` started for one test, stopped at its end."""

    def __init__(self, rq: Relayq, *args: str, env: dict[str, str] | None = None,
                 cmd: list[str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        self.rq = rq
        self.stderr_path = rq.root / "daemon.err"
        self.socket = Path(str(rq.settings.get("queue_dir", rq.queue_dir))) / "relayq.sock"
        self.socket_before = socket_stamp(self.socket)  # a killed daemon's, if any
        full_env = {**rq.env, **(env or {})}
        argv = cmd or [str(BIN / "relayq"), "daemon", "--foreground", *args]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         pass_fds=pass_fds)

    def wait_started(self) -> DaemonProcess:
        wait_for(lambda: "starting daemon" in self.rq.log() or self.proc.poll() is not None,
                 what="the daemon to start")
        assert self.proc.poll() is None, self.stderr_path.read_text()
        return self

    def wait_ready(self) -> DaemonProcess:
        """Started and past its start-up queue run, which would deliver a message
        committed before it (wake-ups off or not): see tests.helpers.daemon_ready."""
        self.wait_started()
        wait_startup_run(self.socket, self.socket_before, self.proc)
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                  concurrency=2)


@pytest.fixture
def start(rq: Relayq) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def run(*args: str, **kwargs: object) -> DaemonProcess:
        d = DaemonProcess(rq, *args, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield run
    for d in started:
        d.kill()


def kill_detached(pid_file: Path) -> None:
    """Stop a daemon that detached itself (its pid from its pid file)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip() or 0)
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_interval_runs_deliver_deferred_mail(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory()
    # laptop mode: no wake-up for new mail, only the periodic runs deliver it
    rq.configure(smarthost=sh.smarthost, delivery_mode="deferred")
    d = start("-q", "1s").wait_started()
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    wait_for(lambda: len(sh.transactions) == 1, what="the periodic run")
    assert rq.queued() == []
    assert "queue runs every 1s" in rq.log()
    assert d.stop() == EX_OK


def test_new_mail_is_delivered_at_once(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    d = start().wait_started()  # interval 1h: only the wake-up can deliver in time
    t0 = time.monotonic()
    r = rq.sendmail("-odq", "bob@example.org", input=MSG)
    assert r.returncode == EX_OK, r.stderr
    wait_for(lambda: len(sh.transactions) == 1, timeout=5, what="the wake-up delivery")
    latency = time.monotonic() - t0
    assert latency < 3, latency  # typically well under a second: see bench/wakeup.py
    assert d.stop() == EX_OK


def test_bounded_concurrency_and_connection_reuse(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, concurrency=2)
    for n in range(8):
        assert rq.sendmail(f"r{n}@example.org", input=MSG).returncode == EX_OK
    d = start().wait_started()  # the first run at start takes all 8
    wait_for(lambda: len(sh.transactions) == 8, what="8 deliveries")
    assert sh.connections <= 2  # two workers, each reusing its connection
    assert rq.queued() == []
    assert d.stop() == EX_OK


def test_sigterm_abandons_a_stalled_delivery_and_keeps_the_message(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory(stall="eod")  # never answers the final dot
    rq.configure(smarthost=sh.smarthost, timeout=60)
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    d = start().wait_started()
    wait_for(lambda: "DATA" in sh.verbs(), what="the delivery to reach DATA")
    time.sleep(0.3)
    t0 = time.monotonic()
    assert d.stop() == EX_OK
    assert time.monotonic() - t0 < 12  # STOP_GRACE, not the 60 s reply timeout
    [(env, _)] = rq.queued()
    assert env.attempts == 0 and env.pending()  # nothing recorded: it simply stays queued
    assert "abandoning 1 delivery in flight" in rq.log()
    assert not (rq.root / "relayq.pid").exists()


def test_sighup_reloads_a_good_config_and_refuses_a_bad_one(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory()
    d = start().wait_started()  # smarthost: [127.0.0.1]:9, nothing listens there
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    wait_for(lambda: "Deferred" in rq.log(), what="the first (failed) attempt")
    good = rq.config.read_text()
    rq.write_config(good + "retry_mni = 5\n")  # a typo: refused, old config kept
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in rq.log(), what="the refusal")
    assert "retry_mni" in rq.log() and d.proc.poll() is None
    rq.configure(smarthost=sh.smarthost)
    d.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in rq.log(), what="the reload")
    d.signal(signal.SIGUSR1)
    wait_for(lambda: len(sh.transactions) == 1, what="delivery through the new smarthost")
    assert d.stop() == EX_OK


def test_sigusr1_retries_a_backed_off_message_now(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory(replies={"mail": "451 4.3.0 try later"})
    rq.configure(smarthost=sh.smarthost)
    d = start().wait_started()
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    # the log line comes just before the envelope records the attempt
    wait_for(lambda: [e.attempts for e, _ in rq.queued()] == [1], what="the deferral")
    [(env, _)] = rq.queued()
    assert env.next_try > time.time() + 60  # backed off (retry_min 5m)
    sh.replies.clear()
    time.sleep(1.5)  # wake-ups and rechecks never retry it early
    assert sh.transactions == [] and len(rq.queued()) == 1
    d.signal(signal.SIGUSR1)
    wait_for(lambda: len(sh.transactions) == 1, what="the forced retry")
    wait_for(lambda: rq.queued() == [], what="the queue to empty")
    assert d.stop() == EX_OK


def test_relayq_flush_pokes_the_running_daemon(
    rq: Relayq, smarthost_factory: SmarthostFactory, start: Callable[..., DaemonProcess]
) -> None:
    sh = smarthost_factory(replies={"mail": "451 4.3.0 try later"})
    rq.configure(smarthost=sh.smarthost)
    d = start().wait_started()
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    wait_for(lambda: "try later" in rq.log(), what="the deferral")
    assert rq.run("relayq", "flush").returncode == EX_TEMPFAIL  # still failing: mail left
    wait_for(lambda: "SIGUSR1: running the whole queue now" in rq.log(), what="the poke")
    assert d.stop() == EX_OK


def test_pid_file_refuses_a_second_daemon_and_replaces_a_stale_one(
    rq: Relayq, start: Callable[..., DaemonProcess]
) -> None:
    pid_file = rq.root / "relayq.pid"
    pid_file.write_text("999999\n")  # stale: nobody holds its lock
    d = start().wait_started()
    assert pid_file.read_text().strip() == str(d.proc.pid)
    second = rq.run("relayq", "daemon", "--foreground", timeout=20)
    assert second.returncode == EX_TEMPFAIL
    err = assert_one_line_error(second)
    assert "already running" in err and str(d.proc.pid) in err
    # the sendmail way reports the same through the detaching parent
    third = rq.sendmail("-q5m", timeout=20)
    assert third.returncode == EX_TEMPFAIL and "already running" in third.stderr.decode()
    assert d.stop() == EX_OK
    assert not pid_file.exists()


def test_sendmail_q_interval_detaches_and_runs_the_queue(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, delivery_mode="deferred")
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    pid_file = rq.root / "relayq.pid"
    try:
        t0 = time.monotonic()
        r = rq.sendmail("-Ac", "-q1s", timeout=20)
        assert r.returncode == EX_OK, r.stderr
        assert r.stderr == b"" and time.monotonic() - t0 < 10
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # alive, and detached: not our child any more
        wait_for(lambda: len(sh.transactions) == 1, what="the detached daemon's run")
    finally:
        kill_detached(pid_file)
    wait_for(lambda: not pid_file.exists(), what="the pid file to go")


def test_bad_interval_and_bad_config_say_one_line(rq: Relayq) -> None:
    r = rq.sendmail("-q29x")
    assert r.returncode == 64 and assert_one_line_error(r)
    rq.config.write_text("queue_intervall = 5\n")
    r = rq.run("relayq", "daemon", "--foreground")
    assert r.returncode == EX_CONFIG and "queue_intervall" in assert_one_line_error(r)


def test_sd_notify_ready_reloading_stopping(
    rq: Relayq, start: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        d = start(env={"NOTIFY_SOCKET": path})
        assert b"READY=1" in sock.recv(4096)
        d.signal(signal.SIGHUP)
        assert b"RELOADING=1" in sock.recv(4096)
        assert b"READY=1" in sock.recv(4096)
        d.signal(signal.SIGTERM)
        assert b"STOPPING=1" in sock.recv(4096)
        assert d.stop() == EX_OK


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("29m", 1740), ("1h30m", 5400),
                                               ("5", 300), ("2d", 172800)])
def test_sendmail_intervals(text: str, seconds: int) -> None:
    from relayq.daemon.main import parse_interval

    assert parse_interval(text) == seconds
