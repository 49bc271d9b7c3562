"""Queue ids: when a message was submitted, laid out as sendmail 8.12+ lays them out.

14 characters: year%60, month, day, hour, minute, second and two characters of
the second's 3600ths, in sendmail's base-60 alphabet, then the process id in
six decimal digits (modulo 10**6), as sendmail does: log parsers written for
sendmail (logwatch's `sendmail` service) recognize them as queue ids. They
sort by submission time; the spool makes them unique on the host (see
relayq.queue.spool.Spool.create, which takes the next slot on a clash).
"""

from __future__ import annotations

import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"
SLOTS = 3600  # the parts of a second two base-60 characters hold (a slot: 1/3600 s)


def _b60(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 60)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def make_qid(now: float, pid: int) -> str:
    t = time.gmtime(now)
    head = "".join(
        ALPHABET[v] for v in (t.tm_year % 60, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
    )
    return head + _b60(int((now % 1) * SLOTS), 2) + f"{pid % 1_000_000:06d}"


def qid_time(qid: str, now: float) -> float:
    """When a queue id was made (UTC seconds): the inverse of make_qid, with the
    year taken as the latest one not after `now` that matches year % 60. Ids of
    relayq 0.x (four base-60 characters of microseconds, four of the pid) are
    still read: their tail is not six decimal digits."""
    import calendar

    new = len(qid) == 14 and qid[8:].isdigit()
    try:
        y, mo, d, h, mi, sec = (ALPHABET.index(c) for c in qid[:6])
        part = 0
        for c in qid[6:8] if new else qid[6:10]:
            part = part * 60 + ALPHABET.index(c)
    except ValueError:
        return 0.0
    this_year = time.gmtime(now).tm_year
    year = this_year - ((this_year - y) % 60)
    try:
        base = calendar.timegm((year, mo, d, h, mi, sec, 0, 0, 0))
        return base + part / (SLOTS if new else 1_000_000)
    except (ValueError, OverflowError):
        return 0.0
