"""Real Debian programs handing mail to relayq's `sendmail`, and what the smarthost gets.

Every test runs the installed commands as subprocesses against a private
config and queue (tests.helpers.relayq_env.Relayq) and a recording smarthost
on 127.0.0.1; nothing is mocked. Programs: s-nail, git send-email, PHP's
mail(), cron's exact command line, and the seed's queue-run commands.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq
from tests.integration.test_daemon import wait_for

from relayq.core.errors import EX_NOPERM, EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE

if TYPE_CHECKING:
    from collections.abc import Iterator
    from email.message import EmailMessage
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory, Transaction

SENDMAIL = str(BIN / "sendmail")
DOMAIN = "host.example.org"


# --- helpers ---------------------------------------------------------------------


def local_user() -> str:
    """The login name relayq's sendmail uses as the envelope sender (its _user() rules)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
    if uid == 0:
        try:
            login = os.getlogin()
            pwd.getpwnam(login)
            name = login
        except (OSError, KeyError):
            pass
    return name




def parse(t: Transaction) -> EmailMessage:
    msg = email.message_from_bytes(lf(t.content), policy=email.policy.default)
    return msg  # type: ignore[return-value]


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def body_of(t: Transaction) -> bytes:
    return lf(t.content).split(b"\n\n", 1)[1]


def header_lines(t: Transaction) -> list[bytes]:
    return lf(t.content).split(b"\n\n", 1)[0].split(b"\n")


def queue_files(rq: Relayq) -> list[str]:
    try:
        return sorted(os.listdir(rq.spool.queue))
    except FileNotFoundError:
        return []


def queue_empty(rq: Relayq) -> bool:
    return rq.spool.ids() == [] and queue_files(rq) == []


def run(args: list[str], rq: Relayq, *, input: bytes = b"", cwd: Path | None = None,
        extra_env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    env = rq.env
    env.update(extra_env or {})
    return subprocess.run(args, input=input, env=env, cwd=cwd, capture_output=True,
                          timeout=timeout, check=False)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting gets ECONNREFUSED, no race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (make test-deps installs it)")
    return path


# --- s-nail / mail ----------------------------------------------------------------


def snail(rq: Relayq, home: Path, *args: str, body: bytes,
          prog: str = "s-nail") -> subprocess.CompletedProcess[bytes]:
    # -n: no system-wide s-nail.rc; HOME: no ~/.mailrc; s-nail waits for the MTA (sendwait)
    return run([need(prog), "-n", "-S", f"mta={SENDMAIL}", *args], rq, input=body,
               extra_env={"HOME": str(home), "LC_ALL": "C.UTF-8", "MAILRC": "/dev/null"})


def test_snail_subject_to_and_body_arrive(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = snail(rq, tmp_path, "-s", "disk report", "bob@example.org",
              body=b"line one\n.\n..two\nFrom here\n")
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert t.mail_from == f"{local_user()}@{DOMAIN}"
    assert t.rcpt_tos == ["bob@example.org"]
    msg = parse(t)
    assert msg["Subject"] == "disk report"
    assert msg["To"] == "bob@example.org"
    assert msg["From"].addresses[0].addr_spec == f"{local_user()}@{DOMAIN}"
    assert msg["Message-ID"] and msg["Date"]
    # s-nail passes `-i -- rcpt` (a lone dot is text) and quoted-printable-encodes
    # lines that start with "." or "From "
    assert msg.get_content() == "line one\n.\n..two\nFrom here\n"
    assert queue_empty(rq)


def test_snail_utf8_subject_and_body(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    subject = "Grüße aus Köln ☃"
    text = "Käse für alle — 10 €\nzweite Zeile ñ\n"
    r = snail(rq, tmp_path, "-s", subject, "bob@example.org", body=text.encode())
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    msg = parse(t)
    assert msg["Subject"] == subject
    assert msg.get_content_charset() == "utf-8"
    assert msg.get_content() == text


def test_snail_8bit_transfer_encoding_gets_8bitmime(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    text = "Käse für alle — 10 €\n"
    r = snail(rq, tmp_path, "-S", "mime-encoding=8bit", "-s", "8bit", "bob@example.org",
              body=text.encode())
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert "BODY=8BITMIME" in t.mail_options
    assert body_of(t) == text.encode()  # raw bytes, unchanged
    assert parse(t)["Content-Transfer-Encoding"] == "8bit"


def test_snail_sender_cc_bcc_and_local_recipient(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    # s-nail passes: -i -F "Alice Example" -f alice@example.org -- bob erin carol dave
    r = snail(rq, tmp_path, "-r", "Alice Example <alice@example.org>", "-s", "team",
              "-c", "carol@example.org", "-b", "dave@example.org", "bob@example.org", "erin",
              body=b"hello team\n")
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert t.mail_from == "alice@example.org"
    assert t.rcpt_tos == ["bob@example.org", f"erin@{DOMAIN}", "carol@example.org",
                          "dave@example.org"]
    msg = parse(t)
    assert msg["From"] == "Alice Example <alice@example.org>"
    assert msg["To"] == f"bob@example.org, erin@{DOMAIN}"
    assert msg["Cc"] == "carol@example.org"
    assert b"dave" not in t.content  # the Bcc recipient is in the envelope only
    assert body_of(t) == b"hello team\n"


def test_mail_alias_of_snail(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    path = shutil.which("mail")
    if path is None or "s-nail" not in os.path.realpath(path):
        pytest.skip("`mail` is not s-nail's alias on this machine")
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = snail(rq, tmp_path, "-s", "via mail", "bob@example.org", body=b"hi\n", prog="mail")
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert parse(t)["Subject"] == "via mail" and body_of(t) == b"hi\n"


# --- git send-email ---------------------------------------------------------------

GIT_ID = ["-c", "user.name=Alice Example", "-c", "user.email=alice@example.org"]
COMMIT_MSG = "Add notes\n\nA line with a dot follows:\n.\n..two dots\nFrom the start of a line\n"


def make_patch(tmp_path: Path, utf8: bool = False) -> tuple[Path, dict[str, str]]:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_DATE": "2026-11-24T19:20:07Z",
        "GIT_COMMITTER_DATE": "2026-11-24T19:20:07Z", "LC_ALL": "C.UTF-8",
    }
    full = {**os.environ, **env}

    def git(*args: str) -> None:
        subprocess.run(["git", *GIT_ID, *args], cwd=repo, env=full, check=True,
                       capture_output=True, timeout=30)

    git("init", "-q")
    (repo / "notes.txt").write_text("first\n")
    git("add", "notes.txt")
    git("commit", "-q", "-m", "Initial")
    text = "first\n.\nsecond with trailing spaces   \n\ttab\n"
    if utf8:
        text += "Grüße aus Köln €\n"
    (repo / "notes.txt").write_text(text, encoding="utf-8")
    git("commit", "-q", "-a", "-m", COMMIT_MSG)
    git("format-patch", "-q", "-1", "-o", str(tmp_path / "out"))
    [patch] = sorted((tmp_path / "out").iterdir())
    return patch, env


def need_send_email() -> None:
    need("git")
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True,
                               check=True).stdout.strip()
    if not os.path.exists(os.path.join(exec_path, "git-send-email")):
        pytest.skip("git send-email (git-email) is not installed")


def send_email(rq: Relayq, patch: Path, env: dict[str, str],
               *extra: str) -> subprocess.CompletedProcess[bytes]:
    args = [
        "git", *GIT_ID, "send-email", f"--smtp-server={SENDMAIL}", "--to=bob@example.org",
        "--from=Alice Example <alice@example.org>", "--confirm=never", "--suppress-cc=all",
        "--no-chain-reply-to", "--quiet", *extra, str(patch),
    ]
    return run(args, rq, cwd=patch.parent, extra_env=env)


@pytest.mark.parametrize(
    ("extra", "sender"),
    [
        ([], None),  # no -f: the envelope sender is the local user
        (["--envelope-sender=bounce@example.org"], "bounce@example.org"),
        (["--envelope-sender=auto"], "alice@example.org"),
    ],
    ids=["no-envelope-sender", "envelope-sender", "envelope-sender-auto"],
)
def test_git_send_email_patch_intact(
    tmp_path: Path, smarthost_factory: SmarthostFactory, extra: list[str], sender: str | None
) -> None:
    need_send_email()
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    patch, env = make_patch(tmp_path)
    r = send_email(rq, patch, env, *extra)
    assert r.returncode == EX_OK, (r.stdout, r.stderr)
    [t] = sh.transactions
    assert t.mail_from == (sender or f"{local_user()}@{DOMAIN}")
    assert t.rcpt_tos == ["bob@example.org"]
    msg = parse(t)
    assert msg["From"] == "Alice Example <alice@example.org>"
    assert msg["To"] == "bob@example.org"
    assert msg["Subject"] == "[PATCH] Add notes"
    # the patch's body arrives byte for byte: dots, "From ", trailing blanks, tabs
    original = patch.read_bytes().split(b"\n\n", 1)[1]
    assert body_of(t) == original
    assert b"\n.\n..two dots\nFrom the start of a line\n" in body_of(t)
    assert b"\n+second with trailing spaces   \n+\ttab\n" in body_of(t)
    assert queue_empty(rq)


def test_git_send_email_utf8_patch(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    need_send_email()
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    patch, env = make_patch(tmp_path, utf8=True)
    r = send_email(rq, patch, env, "--8bit-encoding=UTF-8")
    assert r.returncode == EX_OK, (r.stdout, r.stderr)
    [t] = sh.transactions
    assert "BODY=8BITMIME" in t.mail_options
    original = patch.read_bytes().split(b"\n\n", 1)[1]
    assert body_of(t) == original
    assert "Grüße aus Köln €".encode() in body_of(t)
    assert parse(t)["Subject"] == "[PATCH] Add notes"


# --- PHP mail() -----------------------------------------------------------------


def php_mail(rq: Relayq, tmp_path: Path, call: str) -> subprocess.CompletedProcess[bytes]:
    script = tmp_path / "send.php"
    script.write_text(f"<?php\nvar_dump({call});\n")
    return run([need("php"), "-n", "-d", f"sendmail_path={SENDMAIL} -t -i", str(script)], rq)


def test_php_mail_with_from_header(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = php_mail(rq, tmp_path, "mail('bob@example.org', 'Order 42', \"Thanks.\\n.\\nBye\\n\", "
                 "'From: Web Shop <shop@example.org>')")
    assert r.returncode == 0 and r.stdout.strip() == b"bool(true)", (r.stdout, r.stderr)
    [t] = sh.transactions
    assert t.mail_from == f"{local_user()}@{DOMAIN}"  # -t takes recipients, not the sender
    assert t.rcpt_tos == ["bob@example.org"]
    msg = parse(t)
    assert msg["From"] == "Web Shop <shop@example.org>"
    assert msg["To"] == "bob@example.org" and msg["Subject"] == "Order 42"
    assert body_of(t) == b"Thanks.\n.\nBye\n\n"  # PHP ends the message with one more EOL


def test_php_mail_additional_params_envelope_sender(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = php_mail(rq, tmp_path, "mail('bob@example.org', 'Hi', \"body\\n\", "
                 "'From: shop@example.org', '-fbounce@example.org')")
    assert r.stdout.strip() == b"bool(true)", (r.stdout, r.stderr)
    [t] = sh.transactions
    assert t.mail_from == "bounce@example.org"
    assert t.rcpt_tos == ["bob@example.org"]
    assert parse(t)["From"] == "shop@example.org"


def test_php_mail_cve_2016_10033_refused(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    target = "/tmp/relayq-x.php"
    assert not os.path.exists(target), f"{target} exists before the test: remove it"
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    hostile = '-f"attacker\\\\" -oQ/tmp/ -X/tmp/relayq-x.php some"@example.org'
    r = php_mail(rq, tmp_path, "mail('bob@example.org', 'x', \"<?php phpinfo(); ?>\\n\", "
                 f"'From: a@example.org', '{hostile}')")
    # PHP splits the argument into -fattacker\ -oQ/tmp/ -X/tmp/relayq-x.php some"@example.org
    assert r.stdout.strip() == b"bool(false)", (r.stdout, r.stderr)
    assert b"not allowed" in r.stderr
    assert not os.path.exists(target)
    assert sh.transactions == [] and sh.connections == 0
    assert rq.spool.ids() == [] and queue_files(rq) == []
    # and the same argv straight to sendmail: refused with 77 (or 64 for the broken -f)
    direct = rq.sendmail("-t", "-i", "-fattacker\\", "-oQ/tmp/", "-X/tmp/relayq-x.php",
                         'some"@example.org', input=b"To: bob@example.org\n\nx\n")
    assert direct.returncode in (EX_NOPERM, EX_USAGE), direct.stderr
    assert not os.path.exists(target) and rq.spool.ids() == []


# --- cron -----------------------------------------------------------------------------


def test_cron_exact_command_line(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    msg = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> job\n"
           b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
           b"Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n\n"
           b"r\xc3\xa9sultat: 42 \xe2\x82\xac\n")
    r = rq.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=msg)
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert t.mail_from == f"{local_user()}@{DOMAIN}"
    if local_user() == "root":
        assert t.mail_from == "root@host.example.org"
    assert "BODY=8BITMIME" in t.mail_options
    assert t.rcpt_tos == ["root@host.example.org"]
    heads = header_lines(t)
    assert b"From: root@host.example.org (Cron Daemon)" in heads
    assert b"To: root@host.example.org" in heads
    assert b"Subject: Cron <root@host> job" in heads
    assert b"Content-Transfer-Encoding: 8bit" in heads
    assert body_of(t) == b"r\xc3\xa9sultat: 42 \xe2\x82\xac\n"


# --- the seed's commands ---------------------------------------------------------------


def submit_two(rq: Relayq) -> None:
    for n in (1, 2):
        r = rq.sendmail("-t", input=f"To: user{n}@example.org\nSubject: seed {n}\n\nn={n}\n"
                        .encode())
        assert r.returncode == EX_OK, r.stderr


def test_seed_queue_run_commands(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="deferred")
    submit_two(rq)
    assert sh.connections == 0
    listing = rq.run("mailq", "-Ac")
    assert listing.returncode == EX_OK, listing.stderr
    out = listing.stdout.decode()
    assert "user1@example.org" in out and "user2@example.org" in out
    assert "Total requests: 2" in out
    r = rq.sendmail("-L", "sm-msp-queue", "-Ac", "-q")
    assert r.returncode == EX_OK, r.stderr
    assert sorted(t.rcpt_tos[0] for t in sh.transactions) == [
        "user1@example.org", "user2@example.org"]
    assert queue_empty(rq)
    sent = [ln for ln in rq.log().splitlines() if "stat=Sent" in ln]
    assert len(sent) == 2 and all(" sm-msp-queue[" in ln for ln in sent), rq.log()
    assert "Total requests: 0" in rq.run("mailq", "-Ac").stdout.decode()


@pytest.mark.parametrize("args", [["-q"], ["-Ac", "-q"]], ids=["-q", "-Ac -q"])
def test_seed_queue_run_smarthost_down(tmp_path: Path, refused_port: int,
                                       args: list[str]) -> None:
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{refused_port}", delivery_mode="deferred")
    submit_two(rq)
    r = rq.sendmail(*args)
    assert r.returncode == EX_TEMPFAIL, r.stderr
    assert len(rq.spool.ids()) == 2
    out = rq.run("mailq", "-Ac").stdout.decode()
    assert out.count("(Deferred: Connection refused by [127.0.0.1])") == 2, out
    assert "Total requests: 2" in out


# --- delivery modes ----------------------------------------------------------------------


def test_background_default_mode(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    del rq.settings["delivery_mode"]  # relayq's own default: background
    rq.configure()
    start = time.monotonic()
    r = rq.sendmail("bob@example.org", input=b"Subject: bg\n\nbackground\n")
    assert r.returncode == EX_OK, r.stderr
    assert time.monotonic() - start < 10
    wait_for(lambda: len(sh.transactions) == 1 and queue_empty(rq), what="background delivery")
    [t] = sh.transactions
    assert body_of(t) == b"background\n"


def test_background_returns_at_once_when_smarthost_hangs(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(stall="mail")
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="background", timeout=2)
    start = time.monotonic()
    r = rq.sendmail("bob@example.org", input=b"Subject: hang\n\nx\n")
    assert r.returncode == EX_OK and r.stderr == b""
    assert time.monotonic() - start < 1.5, "the caller waited for the delivery"
    [qid] = rq.spool.ids()
    wait_for(lambda: "MAIL" in sh.verbs(), what="the background child to send MAIL")
    assert rq.spool.is_locked(qid)  # the detached child holds it
    # a queue run meanwhile skips the held message: no second connection
    q = rq.sendmail("-q")
    assert q.returncode == EX_TEMPFAIL, q.stderr
    assert sh.connections == 1
    # the child gives up after `timeout` and leaves the message queued with the reason
    wait_for(lambda: not rq.spool.is_locked(qid), what="the background child to give up")
    env = rq.spool.read_envelope(qid)
    assert env.attempts == 1 and "timeout" in env.error.lower(), env.error


def test_option_delivery_mode_b(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    r = rq.sendmail("-O", "DeliveryMode=b", "bob@example.org", input=b"Subject: b\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    wait_for(lambda: len(sh.transactions) == 1 and queue_empty(rq), what="background delivery")


def test_interactive_delivers_before_return(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    r = rq.sendmail("-odi", "bob@example.org", input=b"Subject: i\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    assert len(sh.transactions) == 1
    assert queue_empty(rq)


@pytest.mark.parametrize("flag", ["-odq", "-odd", "-O DeliveryMode=queue"])
def test_queue_only_modes_wait_for_q(
    tmp_path: Path, smarthost_factory: SmarthostFactory, flag: str
) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = rq.sendmail(*flag.split(), "bob@example.org", input=b"Subject: q\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    time.sleep(0.3)  # a background child, had one been started, would connect by now
    assert sh.connections == 0
    assert len(rq.spool.ids()) == 1
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(sh.transactions) == 1 and queue_empty(rq)


def test_interactive_smarthost_down_stays_queued(tmp_path: Path, refused_port: int) -> None:
    rq = Relayq(tmp_path, smarthost=f"[127.0.0.1]:{refused_port}")
    r = rq.sendmail("-odi", "bob@example.org", input=b"Subject: down\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    assert r.stderr == b""
    assert len(rq.spool.ids()) == 1
    out = rq.run("mailq").stdout.decode()
    assert "Deferred: Connection refused" in out and "bob@example.org" in out


@pytest.mark.parametrize(
    ("flags", "code", "said"),
    [([], EX_NOUSER, True), (["-oep"], EX_NOUSER, True), (["-oem"], EX_NOUSER, False),
     (["-oeq"], EX_NOUSER, False), (["-oee"], EX_OK, False)],
    ids=["default", "-oep", "-oem", "-oeq", "-oee"],
)
def test_interactive_one_recipient_refused(
    tmp_path: Path, smarthost_factory: SmarthostFactory, flags: list[str], code: int, said: bool
) -> None:
    sh = smarthost_factory(rcpt_replies={"bad@example.org": "550 5.1.1 <bad@example.org>: "
                                         "Recipient address rejected: User unknown"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    r = rq.sendmail("-odi", *flags, "-f", "alice@example.org", "good@example.org",
                    "bad@example.org", input=b"Subject: two\n\nhello\n")
    assert r.returncode == code, r.stderr
    err = r.stderr.decode()
    assert "Traceback" not in err
    if said:
        assert err.count("\n") == 1 and "bad@example.org" in err, err
        assert "good@example.org" not in err
    else:
        assert err == ""
    delivered, bounce = sh.transactions
    assert delivered.mail_from == "alice@example.org"
    assert delivered.rcpt_tos == ["good@example.org"]
    assert bounce.mail_from == "<>"  # aiosmtpd records the null sender so
    assert bounce.rcpt_tos == ["alice@example.org"]
    report = parse(bounce)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert b"bad@example.org" in bounce.content and b"5.1.1" in bounce.content
    assert queue_empty(rq)


def test_interactive_mixed_temporary_and_permanent_refusals(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={
        "busy@example.org": "451 4.2.1 <busy@example.org>: Mailbox busy, try later",
        "bad@example.org": "550 5.1.1 <bad@example.org>: User unknown",
    })
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    r = rq.sendmail("-odi", "-f", "alice@example.org", "good@example.org", "busy@example.org",
                    "bad@example.org", input=b"Subject: three\n\nhello\n")
    assert r.returncode == EX_NOUSER, r.stderr
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "bad@example.org" in err and "busy" not in err, err
    delivered, bounce = sh.transactions
    assert delivered.rcpt_tos == ["good@example.org"]
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["alice@example.org"]
    assert b"bad@example.org" in bounce.content and b"busy@example.org" not in bounce.content
    [(env, _)] = rq.queued()
    assert [(x.address, x.state) for x in env.recipients] == [
        ("good@example.org", "sent"), ("busy@example.org", "pending"),
        ("bad@example.org", "failed")]
    out = rq.run("mailq").stdout.decode()
    assert "busy@example.org" in out and "good@example.org" not in out, out
    assert "bad@example.org" not in out, out
    assert "Mailbox busy" in out
    # the next run sends only to the one still pending
    sh.rcpt_replies.clear()
    assert rq.sendmail("-q").returncode == EX_OK
    assert sh.transactions[-1].rcpt_tos == ["busy@example.org"]
    assert len(sh.transactions) == 3 and queue_empty(rq)


def test_mailq_json_after_deferral(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(replies={"mail": "451 4.3.0 Try again later"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="interactive")
    r = rq.sendmail("-f", "alice@example.org", "bob@example.org", input=b"Subject: j\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    out = rq.run("mailq", "--json")
    assert out.returncode == EX_OK, out.stderr
    doc = json.loads(out.stdout)
    assert doc["total"] == 1 and doc["damaged"] == []
    [m] = doc["messages"]
    assert m["sender"] == "alice@example.org"
    assert m["attempts"] == 1
    assert m["error"].startswith("Deferred: ") and "Try again later" in m["error"]
    assert m["last_try"] and m["next_try"]
    [rcpt] = m["recipients"]
    assert rcpt["address"] == "bob@example.org" and rcpt["state"] == "pending"
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert json.loads(rq.run("mailq", "--json").stdout)["messages"][0]["attempts"] == 2


def test_verbose_shows_dialogue(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue")
    r = rq.sendmail("-v", "-odi", "-f", "alice@example.org", "bob@example.org",
                    input=b"Subject: v\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    out = r.stdout.decode()
    assert ">>> MAIL FROM:<alice@example.org>" in out, out
    assert ">>> RCPT TO:<bob@example.org>" in out
    assert "bob@example.org... Sent" in out
    assert len(sh.transactions) == 1


def test_verbose_in_default_background_mode_shows_dialogue(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    # `echo test | sendmail -v root` is how admins debug mail: like sendmail
    # (clearenvelope(): Verbose -> SM_DELIVER), -v delivers in the foreground
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="background")
    r = rq.sendmail("-v", "-f", "alice@example.org", "bob@example.org",
                    input=b"Subject: v\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    try:
        assert ">>> MAIL FROM:<alice@example.org>" in r.stdout.decode()
        assert len(sh.transactions) == 1
    finally:  # let the background child (if one was started) finish inside tmp_path
        wait_for(lambda: len(sh.transactions) == 1 and queue_empty(rq), what="delivery")


def test_verbose_masks_auth(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    secret = "s3cret-Pa55"
    sh = smarthost_factory(auth={"u": secret}, auth_mechanisms=("PLAIN",), auth_required=True,
                           auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delivery_mode="queue", tls="none",
                user="u", password=secret)
    r = rq.sendmail("-v", "-odi", "bob@example.org", input=b"Subject: auth\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    [t] = sh.transactions
    assert t.auth_user == "u"
    out = r.stdout.decode()
    assert ">>> AUTH PLAIN ********" in out, out
    assert ">>> MAIL FROM:" in out
    assert r.stderr == b""
    blob = base64.b64encode(f"\0u\0{secret}".encode()).decode()
    for text in (out, rq.log()):
        assert secret not in text
        assert blob not in text
        assert base64.b64encode(secret.encode()).decode() not in text
