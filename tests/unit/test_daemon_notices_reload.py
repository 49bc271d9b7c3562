"""The daemon's one maildrop Notices lives as long as the daemon: a SIGHUP reload
(new configuration, log and spool objects) must not make it forget what it said,
as the module globals it replaced never forgot. Real files, no threads started."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from relayq.core.config import Config
from relayq.daemon.main import Daemon, Options
from relayq.system.log import Log

if TYPE_CHECKING:
    from pathlib import Path


def test_a_stuck_maildrop_entry_is_logged_once_across_a_reload(tmp_path: Path) -> None:
    log_path = tmp_path / "log"
    values = {"queue_dir": str(tmp_path / "spool"), "log_file": str(log_path),
              "syslog": False, "smarthost": ["[192.0.2.1]:2525"]}

    def loader() -> Config:
        return Config(dict(values))

    cfg = loader()
    daemon = Daemon(cfg, Log(use_syslog=False, path=str(log_path)), Options(loader=loader))
    # a non-empty directory in maildrop/ with no quarantine/ to put it in: left, logged
    name = "d" + "ab" * 16
    os.makedirs(os.path.join(daemon.spool.maildrop, name))
    with open(os.path.join(daemon.spool.maildrop, name, "inside"), "w") as f:
        f.write("x")
    notices = daemon.drop_notices
    daemon.watcher._take_all(None)
    daemon.reload()
    assert "configuration reloaded" in log_path.read_text()
    assert daemon.drop_notices is notices
    daemon.watcher._take_all(None)
    text = log_path.read_text()
    assert text.count(name) == 1, text
    assert os.path.isdir(os.path.join(daemon.spool.maildrop, name))
