"""An flock waited on for a bounded time: the queue's claim and the token file's lock.

flock(2) has no timeout: a holder that hangs (a stuck token request, a process
stopped in a debugger) would hang every waiter. So a waiter polls LOCK_NB until
its deadline, at a step its caller chooses (the claim polls every half
millisecond: the writer holds it about that long).
"""

from __future__ import annotations

import fcntl
import time


def flock_within(fd: int, wait: float, step: float) -> bool:
    """Take the exclusive flock on `fd` within `wait` seconds; False if it is still held."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(step)
