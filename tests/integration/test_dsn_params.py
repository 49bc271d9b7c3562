"""One DSN parameter rule on every way in and out (issue 12 defect 14).

Old main: `sendmail -V 'a=b'` exited 0, and a relay offering DSN then answered
553 to every recipient (the SMTP client refused the ENVID the CLI had taken).
Here: what any way in accepts, the relay is sent unchanged (canonical form),
shown with real processes, a real relayq listener and a real smarthost.
"""

from __future__ import annotations

import smtplib
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.relayq_env import Relayq, assert_one_line_error
from tests.integration.test_daemon import free_port

from relayq.core import dsnparams
from relayq.core.errors import EX_OK, EX_USAGE
from relayq.delivery.runner import Runner
from relayq.queue.spool import Spool
from relayq.queue.submit import Context
from relayq.server.listener import Listener, bind
from relayq.system import configfile
from relayq.system.log import Log

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

MESSAGE = b"Subject: dsn params\n\nbody\n"


@pytest.mark.parametrize("value", ["a=b", "x y", "id+zz"])
def test_sendmail_V_not_xtext_is_refused_with_64_and_nothing_queued(
        tmp_path: Path, smarthost_factory: SmarthostFactory, value: str) -> None:
    sh = smarthost_factory(dsn=True)
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    r = rq.sendmail("-odq", "-V", value, "bob@example.org", input=MESSAGE)
    assert r.returncode == EX_USAGE, (r.returncode, r.stderr)
    assert_one_line_error(r)
    assert rq.spool.ids() == []


def test_sendmail_V_xtext_reaches_the_relay_unchanged(
        tmp_path: Path, smarthost_factory: SmarthostFactory) -> None:
    sh = smarthost_factory(dsn=True)
    rq = Relayq(tmp_path, smarthost=sh.smarthost)
    r = rq.sendmail("-odq", "-V", "id+3dx", "-N", "failure,delay", "-R", "hdrs",
                    "bob@example.org", input=MESSAGE)
    assert r.returncode == EX_OK, r.stderr
    assert rq.sendmail("-q").returncode == EX_OK
    [t] = sh.transactions
    assert "ENVID=id+3Dx" in t.mail_options and "RET=HDRS" in t.mail_options
    assert t.rcpt_options == [["NOTIFY=FAILURE,DELAY"]]


class InProcess:
    """A relayq listener and runner in this process (hypothesis needs many sessions)."""

    def __init__(self, root: Path, sh: Smarthost) -> None:
        self.rq = Relayq(root, smarthost=sh.smarthost, listen=[f"127.0.0.1:{free_port()}"],
                         delivery_mode="deferred")
        self.cfg = configfile.load(str(self.rq.config), explicit=True)
        self.log = Log("relayq-test", use_syslog=False, path=str(self.rq.log_file))
        self.ctx = Context(self.cfg)
        self.spool = Spool(self.cfg.queue_dir)
        self.spool.ensure()
        self.listener = Listener(self.cfg, self.log, self.ctx, bind(self.cfg))
        self.listener.start()
        self.port = int(self.cfg.listen[0].rsplit(":", 1)[1])
        self.runner = Runner(self.cfg, self.spool, self.log, self.ctx)

    def close(self) -> None:
        self.listener.stop()
        for s in self.listener.sockets:
            s.close()
        self.runner.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory,
         smarthost_factory_module: SmarthostFactory) -> Iterator[tuple[InProcess, Smarthost]]:
    sh = smarthost_factory_module(dsn=True)
    env = InProcess(tmp_path_factory.mktemp("dsn-live"), sh)
    yield env, sh
    env.close()


@pytest.fixture(scope="module")
def smarthost_factory_module() -> Iterator[SmarthostFactory]:
    from relayq.testing.smarthost import SmarthostFactory

    factory = SmarthostFactory()
    yield factory
    factory.close()


XTEXT = st.lists(st.sampled_from([chr(c) for c in range(33, 127) if chr(c) not in "+="]
                                 + ["+2B", "+3D", "+20", "+e9"]), min_size=1,
                 max_size=40).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envid=XTEXT, orcpt=XTEXT, notify=st.sampled_from(["NEVER", "success", "delay,failure"]))
def test_listener_round_trip_of_whatever_the_validator_accepts(
        live: tuple[InProcess, Smarthost], envid: str, orcpt: str, notify: str) -> None:
    """A real relayq listener takes every value dsnparams accepts and stores its canonical
    form; the runner's client then hands exactly that to a real aiosmtpd relay."""
    env, sh = live
    envid = envid[:100]
    want_envid, want_orcpt = dsnparams.envid(envid), dsnparams.orcpt("rfc822;" + orcpt)
    want_notify = dsnparams.notify(notify)
    before = len(sh.transactions)
    with smtplib.SMTP("127.0.0.1", env.port, local_hostname="client.example.org",
                      timeout=30) as c:
        c.ehlo()
        code, text = c.mail("alice@example.org", [f"ENVID={envid}", "RET=FULL"])
        assert code == 250, text
        code, text = c.rcpt("bob@example.org", [f"NOTIFY={notify}", f"ORCPT=rfc822;{orcpt}"])
        assert code == 250, text
        code, text = c.data(MESSAGE.replace(b"\n", b"\r\n"))
        assert code == 250, text
    [qid] = env.spool.ids()
    queued = env.spool.read_envelope(qid)
    assert queued.envid == want_envid
    [r] = queued.recipients
    assert (r.notify, r.orcpt) == (want_notify, want_orcpt)
    env.runner.process(qid, True, [])
    assert env.spool.ids() == []
    [t] = sh.transactions[before:]
    assert f"ENVID={want_envid}" in t.mail_options
    assert t.rcpt_options == [[f"NOTIFY={want_notify}", f"ORCPT={want_orcpt}"]]


def test_listener_refuses_what_the_client_could_not_send(
        live: tuple[InProcess, Smarthost]) -> None:
    env, _ = live
    with smtplib.SMTP("127.0.0.1", env.port, timeout=30) as c:
        c.ehlo()
        for bad in ("ENVID=a+zz", "ENVID=" + "x" * 101, "RET=NONE"):
            code, text = c.mail("alice@example.org", [bad])
            assert code == 501 and text.startswith(b"5.5.4"), (bad, code, text)
        assert c.mail("alice@example.org", ["ENVID=ok"])[0] == 250
        for bad in ("ORCPT=rfc822;a=b", "ORCPT=nosemicolon", "NOTIFY=NEVER,DELAY"):
            code, text = c.rcpt("bob@example.org", [bad])
            assert code == 501, (bad, code, text)
        c.rset()
    assert env.spool.ids() == []


def test_sendmail_bs_applies_the_same_rule(tmp_path: Path) -> None:
    rq = Relayq(tmp_path)
    dialogue = (b"EHLO php.example.org\r\nMAIL FROM:<alice@example.org> ENVID=a=b\r\n"
                b"MAIL FROM:<alice@example.org> ENVID=ok+2b RET=hdrs\r\n"
                b"RCPT TO:<bob@example.org> ORCPT=rfc822;x=y\r\n"
                b"RCPT TO:<bob@example.org> NOTIFY=delay ORCPT=rfc822;b+40\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nx\r\n.\r\nQUIT\r\n")
    r = rq.sendmail("-bs", input=dialogue)
    assert r.returncode == EX_OK, r.stderr
    replies = [line[:3] for line in r.stdout.decode().splitlines() if line[3:4] == " "]
    assert replies == ["220", "250", "501", "250", "501", "250", "354", "250", "221"], r.stdout
    [(env, _)] = rq.queued()
    assert (env.envid, env.ret) == ("ok+2B", "HDRS")
    [rcpt] = env.recipients
    assert (rcpt.notify, rcpt.orcpt) == ("DELAY", "rfc822;b+40")


def test_the_listener_refuses_what_every_other_way_in_refuses(
        live: tuple[InProcess, Smarthost]) -> None:
    """The table of tests/unit/test_dsnparams.py (sendmail's flags, enqueue(), the maildrop
    taker and the SMTP client refuse each of these), through a real listener: 501."""
    from tests.unit.test_dsnparams import BAD

    env, _ = live
    with smtplib.SMTP("127.0.0.1", env.port, timeout=30) as c:
        c.ehlo()
        for name, value, _flag in BAD:
            if name == "BODY" or " " in value or not value.isascii():
                continue  # BODY is aiosmtpd's; a space ends the parameter; smtplib is ASCII
            if name == "NOTIFY":
                assert c.mail("alice@example.org")[0] == 250
                code, text = c.rcpt("bob@example.org", [f"{name}={value}"])
                c.rset()
            else:
                code, text = c.mail("alice@example.org", [f"{name}={value}"])
            assert code == 501 and text.startswith(b"5.5.4"), (name, value, code, text)
    assert env.spool.ids() == []
