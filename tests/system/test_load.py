"""Concurrency and load (issue 6 §4): every (message, recipient) pair arrives exactly once.

- 1000 queued messages, two `sendmail -q` runs, a daemon and background
  submissions all at once; and the same while half the recipients get 4xx.
- 10,000 messages from 8 concurrent `sendmail` processes while a daemon drains.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.queue.spool import Spool
from relayq.queue.submit import Context, Request, enqueue
from relayq.system.configfile import load
from relayq.system.log import Log

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

MSGID = re.compile(rb"Message-ID: <(load-\d+)@example.org>", re.I)


def message(n: int) -> bytes:
    return (f"From: alice@example.org\nSubject: load {n}\n"
            f"Message-ID: <load-{n}@example.org>\n\nbody {n}\n").encode()


def fill(rq: Relayq, count: int, start: int = 0) -> None:
    """Queue messages through relayq's own commit, in this process (fast)."""
    cfg = load(str(rq.config), explicit=True)
    spool, log, ctx = Spool(cfg.queue_dir), Log(use_syslog=False), Context(cfg)
    for n in range(start, start + count):
        req = Request(user="root", uid=0)
        req.recipients = [f"r{n}@example.org"]
        msg, _ = enqueue(cfg, spool, req, iter([message(n)]), log, ctx)
        msg.release()


def pairs(sh: Smarthost) -> Counter[tuple[bytes, str]]:
    got: Counter[tuple[bytes, str]] = Counter()
    for t in sh.transactions:
        m = MSGID.search(t.content)
        assert m, t.content[:200]
        for rcpt in t.rcpt_tos:
            got[(m.group(1), rcpt)] += 1
    return got


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def daemon(rq: Relayq) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "relayq"), "daemon", "--foreground"], env=rq.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("busy_half", [False, True], ids=["all-accepted", "half-4xx"])
def test_runs_daemon_and_background_children_at_once(
    tmp_path: Path, smarthost_factory: SmarthostFactory, busy_half: bool
) -> None:
    count, extra = 1000, 40
    busy = {f"r{n}@example.org": "451 4.2.0 busy, try later"
            for n in range(1, count + extra, 2)} if busy_half else {}
    sh = smarthost_factory(rcpt_replies=busy)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=4, queue_interval="1h",
                pid_file=str(tmp_path / "relayq.pid"), retry_min=3600, retry_max=7200)
    fill(rq, count)
    d = daemon(rq)
    runs = [subprocess.Popen([str(BIN / "sendmail"), "-q"], env=rq.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)]

    def background() -> None:  # default mode: each delivered by its own child
        for n in range(count, count + extra):
            r = subprocess.run([str(BIN / "sendmail"), "-odb", f"r{n}@example.org"],
                               input=message(n), env=rq.env, capture_output=True, timeout=60,
                               check=False)
            assert r.returncode == 0, r.stderr

    submitter = threading.Thread(target=background)
    submitter.start()
    try:
        for p in runs:
            p.wait(300)
        submitter.join(300)
        expected = {(f"load-{n}".encode(), f"r{n}@example.org") for n in range(count + extra)
                    if f"r{n}@example.org" not in busy}
        wait_until(lambda: set(pairs(sh)) >= expected, 300, "every accepted pair")
        time.sleep(1)  # anything late would be a duplicate
    finally:
        stop(d)
    got = pairs(sh)
    assert set(got) == expected and set(got.values()) == {1}, [p for p, c in got.items() if c > 1]
    assert len(rq.spool.ids()) == len(busy)  # the 4xx half waits, each exactly once queued
    if busy_half:  # the smarthost recovers: the rest goes, still exactly once
        ok = smarthost_factory()
        rq.configure(smarthost=ok.smarthost)
        assert rq.sendmail("-q").returncode == 0
        assert set(pairs(ok).values()) == {1} and len(pairs(ok)) == len(busy)
        assert rq.spool.ids() == []


@pytest.mark.timeout(900)
def test_ten_thousand_from_eight_submitters_while_a_daemon_drains(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    total, writers = 10_000, 8
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=4, queue_interval="1h",
                pid_file=str(tmp_path / "relayq.pid"))
    root = tmp_path / "root"
    subprocess.run([str(BIN / "relayq"), "install", "--root", str(root), "--venv"],
                   check=True, capture_output=True)  # the -IS launcher, as installed hosts run it
    sendmail = str(root / "usr/sbin/sendmail")
    d = daemon(rq)
    failures: list[bytes] = []

    def submit(k: int) -> None:
        for n in range(k, total, writers):
            r = subprocess.run([sendmail, "-odq", f"r{n}@example.org"], input=message(n),
                               env=rq.env, capture_output=True, timeout=60, check=False)
            if r.returncode != 0:
                failures.append(r.stderr)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(800)
        assert failures == []
        wait_until(lambda: len(sh.transactions) >= total and not rq.spool.ids(), 300,
                   "the daemon to drain")
        time.sleep(1)
    finally:
        stop(d)
    got = pairs(sh)
    assert len(got) == total and set(got.values()) == {1}
    assert rq.spool.ids() == [] and list((rq.queue_dir / "queue").iterdir()) == []
