"""Knowing when a `relayq daemon` has finished its start-up queue run.

"starting daemon" is logged before that run; a message committed in between (through
the listener, say) is delivered by it, so a test that wants its message to stay queued
(deferred mode) must wait for the run. The daemon opens its local socket right after
it, replacing any socket a killed daemon left behind: a new file at that path is the sign.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path


def socket_stamp(path: Path) -> tuple[int, int] | None:
    """The socket file's identity (inode, ctime), None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def wait_startup_run(sock: Path, before: tuple[int, int] | None,
                     proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until the daemon `proc` has opened a socket at `sock` other than `before`
    (the stamp taken before it was started)."""
    deadline = time.monotonic() + timeout
    while socket_stamp(sock) in (None, before):
        assert proc.poll() is None, f"the daemon exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"no start-up run within {timeout} s"
        time.sleep(0.02)
