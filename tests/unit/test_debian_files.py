"""The Debian package repeats a few facts the code owns: the spool's modes
(tmpfiles.d), the service user (sysusers.d, the units), the hooks and units it
ships (contrib/). These tests hold each copy to its source."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from relayq.core.config import SYSTEM_QUEUE
from relayq.queue.spool import Spool

TOP = Path(__file__).resolve().parents[2]
DEBIAN = TOP / "debian"


def _tmpfiles() -> dict[str, tuple[int, str, str]]:
    lines = {}
    for line in (DEBIAN / "relayq.tmpfiles").read_text().splitlines():
        if line.startswith("d "):
            _, path, mode, user, group, _age = line.split()
            lines[path] = (int(mode, 8), user, group)
    return lines


@pytest.mark.skipif(os.geteuid() != 0, reason="the system spool is made by root")
def test_tmpfiles_modes_are_what_the_spool_makes(tmp_path):
    root = tmp_path / "spool"
    Spool(str(root)).ensure((65534, 65534))  # root's daemon handing it to its user
    made = {SYSTEM_QUEUE + ("/" + p if p else ""): stat.S_IMODE(os.stat(root / p).st_mode)
            for p in ("", "queue", "quarantine", "maildrop")}
    listed = _tmpfiles()
    for path, mode in made.items():
        assert path in listed, f"{path} missing from debian/relayq.tmpfiles"
        assert listed[path][0] == mode, f"{path}: tmpfiles {listed[path][0]:o}, code {mode:o}"


def test_one_service_user_everywhere():
    sysusers = (DEBIAN / "relayq.sysusers").read_text()
    user = re.search(r"^u (\S+) ", sysusers, re.M)
    assert user is not None
    assert all(owner == user[1] for path, (_, owner, _) in _tmpfiles().items()
               if path.startswith(SYSTEM_QUEUE))
    for unit in (TOP / "contrib" / "systemd").glob("*.service"):
        assert f"User={user[1]}\n" in unit.read_text(), unit.name


def test_the_package_ships_every_unit_and_hook():
    rules = (DEBIAN / "rules").read_text()
    for f in (TOP / "contrib" / "systemd").iterdir():
        assert f"contrib/systemd/{f.name}" in rules, f"debian/rules does not ship {f.name}"
    for f in (TOP / "contrib" / "network").iterdir():
        assert f"contrib/network/{f.name}" in rules, f"debian/rules does not ship {f.name}"
    for f in (TOP / "contrib" / "bash-completion").iterdir():
        line = (f"install -D -m 0644 contrib/bash-completion/{f.name} "
                f"$(PKG)/usr/share/bash-completion/completions/{f.name}\n")
        assert line in rules, f"debian/rules does not ship the completion {f.name}"
