"""The queue on disk: commit point, atomic state, locking, quarantine, debris."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

from relayq.core.envelope import FAILED, SENT, Envelope, Recipient
from relayq.core.errors import DamagedQueueFile
from relayq.queue.names import make_qid
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from pathlib import Path


def commit(spool: Spool, body: bytes = b"Subject: x\n\nhi\n", rcpts: int = 1) -> str:
    msg = spool.create()
    msg.write(body)
    env = Envelope(msg.qid, "a@example.org",
                   [Recipient(f"r{i}@example.org") for i in range(rcpts)], time.time())
    env.size = msg.size
    msg.commit(env)
    msg.release()
    return msg.qid


def test_commit_makes_message_visible(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    msg = spool.create()
    msg.write(b"hello\n")
    assert spool.ids() == []  # before the commit point nothing is visible
    env = Envelope(msg.qid, "", [Recipient("b@example.org")], time.time())
    msg.commit(env)
    msg.release()
    assert spool.ids() == [msg.qid]
    back = spool.read_envelope(msg.qid)
    assert back.sender == "" and back.recipients[0].address == "b@example.org"


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    with spool.create() as msg:
        msg.write(b"x")
    assert os.listdir(spool.queue) == []


def test_ids_are_unique_and_sorted(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    ids = [commit(spool) for _ in range(50)]
    assert len(set(ids)) == 50
    assert spool.ids() == sorted(ids) == ids
    assert all(len(q) == 14 for q in ids)
    assert make_qid(0.5, 1) < make_qid(1.0, 1)


def test_one_claim_at_a_time_and_state_survives(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    qid = commit(spool, rcpts=2)
    first = spool.claim(qid)
    assert first is not None
    assert spool.claim(qid) is None  # a second runner skips it
    assert spool.is_locked(qid)
    first.envelope.recipients[0].state = SENT
    first.envelope.recipients[1].state = FAILED
    first.envelope.attempts = 1
    first.record()
    first.release()
    assert not spool.is_locked(qid)
    again = spool.claim(qid)
    assert again is not None
    assert [r.state for r in again.envelope.recipients] == [SENT, FAILED]
    again.finish()
    assert spool.ids() == [] and os.listdir(spool.queue) == []


def test_damaged_envelope_is_reported(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    qid = commit(spool)
    path = os.path.join(spool.queue, qid + ".e")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: no end line
    with pytest.raises(DamagedQueueFile):
        spool.claim(qid)
    spool.quarantine(qid)
    assert spool.ids() == []
    assert len(os.listdir(spool.quarantine_dir)) == 2


def test_sweep_removes_only_old_unlocked_debris(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    kept = commit(spool)
    writer = spool.create()  # a writer still busy: locked, no envelope
    orphan = os.path.join(spool.queue, "ORPHAN00000000.d")
    with open(orphan, "wb") as f:
        f.write(b"x")
    old = time.time() - 7200
    for name in os.listdir(spool.queue):
        os.utime(os.path.join(spool.queue, name), (old, old))
    removed = spool.sweep()
    assert removed == ["ORPHAN00000000.d"]
    assert spool.ids() == [kept]
    assert os.path.exists(spool.data_path(writer.qid))
    writer.abort()


def test_envelope_round_trip_and_newer_format() -> None:
    env = Envelope("QID0000000000A", "s@example.org",
                   [Recipient("r@example.org", notify="SUCCESS,FAILURE", orcpt="rfc822;r@x")],
                   1.5)
    env.error = "Deferred: tab\there\nnewline"
    back = Envelope.loads(env.dumps(), "QID0000000000A")
    assert back.error == "Deferred: tab here newline"
    assert back.recipients[0].notify == "SUCCESS,FAILURE"
    newer = env.dumps().replace(b"relayq-envelope\t1", b"relayq-envelope\t9")
    with pytest.raises(DamagedQueueFile, match="newer"):
        Envelope.loads(newer, "QID0000000000A")
    with pytest.raises(DamagedQueueFile):
        Envelope.loads(env.dumps(), "OTHER000000000")


@pytest.mark.parametrize("proc_locks", [True, False], ids=["/proc/locks", "test-lock"])
def test_listing_reports_size_lock_and_vanished_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc_locks: bool
) -> None:
    if not proc_locks:  # the fallback where /proc is not mounted
        monkeypatch.setattr("relayq.queue.peek.held_inodes", lambda dev: None)
    spool = Spool(str(tmp_path))
    spool.ensure()
    kept = commit(spool, b"12345\n")
    held = commit(spool)
    claim = spool.claim(held)
    assert claim is not None
    rows = {q: (env is not None, problem, size, locked)
            for q, env, problem, size, locked in spool.listing([kept, held, "GONE0000000000"])}
    claim.release()
    assert rows[kept] == (True, "", 6, False)
    assert rows[held][0] and rows[held][3]  # locked by a runner: mailq's "*"
    assert rows["GONE0000000000"] == (False, "job completed", 0, False)
    after = {q: locked for q, _, _, _, locked in spool.listing([kept, held])}
    assert after == {kept: False, held: False}  # the listing itself holds no lock


def test_concurrent_directory_syncs_are_shared(tmp_path: Path) -> None:
    import threading
    import time as _time

    from relayq.queue.durable import GroupSync

    sync = GroupSync(str(tmp_path))
    with sync.cond:
        sync.running = True  # as if an fsync were under way: newcomers must wait for the next
    threads = [threading.Thread(target=sync.sync) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = _time.monotonic() + 10
    while sync.asked < 8 and _time.monotonic() < deadline:
        _time.sleep(0.01)
    with sync.cond:  # the "fsync under way" ends without covering them
        sync.running = False
        sync.cond.notify_all()
    for t in threads:
        t.join(10)
    assert sync.done == sync.asked == 8  # all served by a sync that began after they asked
    assert sync.rounds == 1  # one fsync for the eight
