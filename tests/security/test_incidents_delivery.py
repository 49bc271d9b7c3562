"""Regression tests named after the delivery incidents of reliability-security.md §D.

D12 local mailboxes (symlink, hard link, FIFO, directory; ENOSPC; `From `
escaping; Maildir), D13 bounce storms, D14 permanent errors and queue
lifetime, D15 one bad recipient (the three-recipient case of B3), D16 secrets
in `ps`, logs and files, D18 broken server replies. Everything runs the
installed commands (or, where a hundred queue runs or a fake home directory
are needed, the real Runner and mailbox code) against real files, real SMTP on
127.0.0.1 and real TLS. Retry times are checked on what the envelope records,
never with timed asserts.
"""

from __future__ import annotations

import asyncio
import base64
import email
import grp
import json
import mailbox as pymailbox
import os
import pwd
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error
from tests.integration import test_local_delivery as local
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for
from tests.system.test_crash_injection import _strace_works

from relayq.core.envelope import FAILED, PENDING, SENT
from relayq.core.errors import EX_CONFIG, EX_OK, EX_TEMPFAIL
from relayq.delivery.local_transport import User
from relayq.delivery.runner import Runner
from relayq.queue.submit import Context
from relayq.system import configfile
from relayq.system.log import Log
from relayq.testing.smarthost import Smarthost

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.core.envelope import Envelope
    from relayq.testing.smarthost import RawSession, SmarthostFactory, Transaction
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(90)

MSG = b"From: alice@example.org\nSubject: incident\n\nbody\n"
NULL = ("", "<>")
ME = local.ME
IS_ROOT = local.IS_ROOT
needs_strace = pytest.mark.skipif(not _strace_works(), reason="strace cannot trace here")

shared_dir = local.shared_dir  # a 1777 folder: mailboxes written as nobody under root


# -- shared helpers ----------------------------------------------------------------------


def submit(rq: Relayq, *rcpts: str, sender: str = "alice@example.org", msg: bytes = MSG) -> str:
    """Queue one message (nothing delivered yet); returns its queue id."""
    before = set(rq.spool.ids())
    r = rq.sendmail("-odq", "-f", sender, *rcpts, input=msg)
    assert r.returncode == EX_OK, r.stderr
    [qid] = set(rq.spool.ids()) - before
    return qid


def envelope(rq: Relayq, qid: str) -> Envelope:
    return rq.spool.read_envelope(qid)


def states(rq: Relayq, qid: str) -> dict[str, str]:
    return {r.address: r.state for r in envelope(rq, qid).recipients}


def age(rq: Relayq, qid: str, *, created_by: float = 0.0, due: bool = False) -> None:
    """Let time pass for one message: move its creation back, or make its retry due.

    Done under the message's lock through the spool's own record(), as a runner does.
    """
    claim = rq.spool.claim(qid, 5.0)
    assert claim is not None
    try:
        claim.envelope.created -= created_by
        if due:
            claim.envelope.next_try = time.time() - 1
        claim.record()
    finally:
        claim.release()


def reports(transactions: list[Transaction]) -> list[email.message.Message]:
    """The RFC 3464 reports among what a smarthost accepted."""
    out = []
    for t in transactions:
        if t.mail_from in NULL:
            msg = email.message_from_bytes(t.content.replace(b"\r\n", b"\n"))
            assert msg.get_content_type() == "multipart/report"
            out.append(msg)
    return out


def status_block(msg: email.message.Message) -> str:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return "\n".join(str(p) for p in part.get_payload())


def run_log(rq: Relayq, marker: str) -> list[str]:
    return [line for line in rq.log().splitlines() if marker in line]


# == D12: local mailboxes =================================================================


@pytest.fixture
def rq_local(tmp_path: Path) -> Relayq:
    spool = tmp_path / "mail"
    spool.mkdir()
    (tmp_path / "aliases").write_text("")
    return Relayq(tmp_path, local_delivery=True, mail_spool=str(spool),
                  aliases_file=str(tmp_path / "aliases"), concurrency=1)


REASONS = {
    "symlink": "refused: a symbolic link",
    "hardlink": "refused: 2 hard links",
    "fifo": "refused: not a regular file",
    "fifo-with-reader": "refused: not a regular file",
    "directory": "refused: a directory",
}


@pytest.mark.parametrize("user", ["self", "nobody"])
@pytest.mark.parametrize("kind", list(REASONS))
def test_D12_an_unsafe_mailbox_defers_with_a_log_line_and_the_target_is_untouched(
    rq_local: Relayq, shared_dir: Path, kind: str, user: str
) -> None:
    """dma/mail.local followed a symlinked mailbox (dma f249aa4; Postfix safe_open()):
    a mailbox that is a symlink, a hard link, a FIFO or a directory is never written
    through; the mail waits, the log says why, and it goes once the mailbox is sane."""
    rq = rq_local
    if user == "nobody":
        if not IS_ROOT:
            pytest.skip("delivering as another user needs root")
        spool, name, uid = shared_dir, "nobody", pwd.getpwnam("nobody").pw_uid
        rq.configure(mail_spool=str(spool))
    else:
        spool, name, uid = rq.root / "mail", ME, os.getuid()
    box = spool / name
    target = spool / "precious"  # what an attacker wants appended to
    target.write_bytes(b"precious\n")
    target.chmod(0o644 if kind == "symlink" else 0o600)
    if kind == "hardlink":
        os.chown(target, uid, -1)  # the user's own file: only the link count stops it
    reader = -1
    if kind == "symlink":  # root-owned target: the privileged writer must not follow it
        box.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, box)
    elif kind.startswith("fifo"):
        os.mkfifo(box, 0o600)
        os.chown(box, uid, -1)
        if kind == "fifo-with-reader":
            reader = os.open(box, os.O_RDONLY | os.O_NONBLOCK)
    else:
        box.mkdir()
    before = target.stat()
    try:
        qid = submit(rq, name)
        assert rq.sendmail("-q", timeout=30).returncode == EX_TEMPFAIL
        if reader >= 0:
            try:
                got = os.read(reader, 4096)
            except BlockingIOError:
                got = b""
            assert got == b""  # not a byte reached the FIFO's reader
    finally:
        if reader >= 0:
            os.close(reader)
    after = target.stat()
    assert target.read_bytes() == b"precious\n"
    assert (after.st_size, after.st_mtime_ns, after.st_uid) == (
        before.st_size, before.st_mtime_ns, before.st_uid)
    [r] = envelope(rq, qid).recipients
    assert r.state == PENDING
    assert r.reply == f"450 4.2.0 {box}: {REASONS[kind]}"
    [line] = run_log(rq, f"to=<{name}@host.example.org>")
    assert "mailer=local" in line and f"stat=Deferred: 450 4.2.0 {box}: {REASONS[kind]}" in line
    assert not (spool / f"{name}.lock").exists()
    # the administrator removes the trap: the waiting message is delivered, once
    if box.is_dir() and not box.is_symlink():
        box.rmdir()
    else:
        box.unlink()
    assert rq.sendmail("-q").returncode == EX_OK
    [msg] = local.read_mbox(box)
    assert msg["Subject"] == "incident" and box.stat().st_uid == uid
    assert target.read_bytes() == b"precious\n"


BIG = (b"From: alice@example.org\nSubject: big\n\n"
       + b"".join(b"line %06d " % i + b"x" * 69 + b"\n" for i in range(3000)))  # ~240 KB


def _strace_sendmail_q(rq: Relayq, path: Path, inject: str) -> subprocess.CompletedProcess[str]:
    """`sendmail -q` under strace, counting only the writes to `path` (-P)."""
    return subprocess.run(["strace", "-f", "-qq", "-o", str(rq.root / "trace"), "-P", str(path),
                           "-e", "trace=write", *(["-e", inject] if inject else []),
                           str(BIN / "sendmail"), "-q"], env=rq.env, capture_output=True,
                          text=True, check=False, timeout=60)


@needs_strace
def test_D12_ENOSPC_in_the_middle_of_an_mbox_append_truncates_to_the_old_length(
    rq_local: Relayq
) -> None:
    """Postfix local(8) and dma truncate a mailbox back after a failed append: each
    write of a 240 KB delivery fails once with ENOSPC (strace), and each time the
    mailbox is byte for byte as before, the mail waits, and later arrives whole."""
    rq = rq_local
    box = rq.root / "mail" / ME
    old = b"From bob@example.org Thu Jan  1 00:00:00 1970\nSubject: old\n\nold mail\n\n"
    box.write_bytes(old)
    box.chmod(0o600)
    qid = submit(rq, ME, msg=BIG)
    # a clean run in a copy tells how many writes to the mailbox one delivery makes
    (rq.root / "dry" / "mail").mkdir(parents=True)
    dry = Relayq(rq.root / "dry", **{**rq.settings, "queue_dir": str(rq.root / "dry" / "queue"),
                                     "mail_spool": str(rq.root / "dry" / "mail"),
                                     "log_file": str(rq.root / "dry" / "maillog")})
    submit(dry, ME, msg=BIG)
    r = _strace_sendmail_q(dry, rq.root / "dry" / "mail" / ME, "")
    assert r.returncode == EX_OK, r.stderr
    writes = (dry.root / "trace").read_text().count("write(")
    assert writes >= 3, writes  # headers and the body in several 64 KiB pieces
    for n in range(1, writes + 1):
        r = _strace_sendmail_q(rq, box, f"inject=write:error=ENOSPC:when={n}")
        assert r.returncode == EX_TEMPFAIL, (n, r.stderr)
        assert box.read_bytes() == old, n  # truncated back: no half message, old mail kept
        [rcpt] = envelope(rq, qid).recipients
        assert rcpt.state == PENDING and rcpt.reply == (
            f"450 4.2.2 {box}: No space left on device (mailbox full)"), (n, rcpt.reply)
    assert len(run_log(rq, "No space left on device (mailbox full)")) == writes
    assert rq.sendmail("-q").returncode == EX_OK
    first, second = local.read_mbox(box)
    assert first["Subject"] == "old" and second["Subject"] == "big"
    assert second.get_payload(decode=True) == BIG.split(b"\n\n", 1)[1]
    assert box.read_bytes().startswith(old)


def test_D12_body_lines_starting_with_From_are_escaped_in_mbox(rq_local: Relayq) -> None:
    """An unescaped body line `From x` splits one message into two for every mbox
    reader; it becomes `>From x` (and only at a line start, even past 64 KiB)."""
    rq = rq_local
    long_line = b"a" * 65536 + b"From not at a line start\n"  # read back in two pieces
    body = (b"From x\nFrom the start\nFromage is no separator\n>From already quoted\n"
            + long_line + b"From after the long line\nlast line\n")
    submit(rq, ME, msg=b"From: alice@example.org\nSubject: escaping\n\n" + body)
    assert rq.sendmail("-q").returncode == EX_OK
    raw = (rq.root / "mail" / ME).read_bytes()
    lines = raw.split(b"\n")
    assert [ln for ln in lines if ln.startswith(b"From ")] == [lines[0]]  # the separator only
    expected = (b">From x\n>From the start\nFromage is no separator\n>From already quoted\n"
                + long_line + b">From after the long line\nlast line\n")
    assert raw.endswith(b"\n\n" + expected + b"\n")
    [msg] = local.read_mbox(rq.root / "mail" / ME)
    assert msg["Subject"] == "escaping" and msg.get_payload(decode=True) == expected


MAILDIR_WRITER = """
import sys
from relayq.delivery import mailbox
with open(sys.argv[2], "rb") as f:
    try:
        mailbox.deliver_maildir(sys.argv[1], f, sender="alice@example.org",
                                recipient="carol@example.org", now=1764120000.5)
    except mailbox.MailboxError as exc:
        sys.stdout.write(exc.status + " " + exc.message)
        sys.exit(75)
"""


@needs_strace
@pytest.mark.parametrize("fault", ["signal=KILL", "error=ENOSPC", "error=EIO"])
@pytest.mark.parametrize("syscall", ["write", "fsync"])
def test_D12_maildir_new_only_ever_holds_complete_messages(
    tmp_path: Path, syscall: str, fault: str
) -> None:
    """notqmail maildir(5): write to tmp/, fsync, link into new/. The writer is killed
    or fails at each of its writes and fsyncs (the file's and new/'s): new/ never holds
    a partial file, a failure reported leaves nothing there (it is retried, so a copy
    would be a duplicate), and a clean delivery puts exactly one whole message there."""
    md = tmp_path / "Maildir"
    data = tmp_path / "message"
    data.write_bytes(BIG)
    argv = [sys.executable, "-c", MAILDIR_WRITER, str(md), str(data)]
    expected = b"Return-Path: <alice@example.org>\nDelivered-To: carol@example.org\n" + BIG
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}",
                        *argv], capture_output=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    total = trace.read_text().count(f"{syscall}(")
    assert total >= (3 if syscall == "write" else 2), total  # headers + pieces; file + dir
    (md / "new" / os.listdir(md / "new")[0]).unlink()
    for n in range(1, total + 1):
        r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                            "-e", f"inject={syscall}:{fault}:when={n}", *argv],
                           capture_output=True, check=False, timeout=60)
        assert r.returncode != 0, n  # every one of those calls belongs to the delivery
        arrived = os.listdir(md / "new")
        if fault == "signal=KILL" and arrived:  # killed after the link: complete, and
            [name] = arrived  # delivered again later (the crash window of any MTA)
            assert (md / "new" / name).read_bytes() == expected, n
            (md / "new" / name).unlink()
        assert os.listdir(md / "new") == [], (n, fault)
        if fault != "signal=KILL":
            assert r.returncode == 75 and r.stdout.startswith(b"4."), r.stdout
            assert os.listdir(md / "tmp") == [], n  # the failed writer cleans up after itself
    for name in os.listdir(md / "tmp"):  # what a killed writer left (readers skip tmp/)
        (md / "tmp" / name).unlink()
    r = subprocess.run(argv, capture_output=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    [name] = os.listdir(md / "new")
    assert (md / "new" / name).read_bytes() == expected
    [msg] = list(pymailbox.Maildir(str(md), create=False))
    assert msg["Subject"] == "big"


def test_D12_maildir_delivery_through_the_runner_leaves_tmp_empty(
    rq_local: Relayq, tmp_path: Path
) -> None:
    """The runner's own Maildir delivery (a fake home: a test cannot own a real one)."""
    rq = rq_local
    rq.configure(mailbox_format="maildir")
    home = tmp_path / "home"
    home.mkdir()
    me = pwd.getpwuid(os.getuid())
    submit(rq, "carol", msg=BIG)
    run = local.runner(rq, carol=User("carol", me.pw_uid, me.pw_gid, str(home)))
    assert run.run(force=True) == 0
    assert os.listdir(home / "Maildir" / "tmp") == []
    [name] = os.listdir(home / "Maildir" / "new")
    assert (home / "Maildir" / "new" / name).read_bytes().endswith(BIG)
    assert rq.queued() == []


# == D13: bounce storms =====================================================================


def test_D13_a_refused_message_from_the_null_sender_creates_no_new_message(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """nullmailer #54/#69: a failed message from <> produced notices that failed in turn,
    once a second, until the disk was full. A refused <> message is never bounced to <>:
    one copy goes to the postmaster, and when that is refused too the message is kept as
    one dead letter (issue 12 D17: nothing is dropped silently); nothing more, ever."""
    sh = smarthost_factory(replies={"rcpt": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, postmaster="postmaster@example.org")
    qid = submit(rq, "bob@example.org", sender="<>")
    assert envelope(rq, qid).sender == ""
    for _ in range(3):
        assert rq.sendmail("-q").returncode == EX_OK
        assert rq.spool.ids() == []
    assert sh.transactions == []
    assert [c.arg for c in sh.commands if c.verb == "RCPT"] == [
        "TO:<bob@example.org>", "TO:<postmaster@example.org>"]
    assert len(list(rq.spool.dead_letters())) == 1
    assert " DSN: " not in rq.log()


@pytest.mark.parametrize("postmaster_ok", [True, False], ids=["postmaster-accepts",
                                                              "postmaster-refused"])
def test_D13_an_undeliverable_bounce_gives_at_most_one_postmaster_notice_then_nothing(
    tmp_path: Path, smarthost_factory: SmarthostFactory, postmaster_ok: bool
) -> None:
    """The bounce to a sender the smarthost also refuses: one copy to the postmaster
    (if it is refused too, a dead letter: issue 12 D17), and no further message however
    many runs."""
    refused = {"bob@example.org": "550 5.1.1 no such user",
               "alice@example.org": "550 5.1.1 no such sender"}
    if not postmaster_ok:
        refused["postmaster@example.org"] = "550 5.7.1 not even the postmaster"
    sh = smarthost_factory(rcpt_replies=refused)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, postmaster="postmaster@example.org")
    submit(rq, "bob@example.org")
    for _ in range(5):
        assert rq.sendmail("-q").returncode == EX_OK
        assert rq.spool.ids() == []
    rcpts = [c.arg for c in sh.commands if c.verb == "RCPT"]
    assert rcpts == ["TO:<bob@example.org>", "TO:<alice@example.org>",
                     "TO:<postmaster@example.org>"]  # each tried once, in that order
    if postmaster_ok:
        [notice] = sh.transactions
        assert notice.mail_from in NULL and notice.rcpt_tos == ["postmaster@example.org"]
        [report] = reports([notice])
        assert "alice@example.org" in status_block(report)
    else:
        assert sh.transactions == []
        assert "dead letter" in rq.log() and len(list(rq.spool.dead_letters())) == 1


def test_D13_a_hundred_runs_against_a_relay_refusing_everything_keep_the_queue_bounded(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """nullmailer #69 ("consuming all file space and inodes"): a hundred forced queue
    runs against a relay that refuses bob for good and everyone else for now. Each
    message leaves at most its bounce or one delay warning; nothing multiplies."""
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "550 5.1.1 no such user"},
                           replies={"rcpt": "451 4.3.0 try later"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, postmaster="postmaster@example.org",
                delay_warning="1h", concurrency=1)
    to_bob = [submit(rq, "bob@example.org", sender=f"s{n}@example.org") for n in range(3)]
    to_carol = [submit(rq, "carol@example.org", sender=f"t{n}@example.org") for n in range(3)]
    for qid in to_carol:
        age(rq, qid, created_by=7200)  # old enough for its one delay warning
    cfg = configfile.load(str(rq.config), explicit=True)
    runner = Runner(cfg, rq.spool, Log(use_syslog=False, path=str(rq.log_file)), Context(cfg))
    sizes = []
    try:
        for _ in range(100):
            runner.run(force=True)
            sizes.append(len(rq.spool.ids()))
    finally:
        runner.close()
    assert sizes[0] == sizes[-1] == max(sizes) == 9, sizes  # 3 bounces, 3 + 3 warnings
    queued = rq.queued()
    assert not any(qid in to_bob for qid in (e.qid for e, _ in queued))
    dsns = [e for e, _ in queued if e.is_dsn]
    assert sorted(r.address for e in dsns for r in e.recipients) == sorted(
        [f"s{n}@example.org" for n in range(3)] + [f"t{n}@example.org" for n in range(3)])
    assert all(envelope(rq, qid).warned for qid in to_carol)
    assert sh.transactions == []


# == D14: permanent errors, retries and the queue lifetime ========================================


def test_D14_a_550_to_MAIL_FROM_bounces_at_once_with_the_servers_words(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """nullmailer #1: permanent errors were retried forever and nobody was told. A 550 to
    MAIL FROM fails every recipient in the first attempt and the sender gets a bounce
    quoting the server."""
    words = b"550 5.7.1 Sender address rejected: not owned by user alice"
    srv = smarthost_factory.scripted(replies={
        "MAIL": [words + b"\r\n", b"250 2.1.0 Ok\r\n"],
        "DATA": [b"503 5.5.1 Error: need RCPT command\r\n", b"354 go ahead\r\n"],
    })
    rq = Relayq(tmp_path, smarthost=srv.smarthost)
    qid = submit(rq, "bob@example.org", "carol@example.org")
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.spool.ids() == []
    [bounce] = [m for m in srv.messages if b"multipart/report" in m]
    assert b"MAIL FROM:<>" in srv.received and b"RCPT TO:<alice@example.org>" in srv.received
    report = email.message_from_bytes(bounce.replace(b"\r\n", b"\n"))
    block = status_block(report)
    for rcpt in ("bob@example.org", "carol@example.org"):
        assert f"Final-Recipient: rfc822; {rcpt}" in block
    assert block.count("Action: failed") == 2 and "Status: 5.7.1" in block
    assert words.decode() in block
    assert len(run_log(rq, f"{qid}: to=<")) == 2  # one attempt, no retry


def test_D14_a_550_to_RCPT_TO_bounces_at_once_with_the_servers_words(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """The same for a 550 to RCPT TO."""
    words = "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"
    sh = smarthost_factory(rcpt_replies={"bob@example.org": words})
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    qid = submit(rq, "bob@example.org")
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.spool.ids() == []
    [report] = reports(sh.transactions)
    assert sh.transactions[0].rcpt_tos == ["alice@example.org"]
    block = status_block(report)
    assert "Action: failed" in block and "Status: 5.1.1" in block
    assert f"Diagnostic-Code: smtp; {words}" in block
    [line] = run_log(rq, f"{qid}: to=<bob@example.org>")
    assert f"stat={words}" in line


def test_D14_a_persistent_451_bounces_after_max_queue_age_with_the_last_reason(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """A 4xx forever must end: past max_queue_age the message bounces (4.4.7) with the
    last reason the relay gave, at the first attempt that fails after it (issue 12 D7:
    never without trying)."""
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "451 4.3.0 first reason"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, max_queue_age="1h")
    qid = submit(rq, "bob@example.org")
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    sh.rcpt_replies["bob@example.org"] = "451 4.2.0 mailbox busy (the last reason)"
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert states(rq, qid) == {"bob@example.org": PENDING} and sh.transactions == []
    age(rq, qid, created_by=3601)
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.spool.ids() == []
    bob_rcpts = [c for c in sh.commands if c.verb == "RCPT" and "bob@" in c.arg]
    assert len(bob_rcpts) == 3  # the third attempt failed too, and then it expired
    [report] = reports(sh.transactions)
    block = status_block(report)
    assert "Action: failed" in block and "Status: 4.4.7" in block
    human = next(p for p in report.walk() if p.get_content_type() == "text/plain")
    [reason] = [ln.strip() for ln in str(human.get_payload()).splitlines() if "(reason:" in ln]
    assert reason.startswith("(reason: 4.4.7 Message could not be delivered for ")
    assert reason.endswith(": 451 4.2.0 mailbox busy (the last reason))"), reason
    assert "first reason" not in report.as_string()
    [line] = run_log(rq, "stat=Expired")
    assert f"{qid}: to=<bob@example.org>" in line
    assert "dsn=4.4.7" in line and "mailbox busy (the last reason)" in line


@pytest.mark.parametrize("warning", ["1h", "0"], ids=["configured", "off"])
def test_D14_a_delay_warning_is_sent_once_and_only_if_configured(
    tmp_path: Path, smarthost_factory: SmarthostFactory, warning: str
) -> None:
    """Postfix's delay_warning_time: one "still trying" notice after the configured
    time, however many retries follow; none when it is not configured."""
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "451 4.2.0 mailbox busy"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delay_warning=warning)
    qid = submit(rq, "bob@example.org")
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert sh.transactions == []  # queued for less than the warning time
    age(rq, qid, created_by=2 * 86400)  # two days: still far from max_queue_age (5d)
    for _ in range(4):
        assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    if warning == "0":
        assert sh.transactions == [] and not envelope(rq, qid).warned
        return
    [notice] = reports(sh.transactions)
    assert sh.transactions[0].rcpt_tos == ["alice@example.org"]
    block = status_block(notice)
    assert "Action: delayed" in block and "Status: 4.2.0" in block
    assert envelope(rq, qid).warned and len(run_log(rq, ": sender notify: Warning:")) == 1


def test_D14_retries_follow_the_backoff_schedule_in_the_recorded_attempt_times(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """Postfix's backoff (300 s doubling to 4000 s): each deferral records its attempt
    time and a next try min(4000, 300 * 2**(n-1)) seconds later (within the 10 %
    jitter), and an unforced run leaves a message alone until then."""
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "451 4.3.0 try later"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, retry_min="5m", retry_max="4000s")
    qid = submit(rq, "bob@example.org")
    last = 0.0
    for n in range(1, 8):
        assert rq.sendmail("-q").returncode == EX_TEMPFAIL  # forced, as sendmail -q is
        env = envelope(rq, qid)
        expected = min(4000.0, 300.0 * 2 ** (n - 1))
        assert env.attempts == n
        assert env.last_try > last
        assert 0.9 * expected <= env.next_try - env.last_try <= 1.1 * expected, (n, env.next_try
                                                                                  - env.last_try)
        assert env.error == "Deferred: 451 4.3.0 try later"
        last = env.last_try
    rcpts = len([c for c in sh.commands if c.verb == "RCPT"])
    assert rcpts == 7
    assert rq.run("relayq", "run").returncode == EX_TEMPFAIL  # not due: left alone
    assert envelope(rq, qid).attempts == 7
    assert len([c for c in sh.commands if c.verb == "RCPT"]) == rcpts
    age(rq, qid, due=True)  # its time has come
    assert rq.run("relayq", "run").returncode == EX_TEMPFAIL
    env = envelope(rq, qid)
    assert env.attempts == 8 and 3600 <= env.next_try - env.last_try <= 4000
    assert len(run_log(rq, "stat=Deferred: 451 4.3.0 try later")) == 8


# == D15: one bad recipient ==================================================================


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lock-step"])
def test_D15_one_bad_recipient_does_not_sink_the_others(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pipelining: bool
) -> None:
    """nullmailer failed the whole message on any non-2xx RCPT, and its retry resent to
    the recipients already accepted. RCPT 250 / 550 / 450 (B3): the first receives it
    once, the second is bounced with the server's words, the third is retried and
    receives it once; the first is never sent it again."""
    one, two, three = "one@example.org", "two@example.org", "three@example.org"
    refusal = f"550 5.1.1 <{two}>: no such user here"
    sh = smarthost_factory(pipelining=pipelining, rcpt_replies={
        two: refusal, three: f"450 4.2.1 <{three}>: mailbox temporarily unavailable"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    qid = submit(rq, one, two, three)
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert states(rq, qid) == {one: SENT, two: FAILED, three: PENDING}
    first, bounce = sh.transactions
    assert first.rcpt_tos == [one] and b"Subject: incident" in first.content
    [report] = reports([bounce])
    assert bounce.rcpt_tos == ["alice@example.org"]
    block = status_block(report)
    assert f"Final-Recipient: rfc822; {two}" in block and f"Diagnostic-Code: smtp; {refusal}" \
        in block
    assert one not in block and three not in block
    del sh.rcpt_replies[three]  # the third mailbox is back
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_OK  # nothing left: nothing sent again
    assert rq.spool.ids() == []
    delivered = [t for t in sh.transactions if t.mail_from == "alice@example.org"]
    assert [t.rcpt_tos for t in delivered] == [[one], [three]]
    rcpt_cmds = [c.arg for c in sh.commands if c.verb == "RCPT"]
    assert rcpt_cmds.count(f"TO:<{one}>") == 1 and rcpt_cmds.count(f"TO:<{two}>") == 1
    assert rcpt_cmds.count(f"TO:<{three}>") == 2
    assert len(reports(sh.transactions)) == 1


# == D16: secrets in ps, logs and files ==================================================

USER = "relay-user@example.org"
PASSWORD = "Q7-d16-pa55w0rd-NEVER-shown"
MECHANISM = {"password": "PLAIN", "password_file": "LOGIN", "password_command": "XOAUTH2"}
PWCMD = """
import os, sys
seen = os.path.join(sys.argv[2], str(os.getpid()))
with open("/proc/self/cmdline", "rb") as a, open("/proc/self/environ", "rb") as b, \\
        open(seen, "wb") as out:
    out.write(a.read() + b"\\n" + b.read())
with open(sys.argv[1]) as f:
    print(f.read().strip())
"""


def secret_forms(user: str = USER, password: str = PASSWORD) -> dict[str, bytes]:
    """The secret as it could leak: itself and every base64 form AUTH puts on the wire."""
    return {
        "password": password.encode(),
        "AUTH PLAIN": base64.b64encode(f"\0{user}\0{password}".encode()),
        "AUTH LOGIN": base64.b64encode(password.encode()),
        "XOAUTH2": base64.b64encode(f"user={user}\x01auth=Bearer {password}\x01\x01".encode()),
    }


def assert_no_secret(where: str, data: bytes | str, password: str = PASSWORD) -> None:
    blob = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    for form, value in secret_forms(password=password).items():
        assert value not in blob, f"{form} form of the password in {where}"


class Secrets:
    """A relayq config whose AUTH secret comes from `source`; secrets live outside rq.root."""

    def __init__(self, tmp_path: Path, source: str, smarthost: str, pki: TestPKI,
                 **settings: object) -> None:
        self.source = source
        self.vault = tmp_path / "vault"
        self.vault.mkdir(mode=0o700)
        self.pwcmd_seen = tmp_path / "rq" / "pwcmd-seen"  # inside rq.root: it is scanned
        self.pwcmd_seen.mkdir(parents=True)
        keys: dict[str, object] = {"user": USER, "auth_mechanism": MECHANISM[source].lower()}
        if source == "password":
            keys["password"] = PASSWORD
        else:
            store = self.vault / "secret"
            store.write_text(PASSWORD + "\n")
            store.chmod(0o600)
            if source == "password_file":
                keys["password_file"] = str(store)
            else:
                script = self.vault / "pwcmd.py"
                script.write_text(PWCMD)
                keys["password_command"] = f"{sys.executable} {script} {store} {self.pwcmd_seen}"
        self.rq = Relayq(tmp_path / "rq", smarthost=smarthost, tls="required",
                         ca_file=pki.write_ca(str(self.vault)), **keys, **settings)

    def scan_files(self) -> int:
        """Every file relayq could have written (queue, log, cache...): no secret form.

        The config file itself holds `password` in that mode and is skipped.
        """
        n = 0
        for dirpath, _, files in os.walk(self.rq.root):
            for name in files:
                path = Path(dirpath) / name
                if path == self.rq.config or path.is_symlink() or not path.is_file():
                    continue
                try:
                    data = path.read_bytes()
                except FileNotFoundError:  # renamed or removed since the listing
                    continue
                assert_no_secret(str(path), data)
                n += 1
        if self.source == "password_command":
            seen = list(self.pwcmd_seen.iterdir())
            assert seen, "the password command never ran"
            assert all(str(self.rq.config).encode() in p.read_bytes() for p in seen)
        return n


class GatedSmarthost(Smarthost):
    """Holds its answer to the final dot until `go` is set: relayq then has connected,
    authenticated and sent the message, and still holds the secret in memory."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reached = threading.Event()
        self.go = threading.Event()

    def _factory(self) -> Any:
        proto = super()._factory()
        original = proto._handle_hooks["DATA"]

        async def held(server: Any, session: Any, env: Any) -> Any:
            self.reached.set()
            await asyncio.get_running_loop().run_in_executor(None, self.go.wait, 30)
            return await original(server, session, env)

        proto._handle_hooks["DATA"] = held
        return proto


@pytest.fixture
def gated(pki: TestPKI) -> Iterator[GatedSmarthost]:
    sh = GatedSmarthost(tls_context=pki.server_context(), require_starttls=True,
                        auth={USER: PASSWORD}, auth_required=True)
    sh.start()
    yield sh
    sh.go.set()
    sh.stop()


def relayq_processes(rq: Relayq) -> dict[int, tuple[bytes, bytes]]:
    """pid -> (cmdline, environ) of every process started for this config (they all
    inherit RELAYQ_CONFIG: commands, background child, forked workers, agents, the
    daemon's listeners, the password command)."""
    marker = f"RELAYQ_CONFIG={rq.config}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found[int(entry)] = (cmdline, environ)
    return found


MODES = ["interactive", "background", "queue-run", "daemon"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", list(MECHANISM))
def test_D16_no_process_shows_the_password_in_argv_or_environment(
    tmp_path: Path, gated: GatedSmarthost, pki: TestPKI, source: str, mode: str
) -> None:
    """nullmailer 2.0 moved protocol passwords out of argv: while relayq delivers over
    TLS with AUTH (held at the final dot), no relayq process - command, background
    child, queue-run worker, daemon, delivery agent, forked listener, password
    command - has the secret in /proc/PID/cmdline or environ, and no file it wrote
    (queue, log, config cache) holds it or its base64 forms."""
    extra: dict[str, object] = {"concurrency": 2}
    if mode == "daemon":
        extra.update(pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                     listen=[f"127.0.0.1:{free_port()}"], smtp_processes=2)
    s = Secrets(tmp_path, source, gated.smarthost, pki, **extra)
    rq = s.rq
    daemon: DaemonProcess | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        if mode == "interactive":
            proc = subprocess.Popen([str(BIN / "sendmail"), "-odi", "bob@example.org"],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=rq.env)
            assert proc.stdin is not None
            proc.stdin.write(MSG)
            proc.stdin.close()
        elif mode == "background":
            assert rq.sendmail("-odb", "bob@example.org", input=MSG).returncode == EX_OK
        elif mode == "queue-run":
            submit(rq, "bob@example.org")
            proc = subprocess.Popen([str(BIN / "relayq"), "flush"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=rq.env)
        else:
            daemon = DaemonProcess(rq, "--listen").wait_ready()
            submit(rq, "bob@example.org")
        assert gated.reached.wait(30), rq.log()
        procs = relayq_processes(rq)
        for pid, (cmdline, environ) in procs.items():
            assert_no_secret(f"/proc/{pid}/cmdline", cmdline)
            assert_no_secret(f"/proc/{pid}/environ", environ)
        expected = {"interactive": 1, "background": 1, "queue-run": 2, "daemon": 4}[mode]
        assert len(procs) >= expected, procs  # daemon: itself, 2 agents, 1 listener
        if daemon is not None:
            assert daemon.proc.pid in procs
        assert s.scan_files() >= 3  # the queue's files of the message in flight, the log
        gated.go.set()
        wait_for(lambda: len(gated.transactions) == 1, what="the delivery")
        [t] = gated.transactions
        assert t.tls and t.auth_user == USER
        if proc is not None:
            assert proc.wait(30) == EX_OK
        if daemon is not None:
            assert daemon.stop() == EX_OK
        wait_for(lambda: not relayq_processes(rq), what="relayq's processes to end")
        assert rq.spool.ids() == []
        assert s.scan_files() >= 1
        assert f"authid={USER}, mech={MECHANISM[source]}, bits=0" in rq.log()  # AUTH=client
    finally:
        gated.go.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if daemon is not None:
            daemon.kill()


@pytest.mark.parametrize("command", [["sendmail", "-v", "-odi"], ["sendmail", "-v", "-q"],
                                     ["relayq", "-v", "flush"]],
                         ids=["sendmail-v", "sendmail-v-q", "relayq-v-flush"])
@pytest.mark.parametrize("source", list(MECHANISM))
def test_D16_the_verbose_transcript_masks_every_auth_secret(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI, source: str,
    command: list[str]
) -> None:
    """`-v` shows the SMTP dialogue on a terminal someone may be sharing: AUTH PLAIN,
    the two AUTH LOGIN answers and XOAUTH2 appear as ******** and never in base64."""
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: PASSWORD},
                           auth_required=True, require_starttls=True)
    s = Secrets(tmp_path, source, sh.smarthost, pki)
    rq = s.rq
    if command[-1] == "-odi":
        r = rq.run(*command, "bob@example.org", input=MSG)
    else:
        submit(rq, "bob@example.org")
        r = rq.run(*command)
    assert r.returncode == EX_OK, r.stderr
    out = r.stdout.decode()
    assert_no_secret(f"{' '.join(command)} stdout", r.stdout)
    assert_no_secret(f"{' '.join(command)} stderr", r.stderr)
    lines = out.splitlines()
    mech = MECHANISM[source]
    if mech == "LOGIN":
        at = lines.index(">>> AUTH LOGIN")
        assert lines[at + 1].startswith("334 ") and lines[at + 2] == ">>> ********"
        assert lines[at + 3].startswith("334 ") and lines[at + 4] == ">>> ********"
    else:
        assert f">>> AUTH {mech} ********" in lines
    assert any(ln.startswith("235 ") for ln in lines), out
    assert "bob@example.org... Sent (" in out
    [t] = sh.transactions
    assert t.auth_user == USER and t.tls
    s.scan_files()


def _admin_outputs(rq: Relayq) -> dict[str, subprocess.CompletedProcess[bytes]]:
    commands = {
        "mailq": ("mailq",), "mailq -v": ("mailq", "-v"), "mailq --json": ("mailq", "--json"),
        "sendmail -bp": ("sendmail", "-bp"), "relayq mailq --json": ("relayq", "mailq", "--json"),
        "relayq check-config": ("relayq", "check-config"),
        "relayq status": ("relayq", "status"), "relayq status --json": ("relayq", "status",
                                                                         "--json"),
    }
    return {name: rq.run(*argv) for name, argv in commands.items()}


@pytest.mark.parametrize("source", list(MECHANISM))
def test_D16_a_refused_login_leaves_no_secret_in_mailq_the_log_or_check_config(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI, source: str
) -> None:
    """A smarthost answering 535: the deferral reason kept for mailq and the log names
    the failure but never the credentials; every listing and config printout (mailq,
    -v, --json, check-config, status) is free of them, cached config included."""
    sh = smarthost_factory(tls_context=pki.server_context(), auth={USER: "another-password"},
                           auth_required=True, require_starttls=True)
    s = Secrets(tmp_path, source, sh.smarthost, pki)
    rq = s.rq
    qid = submit(rq, "bob@example.org")
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    env = envelope(rq, qid)
    mech = MECHANISM[source]
    reason = f"AUTH {mech} failed at [127.0.0.1]: 535 5.7.8 Authentication credentials invalid"
    assert env.recipients[0].state == PENDING and env.recipients[0].reply == reason
    assert reason in rq.log()
    outputs = _admin_outputs(rq)
    for name, r in outputs.items():
        assert r.returncode == EX_OK, (name, r.stderr)
        assert_no_secret(name, r.stdout + r.stderr)
    listing = json.loads(outputs["mailq --json"].stdout)
    assert reason in json.dumps(listing)
    assert reason in outputs["mailq -v"].stdout.decode()
    assert f"(Deferred: AUTH {mech} failed at [127.0.0.1]: 535" in outputs["mailq"].stdout.decode()
    shown = outputs["relayq check-config"].stdout.decode()
    if source == "password":
        assert 'password = "********"' in shown
    elif source == "password_file":
        assert f'password_file = "{s.vault / "secret"}"' in shown
    else:
        # the program is named; its arguments may hold a token (masked since review 15)
        assert f'password_command = "{sys.executable} ********"' in shown
    cache = rq.root / "cache"
    if source == "password":
        assert not cache.exists() or not any(cache.iterdir())  # a secret is never copied
    else:
        assert any(cache.iterdir())  # cached, and (scan_files) without the secret
    assert s.scan_files() >= 3
    assert sh.transactions == []


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_D16_a_server_echoing_the_credentials_cannot_put_them_in_the_log_or_mailq(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI, mech: str
) -> None:
    """Some servers quote the refused line: `535 ... AUTH PLAIN <base64>`. The refusal is
    kept (it becomes the deferral reason, and a bounce's reason when the message
    expires, read by whoever sent the mail) and shown with the credentials masked: in
    the -v transcript, the log, mailq and the queue files."""

    def script(s: RawSession) -> None:
        s.send(b"220 echo.example.org ESMTP\r\n")
        tls = False
        while line := s.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                s.send(b"250-echo.example.org\r\n" + (b"250 AUTH PLAIN LOGIN\r\n" if tls
                                                      else b"250 STARTTLS\r\n"))
            elif verb == b"STARTTLS":
                s.send(b"220 go ahead\r\n")
                s.starttls(pki.server_context())
                tls = True
            elif verb == b"AUTH" and b" LOGIN" in line.upper():
                s.send(b"334 VXNlcm5hbWU6\r\n")
                s.readline()
                s.send(b"334 UGFzc3dvcmQ6\r\n")
                s.send(b"535 5.7.8 refused: " + s.readline().strip() + b"\r\n")
            elif verb == b"AUTH":
                s.send(b"535 5.7.8 refused: " + line.strip() + b"\r\n")
            elif verb == b"QUIT":
                s.send(b"221 bye\r\n")
                return
            else:
                s.send(b"503 5.5.1 authenticate first\r\n")

    srv = smarthost_factory.scripted(script=script)
    s = Secrets(tmp_path, "password", srv.smarthost, pki)
    rq = s.rq
    rq.configure(auth_mechanism=mech.lower())
    r = rq.sendmail("-v", "-odi", "bob@example.org", input=MSG)
    assert r.returncode == EX_OK, r.stderr
    wire = secret_forms()["AUTH PLAIN" if mech == "PLAIN" else "AUTH LOGIN"]
    assert wire in srv.received  # it did go on the wire, inside TLS
    assert_no_secret("sendmail -v output", r.stdout + r.stderr)
    echoed = "535 5.7.8 refused: " + ("AUTH PLAIN ********" if mech == "PLAIN" else "********")
    assert echoed in r.stdout.decode().splitlines()
    [qid] = rq.spool.ids()
    [rcpt] = envelope(rq, qid).recipients
    assert rcpt.state == PENDING
    assert rcpt.reply == f"AUTH {mech} failed at [127.0.0.1]: {echoed}"
    assert rcpt.reply in rq.log()
    for name, out in _admin_outputs(rq).items():
        assert_no_secret(name, out.stdout + out.stderr)
    s.scan_files()


@pytest.mark.parametrize("where", ["config", "password_file"])
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640])
def test_D16_a_secret_readable_beyond_its_owner_is_refused_naming_file_and_mode(
    tmp_path: Path, where: str, mode: int
) -> None:
    """msmtp refuses a secret file others can read: a config holding a password, or a
    password_file, readable by others (or by a group other than root/relayq) stops
    relayq with exit 78 and one line naming the file and its mode."""
    rq = Relayq(tmp_path, user=USER)
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    if where == "config":
        rq.configure(password=PASSWORD)
        path = rq.config
    else:
        rq.configure(password_file=str(secret))
        path = secret
    try:
        os.chown(path, -1, grp.getgrnam("www-data").gr_gid)
    except (KeyError, PermissionError):
        if mode & 0o040:
            pytest.skip("needs the www-data group and the right to chown")
    path.chmod(mode)
    r = rq.sendmail("-odq", "bob@example.org", input=MSG)
    assert r.returncode == EX_CONFIG
    err = assert_one_line_error(r)
    assert str(path) in err and f"{mode:04o}" in err
    assert_no_secret("the refusal", r.stderr)
    assert not rq.queue_dir.exists() or rq.spool.ids() == []
    path.chmod(0o600)
    assert rq.sendmail("-odq", "bob@example.org", input=MSG).returncode == EX_OK


# == D18: broken servers =======================================================================

EHLO_PLAIN = b"250-raw.example.org\r\n250 8BITMIME\r\n"
BROKEN = {
    "extra-250-before-MAIL-reply": {"MAIL": b"250 2.1.0 unsolicited\r\n250 2.1.0 Ok\r\n"},
    "1MB-single-line-reply": {"EHLO": b"250-" + b"x" * 1_000_000 + b"\r\n250 ok\r\n"},
    "100k-continuation-lines": {"EHLO": b"250-x\r\n" * 100_000 + b"250 ok\r\n"},
    "250-for-the-dot-before-the-data": {"DATA": b"354 go ahead\r\n250 2.0.0 queued early\r\n",
                                        ".": b"554 5.6.0 message refused\r\n"},
}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lock-step"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_D18_a_broken_server_reply_defers_closes_and_marks_nothing_delivered(
    tmp_path: Path, smarthost_factory: SmarthostFactory, case: str, pipelining: bool
) -> None:
    """aiosmtplib paired replies with the wrong command after unsolicited lines and kept
    endless ones (5.1.2): each such reply is a protocol error for that connection - the
    message is deferred (4.5.0), the connection is not used again, no recipient is
    taken as delivered - and a sane relay later gets every recipient exactly once."""
    replies: dict[str, bytes | list[bytes]] = dict(BROKEN[case])
    if not pipelining and "EHLO" not in replies:
        replies["EHLO"] = EHLO_PLAIN
    srv = smarthost_factory.scripted(replies=replies)
    rq = Relayq(tmp_path, smarthost=srv.smarthost, concurrency=1)
    qids = [submit(rq, "bob@example.org", "carol@example.org") for _ in range(2)]
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    # dropped, never reused: a relay broken at EHLO is not tried again in this run
    # (the host status), one broken in a transaction gets a new connection per message
    assert srv.sessions == (1 if "EHLO" in BROKEN[case] else 2)
    assert srv.messages == []  # no message data was ever sent
    for qid in qids:
        env = envelope(rq, qid)
        assert [r.state for r in env.recipients] == [PENDING, PENDING], env.recipients
        assert env.error.startswith("Deferred: ")
        lines = run_log(rq, f"{qid}: to=<")
        assert len(lines) == 2, lines
        for line in lines:
            assert "dsn=4.5.0" in line and "stat=Deferred: " in line, line
    good = smarthost_factory()
    rq.configure(smarthost=good.smarthost)
    assert rq.sendmail("-q").returncode == EX_OK
    assert sorted(r for t in good.transactions for r in t.rcpt_tos) == [
        "bob@example.org", "bob@example.org", "carol@example.org", "carol@example.org"]


def test_D18_a_reply_split_one_byte_per_segment_is_read_correctly(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """A reply arriving one byte per TCP segment is slow, not wrong: it is reassembled,
    and the message goes once."""
    srv = smarthost_factory.scripted(segment=1)
    rq = Relayq(tmp_path, smarthost=srv.smarthost)
    qid = submit(rq, "bob@example.org", "carol@example.org")
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(srv.messages) == 1 and rq.spool.ids() == []
    assert b"RCPT TO:<carol@example.org>" in srv.received
    [line, _] = run_log(rq, f"{qid}: to=<")
    assert "stat=Sent (Ok: queued)" in line


PEAK_RSS = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
proc.returncode = os.waitstatus_to_exitcode(status)
print(proc.returncode, usage.ru_maxrss)
"""


def _peak_rss_kib(rq: Relayq, *argv: str) -> tuple[int, int]:
    """Run an installed command; its exit status and peak resident size in KiB.

    Measured by a small parent of its own: a child's ru_maxrss starts at its parent's
    size at fork (the kernel keeps the larger of the old and new image at exec), and
    pytest is large.
    """
    r = subprocess.run([sys.executable, "-S", "-c", PEAK_RSS, str(BIN / argv[0]), *argv[1:]],
                       env=rq.env, capture_output=True, text=True, check=True, timeout=60)
    code, kib = r.stdout.split()
    return int(code), int(kib)


@pytest.mark.parametrize("reply", [b"250-" + b"x" * 16_000_000 + b"\r\n250 ok\r\n",
                                   b"250-x\r\n" * 2_000_000 + b"250 ok\r\n"],
                         ids=["16MB-line", "2M-continuation-lines"])
def test_D18_a_reply_bomb_does_not_grow_relayqs_memory(
    tmp_path: Path, smarthost_factory: SmarthostFactory, reply: bytes
) -> None:
    """aiosmtplib 5.1.2: endless continuation lines took unbounded memory. The whole
    `sendmail -q` process stays within a few MB of a normal run's peak."""
    good = smarthost_factory.scripted()
    (tmp_path / "good").mkdir()
    (tmp_path / "bomb").mkdir()
    rq = Relayq(tmp_path / "good", smarthost=good.smarthost, concurrency=1)
    submit(rq, "bob@example.org")
    code, baseline = _peak_rss_kib(rq, "sendmail", "-q")
    assert code == EX_OK and len(good.messages) == 1
    bomb = smarthost_factory.scripted(replies={"EHLO": reply})
    rq = Relayq(tmp_path / "bomb", smarthost=bomb.smarthost, concurrency=1)
    qid = submit(rq, "bob@example.org")
    code, peak = _peak_rss_kib(rq, "sendmail", "-q")
    assert code == EX_TEMPFAIL
    assert envelope(rq, qid).recipients[0].state == PENDING
    assert peak - baseline < 8 * 1024, (baseline, peak)  # the reply is 14 to 16 MB


# -- sanity of the helpers themselves --------------------------------------------------------


def test_D16_the_secret_scanners_do_find_a_leak(tmp_path: Path) -> None:
    """The checks above must be able to fail: a planted secret is found in a file, in
    its base64 forms, and in a process's environment."""
    for form in secret_forms().values():
        with pytest.raises(AssertionError):
            assert_no_secret("planted", b"xx " + form + b" yy")
    rq = Relayq(tmp_path)
    leaky = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={**rq.env, "LEAK": PASSWORD})
    try:
        procs = relayq_processes(rq)
        assert leaky.pid in procs
        with pytest.raises(AssertionError):
            assert_no_secret("environ", procs[leaky.pid][1])
    finally:
        leaky.kill()
        leaky.wait(5)
