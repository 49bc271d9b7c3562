"""rewrite_from (issue 16): an account's provider sends only as its own mailbox, so
From and the envelope sender become from_address, the original From going to
Reply-To. Through sendmail and the listener, to a real smarthost."""

from __future__ import annotations

import smtplib
import textwrap
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_daemon import DaemonProcess, free_port

from relayq.core.errors import EX_CONFIG, EX_OK
from relayq.core.headers import parse_block
from relayq.core.rewrite import from_fields

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

pytestmark = pytest.mark.timeout(120)

OWN = "noreply@shop.example"


def header(sh: Smarthost) -> str:
    [t] = sh.transactions
    return t.content.decode().replace("\r\n", "\n").split("\n\n", 1)[0] + "\n"


def test_sendmail_rewrites_from_and_the_envelope_keeping_the_name(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, rewrite_from=True, from_address=OWN)
    r = rq.sendmail("-i", "-f", "alice@host.example.org", "bob@example.org",
                    input=b"From: Alice Example <alice@host.example.org>\nSubject: hi\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.mail_from == OWN
    head = header(sh)
    assert f"\nFrom: Alice Example <{OWN}>\n" in head
    assert "\nReply-To: Alice Example <alice@host.example.org>\n" in head
    assert "alice@host.example.org" not in head.replace("Reply-To: Alice Example "
                                                        "<alice@host.example.org>", "")


def test_a_reply_to_is_kept_and_the_null_sender_stays_null(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, rewrite_from=True, from_address=OWN)
    r = rq.sendmail("-i", "-f", "<>", "bob@example.org",
                    input=b"From: daemon@host.example.org\nReply-To: help@shop.example\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.mail_from in ("", "<>")  # the null sender
    head = header(sh)
    assert f"\nFrom: {OWN}\n" in head
    assert head.count("Reply-To:") == 1 and "Reply-To: help@shop.example\n" in head


def test_only_the_account_that_asks_is_rewritten(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """The account of the envelope sender decides; its from_address defaults to its user."""
    sh = smarthost_factory(auth={OWN: "shop-pw-1"}, auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    rq.write_config(rq.config.read_text() + textwrap.dedent(f"""
        [account.shop]
        senders = ["@shop.example"]
        smarthost = "{sh.smarthost}"
        tls = "none"
        user = "{OWN}"
        password = "shop-pw-1"
        rewrite_from = true
        """))
    rq.config.chmod(0o600)
    for sender in ("carol@shop.example", "root@host.example.org"):
        r = rq.sendmail("-i", "-f", sender, "bob@example.org",
                        input=f"From: {sender}\nSubject: x\n\nx\n".encode())
        assert r.returncode == EX_OK, r.stderr
    shop = [env for env, _ in rq.queued() if env.sender == OWN]
    assert [env.account for env in shop] == ["shop"]  # chosen before the rewrite
    assert rq.run("relayq", "flush").returncode == EX_OK
    got = sorted((t.mail_from, t.content.split(b"\r\n\r\n")[0]) for t in sh.transactions)
    assert [m for m, _ in got] == [OWN, "root@host.example.org"]
    assert f"From: {OWN}".encode() in got[0][1]
    assert b"Reply-To: carol@shop.example" in got[0][1]
    assert b"Reply-To" not in got[1][1]


def test_the_listener_rewrites_too(tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    port = free_port()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, rewrite_from=True, from_address=OWN,
                pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                listen=[f"127.0.0.1:{port}"], delivery_mode="deferred")
    d = DaemonProcess(rq, "--listen").wait_ready()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("app@host.example.org", ["bob@example.org"],
                       'From: "Web App" <app@host.example.org>\r\nSubject: s\r\n\r\nbody\r\n')
    finally:
        d.kill()
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.mail_from == OWN
    head = header(sh)
    assert f'\nFrom: "Web App" <{OWN}>\n' in head
    assert '\nReply-To: "Web App" <app@host.example.org>\n' in head


def test_check_config_fails_without_an_address_to_rewrite_to(tmp_path: Path) -> None:
    rq = Relayq(tmp_path, rewrite_from=True, user="relayuser")
    r = rq.run("relayq", "check-config")
    assert r.returncode == EX_CONFIG
    [line] = r.stderr.decode().splitlines()
    assert "rewrite_from: set from_address" in line


def test_from_fields_keeps_every_other_byte() -> None:
    fields, _, _ = parse_block("Subject: a\nFrom: a@x.example, b@y.example\nSender: b@y.example\n"
                               "To: c@z.example\n\n")
    out = "".join(f.raw + "\n" for f in from_fields(fields, OWN))
    assert out == (f"Subject: a\nFrom: {OWN}\nTo: c@z.example\n"
                   "Reply-To: a@x.example, b@y.example\n")
    mine, _, _ = parse_block(f"From: Shop <{OWN}>\nSender: x@y.example\n\n")
    assert from_fields(mine, OWN) == mine  # already ours: nothing changes


def test_relayq_test_sends_as_the_account_would(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, rewrite_from=True, from_address=OWN)
    r = rq.run("relayq", "test", "bob@example.org")
    assert r.returncode == EX_OK, r.stdout + r.stderr
    [t] = sh.transactions
    assert t.mail_from == OWN and f"From: {OWN}".encode() in t.content
