"""The system queue and configuration of a host whose daemon runs as the relayq user
(the Debian package's service: User=relayq, RELAYQ_CONFIG=/etc/relayq/relayq.toml).

These need the real system paths (/etc/relayq/relayq.toml, /var/spool/relayq, /run),
so they run in a throwaway root (tests.helpers.debroot) with relayq's launchers
installed in it and a `relayq` system user created there: nothing on the machine
changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from tests.helpers.debroot import DebRoot, skip_unless_possible
from tests.helpers.relayq_env import BIN
from tests.helpers.users import ensure_users

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

ALICE = "rqtest-alice"
CONF = "/etc/relayq/relayq.toml"
SPOOL = "/var/spool/relayq"
LAUNCHERS = "/opt/rq"
MSG = "Subject: hello\n\nhi\n"


class Host:
    """A DebRoot with relayq's launchers in /opt/rq and a relayq system user."""

    def __init__(self, root: DebRoot) -> None:
        self.root = root
        root.ok([str(BIN / "relayq"), "install", "--root", LAUNCHERS, "--venv",
                 "--python", "/usr/bin/python3"])
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


SECRET = 'smarthost = "[mail.example.org]:587"\nuser = "relay"\npassword = "s3cret"\n'


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
