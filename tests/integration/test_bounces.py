"""Delay warnings, postmaster copies of undeliverable bounces, no bounce storms (issue 6 §3)."""

from __future__ import annotations

import email
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory, Transaction

MSG = b"Subject: storm test\n\nbody\n"
NULL = ("", "<>")


def report(t: Transaction) -> email.message.Message:
    msg = email.message_from_bytes(t.content.replace(b"\r\n", b"\n"))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    return msg


def status_block(msg: email.message.Message) -> str:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return "\n".join(str(p) for p in part.get_payload())


def test_delay_warning_goes_once_after_the_configured_time(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "451 4.2.0 mailbox busy"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, delay_warning="1s", retry_min="1s",
                retry_max="1s")
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert sh.transactions == []  # not yet: queued for less than a second
    time.sleep(1.1)
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    [warning] = sh.transactions
    assert warning.mail_from in NULL and warning.rcpt_tos == ["alice@example.org"]
    block = status_block(report(warning))
    assert "Action: delayed" in block and "Status: 4.2.0" in block
    assert ": sender notify: Warning: could not send message for past " in rq.log()
    for _ in range(2):
        time.sleep(1.1)
        assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    assert len(sh.transactions) == 1  # once, however long it stays
    [(env, _)] = rq.queued()
    assert env.warned


def test_an_undeliverable_bounce_goes_once_to_the_postmaster(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(rcpt_replies={"bob@example.org": "550 5.1.1 no such user",
                                         "alice@example.org": "550 5.1.1 no such sender"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, postmaster="postmaster@example.org")
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == EX_OK
    [copy] = sh.transactions  # bob refused, alice's bounce refused, the copy accepted
    assert copy.mail_from in NULL and copy.rcpt_tos == ["postmaster@example.org"]
    block = status_block(report(copy))
    assert "Action: failed" in block and "alice@example.org" in block
    assert rq.queued() == [] and ": postmaster notify: " in rq.log()


def test_a_postmaster_copy_that_fails_is_kept_as_a_dead_letter(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """Issue 12 D17: nothing is dropped silently; once nobody can be told, the
    message stays in quarantine/, listed by mailq and counted by status."""
    sh = smarthost_factory(replies={"rcpt": "550 5.7.1 nobody here"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, postmaster="postmaster@example.org")
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", input=MSG).returncode == 0
    assert rq.sendmail("-q").returncode == EX_OK
    assert sh.transactions == [] and rq.queued() == []
    assert "discarded" not in rq.log() and "dead letter" in rq.log()
    [(qid, env, _)] = list(rq.spool.dead_letters())
    assert env.double_bounce and env.recipients[0].address == "postmaster@example.org"
    listing = rq.run("mailq").stdout.decode()
    assert qid in listing and "Dead letter" in listing and "1 dead letter" in listing
    status = rq.run("relayq", "status").stdout.decode()
    assert "dead letters: 1" in status
    assert rq.sendmail("-q").returncode == EX_OK  # later runs leave it alone
    assert len(list(rq.spool.dead_letters())) == 1 and sh.transactions == []
    r = rq.run("relayq", "delete", qid)  # the operator's command, and only that, removes it
    assert r.returncode == EX_OK and b"deleted (dead letter)" in r.stdout
    assert list(rq.spool.dead_letters()) == [] and "dead letter deleted by" in rq.log()


@pytest.mark.timeout(600)  # 200 `relayq flush` runs: 25 s alone, 140 s with -n 4 and a load test
def test_a_hundred_runs_against_a_relay_that_refuses_everything_stay_bounded(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    refusing = smarthost_factory(replies={"rcpt": "550 5.7.1 refused"})
    busy = smarthost_factory(replies={"rcpt": "451 4.3.0 try later"})
    for sh, left in ((refusing, 0), (busy, 10)):  # busy: five and one warning each
        (tmp_path / str(left)).mkdir()
        rq = Relayq(tmp_path / str(left), smarthost=sh.smarthost, postmaster="pm@example.org",
                    delay_warning="1s", retry_min="1s", retry_max="1s")
        for n in range(5):
            assert rq.sendmail("-f", f"s{n}@example.org", "bob@example.org",
                               input=MSG).returncode == 0
        sizes = []
        for _ in range(100):
            rq.run("relayq", "flush")
            sizes.append(len(rq.spool.ids()))
        assert max(sizes) <= 5 * 3, sizes  # a message, its bounce, a postmaster copy at most
        assert sizes[-1] == left, sizes  # refused: all gone; busy: all wait, nothing doubles
        assert sh.transactions == []
        assert sum(env.is_dsn for env, _ in rq.queued()) == left // 2
