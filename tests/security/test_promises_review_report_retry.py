"""Review of issue 12: a report that cannot be made (full queue disk) is retried by the
daemon's rechecks (5 ms doubling to 30 s), not by the retry schedule: next_try is never
advanced when nothing is pending, so the message stays "due" for ever."""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.security.test_promises_review_reserve import qfs  # noqa: F401 - fixture
from tests.system.test_hostile_matrix import fill

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory


# a 65 s watch by design; the room is for a loaded machine
@pytest.mark.timeout(400)
def test_failing_report_is_retried_on_the_recheck_ramp(
    tmp_path: Path, qfs: Path, smarthost_factory: SmarthostFactory  # noqa: F811
) -> None:
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, queue_dir=str(qfs / "spool"),
                retry_min="20s", retry_max="1h", pid_file=str(tmp_path / "pid"))
    body = b"Subject: big\n\n" + (b"x" * 76 + b"\n") * 900  # ~70 KB: its bounce will not fit
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", input=body).returncode == 0
    fill(qfs, spare=16384)
    d = subprocess.Popen([str(BIN / "relayq"), "daemon", "--foreground", "-q", "30s"], env=rq.env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        time.sleep(65)  # queue runs at t=0, 30, 60 s: the retry schedule allows 3 tries
    finally:
        d.terminate()
        d.wait(30)
    tries = [ln for ln in rq.log().splitlines() if "report not made yet" in ln]
    assert len(tries) <= 4, f"{len(tries)} tries in 65 s:\n" + "\n".join(t[:160] for t in tries)
