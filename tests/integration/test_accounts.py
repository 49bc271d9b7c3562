"""Accounts per sender, end to end (issue 16 part 2): the account is chosen at submission
(sendmail, -bs, maildrop), each account's mail goes through its own smarthost with its
own credentials over its own connection, a removed account's mail waits for
`relayq requeue --reroute`, and mailq -v, status, the log, check-config, `relayq test`
and `sendmail -bv` name the account. Real commands, real TLS, real test smarthosts."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for

from relayq.core.errors import EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(120)

MSG = b"Subject: accounts\n\nhello\n"
PASSWORDS = {"default": "def-Pw!1", "shop": "shop-Pw!2", "news": "news-Pw!3"}
USERS = {"default": "host@example.org", "shop": "noreply@shop.example",
         "news": "letters@news.example"}
SENDERS = {"shop": ["noreply@shop.example"], "news": ["@news.example"]}


class Setup:
    """Three TLS smarthosts (the default's and two accounts'), each knowing only its own
    credentials, and a Relayq whose config names them."""

    def __init__(self, factory: SmarthostFactory, pki: TestPKI, tmp_path: Path,
                 replies: dict[str, dict[str, str]] | None = None) -> None:
        self.hosts: dict[str, Smarthost] = {
            name: factory(tls_context=pki.server_context(), auth={USERS[name]: PASSWORDS[name]},
                          auth_required=True, replies=(replies or {}).get(name))
            for name in PASSWORDS}
        self.senders = dict(SENDERS)
        self.ca = pki.write_ca(str(tmp_path))
        d = self.hosts["default"]
        self.rq = Relayq(tmp_path, smarthost=d.smarthost, tls="required", ca_file=self.ca,
                         user=USERS["default"], password=PASSWORDS["default"], concurrency=1)
        self.write(["shop", "news"])

    def write(self, accounts: list[str]) -> None:
        """The flat settings, then an [account.NAME] table for each of `accounts`."""
        self.rq.configure()
        text = self.rq.config.read_text()
        for name in accounts:
            senders = ", ".join(f'"{s}"' for s in self.senders[name])
            text += (f"\n[account.{name}]\nsenders = [{senders}]\n"
                     f'smarthost = "{self.hosts[name].smarthost}"\ntls = "required"\n'
                     f'user = "{USERS[name]}"\npassword = "{PASSWORDS[name]}"\n')
        self.rq.write_config(text)

    def send(self, sender: str, rcpt: str = "bob@example.org") -> str:
        before = set(self.rq.spool.ids())
        r = self.rq.sendmail("-odq", "-f", sender, rcpt, input=MSG)
        assert r.returncode == EX_OK, r.stderr
        [qid] = set(self.rq.spool.ids()) - before
        return qid

    def accounts(self) -> dict[str, str]:
        return {env.sender: env.account for env, _ in self.rq.queued()}

    def got(self, name: str) -> list[str]:
        return [t.mail_from for t in self.hosts[name].transactions]


@pytest.fixture
def setup(smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> Setup:
    return Setup(smarthost_factory, pki, tmp_path)


def test_sendmail_records_the_senders_account(setup: Setup) -> None:
    for sender in ("noreply@shop.example", "Someone@NEWS.example", "other@shop.example",
                   "root@host.example.org"):
        setup.send(sender)
    assert setup.accounts() == {"noreply@shop.example": "shop", "Someone@NEWS.example": "news",
                                "other@shop.example": "", "root@host.example.org": ""}


def test_the_account_follows_the_rewritten_sender(setup: Setup) -> None:
    """all_mail_from rewrites the envelope sender first: its account serves the mail."""
    setup.rq.configure(all_mail_from="noreply@shop.example")
    setup.write(["shop", "news"])
    setup.send("letters@news.example")
    assert setup.accounts() == {"noreply@shop.example": "shop"}


def test_an_smtp_session_on_stdin_records_the_account(setup: Setup) -> None:
    session = (b"EHLO client.example\r\nMAIL FROM:<letters@news.example>\r\n"
               b"RCPT TO:<bob@example.org>\r\nDATA\r\nSubject: bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    r = setup.rq.sendmail("-bs", "-odq", input=session)
    assert r.returncode == EX_OK, r.stdout
    assert setup.accounts() == {"letters@news.example": "news"}


def test_a_maildrop_file_records_the_account_when_taken(setup: Setup) -> None:
    from relayq.core.config import parse
    from relayq.queue.maildrop import hand_over_request
    from relayq.queue.submit import Request

    setup.send("root@host.example.org")  # makes the queue and its maildrop/
    cfg = parse(setup.rq.config.read_text())
    req = Request(user="nobody", uid=65534, sender="noreply@shop.example",
                  recipients=["bob@example.org"])
    name = hand_over_request(cfg, setup.rq.spool, req, [MSG])  # no daemon: it waits
    os.chown(os.path.join(setup.rq.spool.maildrop, name), 65534, 65534)  # as nobody wrote it
    r = setup.rq.run("relayq", "flush")
    assert r.returncode == EX_OK, r.stderr
    assert setup.got("shop") == ["noreply@shop.example"], (setup.got("default"), setup.rq.log())
    assert setup.got("default") == ["root@host.example.org"]


def test_each_account_relays_through_its_own_smarthost_one_connection_each(
        setup: Setup) -> None:
    for sender in ("noreply@shop.example", "root@host.example.org", "a@news.example",
                   "noreply@shop.example", "b@news.example", "cron@host.example.org"):
        setup.send(sender)
    r = setup.rq.run("relayq", "flush")
    assert r.returncode == EX_OK, r.stderr
    assert setup.rq.queued() == []
    assert sorted(setup.got("shop")) == ["noreply@shop.example"] * 2
    assert sorted(setup.got("news")) == ["a@news.example", "b@news.example"]
    assert sorted(setup.got("default")) == ["cron@host.example.org", "root@host.example.org"]
    for name, sh in setup.hosts.items():
        assert sh.connections == 1, name
        assert sh.logins == [("PLAIN", USERS[name], PASSWORDS[name])], name
    log = setup.rq.log()
    shop = [line for line in log.splitlines() if "to=<bob@example.org>" in line
            and "account=shop" in line]
    assert len(shop) == 2 and all("stat=Sent" in line for line in shop), log
    assert "account=default" not in log


def test_a_removed_account_defers_its_mail_until_rerouted(setup: Setup) -> None:
    qid = setup.send("noreply@shop.example")
    setup.write(["news"])  # shop's table removed after the mail was queued
    r = setup.rq.run("relayq", "flush")
    assert r.returncode == EX_TEMPFAIL
    [(env, _)] = setup.rq.queued()
    assert env.account == "shop"
    [rcpt] = env.recipients
    assert "account no longer configured" in rcpt.reply
    assert "relayq requeue --reroute" in rcpt.reply
    assert not rcpt.remote
    assert all(sh.connections == 0 for sh in setup.hosts.values())  # sent nowhere else
    mailq = setup.rq.run("mailq", "-v").stdout.decode()
    assert "account shop" in mailq and "account no longer configured" in mailq, mailq
    relays = json.loads(setup.rq.run("relayq", "status", "--json").stdout)["relays"]
    assert list(relays) == ["(account shop)"], relays  # counted there, never as "local"
    assert "account no longer configured" in relays["(account shop)"]["last_error"]

    # long past max_queue_age it still waits: the fault is our configuration's
    setup.rq.configure(max_queue_age="1s")
    setup.write(["news"])
    time.sleep(1.5)
    assert setup.rq.run("relayq", "flush").returncode == EX_TEMPFAIL
    [(env, _)] = setup.rq.queued()
    assert env.recipients[0].state == "pending" and env.notice is None
    assert all(sh.transactions == [] for sh in setup.hosts.values())

    r = setup.rq.run("relayq", "requeue", "--reroute")
    assert r.returncode == EX_OK, r.stdout + r.stderr
    assert r.stdout.decode() == f"{qid}: requeued (due now), rerouted from shop to default\n"
    assert f"{qid}: requeued (due now), rerouted from shop to default by " in setup.rq.log()
    assert setup.rq.queued() == []
    assert setup.got("default") == ["noreply@shop.example"]
    assert setup.got("shop") == []


def test_requeue_reroute_takes_selectors_and_ids(setup: Setup) -> None:
    shop = setup.send("noreply@shop.example")
    news = setup.send("a@news.example")
    setup.write([])  # both accounts removed
    r = setup.rq.run("relayq", "requeue", "--reroute", "-qSshop")
    assert r.stdout.decode() == f"{shop}: requeued (due now), rerouted from shop to default\n"
    assert setup.accounts() == {"a@news.example": "news"}  # not selected: left alone
    assert setup.got("default") == ["noreply@shop.example"]
    r = setup.rq.run("relayq", "requeue", "--reroute", news)
    assert r.stdout.decode() == f"{news}: requeued (due now), rerouted from news to default\n"
    assert setup.got("default") == ["noreply@shop.example", "a@news.example"]
    assert setup.rq.run("relayq", "requeue").returncode == 64  # names no message


def test_mailq_verbose_and_json_lines_and_status_name_the_account(setup: Setup) -> None:
    qid = setup.send("noreply@shop.example")
    other = setup.send("root@host.example.org")
    plain = setup.rq.run("mailq").stdout.decode()
    assert "account" not in plain  # sendmail's listing stays sendmail's
    verbose = setup.rq.run("mailq", "-v").stdout.decode()
    assert "account shop" in verbose, verbose
    objects = {o["queue_id"]: o for o in map(json.loads, setup.rq.run(
        "mailq", "--json-lines").stdout.decode().splitlines())}
    assert objects[qid]["account"] == "shop" and "account" not in objects[other]
    doc = json.loads(setup.rq.run("mailq", "--json").stdout)
    assert {m["id"]: m["account"] for m in doc["messages"]} == {qid: "shop", other: "default"}
    setup.write(["news"])  # shop's table removed: its mail is still counted
    status = setup.rq.run("relayq", "status").stdout.decode()
    assert f"account default: 1 queued, to {setup.hosts['default'].smarthost}\n" in status
    assert f"account news: 0 queued, to {setup.hosts['news'].smarthost}\n" in status
    assert "account shop: 1 queued, no longer configured: relayq requeue --reroute\n" in status
    data = json.loads(setup.rq.run("relayq", "status", "--json").stdout)
    assert {n: (a["queued"], a["configured"]) for n, a in data["accounts"].items()} == {
        "default": (1, True), "news": (0, True), "shop": (1, False)}


def test_check_config_prints_each_account_as_a_table_that_reads_back(setup: Setup) -> None:
    import tomllib

    from relayq.core.config import parse

    r = setup.rq.run("relayq", "check-config")
    out = r.stdout.decode()
    assert r.returncode == EX_OK, r.stderr
    assert all(p not in out for p in PASSWORDS.values())
    tables = tomllib.loads(out)["account"]
    assert sorted(tables) == ["news", "shop"]
    assert tables["shop"]["senders"] == SENDERS["shop"]
    assert tables["shop"]["smarthost"] == [setup.hosts["shop"].smarthost]
    assert tables["news"]["user"] == USERS["news"] and tables["news"]["password"] == "********"
    again = parse(out)
    assert {n: (a.smarthost, a.user, a.senders) for n, a in again.accounts().items()} == {
        "default": ([setup.hosts["default"].smarthost], USERS["default"], []),
        "shop": ([setup.hosts["shop"].smarthost], USERS["shop"], SENDERS["shop"]),
        "news": ([setup.hosts["news"].smarthost], USERS["news"], SENDERS["news"])}


def test_relayq_test_tries_every_account_or_the_one_named(setup: Setup) -> None:
    r = setup.rq.run("relayq", "test")
    out = r.stdout.decode()
    assert r.returncode == EX_OK, out + r.stderr.decode()
    for name, sh in setup.hosts.items():
        assert f"smarthost {sh.smarthost} (account {name})\n" in out, out
        assert sh.logins == [("PLAIN", USERS[name], PASSWORDS[name])], name
        assert sh.transactions == []
    assert all(p not in out for p in PASSWORDS.values())

    r = setup.rq.run("relayq", "test", "--account", "shop", "bob@example.org")
    out = r.stdout.decode()
    assert r.returncode == EX_OK, out + r.stderr.decode()
    assert out.startswith(f"smarthost {setup.hosts['shop'].smarthost} (account shop)\n"), out
    assert "(account default)" not in out
    assert setup.got("shop") == ["noreply@shop.example"]  # from an address it serves
    assert setup.got("default") == [] and len(setup.hosts["default"].logins) == 1

    r = setup.rq.run("relayq", "test", "--account", "nosuch")
    assert r.returncode == 64
    assert r.stderr.decode() == ("relayq: test: no account 'nosuch' "
                                 "(accounts: default, shop, news)\n")


def test_sendmail_bv_shows_the_senders_account_and_its_smarthost(setup: Setup) -> None:
    shop, default = setup.hosts["shop"].smarthost, setup.hosts["default"].smarthost
    r = setup.rq.sendmail("-bv", "-f", "noreply@shop.example", "bob@example.org")
    assert r.stdout.decode() == ("bob@example.org... deliverable: mailer relay, account shop, "
                                 f"host {shop}, user bob@example.org\n"), r.stdout
    r = setup.rq.sendmail("-bv", "-f", "cron@host.example.org", "bob@example.org")
    assert f"account default, host {default}, user bob@example.org\n" in r.stdout.decode()


def test_a_reload_routes_new_mail_by_the_new_tables_and_queued_mail_keeps_its_account(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    import signal
    import smtplib

    setup = Setup(smarthost_factory, pki, tmp_path, {"shop": {"mail": "451 4.3.0 later"}})
    port = free_port()
    setup.rq.configure(pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                       listen=[f"127.0.0.1:{port}"])
    setup.write(["shop", "news"])
    d = DaemonProcess(setup.rq, "--listen").wait_ready()
    try:
        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("noreply@shop.example", ["bob@example.org"],
                           MSG.replace(b"\n", b"\r\n"))

        submit()
        wait_for(lambda: "Deferred: 451 4.3.0 later" in setup.rq.log(), what="shop's deferral")
        assert setup.accounts() == {"noreply@shop.example": "shop"}
        setup.senders["news"] = ["@news.example", "noreply@shop.example"]
        setup.write(["news"])  # shop's table removed, its sender now news's
        d.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in setup.rq.log(), what="the reload")
        submit()
        wait_for(lambda: setup.got("news") == ["noreply@shop.example"], what="news's delivery")
        d.signal(signal.SIGUSR1)  # the queued one is tried again: it keeps its account
        wait_for(lambda: "account no longer configured: shop" in setup.rq.log(),
                 what="the removed account's deferral")
        [(env, _)] = setup.rq.queued()
        assert env.account == "shop" and env.pending()
        assert setup.got("default") == [] and len(setup.hosts["news"].transactions) == 1
    finally:
        assert d.stop() == EX_OK


def test_check_config_checks_each_accounts_secret_and_relay(setup: Setup,
                                                            tmp_path: Path) -> None:
    text = setup.rq.config.read_text().replace(
        f'password = "{PASSWORDS["news"]}"', f'password_file = "{tmp_path}/missing.pw"')
    setup.rq.write_config(text)
    r = setup.rq.run("relayq", "check-config")
    err = r.stderr.decode()
    assert r.returncode == 78, err
    assert f"relayq: {setup.rq.config}: account news: password_file: " in err, err
    assert "account shop" not in err and "account default" not in err


def test_a_bounce_goes_through_the_default_account(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    setup = Setup(smarthost_factory, pki, tmp_path)
    setup.hosts["shop"].rcpt_replies = {"bob@example.org": "550 5.1.1 no such user"}
    setup.send("noreply@shop.example")
    assert setup.rq.run("relayq", "flush").returncode == EX_OK
    assert setup.rq.queued() == []
    [bounce] = setup.hosts["default"].transactions
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["noreply@shop.example"]
    assert setup.hosts["shop"].transactions == []  # refused there: nothing was accepted


def test_an_account_relaying_to_our_own_listener_is_a_loop(setup: Setup) -> None:
    setup.rq.configure(listen=["127.0.0.1:2525"])
    setup.write(["shop", "news"])
    text = setup.rq.config.read_text().replace(
        f'smarthost = "{setup.hosts["news"].smarthost}"', 'smarthost = "[127.0.0.1]:2525"')
    setup.rq.write_config(text)
    r = setup.rq.run("relayq", "check-config")
    assert r.returncode == 78
    assert "smarthost: smarthost [127.0.0.1]:2525 (account news) is this relayq's own " \
        "listener (listen 127.0.0.1:2525): mail would loop back to me" in r.stderr.decode()
    r = setup.rq.run("relayq", "daemon", "--foreground", "--listen")
    assert r.returncode == 78 and "(account news)" in r.stderr.decode(), r.stderr
