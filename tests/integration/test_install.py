"""relayq install: links into a directory tree, refusal, --force keeps the original."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import BIN

from relayq.cli.install import install, uninstall
from relayq.errors import RelayqError

if TYPE_CHECKING:
    from pathlib import Path


def test_install_links_every_command(tmp_path: Path) -> None:
    lines = install(str(tmp_path), str(BIN), force=False)
    for rel, cmd in (("usr/sbin/sendmail", "sendmail"), ("usr/lib/sendmail", "sendmail"),
                     ("usr/bin/mailq", "mailq"), ("usr/bin/newaliases", "newaliases"),
                     ("usr/bin/relayq", "relayq")):
        assert os.readlink(tmp_path / rel) == str(BIN / cmd)
    assert len(lines) == 5
    # idempotent
    assert len(install(str(tmp_path), str(BIN), force=False)) == 5


def test_refuses_another_mta_unless_forced(tmp_path: Path) -> None:
    other = tmp_path / "usr" / "sbin" / "sendmail"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\necho postfix\n")
    try:
        install(str(tmp_path), str(BIN), force=False)
    except RelayqError as exc:
        assert "--force" in exc.message and str(other) in exc.message
    else:
        raise AssertionError("installed over another MTA")
    assert not (tmp_path / "usr" / "bin" / "mailq").exists()  # nothing half-done
    install(str(tmp_path), str(BIN), force=True)
    assert os.readlink(other) == str(BIN / "sendmail")
    assert (tmp_path / "usr/sbin/sendmail.relayq-saved").read_text().endswith("postfix\n")
    uninstall(str(tmp_path), str(BIN))
    assert other.read_text().endswith("postfix\n") and not other.is_symlink()
    assert not (tmp_path / "usr" / "bin" / "mailq").exists()


def test_command_line(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "usr/sbin/sendmail").is_symlink()
