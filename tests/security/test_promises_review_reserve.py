"""Review of issue 12: the record reserved before a transaction is sized for ASCII replies.

Claim.mark_sending reserves len(envelope) + 4096 + n * (MAX_REPLY + 64) bytes, but
MAX_REPLY bounds a reply in characters (envelope._bounded) and the record is UTF-8:
a relay's reply in UTF-8 (or 8-bit bytes decoded with U+FFFD) is up to 4 bytes a
character. The record then does not fit its reserve (EFBIG), the fallback needs new
space, and on a full queue file system the relay's 250 is lost: a resend.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.system.test_hostile_matrix import fill

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

RCPTS = [f"r{i}@example.org" for i in range(5)]


def final(char: str) -> bytes:
    wide = char * 300  # 300 characters a line: 300 bytes in ASCII, 1200 in UTF-8
    return ("".join(f"250-2.0.0 {wide}\r\n" for _ in range(3))
            + f"250 2.0.0 queued {wide}\r\n").encode()


@pytest.fixture
def qfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "qfs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("char", ["x", "\N{GRINNING FACE}"], ids=["ascii", "utf8"])
def test_utf8_replies_overflow_the_reserve_and_a_full_disk_resends(
    char: str, tmp_path: Path, qfs: Path, smarthost_factory: SmarthostFactory
) -> None:
    srv = smarthost_factory.scripted(  # r0 deferred (so the envelope is rewritten), r1-r4 taken
        replies={".": final(char), "RCPT": [b"451 4.2.0 busy\r\n", b"250 ok\r\n"]})
    rq = Relayq(tmp_path, smarthost=srv.smarthost, queue_dir=str(qfs / "spool"))
    assert rq.sendmail("-f", "alice@example.org", *RCPTS,
                       input=b"Subject: r\n\nreserve-marker\n").returncode == 0
    filler = fill(qfs, spare=16384)  # room for the reserve, not for a second record
    first = rq.sendmail("-q")
    assert len(srv.messages) == 1, (first.returncode, rq.log())
    filler.unlink()
    rq.sendmail("-qf")
    log = "\n".join(ln[:200] for ln in rq.log().splitlines())
    copies = {r: srv.received.count(f"RCPT TO:<{r}>".encode()) for r in RCPTS[1:]}
    assert copies == dict.fromkeys(RCPTS[1:], 1), f"accepted once, sent {copies}\n{log}"
