"""Delivery statistics that outlive the process: for `relayq metrics` and `relayq status`.

What is kept, per relay (the smarthost as delivery names it: `mail.example.org`,
`127.0.0.1`, or `local` for local mailboxes): how many messages (and recipients)
were sent, deferred, bounced and expired, the last successful delivery, and the
last error (its time and one line: `421 4.7.0 try later`, `connect: Connection
refused`); plus the last successful delivery of all.

The design: one small JSON file, `<queue_dir>/stats` (mode 0600, owned by
whoever owns the queue, like every queue file), rewritten in place by each
delivery that counts, under an exclusive flock on the file itself (never
replaced, so the lock cannot be lost to a rename): read, add, write from
offset 0, truncate. Every delivering process (sendmail -q's workers, the
daemon's agents, a submission's background child) does the same, so
concurrent deliveries never lose each other's counts; readers take a shared
lock and never see a rewrite half done. No rename: on ext4 replacing a file
by rename starts its writeback (auto_da_alloc), 0.2 ms under a lock every
delivery would queue on; the rewrite costs about 35 µs (ext4).

What it never does: fail or delay a delivery. The lock is tried for at most
LOCK_PATIENCE seconds (a process stopped while holding it must not stop the
others); past that, or on any error (a full disk, a damaged file, permissions),
the count is dropped and logged once per process. It is never on the
`sendmail` submission path: only delivery writes it.

Durability: none is asked for (no fsync). The envelope records the relay's 250
first (relayq.delivery.journal); the count comes after. A crash between the
two loses that increment; a process killed between the write and the
truncate leaves bytes after the document, which readers ignore; a power cut
may lose the last rewrites, or tear one (read as empty). Counters that miss an
increment, or start again from zero, are what Prometheus expects of counters
(rate() and increase() treat a drop as a reset): the statistics are for
monitoring, never for accounting.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import time

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from relayq.system.log import Log

OUTCOMES = ("sent", "deferred", "bounced", "expired")
LOCK_PATIENCE = 0.5  # seconds a delivery may wait for another process's rewrite
MAX_RELAYS = 64  # relays kept (the least recently used one goes first)
MAX_ERROR = 200  # characters of an error line kept
VERSION = 1

_complained = False  # said once per process (a queue run must not log it per message)


def empty() -> dict[str, Any]:
    return {"version": VERSION, "relays": {}, "last_success": None}


def path_of(root: str) -> str:
    """The statistics file in the queue directory `root`."""
    return os.path.join(root, "stats")


def read(root: str) -> dict[str, Any]:
    """The statistics as last written (empty when there are none yet), read under a
    shared lock so that no rewrite is seen half done (after LOCK_PATIENCE, without)."""
    try:
        fd = os.open(path_of(root), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return empty()
    try:
        try:
            _lock(fd, fcntl.LOCK_SH)
        except OSError:
            pass  # a writer stopped while holding it: read what is there
        return _loads(os.pread(fd, 1 << 20, 0))
    finally:
        os.close(fd)


def _loads(raw: bytes) -> dict[str, Any]:
    """A damaged or foreign file reads as empty: monitoring sees a counter reset.
    Bytes after the document (a rewrite cut off before its truncate) are ignored;
    so is any entry or value of the wrong type or range (_clean): a reader never
    crashes on the file, and the next delivery counts from what was valid."""
    try:
        data, _ = json.JSONDecoder(parse_constant=lambda _: None).raw_decode(
            raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return empty()
    if not isinstance(data, dict) or data.get("version") != VERSION or \
            not isinstance(data.get("relays"), dict):
        return empty()
    return _clean(data)


_COUNTS = tuple(w for o in OUTCOMES for w in (o, f"{o}_recipients"))
_TIMES = ("last_attempt", "last_success", "last_error_time")
_MAX_COUNT = 2**62  # past this a counter is damage, not mail


def _count(value: object) -> int | None:
    """A counter: an int (not a bool) from 0 up, else None."""
    return value if type(value) is int and 0 <= value < _MAX_COUNT else None


def _time(value: object) -> float | None:
    """A Unix time: a finite number from 0 up, else None."""
    if type(value) not in (int, float):
        return None
    try:
        t = float(value)  # type: ignore[arg-type]
    except OverflowError:
        return None
    return t if math.isfinite(t) and t >= 0 else None


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    """The document with only what is valid in it: each relay an object, each counter
    an int >= 0, each time a finite number >= 0, the error a string."""
    out = empty()
    out["last_success"] = _time(data.get("last_success"))
    for relay, entry in list(data["relays"].items())[-MAX_RELAYS:]:
        if not isinstance(entry, dict):
            continue
        kept: dict[str, Any] = {}
        for key in _COUNTS:
            count = _count(entry.get(key))
            if count is not None:
                kept[key] = count
        for key in _TIMES:
            kept[key] = _time(entry.get(key))
        error = entry.get("last_error")
        if isinstance(error, str):
            kept["last_error"] = error[:MAX_ERROR]
        out["relays"][relay] = kept
    return out


def add(data: dict[str, Any], relay: str, outcome: str, recipients: int | dict[str, int],
        now: float, error: str = "") -> None:
    """Count one message's attempt at `relay` into `data` (pure: the file's contents).

    `outcome` is the message's word; `recipients` how many recipients it concerned,
    or each recipient outcome's count ({"sent": 1, "bounced": 1}: a message half
    refused), so that a recipient is counted under its own outcome. A recipient
    sent is the relay's last success, whatever became of the others."""
    relays = data["relays"]
    entry = relays.pop(relay, None) or {}
    for word in OUTCOMES:
        entry.setdefault(word, 0)
        entry.setdefault(f"{word}_recipients", 0)
    entry[outcome] += 1
    counts = recipients if isinstance(recipients, dict) else {outcome: recipients}
    for word, count in counts.items():
        entry[f"{word}_recipients"] += max(0, count)
    entry["last_attempt"] = now
    if outcome == "sent" or counts.get("sent", 0) > 0:
        entry["last_success"] = now
        data["last_success"] = now
    else:
        entry.setdefault("last_success", None)
    if error:
        entry["last_error"] = " ".join(error.split())[:MAX_ERROR]
        entry["last_error_time"] = now
    relays[relay] = entry  # the most recent last: the oldest goes first
    while len(relays) > MAX_RELAYS:
        relays.pop(next(iter(relays)))


def failure(data: dict[str, Any], relay: str, error: str, now: float) -> None:
    """Note `relay`'s last error, counting nothing: a smarthost that failed before
    another took (or deferred) the message, which add() counts under that one."""
    relays = data["relays"]
    entry = relays.pop(relay, None) or {}
    for word in OUTCOMES:
        entry.setdefault(word, 0)
        entry.setdefault(f"{word}_recipients", 0)
    entry.setdefault("last_success", None)
    entry["last_attempt"] = entry["last_error_time"] = now
    entry["last_error"] = " ".join(error.split())[:MAX_ERROR] or "failed"
    relays[relay] = entry
    while len(relays) > MAX_RELAYS:
        relays.pop(next(iter(relays)))


def record(root: str, log: Log | None, relay: str, outcome: str,
           recipients: int | dict[str, int], error: str = "",
           now: float | None = None, failures: list[tuple[str, str]] | None = None) -> bool:
    """Count one attempt in the file, and note each of `failures` (relay, error) on the
    way; False (said once per process) if it could not be."""
    global _complained
    try:
        _update(root, relay, outcome, recipients, time.time() if now is None else now, error,
                failures or [])
        return True
    except Exception as exc:  # never a delivery's failure: counting is for monitoring
        if not _complained and log is not None:
            _complained = True
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(f"delivery statistics not updated in {root} ({why}); "
                        "deliveries go on uncounted")
        return False


def _update(root: str, relay: str, outcome: str, recipients: int | dict[str, int],
            now: float, error: str, failures: list[tuple[str, str]]) -> None:
    fd = os.open(path_of(root), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _lock(fd, fcntl.LOCK_EX)
        data = _loads(os.pread(fd, 1 << 20, 0))
        for other, why in failures:
            if other != relay:  # the one counted keeps add()'s error
                failure(data, other, why, now)
        add(data, relay, outcome, recipients, now, error)
        raw = json.dumps(data, separators=(",", ":")).encode()
        done = 0
        while done < len(raw):
            done += os.pwrite(fd, raw[done:], done)
        os.ftruncate(fd, len(raw))
    finally:
        os.close(fd)  # and so unlocked


def _lock(fd: int, kind: int) -> None:
    deadline = time.monotonic() + LOCK_PATIENCE
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise OSError(errno.EWOULDBLOCK, "its lock is held too long") from None
            time.sleep(0.002)
