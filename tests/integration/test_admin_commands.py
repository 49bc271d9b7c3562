"""relayq hold / release / delete / requeue: one message at a time, logged (issue 6 §3)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import BIN, Relayq

from relayq.core.errors import EX_NOINPUT, EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"Subject: admin\n\nhello\n"


def queue_two(rq: Relayq) -> list[str]:
    for rcpt in ("a@example.org", "b@example.org"):
        assert rq.sendmail("-odq", rcpt, input=MSG).returncode == EX_OK
    return rq.spool.ids()


def test_hold_keeps_a_message_from_every_run_until_release(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    held, _ = queue_two(rq)
    r = rq.run("relayq", "hold", held)
    assert r.returncode == EX_OK and r.stdout.decode() == f"{held}: held\n"
    assert f"{held}: held by " in rq.log()
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL  # forced, and still not delivered
    assert [t.rcpt_tos for t in sh.transactions] == [["b@example.org"]]
    listing = rq.run("mailq").stdout
    assert held.encode() in listing and b"Held by the administrator" in listing
    [entry] = json.loads(rq.run("relayq", "mailq", "--json").stdout)["messages"]
    assert entry["id"] == held and entry["held"] is True
    assert rq.run("relayq", "release", held).returncode == EX_OK
    assert f"{held}: released by " in rq.log()
    assert rq.run("relayq", "run").returncode == EX_OK  # due at once after release
    assert sorted(t.rcpt_tos[0] for t in sh.transactions) == ["a@example.org", "b@example.org"]
    assert rq.spool.ids() == []


def test_requeue_retries_a_backed_off_message_now(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    rq = Relayq(tmp_path, retry_min=3600, retry_max=7200)  # port 9: refused
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == EX_OK
    [qid] = rq.spool.ids()
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert rq.spool.read_envelope(qid).next_try > time.time() + 3000
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    assert rq.run("relayq", "run").returncode == EX_TEMPFAIL  # backed off
    r = rq.run("relayq", "requeue", qid)
    assert r.returncode == EX_OK, r.stderr
    assert len(sh.transactions) == 1 and rq.spool.ids() == []
    assert f"{qid}: requeued (due now) by " in rq.log()


def test_delete_and_unknown_ids(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    doomed, kept = queue_two(rq)
    r = rq.run("relayq", "delete", doomed, "NOSUCHQUEUEID")
    assert r.returncode == EX_NOINPUT
    assert r.stdout.decode() == f"{doomed}: deleted\nNOSUCHQUEUEID: no such message\n"
    assert rq.spool.ids() == [kept]
    assert sorted(p.name for p in (rq.queue_dir / "queue").iterdir()) == [
        f"{kept}.d", f"{kept}.e"]
    assert f"{doomed}: deleted by " in rq.log()


def test_a_message_being_delivered_is_busy(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    stalled = smarthost_factory(stall="eod")
    rq = Relayq(tmp_path, smarthost=stalled.smarthost, timeout=60)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == EX_OK
    [qid] = rq.spool.ids()
    run = subprocess.Popen([str(BIN / "sendmail"), "-q"], env=rq.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while "DATA" not in stalled.verbs():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = rq.run("relayq", "hold", qid)
        assert r.returncode == EX_TEMPFAIL
        assert r.stdout.decode() == f"{qid}: busy (being delivered); try again\n"
    finally:
        run.kill()
        run.wait(10)
    assert rq.run("relayq", "hold", qid).returncode == EX_OK  # the lock went with the run
