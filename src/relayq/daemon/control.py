"""The daemon's answers on the local socket (the wire and the client: relayq.system.control).

Only a queue users hand mail to (one with maildrop/) has the socket. The
kernel says who asks (uid, gid); a request is one of:

- `take NAME`: copy that user's maildrop/ file into the queue now
  (relayq.queue.maildrop), and deliver it unless its mode says queue;
- `mailq ARGS`: the queue listing a user may see (relayq.queue.listing): one
  listing per user at a time and two in all, since each reads the whole queue;
- `flush`: a whole queue run, at most one started every FLUSH_GAP seconds;
- `status`: `relayq status --json`'s report (relayq.queue.census), the relays'
  error lines only for root and the admin group (one may name a recipient);
  counted with the listings, since it reads every envelope too.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.core.errors import RelayqError

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.daemon.host import Host
    from relayq.system import control

FLUSH_GAP = 5.0  # users' flush requests start at most one forced run this often
MAX_LISTINGS = 2  # queue listings made at once (one per user)


class Requests:
    """The local socket's server and the daemon's answers to it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.server: control.Server | None = None
        self._lock = threading.Lock()
        self._listing: set[int] = set()  # uids whose queue listing is being made
        self._last_flush = 0.0

    def start(self) -> None:
        """Open the socket, for a queue users hand mail to (one with maildrop/)."""
        from relayq.system import control

        spool, log = self.host.spool, self.host.log
        if not os.path.isdir(spool.maildrop):
            return
        try:
            self.server = control.Server(spool.socket_path, self.answer, log.warning)
        except OSError as exc:
            log.warning(f"no local socket {spool.socket_path} ({exc.strerror}): "
                        "users' mail waits in maildrop/ for the next look")
            return
        self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def join(self, deadline: float) -> None:
        """After close(): the socket's threads, waited for until `deadline`."""
        if self.server is not None:
            self.server.join(deadline)

    def answer(self, uid: int, gid: int, request: str) -> control.Reply:
        """One request from uid/gid (the kernel's word)."""
        from relayq.system.control import Reply

        verb, _, arg = request.partition(" ")
        try:
            if verb == "take":
                return self._take(uid, arg)
            if verb == "mailq":
                return self._mailq(uid, gid, arg)
            if verb == "flush":
                return self._flush(uid)
            if verb == "status":
                return self._status(uid, gid)
        except RelayqError as exc:
            return Reply(exc.code, exc.message)
        except OSError as exc:  # our trouble, not the request's: the client keeps its file
            return Reply(75, f"cannot do it now: {exc.strerror or exc}")
        return Reply(64, f"unknown request {verb[:20]!r}")

    def _take(self, uid: int, name: str) -> control.Reply:
        from relayq.delivery.intake import Taker
        from relayq.system.control import Reply

        host = self.host
        qid, mode = Taker(host.cfg, host.spool, host.log, host.ctx,
                          host.drop_notices).take(name, uid)
        if policy.after_commit(mode) != policy.LEAVE:
            host.committed(qid)
        return Reply(0, qid)

    def _reading(self, uid: int, read: Callable[[], control.Reply]) -> control.Reply:
        """`read` (a listing, a status report: each reads the whole queue) unless this
        user already has one being made, or MAX_LISTINGS are."""
        from relayq.system.control import Reply

        with self._lock:
            busy = uid in self._listing or len(self._listing) >= MAX_LISTINGS
            if not busy:
                self._listing.add(uid)
        if busy:
            return Reply(75, "busy reading the queue; try again")
        try:
            return read()
        finally:
            with self._lock:
                self._listing.discard(uid)

    def _mailq(self, uid: int, gid: int, args: str) -> control.Reply:
        from relayq.queue.listing import listing_for
        from relayq.system.control import Reply

        return self._reading(uid, lambda: Reply(0, "listing", listing_for(
            self.host.cfg, self.host.spool, uid, gid, args)))

    def _status(self, uid: int, gid: int) -> control.Reply:
        return self._reading(uid, lambda: self._report(uid, gid))

    def _report(self, uid: int, gid: int) -> control.Reply:
        import json

        from relayq.queue import census
        from relayq.queue.listing import sees_all
        from relayq.system.control import Reply

        host = self.host
        info = census.report(host.cfg, host.spool)
        if not sees_all(host.cfg, uid, gid):
            for entry in info["relays"].values():
                entry["last_error"] = None
        info["daemon_pid"], info["daemon_running"] = os.getpid(), True
        return Reply(0, "status", iter([json.dumps(info).encode()]))

    def _flush(self, uid: int) -> control.Reply:
        from relayq.system.control import Reply

        now = time.monotonic()
        if now - self._last_flush >= FLUSH_GAP:
            self._last_flush = now
            self.host.log.info(f"queue run requested by uid {uid}")
            self.host.wake.raise_flag("usr1")
        return Reply(0, "queue run started")
