"""The queue counted by state, for `relayq status`, `relayq metrics` and the monitoring plugin.

One snapshot, made the same way for all three (and by the daemon for users who
may not read the queue): one listing of queue/, then each envelope read once
with no lock and no parse. The few facts wanted are found with bytes.find() on
the record (relayq.core.envelope: one field per line, no value holds a LF):
`held 1` (held), `attempts N` or an `error` (deferred, as mailq's
`--json-lines` names them; otherwise queued), `size N`. A message's age
comes from its queue id (ids sort by time), never from a stat. Measured on
this project's test machine: 5,000 queued messages in about 40 ms
(`tests/integration/test_metrics.py` prints the time), 100,000 in 0.7 s.

States: queued (never tried), deferred (tried, waiting to be tried again),
held (relayq hold), quarantined (damaged files and dead letters moved to
quarantine/), maildrop (users' mail not yet queued).
"""

from __future__ import annotations

import os
import time

from relayq.core.metrics import AGE_BUCKETS, SIZE_BUCKETS, histogram
from relayq.queue.names import qid_time

TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from relayq.core.config import Config
    from relayq.queue.spool import Spool

STATES = ("queued", "deferred", "held")  # of a message in queue/


class Message:
    """What the census keeps of one queued message."""

    __slots__ = ("account", "age", "qid", "size", "state")

    def __init__(self, qid: str, state: str, size: int, age: float, account: str = "") -> None:
        self.qid = qid
        self.state = state
        self.size = size
        self.age = age
        self.account = account  # the account it was queued for ("": the default)


def account_of(raw: bytes) -> str:
    """The `account` field of an envelope record's bytes ("": none, the default's)."""
    at = raw.find(b"\naccount\t")
    if at < 0:
        return ""
    end = raw.find(b"\n", at + 9)
    return raw[at + 9:end if end >= 0 else None].partition(b"\t")[0].decode(
        "utf-8", "replace")


def state_of(raw: bytes) -> tuple[str, int]:
    """(state, size) from an envelope record's bytes; a damaged one counts as queued."""
    if b"\nheld\t1\n" in raw:
        state = "held"
    elif (b"\nattempts\t" in raw and b"\nattempts\t0\n" not in raw) or \
            (b"\nerror\t" in raw and b"\nerror\t\n" not in raw):
        state = "deferred"
    else:
        state = "queued"
    size = 0
    at = raw.find(b"\nsize\t")
    if at >= 0:
        end = raw.find(b"\n", at + 6)
        value = raw[at + 6:end if end >= 0 else None]
        size = int(value) if value.isdigit() else 0
    return state, size


def messages(spool: Spool, now: float, read: bool = True) -> list[Message]:
    """Every message in queue/ with its state, size and age in whole seconds
    (PermissionError if this user may not list the queue; a message gone
    meanwhile is left out). About 7 µs a message: the read is most of it.
    Without `read`, the listing alone (the states and sizes unknown)."""
    try:
        names = os.listdir(spool.queue)
    except FileNotFoundError:
        return []
    queue = spool.queue + "/"
    seconds: dict[str, float] = {}  # a queue id's first six characters: its second
    flags = os.O_RDONLY | os.O_CLOEXEC
    out = []
    for name in names:
        if not name.endswith(".e"):
            continue
        if not read:
            out.append(Message(name[:-2], "", 0, 0.0))
            continue
        try:
            fd = os.open(queue + name, flags)
        except FileNotFoundError:
            continue  # delivered since the listing
        except OSError:
            raw = b""
        else:
            try:
                raw = os.read(fd, 65536)
            except OSError:
                raw = b""
            finally:
                os.close(fd)
        state, size = state_of(raw)
        head = name[:6]
        made = seconds.get(head)
        if made is None:
            made = seconds[head] = qid_time(head + "00000000", now)
        out.append(Message(name[:-2], state, size, max(0.0, now - made), account_of(raw)))
    return out


def snapshot(spool: Spool, now: float | None = None, detail: bool = True) -> dict[str, Any]:
    """The queue's counts by state, the oldest message and the statistics store's
    contents (relayq.queue.stats), as plain data (JSON for the daemon's answer).

    Without `detail` (the monitoring plugin, which needs the count and the oldest:
    one directory listing, as fast at 100,000 messages as at 10), the states of
    queue/ and the histograms are left out."""
    from relayq.queue import stats
    from relayq.queue.maildrop import waiting

    now = time.time() if now is None else now
    found = messages(spool, now, read=detail)
    counts: dict[str, int | None] = dict.fromkeys(STATES, 0 if detail else None)
    for m in found:
        if detail:
            counts[m.state] = (counts[m.state] or 0) + 1
    try:
        quarantined = len({n.split(".", 1)[0] for n in os.listdir(spool.quarantine_dir)})
    except OSError:
        quarantined = 0
    first = min(found, key=lambda m: m.qid, default=None)  # queue ids sort by time
    oldest = None if first is None else max(0.0, now - qid_time(first.qid, now))
    try:
        recorded = stats.read(spool.root)
    except OSError:
        recorded = stats.empty()
    return {
        "time": now,
        "messages": len(found),
        "states": counts | {"quarantined": quarantined, "maildrop": waiting(spool.maildrop)},
        "dead_letters": sum(1 for _ in spool.dead_letters()),
        "oldest_age_seconds": None if oldest is None else round(oldest),
        "oldest": None if oldest is None else
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - oldest)),
        "size_histograms": {s: histogram([m.size for m in found if m.state == s],
                                         SIZE_BUCKETS) for s in STATES},
        "age_histograms": {s: histogram([m.age for m in found if m.state == s],
                                        AGE_BUCKETS) for s in STATES},
        "oldest_qid": None if first is None else first.qid,
        "stats": recorded,
        "accounts": _by_account(found) if detail else {},
    }


def _by_account(found: list[Message]) -> dict[str, int]:
    """Messages queued (any state) per account they were queued for."""
    from relayq.core.accounts import DEFAULT

    counts: dict[str, int] = {}
    for m in found:
        name = m.account or DEFAULT
        counts[name] = counts.get(name, 0) + 1
    return counts


def report(cfg: Config, spool: Spool, now: float | None = None,
           detail: bool = True) -> dict[str, Any]:
    """`relayq status --json`'s members that the queue decides (the caller adds the
    daemon's): the snapshot's counts, the relays' last errors, a relay loop."""
    from relayq.system import tokenstore

    snap = snapshot(spool, now, detail)
    states = snap["states"]
    loop = cfg.loop_reason() or (_recorded_loop(spool, snap["oldest_qid"])
                                 if snap["oldest_qid"] else "")
    relays = {}
    for relay, entry in snap["stats"]["relays"].items():
        relays[relay] = {key: entry.get(key) for key in (
            "last_success", "last_error", "last_error_time", "sent", "deferred", "bounced",
            "expired")}
    return {
        "queue": spool.queue,
        "messages": snap["messages"],
        "oldest": snap["oldest"],
        "oldest_age_seconds": snap["oldest_age_seconds"],
        "maildrop_waiting": states["maildrop"],
        "quarantined": states["quarantined"],
        "dead_letters": snap["dead_letters"],
        "delivery_mode": cfg.effective()["delivery_mode"],
        "smarthost": cfg.smarthost,
        "warning": f"mail loops back to me ({loop})" if loop else None,
        "states": states,
        "last_delivery": snap["stats"].get("last_success"),
        "relays": relays,
        "accounts": _accounts(cfg, snap["accounts"]) if detail else None,
        "reauth": tokenstore.dead_grants(cfg),  # OAuth2 accounts whose mail is held
    }


def _accounts(cfg: Config, queued: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Each account (core/accounts): its smarthosts and how many messages are queued
    for it; an account no longer configured that still has mail is listed too
    (configured false: its mail waits for `relayq requeue --reroute`)."""
    accounts = cfg.accounts()
    out = {name: {"queued": queued.get(name, 0), "smarthost": acc.smarthost,
                  "configured": True} for name, acc in accounts.items()}
    for name, n in sorted(queued.items()):
        if name not in accounts:
            out[name] = {"queued": n, "smarthost": [], "configured": False}
    return out


def _recorded_loop(spool: Spool, qid: str) -> str:
    """The loop the transport recorded (4.4.6) for the oldest message: one envelope
    read, whatever the queue's size. Once a loop is seen every message defers with it."""
    from relayq.core import policy
    from relayq.core.errors import RelayqError

    try:
        error = spool.read_envelope(qid).error
    except (OSError, RelayqError):
        return ""
    _, found, detail = error.partition(f"{policy.LOOP_REASON} (")
    return detail[:-1] if found and detail.endswith(")") else ""
