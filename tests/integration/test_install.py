"""relayq install: links into a directory tree, refusal, --force keeps the original."""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from tests.helpers.relayq_env import BIN, Relayq

from relayq.cli.install import install, uninstall
from relayq.core.errors import RelayqError

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


def test_python_choice_must_be_the_same_version(tmp_path: Path) -> None:
    import sys

    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(tmp_path),
                        "--python", "/bin/true"], capture_output=True, text=True, check=False)
    assert r.returncode == 64 and "--python /bin/true" in r.stderr, r.stderr
    assert not (tmp_path / "usr").exists()
    install(str(tmp_path), str(BIN), force=False, python=sys.executable)
    head = (tmp_path / "usr/sbin/sendmail").read_text().splitlines()[0]
    assert head == f"#!{sys.executable} -IS"


def test_launcher_exit_codes_and_messages_survive_the_fast_exit(tmp_path: Path) -> None:
    """The launchers leave with os._exit: the code and stderr line must still arrive."""
    install(str(tmp_path / "root"), str(BIN), force=False)
    rq = Relayq(tmp_path)
    sendmail = str(tmp_path / "root/usr/sbin/sendmail")
    r = subprocess.run([sendmail, "-odq"], input=b"Subject: x\n\nx\n", env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 64 and r.stderr == b"sendmail: Recipient names must be specified\n"
    r = subprocess.run(f"{tmp_path}/root/usr/bin/mailq -v | head -c 1", shell=True, env=rq.env,
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
