"""Crash safety at every system call (issue 6 §1).

strace kills the process at the N-th write, fsync, rename, unlink or close
(`-e inject=SYSCALL:signal=KILL:when=N`) for every N the clean run makes, in
(a) a `sendmail` submission and (b) a queue run delivering a message. After
each kill: nothing partial is visible to mailq or the runner, nothing
acknowledged is lost, the next run cleans the debris, and every recipient
is delivered exactly once - or twice only when the kill fell between the
smarthost's final 250 and the runner's record of it (the one window no mail
system closes), which the next run logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from tests.helpers.daemon_ready import socket_stamp, wait_startup_run
from tests.helpers.relayq_env import BIN, Relayq

from relayq.queue.spool import STALE_SECONDS

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

SYSCALLS = ("write", "fsync", "rename", "unlink", "close")
MARK = b"crash-injection-body-marker"
MESSAGE = b"Subject: crash test\n\n" + MARK + b"\n"
CHUNKS = 3  # the many closes (imports) are spread over this many tests


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    r = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e", "inject=close:error=EBADF:when=1",
                        "/bin/true"], capture_output=True, check=False, timeout=30)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")


def counts(argv: list[str], env: dict[str, str], stdin: bytes, tmp: Path,
           exit_ok: tuple[int, ...] = (0,)) -> Counter[str]:
    """How many of each syscall a clean run makes (all its processes together)."""
    out = tmp / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(out), "-e",
                        "trace=" + ",".join(SYSCALLS), *argv], input=stdin, env=env,
                       capture_output=True, check=False, timeout=60)
    assert r.returncode in exit_ok, r.stderr
    found: Counter[str] = Counter()
    for line in out.read_text().splitlines():
        name = line.split(None, 1)[-1].split("(", 1)[0].strip()
        if name in SYSCALLS:
            found[name] += 1
    return found


def killed_at(argv: list[str], env: dict[str, str], stdin: bytes, syscall: str,
              n: int) -> int:
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                        "-e", f"inject={syscall}:signal=KILL:when={n}", *argv],
                       input=stdin, env=env, capture_output=True, check=False, timeout=60)
    return r.returncode


def whole_messages(rq: Relayq) -> list[str]:
    """The queued ids, each checked whole as the runner and mailq would read it."""
    ids = rq.spool.ids()
    for qid in ids:
        env = rq.spool.read_envelope(qid)  # DamagedQueueFile if half written
        assert [r.address for r in env.recipients] == ["bob@example.org"]
        data = (rq.queue_dir / "queue" / f"{qid}.d").read_bytes()
        assert data.endswith(MARK + b"\n"), (qid, data[-80:])
    listing = subprocess.run([str(BIN / "mailq")], env=rq.env, capture_output=True,
                             check=False, timeout=30)
    assert listing.returncode == 0, listing.stderr
    total = len(ids)
    assert f"Total requests: {total}".encode() in listing.stdout or (
        total == 0 and b"is empty" in listing.stdout), listing.stdout
    return ids


def age_everything(rq: Relayq) -> None:
    """Make every leftover look old enough for the sweep."""
    past = time.time() - 2 * STALE_SECONDS
    for p in (rq.queue_dir / "queue").iterdir():
        os.utime(p, (past, past))


def deliveries(sh: Smarthost) -> int:
    return sum(1 for t in sh.transactions if MARK in t.content)


def clean_run(rq: Relayq) -> None:
    r = rq.sendmail("-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (rq.queue_dir / "queue").iterdir()) == []


def share(total: Counter[str], syscall: str, chunk: int) -> list[int]:
    """This test's kill points: every call of `syscall` (the closes split in CHUNKS)."""
    calls = list(range(1, total[syscall] + 1))
    return calls[chunk::CHUNKS] if syscall == "close" else calls


CASES = [(s, c) for s in SYSCALLS for c in range(CHUNKS if s == "close" else 1)]


@pytest.mark.timeout(400)  # the close chunks: ~35 s on a busy machine, a run per call
@pytest.mark.parametrize(("syscall", "chunk"), CASES)
def test_submission_killed_at_every_call(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str, chunk: int
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=1)
    argv = [str(BIN / "sendmail"), "-odq", "bob@example.org"]
    rq.sendmail("-q")  # the directories and the config cache exist, as on a used host
    total = counts(argv, rq.env, MESSAGE, tmp_path)
    assert total["write"] and total["fsync"] and total["rename"] and total["close"], total
    clean_run(rq)
    assert deliveries(sh) == 1
    points = share(total, syscall, chunk)
    if not points:
        pytest.skip(f"a submission makes no {syscall} call")
    for n in points:
        before = deliveries(sh)
        code = killed_at(argv, rq.env, MESSAGE, syscall, n)
        assert code in (-9, 0), (syscall, n, code)
        committed = whole_messages(rq)
        assert code == -9 or len(committed) == 1  # exit 0 only with the message queued
        age_everything(rq)
        clean_run(rq)
        assert deliveries(sh) - before == len(committed), (syscall, n)


@pytest.mark.timeout(400)
@pytest.mark.parametrize(("syscall", "chunk"), CASES)
def test_queue_run_killed_at_every_call(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str, chunk: int
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=1)
    argv = [str(BIN / "sendmail"), "-q"]
    assert rq.sendmail("bob@example.org", input=MESSAGE).returncode == 0
    total = counts(argv, rq.env, b"", tmp_path)
    assert deliveries(sh) == 1 and rq.spool.ids() == []
    assert total["write"] and total["unlink"] and total["close"], total
    points = share(total, syscall, chunk)
    if not points:  # a delivered message is removed, never renamed
        pytest.skip(f"a delivering queue run makes no {syscall} call")
    for n in points:
        assert rq.sendmail("bob@example.org", input=MESSAGE).returncode == 0
        [qid] = rq.spool.ids()
        before = deliveries(sh)
        code = killed_at(argv, rq.env, b"", syscall, n)
        assert code in (-9, 0), (syscall, n, code)
        sent_before_kill = deliveries(sh) - before
        still = whole_messages(rq)
        assert still in ([], [qid])
        assert sent_before_kill in (0, 1)
        if not still:
            assert sent_before_kill == 1  # gone only once delivered
        age_everything(rq)
        clean_run(rq)
        total_sent = deliveries(sh) - before
        if total_sent == 2:  # the window: the smarthost had it when the runner died
            assert sent_before_kill == 1 and still == [qid], (syscall, n)
            assert f"{qid}: possible duplicate" in rq.log(), (syscall, n)
        else:
            assert total_sent == 1, (syscall, n, total_sent)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("syscall", ["write", "fsync", "rename", "close"])
def test_deferral_record_killed_at_every_call(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str
) -> None:
    """A run whose smarthost answers 451 rewrites the envelope (temp file, fsync,
    rename): killed at any of those calls (and the last closes), the message
    stays whole and queued."""
    busy = smarthost_factory(replies={"eod": "451 4.3.0 try later"})
    healthy = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=busy.smarthost, concurrency=1)
    argv = [str(BIN / "sendmail"), "-q"]
    assert rq.sendmail("bob@example.org", input=MESSAGE).returncode == 0
    total = counts(argv, rq.env, b"", tmp_path, exit_ok=(75,))
    assert total["rename"] == 1, total  # the deferral's record
    calls = range(1, total[syscall] + 1)
    if syscall == "close":
        calls = range(max(1, total["close"] - 12), total["close"] + 1)  # the record's end
    for n in calls:
        code = killed_at(argv, rq.env, b"", syscall, n)
        assert code in (-9, 75), (syscall, n, code)
        assert len(whole_messages(rq)) == 1, (syscall, n)
    age_everything(rq)
    rq.configure(smarthost=healthy.smarthost)
    clean_run(rq)
    assert deliveries(healthy) == 1


# --- (c) a listener acceptance -------------------------------------------------------------

SESSION = [b"EHLO client.example.org", b"MAIL FROM:<alice@example.org>",
           b"RCPT TO:<bob@example.org>", b"DATA"]


def smtp_session(port: int) -> bool:
    """One submission over SMTP; True when the listener answered 250 to the data."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")

            def reply() -> bytes:
                while True:
                    line = f.readline()
                    if len(line) < 4 or line[3:4] != b"-":
                        return line

            if not reply().startswith(b"220"):
                return False
            for cmd in SESSION:
                s.sendall(cmd + b"\r\n")
                if reply()[:1] not in (b"2", b"3"):
                    return False
            s.sendall(MESSAGE.replace(b"\n", b"\r\n") + b".\r\n")
            ok = reply().startswith(b"250")
            try:
                s.sendall(b"QUIT\r\n")
                reply()
            except OSError:
                pass
            return ok
    except OSError:
        return False


class Listening:
    """`relayq daemon --foreground --listen`, one listener process, no wake-ups.

    Ready once its start-up queue run is over: that run comes after the "starting daemon"
    line and would deliver a message the session has just committed (on a loaded machine
    it did, and the acknowledged message looked lost): see tests.helpers.daemon_ready."""

    def __init__(self, rq: Relayq) -> None:
        self.rq = rq
        self.port = int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]
        starts = rq.log().count("starting daemon")
        sock = rq.queue_dir / "relayq.sock"
        old = socket_stamp(sock)
        self.proc = subprocess.Popen([str(BIN / "relayq"), "daemon", "--foreground", "--listen"],
                                     env=rq.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while rq.log().count("starting daemon") <= starts:
            assert self.proc.poll() is None and time.monotonic() < deadline, "no start"
            time.sleep(0.02)
        wait_startup_run(sock, old, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def attach(pid: int, args: list[str]) -> subprocess.Popen[bytes]:
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-p", str(pid), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:  # attached once the kernel names a tracer
        with open(f"/proc/{pid}/status") as f:
            if any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f):
                return tracer
        assert tracer.poll() is None, f"strace exited with {tracer.returncode}"
        assert time.monotonic() < deadline, "strace did not attach"
        time.sleep(0.01)


def detach(tracer: subprocess.Popen[bytes]) -> None:
    if tracer.poll() is None:
        tracer.send_signal(2)  # SIGINT: strace detaches and leaves the process running
    try:
        tracer.wait(20)
    except subprocess.TimeoutExpired:  # seen on a loaded machine after an injected kill:
        tracer.kill()  # strace's own death detaches it too (the kernel does it)
        tracer.wait(20)


@pytest.mark.timeout(400)  # a daemon start, an strace attach and a session per call
@pytest.mark.parametrize("syscall", SYSCALLS)
def test_listener_acceptance_killed_at_every_call(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str
) -> None:
    from tests.integration.test_daemon import free_port

    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=1, smtp_processes=1,
                delivery_mode="deferred", queue_interval="1h",
                pid_file=str(tmp_path / "relayq.pid"), listen=[f"127.0.0.1:{free_port()}"])
    daemon = Listening(rq)
    trace = tmp_path / "trace"
    tracer = attach(daemon.proc.pid, ["-o", str(trace), "-e", "trace=" + ",".join(SYSCALLS)])
    assert smtp_session(daemon.port)
    time.sleep(0.2)
    detach(tracer)
    daemon.stop()
    total = sum(1 for line in trace.read_text().splitlines()
                if line.split(None, 1)[-1].startswith(syscall + "("))
    clean_run(rq)
    assert deliveries(sh) == 1
    if syscall == "unlink" and total == 0:
        pytest.skip("an acceptance makes no unlink call")
    assert total > 0, f"no {syscall} call seen: the trace did not work"
    for n in range(1, total + 1):
        before = deliveries(sh)
        daemon = Listening(rq)
        tracer = attach(daemon.proc.pid, ["-o", "/dev/null", "-e", f"trace={syscall}",
                                          "-e", f"inject={syscall}:signal=KILL:when={n}"])
        acknowledged = smtp_session(daemon.port)
        time.sleep(0.1)
        detach(tracer)
        daemon.stop()
        queued = whole_messages(rq)
        if acknowledged:
            assert len(queued) == 1, (syscall, n)  # a 250 is never a lost message
        assert len(queued) <= 1
        age_everything(rq)
        clean_run(rq)
        assert deliveries(sh) - before == len(queued), (syscall, n)
