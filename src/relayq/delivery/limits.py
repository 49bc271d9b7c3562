"""What a provider enforces, kept by every process that delivers for an account.

Exchange Online takes 30 messages a minute and 10,000 recipients a day from one
mailbox; Gmail answers "454 4.7.0 Too many login attempts" to a burst of logins.
A host past such a limit gets its mail refused, or its account blocked, so
relayq keeps under it itself, in state shared by the daemon's workers,
sendmail's background children and `sendmail -q` alike:

- <queue_dir>/limits/<account>.state: the messages sent in the last minute
  (one time each) and the recipients in the last 24 hours (a count per minute,
  so at most 1440 lines): bounded whatever the traffic. It is replaced whole
  (a temporary file, fsync, rename) under an flock of <account>.lock, so a
  reader never sees half of it; a damaged line is ignored, and a time in the
  future (the clock went back) counts as now, so nothing waits for years.
- <account>.conn<N>, N < max_connections: a connection to the smarthost is
  open while its process holds an flock on one of them (the kernel drops the
  lock when the process dies: no slot is ever leaked).

What counts is what the relay accepted: a transaction's message and recipients
are reserved before MAIL FROM (durable before the relay hears anything, so a
crash after its 250 never loses the count) and what it did not accept is
given back after its reply (Limits.settle).
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.system.textfile import NotRegular, open_regular, replace

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config

MINUTE = 60.0
DAY = 86400.0
WAIT = 60.0  # a queue run waits this long at most for a limit to free; longer defers
SLOT_WAIT = 15.0  # a queue run waits this long at most for a free connection slot
SLOT_RETRY = 60.0  # a message no slot was free for is tried again this much later
MAGIC = "relayq-limits 1"


@dataclass
class Grant:
    """What a transaction may send now: `count` recipients (0: nothing). When not all
    fit, `which` limit stopped the rest and `free_at` is when they may go."""

    count: int
    at: float = 0.0  # the reservation's time (Limits.settle finds it by it)
    free_at: float = 0.0
    which: str = ""
    limit: int = 0


class State:
    """The counts of one account: message times, recipients per minute bucket."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.buckets: dict[int, int] = {}
        self.clamped = False  # a time was ahead of the clock: written back as now

    @classmethod
    def parse(cls, text: str, now: float) -> State:
        """The state file's text; a bad line is skipped, a time ahead of `now` is now."""
        st = cls()
        lines = text.splitlines()
        if not lines or lines[0] != MAGIC:
            return st
        for line in lines[1:]:
            kind, _, rest = line.partition(" ")
            try:
                if kind == "m":
                    t = float(rest)
                    st.clamped = st.clamped or t > now
                    st.sent.append(min(t, now))
                elif kind == "r":
                    minute, count = (int(x) for x in rest.split(" "))
                    st.clamped = st.clamped or minute > now // MINUTE
                    minute = min(minute, int(now // MINUTE))
                    if count > 0:
                        st.buckets[minute] = st.buckets.get(minute, 0) + count
            except ValueError:
                continue
        st.prune(now)
        return st

    def prune(self, now: float) -> None:
        self.sent = sorted(t for t in self.sent if t > now - MINUTE)
        self.buckets = {m: c for m, c in self.buckets.items()
                        if (m + 1) * MINUTE + DAY > now and c > 0}

    def text(self) -> str:
        lines = [MAGIC] + [f"m {t!r}" for t in self.sent]
        lines += [f"r {m} {c}" for m, c in sorted(self.buckets.items())]
        return "\n".join(lines) + "\n"

    def day_free_at(self, need: int, limit: int, now: float) -> float:
        """When `need` more recipients fit under `limit` as the oldest buckets age out
        (at the latest when what is sent now has: a day from now)."""
        used = sum(self.buckets.values())
        for m in sorted(self.buckets):
            used -= self.buckets[m]
            if used + need <= limit:
                return (m + 1) * MINUTE + DAY
        return (int(now // MINUTE) + 1) * MINUTE + DAY


class Limits:
    """messages_per_minute and recipients_per_day of one account (its Config)."""

    def __init__(self, cfg: Config, log: Callable[[str], None] | None = None) -> None:
        self.log = log
        self.told = False  # the one log line about an unusable state was written
        self.per_minute = max(0, cfg.messages_per_minute)
        self.per_day = max(0, cfg.recipients_per_day)
        self.account = cfg.account
        self.dir = os.path.join(cfg.queue_dir, "limits")
        self.path = os.path.join(self.dir, f"{cfg.account}.state")

    @property
    def active(self) -> bool:
        return bool(self.per_minute or self.per_day)

    def check(self, n: int, now: float | None = None) -> Grant:
        """Could a transaction for `n` recipients start now? Nothing is recorded."""
        return self._admit(n, time.time() if now is None else now, record=False)

    def reserve(self, n: int, now: float | None = None) -> Grant:
        """Count a transaction for up to `n` recipients before it starts; the Grant
        says how many may go (see settle)."""
        return self._admit(n, time.time() if now is None else now, record=True)

    def settle(self, grant: Grant, taken: int, now: float | None = None) -> None:
        """After the transaction: give back what the relay did not take (the message
        too when it took none)."""
        if not self.active or grant.count <= 0 or taken >= grant.count:
            return
        try:
            with self._locked(now) as st:
                if st is None:
                    return
                if taken <= 0 and grant.at in st.sent:
                    st.sent.remove(grant.at)
                minute = int(grant.at // MINUTE)
                if minute in st.buckets:
                    st.buckets[minute] = max(0, st.buckets[minute] - (grant.count - taken))
                self._write(st)
        except Exception:  # it runs after a relay's answer: a count given
            pass  # back too few is safe (over-counting), a raise here would resend mail

    def _admit(self, n: int, now: float, record: bool) -> Grant:
        if not self.active or n <= 0:
            return Grant(n, now)
        with self._locked(now) as st:
            if st is None:  # no state to keep (see _locked): sending beats stopping
                return Grant(n, now)
            if st.clamped:  # kept as now, so the limit frees a minute (a day) from now
                self._write(st)
            if self.per_minute and len(st.sent) >= self.per_minute:
                free = st.sent[len(st.sent) - self.per_minute] + MINUTE
                return Grant(0, now, free, "messages_per_minute", self.per_minute)
            grant = Grant(n, now)
            if self.per_day:
                room = self.per_day - sum(st.buckets.values())
                grant.count = max(0, min(n, room))
                if grant.count < n:
                    need = min(n - grant.count, self.per_day)
                    grant.free_at = st.day_free_at(need, self.per_day - grant.count, now)
                    grant.which, grant.limit = "recipients_per_day", self.per_day
            if record and grant.count:
                if self.per_minute:
                    st.sent.append(now)
                if self.per_day:
                    minute = int(now // MINUTE)
                    st.buckets[minute] = st.buckets.get(minute, 0) + grant.count
                self._write(st)
            return grant

    def ignored(self, why: str) -> None:
        """The limits cannot be kept (see _Locked): said once per process, mail goes."""
        if not self.told and self.log is not None:
            self.told = True
            self.log(f"sending limits of account {self.account} not kept: {why} "
                     "(remove it); mail goes without them")

    def _locked(self, now: float | None = None) -> _Locked:
        return _Locked(self, time.time() if now is None else now)

    def _write(self, st: State) -> None:
        # durable: the count outlives a crash after the relay's 250; a full disk loses
        # this count rather than stops the mail (as an unusable directory does, _Locked)
        try:
            replace(self.path, st.text().encode(), 0o600, durable=True)
        except OSError:
            pass


class _Locked:
    """`with`: the account's State under its flock (None when the limits directory
    cannot be used: the caller sends, as without limits, rather than stop all mail)."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.now = now
        self.fd = -1

    def __enter__(self) -> State | None:
        lim = self.limits
        lock = os.path.join(lim.dir, f"{lim.account}.lock")
        try:
            os.makedirs(lim.dir, mode=0o700, exist_ok=True)
            self.fd = open_regular(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            lim.ignored(f"{lock}: {exc.strerror or exc}")
            return None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            fd = open_regular(lim.path)
        except FileNotFoundError:
            return State.parse("", self.now)
        except NotRegular:
            lim.ignored(f"{lim.path} is not a regular file")
            return None
        except OSError:
            return None
        with open(fd, encoding="utf-8", errors="replace") as f:
            try:
                text = f.read(1 << 20)
            except OSError:
                text = ""
        return State.parse(text, self.now)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the flock goes with it


def refusal(grant: Grant, account: str, now: float) -> str:
    """The reply recorded for the recipients a limit keeps back (a deferral relayq
    writes itself: policy.waits_on_us keeps such mail from expiring)."""
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(grant.free_at))
    wait = max(1, int(grant.free_at - now + 0.999))
    span = f"{wait} s" if wait < 120 else f"{wait // 60} min" if wait < 3600 else \
        f"{wait // 3600} h {wait % 3600 // 60} min"
    what = "messages a minute" if grant.which == "messages_per_minute" else \
        "recipients in 24 hours"
    return (f"4.7.0 {policy.LIMIT_REASON}: {grant.which} = {grant.limit} ({what}) of "
            f"account {account}; it frees at {at} (in {span})")


# --- connections ------------------------------------------------------------------

class Slot:
    """One of an account's max_connections, held while its connection is open."""

    def __init__(self, fd: int = -1) -> None:
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def take_slot(cfg: Config, wait: float) -> Slot | None:
    """A free connection slot of cfg's account, waiting up to `wait` seconds for
    one; None if none came free. max_connections 0: no bound (a Slot holding
    nothing); a limits directory that cannot be used does not stop mail either."""
    n = cfg.max_connections
    if n <= 0:
        return Slot()
    folder = os.path.join(cfg.queue_dir, "limits")
    deadline = time.monotonic() + wait
    while True:
        for i in range(n):
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                fd = open_regular(os.path.join(folder, f"{cfg.account}.conn{i}"),
                                  os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                return Slot()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return Slot(fd)
            except OSError:
                os.close(fd)
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())) or 0.01)


def no_slot(cfg: Config) -> str:
    """The reply for a message left for later because every slot was taken."""
    return (f"4.7.0 {policy.LIMIT_REASON}: max_connections = {cfg.max_connections} "
            f"(connections at once to account {cfg.account}'s smarthost) are all in use by "
            f"other deliveries; left for later (in {int(SLOT_RETRY)} s)")


def workers(cfg: Config, wanted: int) -> int:
    """A queue run's worker processes: each opens its own connection, so no more
    than the accounts' max_connections together when every account has one (more
    workers could only wait for a slot); an unbounded account leaves `wanted`."""
    bounds = [acc.max_connections for acc in cfg.accounts().values()]
    if bounds and all(n > 0 for n in bounds):
        return max(1, min(wanted, sum(bounds)))
    return wanted
