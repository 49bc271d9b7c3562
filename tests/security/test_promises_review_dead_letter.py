"""Review of issue 12: a kill while a dead letter is buried (Spool.bury -> quarantine)."""

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

MSG = b"Subject: dead\n\nreview-dead-letter-marker\n"

pytestmark = pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")


def test_kill_between_the_two_renames_of_bury_loses_the_dead_letter(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(replies={"rcpt": "550 5.7.1 nobody here"})
    (tmp_path / "clean").mkdir()
    base = Relayq(tmp_path / "clean", smarthost=sh.smarthost, postmaster="postmaster@example.org")
    assert base.sendmail("-f", "alice@example.org", "bob@example.org", input=MSG).returncode == 0
    total = counts([str(BIN / "sendmail"), "-q"], base.env, b"", tmp_path, (0, 75))["rename"]
    assert len(list(base.spool.dead_letters())) == 1
    lost = []
    for n in range(1, total + 1):
        (tmp_path / f"k{n}").mkdir()
        rq = Relayq(tmp_path / f"k{n}", smarthost=sh.smarthost,
                    postmaster="postmaster@example.org")
        assert rq.sendmail("-f", "alice@example.org", "bob@example.org",
                           input=MSG).returncode == 0
        subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename",
                        "-e", f"inject=rename:signal=KILL:when={n}", str(BIN / "sendmail"),
                        "-q"], env=rq.env, capture_output=True, check=False, timeout=60)
        past = time.time() - 2 * STALE_SECONDS  # an hour later: the sweep runs
        for p in (rq.queue_dir / "queue").iterdir():
            os.utime(p, (past, past))
        for _ in range(3):
            rq.sendmail("-q")
        dead = list(rq.spool.dead_letters())
        if not dead and not rq.spool.ids():
            q = sorted(os.listdir(rq.spool.quarantine_dir)) if os.path.isdir(
                rq.spool.quarantine_dir) else []
            lost.append((n, q))
    assert lost == [], f"message neither queued nor a listed dead letter: {lost}"
