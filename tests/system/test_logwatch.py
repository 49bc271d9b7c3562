"""relayq's log as Debian's logwatch reads it (issue 15 §3): its `sendmail` service
counts every message, every recipient and every byte, and leaves no relayq line
unmatched.

logwatch runs as packaged (its own logwatch.pl, shared filters and service
script), from the copy `make test-deps` unpacks into build/logwatch (the package
depends on an MTA, so it is never installed beside relayq), or from
/usr/share/logwatch where it is installed. Only two paths of logwatch.pl are
pointed elsewhere: its script folder and its configuration folder (a temporary
one, holding what an administrator writes: the log folder and relayq's program
name next to sendmail's). The log comes from real relayq commands and a real
smarthost (relayq.testing) on 127.0.0.2, not loopback's 127.0.0.1, which
logwatch takes for a submission program's relay to the local MTA.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq

from relayq.core.errors import EX_OK, EX_TEMPFAIL

if TYPE_CHECKING:
    from relayq.testing.smarthost import SmarthostFactory
    from relayq.testing.tls import TestPKI

ROOT = Path(__file__).resolve().parents[2]
UNPACKED = ROOT / "build" / "logwatch" / "usr" / "share" / "logwatch"
INSTALLED = Path("/usr/share/logwatch")
HOST = "127.0.0.2"
MSG = b"Subject: logwatch test\n\n" + b"a line of the body\n" * 40


def logwatch_base() -> Path:
    for base in (INSTALLED, UNPACKED):
        if (base / "scripts" / "services" / "sendmail").is_file():
            return base
    pytest.fail("Debian's logwatch is missing: `make test-deps` unpacks it into build/logwatch")


def logwatch(tmp: Path, log: str) -> str:
    """logwatch --service sendmail on `log` as /var/log/mail.log; its report."""
    base = logwatch_base()
    program = (base.parent.parent / "sbin" / "logwatch").read_text()
    conf = tmp / "etc-logwatch"
    program, n = re.subn(r'(?m)^my \$BaseDir = "[^"]*";', f'my $BaseDir = "{base}";', program)
    program, m = re.subn(r'(?m)^my \$ConfigDir = "[^"]*";', f'my $ConfigDir = "{conf}";',
                         program)
    assert n == m == 1, "logwatch.pl names its folders differently now"
    (tmp / "logwatch.pl").write_text(program)
    (conf / "conf" / "services").mkdir(parents=True)
    (tmp / "cache").mkdir()
    (tmp / "log").mkdir()
    (conf / "conf" / "logwatch.conf").write_text(
        f"TmpDir = {tmp / 'cache'}\nAppendVarLogToLogDirs = no\nAppendVarAdmToLogDirs = no\n")
    # the administrator's one change: relayq's program name beside sendmail's
    (conf / "conf" / "services" / "sendmail.conf").write_text(
        "*MultiService = sendmail,sm-mta,relayq\n*RemoveHeaders\n")
    (tmp / "log" / "mail.log").write_text(log)  # Debian's name (dist.conf/logfiles)
    out = subprocess.run(
        ["perl", str(tmp / "logwatch.pl"), "--logdir", str(tmp / "log"), "--service",
         "sendmail", "--range", "all", "--detail", "high", "--output", "stdout"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "sendmail Begin" in out.stdout, out.stdout + out.stderr
    return out.stdout


def stat(report: str, name: str) -> int:
    found = re.search(rf"^ *{re.escape(name)}: +([\d,]+)$", report, re.M)
    assert found, f"no {name!r} in\n{report}"
    return int(found.group(1).replace(",", ""))


def closed_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def messages(log: str) -> dict[str, tuple[int, int]]:
    """Queue id -> (size, nrcpts) of every from= line: what logwatch should count."""
    return {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(
        r"relayq\[\d+\]: (\w+): from=.*?, size=(\d+), .*?nrcpts=(\d+)", log)}


def test_logwatch_counts_every_message_of_relayqs_log(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(host=HOST, rcpt_replies={
        "nobody@example.org": "550 5.1.1 <nobody@example.org>... User unknown"})
    (tmp_path / "rq").mkdir()
    rq = Relayq(tmp_path / "rq", smarthost=f"[{HOST}]:{closed_port()}", retry_min="1s",
                retry_max="1s")
    # deferred (the smarthost is down), then sent
    assert rq.sendmail("-f", "alice@example.org", "carol@example.org",
                       input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    rq.configure(smarthost=sh.smarthost)
    # two recipients in one message; a recipient the smarthost refuses (a bounce)
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", "dave@example.org",
                       input=MSG).returncode == EX_OK
    assert rq.sendmail("-f", "alice@example.org", "nobody@example.org",
                       input=MSG).returncode == EX_OK
    time.sleep(1.1)  # the deferred message is due again
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.queued() == []
    log = rq.log()
    sent = messages(log)
    assert len(sent) == 4  # the three submitted, and the bounce to alice
    for line in log.splitlines():  # each line here is about a message: its id comes first
        assert re.match(r"\w{8}\d{6}: ", line.split("]: ", 1)[1]), line
    assert re.search(rf"relay=\[{HOST}\], dsn=4\.4\.1, stat=Deferred: Connection refused", log)
    bounce = re.search(r"(\w+): (\w+): DSN: 550 5\.1\.1 <nobody@example\.org>\.\.\. User unknown",
                       log)  # sendmail's: the original's id, then the report's
    assert bounce and f"{bounce[1]}: to=<nobody@example.org>" in log
    assert f"{bounce[2]}: from=<>, size=" in log and f"{bounce[2]}: to=<alice@example.org>" in log

    (tmp_path / "lw").mkdir()
    report = logwatch(tmp_path / "lw", log)
    assert stat(report, "Messages To Recipients") == 4, report
    assert stat(report, "Addressed Recipients") == sum(n for _, n in sent.values()) == 5
    assert stat(report, "Bytes Transferred") == sum(s for s, _ in sent.values())
    assert "**Unmatched Entries**" not in report, report
    # every delivery, as a relay mailer's (not a submission program's relay to localhost)
    deliveries = re.search(r"^ *relay +(\d+)", report, re.M)
    assert deliveries and int(deliveries.group(1)) == 4, report  # bob, dave, carol, alice
    assert re.search(r"Mail Deferred:\s+Connection refused by \[127\.0\.0\.2\]", report), report
    assert "User unknown" in report, report  # the bounce's reason, among the rejections


def test_logwatch_reads_the_starttls_and_auth_lines(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI
) -> None:
    sh = smarthost_factory(host=HOST, tls_context=pki.server_context(), require_starttls=True,
                           auth={"relayq": "s3cret"}, auth_required=True)
    (tmp_path / "rq").mkdir()
    rq = Relayq(tmp_path / "rq", smarthost=sh.smarthost, tls="required", tls_verify=False,
                user="relayq", password="s3cret")  # the certificate names 127.0.0.1, not .2
    assert rq.sendmail("-f", "alice@example.org", "bob@example.org", "carol@example.org",
                       input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_OK
    log = rq.log()
    [(qid, (size, _))] = messages(log).items()
    assert re.search(rf"{qid}: STARTTLS=client, relay=\[{HOST}\], version=TLSv1\.\d, "
                     r"verify=NOT, cipher=\S+, bits=\d+/\d+", log), log
    assert f"{qid}: AUTH=client, relay=[{HOST}], authid=relayq, mech=PLAIN, bits=0" in log
    assert "s3cret" not in log
    (tmp_path / "lw").mkdir()
    report = logwatch(tmp_path / "lw", log)
    assert stat(report, "Messages To Recipients") == 1
    assert stat(report, "Addressed Recipients") == 2
    assert stat(report, "Bytes Transferred") == size
    assert "**Unmatched Entries**" not in report, report
    assert re.search(r"STARTTLS used the following encryption mechanisms\n +Cipher: \S+ "
                     r"Bits: \d+/\d+ +1 Time", report), report
    # verify=NOT (tls_verify off: nothing was checked) reads as sendmail's "not requested"
    assert re.search(r"For STARTTLS in client mode,\n +No cert was requested +1 Time", report)


def test_logwatch_reads_the_daemons_log(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    import smtplib

    from tests.integration.test_daemon import DaemonProcess, free_port, wait_for

    sh = smarthost_factory(host=HOST)
    (tmp_path / "rq").mkdir()
    port = free_port()
    rq = Relayq(tmp_path / "rq", smarthost=sh.smarthost, listen=[f"127.0.0.1:{port}"],
                pid_file=str(tmp_path / "rq" / "relayq.pid"), queue_interval="1h")
    d = DaemonProcess(rq, "--listen")
    try:
        d.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:  # a program speaking SMTP
            s.sendmail("alice@example.org", ["bob@example.org"], MSG.replace(b"\n", b"\r\n"))
        assert rq.sendmail("carol@example.org", input=MSG).returncode == EX_OK
        wait_for(lambda: len(sh.transactions) == 2, what="both deliveries")
        assert d.stop() == EX_OK
    finally:
        d.kill()
    log = rq.log()
    assert "starting daemon" in log and "stopping daemon, reason=signal" in log
    # the SMTP client in relay=, as sendmail names it (here with the socket's owner)
    assert re.search(r"from=<alice@example\.org>, .*, relay=(\w+@)?localhost \[127\.0\.0\.1\]$",
                     log, re.M), log
    sent = messages(log)
    (tmp_path / "lw").mkdir()
    report = logwatch(tmp_path / "lw", log)
    assert stat(report, "Messages To Recipients") == len(sent) == 2
    assert stat(report, "Bytes Transferred") == sum(s for s, _ in sent.values())
    assert "**Unmatched Entries**" not in report, report + log
