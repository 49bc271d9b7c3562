"""`sendmail -bv`: the route each recipient would really take, in sendmail's shape.

The installed `sendmail` runs against real aliases and :include: files, real
passwd users (one created for the test, uid >= 1000), and the test DNS
responder for the smarthosts' MX records; nothing is queued.
"""

from __future__ import annotations

import os
import pwd
import shutil
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.helpers.users import System, ensure_users, install_launchers

from relayq.core.errors import EX_NOUSER, EX_OK, EX_TEMPFAIL, EX_USAGE
from relayq.testing.dns import DnsResponder

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ME = pwd.getpwuid(os.getuid()).pw_name
ORDINARY = "rqtest-alice"  # tests.helpers.users: a real user with a home, uid >= 1000
RELAY = "host [127.0.0.1]:9"  # the test config's smarthost


def bv(rq: Relayq, *rcpts: str) -> tuple[int, list[str]]:
    """(exit code, stdout's lines) of `sendmail -bv RCPTS`; never a traceback, nothing queued."""
    r = rq.sendmail("-bv", *rcpts)
    assert "Traceback" not in r.stderr.decode(), r.stderr
    assert rq.queued() == []
    return r.returncode, r.stdout.decode().splitlines()


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    """Local delivery with an aliases file naming an address, a mailbox, a file, a
    program and an :include: list."""
    (tmp_path / "mail").mkdir()
    team = tmp_path / "team"
    team.write_text("# the on-call list\nbob@example.net\n")
    team.chmod(0o644)
    (tmp_path / "aliases").write_text(
        "root: admin@example.org\n"
        "postmaster: root\n"
        f"ops: \\{ME}, {tmp_path}/archive, \"|/bin/cat >/dev/null\",\n"
        f"  :include:{team}\n"
        "ghosts: nosuchuser-rq\n"
        "half: nosuchuser-rq, carol@example.net\n"
        "loop1: loop2\nloop2: loop1\n"
        f"wide: :include:{tmp_path}/wide\n")
    (tmp_path / "wide").write_text("dave@example.net\n")
    (tmp_path / "wide").chmod(0o666)  # anyone could add a program: refused
    return Relayq(tmp_path, local_delivery=True, mail_spool=str(tmp_path / "mail"),
                  aliases_file=str(tmp_path / "aliases"), allow_file_targets=True,
                  allow_pipe_targets=True)


def test_aliases_local_targets_and_an_unknown_user(rq: Relayq) -> None:
    root = rq.root
    code, lines = bv(rq, "postmaster", "ops", "nobody", "nosuchuser-rq")
    assert lines == [
        "postmaster@host.example.org... aliased to admin@example.org",
        f"admin@example.org... deliverable: mailer relay, {RELAY}, user admin@example.org",
        f"ops@host.example.org... aliased to \\{ME}, {root}/archive, |/bin/cat >/dev/null, "
        "bob@example.net",
        f"\\{ME}... deliverable: mailer local, user {ME} ({root}/mail/{ME})",
        f"{root}/archive... deliverable: mailer *file*, user {root}/archive",
        "|/bin/cat >/dev/null... deliverable: mailer prog, user |/bin/cat >/dev/null",
        f"bob@example.net... deliverable: mailer relay, {RELAY}, user bob@example.net",
        f"nobody@host.example.org... deliverable: mailer local, user nobody ({root}/mail/nobody)",
        "nosuchuser-rq@host.example.org... User unknown",
    ], lines
    assert code == EX_NOUSER


def test_everything_deliverable_exits_0_and_each_final_recipient_is_shown_once(
        rq: Relayq) -> None:
    code, lines = bv(rq, "root", "postmaster@host.example.org", "a@example.net")
    assert lines == [
        "root@host.example.org... aliased to admin@example.org",
        f"admin@example.org... deliverable: mailer relay, {RELAY}, user admin@example.org",
        "postmaster@host.example.org... aliased to admin@example.org",
        f"a@example.net... deliverable: mailer relay, {RELAY}, user a@example.net",
    ], lines
    assert code == EX_OK


def test_an_alias_member_that_is_no_user_is_undeliverable(rq: Relayq) -> None:
    code, lines = bv(rq, "half", "ghosts")
    assert lines == [
        "half@host.example.org... aliased to carol@example.net",
        f"carol@example.net... deliverable: mailer relay, {RELAY}, user carol@example.net",
        "nosuchuser-rq... User unknown",
        "ghosts@host.example.org... User unknown (nosuchuser-rq)",
    ], lines
    assert code == EX_NOUSER


def test_an_alias_loop_is_undeliverable_and_a_refused_include_would_wait(rq: Relayq) -> None:
    code, lines = bv(rq, "wide")
    assert lines == [f"wide@host.example.org... deferred: {rq.root}/aliases:9: cannot read "
                     f":include:{rq.root}/wide: group or world writable: refused"], lines
    assert code == EX_TEMPFAIL
    code, lines = bv(rq, "wide", "loop1")
    assert lines[1:] == ["loop1@host.example.org... alias loop: loop1 -> loop2 -> loop1"], lines
    assert code == EX_NOUSER


def test_maildir_and_refused_files_and_programs(rq: Relayq) -> None:
    rq.configure(mailbox_format="maildir", allow_file_targets=False, allow_pipe_targets=False)
    home = pwd.getpwnam(ME).pw_dir
    code, lines = bv(rq, "ops")
    assert lines[1] == f"\\{ME}... deliverable: mailer local, user {ME} ({home}/Maildir)"
    assert lines[2] == (f"{rq.root}/archive... Cannot mail directly to files "
                        "(allow_file_targets is off)")
    assert lines[3] == ("|/bin/cat >/dev/null... Cannot mail directly to programs "
                        "(allow_pipe_targets is off)")
    assert code == EX_NOUSER


def test_without_local_delivery_aliases_do_not_apply(rq: Relayq) -> None:
    rq.configure(local_delivery=False)
    code, lines = bv(rq, "root", "nosuchuser-rq")
    assert lines == [
        f"root@host.example.org... deliverable: mailer relay, {RELAY}, "
        "user root@host.example.org",
        f"nosuchuser-rq@host.example.org... deliverable: mailer relay, {RELAY}, "
        "user nosuchuser-rq@host.example.org",
    ], lines
    assert code == EX_OK


def test_local_forward_sends_local_recipients_to_one_address(rq: Relayq) -> None:
    rq.configure(local_delivery=False, local_forward="admin@example.org")
    code, lines = bv(rq, "root", "cron@localhost", "a@example.net")
    assert lines == [
        "root@host.example.org... forwarded to admin@example.org (local_forward)",
        f"admin@example.org... deliverable: mailer relay, {RELAY}, user admin@example.org",
        "cron@localhost... forwarded to admin@example.org (local_forward)",
        f"a@example.net... deliverable: mailer relay, {RELAY}, user a@example.net",
    ], lines
    assert code == EX_OK
    rq.configure(local_delivery=True)  # local delivery wins: the aliases apply instead
    code, lines = bv(rq, "root")
    assert lines[0] == "root@host.example.org... aliased to admin@example.org", lines


def test_local_forward_for_system_users_only(rq: Relayq) -> None:
    ensure_users()
    assert pwd.getpwnam(ORDINARY).pw_uid >= 1000
    rq.configure(local_delivery=False, local_forward="admin@example.org",
                 local_forward_users="system")
    code, lines = bv(rq, "root", ORDINARY)
    assert lines == [
        "root@host.example.org... forwarded to admin@example.org (local_forward)",
        f"admin@example.org... deliverable: mailer relay, {RELAY}, user admin@example.org",
        f"{ORDINARY}@host.example.org... deliverable: mailer relay, {RELAY}, "
        f"user {ORDINARY}@host.example.org",
    ], lines
    assert code == EX_OK


def test_every_smarthost_in_order_with_its_mx_hosts(rq: Relayq) -> None:
    records = {
        "example.org": {"MX": ["20 mx2.example.org.", "10 mx1.example.org."]},
        "nomx.example.org": {"A": ["127.0.0.1"]},
    }
    with DnsResponder(records, faults={"broken.example.org mx": "SERVFAIL"}) as dns:
        rq.configure(local_delivery=False, dns_servers=[dns.server], port=587, smarthost=[
            "[smtp.example.org]", "example.org:2525", "nomx.example.org", "broken.example.org",
            "localhost:2526"])
        code, lines = bv(rq, "a@example.net", "b@example.net")
        assert ("example.org", "MX") in dns.queries
    hosts = ("host [smtp.example.org]:587, then example.org:2525 (MX: mx1.example.org, "
             "mx2.example.org), then nomx.example.org:587 (no MX record), "
             "then broken.example.org:587 (MX lookup of broken.example.org failed: no name "
             "server answered (SERVFAIL or REFUSED)), then localhost:2526")
    assert lines == [f"a@example.net... deliverable: mailer relay, {hosts}, user a@example.net",
                     f"b@example.net... deliverable: mailer relay, {hosts}, user b@example.net"]
    assert code == EX_OK


def test_no_recipients_is_a_usage_error(rq: Relayq) -> None:
    r = rq.sendmail("-bv")
    assert r.returncode == EX_USAGE
    assert r.stderr.decode().strip().endswith("Recipient names must be specified"), r.stderr


# -- an ordinary user: reads the configuration and the aliases, never the queue


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    ensure_users()
    launchers = install_launchers()
    sysrq = System(launchers, local_delivery=True)
    base = sysrq.dir
    (base / "mail").mkdir()
    (base / "aliases").write_text(f"root: admin@example.org\nops: {ORDINARY}\n")
    (base / "aliases").chmod(0o644)
    sysrq.configure(mail_spool=str(base / "mail"), aliases_file=str(base / "aliases"))
    yield sysrq
    sysrq.cleanup()
    shutil.rmtree(launchers, ignore_errors=True)


def test_an_ordinary_user_sees_the_route(system: System) -> None:
    r = system.sendmail_as(ORDINARY, "-bv", "root", "ops", "nosuchuser-rq")
    assert "Traceback" not in r.stderr.decode(), r.stderr
    mail = system.dir / "mail"
    assert r.stdout.decode().splitlines() == [
        "root@host.example.org... aliased to admin@example.org",
        "admin@example.org... deliverable: mailer relay, host [127.0.0.1]:9, "
        "user admin@example.org",
        f"ops@host.example.org... aliased to \\{ORDINARY}",
        f"\\{ORDINARY}... deliverable: mailer local, user {ORDINARY} ({mail}/{ORDINARY})",
        "nosuchuser-rq@host.example.org... User unknown",
    ], r
    assert r.returncode == EX_NOUSER
    assert system.drops() == [] and system.rq.queued() == []


def test_an_aliases_file_the_user_cannot_read_is_one_line(system: System) -> None:
    (system.dir / "aliases").chmod(0o600)
    r = system.sendmail_as(ORDINARY, "-bv", "root")
    assert "Traceback" not in r.stderr.decode(), r.stderr
    assert r.stdout.decode().splitlines() == [
        f"root@host.example.org... deferred: {system.dir}/aliases: Permission denied"], r
    assert r.returncode == EX_TEMPFAIL
