"""The maildrop/ hand-over survives a crash at any point (issue 12 defect 13).

A user's message waits in maildrop/ (no daemon); root's `sendmail -q` takes it.
strace shows the order of the system calls (the queue's commit, then the
unlink of the drop file, then an fsync of maildrop/ while the new message is
still locked), and kills the taker between the commit and the unlink - what a
power loss after a not yet durable unlink leaves - to show that the file it
leaves behind is recognised as queued already and delivered once, not twice.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN
from tests.helpers.users import ADMIN_GROUP, System

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

ALICE = "rqtest-alice"
MARK = b"maildrop-durability-marker"
MESSAGE = b"Subject: durable hand-over\n\n" + MARK + b"\n"


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    r = subprocess.run(["strace", "-qq", "-o", "/dev/null", "/bin/true"], capture_output=True,
                       check=False, timeout=30)
    return r.returncode == 0


pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root"),
              pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")]


@pytest.fixture
def system(launchers: Path, smarthost_factory: SmarthostFactory) -> Iterator[System]:
    sh = smarthost_factory()
    sysq = System(launchers, smarthost=sh.smarthost, delivery_mode="background",
                  admin_group=ADMIN_GROUP, queue_interval="1h", concurrency=1)
    sysq.smarthost = sh  # type: ignore[attr-defined]
    yield sysq
    sysq.cleanup()


def deliveries(system: System) -> int:
    sh: Smarthost = system.smarthost  # type: ignore[attr-defined]
    return sum(1 for t in sh.transactions if MARK in t.content)


def drop_one(system: System) -> str:
    r = system.sendmail_as(ALICE, "carol@example.org", input=MESSAGE)
    assert r.returncode == 0, r.stderr
    [name] = system.drops()
    assert name.startswith("d")
    return name


def strace_queue_run(system: System, out: Path, *extra: str) -> int:
    argv = ["strace", "-f", "-qq", "-y", "-o", str(out), *extra,
            str(BIN / "sendmail"), "-q"]
    return subprocess.run(argv, env=system.rq.env, capture_output=True, check=False,
                          timeout=120).returncode


def test_the_unlink_of_a_taken_file_is_synced_before_the_message_can_go(
        system: System, tmp_path: Path) -> None:
    """Old main: the unlink was never followed by an fsync of maildrop/ (a power loss
    brought the file back: a duplicate), and the .f marker was not synced."""
    name = drop_one(system)
    trace = tmp_path / "trace"
    code = strace_queue_run(system, trace, "-e",
                            "trace=rename,renameat,renameat2,unlink,unlinkat,fsync,openat,"
                            "connect")
    assert code == 0
    drop_dir = str(system.spool_root / "maildrop")
    queue_dir = str(system.spool_root / "queue")
    events = []
    for line in trace.read_text().splitlines():
        call = line.split(None, 1)[-1]
        if re.match(r"renameat2?\(|rename\(", call) and ".t" in call and ".e" in call:
            events.append("commit-rename")
        elif call.startswith(("unlinkat(", "unlink(")) and name[1:] in call:
            events.append("drop-unlink")
        elif call.startswith("fsync(") and f"<{drop_dir}>" in call:
            events.append("fsync-maildrop")
        elif call.startswith("fsync(") and f"<{queue_dir}>" in call:
            events.append("fsync-queue")
        elif call.startswith("openat(") and '.f"' in call and "O_CREAT" in call:
            events.append("mark-f")
        elif call.startswith("connect(") and "127.0.0.1" in call and "htons(53)" not in call:
            events.append("connect")
    assert deliveries(system) == 1 and system.drops() == []
    first = events.index("commit-rename")
    taken = events[first:]
    # the commit is durable, then the drop file goes, and that removal is durable
    assert taken[:4] == ["commit-rename", "fsync-queue", "drop-unlink", "fsync-maildrop"], events
    # ... before the message is sent; and the in-flight marker is synced before sending
    mark = events.index("mark-f")
    assert mark > events.index("fsync-maildrop")
    assert events[mark + 1] == "fsync-queue", events
    assert "connect" not in events[:events.index("fsync-maildrop")]


def test_a_taker_killed_before_the_unlink_leaves_no_duplicate(
        system: System, tmp_path: Path) -> None:
    """The state a power loss leaves when the unlink was not yet durable: the message
    is committed and its drop file is still there. Old main took the file again."""
    name = drop_one(system)
    drop_dir = str(system.spool_root / "maildrop")
    # -P: only calls on maildrop/ count; the first unlinkat there is the taken file's
    code = strace_queue_run(system, tmp_path / "trace", "-P", drop_dir, "-e", "trace=unlinkat",
                            "-e", "inject=unlinkat:signal=KILL:when=1")
    assert code != 0, code
    assert system.drops() == [name]  # the kill came before the unlink
    [qid] = system.rq.spool.ids()  # ... and after the commit
    queued = system.rq.spool.read_envelope(qid)
    assert deliveries(system) == 0
    r = system.rq.sendmail("-q")
    assert r.returncode == 0, r.stderr
    assert system.rq.sendmail("-q").returncode == 0
    assert deliveries(system) == 1
    assert system.drops() == [] and system.rq.spool.ids() == []
    assert f"is queued already as {qid}" in system.rq.log()
    assert queued.drop.startswith(name[1:] + ":")  # the envelope names the file


def test_a_waiting_file_from_an_older_relayq_with_a_non_xtext_envid_still_goes(
        system: System, smarthost_factory: SmarthostFactory) -> None:
    """An older sendmail took `-V a=b` with exit 0 and left the file waiting: the taker
    sends it xtext-encoded (the relay would refuse `ENVID=a=b` with 553 for everyone)."""
    sh = smarthost_factory(dsn=True)
    system.configure(smarthost=sh.smarthost)
    name = "d" + os.urandom(16).hex()
    content = b"relayq-drop 1\nrcpt carol@example.org\nenvid a=b\n\n" + MESSAGE
    write = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o640);"
             "os.write(fd, sys.stdin.buffer.read())")
    r = system.run_as(ALICE, ["/usr/bin/python3", "-c", write,
                              str(system.spool_root / "maildrop" / name)], input=content)
    assert r.returncode == 0, r.stderr
    assert system.rq.sendmail("-q").returncode == 0
    [t] = sh.transactions
    assert "ENVID=a+3Db" in t.mail_options and t.rcpt_tos == ["carol@example.org"]
    assert "sent xtext-encoded as a+3Db" in system.rq.log()
