"""The spool's parts on their own: queue ids, durability primitives, the mailq view, claims."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.unit.test_spool import commit

from relayq.core.errors import QueueError, TempFailure
from relayq.queue import durable, names
from relayq.queue import peek as listing
from relayq.queue.claim import Claim
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from pathlib import Path

# 2040-01-01 .. 2099-12-31 (UTC), one cycle of year % 60, whole microseconds
WHEN = st.integers(2_208_988_800_000_000, 4_102_444_799_000_000).map(lambda us: us / 1_000_000)


@given(WHEN, st.integers(0, 60**4 - 1))
def test_qid_time_inverts_make_qid(now: float, pid: int) -> None:
    qid = names.make_qid(now, pid)
    assert len(qid) == 14 and all(c in names.ALPHABET for c in qid)
    # sendmail 8.12+'s layout, the queue id logwatch's sendmail service recognizes
    assert re.fullmatch(r"\w{8}\d{6}", qid) and qid[8:] == f"{pid % 10**6:06d}"
    assert 0 <= now - names.qid_time(qid, now + 86_400) < 1 / names.SLOTS + 1e-6


def test_qid_time_reads_the_old_layout() -> None:
    # relayq 0.x: four base-60 characters of microseconds, then four of the pid
    old = "612345" + "00Bx" + "AbCd"  # 2046-01-02 03:04:05 and 719 us
    when = names.qid_time(old, 2_398_475_045.0 + 86_400)
    assert when == pytest.approx(2_398_475_045.000719, abs=1e-5)


@given(WHEN, WHEN, st.integers(0, 60**4 - 1))
def test_queue_ids_sort_by_time(a: float, b: float, pid: int) -> None:
    # make_qid truncates to a slot (1/3600 s): two times less than a slot apart
    # may share an id's time (the spool then takes the next slot); two slots
    # apart always sort
    if abs(a - b) >= 2 / names.SLOTS:
        assert (names.make_qid(a, pid) < names.make_qid(b, pid)) == (a < b)


@pytest.mark.parametrize("bad", ["", "!!!!!!!!!!!!!!", "0" * 14])
def test_qid_time_of_garbage_is_zero(bad: str) -> None:
    assert names.qid_time(bad, time.time()) == 0.0


@pytest.mark.parametrize(("err", "kind", "code"), [
    (errno.ENOSPC, TempFailure, None), (errno.EDQUOT, TempFailure, None),
    (errno.EACCES, QueueError, 77), (errno.EPERM, QueueError, 77),
    (errno.EROFS, QueueError, 73), (errno.EIO, QueueError, None)])
def test_io_error_maps_errno_to_sendmail_exit_codes(err: int, kind: type, code: int | None
                                                    ) -> None:
    exc = durable.io_error("write it", OSError(err, os.strerror(err)))
    assert type(exc) is kind
    assert exc.message.startswith("cannot write it")
    if code is not None:
        assert exc.code == code


def test_read_small_reads_past_its_first_block(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for size in (0, 10, 65536, 65536 * 3 + 7):
        path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        assert durable.read_small(str(path)) == path.read_bytes()


def test_fsync_dir_and_unlink_if_there(tmp_path: Path) -> None:
    durable.fsync_dir(str(tmp_path))  # with threads loaded: the shared group sync
    assert durable.group_sync(str(tmp_path)) is durable.group_sync(str(tmp_path))
    durable.unlink_if_there(str(tmp_path / "never"))  # no error
    (tmp_path / "f").write_bytes(b"")
    durable.unlink_if_there(str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_held_inodes_sees_a_held_flock_and_forgets_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    st_ = os.stat(path)
    if listing.held_inodes(st_.st_dev) is None:
        pytest.skip("no /proc/locks here")
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert st_.st_ino in (listing.held_inodes(st_.st_dev) or set())
    finally:
        os.close(fd)
    assert st_.st_ino not in (listing.held_inodes(st_.st_dev) or set())


def test_claim_reserve_is_consumed_by_the_record(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    spool.ensure()
    qid = commit(spool)
    claim = spool.claim(qid)
    assert isinstance(claim, Claim)
    assert not claim.was_cut_off()
    claim.mark_sending(1)
    assert claim.was_cut_off()  # a crash now: the next attempt logs a possible duplicate
    claim.envelope.attempts = 1
    claim.record()
    assert not claim.was_cut_off()
    assert spool.read_envelope(qid).attempts == 1
    claim.finish()
    assert spool.ids() == [] and os.listdir(spool.queue) == []
