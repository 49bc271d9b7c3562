"""How the daemon hears of new mail: the queue directory and users' maildrop/.

- inotify(7) on the queue directory, in a thread: a commit's final step is
  the rename of QID.t to QID.e, one IN_MOVED_TO event, and the message is
  dispatched the moment it appears;
- the scheduler's backstop (scan()): an mtime look every POLL and a full
  listing at least every RESCAN (no inotify, a full event queue, coarse
  timestamps);
- users' maildrop/ files are copied into the queue (relayq.queue.maildrop) in
  a thread of its own when the directory's mtime moves or a queue run asks:
  a user planting many files delays neither the scheduler nor anybody else.

Both threads are joined on stop(), with a bounded wait.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import TYPE_CHECKING

from relayq.core import policy
from relayq.core.errors import RelayqError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.daemon.host import Host

RESCAN = 5.0  # a full listing at least this often (mtime granularity backstop)


class Watcher:
    """The queue ids the daemon knows of, and the threads that find new ones."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._known: set[str] = set()
        self._dir_mtime = -1
        self._last_scan = 0.0
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._inotify: Inotify | None = None
        self._drop_mtime = -1
        self._last_drop_look = 0.0
        self._drop_wanted: threading.Event | None = None
        self._drop_run: bool | None = None  # a queue run asked (its force flag)

    def listed(self, known: set[str]) -> None:
        """A queue run listed these: what the wake-ups compare against."""
        with self._lock:
            self._known = known
            self._last_scan = time.monotonic()

    def forget(self) -> None:
        """After a reload (the queue may have moved): the next scan lists it all."""
        with self._lock:
            self._known = set()
            self._dir_mtime = -1

    # -- the queue directory ---------------------------------------------------------

    def scan(self) -> None:
        """Wake-up backstop: dispatch messages that appeared since the last look."""
        spool = self.host.spool
        now = time.monotonic()
        try:
            mtime = os.stat(spool.queue).st_mtime_ns
        except OSError:
            return
        if mtime == self._dir_mtime and now - self._last_scan < RESCAN:
            return
        self._dir_mtime = mtime
        self._last_scan = now
        try:
            ids = spool.ids()
        except RelayqError:
            return
        with self._lock:
            new = [q for q in ids if q not in self._known]
            self._known = set(ids)
        for qid in new:
            self.host.dispatch(qid, False)

    def watch_queue(self) -> None:
        """Start the inotify thread (unless deferred mode, or no inotify: then polling)."""
        host = self.host
        if not host.wakeups:
            return
        try:
            host.spool.ensure()
            self._inotify = Inotify(host.spool.queue)
        except (OSError, RelayqError) as exc:
            host.log.info(f"no inotify ({exc}); new mail is found by polling")
            return
        self._start(self._inotify_loop, "relayq-inotify")

    def _inotify_loop(self) -> None:
        assert self._inotify is not None
        for name in self._inotify.names():
            if not name.endswith(".e") or not self.host.wakeups:
                continue
            qid = name[:-2]
            with self._lock:
                new = qid not in self._known
                self._known.add(qid)
            if new:  # a rewrite of a known message's envelope is not news
                self.host.dispatch(qid, False)

    # -- users' mail (maildrop/) -----------------------------------------------------

    def take_drops(self, run: bool | None = None) -> None:
        """Have maildrop/ taken when its mtime moved (or for a queue run: `run` is its
        force flag, and what is taken joins that run)."""
        try:
            mtime = os.stat(self.host.spool.maildrop).st_mtime_ns
        except OSError:
            return
        now = time.monotonic()
        if run is None and mtime == self._drop_mtime and now - self._last_drop_look < RESCAN:
            return  # (a full look now and then: coarse timestamps can hide a change)
        self._drop_mtime = mtime
        self._last_drop_look = now
        with self._lock:
            if self._stopping:
                return
            if run is not None:
                self._drop_run = bool(self._drop_run) or run
            if self._drop_wanted is None:
                self._drop_wanted = threading.Event()
                self._start(self._drop_loop, "relayq-maildrop")
        self._drop_wanted.set()

    def _drop_loop(self) -> None:
        wanted = self._drop_wanted
        assert wanted is not None
        while True:
            wanted.wait()
            wanted.clear()
            if self._stopping:
                return
            with self._lock:
                run, self._drop_run = self._drop_run, None
            self._take_all(run)

    def _take_all(self, run: bool | None) -> None:
        from relayq.delivery.intake import Taker

        host = self.host
        try:
            taken = Taker(host.cfg, host.spool, host.log, host.ctx,
                          host.drop_notices).take_all()
        except OSError as exc:
            host.log.error(f"maildrop: {exc}")
            return
        for qid, mode in taken:
            if run is not None:  # taken for a queue run: sent by it, as it sends the rest
                host.dispatch(qid, run)
            elif policy.after_commit(mode) != policy.LEAVE:
                host.committed(qid)

    # -- threads ---------------------------------------------------------------------

    def _start(self, target: object, name: str) -> None:
        assert callable(target)
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Tell both threads to finish (they look no further); join() waits for them."""
        with self._lock:
            self._stopping = True
        if self._inotify is not None:
            self._inotify.interrupt()
        if self._drop_wanted is not None:
            self._drop_wanted.set()

    def join(self, deadline: float) -> list[str]:
        """Wait for the threads until `deadline` (monotonic); the names still running."""
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._inotify is not None and not any(t.name == "relayq-inotify" and t.is_alive()
                                                 for t in self._threads):
            self._inotify.close()
        return [t.name for t in self._threads if t.is_alive()]


class Inotify:
    """The names renamed into one directory (IN_MOVED_TO), read from inotify(7);
    interrupt() ends names() from another thread (a pipe beside the watch)."""

    IN_MOVED_TO = 0x80
    IN_CLOEXEC = 0o2000000

    def __init__(self, path: str) -> None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(self.IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(fd, os.fsencode(path), self.IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {path} failed")
        self.fd = fd
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)

    def interrupt(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self.fd, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self._stop_r = self._stop_w = -1

    def names(self) -> Iterator[str]:
        import struct

        poll = select.poll()
        poll.register(self.fd, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        while True:
            try:
                ready = [fd for fd, _ in poll.poll()]
                if self._stop_r in ready:
                    return
                buf = os.read(self.fd, 1 << 16)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            pos = 0
            while pos + 16 <= len(buf):
                _, _, _, size = struct.unpack_from("iIII", buf, pos)
                name = buf[pos + 16 : pos + 16 + size].split(b"\0", 1)[0]
                pos += 16 + size
                yield os.fsdecode(name)
