"""Regression tests named after the incidents of reliability-security.md §D (issue 7).

"Rejected" means: one line on stderr, the documented sysexits code, nothing
queued, nothing sent. More D-items are covered where their machinery is
tested (listener, transport); this module collects the command-line ones.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"From: alice@example.org\nSubject: incident\n\nbody\n"


def sendmail(rq: Relayq, *argv: str, data: bytes = MSG) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "sendmail"), *argv], input=data, env=rq.env,
                          capture_output=True, timeout=60, check=False)


def nothing_queued(rq: Relayq) -> bool:
    return rq.spool.ids() == []


def test_D1_phpmailer_argv_writes_no_file_and_queues_nothing(tmp_path: Path) -> None:
    """CVE-2016-10033: the argv /bin/sh hands over when PHP's mail() passes a crafted
    sender: -oQ and -X must never act, and the broken address never goes anywhere."""
    rq = Relayq(tmp_path)
    shell = tmp_path / "shell.php"
    argv = ["-t", "-i", "-fattacker\\", f"-oQ{tmp_path}/spool/", f"-X{shell}",
            'some"@example.org']
    r = sendmail(rq, *argv, data=b"To: victim@example.org\nSubject: x\n\n<?php ?>\n")
    assert r.returncode in (64, 65, 77), r.stderr
    assert_one_line_error(r)
    assert not shell.exists() and not (tmp_path / "spool").exists()
    assert nothing_queued(rq)


def test_D1_a_quoted_sender_stays_one_address(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    r = sendmail(rq, "-odq", "-f", '"a\\" -X/tmp/x b"@example.org', "bob@example.org")
    if r.returncode == 0:  # accepted as the one quoted local part it is
        assert rq.sendmail("-q").returncode == 0
        [t] = sh.transactions
        assert t.mail_from == '"a\\" -X/tmp/x b"@example.org' and t.rcpt_tos == [
            "bob@example.org"]
    else:
        assert r.returncode == 65 and nothing_queued(rq)


@pytest.mark.parametrize("argv", [["--", "-oQ/tmp"], ["-f", "-bs", "x@example.org"],
                                  ["-oi", "-evil@example.org"]])
def test_D2_addresses_starting_with_a_dash_are_refused(tmp_path: Path, argv: list[str]) -> None:
    rq = Relayq(tmp_path)
    r = sendmail(rq, *argv)
    assert r.returncode in (64, 65), r.stderr
    assert_one_line_error(r)
    assert nothing_queued(rq)


def test_D2_a_double_dash_before_ordinary_recipients_works(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    assert sendmail(rq, "-odq", "--", "a@example.org").returncode == 0
    assert len(rq.spool.ids()) == 1


BAD = ["a@example.org\r\nRCPT TO:<evil@example.org>", "a@example.org\nBcc: v@example.org",
       "a" * 10_000 + "@example.org"]  # (a NUL cannot be in an argv: execve stops at it)


@pytest.mark.parametrize("flag", ["-f", "-r", "-N", "-R", "-V", "-B", "-L", "-p", "rcpt"])
@pytest.mark.parametrize("value", BAD, ids=["crlf-command", "lf-header", "10k"])
def test_D4_control_characters_and_floods_in_options_are_refused(
    tmp_path: Path, flag: str, value: str
) -> None:
    rq = Relayq(tmp_path)
    argv = [value] if flag == "rcpt" else [flag, value, "bob@example.org"]
    if flag in ("-N", "-R", "-B", "-p"):
        value = value.replace("a@example.org", "x")
        argv = [flag, value, "bob@example.org"]
    r = sendmail(rq, "-odq", *argv)
    assert r.returncode in (64, 65), (flag, r.returncode, r.stderr)
    assert_one_line_error(r)
    assert nothing_queued(rq)


def test_D4_a_full_name_with_a_line_break_adds_no_header(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    r = sendmail(rq, "-odq", "-F", "Eve\r\nBcc: v@example.org", "bob@example.org",
                 data=b"Subject: x\n\nbody\n")
    if r.returncode == 0:  # -F may be kept, safely encoded
        assert rq.sendmail("-q").returncode == 0
        [t] = sh.transactions
        head = t.content.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nBcc:" not in head and t.rcpt_tos == ["bob@example.org"]
    else:
        assert r.returncode in (64, 65) and nothing_queued(rq)
