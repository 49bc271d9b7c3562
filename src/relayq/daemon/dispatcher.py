"""Which message a worker delivers next: one record per message in flight.

The daemon hears of a message from many sides (a queue run, the inotify
wake-up, the listener's commit, a maildrop hand-over, SIGUSR1, a recheck of a
message that was locked elsewhere) and has `concurrency` workers. The rules:

- a message is never handed to two workers at once: a message already
  queued for a worker or being delivered is not queued again;
- a forced run (SIGUSR1, `relayq flush`) is never lost: asked while the
  message is queued, the queued run becomes forced; asked while it is being
  delivered (by a normal run, which may skip a message not yet due), it runs
  once more, forced, after that delivery if the message is still queued;
- a message left queued although it was due (locked by another process: the
  submitter between commit and unlock, a background child, a cron
  `sendmail -q`) is looked at again shortly after, backing off from
  RECHECK_MIN to RECHECK_MAX;
- stopping forgets what is queued; what is being delivered finishes.

Dispatcher holds the decisions and nothing else: no thread, no queue, no
I/O. Each method is one event and answers what the caller must do (put the
message on the work queue, wake the scheduler); the daemon's threads are a
thin shell around it (relayq.daemon.workers). The clock is injected, so the
unit tests drive it with a fake one.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

RECHECK_MIN, RECHECK_MAX = 0.005, 30.0  # the submitter lets go within milliseconds

QUEUED = "queued"  # on the work queue, waiting for a worker
ACTIVE = "active"  # a worker is delivering it
WAITING = "waiting"  # left queued while due: a recheck is set for `at`

AGAIN = "again"  # finish(): queued once more (forced): put it on the work queue
RECHECK = "recheck"  # finish(): a recheck is set: wake the scheduler
DONE = "done"  # finish(): nothing more to do about it for now


class Record:
    """One message in flight: where it is, and what it still owes."""

    __slots__ = ("again", "at", "delay", "force", "qid", "state")

    def __init__(self, qid: str) -> None:
        self.qid = qid
        self.state = QUEUED
        self.force = False  # queued or being delivered as a forced run
        self.again = False  # forced while being delivered: once more after
        self.at = 0.0  # WAITING: when to look again
        self.delay = 0.0  # the last recheck delay (0: none yet)

    def __repr__(self) -> str:
        return (f"Record({self.qid!r}, {self.state}, force={self.force}, again={self.again}, "
                f"delay={self.delay:g})")


class Dispatcher:
    """The daemon's messages in flight; every method is atomic (one lock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.records: dict[str, Record] = {}
        self.stopping = False
        self._lock = threading.Lock()

    def dispatch(self, qid: str, force: bool) -> bool:
        """A run of `qid` is wanted; True if the caller must put it on the work queue."""
        with self._lock:
            if self.stopping:
                return False
            rec = self.records.get(qid)
            if rec is None:
                rec = self.records[qid] = Record(qid)
            elif rec.state == QUEUED:
                rec.force = rec.force or force
                return False
            elif rec.state == ACTIVE:
                rec.again = rec.again or force  # a normal run is covered by this one
                return False
            rec.state, rec.force = QUEUED, force  # new, or WAITING (its delay kept)
            return True

    def claim(self, qid: str) -> bool | None:
        """A worker took `qid` off the work queue: its force flag, or None to skip it
        (the daemon is stopping, or it is not queued)."""
        with self._lock:
            rec = self.records.get(qid)
            if rec is None or rec.state != QUEUED:
                return None
            if self.stopping:
                del self.records[qid]
                return None
            rec.state, rec.again = ACTIVE, False
            return rec.force

    def finish(self, qid: str, left: int, due: bool) -> str:
        """The worker is done with `qid`: `left` is whether it is still queued, `due`
        whether it was due but untouched (locked elsewhere; the caller looks only
        after a normal run that left it). AGAIN, RECHECK or DONE."""
        with self._lock:
            rec = self.records.get(qid)
            if rec is None or rec.state != ACTIVE:
                return DONE
            if rec.again and left and not self.stopping:
                rec.state, rec.force, rec.again = QUEUED, True, False
                return AGAIN
            if left and due and not rec.force and not self.stopping:
                rec.delay = min(max(rec.delay * 2, RECHECK_MIN), RECHECK_MAX)
                rec.state, rec.at = WAITING, self.clock() + rec.delay
                return RECHECK
            del self.records[qid]
            return DONE

    def due_rechecks(self) -> list[str]:
        """The rechecks whose time has come, now queued: put them on the work queue."""
        now = self.clock()
        with self._lock:
            if self.stopping:
                return []
            due = [rec for rec in self.records.values() if rec.state == WAITING and rec.at <= now]
            for rec in due:
                rec.state, rec.force = QUEUED, False
            return [rec.qid for rec in due]

    def next_wait(self, poll: float) -> float:
        """How long the scheduler may sleep: until the next poll or the soonest recheck."""
        with self._lock:
            soonest = min((r.at for r in self.records.values() if r.state == WAITING),
                          default=None)
        if soonest is None:
            return poll
        return max(0.0, min(poll, soonest - self.clock()))

    def stop(self) -> None:
        """Stopping: what is queued or waiting is forgotten (it stays in the spool)."""
        with self._lock:
            self.stopping = True
            for qid in [q for q, r in self.records.items() if r.state != ACTIVE]:
                del self.records[qid]

    def in_flight(self) -> list[str]:
        """The messages being delivered now."""
        with self._lock:
            return sorted(q for q, r in self.records.items() if r.state == ACTIVE)

    def state(self, qid: str) -> str | None:
        with self._lock:
            rec = self.records.get(qid)
            return None if rec is None else rec.state
