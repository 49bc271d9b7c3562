"""Review of issue 12: a kill at every queue-file call of a run that makes a bounce, whose
bounce fails and becomes a postmaster copy: exactly one copy, nothing lost."""

from __future__ import annotations

import os
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.system.test_crash_injection import _strace_works, counts

from relayq.queue.spool import STALE_SECONDS

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"Subject: settle\n\nreview-settle-marker\n"
CALLS = ("rename", "fsync", "unlink", "ftruncate", "pwrite64", "openat")
pytestmark = pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")


@pytest.mark.timeout(400)  # ~50 s for the many-call kinds (a run per call), more when loaded
@pytest.mark.parametrize("syscall", CALLS)
def test_kill_at_every_call_of_the_double_bounce_path(
    syscall: str, tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "550 5.1.1 no such user",
                                         "alice@example.org": "550 5.1.1 no such sender"})
    (tmp_path / "clean").mkdir()
    base = Relayq(tmp_path / "clean", smarthost=sh.smarthost, postmaster="pm@example.org")
    assert base.sendmail("-f", "alice@example.org", "bob@example.org", input=MSG).returncode == 0
    total = counts([str(BIN / "sendmail"), "-q"], base.env, b"", tmp_path, (0, 75))[syscall]
    assert len(sh.transactions) == 1
    bad = []
    for n in range(1, total + 1):
        start = len(sh.transactions)
        (tmp_path / f"k{n}").mkdir()
        rq = Relayq(tmp_path / f"k{n}", smarthost=sh.smarthost, postmaster="pm@example.org")
        assert rq.sendmail("-f", "alice@example.org", "bob@example.org",
                           input=MSG).returncode == 0
        subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                        "-e", f"inject={syscall}:signal=KILL:when={n}", str(BIN / "sendmail"),
                        "-q"], env=rq.env, capture_output=True, check=False, timeout=60)
        past = time.time() - 2 * STALE_SECONDS
        for p in (rq.queue_dir / "queue").iterdir():
            os.utime(p, (past, past))
        for _ in range(3):
            rq.sendmail("-qf")
        copies = [t for t in sh.transactions[start:] if t.rcpt_tos == ["pm@example.org"]]
        left = rq.spool.ids()
        dead = list(rq.spool.dead_letters())
        window = len(copies) == 2 and "possible duplicate" in rq.log()  # the one window
        if (len(copies) != 1 and not window) or left or dead:
            bad.append((n, len(copies), left, len(dead)))
    assert bad == [], f"(kill at {syscall} n, postmaster copies, queued, dead): {bad}"
