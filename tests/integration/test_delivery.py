"""Queue runs against a real smarthost: per-recipient state, retries, bounces, expiry."""

from __future__ import annotations

import email
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq

from relayq.core.envelope import FAILED, PENDING, SENT
from relayq.core.errors import EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

NULL = ("", "<>")  # how the recording smarthost may show the null sender
MSG = b"From: alice@example.org\nTo: team@example.org\nSubject: report\n\nall good\n"


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path)


def test_partial_success_records_each_recipient(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={"b@example.org": "451 4.2.0 mailbox busy",
                                         "c@example.org": "550 5.1.1 no such user"})
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-f", "alice@example.org", "a@example.org", "b@example.org",
                       "c@example.org", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL  # b is still queued
    [(env, _)] = [q for q in rq.queued() if not q[0].is_dsn]
    states = {r.address: r.state for r in env.recipients}
    assert states == {"a@example.org": SENT, "b@example.org": PENDING, "c@example.org": FAILED}
    assert env.attempts == 1 and "mailbox busy" in env.error
    # the bounce for c went to the sender, through the same relay
    bounces = [t for t in sh.transactions if t.mail_from in NULL]
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["alice@example.org"]
    report = email.message_from_bytes(bounces[0].content)
    assert report.get_content_type() == "multipart/report"
    assert b"no such user" in bounces[0].content and b"c@example.org" in bounces[0].content
    # next run: only b is tried; a is never sent twice
    sh.rcpt_replies.clear()
    assert rq.sendmail("-q").returncode == EX_OK
    normal = [t for t in sh.transactions if t.mail_from == "alice@example.org"]
    assert [t.rcpt_tos for t in normal] == [["a@example.org"], ["b@example.org"]]
    assert rq.queued() == []


def test_mail_from_5xx_bounces_everything_once(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(replies={"mail": "553 5.7.1 sender rejected"})
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-f", "alice@example.org", "a@example.org", input=MSG).returncode == 0
    rq.sendmail("-q")
    # the bounce is refused too (same 553): one copy to the postmaster, refused as
    # well, and then kept as a dead letter (issue 12 D17): never a loop, never gone
    assert rq.queued() == []
    assert ": postmaster notify: " in rq.log() and "dead letter" in rq.log()
    mail_cmds = [c for c in sh.commands if c.verb == "MAIL"]
    assert len(mail_cmds) == 3  # the message, its bounce, the postmaster's copy
    assert len(list(rq.spool.dead_letters())) == 1


def test_null_sender_failure_goes_to_the_postmaster_not_to_the_null_sender(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    """Issue 12 D17: never to <>, and not dropped: the postmaster is told once."""
    sh = smarthost_factory(rcpt_replies={"a@example.org": "550 5.1.1 gone"})
    rq.configure(smarthost=sh.smarthost)
    rq.sendmail("-f", "<>", "a@example.org", input=MSG)
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.queued() == []
    [copy] = sh.transactions
    assert copy.mail_from in NULL and copy.rcpt_tos == ["postmaster@host.example.org"]


def test_retry_backoff_and_run_versus_flush(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    rq.configure(retry_min=600, retry_max=3600)
    rq.sendmail("a@example.org", input=MSG)
    before = time.time()
    assert rq.run("relayq", "flush").returncode == EX_TEMPFAIL  # port 9: refused
    [(env, _)] = rq.queued()
    assert env.attempts == 1 and 540 - 1 < env.next_try - before < 660 + 10  # 600 +/- 10 %
    assert "Connection refused" in env.error
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    # `relayq run` respects the backoff; `relayq flush` and `sendmail -q` do not
    assert rq.run("relayq", "run").returncode == EX_TEMPFAIL
    assert sh.transactions == []
    assert rq.run("relayq", "flush").returncode == EX_OK
    assert len(sh.transactions) == 1


def test_backoff_doubles_and_caps(rq: Relayq) -> None:
    rq.configure(retry_min=100, retry_max=350)
    rq.sendmail("a@example.org", input=MSG)
    delays = []
    for _ in range(4):
        start = time.time()
        rq.sendmail("-q")
        [(env, _)] = rq.queued()
        delays.append(env.next_try - start)
    for got, base in zip(delays, [100, 200, 350, 350], strict=True):  # +/- 10 % jitter
        assert base * 0.9 - 1 < got <= min(350, base * 1.1) + 1, delays


def test_messages_deferred_together_come_back_spread_out(rq: Relayq) -> None:
    rq.configure(retry_min=1000, retry_max=4000)
    for _ in range(8):
        rq.sendmail("-odq", "a@example.org", input=MSG)
    rq.sendmail("-q")  # all refused at once
    tries = sorted(env.next_try for env, _ in rq.queued())
    assert len(tries) == 8 and tries[-1] - tries[0] > 20  # not one thundering second


def test_expired_message_bounces_with_last_reason(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    rq.configure(max_queue_age="1s")
    rq.sendmail("-f", "alice@example.org", "a@example.org", input=MSG)
    rq.sendmail("-q")  # refused: deferred with a reason
    time.sleep(1.1)
    sh = smarthost_factory(rcpt_replies={"a@example.org": "451 4.3.0 try again later"})
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-q").returncode == EX_OK  # tried, failed again, now expired
    assert rq.queued() == []
    [bounce] = sh.transactions
    assert bounce.mail_from in NULL and bounce.rcpt_tos == ["alice@example.org"]
    assert b"try again later" in bounce.content
    assert b"Status: 4.4.7" in bounce.content
    assert b"Diagnostic-Code: X-Relayq; 4.4.7" in bounce.content  # issue 12 D16


def test_expired_but_never_tried_mail_is_tried_first(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    """Issue 12 D7: a laptop offline past max_queue_age (or a clock that jumped):
    the first run after it tries the message, and a relay that takes it gets it."""
    rq.configure(max_queue_age="1s")
    rq.sendmail("-f", "alice@example.org", "a@example.org", input=MSG)
    time.sleep(1.1)
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.queued() == []
    [t] = sh.transactions
    assert t.mail_from == "alice@example.org" and t.rcpt_tos == ["a@example.org"]


def test_smtputf8_needed_but_not_offered_bounces(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(smtputf8=False)
    rq.configure(smarthost=sh.smarthost)
    # a UTF-8 address in the header: no exact 7-bit form (a UTF-8 Subject alone is
    # sent with RFC 2047 encoded-words, issue 12 §9)
    msg = "From: alice@example.org\nTo: jürgen@example.org\nSubject: héllo\n\nbody\n".encode()
    rq.sendmail("-f", "alice@example.org", "a@example.org", input=msg)
    assert rq.sendmail("-q").returncode == EX_OK
    normal = [t for t in sh.transactions if t.mail_from not in NULL]
    assert normal == []  # never sent in a form the relay cannot take
    [bounce] = [t for t in sh.transactions if t.mail_from in NULL]
    assert b"5.6.7" in bounce.content


def test_8bit_and_utf8_reach_the_relay_byte_for_byte(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    body = "Grüße, 日本語\n".encode() + bytes([0xE9, 0xFF]) + b"\n..dot\n"
    msg = "Subject: Grüße\n\n".encode() + body
    rq.sendmail("-i", "a@example.org", input=msg)
    rq.sendmail("-q")
    [t] = sh.transactions
    assert "BODY=8BITMIME" in t.mail_options and "SMTPUTF8" in t.mail_options
    assert t.content.endswith(body.replace(b"\n", b"\r\n"))
    assert "Subject: Grüße\r\n".encode() in t.content


def test_many_messages_share_one_connection(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, concurrency=1)
    for i in range(5):
        rq.sendmail(f"r{i}@example.org", input=MSG)
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(sh.transactions) == 5
    assert sh.connections == 1


def test_a_queue_run_shares_the_queue_among_workers(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, concurrency=3)
    for i in range(30):
        rq.sendmail(f"r{i}@example.org", input=MSG)
    assert rq.sendmail("-q").returncode == EX_OK
    assert sorted(t.rcpt_tos[0] for t in sh.transactions) == sorted(
        f"r{i}@example.org" for i in range(30))  # each exactly once
    assert 1 < sh.connections <= 3  # one reused connection per worker
    assert rq.queued() == []


def test_fallback_smarthost(rq: Relayq, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=["[127.0.0.1]:9", sh.smarthost])
    rq.sendmail("a@example.org", input=MSG)
    assert rq.sendmail("-q").returncode == EX_OK
    assert len(sh.transactions) == 1


def test_selectors_limit_the_run(rq: Relayq, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost)
    rq.sendmail("a@example.org", input=MSG)
    rq.sendmail("b@example.net", input=MSG)
    assert rq.sendmail("-qR@example.net").returncode == EX_TEMPFAIL
    assert [t.rcpt_tos for t in sh.transactions] == [["b@example.net"]]
    assert rq.sendmail("-q!Rexample.net").returncode == EX_OK
    assert len(sh.transactions) == 2


def test_tls_required_without_starttls_defers_and_sends_nothing(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, tls="required")
    rq.sendmail("a@example.org", input=MSG)
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert "MAIL" not in sh.verbs()
    r = rq.run("mailq", "-Ac")
    assert b"TLS is required" in r.stdout


def test_starttls_with_auth(rq: Relayq, smarthost_factory: SmarthostFactory, pki: object,
                            tmp_path: Path) -> None:
    ca = pki.write_ca(str(tmp_path))  # type: ignore[attr-defined]
    sh = smarthost_factory(tls_context=pki.server_context(),  # type: ignore[attr-defined]
                           require_starttls=True, auth={"alerts": "s3cret pass"},
                           auth_required=True)
    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    secret.chmod(0o600)
    rq.configure(smarthost=f"[localhost]:{sh.port}", tls="required", ca_file=str(ca),
                 user="alerts", password_file=str(secret))
    rq.sendmail("a@example.org", input=MSG)
    r = rq.sendmail("-q", "-v")
    assert r.returncode == EX_OK, r.stdout
    [t] = sh.transactions
    assert t.tls and t.auth_user == "alerts"
    assert b"s3cret" not in r.stdout and "s3cret" not in rq.log()
