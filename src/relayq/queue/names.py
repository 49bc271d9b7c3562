"""Queue ids: when a message was submitted, written in sendmail's base-60 alphabet.

14 characters: year%60, month, day, hour, minute, second, four characters of
microseconds and four of the process id. They sort by submission time; the
spool makes them unique on the host (see relayq.queue.spool.Spool.create).
"""

from __future__ import annotations

import time

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwx"


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
    return head + _b60(int((now % 1) * 1_000_000), 4) + _b60(pid, 4)


def qid_time(qid: str, now: float) -> float:
    """When a queue id was made (UTC seconds): the inverse of make_qid, with the
    year taken as the latest one not after `now` that matches year % 60."""
    import calendar

    try:
        y, mo, d, h, mi, sec = (ALPHABET.index(c) for c in qid[:6])
        micro = 0
        for c in qid[6:10]:
            micro = micro * 60 + ALPHABET.index(c)
    except ValueError:
        return 0.0
    this_year = time.gmtime(now).tm_year
    year = this_year - ((this_year - y) % 60)
    try:
        return calendar.timegm((year, mo, d, h, mi, sec, 0, 0, 0)) + micro / 1_000_000
    except (ValueError, OverflowError):
        return 0.0
