"""Issue 16's review, the delivery side: a limit's state failing after the relay's 250
never sends mail twice; recipients that wait on us are never returned, whatever the
others of their message do; a relay's words never hold mail; rewrite_from's account
keeps its mail on requeue --reroute; a long static password goes as a password; a
FIFO in the limits directory never hangs delivery. Real commands, real relays on
loopback, real files."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.core.outcome import FAILED, PENDING, SENT
from relayq.delivery import limits
from relayq.delivery.runner import Runner
from relayq.queue.submit import Context
from relayq.system import configfile
from relayq.system.log import Log

if TYPE_CHECKING:
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(120)

MSG = b"From: s@example.org\nSubject: once\n\nhi\n"


class FaultRelay:
    """A plain loopback relay that runs `fault()` while it holds the message, just
    before its 250 to the dot (what fails then fails between the relay's answer
    and the queue's record of it)."""

    def __init__(self, fault: object) -> None:
        self.fault = fault
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def smarthost(self) -> str:
        return f"[127.0.0.1]:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")

        def say(line: str) -> None:
            f.write(line.encode() + b"\r\n")
            f.flush()

        say("220 relay.test ESMTP")
        for raw in f:
            verb = raw.decode().strip().upper()
            if verb.startswith("EHLO"):
                say("250-relay.test")
                say("250 8BITMIME")
            elif verb.startswith("RCPT"):
                say("550 5.1.1 no such user" if "GONE@" in verb else "250 ok")
            elif verb == "DATA":
                say("354 go")
                body = b"".join(iter(f.readline, b".\r\n"))
                self.received.append(body)
                if len(self.received) == 1:
                    self.fault()  # type: ignore[operator]
                say(f"250 2.0.0 queued as M{len(self.received)}")
            elif verb == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")


def test_a_limits_write_failing_after_the_relays_250_never_sends_twice(tmp_path: Path) -> None:
    """Defect 1: the relay took the message, then the limits state could not be
    written (a directory where its temporary file goes: ENOSPC, EIO). The relay's
    answer is recorded all the same, and the next run sends nothing again."""
    tmp = tmp_path / "queue" / "limits" / "default.state.tmp"
    relay = FaultRelay(lambda: tmp.mkdir(parents=True, exist_ok=True))
    rq = Relayq(tmp_path, smarthost=relay.smarthost, recipients_per_day=100,
                retry_min=1, retry_max=1)
    assert rq.sendmail("-odq", "-f", "s@example.org", "ok@example.org", "gone@example.org",
                       input=MSG).returncode == 0
    assert rq.run("relayq", "run").returncode == 0
    log = rq.log()
    assert "delivery failed" not in log, log
    assert "to=<ok@example.org>" in log and "stat=Sent" in log, log
    tmp.rmdir()
    time.sleep(1.1)
    rq.run("relayq", "run")
    originals = [b for b in relay.received if b"Subject: once" in b and b"MAILER-DAEMON" not in b]
    assert len(originals) == 1


FAULT = """
import os
_rename = os.rename


def rename(src, dst, *args, **kwargs):  # the limits state's, once, as the relay holds the mail
    flag = os.environ["RELAYQ_TEST_FAULT"]
    if str(dst).endswith("default.state") and os.path.exists(flag):
        os.unlink(flag)
        raise RuntimeError("injected fault")
    return _rename(src, dst, *args, **kwargs)


os.rename = rename
"""


def test_nothing_that_can_fail_runs_between_the_relays_250_and_its_record(
        tmp_path: Path) -> None:
    """Defect 1, the rule itself: whatever the limits' settle raises (here any exception,
    injected into the real `relayq run` process), the relay's answer is recorded first,
    so the mail is never sent again."""
    flag = tmp_path / "fault-on"
    relay = FaultRelay(flag.touch)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT)
    rq = Relayq(tmp_path, smarthost=relay.smarthost, recipients_per_day=100,
                retry_min=1, retry_max=1)
    assert rq.sendmail("-odq", "-f", "s@example.org", "ok@example.org", "gone@example.org",
                       input=MSG).returncode == 0
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**rq.env, "PYTHONPATH": path, "RELAYQ_TEST_FAULT": str(flag)}
    subprocess.run([str(BIN / "relayq"), "run"], env=env, capture_output=True, timeout=60,
                   check=False)
    assert relay.received and not flag.exists()  # the fault struck, once
    log = rq.log()
    assert "delivery failed" not in log and "stat=Sent" in log, log
    time.sleep(1.1)
    subprocess.run([str(BIN / "relayq"), "run"], env=env, capture_output=True, timeout=60,
                   check=False)
    originals = [b for b in relay.received if b"Subject: once" in b and b"MAILER-DAEMON" not in b]
    assert len(originals) == 1


def test_limit_held_recipients_outlive_another_recipients_expiry(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    """Defect 3: recipients_per_day holds three recipients back while the relay defers
    another; at max_queue_age only that one is returned, the held ones keep waiting."""
    sh = smarthost_factory(rcpt_replies={"r1@example.org": "451 4.2.0 mailbox busy"})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, recipients_per_day=3, max_queue_age=2,
                retry_min=1, retry_max=1)
    rcpts = [f"r{i}@example.org" for i in range(6)]
    assert rq.sendmail("-odq", "-f", "s@example.org", *rcpts, input=MSG).returncode == 0
    rq.run("relayq", "run")
    time.sleep(2.5)
    rq.run("relayq", "run")
    [orig] = [e for e, _ in rq.queued() if e.sender]
    states = {r.address: r.state for r in orig.recipients}
    assert states == {"r0@example.org": SENT, "r1@example.org": FAILED,
                      "r2@example.org": SENT, "r3@example.org": PENDING,
                      "r4@example.org": PENDING, "r5@example.org": PENDING}
    for r in orig.recipients[3:]:
        assert r.reply.startswith("4.7.0 sending limit reached:"), r.reply
    bounces = [d for e, d in rq.queued() if not e.sender] + \
        [t.content for t in sh.transactions if t.mail_from in ("", "<>")]
    assert bounces and all(b"r3@example.org" not in b for b in bounces)


@pytest.mark.parametrize("greeting", ["421 4.7.0 sending limit reached for this IP",
                                      "421 4.3.5 account no longer configured",
                                      "421 re-authorization needed: run relayq oauth2 login"])
def test_a_relays_words_never_hold_mail_past_max_queue_age(
        smarthost_factory: SmarthostFactory, tmp_path: Path, greeting: str) -> None:
    """Defect 4: only a reply relayq wrote itself waits on us; a relay's greeting
    quoting one of those reasons is the relay's, and the mail is returned in time."""
    sh = smarthost_factory(replies={"greeting": greeting})
    rq = Relayq(tmp_path, smarthost=sh.smarthost, max_queue_age=2, retry_min=1, retry_max=1)
    assert rq.sendmail("-odq", "-f", "s@example.org", "a@example.org", input=MSG).returncode == 0
    time.sleep(2.5)
    rq.run("relayq", "run")
    queued = rq.queued()
    assert not [e for e, _ in queued if e.sender], rq.log()
    assert [e for e, _ in queued if not e.sender]  # the bounce, waiting on the same relay


def test_reroute_keeps_a_rewrite_from_accounts_mail(tmp_path: Path) -> None:
    """Defect 5: with rewrite_from the queued sender is the account's own address,
    which that account serves: requeue --reroute chooses it again."""
    rq = Relayq(tmp_path)
    rq.write_config(rq.config.read_text() + (
        '\n[account.shop]\nsenders = ["@shop.example"]\nsmarthost = "[127.0.0.1]:9"\n'
        'user = "shop.mailbox@gmail.example"\npassword = "pw"\nrewrite_from = true\n'))
    assert rq.sendmail("-odq", "-f", "bob@shop.example", "a@example.org",
                       input=b"From: bob@shop.example\n\nhi\n").returncode == 0
    [(env, _)] = rq.queued()
    assert (env.sender, env.account) == ("shop.mailbox@gmail.example", "shop")
    r = rq.run("relayq", "requeue", "--reroute")  # 75: the mail stays queued (no relay)
    assert b"account shop kept" in r.stdout, (r.stdout, r.stderr)
    [(env, _)] = rq.queued()
    assert env.account == "shop"
    assert "rerouted" not in rq.log()


def test_a_long_password_from_password_file_goes_as_plain(
        smarthost_factory: SmarthostFactory, pki: TestPKI, tmp_path: Path) -> None:
    """Defect 11: 120 token68 characters in password_file are a password: PLAIN,
    though XOAUTH2 is offered (only password_command's output may be a token)."""
    pw = "Ab3" * 40
    sh = smarthost_factory(tls_context=pki.server_context(), auth_required=True,
                           auth={"me@example.org": pw},
                           auth_mechanisms=("PLAIN", "LOGIN", "XOAUTH2"),
                           token_check=lambda u, t: False)
    ca = pki.write_ca(str(tmp_path))
    os.chmod(ca, 0o644)
    pf = tmp_path / "pw"
    pf.write_text(pw + "\n")
    pf.chmod(0o600)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, tls="required", ca_file=ca,
                user="me@example.org", password_file=str(pf))
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    rq.run("relayq", "run")
    assert [m for m, _, _ in sh.logins] == ["PLAIN"]
    assert len(sh.transactions) == 1 and not rq.queued()


def test_an_unusable_limits_directory_is_logged_and_the_mail_goes(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    """Suspicion: a limits directory that cannot be used let mail go without limits and
    without a word; now one log line says the limits are not kept."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, messages_per_minute=30)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    (rq.queue_dir / "limits").write_text("not a directory\n")
    assert rq.run("relayq", "run").returncode == 0
    assert len(sh.transactions) == 1 and not rq.queued()
    assert rq.log().count("sending limits of account default not kept") == 1, rq.log()


@pytest.mark.parametrize("name", ["default.state", "default.lock"])
def test_a_fifo_in_the_limits_directory_never_hangs_delivery(
        smarthost_factory: SmarthostFactory, tmp_path: Path, name: str) -> None:
    """Defect 15: a FIFO planted at the limits state (or its lock) is refused, with one
    log line; the mail goes, as when the limits cannot be kept."""
    sh = smarthost_factory()
    rq = Relayq(tmp_path, smarthost=sh.smarthost, messages_per_minute=30)
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    (rq.queue_dir / "limits").mkdir(mode=0o700)
    os.mkfifo(rq.queue_dir / "limits" / name, 0o600)
    r = rq.run("relayq", "run", timeout=30)
    assert r.returncode == 0, r.stderr
    assert len(sh.transactions) == 1 and not rq.queued()
    assert "not a regular file" in rq.log()


class EndlessSasl(FaultRelay):
    """A relay offering XOAUTH2 that answers 334 to every line once AUTH began: the
    SASL error exchange never ends (each line it reads is recorded)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        super().__init__(None)

    def _session(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb")

        def say(line: str) -> None:
            f.write(line.encode() + b"\r\n")
            f.flush()

        say("220 relay.test ESMTP")
        in_auth = False
        for raw in f:
            line = raw.decode().strip()
            self.lines.append(line[:12])
            if in_auth or line.upper().startswith("AUTH"):
                in_auth = True
                say("334 eyJzdGF0dXMiOiI0MDEifQ==")  # {"status":"401"}
            elif line.upper().startswith("EHLO"):
                say("250-relay.test")
                say("250 AUTH XOAUTH2")
            elif line.upper() == "QUIT":
                say("221 bye")
                return
            else:
                say("250 ok")


def test_a_sasl_exchange_the_relay_never_ends_closes_the_connection(tmp_path: Path) -> None:
    """Suspicion: after our end of the SASL error exchange the relay still says 334.
    The connection is closed (no AUTH is sent inside the exchange, though the token
    changed) and the reason says so, not the relay's "334 ..." line."""
    relay = EndlessSasl()
    counter = tmp_path / "runs"
    script = tmp_path / "token.py"
    script.write_text(
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "print('eyJ0eXAiOiJKV1QifQ.' + 'e' * 200 + '.sig' + str(n))\n")
    rq = Relayq(tmp_path, smarthost=relay.smarthost, user="me@example.org",
                password_command=f"{sys.executable} {script}")
    assert rq.sendmail("-odq", "a@example.org", input=MSG).returncode == 0
    rq.run("relayq", "run")
    auths = [i for i, line in enumerate(relay.lines) if line.upper().startswith("AUTH")]
    assert len(auths) == 1, relay.lines
    [(env, _)] = rq.queued()
    reply = env.recipients[0].reply
    assert "did not end the SASL exchange" in reply and ": 334 " not in reply, reply


def two_accounts(rq: Relayq, default: str, shop: str, shop_max: int = 1) -> None:
    rq.write_config(rq.config.read_text() + (
        f'\n[account.shop]\nsenders = ["@shop.example"]\nsmarthost = "{shop}"\n'
        f"max_connections = {shop_max}\n"))


@pytest.mark.parametrize(("shop_max", "workers"), [(1, 2), (2, 3), (0, 8)])
def test_queue_run_workers_are_capped_by_all_accounts_connections(
        tmp_path: Path, shop_max: int, workers: int) -> None:
    """Suspicion: with several accounts the workers were not capped; more than all
    the accounts' max_connections together could only wait for a slot (an account
    without a bound leaves the number asked for)."""
    rq = Relayq(tmp_path, max_connections=1)
    two_accounts(rq, "[127.0.0.1]:9", "[127.0.0.1]:9", shop_max)
    cfg = configfile.load(str(rq.config), explicit=True)
    assert limits.workers(cfg, 8) == workers


def test_an_idle_connection_gives_its_slot_back_when_the_worker_serves_another_account(
        smarthost_factory: SmarthostFactory, tmp_path: Path) -> None:
    """Suspicion: a worker's cached connection kept its account's only max_connections
    slot while the worker delivered other accounts' mail, so the account's mail in the
    other workers waited and was deferred. Moving on to another account releases it."""
    default, shop = smarthost_factory(), smarthost_factory()
    rq = Relayq(tmp_path, smarthost=default.smarthost, max_connections=1)
    two_accounts(rq, default.smarthost, shop.smarthost)
    for sender in ("x@shop.example", "y@example.org"):
        assert rq.sendmail("-odq", "-f", sender, "a@example.org", input=MSG).returncode == 0
    by_sender = {e.sender: e.qid for e, _ in rq.queued()}
    cfg = configfile.load(str(rq.config), explicit=True)
    slot = rq.queue_dir / "limits" / "shop.conn0"
    with Runner(cfg, rq.spool, Log(use_syslog=False, path=str(rq.log_file)),
                Context(cfg)) as runner:
        runner.process(by_sender["x@shop.example"], force=True)
        assert len(shop.transactions) == 1
        assert not free(slot)  # held while the shop connection may serve more shop mail
        runner.process(by_sender["y@example.org"], force=True)
        assert len(default.transactions) == 1
        assert free(slot)  # the worker moved on: another may take shop's only slot


def free(path: Path) -> bool:
    """Can another process take this slot now (no flock held on it)?"""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
