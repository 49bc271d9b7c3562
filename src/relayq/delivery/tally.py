"""What a queue run did, message by message: for `relayq flush`'s summary and progress.

A run's forked workers (relayq.delivery.pool) each count in their own slot of
one anonymous shared mapping made before the fork, so the parent reads the
total while they work and after they are gone (a worker that dies keeps what
it counted) with no lock and no message between processes: each slot has one
writer. Reports a run makes and delivers are not counted (they are part of
"bounced"); one still queued is in the run's "left".
"""

from __future__ import annotations

import mmap
import struct

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
