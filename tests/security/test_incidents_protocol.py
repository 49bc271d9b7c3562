"""Regression tests named after the protocol incidents of reliability-security.md §D.

D3 (no queue), D5 (spool framing), D6 (local delivery injection), D7 (SMTP
smuggling), D8 (STARTTLS injection), D9 (STARTTLS stripping, certificates),
D10 (command injection through client arguments), D11 (open relay, loopback
listener). Each test plays the incident against real components: the
installed commands, a real daemon and listener, real SMTP servers on
127.0.0.1 (aiosmtpd, or a raw socket server where aiosmtpd would hide the
bytes), real TLS from the test CA, and a network namespace of its own where
the test needs an address that is not loopback. Nothing is mocked.
"""

from __future__ import annotations

import email
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.relayq_env import BIN, Relayq, assert_one_line_error
from tests.integration.test_daemon import DaemonProcess, free_port, wait_for
from tests.integration.test_listener import Raw, session
from tests.integration.test_smtp_transport import closed_port, config

from relayq.cli import sendmail as sendmail_cli
from relayq.cli import submission
from relayq.core import address, aliases
from relayq.core import config as relayq_config
from relayq.core.envelope import PENDING, SENT, Envelope, Recipient
from relayq.core.errors import EX_CONFIG, EX_OK, EX_TEMPFAIL, RelayqError
from relayq.delivery.local_transport import LocalTarget, orcpt_for
from relayq.delivery.smtp_transport import OutgoingMessage, SmtpTransport
from relayq.queue.spool import Spool
from relayq.queue.submit import Context, enqueue
from relayq.smtp import protocol as proto
from relayq.system.log import Log

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from relayq.testing.smarthost import RawSession, ScriptedServer, Smarthost, SmarthostFactory
    from relayq.testing.tls import TestPKI

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
NOBODY = 65534  # what pipes and files run as when relayq runs as root
SECRET = "s3cret-Pa55"
MSG = b"From: alice@example.org\nSubject: incident\n\nbody\n"


# --- shared helpers -----------------------------------------------------------------


def mailq(rq: Relayq, **kw: Any) -> str:
    """`mailq -v` (reasons up to 100 characters)."""
    r = run_cmd(rq, "mailq", "-v", **kw)
    assert r.returncode == EX_OK, r.stderr
    return r.stdout.decode()


def run_cmd(rq: Relayq, prog: str, *args: str, input: bytes = b"", home: str | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """An installed command, with another HOME if asked."""
    env = rq.env
    if home is not None:
        env["HOME"] = home
    return subprocess.run([str(BIN / prog), *args], input=input, env=env, cwd="/",
                          capture_output=True, timeout=timeout, check=False)


class Listening:
    """`relayq daemon --foreground --listen` for one test: one listener process, queueing
    only (deferred mode). Call it with settings; it returns the Relayq and the port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[DaemonProcess] = []

    def __call__(self, **settings: object) -> tuple[Relayq, int]:
        port = free_port()
        values: dict[str, object] = {
            "pid_file": str(self.root / "relayq.pid"), "queue_interval": "1h",
            "listen": [f"127.0.0.1:{port}"], "delivery_mode": "deferred", "smtp_processes": 1,
            "concurrency": 1}  # its start-up run may deliver: one connection at a time
        values.update(settings)
        rq = Relayq(self.root, **values)
        # past its start-up run, or that run delivers what a test queues
        self.daemons.append(DaemonProcess(rq, "--listen").wait_ready())
        return rq, port

    def stop(self) -> None:
        """Stop the daemons (a delivery of their start-up run finishes first), so that
        one queue run of the test's own delivers what is left, alone."""
        for d in self.daemons:
            assert d.stop() == EX_OK

    def kill(self) -> None:
        for d in self.daemons:
            d.kill()


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Listening]:
    listening = Listening(tmp_path)
    yield listening
    listening.kill()


def read_until_closed(c: Raw, timeout: float = 10) -> list[str]:
    """Every reply line the server sends until it closes the connection."""
    c.closed(timeout)
    return c.buf.decode("utf-8", "replace").split("\r\n")[:-1]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder anyone may write: pipes and files run as nobody when the tests are root."""
    path = Path(tempfile.mkdtemp(prefix="relayq-incident-", dir="/tmp"))
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- network namespaces (D9, D11) ----------------------------------------------------------

NETNS_PRELUDE = r"""
import json, os, socket, subprocess, sys, time
def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)
ip("link", "set", "lo", "up")
try:  # a non-loopback interface: one end of a veth pair
    ip("link", "add", "rq0", "type", "veth", "peer", "name", "rq1")
    ip("addr", "add", "192.0.2.10/24", "dev", "rq0")
    ip("-6", "addr", "add", "2001:db8::10/64", "dev", "rq0", "nodad")
    ip("link", "set", "rq0", "up")
    ip("link", "set", "rq1", "up")
    IFACE = "veth"
except subprocess.CalledProcessError:  # no veth here: the same addresses on lo
    ip("addr", "add", "192.0.2.10/32", "dev", "lo")
    ip("-6", "addr", "add", "2001:db8::10/128", "dev", "lo", "nodad")
    IFACE = "lo"
ARGS = json.loads(sys.argv[1])
"""


def netns_available() -> bool:
    try:
        r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"],
                           capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def in_netns(code: str, args: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
    """Run `code` in a network namespace of its own, where 192.0.2.10 and 2001:db8::10
    sit on a non-loopback interface; the code prints one JSON object last."""
    r = subprocess.run(["unshare", "-n", "--", sys.executable, "-c", NETNS_PRELUDE + code,
                        json.dumps(args)], cwd=REPO, capture_output=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, r.stderr.decode()
    result: dict[str, Any] = json.loads(r.stdout.decode().strip().splitlines()[-1])
    return result


# --- D3: a relay that is down loses no mail -----------------------------------------------

RELAY_DOWN: dict[str, tuple[dict[str, Any], str]] = {
    "port-closed": ({}, "Connection refused by [127.0.0.1]"),
    "never-greets": ({"stall": "greeting"}, "timeout waiting for reply to greeting"),
    "421-banner": ({"replies": {"greeting": "421 4.3.2 Service busy"}},
                   "421 4.3.2 Service busy"),
    "drop-mid-data": ({"drop_in_data": True}, "lost connection with [127.0.0.1]"),
}


def broken_relay(factory: SmarthostFactory, how: str) -> tuple[str, Callable[[], Smarthost]]:
    """A smarthost failing as `how` says: (its config value, a function that mends it)."""
    if how == "port-closed":
        port = closed_port()
        return f"[127.0.0.1]:{port}", lambda: factory(port=port)
    sh = factory(**RELAY_DOWN[how][0])

    def mend() -> Smarthost:
        sh.stall, sh.drop_in_data = "", False
        sh.replies.clear()
        return sh

    return sh.smarthost, mend


def lose_nothing(rq: Relayq, factory: SmarthostFactory, how: str, *,
                 home: str | None = None) -> None:
    """The D3 scenario: submit in the default mode while the relay is down, then mend it."""
    relay, mend = broken_relay(factory, how)
    rq.configure(smarthost=relay, timeout=3, connect_timeout=3)
    del rq.settings["delivery_mode"]  # the shipped default: background delivery
    rq.configure()
    start = time.monotonic()
    r = run_cmd(rq, "sendmail", "-f", "alice@example.org", "bob@example.org", input=MSG,
               home=home)
    elapsed = time.monotonic() - start
    assert r.returncode == EX_OK and r.stderr == b"", r.stderr
    assert elapsed < 2.5, f"sendmail waited {elapsed:.1f}s for a relay that is down"
    spool = rq.spool
    [qid] = spool.ids()

    def attempted() -> bool:  # the background child has tried, recorded why and let go
        env = spool.read_envelope(qid)
        return env.attempts >= 1 and not spool.is_locked(qid)

    wait_for(attempted, timeout=20, what="the background attempt")
    [(env, _)] = rq.queued()
    assert [r.state for r in env.recipients] == [PENDING]
    why = RELAY_DOWN[how][1]
    assert why in env.error
    listing = mailq(rq, home=home)
    assert qid in listing and why in listing and "bob@example.org" in listing
    sh = mend()
    assert run_cmd(rq, "sendmail", "-q", home=home).returncode == EX_OK
    assert run_cmd(rq, "sendmail", "-q", home=home).returncode == EX_OK
    [t] = sh.transactions  # delivered, and exactly once
    assert t.mail_from == "alice@example.org" and t.rcpt_tos == ["bob@example.org"]
    assert t.content.endswith(b"\r\n\r\nbody\r\n")
    assert rq.queued() == []


@pytest.mark.parametrize("how", list(RELAY_DOWN))
def test_D3_a_relay_that_is_down_loses_no_mail(
    tmp_path: Path, smarthost_factory: SmarthostFactory, how: str
) -> None:
    """ssmtp/msmtp: no queue, so mail was lost when the relay was down; relayq queues it,
    says why in mailq, and one queue run after the relay recovers delivers it once."""
    lose_nothing(Relayq(tmp_path), smarthost_factory, how)


@pytest.fixture
def unwritable_home(tmp_path: Path) -> Iterator[Path]:
    """A home folder its user cannot write: mode 0500, or immutable (chattr +i) for root."""
    home = tmp_path / "home"
    home.mkdir(mode=0o500)
    immutable = False
    if IS_ROOT:
        r = subprocess.run(["chattr", "+i", str(home)], capture_output=True, check=False)
        immutable = r.returncode == 0
        if not immutable:
            pytest.skip(f"root ignores file modes and chattr +i failed: {r.stderr!r}")
    try:
        with pytest.raises(OSError):
            (home / "dead.letter").write_text("")
        yield home
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(home)], capture_output=True, check=False)
        home.chmod(0o700)


@pytest.mark.parametrize("how", ["never-greets", "drop-mid-data"])
def test_D3_a_user_with_an_unwritable_home_loses_no_mail(
    tmp_path: Path, smarthost_factory: SmarthostFactory, unwritable_home: Path, how: str
) -> None:
    """ssmtp's fallback was dead.letter in the sender's home: with a home nothing can be
    written to, the message is still queued, listed and delivered once."""
    (tmp_path / "state").mkdir()
    rq = Relayq(tmp_path / "state")
    lose_nothing(rq, smarthost_factory, how, home=str(unwritable_home))
    assert list(unwritable_home.iterdir()) == []
    assert not list(tmp_path.rglob("dead.letter"))


# --- D5: nothing can frame a field of its own in the spool -----------------------------------

# characters that end or split a record field, and the record's own words
FRAMING = ["\r", "\n", "\0", "\t", "\x0b", "\x7f", "\u0085", "\u2028", "\udcff", " ", "<", ">",
           '"', "\\", "=", "+", ";", ",", "@", "-", "end", "rcpt", "sender\t", "\nend\n",
           "\nrcpt\tpending\t\t\tevil@example.org\t", "a", "b", ".", "\u00e9"]
HOSTILE = st.one_of(st.text(max_size=24),
                    st.lists(st.sampled_from(FRAMING), max_size=8).map("".join))


def _record_keys_of_a_full_envelope() -> set[str]:
    env = Envelope("kBQ4oAAAAA0001", "a@example.org", [Recipient("b@example.org")], 1.0)
    env.held = env.warned = env.double_bounce = True
    return set(record_keys(env.dumps()))


def envelope_state(env: Envelope) -> dict[str, Any]:
    """Every field; times as the record keeps them (microseconds)."""
    state = {s: getattr(env, s) for s in Envelope.__slots__ if s != "recipients"}
    for key in ("created", "last_try", "next_try"):
        state[key] = f"{state[key]:.6f}"
    state["recipients"] = [(r.address, r.state, r.notify, r.orcpt, r.reply)
                           for r in env.recipients]
    return state


def record_keys(raw: bytes) -> list[str]:
    return [line.split(b"\t", 1)[0].decode() for line in raw.split(b"\n") if line]


KEYS = _record_keys_of_a_full_envelope()  # every key the record format writes


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\n\n", 1)[0].decode("utf-8", "surrogateescape")
    return [line.split(":", 1)[0] for line in head.split("\n") if line[:1] not in (" ", "\t")]


def test_D5_every_envelope_field_round_trips_or_is_refused_at_intake(tmp_path: Path) -> None:
    """Exim 21Nails (CVE-2020-28021/-28026): a newline in a parameter wrote a spool line of
    its own. Hostile text in -f, recipients, -F, -V (ENVID), -R (RET) and -N (NOTIFY)
    goes through the command line's intake into a real queue: it is refused, or
    the record read back from disk is the record written, with no field of its own."""
    cfg = relayq_config.parse(f'queue_dir = "{tmp_path / "q"}"\ndomain = "host.example.org"\n'
                              'syslog = false\n')
    spool, ctx = Spool(cfg.queue_dir), Context(cfg)
    log = Log(use_syslog=False, path=str(tmp_path / "maillog"))

    def submit(argv: list[str]) -> tuple[Envelope, bytes] | None:
        if any("\0" in a for a in argv):
            return None  # execve() cannot carry a NUL: no caller can hand it over
        before = spool.ids()
        try:
            args = sendmail_cli.parse(argv)
            req = submission.request_for(args, "alice", 1000, "")  # what sendmail builds
            msg, env = enqueue(cfg, spool, req, iter([b"Subject: x\n\nbody\n"]), log, ctx)
        except RelayqError:
            assert spool.ids() == before  # refused at intake: nothing committed
            return None
        msg.release()
        with open(os.path.join(spool.queue, msg.qid + ".e"), "rb") as f:
            raw = f.read()
        with open(spool.data_path(msg.qid), "rb") as f:
            data = f.read()
        assert envelope_state(Envelope.loads(raw, msg.qid)) == envelope_state(env)
        keys = record_keys(raw)
        assert set(keys) <= KEYS and keys.count("rcpt") == len(env.recipients)
        assert all(keys.count(k) == 1 for k in KEYS - {"rcpt"} if k in keys)
        return env, data

    baseline = submit(["-f", "alice@example.org", "-F", "Alice", "--", "bob@example.org"])
    assert baseline is not None
    names = sorted(header_names(baseline[1]))

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(HOSTILE, HOSTILE, HOSTILE, HOSTILE, st.sampled_from(["", "full", "hdrs", "x"]),
           HOSTILE, st.sampled_from(["sender", "rcpt", "name", "envid", "ret", "notify"]))
    def each(sender: str, rcpt: str, name: str, envid: str, ret: str, notify: str,
             where: str) -> None:
        # one hostile field at a time on top of ordinary ones, and all of them at once
        fields = {"sender": "alice@example.org", "rcpt": "bob@example.org", "name": "Alice",
                  "envid": "Q1", "ret": "hdrs", "notify": "success"}
        hostile = {"sender": f"a{sender}@example.org", "rcpt": f"b{rcpt}@example.org",
                   "name": name, "envid": envid, "ret": ret or envid, "notify": notify}
        for chosen in ({where: hostile[where]}, hostile):
            f = {**fields, **chosen}
            argv = ["-f", f["sender"], "-F", f["name"], "-V", f["envid"], "-R", f["ret"],
                    "-N", f["notify"], "--", f["rcpt"]]
            got = submit(argv)
            if got is None:
                continue
            env, data = got
            assert env.envid == f["envid"] and env.ret == f["ret"].upper()
            assert [r.address for r in env.recipients] == [  # as given, then qualified
                address.qualify(a, ctx.domain) for a in address.parse_recipient_args(f["rcpt"])]
            assert env.sender == ctx.envelope_sender(address.parse_mailbox(f["sender"]))
            assert all(r.notify == sendmail_cli.parse(["-N", f["notify"]]).notify
                       for r in env.recipients)
            assert sorted(header_names(data)) == names  # -F added no field of its own

    each()


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from([*FRAMING, "|", "/", "|cmd ", "/var/x", '"', '\\"', ":"]),
                min_size=1, max_size=10).map("".join), st.text(max_size=20))
def test_D5_an_alias_target_as_written_round_trips_in_the_envelope(text: str,
                                                                  original: str) -> None:
    """21Nails' 'original recipient' field: whatever the aliases parser accepts as a
    target ("|command", "/file", with a tab, a CR, quotes...) is recorded and read
    back verbatim, with the original recipient as ORCPT; nothing frames a field."""
    try:
        table = aliases.parse(f'hook: "{text}"\nfile: {text}\n', "aliases")
    except aliases.AliasError:
        return
    for targets in table.entries.values():
        for t in targets:
            record = LocalTarget(t.kind, t.value, "nobody").record
            env = Envelope("kBQ4oAAAAA0001", "alice@example.org",
                           [Recipient(record, PENDING, "NEVER", orcpt_for(original)),
                            Recipient("bob@example.org", SENT, "", "", "250 ok")], 1.0)
            raw = env.dumps()
            back = Envelope.loads(raw, env.qid)
            assert envelope_state(back) == envelope_state(env)
            assert record_keys(raw).count("rcpt") == 2


def test_D5_an_alias_command_with_a_tab_leaves_a_readable_envelope(tmp_path: Path) -> None:
    """21Nails, relayq's variant: a pipe alias holding a tab once shifted the columns of
    its envelope line, so the deferred message read as damaged (and would be moved to
    quarantine). The deferral is recorded and mailq lists the target."""
    (tmp_path / "mail").mkdir()
    (tmp_path / "aliases").write_text('hook: "|cat >/dev/null;\texit 75"\n')
    rq = Relayq(tmp_path, local_delivery=True, mail_spool=str(tmp_path / "mail"),
                aliases_file=str(tmp_path / "aliases"), allow_pipe_targets=True)
    assert rq.sendmail("-odq", "hook", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    [(env, _)] = rq.queued()  # readable: not damaged
    states = {r.address: r.state for r in env.recipients}
    assert states == {"hook@host.example.org": SENT, "|cat >/dev/null;\texit 75": PENDING}
    assert "exit status 75" in env.error
    listing = mailq(rq)
    assert "damaged" not in listing and "exit status 75" in listing
    assert not list((rq.queue_dir / "quarantine").iterdir())


# the research's two examples and their neighbours, with what must be stored (ENVID,
# ORCPT) or None: no message. A bare LF ends a command line, so what follows it is a
# command of its own (refused as unknown); a tab or CR inside a line splits words.
SMTP_PARAMS: list[tuple[str, str, tuple[str, str] | None]] = [
    ("MAIL FROM:<a@example.org> AUTH=<x\nrcpt\tpending\t\t\tevil@example.org\t>", "", None),
    ("MAIL FROM:<a@example.org> AUTH=<a@example.org>", "", None),
    ("MAIL FROM:<a@example.org> ENVID=x\nsender\tevil@example.org", "", ("x", "")),
    ("MAIL FROM:<a@example.org> ENVID=x\tend", "", None),
    ("MAIL FROM:<a@example.org> ENVID=x\ry", "", None),
    ("MAIL FROM:<a@example.org> ENVID=x\0y", "", None),
    ("MAIL FROM:<a@example.org> ENVID=x+0A+09end", "", ("x+0A+09end", "")),
    ("MAIL FROM:<a@example.org> RET=HDRS\tx", "", None),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x\nrcpt\tpending\t\t\tevil@example.org\t",
     ("", "rfc822;x")),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x%0Arcpt%09pending",
     ("", "rfc822;x%0Arcpt%09pending")),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x+0A+09end", ("", "rfc822;x+0A+09end")),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x\rrcpt", None),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x\x0bend", None),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;x\x00end", None),
    # UTF-8 in ORCPT is kept as xtext (+HH of its octets), the one form relayq stores
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;\u00e9x", ("", "rfc822;+C3+A9x")),
    ("MAIL FROM:<a@example.org>", "ORCPT=rfc822;\u00e9\u2028x", None),
    ("MAIL FROM:<a@example.org>", "NOTIFY=SUCCESS\tevil@example.org", None),
    ('MAIL FROM:<"a\tb"@example.org>', "", None),
]


def test_D5_smtp_parameters_are_refused_or_stored_verbatim(
    listen: Listening
) -> None:
    """21Nails over the listener: `AUTH=<x\\n...>` in MAIL FROM and an ORCPT carrying a line
    break either get no message queued or are stored byte for byte; no envelope ever
    gains a field, a recipient or an evil@ address."""
    rq, port = listen()
    expected: dict[str, tuple[str, str]] = {}
    for mail, rcpt_param, stored in SMTP_PARAMS:
        with Raw(port) as c:
            assert c.reply().startswith("220 ")
            rcpt = f"RCPT TO:<b@example.org> {rcpt_param}".rstrip()
            c.send(("EHLO client.example.org\r\n" + mail + "\r\n" + rcpt + "\r\nDATA\r\n"
                    "Subject: params\r\n\r\nbody\r\n.\r\nQUIT\r\n").encode(
                        "utf-8", "surrogateescape"))
            replies = read_until_closed(c)
        accepted = [line.split()[2] for line in replies if line.startswith("250 2.0.0 ")
                    and "accepted" in line]
        if stored is None:
            assert accepted == [], (mail, rcpt_param, replies)
        else:
            assert len(accepted) == 1, (mail, rcpt_param, replies)
            expected[accepted[0]] = stored
    queued = {env.qid: env for env, _ in rq.queued()}
    assert set(queued) == set(expected)
    for qid, (envid, orcpt) in expected.items():
        env = queued[qid]
        assert env.envid == envid and env.sender == "a@example.org"
        [r] = env.recipients
        assert (r.address, r.orcpt) == ("b@example.org", orcpt)
    for f in (rq.queue_dir / "queue").glob("*.e"):
        raw = f.read_bytes()
        assert b"evil" not in raw
        assert set(record_keys(raw)) <= KEYS and record_keys(raw).count("rcpt") == 1


# --- D6: a hostile address never reaches a shell ----------------------------------------------


def local_rq(root: Path, out: Path, **settings: object) -> Relayq:
    """Local delivery with a pipe alias `hook` noting what its program was given."""
    (root / "mail").mkdir(exist_ok=True)
    cmd = (f"cat >>{out}.msg; printenv SENDER >>{out}.sender; printenv RECIPIENT >>{out}.rcpt;"
           f" echo $# >>{out}.argc; id -u >>{out}.uid; tr '\\\\0' ' ' </proc/$$/cmdline"
           f" >>{out}.argv")
    (root / "aliases").write_text(f'hook: "|{cmd}"\n')
    return Relayq(root, local_delivery=True, mail_spool=str(root / "mail"),
                  aliases_file=str(root / "aliases"), allow_pipe_targets=True, **settings)


def assert_pipe_saw(out: Path, senders: list[str]) -> None:
    """The program got each sender in $SENDER and the message on stdin, never in argv;
    and it ran as nobody when relayq runs as root."""
    n = len(senders)
    assert sorted(Path(f"{out}.sender").read_text().splitlines()) == sorted(senders)
    assert Path(f"{out}.rcpt").read_text() == "hook@host.example.org\n" * n
    assert Path(f"{out}.argc").read_text() == "0\n" * n
    argv = Path(f"{out}.argv").read_text()
    assert not any(s in argv for s in senders)
    assert Path(f"{out}.uid").read_text() == f"{NOBODY if IS_ROOT else os.getuid()}\n" * n
    data = Path(f"{out}.msg").read_bytes()
    assert all(f"Return-Path: <{s}>".encode() in data for s in senders)


SHELL_SENDERS = ['"`touch {mark}`"@example.org', '"$(touch {mark})"@example.org',
                 '"x;touch {mark};"@example.org', '"|touch {mark}"@example.org',
                 "'$(touch${{IFS}}{mark})'@example.org", "`touch${{IFS}}{mark}`@example.org"]


@pytest.mark.parametrize("template", SHELL_SENDERS)
def test_D6_a_shell_sender_on_the_command_line_reaches_a_pipe_only_as_data(
    tmp_path: Path, shared_dir: Path, template: str
) -> None:
    """OpenSMTPD CVE-2020-7247: a sender's shell metacharacters ran as root in a delivery
    command. Given to `sendmail -f`, such a sender is refused, or reaches a pipe alias
    only through $SENDER and stdin (argc 0), as nobody; nothing is ever run."""
    mark, out = shared_dir / "pwned", shared_dir / "out"
    rq = local_rq(tmp_path, out)
    sender = template.format(mark=mark)
    r = rq.sendmail("-odq", "-f", sender, "hook", input=MSG)
    if r.returncode == EX_OK:
        assert rq.sendmail("-q").returncode == EX_OK
        assert_pipe_saw(out, [sender])
    else:
        assert r.returncode == 65 and "invalid sender" in assert_one_line_error(r)
        assert rq.spool.ids() == []
    assert not mark.exists()


def test_D6_a_shell_sender_over_smtp_reaches_a_pipe_only_as_data(
    listen: Listening, tmp_path: Path, shared_dir: Path
) -> None:
    """CVE-2020-7247 as it was sent: `MAIL FROM:<`touch x`@...>` and its neighbours on the
    listener are refused, or queued under some address that then reaches the pipe as
    data only; no file is ever created and a "|command" recipient is refused."""
    mark, out = shared_dir / "pwned", shared_dir / "out"
    local_rq(tmp_path, out)  # aliases and spool; the daemon's Relayq rewrites the config
    rq, port = listen(local_delivery=True, mail_spool=str(tmp_path / "mail"),
                      aliases_file=str(tmp_path / "aliases"), allow_pipe_targets=True)
    hostile = [f"<`touch {mark}`@example.org>", f"<;touch {mark};>",
               f"<$(touch {mark})@example.org>", f"<x@example.org;touch {mark}>",
               f'<"$(touch {mark})"@example.org>', f"<`touch${{IFS}}{mark}`@example.org>"]
    qids = []
    for arg in hostile:
        c = session(port)
        reply = c.cmd(f"MAIL FROM:{arg}")
        if reply.startswith("250 "):
            assert c.cmd("RCPT TO:<hook>").startswith("250 ")
            assert c.cmd("DATA").startswith("354")
            c.send(b"Subject: smtp\r\n\r\nbody\r\n.\r\n")
            reply = c.reply()
            assert reply.startswith("250 2.0.0 "), reply
            qids.append(reply.split()[2])
        else:
            assert reply[:3] in ("501", "553", "555"), (arg, reply)
        c.close()
    senders = [rq.spool.read_envelope(q).sender for q in qids]
    assert f'"$(touch {mark})"@example.org' in senders  # the quoted form is an address
    c = session(port)  # a recipient that looks like a command is a local part, no more
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 ")
    for rcpt in (f'"|touch {mark}"', f'"`touch {mark}`"', f'"$(touch {mark})"'):
        assert c.cmd(f"RCPT TO:<{rcpt}>")[:3] in ("250", "553")
    if c.cmd("DATA").startswith("354"):
        c.send(b"Subject: rcpt\r\n\r\nbody\r\n.\r\n")
        assert c.reply().startswith("250 2.0.0 ")
    c.close()
    listen.stop()
    # the odd recipients bounce to alice@example.org, whose relay (port 9) is down: 75
    assert rq.sendmail("-q").returncode in (EX_OK, EX_TEMPFAIL)
    assert not mark.exists()
    assert_pipe_saw(out, senders)


def test_D6_programs_and_files_named_by_roots_alias_never_run_as_root(
    tmp_path: Path, shared_dir: Path
) -> None:
    """qmail's rule: programs and files are not addresses; OpenSMTPD ran them as root.
    Even an alias of root's own runs its program and writes its file as nobody."""
    rq = local_rq(tmp_path, shared_dir / "unused")
    (tmp_path / "aliases").write_text(
        f'root: "|id -u >{shared_dir}/uid; id -G >{shared_dir}/gids", {shared_dir}/rootfile\n')
    rq.configure(allow_file_targets=True)
    assert rq.sendmail("-odq", "root", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_OK
    me = NOBODY if IS_ROOT else os.getuid()
    assert (shared_dir / "uid").read_text() == f"{me}\n"
    if IS_ROOT:
        assert "0" not in (shared_dir / "gids").read_text().split()
    assert (shared_dir / "rootfile").stat().st_uid == me
    assert b"Subject: incident" in (shared_dir / "rootfile").read_bytes()


# --- D7: SMTP smuggling ------------------------------------------------------------------------


def unambiguous(srv: ScriptedServer, count: int = 1) -> list[bytes]:
    """Check every byte the raw relay received; return each message's content as a
    receiver rebuilds it (dots unstuffed, CRLF line ends)."""
    raw = srv.received
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    assert len(srv.messages) == count
    commands = raw
    for data in srv.messages:
        commands = commands.replace(data, b"", 1)
    verbs = [line.split(b" ", 1)[0] for line in commands.split(b"\r\n")[:-1]]
    assert verbs.count(b"MAIL") == count and set(verbs) <= {b"EHLO", b"MAIL", b"RCPT",
                                                             b"DATA", b"RSET", b"QUIT"}
    out = []
    for data in srv.messages:  # DATA bytes as sent, up to and with the final dot
        assert data.endswith(b"\r\n.\r\n") and data.count(b"\r\n.\r\n") == 1
        lines = data[:-5].split(b"\r\n")
        assert all(line.startswith(b"..") for line in lines if line.startswith(b"."))
        out.append(b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                            for line in lines))
    return out


def body_of(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[1]


# input body -> the body a receiver must rebuild (lines.py: LF and CRLF end a line, a
# stray CR is a space; without -i a lone dot ends the message and ".." loses a dot)
SMUGGLE_CLI = {
    "lf-dot-lf": (["-i"], b"A\n.\nMAIL FROM:<e@example.org>\nRCPT TO:<v@example.org>\n"
                  b"DATA\nspoof\n.\n",
                  b"A\r\n.\r\nMAIL FROM:<e@example.org>\r\nRCPT TO:<v@example.org>\r\n"
                  b"DATA\r\nspoof\r\n.\r\n"),
    "cr-dot-cr": (["-i"], b"x\r.\ry\rz\n", b"x . y z\r\n"),
    "lone-cr": (["-i"], b"lone\rcr mid-line\r\n.leading\r\n..two\r\n",
                b"lone cr mid-line\r\n.leading\r\n..two\r\n"),
    "mixed": (["-i"], b"A\n.\r\nB\r\n.\rC\n\r\n.\r\n", b"A\r\n.\r\nB\r\n. C\r\n\r\n.\r\n"),
    "no-i": ([], b"A\n..dot\n.\nMAIL FROM:<e@example.org>\n.\n", b"A\r\n.dot\r\n"),
}


@pytest.mark.parametrize("case", list(SMUGGLE_CLI))
def test_D7_outbound_bytes_from_the_command_line_are_unambiguous(
    tmp_path: Path, smarthost_factory: SmarthostFactory, case: str
) -> None:
    """SMTP smuggling (CVE-2023-51764/5/6): relayq as a sender must never emit a bare CR or
    LF, an unstuffed dot or an early CRLF.CRLF. Bytes seen by a raw socket relay."""
    flags, body, rebuilt = SMUGGLE_CLI[case]
    srv = smarthost_factory.scripted()
    rq = Relayq(tmp_path, smarthost=srv.smarthost)
    r = rq.sendmail("-odq", *flags, "bob@example.org", input=b"Subject: smuggle\n\n" + body)
    assert r.returncode == EX_OK, r.stderr
    assert rq.sendmail("-q").returncode == EX_OK
    [content] = unambiguous(srv)
    assert body_of(content) == rebuilt


def test_D7_outbound_bytes_from_smtp_submissions_are_unambiguous(
    listen: Listening, smarthost_factory: SmarthostFactory
) -> None:
    """Smuggling through the listener: a message with a bare LF or CR is refused whole;
    dot lines and `sendmail -bs` (where a stray CR becomes a space) reach a raw
    relay stuffed and CRLF-only."""
    srv = smarthost_factory.scripted()
    rq, port = listen(smarthost=srv.smarthost)
    for trick in (b"A\n.\nB", b"A\n.\r\nB", b"A\rB", b"A\r.\rB", b"A\r\n.\nB", b"A\n"):
        c = session(port)
        assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 ")
        assert c.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: bare\r\n\r\n" + trick + b"\r\n.\r\n")
        assert c.reply().startswith("550 5.6.0 Bare"), trick
        c.close()
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 ")
    assert c.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: dots\r\n\r\n..leading\r\n..\r\n...two\r\nend\r\n.\r\n")
    assert c.reply().startswith("250 2.0.0 ")
    c.close()
    bs = (b"EHLO php.example.org\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>"
          b"\r\nDATA\r\nSubject: bs\r\n\r\nx\ry\r.\rz\r\n..dot\r\n.\r\nQUIT\r\n")
    assert rq.sendmail("-bs", input=bs).returncode == EX_OK
    assert len(rq.queued()) == 2
    listen.stop()
    assert rq.sendmail("-q").returncode == EX_OK
    assert rq.queued() == []
    got = {email.message_from_bytes(c)["Subject"]: body_of(c) for c in unambiguous(srv, 2)}
    assert got == {"dots": b".leading\r\n.\r\n..two\r\nend\r\n", "bs": b"x y . z\r\n.dot\r\n"}


def test_D7_inbound_a_smuggled_message_is_never_queued(
    listen: Listening
) -> None:
    """The smuggling probe itself, `A\\n.\\nMAIL FROM:<e@...>...` after DATA: relayq
    refuses the whole message (bare LF, as Postfix's smtpd_forbid_bare_newline), so
    neither it nor the smuggled one is queued and the inner commands never run."""
    rq, port = listen()
    c = session(port)
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 ")
    assert c.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: carrier\r\n\r\nA\n.\nMAIL FROM:<e@example.org>\r\nRCPT TO:<v@example.org>"
           b"\r\nDATA\r\nspoof\r\n.\r\n")
    assert c.reply().startswith("550 5.6.0 Bare LF")
    # one reply for the whole data: the session is in step and no transaction is open
    assert c.cmd("RCPT TO:<v@example.org>").startswith("503")
    assert c.cmd("QUIT").startswith("221")
    c.close()
    assert rq.queued() == []
    assert "e@example.org" not in rq.log() and "v@example.org" not in rq.log()
    assert "refused a message with a bare LF" in rq.log()


# --- D8: STARTTLS command and response injection ---------------------------------------------


def starttls_injector(pki: TestPKI, tls_ehlo: bytes,
                      seen: list[tuple[str, bytes]]) -> Callable[[RawSession], None]:
    """A relay that answers STARTTLS with `220` and a fake EHLO reply in one write, then
    offers `tls_ehlo` inside TLS; `seen` gets (clear|tls, line) for every client line."""
    ctx = pki.server_context()

    def script(s: RawSession) -> None:
        phase = "clear"
        s.send(b"220 raw.example.org ESMTP\r\n")
        while line := s.readline():
            seen.append((phase, line))
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"EHLO":
                s.send(tls_ehlo if phase == "tls" else b"250-raw.example.org\r\n250 STARTTLS\r\n")
            elif verb == b"STARTTLS":
                s.send(b"220 go ahead\r\n250-FAKE\r\n250 AUTH PLAIN\r\n")
                s.starttls(ctx)
                phase = "tls"
            elif line == b"AUTH LOGIN\r\n":
                for prompt in (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"):
                    s.send(prompt)
                    seen.append((phase, s.readline()))
                s.send(b"235 2.7.0 Authentication successful\r\n")
            elif verb == b"AUTH":
                s.send(b"504 5.5.4 Mechanism not offered\r\n")
            elif verb == b"DATA":
                s.send(b"354 go ahead\r\n")
                s.read_data()
                s.send(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                s.send(b"221 2.0.0 bye\r\n")
                return
            else:
                s.send(b"250 2.0.0 ok\r\n")

    return script


@pytest.mark.parametrize("tls_auth", ["LOGIN", ""])
def test_D8_bytes_sent_with_the_starttls_reply_are_never_believed(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI, tls_auth: str
) -> None:
    """CVE-2011-0411 class, client side (aiosmtplib GHSA-vxj7-4xrp-5vr4): `220 go ahead`,
    `250-FAKE`, `250 AUTH PLAIN` in one write to STARTTLS. relayq drops the extra
    bytes, says EHLO again inside TLS and uses only that reply's capabilities."""
    seen: list[tuple[str, bytes]] = []
    tls_ehlo = b"250-raw.example.org\r\n250-PIPELINING\r\n250 " + (
        f"AUTH {tls_auth}".encode() if tls_auth else b"8BITMIME") + b"\r\n"
    srv = smarthost_factory.scripted(script=starttls_injector(pki, tls_ehlo, seen))
    rq = Relayq(tmp_path, smarthost=srv.smarthost, tls="required", user="u",
                password=SECRET, ca_file=pki.write_ca(str(tmp_path)))
    assert rq.sendmail("-odq", "bob@example.org", input=MSG).returncode == EX_OK
    code = rq.sendmail("-q").returncode
    verbs = [(phase, line.split(b" ", 1)[0].strip()) for phase, line in seen]
    assert verbs[:3] == [("clear", b"EHLO"), ("clear", b"STARTTLS"), ("tls", b"EHLO")]
    assert all(phase == "tls" for phase, _ in verbs[2:])
    assert not any(line.startswith(b"AUTH PLAIN") for _, line in seen)
    assert "discarded 26 bytes" in rq.log()
    if tls_auth:  # the mechanism of the TLS reply, never the injected PLAIN
        assert code == EX_OK and rq.queued() == []
        assert [line for _, line in seen[3:4]] == [b"AUTH LOGIN\r\n"]
        assert len(srv.messages) == 1
    else:  # nothing inside TLS offers AUTH: defer, and say why
        assert code == EX_TEMPFAIL
        assert not any(line.startswith((b"AUTH", b"MAIL")) for _, line in seen)
        assert "does not offer AUTH" in mailq(rq)


def test_D8_the_listener_never_switches_to_tls_under_buffered_commands(
    listen: Listening
) -> None:
    """CVE-2011-0411, server side (aiosmtpd 1.4.6): `STARTTLS\\r\\nRSET\\r\\nMAIL...` in one
    segment. The listener offers no STARTTLS, refuses it, and answers the rest as the
    plain-text commands they are; nothing is ever run as if it came inside TLS."""
    _, port = listen()
    c = Raw(port)
    assert c.reply().startswith("220 ")
    assert "STARTTLS" not in c.cmd("EHLO client.example.org")
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@example.org>\r\n")
    replies = [c.reply(), c.reply(), c.reply()]
    assert not replies[0].startswith("220") and replies[0][:3] in ("454", "502")
    assert replies[1].startswith("250") and replies[2].startswith("250 2.1.0")
    assert c.cmd("NOOP").startswith("250")  # still clear text, still in step
    c.close()


# --- D9: STARTTLS stripping and unverified certificates ----------------------------------------

TLS_FAULTS = ["no-starttls", "454", "unknown-ca", "wrong-name"]


@pytest.mark.parametrize("fault", TLS_FAULTS)
def test_D9_tls_required_never_falls_back_to_clear_text(
    tmp_path: Path, smarthost_factory: SmarthostFactory, pki: TestPKI, fault: str
) -> None:
    """smtplib's unverified STARTTLS, msmtp 1.8.2, dma's 'defer if STARTTLS fails': with
    tls = "required", a relay without STARTTLS, one answering 454, one with a
    certificate from an unknown CA or for another name all leave the message
    deferred with the reason, and no AUTH, MAIL or message byte goes out in clear
    (the relay would take AUTH in clear). Mended, the same message goes out."""
    good = pki.server_context()
    sh = smarthost_factory(
        tls_context={"no-starttls": None, "454": good, "unknown-ca": pki.server_context(
            "unknown-ca"), "wrong-name": pki.server_context("wrong-name")}[fault],
        replies={"starttls": "454 4.7.0 TLS not available"} if fault == "454" else None,
        auth={"u": SECRET}, auth_require_tls=False)
    rq = Relayq(tmp_path, smarthost=sh.smarthost, tls="required", user="u", password=SECRET,
                ca_file=pki.write_ca(str(tmp_path)))
    assert rq.sendmail("-odq", "bob@example.org", input=MSG).returncode == EX_OK
    assert rq.sendmail("-q").returncode == EX_TEMPFAIL
    why = {"no-starttls": "TLS is required but [127.0.0.1] does not offer STARTTLS",
           "454": "refused STARTTLS: 454 4.7.0 TLS not available",
           "unknown-ca": "certificate verification failed",
           "wrong-name": "certificate verification failed"}[fault]
    [(env, _)] = rq.queued()
    assert why in env.error and [r.state for r in env.recipients] == [PENDING]
    assert why in mailq(rq)
    assert set(sh.verbs()) <= {"EHLO", "STARTTLS", "QUIT"}
    assert sh.transactions == [] and SECRET not in rq.log()
    # mended: the relay offers a good certificate, or we are told its CA
    if fault == "unknown-ca":
        other = tmp_path / "other-ca.pem"
        pki.other_ca.cert_pem.write_to_path(str(other))
        rq.configure(ca_file=str(other))
    else:
        sh.tls_context = good
        sh.replies.clear()
    assert rq.sendmail("-q").returncode == EX_OK
    [t] = sh.transactions
    assert t.tls and t.auth_user == "u" and t.rcpt_tos == ["bob@example.org"]
    assert all(c.tls for c in sh.commands if c.verb in ("AUTH", "MAIL", "RCPT", "DATA"))


NETNS_AUTH = r"""
from relayq.testing.smarthost import Smarthost
from tests.integration.test_smtp_transport import config, one, statuses
out = {}
for host in ("192.0.2.10", "2001:db8::10", "127.0.0.1"):
    for tls in ("none", "opportunistic"):
        with Smarthost(host=host, auth={"u": ARGS["secret"]}, auth_require_tls=False) as sh:
            spec = f"[{host}]:{sh.port}"
            r, run = one(config(spec, tls=tls, user="u", password=ARGS["secret"]))
            out[f"{host} {tls}"] = {"statuses": statuses(r), "error": r.error,
                                    "verbs": sh.verbs(), "said": run.said()}
print(json.dumps({"iface": IFACE, "runs": out}))
"""


def test_D9_auth_never_goes_in_clear_to_a_peer_off_this_host() -> None:
    """precli #342 / frappe #42844 (AUTH over an unprotected connection): in a network
    namespace with a non-loopback interface, a relay at 192.0.2.10 or 2001:db8::10
    that takes AUTH in clear never gets it from relayq, even with tls = "none";
    the loopback relay, which nobody can sniff, does."""
    if not netns_available():
        pytest.skip("cannot create a network namespace here (needs root or user namespaces)")
    result = in_netns(NETNS_AUTH, {"secret": SECRET})
    runs = result["runs"]
    for key, run in runs.items():
        host = key.split()[0]
        assert SECRET not in run["said"]
        if host == "127.0.0.1":
            assert run["statuses"] == ["sent"] and "AUTH" in run["verbs"], run
        else:
            shown = f"[{host}]"
            assert run["statuses"] == ["deferred"], run
            assert run["error"] == (f'refusing to send AUTH to {shown} in clear text '
                                    '(set tls = "required" or "implicit")')
            assert run["verbs"] == ["EHLO", "QUIT"], run


# --- D10: command injection through client arguments ---------------------------------------

INJECT = ["\r\nRCPT TO:<evil@example.org>", "\nRCPT TO:<evil@example.org>",
          "\rRCPT TO:<evil@example.org>", "\0RCPT TO:<evil@example.org>",
          "\x0bevil", "\x7fevil", "> RCPT TO:<evil@example.org"]


@pytest.mark.parametrize("field", ["sender", "recipient", "envid", "notify", "orcpt"])
@pytest.mark.parametrize("bad", INJECT, ids=["crlf", "lf", "cr", "nul", "vt", "del", "gt"])
def test_D10_hostile_envelope_values_never_add_a_command(
    smarthost_factory: SmarthostFactory, field: str, bad: str
) -> None:
    """aiosmtplib GHSA-v3q9-hj7j-63hq, nodemailer GHSA-vvjj-xcjg-gr5g: a CR, LF, NUL or
    other control character in an envelope value or ESMTP parameter became a second
    command. The client refuses the value before writing: a raw relay sees only the
    intended command lines and never evil@; the other recipient still goes out."""
    srv = smarthost_factory.scripted(replies={
        "EHLO": b"250-raw.example.org\r\n250-DSN\r\n250 PIPELINING\r\n"})
    value = {"sender": "a@example.org", "recipient": "c@example.org", "envid": "Q1",
             "notify": "SUCCESS", "orcpt": "rfc822;c@example.org"}
    value[field] += bad
    data = b"Subject: x\n\nbody\n"
    msg = OutgoingMessage("Q1", value["sender"],
                          [("b@example.org", "", ""),
                           (value["recipient"], value["notify"], value["orcpt"])],
                          io.BytesIO(data), len(data), envid=value["envid"])
    transport = SmtpTransport(config(srv.smarthost))
    try:
        result = transport.deliver(msg)
    finally:
        transport.close()
    wait_for(lambda: srv.received.endswith(b"QUIT\r\n"), timeout=5, what="the QUIT")
    raw = srv.received
    assert b"evil" not in raw
    commands = raw.replace(srv.messages[0], b"") if srv.messages else raw
    lines = commands.split(b"\r\n")
    assert lines[-1] == b"" and all(b"\r" not in ln and b"\n" not in ln for ln in lines)
    assert {ln.split(b" ", 1)[0] for ln in lines[:-1]} <= {b"EHLO", b"MAIL", b"RCPT", b"DATA",
                                                            b"RSET", b"QUIT"}
    states = [o.status for o in result.outcomes]
    if field in ("sender", "envid"):  # the whole transaction: refused before MAIL
        assert states == ["failed", "failed"] and b"MAIL" not in raw
        assert result.outcomes[0].dsn_code == "5.1.7"
    else:  # only the poisoned recipient
        assert states == ["sent", "failed"] and result.outcomes[1].dsn_code == "5.1.3"
        assert raw.count(b"RCPT TO:") == 1 and len(srv.messages) == 1


def test_D10_the_configured_ehlo_name_and_auth_user_are_checked_before_use(
    tmp_path: Path, smarthost_factory: SmarthostFactory
) -> None:
    """The configured EHLO name or AUTH user with CR, LF or NUL is a configuration error
    (78, one line naming the key) before any connection; another control character
    in the AUTH user defers the message with the reason and writes no AUTH line."""
    srv = smarthost_factory.scripted(replies={
        "EHLO": b"250-raw.example.org\r\n250 AUTH PLAIN LOGIN\r\n"})
    rq = Relayq(tmp_path, smarthost=srv.smarthost, tls="none", password=SECRET)
    assert rq.sendmail("-odq", "bob@example.org", input=MSG).returncode == EX_OK
    text = rq.config.read_text()
    for key, value in (("ehlo_name", r"client.example.org\r\nMAIL FROM:<evil@example.org>"),
                       ("ehlo_name", r"client.example.org\u0000"),
                       ("user", r"u\r\nRSET"), ("user", r"u\nMAIL FROM:<evil@example.org>"),
                       ("user", r"u\u0000x")):
        rq.write_config(text + f'{key} = "{value}"\n')
        r = rq.sendmail("-q")
        assert r.returncode == EX_CONFIG and key in assert_one_line_error(r)
    assert srv.sessions == 0
    for user in (r"u\u000bx", r"u\u001b[2Jx", r"u\u007fx"):
        rq.write_config(text + f'user = "{user}"\n')
        assert rq.sendmail("-q").returncode == EX_TEMPFAIL
        [(env, _)] = rq.queued()
        assert "AUTH user contains a control character" in env.error, env.error
    assert b"AUTH" not in srv.received and b"MAIL" not in srv.received
    assert b"evil" not in srv.received
    assert "AUTH user contains a control character" in mailq(rq)
    assert "possible duplicate" not in rq.log()


UTS_SHIM = ("import os, socket, sys; socket.sethostname(sys.argv[1]); "
            "os.execv(sys.argv[2], sys.argv[2:])")


@pytest.mark.parametrize("node", ["evil.example.org\r\nMAIL FROM:<evil@example.org>",
                                  "evil.example.org\nRSET", "evil.example.org\x0bx",
                                  "evil.example.org\x1b[2J"])
def test_D10_a_hostile_host_name_never_reaches_the_wire(
    tmp_path: Path, smarthost_factory: SmarthostFactory, node: str
) -> None:
    """aiosmtplib 1.1.7 / smtplib: CRLF injection through the local host name used in
    EHLO. With a kernel node name holding CR, LF or another control character (in
    a UTS namespace of its own) and no ehlo_name set, the queue run writes no EHLO:
    the message is deferred with the reason, and the relay sees no command but QUIT."""
    if subprocess.run(["unshare", "-u", "true"], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot create a UTS namespace here (needs root)")
    srv = smarthost_factory.scripted()
    rq = Relayq(tmp_path, smarthost=srv.smarthost)
    assert rq.sendmail("-odq", "bob@example.org", input=MSG).returncode == EX_OK
    r = subprocess.run(["unshare", "-u", sys.executable, "-c", UTS_SHIM, node,
                        str(BIN / "sendmail"), "-q"], env=rq.env, capture_output=True,
                       timeout=60, check=False)
    assert r.returncode == EX_TEMPFAIL, r.stderr
    [(env, _)] = rq.queued()
    assert "cannot greet [127.0.0.1]" in env.error and "set ehlo_name" in env.error
    wait_for(lambda: srv.sessions == 1 and srv.received.endswith(b"QUIT\r\n"), timeout=5,
             what="the QUIT")
    assert srv.received == b"QUIT\r\n"
    assert "possible duplicate" not in rq.log()
    log = rq.log()  # the host name in the log file's own prefix stays on its line too
    assert all(line.startswith(log[:7]) for line in log.splitlines()), log


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=12),
       st.sampled_from(["ehlo", "helo", "mail", "rcpt", "auth", "envid", "notify", "orcpt"]))
def test_D10_every_command_the_client_can_build_is_one_line(
    arg: str, secret: str, param: str, kind: str
) -> None:
    """aiosmtplib 5.1.1: every command built from arbitrary text (addresses, EHLO name,
    AUTH user and secret, ENVID, NOTIFY, ORCPT, raw parameters) is refused or is
    exactly one line: one CRLF, at the end, and no NUL."""
    dsn = proto.Capabilities(esmtp=True, size=0, dsn=True, eightbitmime=True, smtputf8=True)
    builders: dict[str, Callable[[], bytes]] = {
        "ehlo": lambda: proto.ehlo(arg),
        "helo": lambda: proto.helo(arg),
        "mail": lambda: proto.mail(arg, [param] if param else []),
        "rcpt": lambda: proto.rcpt(arg or "x", [param] if param else []),
        "auth": lambda: proto.command("AUTH", "PLAIN", proto.auth_plain(arg, secret)),
        "envid": lambda: proto.mail("a@example.org", proto.mail_params(dsn, envid=arg)),
        "notify": lambda: proto.rcpt("b@example.org", proto.rcpt_params(dsn, notify=arg)),
        "orcpt": lambda: proto.rcpt("b@example.org", proto.rcpt_params(dsn, orcpt=arg)),
    }
    try:
        line = builders[kind]()
    except proto.CommandError:
        return
    assert line.endswith(b"\r\n") and line.count(b"\r") == 1 and line.count(b"\n") == 1
    assert b"\0" not in line
    if kind == "auth":
        for step in proto.auth_login_steps(arg, secret):
            assert step.isascii() and "\r" not in step and "\n" not in step


# --- D11: open relay and loopback listener mistakes ------------------------------------------


@pytest.mark.parametrize("spec", ["0.0.0.0:{port}", "[::]:{port}", "192.0.2.1:{port}",
                                  "[2001:db8::1]:{port}", "localhost:{port}"])
def test_D11_a_listener_off_loopback_is_refused_at_start(tmp_path: Path, spec: str) -> None:
    """An open relay starts with a listen address anyone can reach (0.0.0.0, ::, a
    published port, or `localhost` resolving elsewhere): such a listen address is a
    configuration error (78) naming the address, unless listen_nonloopback is set."""
    listen = spec.format(port=free_port())
    rq = Relayq(tmp_path, listen=[listen], pid_file=str(tmp_path / "pid"), smtp_processes=1)
    r = rq.run("relayq", "daemon", "--foreground", "--listen", timeout=30)
    assert r.returncode == EX_CONFIG
    err = assert_one_line_error(r)
    assert "listen" in err and listen.rpartition(":")[0].strip("[]") in err


NETNS_LISTENER = r"""
port = ARGS["port"]
env = dict(ARGS["env"])
daemon = subprocess.Popen([ARGS["relayq"], "daemon", "--foreground", "--listen"], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
out = {"iface": IFACE}
try:
    deadline = time.monotonic() + 20

    def started():
        if not os.path.exists(ARGS["log"]):
            return False
        with open(ARGS["log"]) as f:
            return "starting daemon" in f.read()

    while not started():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("daemon did not start: " + daemon.stderr.read().decode())
        time.sleep(0.05)

    def talk(family, source, dest, lines):
        s = socket.socket(family)
        s.settimeout(10)
        s.bind((source, 0))
        s.connect((dest, port))
        buf = b""

        def reply():  # one whole reply, or b"" once the server has closed
            nonlocal buf
            out = b""
            while True:
                while b"\r\n" not in buf:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return out
                    buf += data
                line, _, buf = buf.partition(b"\r\n")
                out += line + b"\r\n"
                if line[3:4] != b"-":
                    return out

        got = reply()
        for line in lines:
            if not got or got.startswith(b"5"):
                break
            try:
                s.sendall(line.encode() + b"\r\n")
            except OSError:
                break
            got += reply()
        try:
            s.settimeout(5)
            closed = s.recv(65536) == b""
        except OSError:
            closed = True
        s.close()
        return {"replies": got.decode(errors="replace"), "closed": closed}

    dialogue = ["EHLO client.example.org", "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@example.org>", "DATA",
                "Subject: from {who}\r\n\r\nbody\r\n.", "QUIT"]
    for name, family, source, dest in (
            ("v4", socket.AF_INET, "192.0.2.10", "192.0.2.10"),
            ("v6", socket.AF_INET6, "2001:db8::10", "2001:db8::10"),
            ("local", socket.AF_INET, "127.0.0.1", "127.0.0.1")):
        out[name] = talk(family, source, dest, [d.format(who=name) for d in dialogue])
finally:
    daemon.terminate()
    daemon.wait(20)
print(json.dumps(out))
"""


def test_D11_a_peer_off_this_host_is_refused_even_on_a_public_listener(tmp_path: Path) -> None:
    """The listener relays with our credentials, so anyone who reaches it can send as us.
    In a network namespace of its own, bound to 0.0.0.0 and :: on purpose
    (listen_nonloopback), the listener answers 554 to clients at 192.0.2.10 and
    2001:db8::10 on a non-loopback interface and queues nothing of theirs; a
    client at 127.0.0.1 on the same listener submits."""
    port = free_port()
    rq = Relayq(tmp_path, listen=[f"0.0.0.0:{port}", f"[::]:{port}"], listen_nonloopback=True,
                pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                delivery_mode="deferred", smtp_processes=1)
    if not netns_available():  # the best this host allows: a loopback peer, not a local one
        rq.configure(listen=[f"127.0.0.1:{port}"])
        d = DaemonProcess(rq, "--listen").wait_ready()
        try:
            with Raw(port, source="127.0.0.2") as c:
                assert c.reply().startswith("554 5.7.1 ") and c.closed()
        finally:
            d.kill()
        assert rq.queued() == [] and "refused SMTP connection from [127.0.0.2]" in rq.log()
        return
    result = in_netns(NETNS_LISTENER, {"port": port, "env": rq.env, "log": str(rq.log_file),
                                      "relayq": str(BIN / "relayq")})
    for name, ip in (("v4", "192.0.2.10"), ("v6", "2001:db8::10")):
        talk = result[name]
        assert talk["replies"].startswith("554 5.7.1 ") and talk["closed"], talk
        assert talk["replies"].count("\r\n") == 1  # nothing after the refusal
        assert f"refused SMTP connection from [{ip}]: not a local client" in rq.log()
    assert "250 2.0.0 " in result["local"]["replies"], result["local"]
    [(env, data)] = rq.queued()
    assert env.sender == "alice@example.org" and b"Subject: from local" in data


SSRF = {
    "post": b"POST /mail HTTP/1.1\r\nHost: 127.0.0.1:25\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 120\r\n\r\nHELO x\r\nMAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<victim@example.org>\r\nDATA\r\nSubject: ssrf\r\n\r\nspam\r\n.\r\nQUIT\r\n",
    "get": b"GET /?q=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nHELO x\r\n"
           b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
           b"spam\r\n.\r\n",
    "connect": b"CONNECT mail.example.org:25 HTTP/1.1\r\nHost: mail.example.org:25\r\n\r\n"
               b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<victim@example.org>\r\n",
}


def test_D11_http_requests_are_hung_up_on_and_queue_nothing(
    listen: Listening
) -> None:
    """Server-side request forgery: a local web application tricked into POSTing (or
    GETting, CONNECTing) to 127.0.0.1:25 with an SMTP dialogue in the request. The
    first line closes the connection; no command after it runs and nothing is queued."""
    rq, port = listen()
    for name, request in SSRF.items():
        with Raw(port) as c:
            assert c.reply().startswith("220 ")
            c.send(request)
            replies = read_until_closed(c)
        assert replies[:1] and replies[0].startswith("554 5.7.0"), (name, replies)
        assert len(replies) == 1, (name, replies)  # closed: nothing else was answered
    assert rq.queued() == [] and "victim@example.org" not in rq.log()


def test_D11_a_command_flood_is_cut_off(listen: Listening) -> None:
    """Limits on a loopback listener: a client repeating NOOP (or RSET) without end is
    told 421 and disconnected after a bounded number, as Postfix's junk limit does."""
    _, port = listen()
    for verb in ("NOOP", "RSET"):
        c = session(port)
        c.send(f"{verb}\r\n".encode() * 150)
        replies = read_until_closed(c)
        assert replies[-1].startswith("421 4.7.0"), replies[-3:]
        assert 50 <= sum(r.startswith("250") for r in replies) <= 120
        c.close()


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")  # pragma: no cover


def test_D11_an_endless_line_costs_bounded_memory(
    listen: Listening
) -> None:
    """Limits with bounded memory: 64 MiB without a line end, in a command and in the
    message data, are refused (500) and the session goes on; the listener's peak
    memory grows by far less than what was sent (aiosmtpd 1.4.6 alone kept all of
    a too-long data line until its CRLF)."""
    rq, port = listen()
    chunk = b"x" * (1 << 20)
    c = session(port)
    pid = listener_pid(port)
    before = vm_hwm(pid)
    for _ in range(64):
        c.send(chunk)
    assert c.cmd("").startswith("500 ")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("250 ")
    assert c.cmd("RCPT TO:<bob@example.org>").startswith("250 ")
    assert c.cmd("DATA").startswith("354")
    c.send(b"Subject: long\r\n\r\nstart ")
    for _ in range(64):
        c.send(chunk)
    c.send(b".\r\n.\r\n")  # the long line ends in "." : still one line, then the end
    assert c.reply().startswith("500 5.5.2 Line too long")
    assert c.cmd("NOOP").startswith("250")
    c.close()
    grown = vm_hwm(pid) - before
    assert grown < 24 * 1024, f"the listener grew by {grown} KiB for 128 MiB sent"
    assert rq.queued() == []


def listener_pid(port: int) -> int:
    """The process that owns the listening socket on `port` (our daemon)."""
    needle = f":{port:04X} "
    inodes = {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
              if needle in line and line.split()[3] == "0A"}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return int(proc.name)
    raise AssertionError(f"no process listens on {port}")
