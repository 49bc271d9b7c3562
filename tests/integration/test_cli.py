"""The operator's CLI (issue 15 §4): --version, --help, usage errors exit 64, and
`relayq flush`'s summary line and terminal progress, against a real queue and smarthost."""

from __future__ import annotations

import argparse
import os
import pty
import re
import subprocess
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error

from relayq import __version__
from relayq.cli.args import build_parser
from relayq.cli.flush import PROGRESS_MIN
from relayq.core.errors import EX_OK, EX_TEMPFAIL, EX_USAGE

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

MSG = b"Subject: flush\n\nhello\n"
SUBCOMMANDS = sorted(next(a for a in build_parser()._actions
                          if isinstance(a, argparse._SubParsersAction)).choices)
NEEDS_QID = ("hold", "release", "delete", "requeue")


def test_version_option(tmp_path: Path) -> None:
    r = Relayq(tmp_path).run("relayq", "--version")
    assert r.returncode == EX_OK and r.stdout.decode() == f"relayq {__version__}\n"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_a_useful_help(tmp_path: Path, command: str) -> None:
    r = Relayq(tmp_path).run("relayq", command, "--help")
    assert r.returncode == EX_OK, r.stderr
    text = r.stdout.decode()
    assert text.startswith(f"usage: relayq {command}")
    description = text.split("\n\n")[1]
    assert len(description) > 20 and description[0].isupper(), text


def test_the_top_help_lists_every_subcommand_with_one_line(tmp_path: Path) -> None:
    text = Relayq(tmp_path).run("relayq", "--help").stdout.decode()
    for command in SUBCOMMANDS:
        assert re.search(rf"^    {re.escape(command)}\s+\S", text, re.M), (command, text)
    assert "--version" in text


@pytest.mark.parametrize("args", [
    [], ["nosuchcommand"], ["--nosuchoption"], ["-C"],
    *([c, "--nosuchoption"] for c in SUBCOMMANDS),
    *([c] for c in NEEDS_QID),
    ["daemon", "-q"], ["status", "extra"],
], ids=" ".join)
def test_usage_errors_exit_64_in_one_line(tmp_path: Path, args: list[str]) -> None:
    r = Relayq(tmp_path).run("relayq", *args)
    assert r.returncode == EX_USAGE, (args, r.stderr)
    err = assert_one_line_error(r)
    assert err.startswith("relayq: ") and "--help" in err
    if args and args[0] in SUBCOMMANDS:  # the help that answers it
        assert err.startswith(f"relayq: {args[0]}: ") and f"relayq {args[0]} --help" in err


def test_mailq_usage(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    r = rq.run("mailq", "--help")
    assert r.returncode == EX_OK and r.stdout.startswith(b"usage: mailq")
    for bad in (["--nosuch"], ["-Z"], ["-C"]):
        r = rq.run("mailq", *bad)
        assert r.returncode == EX_USAGE, (bad, r.stderr)
        assert_one_line_error(r)


def _queue(rq: Relayq, *rcpts: str) -> None:
    for rcpt in rcpts:
        assert rq.sendmail("-odq", rcpt, input=MSG).returncode == EX_OK


@pytest.mark.parametrize("concurrency", [1, 3])
def test_flush_prints_one_summary_line(tmp_path: Path, smarthost_factory: SmarthostFactory,
                                       concurrency: int) -> None:
    sh = smarthost_factory(rcpt_replies={
        "later@example.org": "451 4.3.0 try again later",
        "nobody@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=concurrency)
    _queue(rq, "a@example.org", "b@example.org", "later@example.org", "nobody@example.org")
    r = rq.run("relayq", "flush")
    assert r.returncode == EX_TEMPFAIL, r.stderr
    # the bounce report went out too, and is not counted: it is part of "bounced"
    assert r.stdout.decode() == "flush: 2 sent, 1 deferred, 1 bounced, 1 left\n"
    assert r.stderr == b""  # no terminal: no progress
    assert len(rq.spool.ids()) == 1
    sh.rcpt_replies.clear()
    r = rq.run("relayq", "flush")
    assert (r.returncode, r.stdout.decode()) == (
        EX_OK, "flush: 1 sent, 0 deferred, 0 bounced, 0 left\n")
    r = rq.run("relayq", "flush")
    assert (r.returncode, r.stdout.decode()) == (
        EX_OK, "flush: 0 sent, 0 deferred, 0 bounced, 0 left\n")


def test_flush_counts_a_message_whose_report_was_owed_as_sent(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """A recipient failed and recorded, its report not made yet (a settle cut off):
    the run makes the report and the message leaves the queue, counted as it was
    before the statistics (sent), not as deferred."""
    from relayq.core.outcome import FAILED

    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    _queue(rq, "gone@example.org")
    [qid] = rq.spool.ids()
    env = rq.spool.read_envelope(qid)
    env.recipients[0].state, env.recipients[0].reply = FAILED, "550 5.1.1 gone"
    rq.spool.write_envelope(env)
    r = rq.run("relayq", "flush")
    assert (r.returncode, r.stdout.decode()) == (
        EX_OK, "flush: 1 sent, 0 deferred, 0 bounced, 0 left\n"), r.stderr
    assert rq.spool.ids() == [] and len(sh.transactions) == 1  # the report went out


def test_flush_counts_a_held_message_as_left_only(tmp_path: Path,
                                                  smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    _queue(rq, "a@example.org")
    [qid] = rq.spool.ids()
    assert rq.run("relayq", "hold", qid).returncode == EX_OK
    r = rq.run("relayq", "flush")
    assert (r.returncode, r.stdout.decode()) == (
        EX_TEMPFAIL, "flush: 0 sent, 0 deferred, 0 bounced, 1 left\n")


def test_flush_quiet_and_run_print_nothing(tmp_path: Path,
                                           smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    _queue(rq, "a@example.org")
    r = rq.run("relayq", "flush", "-q")
    assert (r.returncode, r.stdout, r.stderr) == (EX_OK, b"", b"")
    _queue(rq, "b@example.org")
    r = rq.run("relayq", "run")
    assert (r.returncode, r.stdout, r.stderr) == (EX_OK, b"", b"")
    assert len(sh.transactions) == 2


def _on_a_terminal(rq: Relayq, *args: str) -> tuple[int, str, bytes]:
    """Run relayq with standard error on a pty (stdout a pipe): (status, stdout, tty)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([str(BIN / "relayq"), *args], env=rq.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=follower)
        os.close(follower)
        seen = bytearray()
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=120)[0].decode()
        code = proc.returncode
    finally:
        os.close(leader)
    return code, out, bytes(seen)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_flush_shows_progress_on_a_terminal_for_a_large_queue(
    tmp_path: Path, smarthost_factory: SmarthostFactory, concurrency: int
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, concurrency=concurrency)
    _queue(rq, *(f"u{n}@example.org" for n in range(PROGRESS_MIN)))
    code, out, tty = _on_a_terminal(rq, "flush")
    assert code == EX_OK
    assert out == f"flush: {PROGRESS_MIN} sent, 0 deferred, 0 bounced, 0 left\n"
    lines = re.findall(rb"\rflush: (\d+)/(\d+) messages: (\d+) sent, 0 deferred, 0 bounced",
                       tty)
    assert lines, tty
    assert all(int(total) == PROGRESS_MIN for _, total, _ in lines)
    assert tty.endswith(b"\r\x1b[K")  # erased before the summary
    # -q: nothing at all; a small queue: no progress
    _queue(rq, *(f"v{n}@example.org" for n in range(PROGRESS_MIN)))
    assert _on_a_terminal(rq, "flush", "-q") == (EX_OK, "", b"")
    _queue(rq, "w@example.org")
    code, out, tty = _on_a_terminal(rq, "flush")
    assert (code, tty) == (EX_OK, b"")
    assert out == "flush: 1 sent, 0 deferred, 0 bounced, 0 left\n"


def test_bash_completion_offers_queue_ids_from_mailq(tmp_path: Path) -> None:
    from tests.unit.test_completion import complete

    rq = Relayq(tmp_path)
    _queue(rq, "a@example.org", "b@example.org")
    ids = rq.spool.ids()
    assert rq.run("relayq", "hold", ids[0]).returncode == EX_OK  # a held one is listed too
    for command in NEEDS_QID:
        assert sorted(complete("relayq", ["relayq", command, ""], rq.env)) == sorted(ids)
    prefix = ids[1][:-1]
    assert complete("relayq", ["relayq", "delete", prefix], rq.env) == sorted(
        i for i in ids if i.startswith(prefix))
    assert complete("relayq", ["relayq", "flush", ""], rq.env) == []
