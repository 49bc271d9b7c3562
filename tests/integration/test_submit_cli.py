"""`sendmail` as programs call it, queue-only: what lands in the queue, and exit codes."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq, assert_one_line_error

from relayq.core.errors import EX_DATAERR, EX_NOPERM, EX_OK, EX_USAGE

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path)


def test_cron_command_line(rq: Relayq) -> None:
    # cron(8) runs exactly this, with the job's output on stdin
    msg = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> run-parts\n"
           b"Content-Type: text/plain; charset=UTF-8\n\nsome output \xc3\xa9\n")
    r = rq.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=msg)
    assert r.returncode == EX_OK, r.stderr
    [(env, data)] = rq.queued()
    assert env.sender == "root@host.example.org"
    assert [x.address for x in env.recipients] == ["root@host.example.org"]
    assert env.body == "8BITMIME"
    assert b"From: root@host.example.org (Cron Daemon)\n" in data
    assert b"To: root@host.example.org\n" in data
    assert data.endswith(b"\n\nsome output \xc3\xa9\n")
    assert b"\nDate: " in data and b"\nMessage-ID: <" in data and data.startswith(b"Received: ")
    assert f"{env.qid}: from=<root@host.example.org>" in rq.log()


def test_t_adds_argv_recipients_and_strips_bcc(rq: Relayq) -> None:
    msg = b"To: a@example.org, b@example.org\nCc: c@example.org\nBcc: d@example.org\n\nbody\n"
    r = rq.sendmail("-t", "b@example.org", "x@example.org", input=msg)
    assert r.returncode == EX_OK, r.stderr
    [(env, data)] = rq.queued()
    # peers.md 6.1: queued recipients b, x, a, c, d in that order
    assert [x.address for x in env.recipients] == [
        "b@example.org", "x@example.org", "a@example.org", "c@example.org", "d@example.org"]
    assert b"Bcc" not in data and b"d@example.org" not in data


def test_bcc_stripped_without_t_too(rq: Relayq) -> None:
    r = rq.sendmail("z@example.org", input=b"To: y@example.org\nBcc: secret@example.org\n\nx\n")
    assert r.returncode == EX_OK
    [(env, data)] = rq.queued()
    assert [x.address for x in env.recipients] == ["z@example.org"]
    assert b"secret" not in data


def test_resent_headers_take_over(rq: Relayq) -> None:
    msg = b"To: orig@example.org\nResent-To: new@example.org\nSubject: fwd\n\nx\n"
    assert rq.sendmail("-t", input=msg).returncode == EX_OK
    [(env, data)] = rq.queued()
    assert [x.address for x in env.recipients] == ["new@example.org"]
    assert b"Resent-Date: " in data and b"Resent-Message-ID: " in data


def test_sender_name_and_dsn_flags(rq: Relayq) -> None:
    r = rq.sendmail("-f", "<alice@example.org>", "-F", "Alice Q. Example", "-N",
                    "failure,delay", "-R", "hdrs", "-V", "ENV42", "-odq", "bob@example.org",
                    input=b"Subject: hi\n\nx\n")
    assert r.returncode == EX_OK, r.stderr
    [(env, data)] = rq.queued()
    assert env.sender == "alice@example.org"
    assert (env.ret, env.envid) == ("HDRS", "ENV42")
    assert env.recipients[0].notify == "FAILURE,DELAY"
    assert b'From: "Alice Q. Example" <alice@example.org>\n' in data


def test_null_sender(rq: Relayq) -> None:
    assert rq.sendmail("-f", "<>", "b@example.org", input=b"\nx\n").returncode == EX_OK
    [(env, _)] = rq.queued()
    assert env.sender == ""


def test_masquerade(rq: Relayq) -> None:
    rq.configure(masquerade_as="example.org")
    msg = b"From: root@host.example.org\nSender: web\nTo: other@example.net\n\nx\n"
    assert rq.sendmail("-f", "root", "-t", input=msg).returncode == EX_OK
    [(env, data)] = rq.queued()
    assert env.sender == "root@example.org"
    assert b"From: root@example.org\n" in data and b"Sender: web@example.org\n" in data
    assert b"To: other@example.net\n" in data


def test_lone_dot_ends_message_unless_i(rq: Relayq) -> None:
    msg = b"Subject: dots\n\n..two\n.one\n.\nlost\n"
    assert rq.sendmail("a@example.org", input=msg).returncode == EX_OK
    assert rq.sendmail("-oi", "b@example.org", input=msg).returncode == EX_OK
    (_, first), (_, second) = rq.queued()
    assert first.endswith(b"\n\n.two\n.one\n")
    assert second.endswith(b"\n\n..two\n.one\n.\nlost\n")


def test_crlf_input_and_8bit_bytes_pass_through(rq: Relayq) -> None:
    body = bytes(range(128, 256)) + b"\r\n\xe2\x82\xac utf-8\r\nno newline at end"
    msg = b"Subject: =?utf-8?q?x?=\r\nX-Raw: caf\xc3\xa9\r\n\r\n" + body
    assert rq.sendmail("-i", "a@example.org", input=msg).returncode == EX_OK
    [(env, data)] = rq.queued()
    assert data.endswith(b"X-Raw: caf\xc3\xa9\n\n" + bytes(range(128, 256))
                         + b"\n\xe2\x82\xac utf-8\nno newline at end\n")
    assert env.body == "8BITMIME" and env.smtputf8  # UTF-8 in a header needs SMTPUTF8


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-f", "evil@example.org\r\nRCPT TO:<x@example.org>", "a@example.org"], EX_DATAERR),
        (["-F", "Name\nBcc: victim@example.org", "a@example.org"], EX_DATAERR),
        (["a@example.org\nX-Injected: 1"], EX_DATAERR),
        (["a@exam\x01ple.org"], EX_DATAERR),  # (argv cannot carry NUL at all)
        (["<unbalanced@example.org"], EX_DATAERR),
        (["-X", "/tmp/x.php", "a@example.org"], EX_NOPERM),
        (["-oQ/tmp", "a@example.org"], EX_NOPERM),
        (["-Z", "a@example.org"], EX_USAGE),
        ([], EX_USAGE),
    ],
)
def test_hostile_arguments_queue_nothing(rq: Relayq, args: list[str], code: int) -> None:
    r = rq.sendmail(*args, input=b"Subject: x\n\nbody\n")
    assert r.returncode == code
    assert_one_line_error(r)
    assert rq.queued() == []
    assert not rq.queue_dir.exists() or os.listdir(rq.queue_dir / "queue") == []


def test_t_without_recipient_headers(rq: Relayq) -> None:
    r = rq.sendmail("-t", input=b"Subject: nobody\n\nx\n")
    assert r.returncode == EX_USAGE
    assert "No recipient addresses found in header" in assert_one_line_error(r)
    assert rq.queued() == []


def test_bad_config_exits_78_naming_the_key(rq: Relayq) -> None:
    rq.config.write_text('smarthost = "[127.0.0.1]"\ntls = "maybe"\n')
    r = rq.sendmail("a@example.org", input=b"\nx\n")
    assert r.returncode == 78
    assert "tls" in assert_one_line_error(r)


def test_unwritable_queue_is_a_clear_error(rq: Relayq, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rq.configure(queue_dir=str(blocker / "queue"))
    r = rq.sendmail("a@example.org", input=b"\nx\n")
    assert r.returncode in (71, 73, 74, 75)
    assert_one_line_error(r)


def test_message_size_limit(rq: Relayq) -> None:
    rq.configure(max_message_size=1000)
    r = rq.sendmail("a@example.org", input=b"\n" + b"x" * 2000 + b"\n")
    assert r.returncode == EX_DATAERR
    assert_one_line_error(r)
    assert rq.queued() == []


def test_too_many_hops(rq: Relayq) -> None:
    r = rq.sendmail("-h", "30", "a@example.org", input=b"\nx\n")
    assert r.returncode == EX_DATAERR
    assert_one_line_error(r)


def test_100mb_message(rq: Relayq, tmp_path: Path) -> None:
    src = tmp_path / "big"
    digest = hashlib.sha256()
    line = b"0123456789" * 7 + b"abcde\n"
    with open(src, "wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range((100 << 20) // len(line)):
            f.write(line)
            digest.update(line)
    with open(src, "rb") as f:
        import subprocess

        r = subprocess.run([str(rq.env["PATH"].split(":")[0] + "/sendmail"), "-i",
                            "a@example.org"], stdin=f, env=rq.env, capture_output=True,
                           timeout=120, check=False)
    assert r.returncode == EX_OK, r.stderr
    [qid] = rq.spool.ids()
    with open(rq.spool.data_path(qid), "rb") as f:
        data = f.read()
    body = data.split(b"\n\n", 1)[1]
    assert len(body) > 100_000_000 - 100
    assert hashlib.sha256(body).hexdigest() == digest.hexdigest()


def test_bv_verifies_without_queueing(rq: Relayq) -> None:
    r = rq.sendmail("-bv", "root", "a@example.org")
    assert r.returncode == EX_OK
    assert b"root@host.example.org... deliverable: mailer relay" in r.stdout
    assert rq.queued() == []


def test_bi_and_harmless_flags(rq: Relayq) -> None:
    assert rq.sendmail("-bi").returncode == EX_OK
    r = rq.sendmail("-G", "-U", "-m", "-Mrfoo", "-d0.1", "-oL9", "-c", "a@example.org",
                    input=b"\nx\n")
    assert r.returncode == EX_OK
    assert "ignored flag -Mrfoo" in rq.log()
