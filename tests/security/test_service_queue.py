"""The system queue and configuration of a host whose daemon runs as the relayq user
(the Debian package's service: User=relayq, RELAYQ_CONFIG=/etc/relayq/relayq.toml).

These need the real system paths (/etc/relayq/relayq.toml, /var/spool/relayq, /run),
so they run in a throwaway root (tests.helpers.debroot) with relayq's launchers
installed in it and a `relayq` system user created there: nothing on the machine
changes.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debroot import DebRoot, skip_unless_possible
from tests.helpers.relayq_env import BIN
from tests.helpers.users import ensure_users
from tests.integration.test_daemon import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ALICE = "rqtest-alice"
CONF = "/etc/relayq/relayq.toml"
SPOOL = "/var/spool/relayq"
LAUNCHERS = "/opt/rq"
MSG = "Subject: hello\n\nhi\n"
LOG = "/var/log/relayq-test.log"
PUBLIC = f'smarthost = "[127.0.0.1]:9"\nsyslog = false\nlog_file = "{LOG}"\n'
# what a root-made queue looks like once tmpfiles gave its directories to relayq
ROOT_MADE = (f"mkdir -m 0711 {SPOOL} && cd {SPOOL} && mkdir -m 0700 queue quarantine "
             "&& mkdir maildrop && chmod 1733 maildrop")
TMPFILES = (f"cd {SPOOL} && chown relayq:relayq . queue quarantine maildrop "
            "&& chmod 3733 maildrop")


class Host:
    """A DebRoot with relayq's launchers in /opt/rq and a relayq system user."""

    def __init__(self, root: DebRoot, service_user: bool = True) -> None:
        self.root = root
        root.ok([str(BIN / "relayq"), "install", "--root", LAUNCHERS, "--venv",
                 "--python", "/usr/bin/python3"])
        if service_user:
            root.ok("useradd --system --user-group --no-create-home --home-dir /nonexistent "
                    "--shell /usr/sbin/nologin relayq")
        launcher = root.path(f"{LAUNCHERS}/usr/sbin/sendmail").read_text().splitlines()
        [self.path_line] = [line for line in launcher if line.startswith("sys.path[:0]")]

    def relayq(self, *args: str, user: str = "", env: dict[str, str] | None = None,
               timeout: float = 120) -> tuple[int, str, str]:
        code = (f"import sys\n{self.path_line}\nfrom relayq.cli._exit import leave\n"
                "from relayq.cli.main import main\nleave(main(sys.argv[1:]))\n")
        res = self.root.run(["/usr/bin/python3", "-IS", "-c", code, *args], user=user,
                            env=env, timeout=timeout)
        return res.returncode, res.stdout, res.stderr

    def sendmail(self, *args: str, user: str = "", input: str = MSG,
                 env: dict[str, str] | None = None) -> tuple[int, str, str]:
        res = self.root.run([f"{LAUNCHERS}/usr/sbin/sendmail", *args], user=user,
                            input=input, env=env, timeout=120)
        return res.returncode, res.stdout, res.stderr

    def config(self, text: str, mode: int, group: str = "root") -> None:
        self.root.ok(f"mkdir -p /etc/relayq && cat > {CONF} && chgrp {group} {CONF} "
                     f"&& chmod {mode:o} {CONF}", input=text)

    def queued(self) -> tuple[list[str], list[str]]:
        """(queue/ entries, maildrop/ entries), looked at from outside."""
        return tuple(sorted(os.listdir(self.root.path(f"{SPOOL}/{sub}")))  # type: ignore[return-value]
                     for sub in ("queue", "maildrop"))

    def log_lines(self) -> list[str]:
        return self.root.path(LOG).read_text().splitlines()

    def stat(self, inside: str) -> os.stat_result:
        return os.stat(self.root.path(inside), follow_symlinks=False)

    def uid(self, name: str) -> int:
        return int(self.root.ok(["id", "-u", name]).strip())


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    skip_unless_possible()
    ensure_users()  # before the root: its /etc/passwd is the machine's, then its own
    with DebRoot(tmp_path / "root") as root:
        yield Host(root)


@pytest.fixture
def pip_host(tmp_path: Path) -> Iterator[Host]:
    """A host where relayq was installed with pip: no relayq user."""
    skip_unless_possible()
    ensure_users()
    with DebRoot(tmp_path / "root") as root:
        yield Host(root, service_user=False)


SECRET = 'smarthost = "[mail.example.org]:587"\nuser = "relay"\npassword = "s3cret"\n'


def test_check_config_by_a_user_who_cannot_read_the_system_file_says_so(host: Host) -> None:
    """A 0600 root file: an ordinary user's check-config does not check the defaults (a
    smarthost the file does not name) but says the file is private and that this
    user's mail goes to the daemon; no error in a correct, private setup (0)."""
    host.config(SECRET, 0o600)
    code, out, err = host.relayq("check-config", user=ALICE)
    assert code == 0, err
    assert f"{CONF}: cannot be read by uid {host.uid(ALICE)} (Permission denied)" in out, out
    assert "daemon" in out and "127.0.0.1" not in out + err, out + err
    code, out, err = host.relayq("check-config")  # root reads it
    assert code == 0, err
    assert "mail.example.org" in out, out


def test_the_daemon_refuses_a_system_config_it_cannot_read(host: Host) -> None:
    """A 0600 root file (it holds a password) read by the service as relayq: not the
    defaults (a loop to 127.0.0.1, exit 78 for the wrong reason) but the file and the fix."""
    host.config(SECRET, 0o600)
    for env in ({"RELAYQ_CONFIG": CONF}, {}):
        code, out, err = host.relayq("daemon", "--foreground", user="relayq", env=env)
        assert code == 78, (env, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (env, err)
        assert CONF in lines[0] and "chgrp relayq" in lines[0] and "chmod 640" in lines[0], \
            (env, lines)
        assert "loop" not in lines[0]


def test_an_explicit_system_config_that_cannot_be_read_is_an_error(host: Host) -> None:
    """RELAYQ_CONFIG naming the file: whoever asks, an unreadable file is not the defaults."""
    host.config(SECRET, 0o600)
    code, _, err = host.sendmail("-bv", "bob@example.org", user=ALICE,
                                 env={"RELAYQ_CONFIG": CONF})
    assert code == 78, err
    assert len(err.strip().splitlines()) == 1 and CONF in err, err


def test_a_user_without_relayq_config_still_hands_over(host: Host) -> None:
    """The design kept: an ordinary user's sendmail needs no secret; it hands the
    message to the daemon through maildrop/ with the defaults."""
    host.config(SECRET, 0o640, group="relayq")
    code, _, err = host.relayq("check-config", user="relayq")
    assert code == 0, err
    code, _, err = host.sendmail("-bv", "bob@example.org", user=ALICE)
    assert code == 0, err


def _public(host: Host, owner: str = "relayq") -> None:
    host.config(PUBLIC, 0o644)
    host.root.ok(f"touch {LOG} && chown {owner}:{owner} {LOG} && chmod 644 {LOG}")


def test_root_makes_a_missing_system_queue_for_the_service_user(host: Host) -> None:
    """/var/spool/relayq removed (or not made yet by tmpfiles): root's sendmail makes
    it for relayq, as tmpfiles would, and works in it as relayq; users' files then
    reach the daemon through the group of maildrop/."""
    _public(host)
    assert not host.root.path(SPOOL).exists()
    code, _, err = host.sendmail("-odq", "bob@example.org")
    assert code == 0, err
    uid, gid = host.uid("relayq"), int(host.root.ok(["id", "-g", "relayq"]))
    for sub, mode in (("", 0o711), ("/queue", 0o700), ("/quarantine", 0o700),
                      ("/maildrop", 0o3733)):
        st = host.stat(SPOOL + sub)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), sub
    queue, _ = host.queued()
    assert len(queue) == 2
    assert all(host.stat(f"{SPOOL}/queue/{n}").st_uid == uid for n in queue)
    code, _, err = host.sendmail("-odq", "bob@example.org", user=ALICE)
    assert code == 0, err
    [drop] = host.queued()[1]
    assert host.stat(f"{SPOOL}/maildrop/{drop}").st_gid == gid
    code, _, err = host.sendmail("-q")  # root's run, as relayq: takes alice's file
    assert code in (0, 75), err
    queue, drops = host.queued()
    assert drops == [] and len([n for n in queue if n.endswith(".e")]) == 2


def test_a_symlinked_queue_dir_is_made_for_its_owner(host: Host) -> None:
    """queue_dir is the administrator's path, a link to the real directory: root makes
    the queue in it for daemon_user (following the top directory, no other link)."""
    host.config(PUBLIC + 'queue_dir = "/var/spool/rq-link"\ndaemon_user = "relayq"\n', 0o644)
    host.root.ok(f"touch {LOG} && chown relayq:relayq {LOG} && chmod 644 {LOG}")
    host.root.ok("mkdir -p /srv/rq && ln -s /srv/rq /var/spool/rq-link")
    code, _, err = host.sendmail("-odq", "bob@example.org")
    assert code == 0, err
    relayq = host.uid("relayq")
    for sub in ("", "/queue", "/quarantine", "/maildrop"):
        assert host.stat("/srv/rq" + sub).st_uid == relayq, sub
    assert len(os.listdir(host.root.path("/srv/rq/queue"))) == 2  # its .e and .d


def test_without_a_service_user_root_makes_the_queue_its_own(pip_host: Host) -> None:
    """A pip install (no relayq user, no daemon_user): as before, root's queue."""
    _public(pip_host, owner="root")
    code, _, err = pip_host.sendmail("-odq", "bob@example.org")
    assert code == 0, err
    for sub, mode in (("", 0o711), ("/queue", 0o700), ("/maildrop", 0o1733)):
        st = pip_host.stat(SPOOL + sub)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), sub


def test_a_human_called_relayq_is_not_given_the_system_queue(pip_host: Host) -> None:
    """A login named relayq (an ordinary uid, not the package's system user): root's
    queue stays root's, as on a pip install without a relayq user."""
    pip_host.root.ok("useradd --create-home --shell /bin/sh relayq")
    _public(pip_host, owner="root")
    code, _, err = pip_host.sendmail("-odq", "bob@example.org")
    assert code == 0, err
    for sub in ("", "/queue", "/maildrop"):
        assert pip_host.stat(SPOOL + sub).st_uid == 0, sub


def test_a_drop_file_the_taker_cannot_read_is_kept_with_the_fix(host: Host) -> None:
    """A user's accepted mail the daemon's user cannot read (a maildrop/ that was not
    set-gid when it was written) stays, and the log names the fix; once applied, the
    next run takes it."""
    _public(host)
    host.root.ok(ROOT_MADE)
    code, _, err = host.sendmail("-odq", "bob@example.org", user=ALICE)
    assert code == 0, err
    [drop] = host.queued()[1]
    host.root.ok(TMPFILES)
    for _ in range(2):
        code, _, err = host.sendmail("-q")
        assert code in (0, 75), err
        assert host.queued() == ([], [drop])
    said = [line for line in host.log_lines() if drop in line]
    assert len(said) == 2, said  # once a run
    path = f"{SPOOL}/maildrop/{drop}"
    assert f"chgrp relayq {path}" in said[0] and "removed" not in said[0], said
    host.root.ok(f"chgrp relayq {path}")
    code, _, err = host.sendmail("-q")
    assert code in (0, 75), err
    queue, drops = host.queued()
    assert drops == [] and len(queue) == 2


def test_unreadable_drop_files_that_cannot_be_a_clients_are_removed(host: Host) -> None:
    """Only a file that could be a client's with the wrong group (not ours, group-read)
    is kept as Unreadable; a mode-000 file (or one of our group we still cannot read)
    is planted: removed like any hostile entry, so thousands cannot pile up for good."""
    _public(host)
    host.root.ok(ROOT_MADE)
    host.root.ok(TMPFILES)
    md = f"{SPOOL}/maildrop"
    kept, planted, mine = "d" + "a" * 32, "d" + "b" * 32, "d" + "c" * 32
    host.root.ok(f"cd {md} && umask 077 && echo x > {kept} && chgrp {ALICE} {kept} "
                 f"&& chmod 0640 {kept} && echo x > {planted} && chmod 0 {planted} "
                 f"&& echo x > {mine} && chmod 0604 {mine}", user=ALICE)
    assert host.stat(f"{md}/{planted}").st_gid == host.stat(md).st_gid  # set-gid: ours
    code, _, err = host.sendmail("-q")
    assert code in (0, 75), err
    assert host.queued()[1] == [kept]
    lines = host.log_lines()
    [said] = [line for line in lines if kept in line]
    assert f"chgrp relayq {md}/{kept}" in said, said
    for name in (planted, mine):
        [said] = [line for line in lines if name in line]
        assert "Permission denied" in said and "chgrp" not in said, said


def test_mail_waiting_in_maildrop_is_counted_by_status_and_flush(host: Host) -> None:
    """A drop file the taker cannot read is mail not yet queued: status says it waits,
    root's flush exits 75 (mail left), as for queued mail it could not deliver."""
    _public(host)
    host.root.ok(ROOT_MADE)
    code, _, err = host.sendmail("-odq", "bob@example.org", user=ALICE)
    assert code == 0, err
    host.root.ok(TMPFILES)
    code, out, err = host.relayq("flush")
    assert code == 75, out + err
    code, out, err = host.relayq("status")
    assert code == 0, err
    assert "messages:     0" in out and "maildrop:     1 waiting" in out, out
    code, out, err = host.relayq("status", "--json")
    assert '"maildrop_waiting": 1' in out, out


def test_roots_files_the_service_user_cannot_read_are_named_with_the_fix(host: Host) -> None:
    """Root's message from before the queue was the service user's (an earlier pip
    install): mailq and the queue run say whose it is and how to give it back."""
    _public(host)
    host.root.ok(ROOT_MADE)
    code, _, err = host.sendmail("-odq", "bob@example.org")
    assert code == 0, err
    host.root.ok(TMPFILES)
    [qid] = [n[:-2] for n in host.queued()[0] if n.endswith(".e")]
    fix = f"chown relayq:relayq {SPOOL}/queue/{qid}.*"
    code, out, err = host.sendmail("-bp")
    assert qid in out and fix in out, (out, err)
    code, _, err = host.sendmail("-q")
    assert code == 75, err
    said = [line for line in host.log_lines() if qid in line]
    assert said and fix in said[-1], said
    before = len(host.log_lines())
    code, _, err = host.relayq("daemon", user="relayq", env={"RELAYQ_CONFIG": CONF})
    assert code == 0, err  # the service's first queue run (its agent) says it too
    daemon = _pid(host, f"{SPOOL}/relayq.pid")
    try:
        wait_for(lambda: any(fix in line for line in host.log_lines()[before:]),
                 timeout=60, what="the daemon's line")
    finally:
        _stop(host, daemon)
    host.root.ok(fix)
    code, out, err = host.sendmail("-bp")
    assert "chown" not in out, out


def _pid(host: Host, inside: str) -> int:
    return int(host.root.path(inside).read_text().strip())


def _status_pid(host: Host, user: str = "") -> int | None:
    import json

    code, out, err = host.relayq("status", "--json", user=user, timeout=60)
    assert code == 0, err
    return json.loads(out)["daemon_pid"]


def _stop(host: Host, pid: int) -> None:
    host.root.ok(f"kill {pid}; i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt 600 ]; "
                 "do sleep 0.1; i=$((i+1)); done")


def test_one_daemon_per_queue_wherever_its_pid_file_is(host: Host) -> None:
    """A root daemon started by hand holds /run/relayq.pid; then the service's runtime
    directory appears: the service's daemon (as relayq, /run/relayq/relayq.pid) must
    not start beside it, and status finds whichever runs; and the other way round."""
    _public(host)
    code, _, err = host.relayq("daemon")  # root, by hand: detached
    assert code == 0, err
    first = _pid(host, "/run/relayq.pid")
    host.root.ok("mkdir -m 0755 /run/relayq && chown relayq:relayq /run/relayq")
    code, _, err = host.relayq("daemon", "--foreground", user="relayq",
                               env={"RELAYQ_CONFIG": CONF}, timeout=60)
    assert code == 75, err
    assert len(err.strip().splitlines()) == 1 and str(first) in err, err
    assert _status_pid(host) == first
    assert _status_pid(host, user="relayq") == first
    _stop(host, first)
    code, _, err = host.relayq("daemon", user="relayq", env={"RELAYQ_CONFIG": CONF})
    assert code == 0, err
    service = _pid(host, "/run/relayq/relayq.pid")
    code, _, err = host.relayq("daemon", timeout=60)  # root again: refused
    assert code == 75 and str(service) in err, err
    assert _status_pid(host) == service
    code, _, err = host.relayq("flush", timeout=60)
    assert code in (0, 75), err
    _stop(host, service)


def test_root_follows_nothing_the_service_user_leaves_in_its_runtime_directory(
        host: Host) -> None:
    """/run/relayq is relayq's: a FIFO (or a link) there as the pid file must neither
    hang root's daemon nor its status, nor be written through."""
    _public(host)
    host.root.ok("mkdir -m 0755 /run/relayq && chown relayq:relayq /run/relayq")
    host.root.ok("echo precious > /run/target && chmod 644 /run/target")
    host.root.ok("mkfifo /run/relayq/relayq.pid", user="relayq")
    code, _, err = host.relayq("daemon", timeout=60)
    assert code == 0, err
    daemon = _pid(host, "/run/relayq.pid")
    assert _status_pid(host) == daemon
    host.root.ok("rm /run/relayq/relayq.pid && ln -s /run/target /run/relayq/relayq.pid",
                 user="relayq")
    assert _status_pid(host) == daemon
    _stop(host, daemon)
    code, _, err = host.relayq("daemon", timeout=60)
    assert code == 0, err
    assert host.root.path("/run/target").read_text() == "precious\n"
    _stop(host, _pid(host, "/run/relayq.pid"))


def test_a_live_hand_over_the_daemon_cannot_read_waits_with_the_fix(host: Host) -> None:
    """The daemon (as relayq) asked to take a file it may not open (maildrop/ not
    set-gid): not a refusal (exit 65, the file discarded) but a deferral: the user's
    sendmail exits 0, the file stays for a later run, the log says how to fix it."""
    _public(host)
    host.root.ok(ROOT_MADE)
    host.root.ok(f"cd {SPOOL} && chown relayq:relayq . queue quarantine maildrop")  # 1733
    code, _, err = host.relayq("daemon", user="relayq", env={"RELAYQ_CONFIG": CONF})
    assert code == 0, err
    try:
        wait_for(lambda: host.root.path(f"{SPOOL}/relayq.sock").exists(), timeout=60,
                 what="the daemon's socket")
        code, out, err = host.sendmail("-v", "-odq", "bob@example.org", user=ALICE)
        assert code == 0, err
        assert "no daemon took" in out, out  # it answered: not now (75), not refused
        [drop] = host.queued()[1]

        def said() -> list[str]:
            return [line for line in host.log_lines() if drop[1:] in line]

        wait_for(said, timeout=60, what="the log line")
        assert f"chgrp relayq {SPOOL}/maildrop/" in said()[0], said()
        assert not any("removed" in line or "refused" in line for line in said()), said()
        assert host.queued()[1] == [drop]
    finally:
        _stop(host, _pid(host, f"{SPOOL}/relayq.pid"))
