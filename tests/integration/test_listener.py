"""The loopback SMTP listener and `sendmail -bs`: real sockets, real processes."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error
from tests.integration.test_daemon import DaemonProcess, free_port, kill_detached, wait_for

from relayq.core.errors import EX_CONFIG, EX_OK

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.testing.smarthost import SmarthostFactory

BODY = "From: alice@example.org\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


class Raw:
    """A byte-exact SMTP client (smtplib would fix what these tests send on purpose)."""

    def __init__(self, port: int, source: str | None = None, timeout: float = 10) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout,
            source_address=(source, 0) if source else None)
        self.buf = b""

    def reply(self) -> str:
        """One whole (maybe multi-line) reply; '' at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    return "\n".join(lines)
                self.buf += data
            line, _, self.buf = self.buf.partition(b"\r\n")
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    # deferred: wake-ups off, so what the listener queued can be looked at
    return Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                  listen=[f"127.0.0.1:{free_port()}"], delivery_mode="deferred")


@pytest.fixture
def listen(rq: Relayq) -> Iterator[Callable[..., int]]:
    """Start `relayq daemon --foreground --listen` with extra settings; returns the port."""
    started: list[DaemonProcess] = []

    def run(**settings: object) -> int:
        rq.configure(**settings)
        d = DaemonProcess(rq, "--listen").wait_ready()
        started.append(d)
        return int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]

    yield run
    for d in started:
        d.kill()


def session(port: int) -> Raw:
    c = Raw(port)
    assert c.reply().startswith("220 ")
    assert c.cmd("EHLO client.example.org").startswith("250-")
    return c


def test_smtplib_submission_gets_the_command_line_header_fixes(
    rq: Relayq, listen: Callable[..., int]
) -> None:
    port = listen(masquerade_as="example.com")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        _, ehlo = s.ehlo("client.example.org")
        caps = ehlo.decode().splitlines()
        for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"):
            assert ext in caps
        assert "SIZE 33554432" in caps
        refused = s.sendmail("root", ["bob@example.org", "carol"],
                             "From: root\r\nSubject: cron\r\n\r\n..leading dot\r\nend\r\n")
        assert refused == {}
    [(env, data)] = rq.queued()
    # the same funnel as sendmail: qualified, masqueraded, Date/Message-ID/Received added
    assert env.sender == "root@example.com"
    assert [r.address for r in env.recipients] == ["bob@example.org", "carol@host.example.org"]
    text = data.decode()
    assert "\nFrom: root@example.com\n" in text
    assert "\nDate: " in text and "\nMessage-ID: <" in text and text.startswith("Received: ")
    assert text.endswith("\n\n..leading dot\nend\n")  # smtplib's transparency dot removed
    assert env.user == pwd.getpwuid(os.getuid()).pw_name  # the client socket's owner


def test_250_comes_only_after_the_commit(rq: Relayq, listen: Callable[..., int]) -> None:
    port = listen()
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 2.1.0")
    assert c.cmd("RCPT TO:<bob@example.org>").startswith("250 2.1.5")
    assert c.cmd("DATA").startswith("354")
    c.send(BODY.encode() + b".\r\n")
    reply = c.reply()
    assert reply.startswith("250 2.0.0 ") and "accepted" in reply
    qid = reply.split()[2]
    spool = rq.spool  # the reply names a message that is already durable
    assert (rq.queue_dir / "queue" / f"{qid}.e").exists()
    assert spool.read_envelope(qid).sender == "alice@example.org"
    assert c.cmd("QUIT").startswith("221 2.0.0")
    c.close()


def test_dsn_parameters_are_kept_and_passed_on(
    rq: Relayq, listen: Callable[..., int], smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory(dsn=True)
    port = listen(smarthost=sh.smarthost)
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org> RET=HDRS ENVID=Ab+2Bcd").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.org> NOTIFY=success,failure "
                 "ORCPT=rfc822;Bob@Example.org").startswith("250")
    assert c.cmd("RCPT TO:<carol@example.org> NOTIFY=NEVER").startswith("250")
    assert c.cmd("RCPT TO:<dave@example.org> NOTIFY=SOMETIMES").startswith("501 5.5.4")
    assert c.cmd("DATA").startswith("354")
    c.send(BODY.encode() + b".\r\n")
    assert c.reply().startswith("250 ")
    c.close()
    [(env, _)] = rq.queued()
    assert (env.ret, env.envid) == ("HDRS", "Ab+2Bcd")
    bob, carol = env.recipients
    assert (bob.notify, bob.orcpt) == ("SUCCESS,FAILURE", "rfc822;Bob@Example.org")
    assert (carol.notify, carol.orcpt) == ("NEVER", "")
    assert rq.run("relayq", "flush").returncode == EX_OK
    [t] = sh.transactions
    assert "RET=HDRS" in t.mail_options and "ENVID=Ab+2Bcd" in t.mail_options
    assert "NOTIFY=SUCCESS,FAILURE" in t.rcpt_options[0]
    assert "ORCPT=rfc822;Bob@Example.org" in t.rcpt_options[0]
    assert t.rcpt_options[1] == ["NOTIFY=NEVER"]


def test_size_is_advertised_and_enforced(rq: Relayq, listen: Callable[..., int]) -> None:
    port = listen(max_message_size=2000)
    c = Raw(port)
    c.reply()
    assert "250-SIZE 2000" in c.cmd("EHLO x.example.org")
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=5000").startswith("552 5.3.4")
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<b@example.org>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 50 + b".\r\n")
    assert c.reply().startswith("552 5.3.4")
    assert c.cmd("NOOP").startswith("250")  # the session goes on
    c.close()
    assert rq.queued() == []


def test_too_many_recipients_and_long_lines(rq: Relayq, listen: Callable[..., int]) -> None:
    port = listen(smtp_max_recipients=3, smtp_max_line=200)
    c = session(port)
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    for n in range(3):
        assert c.cmd(f"RCPT TO:<r{n}@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<r3@example.org>").startswith("452 4.5.3")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: long\r\n\r\n" + b"y" * 500 + b"\r\n.\r\n")
    assert c.reply().startswith("500 5.5.2 Line too long")
    assert c.cmd("MAIL FROM:<" + "a" * 600 + "@example.org>").startswith("500 5.5.2")
    c.close()
    assert rq.queued() == []


def test_connection_limit(listen: Callable[..., int]) -> None:
    port = listen(smtp_max_connections=2)
    first, second = session(port), session(port)
    third = Raw(port)
    assert third.reply().startswith("421 4.7.0")
    assert third.closed()
    first.cmd("QUIT")
    first.close()
    third.close()
    greetings: list[str] = []

    def slot_free() -> bool:  # once the server has seen the QUIT through, a slot is free
        with Raw(port) as c:
            greetings.append(c.reply())
        return greetings[-1].startswith("220 ")

    wait_for(slot_free, timeout=5, what="a free connection slot")
    second.close()


def test_idle_and_slow_drip_clients_are_dropped(listen: Callable[..., int]) -> None:
    port = listen(smtp_timeout=1, smtp_data_timeout=2)
    idle = Raw(port)
    assert idle.reply().startswith("220 ")
    t0 = time.monotonic()
    assert idle.reply().startswith("421 4.4.2") and idle.closed(5)
    assert time.monotonic() - t0 < 4
    drip = session(port)
    assert drip.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert drip.cmd("RCPT TO:<b@example.org>").startswith("250")
    assert drip.cmd("DATA").startswith("354")
    t0 = time.monotonic()
    dropped = False
    for _ in range(50):  # one byte every 0.2 s: never idle for 1 s, but far too slow
        try:
            drip.send(b"x")
        except OSError:
            dropped = True
            break
        if drip.closed(0.2):
            dropped = True
            break
    assert dropped and "421 4.4.2" in drip.buf.decode()
    assert time.monotonic() - t0 < 6
    idle.close()
    drip.close()


@pytest.mark.parametrize("trick", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"])
def test_smuggling_attempts_queue_nothing_extra(
    rq: Relayq, listen: Callable[..., int], trick: bytes
) -> None:
    port = listen()
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<bob@example.org>").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: hi\r\n\r\nhello" + trick
           + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
           + b"From: admin@example.org\r\n\r\nsmuggled\r\n.\r\n")
    reply = c.reply()
    assert reply.startswith("550 5.6.0 Bare"), reply
    assert c.cmd("NOOP").startswith("250")  # the inner commands were never run
    c.close()
    assert rq.queued() == []
    assert "admin@example.org" not in rq.log()


def test_clients_other_than_localhost_are_refused(rq: Relayq, listen: Callable[..., int]) -> None:
    port = listen()
    # 127.0.0.2 is loopback too, but only 127.0.0.1 and ::1 are local clients here
    c = Raw(port, source="127.0.0.2")
    reply = c.reply()
    assert reply.startswith("554 5.7.1") and c.closed()
    c.close()
    assert "refused SMTP connection from [127.0.0.2]" in rq.log()
    ok = Raw(port, source="127.0.0.1")
    assert ok.reply().startswith("220 ")
    ok.close()


def test_non_loopback_listen_address_needs_the_setting(rq: Relayq) -> None:
    rq.configure(listen=["192.0.2.1:2525"])
    r = rq.run("relayq", "daemon", "--listen", "--foreground", timeout=20)
    assert r.returncode == EX_CONFIG
    err = assert_one_line_error(r)
    assert "192.0.2.1" in err and "listen_nonloopback" in err
    r = rq.sendmail("-bd", "-q29m", timeout=20)  # refused before detaching
    assert r.returncode == EX_CONFIG and "listen_nonloopback" in r.stderr.decode()


def test_http_request_is_refused_and_closed(listen: Callable[..., int]) -> None:
    port = listen()
    c = Raw(port)
    assert c.reply().startswith("220 ")
    c.send(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
    assert c.reply().startswith("554 5.7.0")
    assert c.closed()
    c.close()


def test_swaks_submits(rq: Relayq, listen: Callable[..., int]) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (make test installs it)")
    port = listen()
    r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(port),
                        "--from", "alice@example.org", "--to", "bob@example.org",
                        "--header", "Subject: via swaks", "--body", "swaks body",
                        "--pipeline"],
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    [(env, data)] = rq.queued()
    assert env.sender == "alice@example.org" and b"Subject: via swaks" in data


def test_sendmail_bs_speaks_smtp_on_stdin(rq: Relayq) -> None:
    rq.configure(delivery_mode="queue")
    dialogue = ("EHLO php.example.org\nMAIL FROM:<www-data@example.org>\n"
                "RCPT TO:<bob@example.org>\nDATA\nSubject: from PHP\n\nline one\n..dot\n.\n"
                "QUIT\n")  # Unix line ends, as some libraries write them
    r = rq.sendmail("-bs", input=dialogue.encode(), timeout=20)
    assert r.returncode == EX_OK, r.stderr
    out = r.stdout.decode()
    lines = out.splitlines()
    assert lines[0].startswith("220 ") and out.endswith("\r\n")
    assert "250 2.0.0 " in out and lines[-1].startswith("221 2.0.0")
    [(env, data)] = rq.queued()
    assert env.sender == "www-data@example.org"
    assert env.user not in ("", "smtp")  # the invoking user
    assert data.endswith(b"\n\nline one\n.dot\n")


def test_socket_activation_uses_the_passed_socket(rq: Relayq) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    fd = sock.fileno()
    rq.configure(listen=["127.0.0.1:1"])  # ignored: systemd's socket wins
    shim = ("import os, sys; fd = int(sys.argv[1]); fd != 3 and (os.dup2(fd, 3), os.close(fd)); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
            "os.execv(sys.argv[2], sys.argv[2:])")  # what systemd does before exec
    cmd = [sys.executable, "-c", shim, str(fd), str(BIN / "relayq"), "daemon", "--foreground"]
    d = DaemonProcess(rq, cmd=cmd, pass_fds=(fd,))
    try:
        d.wait_started()
        sock.close()
        assert f"SMTP on 127.0.0.1:{port}" in rq.log()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("a@example.org", ["b@example.org"], BODY) == {}
        assert len(rq.queued()) == 1
        assert d.stop() == EX_OK
    finally:
        d.kill()


def test_sendmail_bd_detaches_and_serves(rq: Relayq) -> None:
    pid_file = rq.root / "relayq.pid"
    try:
        r = rq.sendmail("-bd", "-q29m", timeout=20)
        assert r.returncode == EX_OK, r.stderr
        port = int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.sendmail("a@example.org", ["b@example.org"], BODY) == {}
        assert len(rq.queued()) == 1
        pid = int(pid_file.read_text())
        # SIGHUP on a detached daemon keeps it serving
        os.kill(pid, signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in rq.log(), what="the reload")
    finally:
        kill_detached(pid_file)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind and drop privileges")
def test_root_binds_then_runs_as_daemon_user(tmp_path: Path) -> None:
    drop = ("import os; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            "import encodings.ascii, encodings.idna, json, email.parser")
    probe = subprocess.run([sys.executable, "-c", drop], capture_output=True, timeout=30,
                           check=False)  # this interpreter, after the same drop
    if probe.returncode != 0:
        pytest.skip("the Python installation is not readable by nobody here")
    work = Path(tempfile.mkdtemp(prefix="relayq-drop-", dir="/tmp"))
    try:
        work.chmod(0o755)
        state = work / "state"
        state.mkdir()
        os.chown(state, 65534, 65534)
        rq = Relayq(state, pid_file=str(state / "relayq.pid"), queue_interval="1h",
                    listen=[f"127.0.0.1:{free_port()}"], delivery_mode="deferred",
                    daemon_user="nobody")
        rq.log_file.touch()
        os.chown(rq.log_file, 65534, 65534)
        d = DaemonProcess(rq, "--listen").wait_ready()
        try:
            wait_for(lambda: "running as nobody" in rq.log(), what="the privilege drop")
            status = Path(f"/proc/{d.proc.pid}/status").read_text()
            assert "Uid:\t65534\t65534\t65534\t65534" in status
            port = int(str(rq.settings["listen"][0]).rsplit(":", 1)[1])  # type: ignore[index]
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                assert s.sendmail("a@example.org", ["b@example.org"], BODY) == {}
            assert os.stat(rq.queue_dir / "queue").st_uid == 65534
            assert d.stop() == EX_OK
        finally:
            d.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_dsn_parameters_are_split_off_case_intact() -> None:
    from relayq.server.handler import take_params

    arg, taken = take_params('FROM:<"a b>"@example.org> BODY=8BITMIME ret=hdrs ENVID=Ab+2B',
                             ("RET", "ENVID"))
    assert arg == 'FROM:<"a b>"@example.org> BODY=8BITMIME'
    assert taken == {"RET": "hdrs", "ENVID": "Ab+2B"}


def test_bs_line_ends_across_chunks() -> None:
    from relayq.server.stdio import _LFtoCRLF

    conv = _LFtoCRLF()
    chunks = [b"a\r", b"\nb\n", b"c\r\n\r", b"\n", b"\n"]
    assert b"".join(conv.feed(c) for c in chunks) == b"a\r\nb\r\nc\r\n\r\n\r\n"


def test_received_field_names_the_smtp_client(rq: Relayq, listen: Callable[..., int]) -> None:
    port = listen()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.org", timeout=10) as c:
        c.sendmail("a@example.org", ["b@example.org"], b"Subject: trace\r\n\r\nx\r\n")
    [(env, data)] = rq.queued()
    first = data.split(b"\n", 3)[:2]
    me = pwd.getpwuid(os.getuid()).pw_name  # the kernel names the client socket's owner
    assert first[0] == f"Received: from client.example.org ({me}@localhost [127.0.0.1])".encode()
    assert first[1].startswith(b"\tby ")
    assert first[1].endswith(f"with ESMTP id {env.qid}".encode())
