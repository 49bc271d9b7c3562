"""Real local users for the privilege tests, and a system-wide relayq they submit to.

The users are created once per machine (useradd, under a lock: xdist workers
share the machine) and left in place. They run relayq through launchers made
by `relayq install --root DIR --venv --python /usr/bin/python3`: the test venv's interpreter
lives under /root, which other users cannot read, exactly as on a real host
where relayq is installed for everyone.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from tests.helpers.relayq_env import BIN, Relayq

ORDINARY = ("rqtest-alice", "rqtest-bob", "rqtest-admin")
SERVICE = "rqtest-svc"  # a system account: no home, no shell (like www-data or nagios)
DAEMON_USER = "rqtest-relayq"  # the daemon's own service user (daemon_user)
ADMIN_GROUP = "rqtest-adm"
LOCK = "/tmp/relayq-test-users.lock"


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_users() -> None:
    """Create the test users and the admin group if missing; skip the test if we cannot."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("creating users needs root and useradd")
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            grp.getgrnam(ADMIN_GROUP)
        except KeyError:
            subprocess.run(["groupadd", ADMIN_GROUP], check=True, capture_output=True)
        for name in ORDINARY:
            if not _exists(name):
                subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name],
                               check=True, capture_output=True)
        for name in (SERVICE, DAEMON_USER):
            if not _exists(name):
                subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                                "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                                name], check=True, capture_output=True)
        if not _exists("www-data"):
            subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir",
                            "/var/www", "--shell", "/usr/sbin/nologin", "www-data"],
                           check=True, capture_output=True)
        if "rqtest-admin" not in grp.getgrnam(ADMIN_GROUP).gr_mem:
            subprocess.run(["usermod", "-aG", ADMIN_GROUP, "rqtest-admin"], check=True,
                           capture_output=True)


def install_launchers() -> Path:
    """`relayq install --venv --python /usr/bin/python3` into a directory everyone can read
    (launchers that run the test venv's relayq, not a staging root)."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 for the other users")
    root = Path(tempfile.mkdtemp(prefix="relayq-bin-", dir="/tmp"))
    root.chmod(0o755)
    r = subprocess.run([str(BIN / "relayq"), "install", "--root", str(root), "--venv",
                        "--python", "/usr/bin/python3"], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot install launchers for /usr/bin/python3: {r.stderr.strip()}")
    return root


class System:
    """A relayq installed for the whole host: config readable by all, queue root's."""

    def __init__(self, launchers: Path, *, install: bool = True, **settings: object) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="relayq-sys-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.launchers = launchers
        self.rq = Relayq(self.dir, **{"pid_file": str(self.dir / "relayq.pid"), **settings})
        self.rq.log_file.touch()
        self.publish()
        if install:
            self.rq.spool.ensure()  # as `relayq install` does for /var/spool/relayq

    def publish(self) -> None:
        """The config holds no secret here, so every user may read it (the default
        system setup keeps secrets in a password_file instead)."""
        self.rq.config.chmod(0o644)

    def configure(self, **settings: object) -> None:
        self.rq.configure(**settings)
        self.publish()

    @property
    def spool_root(self) -> Path:
        return self.rq.queue_dir

    def env_for(self, name: str) -> dict[str, str]:
        pw = pwd.getpwnam(name)
        return {
            "PATH": f"{self.launchers}/usr/sbin:{self.launchers}/usr/bin:/usr/bin:/bin",
            "RELAYQ_CONFIG": str(self.rq.config),
            "HOME": pw.pw_dir,
            "USER": name,
            "LOGNAME": name,
        }

    def run_as(self, name: str, argv: list[str], *, input: bytes = b"",
               env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        pw = pwd.getpwnam(name)
        return subprocess.run(argv, input=input, env={**self.env_for(name), **(env or {})},
                              user=pw.pw_uid, group=pw.pw_gid,
                              extra_groups=os.getgrouplist(name, pw.pw_gid), cwd="/",
                              capture_output=True, timeout=timeout, check=False)

    def sendmail_as(self, name: str, *args: str, input: bytes = b"",
                    env: dict[str, str] | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return self.run_as(name, [str(self.launchers / "usr/sbin/sendmail"), *args],
                           input=input, env=env, timeout=timeout)

    def mailq_as(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.run_as(name, [str(self.launchers / "usr/bin/mailq"), *args])

    def relayq_argv(self, *args: str) -> list[str]:
        """`relayq ARGS` run the way the launchers run sendmail (same interpreter and
        path): the installed `relayq` is a link into the venv, which lives under /root."""
        launcher = (self.launchers / "usr/sbin/sendmail").read_text().splitlines()
        path_lines = "\n".join(line for line in launcher if line.startswith("sys.path"))
        code = (f"import sys\n{path_lines}\nfrom relayq.cli._exit import leave\n"
                "from relayq.cli.main import main\nleave(main(sys.argv[1:]))\n")
        return ["/usr/bin/python3", "-IS", "-c", code, *args]

    def relayq_as(self, name: str, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.run_as(name, self.relayq_argv(*args))

    def drops(self) -> list[str]:
        try:
            return sorted(os.listdir(self.spool_root / "maildrop"))
        except FileNotFoundError:
            return []

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
