"""What a queue run did, message by message: for `relayq flush`'s summary and progress.

A run's forked workers (relayq.delivery.pool) each count in their own slot of
one anonymous shared mapping made before the fork, so the parent reads the
total while they work and after they are gone (a worker that dies keeps what
it counted) with no lock and no message between processes: each slot has one
writer. Reports a run makes and delivers are not counted (they are part of
"bounced"); one still queued is in the run's "left".

counted() names what one attempt did to its message, once, for every way
out (the tally, the log's summary and the statistics that outlive the
process, relayq.queue.stats, all take that word) and counts it on disk.
"""

from __future__ import annotations

import mmap
import struct

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Sequence

    from relayq.core.envelope import Envelope
    from relayq.system.log import Log

FIELDS = ("seen", "sent", "deferred", "bounced")
_SLOT = struct.Struct(f"={len(FIELDS)}q")


class Tally:
    """Per-message outcome counts: `seen` every message looked at (held, busy and
    not-due ones too), and of those tried, `sent` (left the queue delivered),
    `bounced` (a recipient failed for good: its report is made) or `deferred`."""

    def __init__(self, slots: int = 1) -> None:
        self._mem = mmap.mmap(-1, _SLOT.size * max(1, slots))
        self._slots = max(1, slots)
        self.slot = 0  # the slot this process adds to (a worker sets its own)

    def use_slot(self, slot: int) -> None:
        """Count in `slot` from now on (a forked worker's own, before it counts)."""
        self.slot = slot % self._slots

    def add(self, field: str) -> None:
        offset = self.slot * _SLOT.size
        values = list(_SLOT.unpack_from(self._mem, offset))
        values[FIELDS.index(field)] += 1
        _SLOT.pack_into(self._mem, offset, *values)

    def total(self) -> dict[str, int]:
        """Every slot's counts added up."""
        sums = [0] * len(FIELDS)
        for slot in range(self._slots):
            for i, value in enumerate(_SLOT.unpack_from(self._mem, slot * _SLOT.size)):
                sums[i] += value
        return dict(zip(FIELDS, sums, strict=True))


def counted(root: str, log: Log, env: Envelope, before: dict[int, str], relay: str,
            expired: bool, tried: Sequence[tuple[str, str]] = ()) -> str:
    """The attempt's word for the message (`sent`, `deferred`, `bounced`, `expired`:
    its worst outcome), counted in the queue's statistics under `relay` ("local" when
    none was tried), each recipient under its own outcome.

    `before`: each recipient's state before the attempt, by id(); recipients an
    alias added are new. `tried`: (relay, error) of each smarthost that failed on the
    way (a dead primary before the backup): each keeps its last error, no count.
    The statistics never fail the delivery (queue.stats.record).
    """
    from relayq.core.outcome import FAILED, PENDING, SENT
    from relayq.queue import stats

    def new(state: str) -> list[str]:
        return [r.reply for r in env.recipients
                if r.state == state and before.get(id(r)) != state]

    failed, pending = new(FAILED), [r for r in env.recipients if r.state == PENDING]
    sent = len(new(SENT))
    gone = "expired" if expired else "bounced"
    if failed:
        word, error = gone, failed[0]
    elif pending:
        word, error = "deferred", env.error.removeprefix("Deferred: ")
    else:
        word, error = "sent", ""
    # each recipient under its own outcome: a message half accepted counts its acceptance
    counts = {w: n for w, n in ((gone, len(failed)), ("deferred", len(pending)),
                                ("sent", sent)) if n}
    stats.record(root, log, label(relay), word, counts, error,
                 failures=[(label(host), why) for host, why in tried])
    return word


def label(relay: str) -> str:
    """The relay as the statistics name it: the host of `host [ip]`, an address
    without its brackets; "local" for a delivery that reached no relay."""
    host = relay.split(" [", 1)[0].strip()
    return host.strip("[]") or "local"
