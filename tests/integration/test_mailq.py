"""mailq / sendmail -bp on real queue files, compared with sendmail 8.17's output.

The queue is built with the spool's own writer (create, write, commit); the
queue ids are fixed by replacing `make_qid`, the clock by TZ=UTC and a chosen
`created`, so the listing is deterministic and compared with golden files.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from relayq.cli import _exit
from relayq.cli.mailq import main, prtstr
from relayq.core.envelope import FAILED, SENT, Envelope, Recipient
from relayq.core.errors import ConfigError, UsageError
from relayq.queue.spool import Spool

if TYPE_CHECKING:
    from collections.abc import Iterator

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SM_PATH = b"/var/spool/clientmqueue"  # the path in peers.md's sendmail sample
# Tue Nov 24 19:20 2026, as in the sendmail sample of peers.md 4.1
CREATED = float(calendar.timegm((2026, 11, 24, 19, 20, 7, 0, 0, 0)))


class Queue:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spool = Spool(str(root / "spool"))
        self.config = str(root / "relayq.toml")
        Path(self.config).write_text(f'queue_dir = "{self.spool.root}"\n')
        self.spool.ensure()
        self._ids: list[str] = []
        monkeypatch.setattr("relayq.queue.spool.make_qid", lambda now, pid: self._ids.pop(0))

    def add(
        self,
        qid: str,
        sender: str,
        recipients: list[Recipient],
        data: bytes,
        *,
        body: str = "",
        error: str = "",
        created: float = CREATED,
    ) -> Envelope:
        self._ids.append(qid)
        msg = self.spool.create()
        assert msg.qid == qid
        msg.write(data)
        env = Envelope(qid, sender, recipients, created)
        env.size = msg.size
        env.body = body
        env.error = error
        msg.commit(env)
        msg.release()
        return env

    def sendmail_sample(self) -> None:
        """The three messages of peers.md 4.1 (sizes 2, 5, 16)."""
        self.add("6AOJKjGE023640", "dave@host.example.org", [Recipient("erin@example.org")], b"x\n")
        self.add(
            "6AOJKjVg023630",
            "root",
            [Recipient("user@example.org")],
            b"abcd\n",
            error="Deferred: Connection refused by [127.0.0.1]",
        )
        self.add(
            "6AOJKjjC023635",
            "alice@host.example.org",
            [Recipient("bob@example.org"), Recipient("carol@example.org")],
            b"Subject: \xe9t\xe9\n\nx\n",
            body="8BITMIME",
            error="Deferred: Connection refused by [127.0.0.1]",
        )


@pytest.fixture
def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Queue]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield Queue(tmp_path, monkeypatch)
    monkeypatch.undo()
    time.tzset()


def mailq(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes], *args: str
) -> tuple[int, bytes, bytes]:
    rc = main(["-C", queue.config, *args])
    out, err = capsysbinary.readouterr()
    return rc, out, err


def as_sendmail(queue: Queue, out: bytes) -> bytes:
    return out.replace(queue.spool.queue.encode(), SM_PATH)


def golden(name: str, data: bytes) -> bytes:
    """Golden file content; RELAYQ_UPDATE_GOLDEN=1 rewrites it (review the diff)."""
    path = GOLDEN / name
    if os.environ.get("RELAYQ_UPDATE_GOLDEN") == "1":
        path.write_bytes(data)
    return path.read_bytes()


# -- the listing ------------------------------------------------------------------


def test_listing_is_sendmails_byte_for_byte(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.sendmail_sample()
    rc, out, err = mailq(queue, capsysbinary)
    assert (rc, err) == (0, b"")
    out = as_sendmail(queue, out)
    assert out == golden("mailq_sendmail.txt", out)
    # and the golden file is peers.md 4.1's sample, tabs included
    assert out == (
        b"\t\t/var/spool/clientmqueue (3 requests)\n"
        b"-----Q-ID----- --Size-- -----Q-Time----- ------------Sender/Recipient-----------\n"
        b"6AOJKjGE023640        2 Tue Nov 24 19:20 dave@host.example.org\n"
        b"\t\t\t\t\t erin@example.org\n"
        b"6AOJKjVg023630        5 Tue Nov 24 19:20 root\n"
        b"                 (Deferred: Connection refused by [127.0.0.1])\n"
        b"\t\t\t\t\t user@example.org\n"
        b"6AOJKjjC023635       16 Tue Nov 24 19:20 alice@host.example.org\n"
        b"      8BITMIME   (Deferred: Connection refused by [127.0.0.1])\n"
        b"\t\t\t\t\t bob@example.org\n"
        b"\t\t\t\t\t carol@example.org\n"
        b"\t\tTotal requests: 3\n"
    )


def test_verbose_listing(queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    queue.sendmail_sample()
    rc, out, _ = mailq(queue, capsysbinary, "-v")
    assert rc == 0
    out = as_sendmail(queue, out)
    assert out == golden("mailq_verbose.txt", out)
    lines = out.split(b"\n")
    assert lines[1] == (
        b"-----Q-ID----- --Size-- -Priority- ---Q-Time--- --------Sender/Recipient--------"
    )
    assert lines[2] == b"6AOJKjGE023640        2      30002 Nov 24 19:20 dave@host.example.org"
    assert b"6AOJKjjC023635       16      60016 Nov 24 19:20 alice@host.example.org" in lines
    assert b"\t\t\t\t\t\tcarol@example.org" in lines


def test_empty_queue(queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    queue.spool.ensure()
    rc, out, _ = mailq(queue, capsysbinary)
    assert rc == 0
    assert out == queue.spool.queue.encode() + b" is empty\n\t\tTotal requests: 0\n"
    assert as_sendmail(queue, out) == golden("mailq_empty.txt", as_sendmail(queue, out))


def test_missing_queue_directory_is_empty(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    shutil.rmtree(queue.spool.root)
    rc, out, _ = mailq(queue, capsysbinary)
    assert rc == 0 and out.endswith(b" is empty\n\t\tTotal requests: 0\n")


def test_single_request_and_null_sender(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.add("6AOJKjGE023640", "", [Recipient("postmaster@example.org")], b"bounce\n")
    _, out, _ = mailq(queue, capsysbinary)
    lines = out.split(b"\n")
    assert lines[0].endswith(b" (1 request)")
    assert lines[2] == b"6AOJKjGE023640        7 Tue Nov 24 19:20 <>"


def test_only_pending_recipients_are_listed(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.add(
        "6AOJKjGE023640",
        "a@example.org",
        [
            Recipient("sent@example.org", SENT, reply="250 ok"),
            Recipient("gone@example.org", FAILED, reply="550 no"),
            Recipient("wait@example.org"),
        ],
        b"x\n",
    )
    _, out, _ = mailq(queue, capsysbinary)
    assert b"\t\t\t\t\t wait@example.org\n" in out
    assert b"sent@" not in out and b"gone@" not in out


def test_8bitmime_without_error_shows_body_type_alone(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.add(
        "6AOJKjGE023640", "a@example.org", [Recipient("b@example.org")], b"x\n", body="8BITMIME"
    )
    _, out, _ = mailq(queue, capsysbinary)
    assert b"a@example.org\n      8BITMIME\n\t\t\t\t\t b@example.org\n" in out


def test_long_error_is_cut_at_60(queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    error = "Deferred: " + "x" * 100
    queue.add("6AOJKjGE023640", "a@example.org", [Recipient("b@example.org")], b"x\n", error=error)
    _, out, _ = mailq(queue, capsysbinary)
    assert b"                 (" + error[:60].encode() + b")\n" in out
    _, out, _ = mailq(queue, capsysbinary, "-v")
    assert b"   (" + error[:100].encode() + b")\n" in out


def test_locked_message_shows_star(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.sendmail_sample()
    claim = queue.spool.claim("6AOJKjVg023630")
    assert claim is not None
    try:
        _, out, _ = mailq(queue, capsysbinary)
    finally:
        claim.release()
    assert b"6AOJKjVg023630*       5 Tue Nov 24 19:20 root\n" in out
    assert b"6AOJKjGE023640        2 " in out
    _, out, _ = mailq(queue, capsysbinary)
    assert b"*" not in out


def test_names_are_printed_like_prtstr(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.add(
        "6AOJKjGE023640",
        "we\\ird\u00e9@example.org",
        [Recipient("x" * 50 + "@example.org")],
        b"x\n",
    )
    _, out, _ = mailq(queue, capsysbinary)
    assert b" we\\\\ird\\303\\251@example.org\n" in out
    assert b"\t\t\t\t\t " + b"x" * 38 + b"\n" in out


def test_prtstr_matches_sendmail() -> None:
    assert prtstr("abc", 2) == b"ab"
    assert prtstr("a\\b", 39) == b"a\\\\b"
    assert prtstr("\\", 1) == b""
    assert prtstr("a\x01b", 39) == b"a\\001b"
    assert prtstr("ab\x01", 4) == b"ab"  # no room for the 4-column escape


# -- selectors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-qRcarol"], ["6AOJKjjC023635"]),
        (["-qR@EXAMPLE.ORG"], ["6AOJKjGE023640", "6AOJKjVg023630", "6AOJKjjC023635"]),
        (["-q!Sroot"], ["6AOJKjGE023640", "6AOJKjjC023635"]),
        (["-qSroot", "-qSdave"], ["6AOJKjGE023640", "6AOJKjVg023630"]),
        (["-qSalice", "-qRerin"], []),
        (["-qIVg"], ["6AOJKjVg023630"]),
        (["-q", "IVg"], ["6AOJKjVg023630"]),
        (["-qIvg"], []),
    ],
)
def test_selectors(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes], args: list[str], expected: list[str]
) -> None:
    queue.sendmail_sample()
    rc, out, _ = mailq(queue, capsysbinary, *args)
    assert rc == 0
    listed = [line[:14].decode() for line in out.split(b"\n") if line[:1] == b"6"]
    assert listed == expected
    if expected:
        assert out.endswith(f"\t\tTotal requests: {len(expected)}\n".encode())
    else:
        assert b" is empty\n" in out


# -- damage and permissions ------------------------------------------------------------------


def test_damaged_entry_is_listed_and_others_still_shown(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    queue.sendmail_sample()
    q = Path(queue.spool.queue)
    (q / "6AOJKjAA000001.d").write_bytes(b"x\n")
    (q / "6AOJKjAA000001.e").write_bytes(b"garbage\n")
    (q / "6AOJKjZZ000002.e").write_bytes(
        (q / "6AOJKjGE023640.e").read_bytes().replace(b"6AOJKjGE023640", b"6AOJKjZZ000002")
    )
    rc, out, _ = mailq(queue, capsysbinary)
    assert rc == 0
    assert b"\t\t" + q.as_posix().encode() + b" (5 requests)\n" in out
    assert b"6AOJKjAA000001 (damaged: not a relayq envelope)\n" in out
    assert b"6AOJKjZZ000002 (damaged: envelope without data file)\n" in out
    assert b"6AOJKjjC023635       16 Tue Nov 24 19:20 alice@host.example.org\n" in out
    assert out.endswith(b"\t\tTotal requests: 5\n")
    # an R or S selector has nothing to match in a damaged entry
    _, out, _ = mailq(queue, capsysbinary, "-qRexample")
    assert b"(damaged" not in out
    _, out, _ = mailq(queue, capsysbinary, "-qIAA")
    assert b"6AOJKjAA000001 (damaged" in out and b"Total requests: 1" in out


def test_unreadable_queue_is_77(queue: Queue) -> None:
    """A real permission refusal; as root, mailq runs without the capabilities
    that let root read any directory (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    import shutil
    import subprocess
    import sys

    queue.sendmail_sample()
    cmd = [str(Path(sys.executable).parent / "mailq"), "-C", queue.config]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("setpriv (util-linux) is needed to drop root's capabilities")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    os.chmod(queue.spool.queue, 0)
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    finally:
        os.chmod(queue.spool.queue, 0o700)
    assert r.returncode == 77
    assert r.stdout == b""
    assert r.stderr == f"mailq: {queue.spool.queue}: permission denied\n".encode()


def test_write_error_is_74(tmp_path: Path) -> None:
    import subprocess

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    config = tmp_path / "relayq.toml"
    config.write_text(f'queue_dir = "{tmp_path}"\n')
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "relayq.cli.mailq", "-C", str(config)],
            stdout=full,
            stderr=subprocess.PIPE,
            check=False,
        )
    assert proc.returncode == 74
    assert proc.stderr == b"mailq: write error: No space left on device\n"


def test_broken_pipe_is_74_and_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    spool = Spool(str(tmp_path / "spool"))
    spool.ensure()
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here
    for _ in range(3000):  # about 200 KB of listing: more than a pipe holds
        msg = spool.create()
        msg.write(b"x\n")
        msg.commit(Envelope(msg.qid, "a@example.org", [Recipient("b@example.org")], CREATED))
        msg.release()
    config = tmp_path / "relayq.toml"
    config.write_text(f'queue_dir = "{spool.root}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayq.cli.mailq", "-C", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b"\t\t" + spool.queue.encode()[:8]
    proc.stdout.close()  # like `mailq | head -1`
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait() == 74
    assert err == b""


# -- JSON --------------------------------------------------------------------------------


def test_json(queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    queue.sendmail_sample()
    queue.add(
        "6AOJKjzz000001",
        "",
        [Recipient("sent@example.org", SENT, reply="250 2.0.0 ok"), Recipient("w@example.org")],
        b"abc\n",
    )
    (Path(queue.spool.queue) / "6AOJKj00000001.e").write_bytes(b"junk")
    (Path(queue.spool.queue) / "6AOJKj00000001.d").write_bytes(b"junk")
    claim = queue.spool.claim("6AOJKjGE023640")
    try:
        rc, out, err = mailq(queue, capsysbinary, "--json")
    finally:
        assert claim is not None
        claim.release()
    assert (rc, err) == (0, b"")
    doc = json.loads(out)
    assert doc["queue"] == queue.spool.queue
    assert doc["total"] == 5
    assert doc["damaged"] == [{"id": "6AOJKj00000001", "problem": "not a relayq envelope"}]
    by_id = {m["id"]: m for m in doc["messages"]}
    assert list(by_id) == ["6AOJKjGE023640", "6AOJKjVg023630", "6AOJKjjC023635", "6AOJKjzz000001"]
    first = by_id["6AOJKjGE023640"]
    assert first["locked"] is True and first["size"] == 2
    assert first["created"] == "2026-11-24T19:20:07Z"
    assert first["last_try"] is None and first["next_try"] is None and first["attempts"] == 0
    assert by_id["6AOJKjjC023635"]["body"] == "8BITMIME"
    assert by_id["6AOJKjVg023630"]["error"] == "Deferred: Connection refused by [127.0.0.1]"
    bounce = by_id["6AOJKjzz000001"]
    assert bounce["sender"] == "" and bounce["locked"] is False and bounce["smtputf8"] is False
    assert bounce["recipients"] == [
        {
            "address": "sent@example.org",
            "state": "sent",
            "reply": "250 2.0.0 ok",
            "notify": "",
            "orcpt": "",
        },
        {"address": "w@example.org", "state": "pending", "reply": "", "notify": "", "orcpt": ""},
    ]


def test_json_with_selector(queue: Queue, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    queue.sendmail_sample()
    _, out, _ = mailq(queue, capsysbinary, "--json", "-qRerin")
    doc = json.loads(out)
    assert [m["id"] for m in doc["messages"]] == ["6AOJKjGE023640"] and doc["total"] == 1


def test_plain_listing_does_not_import_json(queue: Queue, tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys\n"
        "from relayq.cli.mailq import main\n"
        f"rc = main(['-C', {queue.config!r}])\n"
        "assert 'json' not in sys.modules, 'json imported'\n"
        "assert 'email' not in sys.modules, 'email imported'\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr


# -- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-Ac"],
        ["-Am", "-v"],
        ["-vAc"],
        ["-L", "mytag"],
        ["-Lmytag"],
        ["-O", "LogLevel=9"],
        ["-oi", "-oem"],
        ["-bp"],
    ],
)
def test_harmless_flags(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes], args: list[str]
) -> None:
    queue.sendmail_sample()
    rc, out, err = mailq(queue, capsysbinary, *args)
    assert (rc, err) == (0, b"")
    assert out.endswith(b"Total requests: 3\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], b"mailq: unknown option -x"),
        (["--frobnicate"], b"mailq: unknown argument '--frobnicate'"),
        (["extra"], b"mailq: unknown argument 'extra'"),
        (["-qX"], b"mailq: bad queue selector -qX"),
        (["-qR"], b"mailq: queue selector -qR needs a substring"),
        (["-Ax"], b"mailq: -Ax: expected -Ac or -Am"),
        (["-bs"], b"mailq: -bs: mailq only lists the queue"),
    ],
)
def test_usage_errors(
    queue: Queue, capsysbinary: pytest.CaptureFixture[bytes], args: list[str], message: bytes
) -> None:
    rc, out, err = mailq(queue, capsysbinary, *args)
    assert rc == 64
    assert out == b""
    assert err.startswith(message) and err.count(b"\n") == 1


def test_value_missing(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["-C"]) == 64
    assert capsysbinary.readouterr().err == b"mailq: option -C needs a value\n"


def test_help(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["--help"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"usage: mailq")
    assert main(["-h"]) == 0


def test_missing_config_is_78(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["-C", str(tmp_path / "nope.toml")]) == 78
    err = capsysbinary.readouterr().err
    assert err == f"mailq: {tmp_path / 'nope.toml'}: no such configuration file\n".encode()


def test_prog_name_for_sendmail_bp(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["-x"], prog="sendmail") == 64
    assert capsysbinary.readouterr().err.startswith(b"sendmail: unknown option -x")


# -- the exit wrapper ------------------------------------------------------------------------


def test_exit_relayq_error(capsys: pytest.CaptureFixture[str]) -> None:
    def boom() -> int:
        raise ConfigError("relayq.toml: tls: expected one of ...")

    assert _exit.run(boom, "sendmail") == 78
    assert capsys.readouterr().err == "sendmail: relayq.toml: tls: expected one of ...\n"

    def usage() -> int:
        raise UsageError("bad flag")

    assert _exit.run(usage, "mailq") == 64


def test_exit_success_returns_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit.run(lambda: 0, "mailq") == 0
    assert _exit.run(lambda: 67, "mailq") == 67
    assert capsys.readouterr().err == ""


def test_exit_interrupt(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert _exit.run(interrupted, "sendmail") == 75
    assert capsys.readouterr().err == "sendmail: interrupted\n"


def test_exit_broken_pipe_is_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def piped() -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(_exit, "_stdout_is_pipe", lambda: True)
    assert _exit.run(piped, "mailq") == 74
    assert capsys.readouterr().err == ""


def test_exit_memory_error(capsys: pytest.CaptureFixture[str]) -> None:
    def hungry() -> int:
        raise MemoryError

    assert _exit.run(hungry, "mailq") == 71
    assert capsys.readouterr().err == "mailq: out of memory\n"


def test_exit_bug_is_one_line_and_traceback_goes_to_syslog(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import syslog

    logged: list[tuple[int, str]] = []
    opened: list[tuple[str, int, int]] = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: opened.append(a))
    monkeypatch.setattr(syslog, "syslog", lambda prio, msg: logged.append((prio, msg)))

    def buggy() -> int:
        table: dict[str, int] = {}
        return table["missing\nkey"]

    assert _exit.run(buggy, "sendmail") == 70
    err = capsys.readouterr().err
    assert err == "sendmail: internal error: KeyError: 'missing\\nkey' (please report)\n"
    assert opened == [("sendmail", syslog.LOG_PID, syslog.LOG_MAIL)]
    assert all(prio == syslog.LOG_ERR for prio, _ in logged)
    assert logged[0][1] == "Traceback (most recent call last):"
    assert any("KeyError" in line for _, line in logged)


def test_exit_module_is_cheap_to_import() -> None:
    import subprocess

    code = (
        "import sys\n"
        "import relayq.cli._exit\n"
        "bad = {'syslog', 'traceback', 'json', 'email', 'tomllib'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
