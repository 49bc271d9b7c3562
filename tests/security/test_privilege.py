"""Unprivileged submission into a root-owned queue (issue 7 §1; research §C4).

Real users (tests/helpers/users.py) submit through launchers, as on a host
where relayq is installed for everyone. Root and the queue's owner commit
directly; everyone else writes maildrop/ and asks the daemon over its
socket (SO_PEERCRED) to take the file; with no daemon the file waits,
durable, for the daemon's start or root's next queue run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import stat
import subprocess
from email import message_from_bytes
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import assert_one_line_error
from tests.helpers.users import (
    ADMIN_GROUP,
    DAEMON_USER,
    SERVICE,
    System,
    ensure_users,
)
from tests.integration.test_daemon import DaemonProcess, wait_for

from relayq.core.errors import RelayqError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from relayq.testing.smarthost import Smarthost, SmarthostFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root")

ALICE, BOB, ADMIN = "rqtest-alice", "rqtest-bob", "rqtest-admin"
SUBMITTERS = [ALICE, SERVICE, "www-data"]


def message(tag: str) -> bytes:
    return f"Subject: {tag}\n\nbody of {tag}\n".encode()


@pytest.fixture
def system(launchers: Path, smarthost_factory: SmarthostFactory) -> Iterator[System]:
    sh = smarthost_factory()
    sysq = System(launchers, smarthost=sh.smarthost, delivery_mode="background",
                  admin_group=ADMIN_GROUP, queue_interval="1h")
    sysq.smarthost = sh  # type: ignore[attr-defined]
    yield sysq
    sysq.cleanup()


def smarthost_of(system: System) -> Smarthost:
    return system.smarthost  # type: ignore[attr-defined, no-any-return]


def start_daemon(system: System) -> DaemonProcess:
    d = DaemonProcess(system.rq).wait_started()
    wait_for(lambda: (system.spool_root / "relayq.sock").exists(), what="the local socket")
    return d


def root_queue_run(system: System) -> subprocess.CompletedProcess[bytes]:
    return system.rq.sendmail("-q")


def test_a_root_made_queue_has_the_documented_modes(system: System) -> None:
    """SECURITY.md's table: top 0711, queue/ and quarantine/ 0700, maildrop/ 1733,
    the socket 0666, a drop file 0640 owned by its writer."""
    d = start_daemon(system)
    try:
        root = system.spool_root
        modes = {p: stat.S_IMODE(os.stat(root / p).st_mode)
                 for p in ("", "queue", "quarantine", "maildrop", "relayq.sock")}
        assert modes == {"": 0o711, "queue": 0o700, "quarantine": 0o700, "maildrop": 0o1733,
                         "relayq.sock": 0o666}
        assert all(os.stat(root / p).st_uid == 0 for p in modes)
    finally:
        d.stop()
    # with the daemon stopped, a user's message waits as a file of theirs
    r = system.sendmail_as(ALICE, "bob@example.org", input=message("modes"))
    assert r.returncode == 0, r.stderr
    [name] = system.drops()
    st = os.stat(system.spool_root / "maildrop" / name)
    assert name.startswith("d") and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_uid == pwd.getpwnam(ALICE).pw_uid


@pytest.mark.parametrize("user", SUBMITTERS)
def test_a_user_submits_with_the_daemon_running(system: System, user: str) -> None:
    """The daemon takes the file at once; the trace names the real user."""
    d = start_daemon(system)
    try:
        r = system.sendmail_as(user, "-v", "carol@example.org", input=message("running"))
        assert r.returncode == 0, r.stderr
        assert b"handed to the relayq daemon as" in r.stdout
        sh = smarthost_of(system)
        wait_for(lambda: len(sh.transactions) == 1, what="the delivery")
    finally:
        d.stop()
    [t] = sh.transactions
    uid = pwd.getpwnam(user).pw_uid
    msg = message_from_bytes(t.content)
    assert f"(from {user}@localhost)" in msg["Received"]
    assert msg["X-Authentication-Warning"] is None
    assert t.mail_from == f"{user}@host.example.org" and t.rcpt_tos == ["carol@example.org"]
    assert f"submitted by uid {uid} ({user})" in system.rq.log()
    assert system.drops() == [] and system.rq.spool.ids() == []


@pytest.mark.parametrize("user", SUBMITTERS)
def test_a_user_submits_with_the_daemon_stopped(system: System, user: str) -> None:
    """No daemon: exit 0 with the message durable in maildrop/; root's next queue
    run delivers it exactly once, and a second run finds nothing."""
    r = system.sendmail_as(user, "carol@example.org", input=message("stopped"))
    assert r.returncode == 0, r.stderr
    assert len(system.drops()) == 1
    sh = smarthost_of(system)
    assert sh.transactions == []
    assert root_queue_run(system).returncode == 0
    assert root_queue_run(system).returncode == 0
    [t] = sh.transactions
    assert t.rcpt_tos == ["carol@example.org"]
    assert f"(from {user}@localhost)" in message_from_bytes(t.content)["Received"]
    assert system.drops() == []


def test_the_daemon_takes_waiting_mail_when_it_starts(system: System) -> None:
    for n in range(3):
        r = system.sendmail_as(ALICE, "carol@example.org", input=message(f"wait {n}"))
        assert r.returncode == 0, r.stderr
    assert len(system.drops()) == 3
    d = start_daemon(system)
    try:
        sh = smarthost_of(system)
        wait_for(lambda: len(sh.transactions) == 3, what="three deliveries")
    finally:
        d.stop()
    assert system.drops() == []


def test_f_from_an_untrusted_user_is_allowed_logged_and_marked(system: System) -> None:
    """sendmail's X-Authentication-Warning: the sender is the user's choice, the
    trace and the log keep the real uid."""
    d = start_daemon(system)
    try:
        r = system.sendmail_as(ALICE, "-f", "root@example.org", "carol@example.org",
                               input=message("spoof"))
        assert r.returncode == 0, r.stderr
        r = system.sendmail_as(ALICE, "-f", ALICE, "carol@example.org", input=message("own"))
        assert r.returncode == 0, r.stderr
        sh = smarthost_of(system)
        wait_for(lambda: len(sh.transactions) == 2, what="the deliveries")
    finally:
        d.stop()
    by_subject = {message_from_bytes(t.content)["Subject"]: t for t in sh.transactions}
    spoof = message_from_bytes(by_subject["spoof"].content)
    assert by_subject["spoof"].mail_from == "root@example.org"
    assert spoof["X-Authentication-Warning"] == (
        f"{_fqdn()}: {ALICE} set sender to root@example.org using -f")
    assert f"(from {ALICE}@localhost)" in spoof["Received"]
    assert message_from_bytes(by_subject["own"].content)["X-Authentication-Warning"] is None
    uid = pwd.getpwnam(ALICE).pw_uid
    assert f"set sender to root@example.org using -f (uid {uid})" in system.rq.log()


def test_root_may_set_any_sender_without_a_warning(system: System) -> None:
    r = system.rq.sendmail("-odq", "-f", "ceo@example.org", "carol@example.org",
                           input=message("root"))
    assert r.returncode == 0, r.stderr
    [(env, data)] = system.rq.queued()
    assert env.sender == "ceo@example.org" and b"X-Authentication-Warning" not in data


def test_the_warning_can_be_turned_off_but_the_log_line_stays(system: System) -> None:
    system.configure(auth_warnings=False)
    r = system.sendmail_as(ALICE, "-odq", "-f", "root@example.org", "carol@example.org",
                           input=message("quiet"))
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert b"X-Authentication-Warning" not in t.content
    assert ": Authentication-Warning: " in system.rq.log()  # sendmail's words


def test_bs_from_a_user_is_handed_over_and_marked(system: System) -> None:
    d = start_daemon(system)
    try:
        dialogue = (b"EHLO client.example.org\r\nMAIL FROM:<boss@example.org>\r\n"
                    b"RCPT TO:<carol@example.org>\r\nDATA\r\nSubject: bs\r\n\r\nhi\r\n.\r\n"
                    b"QUIT\r\n")
        r = system.sendmail_as(ALICE, "-bs", input=dialogue)
        assert r.returncode == 0, r.stderr
        assert b"250 2.0.0" in r.stdout
        sh = smarthost_of(system)
        wait_for(lambda: len(sh.transactions) == 1, what="the delivery")
    finally:
        d.stop()
    msg = message_from_bytes(sh.transactions[0].content)
    assert msg["X-Authentication-Warning"] == f"{_fqdn()}: {ALICE} owned process doing -bs"


def _fqdn() -> str:
    from relayq.system import hostname

    name = hostname.fqdn()
    return name if "." in name else "host.example.org"


# -- reading, changing and running the queue ---------------------------------------------


def _queue_three(system: System) -> None:
    for user, tag in ((ALICE, "alice-1"), (ALICE, "alice-2"), (BOB, "bob-1")):
        r = system.sendmail_as(user, "-odq", f"{tag}@example.org", input=message(tag))
        assert r.returncode == 0, r.stderr


def test_mailq_shows_users_their_own_messages_only(system: System) -> None:
    system.configure(delivery_mode="deferred")  # nothing leaves: we look at the queue
    d = start_daemon(system)
    try:
        _queue_three(system)
        wait_for(lambda: len(system.rq.spool.ids()) == 3, what="three queued")
        alice = system.mailq_as(ALICE)
        bob = system.mailq_as(BOB)
        admin = system.mailq_as(ADMIN)
        svc = system.mailq_as(SERVICE, "--json")
    finally:
        d.stop()
    for r in (alice, bob, admin, svc):
        assert r.returncode == 0, r.stderr
    assert b"Total requests: 2" in alice.stdout and b"bob-1" not in alice.stdout
    assert b"alice-1@example.org" in alice.stdout and b"alice-2@example.org" in alice.stdout
    assert b"Total requests: 1" in bob.stdout and b"alice" not in bob.stdout
    assert b"Total requests: 3" in admin.stdout  # the admin group sees everyone's
    assert b'"total": 0' in svc.stdout
    root = system.rq.run("mailq")
    assert b"Total requests: 3" in root.stdout, system.rq.log()


def test_mailq_without_a_daemon_says_so(system: System) -> None:
    r = system.mailq_as(ALICE)
    assert r.returncode == 69
    assert "daemon is not running" in assert_one_line_error(r)


def test_a_user_cannot_read_change_or_delete_anothers_mail(system: System) -> None:
    system.configure(delivery_mode="deferred")
    d = start_daemon(system)
    try:
        _queue_three(system)
        wait_for(lambda: len(system.rq.spool.ids()) == 3, what="three queued")
        [bob_qid] = [e.qid for e, _ in system.rq.queued() if e.user == BOB]
        queue = system.spool_root / "queue"
        for argv in (["ls", str(queue)], ["cat", str(queue / f"{bob_qid}.d")],
                     ["rm", "-f", str(queue / f"{bob_qid}.e")],
                     ["mv", str(queue / f"{bob_qid}.d"), "/tmp/stolen"],
                     ["ls", str(system.spool_root)], ["ls", str(system.spool_root / "maildrop")]):
            r = system.run_as(ALICE, argv)
            assert r.returncode != 0 and b"Permission denied" in r.stderr, argv
        r = system.relayq_as(ALICE, "delete", bob_qid)
        assert r.returncode == 77, r.stderr
        assert_one_line_error(r)
        assert len(system.rq.spool.ids()) == 3
    finally:
        d.stop()


def test_a_users_flush_asks_the_daemon_and_says_so(system: System) -> None:
    """relayq flush by a user who may not run the queue: the daemon runs it; the one
    line says so (no counts: the user's process delivered nothing), -q says nothing."""
    d = start_daemon(system)
    try:
        r = system.relayq_as(ALICE, "flush")
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"flush: the relayq daemon runs the queue (mailq shows what is left)\n"
        r = system.relayq_as(ALICE, "flush", "-q")
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        r = system.relayq_as(ALICE, "run")
        assert (r.returncode, r.stdout) == (0, b"")
    finally:
        d.stop()


def test_a_user_cannot_have_the_daemon_take_anothers_file(system: System) -> None:
    """SO_PEERCRED, not the request, says who asks: bob naming alice's file is refused;
    alice naming it gets it queued as hers."""
    d = start_daemon(system)
    try:
        name = "t" + os.urandom(16).hex()
        path = system.spool_root / "maildrop" / name
        write = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o640);"
                 "os.write(fd, b'relayq-drop 1\\nrcpt carol@example.org\\nmode q\\n\\n"
                 "Subject: planted\\n\\nhi\\n')")
        r = system.run_as(ALICE, ["/usr/bin/python3", "-c", write, str(path)])
        assert r.returncode == 0, r.stderr
        ask = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
               "s.sendall(sys.argv[2].encode()+b'\\n'); print(s.recv(4096).decode())")
        sock = str(system.spool_root / "relayq.sock")
        r = system.run_as(BOB, ["/usr/bin/python3", "-c", ask, sock, f"take {name}"])
        assert r.stdout.startswith(b"77 ") and b"not yours" in r.stdout, r
        assert path.exists() and system.rq.spool.ids() == []
        r = system.run_as(ALICE, ["/usr/bin/python3", "-c", ask, sock, f"take {name}"])
        assert r.stdout.startswith(b"0 "), r
        qid = r.stdout.split()[1].decode()
        [(env, _)] = system.rq.queued()
        assert env.qid == qid and env.user == ALICE and not path.exists()
        r = system.run_as(BOB, ["/usr/bin/python3", "-c", ask, sock, "take ../queue/x"])
        assert r.stdout.startswith(b"65 "), r
    finally:
        d.stop()


def test_sendmail_q_by_a_user_asks_the_daemon_or_is_refused(system: System) -> None:
    r = system.sendmail_as(ALICE, "-q")
    assert r.returncode == 69 and "daemon is not running" in assert_one_line_error(r)
    d = start_daemon(system)
    try:
        r = system.sendmail_as(ALICE, "-q")
        assert r.returncode == 0, r.stderr
        uid = pwd.getpwnam(ALICE).pw_uid
        wait_for(lambda: f"queue run requested by uid {uid}" in system.rq.log(),
                 what="the forced run")
    finally:
        d.stop()


def test_D1b_X_C_oQ_from_a_user_never_act(system: System,
                                                         tmp_path: Path) -> None:
    """D1(b) as a non-root user: -X, -C, -oQ and -OQueueDirectory= never act."""
    ensure_users()
    work = Path(system.dir / "attacker")
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    evil = work / "evil.conf"
    evil.write_text(f'queue_dir = "{work}/q"\nlog_file = "{work}/log"\n')
    evil.chmod(0o644)
    before = sorted(os.listdir(work))
    for argv in (["-X", f"{work}/pwn", "-C", str(evil), f"-oQ{work}",
                  f"-OQueueDirectory={work}", "rcpt@example.org"],
                 ["-C", str(evil), "rcpt@example.org"]):
        r = system.sendmail_as(ALICE, *argv, input=message("d1b"))
        assert r.returncode in (64, 77), r.stderr
        assert_one_line_error(r)
    r = system.mailq_as(ALICE, "-C", str(evil))
    assert r.returncode == 77
    assert sorted(os.listdir(work)) == before
    assert system.drops() == [] and system.rq.spool.ids() == []


def test_D1a_the_phpmailer_argv_from_www_data_writes_nothing(system: System) -> None:
    """CVE-2016-10033 as it happens: PHP runs as www-data and hands sendmail this argv."""
    web = system.dir / "web"
    web.mkdir(mode=0o777)
    web.chmod(0o777)
    argv = ["-t", "-i", "-fattacker\\", f"-oQ{web}/", f"-X{web}/shell.php", 'some"@example.org']
    r = system.sendmail_as("www-data", *argv,
                           input=b"To: victim@example.org\nSubject: x\n\n<?php ?>\n")
    assert r.returncode in (64, 65, 77), r.stderr
    assert_one_line_error(r)
    assert os.listdir(web) == [] and system.drops() == [] and system.rq.spool.ids() == []


def test_the_queue_owner_commits_directly(launchers: Path, tmp_path: Path) -> None:
    """A queue made by (or for) a user is that user's: no maildrop, no daemon needed."""
    sysq = System(launchers, install=False)
    try:
        uid = pwd.getpwnam(ALICE).pw_uid
        os.chown(sysq.dir, uid, -1)
        os.chown(sysq.rq.log_file, uid, -1)
        sysq.spool_root.mkdir(mode=0o755)  # as a plain mkdir under umask 022 makes it
        os.chown(sysq.spool_root, uid, -1)
        r = sysq.sendmail_as(ALICE, "-odq", "carol@example.org", input=message("own queue"))
        assert r.returncode == 0, r.stderr
        assert not (sysq.spool_root / "maildrop").exists()
        [name] = [n for n in os.listdir(sysq.spool_root / "queue") if n.endswith(".e")]
        assert os.stat(sysq.spool_root / "queue" / name).st_uid == uid
        r = sysq.sendmail_as(BOB, "carol@example.org", input=message("into alice's"))
        assert r.returncode != 0  # no way in: it is alice's queue, not a public one
        assert not (sysq.spool_root / "maildrop").exists()
    finally:
        sysq.cleanup()


def test_no_python_traceback_reaches_a_user(system: System) -> None:
    """Every failure a user can cause here is one line with a sysexits code."""
    cases = [
        (["-q"], b""),
        (["-bp"], b""),
        (["nobody@@example.org"], message("bad")),
        (["-f", "a@@b", "carol@example.org"], message("bad sender")),
    ]
    for argv, data in cases:
        r = system.sendmail_as(ALICE, *argv, input=data)
        assert r.returncode in (64, 65, 69, 77), (argv, r.stderr)
        assert_one_line_error(r)
    assert system.drops() == []


# -- hostile entries in maildrop/ (research §C4: Postfix pickup's rules) -------------------


def _drop_name(kind: str = "d") -> str:
    return kind + os.urandom(16).hex()


def test_hostile_entries_in_maildrop_are_refused_logged_once_and_mail_flows(
    system: System,
) -> None:
    """A symlink to /etc/shadow, hard links, a FIFO, a 1 GB file, NUL bytes in the
    request, a directory and a stray name: none is followed or read past the limit,
    each is logged once, and the good message beside them goes out once."""
    drop = system.spool_root / "maildrop"
    alice_home = Path(pwd.getpwnam(ALICE).pw_dir)
    names = {k: _drop_name() for k in ("symlink", "hardlink", "fifo", "huge", "nul", "dir",
                                       "dirfull", "rootlink")}
    names["stray"] = "not-a-drop-file"
    own = alice_home / "own-file"
    script = f"""
set -e
cd {drop}
ln -s /etc/shadow {names['symlink']}
printf 'relayq-drop 1\\nrcpt carol@example.org\\n\\nSubject: linked\\n\\nx\\n' > {own}
ln {own} {names['hardlink']}
mkfifo {names['fifo']}
truncate -s 1G {names['huge']}
printf 'relayq-drop 1\\nrcpt car\\000ol@example.org\\n\\nSubject: nul\\n\\nx\\n' > {names['nul']}
mkdir {names['dir']}
mkdir {names['dirfull']}
touch {names['dirfull']}/inside
printf 'junk' > {names['stray']}
ln /etc/passwd {names['rootlink']} 2>/dev/null || true
"""
    r = system.run_as(ALICE, ["/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    good = system.sendmail_as(ALICE, "carol@example.org", input=message("good"))
    assert good.returncode == 0, good.stderr
    shadow_before = Path("/etc/shadow").read_bytes()
    for _ in range(2):  # a second run must neither log them again nor choke
        r = root_queue_run(system)
        assert r.returncode == 0, r.stderr
    sh = smarthost_of(system)
    assert [message_from_bytes(t.content)["Subject"] for t in sh.transactions] == ["good"]
    assert Path("/etc/shadow").read_bytes() == shadow_before
    log = system.rq.log()
    for kind, name in names.items():
        if kind == "rootlink" and not (drop / name).exists() and name not in log:
            continue  # fs.protected_hardlinks stopped alice: nothing to see
        assert log.count(f"{name}") == 1, (kind, log)
    assert "a symbolic link" in log and "2 hard links" in log and "not a regular file" in log
    assert "over the limit" in log and "refused: malformed request line" in log
    assert system.drops() == []
    assert own.exists()  # the link went, alice's own file stayed


def test_a_file_still_being_written_is_left_alone_until_finished(system: System) -> None:
    drop = system.spool_root / "maildrop"
    name = _drop_name("t")
    content = b"relayq-drop 1\nrcpt carol@example.org\n\nSubject: slow\n\nx\n"
    write = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o640);"
             "os.write(fd, sys.stdin.buffer.read())")
    r = system.run_as(ALICE, ["/usr/bin/python3", "-c", write, str(drop / name)],
                      input=content)
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    sh = smarthost_of(system)
    assert sh.transactions == [] and system.drops() == [name]
    assert name not in system.rq.log()
    r = system.run_as(ALICE, ["mv", str(drop / name), str(drop / ("d" + name[1:]))])
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    assert [message_from_bytes(t.content)["Subject"] for t in sh.transactions] == ["slow"]


def test_a_planted_request_is_the_planters_whatever_it_says(system: System) -> None:
    """The file's owner is the submitter: a hand-written request claiming root's
    sender gets alice's trace and the warning."""
    name = _drop_name()
    content = (b"relayq-drop 1\nsender root@example.org\nname Root\nrcpt carol@example.org\n\n"
               b"Subject: planted\n\nx\n")
    write = ("import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_EXCL, 0o640);"
             "os.write(fd, sys.stdin.buffer.read())")
    r = system.run_as(ALICE, ["/usr/bin/python3", "-c", write,
                              str(system.spool_root / "maildrop" / name)], input=content)
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    msg = message_from_bytes(t.content)
    assert f"(from {ALICE}@localhost)" in msg["Received"]
    assert "set sender to root@example.org" in msg["X-Authentication-Warning"]


# -- D17: what a hostile caller controls around the submission path ----------------------
# relayq ships no set-id program: the user's side runs with the user's rights only, and
# the root side (the daemon's socket, the taker) reads only the request and the file.
# These check that the caller's environment, descriptors, limits and signals can neither
# steer relayq nor leave a partial message behind.


def test_D17_a_hostile_environment_steers_nothing(system: System) -> None:
    evil = system.dir / "evil"
    evil.mkdir(mode=0o755)
    marker = system.dir / "pwned"
    for mod in ("sitecustomize.py", "usercustomize.py", "relayq.py", "os.py"):
        (evil / mod).write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "os.py"),
           "PYTHONHOME": str(evil), "LD_PRELOAD": str(evil / "missing.so"),
           "IFS": "/", "PYTHONINSPECT": "1", "RELAYQ_CACHE_DIR": str(system.dir)}
    r = system.sendmail_as(ALICE, "carol@example.org", input=message("env"), env=env)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert f"(from {ALICE}@localhost)" in message_from_bytes(t.content)["Received"]


def test_D17_closed_standard_descriptors_cannot_turn_the_drop_file_into_stdout(
    system: System,
) -> None:
    """With 0, 1 and 2 closed, the drop file must not be opened as one of them."""
    sendmail = str(system.launchers / "usr/sbin/sendmail")
    code = ("import os,sys; [os.close(fd) for fd in (0,1,2)]; "
            f"os.execv({sendmail!r}, [{sendmail!r}, '-v', 'carol@example.org'])")
    r = system.run_as(ALICE, ["/usr/bin/python3", "-c", code])
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert b"no daemon took the message" not in t.content  # -v's line went nowhere


def test_D17_a_tiny_file_size_limit_leaves_nothing_partial(system: System) -> None:
    big = message("fsize") + b"x" * 200_000 + b"\n"
    code = ("import resource,os,sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    r = system.run_as(ALICE, ["/usr/bin/python3", "-c", code,
                              str(system.launchers / "usr/sbin/sendmail"), "carol@example.org"],
                      input=big)
    assert r.returncode not in (0, 70), r.stderr  # refused, and not as a crash
    assert_one_line_error(r)
    assert system.drops() == []
    assert root_queue_run(system).returncode == 0
    assert smarthost_of(system).transactions == []


@contextlib.contextmanager
def half_written(system: System, start: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """alice's sendmail with `start` of its message written and its drop file there;
    killed at the end if the test left it running."""
    pw = pwd.getpwnam(ALICE)
    proc = subprocess.Popen([str(system.launchers / "usr/sbin/sendmail"), "carol@example.org"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=system.env_for(ALICE),
                            user=pw.pw_uid, group=pw.pw_gid, cwd="/")
    try:
        assert proc.stdin is not None
        proc.stdin.write(start)
        proc.stdin.flush()
        wait_for(lambda: len(system.drops()) == 1, what="the drop file")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def test_D17_stopped_in_the_middle_of_the_write_gives_all_or_nothing(system: System) -> None:
    with half_written(system, message("stopped") + b"first half\n") as proc:
        os.kill(proc.pid, 19)  # SIGSTOP mid-message
        assert root_queue_run(system).returncode == 0
        assert smarthost_of(system).transactions == []  # the unfinished file is not taken
        os.kill(proc.pid, 18)  # SIGCONT
        _, err = proc.communicate(b"second half\n", timeout=30)
        assert proc.returncode == 0, err
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert t.content.endswith(b"first half\r\nsecond half\r\n")


def test_D17_a_huge_argv_is_refused_whole(system: System) -> None:
    r = system.sendmail_as(ALICE, "carol@example.org", *["x" * 100_000] * 10,
                           input=message("argv"))
    assert r.returncode in (64, 65), r.stderr
    assert_one_line_error(r)
    assert system.drops() == [] and system.rq.spool.ids() == []


def test_D17_garbage_on_the_socket_is_answered_and_the_daemon_keeps_serving(
    system: System,
) -> None:
    d = start_daemon(system)
    try:
        code = """
import socket, sys
path = sys.argv[1]
def ask(data):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except OSError:
        pass
    return out.split(b"\\n")[0].decode()
print(ask(b"rm -rf /\\n"))
print(ask(b"take " + b"A" * 500 + b"\\n"))
print(ask(b"mailq [1, 2]\\n"))
print(ask(b"x" * 200000))
print(ask(b"\\n"))
"""
        r = system.run_as(BOB, ["/usr/bin/python3", "-c", code,
                                str(system.spool_root / "relayq.sock")])
        assert r.returncode == 0, r.stderr
        lines = r.stdout.decode().splitlines()
        assert lines[0].startswith("64 ") and lines[1].startswith("65 ")
        assert lines[2].startswith("64 ")  # mailq: a list of numbers is a usage error
        assert lines[3] == "" and lines[4].startswith("64 ")
        ok = system.sendmail_as(ALICE, "carol@example.org", input=message("after"))
        assert ok.returncode == 0, ok.stderr
        wait_for(lambda: len(smarthost_of(system).transactions) == 1, what="the delivery")
    finally:
        d.stop()


def test_a_daemon_running_as_its_service_user_serves_everyone(launchers: Path,
                                                              smarthost_factory: SmarthostFactory,
                                                              ) -> None:
    """daemon_user: root gives it the queue (maildrop/ set-gid to its group, so users'
    0640 files are readable to it); root's own submissions are handed to it too; the
    service user, owning the queue, commits directly."""
    sh = smarthost_factory()
    sysq = System(launchers, install=False, smarthost=sh.smarthost, queue_interval="1h",
                  daemon_user=DAEMON_USER, delivery_mode="background")
    try:
        svc = pwd.getpwnam(DAEMON_USER)
        os.chown(sysq.rq.log_file, svc.pw_uid, svc.pw_gid)
        d = DaemonProcess(sysq.rq, cmd=sysq.relayq_argv("daemon", "--foreground"))
        d.wait_started()
        try:
            wait_for(lambda: (sysq.spool_root / "relayq.sock").exists(), what="the socket")
            status = Path(f"/proc/{d.proc.pid}/status").read_text()
            assert f"Uid:\t{svc.pw_uid}\t{svc.pw_uid}" in status
            drop = os.stat(sysq.spool_root / "maildrop")
            assert (drop.st_uid, drop.st_gid) == (svc.pw_uid, svc.pw_gid)
            assert stat.S_IMODE(drop.st_mode) == 0o3733
            r = sysq.sendmail_as(ALICE, "carol@example.org", input=message("from alice"))
            assert r.returncode == 0, r.stderr
            # root works as the service user in its queue: through the launcher, whose
            # Python (unlike the test venv's, under /root) that user can read
            r = sysq.sendmail_as("root", "carol@example.org", input=message("from root"))
            assert r.returncode == 0, r.stderr
            r = sysq.sendmail_as(DAEMON_USER, "-odq", "carol@example.org",
                                 input=message("from the service"))
            assert r.returncode == 0, r.stderr
            r = sysq.sendmail_as("root", "-q")  # root's run, as the service user
            assert r.returncode in (0, 75), r.stderr  # 75: the daemon had one in hand
            wait_for(lambda: len(sh.transactions) == 3, timeout=30, what="three deliveries")
            assert d.stop() == 0
        finally:
            d.kill()
        subjects = sorted(message_from_bytes(t.content)["Subject"] for t in sh.transactions)
        assert subjects == ["from alice", "from root", "from the service"]
        assert sysq.drops() == [] and sysq.rq.spool.ids() == []
    finally:
        sysq.cleanup()


def test_a_log_file_replaced_by_a_symlink_is_not_written_through(system: System) -> None:
    """log_file in a directory others can write: root's log line must not land in
    whatever file a symbolic link there points to."""
    target = system.dir / "target"
    target.write_text("precious\n")
    system.rq.log_file.unlink()
    system.rq.log_file.symlink_to(target)
    r = system.rq.sendmail("-odq", "carol@example.org", input=message("log"))
    assert r.returncode == 0, r.stderr
    assert target.read_text() == "precious\n"
    assert len(system.rq.spool.ids()) == 1


def test_D17_one_user_holding_connections_does_not_lock_others_out(system: System) -> None:
    """Eight idle connections are all one uid gets (the ninth hears 75 at once);
    another user's submission is still taken by the daemon meanwhile."""
    d = start_daemon(system)
    try:
        code = """
import socket, sys, time
held = []
for _ in range(8):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
time.sleep(0.5)
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
print(s.recv(100).decode().strip())
sys.stdout.flush()
time.sleep(4)
"""
        bob = subprocess.Popen(
            ["/usr/bin/python3", "-c", code, str(system.spool_root / "relayq.sock")],
            stdout=subprocess.PIPE, user=pwd.getpwnam(BOB).pw_uid,
            group=pwd.getpwnam(BOB).pw_gid, cwd="/")
        try:
            assert bob.stdout is not None
            line = bob.stdout.readline().decode()
            assert line.startswith("75 "), line
            r = system.sendmail_as(ALICE, "-v", "carol@example.org", input=message("fair"))
            assert r.returncode == 0, r.stderr
            assert b"handed to the relayq daemon" in r.stdout
        finally:
            bob.kill()
            bob.communicate(timeout=5)
    finally:
        d.stop()


def test_root_never_follows_what_the_service_user_plants_in_its_queue(
    launchers: Path, smarthost_factory: SmarthostFactory
) -> None:
    """Once daemon_user owns the queue it can replace any entry with a link. Root's
    runs and submissions work as that user there, and giving it the queue opens
    every directory without following links: no root file is removed, rewritten,
    moved or given away."""
    sh = smarthost_factory()
    sysq = System(launchers, install=False, smarthost=sh.smarthost, daemon_user=DAEMON_USER)
    svc = pwd.getpwnam(DAEMON_USER)
    victim = sysq.dir / "victim"
    victim.mkdir()
    (victim / "important.conf").write_text("keep me\n")
    (victim / "sub").mkdir()
    precious = sysq.dir / "precious"
    precious.write_text("root's\n")
    try:
        sysq.rq.spool.ensure((svc.pw_uid, svc.pw_gid))  # what the daemon's start does
        root = sysq.spool_root
        r = sysq.run_as(DAEMON_USER, ["/bin/sh", "-c", f"rm -r {root}/maildrop && "
                                                       f"ln -s {victim} {root}/maildrop"])
        assert r.returncode == 0, r.stderr
        r = sysq.sendmail_as("root", "-odq", "carol@example.org", input=message("root"))
        assert r.returncode == 0, r.stderr
        [qid] = sysq.rq.spool.ids()
        assert os.stat(root / "queue" / f"{qid}.d").st_uid == svc.pw_uid
        r = sysq.run_as(DAEMON_USER, ["ln", "-s", str(precious), str(root / "queue" / f"{qid}.t")])
        assert r.returncode == 0, r.stderr
        sysq.sendmail_as("root", "-q")
        assert sorted(os.listdir(victim)) == ["important.conf", "sub"]
        assert (victim / "important.conf").read_text() == "keep me\n"
        assert precious.read_text() == "root's\n" and os.stat(precious).st_uid == 0
        # queue/ itself replaced by a link to a root directory: root still works as
        # the owner of the top directory, so nothing of root's is touched
        rootq = sysq.dir / "rootq"
        rootq.mkdir(mode=0o700)
        r = sysq.run_as(DAEMON_USER, ["/bin/sh", "-c", f"mv {root}/queue {root}/q.old && "
                                                       f"ln -s {rootq} {root}/queue"])
        assert r.returncode == 0, r.stderr
        sysq.sendmail_as("root", "-q")
        sysq.sendmail_as("root", "-odq", "carol@example.org", input=message("rootq"))
        assert os.listdir(rootq) == []
        assert sorted(os.listdir(victim)) == ["important.conf", "sub"]
        # the next start of the daemon finds quarantine/ pointing at a root directory
        r = sysq.run_as(DAEMON_USER, ["/bin/sh", "-c", f"rm -r {root}/quarantine && "
                                                       f"ln -s {victim} {root}/quarantine"])
        assert r.returncode == 0, r.stderr
        with pytest.raises(RelayqError):
            sysq.rq.spool.ensure((svc.pw_uid, svc.pw_gid))
        assert os.stat(victim).st_uid == 0 and stat.S_IMODE(os.stat(victim).st_mode) == 0o755
    finally:
        sysq.cleanup()


def test_a_slow_writer_is_never_taken_for_abandoned(system: System) -> None:
    """A tHEX whose writer is still alive stays, however old it looks: exit 0 must
    mean the message exists (found by review: a day-long pipe lost its mail)."""
    with half_written(system, message("slow") + b"part one\n") as proc:
        [name] = system.drops()
        path = system.spool_root / "maildrop" / name
        old = path.stat().st_mtime - 2 * 86400
        os.utime(path, (old, old))  # as if the writer had been quiet for two days
        assert root_queue_run(system).returncode == 0
        assert system.drops() == [name] and "abandoned" not in system.rq.log()
        _, err = proc.communicate(b"part two\n", timeout=30)
        assert proc.returncode == 0, err
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert t.content.endswith(b"part one\r\npart two\r\n")


def test_a_message_refused_after_exit_0_is_reported_to_its_sender_by_mail(
    system: System,
) -> None:
    """No daemon: `-t` without recipients can only be found out by the taker; the
    user heard 0, so the refusal comes back as a notice (and the file goes)."""
    r = system.sendmail_as(ALICE, "-t", input=b"Subject: nobody to\n\nx\n")
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert t.mail_from == "<>" and t.rcpt_tos == [f"{ALICE}@host.example.org"]
    assert b"No recipient addresses found in header" in t.content
    assert system.drops() == []
    assert system.rq.log().count("refused: No recipient addresses found") == 1


def test_another_users_writable_file_renamed_into_maildrop_is_refused(system: System) -> None:
    """Found by review: alice may rename bob's 0666 file (in a shared directory) into
    maildrop/ after writing her request into it; it must not go out as bob's."""
    shared = system.dir / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    bobs = shared / "notes"
    r = system.run_as(BOB, ["/bin/sh", "-c", f"umask 0; : > {bobs}"])
    assert r.returncode == 0, r.stderr
    name = _drop_name()
    script = (f"printf 'relayq-drop 1\\nrcpt boss@example.org\\n\\nSubject: I quit\\n\\nx\\n' "
              f"> {bobs} && mv {bobs} {system.spool_root}/maildrop/{name}")
    r = system.run_as(ALICE, ["/bin/sh", "-c", script])
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    assert smarthost_of(system).transactions == []
    assert "writable by others" in system.rq.log() and system.drops() == []


def test_a_non_ascii_digit_hop_count_is_a_usage_error(system: System) -> None:
    r = system.sendmail_as(ALICE, "-h", "\u00b2", "carol@example.org", input=message("hops"))
    assert r.returncode == 64, r.stderr
    assert_one_line_error(r)


def test_a_message_over_a_limit_its_writer_could_not_read_is_reported(system: System) -> None:
    """The system config may be private to root (it holds the password): a user then
    hands over under the default limit; the taker's own limit refuses the file
    unread, and the owner is told by mail."""
    system.configure(max_message_size=1000)
    theirs = system.dir / "as-the-user-sees-it.toml"
    theirs.write_text(system.rq.config.read_text().replace("max_message_size = 1000\n", ""))
    theirs.chmod(0o644)
    r = system.sendmail_as(ALICE, "carol@example.org", input=message("big") + b"x" * 5000,
                           env={"RELAYQ_CONFIG": str(theirs)})
    assert r.returncode == 0, r.stderr
    assert root_queue_run(system).returncode == 0
    [t] = smarthost_of(system).transactions
    assert t.rcpt_tos == [f"{ALICE}@host.example.org"] and b"too large" in t.content
    assert system.drops() == []


def test_a_daemon_started_as_its_service_user_opens_the_queue_to_users(
    launchers: Path, smarthost_factory: SmarthostFactory
) -> None:
    """The systemd units' way: the daemon runs as `relayq` from its first
    instruction, in a queue directory the administrator made 0711 for it; it
    creates maildrop/ (set-gid to its group) and the socket, and users' mail flows."""
    sh = smarthost_factory()
    svc = pwd.getpwnam(DAEMON_USER)
    sysq = System(launchers, install=False, smarthost=sh.smarthost, queue_interval="1h",
                  daemon_user=DAEMON_USER)  # says: this daemon serves the host's users
    try:
        root = sysq.spool_root
        root.mkdir(mode=0o711)
        root.chmod(0o711)
        os.chown(root, svc.pw_uid, svc.pw_gid)
        os.chown(sysq.rq.log_file, svc.pw_uid, svc.pw_gid)
        sysq.configure(pid_file=str(root / "relayq.pid"))
        cmd = ["setpriv", f"--reuid={svc.pw_uid}", f"--regid={svc.pw_gid}", "--init-groups",
               *sysq.relayq_argv("daemon", "--foreground")]
        d = DaemonProcess(sysq.rq, cmd=cmd).wait_started()
        try:
            wait_for(lambda: (root / "relayq.sock").exists(), what="the socket")
            drop = os.stat(root / "maildrop")
            assert stat.S_IMODE(drop.st_mode) == 0o3733 and drop.st_gid == svc.pw_gid
            r = sysq.sendmail_as(ALICE, "-v", "carol@example.org", input=message("systemd"))
            assert r.returncode == 0, r.stderr
            assert b"handed to the relayq daemon" in r.stdout
            wait_for(lambda: len(sh.transactions) == 1, timeout=30, what="the delivery")
            assert d.stop() == 0
        finally:
            d.kill()
    finally:
        sysq.cleanup()


def test_what_the_taker_would_refuse_is_refused_before_exit_0(system: System) -> None:
    """Found by review: limits only the taker knew made the client exit 0 and the
    file vanish; the client checks the request part and the hop count itself."""
    for argv in (["-h", "1000", "carol@example.org"],
                 [*(f"{'r' * 110}{n}@example.org" for n in range(10_000))]):
        r = system.sendmail_as(ALICE, *argv, input=message("limits"))
        assert r.returncode == 65, r.stderr[:300]
        assert_one_line_error(r)
    assert system.drops() == []


def test_an_installation_the_queue_owner_cannot_read_is_named(tmp_path: Path) -> None:
    """Root's sendmail in daemon_user's queue becomes that user; when the running relayq
    or its Python lives where that user cannot read (this test venv's interpreter under
    /root), the user hears it in one line (78), not an internal error from an import."""
    from tests.helpers.relayq_env import BIN

    ensure_users()
    svc = pwd.getpwnam(DAEMON_USER)
    stdlib = os.path.dirname(os.__file__)
    probe = subprocess.run(["setpriv", f"--reuid={svc.pw_uid}", f"--regid={svc.pw_gid}",
                            "--clear-groups", "test", "-r", stdlib, "-a", "-x", stdlib],
                           check=False)
    if probe.returncode == 0:
        pytest.skip(f"{stdlib} is readable by {DAEMON_USER}")
    tmp_path.chmod(0o755)
    conf = tmp_path / "relayq.toml"
    conf.write_text(f'smarthost = "[127.0.0.1]:9"\nsyslog = false\n'
                    f'queue_dir = "{tmp_path}/q"\ndaemon_user = "{DAEMON_USER}"\n')
    env = {**os.environ, "RELAYQ_CONFIG": str(conf)}
    for argv in ([str(BIN / "sendmail"), "-odq", "bob@example.org"],
                 [str(BIN / "relayq"), "status"]):
        r = subprocess.run(argv, input=b"Subject: x\n\nhi\n", capture_output=True, env=env,
                           check=False, timeout=120)
        err = assert_one_line_error(r)
        assert r.returncode == 78, err
        assert f"cannot be read by uid {svc.pw_uid} ({DAEMON_USER})" in err, err


def test_logwatch_counts_a_users_mail_and_names_the_drop_line(system: System,
                                                               tmp_path: Path) -> None:
    """issue 15: a user's message (through maildrop/ and the daemon) as Debian's
    logwatch reads the log: counted, its Authentication-Warning counted; the one
    line logwatch does not know is the taker's, which sendmail has no match for."""
    from tests.system.test_logwatch import logwatch, messages, stat

    d = start_daemon(system)
    try:
        r = system.sendmail_as(ALICE, "-f", "root@example.org", "carol@example.org",
                               input=message("logwatch"))
        assert r.returncode == 0, r.stderr
        sh = smarthost_of(system)
        wait_for(lambda: len(sh.transactions) == 1, what="the delivery")
    finally:
        d.stop()
    log = system.rq.log()
    [(size, _)] = messages(log).values()
    uid = pwd.getpwnam(ALICE).pw_uid
    report = logwatch(tmp_path, log)
    assert stat(report, "Messages To Recipients") == 1
    assert stat(report, "Bytes Transferred") == size
    assert re.search(r"Authentication warnings:?\s+\S+: rqtest-alice set sender to "
                     r"root@example\.org using -f", report, re.I), report
    unmatched = report.split("**Unmatched Entries**", 1)[1].split(" ----")[0]
    lines = [re.sub(r"\s+\d+ Times?$", "", ln.strip()) for ln in unmatched.strip().splitlines()]
    assert lines == [f"taken from the drop directory, submitted by uid {uid} ({ALICE})"], report
