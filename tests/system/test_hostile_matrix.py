"""The hostile-smarthost matrix (issue 12): one row per way a relay can misbehave.

Each row submits real mail with the real `sendmail`, runs a real queue run
(`sendmail -q`, a subprocess whose wall time and peak RSS are measured)
against a HostileRelay, and checks every recipient: "sent" (the relay
committed exactly one copy and told us 250), "deferred" (still queued with a
reason, nothing sent), "pending" (queued, never tried: its run was killed),
"bounced" (final, one bounce to the sender), or
"retried" (either sent once or deferred; a message on a connection that died
under it). Then the relay heals and a second run must bring every deferred
recipient through exactly once and send nothing twice: nothing lost, nothing
duplicated except where the row says the relay committed a copy whose 250
never arrived (then one resend and one "possible duplicate" log line).

MATRIX_REPORT=FILE appends each queue run's exit code, wall time and peak RSS to FILE.
docs/reliability.md is generated from ROWS (`python -m tests.system.test_hostile_matrix`)
and tests/unit/test_docs.py checks that it matches.
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests.helpers.relayq_env import BIN, Relayq

from relayq.core.envelope import FAILED, PENDING
from relayq.testing.dns import DnsResponder
from relayq.testing.hostile import Fault, HostileRelay, server_context

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.testing.tls import TestPKI

SENDER = "alice@example.org"
PASSWORD = "Matrix-S3cret-pw"
TEXT = "Grüße aus Köln: naïve café, 100 € ✓\n"
ASCII = b"Subject: matrix\n\nplain ASCII body\n"
UTF8 = ("Subject: matrix\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n\n" + TEXT).encode()
LONG = ("Subject: matrix\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\n"
        + "x" * 1500 + "\nend\n").encode()
HOST60 = "mx-012345678.build-farm-eu-central-1.ci.internal.example.org"
assert len(HOST60) == 60


def big_reply(total: int) -> bytes:
    """A multi-line 250 reply of exactly `total` bytes (for the EHLO)."""
    body = b"250-hostile.example.org\r\n"
    line = b"250-X" + b"x" * 993 + b"\r\n"  # 1000 bytes
    last = b"250 8BITMIME\r\n"
    while len(body) + len(line) + len(last) <= total:
        body += line
    pad = total - len(body) - len(last)
    if pad:
        body += b"250-" + b"y" * (pad - 6) + b"\r\n"
    out = body + last
    assert len(out) == total
    return out


def f421(step: str, nth: int = 1) -> Fault:
    return Fault(step, b"421 4.3.2 Service shutting down\r\n", nth=nth, then="close")


@dataclass
class Row:
    """One line of the matrix; see the module docstring for the outcome words."""

    id: str
    fault: str  # what the relay does
    outcome: str  # what relayq must do (the docs' words)
    expect: dict[str, str]  # recipient -> sent|deferred|pending|bounced|retried (after run 1)
    relay: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    messages: tuple[tuple[str, ...], ...] = ()  # default: one message to every expect key
    body: bytes = ASCII
    cert: str = ""  # the relay's STARTTLS certificate (tls = required, our CA trusted)
    bound: float = 60.0  # seconds a queue run may take (a bound on hanging)
    memory_mib: int = 64  # peak RSS of a queue run (its workers included)
    duplicates: int = 0  # copies committed by the relay whose 250 never reached us
    warnings: int | None = None  # "possible duplicate" log lines (default: duplicates)
    check: tuple[str, ...] = ()  # extra checks, see check_extra()
    special: str = ""  # "hostname" | "fullfs" | "kill" | "mx"
    heal: dict[str, Any] = field(default_factory=dict)  # the healed relay's settings
    xfail: str = ""

    @property
    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.id, marks=marks)


def one(status: str, n: int = 1) -> dict[str, str]:
    return {f"r{i}@example.org": status for i in range(1, n + 1)}


R1 = "r1@example.org"
MIXED = {"good@example.org": "sent", "bad@example.org": "bounced",
         "later@example.org": "deferred"}
TLS_CFG = {"tls": "required"}

ROWS: list[Row] = [
    # --- 421 (or a drop) at every step: deferred, nothing sent -------------------------
    Row("421-greeting", "421 as the greeting", "deferred", one("deferred"),
        relay={"faults": (f421("greeting"),)}),
    Row("421-ehlo", "421 to EHLO", "deferred", one("deferred"),
        relay={"faults": (f421("ehlo"),)}),
    Row("421-starttls", "421 to STARTTLS", "deferred, never in clear", one("deferred"),
        relay={"faults": (f421("starttls"),)}, cert="good", config=TLS_CFG, check=("clear",)),
    Row("421-after-starttls", "421 to the EHLO after the TLS handshake", "deferred",
        one("deferred"), relay={"faults": (f421("ehlo_tls"),)}, cert="good", config=TLS_CFG,
        check=("clear",)),
    Row("421-mail", "421 to MAIL", "deferred", one("deferred"),
        relay={"faults": (f421("mail"),)}),
    Row("421-rcpt2", "421 to the 2nd RCPT (pipelined)", "all deferred, nothing sent",
        one("deferred", 3), relay={"faults": (f421("rcpt", 2),)}),
    Row("421-rcpt2-lockstep", "421 to the 2nd RCPT, no PIPELINING", "all deferred",
        one("deferred", 3), relay={"faults": (f421("rcpt", 2),), "pipelining": False}),
    Row("421-data", "421 to DATA", "deferred", one("deferred"),
        relay={"faults": (f421("data"),)}),
    Row("421-eod", "421 after the final dot", "deferred (the relay did not take it)",
        one("deferred"), relay={"faults": (f421("eod"),)}),
    Row("421-rset-reused", "421 to the RSET opening the 2nd message on a reused connection",
        "1st sent once; 2nd retried, never lost or doubled",
        {R1: "sent", "r2@example.org": "retried"}, messages=((R1,), ("r2@example.org",)),
        relay={"faults": (f421("rset"),)}, config={"concurrency": 1}),
    Row("421-rset-reused-lockstep", "421 to RSET on a reused connection, no PIPELINING",
        "1st sent once; 2nd retried", {R1: "sent", "r2@example.org": "retried"},
        messages=((R1,), ("r2@example.org",)),
        relay={"faults": (f421("rset"),), "pipelining": False}, config={"concurrency": 1}),
    Row("421-after-message-1", "250 and 421 in one write after the 1st message, then close",
        "1st sent once (its 250 stands); the rest retried",
        {R1: "sent", "r2@example.org": "retried", "r3@example.org": "retried"},
        messages=((R1,), ("r2@example.org",), ("r3@example.org",)),
        relay={"faults": (Fault("message", b"421 4.3.2 going down\r\n", then="close"),)},
        config={"concurrency": 1}),
    Row("close-after-message-1", "silent close after the 1st message's 250",
        "all sent once (a fresh connection)", one("sent", 3),
        messages=((R1,), ("r2@example.org",), ("r3@example.org",)),
        relay={"faults": (Fault("message", then="close"),)}, config={"concurrency": 1}),
    # --- recipients limits ----------------------------------------------------------
    Row("452-rcpt3", "452 to the 3rd and later RCPT (pipelined)",
        "first 2 sent once, the rest deferred, sent on the next run",
        {**one("sent", 2), "r3@example.org": "deferred", "r4@example.org": "deferred"},
        relay={"faults": (Fault("rcpt", b"452 4.5.3 Too many recipients\r\n", 3, True),)}),
    Row("452-rcpt3-lockstep", "452 to the 3rd and later RCPT, no PIPELINING",
        "first 2 sent once, the rest deferred",
        {**one("sent", 2), "r3@example.org": "deferred", "r4@example.org": "deferred"},
        relay={"faults": (Fault("rcpt", b"452 4.5.3 Too many recipients\r\n", 3, True),),
               "pipelining": False}),
    Row("552-rcpt3", "552 to the 3rd and later RCPT (pipelined)", "as 452: the rest deferred",
        {**one("sent", 2), "r3@example.org": "deferred", "r4@example.org": "deferred"},
        relay={"faults": (Fault("rcpt", b"552 5.5.3 Too many recipients\r\n", 3, True),)}),
    Row("552-rcpt3-lockstep", "552 to the 3rd and later RCPT, no PIPELINING",
        "as 452: the rest deferred",
        {**one("sent", 2), "r3@example.org": "deferred", "r4@example.org": "deferred"},
        relay={"faults": (Fault("rcpt", b"552 5.5.3 Too many recipients\r\n", 3, True),),
               "pipelining": False}),
    Row("max-recipients-421", "max_recipients = 2, 5 recipients, 421 to the 3rd MAIL",
        "first 4 sent once (2 transactions), the 5th deferred",
        {**one("sent", 4), "r5@example.org": "deferred"},
        relay={"faults": (f421("mail", 3),)}, config={"max_recipients": 2}),
    Row("max-recipients-kill", "max_recipients = 2, 5 recipients, the run killed in the "
        "3rd transaction", "first 4 recorded sent, never resent; the 5th sent later",
        {**one("sent", 4), "r5@example.org": "pending"},
        relay={"faults": (Fault("mail", nth=3, then="stall"),)}, config={"max_recipients": 2},
        special="kill", warnings=1),
    # --- capabilities ------------------------------------------------------------------
    Row("size-tiny", "SIZE 4000 offered, a 6000-byte message", "bounced once (5.3.4), the "
        "bounce returning only the headers", one("bounced"), relay={"size": 4000},
        body=ASCII + (b"x" * 99 + b"\n") * 60),
    Row("no-size", "SIZE not offered", "sent once, no SIZE= parameter", one("sent"),
        relay={"size": None}, check=("nosize",)),
    Row("ehlo-502", "EHLO answered 502", "HELO, sent once", one("sent"),
        relay={"faults": (Fault("ehlo", b"502 5.5.1 EHLO not supported\r\n"),)},
        check=("helo",)),
    Row("ehlo-502-utf8", "EHLO answered 502, a UTF-8 body", "HELO, sent once as QP",
        one("sent"), relay={"faults": (Fault("ehlo", b"502 5.5.1 EHLO not supported\r\n"),)},
        body=UTF8, check=("helo", "qp")),
    Row("no-8bitmime", "8BITMIME not offered, a UTF-8 body",
        "sent once, quoted-printable, decoded text equal", one("sent"),
        relay={"eightbitmime": False}, body=UTF8, check=("qp",)),
    Row("long-line", "a 1500-octet body line", "sent once, every line <= 998, decoded equal",
        one("sent"), body=LONG, check=("qp",)),
    Row("no-smtputf8", "SMTPUTF8 not offered, a UTF-8 recipient", "bounced once (5.6.7)",
        {"jörg@example.org": "bounced"}, relay={"smtputf8": False}),
    # --- time ----------------------------------------------------------------------------
    Row("drip-greeting", "the greeting dripped, one byte every 0.5 s (timeout 2 s)",
        "deferred within the reply deadline", one("deferred"), relay={"drip": 0.5},
        bound=30),
    Row("slow-every-reply", "every reply just inside the 2 s timeout, 10 recipients, "
        "no PIPELINING, a 4 s message deadline", "deferred within a whole-transaction deadline",
        one("deferred", 10),
        relay={"slow": 1.6, "pipelining": False}, bound=30,
        config={"message_deadline": 4, "session_deadline": 6}),
    Row("stall-data", "stops reading during DATA (a shut TCP window)",
        "deferred within the write timeout", one("deferred"),
        relay={"faults": (Fault("data_stream", then="stall"),), "rcvbuf": 4096},
        body=b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 20000, bound=30),
    Row("eod-silence", "no answer to the final dot (the connection stays open)",
        "deferred within the reply timeout; the next run warns of a possible duplicate",
        one("deferred"), relay={"faults": (Fault("eod", then="stall"),)}, bound=30,
        warnings=1),
    # --- the window after the dot ----------------------------------------------------
    Row("close-after-dot", "took the message, closed without answering the dot",
        "deferred; the next run sends once more, one 'possible duplicate' line",
        one("deferred"), relay={"faults": (Fault("eod", accept=True, then="close"),)},
        duplicates=1),
    Row("reset-after-dot", "took the message, reset (RST) instead of answering",
        "deferred; one resend, one 'possible duplicate' line", one("deferred"),
        relay={"faults": (Fault("eod", accept=True, then="reset"),)}, duplicates=1),
    Row("250-then-reset", "answered 250, then reset the connection",
        "sent once: the 250 stands, no resend", one("sent"),
        relay={"faults": (Fault("message", then="reset"),)}),
    # --- TLS --------------------------------------------------------------------------
    Row("starttls-454", "STARTTLS answered 454", "deferred, never in clear", one("deferred"),
        relay={"faults": (Fault("starttls", b"454 4.7.0 TLS not available\r\n"),)},
        cert="good", config=TLS_CFG, check=("clear",)),
    Row("cert-expired", "an expired certificate", "deferred, never in clear",
        one("deferred"), cert="expired", config=TLS_CFG, check=("clear",)),
    Row("cert-self-signed", "a self-signed certificate", "deferred, never in clear",
        one("deferred"), cert="self-signed", config=TLS_CFG, check=("clear",)),
    Row("cert-wrong-name", "a certificate for another name", "deferred, never in clear",
        one("deferred"), cert="wrong-name", config=TLS_CFG, check=("clear",)),
    Row("cert-unknown-ca", "a certificate from an unknown CA", "deferred, never in clear",
        one("deferred"), cert="unknown-ca", config=TLS_CFG, check=("clear",)),
    Row("ip-literal", "smarthost [127.0.0.1], certificate with that IP in its SAN",
        "verified against the IP, sent once in TLS", one("sent"), cert="good",
        config=TLS_CFG, check=("tls",)),
    Row("ip-literal-name-only", "smarthost [127.0.0.1], certificate naming only a host",
        "deferred (the IP is not in the certificate)", one("deferred"), cert="name-only",
        config=TLS_CFG, check=("clear",)),
    Row("stripped-required", "STARTTLS not offered, tls = required", "deferred, never in clear",
        one("deferred"), relay={"offer_starttls": False}, cert="good", config=TLS_CFG,
        check=("clear",)),
    Row("stripped-opportunistic", "STARTTLS not offered, tls = opportunistic",
        "sent once in clear", one("sent"), relay={"offer_starttls": False}, cert="good",
        config={"tls": "opportunistic"}),
    Row("stripped-password", "STARTTLS not offered, a password and no tls setting",
        "deferred (a password makes tls required), no AUTH in clear", one("deferred"),
        relay={"offer_starttls": False, "auth": {"matrix": PASSWORD}}, cert="good",
        config={"tls": None, "user": "matrix", "password": PASSWORD},
        check=("clear", "secret")),
    Row("greeting-injected", "'220' and an injected '250' line in one packet",
        "deferred: unsolicited reply is a protocol violation, never acted on",
        one("deferred"),
        relay={"faults": (Fault("greeting", b"220 hostile ESMTP\r\n250 injected\r\n"),)}),
    # --- AUTH -------------------------------------------------------------------------
    Row("auth-cram-md5-only", "only AUTH CRAM-MD5 offered",
        "deferred: 'no usable AUTH mechanism (CRAM-MD5)' (relayq has no CRAM-MD5)",
        one("deferred"), relay={"auth": {"matrix": PASSWORD}, "auth_mechanisms": ("CRAM-MD5",)},
        config={"user": "matrix", "password": PASSWORD}, check=("secret", "cram")),
    Row("auth-535-then-235", "535 for the old token, 235 for the next one "
        "(a rotating password_command)", "refreshed once on 535, sent once",
        one("sent"), relay={"auth": {"matrix": "token-2"}},
        config={"user": "matrix", "password_command": "@token"},
),
    Row("auth-535-echo", "535 quoting the credentials it got",
        "deferred; the secret never in the log, -v, mailq or a bounce", one("deferred"),
        relay={"auth": {"matrix": PASSWORD},
               "faults": (Fault("auth", b"535 5.7.8 rejected: {echo}\r\n"),)},
        config={"user": "matrix", "password": PASSWORD}, check=("secret",)),
    Row("auth-ok-550-echo", "AUTH accepted, then 550 to RCPT quoting the credentials",
        "bounced once; the secret not in the bounce, the log or -v", one("bounced"),
        relay={"auth": {"matrix": PASSWORD},
               "faults": (Fault("rcpt", b"550 5.7.1 not for {echo}\r\n"),)},
        config={"user": "matrix", "password": PASSWORD}, check=("secret",)),
    # --- framing ------------------------------------------------------------------------
    Row("pipelined-out-of-order", "pipelined replies out of order (354 for a RCPT)",
        "deferred (connection dropped)", one("deferred"),
        relay={"faults": (Fault("rcpt", b"354 go ahead\r\n"), Fault("data", b"250 ok\r\n"))}),
    Row("pipelined-extra", "an extra reply in a pipelined group", "deferred",
        one("deferred"), relay={"faults": (Fault("mail", b"250 2.1.0 Ok\r\n" * 2),)}),
    Row("lockstep-extra", "an extra reply to MAIL, no PIPELINING", "deferred",
        one("deferred"),
        relay={"faults": (Fault("mail", b"250 2.1.0 Ok\r\n" * 2),), "pipelining": False}),
    Row("split-every-byte", "every reply split at every byte", "sent once", one("sent"),
        relay={"segment": 1}),
    Row("reply-64k", "a 64 KiB EHLO reply", "sent once (the limit is inclusive)", one("sent"),
        relay={"faults": (Fault("ehlo", big_reply(65536)),)}, memory_mib=48),
    Row("reply-64k+1", "a 64 KiB + 1 EHLO reply", "deferred, bounded memory", one("deferred"),
        relay={"faults": (Fault("ehlo", big_reply(65537)),)}, memory_mib=48),
    Row("flood-lines", "endless continuation lines after EHLO", "deferred, bounded memory",
        one("deferred"), relay={"faults": (Fault("ehlo", b"250-" + b"f" * 200 + b"\r\n",
                                                 then="flood"),)}, memory_mib=48),
    Row("flood-no-newline", "endless bytes without a line end as the greeting",
        "deferred, bounded memory", one("deferred"),
        relay={"faults": (Fault("greeting", b"220" + b"z" * 4096, then="flood"),)},
        memory_mib=48),
    Row("code-1xx", "a 1xx reply to MAIL", "deferred (protocol violation)", one("deferred"),
        relay={"faults": (Fault("mail", b"150 2.1.0 maybe\r\n"),)}),
    Row("code-6xx", "a 6xx reply to RCPT", "deferred (protocol violation)", one("deferred"),
        relay={"faults": (Fault("rcpt", b"650 2.1.5 what\r\n"),)}),
    Row("code-changes", "a reply whose code changes mid-reply (250-... 550 ...)",
        "deferred (protocol violation)", one("deferred"),
        relay={"faults": (Fault("rcpt", b"250-2.1.5 Ok\r\n550 5.1.1 no\r\n"),)}),
    Row("data-before-greeting", "a 250 line before the 220 greeting",
        "deferred (protocol violation)", one("deferred"),
        relay={"faults": (Fault("greeting", b"250 early\r\n220 hostile ESMTP\r\n"),)}),
    Row("not-smtp", "a non-SMTP banner ('* OK IMAP4 ready')", "deferred (protocol violation)",
        one("deferred"), relay={"faults": (Fault("greeting", b"* OK IMAP4 ready\r\n"),)}),
    # --- our own configuration -------------------------------------------------------
    Row("loop-greeting-name", "greets with our own host name (we relay to ourselves)",
        "deferred with a mail-loop reason, nothing sent", one("deferred"),
        relay={"hostname": "host.example.org"}, config={"ehlo_name": "host.example.org"},
        heal={"hostname": "hostile.example.org"}, check=("loop",),
),
    Row("mx-tls-name", "smarthost name with an MX (from DNS) pointing to a host with a valid "
        "certificate for the MX name, a password", "deferred: verified against the configured "
        "name, the password never sent", one("deferred"), cert="mx-name",
        relay={"auth": {"matrix": PASSWORD}}, special="mx",
        config={**TLS_CFG, "user": "matrix", "password": PASSWORD}, check=("noauth", "secret"),
),
    # --- mixed results --------------------------------------------------------------
    Row("mixed", "250 / 550 / 451 for three recipients", "sent once / bounced once / "
        "deferred", MIXED),
    Row("mixed-host60", "250 / 550 / 451 with a 60-character host name",
        "sent once / bounced once / deferred", MIXED, special="hostname"),
    Row("mixed-disk-full", "250 / 550 / 451 with the queue's file system full (8 KiB left: "
        "room for the envelope, not for the bounce)",
        "sent once / bounced once (when space returns) / deferred", MIXED, special="fullfs",
        body=ASCII + (b"z" * 1023 + b"\n") * 64),
]


# --- running a row ---------------------------------------------------------------


# Peak RSS of the queue run and its workers: a child of this small process, not of
# pytest (a forked child's peak counts the parent's memory before exec).
MEASURE = """
import os, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc if rc >= 0 else 128 - rc)
"""


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float
    rss_mib: float


def queue_run(rq: Relayq, row: Row, relay: HostileRelay, *args: str) -> Run:
    """`sendmail -q` as a subprocess (in a UTS namespace for "hostname"), killed at the bound."""
    rss_path = rq.root / "run.rss"
    argv = [sys.executable, "-c", MEASURE, str(rss_path), str(BIN / "sendmail"), "-q", *args]
    if row.special == "hostname":
        argv = ["unshare", "-u", "sh", "-c", 'hostname "$0" && exec "$@"', HOST60, *argv]
    out_path, err_path = rq.root / "run.out", rq.root / "run.err"
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=rq.env, start_new_session=True)
        killer = threading.Timer(row.bound, _kill, (proc.pid,))
        killer.start()
        watcher = None
        if row.special == "kill" and not relay.healed:  # the first run only
            watcher = threading.Thread(target=_kill_in_third_mail, args=(relay, proc.pid),
                                       daemon=True)
            watcher.start()
        try:
            _, status = os.waitpid(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if watcher is not None:
            watcher.join(5)
    seconds = time.monotonic() - start
    rss = int(rss_path.read_text() or 0) if rss_path.exists() else 0
    return Run(proc.returncode, out_path.read_text(errors="replace"),
               err_path.read_text(errors="replace"), seconds, rss / 1024)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _kill_in_third_mail(relay: HostileRelay, pid: int) -> None:
    for _ in range(300):  # the relay stalls at the 3rd MAIL: kill the run there
        if sum(c.startswith("MAIL") for c in relay.commands()) >= 3:
            time.sleep(0.2)
            _kill(pid)
            return
        time.sleep(0.05)


def recipients(rq: Relayq) -> dict[str, Any]:
    """address -> Recipient over the queued messages that are not bounces."""
    return {r.address: r for env, _ in rq.queued() if not env.is_dsn for r in env.recipients}


def bounces(rq: Relayq, relay: HostileRelay) -> int:
    """Bounces to the sender: delivered to the relay or still queued."""
    queued = sum(1 for env, _ in rq.queued() if env.is_dsn
                 and any(r.address == SENDER for r in env.recipients))
    return queued + relay.copies(SENDER, sender="")


def sane(run: Run, row: Row, which: str) -> None:
    if os.environ.get("MATRIX_REPORT"):
        with open(os.environ["MATRIX_REPORT"], "a") as f:
            f.write(f"{row.id} {which} rc={run.rc} {run.seconds:.2f}s {run.rss_mib:.1f}MiB\n")
    assert "Traceback" not in run.err, run.err
    if row.special == "kill" and which == "first":
        return
    assert run.rc in (0, 75), (which, run.rc, run.err)
    assert run.seconds < row.bound, (which, run.seconds)  # a bound on hanging, not a speed test
    assert run.rss_mib < row.memory_mib, (which, run.rss_mib)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path | None]:
    """A 1 MiB tmpfs for the queue of the disk-full row (root only); None if not possible."""
    where = tmp_path / "qfs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(where)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, spare: int = 8192) -> Path:
    """Fill the file system at `where`, leaving `spare` bytes: room for an envelope
    rewrite, none for a bounce that returns the 64 KiB original."""
    reserve = where / "reserve"
    reserve.write_bytes(b"\0" * spare)
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    reserve.unlink()
    return filler


def token_command(root: Path) -> str:
    """A password_command printing token-1, then token-2 on every later call."""
    script = root / "token.sh"
    count = root / "token.count"
    script.write_text(f'#!/bin/sh\nif [ -e {count} ]; then echo token-2; '
                      f'else : > {count}; echo token-1; fi\n')
    script.chmod(0o755)
    return str(script)


def setup(row: Row, tmp_path: Path, pki: TestPKI, qfs: Path | None,
          request: pytest.FixtureRequest) -> tuple[
        Relayq, HostileRelay]:
    if row.special == "hostname" and (shutil.which("hostname") is None or subprocess.run(
            ["unshare", "-u", "true"], capture_output=True, check=False).returncode != 0):
        pytest.skip("needs root for a UTS namespace (unshare -u) and hostname(1)")
    if row.special == "fullfs" and qfs is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    kwargs = dict(row.relay)
    if row.cert:
        kwargs["tls_context"] = tls_for(pki, row.cert)
    relay = HostileRelay(**kwargs).start()
    settings: dict[str, Any] = {"smarthost": relay.smarthost, "timeout": 2,
                                "connect_timeout": 2, **row.config}
    if qfs is not None:
        settings["queue_dir"] = str(qfs / "queue")
    if row.cert:
        settings["ca_file"] = pki.write_ca(str(tmp_path))
    if settings.get("password_command") == "@token":
        settings["password_command"] = token_command(tmp_path)
    if row.special == "mx":  # an MX record nobody authenticated
        dns = DnsResponder({"smarthost.example.org": {"MX": ["10 mx.attacker.example.net."]},
                            "mx.attacker.example.net": {"A": ["127.0.0.1"]}}).start()
        request.addfinalizer(dns.stop)
        settings["smarthost"] = f"smarthost.example.org:{relay.port}"
        settings["dns_servers"] = [dns.server]
    rq = Relayq(tmp_path)
    for key in [k for k, v in settings.items() if v is None]:
        del settings[key]
        rq.settings.pop(key, None)
    rq.configure(**settings)
    rq.queue_dir = Path(settings.get("queue_dir", rq.queue_dir))
    return rq, relay


def tls_for(pki: TestPKI, which: str) -> ssl.SSLContext:
    if which in ("name-only", "mx-name"):
        name = "smarthost.example.org" if which == "name-only" else "mx.attacker.example.net"
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        pki.ca.issue_cert(name).configure_cert(ctx)
        return ctx
    return server_context(pki, which)


@pytest.mark.parametrize("row", [r.param for r in ROWS])
def test_row(row: Row, tmp_path: Path, pki: TestPKI, request: pytest.FixtureRequest) -> None:
    qfs = request.getfixturevalue("mounted") if row.special == "fullfs" else None
    rq, relay = setup(row, tmp_path, pki, qfs, request)
    try:
        check_row(row, rq, relay, qfs, pki)
    finally:
        relay.stop()


def check_row(row: Row, rq: Relayq, relay: HostileRelay, qfs: Path | None,
              pki: TestPKI) -> None:
    messages = row.messages or (tuple(row.expect),)
    for n, to in enumerate(messages, 1):
        body = row.body.replace(b"Subject: matrix", f"Subject: matrix {n}".encode(), 1)
        r = rq.sendmail("-f", SENDER, "-i", *to, input=body)
        assert r.returncode == 0, r.stderr
    filler = fill(qfs) if qfs is not None else None
    first = queue_run(rq, row, relay, *(("-v",) if "secret" in row.check else ()))
    sane(first, row, "first")
    if filler is not None:
        filler.unlink()
    # --- after the first run: every recipient as the row says --------------------
    state = recipients(rq)
    for addr, want in row.expect.items():
        r = state.get(addr)
        copies = relay.copies(addr, sender=SENDER)
        if want == "sent":
            assert copies == 1, (addr, copies)
            assert r is None or r.state != PENDING, (addr, r.reply)
        elif want in ("deferred", "pending"):  # pending: not tried yet (its run was killed)
            assert copies == 0, (addr, copies)
            assert r is not None and r.state == PENDING, (addr, r)
            assert r.reply or want == "pending", (addr, r)
        elif want == "bounced":
            assert copies == 0, (addr, copies)
            assert r is None or r.state == FAILED, (addr, r.reply)
        else:  # retried: sent once or still queued, never twice
            assert copies <= 1, (addr, copies)
            assert copies == 1 or (r is not None and r.state == PENDING), (addr, r)
    deferred = [a for a, w in row.expect.items() if w in ("deferred", "pending")]
    if deferred:
        listing = rq.run("mailq").stdout.decode("utf-8", "replace")
        assert all(a in listing for a in deferred), listing
    check_extra(row, rq, relay, first, deferred, before_heal=True)
    # --- the relay heals: everything gets through, once ---------------------------
    relay.heal(**({"tls_context": server_context(pki, "good")} if row.cert else {}), **row.heal)
    second = queue_run(rq, row, relay)
    sane(second, row, "second")
    for addr, want in row.expect.items():
        if want == "bounced":
            assert relay.copies(addr, sender=SENDER, answered=False) == 0, addr
        else:
            assert relay.copies(addr, sender=SENDER) == 1, (addr, relay.copies(addr))
            extra = row.duplicates if want in ("deferred", "pending") else 0
            assert relay.copies(addr, sender=SENDER, answered=False) == 1 + extra, addr
    assert recipients(rq) == {}, recipients(rq)
    bounced = {n for n, to in enumerate(messages) for a in to if row.expect[a] == "bounced"}
    assert bounces(rq, relay) == len(bounced), rq.log()
    lines = row.duplicates if row.warnings is None else row.warnings
    assert rq.log().count("possible duplicate") == lines, rq.log()
    check_extra(row, rq, relay, second, deferred, before_heal=False)


def check_extra(row: Row, rq: Relayq, relay: HostileRelay, run: Run, deferred: list[str],
                *, before_heal: bool) -> None:
    """The row's own checks: what went in clear, capabilities used, secrets kept."""
    if "clear" in row.check and before_heal:
        clear = relay.commands(clear=True)
        assert not [c for c in clear if c.split(" ")[0].upper() in ("MAIL", "AUTH")], clear
    if "tls" in row.check and not before_heal:
        assert all(d.tls for d in relay.deliveries), relay.deliveries
    if "nosize" in row.check and not before_heal:
        mails = [c for c in relay.commands() if c.upper().startswith("MAIL")]
        assert mails and not any("SIZE=" in c.upper() for c in mails), mails
    if "noauth" in row.check and before_heal:
        assert not [c for c in relay.commands() if c.upper().startswith("AUTH")]
    if "loop" in row.check and before_heal:
        reasons = [r.reply for r in recipients(rq).values()]
        assert reasons and all("loop" in x.lower() for x in reasons), reasons
    if "helo" in row.check and before_heal:
        assert any(c.upper().startswith("HELO") for c in relay.commands())
    if "cram" in row.check and before_heal:
        reasons = [r.reply for r in recipients(rq).values()]
        assert reasons and all("CRAM-MD5" in x for x in reasons), reasons
    if "qp" in row.check and not before_heal:
        [d] = [d for d in relay.deliveries if d.answered and d.mail_from == SENDER]
        assert all(len(line) <= 998 for line in d.data.split(b"\r\n")), "a line over 998"
        if not relay.eightbitmime or "helo" in row.check:
            assert d.data.isascii(), "8-bit data to a relay without 8BITMIME"
        msg = email.message_from_bytes(d.data, policy=email.policy.default)
        want = email.message_from_bytes(row.body, policy=email.policy.default)
        got = msg.get_content().replace("\r\n", "\n")  # type: ignore[attr-defined]
        assert got == want.get_content()  # type: ignore[attr-defined]
    if "secret" in row.check:
        forms = [PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                 base64.b64encode(f"\0matrix\0{PASSWORD}".encode()).decode()]
        seen = {"log": rq.log(), "-v out": run.out, "-v err": run.err,
                "mailq": rq.run("mailq", "-v").stdout.decode("utf-8", "replace")}
        for n, d in enumerate(relay.deliveries):  # the bounces among them
            seen[f"delivery {n}"] = d.data.decode("utf-8", "replace")
        for path in rq.queue_dir.rglob("*"):
            if path.is_file():
                seen[str(path)] = path.read_bytes().decode("utf-8", "replace")
        leaks = [(where, f) for where, text in seen.items() for f in forms if f in text]
        assert leaks == []


# --- docs/reliability.md ---------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"
BEGIN, END = "<!-- matrix: begin (generated) -->\n", "<!-- matrix: end -->\n"


def table() -> str:
    """The matrix as a Markdown table (docs/reliability.md holds it verbatim)."""
    out = ["| Row | The relay | relayq | Status |", "| --- | --- | --- | --- |"]
    for r in ROWS:
        status = "passes" if not r.xfail else "open: " + r.xfail.split(":")[0]
        cells = [f"`{r.id}`", r.fault, r.outcome, status]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def documented(text: str) -> str:
    """`text` (the doc) with its generated block replaced by the current table."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + BEGIN + table() + END + tail


if __name__ == "__main__":  # python -m tests.system.test_hostile_matrix: rewrite the table
    DOC.write_text(documented(DOC.read_text()))
