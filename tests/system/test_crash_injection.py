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
from tests.helpers.relayq_env import BIN, Relayq

from relayq.spool import STALE_SECONDS

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


def counts(argv: list[str], env: dict[str, str], stdin: bytes, tmp: Path) -> Counter[str]:
    """How many of each syscall a clean run makes (all its processes together)."""
    out = tmp / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(out), "-e", "trace=" + ",".join(SYSCALLS),
                    *argv], input=stdin, env=env, capture_output=True, check=True, timeout=60)
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


@pytest.mark.parametrize(("syscall", "chunk"), CASES)
def test_submission_killed_at_every_call(
    tmp_path: Path, smarthost_factory: SmarthostFactory, syscall: str, chunk: int
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=1)
    argv = [str(BIN / "sendmail"), "-odq", "bob@example.org"]
    rq.sendmail("-q")  # the directories and the config cache exist, as on a used host
    total = counts(argv, rq.env, MESSAGE, tmp_path)
    clean_run(rq)
    assert deliveries(sh) == 1
    for n in share(total, syscall, chunk):
        before = deliveries(sh)
        code = killed_at(argv, rq.env, MESSAGE, syscall, n)
        assert code in (-9, 0), (syscall, n, code)
        committed = whole_messages(rq)
        assert code == -9 or len(committed) == 1  # exit 0 only with the message queued
        age_everything(rq)
        clean_run(rq)
        assert deliveries(sh) - before == len(committed), (syscall, n)


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
    for n in share(total, syscall, chunk):
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
