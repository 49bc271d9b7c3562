"""relayq install: links into a directory tree, refusal, --force keeps the original."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import BIN, Relayq

from relayq.cli.install import install, uninstall
from relayq.errors import RelayqError

if TYPE_CHECKING:
    from pathlib import Path


def test_install_writes_launchers_and_links(tmp_path: Path) -> None:
    lines = install(str(tmp_path), str(BIN), force=False)
    assert len(lines) == 5
    assert os.readlink(tmp_path / "usr/bin/relayq") == str(BIN / "relayq")
    for rel in ("usr/sbin/sendmail", "usr/lib/sendmail", "usr/bin/mailq", "usr/bin/newaliases"):
        head = (tmp_path / rel).read_text().splitlines()[0]
        assert head.endswith(" -IS") and head.startswith("#!/")
    # idempotent
    assert len(install(str(tmp_path), str(BIN), force=False)) == 5


def test_launcher_queues_mail_and_ignores_a_hostile_environment(tmp_path: Path) -> None:
    install(str(tmp_path / "root"), str(BIN), force=False)
    rq = Relayq(tmp_path)
    evil = tmp_path / "evil"
    (evil / "relayq").mkdir(parents=True)
    (evil / "relayq" / "__init__.py").write_text("raise SystemExit('hijacked')\n")
    env = dict(rq.env, PYTHONPATH=str(evil), PYTHONSTARTUP=str(evil / "x.py"))
    sendmail = str(tmp_path / "root/usr/sbin/sendmail")
    r = subprocess.run([sendmail, "-odq", "a@example.org"], input=b"Subject: x\n\nx\n",
                       env=env, capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert len(rq.queued()) == 1
    r = subprocess.run([str(tmp_path / "root/usr/bin/mailq")], env=env, capture_output=True,
                       timeout=30, check=False)
    assert b"Total requests: 1" in r.stdout


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
    assert b"written by relayq install" in other.read_bytes()
    assert (tmp_path / "usr/sbin/sendmail.relayq-saved").read_text().endswith("postfix\n")
    uninstall(str(tmp_path), str(BIN))
    assert other.read_text().endswith("postfix\n") and not other.is_symlink()
    assert not (tmp_path / "usr" / "bin" / "mailq").exists()


def test_command_line(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert b"written by relayq install" in (tmp_path / "usr/sbin/sendmail").read_bytes()
