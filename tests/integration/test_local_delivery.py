"""Local delivery: aliases, mbox and Maildir read back with Python's mailbox module.

Most tests run the installed `sendmail` against a private config whose
mail_spool and aliases file live in a temporary folder; the recipient is the
user running the tests. Where a test needs a short lock timeout or a fake
home directory it runs the Runner in-process.
"""

from __future__ import annotations

import email
import mailbox as pymailbox
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq, assert_one_line_error

from relayq.core.envelope import FAILED, PENDING, SENT, Recipient
from relayq.core.errors import EX_NOUSER, EX_OK
from relayq.delivery import mailbox
from relayq.delivery.local_transport import LocalTransport, User
from relayq.delivery.runner import Runner
from relayq.queue.submit import Context
from relayq.system import configfile
from relayq.system.log import Log

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

ME = pwd.getpwuid(os.getuid()).pw_name
IS_ROOT = os.geteuid() == 0
NULL = ("", "<>")
MSG = (b"From: alice@example.org\nSubject: hello\n\n"
       b"first line\nFrom the start of a line\n>From quoted\nlast\n")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder every user may write (files and pipes run as nobody under root)."""
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="relayq-local-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    spool = tmp_path / "mail"
    spool.mkdir()
    (tmp_path / "aliases").write_text("")
    return Relayq(tmp_path, local_delivery=True, mail_spool=str(spool),
                  aliases_file=str(tmp_path / "aliases"))


def aliases(rq: Relayq, text: str) -> None:
    (rq.root / "aliases").write_text(text)


def read_mbox(path: Path | str) -> list[pymailbox.mboxMessage]:
    box = pymailbox.mbox(str(path), create=False)
    try:
        return list(box)
    finally:
        box.close()


def mbox_of(rq: Relayq, user: str = ME) -> list[pymailbox.mboxMessage]:
    return read_mbox(rq.root / "mail" / user)


def send(rq: Relayq, *rcpts: str, msg: bytes = MSG) -> None:
    r = rq.sendmail("-f", "alice@example.org", *rcpts, input=msg)
    assert r.returncode == EX_OK, r.stderr


def runner(rq: Relayq, **users: User) -> Runner:
    """An in-process runner; `users` replaces the passwd lookups when given."""
    cfg = configfile.load(str(rq.config), explicit=True)
    ctx = Context(cfg)
    run = Runner(cfg, rq.spool, Log(use_syslog=False, path=str(rq.log_file)), ctx)
    if users:
        run._local = LocalTransport(cfg, ctx.domain, ctx.local, users=users.get,
                                    lock_timeout=0.3)
    else:
        run._local = LocalTransport(cfg, ctx.domain, ctx.local, lock_timeout=0.3)
    return run


# -- mbox and Maildir ------------------------------------------------------------


def test_mbox_delivery_read_back_with_mailbox_module(rq: Relayq) -> None:
    rq.configure(concurrency=1)  # one worker: the mailbox keeps the queue's order
    send(rq, ME)
    send(rq, f"{ME}@localhost", msg=MSG.replace(b"hello", b"again"))
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.queued() == []
    msgs = mbox_of(rq)
    assert [m["Subject"] for m in msgs] == ["hello", "again"]
    first = msgs[0]
    assert first.get_from().startswith("alice@example.org ")
    assert first["Return-Path"] == "<alice@example.org>"
    assert first["Delivered-To"] == f"{ME}@host.example.org"
    body = first.get_payload()
    assert body == "first line\n>From the start of a line\n>From quoted\nlast\n"
    raw = (rq.root / "mail" / ME).read_bytes()
    assert raw.count(b"\nFrom ") == 1 and raw.startswith(b"From alice@example.org ")
    assert raw.endswith(b"last\n\n")
    assert "mailer=local" in rq.log() and "stat=Sent (delivered to mailbox" in rq.log()


def test_maildir_delivery_read_back(rq: Relayq, tmp_path: Path) -> None:
    rq.configure(mailbox_format="maildir")
    home = tmp_path / "home"
    home.mkdir()
    me = pwd.getpwuid(os.getuid())
    send(rq, "carol")
    run = runner(rq, carol=User("carol", me.pw_uid, me.pw_gid, str(home)))
    assert run.run(force=True) == 0
    [msg] = list(pymailbox.Maildir(str(home / "Maildir"), create=False))
    assert msg["Subject"] == "hello" and msg["Delivered-To"] == "carol@host.example.org"
    assert msg.get_payload().startswith("first line\nFrom the start")  # no escaping in Maildir
    assert os.listdir(home / "Maildir" / "tmp") == []
    assert len(os.listdir(home / "Maildir" / "new")) == 1


def test_mbox_write_error_truncates_to_the_old_length(tmp_path: Path) -> None:
    """A file-size limit makes the write fail half-way: the mailbox is as before."""
    box = tmp_path / "box"
    box.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: old\n\nold\n\n")
    before = box.read_bytes()
    data = tmp_path / "data"
    data.write_bytes(b"Subject: big\n\n" + b"x" * 200_000 + b"\n")
    code = f"""
import resource, signal, sys
from relayq.delivery import mailbox
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    with open({str(data)!r}, "rb") as f:
        mailbox.append_mbox({str(box)!r}, f, sender="a@b", recipient="c@d", now=0.0,
                            dotlock=False)
except mailbox.MailboxError as exc:
    print(exc.status, exc.message)
    sys.exit(3)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 3, r.stderr
    assert r.stdout.startswith("4.2.2 ")
    assert box.read_bytes() == before


# -- locking ---------------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_fcntl_lock_makes_delivery_wait_then_defer(tmp_path: Path) -> None:
    box = tmp_path / "box"
    data = tmp_path / "data"
    data.write_bytes(b"Subject: x\n\nbody\n")
    holder = hold_lock(box, 30)
    try:
        with open(data, "rb") as f, pytest.raises(mailbox.MailboxError,
                                                  match=r"locked \(fcntl\)") as info:
            mailbox.append_mbox(str(box), f, sender="a@b", recipient="c@d", now=0.0,
                                timeout=0.3)
        assert info.value.temporary
        assert box.read_bytes() == b"" and not (tmp_path / "box.lock").exists()
    finally:
        holder.kill()
        holder.communicate()
    holder = hold_lock(box, 0.5)  # released while we wait
    try:
        started = time.monotonic()
        with open(data, "rb") as f:
            mailbox.append_mbox(str(box), f, sender="a@b", recipient="c@d", now=0.0,
                                timeout=10)
        assert time.monotonic() - started >= 0.3
    finally:
        holder.communicate()
    assert len(read_mbox(box)) == 1


def test_dotlock_present_defers_and_a_stale_one_is_broken(rq: Relayq) -> None:
    send(rq, ME)
    lock = rq.root / "mail" / f"{ME}.lock"
    lock.write_text("12345\n")
    run = runner(rq)
    assert run.run(force=True) == 1
    [(env, _)] = rq.queued()
    [r] = env.recipients
    assert r.state == PENDING and "locked (dotlock)" in r.reply
    assert not (rq.root / "mail" / ME).exists() and lock.exists()
    old = time.time() - mailbox.DOTLOCK_STALE - 60
    os.utime(lock, (old, old))
    assert runner(rq).run(force=True) == 0
    assert len(mbox_of(rq)) == 1 and not lock.exists()


# -- refused mailboxes -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "directory"])
def test_unsafe_mailbox_is_refused_and_target_untouched(rq: Relayq, kind: str) -> None:
    box = rq.root / "mail" / ME
    target = rq.root / "mail" / "victim"
    target.write_bytes(b"precious\n")
    if kind == "symlink":
        box.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, box)
    elif kind == "fifo":
        os.mkfifo(box)
    else:
        box.mkdir()
    send(rq, ME)
    rq.sendmail("-q")
    assert target.read_bytes() == b"precious\n"
    [(env, _)] = rq.queued()
    assert env.recipients[0].state == PENDING
    assert "refused" in env.recipients[0].reply and "refused" in rq.log()


# -- aliases -----------------------------------------------------------------------


def test_alias_to_a_remote_address_reaches_the_smarthost(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    aliases(rq, "# cron mail for root reaches a person\noperator: admin@example.org\n")
    send(rq, "operator")
    assert rq.sendmail("-q").returncode == EX_OK
    [t] = sh.transactions
    assert t.mail_from == "alice@example.org" and t.rcpt_tos == ["admin@example.org"]
    assert b"Subject: hello" in t.content
    assert "stat=Sent (expanded to admin@example.org)" in rq.log()
    assert rq.queued() == []


def test_nested_aliases_local_and_remote_and_no_second_delivery(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    aliases(rq, f"postmaster: ops\nops: {ME}, admin@example.org, ops-archive\n"
                f"ops-archive: \\{ME}\n")
    send(rq, "postmaster@localhost")
    assert rq.sendmail("-q").returncode != EX_OK  # smarthost down: the remote part waits
    [(env, _)] = rq.queued()
    states = {r.address: r.state for r in env.recipients}
    assert states == {"postmaster@localhost": SENT, f"\\{ME}": SENT,
                      "admin@example.org": PENDING}
    assert env.recipients[0].reply.startswith("250 2.1.5 expanded to ")
    assert len(mbox_of(rq)) == 1
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-q").returncode == EX_OK
    assert [t.rcpt_tos for t in sh.transactions] == [["admin@example.org"]]
    assert len(mbox_of(rq)) == 1  # the local copy was never written twice
    assert rq.queued() == []


def test_alias_loop_is_detected_and_bounced(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    aliases(rq, "a: b\nb: c@host.example.org\nc: a\n")
    send(rq, "a")
    rq.sendmail("-q")
    [bounce] = [t for t in sh.transactions if t.mail_from in NULL]
    assert bounce.rcpt_tos == ["alice@example.org"]
    assert b"alias loop: a -> b -> c -> a" in bounce.content
    assert b"5.4.6" in bounce.content
    assert rq.queued() == []


def test_unknown_user_bounces(rq: Relayq, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    send(rq, "no-such-user-here")
    rq.sendmail("-q")
    [bounce] = sh.transactions
    assert bounce.mail_from in NULL and bounce.rcpt_tos == ["alice@example.org"]
    report = email.message_from_bytes(bounce.content)
    assert report.get_content_type() == "multipart/report"
    assert b"<no-such-user-here@host.example.org>... User unknown" in bounce.content
    assert b"5.1.1" in bounce.content


def test_unknown_user_in_interactive_mode_exits_67(rq: Relayq) -> None:
    r = rq.sendmail("-odi", "-f", "<>", "no-such-user-here", input=MSG)
    assert r.returncode == EX_NOUSER, r.stderr


def test_unknown_member_of_an_alias_bounces_alone(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    aliases(rq, f"staff: {ME}, ghost-user-x\n")
    send(rq, "staff")
    rq.sendmail("-q")
    assert len(mbox_of(rq)) == 1
    [bounce] = sh.transactions
    assert b"<ghost-user-x@host.example.org>... User unknown" in bounce.content


def test_include_file(rq: Relayq, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    team = rq.root / "team.list"
    team.write_text(f"# the team\n{ME}\ncarol@example.net, dave@example.net\n")
    aliases(rq, f"team: :include:{team}\n")
    send(rq, "team")
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(mbox_of(rq)) == 1
    [t] = sh.transactions
    assert t.rcpt_tos == ["carol@example.net", "dave@example.net"]


def test_looks_like_a_pipe_is_never_run_unless_an_alias_names_it(
    rq: Relayq, shared_dir: Path
) -> None:
    """A recipient written "|command" by a submitter is an unknown user, not a command."""
    rq.configure(allow_pipe_targets=True)
    marker = shared_dir / "pwned"
    send(rq, ME)
    spool = rq.spool
    [qid] = spool.ids()
    env = spool.read_envelope(qid)
    env.recipients.append(Recipient(f"|touch {marker}"))
    spool.write_envelope(env)
    rq.sendmail("-q")
    assert not marker.exists()
    assert "no alias of this message names it" in rq.log()


# -- files and pipes -------------------------------------------------------------------


def test_file_and_pipe_targets_are_refused_by_default(
    rq: Relayq, smarthost_factory: SmarthostFactory, shared_dir: Path
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    aliases(rq, f"archive: {shared_dir}/archive\nhook: \"|touch {shared_dir}/ran\"\n")
    send(rq, "archive", "hook")
    rq.sendmail("-q")
    assert os.listdir(shared_dir) == []
    [bounce] = sh.transactions
    assert b"Cannot mail directly to files" in bounce.content
    assert b"Cannot mail directly to programs" in bounce.content


def test_file_and_pipe_targets_when_enabled(rq: Relayq, shared_dir: Path) -> None:
    rq.configure(allow_file_targets=True, allow_pipe_targets=True)
    out = shared_dir / "piped"
    aliases(rq, f"archive: {shared_dir}/archive\n"
                f"hook: \"|cat > {out}; echo $HOME $SENDER > {out}.env\"\n")
    send(rq, "archive", "hook")
    assert rq.sendmail("-q").returncode == EX_OK
    [msg] = read_mbox(shared_dir / "archive")
    assert msg["Subject"] == "hello"
    piped = email.message_from_bytes(out.read_bytes())
    assert piped["Subject"] == "hello" and piped["Return-Path"] == "<alice@example.org>"
    assert (shared_dir / "piped.env").read_text().split()[-1] == "alice@example.org"
    if IS_ROOT:  # never as root: the alias names no real user, so nobody
        assert (shared_dir / "archive").stat().st_uid == 65534
        assert out.stat().st_uid == 65534


def test_pipe_exit_status(rq: Relayq, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, allow_pipe_targets=True)
    aliases(rq, "later: \"|exit 75\"\nbroken: \"|echo no such list >&2; exit 1\"\n")
    send(rq, "later", "broken")
    rq.sendmail("-q")
    [(env, _)] = rq.queued()
    states = {r.address: r.state for r in env.recipients}
    assert states["|exit 75"] == PENDING
    assert states["|echo no such list >&2; exit 1"] == FAILED
    [bounce] = sh.transactions
    assert b"exit status 1: no such list" in bounce.content


# -- privileges ------------------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
def test_mailbox_is_written_by_its_user_never_root(rq: Relayq, shared_dir: Path) -> None:
    rq.configure(mail_spool=str(shared_dir))
    send(rq, "nobody")
    assert rq.sendmail("-q").returncode == EX_OK
    box = shared_dir / "nobody"
    assert box.stat().st_uid == 65534 and box.stat().st_gid == 65534
    assert len(read_mbox(box)) == 1


@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
def test_a_spool_like_var_mail_is_used_with_group_mail(rq: Relayq, shared_dir: Path) -> None:
    """root:mail 2775, as on Debian: the user's child gets group mail for the dotlock."""
    import grp

    mail_gid = grp.getgrnam("mail").gr_gid
    spool = shared_dir / "spool"
    spool.mkdir()
    os.chown(spool, 0, mail_gid)
    spool.chmod(0o2775)
    rq.configure(mail_spool=str(spool))
    for _ in range(2):
        send(rq, "nobody")
        assert rq.sendmail("-q").returncode == EX_OK
    box = spool / "nobody"
    assert (box.stat().st_uid, box.stat().st_gid) == (65534, mail_gid)
    assert len(read_mbox(box)) == 2 and not (spool / "nobody.lock").exists()


@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
def test_a_mailbox_owned_by_someone_else_is_refused(rq: Relayq, shared_dir: Path) -> None:
    rq.configure(mail_spool=str(shared_dir))
    box = shared_dir / "nobody"
    box.write_bytes(b"")  # owned by root: nobody cannot (and must not) append to it
    send(rq, "nobody")
    rq.sendmail("-q")
    assert box.read_bytes() == b""
    [(env, _)] = rq.queued()
    assert env.recipients[0].state == PENDING


# -- the null client -------------------------------------------------------------------


def test_without_local_delivery_local_names_are_relayed_qualified(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    (tmp_path / "aliases").write_text("root: admin@example.org\n")
    rq.configure(aliases_file=str(tmp_path / "aliases"))
    send(rq, "root")
    assert rq.sendmail("-q").returncode == EX_OK
    [t] = sh.transactions
    assert t.rcpt_tos == ["root@host.example.org"]


# -- newaliases --------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [["newaliases"], ["sendmail", "-bi"], ["relayq", "newaliases"]])
def test_newaliases_checks_and_counts(rq: Relayq, cmd: list[str]) -> None:
    aliases(rq, "# comment\nroot: admin@example.org\npostmaster: root\n")
    r = rq.run(*cmd)
    assert r.returncode == EX_OK, r.stderr
    assert r.stdout.decode() == (
        f"{rq.root}/aliases: 2 aliases, longest 18 bytes, 39 bytes total\n")
    aliases(rq, "root: admin@example.org\nbroken line\n")
    r = rq.run(*cmd)
    assert r.returncode == 65
    assert f"{rq.root}/aliases:2: missing ':'" in assert_one_line_error(r)
    rq.configure(aliases_file=str(rq.root / "aliases" / "not-a-dir"))
    r = rq.run(*cmd)
    assert r.returncode == 78
    assert "aliases_file: cannot read" in assert_one_line_error(r)
    rq.configure(aliases_file=str(rq.root / "missing"))
    r = rq.run(*cmd)
    assert r.returncode == EX_OK and b"no aliases" in r.stdout


def test_a_broken_aliases_file_defers_local_mail(rq: Relayq) -> None:
    aliases(rq, "root admin@example.org\n")
    send(rq, ME)
    rq.sendmail("-q")
    [(env, _)] = rq.queued()
    assert env.recipients[0].state == PENDING
    assert "aliases:1: missing ':'" in env.recipients[0].reply
