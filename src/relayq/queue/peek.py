"""The queue as mailq reads it: each message with its state, without taking a lock."""

from __future__ import annotations

import os
import time

from relayq.core.envelope import Envelope
from relayq.core.errors import DamagedQueueFile
from relayq.queue.durable import read_small, unreadable

TYPE_CHECKING = False

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.queue.spool import Spool

LOCKS_EVERY = 0.25  # seconds: a long listing reads /proc/locks again this often


def listing(
    spool: Spool, ids: list[str] | None = None
) -> Iterator[tuple[str, Envelope | None, str, int, bool]]:
    """(qid, envelope or None, problem, data size, locked) for each message, for mailq.

    The lock state comes from /proc/locks, read again every LOCKS_EVERY
    seconds: mailq takes no lock itself (a test lock could make a queue
    run skip the message), and one stat of the data file is all it costs
    per message. Without /proc each data file is test-locked instead. A
    message delivered since the directory was listed comes back with the
    problem "job completed" (sendmail's words); one bad file never stops
    the listing.
    """
    queue = spool.queue + "/"
    held: set[int] | None = None
    fresh_until = 0.0
    for n, qid in enumerate(spool.ids() if ids is None else ids):
        try:
            raw = read_small(queue + qid + ".e")
        except FileNotFoundError:
            yield qid, None, "job completed", 0, False
            continue
        except OSError as exc:
            yield qid, None, f"cannot read envelope: {unreadable(queue + qid + '.e', exc)}", \
                0, False
            continue
        try:
            env = Envelope.loads(raw, qid)
        except DamagedQueueFile as exc:
            yield qid, None, exc.message, 0, False
            continue
        try:
            st = os.stat(queue + qid + ".d")
        except OSError:
            gone = not os.path.exists(spool.path(qid, ".e"))
            yield qid, None, "job completed" if gone else "envelope without data file", 0, False
            continue
        if n % 64 == 0 and time.monotonic() >= fresh_until:
            held = held_inodes(st.st_dev)  # can cost milliseconds: not too often
            fresh_until = time.monotonic() + LOCKS_EVERY
        locked = st.st_ino in held if held is not None else spool.is_locked(qid)
        yield qid, env, "", st.st_size, locked


def dead_letters(spool: Spool) -> Iterator[tuple[str, Envelope, int]]:
    """(qid, envelope, data size) of each dead letter kept in quarantine/ (Spool.bury)."""
    try:
        names = sorted(os.listdir(spool.quarantine_dir))
    except OSError:
        return
    for name in names:
        qid, _, rest = name.partition(".")
        if not rest.startswith("e.") or rest.endswith(".t"):
            continue
        path = os.path.join(spool.quarantine_dir, name)
        try:
            env = Envelope.loads(read_small(path), qid)
            size = os.stat(os.path.join(spool.quarantine_dir, f"{qid}.d{rest[1:]}")).st_size
        except (OSError, DamagedQueueFile):
            continue
        if env.dead:
            yield qid, env, size


def held_inodes(dev: int) -> set[int] | None:
    """Inodes on device `dev` with an flock held (not waited for), from /proc/locks."""
    want = f"{os.major(dev):02x}:{os.minor(dev):02x}:"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    held = set()
    for line in text.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" second
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].startswith(want):
            ino = parts[5][len(want):]
            if ino.isdigit():
                held.add(int(ino))
    return held
