"""What a taking process said already belongs to its Notices, not to the module:
the daemon keeps one for its life (an entry it cannot remove is logged once however
often it looks), while each one-off queue run starts afresh. Real files, no processes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from relayq.core.config import Config
from relayq.delivery.intake import Notices, Taker
from relayq.queue.spool import Spool
from relayq.queue.submit import Context
from relayq.system.log import Log

if TYPE_CHECKING:
    from pathlib import Path


def _stuck_entry(tmp_path: Path) -> tuple[Spool, str]:
    """A spool whose maildrop/ holds a non-empty directory that cannot be put aside
    (no quarantine/ to move it to): refused, and left where it is."""
    spool = Spool(str(tmp_path / "spool"))
    os.makedirs(spool.maildrop)
    name = "d" + "ab" * 16
    os.mkdir(os.path.join(spool.maildrop, name))
    with open(os.path.join(spool.maildrop, name, "inside"), "w") as f:
        f.write("x")
    return spool, name


def test_one_notices_logs_a_stuck_entry_once_over_many_looks(tmp_path: Path) -> None:
    spool, name = _stuck_entry(tmp_path)
    cfg = Config({})
    log_path = tmp_path / "log"
    log = Log(use_syslog=False, path=str(log_path))
    notices = Notices()
    for _ in range(3):
        assert Taker(cfg, spool, log, Context(cfg), notices).take_all() == []
    text = log_path.read_text()
    assert text.count(name) == 1 and "cannot remove it" in text
    assert os.path.isdir(os.path.join(spool.maildrop, name))


def test_takers_without_a_shared_notices_each_say_it(tmp_path: Path) -> None:
    spool, name = _stuck_entry(tmp_path)
    cfg = Config({})
    log_path = tmp_path / "log"
    log = Log(use_syslog=False, path=str(log_path))
    for _ in range(2):
        assert Taker(cfg, spool, log, Context(cfg)).take_all() == []
    assert log_path.read_text().count(name) == 2
