"""Locking and crash safety with real processes: concurrent runners, kills, damage.

Every process here is the installed `sendmail` / `mailq` started as a
subprocess against a private queue, and every server a recording smarthost on
127.0.0.1. Waits are bounded loops; kills are SIGKILL to a pid we started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.integration.test_daemon import wait_for

from relayq.core.errors import EX_OK, EX_TEMPFAIL
from relayq.queue.spool import STALE_SECONDS

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

SENDMAIL = str(BIN / "sendmail")
MSGID = re.compile(rb"^Message-ID: (<[^>]+>)\r?$", re.MULTILINE | re.IGNORECASE)




def popen(rq: Relayq, *args: str,
          stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen([SENDMAIL, *args], env=rq.env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 45) -> tuple[int, bytes]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def message(n: int) -> bytes:
    return (f"From: alice@example.org\nTo: bob@example.org\nSubject: message {n}\n"
            f"Message-ID: <conc-{n}@example.org>\n\nbody of message {n}\n").encode()


def submit_many(rq: Relayq, count: int, *flags: str, batch: int = 10) -> None:
    """Queue `count` messages with real submissions, `batch` of them at a time."""
    for start in range(0, count, batch):
        procs = []
        for n in range(start, min(start + batch, count)):
            p = subprocess.Popen([SENDMAIL, *flags, "bob@example.org"], env=rq.env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
            procs.append((p, message(n)))
        for p, data in procs:
            _, err = p.communicate(data, timeout=30)
            assert p.returncode == EX_OK, err


def received_ids(sh: Smarthost) -> Counter[bytes]:
    out: Counter[bytes] = Counter()
    for t in sh.transactions:
        m = MSGID.search(t.content)
        assert m, t.content[:300]
        out[m.group(1)] += 1
    return out


def queue_files(rq: Relayq) -> list[str]:
    try:
        return sorted(os.listdir(rq.spool.queue))
    except FileNotFoundError:
        return []


def mailq_total(rq: Relayq) -> int:
    r = rq.run("mailq")
    assert r.returncode == EX_OK, r.stderr
    m = re.search(rb"Total requests: (\d+)", r.stdout)
    if m:
        return int(m.group(1))
    assert b"queue is empty" in r.stdout.lower() or b"(0 requests)" in r.stdout, r.stdout
    return 0


# --- concurrent queue runs ---------------------------------------------------------------


@pytest.mark.parametrize("runners", [2, 4])
def test_concurrent_queue_runs_deliver_each_message_once(
    tmp_path: Path, smarthost_factory: SmarthostFactory, runners: int
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="background")
    submit_many(rq, 50, "-odq")
    assert len(rq.spool.ids()) == 50 and sh.connections == 0
    procs = [popen(rq, "-q") for _ in range(runners)]
    results = [finish(p) for p in procs]
    for code, err in results:
        # a runner that found messages held by another says so with 75; never anything else
        assert code in (EX_OK, EX_TEMPFAIL), err
        assert b"Traceback" not in err and err == b"", err
    got = received_ids(sh)
    assert sorted(got) == sorted(f"<conc-{n}@example.org>".encode() for n in range(50))
    assert set(got.values()) == {1}, [k for k, v in got.items() if v > 1]
    assert rq.spool.ids() == [] and queue_files(rq) == []
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(sh.transactions) == 50
    sent = [ln for ln in rq.log().splitlines() if "stat=Sent" in ln]
    assert len(sent) == 50


@pytest.mark.parametrize("mode", ["background", "interactive"])
def test_submission_and_concurrent_queue_run_deliver_once(
    tmp_path: Path, smarthost_factory: SmarthostFactory, mode: str
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode=mode)
    rounds = 5
    for n in range(rounds):
        # the submitter keeps the lock from its commit through its (child's) delivery
        sub = popen(rq, "bob@example.org", stdin=subprocess.PIPE)
        runner = popen(rq, "-q")
        _, err = sub.communicate(message(n), timeout=30)
        assert sub.returncode == EX_OK, err
        # the queue run raced the submission; keep running the queue until it is empty
        code, err = finish(runner)
        assert code in (EX_OK, EX_TEMPFAIL), err
        wait_for(lambda: queue_files(rq) == [], what="the queue to empty")
    time.sleep(0.5)  # a duplicate, if any, would be on its way by now
    got = received_ids(sh)
    assert got == Counter({f"<conc-{n}@example.org>".encode(): 1 for n in range(rounds)})
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(sh.transactions) == rounds


# --- crashes --------------------------------------------------------------------------------


def test_runner_killed_at_data_leaves_message_queued(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    stalled = smarthost_factory(stall="eod")
    rq = Relayq(tmp_path, smarthost=stalled.smarthost, delivery_mode="queue", timeout=600)
    assert rq.sendmail("bob@example.org", input=message(1)).returncode == EX_OK
    [qid] = rq.spool.ids()
    runner = popen(rq, "-q")
    try:
        wait_for(lambda: "DATA" in stalled.verbs(), what="the runner to send DATA")
        time.sleep(0.3)  # the message text and the final dot follow DATA at once
        assert runner.poll() is None, "the runner should hang waiting for the 250"
        assert rq.spool.is_locked(qid)
    finally:
        runner.send_signal(signal.SIGKILL)
        finish(runner)
    assert runner.returncode == -signal.SIGKILL
    assert stalled.transactions == []
    assert rq.spool.ids() == [qid] and not rq.spool.is_locked(qid)
    listing = rq.run("mailq")
    assert qid.encode() in listing.stdout and b"bob@example.org" in listing.stdout
    assert mailq_total(rq) == 1

    healthy = smarthost_factory()
    rq.configure(smarthost=healthy.smarthost)
    r = rq.sendmail("-q")
    assert r.returncode == EX_OK, r.stderr
    assert received_ids(healthy) == Counter({b"<conc-1@example.org>": 1})
    assert rq.spool.ids() == [] and queue_files(rq) == []
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(healthy.transactions) == 1


def test_submission_killed_mid_message_leaves_nothing_visible(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="background")
    sub = popen(rq, "-oi", "bob@example.org", stdin=subprocess.PIPE)
    assert sub.stdin is not None
    try:
        full = message(7) + b"x" * 200_000 + b"\nthe end\n"
        sub.stdin.write(full[: len(full) // 2])
        sub.stdin.flush()
        # the data file exists once the header has been read
        wait_for(lambda: any(n.endswith(".d") for n in queue_files(rq)),
                 what="the submission to start its data file")
        time.sleep(0.2)
        assert sub.poll() is None
    finally:
        sub.send_signal(signal.SIGKILL)
        finish(sub)
    assert sub.returncode == -signal.SIGKILL
    assert rq.spool.ids() == []
    assert mailq_total(rq) == 0
    r = rq.sendmail("-q")
    assert r.returncode == EX_OK, r.stderr
    time.sleep(0.3)
    assert sh.transactions == [] and sh.connections == 0
    debris = queue_files(rq)
    assert all(n.endswith((".d", ".t")) for n in debris), debris
    spool = rq.spool
    assert spool.sweep() == []  # fresh debris might still be a live writer's file
    old = time.time() - 2 * 3600
    assert STALE_SECONDS < 2 * 3600
    for name in debris:
        os.utime(os.path.join(spool.queue, name), (old, old))
    assert sorted(spool.sweep()) == debris
    assert queue_files(rq) == []


def test_damaged_envelope_is_quarantined(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    for n in range(3):
        assert rq.sendmail("-odq", "bob@example.org", input=message(n)).returncode == EX_OK
    ids = rq.spool.ids()
    assert len(ids) == 3
    bad = ids[1]
    path = os.path.join(rq.spool.queue, bad + ".e")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    listing = rq.run("mailq")
    assert listing.returncode == EX_OK, listing.stderr
    assert f"{bad} (damaged: ".encode() in listing.stdout, listing.stdout
    r = rq.sendmail("-q")
    assert r.returncode == EX_OK, r.stderr
    got = received_ids(sh)
    assert sorted(got.values()) == [1, 1] and len(got) == 2
    assert rq.spool.ids() == [] and queue_files(rq) == []
    moved = sorted(os.listdir(rq.spool.quarantine_dir))
    assert [n.split(".")[:2] for n in moved] == [[bad, "d"], [bad, "e"]], moved
    log = rq.log()
    assert any(bad in ln and "quarantine" in ln for ln in log.splitlines()), log
    # the damaged message is not among those delivered
    with open(os.path.join(rq.spool.quarantine_dir, next(n for n in moved if ".d." in n)),
              "rb") as f:
        bad_id = MSGID.search(f.read())
    assert bad_id is not None and bad_id.group(1) not in got


def test_a_killed_queue_run_takes_its_workers_along(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """Workers die with `sendmail -q` (cron's timeout, an admin's kill): no delivery
    goes on behind a run that is gone, and every message stays queued for the next."""
    stalled = smarthost_factory(stall="eod")
    rq = Relayq(tmp_path, smarthost=stalled.smarthost, delivery_mode="queue", timeout=600,
                concurrency=3)
    submit_many(rq, 6)
    runner = popen(rq, "-q")
    try:
        wait_for(lambda: stalled.verbs().count("DATA") == 3, what="three workers at DATA")
        time.sleep(0.3)
        workers = [int(p) for p in subprocess.run(
            ["pgrep", "-P", str(runner.pid)], capture_output=True, text=True,
            check=False).stdout.split()]
        assert len(workers) == 3
    finally:
        runner.send_signal(signal.SIGKILL)
        finish(runner)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in workers),
             what="the workers to follow their run")
    assert stalled.transactions == []
    assert len(rq.spool.ids()) == 6 and not any(rq.spool.is_locked(q) for q in rq.spool.ids())
    healthy = smarthost_factory()
    rq.configure(smarthost=healthy.smarthost)
    assert rq.sendmail("-q").returncode == EX_OK
    assert sorted(received_ids(healthy).values()) == [1] * 6 and rq.spool.ids() == []


@pytest.mark.parametrize("how", ["sendmail -q", "daemon start"])
def test_start_up_recovery_cleans_quarantines_and_delivers_the_rest_in_one_run(
    tmp_path: Path, smarthost_factory: SmarthostFactory, how: str
) -> None:
    """reliability-security.md A6: debris removed, damage quarantined with one log line
    each, a newer format left alone, everything else delivered in the same run."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue", concurrency=2,
                pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h")
    for n in range(6):
        assert rq.sendmail("-odq", "bob@example.org", input=message(n)).returncode == EX_OK
    no_data, garbage, newer = rq.spool.ids()[2:5]
    q = rq.spool.queue
    os.unlink(os.path.join(q, no_data + ".d"))  # an envelope without data
    with open(os.path.join(q, garbage + ".e"), "wb") as f:
        f.write(b"\x00\xff not an envelope\n")
    with open(os.path.join(q, newer + ".e"), "r+b") as f:
        text = f.read().replace(b"relayq-envelope\t1", b"relayq-envelope\t9")
        f.seek(0)
        f.write(text)
    for name in ("ORPHANDATA0001.d", "HALFENVELOPE1.t", "GONEMESSAGE01.f"):
        with open(os.path.join(q, name), "wb") as f:
            f.write(b"debris\n")
    past = time.time() - 2 * STALE_SECONDS
    for name in ("ORPHANDATA0001.d", "HALFENVELOPE1.t", "GONEMESSAGE01.f"):
        os.utime(os.path.join(q, name), (past, past))
    if how == "sendmail -q":
        assert rq.sendmail("-q").returncode == EX_TEMPFAIL  # the newer one stays
    else:
        d = subprocess.Popen([str(BIN / "relayq"), "daemon", "--foreground"], env=rq.env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            wait_for(lambda: len(sh.transactions) == 3, what="the start-up run")
            time.sleep(0.3)
        finally:
            d.terminate()
            finish(d)
    assert len(sh.transactions) == 3  # the two good ones and the sixth
    assert sorted(queue_files(rq)) == [newer + ".d", newer + ".e"]
    moved = sorted(n.split(".")[0] for n in os.listdir(rq.spool.quarantine_dir))
    assert sorted(set(moved)) == sorted([no_data, garbage])
    log = rq.log()
    for qid in (no_data, garbage):
        assert sum(qid in ln and "quarantine" in ln for ln in log.splitlines()) == 1, log
    assert f"{newer}: envelope format 9 is newer" in log and "left alone" in log
