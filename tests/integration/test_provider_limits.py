"""What providers enforce (issue 16): SMTPUTF8 only when needed, sending limits,
connection limits. Real loopback smarthosts, real state files; nothing mocked."""

from __future__ import annotations

import fcntl
import os
import re
import textwrap
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_daemon import wait_for
from tests.integration.test_smtp_transport import Run, config, message, one, statuses

from relayq.core import policy
from relayq.core.config import parse
from relayq.core.errors import EX_OK
from relayq.delivery import limits
from relayq.delivery.smtp_transport import SmtpTransport

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.core.config import Config
    from relayq.testing.smarthost import Smarthost, SmarthostFactory

pytestmark = pytest.mark.timeout(120)

ASCII = b"From: a@example.org\nTo: b@example.org\nSubject: plain\n\nbody\n"
UTF8_HEAD = "From: a@example.org\nSubject: gr\u00fc\u00dfe\n\nbody\n".encode()


@pytest.mark.parametrize("offered", [True, False])
def test_smtputf8_not_sent_for_an_all_ascii_message(
        smarthost_factory: SmarthostFactory, offered: bool) -> None:
    sh = smarthost_factory(smtputf8=offered)
    r, _ = one(config(sh.smarthost), message(data=ASCII, smtputf8=True))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" not in sh.transactions[0].mail_options
    assert sh.transactions[0].content.replace(b"\r\n", b"\n").endswith(ASCII)


def test_smtputf8_sent_when_the_header_needs_it(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(smtputf8=True)
    r, _ = one(config(sh.smarthost), message(data=UTF8_HEAD, smtputf8=True, body="8BITMIME"))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" in sh.transactions[0].mail_options


def test_smtputf8_sent_when_the_envelope_needs_it(smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(smtputf8=True)
    rcpt = "j\u00fcrgen@example.org"
    r, _ = one(config(sh.smarthost), message((rcpt,), data=ASCII, smtputf8=True))
    assert statuses(r) == ["sent"]
    assert "SMTPUTF8" in sh.transactions[0].mail_options


# --- sending limits: the transport -------------------------------------------------

def limited(sh_host: str, tmp: Path, **keys: Any) -> Config:
    return config(sh_host, queue_dir=str(tmp / "queue"), **keys)


def test_messages_per_minute_defers_with_the_limit_and_when_it_frees(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    run = Run(limited(sh.smarthost, tmp_path, messages_per_minute=2))
    try:
        assert [statuses(run.deliver()) for _ in range(2)] == [["sent"], ["sent"]]
        r = run.deliver()
    finally:
        run.close()
    assert statuses(r) == ["deferred"]
    reply = r.outcomes[0].reply
    assert policy.LIMIT_REASON in reply and "messages_per_minute = 2" in reply
    assert "it frees at" in reply and not r.outcomes[0].remote
    assert policy.waits_on_us(reply, r.outcomes[0].remote)  # never expires, never bounces
    assert len(sh.transactions) == 2
    state = (tmp_path / "queue" / "limits" / "default.state").read_text()
    assert state.count("\nm ") == 2


def test_a_second_process_sees_the_same_count(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    """The state is a file: another transport (another process's) shares it."""
    sh = smarthost_factory()
    cfg = limited(sh.smarthost, tmp_path, messages_per_minute=1)
    r1, _ = one(cfg)
    r2, other = one(cfg)
    assert statuses(r1) == ["sent"] and statuses(r2) == ["deferred"]
    assert other.t.connections == 0  # kept back before connecting


def test_recipients_per_day_splits_a_message(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    rcpts = tuple(f"r{i}@example.org" for i in range(5))
    r, _ = one(limited(sh.smarthost, tmp_path, recipients_per_day=3, max_recipients=2),
               message(rcpts))
    assert statuses(r) == ["sent"] * 3 + ["deferred"] * 2
    assert [t.rcpt_tos for t in sh.transactions] == [list(rcpts[:2]), [rcpts[2]]]
    assert "recipients_per_day = 3" in r.outcomes[4].reply
    assert "recipients_per_day = 3" in r.error
    r, run = one(limited(sh.smarthost, tmp_path, recipients_per_day=3))
    assert statuses(r) == ["deferred"] and run.t.connections == 0


def test_only_what_the_relay_accepted_counts(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory(rcpt_replies={"bad@example.org": "550 5.1.1 no such user"})
    cfg = limited(sh.smarthost, tmp_path, recipients_per_day=2)
    r, _ = one(cfg, message(("bad@example.org", "b@example.org")))
    assert statuses(r) == ["failed", "sent"]
    r, _ = one(cfg, message(("c@example.org",)))
    assert statuses(r) == ["sent"]  # the refused recipient was given back
    r, _ = one(cfg, message(("d@example.org",)))
    assert statuses(r) == ["deferred"]


def test_a_damaged_state_file_or_a_clock_gone_back_never_blocks_for_long(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    folder = tmp_path / "queue" / "limits"
    folder.mkdir(parents=True)
    state = folder / "default.state"
    state.write_bytes(b"\x00\xffgarbage\nm x\nr 1 2 3\n")
    r, _ = one(limited(sh.smarthost, tmp_path, messages_per_minute=1))
    assert statuses(r) == ["sent"]
    assert state.read_text().startswith(limits.MAGIC + "\nm ")
    ahead = time.time() + 10 * 86400  # written before the clock was set back ten days
    state.write_text(f"{limits.MAGIC}\nm {ahead!r}\nr {int(ahead // 60)} 5\n")
    r, _ = one(limited(sh.smarthost, tmp_path, messages_per_minute=1))
    assert statuses(r) == ["deferred"]
    assert "(in 60 s)" in r.outcomes[0].reply or "(in 59 s)" in r.outcomes[0].reply
    st = limits.State.parse(state.read_text(), time.time())
    assert all(t <= time.time() for t in st.sent)


def test_a_queue_run_waits_for_a_limit_that_frees_soon(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    folder = tmp_path / "queue" / "limits"
    folder.mkdir(parents=True)
    # one message 58.5 s ago: the limit of one a minute frees in 1.5 s
    (folder / "default.state").write_text(f"{limits.MAGIC}\nm {time.time() - 58.5!r}\n")
    cfg = limited(sh.smarthost, tmp_path, messages_per_minute=1)
    log: list[str] = []
    with SmtpTransport(cfg, log=log.append, patient=True) as t:
        r = t.deliver(message())
    assert statuses(r) == ["sent"]
    assert any("messages_per_minute = 1 of account default reached; waiting" in x for x in log)


# --- connection slots ------------------------------------------------------------

def test_max_connections_across_transports(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    sh = smarthost_factory()
    cfg = limited(sh.smarthost, tmp_path, max_connections=1)
    first = Run(cfg)
    second = Run(cfg)
    try:
        assert statuses(first.deliver()) == ["sent"]  # its connection stays open
        r = second.deliver()
        assert statuses(r) == ["deferred"] and second.t.connections == 0
        assert "max_connections = 1" in r.outcomes[0].reply
        assert policy.waits_on_us(r.outcomes[0].reply, False)
        first.close()  # the slot frees with the connection
        assert statuses(second.deliver()) == ["sent"]
    finally:
        first.close()
        second.close()


# --- through the real commands ------------------------------------------------------

def mail(n: int) -> bytes:
    return (f"From: alice@example.org\nTo: bob@example.org\nSubject: message {n}\n"
            f"Message-ID: <lim-{n}@example.org>\n\nbody {n}\n").encode()


def smtp_session(count: int) -> bytes:
    """One `sendmail -bs` session queueing `count` messages (faster than `count` runs)."""
    out = [b"EHLO client.example.org\r\n"]
    for n in range(count):
        out += [b"MAIL FROM:<alice@example.org>\r\n", b"RCPT TO:<bob@example.org>\r\n",
                b"DATA\r\n", mail(n).replace(b"\n", b"\r\n"), b".\r\n"]
    return b"".join(out) + b"QUIT\r\n"


def received(sh: Smarthost) -> Counter[bytes]:
    return Counter(m.group(1) for t in sh.transactions
                   if (m := re.search(rb"Message-ID: (<[^>]+>)", t.content)))


def test_interactive_sendmail_defers_past_the_limit_until_it_frees(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, messages_per_minute=1,
                delivery_mode="interactive")
    for n in range(2):
        r = rq.sendmail("-i", "bob@example.org", input=mail(n))
        assert r.returncode == EX_OK, r.stderr  # never an error: the limit is ours
    assert len(sh.transactions) == 1
    [(env, _)] = rq.queued()
    [rcpt] = env.recipients
    assert policy.LIMIT_REASON in rcpt.reply and "messages_per_minute = 1" in rcpt.reply
    assert env.next_try <= time.time() + 61  # when it frees, not retry_min (300 s) away
    assert "sending limit reached" in rq.run("mailq").stdout.decode()


def test_a_background_child_without_a_slot_leaves_the_mail_for_the_daemon(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, max_connections=1,
                delivery_mode="background")
    folder = rq.queue_dir / "limits"
    folder.mkdir(parents=True)
    fd = os.open(folder / "default.conn0", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's connection holds the slot
        r = rq.sendmail("-i", "bob@example.org", input=mail(0))
        assert r.returncode == EX_OK and not r.stderr
        wait_for(lambda: "max_connections = 1" in rq.queued()[0][0].recipients[0].reply, 30)
        wait_for(lambda: "stat=Deferred" in rq.log(), 30)  # the child is done
    finally:
        os.close(fd)
    assert not sh.transactions
    assert rq.run("relayq", "flush").returncode == EX_OK
    assert received(sh) == Counter({b"<lim-0@example.org>": 1})


@pytest.mark.parametrize("max_connections", [1, 0])
def test_a_parallel_queue_run_logs_in_once_per_connection(
        tmp_path: Path, smarthost_factory: SmarthostFactory, max_connections: int) -> None:
    sh = smarthost_factory(auth={"relayuser": "pw-123"}, auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, user="relayuser", password="pw-123",
                concurrency=4, max_connections=max_connections)
    r = rq.sendmail("-bs", input=smtp_session(200), timeout=120)
    assert r.returncode == EX_OK, r.stderr
    assert len(rq.queued()) == 200
    assert rq.run("relayq", "flush", timeout=120).returncode == EX_OK
    assert received(sh) == Counter({f"<lim-{n}@example.org>".encode(): 1 for n in range(200)})
    connections = len({t.connection for t in sh.transactions})
    if max_connections:
        assert len(sh.logins) == 1 and connections == 1
    else:
        assert len(sh.logins) == connections <= 4  # a login per connection, not per message


# --- the providers' defaults ------------------------------------------------------

MS = ('oauth2_provider = "microsoft"\nuser = "alerts@contoso.example"\n'
      'oauth2_client_id = "0000-1111"\n')


def test_exchange_online_limits_are_the_default_for_microsoft(tmp_path: Path) -> None:
    cfg = parse('smarthost = "smtp.office365.com:587"\n' + MS + textwrap.dedent("""
        [account.shop]
        senders = ["@shop.example"]
        smarthost = "smtp.office365.com:587"
        user = "noreply@shop.example"
        oauth2_provider = "microsoft"
        oauth2_client_id = "2222"
        messages_per_minute = 10
        [account.cron]
        senders = ["root@host.example"]
        smarthost = "relay.example.org"
        """))
    accounts = cfg.accounts()
    assert (cfg.messages_per_minute, cfg.recipients_per_day) == (30, 10000)
    shop = accounts["shop"]
    assert (shop.messages_per_minute, shop.recipients_per_day) == (10, 10000)
    cron = accounts["cron"]
    assert (cron.messages_per_minute, cron.recipients_per_day) == (0, 0)


def test_check_config_shows_the_provider_limits_and_where_they_come_from(
        tmp_path: Path) -> None:
    rq = Relayq(tmp_path, smarthost="smtp.office365.com:587")
    rq.write_config(rq.config.read_text() + MS + "recipients_per_day = 500\n")
    out = rq.run("relayq", "check-config").stdout.decode()
    assert ('messages_per_minute = 30  # oauth2_provider = "microsoft" (the provider\'s '
            "own limit)") in out
    assert "recipients_per_day = 500\n" in out


@pytest.mark.parametrize("offered", [True, False])
def test_smtputf8_asked_for_at_submission_but_not_needed(
        tmp_path: Path, smarthost_factory: SmarthostFactory, offered: bool) -> None:
    """msmtp#197: SMTPUTF8 used when not needed makes relays refuse mail."""
    sh = smarthost_factory(smtputf8=offered)
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    session = (b"EHLO client.example.org\r\n"
               b"MAIL FROM:<alice@example.org> SMTPUTF8\r\nRCPT TO:<bob@example.org>\r\n"
               b"DATA\r\n" + mail(0).replace(b"\n", b"\r\n") + b".\r\nQUIT\r\n")
    r = rq.sendmail("-bs", input=session)
    assert r.returncode == EX_OK and b"250 2.0.0" in r.stdout, r.stdout
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert "SMTPUTF8" not in t.mail_options
    assert received(sh) == Counter({b"<lim-0@example.org>": 1})


@pytest.mark.parametrize("offered", [True, False])
def test_smtputf8_left_out_once_the_non_ascii_recipient_is_delivered(
        tmp_path: Path, smarthost_factory: SmarthostFactory, offered: bool) -> None:
    """Queued with SMTPUTF8 (a non-ASCII recipient); the one left is ASCII, and goes
    without it, whether the relay offers SMTPUTF8 or not."""
    first = smarthost_factory(rcpt_replies={"bob@example.org": "450 4.2.1 try later"})
    rq = Relayq(tmp_path, smarthost=first.smarthost)
    r = rq.sendmail("-i", "j\u00fcrgen@example.org", "bob@example.org", input=mail(1))
    assert r.returncode == EX_OK, r.stderr
    [(env, _)] = rq.queued()
    assert env.smtputf8
    rq.run("relayq", "flush")
    assert "SMTPUTF8" in first.transactions[0].mail_options
    plain = smarthost_factory(smtputf8=offered)
    rq.configure(smarthost=plain.smarthost)
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = plain.transactions
    assert t.rcpt_tos == ["bob@example.org"] and "SMTPUTF8" not in t.mail_options
    assert not rq.queued()
