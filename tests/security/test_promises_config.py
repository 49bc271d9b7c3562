"""Issue 12 §4 and §5: which configuration a process may use, and one loader for all.

§4: a non-root caller naming a configuration file (`-C`) is refused (77) in
every mode, before anything is opened or started: before, `sendmail -C FILE
-bd` (or -q1m, -qp) started a daemon with the caller's queue_dir, log_file and
pid_file (and would run its password_command and pipe aliases).
§5: the daemon read its configuration with a loader of its own that skipped
the secret-permission check: a 0644 file holding `password` was refused by
`sendmail` (78) but accepted by `relayq daemon`, `sendmail -bd` and SIGHUP.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
from tests.helpers.relayq_env import Relayq, assert_one_line_error
from tests.helpers.users import System
from tests.integration.test_daemon import DaemonProcess, free_port, kill_detached, wait_for

from relayq.core.errors import EX_CONFIG, EX_NOPERM, EX_OK

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from relayq.testing.smarthost import SmarthostFactory

ALICE = "rqtest-alice"
MSG = b"From: alice@example.org\nTo: bob@example.org\nSubject: hello\n\nhi\n"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root")


@pytest.fixture
def system(launchers: Path) -> Iterator[System]:
    sysq = System(launchers, queue_interval="1h")
    yield sysq
    sysq.cleanup()


@pytest.fixture
def evil(system: System) -> Iterator[Path]:
    """A configuration a web application's attacker could name: everything it
    would create lives in a directory anyone may write, so we see if it was made."""
    work = system.dir / "attacker"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    conf = work / "evil.toml"
    conf.write_text(f'queue_dir = "{work}/q"\nlog_file = "{work}/log"\npid_file = "{work}/pid"\n'
                    f'listen = ["127.0.0.1:{free_port()}"]\nsmarthost = "[127.0.0.1]:9"\n'
                    'syslog = false\nqueue_interval = "1h"\n')
    conf.chmod(0o644)
    yield conf
    kill_detached(work / "pid")  # only if the refusal failed and a daemon runs


@needs_root
@pytest.mark.parametrize("flags", [["-bd"], ["-q1m"], ["-qp"], ["-bd", "-q1m"], ["-bD"],
                                   ["-bp"], ["-bs"], ["-bi"], ["-bv", "a@example.org"],
                                   ["-q"], ["a@example.org"]])
def test_a_user_naming_a_config_is_refused_in_every_sendmail_mode(
    system: System, evil: Path, flags: list[str]
) -> None:
    r = system.sendmail_as(ALICE, "-C", str(evil), *flags, input=MSG, timeout=30)
    assert r.returncode == EX_NOPERM, r
    assert "-C" in assert_one_line_error(r)
    assert sorted(os.listdir(evil.parent)) == ["evil.toml"]  # no queue, log or pid file


@needs_root
@pytest.mark.parametrize("argv", [["daemon"], ["daemon", "--listen"], ["check-config"],
                                  ["status"], ["flush"], ["mailq"]])
def test_a_user_naming_a_config_is_refused_by_relayq(
    system: System, evil: Path, argv: list[str]
) -> None:
    r = system.relayq_as(ALICE, "-C", str(evil), *argv)
    assert r.returncode == EX_NOPERM, r
    assert_one_line_error(r)
    assert sorted(os.listdir(evil.parent)) == ["evil.toml"]


@needs_root
def test_a_user_naming_a_config_is_refused_by_mailq_and_newaliases(
    system: System, evil: Path
) -> None:
    for prog in ("usr/bin/mailq", "usr/bin/newaliases"):
        r = system.run_as(ALICE, [str(system.launchers / prog), "-C", str(evil)])
        assert r.returncode == EX_NOPERM, (prog, r)
        assert_one_line_error(r)
    assert sorted(os.listdir(evil.parent)) == ["evil.toml"]


def test_root_may_still_name_a_config(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the rule lets root name a file")
    rq = Relayq(tmp_path)
    r = rq.run("relayq", "-C", str(rq.config), "check-config")
    assert r.returncode == EX_OK, r.stderr
    assert f"# {rq.config}" in r.stdout.decode()


# --- §5: one loader ---------------------------------------------------------------------


@pytest.fixture
def rq(tmp_path: Path) -> Relayq:
    return Relayq(tmp_path, pid_file=str(tmp_path / "relayq.pid"), queue_interval="1h",
                  listen=[f"127.0.0.1:{free_port()}"])


@pytest.mark.parametrize("argv", [["relayq", "daemon", "--foreground"],
                                  ["relayq", "daemon", "--listen"],
                                  ["sendmail", "-bd"], ["sendmail", "-q1m"]])
def test_the_daemon_refuses_a_readable_config_holding_a_password(
    rq: Relayq, argv: list[str]
) -> None:
    rq.configure(user="relay-user", password="hunter2")
    rq.config.chmod(0o644)
    try:
        r = rq.run(*argv, timeout=30)
    finally:
        kill_detached(rq.root / "relayq.pid")  # only if it started after all
    assert r.returncode == EX_CONFIG, r
    err = assert_one_line_error(r)
    assert "holds a password but its mode is 0644" in err and "hunter2" not in err
    assert not (rq.root / "relayq.pid").exists()
    # the same file, the same answer as sendmail's
    s = rq.sendmail("bob@example.org", input=MSG)
    assert (s.returncode, s.stderr.split(b": ", 1)[1]) == (EX_CONFIG, r.stderr.split(b": ", 1)[1])


def test_a_sighup_to_a_readable_password_config_keeps_the_old_one(
    rq: Relayq, smarthost_factory: SmarthostFactory
) -> None:
    sh = smarthost_factory()
    rq.configure(smarthost=sh.smarthost, delivery_mode="deferred")  # no wake-ups
    assert rq.sendmail("bob@example.org", input=MSG).returncode == EX_OK
    d = DaemonProcess(rq).wait_started()
    try:
        rq.configure(smarthost="[127.0.0.1]:9", user="relay-user", password="hunter2")
        rq.config.chmod(0o644)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in rq.log(), what="the refusal")
        log = rq.log()
        assert "holds a password but its mode is 0644" in log and "hunter2" not in log
        assert "configuration reloaded" not in log
        d.signal(signal.SIGUSR1)  # the old configuration still runs: its smarthost gets it
        wait_for(lambda: len(sh.transactions) == 1, what="delivery with the old config")
        assert d.proc.poll() is None
    finally:
        assert d.stop() == EX_OK


# --- §3: a looped message is refused before exit 0, never taken and dropped -------------


@needs_root
@pytest.mark.parametrize("how", ["-h", "Received"])
def test_a_handed_over_message_over_the_hop_limit_is_refused_before_exit_0(
    system: System, how: str
) -> None:
    """With no daemon running the hand-over exits 0 and the taker decides later; it
    refused 25 to 999 hops (-h) or 25 Received fields and removed the file, so the
    message was gone. The client applies the taker's rule first: 65, nothing queued."""
    hops = "".join(f"Received: from hop{n}.example.org by host.example.org; "
                   "Tue, 1 Dec 2026 00:00:00 +0000\n" for n in range(25))
    args, head = (["-h", "25"], "") if how == "-h" else ([], hops)
    r = system.sendmail_as(ALICE, *args, "carol@example.org",
                           input=(head + "Subject: loop\n\nround\n").encode())
    assert r.returncode == 65, r
    assert "Too many hops 25 (25 max)" in assert_one_line_error(r)
    assert system.drops() == []
    # one hop less goes through
    fewer = (["-h", "24"], "") if how == "-h" else ([], hops.split("\n", 1)[1])
    r = system.sendmail_as(ALICE, *fewer[0], "carol@example.org",
                           input=(fewer[1] + "Subject: loop\n\nround\n").encode())
    assert r.returncode == 0, r
    assert len(system.drops()) == 1
