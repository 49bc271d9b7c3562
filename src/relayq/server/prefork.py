"""More SMTP listener processes on the daemon's sockets, one per CPU.

The listener is Python from the first byte (aiosmtpd on asyncio): one
process tops out at one CPU, about 400 short sessions a second here, while
Postfix runs an smtpd process per client. So the daemon forks listeners
that accept on the same sockets (the kernel hands each connection to one of
them): each runs relayq.server.listener.Listener exactly as the daemon's own does,
and commits through the same enqueue(). Their messages reach the daemon's
delivery workers through the queue directory (the inotify wake-up), not
through a call.

The forks happen once, before the daemon starts any thread (a fork of a
threaded process can inherit a lock another thread held). A listener that
dies is not replaced: the others, and the daemon's own, keep serving.

Each process counts its connections in its own slot of a shared anonymous
mapping, so smtp_max_connections holds for them all. A child follows its
parent: it stops when the pipe from the daemon reaches end of file (the
daemon stopped, or died), on SIGTERM, and reloads its configuration on SIGHUP.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from relayq.core.config import Config
    from relayq.server.listener import Listener
    from relayq.system.log import Log

MAX_PROCESSES = 4


def wanted(cfg: Config) -> int:
    """How many listener processes in all (the daemon's own included)."""
    if cfg.smtp_processes > 0:
        return cfg.smtp_processes
    return max(1, min(os.cpu_count() or 1, MAX_PROCESSES))


class Listeners:
    """The daemon's end: the forked listeners and the pipes that keep them alive."""

    def __init__(self, listener: Listener, log: Log) -> None:
        self.listener = listener
        self.log = log
        self.children: dict[int, int] = {}  # pid -> write end of its life pipe
        self._slots: dict[int, int] = {}  # pid -> its slot in the shared counts
        self._mem: mmap.mmap | None = None

    def fork(self, count: int, loader: Callable[[], Config] | None,
             close_in_child: list[int]) -> None:
        """Fork `count` more listeners; call before any thread exists."""
        if count <= 0:
            return
        self._mem = mmap.mmap(-1, 8 * (count + 1))  # MAP_SHARED | MAP_ANONYMOUS
        counts = memoryview(self._mem).cast("q")
        counts[0] = self.listener.state.counts[0]
        self.listener.state.counts = counts
        for slot in range(1, count + 1):
            r, w = os.pipe()
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(r)
                os.close(w)
                self.log.warning(f"cannot fork a listener process ({exc.strerror})")
                return
            if pid == 0:  # pragma: no cover - the child (tested end to end)
                os.close(w)
                for fd in [*close_in_child, *self.children.values()]:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                _child(self.listener, slot, r, loader)
            os.close(r)
            self.children[pid] = w
            self._slots[pid] = slot

    def check(self) -> None:
        """Reap a listener that died (it is not replaced) and free its slot."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self._gone(pid)
                self.log.error(f"listener process {pid} exited "
                               f"(status {os.waitstatus_to_exitcode(status)}); "
                               "the others keep serving")

    def _gone(self, pid: int) -> None:
        os.close(self.children.pop(pid))
        slot = self._slots.pop(pid)
        self.listener.state.counts[slot] = 0

    def reload(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError:
                pass

    def stop(self, timeout: float) -> None:
        """Close the life pipes: each child stops accepting, finishes its commits, exits."""
        for w in self.children.values():
            os.close(w)
        deadline = time.monotonic() + timeout
        waiting = dict.fromkeys(self.children, True)
        self.children = {}
        while waiting and time.monotonic() < deadline:
            for pid in list(waiting):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        del waiting[pid]
                except ChildProcessError:
                    del waiting[pid]
            if waiting:
                time.sleep(0.02)
        for pid in waiting:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass


def _child(listener: Listener, slot: int, life: int,
           loader: Callable[[], Config] | None) -> None:  # pragma: no cover - child
    """A listener process: serve until the daemon goes away or says stop."""
    from relayq.core.errors import RelayqError
    from relayq.queue.submit import Context

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    flags: set[int] = set()

    def note(signum: int, frame: object) -> None:
        flags.add(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, note)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    state = listener.state
    state.slot = slot
    state.counts[slot] = 0
    state.on_commit = None  # the daemon learns of new mail from the queue directory
    code = 0
    try:
        listener.start()
        while signal.SIGTERM not in flags:
            readable = select.select([life, wake_r], [], [])[0]
            if life in readable:
                break  # the daemon stopped or died
            if wake_r in readable:
                os.read(wake_r, 512)
            if signal.SIGHUP in flags and loader is not None:
                flags.discard(signal.SIGHUP)
                try:
                    cfg = loader()
                    listener.reload(cfg, Context(cfg), state.log)
                except RelayqError as exc:
                    state.log.error(f"listener {os.getpid()}: reload refused: {exc.message}")
        listener.stop()
    except BaseException as exc:
        try:
            state.log.error(f"listener process failed: {type(exc).__name__}: {exc}")
        except BaseException:
            pass
        code = 1
    state.counts[slot] = 0
    os._exit(code)
