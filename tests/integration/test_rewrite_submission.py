"""local_forward, the generics map and all_mail_from, end to end to a real smarthost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_CONFIG, EX_OK

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory


def test_cron_mail_to_root_reaches_the_forward_address(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    generics = tmp_path / "generics"
    generics.write_text("# local user -> address\nroot alerts@example.org\n")
    rq = Relayq(tmp_path, smarthost=sh.smarthost, local_forward="admin@example.org",
                generics_file=str(generics), all_mail_from="bounces@example.org")
    r = rq.sendmail("-i", "root", "x@example.net",
                    input=b"Subject: cron\n\nout\n")
    assert r.returncode == EX_OK, r.stderr
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.rcpt_tos == ["admin@example.org", "x@example.net"]
    assert t.mail_from == "bounces@example.org"
    assert "forwarded to <admin@example.org>" in rq.log()


def test_local_forward_leaves_colleagues_at_the_mail_domain(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """The mail domain is the organisation's: only a name typed bare, localhost and this
    host's own names are this host's (nullmailer's adminaddr rule)."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, domain="example.org",
                local_forward="admin@example.org")
    r = rq.sendmail("-i", "bob@example.org", "carol", input=b"Subject: x\n\nhi\n")
    assert r.returncode == EX_OK, r.stderr
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.rcpt_tos == ["bob@example.org", "admin@example.org"]
    assert "to=<carol@example.org>, forwarded to <admin@example.org>" in rq.log()
    assert "to=<bob@example.org>, forwarded" not in rq.log()


def test_local_domains_set_by_the_admin_are_forwarded(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, domain="example.org",
                local_forward="admin@example.org", local_domains=["example.org"])
    assert rq.sendmail("-i", "bob@example.org", input=b"\nhi\n").returncode == EX_OK
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert t.rcpt_tos == ["admin@example.org"]


def test_an_explicit_recipient_keeps_its_own_dsn_request_next_to_a_forwarded_one(
        tmp_path: Path) -> None:
    rq = Relayq(tmp_path, local_forward="admin@example.org")
    dialogue = (b"EHLO x\r\nMAIL FROM:<u@example.org>\r\n"
                b"RCPT TO:<root> NOTIFY=NEVER\r\n"
                b"RCPT TO:<Admin@example.org> NOTIFY=FAILURE ORCPT=rfc822;Admin@example.org\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nx\r\n.\r\nQUIT\r\n")
    r = rq.sendmail("-bs", input=dialogue)
    assert r.returncode == EX_OK, r.stderr
    [(env, _)] = rq.queued()
    [rcpt] = env.recipients  # one copy to the one mailbox
    assert rcpt.address.lower() == "admin@example.org"
    assert (rcpt.notify, rcpt.orcpt) == ("FAILURE", "rfc822;Admin@example.org")


def test_forwarded_duplicates_merge_their_notify_requests(tmp_path: Path) -> None:
    rq = Relayq(tmp_path, local_forward="admin@example.org")
    dialogue = (b"EHLO x\r\nMAIL FROM:<u@example.org>\r\n"
                b"RCPT TO:<root> NOTIFY=NEVER\r\n"
                b"RCPT TO:<postmaster> NOTIFY=SUCCESS\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert rq.sendmail("-bs", input=dialogue).returncode == EX_OK
    [(env, _)] = rq.queued()
    [rcpt] = env.recipients
    assert rcpt.address == "admin@example.org"
    assert rcpt.notify == "SUCCESS"


def test_a_bounce_to_a_local_sender_is_forwarded(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    """Cron's mail that bounces must reach the admin, not root@ at the smarthost."""
    sh = smarthost_factory(rcpt_replies={"bad@example.org": "550 5.1.1 no such user"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, local_forward="admin@example.org")
    r = rq.sendmail("bad@example.org", input=b"Subject: cron\n\nhi\n")
    assert r.returncode == EX_OK, r.stderr
    for _ in range(3):
        rq.run("relayq", "flush")
        if not rq.queued():
            break
    bounces = [t.rcpt_tos for t in sh.transactions if t.mail_from in ("", "<>")]
    assert bounces == [["admin@example.org"]], rq.log()


def test_a_bad_forward_or_generics_address_is_refused_at_load(tmp_path: Path) -> None:
    for key in ("all_mail_from", "local_forward"):
        for value in ("<admin@example.org>", "a@b.org,c@d.org", "a@b.org;", "a:b@c.org"):
            rq = Relayq(tmp_path, **{key: value})
            r = rq.sendmail("-odq", "u@example.org", input=b"\nx\n")
            assert r.returncode == EX_CONFIG, (key, value)
            assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
            assert not rq.queued()
    generics = tmp_path / "generics"
    generics.write_text("root admin@example.org>\n")
    rq = Relayq(tmp_path, generics_file=str(generics), all_mail_from="")
    r = rq.sendmail("-odq", "u@example.org", input=b"\nx\n")
    assert r.returncode == EX_CONFIG
    assert f"{generics}:1" in r.stderr.decode()


def test_a_generics_file_that_is_a_fifo_or_too_large_is_refused(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_text("root admin@example.org\n" * 50000)  # over 1 MiB
    for path in (fifo, big):
        rq = Relayq(tmp_path, generics_file=str(path))
        r = rq.sendmail("-odq", "u@example.org", input=b"\nx\n", timeout=30)
        assert r.returncode == EX_CONFIG, r.stderr
        assert "generics_file" in r.stderr.decode()
