"""Review of issue 12: concurrent queue runs on messages that each owe a bounce."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import BIN, Relayq

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory


def test_three_concurrent_runs_make_one_bounce_each(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={"bad@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=2)
    n = 20
    for i in range(n):
        assert rq.sendmail("-f", "alice@example.org", "good@example.org", "bad@example.org",
                           input=f"Subject: c{i}\n\nbody {i}\n".encode()).returncode == 0
    runs = [subprocess.Popen([str(BIN / "sendmail"), "-q"], env=rq.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(3)]
    for p in runs:
        p.wait(120)
    rq.sendmail("-q")
    bounces = [t for t in sh.transactions if t.rcpt_tos == ["alice@example.org"]]
    goods = [t for t in sh.transactions if "good@example.org" in t.rcpt_tos]
    assert (len(goods), len(bounces), rq.spool.ids()) == (n, n, [])
